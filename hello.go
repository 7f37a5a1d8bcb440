package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"

	"github.com/shoal-sh/shoal/supervisor"
	"github.com/shoal-sh/shoal/worker"
)

// runHello is the built-in worker: the hello-world HTTP server of the
// Node.js cluster documentation, on $PORT, or the first TCP listener of
// $SHOAL_PORTS.
func runHello() int {
	port := os.Getenv(supervisor.EnvPort)
	if port == "" {
		port = "8000"
	}
	// With several listeners, HTTP is served on the first TCP one.
	if ls, err := supervisor.ParseListeners(os.Getenv(supervisor.EnvPorts)); err == nil {
		for _, l := range ls {
			if l.Network == "tcp" {
				port = strconv.Itoa(l.Port)
				break
			}
		}
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "hello world\n")
	})
	addr := net.JoinHostPort(os.Getenv("HOST"), port)
	if err := serveHello(context.Background(), addr, h); err != nil {
		fmt.Fprintf(os.Stderr, "shoal worker %d (pid %d): %v\n", supervisor.WorkerID(), os.Getpid(), err)
		return 1
	}
	return 0
}

// serveHello serves h on addr with the worker package: requests reported
// to the master in batches, and a drain that loses no request on SIGTERM.
func serveHello(ctx context.Context, addr string, h http.Handler) error {
	return (&worker.Server{Handler: h, Addr: addr}).ListenAndServe(ctx)
}
