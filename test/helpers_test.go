package test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/shoal-sh/shoal/internal/sdnotify"
	"github.com/shoal-sh/shoal/reuseport"
	"github.com/shoal-sh/shoal/supervisor"
	"github.com/shoal-sh/shoal/worker"
)

// helperCmd returns the flags and the command that run this test binary
// as the worker helper named name.
func helperCmd(name string) (flags []string, argv []string) {
	return []string{"--env", "E2E_HELPER=" + name}, []string{os.Args[0]}
}

// runHelper is the main of the test binary when it runs as a worker.
func runHelper(name string) int {
	switch name {
	case "hello":
		// Serves hello world on 127.0.0.1:$PORT until SIGTERM.
		ln, err := reuseport.Listen("tcp4", "127.0.0.1:"+os.Getenv("PORT"))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprint(w, "hello world\n")
		})}
		go srv.Serve(ln)
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM)
		<-sig
		srv.Close()
		return 0
	case "stubborn-hello":
		// Serves hello world and ignores SIGTERM.
		signal.Ignore(syscall.SIGTERM)
		ln, err := reuseport.Listen("tcp4", "127.0.0.1:"+os.Getenv("PORT"))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "hello world\n") }))
		return 0
	case "stubborn":
		// Ignores SIGTERM and never exits by itself.
		signal.Ignore(syscall.SIGTERM)
		time.Sleep(time.Hour)
		return 0
	case "udp-then-tcp":
		return helperUDPThenTCP()
	case "usr1":
		return helperUSR1()
	case "wrong-port":
		return helperWrongPort()
	case "listen-fds":
		return helperListenFDs()
	case "notify-late":
		return helperNotifyLate()
	case "output-flood":
		return helperOutputFlood()
	case "pid-hello":
		return helperPIDHello()
	}
	fmt.Fprintf(os.Stderr, "unknown helper %q\n", name)
	return 2
}

// helperUDPThenTCP binds the UDP listener of SHOAL_PORTS at once, and the
// TCP one only when it gets SIGUSR1; it exits on SIGTERM.
func helperUDPThenTCP() int {
	ls, err := supervisor.ParseListeners(os.Getenv(supervisor.EnvPorts))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGTERM)
	var keep []io.Closer
	bind := func(network string) {
		for _, l := range ls {
			if l.Network != network {
				continue
			}
			addr := fmt.Sprintf("127.0.0.1:%d", l.Port)
			var c io.Closer
			if network == "udp" {
				c, err = reuseport.ListenPacket("udp4", addr)
			} else {
				c, err = reuseport.Listen("tcp4", addr)
			}
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			keep = append(keep, c)
		}
	}
	bind("udp")
	for sig := range sigs {
		if sig == syscall.SIGTERM {
			break
		}
		if len(keep) == 1 {
			bind("tcp")
		}
	}
	for _, c := range keep {
		c.Close()
	}
	return 0
}

// helperUSR1 prints "worker ID usr1 N" on its stdout for the Nth SIGUSR1
// it gets, after "worker ID ready" once it handles the signal; it exits on
// SIGTERM.
func helperUSR1() int {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGTERM)
	id := os.Getenv("SHOAL_WORKER_ID")
	fmt.Printf("worker %s ready\n", id)
	n := 0
	for sig := range sigs {
		if sig == syscall.SIGTERM {
			return 0
		}
		n++
		fmt.Printf("worker %s usr1 %d\n", id, n)
	}
	return 0
}

// helperWrongPort listens on 127.0.0.1:$E2E_WRONG_PORT instead of $PORT.
func helperWrongPort() int {
	ln, err := reuseport.Listen("tcp4", "127.0.0.1:"+os.Getenv("E2E_WRONG_PORT"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer ln.Close()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM)
	<-sig
	return 0
}

// helperListenFDs serves hello world over HTTP on the sockets the worker
// package finds (inherited with --bind master), after printing
// "worker ID pid P LISTEN_PID L".
func helperListenFDs() int {
	fmt.Printf("worker %s pid %d LISTEN_PID %s\n", os.Getenv("SHOAL_WORKER_ID"), os.Getpid(), os.Getenv("LISTEN_PID"))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "hello world\n") })
	if err := worker.ListenAndServe(ctx, h); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// helperNotifyLate binds PORT at once and says READY=1 over
// NOTIFY_SOCKET only after E2E_READY_AFTER; it exits on SIGTERM.
func helperNotifyLate() int {
	ln, err := reuseport.Listen("tcp4", "127.0.0.1:"+os.Getenv("PORT"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer ln.Close()
	d, _ := time.ParseDuration(os.Getenv("E2E_READY_AFTER"))
	time.Sleep(d)
	fmt.Printf("worker %s ready at %d\n", os.Getenv("SHOAL_WORKER_ID"), time.Now().UnixMilli())
	if err := sdnotify.Send("READY=1\nSTATUS=serving"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM)
	<-sig
	sdnotify.Send("STOPPING=1")
	return 0
}

// helperPIDHello answers "pid N" on 127.0.0.1:$PORT (keep-alive too).
// With E2E_NAIVE=1 it does what naive servers do on SIGTERM: close the
// listener and exit at once, with no drain; else it drains through
// http.Server.Shutdown.
func helperPIDHello() int {
	ln, err := reuseport.Listen("tcp4", "127.0.0.1:"+os.Getenv("PORT"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	body := fmt.Sprintf("pid %d\n", os.Getpid())
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, body) })}
	go srv.Serve(ln)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM)
	<-sig
	if os.Getenv("E2E_NAIVE") == "1" {
		ln.Close()
		return 0
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	srv.Shutdown(ctx)
	return 0
}
