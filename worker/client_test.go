package worker

import (
	"bufio"
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

	"github.com/shoal-sh/shoal/reuseport"
)

// The tests measure loss with rawClient, which never retries: every error,
// end of file and reset after a request was sent is a failure. net/http's
// Transport would retry some of them silently and hide exactly what the
// drain must avoid.

// tally counts the outcomes of a load.
type tally struct {
	ok, fail atomic.Int64
	mu       sync.Mutex
	byServer map[string]int64
	errs     []string // the first failures
}

func newTally() *tally { return &tally{byServer: make(map[string]int64)} }

func (ta *tally) success(server string) {
	ta.ok.Add(1)
	ta.mu.Lock()
	ta.byServer[server]++
	ta.mu.Unlock()
}

func (ta *tally) failure(format string, args ...any) {
	ta.fail.Add(1)
	ta.mu.Lock()
	if len(ta.errs) < 10 {
		ta.errs = append(ta.errs, fmt.Sprintf(format, args...))
	}
	ta.mu.Unlock()
}

func (ta *tally) served(server string) int64 {
	ta.mu.Lock()
	defer ta.mu.Unlock()
	return ta.byServer[server]
}

func (ta *tally) String() string {
	ta.mu.Lock()
	defer ta.mu.Unlock()
	return fmt.Sprintf("%d ok, %d failed, by server %v, first failures %q", ta.ok.Load(), ta.fail.Load(), ta.byServer, ta.errs)
}

// rawClient is an HTTP/1.1 client on one connection at a time.
type rawClient struct {
	addr string
	ta   *tally
	c    net.Conn
	br   *bufio.Reader
}

func (rc *rawClient) close() {
	if rc.c != nil {
		rc.c.Close()
		rc.c, rc.br = nil, nil
	}
}

// peerClosed reports whether the server has closed the idle connection, as
// a connection pool notices before it reuses a connection. It sends nothing.
func (rc *rawClient) peerClosed() bool {
	// A deadline already past would fail the read before it looks at the
	// socket; one a moment ahead reads what is there.
	rc.c.SetReadDeadline(time.Now().Add(time.Millisecond))
	_, err := rc.br.Peek(1)
	rc.c.SetReadDeadline(time.Time{})
	if err == nil {
		rc.ta.failure("unsolicited bytes on an idle connection")
		return true
	}
	return !isTimeout(err)
}

// do sends one request, on the open connection if keepAlive and there is
// one, and reads the response. It reports whether the request succeeded.
func (rc *rawClient) do(path string, keepAlive bool) bool {
	if rc.c != nil && !keepAlive {
		rc.close()
	}
	if rc.c == nil {
		c, err := net.DialTimeout("tcp4", rc.addr, 5*time.Second)
		if err != nil {
			rc.ta.failure("dial: %v", err)
			return false
		}
		rc.c, rc.br = c, bufio.NewReader(c)
	}
	rc.c.SetDeadline(time.Now().Add(10 * time.Second))
	req := "GET " + path + " HTTP/1.1\r\nHost: test\r\n"
	if !keepAlive {
		req += "Connection: close\r\n"
	}
	req += "\r\n"
	if _, err := io.WriteString(rc.c, req); err != nil {
		rc.ta.failure("write: %v", err)
		rc.close()
		return false
	}
	resp, err := http.ReadResponse(rc.br, nil)
	if err != nil {
		rc.ta.failure("read response: %v", err)
		rc.close()
		return false
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		rc.ta.failure("read body: %v", err)
		rc.close()
		return false
	}
	if resp.StatusCode != http.StatusOK || string(body) != "ok\n" {
		rc.ta.failure("status %d, body %q", resp.StatusCode, body)
		rc.close()
		return false
	}
	rc.c.SetDeadline(time.Time{})
	rc.ta.success(resp.Header.Get("X-Server"))
	if resp.Close || !keepAlive {
		rc.close()
	}
	return true
}

// testHandler answers "ok\n" with an X-Server header; ?sleep=D makes it
// take D first.
func testHandler(name string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if d, err := time.ParseDuration(r.URL.Query().Get("sleep")); err == nil {
			time.Sleep(d)
		}
		w.Header().Set("X-Server", name)
		io.WriteString(w, "ok\n")
	})
}

// listen returns a SO_REUSEPORT listener on 127.0.0.1 at port, or at a
// free port if port is 0.
func listen(t *testing.T, port int) net.Listener {
	t.Helper()
	ln, err := reuseport.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// running is a Server serving in a goroutine of the test.
type running struct {
	name   string
	cancel context.CancelFunc
	errc   chan error
}

// start serves s on ln until stop.
func start(t *testing.T, s *Server, ln net.Listener, name string) *running {
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{name: name, cancel: cancel, errc: make(chan error, 1)}
	go func() { r.errc <- s.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.errc:
		case <-time.After(15 * time.Second):
			t.Errorf("server %s still serving 15s after the end of the test", name)
		}
	})
	return r
}

// stop cancels the server and returns Serve's result and how long the drain
// took; it fails the test after timeout.
func (r *running) stop(t *testing.T, timeout time.Duration) (time.Duration, error) {
	t.Helper()
	t0 := time.Now()
	r.cancel()
	select {
	case err := <-r.errc:
		r.errc <- err // for the cleanup
		return time.Since(t0), err
	case <-time.After(timeout):
		t.Fatalf("server %s did not stop within %v", r.name, timeout)
		return 0, nil
	}
}

// migrateReq returns net.ipv4.tcp_migrate_req of this network namespace, or
// "" if it cannot be read.
func migrateReq() string {
	b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_migrate_req")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func isEOF(err error) bool { return errors.Is(err, io.EOF) }
