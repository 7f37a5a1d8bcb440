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
// at a given time.
type ticker struct {
	once    sync.Once
	initErr error
	fd      int
	conn    syscall.RawConn // the timerfd, in Go's network poller
	file    *os.File        // kept, so that the timerfd is never closed

	mu      sync.Mutex
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

func (t *ticker) init() error {
	t.once.Do(func() {
		fd, err := unix.TimerfdCreate(unix.CLOCK_MONOTONIC, unix.TFD_NONBLOCK|unix.TFD_CLOEXEC)
		if err != nil {
			t.initErr = fmt.Errorf("ipc: create timerfd: %w", err)
			return
		}
		f := os.NewFile(uintptr(fd), "ipc-ticker")
		conn, err := f.SyscallConn()
		if err != nil {
			f.Close()
			t.initErr = fmt.Errorf("ipc: timerfd: %w", err)
			return
		}
		t.fd, t.file, t.conn = fd, f, conn
	})
	return t.initErr
}

// after sends a token on c at at, or up to tickSlack before it; c should
// have room for one, as after never blocks on it.
func (t *ticker) after(at time.Time, c chan<- struct{}) error {
	if err := t.init(); err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
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
			// The runtime's poller refused the timerfd (it cannot
			// here): sleep instead, a little less precisely.
			t.mu.Lock()
			at := t.armed
			t.mu.Unlock()
			time.Sleep(max(time.Until(at), time.Millisecond))
		}
		tickExpiries.Add(1)
		now := time.Now()
		due := now.Add(tickSlack)
		t.mu.Lock()
		var next time.Time
		keep := t.waits[:0]
		for _, w := range t.waits {
			if !w.at.After(due) {
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
		t.waits = keep
		t.armed = time.Time{}
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
