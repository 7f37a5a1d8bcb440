// Package logpipe carries workers' stdout and stderr to the master's, one
// whole line at a time, labelled with the worker's slot and pid.
//
// Each worker gets two pipes (Output.Open): the child writes to their write
// ends as its fds 1 and 2, and the master reads the read ends on one
// goroutine each, with a fixed buffer. A goroutine writes only whole lines,
// under one lock per master stream, so the lines of workers writing at the
// same time never mix within a line. A line longer than MaxLine bytes is cut
// into pieces, each written as a line of its own and marked as continuing
// the one before; nothing is dropped. When the master's stream is slow the
// goroutine waits for it and stops reading, so the worker's writes block on
// the full pipe: the master's memory stays bounded whatever a worker writes.
package logpipe

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// MaxLine is the longest line written whole, without its newline. A longer
// line is cut into pieces of at most MaxLine bytes.
const MaxLine = 64 << 10

// maxDrain bounds what Close still reads from one pipe once it has been told
// to stop: a pipe holds at most 1 MiB unless root raised
// /proc/sys/fs/pipe-max-size, so this is all a dead worker can have left.
const maxDrain = 1 << 20

// Format says how a line is written.
type Format int

const (
	// Prefix writes "w1 4321 | text": the slot, the pid, then "|", or "+"
	// for a piece that continues a cut line.
	Prefix Format = iota
	// JSON writes each line as a log record of the stream's logger, with
	// the fields worker (the slot), pid, stream ("stdout" or "stderr") and
	// the line as its message; a piece that continues a cut line has
	// "continued":true.
	JSON
)

// Options configure an Output.
type Options struct {
	// Format is how lines are written; the zero value is Prefix.
	Format Format
	// Stdout and Stderr are the master's streams, for Prefix. Nil discards.
	Stdout, Stderr io.Writer
	// StdoutLog and StderrLog write the records of JSON: loggers on the
	// master's stdout and stderr in the master's log format. Records are
	// at level info and written whatever the loggers' level. Nil
	// discards.
	StdoutLog, StderrLog *zerolog.Logger
	// OnError, if set, is called once per worker and stream when writing
	// to the master's stream fails. The worker's later output to that
	// stream is read and discarded, so the worker never blocks on it.
	OnError func(error)
}

// Output is the master's side: its two streams, each with the lock that
// keeps lines whole. It is safe for concurrent use.
type Output struct {
	format  Format
	onError func(error)
	stdout  *stream
	stderr  *stream
}

// stream is one of the master's streams. mu is held for every write, so
// that lines from different workers do not mix.
type stream struct {
	name string
	mu   sync.Mutex
	w    io.Writer
	log  zerolog.Logger
}

// New returns an Output writing to the streams opts names.
func New(opts Options) *Output {
	mk := func(name string, w io.Writer, l *zerolog.Logger) *stream {
		if w == nil {
			w = io.Discard
		}
		s := &stream{name: name, w: w, log: zerolog.Nop()}
		if l != nil {
			// A worker's line is never filtered by the master's level.
			s.log = l.Level(zerolog.TraceLevel)
		}
		return s
	}
	return &Output{
		format:  opts.Format,
		onError: opts.OnError,
		stdout:  mk("stdout", opts.Stdout, opts.StdoutLog),
		stderr:  mk("stderr", opts.Stderr, opts.StderrLog),
	}
}

// Pipe is one worker's pair of pipes. Open makes it, the caller passes
// Files to the child, calls Start with its pid after the fork, and Close
// once done with it (after Done is closed, or when it gives up waiting).
type Pipe struct {
	out    *Output
	worker int
	// The child's ends, closed by Start (or by Close).
	childOut, childErr *os.File
	// The master's ends, read by the goroutines.
	readOut, readErr *os.File

	started   bool
	done      chan struct{} // closed when both readers have ended
	closeOnce sync.Once

	// Detach: the readers stop without closing the pipes and leave the
	// start of a line here, stdout's then stderr's.
	detaching atomic.Bool
	rest      [2][]byte
	cont      [2]bool
}

// Handoff is what [Pipe.Detach] leaves of a worker's pipes, for
// [Output.Resume] in this process or, across exec, in a new master.
type Handoff struct {
	// Stdout and Stderr are the master's read ends.
	Stdout, Stderr *os.File
	// Rest holds the start of a line read from each and not yet written;
	// Cont says that the next piece written continues a cut line.
	Rest [2][]byte
	Cont [2]bool
}

// Detach stops copying without closing the pipes and returns their read
// ends with the start of a line read from each: every whole line read was
// written. Close then does nothing. Detach fails before Start, and after
// Close or Detach.
func (p *Pipe) Detach() (Handoff, error) {
	err := errors.New("logpipe: detach: the pipes are not being copied")
	p.closeOnce.Do(func() {
		if !p.started {
			p.closeUnstarted()
			return
		}
		err = nil
		p.detaching.Store(true)
		p.readOut.SetReadDeadline(aLongTimeAgo)
		p.readErr.SetReadDeadline(aLongTimeAgo)
	})
	<-p.done
	if err != nil {
		return Handoff{}, err
	}
	p.readOut.SetReadDeadline(time.Time{})
	p.readErr.SetReadDeadline(time.Time{})
	return Handoff{Stdout: p.readOut, Stderr: p.readErr, Rest: p.rest, Cont: p.cont}, nil
}

// Resume goes on copying the pipes of the worker in slot worker, process
// pid, from where a [Pipe.Detach] left them, and takes ownership of the
// files. The Pipe returned is started.
func (o *Output) Resume(worker, pid int, h Handoff) *Pipe {
	p := &Pipe{out: o, worker: worker, done: make(chan struct{}), readOut: h.Stdout, readErr: h.Stderr, started: true}
	p.rest, p.cont = h.Rest, h.Cont
	p.copying(pid)
	return p
}

// Open makes the pipes of the worker in slot worker.
func (o *Output) Open(worker int) (*Pipe, error) {
	p := &Pipe{out: o, worker: worker, done: make(chan struct{})}
	var err error
	if p.readOut, p.childOut, err = pipe(worker, "stdout"); err != nil {
		return nil, err
	}
	if p.readErr, p.childErr, err = pipe(worker, "stderr"); err != nil {
		p.readOut.Close()
		p.childOut.Close()
		return nil, err
	}
	return p, nil
}

// pipe makes one pipe: a non-blocking read end for the master's poller and
// a blocking write end for the child, which may not expect EAGAIN.
func pipe(worker int, name string) (r, w *os.File, err error) {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC); err != nil {
		return nil, nil, fmt.Errorf("logpipe: create the pipe for worker %d's %s: %w", worker, name, err)
	}
	if err := unix.SetNonblock(fds[0], true); err != nil {
		unix.Close(fds[0])
		unix.Close(fds[1])
		return nil, nil, fmt.Errorf("logpipe: make the pipe for worker %d's %s non-blocking: %w", worker, name, err)
	}
	label := "worker " + strconv.Itoa(worker) + " " + name
	return os.NewFile(uintptr(fds[0]), label+" (read)"), os.NewFile(uintptr(fds[1]), label+" (write)"), nil
}

// Files returns the write ends, for the child's fds 1 and 2.
func (p *Pipe) Files() (stdout, stderr *os.File) { return p.childOut, p.childErr }

// Start closes the master's copies of the write ends, so that the pipes
// reach EOF when the worker (and every process it passed them to) has
// closed them, and starts copying lines labelled with pid. Call it once,
// after the fork.
func (p *Pipe) Start(pid int) {
	if p.started {
		return
	}
	p.started = true
	p.childOut.Close()
	p.childErr.Close()
	p.copying(pid)
}

// copying starts the two copying goroutines.
func (p *Pipe) copying(pid int) {
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.copy(p.readOut, p.out.stdout, pid, 0) }()
	go func() { defer wg.Done(); p.copy(p.readErr, p.out.stderr, pid, 1) }()
	go func() { wg.Wait(); close(p.done) }()
}

// Done is closed when both pipes have reached EOF and every line has been
// written, or, after Close, when the copying has ended.
func (p *Pipe) Done() <-chan struct{} { return p.done }

// Close stops waiting for EOF: what the pipes hold now is still written
// (up to 1 MiB each), with a last line that has no newline, then the
// copying ends. Close waits for that. Before Start, it closes the pipes. It
// may be called more than once.
func (p *Pipe) Close() {
	p.closeOnce.Do(func() {
		if !p.started {
			p.closeUnstarted()
			return
		}
		// Wakes a reader blocked on an empty pipe; it then drains what
		// the pipe holds without waiting.
		p.readOut.SetReadDeadline(aLongTimeAgo)
		p.readErr.SetReadDeadline(aLongTimeAgo)
	})
	<-p.done
}

// closeUnstarted closes the pipes of a Pipe never started.
func (p *Pipe) closeUnstarted() {
	p.childOut.Close()
	p.childErr.Close()
	p.readOut.Close()
	p.readErr.Close()
	close(p.done)
}

// aLongTimeAgo is a deadline that has passed.
var aLongTimeAgo = time.Unix(1, 0)

// errDrained ends a reader that was told to stop, once its pipe is empty
// (or maxDrain bytes later).
var errDrained = errors.New("logpipe: drained")

// copy reads r until EOF, or until Close and then what r holds, and
// writes its lines to s. It closes r.
func (p *Pipe) copy(r *os.File, s *stream, pid, i int) {
	c := &copier{
		out:    p.out,
		s:      s,
		worker: p.worker,
		pid:    pid,
		buf:    make([]byte, MaxLine+1),
		prefix: []byte("w" + strconv.Itoa(p.worker) + " " + strconv.Itoa(pid) + " "),
		cont:   p.cont[i],
	}
	c.fill = copy(c.buf, p.rest[i])
	p.rest[i] = nil
	draining, drained := false, 0
	for {
		var n int
		var err error
		if !draining {
			n, err = r.Read(c.buf[c.fill:])
			if errors.Is(err, os.ErrDeadlineExceeded) && p.detaching.Load() {
				// Detach: keep the start of a line, and the pipe.
				c.flush()
				p.rest[i], p.cont[i] = append([]byte(nil), c.buf[:c.fill]...), c.cont
				return
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				// Close: take what the pipe holds, without waiting.
				draining, err = true, r.SetReadDeadline(time.Time{})
			}
		} else {
			n, err = readNow(r, c.buf[c.fill:])
			if drained += n; drained >= maxDrain {
				err = errDrained
			}
		}
		if n > 0 {
			c.fill += n
			c.lines()
		}
		if err != nil {
			break
		}
	}
	c.finish()
	r.Close()
}

// readNow reads what r holds without waiting: errDrained when it is
// empty, io.EOF at its end.
func readNow(r *os.File, b []byte) (int, error) {
	rc, err := r.SyscallConn()
	if err != nil {
		return 0, err
	}
	var n int
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		for {
			n, rerr = unix.Read(int(fd), b)
			if rerr != unix.EINTR {
				return true // never wait for the poller
			}
		}
	})
	switch {
	case err != nil:
		return 0, err
	case rerr == unix.EAGAIN:
		return 0, errDrained
	case rerr != nil:
		return 0, rerr
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// copier splits one pipe's bytes into lines. Only its goroutine uses it.
type copier struct {
	out         *Output
	s           *stream
	worker, pid int
	buf         []byte // MaxLine+1: a line of MaxLine bytes and its newline fit
	fill        int
	cont        bool   // the next piece continues a cut line
	prefix      []byte // "w1 4321 "
	pending     []byte // Prefix: whole lines not yet written
	failed      bool   // a write to s failed: discard the rest
}

// lines writes every whole line in buf, and the first MaxLine bytes of a
// line that fills it, and keeps the rest for the next read.
func (c *copier) lines() {
	if c.out.format == JSON {
		c.s.mu.Lock()
		defer c.s.mu.Unlock()
	}
	start := 0
	for {
		i := bytes.IndexByte(c.buf[start:c.fill], '\n')
		if i < 0 {
			break
		}
		c.emit(c.buf[start:start+i], true)
		start += i + 1
	}
	if start == 0 && c.fill == len(c.buf) {
		start = cutAt(c.buf[:MaxLine])
		c.emit(c.buf[:start], false)
	}
	c.fill = copy(c.buf, c.buf[start:c.fill])
	c.flush()
}

// finish writes a last line that had no newline, and what is pending.
func (c *copier) finish() {
	if c.fill > 0 {
		if c.out.format == JSON {
			c.s.mu.Lock()
			defer c.s.mu.Unlock()
		}
		c.emit(c.buf[:c.fill], true)
		c.fill = 0
	}
	c.flush()
}

// emit writes one line, or one piece of a cut line (ended false).
func (c *copier) emit(line []byte, ended bool) {
	cont := c.cont
	c.cont = !ended
	if c.out.format == JSON {
		ev := c.s.log.Info().Int("worker", c.worker).Int("pid", c.pid).Str("stream", c.s.name)
		if cont {
			ev = ev.Bool("continued", true)
		}
		ev.Msg(string(line))
		return
	}
	sep := byte('|')
	if cont {
		sep = '+'
	}
	c.pending = append(c.pending, c.prefix...)
	c.pending = append(c.pending, sep, ' ')
	c.pending = append(c.pending, line...)
	c.pending = append(c.pending, '\n')
	if len(c.pending) >= MaxLine {
		c.flush()
	}
}

// flush writes the pending lines, whole, under the stream's lock.
func (c *copier) flush() {
	if len(c.pending) == 0 {
		return
	}
	if !c.failed {
		c.s.mu.Lock()
		_, err := c.s.w.Write(c.pending)
		c.s.mu.Unlock()
		if err != nil {
			c.failed = true
			if c.out.onError != nil {
				c.out.onError(fmt.Errorf("logpipe: write worker %d's %s (pid %d) to the master's %s: %w; its further output there is discarded",
					c.worker, c.s.name, c.pid, c.s.name, err))
			}
		}
	}
	c.pending = c.pending[:0]
}

// cutAt returns where to cut b, a full piece of a long line: its end, or
// before a character that b holds only the start of, so that a cut never
// splits a UTF-8 character.
func cutAt(b []byte) int {
	for i := len(b) - 1; i >= 0 && i >= len(b)-utf8.UTFMax+1; i-- {
		if utf8.RuneStart(b[i]) {
			if !utf8.FullRune(b[i:]) && i > 0 {
				return i
			}
			break
		}
	}
	return len(b)
}
