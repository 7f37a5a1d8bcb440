package ipc

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/internal/testutil"
)

// rateEnv is the messages a second a "pace" helper sends.
const rateEnv = "SHOAL_IPC_TEST_RATE"

// paceMain is a worker that sends {"cmd":"notifyRequest"} at a steady rate,
// one write(2) a message, as a Node.js worker's process.send does once per
// request, until its master goes (or 60 s).
func paceMain() int {
	rate, err := strconv.Atoi(os.Getenv(rateEnv))
	if err != nil || rate <= 0 {
		fmt.Fprintf(os.Stderr, "pace: %s=%q is not a rate\n", rateEnv, os.Getenv(rateEnv))
		return 2
	}
	// SHOAL_BENCH_CLUSTER=k: k writes back to back, then a sleep k times
	// as long, as a Node.js worker that serves k requests in one turn of
	// its event loop.
	k, err := strconv.Atoi(os.Getenv("SHOAL_BENCH_CLUSTER"))
	if err != nil || k < 1 {
		k = 1
	}
	f := os.NewFile(3, "shoal-ipc")
	frame := []byte(frameNotifyRequest + "\n")
	// One write a message, evenly spaced: the thread sleeps until the
	// next one is due (clock_nanosleep, not the Go timer, whose wakeups
	// come late and would bunch the messages).
	interval := time.Second / time.Duration(rate) * time.Duration(k)
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		fmt.Fprintf(os.Stderr, "pace: %v\n", err)
		return 2
	}
	next, end := ts.Nano(), ts.Nano()+int64(time.Minute)
	for next < end {
		for range k {
			if _, err := f.Write(frame); err != nil {
				return 0 // the master is gone
			}
		}
		next += int64(interval)
		ts = unix.NsecToTimespec(next)
		for unix.ClockNanosleep(unix.CLOCK_MONOTONIC, unix.TIMER_ABSTIME, &ts, nil) == unix.EINTR {
		}
	}
	return 0
}

// usage returns the CPU time (user and system) this process has used, and
// how many times its threads went to sleep and were woken (voluntary
// context switches).
func usage(tb testing.TB) (time.Duration, int64) {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), ru.Nvcsw
}

// legacyReader is the reader of a Channel before the read delay, kept here
// as the baseline of BenchmarkMasterCPU: the socket in Go's network poller,
// each frame read as soon as it comes (a wakeup of the reader, a read(2)
// and one more that finds nothing, per message when they come one by one).
func legacyReader(tb testing.TB, f *os.File, onMessage func(Message)) (stop func()) {
	conn, err := net.FileConn(f)
	f.Close()
	if err != nil {
		tb.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		d := NewDecoder(conn, 0)
		for {
			m, err := d.Next()
			if err == nil {
				onMessage(m)
				continue
			}
			if _, ok := err.(*FrameError); !ok {
				return
			}
		}
	}()
	return func() { conn.Close(); <-done }
}

// A way for the master to read: legacy (before), or a Channel with a
// ReadDelay (0: the default).
type readMode struct {
	name   string
	legacy bool
	delay  time.Duration
}

// cpuRun is what masterCPU measured.
type cpuRun struct {
	msgsPerSec  float64 // messages delivered a second
	cores       float64 // this process's CPU over the run, in cores
	readsPerMsg float64 // socket reads per message (0 for the legacy reader, which does not count them)
	wakesPerMsg float64 // this process's voluntary context switches per message
}

// masterCPU runs workers "pace" workers at rate messages a second each for
// d, after a short warm-up, read the given way, and returns what it
// measured over d.
func masterCPU(tb testing.TB, workers, rate int, mode readMode, d time.Duration) cpuRun {
	var count atomic.Int64
	onMessage := func(Message) { count.Add(1) }
	var chans []*Channel
	var stops []func()
	var cmds []*exec.Cmd
	defer func() {
		for _, ch := range chans {
			ch.Close()
		}
		for _, stop := range stops {
			stop()
		}
		for _, cmd := range cmds {
			cmd.Process.Kill()
			testutil.Wait(cmd, 10*time.Second)
		}
	}()
	for range workers {
		master, worker, err := Pair()
		if err != nil {
			tb.Fatal(err)
		}
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), helperEnv+"=pace", rateEnv+"="+strconv.Itoa(rate))
		cmd.ExtraFiles = []*os.File{worker}
		cmd.Stderr = os.Stderr
		err = cmd.Start()
		worker.Close()
		if err != nil {
			master.Close()
			tb.Fatal(err)
		}
		cmds = append(cmds, cmd)
		if mode.legacy {
			stops = append(stops, legacyReader(tb, master, onMessage))
			continue
		}
		chans = append(chans, NewChannel(master, ChannelOptions{
			ReadDelay: mode.delay,
			OnMessage: onMessage,
			OnError:   func(err error) { tb.Error(err) },
		}))
	}
	reads := func() (n uint64) {
		for _, ch := range chans {
			n += ch.Stats().Reads
		}
		return n
	}
	time.Sleep(300 * time.Millisecond)
	c0, w0 := usage(tb)
	n0, r0, t0 := count.Load(), reads(), time.Now()
	time.Sleep(d)
	c1, w1 := usage(tb)
	n1, r1, t1 := count.Load(), reads(), time.Now()
	secs := t1.Sub(t0).Seconds()
	msgs := float64(max(n1-n0, 1))
	return cpuRun{
		msgsPerSec:  float64(n1-n0) / secs,
		cores:       (c1 - c0).Seconds() / secs,
		readsPerMsg: float64(r1-r0) / msgs,
		wakesPerMsg: float64(w1-w0) / msgs,
	}
}

// BenchmarkMasterCPU measures the master's CPU for the traffic of
// scenario 2 of bench/run.sh without the HTTP part: 2 worker processes
// each sending one notifyRequest message per write, evenly spaced
// (SHOAL_BENCH_RATE a second each, 7500 by default: 15,000 in all), read
// three ways in rotating order, round after round (SHOAL_BENCH_ROUNDS, 5
// by default): before (the reader before the read delay), no delay (the
// Channel with ReadDelay < 0) and after (the Channel as configured by
// default). It logs, for each, the CPU of this process (the master: the
// workers are other processes) per 1,000 messages a second and per
// message, the socket reads and the wakeups (voluntary context switches)
// per message, and reports the medians over the rounds and the median of
// the per-round ratios of after to before.
func BenchmarkMasterCPU(b *testing.B) {
	rate := 7500
	if v, err := strconv.Atoi(os.Getenv("SHOAL_BENCH_RATE")); err == nil && v > 0 {
		rate = v
	}
	rounds := 5
	if v, err := strconv.Atoi(os.Getenv("SHOAL_BENCH_ROUNDS")); err == nil && v > 0 {
		rounds = v
	}
	const workers, d = 2, 2 * time.Second
	modes := []readMode{{name: "before", legacy: true}, {name: "no delay", delay: -1}, {name: "after"}}
	per := make([][]float64, len(modes)) // % of a core per 1,000 msgs/s
	var ratios []float64
	for range b.N {
		for r := range rounds {
			got := make([]float64, len(modes))
			for j := range modes {
				i := (j + r) % len(modes) // rotate which goes first
				m := masterCPU(b, workers, rate, modes[i], d)
				got[i] = m.cores * 100 / (m.msgsPerSec / 1000)
				per[i] = append(per[i], got[i])
				b.Logf("round %d %-8s: %6.0f msgs/s, master %5.2f%% of a core, %.3f%% per 1,000 msgs/s (%4.1f µs a message); %.3f reads, %.2f wakeups a message",
					r+1, modes[i].name, m.msgsPerSec, m.cores*100, got[i], got[i]*10, m.readsPerMsg, m.wakesPerMsg)
			}
			ratios = append(ratios, got[2]/got[0])
		}
	}
	med := func(v []float64) float64 {
		s := slices.Clone(v)
		slices.Sort(s)
		return s[len(s)/2]
	}
	b.Logf("median, %% of a core per 1,000 msgs/s: before %.3f, no delay %.3f, after %.3f; after/before %.2f (rounds: %.2f)",
		med(per[0]), med(per[1]), med(per[2]), med(ratios), ratios)
	// 1% of a core per 1,000 msgs/s is 10 µs of CPU a message.
	b.ReportMetric(med(per[0])*10_000, "before-ns/msg")
	b.ReportMetric(med(per[1])*10_000, "nodelay-ns/msg")
	b.ReportMetric(med(per[2])*10_000, "after-ns/msg")
	b.ReportMetric(med(ratios), "after/before")
}
