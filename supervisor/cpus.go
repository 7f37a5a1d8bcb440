package supervisor

import (
	"bufio"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// AvailableCPUs returns the number of CPUs this process may really use: the
// CPUs in its affinity mask, lowered to the cgroup CPU quota when one is set
// (cgroup v2 cpu.max, or v1 cpu.cfs_quota_us / cpu.cfs_period_us), rounded up
// and never below 1. A container limited to 2 CPUs on a 64-core host gets 2.
func AvailableCPUs() int {
	n := affinityCPUs()
	if q, ok := cgroupCPUQuota("/"); ok {
		n = applyQuota(n, q)
	}
	return n
}

func affinityCPUs() int {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err == nil {
		if c := set.Count(); c > 0 {
			return c
		}
	}
	return max(1, runtime.NumCPU())
}

// applyQuota lowers n to the quota in CPUs, rounded up, and keeps it >= 1.
func applyQuota(n int, quota float64) int {
	if quota <= 0 {
		return max(1, n)
	}
	q := int(math.Ceil(quota))
	return max(1, min(n, q))
}

// cgroupCPUQuota reads the tightest CPU quota, in CPUs, that the cgroups of
// this process impose, looking at files under root (normally "/"; tests pass
// a directory laid out like one). ok is false when no quota is set or the
// files cannot be read.
func cgroupCPUQuota(root string) (quota float64, ok bool) {
	best := math.Inf(1)
	for _, d := range cgroupDirs(root, "cpu") {
		var q float64
		var found bool
		if d.v2 {
			q, found = readCPUMax(filepath.Join(d.path, "cpu.max"))
		} else {
			q, found = readCFSQuota(d.path)
		}
		if found && q < best {
			best = q
		}
	}
	if math.IsInf(best, 1) {
		return 0, false
	}
	return best, true
}

// cgroupDir is one directory of this process's cgroup or of an ancestor.
type cgroupDir struct {
	path string
	v2   bool
}

// cgroupDirs lists the directories of this process's cgroup and its
// ancestors, leaf first, in the cgroup v2 hierarchy and in the v1
// hierarchy of controller, under root.
func cgroupDirs(root, controller string) []cgroupDir {
	mounts := readMounts(filepath.Join(root, "proc/self/mountinfo"))
	groups := readCgroups(filepath.Join(root, "proc/self/cgroup"))
	var dirs []cgroupDir
	for _, m := range mounts {
		var rel string
		switch {
		case m.fstype == "cgroup2":
			p, found := groups[""]
			if !found {
				continue
			}
			rel = p
		case m.fstype == "cgroup" && hasOption(m.super, controller):
			p, found := groups[controller]
			if !found {
				continue
			}
			rel = p
		default:
			continue
		}
		// The cgroup path is relative to the hierarchy's root; the mount
		// shows the subtree from m.root downwards.
		sub, inside := strings.CutPrefix(rel, m.root)
		if !inside {
			continue
		}
		dir := filepath.Join(root, m.point, sub)
		top := filepath.Join(root, m.point)
		for {
			dirs = append(dirs, cgroupDir{dir, m.fstype == "cgroup2"})
			if dir == top || len(dir) <= len(top) {
				break
			}
			dir = filepath.Dir(dir)
		}
	}
	return dirs
}

type mount struct {
	root, point, fstype, super string
}

// readMounts returns the cgroup mounts listed in a mountinfo file.
func readMounts(path string) []mount {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []mount
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for sc.Scan() {
		// 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
		pre, post, found := strings.Cut(sc.Text(), " - ")
		if !found {
			continue
		}
		a, b := strings.Fields(pre), strings.Fields(post)
		if len(a) < 5 || len(b) < 3 {
			continue
		}
		if b[0] != "cgroup" && b[0] != "cgroup2" {
			continue
		}
		out = append(out, mount{root: unescapeMount(a[3]), point: unescapeMount(a[4]), fstype: b[0], super: b[2]})
	}
	return out
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space ...).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func hasOption(opts, name string) bool {
	for _, o := range strings.Split(opts, ",") {
		if o == name {
			return true
		}
	}
	return false
}

// readCgroups maps controller names to this process's cgroup path, from
// /proc/self/cgroup. The cgroup v2 entry ("0::/path") is under "".
func readCgroups(path string) map[string]string {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	out := make(map[string]string)
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[0] == "0" && parts[1] == "" {
			out[""] = parts[2]
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			out[c] = parts[2]
		}
	}
	return out
}

// readCPUMax parses a cgroup v2 cpu.max file: "max 100000" or "200000 100000".
func readCPUMax(path string) (float64, bool) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	f := strings.Fields(string(data))
	if len(f) == 0 || f[0] == "max" {
		return 0, false
	}
	quota, err := strconv.ParseFloat(f[0], 64)
	if err != nil || quota <= 0 {
		return 0, false
	}
	period := 100000.0
	if len(f) > 1 {
		if p, err := strconv.ParseFloat(f[1], 64); err == nil && p > 0 {
			period = p
		}
	}
	return quota / period, true
}

// readCFSQuota reads cgroup v1's cpu.cfs_quota_us and cpu.cfs_period_us in dir.
func readCFSQuota(dir string) (float64, bool) {
	q, err := readInt(filepath.Join(dir, "cpu.cfs_quota_us"))
	if err != nil || q <= 0 {
		return 0, false
	}
	p, err := readInt(filepath.Join(dir, "cpu.cfs_period_us"))
	if err != nil || p <= 0 {
		return 0, false
	}
	return float64(q) / float64(p), true
}

func readInt(path string) (int64, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64)
}
