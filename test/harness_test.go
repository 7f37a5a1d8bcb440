// Package test holds shoal's end-to-end tests: they build the binary once,
// then drive it with real processes, ports and signals on loopback.
package test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/testutil"
)

// shoalBin is the binary under test, built once by TestMain.
var shoalBin string

func TestMain(m *testing.M) {
	if h := os.Getenv("E2E_HELPER"); h != "" {
		os.Exit(runHelper(h))
	}
	if bin := os.Getenv("E2E_SHOAL_BIN"); bin != "" {
		// A test run re-executed in a namespace reuses the parent's build.
		shoalBin = bin
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "shoal-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// Readable by every user: a test runs 'shoal ctl' as nobody.
	os.Chmod(dir, 0o755)
	shoalBin = filepath.Join(dir, "shoal")
	args := []string{"build", "-o", shoalBin}
	if raceEnabled {
		args = append(args, "-race")
	}
	build := exec.Command("go", append(args, "..")...)
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "build shoal: %v\n", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// entry is one JSON log line of the master.
type entry map[string]any

func (e entry) str(k string) string { s, _ := e[k].(string); return s }
func (e entry) num(k string) int    { f, _ := e[k].(float64); return int(f) }

// logs collects the master's stderr, line by line.
type logs struct {
	mu      sync.Mutex
	partial []byte
	lines   []string
	changed chan struct{}
}

func newLogs() *logs { return &logs{changed: make(chan struct{})} }

func (l *logs) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.partial = append(l.partial, p...)
	for {
		i := bytes.IndexByte(l.partial, '\n')
		if i < 0 {
			break
		}
		l.lines = append(l.lines, string(l.partial[:i]))
		l.partial = l.partial[i+1:]
	}
	close(l.changed)
	l.changed = make(chan struct{})
	return len(p), nil
}

func (l *logs) snapshot() ([]string, chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.lines...), l.changed
}

func (l *logs) String() string {
	lines, _ := l.snapshot()
	return strings.Join(lines, "\n")
}

// entries returns the JSON lines that match.
func (l *logs) entries(match func(entry) bool) []entry {
	lines, _ := l.snapshot()
	var out []entry
	for _, line := range lines {
		var e entry
		if json.Unmarshal([]byte(line), &e) != nil {
			continue
		}
		if match(e) {
			out = append(out, e)
		}
	}
	return out
}

// master is one shoal process under test.
type master struct {
	t      *testing.T
	cmd    *exec.Cmd
	logs   *logs
	stdout *logs
	done   chan struct{}
	state  *os.ProcessState
}

// startShoal starts the binary with args and env (added to the test's).
// The process is killed and reaped when the test ends.
func startShoal(t *testing.T, env []string, args ...string) *master {
	t.Helper()
	return startShoalVia(t, nil, env, args...)
}

// startShoalVia starts the binary as startShoal does, through wrapper (a
// command such as prlimit or setpriv that execs its arguments).
func startShoalVia(t *testing.T, wrapper []string, env []string, args ...string) *master {
	t.Helper()
	m := newMaster(t)
	argv := append(append(append([]string(nil), wrapper...), shoalBin), args...)
	m.cmd = exec.Command(argv[0], argv[1:]...)
	m.cmd.Env = testEnv(env...)
	m.launch()
	return m
}

// testEnv is the environment of a master under test: the test's, JSON
// logs at debug level, no metrics or control socket and the host's
// sysctls left alone unless the arguments say otherwise, then env.
func testEnv(env ...string) []string {
	return append(append(os.Environ(), "SHOAL_LOG_FORMAT=json", "SHOAL_LOG_LEVEL=debug", "SHOAL_METRICS_ADDR=", "SHOAL_CONTROL=", "SHOAL_MIGRATE_REQ=off"), env...)
}

// newMaster returns a master of t whose command is yet to be set.
func newMaster(t *testing.T) *master {
	return &master{t: t, logs: newLogs(), stdout: newLogs(), done: make(chan struct{})}
}

// launch starts m.cmd, its stderr into m.logs and, unless set, its stdout
// into m.stdout; the process is killed and reaped when the test ends, and
// its log shown when the test failed.
func (m *master) launch() {
	t := m.t
	t.Helper()
	m.cmd.Stderr = m.logs
	if m.cmd.Stdout == nil {
		m.cmd.Stdout = m.stdout
	}
	if err := m.cmd.Start(); err != nil {
		t.Fatalf("start %v: %v", m.cmd.Args, err)
	}
	go func() {
		m.cmd.Wait()
		m.state = m.cmd.ProcessState
		close(m.done)
	}()
	t.Cleanup(func() {
		select {
		case <-m.done:
		default:
			m.cmd.Process.Kill()
			select {
			case <-m.done:
			case <-time.After(10 * time.Second):
				t.Errorf("shoal (pid %d) not reaped 10s after SIGKILL", m.cmd.Process.Pid)
			}
		}
		if t.Failed() {
			t.Logf("shoal log (last 200 lines):\n%s\nstdout (last 20 lines):\n%s", tail(m.logs.String(), 200), tail(m.stdout.String(), 20))
		}
	})
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func (m *master) pid() int { return m.cmd.Process.Pid }

// signal sends sig to the master.
func (m *master) signal(sig syscall.Signal) {
	m.t.Helper()
	if err := m.cmd.Process.Signal(sig); err != nil {
		m.t.Fatalf("signal shoal: %v", err)
	}
}

// wait waits for the master to exit and returns its exit code.
func (m *master) wait(timeout time.Duration) int {
	m.t.Helper()
	select {
	case <-m.done:
		return m.state.ExitCode()
	case <-time.After(timeout):
		m.t.Fatalf("shoal did not exit within %s", timeout)
		return -1
	}
}

// waitFor waits until match holds for at least n log entries and returns
// them.
func (m *master) waitFor(timeout time.Duration, n int, what string, match func(entry) bool) []entry {
	m.t.Helper()
	deadline := time.After(timeout)
	for {
		_, changed := m.logs.snapshot()
		if got := m.logs.entries(match); len(got) >= n {
			return got
		}
		select {
		case <-changed:
		case <-m.done:
			if got := m.logs.entries(match); len(got) >= n {
				return got
			}
			m.t.Fatalf("shoal exited (%v) before %s", m.state, what)
		case <-deadline:
			m.t.Fatalf("no %s within %s", what, timeout)
		}
	}
}

func msg(text string) func(entry) bool {
	return func(e entry) bool { return e.str("message") == text }
}

// listening waits until n distinct slots have a listening worker and
// returns the newest pid of each slot.
func (m *master) listening(timeout time.Duration, n int) map[int]int {
	m.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		pids := m.current()
		if len(pids) >= n {
			return pids
		}
		if time.Now().After(deadline) {
			m.t.Fatalf("want %d listening workers within %s, have %v", n, timeout, pids)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// current returns, per slot, the pid of its live listening worker, read
// from the log: the last "worker listening" not followed by its death.
func (m *master) current() map[int]int {
	out := map[int]int{}
	for _, e := range m.logs.entries(func(e entry) bool {
		return e.str("message") == "worker listening" || e.str("message") == "worker died"
	}) {
		if e.str("message") == "worker listening" {
			out[e.num("worker")] = e.num("pid")
		} else if out[e.num("worker")] == e.num("pid") {
			delete(out, e.num("worker"))
		}
	}
	return out
}

// get does one HTTP request on a fresh connection and returns the body.
func get(t *testing.T, url string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// procStat is what /proc/PID/stat says of a process.
type procStat struct {
	pid, ppid   int
	state, comm string
	ticks       int // user and system CPU time, in clock ticks
}

// readStat reads /proc/PID/stat; ok is false when the process is gone.
func readStat(pid int) (st procStat, ok bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return st, false
	}
	s := string(b)
	lp, rp := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if lp < 0 || rp < lp {
		return st, false
	}
	f := strings.Fields(s[rp+1:])
	if len(f) < 13 {
		return st, false
	}
	st = procStat{pid: pid, state: f[0], comm: s[lp+1 : rp]}
	st.ppid, _ = strconv.Atoi(f[1])
	utime, _ := strconv.Atoi(f[11])
	stime, _ := strconv.Atoi(f[12])
	st.ticks = utime + stime
	return st, true
}

// allStats reads /proc/PID/stat of every process.
func allStats() []procStat {
	dirs, _ := os.ReadDir("/proc")
	var out []procStat
	for _, d := range dirs {
		if pid, err := strconv.Atoi(d.Name()); err == nil {
			if st, ok := readStat(pid); ok {
				out = append(out, st)
			}
		}
	}
	return out
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	st, ok := readStat(pid)
	return ok && st.state != "Z"
}

// waitGone waits until none of pids is alive.
func waitGone(t *testing.T, timeout time.Duration, pids ...int) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var left []int
		for _, p := range pids {
			if alive(p) {
				left = append(left, p)
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			for _, p := range left {
				syscall.Kill(p, syscall.SIGKILL)
			}
			t.Fatalf("processes %v still alive %s later", left, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// zombiesOf returns the zombie children of ppid.
func zombiesOf(ppid int) []int {
	var out []int
	for _, st := range allStats() {
		if st.state == "Z" && st.ppid == ppid {
			out = append(out, st.pid)
		}
	}
	return out
}

// environ returns a process's environment as a map.
func environ(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
	if err != nil {
		t.Fatalf("read environment of pid %d: %v", pid, err)
	}
	out := map[string]string{}
	for _, kv := range strings.Split(string(b), "\x00") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			out[k] = v
		}
	}
	return out
}

// scrape fetches a Prometheus text page and returns each sample's value by
// its series, as written: `name{label="v",...}`.
func scrape(t *testing.T, url string) map[string]float64 {
	t.Helper()
	s, err := tryScrape(url)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func tryScrape(url string) (map[string]float64, error) {
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return nil, fmt.Errorf("scrape %s: %s", url, resp.Status)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", url, err)
	}
	return parseSamples(string(b)), nil
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

// sumOf adds the samples of one metric name.
func sumOf(samples map[string]float64, name string) float64 {
	var sum float64
	for series, v := range samples {
		if series == name || strings.HasPrefix(series, name+"{") {
			sum += v
		}
	}
	return sum
}

// waitMetric polls url until f(samples) holds.
func waitMetric(t *testing.T, url string, timeout time.Duration, what string, f func(map[string]float64) bool) map[string]float64 {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		s, err := tryScrape(url)
		if err == nil && f(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not seen within %s; last scrape: %v", what, timeout, s)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// loopbackAddr returns a free 127.0.0.1 address.
func loopbackAddr(t *testing.T) string {
	return fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
}

// noRaceSleep is added to the environment of the binary under test: built
// with -race, it would sleep 1s at exit (GORACE atexit_sleep_ms), which
// would count against the stop times measured here.
const noRaceSleep = "GORACE=atexit_sleep_ms=0"

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
