// Command cluster is the first example of the Node.js cluster docs written
// in Go with shoal's library: the program is its own master and its own
// workers, and the workers share port 8000.
//
//	go run ./examples/cluster
//	curl localhost:8000
package main

import (
	"context"
	"io"
	"log"
	"net/http"
	"os/signal"
	"runtime"
	"syscall"

	"github.com/shoal-sh/shoal/supervisor"
	"github.com/shoal-sh/shoal/worker"
)

func main() {
	if supervisor.IsMaster() {
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
		defer stop()
		s, err := supervisor.New(supervisor.Options{
			Port: 8000,
			OnEvent: func(e supervisor.Event) {
				switch e.Type {
				case supervisor.EventOnline:
					log.Printf("worker %d online", e.PID)
				case supervisor.EventDeath:
					log.Printf("worker %d died (%s)", e.PID, e.Death.Status())
				}
			},
		})
		if err != nil {
			log.Fatal(err)
		}
		// Fork workers.
		for i := 0; i < runtime.NumCPU(); i++ {
			s.Fork()
		}
		if err := s.Run(ctx); err != nil {
			log.Fatal(err)
		}
		return
	}
	// Worker processes have an HTTP server. worker.ListenAndServe listens
	// on $PORT with SO_REUSEPORT, tells the master it is ready, reports
	// the requests it serves, and on SIGTERM drains without losing one.
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello world\n")
	})
	if err := worker.ListenAndServe(context.Background(), h); err != nil {
		log.Fatal(err)
	}
}
