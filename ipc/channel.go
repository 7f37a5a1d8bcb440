package ipc

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// DefaultQueueLen is the default number of outgoing frames a Channel queues
// for its worker.
const DefaultQueueLen = 1024

// DefaultQueueBytes is the default number of bytes of outgoing frames a
// Channel holds for its worker: four frames of the default
// [DefaultMaxMessage] size.
const DefaultQueueBytes = 4 << 20

// DefaultReadDelay is how long, by default, the reader of a busy channel
// waits before it reads again (see [ChannelOptions].ReadDelay): the
// longest allowed, since the master's CPU for a busy worker's messages
// goes with the number of waits.
const DefaultReadDelay = MaxReadDelay

// MaxReadDelay is the longest ReadDelay: a longer one is taken as this.
const MaxReadDelay = 5 * time.Millisecond

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
	// QueueBytes is the limit on the bytes of the frames the channel holds
	// for the worker, from Send until the kernel has taken them; 0 means
	// DefaultQueueBytes. A frame longer than this is never sent.
	QueueBytes int
	// Budget, if not nil, is a limit on the bytes held by all the channels
	// that share it, on top of each one's QueueBytes. A master gives one
	// Budget to every worker's channel.
	Budget *Budget
	// ReadDelay is the longest the reader waits before it reads again
	// while the worker sends fast: after a read that brought two frames or
	// more, or the last of a few quick reads in a row. The frames the
	// worker sends meanwhile gather in the socket, and one read then
	// takes them all, instead of one read each. The reader
	// does not wait when the channel was idle, so a lone frame (a ready,
	// a heartbeat, a relayed message) is read as soon as it comes, nor
	// when something was sent to the worker since its last read, so a
	// worker that waits for the master's answer is not slowed. A frame
	// that comes during a burst waits at most ReadDelay. The waits end on
	// ticks shared by all channels, every ReadDelay, so that the busy
	// workers are read together. 0 means
	// DefaultReadDelay, a value over MaxReadDelay means MaxReadDelay, and
	// a negative value never waits. See the package documentation,
	// "Reading in batches".
	ReadDelay time.Duration
	// OnMessage, if not nil, is called on the channel's reader goroutine for
	// each good frame that is not Node.js's own (see Message.Internal).
	// m.Raw and m.Msg are valid only during the call. The next frame is not
	// read until it returns. It must not call Close.
	OnMessage func(m Message)
	// OnError, if not nil, is called on the reader goroutine for each bad
	// frame, with a *FrameError (the frame is skipped and reading goes on),
	// and once for a read error that ends the channel other than end of
	// file or Close. Dropped outgoing frames are not reported here: Send
	// returns a *DropError and Stats counts them. It must not call Close.
	OnError func(err error)
}

// Stats is a snapshot of a Channel's counters.
type Stats struct {
	MessagesIn  uint64 // good frames read, Node.js's own included
	BytesIn     uint64 // bytes read
	Reads       uint64 // reads of the socket by the reader: a busy worker's frames come many to a read
	MessagesOut uint64 // frames written
	BytesOut    uint64 // bytes written
	Dropped     uint64 // outgoing frames dropped, for any reason: the sum of Drops
	// Drops counts dropped outgoing frames by DropError.Reason; it has a
	// key for every reason.
	Drops map[string]uint64
	// QueuedBytes is the bytes of the frames held for the worker at the
	// time of the snapshot: at most ChannelOptions.QueueBytes.
	QueuedBytes uint64
	// Errors counts bad incoming frames by FrameError.Reason; it has a key
	// for every reason.
	Errors map[string]uint64
}

// Reasons for a [DropError]; they are also the keys of [Stats].Drops.
const (
	DropQueueFull    = "queue_full"    // QueueLen frames are queued
	DropQueueBytes   = "queue_bytes"   // the frame would take the queue over QueueBytes
	DropBudget       = "budget"        // the frame would take the shared Budget over its limit
	DropTooLarge     = "too_large"     // the frame is longer than QueueBytes or the Budget's limit
	DropClosed       = "closed"        // the channel is closed, or writing to it failed
	DropInvalidFrame = "invalid_frame" // the frame does not end with '\n'
)

// drops lists the DropError reasons in the order of Channel's counters.
var drops = [...]string{DropQueueFull, DropQueueBytes, DropBudget, DropTooLarge, DropClosed, DropInvalidFrame}

// DropError is the error [Channel.Send] returns for a frame it did not
// queue: the frame is dropped and counted ([Stats].Drops). Callers add which
// worker it was for.
type DropError struct {
	// Reason is one of DropQueueFull, DropQueueBytes, DropBudget,
	// DropTooLarge, DropClosed and DropInvalidFrame.
	Reason string
}

// Error says why the frame was dropped and what to look at.
func (e *DropError) Error() string {
	var why string
	switch e.Reason {
	case DropQueueFull:
		why = "the worker's queue is full (QueueLen frames): is the worker reading its channel, fd 3?"
	case DropQueueBytes:
		why = "the worker's queue is full (QueueBytes bytes): is the worker reading its channel, fd 3?"
	case DropBudget:
		why = "the queues to all workers hold their shared budget of bytes: some workers are not reading their channel, fd 3"
	case DropTooLarge:
		why = "the frame is longer than the queue's byte limit (QueueBytes or the shared Budget): send smaller messages or raise the limit"
	case DropClosed:
		why = "the channel is closed or broken: the worker is gone"
	case DropInvalidFrame:
		why = "the frame does not end with a newline: make frames with ipc.Encode"
	default:
		why = e.Reason
	}
	return "ipc: message to worker dropped: " + why
}

// dropErrs holds one DropError per reason, in the order of drops, so that
// Send does not allocate.
var dropErrs = func() (errs [len(drops)]*DropError) {
	for i, r := range drops {
		errs[i] = &DropError{Reason: r}
	}
	return errs
}()

// Indexes into drops and dropErrs.
const (
	dropQueueFull = iota
	dropQueueBytes
	dropBudget
	dropTooLarge
	dropClosed
	dropInvalidFrame
	sent = -1 // not a drop
)

// DefaultBudget is the limit of a zero Budget, and of NewBudget(0).
const DefaultBudget = 64 << 20

// Budget is a limit on the bytes of outgoing frames held by all the channels
// that share it ([ChannelOptions].Budget), so that workers that do not read
// cannot together make the master hold more than the limit, however many
// they are. A frame's bytes are taken when Send queues it and given back
// once it is written, dropped, or its channel closed. The zero Budget has
// the limit DefaultBudget. A Budget is safe for concurrent use and must not
// be copied after first use.
type Budget struct {
	limit int64
	used  atomic.Int64
}

// NewBudget returns a Budget of limit bytes; limit <= 0 means DefaultBudget.
func NewBudget(limit int) *Budget {
	return &Budget{limit: int64(limit)}
}

// Limit returns the budget's limit in bytes.
func (b *Budget) Limit() int {
	if b.limit <= 0 {
		return DefaultBudget
	}
	return int(b.limit)
}

// Used returns the bytes of the frames held now by the channels sharing b.
func (b *Budget) Used() int { return int(b.used.Load()) }

// take adds n to v unless that would take it over limit, and reports
// whether it did.
func take(v *atomic.Int64, n, limit int64) bool {
	for {
		cur := v.Load()
		if cur+n > limit {
			return false
		}
		if v.CompareAndSwap(cur, cur+n) {
			return true
		}
	}
}

// Channel is the master's end of one worker's channel. It reads and decodes
// the worker's frames on one goroutine and writes queued frames to the worker
// on another, so that neither a silent nor a flooding worker can hold up the
// master.
type Channel struct {
	fd      int        // the socket, non-blocking; -1 if the file could not be used: then openErr says why
	pe      *pollEntry // the socket in the poller, when fd >= 0
	name    string     // the file's name, for the Handoff's
	openErr error
	opts    ChannelOptions

	queue chan []byte // owned by the writer; Send only adds
	// queued is the bytes of the frames held, in the queue and in the
	// writer's batch; Send adds to it and to the budget before queueing,
	// the writer and Close take away.
	queued     atomic.Int64
	queueBytes int64
	budget     *Budget
	quit       chan struct{} // closed by Close and Detach: ends the writer, and the reader's waits
	done       chan struct{} // closed when the reader ends
	wg         sync.WaitGroup

	mu     sync.RWMutex // keeps a Send from queueing after Close drained the queue
	closed bool
	broken atomic.Bool // set by the writer when writing has failed for good

	closeOnce sync.Once
	closeErr  error

	// Detach: the reader and the writer stop without closing the socket
	// and leave what they hold here.
	detaching atomic.Bool
	rest      []byte // read, not yet a frame: set by the reader
	discard   bool   // rest is inside a line too long to keep
	unsent    []byte // queued, not written: set by the writer
	ended     bool   // the reader ended on its own (EOF, error) before Detach

	// halt is closed by Pause or Detach, to end the reader's waits at once
	// (see waitToRead).
	halt  chan struct{}
	delay time.Duration // the reader's longest wait between reads: ReadDelay

	messagesIn, bytesIn, messagesOut, bytesOut atomic.Uint64
	reads                                      atomic.Uint64 // read(2) calls of the socket by the reader
	sends                                      atomic.Uint64 // frames Send queued: see pacedReader.wait
	dropped                                    [len(drops)]atomic.Uint64
	errs                                       [len(reasons)]atomic.Uint64
}

// NewChannel returns the master's channel over f, the master end from
// [Pair], and starts its two goroutines, a reader and a writer; [Channel.Close]
// ends them. The Channel takes ownership of f.
//
// If f is not a usable socket, the channel starts anyway, reports the error
// to OnError, ends its reader at once and drops every frame.
func NewChannel(f *os.File, opts ChannelOptions) *Channel {
	c := newChannel(f, opts)
	c.start()
	return c
}

func newChannel(f *os.File, opts ChannelOptions) *Channel {
	if opts.QueueLen <= 0 {
		opts.QueueLen = DefaultQueueLen
	}
	if opts.QueueBytes <= 0 {
		opts.QueueBytes = DefaultQueueBytes
	}
	c := &Channel{
		opts:       opts,
		queue:      make(chan []byte, opts.QueueLen),
		queueBytes: int64(opts.QueueBytes),
		budget:     opts.Budget,
		quit:       make(chan struct{}),
		done:       make(chan struct{}),
		halt:       make(chan struct{}),
		delay:      readDelay(opts.ReadDelay),
		fd:         -1,
		name:       f.Name(),
	}
	fd, pe, err := openSocket(f)
	if err != nil {
		c.openErr = fmt.Errorf("ipc: open worker channel %s: %w", f.Name(), err)
	} else {
		c.fd, c.pe = fd, pe
	}
	f.Close()
	return c
}

// openSocket returns a non-blocking, close-on-exec copy of f's descriptor,
// which must be a socket, added to the channels' poller (not to Go's
// network poller: see poller).
func openSocket(f *os.File) (int, *pollEntry, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return -1, nil, err
	}
	fd := -1
	var dupErr error
	err = rc.Control(func(s uintptr) {
		fd, dupErr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0)
	})
	if err == nil {
		err = dupErr
	}
	if err != nil {
		return -1, nil, fmt.Errorf("duplicate descriptor: %w", err)
	}
	if _, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil {
		unix.Close(fd)
		return -1, nil, fmt.Errorf("not a socket: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return -1, nil, fmt.Errorf("set non-blocking: %w", err)
	}
	pe, err := thePoller.add(fd)
	if err != nil {
		unix.Close(fd)
		return -1, nil, err
	}
	return fd, pe, nil
}

func (c *Channel) start() {
	c.wg.Add(2)
	go c.read()
	go c.write()
}

// Handoff is what [Channel.Detach] leaves of a channel: its socket, still
// open, and the bytes the channel held in either direction, so that
// [ResumeChannel] (in this process or, across exec, in a new master) goes
// on exactly where the channel stopped: no frame is lost or read twice.
type Handoff struct {
	// File is the master's end of the socket.
	File *os.File
	// Unread is what the worker wrote that was read but not yet handled:
	// the start of a frame. Every complete frame before it went to
	// OnMessage.
	Unread []byte
	// Discard says that Unread is inside a frame longer than the limit,
	// to be skipped up to its end.
	Discard bool
	// Unsent is what was queued for the worker and not yet written: the
	// tail of a frame cut by Detach, then whole frames.
	Unsent []byte
	// Ended says that reading had ended before Detach: the worker closed
	// its end (the resumed channel reads the end of file again) or
	// reading failed.
	Ended bool
}

// Pause asks the reader to stop at the next frame boundary, ahead of
// Detach: Done is closed once it has (after a call of OnMessage in
// progress returns). Send still queues. It is for stopping many channels
// at once: pause them all, wait for their Done, then Detach each. A paused
// channel can only be detached or closed.
func (c *Channel) Pause() {
	c.stopReads()
}

// stopReads marks the channel as detaching and, once, ends the reader's
// wait for its socket or between two reads of a busy worker (see
// waitToRead), so that Pause and Detach stop the reader at once. The
// reader reads nothing more: it hands on the frames it holds and stops.
func (c *Channel) stopReads() {
	if !c.detaching.Swap(true) {
		close(c.halt)
	}
}

// ErrDetached is returned by [Channel.Detach] on a channel that was closed
// or detached before.
var ErrDetached = errors.New("ipc: channel already closed or detached")

// Detach stops the channel between two frames without closing its socket,
// and returns the socket with what the channel held: the start of a frame
// read from the worker and not yet handled, and what was queued for the
// worker and not yet written. The frames read before were handed to
// OnMessage; frames Send queued before Detach are in Unsent, not dropped.
// Afterwards the channel is closed: Done is closed, Send drops, Stats keep
// their final counts. Like Close, Detach must not be called from OnMessage
// or OnError, and whatever OnMessage hands its work to must keep taking it
// until Detach returns. The caller owns Handoff.File.
func (c *Channel) Detach() (Handoff, error) {
	err := ErrDetached
	var h Handoff
	c.closeOnce.Do(func() {
		err = nil
		c.stopReads()
		if c.fd < 0 {
			c.mu.Lock()
			c.closed = true
			c.mu.Unlock()
			close(c.quit)
			c.wg.Wait()
			err = c.openErr
			return
		}
		// The reader stops at a frame boundary; then quit ends the
		// writer's wait for the socket without losing a byte: it keeps
		// what it did not write.
		<-c.done
		c.mu.Lock()
		c.closed = true
		c.mu.Unlock()
		close(c.quit)
		c.wg.Wait()
		for len(c.queue) > 0 {
			frame := <-c.queue
			c.unsent = append(c.unsent, frame...)
			c.release(int64(len(frame)))
		}
		h = Handoff{Unread: c.rest, Discard: c.discard, Unsent: c.unsent, Ended: c.ended}
		thePoller.remove(c.pe)
		// A copy of the descriptor, as net.Conn.File gives, and
		// blocking, as a descriptor passed to a new process expects;
		// ResumeChannel makes it non-blocking again.
		fd, derr := unix.FcntlInt(uintptr(c.fd), unix.F_DUPFD_CLOEXEC, 0)
		if derr == nil {
			derr = unix.SetNonblock(fd, false)
			h.File = os.NewFile(uintptr(fd), c.name)
		}
		if derr != nil {
			err = fmt.Errorf("ipc: detach worker channel %s: %w", c.name, derr)
		}
		unix.Close(c.fd)
	})
	return h, err
}

// ResumeChannel is [NewChannel] for a channel that [Channel.Detach] left:
// it reads on from h.Unread and writes h.Unsent before anything queued
// later. It takes ownership of h.File, which may be blocking or not (as
// one inherited across exec).
func ResumeChannel(h Handoff, opts ChannelOptions) *Channel {
	c := newChannel(h.File, opts)
	c.rest, c.discard = h.Unread, h.Discard
	// Queued before, so held beyond the limits rather than dropped; frame
	// by frame, so each is counted once written (the first may be the
	// tail of one cut by Detach, which the old channel did not count).
	for rest := h.Unsent; len(rest) > 0; {
		i := bytes.IndexByte(rest, '\n') + 1
		if i == 0 || len(c.queue) == cap(c.queue)-1 {
			i = len(rest)
		}
		n := int64(i)
		c.queued.Add(n)
		if c.budget != nil {
			c.budget.used.Add(n)
		}
		c.queue <- rest[:i:i]
		rest = rest[i:]
	}
	c.start()
	return c
}

// Send queues frame, as returned by [Encode], for the worker. It never
// blocks. It returns nil when frame is queued, or a [*DropError] saying why
// it dropped and counted it instead: the queue holds QueueLen frames or
// would go over QueueBytes, or the shared Budget over its limit (the worker
// is not reading); the frame alone is over one of those byte limits; the
// channel is closed or writing to it has failed (the worker is gone); or
// frame does not end with '\n'. A queued frame that cannot be written any
// more is dropped and counted too. The channel keeps frame until it is
// written, so the caller must not change it; the same frame may be sent to
// many channels, and counts against each one's limits.
func (c *Channel) Send(frame []byte) error {
	r := c.enqueue(frame)
	if r == sent {
		c.sends.Add(1)
		return nil
	}
	c.dropped[r].Add(1)
	return dropErrs[r]
}

// enqueue queues frame, taking its bytes from the queue's limit and the
// budget, and returns sent or the index of the reason it did not.
func (c *Channel) enqueue(frame []byte) int {
	n := int64(len(frame))
	if n == 0 || frame[n-1] != '\n' {
		return dropInvalidFrame
	}
	if n > c.queueBytes || c.budget != nil && n > int64(c.budget.Limit()) {
		return dropTooLarge
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.closed || c.broken.Load() {
		return dropClosed
	}
	if len(c.queue) == cap(c.queue) {
		return dropQueueFull
	}
	if !take(&c.queued, n, c.queueBytes) {
		return dropQueueBytes
	}
	if c.budget != nil && !take(&c.budget.used, n, int64(c.budget.Limit())) {
		c.queued.Add(-n)
		return dropBudget
	}
	select {
	case c.queue <- frame:
		return sent
	default: // filled up since the check above by a concurrent Send
		c.release(n)
		return dropQueueFull
	}
}

// release gives back n bytes of frames held: written, dropped or thrown
// away.
func (c *Channel) release(n int64) {
	c.queued.Add(-n)
	if c.budget != nil {
		c.budget.used.Add(-n)
	}
}

// Stats returns a snapshot of the channel's counters. It is safe to call from
// any goroutine.
func (c *Channel) Stats() Stats {
	s := Stats{
		MessagesIn:  c.messagesIn.Load(),
		BytesIn:     c.bytesIn.Load(),
		Reads:       c.reads.Load(),
		MessagesOut: c.messagesOut.Load(),
		BytesOut:    c.bytesOut.Load(),
		QueuedBytes: uint64(max(c.queued.Load(), 0)),
		Drops:       make(map[string]uint64, len(drops)),
		Errors:      make(map[string]uint64, len(reasons)),
	}
	for i, r := range drops {
		n := c.dropped[i].Load()
		s.Drops[r] = n
		s.Dropped += n
	}
	for i, r := range reasons {
		s.Errors[r] = c.errs[i].Load()
	}
	return s
}

// Done returns a channel that is closed when the reader has ended: the worker
// closed its end or died, reading failed, or Close was called.
func (c *Channel) Done() <-chan struct{} { return c.done }

// Close ends both goroutines, even if the writer waits on a worker that
// does not read, waits for them, and closes the socket. Frames still
// queued are dropped and counted, and their bytes given back to the
// Budget. Close is idempotent; every call returns the
// first one's result. It must not be called from OnMessage or OnError, which
// run on the reader goroutine it waits for.
func (c *Channel) Close() error {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.closed = true
		c.mu.Unlock()
		close(c.quit)
		c.wg.Wait()
		if c.fd >= 0 {
			thePoller.remove(c.pe)
			if err := unix.Close(c.fd); err != nil {
				c.closeErr = fmt.Errorf("ipc: close worker channel %s: %w", c.name, err)
			}
		}
		// Nothing can be queued any more: count what was left.
		for len(c.queue) > 0 {
			c.release(int64(len(<-c.queue)))
			c.dropped[dropClosed].Add(1)
		}
	})
	return c.closeErr
}

// read is the reader goroutine: it decodes frames until the stream ends,
// Close, or Pause or Detach.
func (c *Channel) read() {
	defer c.wg.Done()
	defer close(c.done)
	if c.fd < 0 {
		c.report(c.openErr)
		return
	}
	r := &pacedReader{c: c, delay: c.delay}
	defer r.stop()
	d := resumeDecoder(r, c.opts.MaxMessage, c.rest, c.discard)
	c.rest = nil
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
		if err == errWouldBlock {
			// Every whole frame read is handled.
			ok, werr := c.waitToRead(r)
			if ok {
				continue
			}
			if werr == nil {
				if c.detaching.Load() {
					c.rest, c.discard = d.pending()
				}
				return
			}
			err = werr
		}
		c.ended = true
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
	if c.fd < 0 {
		c.broken.Store(true)
	}
	batch := make([][]byte, 0, maxBatch)
	var lens [maxBatch]int
	var frames [maxBatch][]byte // batch as it was before writeBatch consumed it
	iov := make([]unix.Iovec, 0, maxBatch)
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
			c.dropped[dropClosed].Add(uint64(len(batch)))
			c.release(int64(size))
			clear(batch)
			continue
		}
		for i, f := range batch {
			lens[i] = len(f)
		}
		copy(frames[:], batch)
		n, err := c.writeBatch(batch, iov[:0]) // consumes batch
		c.bytesOut.Add(uint64(n))
		written := len(batch)
		if err == errStopped && c.detaching.Load() {
			// Detach: keep what was not written, from the cut on.
			skip := n
			for i, l := range lens[:len(batch)] {
				if skip >= int64(l) {
					skip -= int64(l)
					c.messagesOut.Add(1)
					continue
				}
				c.unsent = append(c.unsent, frames[i][skip:]...)
				skip = 0
			}
			c.release(int64(size))
			return
		}
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
			c.dropped[dropClosed].Add(uint64(len(batch) - written))
			c.broken.Store(true)
		}
		c.messagesOut.Add(uint64(written))
		c.release(int64(size))
		clear(batch)
		clear(frames[:])
	}
}

// errStopped is what writeBatch returns when Close or Detach ends its
// wait for the socket.
var errStopped = errors.New("ipc: channel closed")

// writeBatch writes bufs to the socket with writev(2), all of them unless
// writing fails, and returns how many bytes it wrote. When the socket is
// full it waits for the poller to say it takes writes again, or for Close
// or Detach (errStopped). It consumes bufs, and uses iov's room.
func (c *Channel) writeBatch(bufs [][]byte, iov []unix.Iovec) (int64, error) {
	var total int64
	for len(bufs) > 0 {
		iov = iov[:0]
		for _, b := range bufs {
			v := unix.Iovec{Base: &b[0]}
			v.SetLen(len(b))
			iov = append(iov, v)
		}
		n, _, errno := unix.RawSyscall(unix.SYS_WRITEV, uintptr(c.fd), uintptr(unsafe.Pointer(&iov[0])), uintptr(len(iov)))
		clear(iov)
		switch errno {
		case 0:
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			if err := thePoller.arm(c.pe, waitWrite); err != nil {
				return total, err
			}
			select {
			case <-c.pe.writable:
				continue
			case <-c.quit:
				return total, errStopped
			}
		default:
			return total, os.NewSyscallError("writev", errno)
		}
		total += int64(n)
		for n > 0 {
			if int(n) < len(bufs[0]) {
				bufs[0] = bufs[0][n:]
				break
			}
			n -= uintptr(len(bufs[0]))
			bufs[0] = nil
			bufs = bufs[1:]
		}
	}
	return total, nil
}

// readDelay returns the wait of a ChannelOptions.ReadDelay.
func readDelay(d time.Duration) time.Duration {
	switch {
	case d == 0:
		return DefaultReadDelay
	case d < 0:
		return 0
	}
	return min(d, maxReadDelay)
}

// maxReadDelay is MaxReadDelay. Tests raise it, to tell a wait from none
// on a busy machine.
var maxReadDelay = MaxReadDelay

// Pacing of a busy reader (see pacedReader.wait).
const (
	// A wait is cut short so that a read brings about batchFrames frames
	// or batchBytes bytes at most, at the worker's pace: the worker's
	// socket buffer never fills while the reader waits, and the worker
	// never blocks for it.
	batchFrames = 64
	batchBytes  = 16 << 10
	// Frames that come one to a read count as fast after quickReads reads
	// in a row less than a quarter of the delay apart.
	quickReads = 4
	// A wait shorter than minWait is not worth a timer.
	minWait = 100 * time.Microsecond
)

// pacedReader is what the reader's Decoder reads from: the socket, with
// the bytes and reads counted. It never blocks: when the socket is empty it
// returns errWouldBlock, and the Decoder hands it on after the whole frames
// it holds; the reader then waits (waitToRead). While the worker sends
// fast, that wait is a pause before the next read, so that the frames sent
// meanwhile come in one read: one wakeup of the reader for many messages
// instead of one each.
type pacedReader struct {
	c       *Channel
	delay   time.Duration // the longest wait; 0: never wait
	tick    chan struct{} // ends waitToRead's waits, from theTicker or timer; nil until the first
	timer   *time.Timer   // ends them when theTicker fails; nil until then
	n       int           // bytes the last read brought
	lines   int           // frames the last read brought (its line ends)
	full    bool          // the last read filled the buffer it was given
	drained bool          // the last read found the socket's bytes fewer than its buffer: all there were
	last    time.Time     // when the last read that brought bytes returned
	gap     time.Duration // from the read before that to the last one
	quick   int           // reads in a row that came less than delay/4 after the one before
	sent    uint64        // the channel's sends at the last read
}

// errWouldBlock is what pacedReader.Read returns when it has nothing to
// read now. It is an os.ErrDeadlineExceeded, which the Decoder hands on
// after the whole frames it holds, keeping the start of a frame.
var errWouldBlock error = wouldBlock{}

type wouldBlock struct{}

func (wouldBlock) Error() string        { return "ipc: nothing to read yet" }
func (wouldBlock) Is(target error) bool { return target == os.ErrDeadlineExceeded }

// Read reads the socket once, with a non-blocking read(2). It returns
// errWouldBlock without reading when the last read took all there was (a
// read that found the socket empty would cost a system call for nothing),
// or when Pause or Detach has begun.
func (r *pacedReader) Read(p []byte) (int, error) {
	if r.drained || r.c.detaching.Load() {
		return 0, errWouldBlock
	}
	r.sent = r.c.sends.Load()
	r.c.reads.Add(1)
	n, errno := readNonblock(uintptr(r.c.fd), p)
	switch {
	case errno == unix.EAGAIN:
		r.n, r.full, r.lines = 0, false, 0
		return 0, errWouldBlock
	case errno != 0:
		return 0, os.NewSyscallError("read", errno)
	case n == 0 && len(p) > 0:
		return 0, io.EOF
	}
	r.n, r.full, r.lines = n, n == len(p), 0
	r.drained = !r.full
	r.c.bytesIn.Add(uint64(n))
	if r.delay > 0 {
		r.lines = bytes.Count(p[:n], newline)
		now := time.Now()
		r.gap, r.last = now.Sub(r.last), now
		if r.gap < r.delay/4 {
			r.quick++
		} else {
			r.quick = 0
		}
	}
	return n, nil
}

var newline = []byte{'\n'}

// readNonblock is read(2) on a descriptor in non-blocking mode. It cannot
// block, so it need not tell the Go scheduler, which, told, wakes its
// monitor thread when the process was idle, at a cost close to the read's
// own.
func readNonblock(fd uintptr, p []byte) (int, syscall.Errno) {
	if len(p) == 0 {
		return 0, 0
	}
	for {
		n, _, errno := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
		if errno != syscall.EINTR {
			return int(n), errno
		}
	}
}

// wait returns how long to wait before the next read: 0, read at once,
// unless the worker sends fast: the last read brought two frames or more,
// or it was the last of quickReads reads in a row that each came less than
// delay/4 after the one before. So when the channel was idle, or a frame
// comes now and then, the reader reads at once, and a lone frame is never
// delayed. Nor does it wait when the last read filled its buffer (more is
// waiting), or when a frame was sent to the worker since the last read: the
// worker may be waiting for it to answer. The wait is cut short so that a
// read brings about batchFrames frames or batchBytes bytes at most.
func (r *pacedReader) wait() time.Duration {
	if r.delay <= 0 || r.full {
		return 0
	}
	if !(r.lines >= 2 || r.lines == 1 && r.quick >= quickReads) || r.c.sends.Load() != r.sent {
		return 0
	}
	d := r.delay
	if r.lines > batchFrames {
		d = min(d, time.Duration(float64(r.gap)*batchFrames/float64(r.lines)))
	}
	if r.n > batchBytes {
		d = min(d, time.Duration(float64(r.gap)*batchBytes/float64(r.n)))
	}
	if d < minWait {
		return 0
	}
	return d
}

// waitToRead is the reader's wait once it has handled every whole frame it
// read: if the worker sends fast (see pacedReader.wait), a pause of up to
// ReadDelay with the socket unarmed, so that the worker's writes meanwhile
// wake nothing, then a read; otherwise, the socket armed in the poller, a
// wait until it has something to read (or its end). It reports whether to
// read on: false, with a nil error, when Close, Pause or Detach began.
func (c *Channel) waitToRead(r *pacedReader) (bool, error) {
	if c.detaching.Load() {
		return false, nil
	}
	if d := r.wait(); d > 0 {
		d = onTick(d, r.delay)
		if r.tick == nil {
			r.tick = make(chan struct{}, 1)
		}
		if theTicker.after(time.Now().Add(d), r.tick) != nil {
			// No timerfd (out of descriptors, say): a Go timer ends this
			// wait, a little less precisely.
			if r.timer == nil {
				r.timer = time.AfterFunc(d, r.ticked)
			} else {
				r.timer.Reset(d)
			}
		}
		select {
		case <-r.tick:
			r.drained = false
			return true, nil
		case <-c.quit:
		case <-c.halt:
		}
		return false, nil
	}
	if err := thePoller.arm(c.pe, waitRead); err != nil {
		return false, err
	}
	select {
	case <-c.pe.ready:
		r.drained = false
		return true, nil
	case <-c.quit:
	case <-c.halt:
	}
	return false, nil
}

// onTick returns how long to wait, d a full ReadDelay, so that the wait
// ends on the next tick: a multiple of delay since the zero time. Every
// busy channel with the same ReadDelay then reads at the same ticks,
// however many they are, and one expiry of the ticker serves them all. A
// wait that begins between two ticks (the first of a burst, or after a
// late wakeup) is shorter than delay, and ends with the others' at the
// tick: it costs no wakeup of its own. A shorter d (see pacedReader.wait)
// is returned as it is.
func onTick(d, delay time.Duration) time.Duration {
	if delay <= 0 || d < delay {
		return d
	}
	now := time.Now()
	return now.Truncate(delay).Add(delay).Sub(now)
}

// ticked ends the reader's wait when its Go timer fires.
func (r *pacedReader) ticked() {
	select {
	case r.tick <- struct{}{}:
	default:
	}
}

// stop releases the timer, if the reader had one.
func (r *pacedReader) stop() {
	if r.timer != nil {
		r.timer.Stop()
	}
}
