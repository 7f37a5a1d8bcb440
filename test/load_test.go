package test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// load is an HTTP/1.1 client that never retries: every request that does
// not get a complete 200 answer counts as a failure, with its reason.
// Go's http.Client retries idempotent requests silently, which would hide
// exactly the failures a reload test looks for.
type load struct {
	addr      string
	ok        atomic.Int64
	mu        sync.Mutex
	failures  map[string]int
	stop      chan struct{}
	wg        sync.WaitGroup
	keepAlive bool
	want      string // the start of every good answer's body
}

// startLoad runs conns clients against addr until stop is called. With
// keepAlive each client reuses its connection (reconnecting only when the
// server says Connection: close); without, every request has its own.
func startLoad(addr string, conns int, keepAlive bool) *load {
	return startLoadWant(addr, conns, keepAlive, "hello world")
}

// startLoadWant is startLoad for a server whose answers start with want.
func startLoadWant(addr string, conns int, keepAlive bool, want string) *load {
	l := &load{addr: addr, failures: map[string]int{}, stop: make(chan struct{}), keepAlive: keepAlive, want: want}
	for i := 0; i < conns; i++ {
		l.wg.Add(1)
		go l.client()
	}
	return l
}

func (l *load) fail(err error) {
	reason := err.Error()
	if i := strings.LastIndex(reason, ": "); i >= 0 {
		reason = reason[i+2:]
	}
	l.mu.Lock()
	l.failures[reason]++
	l.mu.Unlock()
}

func (l *load) client() {
	defer l.wg.Done()
	var conn net.Conn
	var br *bufio.Reader
	defer func() {
		if conn != nil {
			conn.Close()
		}
	}()
	req := "GET / HTTP/1.1\r\nHost: shoal\r\n\r\n"
	if !l.keepAlive {
		req = "GET / HTTP/1.1\r\nHost: shoal\r\nConnection: close\r\n\r\n"
	}
	for {
		select {
		case <-l.stop:
			return
		default:
		}
		if conn == nil {
			c, err := net.DialTimeout("tcp", l.addr, 5*time.Second)
			if err != nil {
				l.fail(err)
				time.Sleep(10 * time.Millisecond)
				continue
			}
			conn, br = c, bufio.NewReader(c)
		}
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		closeAfter, err := l.roundTrip(conn, br, req)
		if err != nil {
			l.fail(err)
		} else {
			l.ok.Add(1)
		}
		if err != nil || closeAfter || !l.keepAlive {
			conn.Close()
			conn = nil
		}
	}
}

func (l *load) roundTrip(conn net.Conn, br *bufio.Reader, req string) (closeAfter bool, err error) {
	if _, err := io.WriteString(conn, req); err != nil {
		return false, fmt.Errorf("write: %w", err)
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return false, fmt.Errorf("read: %w", err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return false, fmt.Errorf("read body: %w", err)
	}
	if resp.StatusCode != 200 || !strings.HasPrefix(string(body), l.want) {
		return false, fmt.Errorf("answer: %d %q", resp.StatusCode, body)
	}
	return resp.Close, nil
}

// finish stops the clients and returns the requests that succeeded and
// the failures by reason.
func (l *load) finish() (int64, map[string]int) {
	close(l.stop)
	l.wg.Wait()
	return l.ok.Load(), l.failures
}

func describe(failures map[string]int) string {
	var parts []string
	for r, n := range failures {
		parts = append(parts, fmt.Sprintf("%d x %s", n, r))
	}
	sort.Strings(parts)
	return strings.Join(parts, ", ")
}

// tally is the outcome of loads that ran side by side.
type tally struct {
	ok      int64
	failed  int
	reasons map[string]int // failures by "kind: reason", the kind a load's label
}

// finishAll stops the loads and adds up their outcomes; a load's failures
// are labelled with its key ("new connection", "keep-alive").
func finishAll(loads map[string]*load) tally {
	t := tally{reasons: map[string]int{}}
	for kind, l := range loads {
		ok, fails := l.finish()
		t.ok += ok
		for r, n := range fails {
			t.reasons[kind+": "+r] += n
			t.failed += n
		}
	}
	return t
}

// result prints the line a namespace run reports to its parent test.
func (t tally) result(reloads int) {
	fmt.Printf("RESULT ok=%d failed=%d reloads=%d reasons=%s\n", t.ok, t.failed, reloads, describe(t.reasons))
}
