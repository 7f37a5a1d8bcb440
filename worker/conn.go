package worker

import (
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// tracker knows every connection of one http.Server and its state, and ends
// connections that wait for a request during a drain. Its connState is the
// server's ConnState hook; the server's listener is a listener, whose
// trackedConns see the reads.
type tracker struct {
	mu    sync.Mutex
	conns map[*trackedConn]struct{}

	// Once draining is set, changed gets a token whenever a connection
	// begins to wait for a request or is gone.
	draining atomic.Bool
	changed  chan struct{}
}

func newTracker() *tracker {
	return &tracker{
		conns:   make(map[*trackedConn]struct{}),
		changed: make(chan struct{}, 1),
	}
}

// connState is the http.Server's ConnState hook.
func (t *tracker) connState(nc net.Conn, state http.ConnState) {
	c, ok := nc.(*trackedConn)
	if !ok {
		return // not from our listener; cannot happen
	}
	c.mu.Lock()
	c.state = state
	c.since = time.Now()
	if state == http.StateNew || state == http.StateIdle {
		// From here on the connection waits for a request: any byte read
		// is the start of one.
		c.gotBytes = false
	}
	c.mu.Unlock()
	switch state {
	case http.StateNew:
		t.mu.Lock()
		t.conns[c] = struct{}{}
		t.mu.Unlock()
	case http.StateClosed, http.StateHijacked:
		// A hijacked connection is its handler's business, as it is for
		// http.Server.Shutdown.
		t.mu.Lock()
		delete(t.conns, c)
		t.mu.Unlock()
	}
	if state != http.StateActive && t.draining.Load() {
		select {
		case t.changed <- struct{}{}:
		default:
		}
	}
}

// len returns the number of open connections.
func (t *tracker) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.conns)
}

// endWaiting ends the connections that have waited for a request, with no
// byte of one received, since cutoff or earlier. It returns how many
// connections are open and, of the connections that wait but began after
// cutoff, the earliest time one began to wait (zero if there is none).
func (t *tracker) endWaiting(cutoff time.Time) (open int, next time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for c := range t.conns {
		c.mu.Lock()
		if (c.state == http.StateNew || c.state == http.StateIdle) && !c.gotBytes && !c.ending {
			if !c.since.After(cutoff) {
				c.endIfWaiting()
			} else if next.IsZero() || c.since.Before(next) {
				next = c.since
			}
		}
		c.mu.Unlock()
	}
	return len(t.conns), next
}

// listener wraps a net.Listener so that its connections are trackedConns,
// and makes Close idempotent: the drain closes the listener before
// http.Server.Shutdown closes it again.
type listener struct {
	net.Listener
	closeOnce sync.Once
	closeErr  error
}

func (l *listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &trackedConn{Conn: c}, nil
}

func (l *listener) Close() error {
	l.closeOnce.Do(func() { l.closeErr = l.Listener.Close() })
	return l.closeErr
}

// aLongTimeAgo is a deadline in the past: it wakes a blocked Read at once.
var aLongTimeAgo = time.Unix(1, 0)

// trackedConn is a server connection that can be ended while it waits for a
// request without losing a request that has begun to arrive.
//
// The connection is not closed from the outside. Instead endIfWaiting sets
// a read deadline in the past, which wakes the server's goroutine blocked
// in Read. If no byte has arrived, Read reports io.EOF, and the server
// closes the connection from its own goroutine, as when the client hangs
// up. If bytes arrived in the meantime, Read returns them, the deadline the
// server had set is put back, and the request is served (with
// "Connection: close", as every request of a drain). So a request whose
// first bytes reached the socket before the end was decided is never lost;
// what is left is a client that sends after that instant, which no server
// can tell from one that sends after the close.
type trackedConn struct {
	net.Conn

	mu       sync.Mutex
	state    http.ConnState
	since    time.Time // when state was entered
	gotBytes bool      // a byte was read since the connection last waited
	ending   bool      // endIfWaiting has woken the reader
	deadline time.Time // the read deadline the server wants
}

// endIfWaiting wakes the reader so that it ends the connection unless a
// request arrives. c.mu is held.
func (c *trackedConn) endIfWaiting() {
	c.ending = true
	c.Conn.SetReadDeadline(aLongTimeAgo)
}

// resume undoes endIfWaiting. c.mu is held.
func (c *trackedConn) resume() {
	c.ending = false
	c.Conn.SetReadDeadline(c.deadline)
}

func (c *trackedConn) Read(p []byte) (int, error) {
	for {
		n, err := c.Conn.Read(p)
		if n > 0 {
			c.mu.Lock()
			c.gotBytes = true
			if c.ending {
				// The request came first: serve it.
				c.resume()
			}
			c.mu.Unlock()
			return n, err
		}
		if err == nil || !isTimeout(err) {
			return n, err
		}
		c.mu.Lock()
		if !c.ending {
			c.mu.Unlock()
			return n, err // the server's own deadline
		}
		if hasInput(c.Conn) {
			// Bytes arrived after the read timed out: read them.
			c.resume()
			c.mu.Unlock()
			continue
		}
		c.mu.Unlock()
		return 0, io.EOF
	}
}

func (c *trackedConn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.deadline = t
	if c.ending {
		return nil // keep the reader awake
	}
	return c.Conn.SetReadDeadline(t)
}

func (c *trackedConn) SetDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.deadline = t
	if c.ending {
		return c.Conn.SetWriteDeadline(t)
	}
	return c.Conn.SetDeadline(t)
}

// CloseWrite lets http.Server half-close the connection, as it does with a
// *net.TCPConn.
func (c *trackedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// ReadFrom keeps the sendfile and splice paths of *net.TCPConn for
// http.ServeContent and io.Copy to a ResponseWriter.
func (c *trackedConn) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := c.Conn.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{c.Conn}, r)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
