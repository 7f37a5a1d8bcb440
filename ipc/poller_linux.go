package ipc

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The master's channel sockets are not in Go's network poller, which
// registers a socket edge-triggered for good, so that every write of a
// worker wakes a runtime thread whether or not a goroutine waits for it.
// They are in the poller below instead: one epoll instance and one
// goroutine for all the channels of the process, and each socket armed
// one-shot, only while its reader (or its writer) waits for it. A reader
// that has just read, or that waits ReadDelay on purpose, leaves its socket
// unarmed, and the worker's writes meanwhile wake nothing.
//
// The poller only tells: it sends on the waiting goroutine's Go channel
// and reads nothing itself, so each channel's reader goes on handling its
// own worker's frames concurrently with the others.

// Events a pollEntry waits for; any other bit of the kernel's is mapped to
// them (see fire).
const (
	waitRead  = unix.EPOLLIN
	waitWrite = unix.EPOLLOUT
)

// pollEntry is one socket in the poller.
type pollEntry struct {
	fd       int
	id       uint64        // the key in poller.entries and the epoll event's data
	ready    chan struct{} // a token when the socket is readable, or at its end
	writable chan struct{} // a token when the socket takes writes again, or is broken

	mu   sync.Mutex
	want uint32 // waitRead|waitWrite: what is armed
	dead bool   // removed: never arm again (the fd may be closed and reused)
}

// poller is the process's one epoll instance for channel sockets.
type poller struct {
	once    sync.Once
	initErr error
	epfd    int // epoll instance; lives as long as the process
	evfd    int // eventfd in epfd, to wake the loop when it has to end

	mu      sync.Mutex
	entries map[uint64]*pollEntry
	nextID  uint64
	running bool // the loop goroutine runs; it ends when entries is empty
}

// thePoller is the poller of all the channels of the process.
var thePoller poller

// pollWakeups counts the returns of the poller's epoll_wait: tests use it
// to tell that a worker's writes wake nothing while its reader does not
// wait.
var pollWakeups atomic.Uint64

// evfdID is the epoll data of the poller's eventfd: entries start at 1.
const evfdID = 0

func (p *poller) init() error {
	p.once.Do(func() {
		epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if err != nil {
			p.initErr = fmt.Errorf("ipc: create epoll instance: %w", err)
			return
		}
		evfd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			unix.Close(epfd)
			p.initErr = fmt.Errorf("ipc: create eventfd: %w", err)
			return
		}
		ev := unix.EpollEvent{Events: unix.EPOLLIN}
		setID(&ev, evfdID)
		if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, evfd, &ev); err != nil {
			unix.Close(epfd)
			unix.Close(evfd)
			p.initErr = fmt.Errorf("ipc: add eventfd to epoll: %w", err)
			return
		}
		p.epfd, p.evfd = epfd, evfd
		p.entries = make(map[uint64]*pollEntry)
	})
	return p.initErr
}

// add puts fd in the poller, unarmed, and starts the poller's goroutine if
// it was not running.
func (p *poller) add(fd int) (*pollEntry, error) {
	if err := p.init(); err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.nextID++
	e := &pollEntry{fd: fd, id: p.nextID, ready: make(chan struct{}, 1), writable: make(chan struct{}, 1)}
	// EPOLLONESHOT with no event: unarmed until arm; the end of the
	// socket (EPOLLHUP), which epoll reports whatever is asked, is then
	// ignored once (see fire) and seen by the next arm.
	ev := unix.EpollEvent{Events: unix.EPOLLONESHOT}
	setID(&ev, e.id)
	if err := unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return nil, fmt.Errorf("ipc: add socket to epoll: %w", err)
	}
	p.entries[e.id] = e
	if !p.running {
		p.running = true
		go p.loop()
	}
	return e, nil
}

// remove takes e out of the poller. Once it returns, nothing arms e or
// sends on its channels, and the caller may close the fd. The poller's
// goroutine ends when no entry is left.
func (p *poller) remove(e *pollEntry) {
	e.mu.Lock()
	e.dead = true
	unix.EpollCtl(p.epfd, unix.EPOLL_CTL_DEL, e.fd, nil)
	e.mu.Unlock()
	p.mu.Lock()
	delete(p.entries, e.id)
	last := len(p.entries) == 0
	p.mu.Unlock()
	if last {
		p.wake()
		theTicker.stop()
	}
}

// empty reports whether no socket is in the poller.
func (p *poller) empty() bool {
	if p.init() != nil {
		return true
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.entries) == 0
}

// wake makes the loop's epoll_wait return.
func (p *poller) wake() {
	one := [8]byte{1}
	unix.Write(p.evfd, one[:])
}

// arm asks for a token on e.ready (waitRead) or e.writable (waitWrite)
// when the socket is ready for it; the token comes at once if it is ready
// now.
func (p *poller) arm(e *pollEntry, what uint32) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.dead {
		return nil
	}
	e.want |= what
	return p.modify(e)
}

// modify sets e's epoll events to what e.want asks; e.mu is held.
func (p *poller) modify(e *pollEntry) error {
	ev := unix.EpollEvent{Events: e.want | unix.EPOLLONESHOT}
	if e.want&waitRead != 0 {
		ev.Events |= unix.EPOLLRDHUP
	}
	setID(&ev, e.id)
	_, _, errno := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(p.epfd), unix.EPOLL_CTL_MOD, uintptr(e.fd), uintptr(unsafe.Pointer(&ev)), 0, 0)
	if errno != 0 {
		return fmt.Errorf("ipc: arm socket in epoll: %w", errno)
	}
	return nil
}

// fire hands the events of one epoll_wait return to e's goroutines: a
// token for each that waits and is served, and re-arms what still waits
// (a one-shot event disarms the whole socket).
func (p *poller) fire(e *pollEntry, events uint32) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.dead {
		return
	}
	end := events&(unix.EPOLLHUP|unix.EPOLLERR) != 0
	var got uint32
	if e.want&waitRead != 0 && (end || events&(unix.EPOLLIN|unix.EPOLLRDHUP) != 0) {
		got |= waitRead
		select {
		case e.ready <- struct{}{}:
		default:
		}
	}
	if e.want&waitWrite != 0 && (end || events&unix.EPOLLOUT != 0) {
		got |= waitWrite
		select {
		case e.writable <- struct{}{}:
		default:
		}
	}
	e.want &^= got
	if e.want != 0 {
		p.modify(e)
	}
}

// loop is the poller's goroutine: it waits in epoll_wait for all the
// sockets, and ends when none is left.
func (p *poller) loop() {
	events := make([]unix.EpollEvent, 128)
	batch := make([]*pollEntry, 0, len(events))
	for {
		n, err := unix.EpollWait(p.epfd, events, -1)
		if err != nil && err != unix.EINTR {
			// Cannot happen with a valid epfd and buffer; do not spin.
			panic(fmt.Sprintf("ipc: epoll_wait: %v", err))
		}
		pollWakeups.Add(1)
		batch = batch[:0]
		p.mu.Lock()
		for i := range n {
			id := getID(&events[i])
			if id == evfdID {
				var buf [8]byte
				unix.Read(p.evfd, buf[:])
				batch = append(batch, nil)
				continue
			}
			batch = append(batch, p.entries[id]) // nil if removed meanwhile
		}
		if len(p.entries) == 0 {
			p.running = false
			p.mu.Unlock()
			return
		}
		p.mu.Unlock()
		for i, e := range batch {
			if e != nil {
				p.fire(e, events[i].Events)
			}
		}
		// Let the goroutines just woken run before epoll_wait: a
		// blocking system call keeps this thread's P, and with one P (the
		// shoal master's) they would wait for the runtime's monitor to
		// take it back, up to milliseconds.
		runtime.Gosched()
	}
}

// setID stores id in ev's data (the Fd and Pad fields, 64 bits).
func setID(ev *unix.EpollEvent, id uint64) {
	ev.Fd, ev.Pad = int32(uint32(id)), int32(uint32(id>>32))
}

func getID(ev *unix.EpollEvent) uint64 {
	return uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
}
