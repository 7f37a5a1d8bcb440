package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"

	"github.com/shoal-sh/shoal/reuseport"
	"github.com/shoal-sh/shoal/supervisor"
	"github.com/shoal-sh/shoal/worker"
)

// runHello is the built-in worker: the hello-world HTTP server of the
// Node.js cluster documentation, on every TCP listener shoal gives it
// (SHOAL_PORTS, or PORT), on HOST when set. On a UDP listener it answers
// every datagram with "hello world\n", so that it serves every listener.
func runHello() int {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "hello world\n")
	})
	fail := func(err error) int {
		fmt.Fprintf(os.Stderr, "shoal worker %d (pid %d): %v\n", supervisor.WorkerID(), os.Getpid(), err)
		return 1
	}
	ls, err := supervisor.ParseListeners(os.Getenv(supervisor.EnvPorts))
	if err != nil {
		ls = nil // no SHOAL_PORTS: HTTP on PORT
	}
	for _, l := range ls {
		if l.Network != "udp" {
			continue
		}
		pc, err := reuseport.ListenPacket("udp", net.JoinHostPort(os.Getenv("HOST"), fmt.Sprint(l.Port)))
		if err != nil {
			return fail(err)
		}
		defer pc.Close()
		go helloUDP(pc)
	}
	if err := serveHello(context.Background(), h); err != nil {
		return fail(err)
	}
	return 0
}

// helloUDP answers every datagram on pc with "hello world\n" until pc is
// closed.
func helloUDP(pc net.PacketConn) {
	buf := make([]byte, 64<<10)
	for {
		_, addr, err := pc.ReadFrom(buf)
		if err != nil {
			if !strings.Contains(err.Error(), "closed") {
				fmt.Fprintf(os.Stderr, "shoal worker %d (pid %d): udp: %v\n", supervisor.WorkerID(), os.Getpid(), err)
			}
			return
		}
		pc.WriteTo([]byte("hello world\n"), addr)
	}
}

// serveHello serves h with the worker package on every TCP listener:
// requests reported to the master in batches, and a drain that loses no
// request on SIGTERM.
func serveHello(ctx context.Context, h http.Handler) error {
	return (&worker.Server{Handler: h}).ListenAndServe(ctx)
}
