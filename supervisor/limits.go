package supervisor

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// MaxWorkers bounds Scale on any host, so a typo cannot fork-bomb it. The
// bound in force is often lower: see HostMaxWorkers.
const MaxWorkers = 1 << 16

// tasksPerWorker is the room left for each worker's own threads when the
// cap is derived from a limit on tasks: a Go or Node.js worker runs 5 to 10
// threads, and every one counts against RLIMIT_NPROC and pids.max. Workers
// that run fewer leave the master room for its own threads, which it must
// always be able to create: a Go program that cannot start a thread dies.
const tasksPerWorker = 8

// WorkerLimit is the highest worker count a host allows, and why.
type WorkerLimit struct {
	N      int    // at most this many workers
	Reason string // the limit that sets N, e.g. "RLIMIT_NPROC 300 (8 tasks per worker)"
}

// HostMaxWorkers derives the cap on workers from the host: the kernel's
// pid_max, the master's RLIMIT_NPROC (unless it is root, which the limit
// does not bind) and its cgroup's pids.max, each divided by the tasks a
// worker may take, and MaxWorkers.
func HostMaxWorkers() WorkerLimit {
	return hostMaxWorkers("/", os.Geteuid() == 0)
}

func hostMaxWorkers(root string, isRoot bool) WorkerLimit {
	lim := WorkerLimit{N: MaxWorkers, Reason: fmt.Sprintf("shoal's cap of %d", MaxWorkers)}
	lower := func(tasks uint64, what string) {
		if n := tasks / tasksPerWorker; n < uint64(lim.N) {
			lim = WorkerLimit{N: max(1, int(n)), Reason: fmt.Sprintf("%s %d (%d tasks per worker)", what, tasks, tasksPerWorker)}
		}
	}
	if n, ok := readUint(filepath.Join(root, "proc/sys/kernel/pid_max")); ok {
		lower(n, "kernel.pid_max")
	}
	if !isRoot {
		var rl unix.Rlimit
		if err := unix.Getrlimit(unix.RLIMIT_NPROC, &rl); err == nil && rl.Cur != unix.RLIM_INFINITY {
			lower(rl.Cur, "RLIMIT_NPROC")
		}
	}
	for _, d := range cgroupDirs(root, "pids") {
		if n, ok := readUint(filepath.Join(d.path, "pids.max")); ok {
			lower(n, "the cgroup's pids.max")
		}
	}
	return lim
}

// readUint reads a file holding one number; "max" or a bad file is not ok.
func readUint(path string) (uint64, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	return n, err == nil
}
