// Package worker serves HTTP from a shoal worker process: it listens on the
// shared port, reports requests to the master in batches, tells the master
// it is ready, and drains without losing a request when it is told to stop.
//
// A worker program can be as small as
//
//	func main() {
//		h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
//			io.WriteString(w, "hello world\n")
//		})
//		if err := worker.ListenAndServe(context.Background(), h); err != nil {
//			log.Fatal(err)
//		}
//	}
//
// The same program runs outside shoal too: it then serves alone and
// reports nothing.
//
// # Draining
//
// When a worker stops, on SIGTERM or SIGINT, when its context is done, or
// when the master is gone, [Server] drains it in this order:
//
//  1. The listener is closed. With net.ipv4.tcp_migrate_req=1 the kernel
//     moves the connections waiting in its accept queue to the listeners of
//     the other workers; without it, it resets them.
//  2. Once http.Server.Serve has returned, every accepted connection is
//     known. From now on every response carries "Connection: close", so
//     that each keep-alive client finishes its request here and opens its
//     next connection, which can only reach another worker. Doing this
//     before the listener is closed would send clients back into its
//     accept queue.
//  3. The drain waits, at most DrainTimeout, until no connection is left.
//     A connection that waits for a request, its first or its next one, is
//     given a grace of a second, counted from the start of the drain or
//     from its last response, whichever is later: a client that keeps
//     sending sends within it, is answered with "Connection: close" and
//     leaves by itself. A connection still silent after its grace is ended
//     from its own reading goroutine, which checks first that no byte of a
//     request has arrived; a request that has begun to arrive is served.
//  4. Only then does http.Server.Shutdown run, when nothing is left for it
//     to drop, and the [Counter] sends its last report.
//
// http.Server.Shutdown alone loses requests: it drops a request that
// arrives on a new connection while it starts (golang/go#75591), and it
// closes idle keep-alive connections at once, under clients that may be
// sending on them. For the same reason the drain does not call
// http.Server.SetKeepAlivesEnabled(false), which closes idle connections at
// once too.
//
// What no server can prevent is a client that sends on an idle keep-alive
// connection after the server has decided to close it and before the
// client has seen the close. The grace makes that rare (only clients silent
// for a second or more are closed), and the check for arrived bytes leaves
// a window of microseconds on the server; HTTP clients are expected to retry
// such a request (RFC 9112, section 9.3.1), and common ones do.
package worker

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/shoal-sh/shoal/ipc"
	"github.com/shoal-sh/shoal/reuseport"
)

// Defaults of [Server].
const (
	DefaultAddr         = ":8000"          // Addr when PORT is not set either
	DefaultDrainTimeout = 10 * time.Second // shoal's default stop timeout
	DefaultHeartbeat    = time.Second      // interval of the heartbeats
)

// idleGrace is how long a drain lets a connection that waits for a request
// keep waiting, counted from the start of the drain or from when the
// connection began to wait, whichever is later.
const idleGrace = time.Second

// cmdMsg is a message with only a command: {"cmd":"shoal:ready"}.
type cmdMsg struct {
	Cmd string `json:"cmd"`
}

// Server serves HTTP in a shoal worker. Its zero value, with a Handler, is
// ready to use. A Server may serve more than once, one call at a time or
// many at once, but its fields must not change while it serves.
type Server struct {
	// Handler answers the requests. It is required.
	Handler http.Handler

	// Addr is the TCP address to listen on. If empty, it is every TCP
	// listener that shoal gives the worker: each tcp:PORT of SHOAL_PORTS,
	// else PORT, else ":8000", on HOST when shoal sets it (--host) and
	// else on every address. ":PORT" listens on every address, IPv4 and
	// IPv6; every worker of a port must use the same form, or they form
	// separate SO_REUSEPORT groups. UDP listeners are not HTTP's: a worker
	// with one binds it itself (reuseport.ListenPacket).
	Addr string

	// DrainTimeout bounds the wait for open connections when the server
	// stops. After it, the connections left are closed, requests in
	// progress with them. If zero or negative, it is 10 seconds, shoal's
	// default stop timeout.
	DrainTimeout time.Duration

	// Heartbeat is the interval of {"cmd":"shoal:heartbeat"} messages to
	// the master. If zero, it is one second; if negative, no heartbeats are
	// sent.
	Heartbeat time.Duration

	// ErrorLog, if not nil, receives the errors of the http.Server and the
	// worker's own, such as a failed report to the master. If nil, the log
	// package's standard logger is used.
	ErrorLog *log.Logger

	// master, if not nil, is used instead of ipc.FromEnv; for tests.
	master *ipc.Conn
}

// ListenAndServe serves HTTP with h as a [Server] with default settings.
func ListenAndServe(ctx context.Context, h http.Handler) error {
	s := &Server{Handler: h}
	return s.ListenAndServe(ctx)
}

// ListenAndServe serves on s.Addr, bound with SO_REUSEPORT; or, when Addr
// is empty, on the TCP listeners of [Listen]: those the master passed
// (--bind master), else every TCP listener of the worker bound here. It
// serves as [Server.Serve] does. UDP sockets of Listen are closed: they are
// not HTTP's.
func (s *Server) ListenAndServe(ctx context.Context) error {
	if s.Handler == nil {
		return fmt.Errorf("worker: serve on %s: Server.Handler is nil", strings.Join(s.addrs(), ", "))
	}
	// Catch the stop signals before the master can see the worker listen.
	sigs := notify()
	defer signal.Stop(sigs)
	var lns []net.Listener
	if s.Addr != "" {
		var lc reuseport.ListenConfig
		ln, err := lc.Listen(ctx, "tcp", s.Addr)
		if err != nil {
			return listenError(err)
		}
		lns = []net.Listener{ln}
	} else {
		tcp, udp, err := Listen(ctx)
		if err != nil {
			return err
		}
		closeAll(nil, udp)
		if len(tcp) == 0 {
			return errors.New("worker: serve: no TCP listener among the worker's (SHOAL_PORTS, LISTEN_FDS)")
		}
		lns = tcp
	}
	return s.serve(ctx, Join(lns...), sigs)
}

// Serve serves HTTP/1.1 on ln, which it closes before it returns. It tells
// the master {"cmd":"shoal:ready"}, reports the requests served in batches
// ([Counter]) and sends heartbeats. It serves until ctx is done, SIGTERM or
// SIGINT arrives, or the master is gone (end of file on the channel to it);
// it then drains as the package documentation describes and returns nil
// after a clean drain, or an error if DrainTimeout ran out first. Outside
// shoal, when SHOAL_IPC_FD is not set, it serves the same way and reports
// nothing.
//
// While Serve runs, SIGTERM and SIGINT do not end the process; the
// signals are handled again as before once Serve returns. The contexts of
// the requests are not derived from ctx: stopping lets requests in progress
// finish. Connections taken over with http.Hijacker are not waited for.
// ln must give plain TCP connections: TLS is for a proxy in front.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	if s.Handler == nil {
		ln.Close()
		return fmt.Errorf("worker: serve on %s: Server.Handler is nil", ln.Addr())
	}
	sigs := notify()
	defer signal.Stop(sigs)
	return s.serve(ctx, ln, sigs)
}

func notify() chan os.Signal {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	return sigs
}

func (s *Server) addrs() []string {
	if s.Addr != "" {
		return []string{s.Addr}
	}
	return tcpAddrs()
}

func (s *Server) drainTimeout() time.Duration {
	if s.DrainTimeout <= 0 {
		return DefaultDrainTimeout
	}
	return s.DrainTimeout
}

// conn returns the channel to the master, or nil outside shoal.
func (s *Server) conn() (*ipc.Conn, error) {
	if s.master != nil {
		return s.master, nil
	}
	c, err := ipc.FromEnv()
	if errors.Is(err, ipc.ErrNotWorker) {
		return nil, nil
	}
	return c, err
}

func (s *Server) logf(format string, args ...any) {
	if s.ErrorLog != nil {
		s.ErrorLog.Printf(format, args...)
	} else {
		log.Printf(format, args...)
	}
}

// serve is Serve after the signals are caught.
func (s *Server) serve(ctx context.Context, ln net.Listener, sigs <-chan os.Signal) error {
	addr := ln.Addr().String()
	conn, err := s.conn()
	if err != nil {
		ln.Close()
		return fmt.Errorf("worker: serve on %s: %w", addr, err)
	}
	counter := NewCounter(conn, 0)
	t := newTracker()
	wl := &listener{Listener: ln}
	var draining atomic.Bool
	h := counter.Wrap(s.Handler)
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if draining.Load() {
				w.Header().Set("Connection", "close")
			}
			h.ServeHTTP(w, r)
		}),
		ConnState: t.connState,
		ErrorLog:  s.ErrorLog,
	}
	serveDone := make(chan error, 1)
	go func() { serveDone <- srv.Serve(wl) }()

	var masterGone <-chan struct{}
	if conn != nil {
		if err := conn.Send(cmdMsg{Cmd: ipc.CmdReady}); err != nil {
			s.logf("worker: tell the master %s is ready: %v", addr, err)
		}
		masterGone = conn.Done()
	}
	stopHeartbeat := s.heartbeat(conn)

	var serveErr error
	served := false
	select {
	case <-ctx.Done():
	case <-sigs:
	case <-masterGone:
	case serveErr = <-serveDone:
		served = true
	}

	// The drain; see the package documentation.
	t.draining.Store(true)
	wl.Close()
	if !served {
		serveErr = <-serveDone
		if errors.Is(serveErr, net.ErrClosed) {
			serveErr = nil // we closed it
		}
	}
	// Only now, when the clients' next connections can no longer reach
	// this listener's accept queue, which a kernel without tcp_migrate_req
	// resets when it closes, send them away.
	draining.Store(true)
	drainErr := s.drain(t, srv, addr)
	stopHeartbeat()
	if err := counter.Close(); err != nil && !isClosed(masterGone) {
		s.logf("%v", err) // the requests were served; only their count is lost
	}
	if serveErr != nil {
		return fmt.Errorf("worker: serve on %s: %w", addr, serveErr)
	}
	return drainErr
}

// drain waits until no connection is left, ending those that wait for a
// request after their grace, and then shuts srv down.
func (s *Server) drain(t *tracker, srv *http.Server, addr string) error {
	timeout := s.drainTimeout()
	grace := min(idleGrace, timeout)
	start := time.Now()
	deadline := start.Add(timeout)
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		now := time.Now()
		var open int
		var next time.Time // when the next waiting connection is due
		if now.Sub(start) < grace {
			open = t.len()
			next = start.Add(grace)
		} else {
			var since time.Time
			open, since = t.endWaiting(now.Add(-grace))
			if !since.IsZero() {
				next = since.Add(grace)
			}
		}
		if open == 0 {
			break
		}
		if !now.Before(deadline) {
			srv.Close()
			return fmt.Errorf("worker: drain %s: %s still open after %v, closed: %w",
				addr, plural(open, "connection"), timeout, context.DeadlineExceeded)
		}
		wake := deadline
		if !next.IsZero() && next.Before(wake) {
			wake = next
		}
		timer.Reset(time.Until(wake))
		select {
		case <-t.changed:
		case <-timer.C:
		}
	}
	// Nothing is left for Shutdown to drop; it only marks srv as shut down.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		srv.Close()
	}
	return nil
}

// plural returns "1 connection", "2 connections".
func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

// isClosed reports whether ch is closed; a nil ch is not.
func isClosed(ch <-chan struct{}) bool {
	if ch == nil {
		return false
	}
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// heartbeat starts the heartbeats to the master and returns the function
// that stops them.
func (s *Server) heartbeat(conn *ipc.Conn) (stop func()) {
	d := s.Heartbeat
	if d == 0 {
		d = DefaultHeartbeat
	}
	if conn == nil || d < 0 {
		return func() {}
	}
	quit := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		tick := time.NewTicker(d)
		defer tick.Stop()
		for {
			select {
			case <-quit:
				return
			case <-tick.C:
				// A failure means the master is gone, which Serve sees
				// on the channel's Done.
				conn.Send(cmdMsg{Cmd: ipc.CmdHeartbeat})
			}
		}
	})
	return func() {
		close(quit)
		wg.Wait()
	}
}

// listenError rewords an error of reuseport.Listen as the worker's:
// "worker: listen tcp :8000: bind: address already in use".
func listenError(err error) error {
	var op *net.OpError
	if !errors.Is(err, reuseport.ErrUnsupported) && errors.As(err, &op) {
		return &wrapError{msg: "worker: " + op.Error(), err: err}
	}
	return fmt.Errorf("worker: %w", err)
}

// wrapError is an error with its own message that still unwraps to the
// error it stands for.
type wrapError struct {
	msg string
	err error
}

func (e *wrapError) Error() string { return e.msg }
func (e *wrapError) Unwrap() error { return e.err }
