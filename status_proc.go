package main

import (
	"bytes"
	"os"
	"strconv"
	"time"

	"github.com/shoal-sh/shoal/control"
	"github.com/shoal-sh/shoal/reuseport"
	"github.com/shoal-sh/shoal/supervisor"
)

// What the status answer adds to the supervisor's snapshot, read on the
// master's side: each process's CPU time and resident memory from
// /proc/PID/stat, and the accept queues of the workers' sockets from the
// kernel, one netlink dump per TCP listener. It costs one small read per
// worker, and nothing on the supervisor's goroutine.

// processStart is when this process, the master, started, near enough.
var processStart = time.Now()

// clockTicks is USER_HZ, the unit of the times in /proc/PID/stat: 100 on
// every Linux architecture.
const clockTicks = 100

// procUsage returns the CPU seconds (user and system) and resident bytes
// of process pid, from /proc/PID/stat; ok is false when they cannot be
// read (no /proc, or the process is gone).
func procUsage(pid int) (cpu float64, rss uint64, ok bool) {
	if pid <= 0 {
		return 0, 0, false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, false
	}
	return parseProcStat(b)
}

// parseProcStat reads utime, stime and rss from the text of
// /proc/PID/stat. The command name, in parentheses, may hold spaces and
// parentheses: the fields start after the last ')'.
func parseProcStat(b []byte) (cpu float64, rss uint64, ok bool) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, false
	}
	// Fields from 3 (state) on; utime is 14, stime 15, rss 24.
	f := bytes.Fields(b[i+1:])
	if len(f) < 22 {
		return 0, 0, false
	}
	utime, err1 := strconv.ParseUint(string(f[14-3]), 10, 64)
	stime, err2 := strconv.ParseUint(string(f[15-3]), 10, 64)
	pages, err3 := strconv.ParseInt(string(f[24-3]), 10, 64)
	if err1 != nil || err2 != nil || err3 != nil {
		return 0, 0, false
	}
	return float64(utime+stime) / clockTicks, uint64(max(pages, 0)) * uint64(os.Getpagesize()), true
}

// masterStatus describes the calling process, the master.
func masterStatus(now time.Time) control.MasterStatus {
	ms := control.MasterStatus{PID: os.Getpid(), Uptime: now.Sub(processStart).Seconds()}
	ms.CPUSeconds, ms.RSSBytes, _ = procUsage(ms.PID)
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
