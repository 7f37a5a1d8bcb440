// Command gosingle is the one-process contender of the Go benchmark: the
// built-in worker's hello handler (the same bytes, served by the same
// worker.Server, so the only difference is one process instead of N) in a
// single process with GOMAXPROCS threads and one listening socket.
//
//	GOMAXPROCS=2 PORT=8000 HOST=127.0.0.1 gosingle
//
// Outside shoal, worker.Server serves alone and reports nothing.
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"

	"github.com/shoal-sh/shoal/worker"
)

func main() {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "hello world\n")
	})
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	addr := net.JoinHostPort(os.Getenv("HOST"), os.Getenv("PORT"))
	if err := (&worker.Server{Handler: h, Addr: addr}).ListenAndServe(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "gosingle:", err)
		os.Exit(1)
	}
}
