package test

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/peer"
	"github.com/shoal-sh/shoal/internal/testutil"
)

// Real servers nobody here wrote, run unchanged: a Python UDP server,
// nginx with its graceful signal and in the background, and programs that
// do not serve where they should.

// udpAsk sends one datagram from a fresh socket (so a fresh source port,
// which the kernel hashes to some worker) and returns the answer.
func udpAsk(addr, text string, timeout time.Duration) (string, error) {
	c, err := net.Dial("udp4", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte(text)); err != nil {
		return "", err
	}
	buf := make([]byte, 2048)
	n, err := c.Read(buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

// TestUDPServer: a Python UDP echo server with SO_REUSEPORT under shoal:
// both workers are seen serving from the kernel, both answer, and a reload
// under a steady stream of datagrams keeps answering.
func TestUDPServer(t *testing.T) {
	python := peer.Require(t, "python3")
	port, sock := testutil.FreePort(t), filepath.Join(t.TempDir(), "ctl.sock")
	m := startShoal(t, nil, "--workers", "2", "--port", "udp:"+strconv.Itoa(port), "--control", sock,
		"--stop-timeout", "3s", "--", python, "-u", filepath.Join("testdata", "udp_echo.py"))
	pids := m.listening(15*time.Second, 2)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	answered := map[string]bool{}
	for i := 0; i < 400 && len(answered) < 2; i++ {
		got, err := udpAsk(addr, "ping", time.Second)
		if err != nil {
			t.Fatalf("datagram %d: %v", i, err)
		}
		pid, rest, _ := strings.Cut(got, " ")
		if rest != "ping" {
			t.Fatalf("answer %q, want PID ping", got)
		}
		answered[pid] = true
	}
	want := map[string]bool{strconv.Itoa(pids[1]): true, strconv.Itoa(pids[2]): true}
	if len(answered) != 2 || !answered[strconv.Itoa(pids[1])] || !answered[strconv.Itoa(pids[2])] {
		t.Fatalf("answers from pids %v, want both workers %v", answered, want)
	}

	// A steady stream during a reload: 1 datagram every 5 ms.
	var sent, got atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			sent.Add(1)
			if _, err := udpAsk(addr, "d"+strconv.Itoa(i), 200*time.Millisecond); err == nil {
				got.Add(1)
			}
		}
	}()
	time.Sleep(300 * time.Millisecond)
	if out, code := ctl(t, sock, "reload"); code != 0 {
		t.Fatalf("reload: exit %d: %s", code, out)
	}
	during := got.Load()
	time.Sleep(time.Second)
	close(stop)
	wg.Wait()
	after := pidsOf(status(t, sock))
	if after[1] == pids[1] || after[2] == pids[2] {
		t.Errorf("pids %v after the reload, were %v", after, pids)
	}
	// A datagram queued in an old worker's socket as it closes is lost: UDP
	// has no migration. The stream must go on being answered.
	t.Logf("UDP reload under a stream: %d of %d datagrams answered (%d before the reload returned)", got.Load(), sent.Load(), during)
	if got.Load() < sent.Load()*9/10 || got.Load() < during+50 {
		t.Errorf("%d of %d datagrams answered across the reload, want it to keep answering", got.Load(), sent.Load())
	}
}

// TestTCPAndUDPNeedBoth: a worker counts as serving only once it holds a
// socket on every listener; 'shoal ctl signal' reaches one slot, then all.
func TestTCPAndUDPNeedBoth(t *testing.T) {
	port, sock := testutil.FreePort(t), filepath.Join(t.TempDir(), "ctl.sock")
	p := strconv.Itoa(port)
	flags, argv := helperCmd("udp-then-tcp")
	m := startShoal(t, nil, append(flags, "--workers", "2", "--port", "tcp:"+p+",udp:"+p, "--control", sock,
		"--ready-timeout", "1s", "--stop-timeout", "3s", "--", argv[0])...)
	// Both bind UDP at once; neither serves, and the master says why.
	warns := m.waitFor(10*time.Second, 2, "the not-serving warnings", func(e entry) bool {
		return strings.Contains(e.str("message"), "does not serve")
	})
	for _, w := range warns {
		if !strings.Contains(w.str("message"), "listens on udp:127.0.0.1:"+p+", not on tcp:"+p) {
			t.Errorf("warning %q: want it to name the UDP socket and the missing TCP listener", w.str("message"))
		}
	}
	if got := len(m.current()); got != 0 {
		t.Fatalf("%d workers serving with their UDP socket only, want 0", got)
	}
	out, code := ctl(t, sock, "status")
	if code != 0 || !strings.Contains(out, "worker 1 does not serve: it listens on udp:127.0.0.1:"+p+", not on tcp:"+p) {
		t.Errorf("ctl status (exit %d) does not say why:\n%s", code, out)
	}
	// SIGUSR1 to slot 1 only: it binds TCP and serves; slot 2 does not.
	if out, code := ctl(t, sock, "signal", "USR1", "1"); code != 0 {
		t.Fatalf("ctl signal USR1 1: exit %d: %s", code, out)
	}
	m.listening(10*time.Second, 1)
	time.Sleep(300 * time.Millisecond)
	if cur := m.current(); len(cur) != 1 || cur[1] == 0 {
		t.Fatalf("serving after a signal to slot 1: %v, want slot 1 only", cur)
	}
	if out, code := ctl(t, sock, "signal", "SIGUSR1", "all"); code != 0 {
		t.Fatalf("ctl signal SIGUSR1 all: exit %d: %s", code, out)
	}
	m.listening(10*time.Second, 2)
	if out, code := ctl(t, sock, "signal", "NOPE"); code != 1 || !strings.Contains(out, `signal "NOPE"`) {
		t.Errorf("ctl signal NOPE: exit %d: %s; want exit 1 naming the bad signal", code, out)
	}
	m.signal(syscall.SIGTERM)
	if code := m.wait(15 * time.Second); code != 0 {
		t.Errorf("exit code %d, want 0", code)
	}
}

// TestWrongPortIsNamed: a worker that runs but listens on another port
// than PORT gets one warning naming the port it does listen on.
func TestWrongPortIsNamed(t *testing.T) {
	port, wrong := testutil.FreePort(t), testutil.FreePort(t)
	flags, argv := helperCmd("wrong-port")
	m := startShoal(t, []string{"E2E_WRONG_PORT=" + strconv.Itoa(wrong)}, append(flags, "--env", "E2E_WRONG_PORT",
		"--workers", "1", "--port", strconv.Itoa(port), "--ready-timeout", "1s", "--", argv[0])...)
	w := m.waitFor(10*time.Second, 1, "the not-serving warning", func(e entry) bool {
		return strings.Contains(e.str("message"), "does not serve")
	})[0]
	if want := fmt.Sprintf("listens on tcp:127.0.0.1:%d, not on tcp:%d", wrong, port); !strings.Contains(w.str("message"), want) {
		t.Errorf("warning %q: want %q", w.str("message"), want)
	}
	time.Sleep(1500 * time.Millisecond)
	if n := len(m.logs.entries(func(e entry) bool { return strings.Contains(e.str("message"), "does not serve") })); n != 1 {
		t.Errorf("%d warnings, want 1", n)
	}
}

// TestMasterSignals: SIGQUIT stops gracefully (workers get the stop signal
// and exit 0, the master exits 0, no goroutine dump); SIGUSR1 reaches every
// worker once; SIGUSR2 upgrades the master in place (to the same program)
// and keeps every worker; SIGTRAP and SIGABRT are logged and ignored; a
// closed stderr does not kill the master.
func TestMasterSignals(t *testing.T) {
	flags, argv := helperCmd("usr1")
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	m := startShoal(t, nil, append(flags, "--workers", "3", "--port", "0", "--control", sock, "--", argv[0])...)
	m.listening(10*time.Second, 3)
	waitStdout := func(what string, n int, substr string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for strings.Count(m.stdout.String(), substr) < n {
			if time.Now().After(deadline) {
				t.Fatalf("no %s within 10s; workers' stdout:\n%s", what, m.stdout)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitStdout("3 workers ready", 3, " ready")
	m.signal(syscall.SIGUSR1)
	waitStdout("SIGUSR1 in every worker", 3, " usr1 1")
	time.Sleep(200 * time.Millisecond)
	if n := strings.Count(m.stdout.String(), " usr1 "); n != 3 {
		t.Errorf("%d SIGUSR1 deliveries, want one in each of 3 workers:\n%s", n, m.stdout)
	}
	for _, sig := range []syscall.Signal{syscall.SIGUSR2, syscall.SIGTRAP, syscall.SIGABRT} {
		m.signal(sig)
	}
	// SIGUSR2 upgrades the master in place, here to the same program.
	m.waitFor(10*time.Second, 1, "the upgrade of SIGUSR2", msg("shoal upgraded in place"))
	m.waitFor(5*time.Second, 2, "SIGTRAP and SIGABRT logged", func(e entry) bool {
		return strings.HasPrefix(e.str("message"), "SIGTRAP ignored") || strings.HasPrefix(e.str("message"), "SIGABRT ignored")
	})
	if out, code := ctl(t, sock, "status"); code != 0 {
		t.Fatalf("the master after SIGUSR2, SIGTRAP and SIGABRT: ctl status exit %d: %s", code, out)
	}
	if st := status(t, sock); len(pidsOf(st)) != 3 || len(m.logs.entries(msg("worker started"))) != 3 {
		t.Errorf("workers after SIGUSR2: %v, %d started; want the same 3", pidsOf(st), len(m.logs.entries(msg("worker started"))))
	}
	m.signal(syscall.SIGQUIT)
	if code := m.wait(15 * time.Second); code != 0 {
		t.Fatalf("exit code after SIGQUIT %d, want 0", code)
	}
	deaths := m.logs.entries(msg("worker died"))
	if len(deaths) != 3 {
		t.Fatalf("%d deaths, want 3", len(deaths))
	}
	for _, d := range deaths {
		if d.str("reason") != "stop" || d.num("exit_code") != 0 || d.str("signal") != "" {
			t.Errorf("death %v: want reason stop, exit code 0 (the worker drained on SIGTERM)", d)
		}
	}
	if strings.Contains(m.logs.String(), "goroutine ") {
		t.Errorf("goroutine dump on SIGQUIT:\n%s", m.logs)
	}
}

// TestClosedStderrDoesNotKillTheMaster: the log collector behind stderr
// goes away; the master's writes fail, and it goes on.
func TestClosedStderrDoesNotKillTheMaster(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	cmd := exec.Command(shoalBin, "--workers", "1", "--port", "0", "--control", sock, "--", "sleep", "60")
	cmd.Env = append(os.Environ(), "SHOAL_METRICS_ADDR=", "SHOAL_LOG_FORMAT=json", "SHOAL_MIGRATE_REQ=off")
	cmd.Stderr, cmd.Stdout = w, w
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	var waitErr error
	done := make(chan struct{})
	go func() { waitErr = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
	})
	buf := make([]byte, 4096)
	r.Read(buf) // the first log line: it runs
	r.Close()
	// Every request logs a line, which now fails with EPIPE.
	for i := 0; i < 3; i++ {
		if out, code := ctl(t, sock, "status"); code != 0 {
			t.Fatalf("ctl status %d with stderr closed: exit %d: %s", i+1, code, out)
		}
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
		if waitErr != nil {
			t.Errorf("shoal with a closed stderr: %v, want exit 0 after SIGTERM (not killed by SIGPIPE)", waitErr)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("shoal did not exit 15s after SIGTERM")
	}
}

// TestNginxThatDaemonizes: nginx with "daemon on" exits at once while its
// daemon runs on. shoal says so with the fix, counts the death as
// daemonized, stops the daemon, and leaves no nginx behind at its stop.
func TestNginxThatDaemonizes(t *testing.T) {
	nginx := peer.Require(t, "nginx")
	dir := t.TempDir()
	port := testutil.FreePort(t)
	conf := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(conf, []byte(nginxConf(dir, port, true, true)), 0o644); err != nil {
		t.Fatal(err)
	}
	m := startShoal(t, nil, "--workers", "1", "--port", strconv.Itoa(port), "--stop-timeout", "3s",
		"--", nginx, "-e", "stderr", "-p", dir, "-c", conf)
	e := m.waitFor(15*time.Second, 1, "the daemonized error", func(e entry) bool {
		return strings.HasPrefix(e.str("message"), "worker daemonized")
	})[0]
	if !strings.Contains(e.str("message"), "daemon off;") && !strings.Contains(fmt.Sprint(e), "daemon off;") {
		t.Errorf("the error does not give the fix: %v", e)
	}
	if e.num("daemon_pid") == 0 || !strings.Contains(e.str("daemon"), "nginx") {
		t.Errorf("the error does not name the daemon's pid and command: %v", e)
	}
	m.waitFor(10*time.Second, 1, "a death counted as daemonized", func(e entry) bool {
		return e.str("message") == "worker died" && e.str("reason") == "daemonized"
	})
	time.Sleep(time.Second) // a restart or two: each daemonizes again
	m.signal(syscall.SIGTERM)
	if code := m.wait(20 * time.Second); code != 0 {
		t.Errorf("exit code %d, want 0", code)
	}
	if left := processesWith(dir); len(left) > 0 {
		t.Errorf("nginx processes left after shoal stopped: %v", left)
	}
}

// processesWith returns the pids of processes whose command line holds s.
func processesWith(s string) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if strings.Contains(string(b), s) {
			if st, ok := readStat(pid); ok && st.state != "Z" {
				out = append(out, pid)
			}
		}
	}
	return out
}

// TestTwoMastersOnOneHost: two services, on other ports and metrics
// addresses, and no --control: both run, each with a control socket of its
// port, and 'shoal ctl --port' reaches each.
func TestTwoMastersOnOneHost(t *testing.T) {
	env := peer.Require(t, "env")
	p1, p2 := testutil.FreePort(t), testutil.FreePort(t)
	unset := []string{env, "-u", "SHOAL_CONTROL"}
	m1 := startShoalVia(t, unset, nil, "--workers", "1", "--port", strconv.Itoa(p1), "--host", "127.0.0.1", "--metrics-addr", loopbackAddr(t))
	m2 := startShoalVia(t, unset, nil, "--workers", "2", "--port", strconv.Itoa(p2), "--host", "127.0.0.1", "--metrics-addr", loopbackAddr(t))
	m1.listening(15*time.Second, 1)
	m2.listening(15*time.Second, 2)
	for _, c := range []struct {
		port, workers int
	}{{p1, 1}, {p2, 2}} {
		out, code := run(t, 30*time.Second, shoalBin, "ctl", "--port", strconv.Itoa(c.port), "--json", "status")
		if code != 0 || jsonInt(out, `"desired":`) != c.workers {
			t.Errorf("ctl --port %d status: exit %d: %s; want %d workers", c.port, code, out, c.workers)
		}
	}
	out, code := run(t, 30*time.Second, shoalBin, "ctl", "status")
	if code != 1 || !strings.Contains(out, fmt.Sprintf("shoal-%d.sock", p1)) || !strings.Contains(out, fmt.Sprintf("shoal-%d.sock", p2)) || !strings.Contains(out, "--port") {
		t.Errorf("ctl status with two masters: exit %d: %s; want exit 1 listing both and asking for --port", code, out)
	}
	// The same metrics address for a third: refused, and the error says
	// what to give.
	busy := loopbackAddr(t)
	ln, err := net.Listen("tcp", busy)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	out, code = run(t, 30*time.Second, append(unset, shoalBin, "--port", strconv.Itoa(testutil.FreePort(t)), "--metrics-addr", busy)...)
	if code != 2 || !strings.Contains(out, "--metrics-addr") {
		t.Errorf("a third master on a busy metrics address: exit %d: %s; want exit 2 naming --metrics-addr", code, out)
	}
	for _, m := range []*master{m1, m2} {
		m.signal(syscall.SIGTERM)
		if code := m.wait(15 * time.Second); code != 0 {
			t.Errorf("exit code %d, want 0", code)
		}
	}
}

// TestNginxGracefulReload: nginx stops fast on SIGTERM; its graceful signal
// is SIGQUIT. 5 reloads of 2 nginx workers under load from a client that
// never retries (new connection per request, and keep-alive), with
// tcp_migrate_req=1 in a network namespace of the test's own: with
// --stop-signal QUIT no request on a new connection fails. nginx closes
// its idle keep-alive connections when it stops, gracefully or not, so a
// keep-alive client that never retries can lose the request it sends at
// that moment: those failures are measured and logged for both signals.
func TestNginxGracefulReload(t *testing.T) {
	peer.Require(t, "nginx")
	newConnLine := regexp.MustCompile(`NEWCONN ok=(\d+) failed=(\d+)`)
	for _, sig := range []string{"QUIT", "TERM"} {
		out := netnsChild(t, "TestNginxReloadInNamespace", "E2E_STOP_SIGNAL="+sig)
		m, nc := resultLine.FindStringSubmatch(out), newConnLine.FindStringSubmatch(out)
		if m == nil || nc == nil {
			t.Fatalf("no RESULT and NEWCONN lines from the namespace run:\n%s", out)
		}
		ok, _ := strconv.Atoi(m[1])
		failed, _ := strconv.Atoi(m[2])
		freshOK, _ := strconv.Atoi(nc[1])
		freshFailed, _ := strconv.Atoi(nc[2])
		t.Logf("nginx, --stop-signal %s, tcp_migrate_req=1, 5 reloads: %d answered, %d failed in all; new connections: %d answered, %d failed (%s)",
			sig, ok, failed, freshOK, freshFailed, m[4])
		if ok == 0 || freshOK == 0 {
			t.Errorf("--stop-signal %s: no request answered", sig)
		}
		if sig == "QUIT" && freshFailed != 0 {
			t.Errorf("%d requests on new connections failed during reloads of nginx with --stop-signal QUIT, want 0", freshFailed)
		}
	}
}

// TestNginxReloadInNamespace runs only inside netnsChild.
func TestNginxReloadInNamespace(t *testing.T) {
	if os.Getenv("E2E_NETNS_CHILD") != "1" {
		t.Skip("runs inside TestNginxGracefulReload's network namespace")
	}
	nginx := peer.Require(t, "nginx")
	dir := t.TempDir()
	port := testutil.FreePort(t)
	conf := filepath.Join(dir, "nginx.conf")
	// With its master process: in single-process mode (master_process
	// off) nginx exits at once on SIGQUIT as on SIGTERM.
	if err := os.WriteFile(conf, []byte(nginxConf(dir, port, true, false)), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "ctl.sock")
	// Each shoal worker is an nginx master with one nginx worker.
	m := startShoal(t, nil, "--workers", "2", "--port", strconv.Itoa(port), "--control", sock, "--migrate-req", "on",
		"--stop-signal", os.Getenv("E2E_STOP_SIGNAL"), "--stop-timeout", "10s",
		"--", nginx, "-e", "stderr", "-p", dir, "-c", conf)
	m.listening(15*time.Second, 2)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	fresh := startLoadWant(addr, 2, false, "nginx ")
	kept := startLoadWant(addr, 2, true, "nginx ")
	time.Sleep(300 * time.Millisecond)
	const reloads = 5
	for i := 0; i < reloads; i++ {
		if out, code := ctl(t, sock, "reload"); code != 0 {
			t.Fatalf("reload %d: exit %d: %s", i+1, code, out)
		}
		time.Sleep(300 * time.Millisecond)
	}
	m.waitFor(30*time.Second, 2*reloads, "every old nginx gone", func(e entry) bool {
		return e.str("message") == "worker died" && e.str("reason") == "reload"
	})
	res := finishAll(map[string]*load{"new connection": fresh, "keep-alive": kept})
	res.result(reloads)
	freshFailed := 0
	for r, n := range res.reasons {
		if strings.HasPrefix(r, "new connection: ") {
			freshFailed += n
		}
	}
	fmt.Printf("NEWCONN ok=%d failed=%d\n", fresh.ok.Load(), freshFailed)
	m.signal(syscall.SIGTERM)
	m.wait(30 * time.Second)
}
