package ipc

import (
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/testutil"
	"golang.org/x/sys/unix"
)

// tickerEnds waits for the ticker's goroutine to end.
func tickerEnds(t *testing.T) {
	t.Helper()
	testutil.Eventually(t, 5*time.Second, "the ticker's goroutine ends", func() bool { return running("ipc.(*ticker).loop") == 0 })
}

// Every wait ends, never before its time (less tickSlack), and waits that
// end at one time end on one expiry of the timerfd. With no channel open,
// the ticker's goroutine ends with the last wait.
func TestTickerEndsWaits(t *testing.T) {
	testutil.LeakCheck(t)
	const n = 40
	base := time.Now()
	type wait struct {
		at  time.Time
		c   chan struct{}
		got time.Time
	}
	waits := make([]*wait, n)
	for i := range waits {
		// Half of them at one of 4 shared times, half anywhere in 40 ms.
		off := time.Duration(rand.IntN(40_000)) * time.Microsecond
		if i%2 == 0 {
			// Within tickSlack of one another.
			off = time.Duration(10*(1+i%8/2))*time.Millisecond + time.Duration(i)*time.Microsecond
		}
		waits[i] = &wait{at: base.Add(off), c: make(chan struct{}, 1)}
	}
	before := tickExpiries.Load()
	var wg sync.WaitGroup
	for _, w := range waits {
		if err := theTicker.after(w.at, w.c); err != nil {
			t.Fatal(err)
		}
		wg.Go(func() {
			select {
			case <-w.c:
				w.got = time.Now()
			case <-time.After(10 * time.Second):
			}
		})
	}
	wg.Wait()
	expiries := tickExpiries.Load() - before
	var late time.Duration
	for i, w := range waits {
		if w.got.IsZero() {
			t.Fatalf("wait %d (%v after the start) never ended", i, w.at.Sub(base))
		}
		if early := w.at.Sub(w.got); early > tickSlack {
			t.Errorf("wait %d ended %v before its time", i, early)
		}
		late = max(late, w.got.Sub(w.at))
	}
	t.Logf("%d waits (20 at 4 times, each within tickSlack) ended by %d expiries, the latest %v late", n, expiries, late)
	// 24 when each of the 20 other waits needs one; a few more may come
	// on a busy machine. One each, 40, is what the test is about.
	if expiries > n/2+8 {
		t.Errorf("%d expiries of the timerfd for %d waits of which 20 end at 4 times: want about %d, at most %d", expiries, n, n/2+4, n/2+8)
	}
	tickerEnds(t)
}

// The readers of busy channels wait on shared ticks: one expiry of the
// timerfd ends the waits of all of them, and the process wakes once for
// them all, not once per channel.
func TestBusyChannelsShareTicks(t *testing.T) {
	testutil.LeakCheck(t)
	const n = 4
	var chans []*Channel
	var workers []*os.File
	for range n {
		master, worker := mustPair(t)
		workers = append(workers, worker)
		chans = append(chans, NewChannel(master, ChannelOptions{}))
	}
	before := tickExpiries.Load()
	var reads0 uint64
	for _, c := range chans {
		reads0 += c.Stats().Reads
	}
	// Each worker sends two frames about every millisecond for 300 ms:
	// every channel is busy, and its reader waits the default ReadDelay
	// between reads.
	frame := []byte(frameNotifyRequest + "\n" + frameNotifyRequest + "\n")
	var wg sync.WaitGroup
	for i, w := range workers {
		wg.Go(func() {
			// Each starts at its own point between two ticks: the
			// readers' waits must still come to end together.
			time.Sleep(time.Duration(i) * DefaultReadDelay * 3 / 10)
			end := time.Now().Add(300 * time.Millisecond)
			for time.Now().Before(end) {
				if _, err := w.Write(frame); err != nil {
					t.Error(err)
					return
				}
				time.Sleep(200 * time.Microsecond)
			}
		})
	}
	wg.Wait()
	var reads uint64
	for _, c := range chans {
		reads += c.Stats().Reads
	}
	reads -= reads0
	expiries := tickExpiries.Load() - before
	for _, c := range chans {
		c.Close()
	}
	for _, w := range workers {
		w.Close()
	}
	t.Logf("%d busy channels: %d reads, %d expiries of the timerfd", n, reads, expiries)
	if reads < 4*n {
		t.Fatalf("%d reads: the channels were not busy", reads)
	}
	// One expiry for every n reads when all is well; a loaded machine
	// makes a reader late now and then. Two groups of channels on ticks
	// of their own would make 2 reads an expiry.
	if expiries*3 > reads {
		t.Errorf("%d expiries for %d reads of %d busy channels: want one expiry to serve several channels", expiries, reads, n)
	}
	tickerEnds(t)
}

// closeTicker closes the ticker's timerfd, so that the next wait makes
// one again; the ticker's goroutine must have ended.
func closeTicker(t *testing.T) {
	t.Helper()
	tickerEnds(t)
	theTicker.mu.Lock()
	defer theTicker.mu.Unlock()
	if theTicker.file != nil {
		theTicker.file.Close()
	}
	theTicker.file, theTicker.conn, theTicker.broken = nil, nil, nil
}

// A master out of descriptors when a channel gets busy has no timerfd for
// its waits: the reader waits on a Go timer instead, and loses nothing;
// once descriptors are free again, the next busy wait makes the timerfd.
func TestBusyChannelWithoutTimerfd(t *testing.T) {
	testutil.LeakCheck(t)
	closeTicker(t)
	master, worker := mustPair(t)
	defer worker.Close()
	var got atomic.Int64
	c := NewChannel(master, ChannelOptions{
		OnMessage: func(Message) { got.Add(1) },
		OnError:   func(err error) { t.Errorf("channel error: %v", err) },
	})
	defer c.Close()

	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	low := lim
	low.Cur = 256
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	var fill []*os.File
	release := func() {
		for _, f := range fill {
			f.Close()
		}
		fill = nil
		unix.Setrlimit(unix.RLIMIT_NOFILE, &lim)
	}
	defer release()
	for {
		f, err := os.Open(os.DevNull)
		if err != nil {
			break
		}
		fill = append(fill, f)
	}
	// Two frames a write, a write about every millisecond: busy.
	frame := []byte(frameNotifyRequest + "\n" + frameNotifyRequest + "\n")
	burst := func(writes int) {
		for range writes {
			if _, err := worker.Write(frame); err != nil {
				t.Fatal(err)
			}
			time.Sleep(200 * time.Microsecond)
		}
	}
	want := int64(0)
	reads := c.Stats().Reads
	burst(100)
	want += 200
	testutil.Eventually(t, 5*time.Second, "every frame of the first burst delivered", func() bool { return got.Load() == want })
	theTicker.mu.Lock()
	opened := theTicker.conn != nil
	theTicker.mu.Unlock()
	r := c.Stats().Reads - reads
	t.Logf("without descriptors: %d frames in %d reads, timerfd opened: %v", want, r, opened)
	if opened {
		t.Fatal("the timerfd was made with no descriptor free: the test did not test the fallback")
	}
	if r*4 > uint64(want) {
		t.Errorf("%d reads for %d frames: the reader did not wait between reads", r, want)
	}
	select {
	case <-c.Done():
		t.Fatal("the reader ended")
	default:
	}

	release()
	expiries := tickExpiries.Load()
	burst(100)
	want += 200
	testutil.Eventually(t, 5*time.Second, "every frame of the second burst delivered", func() bool { return got.Load() == want })
	if tickExpiries.Load() == expiries {
		t.Error("with descriptors free again, the busy reader's waits did not end on the timerfd")
	}
}
