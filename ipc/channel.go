package ipc

import (
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
)

// DefaultQueueLen is the default number of outgoing frames a Channel queues
// for its worker.
const DefaultQueueLen = 1024

// The writer gathers up to this many frames, or about this many bytes, into
// one writev.
const (
	maxBatch      = 64
	maxBatchBytes = 64 << 10
)

// ChannelOptions configures a Channel.
type ChannelOptions struct {
	// MaxMessage is the limit on an incoming frame in bytes, without its
	// line end; 0 means DefaultMaxMessage.
	MaxMessage int
	// QueueLen is the number of outgoing frames queued for the worker
	// beyond what its socket buffer holds; 0 means DefaultQueueLen.
	QueueLen int
	// OnMessage, if not nil, is called on the channel's reader goroutine for
	// each good frame that is not Node.js's own (see Message.Internal).
	// m.Raw and m.Msg are valid only during the call. The next frame is not
	// read until it returns. It must not call Close.
	OnMessage func(m Message)
	// OnError, if not nil, is called on the reader goroutine for each bad
	// frame, with a *FrameError (the frame is skipped and reading goes on),
	// and once for a read error that ends the channel other than end of
	// file or Close. Dropped outgoing frames are not reported here: Send
	// returns false and Stats counts them. It must not call Close.
	OnError func(err error)
}

// Stats is a snapshot of a Channel's counters.
type Stats struct {
	MessagesIn  uint64 // good frames read, Node.js's own included
	BytesIn     uint64 // bytes read
	MessagesOut uint64 // frames written
	BytesOut    uint64 // bytes written
	Dropped     uint64 // outgoing frames dropped: queue full, channel closed or broken
	// Errors counts bad incoming frames by FrameError.Reason; it has a key
	// for every reason.
	Errors map[string]uint64
}

// Channel is the master's end of one worker's channel. It reads and decodes
// the worker's frames on one goroutine and writes queued frames to the worker
// on another, so that neither a silent nor a flooding worker can hold up the
// master.
type Channel struct {
	conn    net.Conn // nil if the file could not be used; then openErr says why
	openErr error
	opts    ChannelOptions

	queue chan []byte   // owned by the writer; Send only adds
	quit  chan struct{} // closed by Close
	done  chan struct{} // closed when the reader ends
	wg    sync.WaitGroup

	mu     sync.RWMutex // keeps a Send from queueing after Close drained the queue
	closed bool
	broken atomic.Bool // set by the writer when writing has failed for good

	closeOnce sync.Once
	closeErr  error

	messagesIn, bytesIn, messagesOut, bytesOut, dropped atomic.Uint64
	errs                                                [len(reasons)]atomic.Uint64
}

// NewChannel returns the master's channel over f, the master end from
// [Pair], and starts its two goroutines, a reader and a writer; [Channel.Close]
// ends them. The Channel takes ownership of f.
//
// If f is not a usable socket, the channel starts anyway, reports the error
// to OnError, ends its reader at once and drops every frame.
func NewChannel(f *os.File, opts ChannelOptions) *Channel {
	if opts.QueueLen <= 0 {
		opts.QueueLen = DefaultQueueLen
	}
	c := &Channel{
		opts:  opts,
		queue: make(chan []byte, opts.QueueLen),
		quit:  make(chan struct{}),
		done:  make(chan struct{}),
	}
	// net.FileConn makes a pollable, non-blocking copy of the descriptor, so
	// that Close interrupts a read or a write in progress.
	conn, err := net.FileConn(f)
	if err != nil {
		c.openErr = fmt.Errorf("ipc: open worker channel %s: %w", f.Name(), err)
	} else {
		c.conn = conn
	}
	f.Close()
	c.wg.Add(2)
	go c.read()
	go c.write()
	return c
}

// Send queues frame, as returned by [Encode], for the worker. It never
// blocks. It returns false, and counts the frame as dropped, when the queue
// is full (the worker is not reading), when the channel is closed or writing
// to it has failed (the worker is gone), or when frame does not end with
// '\n'. A queued frame that cannot be written any more is dropped and
// counted too. The channel keeps frame until it is written, so the caller
// must not change it; the same frame may be sent to many channels.
func (c *Channel) Send(frame []byte) bool {
	if len(frame) == 0 || frame[len(frame)-1] != '\n' {
		c.dropped.Add(1)
		return false
	}
	c.mu.RLock()
	ok := false
	if !c.closed && !c.broken.Load() {
		select {
		case c.queue <- frame:
			ok = true
		default:
		}
	}
	c.mu.RUnlock()
	if !ok {
		c.dropped.Add(1)
	}
	return ok
}

// Stats returns a snapshot of the channel's counters. It is safe to call from
// any goroutine.
func (c *Channel) Stats() Stats {
	s := Stats{
		MessagesIn:  c.messagesIn.Load(),
		BytesIn:     c.bytesIn.Load(),
		MessagesOut: c.messagesOut.Load(),
		BytesOut:    c.bytesOut.Load(),
		Dropped:     c.dropped.Load(),
		Errors:      make(map[string]uint64, len(reasons)),
	}
	for i, r := range reasons {
		s.Errors[r] = c.errs[i].Load()
	}
	return s
}

// Done returns a channel that is closed when the reader has ended: the worker
// closed its end or died, reading failed, or Close was called.
func (c *Channel) Done() <-chan struct{} { return c.done }

// Close closes the socket, which ends both goroutines even if the writer is
// blocked on a worker that does not read, and waits for them. Frames still
// queued are dropped and counted. Close is idempotent; every call returns the
// first one's result. It must not be called from OnMessage or OnError, which
// run on the reader goroutine it waits for.
func (c *Channel) Close() error {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.closed = true
		c.mu.Unlock()
		close(c.quit)
		if c.conn != nil {
			if err := c.conn.Close(); err != nil {
				c.closeErr = fmt.Errorf("ipc: close worker channel: %w", err)
			}
		}
		c.wg.Wait()
		// Nothing can be queued any more: count what was left.
		c.dropped.Add(uint64(len(c.queue)))
		for len(c.queue) > 0 {
			<-c.queue
		}
	})
	return c.closeErr
}

// read is the reader goroutine: it decodes frames until the stream ends.
func (c *Channel) read() {
	defer c.wg.Done()
	defer close(c.done)
	if c.conn == nil {
		c.report(c.openErr)
		return
	}
	d := NewDecoder(countingReader{c.conn, &c.bytesIn}, c.opts.MaxMessage)
	for {
		m, err := d.Next()
		if err == nil {
			c.messagesIn.Add(1)
			if c.opts.OnMessage != nil && !m.Internal() {
				c.opts.OnMessage(m)
			}
			continue
		}
		if fe, ok := err.(*FrameError); ok {
			for i, r := range reasons {
				if r == fe.Reason {
					c.errs[i].Add(1)
				}
			}
			c.report(fe)
			continue
		}
		if err != io.EOF && !c.closing() {
			c.report(fmt.Errorf("ipc: read from worker channel: %w", err))
		}
		return
	}
}

func (c *Channel) report(err error) {
	if c.opts.OnError != nil {
		c.opts.OnError(err)
	}
}

// closing reports whether Close has been called.
func (c *Channel) closing() bool {
	select {
	case <-c.quit:
		return true
	default:
		return false
	}
}

// write is the writer goroutine: it writes queued frames, several to a
// writev, until Close. After a write error it only counts what comes as
// dropped.
func (c *Channel) write() {
	defer c.wg.Done()
	if c.conn == nil {
		c.broken.Store(true)
	}
	batch := make([][]byte, 0, maxBatch)
	var lens [maxBatch]int
	for {
		var frame []byte
		select {
		case <-c.quit:
			return
		case frame = <-c.queue:
		}
		batch = append(batch[:0], frame)
		size := len(frame)
	gather:
		for len(batch) < maxBatch && size < maxBatchBytes {
			select {
			case frame = <-c.queue:
				batch = append(batch, frame)
				size += len(frame)
			default:
				break gather
			}
		}
		if c.broken.Load() {
			c.dropped.Add(uint64(len(batch)))
			clear(batch)
			continue
		}
		for i, f := range batch {
			lens[i] = len(f)
		}
		bufs := net.Buffers(batch) // WriteTo consumes bufs, and batch with it
		n, err := bufs.WriteTo(c.conn)
		c.bytesOut.Add(uint64(n))
		written := len(batch)
		if err != nil {
			// Count whole frames only; a partly written one is lost with
			// the connection.
			written = 0
			for _, l := range lens[:len(batch)] {
				if n < int64(l) {
					break
				}
				n -= int64(l)
				written++
			}
			c.dropped.Add(uint64(len(batch) - written))
			c.broken.Store(true)
		}
		c.messagesOut.Add(uint64(written))
		clear(batch)
	}
}

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.Reader
	n *atomic.Uint64
}

func (r countingReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if n > 0 {
		r.n.Add(uint64(n))
	}
	return n, err
}
