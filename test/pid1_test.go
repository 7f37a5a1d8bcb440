package test

// shoal as PID 1 of a new PID namespace, the way it runs as a container's
// entrypoint: it reaps orphans, handles every signal it handles elsewhere,
// and its exit code says how it ended.

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/peer"
	"github.com/shoal-sh/shoal/internal/testutil"
)

// unshareSupport is what `unshare ... true` said about new PID namespaces,
// asked once per test binary.
var unshareSupport struct {
	once  sync.Once
	flags []string // flags that make a PID namespace here; nil when none does
	why   string
}

// pidNamespaceFlags returns unshare's path and the flags with which it runs a
// command as PID 1 of a new PID namespace, with its own /proc, killed when
// unshare dies. It skips the test where the kernel refuses, and fails it
// there when SHOAL_REQUIRE_PEERS=1.
func pidNamespaceFlags(t *testing.T) (string, []string) {
	t.Helper()
	unshare := peer.Require(t, "unshare")
	unshareSupport.once.Do(func() {
		tries := [][]string{{"--pid", "--fork", "--mount-proc", "--kill-child"}}
		if os.Getuid() != 0 {
			tries = append(tries, []string{"--user", "--map-root-user", "--pid", "--fork", "--mount-proc", "--kill-child"})
		}
		var why []string
		for _, flags := range tries {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			out, err := exec.CommandContext(ctx, unshare, append(slices.Clone(flags), "true")...).CombinedOutput()
			cancel()
			if err == nil {
				unshareSupport.flags = flags
				return
			}
			why = append(why, fmt.Sprintf("unshare %s true: %v: %s", strings.Join(flags, " "), err, bytes.TrimSpace(out)))
		}
		unshareSupport.why = strings.Join(why, "; ")
	})
	if unshareSupport.flags == nil {
		peer.Missing(t, "the kernel refuses a new PID namespace: %s", unshareSupport.why)
	}
	return unshare, unshareSupport.flags
}

// nsInit is a command run by unshare as PID 1 of a new PID namespace,
// watched from the host.
type nsInit struct {
	*master             // the unshare process: its output and exit code are its child's
	host    int         // the namespace's PID 1, by its pid on the host
	proc    *os.Process // the same, pidfd-backed: safe to signal after it exits
	ns      string      // the PID namespace as /proc/PID/ns/pid names it, pid:[inode]
}

// startNSInit runs argv through unshare with flags and waits until the
// namespace's PID 1 runs the program named comm. Whatever happens, the
// namespace is killed and unshare reaped when the test ends.
func startNSInit(t *testing.T, unshare string, flags []string, env []string, comm string, argv ...string) *nsInit {
	t.Helper()
	m := &master{t: t, logs: newLogs(), stdout: newLogs(), done: make(chan struct{})}
	m.cmd = exec.Command(unshare, append(slices.Clone(flags), argv...)...)
	// Without a network namespace of its own, shoal must leave the host's
	// net.ipv4.tcp_migrate_req alone; a test that wants it says so in env.
	m.cmd.Env = append(append([]string{"SHOAL_MIGRATE_REQ=off"}, env...), noRaceSleep)
	m.cmd.Stderr, m.cmd.Stdout = m.logs, m.stdout
	if err := m.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", unshare, err)
	}
	go func() {
		m.cmd.Wait()
		m.state = m.cmd.ProcessState
		close(m.done)
	}()
	p := &nsInit{master: m}
	t.Cleanup(p.cleanup)
	p.find(comm)
	return p
}

// find waits until unshare's child runs comm, and records its host pid and
// PID namespace. A child that exits first (bad usage) leaves them unset.
func (p *nsInit) find(comm string) {
	p.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		for _, pr := range hostProcs() {
			if pr.ppid != p.cmd.Process.Pid || pr.comm != comm {
				continue
			}
			nspid := nsPIDs(pr.pid)
			if len(nspid) == 0 {
				continue // it exited since the listing (bad usage exits at once)
			}
			if len(nspid) < 2 || nspid[len(nspid)-1] != 1 {
				p.t.Fatalf("%s (host pid %d) is not PID 1 of a new PID namespace: NSpid %v", comm, pr.pid, nspid)
			}
			ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", pr.pid))
			if err != nil {
				p.t.Fatalf("PID namespace of pid %d: %v", pr.pid, err)
			}
			proc, err := os.FindProcess(pr.pid)
			if err != nil {
				p.t.Fatal(err)
			}
			p.host, p.proc, p.ns = pr.pid, proc, ns
			return
		}
		select {
		case <-p.done:
			return
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("no %s as PID 1 under unshare (pid %d) within 10s", comm, p.cmd.Process.Pid)
		}
	}
}

func (p *nsInit) signal(sig syscall.Signal) {
	p.t.Helper()
	if p.proc == nil {
		p.t.Fatalf("no PID 1 to signal")
	}
	if err := p.proc.Signal(sig); err != nil {
		p.t.Fatalf("signal PID 1 (host pid %d): %v", p.host, err)
	}
}

// cleanup kills what is left: PID 1 first, whose death makes the kernel
// kill every process of its namespace, then unshare.
func (p *nsInit) cleanup() {
	select {
	case <-p.done:
	default:
		if p.proc != nil {
			p.proc.Signal(syscall.SIGKILL)
		}
		p.cmd.Process.Kill()
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			p.t.Errorf("unshare (pid %d) not reaped 10s after SIGKILL", p.cmd.Process.Pid)
		}
	}
	if p.ns != "" {
		for _, pr := range hostProcs() {
			if pr.ns == p.ns {
				syscall.Kill(pr.pid, syscall.SIGKILL)
			}
		}
	}
	if p.proc != nil {
		p.proc.Release()
	}
	if p.t.Failed() {
		p.t.Logf("log of PID 1:\n%s", p.logs)
	}
}

// members returns the processes of the namespace.
func (p *nsInit) members() []nsProc {
	var out []nsProc
	if p.ns == "" {
		return nil
	}
	for _, pr := range hostProcs() {
		if pr.ns == p.ns {
			out = append(out, pr)
		}
	}
	return out
}

// noZombies fails unless, within timeout, no process of the namespace is a
// zombie. A process that just exited is one until its parent reaps it: only
// a zombie that stays is an error.
func (p *nsInit) noZombies(timeout time.Duration) {
	p.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var z []nsProc
		for _, pr := range p.members() {
			if pr.state == "Z" {
				z = append(z, pr)
			}
		}
		if len(z) == 0 {
			return
		}
		if time.Now().After(deadline) {
			p.t.Errorf("zombies in the namespace %s later: %v", timeout, z)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// gone fails unless, within timeout after PID 1 exited, no process of its
// namespace remains.
func (p *nsInit) gone(timeout time.Duration) {
	p.t.Helper()
	if p.ns == "" {
		return
	}
	deadline := time.Now().Add(timeout)
	for {
		left := p.members()
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			p.t.Errorf("processes of the namespace left %s after PID 1 exited: %v", timeout, left)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// nsProc is one process as the host's /proc shows it.
type nsProc struct {
	pid, ppid   int
	state, comm string
	ns          string // its PID namespace, pid:[inode]; "" when unreadable
}

func (p nsProc) String() string {
	return fmt.Sprintf("%d(%s %s ppid %d)", p.pid, p.comm, p.state, p.ppid)
}

// hostProcs lists the host's processes.
func hostProcs() []nsProc {
	var out []nsProc
	for _, st := range allStats() {
		ns, _ := os.Readlink("/proc/" + strconv.Itoa(st.pid) + "/ns/pid")
		out = append(out, nsProc{pid: st.pid, ppid: st.ppid, state: st.state, comm: st.comm, ns: ns})
	}
	return out
}

// nsPIDs returns a process's pids from the host's PID namespace down to
// its own (the NSpid line of /proc/PID/status).
func nsPIDs(pid int) []int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "NSpid:"); ok {
			var out []int
			for _, f := range strings.Fields(rest) {
				n, _ := strconv.Atoi(f)
				out = append(out, n)
			}
			return out
		}
	}
	return nil
}

// startPID1 runs shoal with args as PID 1 of a new PID namespace, with JSON
// debug logs and neither metrics nor control socket unless args ask.
func startPID1(t *testing.T, env []string, args ...string) *nsInit {
	t.Helper()
	unshare, flags := pidNamespaceFlags(t)
	// Workers get a clean environment: pass the script's PID1_ settings
	// by name (SHOAL_ENV, one per line, is --env's variable).
	var pass []string
	for _, kv := range env {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "PID1_") {
			pass = append(pass, k)
		}
	}
	env = append(append(os.Environ(), "SHOAL_LOG_FORMAT=json", "SHOAL_LOG_LEVEL=debug", "SHOAL_METRICS_ADDR=", "SHOAL_CONTROL=",
		"SHOAL_ENV="+strings.Join(pass, "\n")), env...)
	return startNSInit(t, unshare, flags, env, "shoal", append([]string{shoalBin}, args...)...)
}

// TestPID1ReapsOrphansAndStopsOnSIGTERM runs shoal as a container's PID 1
// with workers that leave orphans: short-lived ones, which shoal must reap,
// and strays in sessions of their own that outlive their workers. SIGTERM
// stops everything within the stop timeout, a worker that ignores SIGTERM
// included, and shoal exits 0.
func TestPID1ReapsOrphansAndStopsOnSIGTERM(t *testing.T) {
	script, err := filepath.Abs(filepath.Join("testdata", "pid1-orphans.sh"))
	if err != nil {
		t.Fatal(err)
	}
	const stopTimeout = time.Second
	p := startPID1(t, []string{"PID1_ORPHANS=3", "PID1_STRAY=1", "PID1_STUBBORN=2"},
		"--workers", "2", "--port", "0", "--stop-timeout", stopTimeout.String(), "--", "sh", script)
	started := p.waitFor(10*time.Second, 2, "2 workers started", msg("worker started"))
	p.waitFor(10*time.Second, 6, "the 6 short-lived orphans reaped", msg("reaped an orphan"))

	// The strays were adopted by PID 1, shoal.
	workers := map[int]bool{}
	for _, e := range started {
		workers[e.num("pid")] = true // pids in the namespace
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		var strays, others []nsProc
		for _, pr := range p.members() {
			if pr.ppid != p.host {
				continue
			}
			if ns := nsPIDs(pr.pid); len(ns) > 0 && workers[ns[len(ns)-1]] {
				continue
			}
			if pr.comm == "sleep" && pr.state != "Z" {
				strays = append(strays, pr)
			} else {
				others = append(others, pr)
			}
		}
		if len(strays) == 2 && len(others) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("want the 2 stray orphans as children of shoal (host pid %d), have %v and %v", p.host, strays, others)
		}
		time.Sleep(10 * time.Millisecond)
	}
	p.noZombies(2 * time.Second)

	time.Sleep(100 * time.Millisecond) // let worker 2 ignore SIGTERM
	begin := time.Now()
	p.signal(syscall.SIGTERM)
	code := p.wait(stopTimeout + 10*time.Second)
	took := time.Since(begin)
	if code != 0 {
		t.Errorf("exit code after SIGTERM = %d, want 0", code)
	}
	if took < stopTimeout || took > stopTimeout+2*time.Second {
		t.Errorf("stop took %s, want the %s stop timeout (worker 2 ignores SIGTERM)", took, stopTimeout)
	}
	if n := len(p.logs.entries(msg("worker did not exit after SIGTERM: sending SIGKILL"))); n != 1 {
		t.Errorf("%d SIGKILL log lines, want 1 (worker 2)", n)
	}
	// Nothing of the container is left: workers, orphans, strays.
	p.gone(2 * time.Second)
}

// TestPID1Signals sends a container's PID 1 every signal shoal handles: it
// must install handlers for them, or the kernel drops them, and each must
// do what it does elsewhere.
func TestPID1Signals(t *testing.T) {
	port := testutil.FreePort(t)
	addr := loopbackAddr(t)
	p := startPID1(t, nil, "--workers", "2", "--port", strconv.Itoa(port), "--host", "127.0.0.1",
		"--metrics-addr", addr, "--stop-timeout", "5s")
	metricsURL := "http://" + addr + "/metrics"
	waitHTTPStatus(t, http.DefaultClient, "http://"+addr+"/readyz", 200, 15*time.Second, p.done)
	if code, _ := get(t, "http://"+addr+"/healthz"); code != 200 {
		t.Errorf("/healthz: %d, want 200", code)
	}
	if code, body := get(t, fmt.Sprintf("http://127.0.0.1:%d/", port)); code != 200 || body != "hello world\n" {
		t.Errorf("GET /: %d %q, want 200 \"hello world\\n\"", code, body)
	}

	listening := func(n float64) func(map[string]float64) bool {
		return func(s map[string]float64) bool {
			return s["shoal_workers_desired"] == n && s["shoal_workers_listening"] == n
		}
	}
	p.signal(syscall.SIGTTIN)
	waitMetric(t, metricsURL, 10*time.Second, "3 workers listening after SIGTTIN", listening(3))
	p.signal(syscall.SIGTTOU)
	waitMetric(t, metricsURL, 10*time.Second, "2 workers listening after SIGTTOU", listening(2))

	before := p.current()
	delete(before, 3) // scaled down: it may still be draining
	p.signal(syscall.SIGHUP)
	p.waitFor(20*time.Second, 1, "reload finished after SIGHUP", msg("reload finished"))
	after := p.current()
	for slot, pid := range before {
		if after[slot] == 0 || after[slot] == pid {
			t.Errorf("slot %d: pid %d before SIGHUP, %d after: want a new worker", slot, pid, after[slot])
		}
	}
	if code, body := get(t, fmt.Sprintf("http://127.0.0.1:%d/", port)); code != 200 || body != "hello world\n" {
		t.Errorf("GET / after reload: %d %q", code, body)
	}
	p.noZombies(2 * time.Second)

	p.signal(syscall.SIGINT)
	if code := p.wait(10 * time.Second); code != 0 {
		t.Errorf("exit code after SIGINT = %d, want 0", code)
	}
	p.gone(2 * time.Second)
}

// TestPID1ExitCodes checks that a container's exit code says how shoal
// ended, as PID 1.
func TestPID1ExitCodes(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		code int
		log  string // a message the log must have
	}{
		{"gave up", []string{"--workers", "1", "--max-restarts", "2", "--restart-window", "1m", "--", "sh", "-c", "exit 1"}, 1, "giving up"},
		{"workers failed, no restart", []string{"--workers", "2", "--restart", "never", "--", "sh", "-c", "sleep 0.2; exit 3"}, 1, "worker died"},
		{"workers done", []string{"--workers", "2", "--restart", "on-failure", "--", "sh", "-c", "sleep 0.2"}, 0, "worker died"},
		{"bad usage", []string{"--workers", "0"}, 2, ""},
		{"command not found", []string{"--", "/nonexistent/server"}, 2, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := startPID1(t, nil, append([]string{"--port", "0"}, tc.args...)...)
			if code := p.wait(15 * time.Second); code != tc.code {
				t.Errorf("exit code %d, want %d", code, tc.code)
			}
			if tc.log != "" && len(p.logs.entries(msg(tc.log))) == 0 {
				t.Errorf("no %q in the log", tc.log)
			}
			p.gone(2 * time.Second)
		})
	}
}
