package worker

import (
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shoal-sh/shoal/ipc"
)

// DefaultInterval is the default interval between two reports of a
// [Counter].
const DefaultInterval = 100 * time.Millisecond

// requestsMsg is the {"cmd":"shoal:requests","n":N} message.
type requestsMsg struct {
	Cmd string `json:"cmd"`
	N   uint64 `json:"n"`
}

// Counter counts requests in-process, with one atomic add on the hot path,
// and reports them to the master as {"cmd":"shoal:requests","n":N} at most
// once every interval and once more at [Counter.Flush] or [Counter.Close],
// so that no count is lost when the worker exits. Batching keeps the
// channel to the master quiet however many requests the worker serves; the
// master adds the batches up.
//
// A Counter is safe for concurrent use.
type Counter struct {
	conn     *ipc.Conn
	interval time.Duration

	n atomic.Uint64 // counted so far

	mu   sync.Mutex // serializes reports
	sent uint64     // reported so far, guarded by mu

	quit      chan struct{} // closed by Close
	done      chan struct{} // closed when the reporting goroutine ends
	closeOnce sync.Once
	closeErr  error
}

// NewCounter returns a Counter that reports to the master over conn every
// interval; an interval of zero or less means [DefaultInterval]. It starts
// one goroutine, which [Counter.Close] ends. If conn is nil, the Counter
// counts but reports nothing and starts no goroutine.
func NewCounter(conn *ipc.Conn, interval time.Duration) *Counter {
	if interval <= 0 {
		interval = DefaultInterval
	}
	c := &Counter{
		conn:     conn,
		interval: interval,
		quit:     make(chan struct{}),
		done:     make(chan struct{}),
	}
	if conn == nil {
		close(c.done)
		return c
	}
	go c.run()
	return c
}

// run reports what is pending once every interval until Close.
func (c *Counter) run() {
	defer close(c.done)
	t := time.NewTicker(c.interval)
	defer t.Stop()
	for {
		select {
		case <-c.quit:
			return
		case <-t.C:
			// An error means the master is gone or not reading; the count
			// stays pending and Close, or the next tick, tries again.
			c.Flush()
		}
	}
}

// Wrap returns a handler that calls h and then counts the request. A
// request is counted once h has returned, also when h panics.
func (c *Counter) Wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer c.n.Add(1)
		h.ServeHTTP(w, r)
	})
}

// Add counts n requests.
func (c *Counter) Add(n uint64) {
	c.n.Add(n)
}

// Flush reports the requests counted since the last report, if any, now.
// If the report cannot be sent, the requests stay pending for the next one.
func (c *Counter) Flush() error {
	if c.conn == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	total := c.n.Load()
	d := total - c.sent
	if d == 0 {
		return nil
	}
	if err := c.conn.Send(requestsMsg{Cmd: ipc.CmdRequests, N: d}); err != nil {
		return fmt.Errorf("worker: report %d requests: %w", d, err)
	}
	c.sent = total
	return nil
}

// Close stops the reporting goroutine and reports what is pending. Requests
// counted after Close are reported only by a later Flush. Close is
// idempotent; every call returns the first one's result.
func (c *Counter) Close() error {
	c.closeOnce.Do(func() {
		close(c.quit)
		<-c.done
		c.closeErr = c.Flush()
	})
	return c.closeErr
}
