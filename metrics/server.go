package metrics

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	stdlog "log"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// Bounds of the server of [Listen]. Variables so that tests can shorten
// them.
var (
	// readHeaderTimeout closes a connection that has not sent a whole
	// request header this long after it opened or its last response.
	readHeaderTimeout = 5 * time.Second
	// readTimeout bounds the reading of one request, header and body.
	readTimeout = 10 * time.Second
	// writeTimeout bounds the answer to one request, from the end of its
	// header: a scrape, its snapshot included, and the sending.
	writeTimeout = 15 * time.Second
	// idleTimeout closes a keep-alive connection idle this long: longer
	// than a scrape interval of one minute, so such a scraper keeps its
	// connection.
	idleTimeout = 2 * time.Minute
	// refreshEvery is how often the connection limit is computed again
	// from the number of workers and RLIMIT_NOFILE.
	refreshEvery = time.Second
	// firstRefresh is the first wait before it is computed; the wait
	// doubles up to refreshEvery until the supervisor answers.
	firstRefresh = 10 * time.Millisecond
)

// Connection limits of the server of [Listen].
const (
	// DefaultMaxConns is the number of connections the server of [Listen]
	// keeps open at most when [Options].MaxConns is 0.
	DefaultMaxConns = 256
	// minConns is the least limit, however few descriptors are left: a
	// health check is served even when the supervisor is short of them.
	minConns = 4
	// reserveBase is the descriptors left to the rest of the master: the
	// standard streams, the runtime's poller, the listeners, the control
	// socket and its connections, netlink sockets and /proc files of
	// scrapes, log files.
	reserveBase = 64
	// reservePerWorker is the descriptors left for each worker slot: a
	// worker costs the master two (its end of the socketpair and its
	// pidfd), and twice that while a reload runs the old and the new.
	reservePerWorker = 4
)

// connLimit is the number of connections the server keeps open at most,
// given RLIMIT_NOFILE, the number of worker slots, and the configured
// maximum.
func connLimit(nofile uint64, workers, maxConns int) int {
	if maxConns <= 0 {
		maxConns = DefaultMaxConns
	}
	reserve := uint64(reserveBase) + uint64(reservePerWorker)*uint64(max(workers, 0))
	n := minConns
	if nofile > reserve+minConns {
		n = int(min(nofile-reserve, 1<<30))
	}
	return max(min(n, maxConns), minConns)
}

// Server serves [Handler] on one TCP listener; see [Listen].
type Server struct {
	ln        net.Listener   // the bound listener
	lln       *limitListener // ln as Serve accepts from it
	srv       *http.Server
	lim       *limiter
	src       Source
	maxConn   int
	detaching atomic.Bool // Detach closed the listener: Serve's error is expected

	stop chan struct{} // closed by Close
	done chan struct{} // closed when the serving and refreshing goroutines ended
	once sync.Once
}

// Listen listens on addr (host:port; an empty host or "0.0.0.0" or "::"
// means every interface of the host) and serves /metrics, /healthz and
// /readyz of src there, in goroutines of its own, until Close. The registry
// is one from [NewRegistry], plus the server's own series:
//
//	shoal_metrics_connections                   gauge    connections open to this server
//	shoal_metrics_connections_limit             gauge    connections it keeps open at most now
//	shoal_metrics_connections_evicted_total     counter  connections it closed to make room for another
//
// The server bounds what a client can hold. A connection must send a whole
// request header within 5s of opening or of its last answer, and an idle
// keep-alive connection is closed after 2 minutes. The server keeps at most
// opts.MaxConns connections open (256 when 0), fewer when RLIMIT_NOFILE
// would not leave 64 descriptors plus 4 per worker slot to the rest of the
// master; it computes this limit again every second, and more often until
// the supervisor first answers. When a connection comes at the limit, the
// server closes the connection that has waited the longest without a
// request in progress (idle, or still sending its request), so a new
// scraper or health check is always served; only when every connection is
// being answered does a new one wait in the kernel's accept queue. When
// accepting fails for want of descriptors, the server closes such a
// connection too.
//
// Listen logs the address it serves on, and says so when it is every
// interface. It fails when addr cannot be listened on.
func Listen(addr string, src Source, opts Options) (*Server, error) {
	ln := opts.Listener
	if ln == nil {
		var err error
		if ln, err = net.Listen("tcp", addr); err != nil {
			return nil, fmt.Errorf("metrics: listen on %q: %w", addr, err)
		}
	}
	log := opts.Logger
	if log == nil {
		nop := zerolog.Nop()
		log = &nop
	}
	s := &Server{
		ln:      ln,
		src:     src,
		maxConn: opts.MaxConns,
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
	}
	s.lim = newLimiter(connLimit(nofile(), 0, opts.MaxConns))
	reg := NewRegistry(src)
	reg.MustRegister(s.lim.collectors()...)
	if opts.Version != "" {
		info := prometheus.NewGauge(prometheus.GaugeOpts{Name: "shoal_build_info", Help: "Always 1: the version of the master's program, and the Go version it was built with.",
			ConstLabels: prometheus.Labels{"version": opts.Version, "goversion": runtime.Version()}})
		info.Set(1)
		reg.MustRegister(info)
	}
	h := Handler(src, reg, opts)
	s.srv = &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if c, ok := r.Context().Value(connKey{}).(*trackedConn); ok {
				s.lim.serving(c)
			}
			h.ServeHTTP(w, r)
		}),
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    16 << 10,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connKey{}, c)
		},
		ConnState: func(c net.Conn, st http.ConnState) {
			tc, ok := c.(*trackedConn)
			if !ok {
				return
			}
			switch st {
			case http.StateIdle:
				s.lim.idle(tc)
			case http.StateClosed, http.StateHijacked:
				s.lim.remove(tc)
			}
		},
		// net/http's own lines, such as accept errors and handler
		// panics, go to the log, not to stderr.
		ErrorLog: stdlog.New(logWriter{log}, "", 0),
	}
	where := ln.Addr().String()
	text, all := describe(ln.Addr())
	log.Info().Str("addr", where).Bool("all_interfaces", all).Msg(text)

	s.lln = &limitListener{Listener: ln, lim: s.lim}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		if err := s.srv.Serve(s.lln); err != nil && !errors.Is(err, http.ErrServerClosed) && !s.detaching.Load() {
			log.Error().Err(err).Str("addr", where).Msg("metrics server stopped")
		}
	}()
	go func() {
		defer wg.Done()
		// Until the supervisor runs and answers, the number of its
		// workers is unknown: ask often at first, every refreshEvery
		// once it answered or after a while.
		wait := firstRefresh
		t := time.NewTimer(wait)
		defer t.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-t.C:
				if s.refresh() {
					wait = refreshEvery
				}
				wait = min(2*wait, refreshEvery)
				t.Reset(wait)
			}
		}
	}()
	go func() {
		wg.Wait()
		close(s.done)
	}()
	return s, nil
}

// describe words the address a server listens on for its log line, and
// reports whether it is every interface of the host.
func describe(a net.Addr) (text string, all bool) {
	if ta, ok := a.(*net.TCPAddr); ok && ta.IP.IsUnspecified() {
		return fmt.Sprintf("serving /metrics, /healthz and /readyz on port %d of ALL interfaces: "+
			"reachable from every network this host is on (give a host, such as 127.0.0.1:%d, to narrow it)", ta.Port, ta.Port), true
	}
	return fmt.Sprintf("serving /metrics, /healthz and /readyz on %s only", a), false
}

// Addr returns the address the server listens on.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Close stops the server: it stops accepting, gives the requests in progress
// up to 2 seconds, closes every connection, and returns when its goroutines
// have ended.
func (s *Server) Close() error {
	var err error
	s.once.Do(func() {
		close(s.stop)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err = s.srv.Shutdown(ctx); err != nil {
			err = s.srv.Close()
		}
		<-s.done
	})
	return err
}

// Detach stops the server but leaves its listening socket open, and
// returns it, for a master that replaces its program in place: connections
// that come meanwhile wait in the socket's queue, and the new program
// serves them with Options.Listener. Every connection already accepted has
// its request answered, even one whose request was not read yet (Close
// would close it unanswered), within 2 seconds; idle keep-alive
// connections are closed, as at any server's shutdown. The caller owns the
// file.
func (s *Server) Detach() (*os.File, error) {
	tl, ok := s.ln.(interface{ File() (*os.File, error) })
	if !ok {
		return nil, fmt.Errorf("metrics: detach %s: not a TCP listener", s.ln.Addr())
	}
	f, err := tl.File()
	if err != nil {
		return nil, fmt.Errorf("metrics: detach %s: %w", s.ln.Addr(), err)
	}
	// Not http.Server.Shutdown at once: it drops a request that it reads
	// after it began. Stop accepting, answer what was accepted, closing
	// each connection after its answer, then shut down.
	s.detaching.Store(true)
	s.srv.SetKeepAlivesEnabled(false)
	s.lln.Close()
	for deadline := time.Now().Add(detachWait); s.lim.count() > 0 && time.Now().Before(deadline); {
		time.Sleep(2 * time.Millisecond)
	}
	s.Close()
	return f, nil
}

// detachWait is how long Detach waits for the accepted connections.
const detachWait = 2 * time.Second

// refresh computes the connection limit again from the number of worker
// slots and RLIMIT_NOFILE, and closes the connections over it that wait.
// When the supervisor does not answer, the last number of slots stands and
// refresh returns false.
func (s *Server) refresh() bool {
	ctx, cancel := context.WithTimeout(context.Background(), refreshEvery)
	snap, err := s.src.SnapshotContext(ctx)
	cancel()
	workers := -1
	if err == nil {
		workers = max(snap.Desired, len(snap.Workers))
	}
	s.lim.setLimit(nofile(), workers, s.maxConn)
	return err == nil
}

// nofile returns the soft RLIMIT_NOFILE of the process, or a common default
// when it cannot be read.
func nofile() uint64 {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		return 1024
	}
	return rl.Cur
}

// connKey is the context key of a request's *trackedConn.
type connKey struct{}

// limiter tracks the server's connections and keeps their number at or
// under its limit.
type limiter struct {
	mu      sync.Mutex
	room    *sync.Cond // signalled when busy drops, the limit rises or closed is set
	limit   int
	workers int       // the last number of worker slots known; 0 before any
	waiting list.List // of *trackedConn without a request in progress, longest waiting first
	busy    int       // connections with a request in progress
	evicted uint64    // connections closed to make room
	closed  bool      // the listener closed
	tracked map[*trackedConn]*list.Element
}

func newLimiter(limit int) *limiter {
	l := &limiter{limit: limit, tracked: make(map[*trackedConn]*list.Element)}
	l.room = sync.NewCond(&l.mu)
	return l
}

// trackedConn is one connection of the server. Its state is the limiter's.
type trackedConn struct {
	net.Conn
	l *limiter
}

// Close removes c from its limiter and closes it.
func (c *trackedConn) Close() error {
	c.l.remove(c)
	return c.Conn.Close()
}

// open returns the number of connections open; l.mu is held.
func (l *limiter) open() int { return len(l.tracked) }

// count returns the number of connections open.
func (l *limiter) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.open()
}

// wait blocks while every connection the limit allows has a request in
// progress. It fails once the listener is closed.
func (l *limiter) wait() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for !l.closed && l.busy >= l.limit {
		l.room.Wait()
	}
	if l.closed {
		return net.ErrClosed
	}
	return nil
}

// add tracks a new connection, and closes the connections that waited the
// longest to keep the number at the limit.
func (l *limiter) add(nc net.Conn) *trackedConn {
	c := &trackedConn{Conn: nc, l: l}
	l.mu.Lock()
	l.tracked[c] = l.waiting.PushBack(c)
	victims := l.overLimit()
	l.mu.Unlock()
	closeAll(victims)
	return c
}

// overLimit removes, longest waiting first, the connections without a
// request in progress that are over the limit, and returns them to be
// closed. It spares the one that waited the least, which is the one just
// accepted: when every other connection is busy, it is the one over the
// limit, and it is served. l.mu is held.
func (l *limiter) overLimit() []net.Conn {
	var victims []net.Conn
	for e := l.waiting.Front(); e != nil && e != l.waiting.Back() && l.open() > l.limit; {
		next := e.Next()
		victims = append(victims, l.untrack(e.Value.(*trackedConn)))
		e = next
	}
	return victims
}

// evictOne closes the connection that waited the longest, to free a
// descriptor.
func (l *limiter) evictOne() {
	l.mu.Lock()
	var victims []net.Conn
	if e := l.waiting.Front(); e != nil {
		victims = append(victims, l.untrack(e.Value.(*trackedConn)))
	}
	l.mu.Unlock()
	closeAll(victims)
}

// untrack forgets c, evicted, and returns its net.Conn to be closed. l.mu
// is held; c is waiting.
func (l *limiter) untrack(c *trackedConn) net.Conn {
	l.waiting.Remove(l.tracked[c])
	delete(l.tracked, c)
	l.evicted++
	return c.Conn
}

func closeAll(conns []net.Conn) {
	for _, c := range conns {
		c.Close()
	}
}

// serving marks c as having a request in progress: it is not closed to
// make room until the request is answered.
func (l *limiter) serving(c *trackedConn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e, ok := l.tracked[c]; ok && e != nil {
		l.waiting.Remove(e)
		l.tracked[c] = nil
		l.busy++
	}
}

// idle marks c as waiting for its next request.
func (l *limiter) idle(c *trackedConn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e, ok := l.tracked[c]; ok && e == nil {
		l.tracked[c] = l.waiting.PushBack(c)
		l.busy--
		l.room.Signal()
	}
}

// remove forgets c, closed.
func (l *limiter) remove(c *trackedConn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	e, ok := l.tracked[c]
	if !ok {
		return
	}
	delete(l.tracked, c)
	if e != nil {
		l.waiting.Remove(e)
	} else {
		l.busy--
		l.room.Signal()
	}
}

// setLimit computes the limit from nofile, the number of worker slots (-1:
// the last known) and the configured maximum, and closes the waiting
// connections over it.
func (l *limiter) setLimit(nofile uint64, workers, maxConns int) {
	l.mu.Lock()
	if workers >= 0 {
		l.workers = workers
	}
	l.limit = connLimit(nofile, l.workers, maxConns)
	victims := l.overLimit()
	l.room.Broadcast()
	l.mu.Unlock()
	closeAll(victims)
}

// close wakes the waiting Accept for good.
func (l *limiter) close() {
	l.mu.Lock()
	l.closed = true
	l.room.Broadcast()
	l.mu.Unlock()
}

// collectors returns the series of the server's connections.
func (l *limiter) collectors() []prometheus.Collector {
	read := func(f func() float64) func() float64 {
		return func() float64 {
			l.mu.Lock()
			defer l.mu.Unlock()
			return f()
		}
	}
	return []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "shoal_metrics_connections",
			Help: "Connections open to the metrics server.",
		}, read(func() float64 { return float64(l.open()) })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "shoal_metrics_connections_limit",
			Help: "Connections the metrics server keeps open at most, from its maximum and RLIMIT_NOFILE less a reserve for the workers.",
		}, read(func() float64 { return float64(l.limit) })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "shoal_metrics_connections_evicted_total",
			Help: "Connections without a request in progress that the metrics server closed to make room for another.",
		}, read(func() float64 { return float64(l.evicted) })),
	}
}

// limitListener is a listener whose connections a limiter tracks.
type limitListener struct {
	net.Listener
	lim *limiter
}

// Accept waits until the limit leaves room for a connection, accepts one,
// and closes the longest waiting one when over the limit. When accepting
// fails for want of descriptors it closes a waiting connection, and
// returns the error: net/http retries after a pause.
func (l *limitListener) Accept() (net.Conn, error) {
	if err := l.lim.wait(); err != nil {
		return nil, err
	}
	c, err := l.Listener.Accept()
	if err != nil {
		if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
			l.lim.evictOne()
		}
		return nil, err
	}
	return l.lim.add(c), nil
}

// Close closes the listener and wakes a waiting Accept.
func (l *limitListener) Close() error {
	l.lim.close()
	return l.Listener.Close()
}

// logWriter writes net/http's log lines as warnings.
type logWriter struct{ log *zerolog.Logger }

func (w logWriter) Write(p []byte) (int, error) {
	w.log.Warn().Msg("metrics server: " + strings.TrimSpace(string(p)))
	return len(p), nil
}
