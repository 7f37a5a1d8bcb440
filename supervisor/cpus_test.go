package supervisor

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// layout writes files under a temporary root laid out like "/".
func layout(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for name, body := range files {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

const mountsV2 = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"

func TestCgroupV2Quota(t *testing.T) {
	root := layout(t, map[string]string{
		"proc/self/mountinfo":                      mountsV2,
		"proc/self/cgroup":                         "0::/kubepods/pod1/ctr\n",
		"sys/fs/cgroup/kubepods/pod1/ctr/cpu.max":  "max 100000\n",
		"sys/fs/cgroup/kubepods/pod1/cpu.max":      "150000 100000\n",
		"sys/fs/cgroup/kubepods/cpu.max":           "800000 100000\n",
		"sys/fs/cgroup/kubepods/pod1/ctr/cpu.idle": "0\n",
	})
	q, ok := cgroupCPUQuota(root)
	if !ok || q != 1.5 {
		t.Fatalf("quota = %v, %v; want 1.5 from the pod's cpu.max", q, ok)
	}
	if n := applyQuota(64, q); n != 2 {
		t.Errorf("64 CPUs under a 1.5 CPU quota = %d, want 2", n)
	}
}

func TestCgroupV2Unlimited(t *testing.T) {
	root := layout(t, map[string]string{
		"proc/self/mountinfo":   mountsV2,
		"proc/self/cgroup":      "0::/\n",
		"sys/fs/cgroup/cpu.max": "max 100000\n",
	})
	if q, ok := cgroupCPUQuota(root); ok {
		t.Fatalf("quota = %v, want none", q)
	}
}

func TestCgroupV2Namespaced(t *testing.T) {
	// Inside a container with its own cgroup namespace the cgroup reads
	// "/" and its cpu.max sits at the mount's top.
	root := layout(t, map[string]string{
		"proc/self/mountinfo":   mountsV2,
		"proc/self/cgroup":      "0::/\n",
		"sys/fs/cgroup/cpu.max": "200000 100000\n",
	})
	if q, ok := cgroupCPUQuota(root); !ok || q != 2 {
		t.Fatalf("quota = %v, %v; want 2", q, ok)
	}
}

func TestCgroupV1Quota(t *testing.T) {
	root := layout(t, map[string]string{
		"proc/self/mountinfo": "30 23 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n" +
			"31 23 0:28 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n",
		"proc/self/cgroup": "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n",
		"sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us":  "300000\n",
		"sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
		"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us":             "-1\n",
		"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us":            "100000\n",
	})
	if q, ok := cgroupCPUQuota(root); !ok || q != 3 {
		t.Fatalf("quota = %v, %v; want 3", q, ok)
	}
}

func TestCgroupMissingFiles(t *testing.T) {
	if q, ok := cgroupCPUQuota(t.TempDir()); ok {
		t.Fatalf("quota = %v from an empty root, want none", q)
	}
}

func TestApplyQuota(t *testing.T) {
	for _, tc := range []struct {
		n     int
		quota float64
		want  int
	}{
		{64, 2, 2}, {64, 0.5, 1}, {2, 8, 2}, {4, 2.01, 3}, {1, 0, 1},
	} {
		if got := applyQuota(tc.n, tc.quota); got != tc.want {
			t.Errorf("applyQuota(%d, %v) = %d, want %d", tc.n, tc.quota, got, tc.want)
		}
	}
}

func TestAvailableCPUsWithinAffinity(t *testing.T) {
	n := AvailableCPUs()
	if n < 1 || n > affinityCPUs() {
		t.Errorf("AvailableCPUs() = %d, want 1..%d (the affinity mask)", n, affinityCPUs())
	}
}

func TestUnescapeMount(t *testing.T) {
	if got := unescapeMount(`/sys/fs/cgroup/my\040dir`); got != "/sys/fs/cgroup/my dir" {
		t.Errorf("unescapeMount = %q", got)
	}
}

func TestHostMaxWorkers(t *testing.T) {
	root := t.TempDir()
	write := func(rel, body string) {
		t.Helper()
		p := filepath.Join(root, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("proc/sys/kernel/pid_max", "32768\n")
	write("proc/self/mountinfo", "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n")
	write("proc/self/cgroup", "0::/app/shoal\n")
	if got := hostMaxWorkers(root, true); got.N != 4096 || !strings.Contains(got.Reason, "pid_max 32768") {
		t.Errorf("pid_max alone: %+v, want 4096 from kernel.pid_max", got)
	}
	write("sys/fs/cgroup/app/pids.max", "800\n")
	write("sys/fs/cgroup/app/shoal/pids.max", "max\n")
	if got := hostMaxWorkers(root, true); got.N != 100 || !strings.Contains(got.Reason, "pids.max 800") {
		t.Errorf("a parent's pids.max: %+v, want 100 from pids.max", got)
	}
}
