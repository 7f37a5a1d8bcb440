package test

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/peer"
	"github.com/shoal-sh/shoal/internal/testutil"
)

// children returns the pids of a process's children.
func children(pid int) []int {
	var out []int
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, task := range tasks {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, task.Name()))
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil {
				out = append(out, c)
			}
		}
	}
	return out
}

// openFDs counts a process's open file descriptors.
func openFDs(t *testing.T, pid int) int {
	t.Helper()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(fds)
}

func rssOf(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`VmRSS:\s+(\d+) kB`).FindStringSubmatch(string(b))
	kb, _ := strconv.Atoi(m[1])
	return kb << 10
}

// TestKillStorm SIGKILLs a random worker 200 times under load: every death
// is observed, every slot refilled, no zombie stays, the master's open
// files and goroutines come back to where they were, and no request
// counter ever decreases.
func TestKillStorm(t *testing.T) {
	const workers, kills = 4, 200
	port, maddr := testutil.FreePort(t), loopbackAddr(t)
	m := startShoal(t, []string{"SHOAL_LOG_LEVEL=info"}, "--workers", strconv.Itoa(workers), "--port", strconv.Itoa(port),
		"--host", "127.0.0.1", "--metrics-addr", maddr, "--restart-delay-max", "50ms")
	m.listening(15*time.Second, workers)
	url := "http://" + maddr + "/metrics"
	time.Sleep(300 * time.Millisecond) // let the first reports and scrapes settle
	scrape(t, url)
	fdsBefore := openFDs(t, m.pid())
	goroutinesBefore := scrape(t, url)["go_goroutines"]

	l := startLoad(fmt.Sprintf("127.0.0.1:%d", port), 2, true)
	last := map[string]float64{}
	checkMonotonic := func() {
		s, err := tryScrape(url)
		if err != nil {
			t.Errorf("scrape during the storm: %v", err)
			return
		}
		for series, v := range s {
			if strings.HasPrefix(series, "shoal_requests_total{") {
				if v < last[series] {
					t.Errorf("%s went down from %v to %v", series, last[series], v)
				}
				last[series] = v
			}
		}
	}
	killed := map[int]bool{}
	for len(killed) < kills {
		kids := children(m.pid())
		var live []int
		for _, c := range kids {
			if !killed[c] && alive(c) {
				live = append(live, c)
			}
		}
		if len(live) == 0 {
			time.Sleep(5 * time.Millisecond)
			continue
		}
		victim := live[rand.IntN(len(live))]
		if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
			continue
		}
		killed[victim] = true
		if len(killed)%20 == 0 {
			checkMonotonic()
		}
		time.Sleep(time.Duration(rand.IntN(20)) * time.Millisecond)
	}
	answered, _ := l.finish()

	// Every slot refilled and listening again.
	deadline := time.Now().Add(20 * time.Second)
	for {
		s := scrape(t, url)
		if s["shoal_workers_listening"] == workers {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("slots not all listening 20s after the storm: %v listening", s["shoal_workers_listening"])
		}
		time.Sleep(50 * time.Millisecond)
	}
	checkMonotonic()
	deaths := m.logs.entries(func(e entry) bool { return e.str("message") == "worker died" && e.str("signal") == "SIGKILL" })
	seen := map[int]bool{}
	for _, d := range deaths {
		seen[d.num("pid")] = true
	}
	for pid := range killed {
		if !seen[pid] {
			t.Errorf("the death of killed worker %d was not observed", pid)
		}
	}
	s := scrape(t, url)
	if got := sumOf(s, "shoal_worker_deaths_total"); got != kills {
		t.Errorf("shoal_worker_deaths_total sums to %v, want %d", got, kills)
	}
	if z := zombiesOf(m.pid()); len(z) != 0 {
		t.Errorf("zombies after the storm: %v", z)
	}
	// The dead workers' channels are closed within a couple of seconds.
	var fdsAfter int
	for deadline := time.Now().Add(10 * time.Second); ; {
		if fdsAfter = openFDs(t, m.pid()); fdsAfter <= fdsBefore || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	goroutinesAfter := scrape(t, url)["go_goroutines"]
	t.Logf("%d kills observed, %d slots refilled; master fds %d before, %d after; goroutines %v before, %v after; %d requests answered under the storm",
		len(seen), workers, fdsBefore, fdsAfter, goroutinesBefore, goroutinesAfter, answered)
	if fdsAfter > fdsBefore {
		t.Errorf("master holds %d fds after the storm, %d before: a leak per restart", fdsAfter, fdsBefore)
	}
	if goroutinesAfter > goroutinesBefore+2 {
		t.Errorf("master runs %v goroutines after the storm, %v before", goroutinesAfter, goroutinesBefore)
	}
}

// TestCrashLoopStaysIdle runs a command that exits at once, forever: the
// delays grow to the cap, the master's CPU stays near idle, and
// --max-restarts ends it with a clear message and exit 1.
func TestCrashLoopStaysIdle(t *testing.T) {
	m := startShoal(t, nil, "--workers", "1", "--port", "0", "--restart-delay-max", "400ms",
		"--max-restarts", "12", "--restart-window", "1m", "--", "sh", "-c", "exit 1")
	begin := time.Now()
	ticks := 0
	for alive(m.pid()) {
		if st, ok := readStat(m.pid()); ok {
			ticks = st.ticks
		}
		time.Sleep(50 * time.Millisecond)
	}
	m.wait(10 * time.Second)
	wall := time.Since(begin)
	if code := m.state.ExitCode(); code != 1 {
		t.Errorf("exit code %d, want 1", code)
	}
	var delays []string
	for _, e := range m.logs.entries(msg("restarting worker after backoff")) {
		delays = append(delays, time.Duration(e["delay_seconds"].(float64)*float64(time.Second)).Round(time.Millisecond).String())
	}
	want := "100ms 200ms 400ms 400ms 400ms 400ms 400ms 400ms 400ms 400ms 400ms"
	if strings.Join(delays, " ") != want {
		t.Errorf("delays %v, want %s", delays, want)
	}
	if !strings.Contains(m.logs.String(), "too many restarts: 12 restarts within 1m0s") {
		t.Errorf("no clear give-up message in the log")
	}
	cpu := time.Duration(ticks) * 10 * time.Millisecond // USER_HZ is 100 on Linux
	t.Logf("crash loop: %s wall, master CPU %s (%.1f%%)", wall.Round(time.Millisecond), cpu, 100*cpu.Seconds()/wall.Seconds())
	if cpu.Seconds() > 0.25*wall.Seconds() {
		t.Errorf("master used %s of CPU in %s of crash loop: not idle", cpu, wall)
	}
}

func TestHungWorkerKilledAndReplaced(t *testing.T) {
	// Built-in workers send a heartbeat every second: they live.
	port := testutil.FreePort(t)
	m := startShoal(t, nil, "--workers", "2", "--port", strconv.Itoa(port), "--host", "127.0.0.1", "--heartbeat-timeout", "3s")
	m.listening(15*time.Second, 2)
	time.Sleep(4500 * time.Millisecond)
	if d := m.logs.entries(msg("worker died")); len(d) != 0 {
		t.Errorf("built-in workers died with heartbeats on: %v", d)
	}
	m.signal(syscall.SIGTERM)
	m.wait(15 * time.Second)

	// A worker that sent one heartbeat and then stopped is hung.
	h := startShoal(t, nil, "--workers", "1", "--port", "0", "--heartbeat-timeout", "500ms", "--stop-timeout", "1s",
		"--", "sh", "-c", `printf '{"cmd":"shoal:heartbeat"}\n' >&3; exec sleep 60`)
	d := h.waitFor(10*time.Second, 1, "death of the hung worker", msg("worker died"))[0]
	if d.str("reason") != "hung" {
		t.Errorf("death %v, want reason hung", d)
	}
	h.waitFor(10*time.Second, 2, "a replacement", msg("worker started"))
}

// TestStubbornWorkerKilledDuringReload: old workers that ignore SIGTERM are
// killed at the stop timeout, and the reload completes.
func TestStubbornWorkerKilledDuringReload(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	flags, argv := helperCmd("stubborn-hello")
	m := startShoal(t, nil, append(append(flags, "--workers", "2", "--port", strconv.Itoa(testutil.FreePort(t)), "--control", sock,
		"--stop-timeout", "1s", "--"), argv...)...)
	before := m.listening(15*time.Second, 2)
	begin := time.Now()
	if out, code := ctl(t, sock, "reload"); code != 0 {
		t.Fatalf("reload: %d %s", code, out)
	}
	m.waitFor(10*time.Second, 2, "SIGKILL for the stubborn old workers", msg("worker did not exit after SIGTERM: sending SIGKILL"))
	for _, pid := range before {
		waitGone(t, 5*time.Second, pid)
	}
	if took := time.Since(begin); took < time.Second {
		t.Errorf("stubborn workers gone after %s, before the 1s stop timeout", took)
	}
	after := pidsOf(status(t, sock))
	for slot, pid := range before {
		if after[slot] == pid {
			t.Errorf("slot %d kept pid %d", slot, pid)
		}
	}
}

// TestFloodWhileAnotherDies: one worker floods the bus while another is
// killed: the other is replaced promptly, scrapes answer, and the master's
// memory stays bounded.
func TestFloodWhileAnotherDies(t *testing.T) {
	port, maddr := testutil.FreePort(t), loopbackAddr(t)
	flags, argv := helperCmd("hello")
	script := `if [ "$SHOAL_WORKER_ID" = 1 ]; then exec yes '{"flood":true,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}' >&3; fi; exec "$0"`
	m := startShoal(t, []string{"SHOAL_LOG_LEVEL=info"}, append(append(flags, "--workers", "3", "--port", strconv.Itoa(port),
		"--metrics-addr", maddr, "--", "sh", "-c", script), argv...)...)
	pids := m.listening(15*time.Second, 2)
	time.Sleep(500 * time.Millisecond) // the flood is on
	url := "http://" + maddr + "/metrics"
	victim := pids[2]
	if victim == 0 {
		victim = pids[3]
	}
	killedAt := time.Now()
	syscall.Kill(victim, syscall.SIGKILL)
	deadline := time.Now().Add(5 * time.Second)
	for {
		cur := m.current()
		if len(cur) >= 2 && cur[2] != victim && cur[3] != victim {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("killed worker %d not replaced within 5s while worker 1 floods", victim)
		}
		time.Sleep(10 * time.Millisecond)
	}
	refill := time.Since(killedAt)
	start := time.Now()
	s := scrape(t, url)
	scrapeTook := time.Since(start)
	in := s[`shoal_ipc_received_messages_total{worker="1"}`]
	rss := rssOf(t, m.pid())
	t.Logf("flood: %v messages from worker 1; replacement listening %s after the kill; scrape %s; master RSS %d MiB",
		in, refill.Round(time.Millisecond), scrapeTook.Round(time.Millisecond), rss>>20)
	if in < 1000 {
		t.Errorf("worker 1 sent only %v messages: no flood", in)
	}
	if rss > 300<<20 {
		t.Errorf("master RSS %d MiB during the flood: not bounded", rss>>20)
	}
}

// TestWorkersRunAsNobody runs the master as root and the built-in workers
// as nobody.
func TestWorkersRunAsNobody(t *testing.T) {
	if os.Getuid() != 0 {
		peer.Missing(t, "needs root")
	}
	port := testutil.FreePort(t)
	m := startShoal(t, nil, "--workers", "1", "--port", strconv.Itoa(port), "--host", "127.0.0.1", "--user", "nobody")
	pids := m.listening(15*time.Second, 1)
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pids[1]))
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`(?m)^Uid:\s+65534\s+65534`).Match(b) || !regexp.MustCompile(`(?m)^Groups:\s*$`).Match(b) {
		t.Errorf("worker status:\n%s\nwant uid 65534 and no supplementary groups", b)
	}
	if code, body := get(t, fmt.Sprintf("http://127.0.0.1:%d/", port)); code != 200 || body != "hello world\n" {
		t.Errorf("GET = %d %q", code, body)
	}
}
