package ipc

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/testutil"
)

// bigFrame returns a new frame of exactly size bytes, its '\n' included: a
// JSON string that starts with tag, which must need no escaping.
func bigFrame(t testing.TB, tag string, size int) []byte {
	t.Helper()
	if size < len(tag)+3 {
		t.Fatalf("no frame of %d bytes holds %q", size, tag)
	}
	f := make([]byte, 0, size)
	f = append(append(f, '"'), tag...)
	f = append(f, bytes.Repeat([]byte{'a'}, size-3-len(tag))...)
	return append(f, '"', '\n')
}

func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// Three workers that never read fd 3, sent 1 MiB messages as fast as the
// master can: the flood that once took a master to 4.78 GB in 33 s. Each
// channel holds at most QueueBytes, all together at most the Budget, every
// refusal says why, and closing a channel gives its bytes back.
func TestChannelDeafPeersBytes(t *testing.T) {
	testutil.LeakCheck(t)
	const (
		frameSize  = 1 << 20
		queueBytes = 4 << 20
		sends      = 100 // per channel: 300 MiB offered
	)
	budget := NewBudget(10 << 20)
	var chans []*Channel
	for range 3 {
		master, worker := mustPair(t)
		defer worker.Close() // open, never read
		ch := NewChannel(master, ChannelOptions{QueueBytes: queueBytes, Budget: budget})
		defer ch.Close()
		chans = append(chans, ch)
	}
	before := heapInUse()
	reasons := make([]map[string]int, len(chans))
	var mostQueued [3]uint64
	mostUsed := 0
	for i := range sends {
		for j, ch := range chans {
			// A new frame each time, as the master relays each
			// shoal:send in memory of its own.
			err := ch.Send(bigFrame(t, fmt.Sprint(i), frameSize))
			if reasons[j] == nil {
				reasons[j] = map[string]int{}
			}
			if err == nil {
				reasons[j]["sent"]++
			} else {
				var de *DropError
				if !errors.As(err, &de) {
					t.Fatalf("Send: %v, not a DropError", err)
				}
				reasons[j][de.Reason]++
			}
			q := ch.Stats().QueuedBytes
			mostQueued[j] = max(mostQueued[j], q)
			if q > queueBytes {
				t.Fatalf("channel %d holds %d bytes, over its %d", j, q, queueBytes)
			}
			if u := budget.Used(); u > budget.Limit() {
				t.Fatalf("budget used %d bytes, over its %d", u, budget.Limit())
			} else {
				mostUsed = max(mostUsed, u)
			}
		}
	}
	held := heapInUse() - min(before, heapInUse())
	t.Logf("offered %d MiB to 3 deaf workers; per channel sent/dropped %v; most queued %v bytes; budget at most %d of %d; heap grew %.1f MiB",
		3*sends*frameSize>>20, reasons, mostQueued, mostUsed, budget.Limit(), float64(held)/(1<<20))

	// Three rounds fit everywhere (9 MiB). In the fourth, the first
	// channel takes the last MiB of the budget, and the others are refused
	// by it; from then on the first channel's own queue is full.
	if reasons[0]["sent"] != 4 || reasons[0][DropQueueBytes] != sends-4 {
		t.Errorf("channel 0: %v, want 4 sent, the rest %s", reasons[0], DropQueueBytes)
	}
	for j := 1; j < 3; j++ {
		if reasons[j]["sent"] != 3 || reasons[j][DropBudget] != sends-3 {
			t.Errorf("channel %d: %v, want 3 sent, the rest %s", j, reasons[j], DropBudget)
		}
	}
	if held > 64<<20 {
		t.Errorf("the master's heap grew by %d MiB with 10 MiB of queues", held>>20)
	}
	s := chans[0].Stats()
	if s.Drops[DropQueueBytes] != sends-4 || s.Dropped != sends-4 || s.QueuedBytes != 4*frameSize {
		t.Errorf("channel 0 stats %+v", s)
	}
	if budget.Used() != 10*frameSize {
		t.Errorf("budget used %d, want %d", budget.Used(), 10*frameSize)
	}

	// Closing the first channel gives its 4 MiB back to the budget, and
	// the others can queue again.
	if err := chans[0].Close(); err != nil {
		t.Fatal(err)
	}
	s = chans[0].Stats()
	if budget.Used() != 6*frameSize || s.QueuedBytes != 0 {
		t.Errorf("after Close: budget used %d, channel holds %d; want %d, 0", budget.Used(), s.QueuedBytes, 6*frameSize)
	}
	if s.MessagesOut+s.Dropped != sends {
		t.Errorf("channel 0: %d written + %d dropped != %d sent", s.MessagesOut, s.Dropped, sends)
	}
	if s.Drops[DropClosed] != 4-s.MessagesOut {
		t.Errorf("channel 0: %d dropped at Close, want the %d queued", s.Drops[DropClosed], 4-s.MessagesOut)
	}
	if err := chans[2].Send(bigFrame(t, "late", frameSize)); err != nil {
		t.Errorf("Send after the budget was given back: %v", err)
	}
	for _, ch := range chans[1:] {
		ch.Close()
	}
	if budget.Used() != 0 {
		t.Errorf("budget used %d after every channel closed, want 0", budget.Used())
	}
}

// The refusals that do not depend on the peer, and their messages.
func TestChannelSendTooLarge(t *testing.T) {
	testutil.LeakCheck(t)
	master, worker := mustPair(t)
	defer worker.Close()
	budget := NewBudget(1 << 10)
	ch := NewChannel(master, ChannelOptions{QueueBytes: 2 << 10, Budget: budget})
	defer ch.Close()
	for _, size := range []int{1<<10 + 1, 2<<10 + 1} {
		err := ch.Send(bigFrame(t, "", size))
		if !isDrop(err, DropTooLarge) || !strings.Contains(err.Error(), "longer than the queue's byte limit") {
			t.Errorf("Send of %d bytes: %v, want a DropError %s", size, err, DropTooLarge)
		}
	}
	if err := ch.Send(bigFrame(t, "", 1<<10)); err != nil {
		t.Errorf("Send of the budget's limit: %v", err)
	}
	s := ch.Stats()
	if s.Drops[DropTooLarge] != 2 || s.Dropped != 2 || len(s.Drops) != len(drops) {
		t.Errorf("stats %+v", s)
	}
	for _, r := range drops {
		if msg := (&DropError{Reason: r}).Error(); !strings.HasPrefix(msg, "ipc: message to worker dropped: ") || strings.HasSuffix(msg, r) {
			t.Errorf("DropError %s: %q", r, msg)
		}
	}
}

// A worker that reads gets every frame, whole and in order, through small
// byte limits, and the bytes are given back as they are written.
func TestChannelBytesNormalPeer(t *testing.T) {
	testutil.LeakCheck(t)
	master, worker := mustPair(t)
	budget := NewBudget(256 << 10)
	ch := NewChannel(master, ChannelOptions{QueueBytes: 128 << 10, Budget: budget})
	defer ch.Close()

	n := 2000
	if raceEnabled {
		n = 500
	}
	var want [][]byte
	for i := range n {
		want = append(want, bigFrame(t, fmt.Sprintf("%d:", i), 16+(i*7919)%(64<<10)))
	}
	got := make(chan error, 1)
	go func() {
		defer worker.Close()
		d := NewDecoder(worker, 0)
		for i := range n {
			m, err := d.Next()
			if err != nil {
				got <- fmt.Errorf("frame %d: %w", i, err)
				return
			}
			if !bytes.Equal(append(m.Raw, '\n'), want[i]) {
				got <- fmt.Errorf("frame %d: %.20q..., want %.20q...", i, m.Raw, want[i])
				return
			}
		}
		got <- nil
	}()
	refused := 0
	deadline := time.Now().Add(30 * time.Second)
	for i := 0; i < n; {
		err := ch.Send(want[i])
		if err == nil {
			i++
			continue
		}
		if !isDrop(err, DropQueueBytes) && !isDrop(err, DropBudget) && !isDrop(err, DropQueueFull) {
			t.Fatalf("Send %d: %v", i, err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("frame %d not queued within 30s: %v", i, err)
		}
		refused++
		time.Sleep(50 * time.Microsecond) // let the writer catch up
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the worker did not get every frame within 30s")
	}
	s := ch.Stats()
	t.Logf("%d frames (%d MiB) through a 128 KiB queue, %d refusals retried", n, s.BytesOut>>20, refused)
	if s.MessagesOut != uint64(n) || s.QueuedBytes != 0 || budget.Used() != 0 {
		t.Errorf("%d written, %d bytes held, budget used %d; want %d, 0, 0", s.MessagesOut, s.QueuedBytes, budget.Used(), n)
	}
}

// A worker that reads, with the default limits: a burst of messages is
// all queued and all arrives, exactly.
func TestChannelDefaultsNoDrops(t *testing.T) {
	testutil.LeakCheck(t)
	master, worker := mustPair(t)
	ch := NewChannel(master, ChannelOptions{Budget: &Budget{}})
	defer ch.Close()
	var sentBuf bytes.Buffer
	for i := range DefaultQueueLen {
		f := mustEncode(t, map[string]any{"cmd": "app:event", "i": i, "pad": strings.Repeat("p", i)})
		if err := ch.Send(f); err != nil {
			t.Fatalf("Send %d: %v", i, err)
		}
		sentBuf.Write(f)
	}
	got, err := io.ReadAll(io.LimitReader(worker, int64(sentBuf.Len())))
	worker.Close()
	if err != nil || !bytes.Equal(got, sentBuf.Bytes()) {
		t.Fatalf("worker read %d bytes (%v), want the %d sent", len(got), err, sentBuf.Len())
	}
}

// Many goroutines sending to channels that share a budget, some read and
// some not: the limits hold and every byte is given back at the end. Run
// with -race.
func TestChannelBudgetConcurrent(t *testing.T) {
	testutil.LeakCheck(t)
	budget := NewBudget(1 << 20)
	var chans []*Channel
	var workers []*os.File
	for i := range 4 {
		master, worker := mustPair(t)
		chans = append(chans, NewChannel(master, ChannelOptions{QueueBytes: 512 << 10, Budget: budget}))
		workers = append(workers, worker)
		if i%2 == 0 {
			go io.Copy(io.Discard, worker) // ends when the test closes worker
		}
	}
	var wg sync.WaitGroup
	var over sync.Once
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			frame := bigFrame(t, "", 16+(g*4099)%(64<<10))
			for i := range 2000 {
				ch := chans[(g+i)%len(chans)]
				ch.Send(frame)
				if u := budget.Used(); u > budget.Limit() {
					over.Do(func() { t.Errorf("budget used %d, over its %d", u, budget.Limit()) })
				}
				if q := ch.Stats().QueuedBytes; q > 512<<10 {
					over.Do(func() { t.Errorf("channel holds %d, over its %d", q, 512<<10) })
				}
			}
		}()
	}
	wg.Wait()
	var total Stats
	for i, ch := range chans {
		ch.Close()
		workers[i].Close()
		s := ch.Stats()
		total.MessagesOut += s.MessagesOut
		total.Dropped += s.Dropped
	}
	t.Logf("%d written, %d dropped", total.MessagesOut, total.Dropped)
	if total.Dropped == 0 {
		t.Error("nothing dropped: the limits were not reached")
	}
	if total.MessagesOut+total.Dropped != 8*2000 {
		t.Errorf("%d written + %d dropped, want %d", total.MessagesOut, total.Dropped, 8*2000)
	}
	if budget.Used() != 0 {
		t.Errorf("budget used %d after Close, want 0", budget.Used())
	}
}
