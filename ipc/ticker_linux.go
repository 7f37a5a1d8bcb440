package ipc

import (
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The waits of busy readers (see Channel.waitToRead) end on one timerfd in
// Go's network poller, not on Go timers. A Go timer ends in the runtime's
// epoll_wait, whose timeout is in whole milliseconds: a wait of 3.9 ms
// was a sleep of 3 ms and then one of 1 ms, two wakeups of a thread where
// one does, and the runtime's monitor thread (sysmon), which sleeps until
// the next Go timer, woke for each as well. A timerfd expires to the
// microsecond and wakes the one thread that waits in the runtime's
// poller, which then runs the readers; the waits of all the busy channels
// end on the same expiry, since they end on shared ticks (see onTick).

// ticker ends the waits of busy readers: after sends a token on a channel
// at a given time. When it cannot (no timerfd, or one the runtime's poller
// refused), after says so and the reader waits on a Go timer instead.
type ticker struct {
	mu      sync.Mutex
	fd      int
	conn    syscall.RawConn // the timerfd, in Go's network poller; nil until the first wait
	file    *os.File        // kept, so that the timerfd is never closed
	broken  error           // the timerfd failed: after fails from then on
	waits   []tickWait
	armed   time.Time // when the timerfd expires next; zero: not set
	running bool      // the loop goroutine runs
}

type tickWait struct {
	at time.Time
	c  chan<- struct{}
}

// theTicker serves every channel of the process.
var theTicker ticker

// tickSlack: waits that end less than this after an expiry of the timerfd
// end with it, rather than a few microseconds later with a wakeup of
// their own.
const tickSlack = 50 * time.Microsecond

// tickExpiries counts the wakeups of the ticker's loop: tests use it to
// tell that the waits of busy channels end together.
var tickExpiries atomic.Uint64

// open makes the timerfd and puts it in Go's network poller; t.mu is held.
// A failure (out of descriptors, say) is returned, and the next wait tries
// again.
func (t *ticker) open() error {
	if t.broken != nil {
		return t.broken
	}
	if t.conn != nil {
		return nil
	}
	fd, err := unix.TimerfdCreate(unix.CLOCK_MONOTONIC, unix.TFD_NONBLOCK|unix.TFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("ipc: create timerfd: %w", err)
	}
	f := os.NewFile(uintptr(fd), "ipc-ticker")
	// os.NewFile leaves out of the runtime's poller a descriptor it could
	// not add (fs.epoll.max_user_watches reached): such a file has no
	// deadlines, and a wait on it would fail at once.
	if err := f.SetReadDeadline(time.Time{}); err != nil {
		f.Close()
		return fmt.Errorf("ipc: timerfd not in the runtime's poller: %w", err)
	}
	conn, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return fmt.Errorf("ipc: timerfd: %w", err)
	}
	t.fd, t.file, t.conn = fd, f, conn
	return nil
}

// after sends a token on c at at, or up to tickSlack before it; c should
// have room for one, as after never blocks on it. When it returns an
// error, no token will come.
func (t *ticker) after(at time.Time, c chan<- struct{}) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := t.open(); err != nil {
		return err
	}
	if t.armed.IsZero() || at.Before(t.armed) {
		if err := t.set(at); err != nil {
			return err
		}
	}
	t.waits = append(t.waits, tickWait{at, c})
	if !t.running {
		t.running = true
		go t.loop()
	}
	return nil
}

// stop makes the loop goroutine end, once no wait is left, if no channel
// is left either: the poller calls it when its last socket goes.
func (t *ticker) stop() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.running && len(t.waits) == 0 {
		t.set(time.Now())
	}
}

// set makes the timerfd expire at at (at once if at has passed); t.mu is
// held.
func (t *ticker) set(at time.Time) error {
	d := max(time.Until(at), time.Nanosecond) // 0 would disarm it
	spec := unix.ItimerSpec{Value: unix.NsecToTimespec(int64(d))}
	_, _, errno := unix.RawSyscall6(unix.SYS_TIMERFD_SETTIME, uintptr(t.fd), 0, uintptr(unsafe.Pointer(&spec)), 0, 0, 0)
	if errno != 0 {
		return fmt.Errorf("ipc: set timerfd: %w", errno)
	}
	t.armed = at
	return nil
}

// fire ends the waits due by due (every one if due is zero), forgets them
// and the timerfd's setting, and returns when the earliest wait left is
// due (zero if none is left); t.mu is held.
func (t *ticker) fire(due time.Time) (next time.Time) {
	keep := t.waits[:0]
	for _, w := range t.waits {
		if due.IsZero() || !w.at.After(due) {
			select {
			case w.c <- struct{}{}:
			default:
			}
			continue
		}
		keep = append(keep, w)
		if next.IsZero() || w.at.Before(next) {
			next = w.at
		}
	}
	clear(t.waits[len(keep):])
	t.waits, t.armed = keep, time.Time{}
	return next
}

// loop is the ticker's goroutine: at each expiry of the timerfd it ends
// the waits that are due and sets the timerfd for the next one. It ends
// when no wait is left and no channel either (see stop).
func (t *ticker) loop() {
	var buf [8]byte
	for {
		err := t.conn.Read(func(fd uintptr) bool {
			_, errno := readNonblock(fd, buf[:])
			return errno != unix.EAGAIN
		})
		if err != nil {
			// The runtime's poller failed the timerfd (open checked that
			// it took it, so it cannot here): end every wait now, and
			// the readers wait on Go timers from then on.
			t.mu.Lock()
			t.broken = fmt.Errorf("ipc: wait on timerfd: %w", err)
			t.fire(time.Time{}) // every wait
			t.running = false
			t.mu.Unlock()
			return
		}
		tickExpiries.Add(1)
		t.mu.Lock()
		next := t.fire(time.Now().Add(tickSlack))
		if next.IsZero() {
			// The readers that were just woken wait again, if they do,
			// with after, which sets the timerfd.
			if thePoller.empty() {
				t.running = false
				t.mu.Unlock()
				return
			}
		} else {
			t.set(next)
		}
		t.mu.Unlock()
	}
}
