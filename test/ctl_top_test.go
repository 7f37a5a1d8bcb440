package test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
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

// tmuxServer is a private tmux server, on its own socket, that runs one
// program in a terminal of a fixed size for a test, as a person would.
type tmuxServer struct {
	t    *testing.T
	bin  string
	sock string
}

// startTmux runs command (a shell command line) in a new tmux session of
// width x height. The server is killed, and its end awaited, when the test
// ends.
func startTmux(t *testing.T, width, height int, command string) *tmuxServer {
	t.Helper()
	s := &tmuxServer{t: t, bin: peer.Require(t, "tmux"), sock: filepath.Join(t.TempDir(), "tmux.sock")}
	s.run("-f", "/dev/null", "new-session", "-d", "-s", "top", "-x", strconv.Itoa(width), "-y", strconv.Itoa(height), command)
	pid, err := strconv.Atoi(strings.TrimSpace(s.run("display-message", "-p", "-t", "top", "#{pid}")))
	if err != nil {
		t.Fatalf("tmux server pid: %v", err)
	}
	// The pane stays when its program ends, so that its end can be read.
	s.run("set-option", "-t", "top", "remain-on-exit", "on")
	t.Cleanup(func() {
		exec.Command(s.bin, "-S", s.sock, "kill-server").Run()
		waitGone(t, 10*time.Second, pid)
	})
	return s
}

// run runs one tmux command against the server and returns its output.
func (s *tmuxServer) run(args ...string) string {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, s.bin, append([]string{"-S", s.sock}, args...)...).CombinedOutput()
	if err != nil {
		s.t.Fatalf("tmux %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// screen returns what the terminal shows now.
func (s *tmuxServer) screen() string { return s.run("capture-pane", "-p", "-t", "top") }

// keys types keys (tmux key names: Down, q, 2).
func (s *tmuxServer) keys(keys ...string) {
	s.run(append([]string{"send-keys", "-t", "top"}, keys...)...)
}

// dead reports whether the pane's program has ended.
func (s *tmuxServer) dead() bool {
	return strings.TrimSpace(s.run("display-message", "-p", "-t", "top", "#{pane_dead}")) == "1"
}

// waitScreen waits until the screen satisfies ok and returns it.
func (s *tmuxServer) waitScreen(timeout time.Duration, what string, ok func(string) bool) string {
	s.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		scr := s.screen()
		if ok(scr) {
			return scr
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("no %s on the screen within %s; the screen:\n%s", what, timeout, scr)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// topScreenRow is one worker's row as the screen shows it.
type topScreenRow struct {
	selected    bool
	slot, pid   int
	state       string
	rate        float64 // -1 for "-"
	requests    int
	cpu, memory string
	queue       string
	restarts    int
	lastDeath   string
}

var topRowRE = regexp.MustCompile(`(?m)^([> ]) +(\d+) +(\d+|-) +(\S+) +(\S+) +(\S+|-) +(\d+) +(\S+) +(\S+ [KMG]iB|-) +(\S+) +(\d+) +(\S+)\s*$`)

// topScreenRows parses the worker rows of a screen, in their order.
func topScreenRows(scr string) []topScreenRow {
	var rows []topScreenRow
	for _, m := range topRowRE.FindAllStringSubmatch(scr, -1) {
		r := topScreenRow{selected: m[1] == ">", state: m[4], queue: m[10], lastDeath: m[12], cpu: m[8], memory: m[9], rate: -1}
		r.slot, _ = strconv.Atoi(m[2])
		r.pid, _ = strconv.Atoi(m[3])
		if f, err := strconv.ParseFloat(m[6], 64); err == nil {
			r.rate = f
		}
		r.requests, _ = strconv.Atoi(m[7])
		r.restarts, _ = strconv.Atoi(m[11])
		rows = append(rows, r)
	}
	return rows
}

// topHeadRE matches the table's head, unsorted as in a snapshot.
var topHeadRE = regexp.MustCompile(`(?m)^ *SLOT +PID +STATE +UPTIME +REQ/S +REQUESTS +CPU% +RSS +QUEUE +RESTARTS +LAST DEATH$`)

var topTotalRE = regexp.MustCompile(`requests (\d+)  ([\d.]+|-)/s`)

// topTotal returns the header's total of requests and requests/s (-1 for
// "-"); ok is false when the header is not on the screen.
func topTotal(scr string) (total int, rate float64, ok bool) {
	m := topTotalRE.FindStringSubmatch(scr)
	if m == nil {
		return 0, 0, false
	}
	total, _ = strconv.Atoi(m[1])
	rate = -1
	if f, err := strconv.ParseFloat(m[2], 64); err == nil {
		rate = f
	}
	return total, rate, true
}

// loadHTTP sends GETs, each on a new connection so that they spread over
// the workers, to url until the test ends (at most a minute and 200,000
// requests), and returns how many succeeded so far.
func loadHTTP(t *testing.T, url string) func() int {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	var wg sync.WaitGroup
	var mu sync.Mutex
	ok := 0
	wg.Add(1)
	go func() {
		defer wg.Done()
		c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
		for i := 0; i < 200_000 && ctx.Err() == nil; i++ {
			req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
			resp, err := c.Do(req)
			if err != nil {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			resp.Body.Close()
			mu.Lock()
			ok++
			mu.Unlock()
			time.Sleep(time.Millisecond) // gentle: the machine is shared
		}
	}()
	t.Cleanup(func() { cancel(); wg.Wait() })
	return func() int { mu.Lock(); defer mu.Unlock(); return ok }
}

// TestCtlTopLive runs 'shoal ctl top' in a real terminal (tmux) against a
// master under HTTP load, and reads the screen as a person would: the rates
// move, the keys select and sort, a killed worker's death shows, and q ends
// the program with status 0.
func TestCtlTopLive(t *testing.T) {
	peer.Require(t, "tmux")
	dir := t.TempDir()
	sock := filepath.Join(dir, "ctl.sock")
	port := testutil.FreePort(t)
	m := startShoal(t, nil, "--workers", "2", "--port", strconv.Itoa(port), "--control", sock)
	pids := m.listening(15*time.Second, 2)
	sent := loadHTTP(t, fmt.Sprintf("http://127.0.0.1:%d/", port))

	exitFile := filepath.Join(dir, "top.exit")
	started := time.Now()
	tm := startTmux(t, 120, 30, fmt.Sprintf("%s ctl --control %s top; echo $? > %s", shoalBin, sock, exitFile))

	// The numbers move: a worker serves more than 0 requests/s, and the
	// total grows from one refresh to a later one.
	scr := tm.waitScreen(20*time.Second, "a worker with requests/s > 0 and a total rate > 0", func(s string) bool {
		_, rate, ok := topTotal(s)
		return ok && rate > 0 && slices.ContainsFunc(topScreenRows(s), func(r topScreenRow) bool { return r.rate > 0 })
	})
	t.Logf("the screen under load (%d requests sent):\n%s", sent(), scr)
	total1, _, _ := topTotal(scr)
	scr = tm.waitScreen(10*time.Second, fmt.Sprintf("a total of requests above %d", total1), func(s string) bool {
		n, _, ok := topTotal(s)
		return ok && n > total1
	})
	rows := topScreenRows(scr)
	if len(rows) != 2 {
		t.Fatalf("want 2 worker rows, got %d; the screen:\n%s", len(rows), scr)
	}
	for _, r := range rows {
		if r.pid != pids[r.slot] || r.state != "listening" || r.memory == "-" || !regexp.MustCompile(`^\d+/[1-9]\d*$`).MatchString(r.queue) {
			t.Errorf("slot %d: %+v; want pid %d, listening, its memory and its accept queue/backlog; the screen:\n%s", r.slot, r, pids[r.slot], scr)
		}
	}
	if !regexp.MustCompile(fmt.Sprintf(`master  pid %d  up \S+  cpu [\d.]+%%  rss [\d.]+ [KMG]iB  reload idle`, m.pid())).MatchString(scr) {
		t.Errorf("the header does not show the master's pid, CPU, memory and reload state; the screen:\n%s", scr)
	}
	if !rows[0].selected || rows[1].selected {
		t.Errorf("want the first row selected at start; the screen:\n%s", scr)
	}

	// Arrow keys move the selection.
	tm.keys("Down")
	tm.waitScreen(5*time.Second, "the selection on the second row", func(s string) bool {
		rs := topScreenRows(s)
		return len(rs) == 2 && !rs[0].selected && rs[1].selected
	})
	tm.keys("Up")
	tm.waitScreen(5*time.Second, "the selection back on the first row", func(s string) bool {
		rs := topScreenRows(s)
		return len(rs) == 2 && rs[0].selected && !rs[1].selected
	})

	// 2 sorts by PID, 2 again reverses.
	byPID := func(desc bool) func(string) bool {
		mark := "PID▲"
		if desc {
			mark = "PID▼"
		}
		return func(s string) bool {
			rs := topScreenRows(s)
			return strings.Contains(s, mark) && len(rs) == 2 && (rs[0].pid < rs[1].pid) != desc
		}
	}
	tm.keys("2")
	tm.waitScreen(5*time.Second, "rows sorted by pid, lowest first", byPID(false))
	tm.keys("2")
	tm.waitScreen(5*time.Second, "rows sorted by pid, highest first", byPID(true))
	// s moves the sort to the next column.
	tm.keys("s")
	tm.waitScreen(5*time.Second, "the sort on STATE", func(s string) bool { return strings.Contains(s, "STATE▲") })

	// A killed worker: its replacement, a restart and the last death show.
	if err := syscall.Kill(pids[1], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	scr = tm.waitScreen(20*time.Second, "slot 1 replaced, with 1 restart and its death", func(s string) bool {
		for _, r := range topScreenRows(s) {
			if r.slot == 1 {
				return r.pid != pids[1] && r.pid != 0 && r.restarts == 1 && r.lastDeath == "signal_SIGKILL"
			}
		}
		return false
	})
	t.Logf("the screen after a SIGKILL of slot 1:\n%s", scr)

	// q quits: the program ends, with status 0, and leaves the screen.
	tm.keys("q")
	deadline := time.Now().Add(10 * time.Second)
	for !tm.dead() {
		if time.Now().After(deadline) {
			t.Fatalf("shoal ctl top still runs 10s after q; the screen:\n%s", tm.screen())
		}
		time.Sleep(50 * time.Millisecond)
	}
	ran := time.Since(started)
	// It costs the master one status request a second, no more.
	requests := len(m.logs.entries(func(e entry) bool { return e.str("message") == "control request" && e.str("cmd") == "status" }))
	t.Logf("shoal ctl top ran %v and sent %d status requests", ran.Round(time.Millisecond), requests)
	if requests < 2 || requests > int(ran/time.Second)+1 {
		t.Errorf("shoal ctl top sent %d status requests in %v; want one a second", requests, ran)
	}
	if b, err := os.ReadFile(exitFile); err != nil || strings.TrimSpace(string(b)) != "0" {
		t.Errorf("shoal ctl top after q: exit status %q (%v), want 0", b, err)
	}
	if scr := tm.screen(); strings.Contains(scr, "SLOT") {
		t.Errorf("the view is still on the screen after q:\n%s", scr)
	}
}

// TestCtlTopSnapshot: with --once on a terminal, and without it when the
// output is not a terminal, 'shoal ctl top' prints one plain snapshot, with
// no escape sequences, and exits 0; the status behind it carries the new
// fields, and the last death follows the latest kind of death.
func TestCtlTopSnapshot(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "ctl.sock")
	port := testutil.FreePort(t)
	m := startShoal(t, nil, "--workers", "2", "--port", strconv.Itoa(port), "--control", sock)
	pids := m.listening(15*time.Second, 2)
	sent := loadHTTP(t, fmt.Sprintf("http://127.0.0.1:%d/", port))
	testutil.Eventually(t, 10*time.Second, "some requests served", func() bool { return sent() > 20 })

	// Not a terminal: a pipe.
	stdout, stderr, code := ctlSplit(t, "--control", sock, "top")
	t.Logf("shoal ctl top | cat:\n%s", stdout)
	if code != 0 || stderr != "" || strings.Contains(stdout, "\x1b") {
		t.Fatalf("shoal ctl top into a pipe: exit %d, stderr %q, stdout:\n%q\nwant 0 and plain text", code, stderr, stdout)
	}
	rows := topScreenRows(regexp.MustCompile(`(?m)^`).ReplaceAllString(stdout, " "))
	if len(rows) != 2 || rows[0].pid != pids[1] || rows[1].pid != pids[2] ||
		!topHeadRE.MatchString(stdout) {
		t.Errorf("the snapshot: %+v; want the table with slots 1 and 2 (pids %v) in order", rows, pids)
	}
	if total, rate, ok := topTotal(stdout); !ok || total == 0 || rate < 0 {
		t.Errorf("the snapshot's totals: %d requests, %v/s (found: %v); want requests and a measured rate", total, rate, ok)
	}

	// --once on a terminal: the same plain snapshot, and the program ends.
	exitFile := filepath.Join(dir, "once.exit")
	tm := startTmux(t, 120, 20, fmt.Sprintf("%s ctl --control %s top --once; echo $? > %s", shoalBin, sock, exitFile))
	testutil.Eventually(t, 15*time.Second, "shoal ctl top --once to end", tm.dead)
	scr := tm.screen()
	if b, err := os.ReadFile(exitFile); err != nil || strings.TrimSpace(string(b)) != "0" {
		t.Errorf("shoal ctl top --once: exit status %q (%v), want 0; the screen:\n%s", b, err, scr)
	}
	if !topHeadRE.MatchString(scr) || strings.Contains(scr, "q quit") || len(topScreenRows(regexp.MustCompile(`(?m)^`).ReplaceAllString(scr, " "))) != 2 {
		t.Errorf("shoal ctl top --once on a terminal; want the plain snapshot and no live view; the screen:\n%s", scr)
	}

	// The status behind it.
	st := ctlStatusOf(t, sock)
	if st.Master.PID != m.pid() || st.Master.RSSBytes == 0 || st.Master.Uptime <= 0 {
		t.Errorf("status: master %+v; want pid %d, its memory and uptime", st.Master, m.pid())
	}
	for _, w := range st.Workers {
		if w.RSSBytes == 0 || w.ListenBacklog == 0 || w.LastDeath != "" || len(w.Deaths) != 0 {
			t.Errorf("status: slot %d: %+v; want its memory, its backlog and no death", w.Slot, w)
		}
	}

	// The last death is the latest kind: a SIGKILL, then a SIGTERM.
	kill := func(sig syscall.Signal) string {
		st := ctlStatusOf(t, sock)
		if err := syscall.Kill(st.Workers[0].PID, sig); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(15 * time.Second)
		for {
			now := ctlStatusOf(t, sock)
			w := now.Workers[0]
			if w.PID != 0 && w.PID != st.Workers[0].PID && w.Restarts == st.Workers[0].Restarts+1 {
				t.Logf("slot 1 after %v: deaths %v, last %q", sig, w.Deaths, w.LastDeath)
				return w.LastDeath
			}
			if time.Now().After(deadline) {
				t.Fatalf("slot 1 not replaced within 15s of %v: %+v", sig, w)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	if got := kill(syscall.SIGKILL); got != "signal_SIGKILL" {
		t.Errorf("last death after a SIGKILL: %q, want signal_SIGKILL", got)
	}
	before := ctlStatusOf(t, sock).Workers[0].Deaths
	got := kill(syscall.SIGSEGV)
	after := ctlStatusOf(t, sock).Workers[0].Deaths
	var grown []string
	for class, n := range after {
		if n > before[class] {
			grown = append(grown, class)
		}
	}
	if len(grown) != 1 || got != grown[0] || got == "signal_SIGKILL" {
		t.Errorf("last death after a SIGSEGV: %q, deaths %v then %v; want the class that grew", got, before, after)
	}
}
