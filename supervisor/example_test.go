package supervisor_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/shoal-sh/shoal/supervisor"
)

// A program that is its own master: with no Command, the supervisor runs
// copies of the running program as its workers. Here that program is this
// package's test binary, whose TestMain runs, when IsWorker() reports true,
// a small worker that listens on 127.0.0.1:$PORT and answers {"echo":X}
// with {"echoed":X,"from":SLOT}.
func Example() {
	ln, err := net.Listen("tcp4", "127.0.0.1:0") // a port that was free
	if err != nil {
		log.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()

	listening := make(chan int, 2)
	replies := make(chan string, 1)
	s, err := supervisor.New(supervisor.Options{
		Workers: 2,
		Port:    port,
		// Both callbacks must not block: the channels have room.
		OnEvent: func(e supervisor.Event) {
			if e.Type == supervisor.EventListening {
				listening <- e.Worker
			}
		},
		OnMessage: func(m supervisor.Message) { replies <- string(m.Raw) },
	})
	if err != nil {
		log.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- s.Run(ctx) }()

	timeout := time.After(20 * time.Second)
	for range 2 {
		select {
		case <-listening:
		case <-timeout:
			log.Fatal("the workers did not listen within 20s")
		}
	}
	fmt.Println("2 workers listen on the port")

	if err := s.Send(2, map[string]string{"echo": "hello"}); err != nil {
		log.Fatal(err)
	}
	select {
	case r := <-replies:
		fmt.Println("worker 2 answers:", r)
	case <-timeout:
		log.Fatal("no answer within 20s")
	}

	stop() // SIGTERM to every worker, SIGKILL after StopTimeout
	select {
	case err := <-ran:
		fmt.Println("Run:", err)
	case <-timeout:
		log.Fatal("Run did not return within 20s")
	}
	// Output:
	// 2 workers listen on the port
	// worker 2 answers: {"echoed":"hello","from":2}
	// Run: <nil>
}

// A worker that keeps failing: with MaxRestarts the supervisor replaces it
// twice, then gives up, stops every worker and returns an error wrapping
// ErrTooManyRestarts, so that the program can exit instead of crash-looping.
func ExampleOptions_maxRestarts() {
	s, err := supervisor.New(supervisor.Options{
		Command:     []string{"sh", "-c", "exit 3"},
		Workers:     1,
		MaxRestarts: 2,
		OnEvent: func(e supervisor.Event) {
			if e.Type == supervisor.EventDeath {
				fmt.Printf("worker %d: %s\n", e.Worker, e.Death.Status())
			}
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err = s.Run(ctx)
	fmt.Println("gave up:", errors.Is(err, supervisor.ErrTooManyRestarts))
	// Output:
	// worker 1: exit status 3
	// worker 1: exit status 3
	// worker 1: exit status 3
	// gave up: true
}

// A master that can replace its own program in place: main forks from the
// main thread (supervisor.Main, with runtime.LockOSThread in an init
// function), adopts what the master before it handed over, and upgrades on
// SIGUSR2 to the program now at its path. Not run: it would exec.
func ExampleSupervisor_Upgrade() {
	run := func() int {
		in, err := supervisor.Inherit() // nil when started afresh
		if err != nil {
			log.Print(err)
			return 1
		}
		s, err := supervisor.New(supervisor.Options{Port: 8000, Inherited: in})
		if err != nil {
			log.Print(err)
			return 2
		}
		usr2 := make(chan os.Signal, 1)
		signal.Notify(usr2, syscall.SIGUSR2)
		go func() {
			for range usr2 {
				// Returns only when the upgrade did not happen.
				_, err := s.Upgrade(context.Background(), supervisor.Upgrade{Path: "/usr/local/bin/myserver", Program: "myserver"})
				log.Print(err)
			}
		}()
		if err := s.Run(context.Background()); err != nil {
			return 1
		}
		return 0
	}
	// In func main, after "myserver upgrade-check" answered with
	// supervisor.WriteCheck:
	os.Exit(supervisor.Main(run))
}
