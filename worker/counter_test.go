package worker

import (
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/testutil"
	"github.com/shoal-sh/shoal/ipc"
)

// master is the master's side of a real ipc.Pair: it decodes what the
// worker sends.
type master struct {
	c        net.Conn         // the master's end
	msgs     chan ipc.Message // every frame, closed at EOF
	wg       sync.WaitGroup
	requests atomic.Int64 // the sum of the shoal:requests batches
}

// newMaster returns a worker Conn and the master side of its channel. Both
// are closed at the end of the test.
func newMaster(t *testing.T) (*ipc.Conn, *master) {
	t.Helper()
	mf, wf, err := ipc.Pair()
	if err != nil {
		t.Fatal(err)
	}
	conn := ipc.NewConn(wf)
	m := newMasterFile(t, mf)
	t.Cleanup(func() { conn.Close() })
	return conn, m
}

// newMasterFile decodes the frames read from f until EOF.
func newMasterFile(t *testing.T, f *os.File) *master {
	// A pollable copy, so that Close ends a blocked read at once, as in
	// ipc.Channel.
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	m := &master{c: c, msgs: make(chan ipc.Message, 1<<16)}
	m.wg.Go(func() {
		defer close(m.msgs)
		d := ipc.NewDecoder(c, 0)
		for {
			msg, err := d.Next()
			var fe *ipc.FrameError
			if errors.As(err, &fe) {
				t.Errorf("bad frame from worker: %v", err)
				continue
			}
			if err != nil {
				return
			}
			msg.Raw = append([]byte(nil), msg.Raw...)
			if msg.Cmd == ipc.CmdRequests {
				m.requests.Add(msg.N)
			}
			select {
			case m.msgs <- msg:
			default:
				t.Errorf("test master: message buffer full")
			}
		}
	})
	t.Cleanup(func() {
		c.Close()
		m.wg.Wait()
	})
	return m
}

// wait waits until the worker's end is closed and every message is read.
func (m *master) wait(t *testing.T, timeout time.Duration) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		m.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(timeout):
		t.Fatalf("the worker's end of the channel is still open after %v", timeout)
	}
}

// next returns the next message with command cmd, skipping others, or
// fails the test after timeout.
func (m *master) next(t *testing.T, cmd string, timeout time.Duration) ipc.Message {
	t.Helper()
	return testutil.Recv(t, m.msgs, timeout, cmd+" message", func(msg ipc.Message) bool { return msg.Cmd == cmd })
}

// drain returns the messages received until the channel is quiet for
// quiet, or closed.
func (m *master) drain(quiet time.Duration) []ipc.Message {
	var out []ipc.Message
	for {
		select {
		case msg, ok := <-m.msgs:
			if !ok {
				return out
			}
			out = append(out, msg)
		case <-time.After(quiet):
			return out
		}
	}
}

// requestsSum adds up the shoal:requests batches among msgs.
func requestsSum(t *testing.T, msgs []ipc.Message) (sum int64, batches int) {
	t.Helper()
	for _, m := range msgs {
		if m.Cmd != ipc.CmdRequests {
			continue
		}
		if m.N <= 0 {
			t.Errorf("batch with n=%d: %s", m.N, m.Raw)
		}
		sum += m.N
		batches++
	}
	return sum, batches
}

func TestCounterWrapCountsServedRequests(t *testing.T) {
	c := NewCounter(nil, 0)
	defer c.Close()
	served := make(chan struct{})
	h := c.Wrap(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if got := c.n.Load(); got != 0 {
			t.Errorf("counted %d before the handler returned", got)
		}
		close(served)
	}))
	h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/", nil))
	<-served
	if got := c.n.Load(); got != 1 {
		t.Fatalf("count = %d, want 1", got)
	}
	// A panicking handler's request is counted too.
	p := c.Wrap(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { panic(http.ErrAbortHandler) }))
	func() {
		defer func() { recover() }()
		p.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/", nil))
	}()
	c.Add(3)
	if got := c.n.Load(); got != 5 {
		t.Fatalf("count = %d, want 5", got)
	}
	if err := c.Flush(); err != nil {
		t.Fatalf("Flush without a channel: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("Close without a channel: %v", err)
	}
}

func TestCounterReportsBatches(t *testing.T) {
	conn, m := newMaster(t)
	const interval = 50 * time.Millisecond
	c := NewCounter(conn, interval)
	srv := httptest.NewServer(c.Wrap(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	})))
	defer srv.Close()

	// Constant load for a while, from a few clients.
	const dur = 600 * time.Millisecond
	start := time.Now()
	var mu sync.Mutex
	total := 0
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			client := srv.Client()
			for time.Since(start) < dur {
				resp, err := client.Get(srv.URL)
				if err != nil {
					t.Error(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				mu.Lock()
				total++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	// Some more counts after the last tick must come with Close.
	c.Add(7)
	total += 7
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	msgs := m.drain(300 * time.Millisecond)
	sum, batches := requestsSum(t, msgs)
	if sum != int64(total) {
		t.Errorf("reported %d requests in %d batches, served %d", sum, batches, total)
	}
	// One batch per interval at most, one more from Close, and a little
	// slack for the ticks during the drain of the load.
	if max := int(elapsed/interval) + 3; batches > max {
		t.Errorf("%d batches in %v at interval %v, want at most %d", batches, elapsed, interval, max)
	}
	if batches < 3 {
		t.Errorf("only %d batches in %v at interval %v: not reporting while counting", batches, elapsed, interval)
	}
	for _, msg := range msgs {
		if msg.Cmd == ipc.CmdRequests && string(msg.Raw[:len(`{"cmd":"shoal:requests","n":`)]) != `{"cmd":"shoal:requests","n":` {
			t.Errorf("frame %s, want {\"cmd\":\"shoal:requests\",\"n\":N}", msg.Raw)
		}
	}
	t.Logf("%d requests in %v, %d batches", total, elapsed, batches)
}

func TestCounterCloseFlushesRemainder(t *testing.T) {
	conn, m := newMaster(t)
	c := NewCounter(conn, time.Hour) // no tick during the test
	c.Add(41)
	c.Add(1)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	msg := m.next(t, ipc.CmdRequests, 2*time.Second)
	if msg.N != 42 {
		t.Fatalf("n = %d, want 42", msg.N)
	}
	// Nothing pending: no empty batch.
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if extra := m.drain(100 * time.Millisecond); len(extra) != 0 {
		t.Fatalf("unexpected messages after the final flush: %d", len(extra))
	}
}

func TestCounterKeepsCountWhenMasterIsGone(t *testing.T) {
	mf, wf, err := ipc.Pair()
	if err != nil {
		t.Fatal(err)
	}
	conn := ipc.NewConn(wf)
	defer conn.Close()
	mf.Close()
	c := NewCounter(conn, time.Hour)
	c.Add(5)
	if err := c.Flush(); err == nil {
		t.Fatal("Flush to a gone master: no error")
	}
	if err := c.Close(); err == nil {
		t.Fatal("Close to a gone master: no error")
	}
	if c.sent != 0 {
		t.Fatalf("sent = %d after failed reports, want 0", c.sent)
	}
}
