package metrics

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/rs/zerolog"

	"github.com/shoal-sh/shoal/internal/testutil"
	"github.com/shoal-sh/shoal/supervisor"
)

func TestConnLimit(t *testing.T) {
	for _, c := range []struct {
		nofile       uint64
		workers, max int
		want         int
		why          string
	}{
		{1 << 20, 4, 0, DefaultMaxConns, "a high limit: the default maximum"},
		{1 << 20, 4, 1000, 1000, "a high limit: the given maximum"},
		{1024, 4, 0, DefaultMaxConns, "1024 leaves 944 after the reserve: the default maximum"},
		{1024, 4, 5000, 1024 - 64 - 16, "1024 with 4 workers: 64 + 4*4 in reserve"},
		{1024, 200, 0, 1024 - 64 - 800, "1024 with 200 workers: 64 + 4*200 in reserve"},
		{1024, 300, 0, minConns, "the reserve takes it all: the least limit still serves a health check"},
		{0, 0, 0, minConns, "no limit read"},
		{100, 0, 2, minConns, "a maximum under the least"},
	} {
		if got := connLimit(c.nofile, c.workers, c.max); got != c.want {
			t.Errorf("connLimit(%d, %d, %d) = %d, want %d: %s", c.nofile, c.workers, c.max, got, c.want, c.why)
		}
	}
}

func TestDescribeAddr(t *testing.T) {
	for _, c := range []struct {
		addr string
		all  bool
		text string
	}{
		{"0.0.0.0:9441", true, "on port 9441 of ALL interfaces"},
		{"[::]:9441", true, "on port 9441 of ALL interfaces"},
		{"127.0.0.1:9441", false, "on 127.0.0.1:9441 only"},
		{"[::1]:9441", false, "on [::1]:9441 only"},
	} {
		a, err := net.ResolveTCPAddr("tcp", c.addr)
		if err != nil {
			t.Fatal(err)
		}
		text, all := describe(a)
		if all != c.all || !strings.Contains(text, c.text) {
			t.Errorf("describe(%s) = %q, %v; want %q, %v", c.addr, text, all, c.text, c.all)
		}
	}
}

// countingGatherer counts its Gathers; each waits for a token on release
// when release is not nil.
type countingGatherer struct {
	n       atomic.Int64
	started chan struct{}
	release chan struct{}
}

func (g *countingGatherer) Gather() ([]*dto.MetricFamily, error) {
	n := g.n.Add(1)
	if g.started != nil {
		g.started <- struct{}{}
	}
	if g.release != nil {
		<-g.release
	}
	name := fmt.Sprintf("gather_%d", n)
	return []*dto.MetricFamily{{Name: &name}}, nil
}

// TestSharedGather checks that callers who come while a Gather runs share
// it, and that one who comes after it ended gets a new one.
func TestSharedGather(t *testing.T) {
	g := &countingGatherer{started: make(chan struct{}, 1), release: make(chan struct{})}
	s := &sharedGatherer{g: g}
	const n = 16
	results := make(chan string, n)
	go func() {
		mfs, _ := s.Gather()
		results <- mfs[0].GetName()
	}()
	<-g.started
	var joined sync.WaitGroup
	for range n - 1 {
		joined.Add(1)
		go func() {
			joined.Done()
			mfs, _ := s.Gather()
			results <- mfs[0].GetName()
		}()
	}
	joined.Wait()
	time.Sleep(50 * time.Millisecond) // let them reach the wait
	close(g.release)
	for range n {
		if got := <-results; got != "gather_1" {
			t.Errorf("a caller got %s, want the shared gather_1", got)
		}
	}
	if got := g.n.Load(); got != 1 {
		t.Errorf("%d Gathers for %d concurrent callers, want 1", got, n)
	}
	// After the end of a Gather, a new caller gets a fresh one.
	g.started = nil
	if mfs, _ := s.Gather(); mfs[0].GetName() != "gather_2" {
		t.Errorf("a caller after the first Gather got %s, want gather_2", mfs[0].GetName())
	}
}

// TestParallelScrapes serves 16 scrapes at once through Handler: each gets
// 200 and a whole page, where 4 at most used to.
func TestParallelScrapes(t *testing.T) {
	useInodes(t, fixedInodes)
	src := &fixedSource{snap: fixedSnapshot()}
	slow := &slowSource{Source: src, delay: 100 * time.Millisecond}
	reg := prometheus.NewRegistry()
	reg.MustRegister(newCollector(slow, fixedProc(nil), fixedListeners(fixedSockets...)))
	h := Handler(src, reg, Options{})
	const n = 16
	codes := make(chan int, n)
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rec := do(h, "GET", "/metrics")
			if !strings.Contains(rec.Body.String(), `shoal_requests_total{worker="1"} 42`) {
				t.Errorf("a scrape lacks the requests of worker 1: %d %q", rec.Code, rec.Body.String())
			}
			codes <- rec.Code
		}()
	}
	wg.Wait()
	close(codes)
	for c := range codes {
		if c != 200 {
			t.Errorf("a scrape of %d in parallel got %d, want 200", n, c)
		}
	}
	if got := slow.calls.Load(); got >= n {
		t.Errorf("%d snapshots for %d parallel scrapes, want them shared", got, n)
	} else {
		t.Logf("%d parallel scrapes took %d snapshots", n, got)
	}
}

// slowSource takes delay to answer, like a busy supervisor, and counts
// its snapshots.
type slowSource struct {
	Source
	delay time.Duration
	calls atomic.Int64
}

func (s *slowSource) SnapshotContext(ctx context.Context) (supervisor.Snapshot, error) {
	s.calls.Add(1)
	time.Sleep(s.delay)
	return s.Source.SnapshotContext(ctx)
}

// gateSource answers /healthz snapshots only when its gate is open.
type gateSource struct {
	Source
	gate chan struct{}
	in   chan struct{} // a snapshot is waiting at the gate
}

func (s *gateSource) SnapshotContext(ctx context.Context) (supervisor.Snapshot, error) {
	select {
	case <-s.gate:
	default:
		select {
		case s.in <- struct{}{}:
		default:
		}
		select {
		case <-s.gate:
		case <-ctx.Done():
			return supervisor.Snapshot{}, ctx.Err()
		}
	}
	return s.Source.SnapshotContext(ctx)
}

// listen starts a server on loopback that is closed when the test ends.
func listen(t *testing.T, src Source, opts Options) *Server {
	t.Helper()
	s, err := Listen("127.0.0.1:0", src, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// dial opens a connection to s that the test closes at its end.
func dial(t *testing.T, s *Server) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", s.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// request sends one keep-alive GET on c and returns the response's status
// and body.
func request(c net.Conn, path string) (int, string, error) {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: x\r\n\r\n", path); err != nil {
		return 0, "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// closedByServer reports whether the server has closed c: a read sees the
// end of the stream or a reset within wait.
func closedByServer(c net.Conn, wait time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(wait))
	defer c.SetReadDeadline(time.Time{})
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	return err != nil && !(errors.As(err, &ne) && ne.Timeout())
}

func evicted(s *Server) uint64 {
	s.lim.mu.Lock()
	defer s.lim.mu.Unlock()
	return s.lim.evicted
}

func running() *fixedSource { return &fixedSource{snap: fixedSnapshot()} }

// TestServerTimeouts checks that a connection that sends nothing, and a
// keep-alive connection left idle, are closed.
func TestServerTimeouts(t *testing.T) {
	oldHeader, oldIdle := readHeaderTimeout, idleTimeout
	t.Cleanup(func() { readHeaderTimeout, idleTimeout = oldHeader, oldIdle })
	readHeaderTimeout, idleTimeout = 300*time.Millisecond, 600*time.Millisecond

	s := listen(t, running(), Options{})
	silent, idle := dial(t, s), dial(t, s)
	if code, body, err := request(idle, "/healthz"); err != nil || code != 200 {
		t.Fatalf("GET /healthz = %d %q %v", code, body, err)
	}
	start := time.Now()
	if !closedByServer(silent, 5*time.Second) {
		t.Error("a connection that sent nothing is open 5s later")
	}
	t.Logf("silent connection closed after %v", time.Since(start).Round(time.Millisecond))
	if !closedByServer(idle, 5*time.Second) {
		t.Error("an idle keep-alive connection is open 5s later")
	}
	t.Logf("idle connection closed after %v", time.Since(start).Round(time.Millisecond))
}

// TestServerEvictsWaitingConnections fills the server with connections
// that send nothing or wait idle, and checks that a new one is served, the
// oldest are closed, and the count stays at the limit.
func TestServerEvictsWaitingConnections(t *testing.T) {
	const limit = 8
	s := listen(t, running(), Options{MaxConns: limit})
	var conns []net.Conn
	for i := range 3 * limit {
		c := dial(t, s)
		if i%2 == 0 { // half idle after a request, half silent
			if code, _, err := request(c, "/healthz"); err != nil || code != 200 {
				t.Fatalf("GET /healthz on connection %d = %d %v", i, code, err)
			}
			// The client has the answer before the server marks the
			// connection idle; on a loaded machine, later than the next
			// connections open. Wait, so that the connections wait in
			// the order they were made.
			testutil.Eventually(t, 5*time.Second, fmt.Sprintf("connection %d idle after its answer", i), func() bool {
				s.lim.mu.Lock()
				defer s.lim.mu.Unlock()
				return s.lim.busy == 0
			})
		}
		conns = append(conns, c)
	}
	fresh := dial(t, s)
	code, body, err := request(fresh, "/metrics")
	if err != nil || code != 200 {
		t.Fatalf("GET /metrics on a new connection at the limit = %d %v", code, err)
	}
	if !strings.Contains(body, "shoal_metrics_connections_limit 8\n") ||
		!strings.Contains(body, "shoal_metrics_connections 8\n") {
		t.Errorf("the page does not show 8 of 8 connections:\n%s", grep(body, "shoal_metrics_"))
	}
	// limit-1 of the others are open, and they are among the newest: a
	// connection's wait starts when it opens or when its last answer has
	// been sent.
	open := 0
	for i, c := range conns {
		if !closedByServer(c, 200*time.Millisecond) {
			open++
			if i < len(conns)/2 {
				t.Errorf("connection %d of %d is open, but it was one of the oldest", i, len(conns))
			}
		}
	}
	if open != limit-1 {
		t.Errorf("%d of the first %d connections open, want %d", open, len(conns), limit-1)
	}
	if n := evicted(s); n != uint64(len(conns)+1-limit) {
		t.Errorf("%d evicted, want %d", n, len(conns)+1-limit)
	}
}

// TestServerKeepsBusyConnections checks that connections with a request
// in progress are never closed to make room: a new connection waits until
// one is answered, then is served.
func TestServerKeepsBusyConnections(t *testing.T) {
	src := &gateSource{Source: running(), gate: make(chan struct{}), in: make(chan struct{}, 1)}
	s := listen(t, src, Options{MaxConns: minConns})
	type result struct {
		i    int
		code int
		err  error
	}
	results := make(chan result, minConns+1)
	for i := range minConns {
		c := dial(t, s)
		go func() {
			code, _, err := request(c, "/healthz")
			results <- result{i, code, err}
		}()
	}
	// Every connection is in a /healthz that waits at the gate.
	waitFor(t, "4 requests in progress", func() bool {
		s.lim.mu.Lock()
		defer s.lim.mu.Unlock()
		return s.lim.busy == minConns
	})
	late := dial(t, s)
	go func() {
		code, _, err := request(late, "/healthz")
		results <- result{minConns, code, err}
	}()
	select {
	case r := <-results:
		t.Fatalf("request %d answered %d %v while every connection is busy", r.i, r.code, r.err)
	case <-time.After(300 * time.Millisecond):
	}
	if n := evicted(s); n != 0 {
		t.Errorf("%d connections evicted while all were busy, want none", n)
	}
	close(src.gate)
	for range minConns + 1 {
		r := <-results
		if r.err != nil || r.code != 200 {
			t.Errorf("request %d = %d %v, want 200", r.i, r.code, r.err)
		}
	}
	// Idle now, one of the five is over the limit and may be closed.
}

// TestServerLimitFollowsWorkers checks that the limit is computed again
// from the number of workers: when it falls below the connections open,
// the waiting ones over it are closed.
func TestServerLimitFollowsWorkers(t *testing.T) {
	old := refreshEvery
	t.Cleanup(func() { refreshEvery = old })
	refreshEvery = 50 * time.Millisecond

	src := running()
	s := listen(t, src, Options{MaxConns: 1 << 20})
	lim := func() int {
		s.lim.mu.Lock()
		defer s.lim.mu.Unlock()
		return s.lim.limit
	}
	want := connLimit(nofile(), 3, 1<<20)
	waitFor(t, "the limit for 3 workers", func() bool { return lim() == want })
	// So many workers that the limit falls to the least.
	snap := fixedSnapshot()
	snap.Desired = int(nofile()) // more than the limit allows
	var conns []net.Conn
	for range 2 * minConns {
		conns = append(conns, dial(t, s))
	}
	waitFor(t, "8 connections open", func() bool {
		s.lim.mu.Lock()
		defer s.lim.mu.Unlock()
		return s.lim.open() == 2*minConns
	})
	src.set(snap)
	waitFor(t, "the least limit", func() bool { return lim() == minConns })
	open := 0
	for _, c := range conns {
		if !closedByServer(c, 100*time.Millisecond) {
			open++
		}
	}
	if open != minConns {
		t.Errorf("%d connections open after the limit fell to %d", open, minConns)
	}
}

// TestServerLogsAddress checks the log line of a loopback address, and that
// Close ends the server.
func TestServerLogsAddress(t *testing.T) {
	var buf syncBuffer
	log := zerolog.New(&buf)
	s, err := Listen("127.0.0.1:0", running(), Options{Logger: &log})
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf(`"addr":%q,"all_interfaces":false,"message":"serving /metrics, /healthz and /readyz on %s only"`, s.Addr(), s.Addr())
	if !strings.Contains(buf.String(), want) {
		t.Errorf("log:\n%s\nwant %s", buf.String(), want)
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if c, err := net.DialTimeout("tcp", s.Addr().String(), time.Second); err == nil {
		c.Close()
		t.Error("the server still accepts after Close")
	}
	if _, err := Listen(s.Addr().String()+"x", running(), Options{}); err == nil || !strings.Contains(err.Error(), "metrics: listen on") {
		t.Errorf("Listen on a bad address: %v, want an error naming it", err)
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// grep returns the lines of s that contain sub.
func grep(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// A connection the server accepted before Detach whose request comes after
// Detach began is answered, and closed after its answer; an idle
// keep-alive connection is closed; the listening socket Detach returns
// still takes connections, for the next program.
func TestDetachAnswersAcceptedConnections(t *testing.T) {
	s, err := Listen("127.0.0.1:0", running(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	idle := dial(t, s)
	if code, _, err := request(idle, "/healthz"); err != nil || code != 200 {
		t.Fatalf("/healthz: %d, %v", code, err)
	}
	quiet := dial(t, s)
	testutil.Eventually(t, 5*time.Second, "both connections accepted", func() bool {
		s.lim.mu.Lock()
		defer s.lim.mu.Unlock()
		return len(s.lim.tracked) == 2
	})
	type result struct {
		f   *os.File
		err error
	}
	detached := make(chan result, 1)
	go func() {
		f, err := s.Detach()
		detached <- result{f, err}
	}()
	time.Sleep(100 * time.Millisecond) // Detach is under way
	code, body, err := request(quiet, "/healthz")
	if err != nil || code != 200 {
		t.Fatalf("the request of a connection accepted before Detach, sent after it began: %d %q, %v; want 200", code, body, err)
	}
	if !closedByServer(quiet, 5*time.Second) {
		t.Error("the connection stayed open after its answer")
	}
	if !closedByServer(idle, 5*time.Second) {
		t.Error("the idle keep-alive connection stayed open")
	}
	r := testutil.Recv(t, detached, 5*time.Second, "Detach's return", func(result) bool { return true })
	if r.err != nil {
		t.Fatal(r.err)
	}
	defer r.f.Close()
	ln, err := net.FileListener(r.f)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c := dial(t, s) // waits in the queue of the socket Detach kept
	acc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	acc.Close()
	c.Close()
}
