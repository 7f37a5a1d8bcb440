package ipc

import (
	"bufio"
	"bytes"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/internal/testutil"
)

// While the reader of a busy channel waits ReadDelay, the worker's writes
// wake nothing: the poller's epoll_wait does not return, and the frames
// come in one read after the wait.
func TestChannelWaitWakesNothing(t *testing.T) {
	testutil.LeakCheck(t)
	longDelay(t)
	master, worker := mustPair(t)
	defer worker.Close()
	var got atomic.Int64
	c := NewChannel(master, ChannelOptions{
		ReadDelay: testDelay,
		OnMessage: func(Message) { got.Add(1) },
	})
	defer c.Close()
	frame := frameNotifyRequest + "\n"
	// Two frames in one write: the channel is busy, the reader waits, for
	// most of testDelay.
	justAfterTick(testDelay)
	worker.Write([]byte(frame + frame))
	deadline := time.Now().Add(5 * time.Second)
	for got.Load() < 2 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if got.Load() != 2 {
		t.Fatalf("%d frames of the first write, want 2", got.Load())
	}
	wakes, reads := pollWakeups.Load(), c.Stats().Reads
	const more = 20
	for range more {
		if _, err := worker.Write([]byte(frame)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	for got.Load() < 2+more && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	w, r := pollWakeups.Load()-wakes, c.Stats().Reads-reads
	t.Logf("%d frames in %d writes: %d poller wakeups, %d reads", more, more, w, r)
	if got.Load() != 2+more {
		t.Fatalf("%d frames, want %d", got.Load(), 2+more)
	}
	if w != 0 {
		t.Errorf("%d poller wakeups for %d frames written while the reader waited, want 0", w, more)
	}
	if r > 2 {
		t.Errorf("%d reads for %d frames written while the reader waited, want 1 or 2", r, more)
	}
}

// threads returns the number of threads of this process.
func threads(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// running returns how many goroutines run fn ("ipc.(*poller).loop").
func running(fn string) int {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	return strings.Count(string(buf), fn+"(")
}

func pollerLoops() int { return running("ipc.(*poller).loop") }

// 64 channels whose readers all wait for their workers take one poller
// goroutine and no thread each; the poller's goroutine ends with the last
// channel.
func TestChannelsShareOnePoller(t *testing.T) {
	testutil.LeakCheck(t)
	const n = 64
	before := threads(t)
	var got atomic.Int64
	chans := make([]*Channel, n)
	workers := make([]*os.File, n)
	for i := range n {
		master, worker := mustPair(t)
		workers[i] = worker
		chans[i] = NewChannel(master, ChannelOptions{OnMessage: func(Message) { got.Add(1) }})
	}
	defer func() {
		for i := range n {
			chans[i].Close()
			workers[i].Close()
		}
	}()
	for round := range 3 {
		for _, w := range workers {
			w.Write([]byte(frameHeartbeat + "\n"))
		}
		deadline := time.Now().Add(5 * time.Second)
		for got.Load() < int64(n*(round+1)) && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
	}
	if got.Load() != 3*n {
		t.Fatalf("%d frames, want %d", got.Load(), 3*n)
	}
	time.Sleep(20 * time.Millisecond) // every reader back to its wait
	after := threads(t)
	loops := pollerLoops()
	t.Logf("%d channels: %d threads before, %d after; %d poller goroutines", n, before, after, loops)
	if loops != 1 {
		t.Errorf("%d poller goroutines for %d channels, want 1", loops, n)
	}
	if after > before+4 {
		t.Errorf("%d threads with %d channels waiting, %d before: want a few more at most", after, n, before)
	}
	for i := range n {
		chans[i].Close()
	}
	deadline := time.Now().Add(5 * time.Second)
	for pollerLoops() != 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if loops := pollerLoops(); loops != 0 {
		t.Errorf("%d poller goroutines after every channel closed, want 0", loops)
	}
}

// pollablePair is Pair with the worker's end in Go's network poller, so
// that its read deadlines work.
func pollablePair(t *testing.T) (master, worker *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	unix.SetNonblock(fds[1], true)
	return os.NewFile(uintptr(fds[0]), "master"), os.NewFile(uintptr(fds[1]), "worker")
}

// fillSocket sends frames on c, whose worker reads nothing, until its
// writer waits for the socket, and returns what was sent.
func fillSocket(t *testing.T, c *Channel, worker *os.File, payload []byte) (sent [][]byte) {
	t.Helper()
	for i := 0; i < 200; i++ {
		f := mustEncode(t, map[string]any{"n": i, "pad": string(payload)})
		if err := c.Send(f); err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
		sent = append(sent, f)
	}
	// The writer fills the socket and waits for room.
	rc, err := worker.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	pending := func() (n int) {
		rc.Control(func(fd uintptr) { n, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ) })
		return n
	}
	deadline := time.Now().Add(5 * time.Second)
	for pending() == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond)
	if c.Stats().QueuedBytes == 0 {
		t.Fatal("the writer does not wait: the socket took everything")
	}
	return sent
}

// A writer waiting for a full socket goes on once the worker reads, and
// Close or Detach end its wait at once.
func TestChannelWriterWaits(t *testing.T) {
	payload := bytes.Repeat([]byte("y"), 1000)
	// waiting returns a channel whose writer waits for its full socket,
	// the worker's end (closed at the end of t), and the frames sent.
	waiting := func(t *testing.T) (*Channel, *os.File, [][]byte) {
		testutil.LeakCheck(t)
		master, worker := pollablePair(t)
		t.Cleanup(func() { worker.Close() })
		unix.SetsockoptInt(int(master.Fd()), unix.SOL_SOCKET, unix.SO_SNDBUF, 4096)
		c := NewChannel(master, ChannelOptions{})
		return c, worker, fillSocket(t, c, worker, payload)
	}
	t.Run("worker reads", func(t *testing.T) {
		c, worker, sent := waiting(t)
		defer c.Close()
		r := bufio.NewReader(worker)
		worker.SetReadDeadline(time.Now().Add(10 * time.Second))
		for i, want := range sent {
			line, err := r.ReadBytes('\n')
			if err != nil {
				t.Fatalf("frame %d: %v", i, err)
			}
			if !bytes.Equal(line, want) {
				t.Fatalf("frame %d: got %.40q..., want %.40q...", i, line, want)
			}
		}
	})
	t.Run("close", func(t *testing.T) {
		c, _, sent := waiting(t)
		closed := make(chan struct{})
		go func() {
			c.Close()
			close(closed)
		}()
		waitFor(t, closed, 2*time.Second, "Close with the writer waiting")
		s := c.Stats()
		if s.MessagesOut+s.Dropped != uint64(len(sent)) || s.Dropped == 0 || s.QueuedBytes != 0 {
			t.Errorf("%d written + %d dropped, %d bytes held, want %d in all, some dropped, none held", s.MessagesOut, s.Dropped, s.QueuedBytes, len(sent))
		}
	})
	t.Run("detach", func(t *testing.T) {
		c, worker, sent := waiting(t)
		var h Handoff
		var err error
		detached := make(chan struct{})
		go func() {
			h, err = c.Detach()
			close(detached)
		}()
		waitFor(t, detached, 2*time.Second, "Detach with the writer waiting")
		if err != nil {
			t.Fatal(err)
		}
		defer h.File.Close()
		if s := c.Stats(); s.Dropped != 0 {
			t.Errorf("Detach dropped %d frames", s.Dropped)
		}
		// What the socket took, then Unsent, is every frame sent.
		worker.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		var all bytes.Buffer
		buf := make([]byte, 64<<10)
		for {
			n, err := worker.Read(buf)
			all.Write(buf[:n])
			if err != nil {
				break
			}
		}
		all.Write(h.Unsent)
		if want := bytes.Join(sent, nil); !bytes.Equal(all.Bytes(), want) {
			t.Errorf("the socket's %d bytes and Unsent's %d are not the %d bytes sent", all.Len()-len(h.Unsent), len(h.Unsent), len(want))
		}
		if fl, err := unix.FcntlInt(h.File.Fd(), unix.F_GETFL, 0); err != nil || fl&unix.O_NONBLOCK != 0 {
			t.Errorf("Handoff.File flags %#x (%v), want blocking", fl, err)
		}
	})
}

// A worker that writes much and closes its end at once: every frame is
// handed to OnMessage before Done, in order, whether the reader was idle or
// waiting ReadDelay when the end came.
func TestChannelEndAfterData(t *testing.T) {
	for _, delay := range []time.Duration{-1, 0, testDelay} {
		t.Run(delay.String(), func(t *testing.T) {
			testutil.LeakCheck(t)
			longDelay(t)
			master, worker := mustPair(t)
			var got []int
			bad := 0
			c := NewChannel(master, ChannelOptions{
				ReadDelay: delay,
				OnMessage: func(m Message) {
					n, err := strconv.Atoi(string(m.Msg))
					if err != nil || n != len(got) {
						bad++
					}
					got = append(got, n)
				},
				OnError: func(err error) { t.Error(err) },
			})
			defer c.Close()
			const total = 5000
			var buf bytes.Buffer
			for i := range total {
				buf.Write(mustEncode(t, map[string]any{"cmd": "shoal:send", "to": "1", "msg": i}))
			}
			b := buf.Bytes()
			// Some writes, then the end.
			for len(b) > 0 {
				k := min(len(b), 10000)
				if _, err := worker.Write(b[:k]); err != nil {
					t.Fatal(err)
				}
				b = b[k:]
			}
			worker.Close()
			waitFor(t, c.Done(), 10*time.Second, "Done after the worker closed")
			if len(got) != total || bad != 0 {
				t.Fatalf("%d frames (%d out of order) before Done, want %d", len(got), bad, total)
			}
		})
	}
}

// ResumeChannel takes a socket in non-blocking mode as well as one in
// blocking mode, as one inherited across exec may be.
func TestResumeNonblockingFile(t *testing.T) {
	testutil.LeakCheck(t)
	master, worker := pollablePair(t)
	defer worker.Close()
	unix.SetNonblock(int(master.Fd()), true)
	rec := newRecorder()
	c := ResumeChannel(Handoff{File: master, Unread: []byte(`{"cmd":"shoal:rea`)}, rec.options())
	defer c.Close()
	worker.Write([]byte("dy\"}\n"))
	if m := rec.next(t); m.Cmd != CmdReady {
		t.Fatalf("got %+v, want the ready begun in Unread", m)
	}
	if err := c.Send([]byte("{}\n")); err != nil {
		t.Fatal(err)
	}
	worker.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(worker).ReadBytes('\n')
	if err != nil || string(line) != "{}\n" {
		t.Fatalf("worker read %q, %v", line, err)
	}
}
