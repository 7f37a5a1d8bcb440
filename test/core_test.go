package test

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/testutil"
	"github.com/shoal-sh/shoal/reuseport"
)

// listenersByPID maps each LISTEN socket on port to the worker pid that
// holds it.
func listenersByPID(t *testing.T, port int, pids map[int]int) map[int]int {
	t.Helper()
	socks, err := reuseport.Listeners(port)
	if err != nil {
		t.Fatalf("read listening sockets: %v", err)
	}
	byPID := map[int]int{}
	for _, pid := range pids {
		held, err := reuseport.Inodes(pid)
		if err != nil {
			t.Fatalf("sockets of pid %d: %v", pid, err)
		}
		for _, s := range socks {
			if _, ok := held[s.Inode]; ok {
				byPID[pid]++
			}
		}
	}
	if len(socks) != len(pids) {
		t.Errorf("port %d has %d LISTEN sockets, want one per worker (%d)", port, len(socks), len(pids))
	}
	return byPID
}

func TestBuiltinWorkersShareOnePort(t *testing.T) {
	port := testutil.FreePort(t)
	m := startShoal(t, nil, "--workers", "3", "--port", strconv.Itoa(port), "--host", "127.0.0.1")
	pids := m.listening(10*time.Second, 3)

	byPID := listenersByPID(t, port, pids)
	for slot, pid := range pids {
		if byPID[pid] != 1 {
			t.Errorf("worker %d (pid %d) holds %d LISTEN sockets on port %d, want 1", slot, pid, byPID[pid], port)
		}
		env := environ(t, pid)
		if env["SHOAL_WORKER_ID"] != strconv.Itoa(slot) || env["SHOAL_MASTER_PID"] != strconv.Itoa(m.pid()) ||
			env["PORT"] != strconv.Itoa(port) || env["SHOAL_IPC_FD"] != "3" || env["NODE_CHANNEL_FD"] != "3" {
			t.Errorf("worker %d environment breaks the contract: %v", slot, env)
		}
	}
	for i := 0; i < 5; i++ {
		code, body := get(t, fmt.Sprintf("http://127.0.0.1:%d/", port))
		if code != 200 || body != "hello world\n" {
			t.Fatalf("GET / = %d %q, want 200 %q", code, body, "hello world\n")
		}
	}

	m.signal(syscall.SIGTERM)
	if code := m.wait(15 * time.Second); code != 0 {
		t.Errorf("exit code after SIGTERM = %d, want 0", code)
	}
	var all []int
	for _, pid := range pids {
		all = append(all, pid)
	}
	waitGone(t, time.Second, all...)
	if _, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second); err == nil {
		t.Errorf("port %d still accepts connections after shoal stopped", port)
	}
}

func TestKilledWorkerIsReplacedInItsSlot(t *testing.T) {
	port := testutil.FreePort(t)
	m := startShoal(t, nil, "--workers", "2", "--port", strconv.Itoa(port), "--host", "127.0.0.1")
	before := m.listening(10*time.Second, 2)
	victim := before[2]
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	death := m.waitFor(5*time.Second, 1, "death of the killed worker", func(e entry) bool {
		return e.str("message") == "worker died" && e.num("pid") == victim
	})[0]
	if death.num("worker") != 2 || death.str("signal") != "SIGKILL" || death["uptime_seconds"] == nil {
		t.Errorf("death event = %v, want worker 2, signal SIGKILL, an uptime", death)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		now := m.current()
		if p := now[2]; p != 0 && p != victim {
			if env := environ(t, p); env["SHOAL_WORKER_ID"] != "2" {
				t.Errorf("replacement pid %d has SHOAL_WORKER_ID=%q, want 2", p, env["SHOAL_WORKER_ID"])
			}
			if now[1] != before[1] {
				t.Errorf("worker 1 changed pid %d -> %d, want it untouched", before[1], now[1])
			}
			listenersByPID(t, port, now)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("slot 2 not listening again with a new pid within 5s: %v", now)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if code, body := get(t, fmt.Sprintf("http://127.0.0.1:%d/", port)); code != 200 || body != "hello world\n" {
		t.Errorf("GET after restart = %d %q", code, body)
	}
}

func TestMasterKilledTakesWorkersWithIt(t *testing.T) {
	port := testutil.FreePort(t)
	m := startShoal(t, nil, "--workers", "2", "--port", strconv.Itoa(port), "--host", "127.0.0.1")
	pids := m.listening(10*time.Second, 2)
	m.signal(syscall.SIGKILL)
	m.wait(5 * time.Second)
	waitGone(t, 2*time.Second, pids[1], pids[2])
}

func TestStubbornWorkerKilledAtStopTimeout(t *testing.T) {
	flags, argv := helperCmd("stubborn")
	m := startShoal(t, nil, append(append(flags, "--workers", "2", "--port", "0", "--stop-timeout", "1s", "--"), argv...)...)
	started := m.waitFor(10*time.Second, 2, "2 workers started", msg("worker started"))
	time.Sleep(200 * time.Millisecond) // let the helpers ignore SIGTERM
	begin := time.Now()
	m.signal(syscall.SIGTERM)
	if code := m.wait(10 * time.Second); code != 0 {
		t.Errorf("exit code = %d, want 0", code)
	}
	took := time.Since(begin)
	if took < time.Second || took > 5*time.Second {
		t.Errorf("stop took %s, want about the 1s stop timeout", took)
	}
	kills := m.logs.entries(msg("worker did not exit after SIGTERM: sending SIGKILL"))
	if len(kills) != 2 {
		t.Errorf("%d SIGKILL log lines, want 2", len(kills))
	}
	waitGone(t, time.Second, started[0].num("pid"), started[1].num("pid"))
}

func TestCrashLoopBacksOffAndGivesUp(t *testing.T) {
	m := startShoal(t, nil, "--workers", "1", "--port", "0", "--max-restarts", "4", "--restart-window", "1m", "--", "sh", "-c", "exit 3")
	if code := m.wait(20 * time.Second); code != 1 {
		t.Errorf("exit code = %d, want 1 after giving up", code)
	}
	var delays []time.Duration
	for _, e := range m.logs.entries(msg("restarting worker after backoff")) {
		delays = append(delays, time.Duration(e["delay_seconds"].(float64)*float64(time.Second)).Round(time.Millisecond))
	}
	// Restart 1 is immediate; 2, 3, 4 wait 100ms, 200ms, 400ms.
	want := []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond}
	if fmt.Sprint(delays) != fmt.Sprint(want) {
		t.Errorf("backoff delays %v, want %v", delays, want)
	}
	deaths := m.logs.entries(msg("worker died"))
	if len(deaths) != 5 {
		t.Errorf("%d deaths, want 5 (the first run and 4 restarts)", len(deaths))
	}
	for _, d := range deaths {
		if d.num("exit_code") != 3 {
			t.Errorf("death %v: want exit_code 3", d)
		}
	}
	gaveUp := m.logs.entries(msg("giving up"))
	if len(gaveUp) != 1 || !strings.Contains(gaveUp[0].str("error"), "--max-restarts 4") {
		t.Errorf("want one 'giving up' line naming --max-restarts 4, got %v", gaveUp)
	}
}

func TestRestartPolicies(t *testing.T) {
	for _, tc := range []struct {
		policy, script string
		starts, code   int
	}{
		{"never", "exit 0", 2, 0},
		{"never", "exit 1", 2, 1},
		{"on-failure", "exit 0", 2, 0},
	} {
		t.Run(tc.policy+"/"+strings.ReplaceAll(tc.script, " ", "_"), func(t *testing.T) {
			m := startShoal(t, nil, "--workers", "2", "--port", "0", "--restart", tc.policy, "--", "sh", "-c", tc.script)
			if code := m.wait(10 * time.Second); code != tc.code {
				t.Errorf("exit code = %d, want %d", code, tc.code)
			}
			if n := len(m.logs.entries(msg("worker started"))); n != tc.starts {
				t.Errorf("%d starts, want %d (no restart)", n, tc.starts)
			}
		})
	}
}

func TestOrphansAreReaped(t *testing.T) {
	// Each worker leaves an orphan that exits 300ms later: the master, a
	// child subreaper, must reap it.
	m := startShoal(t, nil, "--workers", "2", "--port", "0", "--", "sh", "-c", "(sleep 0.3 &); exec sleep 60")
	m.waitFor(10*time.Second, 2, "2 workers started", msg("worker started"))
	m.waitFor(10*time.Second, 2, "2 orphans reaped", msg("reaped an orphan"))
	if z := zombiesOf(m.pid()); len(z) != 0 {
		t.Errorf("zombie children of the master: %v", z)
	}
	m.signal(syscall.SIGTERM)
	if code := m.wait(10 * time.Second); code != 0 {
		t.Errorf("exit code = %d, want 0", code)
	}
}

func TestWorkerOutputPassesThrough(t *testing.T) {
	m := startShoal(t, nil, "--workers", "2", "--port", "0", "--restart", "never", "--", "sh", "-c", `echo "out from $SHOAL_WORKER_ID"; echo "err from $SHOAL_WORKER_ID" >&2`)
	m.wait(10 * time.Second)
	for _, w := range []string{"1", "2"} {
		if !strings.Contains(m.stdout.String(), "out from "+w) {
			t.Errorf("stdout lacks worker %s's line: %q", w, m.stdout.String())
		}
		if !strings.Contains(m.logs.String(), "err from "+w) {
			t.Errorf("stderr lacks worker %s's line", w)
		}
	}
}

func TestPortHeldWithoutReuseport(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	m := startShoal(t, nil, "--workers", "1", "--port", strconv.Itoa(port), "--host", "127.0.0.1", "--max-restarts", "2")
	if code := m.wait(20 * time.Second); code != 1 {
		t.Errorf("exit code = %d, want 1", code)
	}
	out := m.logs.String()
	if !strings.Contains(out, "address already in use") || !strings.Contains(out, strconv.Itoa(port)) {
		t.Errorf("log does not name the bind error and port %d:\n%s", port, out)
	}
	if !strings.Contains(out, "already has") {
		t.Errorf("master did not warn that port %d was taken before workers started:\n%s", port, out)
	}
}

func TestBadInputFailsBeforeForking(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  []string
		args []string
		want string
	}{
		{"unknown flag", nil, []string{"--wrokers", "2"}, "flag provided but not defined: -wrokers"},
		{"zero workers", nil, []string{"--workers", "0"}, "want a whole number of workers, 1 or more"},
		{"negative workers", nil, []string{"--workers", "-3"}, "want a whole number of workers, 1 or more"},
		{"word workers", nil, []string{"--workers", "abc"}, "want a whole number of workers, 1 or more"},
		{"bad env", []string{"SHOAL_WORKERS=abc"}, nil, `SHOAL_WORKERS="abc"`},
		{"bad restart", nil, []string{"--restart", "sometimes"}, "want always, on-failure or never"},
		{"bad port", nil, []string{"--port", "70000"}, "want a port number"},
		{"missing command", nil, []string{"--", "no-such-command-xyz"}, `command "no-such-command-xyz" not found in PATH`},
		{"command not executable", nil, []string{"--", notExecutable(t)}, "permission denied"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command(shoalBin, tc.args...)
			cmd.Env = append(os.Environ(), tc.env...)
			out, err := cmd.CombinedOutput()
			ee, ok := err.(*exec.ExitError)
			if !ok || ee.ExitCode() != 2 {
				t.Fatalf("exit = %v, want code 2; output:\n%s", err, out)
			}
			if !strings.Contains(string(out), tc.want) {
				t.Errorf("output lacks %q:\n%s", tc.want, out)
			}
			if strings.Contains(string(out), "worker started") {
				t.Errorf("a worker was started despite bad input:\n%s", out)
			}
		})
	}
}

func notExecutable(t *testing.T) string {
	path := filepath.Join(t.TempDir(), "not-executable")
	if err := os.WriteFile(path, []byte("#!/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestWorkerContract(t *testing.T) {
	dir := t.TempDir()
	port := testutil.FreePort(t)
	script := `echo "$SHOAL_WORKER_ID $SHOAL_MASTER_PID $PORT $SHOAL_IPC_FD $NODE_CHANNEL_FD $(readlink /proc/self/fd/3)" > "$OUT/$SHOAL_WORKER_ID.tmp" && mv "$OUT/$SHOAL_WORKER_ID.tmp" "$OUT/$SHOAL_WORKER_ID"; exec sleep 60`
	m := startShoal(t, []string{"OUT=" + dir, "SHOAL_MASTER_PID=99", "NODE_UNIQUE_ID=1", "SECRET_TOKEN=hunter2"},
		"--workers", "2", "--port", strconv.Itoa(port), "--env", "OUT", "--", "sh", "-c", script)
	m.waitFor(10*time.Second, 2, "2 workers started", msg("worker started"))
	for _, slot := range []string{"1", "2"} {
		var got []byte
		deadline := time.Now().Add(5 * time.Second)
		for {
			var err error
			if got, err = os.ReadFile(filepath.Join(dir, slot)); err == nil || time.Now().After(deadline) {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		f := strings.Fields(string(got))
		want := []string{slot, strconv.Itoa(m.pid()), strconv.Itoa(port), "3", "3"}
		if len(f) != 6 || strings.Join(f[:5], " ") != strings.Join(want, " ") || !strings.HasPrefix(f[5], "socket:[") {
			t.Errorf("worker %s sees %q, want %q and fd 3 a socket", slot, got, strings.Join(want, " "))
		}
	}
	for _, pid := range m.current() {
		env := environ(t, pid)
		if _, ok := env["NODE_UNIQUE_ID"]; ok {
			t.Errorf("worker %d inherited NODE_UNIQUE_ID, which would make Node.js act as a cluster worker", pid)
		}
		if _, ok := env["SECRET_TOKEN"]; ok {
			t.Errorf("worker %d got the master's SECRET_TOKEN without --env or --inherit-env", pid)
		}
		if env["PATH"] == "" {
			t.Errorf("worker %d has no PATH", pid)
		}
	}
}

func TestVersionAndHelp(t *testing.T) {
	out, err := exec.Command(shoalBin, "version").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "shoal ") {
		t.Errorf("shoal version = %q, %v", out, err)
	}
	out, err = exec.Command(shoalBin, "-h").CombinedOutput()
	if err != nil {
		t.Errorf("shoal -h: %v", err)
	}
	for _, want := range []string{"--workers", "SHOAL_WORKERS", "--stop-timeout", "--max-restarts", "Examples:", "-- node server.js"} {
		want = strings.TrimPrefix(want, "-") // flag prints -workers
		if !strings.Contains(string(out), want) {
			t.Errorf("shoal -h lacks %q", want)
		}
	}
}

func TestReadyByMessage(t *testing.T) {
	// The worker says it is ready 300ms after it starts; with --ready
	// message it is listening then, not before.
	m := startShoal(t, nil, "--workers", "1", "--port", "0", "--ready", "message", "--", "sh", "-c",
		`sleep 0.3; printf '{"cmd":"shoal:ready"}\n' >&3; exec sleep 60`)
	e := m.waitFor(10*time.Second, 1, "worker listening", msg("worker listening"))[0]
	if after := time.Duration(e["after_seconds"].(float64) * float64(time.Second)); after < 300*time.Millisecond {
		t.Errorf("listening %s after start, before the worker said it was ready (300ms)", after)
	}
}
