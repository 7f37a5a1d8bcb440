package main

import (
	"maps"
	"sync"
	"time"

	"github.com/prometheus/procfs"

	"github.com/shoal-sh/shoal/control"
	"github.com/shoal-sh/shoal/reuseport"
	"github.com/shoal-sh/shoal/supervisor"
)

// What the status answer adds to the supervisor's snapshot, read on the
// master's side: each process's CPU time and resident memory from
// /proc/PID/stat, and the accept queues of the workers' sockets from the
// kernel, one netlink dump per TCP listener. It costs a few reads per
// worker, and nothing on the supervisor's goroutine.

// procFS is /proc, or nil where it cannot be opened.
var procFS = func() *procfs.FS {
	fs, err := procfs.NewDefaultFS()
	if err != nil {
		return nil
	}
	return &fs
}()

// procUsage returns the CPU seconds and resident bytes of process pid;
// ok is false when they cannot be read (no /proc, or the process is gone).
func procUsage(pid int) (cpu float64, rss uint64, st procfs.ProcStat, ok bool) {
	if procFS == nil || pid <= 0 {
		return 0, 0, st, false
	}
	p, err := procFS.Proc(pid)
	if err != nil {
		return 0, 0, st, false
	}
	st, err = p.Stat()
	if err != nil {
		return 0, 0, st, false
	}
	return st.CPUTime(), uint64(st.ResidentMemory()), st, true
}

// masterStatus describes the calling process, the master.
func masterStatus(pid int, now time.Time) control.MasterStatus {
	ms := control.MasterStatus{PID: pid}
	cpu, rss, st, ok := procUsage(pid)
	if !ok {
		return ms
	}
	ms.CPUSeconds, ms.RSSBytes = cpu, rss
	if start, err := st.StartTime(); err == nil {
		ms.Uptime = max(0, float64(now.UnixNano())/1e9-start)
	}
	return ms
}

// listenQueues fills each running worker's accept queue and backlog: the
// sums over the TCP listeners of the LISTEN sockets in which the master saw
// it listen. A listener whose sockets cannot be read is left out.
func listenQueues(snap supervisor.Snapshot, workers []control.WorkerStatus) {
	var byInode map[uint64]reuseport.Socket
	for _, l := range snap.Listeners {
		if l.Network != "tcp" {
			continue
		}
		socks, err := reuseport.Listeners(l.Port)
		if err != nil {
			continue
		}
		if byInode == nil {
			byInode = make(map[uint64]reuseport.Socket, len(socks))
		}
		for _, s := range socks {
			byInode[s.Inode] = s
		}
	}
	if len(byInode) == 0 {
		return
	}
	for i, w := range snap.Workers {
		if w.PID == 0 {
			continue
		}
		for _, ino := range w.Sockets {
			if s, ok := byInode[ino]; ok {
				workers[i].ListenQueue += uint64(s.Queue)
				workers[i].ListenBacklog += uint64(s.Backlog)
			}
		}
	}
}

// lastDeaths tells the class of each slot's latest death from the death
// counts of successive snapshots: the supervisor counts deaths by class
// but does not say which came last. The answer is certain when the slot
// has deaths of one class only, or when exactly one class grew since the
// previous status answer; otherwise the slot's last death is unknown (""),
// until the next death that can be told.
var lastDeaths = &deathTracker{slots: make(map[int]slotDeaths)}

// deathTracker is what lastDeaths remembers, per slot.
type deathTracker struct {
	mu    sync.Mutex
	slots map[int]slotDeaths
}

type slotDeaths struct {
	counts map[string]uint64 // at the previous answer
	last   string
}

// last returns the class of slot id's latest death, given its counts now,
// and remembers them.
func (t *deathTracker) last(id int, counts map[string]uint64) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	prev, seen := t.slots[id]
	var grown []string
	reset := false
	for class, n := range counts {
		if n > prev.counts[class] {
			grown = append(grown, class)
		}
	}
	for class, n := range prev.counts {
		if counts[class] < n {
			reset = true // a new slot of the same number: counts started over
		}
	}
	switch {
	case len(counts) <= 1:
		prev.last = ""
		for class := range counts {
			prev.last = class
		}
	case reset || !seen || len(grown) > 1:
		prev.last = "" // several classes, and no telling which came last
	case len(grown) == 1:
		prev.last = grown[0]
	}
	prev.counts = maps.Clone(counts)
	t.slots[id] = prev
	return prev.last
}

// forget drops the slots not in keep (scaled away).
func (t *deathTracker) forget(keep map[int]bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for id := range t.slots {
		if !keep[id] {
			delete(t.slots, id)
		}
	}
}
