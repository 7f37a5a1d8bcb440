package test

import (
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

	"github.com/shoal-sh/shoal/control"
	"github.com/shoal-sh/shoal/internal/testutil"
)

// nextVersion is the version stamped on the second binary of the upgrade
// tests; the first is the one TestMain built, version "dev".
const nextVersion = "e2e-next"

var nextBuild struct {
	once sync.Once
	path string
	err  error
}

// shoalNext returns a build of shoal like shoalBin's but of version
// nextVersion, built once.
func shoalNext(t *testing.T) string {
	t.Helper()
	nextBuild.once.Do(func() {
		nextBuild.path = filepath.Join(filepath.Dir(shoalBin), "shoal-"+nextVersion)
		args := []string{"build", "-o", nextBuild.path, "-ldflags", "-X main.version=" + nextVersion}
		if raceEnabled {
			args = append(args, "-race")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		if out, err := exec.CommandContext(ctx, "go", append(args, "..")...).CombinedOutput(); err != nil {
			nextBuild.err = fmt.Errorf("build shoal %s: %v: %s", nextVersion, err, out)
		}
	})
	if nextBuild.err != nil {
		t.Fatal(nextBuild.err)
	}
	return nextBuild.path
}

// install puts a copy of src at dst the way an operator replaces a running
// binary: a new file renamed over the old path.
func install(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	tmp := dst + ".new"
	if err := os.WriteFile(tmp, b, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(tmp, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		t.Fatal(err)
	}
}

// askStatus asks the control socket directly, as a monitor would.
func askStatus(ctx context.Context, sock string) (control.Status, error) {
	c, err := control.Dial(sock)
	if err != nil {
		return control.Status{}, err
	}
	defer c.Close()
	return c.Status(ctx)
}

func mustStatus(t *testing.T, sock string) control.Status {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := askStatus(ctx, sock)
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	return st
}

func workerPIDs(st control.Status) map[int]int {
	out := map[int]int{}
	for _, w := range st.Workers {
		out[w.Slot] = w.PID
	}
	return out
}

// watcher asks the control socket and /healthz over and over, each on a
// new connection, and keeps the longest wait for an answer and what
// failed.
type watcher struct {
	stop     chan struct{}
	done     sync.WaitGroup
	mu       sync.Mutex
	longest  map[string]time.Duration
	failures []string
	answers  map[string]int
}

func watch(sock, metricsURL string) *watcher {
	w := &watcher{stop: make(chan struct{}), longest: map[string]time.Duration{}, answers: map[string]int{}}
	probe := func(name string, ask func() error) {
		defer w.done.Done()
		for {
			select {
			case <-w.stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			begin := time.Now()
			err := ask()
			took := time.Since(begin)
			w.mu.Lock()
			if err != nil {
				w.failures = append(w.failures, fmt.Sprintf("%s: %v", name, err))
			} else {
				w.answers[name]++
			}
			w.longest[name] = max(w.longest[name], took)
			w.mu.Unlock()
		}
	}
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	w.done.Add(2)
	go probe("ctl status", func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := askStatus(ctx, sock)
		return err
	})
	go probe("/healthz", func() error {
		resp, err := client.Get(metricsURL + "/healthz")
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return nil
	})
	return w
}

func (w *watcher) finish() (map[string]time.Duration, map[string]int, []string) {
	close(w.stop)
	w.done.Wait()
	return w.longest, w.answers, w.failures
}

// countFDs returns the number of pid's open descriptors.
func countFDs(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// startUpgradable starts the master under test from a copy of shoalBin in
// a directory of the test's, the path an upgrade replaces, with a control
// socket beside it and args, and returns it with the path and the socket.
func startUpgradable(t *testing.T, args ...string) (m *master, path, sock string) {
	t.Helper()
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	path, sock = filepath.Join(dir, "shoal"), filepath.Join(dir, "ctl.sock")
	install(t, shoalBin, path, 0o755)
	m = newMaster(t)
	m.cmd = exec.Command(path, append([]string{"--control", sock}, args...)...)
	// The master runs the new program's 'upgrade-check', which exits: not
	// a second late, as a -race build would.
	m.cmd.Env = testEnv(noRaceSleep)
	m.launch()
	return m, path, sock
}

// upgradeTo installs bin at path and runs 'shoal ctl upgrade'.
func upgradeTo(t *testing.T, sock, bin, path string) string {
	t.Helper()
	install(t, bin, path, 0o755)
	out, code := ctl(t, sock, "upgrade")
	if code != 0 {
		t.Fatalf("shoal ctl upgrade: exit %d: %s", code, out)
	}
	return out
}

// TestUpgradeInPlaceUnderLoad: 4 built-in workers serve clients that never
// retry, on new connections and keep-alive ones, while the master replaces
// its own program with a build of another version. Nothing restarts, no
// request fails, the counters go on, and the control socket and /healthz
// answer throughout. Then five more upgrades back and forth leave no
// descriptor or goroutine behind, and the new master does what the old one
// did: it replaces a killed worker and stops everything on SIGTERM.
func TestUpgradeInPlaceUnderLoad(t *testing.T) {
	next := shoalNext(t)
	port, maddr := testutil.FreePort(t), loopbackAddr(t)
	murl := "http://" + maddr
	m, path, sock := startUpgradable(t, "--workers", "4", "--port", strconv.Itoa(port), "--host", "127.0.0.1", "--metrics-addr", maddr)
	m.listening(15*time.Second, 4)
	before := mustStatus(t, sock)
	if before.Version != "dev" || before.Upgrades != 0 {
		t.Fatalf("before: version %q, %d upgrades; want dev, 0", before.Version, before.Upgrades)
	}

	addr := fmt.Sprintf("127.0.0.1:%d", port)
	loads := map[string]*load{"new connection": startLoad(addr, 4, false), "keep-alive": startLoad(addr, 4, true)}
	time.Sleep(500 * time.Millisecond)
	mid := mustStatus(t, sock)
	startBefore := scrape(t, murl+"/metrics")["process_start_time_seconds"]
	w := watch(sock, murl)
	time.Sleep(100 * time.Millisecond)
	begin := time.Now()
	out := upgradeTo(t, sock, next, path)
	took := time.Since(begin)
	time.Sleep(500 * time.Millisecond)
	longest, answers, failures := w.finish()
	res := finishAll(loads)
	after := mustStatus(t, sock)
	t.Logf("ctl upgrade took %s: %s", took, strings.TrimSpace(out))
	t.Logf("under load: %d requests answered, %d failed (%s); longest wait for an answer: ctl status %s (%d answers), /healthz %s (%d answers)",
		res.ok, res.failed, describe(res.reasons), longest["ctl status"], answers["ctl status"], longest["/healthz"], answers["/healthz"])

	if after.Master.PID != m.pid() || after.Version != nextVersion || after.Upgrades != 1 {
		t.Errorf("after: master pid %d version %q upgrades %d; want pid %d, %s, 1", after.Master.PID, after.Version, after.Upgrades, m.pid(), nextVersion)
	}
	if after.Master.Uptime < mid.Master.Uptime {
		t.Errorf("the master's uptime went from %vs to %vs: want it to go on", mid.Master.Uptime, after.Master.Uptime)
	}
	if got, want := workerPIDs(after), workerPIDs(before); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("worker pids %v after the upgrade, want the same as before: %v", got, want)
	}
	if res.failed != 0 || res.ok == 0 {
		t.Errorf("%d requests failed, %d answered: want 0 failed", res.failed, res.ok)
	}
	if len(failures) > 0 {
		t.Errorf("%d probes of the control socket and /healthz failed during the upgrade: %v", len(failures), failures[:min(5, len(failures))])
	}
	for i, wk := range after.Workers {
		if wk.Requests < mid.Workers[i].Requests {
			t.Errorf("worker %d: %d requests after the upgrade, %d before: the counter went back", wk.Slot, wk.Requests, mid.Workers[i].Requests)
		}
	}
	// Every report the workers sent reached the master once: the count
	// is what the clients saw answered, plus at most one request in
	// flight per connection when the clients stopped.
	var counted float64
	samples := waitMetric(t, murl+"/metrics", 5*time.Second, "every request counted", func(s map[string]float64) bool {
		counted = sumOf(s, "shoal_requests_total")
		return counted >= float64(res.ok)
	})
	if counted > float64(res.ok)+8 {
		t.Errorf("shoal_requests_total %v for %d requests answered: reports were counted twice", counted, res.ok)
	}
	t.Logf("shoal_requests_total %v for %d requests the clients saw answered", counted, res.ok)
	if s := samples["process_start_time_seconds"]; s != startBefore {
		t.Errorf("process_start_time_seconds %v after the upgrade, %v before: the process is the same", s, startBefore)
	}
	if samples[`shoal_upgrades_total`] != 1 || samples[`shoal_build_info{goversion="`+goVersion(samples)+`",version="`+nextVersion+`"}`] != 1 {
		t.Errorf("after the upgrade: shoal_upgrades_total %v, build_info %v", samples["shoal_upgrades_total"], buildInfo(samples))
	}

	// Back and forth: nothing grows in the master.
	fds0, gr0 := 0, 0.0
	bins := []string{shoalBin, next}
	for i := range 5 {
		if i == 2 {
			// A script's view: one JSON line, on stdout alone.
			install(t, bins[i%2], path, 0o755)
			stdout, stderr, code := ctlSplit(t, "--control", sock, "--json", "upgrade")
			var r struct {
				OK     bool `json:"ok"`
				Result struct {
					From        string `json:"from"`
					To          string `json:"to"`
					PID         int    `json:"pid"`
					WorkersKept int    `json:"workers_kept"`
					Upgrades    int    `json:"upgrades"`
				} `json:"result"`
			}
			if err := json.Unmarshal([]byte(stdout), &r); err != nil || code != 0 {
				t.Fatalf("shoal ctl --json upgrade: exit %d, stdout %q, stderr %q: want one JSON line (%v)", code, stdout, stderr, err)
			}
			if !r.OK || r.Result.From != nextVersion || r.Result.To != "dev" || r.Result.PID != m.pid() || r.Result.WorkersKept != 4 || r.Result.Upgrades != 4 {
				t.Errorf("shoal ctl --json upgrade: %s; want ok, from %s to dev, pid %d, 4 workers kept, 4 upgrades", stdout, nextVersion, m.pid())
			}
			continue
		}
		upgradeTo(t, sock, bins[i%2], path)
		if i == 0 {
			time.Sleep(200 * time.Millisecond)
			fds0, gr0 = countFDs(t, m.pid()), scrape(t, murl+"/metrics")["go_goroutines"]
		}
	}
	time.Sleep(200 * time.Millisecond)
	fds1, gr1 := countFDs(t, m.pid()), scrape(t, murl+"/metrics")["go_goroutines"]
	st := mustStatus(t, sock)
	t.Logf("after upgrades 2 and 6: %d and %d descriptors, %v and %v goroutines; version %s, %d upgrades", fds0, fds1, gr0, gr1, st.Version, st.Upgrades)
	if fds1 > fds0 || gr1 > gr0+2 {
		t.Errorf("the master grew over 4 upgrades: %d -> %d descriptors, %v -> %v goroutines", fds0, fds1, gr0, gr1)
	}
	if st.Version != "dev" || st.Upgrades != 6 || fmt.Sprint(workerPIDs(st)) != fmt.Sprint(workerPIDs(before)) {
		t.Errorf("after 6 upgrades: version %q, %d upgrades, pids %v (want dev, 6, %v)", st.Version, st.Upgrades, workerPIDs(st), workerPIDs(before))
	}

	// The new master reaps and replaces a killed worker...
	victim := st.Workers[1].PID
	syscall.Kill(victim, syscall.SIGKILL)
	m.waitFor(10*time.Second, 1, "the killed worker replaced", func(e entry) bool {
		return e.str("message") == "worker started" && e.num("worker") == 2 && e.num("pid") != victim
	})
	waitGone(t, 5*time.Second, victim)
	if z := zombiesOf(m.pid()); len(z) > 0 {
		t.Errorf("zombies of the master after the upgrade: %v", z)
	}
	// ...and stops everything on SIGTERM.
	m.listening(10*time.Second, 4)
	pids := workerPIDs(mustStatus(t, sock))
	m.signal(syscall.SIGTERM)
	if code := m.wait(20 * time.Second); code != 0 {
		t.Errorf("exit code %d after SIGTERM, want 0", code)
	}
	for _, pid := range pids {
		waitGone(t, 5*time.Second, pid)
	}
}

func goVersion(s map[string]float64) string {
	for k := range s {
		if rest, ok := strings.CutPrefix(k, `shoal_build_info{goversion="`); ok {
			v, _, _ := strings.Cut(rest, `"`)
			return v
		}
	}
	return ""
}

func buildInfo(s map[string]float64) []string {
	var out []string
	for k := range s {
		if strings.HasPrefix(k, "shoal_build_info") {
			out = append(out, k)
		}
	}
	return out
}

// TestUpgradeRefused: a program at the master's path that is not
// executable, is not shoal, or fails its check is refused with a reason and
// exit code 1, and the master and its workers go on unchanged.
func TestUpgradeRefused(t *testing.T) {
	m, path, sock := startUpgradable(t, "--workers", "2", "--port", strconv.Itoa(testutil.FreePort(t)), "--host", "127.0.0.1")
	dir := filepath.Dir(path)
	m.listening(15*time.Second, 2)
	before := mustStatus(t, sock)
	exitsAtOnce := filepath.Join(dir, "exits-at-once")
	os.WriteFile(exitsAtOnce, []byte("#!/bin/sh\nexit 3\n"), 0o755)
	for _, tc := range []struct {
		name, src string
		mode      os.FileMode
		want      string
	}{
		{"not executable", shoalBin, 0o644, "not executable"},
		{"/bin/true", "/bin/true", 0o755, "not a shoal check line"},
		{"exits at once", exitsAtOnce, 0o755, "ended with exit status 3"},
	} {
		install(t, tc.src, path, tc.mode)
		out, code := ctl(t, sock, "upgrade")
		t.Logf("%s: exit %d: %s", tc.name, code, strings.TrimSpace(out))
		if code != 1 || !strings.Contains(out, tc.want) || !strings.Contains(out, path) {
			t.Errorf("%s: exit %d, %q; want exit 1 naming %s and saying %q", tc.name, code, out, path, tc.want)
		}
		st := mustStatus(t, sock)
		if st.Master.PID != m.pid() || st.Version != "dev" || st.Upgrades != 0 || fmt.Sprint(workerPIDs(st)) != fmt.Sprint(workerPIDs(before)) {
			t.Errorf("%s: the master changed after a refused upgrade: %+v, was %+v", tc.name, st, before)
		}
	}
	os.Remove(path)
	if out, code := ctl(t, sock, "upgrade"); code != 1 || !strings.Contains(out, "no such file") {
		t.Errorf("missing program: exit %d, %q; want exit 1 saying no such file", code, out)
	}
	var refused struct {
		OK    bool   `json:"ok"`
		Error string `json:"error"`
	}
	if out, errOut, code := ctlSplit(t, "--control", sock, "--json", "upgrade"); code != 1 || json.Unmarshal([]byte(out), &refused) != nil || refused.OK || !strings.Contains(refused.Error, "no such file") || !strings.Contains(errOut, "no such file") {
		t.Errorf("missing program, --json: exit %d, stdout %q, stderr %q; want exit 1, {\"ok\":false,\"error\":...no such file...} on stdout and the reason on stderr", code, out, errOut)
	}
	// SIGUSR2 with a refused program: a log line, nothing else.
	install(t, "/bin/true", path, 0o755)
	m.signal(syscall.SIGUSR2)
	m.waitFor(10*time.Second, 1, "SIGUSR2's refusal logged", msg("upgrade refused: shoal runs on as it was"))
	if st := mustStatus(t, sock); fmt.Sprint(workerPIDs(st)) != fmt.Sprint(workerPIDs(before)) {
		t.Errorf("workers changed after a refused SIGUSR2: %v, were %v", workerPIDs(st), workerPIDs(before))
	}
}

// TestUpgradeKeepsWorkersTiedToTheMaster: a worker survives two upgrades
// by SIGUSR2 (its parent-death signal follows the thread that forked it,
// which every exec keeps), and after them the workers still die with the
// master, both the first workers and one the upgraded master started.
func TestUpgradeKeepsWorkersTiedToTheMaster(t *testing.T) {
	next := shoalNext(t)
	m, path, sock := startUpgradable(t, "--workers", "2", "--port", strconv.Itoa(testutil.FreePort(t)), "--host", "127.0.0.1")
	m.listening(15*time.Second, 2)
	first := mustStatus(t, sock).Workers[1].PID // worker 2 is never killed
	for i, bin := range []string{next, shoalBin} {
		install(t, bin, path, 0o755)
		m.signal(syscall.SIGUSR2)
		testutil.Eventually(t, 10*time.Second, "the upgrade by SIGUSR2", func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			st, err := askStatus(ctx, sock)
			return err == nil && st.Upgrades == uint64(i+1)
		})
		if i == 0 {
			// A worker the upgraded master forks itself.
			victim := mustStatus(t, sock).Workers[0].PID
			syscall.Kill(victim, syscall.SIGKILL)
			testutil.Eventually(t, 10*time.Second, "worker 1 replaced", func() bool {
				st := mustStatus(t, sock)
				return st.Workers[0].PID != victim && st.Workers[0].State == "listening"
			})
		}
	}
	pids := workerPIDs(mustStatus(t, sock))
	// Forked by the first program, it survived two execs: its parent
	// thread is the one every exec runs on.
	if pids[2] != first {
		t.Errorf("worker 2 is pid %d after two upgrades, was %d: an exec killed its parent thread", pids[2], first)
	}
	m.cmd.Process.Kill()
	for _, pid := range pids {
		waitGone(t, 5*time.Second, pid)
	}
}

// TestUpgradeAsPID1: shoal as a container's PID 1 upgrades in place and
// stays PID 1; the new program reaps the orphans of a worker it started,
// and stops everything on SIGTERM.
func TestUpgradeAsPID1(t *testing.T) {
	next := shoalNext(t)
	script, err := filepath.Abs(filepath.Join("testdata", "pid1-orphans.sh"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	path := filepath.Join(dir, "shoal")
	install(t, shoalBin, path, 0o755)
	sock := filepath.Join(dir, "ctl.sock")
	unshare, flags := pidNamespaceFlags(t)
	env := append(os.Environ(), "SHOAL_LOG_FORMAT=json", "SHOAL_LOG_LEVEL=debug", "SHOAL_METRICS_ADDR=", "SHOAL_ENV=PID1_ORPHANS", "PID1_ORPHANS=3")
	p := startNSInit(t, unshare, flags, env, "shoal", path, "--workers", "2", "--port", "0", "--control", sock, "--stop-timeout", "1s", "--", "sh", script)
	p.waitFor(10*time.Second, 6, "the first workers' 6 orphans reaped", msg("reaped an orphan"))
	before := mustStatus(t, sock)

	out := upgradeTo(t, sock, next, path)
	t.Logf("%s", strings.TrimSpace(out))
	after := mustStatus(t, sock)
	if after.Master.PID != 1 || after.Version != nextVersion || fmt.Sprint(workerPIDs(after)) != fmt.Sprint(workerPIDs(before)) {
		t.Fatalf("after the upgrade: pid %d, version %q, workers %v; want PID 1, %s, %v", after.Master.PID, after.Version, workerPIDs(after), nextVersion, workerPIDs(before))
	}
	if ns := nsPIDs(p.host); len(ns) == 0 || ns[len(ns)-1] != 1 {
		t.Fatalf("the master (host pid %d) is no longer PID 1 of its namespace: NSpid %v", p.host, ns)
	}
	// A worker killed now is replaced by the new program, whose orphans
	// it reaps.
	victim := 0
	for _, pr := range p.members() {
		if ns := nsPIDs(pr.pid); len(ns) > 0 && ns[len(ns)-1] == after.Workers[0].PID {
			victim = pr.pid
		}
	}
	if victim == 0 {
		t.Fatalf("worker 1 (pid %d in the namespace) not found on the host", after.Workers[0].PID)
	}
	syscall.Kill(victim, syscall.SIGKILL)
	p.waitFor(10*time.Second, 9, "the new worker's 3 orphans reaped too", msg("reaped an orphan"))
	p.noZombies(2 * time.Second)
	p.signal(syscall.SIGTERM)
	if code := p.wait(15 * time.Second); code != 0 {
		t.Errorf("exit code %d after SIGTERM, want 0", code)
	}
	p.gone(2 * time.Second)
}

// TestUpgradeKeepsHandOffSocketsAndSteering: with --bind master and
// round-robin steering, the upgraded master keeps the slots' sockets and
// the steering program with its maps: no request fails during the upgrade,
// the steered counts go on, connections are still dealt in turn, and a
// slot added after the upgrade joins the adopted map.
func TestUpgradeKeepsHandOffSocketsAndSteering(t *testing.T) {
	next := shoalNext(t)
	port, maddr := testutil.FreePort(t), loopbackAddr(t)
	m, path, sock := startUpgradable(t, "--bind", "master", "--steering", "round-robin", "--workers", "4", "--port", strconv.Itoa(port),
		"--host", "127.0.0.1", "--metrics-addr", maddr)
	m.listening(15*time.Second, 4)
	time.Sleep(100 * time.Millisecond)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	murl := "http://" + maddr + "/metrics"
	steered := func(n int) []float64 {
		s := scrape(t, murl)
		var out []float64
		for w := 1; w <= n; w++ {
			out = append(out, s[fmt.Sprintf(`shoal_worker_steered_connections_total{worker="%d"}`, w)])
		}
		return out
	}
	// dealt opens n short connections and returns how many the program
	// steered to each worker meanwhile.
	dealt := func(workers, n int) []float64 {
		before := steered(workers)
		l := startLoad(addr, 1, false)
		for sum := 0.0; sum < float64(n); {
			time.Sleep(10 * time.Millisecond)
			sum = 0
			for i, v := range steered(workers) {
				sum += v - before[i]
			}
			if sum >= float64(n) {
				break
			}
		}
		l.finish()
		after := steered(workers)
		for i := range after {
			after[i] -= before[i]
		}
		return after
	}
	even := func(d []float64) bool {
		lo, hi := d[0], d[0]
		for _, v := range d {
			lo, hi = min(lo, v), max(hi, v)
		}
		return lo > 0 && hi-lo <= 1
	}
	if d := dealt(4, 400); !even(d) {
		t.Fatalf("before the upgrade: connections dealt %v, want round-robin", d)
	}
	before := steered(4)

	loads := map[string]*load{"new connection": startLoad(addr, 4, false), "keep-alive": startLoad(addr, 4, true)}
	time.Sleep(300 * time.Millisecond)
	upgradeTo(t, sock, next, path)
	time.Sleep(300 * time.Millisecond)
	res := finishAll(loads)
	t.Logf("under load: %d requests answered, %d failed (%s)", res.ok, res.failed, describe(res.reasons))
	if res.failed != 0 || res.ok == 0 {
		t.Errorf("%d requests failed during the upgrade, %d answered: want 0 failed", res.failed, res.ok)
	}
	after := steered(4)
	d := dealt(4, 400)
	t.Logf("steered per worker: %v before the upgrade, %v after it; then 400 connections dealt %v", before, after, d)
	for i := range after {
		if after[i] <= before[i] {
			t.Errorf("worker %d: %v steered connections after the upgrade, %v before: want the count to go on", i+1, after[i], before[i])
		}
	}
	if !even(d) {
		t.Errorf("after the upgrade: connections dealt %v, want round-robin", d)
	}
	if out, code := ctl(t, sock, "scale", "5"); code != 0 {
		t.Fatalf("scale 5: exit %d: %s", code, out)
	}
	m.listening(15*time.Second, 5)
	time.Sleep(100 * time.Millisecond)
	if d := dealt(5, 500); !even(d) {
		t.Errorf("the slot added after the upgrade is not dealt its share: %v", d)
	}
}

// TestUpgradeWithReadyNotify: the socket that workers send READY=1 to is
// handed over: a worker started after the upgrade serves once it says so,
// and one started before is still heard.
func TestUpgradeWithReadyNotify(t *testing.T) {
	next := shoalNext(t)
	flags, argv := helperCmd("notify-late")
	t.Setenv("E2E_READY_AFTER", "200ms")
	m, path, sock := startUpgradable(t, append(flags, "--env", "E2E_READY_AFTER", "--ready", "notify", "--workers", "2",
		"--port", strconv.Itoa(testutil.FreePort(t)), "--host", "127.0.0.1", "--", argv[0])...)
	m.listening(15*time.Second, 2)
	upgradeTo(t, sock, next, path)
	victim := mustStatus(t, sock).Workers[0].PID
	syscall.Kill(victim, syscall.SIGKILL)
	testutil.Eventually(t, 10*time.Second, "worker 1 replaced and serving after its READY=1", func() bool {
		st := mustStatus(t, sock)
		return st.Workers[0].PID != victim && st.Workers[0].State == "listening"
	})
	if n := len(m.logs.entries(msg("notification from a process that is no worker's ignored"))); n != 0 {
		t.Errorf("%d notifications ignored", n)
	}
	// Worker 2, started before the upgrade, still reaches the master on
	// the socket its NOTIFY_SOCKET names: its STOPPING=1 is heard.
	m.signal(syscall.SIGTERM)
	m.waitFor(10*time.Second, 2, "STOPPING=1 of both workers, the adopted one too", msg("worker says it is stopping"))
	if code := m.wait(15 * time.Second); code != 0 {
		t.Errorf("exit code %d after SIGTERM, want 0", code)
	}
}

// TestUpgradeKeepsWorkerOutput: with --worker-output prefix the master
// reads the workers' output pipes; an upgrade hands them over with any
// line half read, so every line a worker writes comes out once, whole and
// labelled, in order.
func TestUpgradeKeepsWorkerOutput(t *testing.T) {
	next := shoalNext(t)
	m, path, sock := startUpgradable(t, "--worker-output", "prefix", "--workers", "2", "--port", "0", "--",
		"sh", "-c", `i=0; while :; do printf 'tick %d' $i; printf ' of %s\n' "$SHOAL_WORKER_ID"; i=$((i+1)); done`)
	m.listening(15*time.Second, 2)
	time.Sleep(100 * time.Millisecond)
	upgradeTo(t, sock, next, path)
	time.Sleep(100 * time.Millisecond)
	upgradeTo(t, sock, shoalBin, path)
	time.Sleep(100 * time.Millisecond)
	pids := workerPIDs(mustStatus(t, sock))
	m.signal(syscall.SIGTERM)
	m.wait(15 * time.Second)
	seen, cut := map[int]int{}, map[int]bool{}
	for _, line := range strings.Split(m.stdout.String(), "\n") {
		if line == "" {
			continue
		}
		var slot, pid, n, of int
		_, err := fmt.Sscanf(line, "w%d %d | tick %d of %d", &slot, &pid, &n, &of)
		if err != nil && pid == pids[slot] && strings.HasSuffix(line, fmt.Sprintf("tick %d", n)) && !cut[slot] {
			// SIGTERM cut the worker's last line: written as it was.
			err, of, cut[slot] = nil, slot, true
		} else if cut[slot] {
			t.Fatalf("line %q after worker %d's cut last line", line, slot)
		}
		if err != nil || pid != pids[slot] || of != slot {
			t.Fatalf("line %q: not a whole labelled line of a worker (pids %v): %v", line, pids, err)
		}
		if n != seen[slot] {
			t.Fatalf("worker %d: tick %d after tick %d: a line lost or written twice", slot, n, seen[slot]-1)
		}
		seen[slot]++
	}
	t.Logf("lines per worker across two upgrades: %v", seen)
	if seen[1] < 100 || seen[2] < 100 {
		t.Errorf("too few lines to tell: %v", seen)
	}
}
