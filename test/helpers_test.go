package test

import (
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/shoal-sh/shoal/reuseport"
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
	}
	fmt.Fprintf(os.Stderr, "unknown helper %q\n", name)
	return 2
}
