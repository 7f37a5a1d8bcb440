package worker_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"time"

	"github.com/shoal-sh/shoal/ipc"
	"github.com/shoal-sh/shoal/reuseport"
	"github.com/shoal-sh/shoal/worker"
)

// A Server on a listener of its own, stopped by its context: Serve drains
// and returns nil once no connection is left. Under shoal the Server would
// also tell the master it is ready and report its requests; here, outside
// shoal, it serves alone.
func ExampleServer_Serve() {
	ln, err := reuseport.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	s := &worker.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, "hello world\n")
		}),
		DrainTimeout: 5 * time.Second,
	}
	ctx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- s.Serve(ctx, ln) }()

	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + ln.Addr().String() + "/")
	if err != nil {
		log.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	fmt.Printf("%s %s", resp.Status, body)

	stop() // as SIGTERM would
	select {
	case err := <-served:
		fmt.Println("drained:", err)
	case <-time.After(10 * time.Second):
		log.Fatal("Serve did not return within 10s of the stop")
	}
	// Output:
	// 200 OK hello world
	// drained: <nil>
}

// A Counter reports the requests a handler served to the master in
// batches, and what is left when it closes. The master's end is read here
// with a Decoder, as shoal's master reads it.
func ExampleCounter() {
	masterEnd, workerEnd, err := ipc.Pair()
	if err != nil {
		log.Fatal(err)
	}
	defer masterEnd.Close()
	conn := ipc.NewConn(workerEnd)
	defer conn.Close()

	counter := worker.NewCounter(conn, time.Hour) // no report before Close
	h := counter.Wrap(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	for i := 0; i < 3; i++ {
		h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/", nil))
	}
	if err := counter.Close(); err != nil {
		log.Fatal(err)
	}

	masterEnd.SetReadDeadline(time.Now().Add(10 * time.Second))
	m, err := ipc.NewDecoder(masterEnd, 0).Next()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(m.Cmd, m.N)
	// Output:
	// shoal:requests 3
}
