package test

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/peer"
	"github.com/shoal-sh/shoal/internal/sdnotify"
	"github.com/shoal-sh/shoal/internal/testutil"
	"github.com/shoal-sh/shoal/reuseport"
)

// Hand-off mode (--bind master) and sd_notify, with real programs.

var listenPIDLine = regexp.MustCompile(`worker (\d+) pid (\d+) LISTEN_PID (\d*)`)

// checkListenPIDs waits for n workers' "worker ID pid P LISTEN_PID L"
// lines and checks that each worker's LISTEN_PID is its own pid.
func checkListenPIDs(t *testing.T, m *master, n int) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		lines := listenPIDLine.FindAllStringSubmatch(m.stdout.String(), -1)
		if len(lines) >= n {
			for _, l := range lines {
				if l[2] != l[3] {
					t.Errorf("worker %s: pid %s, LISTEN_PID %q: want its own pid", l[1], l[2], l[3])
				}
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d workers printed their pid and LISTEN_PID:\n%s", len(lines), n, m.stdout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// servedBy GETs url until both pids answered (by their own pid printed),
// or fails.
func getOK(t *testing.T, url string) {
	t.Helper()
	if code, body := get(t, url); code != 200 || body != "hello world\n" {
		t.Fatalf("GET %s = %d %q", url, code, body)
	}
}

// TestBindMasterGoAndNode: a Go worker (package worker) and a Node.js 22
// worker (server.listen({fd: 3})) take their sockets from the master: each
// sees its own pid as LISTEN_PID, and serves; the built-in worker runs
// unchanged.
func TestBindMasterGoAndNode(t *testing.T) {
	t.Run("go", func(t *testing.T) {
		port := testutil.FreePort(t)
		flags, argv := helperCmd("listen-fds")
		m := startShoal(t, nil, append(flags, "--bind", "master", "--workers", "2", "--port", strconv.Itoa(port), "--host", "127.0.0.1", "--", argv[0])...)
		m.listening(15*time.Second, 2)
		checkListenPIDs(t, m, 2)
		getOK(t, fmt.Sprintf("http://127.0.0.1:%d/", port))
	})
	t.Run("node", func(t *testing.T) {
		node := nodeBin(t)
		port := testutil.FreePort(t)
		m := startShoal(t, nil, "--bind", "master", "--workers", "2", "--port", strconv.Itoa(port), "--host", "127.0.0.1",
			"--", node, filepath.Join("testdata", "node-fd.js"))
		m.listening(15*time.Second, 2)
		checkListenPIDs(t, m, 2)
		getOK(t, fmt.Sprintf("http://127.0.0.1:%d/", port))
	})
	t.Run("built-in", func(t *testing.T) {
		port := testutil.FreePort(t)
		m := startShoal(t, nil, "--bind", "master", "--workers", "2", "--port", strconv.Itoa(port), "--host", "127.0.0.1")
		m.listening(15*time.Second, 2)
		getOK(t, fmt.Sprintf("http://127.0.0.1:%d/", port))
		// The master holds the slots' sockets too: one per worker.
		socks, err := reuseport.Listeners(port)
		if err != nil {
			t.Fatal(err)
		}
		held, err := reuseport.Inodes(m.pid())
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, sk := range socks {
			if _, ok := held[sk.Inode]; ok {
				n++
			}
		}
		if len(socks) != 2 || n != 2 {
			t.Errorf("%d LISTEN sockets on the port, %d of them the master's; want 2, both held by the master", len(socks), n)
		}
	})
}

// TestBindMasterBadInput: a port held by a socket without SO_REUSEPORT
// fails at start with exit 2, naming the port and who holds it; the
// master's own LISTEN_FDS, LISTEN_PID and NOTIFY_SOCKET never reach a
// worker.
func TestBindMasterBadInput(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	out, code := run(t, 30*time.Second, "env", "SHOAL_CONTROL=", "SHOAL_METRICS_ADDR=", shoalBin, "--bind", "master", "--workers", "2",
		"--port", strconv.Itoa(port), "--host", "127.0.0.1")
	want := fmt.Sprintf("pid [%d]", os.Getpid())
	if code != 2 || !strings.Contains(out, "address already in use") || !strings.Contains(out, fmt.Sprintf("tcp:%d is held by uid", port)) || !strings.Contains(out, want) {
		t.Errorf("--bind master on a held port: exit %d:\n%s\nwant exit 2 naming tcp:%d and its holder (%s)", code, out, port, want)
	}
	if strings.Contains(out, "worker started") {
		t.Errorf("a worker was started:\n%s", out)
	}

	port = testutil.FreePort(t)
	flags, argv := helperCmd("listen-fds")
	m := startShoal(t, []string{"LISTEN_FDS=7", "LISTEN_PID=1", "LISTEN_FDNAMES=evil", "NOTIFY_SOCKET=@not-for-workers"},
		append(flags, "--inherit-env", "--workers", "1", "--port", strconv.Itoa(port), "--host", "127.0.0.1", "--", argv[0])...)
	m.listening(15*time.Second, 1)
	env := environ(t, m.current()[1])
	for _, k := range []string{"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET"} {
		if v, ok := env[k]; ok {
			t.Errorf("the master's %s=%s reached a worker started with --bind worker --inherit-env", k, v)
		}
	}
}

// notifications collects what a master sends to a NOTIFY_SOCKET of the
// test's own.
type notifications struct {
	l    *sdnotify.Listener
	msgs chan sdnotify.Message
}

func listenNotify(t *testing.T) *notifications {
	t.Helper()
	l, err := sdnotify.Listen(fmt.Sprintf("shoal-e2e-%d-%d", os.Getpid(), time.Now().UnixNano()))
	if err != nil {
		t.Fatal(err)
	}
	n := &notifications{l: l, msgs: make(chan sdnotify.Message, 1024)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			m, err := l.Read()
			if err != nil && m.PID == 0 {
				return
			}
			n.msgs <- m
		}
	}()
	t.Cleanup(func() { l.Close(); <-done })
	return n
}

// next waits for a notification with key=value, skipping others, and
// returns it.
func (n *notifications) next(t *testing.T, key, value string, timeout time.Duration) sdnotify.Message {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case m := <-n.msgs:
			if v, ok := m.Fields[key]; ok && (value == "" || v == value) {
				return m
			}
		case <-deadline:
			t.Fatalf("no %s=%s notification within %s", key, value, timeout)
		}
	}
}

// TestSDNotify: the master tells its own NOTIFY_SOCKET READY=1 once the
// workers serve, RELOADING=1 and READY=1 around a reload (with the reason
// when it aborted), WATCHDOG=1 at half WATCHDOG_USEC, and STOPPING=1.
func TestSDNotify(t *testing.T) {
	n := listenNotify(t)
	dir := t.TempDir()
	release := filepath.Join(dir, "release.sh")
	flags, argv := helperCmd("hello")
	write := func(body string) {
		if err := os.WriteFile(release+".tmp", []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		os.Rename(release+".tmp", release)
	}
	write(fmt.Sprintf("exec %q", argv[0]))
	port, sock := testutil.FreePort(t), filepath.Join(dir, "ctl.sock")
	m := startShoal(t, []string{"NOTIFY_SOCKET=" + n.l.Addr(), "WATCHDOG_USEC=400000"},
		append(flags, "--workers", "2", "--port", strconv.Itoa(port), "--control", sock, "--ready-timeout", "2s", "--", release)...)
	ready := n.next(t, "READY", "1", 15*time.Second)
	if ready.PID != m.pid() || !strings.HasPrefix(ready.Fields["STATUS"], "2/2 workers listening") {
		t.Errorf("READY=1 %+v: want it from the master (pid %d) with STATUS 2/2 workers listening", ready, m.pid())
	}
	if len(m.current()) != 2 {
		t.Errorf("READY=1 before both workers listen: %v", m.current())
	}
	// WATCHDOG=1 every 200 ms.
	t0 := time.Now()
	for range 3 {
		n.next(t, "WATCHDOG", "1", time.Second)
	}
	if d := time.Since(t0); d > 2*time.Second {
		t.Errorf("3 WATCHDOG=1 took %s, want about 0.6 s", d)
	}
	// A reload: RELOADING=1 with MONOTONIC_USEC, then READY=1.
	if out, code := ctl(t, sock, "reload"); code != 0 {
		t.Fatalf("reload: exit %d: %s", code, out)
	}
	r := n.next(t, "RELOADING", "1", 5*time.Second)
	if usec, err := strconv.ParseInt(r.Fields["MONOTONIC_USEC"], 10, 64); err != nil || usec <= 0 {
		t.Errorf("RELOADING=1 without MONOTONIC_USEC: %+v", r)
	}
	if m := n.next(t, "READY", "1", 5*time.Second); m.Fields["STATUS"] != "reloaded" {
		t.Errorf("READY=1 after the reload: %+v, want STATUS=reloaded", m)
	}
	// An aborted reload says why.
	write("exit 1")
	if out, code := ctl(t, sock, "reload"); code != 1 {
		t.Fatalf("broken reload: exit %d: %s", code, out)
	}
	n.next(t, "RELOADING", "1", 5*time.Second)
	if m := n.next(t, "READY", "1", 5*time.Second); !strings.Contains(m.Fields["STATUS"], "reload aborted") {
		t.Errorf("READY=1 after an aborted reload: %+v, want STATUS saying the reload aborted", m)
	}
	m.signal(syscall.SIGTERM)
	n.next(t, "STOPPING", "1", 5*time.Second)
	if code := m.wait(15 * time.Second); code != 0 {
		t.Errorf("exit code %d, want 0", code)
	}
}

// TestReadyNotify: with --ready notify, a worker that holds the port at
// once but sends READY=1 only after a second counts as serving only then.
func TestReadyNotify(t *testing.T) {
	port := testutil.FreePort(t)
	flags, argv := helperCmd("notify-late")
	start := time.Now()
	m := startShoal(t, []string{"E2E_READY_AFTER=1s"}, append(flags, "--env", "E2E_READY_AFTER", "--ready", "notify",
		"--workers", "2", "--port", strconv.Itoa(port), "--", argv[0])...)
	time.Sleep(700 * time.Millisecond)
	if cur := m.current(); len(cur) != 0 {
		t.Fatalf("workers %v serving before their READY=1", cur)
	}
	m.listening(10*time.Second, 2)
	if d := time.Since(start); d < time.Second {
		t.Errorf("serving after %s, before the workers' READY=1 at 1 s", d)
	}
	m.signal(syscall.SIGTERM)
	m.waitFor(10*time.Second, 2, "STOPPING=1 logged", msg("worker says it is stopping"))
	if code := m.wait(15 * time.Second); code != 0 {
		t.Errorf("exit code %d, want 0", code)
	}
}

// TestBindMasterGunicorn: Debian's gunicorn takes its socket from
// LISTEN_FDS; 2 workers under --bind master serve, and reload under load
// with no failed request.
func TestBindMasterGunicorn(t *testing.T) {
	gunicorn := peer.Require(t, "gunicorn")
	port, sock := testutil.FreePort(t), filepath.Join(t.TempDir(), "ctl.sock")
	m := startShoal(t, []string{"PYTHONPATH=testdata"}, "--env", "PYTHONPATH", "--bind", "master", "--ready", "notify",
		"--workers", "2", "--port", strconv.Itoa(port), "--host", "127.0.0.1", "--control", sock, "--stop-timeout", "10s",
		"--", gunicorn, "--workers", "1", "--graceful-timeout", "5", "wsgi_hello:app")
	m.listening(20*time.Second, 2)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	getOK(t, "http://"+addr+"/")
	fresh := startLoad(addr, 2, false)
	kept := startLoad(addr, 2, true)
	time.Sleep(300 * time.Millisecond)
	for i := 0; i < 3; i++ {
		if out, code := ctl(t, sock, "reload"); code != 0 {
			t.Fatalf("reload %d: exit %d: %s", i+1, code, out)
		}
		time.Sleep(300 * time.Millisecond)
	}
	m.waitFor(30*time.Second, 6, "every old gunicorn gone", func(e entry) bool {
		return e.str("message") == "worker died" && e.str("reason") == "reload"
	})
	okFresh, failFresh := fresh.finish()
	okKept, failKept := kept.finish()
	t.Logf("gunicorn, --bind master, 3 reloads: %d answered on new connections (%v failed), %d with keep-alive (%v failed)", okFresh, failFresh, okKept, failKept)
	if len(failFresh)+len(failKept) != 0 || okFresh == 0 || okKept == 0 {
		t.Errorf("failures during reloads of gunicorn: new connections %v, keep-alive %v", failFresh, failKept)
	}
	m.signal(syscall.SIGTERM)
	if code := m.wait(30 * time.Second); code != 0 {
		t.Errorf("exit code %d, want 0", code)
	}
}

// TestBindMasterUnderLoad, in a network namespace of its own with
// net.ipv4.tcp_migrate_req=0 (a restricted pod cannot set it): 20 reloads
// of 4 built-in workers under load from a client that never retries (new
// connection per request, and keep-alive) lose nothing with --bind master,
// where no listener closes; the same run with --bind worker is reported.
// Then a worker killed with SIGKILL under new-connection load: only the
// requests it had accepted may fail with --bind master; both reported.
func TestBindMasterUnderLoad(t *testing.T) {
	results := map[string][2]int{}
	for _, bind := range []string{"master", "worker"} {
		out := netnsChild(t, "TestHandoffInNamespace", "E2E_BIND="+bind)
		m := resultLine.FindStringSubmatch(out)
		k := killLine.FindStringSubmatch(out)
		if m == nil || k == nil {
			t.Fatalf("no RESULT and KILL lines from the namespace run:\n%s", out)
		}
		ok, _ := strconv.Atoi(m[1])
		failed, _ := strconv.Atoi(m[2])
		kok, _ := strconv.Atoi(k[1])
		kfailed, _ := strconv.Atoi(k[2])
		results[bind] = [2]int{failed, kfailed}
		t.Logf("--bind %s, tcp_migrate_req=0: %s reloads: %d answered, %d failed (%s); SIGKILL of a worker: %d answered, %d failed (%s)",
			bind, m[3], ok, failed, m[4], kok, kfailed, k[3])
		if ok == 0 || kok == 0 {
			t.Errorf("--bind %s: no request answered", bind)
		}
	}
	if results["master"][0] != 0 {
		t.Errorf("%d requests failed during reloads with --bind master and tcp_migrate_req=0, want 0", results["master"][0])
	}
}

var killLine = regexp.MustCompile(`KILL ok=(\d+) failed=(\d+) reasons=(.*)`)

// TestHandoffInNamespace runs only inside netnsChild.
func TestHandoffInNamespace(t *testing.T) {
	if os.Getenv("E2E_NETNS_CHILD") != "1" {
		t.Skip("runs inside TestBindMasterUnderLoad's network namespace")
	}
	if err := os.WriteFile("/proc/sys/net/ipv4/tcp_migrate_req", []byte("0"), 0o644); err != nil {
		t.Fatal(err)
	}
	port := testutil.FreePort(t)
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	m := startShoal(t, nil, "--bind", os.Getenv("E2E_BIND"), "--workers", "4", "--port", strconv.Itoa(port), "--host", "127.0.0.1",
		"--control", sock, "--migrate-req", "off", "--stop-timeout", "10s")
	m.listening(15*time.Second, 4)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	fresh := startLoad(addr, 4, false)
	kept := startLoad(addr, 4, true)
	time.Sleep(300 * time.Millisecond)
	const reloads = 20
	for i := 0; i < reloads; i++ {
		if out, code := ctl(t, sock, "reload"); code != 0 {
			t.Fatalf("reload %d: exit %d: %s", i+1, code, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	m.waitFor(60*time.Second, 4*reloads, "every old worker gone", func(e entry) bool {
		return e.str("message") == "worker died" && e.str("reason") == "reload"
	})
	finishAll(map[string]*load{"new connection": fresh, "keep-alive": kept}).result(reloads)

	// A worker killed under new-connection load.
	kill := startLoad(addr, 4, false)
	time.Sleep(300 * time.Millisecond)
	victim := m.current()[1]
	syscall.Kill(victim, syscall.SIGKILL)
	m.waitFor(10*time.Second, 1, "the replacement", func(e entry) bool {
		return e.str("message") == "worker listening" && e.num("worker") == 1 && e.num("pid") != victim
	})
	time.Sleep(300 * time.Millisecond)
	kok, kfail := kill.finish()
	kfailed := 0
	for _, n := range kfail {
		kfailed += n
	}
	fmt.Printf("KILL ok=%d failed=%d reasons=%s\n", kok, kfailed, describe(kfail))
	m.signal(syscall.SIGTERM)
	m.wait(30 * time.Second)
}

// TestPrivilegedPortForNobody: a root master in a network namespace of its
// own binds port 80 and hands it to workers that run as nobody, with no
// capability: they serve.
func TestPrivilegedPortForNobody(t *testing.T) {
	out := netnsChild(t, "TestPort80InNamespace")
	if !strings.Contains(out, "PORT80 ok") {
		t.Fatalf("port 80 for nobody:\n%s", out)
	}
}

// TestPort80InNamespace runs only inside netnsChild.
func TestPort80InNamespace(t *testing.T) {
	if os.Getenv("E2E_NETNS_CHILD") != "1" {
		t.Skip("runs inside TestPrivilegedPortForNobody's network namespace")
	}
	m := startShoal(t, nil, "--bind", "master", "--user", "nobody", "--workers", "2", "--port", "80", "--host", "127.0.0.1")
	pids := m.listening(15*time.Second, 2)
	for _, pid := range pids {
		st, ok := readStat(pid)
		if !ok {
			t.Fatalf("worker %d gone", pid)
		}
		_ = st
		status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			t.Fatal(err)
		}
		if !regexp.MustCompile(`(?m)^Uid:\s+65534\s`).Match(status) || !regexp.MustCompile(`(?m)^CapEff:\s+0+$`).Match(status) {
			t.Errorf("worker %d: want uid 65534 with no effective capability:\n%s", pid, status)
		}
	}
	getOK(t, "http://127.0.0.1:80/")
	fmt.Println("PORT80 ok")
	m.signal(syscall.SIGTERM)
	m.wait(15 * time.Second)
}
