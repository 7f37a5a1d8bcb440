package ipc

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// ErrNotWorker is returned by FromEnv and Send in a process that shoal did
// not start as a worker.
var ErrNotWorker = errors.New("ipc: not a shoal worker: " + EnvFD + " is not set")

// messagesLen is the capacity of the channel returned by Conn.Messages.
const messagesLen = 256

// Conn is a worker's end of its channel to the master: the counterpart of
// Node.js's process.send, process.on('message') and process.on('disconnect').
type Conn struct {
	conn net.Conn // nil if the file could not be used; then err says why
	err  error

	wmu sync.Mutex // one frame at a time

	handler atomic.Pointer[func(Message)]
	msgs    chan Message  // closed by the reader when it ends
	done    chan struct{} // closed by the reader when it ends

	startOnce sync.Once // starts the reader, or, in Close, stands in for it
	closeOnce sync.Once
	closeErr  error
}

var env struct {
	once sync.Once
	conn *Conn
	err  error
}

// FromEnv returns the channel to the master named by the SHOAL_IPC_FD
// environment variable, or ErrNotWorker when it is not set. Every call
// returns the same Conn (or error).
//
// As Node.js does with NODE_CHANNEL_FD, FromEnv takes the descriptor over:
// it moves it to a close-on-exec descriptor, so that the worker's own
// children do not inherit the channel and keep it open after the worker
// dies, and it unsets SHOAL_IPC_FD, so that they do not take whatever file
// later gets that number for a channel.
func FromEnv() (*Conn, error) {
	env.once.Do(func() { env.conn, env.err = openEnv() })
	return env.conn, env.err
}

// openEnv is FromEnv without the once.
func openEnv() (*Conn, error) {
	v, ok := os.LookupEnv(EnvFD)
	if !ok || v == "" {
		return nil, ErrNotWorker
	}
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 0 {
		return nil, fmt.Errorf("ipc: %s=%q is not a file descriptor number", EnvFD, v)
	}
	if err := checkSocket(fd); err != nil {
		return nil, fmt.Errorf("ipc: %s=%d: %w", EnvFD, fd, err)
	}
	c := NewConn(os.NewFile(uintptr(fd), "shoal-ipc"))
	if c.err != nil {
		return nil, c.err
	}
	os.Unsetenv(EnvFD)
	return c, nil
}

// checkSocket checks that fd is an open Unix stream socket.
func checkSocket(fd int) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("fd %d is not open: %w", fd, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return fmt.Errorf("fd %d is not a socket", fd)
	}
	domain, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return fmt.Errorf("fd %d: get socket domain: %w", fd, err)
	}
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return fmt.Errorf("fd %d: get socket type: %w", fd, err)
	}
	if domain != unix.AF_UNIX || typ != unix.SOCK_STREAM {
		return fmt.Errorf("fd %d is not a Unix stream socket", fd)
	}
	return nil
}

// NewConn returns a worker's channel over f and takes ownership of f. If f is
// not a usable socket, Send returns the error and Done is closed at once.
func NewConn(f *os.File) *Conn {
	c := &Conn{
		msgs: make(chan Message, messagesLen),
		done: make(chan struct{}),
	}
	// A pollable, close-on-exec copy, so that Close interrupts a blocked
	// read or write.
	conn, err := net.FileConn(f)
	if err != nil {
		c.err = fmt.Errorf("ipc: open master channel %s: %w", f.Name(), err)
	} else {
		c.conn = conn
	}
	f.Close()
	return c
}

// Send encodes v and writes it to the master as one frame. It is safe for
// concurrent use; frames are never interleaved. It blocks while the master
// is not reading and its socket buffer is full. After Close it returns an
// error wrapping net.ErrClosed; when the master is gone, the write error.
func (c *Conn) Send(v any) error {
	if c.err != nil {
		return c.err
	}
	frame, err := Encode(v)
	if err != nil {
		return err
	}
	c.wmu.Lock()
	_, err = c.conn.Write(frame)
	c.wmu.Unlock()
	if err != nil {
		return fmt.Errorf("ipc: send to master: %w", err)
	}
	return nil
}

// Handle sets the function called for each incoming message, or with nil
// removes it, and starts reading if that has not started. h runs on the
// reader goroutine, one message at a time; the Message is its own (Raw is a
// copy) and may be kept. While a handler is set, Messages receives nothing.
// Messages that came before Handle went to the Messages channel; call Handle
// before messages matter. Node.js's own messages (Message.Internal) are
// never delivered.
func (c *Conn) Handle(h func(Message)) {
	if h == nil {
		c.handler.Store(nil)
	} else {
		c.handler.Store(&h)
	}
	c.start()
}

// Messages returns the channel of incoming messages, used when no handler is
// set, and starts reading if that has not started. It holds 256 messages;
// when it is full, further messages are dropped until there is room again,
// so a worker that wants every message reads it promptly or uses Handle. It
// is closed when the reader ends.
func (c *Conn) Messages() <-chan Message {
	c.start()
	return c.msgs
}

// Done returns a channel that is closed when the master's end is gone (end
// of file or a read error) or after Close, and starts reading if that has
// not started. A worker whose Done is closed has lost its master and should
// exit.
func (c *Conn) Done() <-chan struct{} {
	c.start()
	return c.done
}

// Close closes the channel. Reading ends soon after (see Done), once a
// handler running then returns; Close does not wait for it, so a handler may
// call Close. Close is idempotent; every call returns the first one's result.
func (c *Conn) Close() error {
	c.closeOnce.Do(func() {
		if c.conn != nil {
			if err := c.conn.Close(); err != nil {
				c.closeErr = fmt.Errorf("ipc: close master channel: %w", err)
			}
		}
		// If reading never started, nothing will: end it here.
		c.startOnce.Do(c.finish)
	})
	return c.closeErr
}

func (c *Conn) start() { c.startOnce.Do(func() { go c.read() }) }

// finish marks the end of reading.
func (c *Conn) finish() {
	close(c.msgs)
	close(c.done)
}

// read is the reader goroutine.
func (c *Conn) read() {
	defer c.finish()
	if c.conn == nil {
		return
	}
	d := NewDecoder(c.conn, 0)
	for {
		m, err := d.Next()
		if err != nil {
			if _, ok := err.(*FrameError); ok {
				continue // the master does not send these; skip like it does
			}
			return
		}
		if m.Internal() {
			continue
		}
		m = m.clone()
		if h := c.handler.Load(); h != nil {
			(*h)(m)
			continue
		}
		select {
		case c.msgs <- m:
		default: // full: dropped, as documented
		}
	}
}

// Send sends v to the master over the channel from FromEnv, like Node.js's
// process.send. It returns ErrNotWorker in a process that is not a worker.
func Send(v any) error {
	c, err := FromEnv()
	if err != nil {
		return err
	}
	return c.Send(v)
}
