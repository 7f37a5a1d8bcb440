package ipc

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/internal/testutil"
)

// The tests of the read delay use a long one, so that on a busy machine a
// wait is told from none by a wide margin: a frame that is not delayed
// comes in well under it, a delayed one after most of it.
const testDelay = 200 * time.Millisecond

// longDelay raises the cap on ReadDelay to testDelay for the test.
func longDelay(t *testing.T) {
	maxReadDelay = testDelay
	t.Cleanup(func() { maxReadDelay = MaxReadDelay })
}

// justAfterTick sleeps until a twentieth of delay after the next tick of
// busy readers with that ReadDelay (see onTick), so that a wait that
// begins now lasts most of delay.
func justAfterTick(delay time.Duration) {
	time.Sleep(onTick(delay, delay) + delay/20)
}

// stamped returns a frame carrying the time since base: {"t":<ns>}.
func stamped(base time.Time) []byte {
	return []byte(`{"t":` + strconv.FormatInt(int64(time.Since(base)), 10) + "}\n")
}

// latency returns how long ago the stamped frame raw was made.
func latency(t testing.TB, base time.Time, raw []byte) time.Duration {
	if len(raw) < 7 || string(raw[:5]) != `{"t":` {
		t.Errorf("unexpected frame %q", raw)
		return 0
	}
	ns, err := strconv.ParseInt(string(raw[5:len(raw)-1]), 10, 64)
	if err != nil {
		t.Errorf("frame %q: %v", raw, err)
	}
	return time.Since(base) - time.Duration(ns)
}

// timedOptions returns options with the given ReadDelay whose OnMessage
// sends the latency of each stamped frame to the returned channel, then
// calls then (if not nil).
func timedOptions(t *testing.T, base time.Time, delay time.Duration, then func()) (ChannelOptions, <-chan time.Duration) {
	lat := make(chan time.Duration, 100_000)
	return ChannelOptions{
		ReadDelay: delay,
		OnMessage: func(m Message) {
			lat <- latency(t, base, m.Raw)
			if then != nil {
				then()
			}
		},
		OnError: func(err error) { t.Error(err) },
	}, lat
}

// timedChannel returns a Channel over master with timedOptions.
func timedChannel(t *testing.T, master *os.File, base time.Time, delay time.Duration, then func()) (*Channel, <-chan time.Duration) {
	opts, lat := timedOptions(t, base, delay, then)
	return NewChannel(master, opts), lat
}

func recvLatency(t *testing.T, lat <-chan time.Duration) time.Duration {
	t.Helper()
	return testutil.Recv(t, lat, 10*time.Second, "message", func(time.Duration) bool { return true })
}

func percentile(d []time.Duration, p float64) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(int(float64(len(s))*p), len(s)-1)]
}

func write(t *testing.T, f *os.File, b []byte) {
	t.Helper()
	if _, err := f.Write(b); err != nil {
		t.Fatal(err)
	}
}

func TestReadDelayOption(t *testing.T) {
	for _, c := range []struct{ in, want time.Duration }{
		{0, DefaultReadDelay},
		{-1, 0},
		{-time.Hour, 0},
		{time.Millisecond, time.Millisecond},
		{MaxReadDelay, MaxReadDelay},
		{MaxReadDelay + 1, MaxReadDelay},
		{time.Hour, MaxReadDelay},
	} {
		if got := readDelay(c.in); got != c.want {
			t.Errorf("ReadDelay %v: the reader waits up to %v, want %v", c.in, got, c.want)
		}
	}
	if DefaultReadDelay <= 0 || DefaultReadDelay > MaxReadDelay || MaxReadDelay > 5*time.Millisecond {
		t.Errorf("DefaultReadDelay %v, MaxReadDelay %v: want 0 < default <= max <= 5ms", DefaultReadDelay, MaxReadDelay)
	}
}

// A lone frame, after an idle spell or after a burst is over, is delivered
// at once: a ready, a heartbeat and a relayed message are never delayed,
// however long the read delay. So is a second one 0.5 ms after the first (a
// ready and then a heartbeat).
func TestChannelReadDelayLoneFrame(t *testing.T) {
	testutil.LeakCheck(t)
	longDelay(t)
	master, worker := mustPair(t)
	defer worker.Close()
	base := time.Now()
	ch, lat := timedChannel(t, master, base, testDelay, nil)
	defer ch.Close()
	var lone, second []time.Duration
	trial := func() {
		time.Sleep(testDelay + 50*time.Millisecond) // idle: any wait is over
		write(t, worker, stamped(base))
		lone = append(lone, recvLatency(t, lat))
		sleep(t, 500*time.Microsecond)
		write(t, worker, stamped(base))
		second = append(second, recvLatency(t, lat))
	}
	for range 3 {
		trial()
	}
	// A burst in one write, which makes the reader wait, and its end.
	var burst []byte
	for range 100 {
		burst = append(burst, stamped(base)...)
	}
	write(t, worker, burst)
	for range 100 {
		recvLatency(t, lat)
	}
	for range 3 {
		trial()
	}
	for _, c := range []struct {
		what string
		d    []time.Duration
	}{{"a frame after idle", lone}, {"a second one 0.5 ms later", second}} {
		p := percentile(c.d, 0.5)
		t.Logf("%s: delivered after median %v, max %v (read delay %v)", c.what, p, percentile(c.d, 1), testDelay)
		if p > testDelay/4 {
			t.Errorf("%s: delivered after %v (median of %d), want well under the read delay %v: it was delayed",
				c.what, p, len(c.d), testDelay)
		}
	}
}

// sleep sleeps for d with clock_nanosleep: Go's timers can come late by a
// millisecond or more.
func sleep(t testing.TB, d time.Duration) {
	ts := unix.NsecToTimespec(int64(d))
	for {
		err := unix.Nanosleep(&ts, &ts)
		if err == nil {
			return
		}
		if err != unix.EINTR {
			t.Fatal(err)
		}
	}
}

// paced writes a stamped frame to w every interval for d, one write each,
// as a busy Node.js worker sends one notifyRequest per request, and
// returns how many it wrote.
func paced(t *testing.T, w *os.File, base time.Time, interval, d time.Duration) int {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	next := ts.Nano()
	n := 0
	for end := time.Now().Add(d); time.Now().Before(end); n++ {
		write(t, w, stamped(base))
		next += int64(interval)
		ts = unix.NsecToTimespec(next)
		for unix.ClockNanosleep(unix.CLOCK_MONOTONIC, unix.TIMER_ABSTIME, &ts, nil) == unix.EINTR {
		}
	}
	return n
}

// While a worker sends 10,000 frames a second, one write each, the reader
// takes many frames a read, with the default delay: far fewer wakeups than
// frames. The latencies are logged, not checked: on a shared machine the
// scheduler alone can hold a thread for milliseconds (the bound on the
// wait is TestChannelReadDelayBounded's).
func TestChannelReadDelayBurst(t *testing.T) {
	testutil.LeakCheck(t)
	master, worker := mustPair(t)
	defer worker.Close()
	base := time.Now()
	ch, lat := timedChannel(t, master, base, 0, nil)
	defer ch.Close()
	n := paced(t, worker, base, 100*time.Microsecond, 500*time.Millisecond)
	got := make([]time.Duration, n)
	for i := range got {
		got[i] = recvLatency(t, lat)
	}
	s := ch.Stats()
	t.Logf("%d frames in %d reads (%.1f a read); delivered after median %v, p90 %v, p99 %v, max %v (read delay %v)",
		n, s.Reads, float64(n)/float64(s.Reads), percentile(got, 0.5), percentile(got, 0.9), percentile(got, 0.99), percentile(got, 1), DefaultReadDelay)
	if s.MessagesIn != uint64(n) {
		t.Errorf("%d frames counted, want %d", s.MessagesIn, n)
	}
	if s.Reads*4 > uint64(n) {
		t.Errorf("%d reads for %d frames: the reader does not gather a busy worker's frames", s.Reads, n)
	}
}

// A frame that comes while the reader waits after a burst waits for the
// end of the wait, and no longer: the wait ends on its own, not when more
// frames come.
func TestChannelReadDelayBounded(t *testing.T) {
	testutil.LeakCheck(t)
	longDelay(t)
	master, worker := mustPair(t)
	defer worker.Close()
	base := time.Now()
	ch, lat := timedChannel(t, master, base, testDelay, nil)
	defer ch.Close()
	var delayed []time.Duration
	for range 3 {
		time.Sleep(testDelay + 50*time.Millisecond) // idle
		justAfterTick(testDelay)
		// Two frames in one read: the reader waits after them.
		write(t, worker, append(stamped(base), stamped(base)...))
		recvLatency(t, lat)
		recvLatency(t, lat)
		time.Sleep(testDelay / 10)
		write(t, worker, stamped(base)) // during the wait
		delayed = append(delayed, recvLatency(t, lat))
	}
	t.Logf("a frame sent %v into a wait of %v: delivered after %v", testDelay/10, testDelay, delayed)
	for _, d := range delayed {
		if d < testDelay/2 {
			t.Errorf("a frame sent during a wait delivered after %v, want about %v: the reader did not wait", d, testDelay-testDelay/10)
		}
		// Generous: the wait is testDelay at most, but the machine is
		// shared; the frame must not wait for anything but the timer.
		if d > 3*testDelay {
			t.Errorf("a frame sent during a wait delivered after %v, want at most about %v", d, testDelay)
		}
	}
	if s := ch.Stats(); s.MessagesIn != 9 {
		t.Errorf("%d frames counted, want 9", s.MessagesIn)
	}
}

// A worker that waits for the master's answer to each frame before it
// sends the next is not slowed by the read delay: the reader never waits
// after it sent something to the worker.
func TestChannelReadDelayPingPong(t *testing.T) {
	testutil.LeakCheck(t)
	longDelay(t)
	master, worker := mustPair(t)
	base := time.Now()
	var chp atomic.Pointer[Channel] // set before the first ping
	var stop atomic.Bool
	ping := func() {
		if !stop.Load() {
			if err := chp.Load().Send(stamped(base)); err != nil {
				t.Error(err)
			}
		}
	}
	ch, lat := timedChannel(t, master, base, testDelay, ping)
	chp.Store(ch)
	echoed := make(chan struct{})
	go func() { // the worker: answers each frame with itself
		defer close(echoed)
		r := bufio.NewReader(worker)
		for {
			line, err := r.ReadBytes('\n')
			if err != nil {
				return
			}
			if _, err := worker.Write(line); err != nil {
				return
			}
		}
	}()
	ping()
	time.Sleep(time.Second)
	stop.Store(true)
	ch.Close()
	worker.Close()
	<-echoed
	var rtt []time.Duration
	for len(lat) > 0 {
		rtt = append(rtt, <-lat)
	}
	if len(rtt) == 0 {
		t.Fatal("no round trip in 1s")
	}
	t.Logf("%d round trips in 1s: median %v, p99 %v, max %v (read delay %v)",
		len(rtt), percentile(rtt, 0.5), percentile(rtt, 0.99), percentile(rtt, 1), testDelay)
	// Waiting after each answer, it would make at most 1s / testDelay.
	if len(rtt) < 50 {
		t.Errorf("%d round trips in 1s, want at least 50: the reader waits on a worker that waits for the master", len(rtt))
	}
}

// Close, Pause and Detach end the reader's wait between two reads at once;
// Detach leaves the frames sent during the wait in the socket, for the
// resumed channel.
func TestChannelReadDelayCloseDetach(t *testing.T) {
	testutil.LeakCheck(t)
	longDelay(t)
	waiting := func() (*Channel, *os.File, <-chan time.Duration, time.Time) {
		master, worker := mustPair(t)
		base := time.Now()
		ch, lat := timedChannel(t, master, base, testDelay, nil)
		justAfterTick(testDelay)
		write(t, worker, append(stamped(base), stamped(base)...))
		recvLatency(t, lat)
		recvLatency(t, lat)
		time.Sleep(testDelay / 10) // well into the wait
		return ch, worker, lat, base
	}

	ch, worker, _, _ := waiting()
	start := time.Now()
	if err := ch.Close(); err != nil {
		t.Error(err)
	}
	if d := time.Since(start); d > testDelay/2 {
		t.Errorf("Close during a wait between reads took %v: it waited for its end (%v)", d, testDelay)
	}
	worker.Close()

	ch, worker, lat, base := waiting()
	defer worker.Close()
	write(t, worker, stamped(base)) // during the wait
	start = time.Now()
	ch.Pause()
	select {
	case <-ch.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the reader did not stop within 10s of Pause")
	}
	if d := time.Since(start); d > testDelay/2 {
		t.Errorf("Pause during a wait took %v to stop the reader: it waited (%v)", d, testDelay)
	}
	start = time.Now()
	h, err := ch.Detach()
	if d := time.Since(start); d > testDelay/2 {
		t.Errorf("Detach after Pause took %v", d)
	}
	if err != nil {
		t.Fatal(err)
	}
	if len(lat) != 0 || ch.Stats().MessagesIn != 2 {
		t.Fatalf("the frame sent during the wait was read before Detach (%d frames)", ch.Stats().MessagesIn)
	}
	if len(h.Unread) != 0 {
		t.Errorf("Detach left %q unread: the reader stopped inside a frame", h.Unread)
	}
	opts, lat := timedOptions(t, base, testDelay, nil)
	resumed := ResumeChannel(h, opts)
	defer resumed.Close()
	recvLatency(t, lat)
	if n := resumed.Stats().MessagesIn; n != 1 {
		t.Errorf("the resumed channel read %d frames, want 1", n)
	}
}

// With waits between reads, frames still arrive once each and in order, across writes
// that cut them anywhere; bad frames are still skipped and counted; and at
// the worker's end of file every frame is delivered before Done.
func TestChannelReadDelayOrder(t *testing.T) {
	testutil.LeakCheck(t)
	master, worker := mustPair(t)
	const total = 20000
	var got, bad atomic.Int64
	var delivered atomic.Int64 // frames delivered when Done closed
	ch := NewChannel(master, ChannelOptions{
		OnMessage: func(m Message) {
			n, err := strconv.Atoi(string(m.Raw))
			if err != nil || int64(n) != got.Load() {
				bad.Add(1)
			}
			got.Add(1)
		},
		OnError: func(err error) {
			var fe *FrameError
			if !errors.As(err, &fe) || fe.Reason != ReasonInvalidJSON {
				t.Errorf("OnError: %v, want only bad frames (invalid_json)", err)
			}
		},
	})
	defer ch.Close()
	var buf bytes.Buffer
	for i := range total {
		fmt.Fprintf(&buf, "%d\n", i)
		if i%1000 == 0 {
			buf.WriteString("{bad\n")
		}
	}
	b := buf.Bytes()
	// In bursts of writes of odd sizes, with quiet spells between them:
	// the reader waits, goes idle, and frames are cut at every place.
	for i := 0; len(b) > 0; i++ {
		n := min(len(b), 1+len(b)%97)
		write(t, worker, b[:n])
		b = b[n:]
		if i%50 == 49 {
			time.Sleep(time.Millisecond)
		}
	}
	worker.Close()
	select {
	case <-ch.Done():
		delivered.Store(got.Load())
	case <-time.After(10 * time.Second):
		t.Fatal("Done not closed 10s after the worker's end of file")
	}
	if delivered.Load() != total || bad.Load() != 0 {
		t.Errorf("%d of %d frames delivered before Done, %d out of order", delivered.Load(), total, bad.Load())
	}
	s := ch.Stats()
	if s.Errors[ReasonInvalidJSON] != total/1000 {
		t.Errorf("%d bad frames counted, want %d", s.Errors[ReasonInvalidJSON], total/1000)
	}
	t.Logf("%d frames in %d reads", s.MessagesIn, s.Reads)
}
