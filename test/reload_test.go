package test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
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

// ctl runs 'shoal ctl' against a master's control socket.
func ctl(t *testing.T, sock string, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, shoalBin, append([]string{"ctl", "--control", sock}, args...)...)
	out, err := cmd.CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("shoal ctl %v: %v", args, err)
	}
	return string(out), code
}

type ctlStatus struct {
	Desired int `json:"desired"`
	Workers []struct {
		Slot     int    `json:"slot"`
		PID      int    `json:"pid"`
		State    string `json:"state"`
		Restarts int    `json:"restarts"`
		Requests uint64 `json:"requests"`
	} `json:"workers"`
}

func status(t *testing.T, sock string) ctlStatus {
	t.Helper()
	out, code := ctl(t, sock, "--json", "status")
	if code != 0 {
		t.Fatalf("shoal ctl status: exit %d: %s", code, out)
	}
	var resp struct {
		OK     bool      `json:"ok"`
		Result ctlStatus `json:"result"`
	}
	if err := json.Unmarshal([]byte(out), &resp); err != nil || !resp.OK {
		t.Fatalf("shoal ctl --json status = %q: %v", out, err)
	}
	return resp.Result
}

func pidsOf(st ctlStatus) map[int]int {
	out := map[int]int{}
	for _, w := range st.Workers {
		out[w.Slot] = w.PID
	}
	return out
}

// netnsChild re-executes this test binary, running only test name, in a
// network namespace of its own with loopback up, so that it may set
// net.ipv4.tcp_migrate_req without touching the machine's.
func netnsChild(t *testing.T, name string, env ...string) string {
	t.Helper()
	if os.Getuid() != 0 {
		peer.Missing(t, "a network namespace of its own needs root")
	}
	unshare := peer.Require(t, "unshare")
	peer.Require(t, "ip")
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, unshare, "--net", "sh", "-c", `ip link set lo up && exec "$0" "$@"`,
		os.Args[0], "-test.run=^"+name+"$", "-test.v", "-test.count=1")
	cmd.Env = append(append(os.Environ(), "E2E_SHOAL_BIN="+shoalBin, "E2E_NETNS_CHILD=1"), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s in a new network namespace: %v\n%s", name, err, out)
	}
	return string(out)
}

var resultLine = regexp.MustCompile(`RESULT ok=(\d+) failed=(\d+) reloads=(\d+) reasons=(.*)`)

// TestReloadUnderLoadLosesNothing reloads 4 workers 5 times under load
// with tcp_migrate_req=1 and a client that never retries, new connection
// per request and keep-alive at once: zero failed requests. The same run
// with tcp_migrate_req=0 is measured and logged for comparison.
func TestReloadUnderLoadLosesNothing(t *testing.T) {
	for _, kind := range []string{"go", "node"} {
		for _, migrate := range []string{"1", "0"} {
			t.Run(kind+"/migrate_req="+migrate, func(t *testing.T) {
				if kind == "node" {
					nodeBin(t)
				}
				out := netnsChild(t, "TestReloadInNamespace", "E2E_KIND="+kind, "E2E_MIGRATE="+migrate)
				m := resultLine.FindStringSubmatch(out)
				if m == nil {
					t.Fatalf("no RESULT line from the namespace run:\n%s", out)
				}
				ok, _ := strconv.Atoi(m[1])
				failed, _ := strconv.Atoi(m[2])
				t.Logf("%s workers, tcp_migrate_req=%s: %d requests answered, %d failed over %s reloads (%s)", kind, migrate, ok, failed, m[3], m[4])
				if ok == 0 {
					t.Errorf("no request answered")
				}
				if migrate == "1" && failed != 0 {
					t.Errorf("%d requests failed during reloads with tcp_migrate_req=1, want 0:\n%s", failed, out)
				}
			})
		}
	}
}

// TestRecycleUnderLoadLosesNothing: with --max-requests, built-in workers
// replace themselves under load through the reload path, losing nothing.
func TestRecycleUnderLoadLosesNothing(t *testing.T) {
	out := netnsChild(t, "TestReloadInNamespace", "E2E_KIND=go", "E2E_MIGRATE=1", "E2E_MODE=recycle")
	m := resultLine.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no RESULT line from the namespace run:\n%s", out)
	}
	ok, _ := strconv.Atoi(m[1])
	failed, _ := strconv.Atoi(m[2])
	t.Logf("recycling by --max-requests under load: %d requests answered, %d failed over %s recycles (%s)", ok, failed, m[3], m[4])
	if failed != 0 || ok == 0 {
		t.Errorf("%d failed, %d answered during recycles, want 0 failed:\n%s", failed, ok, out)
	}
}

// TestReloadInNamespace runs only inside netnsChild.
func TestReloadInNamespace(t *testing.T) {
	if os.Getenv("E2E_NETNS_CHILD") != "1" {
		t.Skip("runs inside TestReloadUnderLoadLosesNothing's network namespace")
	}
	migrate := os.Getenv("E2E_MIGRATE")
	mode := map[string]string{"1": "on", "0": "off"}[migrate]
	port := testutil.FreePort(t)
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	args := []string{"--workers", "4", "--port", strconv.Itoa(port), "--host", "127.0.0.1", "--control", sock,
		"--migrate-req", mode, "--stop-timeout", "10s"}
	recycle := os.Getenv("E2E_MODE") == "recycle"
	if recycle {
		// Workers replace themselves after 1500..2000 requests.
		args = append(args, "--max-requests", "1500", "--max-requests-jitter", "500")
	}
	if os.Getenv("E2E_KIND") == "node" {
		args = append(args, "--", nodeBin(t), filepath.Join("testdata", "node-drain.js"))
	}
	m := startShoal(t, nil, args...)
	m.listening(15*time.Second, 4)
	if migrate == "1" {
		m.waitFor(5*time.Second, 1, "tcp_migrate_req set", func(e entry) bool { return strings.Contains(e.str("message"), "tcp_migrate_req=1") })
	}

	addr := fmt.Sprintf("127.0.0.1:%d", port)
	fresh := startLoad(addr, 4, false)
	kept := startLoad(addr, 4, true)
	time.Sleep(300 * time.Millisecond)
	reloads := 5
	if recycle {
		reloads = 0
		m.waitFor(60*time.Second, 4, "4 recycles", func(e entry) bool {
			return e.str("message") == "worker died" && e.str("reason") == "max_requests"
		})
	}
	for i := 0; i < reloads; i++ {
		before := pidsOf(status(t, sock))
		if out, code := ctl(t, sock, "reload"); code != 0 {
			t.Fatalf("reload %d: exit %d: %s", i+1, code, out)
		}
		after := pidsOf(status(t, sock))
		for slot, pid := range before {
			if after[slot] == pid || after[slot] == 0 {
				t.Errorf("reload %d: slot %d pid %d -> %d, want a new pid", i+1, slot, pid, after[slot])
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	// Let the last old workers drain before counting.
	if reloads > 0 {
		m.waitFor(30*time.Second, 4*reloads, "every old worker gone", func(e entry) bool {
			return e.str("message") == "worker died" && e.str("reason") == "reload"
		})
	} else {
		time.Sleep(time.Second) // the last recycled worker drains
	}
	res := finishAll(map[string]*load{"new connection": fresh, "keep-alive": kept})
	recycled := len(m.logs.entries(func(e entry) bool { return e.str("message") == "worker died" && e.str("reason") == "max_requests" }))
	res.result(reloads + recycled)
	m.signal(syscall.SIGTERM)
	m.wait(30 * time.Second)
}

// TestBrokenReloadKeepsServing points the command at a broken release and
// reloads under load: the reload fails, 'shoal ctl reload' says so, and
// the old workers serve every request.
func TestBrokenReloadKeepsServing(t *testing.T) {
	dir := t.TempDir()
	release := filepath.Join(dir, "release.sh")
	flags, argv := helperCmd("hello")
	write := func(body string) {
		if err := os.WriteFile(release+".tmp", []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(release+".tmp", release); err != nil {
			t.Fatal(err)
		}
	}
	write(fmt.Sprintf("exec %q", argv[0]))
	port, sock := testutil.FreePort(t), filepath.Join(dir, "ctl.sock")
	m := startShoal(t, nil, append(flags, "--workers", "2", "--port", strconv.Itoa(port), "--control", sock, "--ready-timeout", "2s", "--", release)...)
	m.listening(15*time.Second, 2)
	before := pidsOf(status(t, sock))
	l := startLoad(fmt.Sprintf("127.0.0.1:%d", port), 2, false)
	for _, broken := range []string{"exit 1", "exec sleep 60"} {
		write(broken)
		out, code := ctl(t, sock, "reload")
		if code != 1 || !strings.Contains(out, "reload aborted") {
			t.Errorf("reload to %q: exit %d, %q; want exit 1 and 'reload aborted'", broken, code, out)
		}
		if now := pidsOf(status(t, sock)); fmt.Sprint(now) != fmt.Sprint(before) {
			t.Errorf("after the broken reload pids %v, want the old %v", now, before)
		}
	}
	ok, failures := l.finish()
	if len(failures) != 0 || ok == 0 {
		t.Errorf("%d answered, failures during broken reloads: %s; want none", ok, describe(failures))
	}
	// Fixing the release on disk and reloading deploys it.
	write(fmt.Sprintf("exec %q", argv[0]))
	if out, code := ctl(t, sock, "reload"); code != 0 {
		t.Errorf("reload to the fixed release: exit %d: %s", code, out)
	}
}

func TestScaleBySignalAndCtl(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	port := testutil.FreePort(t)
	m := startShoal(t, nil, "--workers", "2", "--port", strconv.Itoa(port), "--host", "127.0.0.1", "--control", sock)
	m.listening(15*time.Second, 2)
	waitDesired := func(n int) ctlStatus {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		for {
			st := status(t, sock)
			listening := 0
			for _, w := range st.Workers {
				if w.State == "listening" {
					listening++
				}
			}
			if st.Desired == n && len(st.Workers) == n && listening == n {
				return st
			}
			if time.Now().After(deadline) {
				t.Fatalf("want %d listening workers, have %+v", n, st)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	m.signal(syscall.SIGTTIN)
	waitDesired(3)
	m.signal(syscall.SIGTTOU)
	st := waitDesired(2)
	if st.Workers[0].Slot != 1 || st.Workers[1].Slot != 2 {
		t.Errorf("after SIGTTOU slots %+v, want 1 and 2 (highest removed first)", st.Workers)
	}
	if out, code := ctl(t, sock, "scale", "4"); code != 0 {
		t.Fatalf("ctl scale 4: %d %s", code, out)
	}
	waitDesired(4)
	ctl(t, sock, "scale", "1")
	st = waitDesired(1)
	if st.Workers[0].Slot != 1 {
		t.Errorf("after scale 1, slot %d remains, want 1", st.Workers[0].Slot)
	}
	deaths := m.logs.entries(func(e entry) bool { return e.str("message") == "worker died" && e.str("reason") == "scale" })
	if len(deaths) != 4 {
		t.Errorf("%d scale-down deaths with reason scale, want 4", len(deaths))
	}
}

// ctlWorkers each write the messages they receive on fd 3 to $OUT/SLOT.
const ctlWorkers = `exec cat <&3 > "$OUT/$SHOAL_WORKER_ID"`

func TestCtl(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "ctl.sock")
	m := startShoal(t, []string{"OUT=" + dir}, "--workers", "2", "--port", "0", "--control", sock, "--env", "OUT", "--", "sh", "-c", ctlWorkers)
	m.listening(15*time.Second, 2)

	out, code := ctl(t, sock, "status")
	if code != 0 || !regexp.MustCompile(`(?m)^SLOT\s+PID\s+STATE\s+UPTIME\s+RESTARTS\s+RELOADS\s+REQUESTS$`).MatchString(out) ||
		!regexp.MustCompile(`(?m)^1\s+\d+\s+listening\s+`).MatchString(out) || !regexp.MustCompile(`(?m)^2\s+\d+\s+listening\s+`).MatchString(out) {
		t.Errorf("ctl status = %d:\n%s", code, out)
	}
	if out, code := ctl(t, sock, "send", "2", `{"to":"two"}`); code != 0 {
		t.Fatalf("ctl send: %d %s", code, out)
	}
	if out, code := ctl(t, sock, "broadcast", `"all"`); code != 0 {
		t.Fatalf("ctl broadcast: %d %s", code, out)
	}
	want := map[string]string{"1": "\"all\"\n", "2": "{\"to\":\"two\"}\n\"all\"\n"}
	for slot, body := range want {
		deadline := time.Now().Add(5 * time.Second)
		for {
			got, _ := os.ReadFile(filepath.Join(dir, slot))
			if string(got) == body {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("worker %s received %q, want %q", slot, got, body)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	for _, bad := range [][]string{{"send", "9", `{}`}, {"scale", "0"}, {"scale", "100000"}, {"send", "1", "not-json"}, {"frobnicate"}} {
		if out, code := ctl(t, sock, bad...); code == 0 {
			t.Errorf("ctl %v succeeded: %s", bad, out)
		}
	}
	if out, code := ctl(t, sock, "stop"); code != 0 {
		t.Errorf("ctl stop: %d %s", code, out)
	}
	if code := m.wait(15 * time.Second); code != 0 {
		t.Errorf("exit code after ctl stop = %d", code)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("control socket left behind after stop: %v", err)
	}
	if out, code := ctl(t, sock, "status"); code == 0 || !strings.Contains(out, "no shoal master") {
		t.Errorf("ctl with no master: %d %q", code, out)
	}
}

func TestControlSocketOwnership(t *testing.T) {
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	sock := filepath.Join(dir, "ctl.sock")
	m := startShoal(t, nil, "--workers", "1", "--port", "0", "--control", sock, "--", "sleep", "60")
	m.waitFor(10*time.Second, 1, "control socket", msg("control socket ready for 'shoal ctl'"))
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("control socket mode = %v, %v; want 0600", fi.Mode(), err)
	}
	// A second master on the same path is refused; the first is untouched.
	out, err := exec.Command(shoalBin, "--port", "0", "--metrics-addr", "", "--control", sock, "--", "sleep", "60").CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 || !strings.Contains(string(out), "another shoal master") {
		t.Errorf("second master: %v %s; want exit 2 naming another shoal master", err, out)
	}
	if st := status(t, sock); len(st.Workers) != 1 {
		t.Errorf("first master after the refused second: %+v", st)
	}
	// Another user may not talk to the master.
	if os.Getuid() == 0 {
		cmd := exec.Command(shoalBin, "ctl", "--control", sock, "status")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), "permission denied") {
			t.Errorf("ctl as nobody: %v %s; want permission denied", err, out)
		}
	}
	// A stale socket from a killed master is replaced by the next one.
	m.signal(syscall.SIGKILL)
	m.wait(10 * time.Second)
	m2 := startShoal(t, nil, "--workers", "1", "--port", "0", "--control", sock, "--", "sleep", "60")
	m2.waitFor(10*time.Second, 1, "control socket over the stale one", msg("control socket ready for 'shoal ctl'"))
	if st := status(t, sock); len(st.Workers) != 1 {
		t.Errorf("new master's status: %+v", st)
	}
}
