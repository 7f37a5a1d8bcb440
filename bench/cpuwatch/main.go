// Command cpuwatch samples, every -every, how much CPU the whole machine
// used and how much of it went to the benchmark's own processes (the
// descendants of -root), so that the report can say how much foreign load
// (other people's jobs on a shared machine) ran during each measurement.
//
// It writes one line per sample to stdout:
//
//	<unix ms> <busy cores> <ours cores>
//
// where busy is all non-idle CPU time of the machine (from /proc/stat) and
// ours is the CPU time of -root and its descendants (from /proc/PID/stat,
// utime+stime+cutime+cstime, so that a process that ends between two
// samples is still counted, through its parent), both per second of wall
// time. The difference is the foreign load. A process of ours reaped by a
// process that is not ours (an orphan adopted by init) would be lost, and
// read as foreign: the benchmark's processes are all reaped by their own
// parents.
//
// It exits when -root is gone.
package main

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

const clkTck = 100 // USER_HZ; Linux reports /proc times in 1/100 s on every architecture

func main() {
	root := flag.Int("root", os.Getppid(), "pid whose descendants count as the benchmark's own")
	every := flag.Duration("every", 250*time.Millisecond, "sampling interval")
	flag.Parse()

	w := bufio.NewWriter(os.Stdout)
	defer w.Flush()
	prevT := time.Now()
	prevBusy := machineBusy()
	prevOurs := map[int]uint64{}
	treeTimes(*root, prevOurs)
	for {
		time.Sleep(*every)
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", *root)); err != nil {
			return
		}
		now := time.Now()
		busy := machineBusy()
		ours := map[int]uint64{}
		treeTimes(*root, ours)
		// A process's times include those of its children that it has
		// reaped (cutime, cstime). When a process ends, its whole CPU
		// time moves into its parent's: take away what was already
		// counted for it, which leaves exactly its last, unseen slice.
		var dOurs int64
		for pid, t := range ours {
			dOurs += int64(t - prevOurs[pid])
		}
		for pid, t := range prevOurs {
			if _, ok := ours[pid]; !ok {
				dOurs -= int64(t)
			}
		}
		dOurs = max(dOurs, 0)
		dt := now.Sub(prevT).Seconds()
		fmt.Fprintf(w, "%d %.3f %.3f\n", now.UnixMilli(),
			float64(busy-prevBusy)/clkTck/dt, float64(dOurs)/clkTck/dt)
		w.Flush()
		prevT, prevBusy, prevOurs = now, busy, ours
	}
}

// machineBusy returns the machine's non-idle CPU time in ticks: the "cpu"
// line of /proc/stat without idle and iowait (guest time is already in
// user and nice).
func machineBusy() uint64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := bytes.Cut(b, []byte("\n"))
	f := strings.Fields(string(line))
	var busy uint64
	for i, s := range f[1:] {
		if i == 3 || i == 4 || i >= 8 { // idle, iowait, guest, guest_nice
			continue
		}
		v, _ := strconv.ParseUint(s, 10, 64)
		busy += v
	}
	return busy
}

// treeTimes fills times with utime+stime+cutime+cstime of root and of its
// descendants.
func treeTimes(root int, times map[int]uint64) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	parent := map[int]int{}
	cpu := map[int]uint64{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// The command name is in parentheses and may hold spaces: the
		// fields we want come after the last ')'.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 13 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		var t uint64
		for _, i := range []int{11, 12, 13, 14} { // utime, stime, cutime, cstime
			v, _ := strconv.ParseUint(f[i], 10, 64)
			t += v
		}
		parent[pid] = ppid
		cpu[pid] = t
	}
	for pid := range cpu {
		for p, hops := pid, 0; p > 1 && hops < 64; p, hops = parent[p], hops+1 {
			if p == root {
				times[pid] = cpu[pid]
				break
			}
		}
	}
}
