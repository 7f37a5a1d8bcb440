package ipc

import (
	"math/rand/v2"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/testutil"
)

func tickerLoops() int { return running("ipc.(*ticker).loop") }

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
			off = time.Duration(10*(1+i%8/2)) * time.Millisecond
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
	t.Logf("%d waits (20 at 4 shared times) ended by %d expiries, the latest %v late", n, expiries, late)
	if expiries > n/2+4 {
		t.Errorf("%d expiries of the timerfd for %d waits of which 20 end at 4 times: want at most %d", expiries, n, n/2+4)
	}
	testutil.Eventually(t, 5*time.Second, "the ticker's goroutine ends", func() bool { return tickerLoops() == 0 })
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
	for _, w := range workers {
		wg.Go(func() {
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
	// makes a reader late now and then.
	if expiries*2 > reads {
		t.Errorf("%d expiries for %d reads of %d busy channels: want one expiry to serve several channels", expiries, reads, n)
	}
	testutil.Eventually(t, 5*time.Second, "the ticker's goroutine ends", func() bool { return tickerLoops() == 0 })
}
