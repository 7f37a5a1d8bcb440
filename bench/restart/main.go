// Command restart measures how long a shoal worker's port capacity is
// missing after a crash: from SIGKILL to one of the master's workers until
// the kernel shows a new LISTEN socket on the port, held by the replacement.
//
//	restart -master PID -port P -workers N -kills 100
//
// Method. Before each kill it records the inodes of the LISTEN sockets on
// the port (netlink socket diagnostics, the kernel's own table), kills the
// worker that has been up longest, and from then on asks the kernel every
// -poll for the LISTEN sockets again, until one with an inode it has not
// seen appears. The latency reported is the time from just before kill(2)
// to the poll that first saw the new socket: an upper bound, late by at
// most one poll interval plus one netlink dump (about 30-100 µs here).
//
// Backoff. shoal restarts a dead worker at once when its slot has not died
// before, or when it had been up for 10 s; otherwise its crash-loop backoff
// waits 100 ms, 200 ms, ... by design. To measure the restart of a crash in
// production and not the backoff, each kill targets the oldest worker: one
// of the first generation, or a replacement that has been up -stable (it
// waits for that). With N workers, the first N kills come at once, the
// rest in waves every -stable.
//
// It prints one line per kill and, at the end,
//
//	RESTART kills=K p50_us=... p90_us=... p99_us=... min_us=... max_us=... poll_us=...
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/shoal-sh/shoal/reuseport"
)

func main() {
	master := flag.Int("master", 0, "pid of the shoal master")
	port := flag.Int("port", 0, "the workers' port")
	workers := flag.Int("workers", 0, "number of workers the master runs")
	kills := flag.Int("kills", 100, "number of kills")
	poll := flag.Duration("poll", time.Millisecond, "interval of the kernel polls after a kill")
	stable := flag.Duration("stable", 10300*time.Millisecond, "uptime a worker must have before it is killed (shoal's backoff resets after 10 s)")
	timeout := flag.Duration("timeout", 10*time.Second, "give up on one restart after this long")
	flag.Parse()
	if *master <= 0 || *port <= 0 || *workers <= 0 {
		fmt.Fprintln(os.Stderr, "restart: -master, -port and -workers are required")
		os.Exit(2)
	}
	if err := run(*master, *port, *workers, *kills, *poll, *stable, *timeout); err != nil {
		fmt.Fprintln(os.Stderr, "restart:", err)
		os.Exit(1)
	}
}

func run(master, port, workers, kills int, poll, stable, timeout time.Duration) error {
	// All workers must listen before the first kill.
	if err := waitListeners(port, workers, 30*time.Second); err != nil {
		return err
	}
	// The workers there at the start have never died: their slots restart
	// at once whatever their uptime. Replacements must be up -stable.
	original := map[int]bool{}
	for _, pid := range reuseport.Descendants(master) {
		original[pid] = true
	}
	var lat []time.Duration
	for i := 1; i <= kills; i++ {
		pid, age, err := oldestChild(master)
		if err != nil {
			return err
		}
		if !original[pid] && age < stable {
			time.Sleep(stable - age)
		}
		socks, err := reuseport.Listeners(port)
		if err != nil {
			return err
		}
		before := map[uint64]bool{}
		for _, s := range socks {
			before[s.Inode] = true
		}
		if len(before) != workers {
			return fmt.Errorf("kill %d: %d LISTEN sockets on port %d before the kill, want %d", i, len(before), port, workers)
		}
		t0 := time.Now()
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			return fmt.Errorf("kill %d: %w", i, err)
		}
		var d time.Duration
		for {
			time.Sleep(poll)
			socks, err := reuseport.Listeners(port)
			if err != nil {
				return err
			}
			found := false
			for _, s := range socks {
				if !before[s.Inode] {
					found = true
				}
			}
			if found {
				d = time.Since(t0)
				break
			}
			if time.Since(t0) > timeout {
				return fmt.Errorf("kill %d (pid %d): no new LISTEN socket on port %d after %s", i, pid, port, timeout)
			}
		}
		lat = append(lat, d)
		fmt.Printf("kill %d pid %d: new LISTEN socket after %.2f ms\n", i, pid, float64(d.Microseconds())/1000)
		// Let the old socket go and the count settle before the next kill.
		if err := waitListeners(port, workers, timeout); err != nil {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
	slices.Sort(lat)
	pct := func(p float64) int64 {
		// nearest rank
		k := int(p/100*float64(len(lat))+0.999999) - 1
		k = max(0, min(k, len(lat)-1))
		return lat[k].Microseconds()
	}
	fmt.Printf("RESTART kills=%d p50_us=%d p90_us=%d p99_us=%d min_us=%d max_us=%d poll_us=%d\n",
		len(lat), pct(50), pct(90), pct(99), lat[0].Microseconds(), lat[len(lat)-1].Microseconds(), poll.Microseconds())
	return nil
}

// waitListeners waits until exactly n LISTEN sockets are on port.
func waitListeners(port, n int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		socks, err := reuseport.Listeners(port)
		if err != nil {
			return err
		}
		if len(socks) == n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d LISTEN sockets on port %d after %s, want %d", len(socks), port, timeout, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// oldestChild returns the descendant of master that has run longest, and
// for how long: a worker (the built-in workers start no children).
func oldestChild(master int) (pid int, age time.Duration, err error) {
	var best int
	var bestStart uint64
	for _, p := range reuseport.Descendants(master) {
		st, ok := startTicks(p)
		if ok && (best == 0 || st < bestStart) {
			best, bestStart = p, st
		}
	}
	if best == 0 {
		return 0, 0, fmt.Errorf("master %d has no children", master)
	}
	up, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return 0, 0, err
	}
	f := strings.Fields(string(up))
	secs, _ := strconv.ParseFloat(f[0], 64)
	age = time.Duration((secs - float64(bestStart)/100) * float64(time.Second))
	return best, age, nil
}

// startTicks reads field 22 of /proc/PID/stat: the start time after boot,
// in clock ticks (1/100 s).
func startTicks(pid int) (uint64, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, false
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, false
	}
	v, err := strconv.ParseUint(f[19], 10, 64)
	return v, err == nil
}
