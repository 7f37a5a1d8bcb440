package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"

	"github.com/shoal-sh/shoal/supervisor"
	"github.com/shoal-sh/shoal/worker"
)

// runHello is the built-in worker: the hello-world HTTP server of the
// Node.js cluster documentation, on every TCP listener shoal gives it
// (passed with --bind master, or else SHOAL_PORTS or PORT, on HOST when
// set), with the worker package: requests reported to the master in
// batches, and a drain that loses no request on SIGTERM. On a UDP listener
// it answers every datagram with "hello world\n", so that it serves every
// listener.
func runHello() int {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "hello world\n")
	})
	fail := func(err error) int {
		fmt.Fprintf(os.Stderr, "shoal worker %d (pid %d): %v\n", supervisor.WorkerID(), os.Getpid(), err)
		return 1
	}
	ctx := context.Background()
	tcp, udp, err := worker.Listen(ctx)
	if err != nil {
		return fail(err)
	}
	for _, pc := range udp {
		defer pc.Close()
		go helloUDP(pc)
	}
	if len(tcp) == 0 {
		return fail(fmt.Errorf("the built-in worker serves HTTP and has no TCP listener"))
	}
	if err := (&worker.Server{Handler: h}).Serve(ctx, worker.Join(tcp...)); err != nil {
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
