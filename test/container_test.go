package test

// Container and deployment tests: shoal as PID 1 of a PID namespace (the
// way it runs as a container's entrypoint), and the files under deploy/ and
// the Dockerfile checked against the binary they configure, so that a
// default that changes in the code cannot silently leave them behind.

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/internal/peer"
)

// moduleRoot is the module's root, seen from this package's directory.
const moduleRoot = ".."

// noRaceSleep is added to the environment of the binary under test: built
// with -race, it would sleep 1s at exit (GORACE atexit_sleep_ms), which
// would count against the stop times measured here.
const noRaceSleep = "GORACE=atexit_sleep_ms=0"

// ---------------------------------------------------------------------------
// PID 1

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
	port := freePort(t)
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

// waitHTTPStatus polls url with c until it answers code. It gives up early
// when exited, if not nil, is closed: the server is gone.
func waitHTTPStatus(t *testing.T, c *http.Client, url string, code int, timeout time.Duration, exited <-chan struct{}) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last := ""
	for {
		select {
		case <-exited:
			t.Fatalf("GET %s: the server exited before answering %d; last: %s", url, code, last)
		default:
		}
		got, body, err := httpGetWith(c, url)
		if err == nil && got == code {
			return body
		}
		if err != nil {
			last = err.Error()
		} else {
			last = fmt.Sprintf("%d %q", got, body)
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s: want %d within %s, last: %s", url, code, timeout, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func httpGetWith(c *http.Client, url string) (int, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	return resp.StatusCode, string(b), err
}

// ---------------------------------------------------------------------------
// The binary's defaults

// flagDefaults returns each flag's default as `shoal -h` prints it, run
// with env (nil: the test's environment) and, when uid >= 0, as that user.
func flagDefaults(t *testing.T, env []string, uid, gid int) map[string]string {
	t.Helper()
	cmd := exec.Command(shoalBin, "-h")
	if env == nil {
		env = os.Environ()
	}
	cmd.Env = append(slices.Clip(env), noRaceSleep)
	if uid >= 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("shoal -h: %v", err)
	}
	defaults := map[string]string{}
	flagLine := regexp.MustCompile(`^\s+-([a-z][a-z-]*)\b`)
	defaultOf := regexp.MustCompile(`\(default (.*)\)$`)
	name := ""
	for _, line := range strings.Split(string(out), "\n") {
		if m := flagLine.FindStringSubmatch(line); m != nil {
			name = m[1]
			continue
		}
		if m := defaultOf.FindStringSubmatch(strings.TrimSpace(line)); m != nil && name != "" {
			defaults[name] = m[1]
		}
	}
	for _, f := range []string{"port", "metrics-addr", "stop-timeout", "control"} {
		if _, ok := defaults[f]; !ok {
			t.Fatalf("shoal -h shows no default for --%s:\n%s", f, out)
		}
	}
	return defaults
}

// shoalConfig is what a deployment file asks of shoal: its flags, its
// environment, and the binary's defaults for the rest.
type shoalConfig struct {
	where    string            // the file, for messages
	flags    map[string]string // --name value, before "--"
	env      map[string]string
	defaults map[string]string
}

func newShoalConfig(t *testing.T, where string, args []string, env map[string]string, defaults map[string]string) shoalConfig {
	t.Helper()
	c := shoalConfig{where: where, flags: map[string]string{}, env: env, defaults: defaults}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" || !strings.HasPrefix(a, "-") {
			break
		}
		name, value, ok := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !ok {
			if i+1 >= len(args) {
				t.Fatalf("%s: flag %s without a value", c.where, a)
			}
			i++
			value = args[i]
		}
		c.flags[name] = value
	}
	return c
}

// get returns the value of flag name: flag, else SHOAL_NAME, else default.
func (c shoalConfig) get(name string) string {
	if v, ok := c.flags[name]; ok {
		return v
	}
	if v, ok := c.env["SHOAL_"+strings.ToUpper(strings.ReplaceAll(name, "-", "_"))]; ok {
		return v
	}
	return c.defaults[name]
}

func (c shoalConfig) set(name string) bool {
	_, f := c.flags[name]
	_, e := c.env["SHOAL_"+strings.ToUpper(strings.ReplaceAll(name, "-", "_"))]
	return f || e
}

func (c shoalConfig) port(t *testing.T) int {
	t.Helper()
	n, err := strconv.Atoi(c.get("port"))
	if err != nil || n <= 0 {
		t.Fatalf("%s: port %q: want a port number", c.where, c.get("port"))
	}
	return n
}

func (c shoalConfig) metricsPort(t *testing.T) int {
	t.Helper()
	_, p, err := net.SplitHostPort(c.get("metrics-addr"))
	n, err2 := strconv.Atoi(p)
	if err != nil || err2 != nil {
		t.Fatalf("%s: metrics address %q: want host:port", c.where, c.get("metrics-addr"))
	}
	return n
}

func (c shoalConfig) stopTimeout(t *testing.T) time.Duration {
	t.Helper()
	d, err := time.ParseDuration(c.get("stop-timeout"))
	if err != nil {
		t.Fatalf("%s: stop timeout %q: %v", c.where, c.get("stop-timeout"), err)
	}
	return d
}

// ---------------------------------------------------------------------------
// Dockerfile

// dockerInstr is one Dockerfile instruction.
type dockerInstr struct {
	cmd  string // upper case: FROM, RUN ...
	args string
	line int
}

// dockerStage is one FROM and what follows it.
type dockerStage struct {
	from, name string
	instrs     []dockerInstr
}

func (s dockerStage) all(cmd string) []dockerInstr {
	var out []dockerInstr
	for _, in := range s.instrs {
		if in.cmd == cmd {
			out = append(out, in)
		}
	}
	return out
}

// last returns the stage's last cmd instruction's arguments, "" if none.
func (s dockerStage) last(cmd string) string {
	all := s.all(cmd)
	if len(all) == 0 {
		return ""
	}
	return all[len(all)-1].args
}

// parseDockerfile reads path's instructions by stage: comments dropped,
// continuation lines joined.
func parseDockerfile(t *testing.T, path string) (globalArgs []dockerInstr, stages []dockerStage) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var cur strings.Builder
	start := 0
	for i, line := range strings.Split(string(b), "\n") {
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "#") || (trimmed == "" && cur.Len() == 0) {
			continue
		}
		if cur.Len() == 0 {
			start = i + 1
		}
		if strings.HasSuffix(trimmed, "\\") {
			cur.WriteString(strings.TrimSuffix(trimmed, "\\") + " ")
			continue
		}
		cur.WriteString(trimmed)
		text := cur.String()
		cur.Reset()
		cmd, args, _ := strings.Cut(text, " ")
		in := dockerInstr{cmd: strings.ToUpper(cmd), args: strings.TrimSpace(args), line: start}
		if in.cmd == "FROM" {
			f := strings.Fields(in.args)
			for len(f) > 0 && strings.HasPrefix(f[0], "--") {
				f = f[1:]
			}
			st := dockerStage{}
			if len(f) > 0 {
				st.from = f[0]
			}
			if len(f) == 3 && strings.EqualFold(f[1], "as") {
				st.name = f[2]
			}
			stages = append(stages, st)
			continue
		}
		if len(stages) == 0 {
			globalArgs = append(globalArgs, in)
			continue
		}
		stages[len(stages)-1].instrs = append(stages[len(stages)-1].instrs, in)
	}
	if len(stages) == 0 {
		t.Fatalf("%s: no FROM", path)
	}
	return globalArgs, stages
}

// dockerExecForm parses an exec-form (JSON array) ENTRYPOINT or CMD.
func dockerExecForm(t *testing.T, what, args string) []string {
	t.Helper()
	var v []string
	if err := json.Unmarshal([]byte(args), &v); err != nil {
		t.Errorf("%s %s: want the exec form, a JSON array (the shell form would make sh PID 1, and signals would not reach shoal): %v", what, args, err)
	}
	return v
}

// dockerCopiesFrom returns the sources and destination of `COPY --from=from ...`
// instructions of a stage, by destination.
func dockerCopiesFrom(st dockerStage, from string) map[string]string {
	out := map[string]string{}
	for _, in := range st.all("COPY") {
		f := strings.Fields(in.args)
		var src []string
		ok := false
		for _, a := range f {
			if v, is := strings.CutPrefix(a, "--from="); is {
				ok = v == from
				continue
			}
			if strings.HasPrefix(a, "--") {
				continue
			}
			src = append(src, a)
		}
		if ok && len(src) == 2 {
			out[src[1]] = src[0]
		}
	}
	return out
}

// dockerExposed returns the ports of a stage's EXPOSE instructions.
func dockerExposed(st dockerStage) []int {
	var out []int
	for _, in := range st.all("EXPOSE") {
		for _, f := range strings.Fields(in.args) {
			n, _ := strconv.Atoi(strings.TrimSuffix(f, "/tcp"))
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out
}

// checkNonRootUser checks a USER instruction's value.
func checkNonRootUser(t *testing.T, file, user string, numeric bool) {
	t.Helper()
	name, _, _ := strings.Cut(user, ":")
	if name == "" || name == "root" || name == "0" {
		t.Errorf("%s: USER %q: want a non-root user", file, user)
		return
	}
	if n, err := strconv.Atoi(name); numeric && (err != nil || n == 0) {
		t.Errorf("%s: USER %q: want a numeric uid, so that Kubernetes' runAsNonRoot can check it", file, user)
	}
}

// TestDockerfileMatchesBinary checks the Dockerfile's essential lines
// against the binary: the exec-form entrypoint that makes shoal PID 1, the
// stop signal it handles, a non-root user, a static build, and the default
// ports it exposes.
func TestDockerfileMatchesBinary(t *testing.T) {
	defaults := flagDefaults(t, nil, -1, -1)
	cfg := newShoalConfig(t, "the binary's defaults", nil, nil, defaults)
	globals, stages := parseDockerfile(t, filepath.Join(moduleRoot, "Dockerfile"))
	final := stages[len(stages)-1]

	if !regexp.MustCompile(`^(scratch|gcr\.io/distroless/static(-debian\d+)?(:[\w.-]+)?(@sha256:[0-9a-f]+)?)$`).MatchString(final.from) {
		t.Errorf("final stage FROM %s: want scratch or gcr.io/distroless/static", final.from)
	}
	entry := dockerExecForm(t, "ENTRYPOINT", final.last("ENTRYPOINT"))
	if len(entry) != 1 || entry[0] != "/shoal" {
		t.Errorf("ENTRYPOINT %q, want [\"/shoal\"]", entry)
	}
	if sig := final.last("STOPSIGNAL"); sig != "SIGTERM" {
		t.Errorf("STOPSIGNAL %q, want SIGTERM: shoal's graceful stop", sig)
	}
	checkNonRootUser(t, "Dockerfile", final.last("USER"), true)
	if got, want := dockerExposed(final), []int{cfg.port(t), cfg.metricsPort(t)}; !slices.Equal(got, sortedCopy(want)) {
		t.Errorf("EXPOSE %v, want the binary's default port and metrics port %v", got, sortedCopy(want))
	}
	if final.last("CMD") != "" {
		t.Errorf("final stage has CMD %s: the built-in worker runs with no arguments", final.last("CMD"))
	}

	// The build stage.
	build, run := buildStep(t, stages)
	for _, want := range []string{"CGO_ENABLED=0", "-trimpath", "-s -w", "-X main.version=${VERSION}", "go build"} {
		if !strings.Contains(run.args, want) {
			t.Errorf("Dockerfile:%d: the build lacks %q: %s", run.line, want, run.args)
		}
	}
	if !slices.ContainsFunc(build.all("ARG"), func(in dockerInstr) bool { return regexp.MustCompile(`^VERSION(=|$)`).MatchString(in.args) }) {
		t.Errorf("build stage %q: no ARG VERSION", build.name)
	}
	out := regexp.MustCompile(`-o\s+(\S+)`).FindStringSubmatch(run.args)
	if out == nil {
		t.Fatalf("Dockerfile:%d: go build without -o", run.line)
	}
	if src := dockerCopiesFrom(final, build.name)[firstArg(entry)]; src != out[1] {
		t.Errorf("final stage copies %q from %s to %s, want the build's output %s", src, build.name, firstArg(entry), out[1])
	}

	// The Go of the builder image is at least go.mod's.
	goVersion := ""
	for _, in := range globals {
		if v, ok := strings.CutPrefix(in.args, "GO_VERSION="); in.cmd == "ARG" && ok {
			goVersion = v
		}
	}
	from := strings.ReplaceAll(build.from, "${GO_VERSION}", goVersion)
	m := regexp.MustCompile(`^golang:(\d+)\.(\d+)`).FindStringSubmatch(from)
	mod, err := os.ReadFile(filepath.Join(moduleRoot, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	need := regexp.MustCompile(`(?m)^go (\d+)\.(\d+)`).FindStringSubmatch(string(mod))
	if m == nil || need == nil {
		t.Errorf("builder image %s (go.mod go %v): want golang:MAJOR.MINOR", from, need)
	} else if atoiOr0(m[1])*1000+atoiOr0(m[2]) < atoiOr0(need[1])*1000+atoiOr0(need[2]) {
		t.Errorf("builder image %s is older than go.mod's go %s.%s", from, need[1], need[2])
	}
}

func firstArg(v []string) string {
	if len(v) == 0 {
		return ""
	}
	return v[0]
}

func atoiOr0(s string) int { n, _ := strconv.Atoi(s); return n }

func sortedCopy(v []int) []int { v = slices.Clone(v); slices.Sort(v); return v }

// buildStep returns the stage and the RUN instruction that build shoal.
func buildStep(t *testing.T, stages []dockerStage) (dockerStage, dockerInstr) {
	t.Helper()
	for _, st := range stages {
		for _, in := range st.all("RUN") {
			if strings.Contains(in.args, "go build") {
				return st, in
			}
		}
	}
	t.Fatal("Dockerfile: no RUN ... go build")
	return dockerStage{}, dockerInstr{}
}

// TestDockerBuildIsStatic runs the Dockerfile's own build command, in a copy
// of the build context that .dockerignore leaves, and checks that the
// binary is static, stripped, and reports the version it was given.
func TestDockerBuildIsStatic(t *testing.T) {
	_, stages := parseDockerfile(t, filepath.Join(moduleRoot, "Dockerfile"))
	_, run := buildStep(t, stages)
	// Drop RUN's own flags (--mount=...); the rest is the shell command.
	script := run.args
	for strings.HasPrefix(script, "--") {
		_, script, _ = strings.Cut(script, " ")
		script = strings.TrimSpace(script)
	}
	out := filepath.Join(t.TempDir(), "shoal")
	script = regexp.MustCompile(`-o\s+\S+`).ReplaceAllLiteralString(script, `-o "$SHOAL_OUT"`)

	ctxDir := t.TempDir()
	n := buildContext(t, moduleRoot, ctxDir)
	t.Logf("build context: %d files", n)

	const version = "v0.0.0-container-test"
	cmd := exec.Command("sh", "-ec", script)
	cmd.Dir = ctxDir
	cmd.Env = append(os.Environ(), "VERSION="+version, "TARGETOS=linux", "TARGETARCH="+runtime.GOARCH, "SHOAL_OUT="+out)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("the Dockerfile's build (%s) in its build context: %v\n%s", script, err, b)
	}

	f, err := elf.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Errorf("the binary has a PT_INTERP program header: dynamically linked, it will not run on distroless/static or scratch")
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) != 0 {
		t.Errorf("the binary needs shared libraries %v", libs)
	}
	if f.Section(".symtab") != nil {
		t.Errorf("the binary has a symbol table: -ldflags -s did not apply")
	}
	got, err := exec.Command(out, "version").Output()
	if err != nil || strings.TrimSpace(string(got)) != "shoal "+version {
		t.Errorf("shoal version: %q, %v; want %q", got, err, "shoal "+version)
	}
	if b, err := exec.Command("file", out).Output(); err == nil {
		t.Logf("%s", bytes.TrimSpace(b))
	}
}

// ignoreRule is one line of a .dockerignore.
type ignoreRule struct {
	re     *regexp.Regexp
	negate bool
}

// dockerignore reads the rules of a .dockerignore, with the Docker
// builder's syntax: paths relative to the context, '*' and '?' within one
// path element, '**' across elements, '!' to take an exclusion back, and a
// pattern that matches a directory excludes what is in it.
func dockerignore(t *testing.T, path string) []ignoreRule {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var rules []ignoreRule
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		r := ignoreRule{}
		if rest, ok := strings.CutPrefix(line, "!"); ok {
			r.negate, line = true, rest
		}
		line = filepath.Clean(strings.TrimPrefix(line, "/"))
		var re strings.Builder
		re.WriteString("^")
		for i := 0; i < len(line); i++ {
			switch c := line[i]; {
			case strings.HasPrefix(line[i:], "**/"):
				re.WriteString("(.*/)?")
				i += 2
			case strings.HasPrefix(line[i:], "**"):
				re.WriteString(".*")
				i++
			case c == '*':
				re.WriteString("[^/]*")
			case c == '?':
				re.WriteString("[^/]")
			default:
				re.WriteString(regexp.QuoteMeta(string(c)))
			}
		}
		re.WriteString("$")
		r.re = regexp.MustCompile(re.String())
		rules = append(rules, r)
	}
	return rules
}

func dockerIgnores(rules []ignoreRule, rel string) bool {
	out := false
	for _, r := range rules {
		for p := rel; p != "." && p != "/"; p = filepath.Dir(p) {
			if r.re.MatchString(p) {
				out = !r.negate
				break
			}
		}
	}
	return out
}

// buildContext copies the files of root that .dockerignore keeps to dst
// and returns how many.
func buildContext(t *testing.T, root, dst string) int {
	t.Helper()
	rules := dockerignore(t, filepath.Join(root, ".dockerignore"))
	n := 0
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		if rel == "." {
			return nil
		}
		if d.IsDir() {
			if rel == ".git" {
				return filepath.SkipDir // the builder excludes it too when listed; it is
			}
			return nil
		}
		if !d.Type().IsRegular() || dockerIgnores(rules, rel) {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
			return err
		}
		n++
		return os.WriteFile(target, b, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, must := range []string{"go.mod", "go.sum", "main.go"} {
		if _, err := os.Stat(filepath.Join(dst, must)); err != nil {
			t.Fatalf(".dockerignore leaves %s out of the build context", must)
		}
	}
	return n
}

func TestDockerignore(t *testing.T) {
	rules := dockerignore(t, filepath.Join(moduleRoot, ".dockerignore"))
	for rel, want := range map[string]bool{
		".git/config":              true,
		"test/container_test.go":   true,
		"deploy/kubernetes/a.yaml": true,
		"README.md":                true,
		"supervisor/supervisor.go": false,
		"supervisor/cpus_test.go":  true,
		"ipc/testdata/x":           true,
		"main.go":                  false,
		"go.sum":                   false,
	} {
		if got := dockerIgnores(rules, rel); got != want {
			t.Errorf("%s ignored = %v, want %v", rel, got, want)
		}
	}
}

// TestDockerNodeExample checks deploy/docker/Dockerfile.node-example, the
// README's example of wrapping one's own server, against the image.
func TestDockerNodeExample(t *testing.T) {
	defaults := flagDefaults(t, nil, -1, -1)
	cfg := newShoalConfig(t, "the binary's defaults", nil, nil, defaults)
	const file = "deploy/docker/Dockerfile.node-example"
	_, stages := parseDockerfile(t, filepath.Join(moduleRoot, file))
	_, ours := parseDockerfile(t, filepath.Join(moduleRoot, "Dockerfile"))
	shoalPath := firstArg(dockerExecForm(t, "ENTRYPOINT", ours[len(ours)-1].last("ENTRYPOINT")))
	final := stages[len(stages)-1]

	if m := regexp.MustCompile(`^node:(\d+)`).FindStringSubmatch(final.from); m == nil || atoiOr0(m[1]) < 22 {
		t.Errorf("%s: FROM %s: want node:22 or newer (reusePort needs Node.js 22.12)", file, final.from)
	}
	var dest string
	for _, in := range final.all("COPY") {
		f := strings.Fields(in.args)
		if len(f) == 3 && strings.HasPrefix(f[0], "--from=ghcr.io/shoal-sh/shoal:") && f[1] == shoalPath {
			dest = f[2]
		}
	}
	if dest == "" {
		t.Fatalf("%s: no COPY --from=ghcr.io/shoal-sh/shoal:TAG %s DEST", file, shoalPath)
	}
	entry := dockerExecForm(t, "ENTRYPOINT", final.last("ENTRYPOINT"))
	if len(entry) != 2 || (entry[0] != dest && filepath.Join("/usr/local/bin", entry[0]) != dest) || entry[1] != "--" {
		t.Errorf("%s: ENTRYPOINT %q, want [\"shoal\", \"--\"] with shoal at %s", file, entry, dest)
	}
	if cmd := dockerExecForm(t, "CMD", final.last("CMD")); len(cmd) == 0 || cmd[0] != "node" {
		t.Errorf("%s: CMD %q, want [\"node\", ...]", file, cmd)
	}
	if sig := final.last("STOPSIGNAL"); sig != "SIGTERM" {
		t.Errorf("%s: STOPSIGNAL %q, want SIGTERM", file, sig)
	}
	checkNonRootUser(t, file, final.last("USER"), false)
	if got, want := dockerExposed(final), sortedCopy([]int{cfg.port(t), cfg.metricsPort(t)}); !slices.Equal(got, want) {
		t.Errorf("%s: EXPOSE %v, want %v", file, got, want)
	}
}

// ---------------------------------------------------------------------------
// Kubernetes

type kubeMeta struct {
	Name        string            `yaml:"name"`
	Labels      map[string]string `yaml:"labels"`
	Annotations map[string]string `yaml:"annotations"`
}

type kubeDoc struct {
	file       string
	APIVersion string   `yaml:"apiVersion"`
	Kind       string   `yaml:"kind"`
	Metadata   kubeMeta `yaml:"metadata"`
	node       *yaml.Node
}

type kubeDeployment struct {
	Spec struct {
		Selector struct {
			MatchLabels map[string]string `yaml:"matchLabels"`
		} `yaml:"selector"`
		Template struct {
			Metadata kubeMeta `yaml:"metadata"`
			Spec     kubePod  `yaml:"spec"`
		} `yaml:"template"`
	} `yaml:"spec"`
}

type kubePod struct {
	TerminationGracePeriodSeconds *int `yaml:"terminationGracePeriodSeconds"`
	SecurityContext               struct {
		RunAsNonRoot *bool        `yaml:"runAsNonRoot"`
		RunAsUser    *int         `yaml:"runAsUser"`
		RunAsGroup   *int         `yaml:"runAsGroup"`
		Sysctls      []kubeSysctl `yaml:"sysctls"`
	} `yaml:"securityContext"`
	Containers []kubeContainer `yaml:"containers"`
	Volumes    []kubeVolume    `yaml:"volumes"`
}

type kubeSysctl struct {
	Name  string `yaml:"name"`
	Value string `yaml:"value"`
}

type kubeVolume struct {
	Name string `yaml:"name"`
}

type kubeContainer struct {
	Name    string   `yaml:"name"`
	Image   string   `yaml:"image"`
	Command []string `yaml:"command"`
	Args    []string `yaml:"args"`
	Env     []struct {
		Name      string `yaml:"name"`
		Value     string `yaml:"value"`
		ValueFrom any    `yaml:"valueFrom"`
	} `yaml:"env"`
	Ports []struct {
		Name          string `yaml:"name"`
		ContainerPort int    `yaml:"containerPort"`
	} `yaml:"ports"`
	ReadinessProbe *kubeProbe `yaml:"readinessProbe"`
	LivenessProbe  *kubeProbe `yaml:"livenessProbe"`
	Lifecycle      struct {
		PreStop *struct {
			Sleep *struct {
				Seconds int `yaml:"seconds"`
			} `yaml:"sleep"`
		} `yaml:"preStop"`
	} `yaml:"lifecycle"`
	Resources struct {
		Limits   map[string]string `yaml:"limits"`
		Requests map[string]string `yaml:"requests"`
	} `yaml:"resources"`
	SecurityContext struct {
		RunAsUser                *int  `yaml:"runAsUser"`
		RunAsGroup               *int  `yaml:"runAsGroup"`
		RunAsNonRoot             *bool `yaml:"runAsNonRoot"`
		ReadOnlyRootFilesystem   *bool `yaml:"readOnlyRootFilesystem"`
		AllowPrivilegeEscalation *bool `yaml:"allowPrivilegeEscalation"`
		Capabilities             struct {
			Drop []string `yaml:"drop"`
			Add  []string `yaml:"add"`
		} `yaml:"capabilities"`
	} `yaml:"securityContext"`
	VolumeMounts []struct {
		Name      string `yaml:"name"`
		MountPath string `yaml:"mountPath"`
	} `yaml:"volumeMounts"`
}

type kubeProbe struct {
	HTTPGet *struct {
		Path   string `yaml:"path"`
		Port   any    `yaml:"port"`
		Scheme string `yaml:"scheme"`
	} `yaml:"httpGet"`
}

type kubeService struct {
	Spec struct {
		Selector map[string]string `yaml:"selector"`
		Ports    []struct {
			Name       string `yaml:"name"`
			Port       int    `yaml:"port"`
			TargetPort any    `yaml:"targetPort"`
		} `yaml:"ports"`
	} `yaml:"spec"`
}

type kubePodMonitor struct {
	Spec struct {
		Selector struct {
			MatchLabels map[string]string `yaml:"matchLabels"`
		} `yaml:"selector"`
		PodMetricsEndpoints []struct {
			Port       string `yaml:"port"`
			TargetPort any    `yaml:"targetPort"`
			Path       string `yaml:"path"`
			Scheme     string `yaml:"scheme"`
		} `yaml:"podMetricsEndpoints"`
	} `yaml:"spec"`
}

type kustomization struct {
	Resources []string `yaml:"resources"`
}

// loadManifests parses every YAML document under deploy/kubernetes.
func loadManifests(t *testing.T) []kubeDoc {
	t.Helper()
	dir := filepath.Join(moduleRoot, "deploy", "kubernetes")
	files, err := filepath.Glob(filepath.Join(dir, "*.y*ml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in %s (%v)", dir, err)
	}
	var docs []kubeDoc
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(b))
		for {
			var n yaml.Node
			if err := dec.Decode(&n); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			d := kubeDoc{file: filepath.Base(f), node: &n}
			if err := n.Decode(&d); err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			if d.APIVersion == "" || d.Kind == "" {
				t.Errorf("%s: a document without apiVersion or kind", f)
			}
			if d.Metadata.Name == "" && d.Kind != "Kustomization" {
				t.Errorf("%s: %s without metadata.name", f, d.Kind)
			}
			docs = append(docs, d)
		}
	}
	return docs
}

func (d kubeDoc) decode(t *testing.T, v any) {
	t.Helper()
	if err := d.node.Decode(v); err != nil {
		t.Fatalf("%s: %s %s: %v", d.file, d.Kind, d.Metadata.Name, err)
	}
}

// labelsSelect reports whether a selector's labels are all among labels.
func labelsSelect(selector, labels map[string]string) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// shoalContainer returns the pod's container that runs the shoal image.
func shoalContainer(t *testing.T, where string, pod kubePod) kubeContainer {
	t.Helper()
	for _, c := range pod.Containers {
		if strings.Contains(c.Image, "/shoal:") || strings.Contains(c.Image, "/shoal@") {
			return c
		}
	}
	t.Fatalf("%s: no container runs the shoal image", where)
	return kubeContainer{}
}

// containerArgv returns the command line the container runs: the image's
// ENTRYPOINT (/shoal) unless command replaces it, then args.
func containerArgv(c kubeContainer) []string {
	argv := []string{"/shoal"}
	if len(c.Command) > 0 {
		argv = slices.Clone(c.Command)
	}
	return append(argv, c.Args...)
}

func containerEnv(t *testing.T, c kubeContainer) map[string]string {
	t.Helper()
	env := map[string]string{}
	for _, e := range c.Env {
		if e.ValueFrom != nil {
			t.Errorf("container %s: env %s from valueFrom: this test cannot know its value", c.Name, e.Name)
		}
		env[e.Name] = e.Value
	}
	return env
}

// resolvePort returns the number of a port given as a number or as the
// name of one of the containers' ports.
func resolvePort(p any, containers ...kubeContainer) (int, error) {
	switch v := p.(type) {
	case int:
		return v, nil
	case string:
		if n, err := strconv.Atoi(v); err == nil {
			return n, nil
		}
		for _, c := range containers {
			for _, cp := range c.Ports {
				if cp.Name == v {
					return cp.ContainerPort, nil
				}
			}
		}
		return 0, fmt.Errorf("no container port named %q", v)
	}
	return 0, fmt.Errorf("port %v: want a number or a port name", p)
}

// podUser returns the uid and gid the container runs as, the image's USER
// when the manifest sets none.
func podUser(t *testing.T, pod kubePod, c kubeContainer) (int, int) {
	t.Helper()
	_, stages := parseDockerfile(t, filepath.Join(moduleRoot, "Dockerfile"))
	u, g, _ := strings.Cut(stages[len(stages)-1].last("USER"), ":")
	uid, gid := atoiOr0(u), atoiOr0(g)
	if v := pod.SecurityContext.RunAsUser; v != nil {
		uid = *v
	}
	if v := pod.SecurityContext.RunAsGroup; v != nil {
		gid = *v
	}
	if v := c.SecurityContext.RunAsUser; v != nil {
		uid = *v
	}
	if v := c.SecurityContext.RunAsGroup; v != nil {
		gid = *v
	}
	return uid, gid
}

// cpuQuantity parses a Kubernetes CPU quantity: "2", "1.5", "1500m".
func cpuQuantity(s string) (float64, error) {
	if m, ok := strings.CutSuffix(s, "m"); ok {
		n, err := strconv.ParseFloat(m, 64)
		return n / 1000, err
	}
	return strconv.ParseFloat(s, 64)
}

// podShoal is a Deployment's shoal container and what it asks of shoal.
type podShoal struct {
	where       string
	pod         kubePod
	labels      map[string]string
	annotations map[string]string
	container   kubeContainer
	cfg         shoalConfig
}

func podsOf(t *testing.T, docs []kubeDoc) []podShoal {
	t.Helper()
	defaults := flagDefaults(t, nil, -1, -1)
	var out []podShoal
	for _, d := range docs {
		if d.Kind != "Deployment" {
			continue
		}
		var dep kubeDeployment
		d.decode(t, &dep)
		where := d.file + ": Deployment " + d.Metadata.Name
		pod := dep.Spec.Template.Spec
		c := shoalContainer(t, where, pod)
		argv := containerArgv(c)
		out = append(out, podShoal{
			where:       where,
			pod:         pod,
			labels:      dep.Spec.Template.Metadata.Labels,
			annotations: dep.Spec.Template.Metadata.Annotations,
			container:   c,
			cfg:         newShoalConfig(t, where, argv[1:], containerEnv(t, c), defaults),
		})
		if !labelsSelect(dep.Spec.Selector.MatchLabels, dep.Spec.Template.Metadata.Labels) {
			t.Errorf("%s: selector %v does not select its pods %v", where, dep.Spec.Selector.MatchLabels, dep.Spec.Template.Metadata.Labels)
		}
	}
	if len(out) == 0 {
		t.Fatal("no Deployment in deploy/kubernetes")
	}
	return out
}

// TestManifestsAgreeWithBinary checks the values of deploy/kubernetes that
// must agree with shoal: ports, probes, the grace period, the scrape
// target, the worker count's CPU limit, and the security settings.
func TestManifestsAgreeWithBinary(t *testing.T) {
	docs := loadManifests(t)
	pods := podsOf(t, docs)
	for _, p := range pods {
		c, where := p.container, p.where
		appPort, metricsPort := p.cfg.port(t), p.cfg.metricsPort(t)

		// Container ports.
		byNumber := map[int]string{}
		for _, cp := range c.Ports {
			byNumber[cp.ContainerPort] = cp.Name
		}
		if _, ok := byNumber[appPort]; !ok {
			t.Errorf("%s: no containerPort %d, the port shoal's workers listen on", where, appPort)
		}
		if _, ok := byNumber[metricsPort]; !ok {
			t.Errorf("%s: no containerPort %d, shoal's metrics port", where, metricsPort)
		}

		// Probes: on the metrics port, /readyz and /healthz.
		for _, pr := range []struct {
			what, path string
			probe      *kubeProbe
		}{{"readinessProbe", "/readyz", c.ReadinessProbe}, {"livenessProbe", "/healthz", c.LivenessProbe}} {
			if pr.probe == nil || pr.probe.HTTPGet == nil {
				t.Errorf("%s: no %s.httpGet", where, pr.what)
				continue
			}
			port, err := resolvePort(pr.probe.HTTPGet.Port, c)
			if err != nil || port != metricsPort || pr.probe.HTTPGet.Path != pr.path {
				t.Errorf("%s: %s GET %s on port %v (%d, %v), want %s on %d", where, pr.what,
					pr.probe.HTTPGet.Path, pr.probe.HTTPGet.Port, port, err, pr.path, metricsPort)
			}
		}

		// Grace: the kubelet's SIGKILL after the preStop hook and shoal's
		// whole stop timeout.
		grace := 30 * time.Second // Kubernetes' default
		if g := p.pod.TerminationGracePeriodSeconds; g != nil {
			grace = time.Duration(*g) * time.Second
		}
		var preStop time.Duration
		if ps := c.Lifecycle.PreStop; ps != nil && ps.Sleep != nil {
			preStop = time.Duration(ps.Sleep.Seconds) * time.Second
		}
		stop := p.cfg.stopTimeout(t)
		if grace <= preStop+stop {
			t.Errorf("%s: terminationGracePeriodSeconds %s, want more than the preStop sleep %s + stop timeout %s", where, grace, preStop, stop)
		}

		// Scraping by annotation.
		ann := p.annotations
		if ann["prometheus.io/scrape"] != "true" || ann["prometheus.io/port"] != strconv.Itoa(metricsPort) || ann["prometheus.io/path"] != "/metrics" {
			t.Errorf("%s: prometheus.io annotations %v, want scrape \"true\", port \"%d\", path /metrics", where, ann, metricsPort)
		}

		// Workers: the default follows the CPU limit.
		if !p.cfg.set("workers") {
			cpu, ok := c.Resources.Limits["cpu"]
			if !ok {
				t.Errorf("%s: neither SHOAL_WORKERS nor limits.cpu: shoal would start one worker per CPU of the node", where)
			} else if n, err := cpuQuantity(cpu); err != nil || n <= 0 {
				t.Errorf("%s: limits.cpu %q: %v", where, cpu, err)
			} else {
				t.Logf("%s: limits.cpu %s: %d workers", where, cpu, int(math.Ceil(n)))
			}
		}

		// Security.
		psc, csc := p.pod.SecurityContext, c.SecurityContext
		if !(boolSet(psc.RunAsNonRoot) || boolSet(csc.RunAsNonRoot)) {
			t.Errorf("%s: runAsNonRoot not set", where)
		}
		uid, gid := podUser(t, p.pod, c)
		if uid == 0 {
			t.Errorf("%s: runs as uid 0", where)
		}
		if !boolSet(csc.ReadOnlyRootFilesystem) {
			t.Errorf("%s: readOnlyRootFilesystem not set", where)
		}
		if csc.AllowPrivilegeEscalation == nil || *csc.AllowPrivilegeEscalation {
			t.Errorf("%s: allowPrivilegeEscalation not false", where)
		}
		if !slices.Contains(csc.Capabilities.Drop, "ALL") || len(csc.Capabilities.Add) != 0 {
			t.Errorf("%s: capabilities drop %v add %v, want drop [ALL] and nothing added", where, csc.Capabilities.Drop, csc.Capabilities.Add)
		}
		if !slices.Contains(psc.Sysctls, kubeSysctl{"net.ipv4.tcp_migrate_req", "1"}) {
			t.Errorf("%s: securityContext.sysctls lacks net.ipv4.tcp_migrate_req=1", where)
		}

		// The control socket: with a read-only root, its directory must be
		// on a volume. Its default depends on the user and TMPDIR, so ask
		// the binary as that user with the container's environment.
		control := p.cfg.get("control")
		if !p.cfg.set("control") {
			if os.Getuid() != 0 {
				t.Logf("%s: not root: the control socket's default path for uid %d is not checked", where, uid)
			} else {
				env := []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/"}
				for k, v := range p.cfg.env {
					env = append(env, k+"="+v)
				}
				control = flagDefaults(t, env, uid, gid)["control"]
			}
		}
		if control != "" && boolSet(csc.ReadOnlyRootFilesystem) && (p.cfg.set("control") || os.Getuid() == 0) {
			onVolume := false
			for _, vm := range c.VolumeMounts {
				if strings.HasPrefix(control, strings.TrimSuffix(vm.MountPath, "/")+"/") {
					onVolume = true
				}
			}
			if !onVolume {
				t.Errorf("%s: the control socket %s is on the read-only root filesystem: mount a volume there, or set SHOAL_CONTROL", where, control)
			}
		}
		for _, vm := range c.VolumeMounts {
			if !slices.Contains(p.pod.Volumes, kubeVolume{vm.Name}) {
				t.Errorf("%s: volumeMount %s of no volume", where, vm.Name)
			}
		}

		// The environment is valid for the binary: 'shoal version' parses it
		// as a start would, and starts nothing.
		cmd := exec.Command(shoalBin, "version")
		cmd.Env = []string{"PATH=/usr/bin:/bin", noRaceSleep}
		for k, v := range p.cfg.env {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("%s: shoal rejects the container's environment: %v: %s", where, err, out)
		}
	}

	// Services and PodMonitors point at the pods' ports.
	kinds := map[string]int{}
	for _, d := range docs {
		kinds[d.Kind]++
		where := d.file + ": " + d.Kind + " " + d.Metadata.Name
		switch d.Kind {
		case "Deployment":
		case "Service":
			var svc kubeService
			d.decode(t, &svc)
			p := podSelectedBy(t, where, pods, svc.Spec.Selector)
			if len(svc.Spec.Ports) == 0 {
				t.Errorf("%s: no ports", where)
			}
			for _, sp := range svc.Spec.Ports {
				target := sp.TargetPort
				if target == nil {
					target = sp.Port
				}
				port, err := resolvePort(target, p.container)
				if err != nil || port != p.cfg.port(t) {
					t.Errorf("%s: port %d targets %v (%d, %v), want the workers' port %d", where, sp.Port, target, port, err, p.cfg.port(t))
				}
			}
		case "PodMonitor":
			if d.APIVersion != "monitoring.coreos.com/v1" {
				t.Errorf("%s: apiVersion %s, want monitoring.coreos.com/v1", where, d.APIVersion)
			}
			var pm kubePodMonitor
			d.decode(t, &pm)
			p := podSelectedBy(t, where, pods, pm.Spec.Selector.MatchLabels)
			if len(pm.Spec.PodMetricsEndpoints) == 0 {
				t.Errorf("%s: no podMetricsEndpoints", where)
			}
			for _, ep := range pm.Spec.PodMetricsEndpoints {
				var port any = ep.Port
				if ep.Port == "" {
					port = ep.TargetPort
				}
				n, err := resolvePort(port, p.container)
				path := firstNonEmpty(ep.Path, "/metrics")
				if err != nil || n != p.cfg.metricsPort(t) || path != "/metrics" || (ep.Scheme != "" && ep.Scheme != "http") {
					t.Errorf("%s: endpoint scheme %q port %v path %s (%d, %v), want http, port %d, /metrics", where, ep.Scheme, port, path, n, err, p.cfg.metricsPort(t))
				}
			}
		case "Kustomization":
			var k kustomization
			d.decode(t, &k)
			for _, r := range k.Resources {
				if _, err := os.Stat(filepath.Join(moduleRoot, "deploy", "kubernetes", r)); err != nil {
					t.Errorf("%s: resource %s: %v", where, r, err)
				}
			}
		default:
			t.Errorf("%s: no check for kind %s here: add one to this test", where, d.Kind)
		}
	}
	for _, k := range []string{"Deployment", "Service", "PodMonitor"} {
		if kinds[k] == 0 {
			t.Errorf("deploy/kubernetes has no %s", k)
		}
	}
}

func boolSet(b *bool) bool { return b != nil && *b }

// podSelectedBy returns the one pod the selector picks.
func podSelectedBy(t *testing.T, where string, pods []podShoal, selector map[string]string) podShoal {
	t.Helper()
	var out []podShoal
	for _, p := range pods {
		if labelsSelect(selector, p.labels) {
			out = append(out, p)
		}
	}
	if len(out) != 1 {
		t.Fatalf("%s: selector %v picks %d of the Deployments' pods, want 1", where, selector, len(out))
	}
	return out[0]
}

// TestManifestDeploymentRunsAsWritten runs each Deployment's shoal
// container the way the kubelet would, as far as one machine allows: as
// PID 1 of new PID and network namespaces, with the pod's sysctls, as the
// pod's user with no capabilities, with the container's command, arguments
// and environment, and a fresh writable directory standing in for the
// emptyDir at /tmp. Then it makes the pod's probes, requests through its
// Service's target port, scrapes it where the annotations and the
// PodMonitor say, runs 'shoal ctl status' as 'kubectl exec' would, and
// stops it with SIGTERM, as the kubelet does after the preStop hook.
func TestManifestDeploymentRunsAsWritten(t *testing.T) {
	if os.Getuid() != 0 {
		peer.Missing(t, "needs root, for a network namespace and the pod's user")
	}
	unshare, _ := pidNamespaceFlags(t)
	ip := peer.Require(t, "ip")
	setpriv := peer.Require(t, "setpriv")
	docs := loadManifests(t)
	for _, p := range podsOf(t, docs) {
		t.Run(strings.ReplaceAll(p.where, " ", "_"), func(t *testing.T) { runPodAsWritten(t, docs, p, unshare, ip, setpriv) })
	}
}

var (
	sysctlName  = regexp.MustCompile(`^[a-z0-9_]+(\.[a-z0-9_]+)+$`)
	sysctlValue = regexp.MustCompile(`^[0-9]+$`)
)

func runPodAsWritten(t *testing.T, docs []kubeDoc, p podShoal, unshare, ip, setpriv string) {
	c := p.container
	uid, gid := podUser(t, p.pod, c)
	tmp, err := os.MkdirTemp("", "shoal-pod-tmp-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(tmp) })
	if err := os.Chmod(tmp, 0o777); err != nil { // as an emptyDir
		t.Fatal(err)
	}

	var script strings.Builder
	script.WriteString("set -e\n" + ip + " link set lo up\n")
	for _, s := range p.pod.SecurityContext.Sysctls {
		if !sysctlName.MatchString(s.Name) || !sysctlValue.MatchString(s.Value) {
			t.Fatalf("sysctl %q=%q: this test sets only numeric values of plain names", s.Name, s.Value)
		}
		fmt.Fprintf(&script, "echo %s > /proc/sys/%s\n", s.Value, strings.ReplaceAll(s.Name, ".", "/"))
	}
	userFlags := []string{fmt.Sprintf("--reuid=%d", uid), fmt.Sprintf("--regid=%d", gid), "--clear-groups"}
	fmt.Fprintf(&script, `exec %s %s --inh-caps=-all --bounding-set=-all "$@"`, setpriv, strings.Join(userFlags, " "))

	argv := containerArgv(c)
	if argv[0] != "/shoal" {
		t.Fatalf("the container runs %q, not the image's /shoal", argv)
	}
	argv[0] = shoalBin
	env := []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/", "TMPDIR=" + tmp}
	for k, v := range p.cfg.env {
		env = append(env, k+"="+v)
	}
	pod := startNSInit(t, unshare, []string{"--net", "--pid", "--fork", "--mount-proc", "--kill-child"}, env, "shoal",
		append([]string{"sh", "-c", script.String(), "sh"}, argv...)...)
	if pod.host == 0 {
		t.Fatalf("shoal exited at once (%v)", pod.state)
	}
	client := netnsClient(t, pod.host)
	url := func(port any, path string) string {
		n, err := resolvePort(port, c)
		if err != nil {
			t.Fatal(err)
		}
		return fmt.Sprintf("http://127.0.0.1:%d%s", n, path)
	}

	// The probes, as the kubelet makes them.
	rp, lp := c.ReadinessProbe.HTTPGet, c.LivenessProbe.HTTPGet
	waitHTTPStatus(t, client, url(rp.Port, rp.Path), 200, 30*time.Second, pod.done)
	if code, body, err := httpGetWith(client, url(lp.Port, lp.Path)); err != nil || code != 200 {
		t.Errorf("livenessProbe GET %s: %d %q %v, want 200", lp.Path, code, body, err)
	}

	// Requests through each Service's target port.
	for _, d := range docs {
		if d.Kind != "Service" {
			continue
		}
		var svc kubeService
		d.decode(t, &svc)
		if !labelsSelect(svc.Spec.Selector, p.labels) {
			continue
		}
		for _, sp := range svc.Spec.Ports {
			target := sp.TargetPort
			if target == nil {
				target = sp.Port
			}
			if code, body, err := httpGetWith(client, url(target, "/")); err != nil || code != 200 || body != "hello world\n" {
				t.Errorf("Service %s port %d -> %v: GET / = %d %q %v, want 200 \"hello world\\n\"", d.Metadata.Name, sp.Port, target, code, body, err)
			}
		}
	}

	// Scrapes, where the annotations and each PodMonitor say.
	targets := []string{url(p.annotations["prometheus.io/port"], p.annotations["prometheus.io/path"])}
	for _, d := range docs {
		if d.Kind != "PodMonitor" {
			continue
		}
		var pm kubePodMonitor
		d.decode(t, &pm)
		if !labelsSelect(pm.Spec.Selector.MatchLabels, p.labels) {
			continue
		}
		for _, ep := range pm.Spec.PodMetricsEndpoints {
			targets = append(targets, url(ep.Port, firstNonEmpty(ep.Path, "/metrics")))
		}
	}
	for _, target := range targets {
		code, body, err := httpGetWith(client, target)
		if err != nil || code != 200 {
			t.Errorf("scrape %s: %d %v", target, code, err)
			continue
		}
		s := parseSamples(body)
		if s["shoal_workers_desired"] < 1 || s["shoal_workers_listening"] != s["shoal_workers_desired"] {
			t.Errorf("scrape %s: shoal_workers_desired %v, shoal_workers_listening %v", target, s["shoal_workers_desired"], s["shoal_workers_listening"])
		}
	}

	// kubectl exec POD -- /shoal ctl status: the container's user and
	// environment find the control socket.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ctl := exec.CommandContext(ctx, setpriv, append(userFlags, shoalBin, "ctl", "status")...)
	ctl.Env = append(slices.Clip(env), noRaceSleep)
	if out, err := ctl.CombinedOutput(); err != nil || !strings.Contains(string(out), "listening") {
		t.Errorf("shoal ctl status as uid %d: %v\n%s", uid, err, out)
	}

	// The pod's sysctl spares shoal its warning.
	if len(p.pod.SecurityContext.Sysctls) > 0 {
		if w := pod.logs.entries(func(e entry) bool { return strings.Contains(e.str("message"), "tcp_migrate_req is not 1") }); len(w) != 0 {
			t.Errorf("shoal warns about tcp_migrate_req despite the pod's sysctl: %v", w)
		}
	}

	// The kubelet's SIGTERM after the preStop hook: every worker drains
	// and shoal exits 0 within its stop timeout, inside the grace period.
	stop := p.cfg.stopTimeout(t)
	begin := time.Now()
	pod.signal(syscall.SIGTERM)
	if code := pod.wait(stop + 10*time.Second); code != 0 {
		t.Errorf("exit code after SIGTERM = %d, want 0", code)
	}
	if took := time.Since(begin); took > stop {
		t.Errorf("stop took %s, more than the stop timeout %s", took, stop)
	}
	pod.gone(2 * time.Second)
}

// netnsClient returns an HTTP client that connects from the network
// namespace of pid, as the kubelet's probes reach a pod's address.
func netnsClient(t *testing.T, pid int) *http.Client {
	t.Helper()
	ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", pid))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	fd := int(ns.Fd())
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		type result struct {
			c   net.Conn
			err error
		}
		ch := make(chan result, 1)
		go func() {
			// The socket is made in the namespace of the thread that makes
			// it. The thread is not unlocked: it ends with this goroutine
			// rather than serve others from inside the namespace.
			runtime.LockOSThread()
			if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
				ch <- result{nil, fmt.Errorf("setns: %w", err)}
				return
			}
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			ch <- result{c, err}
		}()
		r := <-ch
		return r.c, r.err
	}
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true}}
}

// parseSamples reads a Prometheus text page into each sample's value by its
// series, as written.
func parseSamples(text string) map[string]float64 {
	out := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			out[line[:i]] = v
		}
	}
	return out
}

// ---------------------------------------------------------------------------
// systemd

// systemdUnit is a unit file: section, key, values in order.
type systemdUnit map[string]map[string][]string

func (u systemdUnit) get(section, key string) string {
	v := u[section][key]
	if len(v) == 0 {
		return ""
	}
	return v[len(v)-1]
}

func parseUnit(t *testing.T, path string) systemdUnit {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	u := systemdUnit{}
	section := ""
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			u[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" || strings.HasSuffix(line, "\\") {
				t.Fatalf("%s:%d: %q: want KEY=VALUE in a section, on one line", path, i+1, line)
			}
			u[section][strings.TrimSpace(k)] = append(u[section][strings.TrimSpace(k)], strings.TrimSpace(v))
		}
	}
	return u
}

// systemdWords splits a value into words, with double quotes.
func systemdWords(s string) []string {
	var out []string
	var cur strings.Builder
	quoted, inWord := false, false
	for _, r := range s {
		switch {
		case r == '"':
			quoted, inWord = !quoted, true
		case r == ' ' && !quoted:
			if inWord {
				out = append(out, cur.String())
			}
			cur.Reset()
			inWord = false
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if inWord {
		out = append(out, cur.String())
	}
	return out
}

// systemdSpan parses a systemd time span: "30", "30s", "1min 30s", "2m".
func systemdSpan(s string) (time.Duration, error) {
	if n, err := strconv.Atoi(s); err == nil {
		return time.Duration(n) * time.Second, nil
	}
	s = strings.ReplaceAll(strings.ReplaceAll(s, " ", ""), "min", "m")
	return time.ParseDuration(s)
}

// TestSystemdUnit checks deploy/systemd/shoal.service against the binary:
// systemd signals shoal alone and waits longer than its stop timeout,
// reloads with SIGHUP, and sets an environment the binary accepts.
func TestSystemdUnit(t *testing.T) {
	const file = "deploy/systemd/shoal.service"
	u := parseUnit(t, filepath.Join(moduleRoot, file))
	for key, want := range map[string]string{
		"Type":       "exec",  // shoal does not speak sd_notify
		"KillMode":   "mixed", // SIGTERM to shoal alone, SIGKILL to what is left at the end
		"KillSignal": "SIGTERM",
		"Restart":    "on-failure",
	} {
		if got := u.get("Service", key); got != want {
			t.Errorf("%s: %s=%q, want %q", file, key, got, want)
		}
	}
	if r := u.get("Service", "ExecReload"); !regexp.MustCompile(`^(/usr)?/bin/kill\s+(-HUP|-SIGHUP|-s\s+HUP)\s+\$MAINPID$`).MatchString(r) {
		t.Errorf("%s: ExecReload=%q, want /bin/kill -HUP $MAINPID", file, r)
	}
	if !slices.Contains(strings.Fields(u.get("Service", "RestartPreventExitStatus")), "2") {
		t.Errorf("%s: RestartPreventExitStatus lacks 2: bad usage does not get better by restarting", file)
	}
	if u.get("Service", "DynamicUser") != "yes" && (u.get("Service", "User") == "" || u.get("Service", "User") == "root") {
		t.Errorf("%s: runs as root: set DynamicUser=yes or User=", file)
	}

	exe := systemdWords(u.get("Service", "ExecStart"))
	if len(exe) == 0 || !filepath.IsAbs(exe[0]) || filepath.Base(exe[0]) != "shoal" {
		t.Fatalf("%s: ExecStart=%q, want /PATH/shoal ...", file, u.get("Service", "ExecStart"))
	}
	env := map[string]string{}
	for _, line := range u["Service"]["Environment"] {
		for _, w := range systemdWords(line) {
			k, v, _ := strings.Cut(w, "=")
			env[k] = v
		}
	}
	cfg := newShoalConfig(t, file, exe[1:], env, flagDefaults(t, nil, -1, -1))
	stop := cfg.stopTimeout(t)
	timeout := 90 * time.Second // DefaultTimeoutStopSec
	if v := firstNonEmpty(u.get("Service", "TimeoutStopSec"), u.get("Service", "TimeoutSec")); v != "" {
		d, err := systemdSpan(v)
		if err != nil {
			t.Fatalf("%s: TimeoutStopSec=%q: %v", file, v, err)
		}
		timeout = d
	}
	if timeout <= stop {
		t.Errorf("%s: TimeoutStopSec %s, want more than shoal's stop timeout %s", file, timeout, stop)
	}
	if dir := u.get("Service", "RuntimeDirectory"); dir != "" && env["SHOAL_CONTROL"] != "" &&
		filepath.Dir(env["SHOAL_CONTROL"]) != filepath.Join("/run", dir) {
		t.Errorf("%s: SHOAL_CONTROL=%s is not in the RuntimeDirectory /run/%s", file, env["SHOAL_CONTROL"], dir)
	}

	// The binary accepts the environment: 'shoal version' parses it as a
	// start would, and starts nothing.
	cmd := exec.Command(shoalBin, "version")
	cmd.Env = []string{"PATH=/usr/bin:/bin", noRaceSleep}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("%s: shoal rejects the unit's environment: %v: %s", file, err, out)
	}

	// systemd's own check of the file, where systemd is installed.
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Logf("systemd-analyze not found: %s checked by this test only", file)
		return
	}
	root := t.TempDir()
	for _, key := range []string{"ExecStart", "ExecReload"} {
		w := systemdWords(u.get("Service", key))
		if len(w) == 0 {
			continue
		}
		p := filepath.Join(root, strings.TrimLeft(w[0], "-@+!:"))
		os.MkdirAll(filepath.Dir(p), 0o755)
		b, _ := os.ReadFile("/bin/true")
		os.WriteFile(p, b, 0o755)
	}
	units := filepath.Join(root, "usr/lib/systemd/system")
	os.MkdirAll(units, 0o755)
	for _, pat := range []string{"*.target", "*.slice"} {
		files, _ := filepath.Glob(filepath.Join("/usr/lib/systemd/system", pat))
		for _, f := range files {
			if l, err := os.Readlink(f); err == nil {
				os.Symlink(l, filepath.Join(units, filepath.Base(f)))
			} else if b, err := os.ReadFile(f); err == nil {
				os.WriteFile(filepath.Join(units, filepath.Base(f)), b, 0o644)
			}
		}
	}
	etc := filepath.Join(root, "etc/systemd/system")
	os.MkdirAll(etc, 0o755)
	b, _ := os.ReadFile(filepath.Join(moduleRoot, file))
	os.WriteFile(filepath.Join(etc, "shoal.service"), b, 0o644)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, analyze, "verify", "--man=no", "--root="+root, "/etc/systemd/system/shoal.service").CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) != 0 {
		t.Errorf("systemd-analyze verify %s: %v\n%s", file, err, out)
	}
}

func firstNonEmpty(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// ---------------------------------------------------------------------------
// Prometheus

// TestAlertRules checks deploy/prometheus/alerts.yml with promtool, runs
// its unit tests, and checks that every metric it names is one the binary
// serves.
func TestAlertRules(t *testing.T) {
	promtool := peer.Require(t, "promtool")
	dir := filepath.Join(moduleRoot, "deploy", "prometheus")
	for _, args := range [][]string{{"check", "rules", "alerts.yml"}, {"test", "rules", "alerts_test.yml"}} {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		cmd := exec.CommandContext(ctx, promtool, args...)
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		cancel()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}

	// The names, against a live scrape.
	port := freePort(t)
	addr := loopbackAddr(t)
	startShoal(t, nil, "--workers", "1", "--port", strconv.Itoa(port), "--host", "127.0.0.1", "--metrics-addr", addr)
	waitHTTPStatus(t, http.DefaultClient, "http://"+addr+"/readyz", 200, 15*time.Second, nil)
	samples := waitMetric(t, "http://"+addr+"/metrics", 15*time.Second, "a listening worker", func(s map[string]float64) bool {
		return s["shoal_workers_listening"] == 1
	})
	served := map[string]bool{}
	for series := range samples {
		name, _, _ := strings.Cut(series, "{")
		served[name] = true
	}
	names := regexp.MustCompile(`\b(?:shoal|process)_[a-z_]+\b`)
	for _, f := range []string{"alerts.yml", "alerts_test.yml"} {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			// Expressions and series, not the prose of descriptions.
			trimmed := strings.TrimSpace(line)
			if !strings.HasPrefix(trimmed, "expr:") && !strings.HasPrefix(trimmed, "- series:") {
				continue
			}
			for _, n := range names.FindAllString(trimmed, -1) {
				if !served[n] {
					t.Errorf("%s: %s is not a metric the binary serves: %s", f, n, trimmed)
				}
			}
		}
	}
}
