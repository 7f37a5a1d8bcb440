package test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/peer"
	"github.com/shoal-sh/shoal/internal/testutil"
	"github.com/shoal-sh/shoal/ipc"
	"github.com/shoal-sh/shoal/supervisor"
)

// hammer sends k requests, each on a new connection, and fails on any
// answer but 200 "hello world\n". killAt, if > 0, is called after that
// many requests.
func hammer(t *testing.T, port, k, killAt int, kill func()) {
	t.Helper()
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	for i := 1; i <= k; i++ {
		if code, body := get(t, url); code != 200 || body != "hello world\n" {
			t.Fatalf("request %d: %d %q", i, code, body)
		}
		if i == killAt {
			kill()
		}
	}
}

// expectCount waits until the master's request count is exactly k, then
// checks it stays k (a late or doubled report would move it).
func expectCount(t *testing.T, metricsURL string, k int) map[string]float64 {
	t.Helper()
	waitMetric(t, metricsURL, 10*time.Second, fmt.Sprintf("sum(shoal_requests_total) == %d", k), func(s map[string]float64) bool {
		return sumOf(s, "shoal_requests_total") >= float64(k)
	})
	time.Sleep(300 * time.Millisecond)
	s := scrape(t, metricsURL)
	if got := sumOf(s, "shoal_requests_total"); got != float64(k) {
		t.Fatalf("sum(shoal_requests_total) = %v, want exactly %d", got, k)
	}
	return s
}

func TestSeedExampleCountsEveryRequest(t *testing.T) {
	for _, kind := range []string{"node", "go", "python"} {
		t.Run(kind, func(t *testing.T) {
			var argv []string
			switch kind {
			case "node":
				argv = []string{"--", nodeBin(t), filepath.Join("testdata", "node-worker.js")}
			case "python":
				argv = []string{"--", peer.Require(t, "python3"), filepath.Join("testdata", "worker.py")}
			}
			port, maddr := testutil.FreePort(t), loopbackAddr(t)
			m := startShoal(t, nil, append([]string{"--workers", "2", "--port", strconv.Itoa(port), "--host", "127.0.0.1", "--metrics-addr", maddr}, argv...)...)
			m.listening(15*time.Second, 2)
			const k = 300
			hammer(t, port, k, 0, nil)
			s := expectCount(t, "http://"+maddr+"/metrics", k)
			for _, w := range []string{"1", "2"} {
				if s[`shoal_requests_total{worker="`+w+`"}`] == 0 {
					t.Errorf("worker %s served no request of %d: the kernel should spread them", w, k)
				}
			}
		})
	}
}

func TestNodeRelayThroughMaster(t *testing.T) {
	node := nodeBin(t)
	port := testutil.FreePort(t)
	m := startShoal(t, nil, "--workers", "2", "--port", strconv.Itoa(port), "--host", "127.0.0.1", "--env", "RELAY=1", "--", node, filepath.Join("testdata", "node-worker.js"))
	m.listening(15*time.Second, 2)
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(m.stdout.String(), "worker 1 got hello from 2") {
		if time.Now().After(deadline) {
			t.Fatalf("no relay round trip 1 -> 2 -> 1 within 10s; stdout:\n%s", m.stdout)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(m.stdout.String(), "worker 2 got hello from 1") {
		t.Errorf("worker 2 never got worker 1's greeting; stdout:\n%s", m.stdout)
	}
	// Application messages are logged at debug level; Node's own are not.
	apps := m.logs.entries(msg("message from worker"))
	if len(apps) < 2 {
		t.Errorf("%d application messages logged, want the 2 greetings", len(apps))
	}
	if strings.Contains(m.logs.String(), "NODE_TEST_INTERNAL") {
		t.Error("a NODE_ message reached the application log; Node's own messages must be ignored")
	}
}

// TestNodeWithGoLibraryMaster is the seed's master written with the Go
// library, its workers real Node.js processes: worker.send and
// worker.on('message') both ways.
func TestNodeWithGoLibraryMaster(t *testing.T) {
	node := nodeBin(t)
	script, _ := filepath.Abs(filepath.Join("testdata", "node-worker.js"))
	var mu sync.Mutex
	var got []supervisor.Message
	s, err := supervisor.New(supervisor.Options{
		Command:   []string{node, script},
		Workers:   2,
		Port:      testutil.FreePort(t),
		Env:       []string{"HOST=127.0.0.1"},
		OnMessage: func(m supervisor.Message) { mu.Lock(); got = append(got, m); mu.Unlock() },
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- s.Run(ctx) }()
	defer func() {
		cancel()
		select {
		case err := <-errc:
			if err != nil {
				t.Errorf("Run = %v", err)
			}
		case <-time.After(15 * time.Second):
			t.Error("Run did not return 15s after cancel")
		}
	}()
	find := func(pred func(map[string]any) bool) (supervisor.Message, bool) {
		mu.Lock()
		defer mu.Unlock()
		for _, m := range got {
			var v map[string]any
			json.Unmarshal(m.Raw, &v)
			if pred(v) {
				return m, true
			}
		}
		return supervisor.Message{}, false
	}
	waitFind := func(what string, pred func(map[string]any) bool) supervisor.Message {
		deadline := time.Now().Add(15 * time.Second)
		for {
			if m, ok := find(pred); ok {
				return m
			}
			if time.Now().After(deadline) {
				t.Fatalf("no %s within 15s", what)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	for _, id := range []float64{1, 2} {
		waitFind("greeting", func(v map[string]any) bool { return v["app"] == "hello from node" && v["from"] == id })
	}
	if err := s.Send(2, map[string]any{"echo": "ping"}); err != nil {
		t.Fatal(err)
	}
	m := waitFind("echo", func(v map[string]any) bool { return v["echoed"] == "ping" })
	if m.Worker != 2 {
		t.Errorf("echo from worker %d, want 2", m.Worker)
	}
	if _, ok := find(func(v map[string]any) bool { return v["cmd"] == "NODE_TEST_INTERNAL" }); ok {
		t.Error("a NODE_ message reached OnMessage")
	}
}

// TestNodeDisconnectWhenMasterGoes closes the master's end of a Node.js
// worker's channel: its process.on('disconnect') must fire.
func TestNodeDisconnectWhenMasterGoes(t *testing.T) {
	node := nodeBin(t)
	master, peer, err := ipc.Pair()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(node, filepath.Join("testdata", "node-worker.js"))
	cmd.Env = append(os.Environ(), "NODE_CHANNEL_FD=3", "SHOAL_IPC_FD=3", "SHOAL_WORKER_ID=1", "PORT="+strconv.Itoa(testutil.FreePort(t)))
	cmd.ExtraFiles = []*os.File{peer}
	out := newLogs()
	cmd.Stdout = out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	peer.Close()
	done := make(chan error, 1)
	exited := make(chan struct{})
	go func() { done <- cmd.Wait(); close(exited) }()
	defer func() {
		cmd.Process.Kill()
		<-exited
	}()
	master.SetReadDeadline(time.Now().Add(10 * time.Second))
	dec := ipc.NewDecoder(master, 0)
	m, err := dec.Next()
	if err != nil || !strings.Contains(string(m.Raw), "hello from node") {
		t.Fatalf("first message from node = %q, %v", m.Raw, err)
	}
	// Wait for its last message before going away, so it is idle.
	if m, err = dec.Next(); err != nil || !m.Internal() {
		t.Fatalf("second message from node = %q, %v; want its NODE_ message", m.Raw, err)
	}
	master.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("node exited with %v, want 0 from its disconnect handler", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("node still running 10s after the master's end closed")
	}
	if !strings.Contains(out.String(), "worker 1 disconnected") {
		t.Errorf("node's disconnect handler did not run; stdout: %q", out)
	}
}

// badWorkers: worker 1 sends garbage between good reports, worker 2 only
// good reports, worker 3 streams 1 GiB with no newline, then one report.
const badWorkers = `
case $SHOAL_WORKER_ID in
1)
	printf 'not json\n' >&3
	printf '"\377\376"\n' >&3
	head -c 5000 /dev/zero | tr '\0' x >&3; printf '\n' >&3
	printf '{"cmd":"shoal:requests","n":-4}\n' >&3
	i=0; while [ $i -lt 10 ]; do printf '{"cmd":"notifyRequest"}\n' >&3; i=$((i+1)); done
	;;
2)
	i=0; while [ $i -lt 100 ]; do printf '{"cmd":"notifyRequest"}\n' >&3; i=$((i+1)); done
	;;
3)
	head -c 1073741824 /dev/zero >&3
	printf '\n{"cmd":"notifyRequest"}\n' >&3
	;;
4)
	printf '{"cmd":"shoal:requests","n":7}\n{"cmd":"notif' >&3
	exit 0
	;;
esac
exec sleep 60
`

func TestBadMessagesCostOnlyTheirSender(t *testing.T) {
	maddr := loopbackAddr(t)
	m := startShoal(t, nil, "--workers", "4", "--port", "0", "--restart", "on-failure", "--ipc-max-message", "1024",
		"--metrics-addr", maddr, "--", "sh", "-c", badWorkers)
	url := "http://" + maddr + "/metrics"
	s := waitMetric(t, url, 30*time.Second, "every report counted", func(s map[string]float64) bool {
		return s[`shoal_requests_total{worker="1"}`] == 10 && s[`shoal_requests_total{worker="2"}`] == 100 &&
			s[`shoal_requests_total{worker="3"}`] == 1 && s[`shoal_requests_total{worker="4"}`] == 7
	})
	for reason, want := range map[string]float64{"invalid_json": 1, "invalid_utf8": 1, "too_long": 1, "bad_field": 1} {
		if got := s[`shoal_ipc_errors_total{reason="`+reason+`",worker="1"}`]; got != want {
			t.Errorf("worker 1 %s errors = %v, want %v", reason, got, want)
		}
		if got := s[`shoal_ipc_errors_total{reason="`+reason+`",worker="2"}`]; got != 0 {
			t.Errorf("worker 2 (well-behaved) charged %v %s errors", got, reason)
		}
	}
	if got := s[`shoal_ipc_errors_total{reason="too_long",worker="3"}`]; got != 1 {
		t.Errorf("worker 3's 1 GiB line counted as %v too_long errors, want 1", got)
	}
	bad := m.logs.entries(func(e entry) bool { return e.str("message") == "bad message from worker skipped" })
	if len(bad) < 5 {
		t.Errorf("%d 'bad message' log lines, want one per bad message", len(bad))
	}
	for _, e := range bad {
		if e.num("worker") == 2 {
			t.Errorf("bad message blamed on the well-behaved worker 2: %v", e)
		}
		if e.str("error") == "" {
			t.Errorf("bad message log line without the reason: %v", e)
		}
	}
	cut := m.logs.entries(func(e entry) bool {
		return e.str("message") == "bad message from worker skipped" && e.num("worker") == 4 && strings.Contains(e.str("error"), "unexpected EOF")
	})
	if len(cut) != 1 {
		t.Errorf("worker 4's line cut by its exit: %d log lines, want 1", len(cut))
	}
	// The 1 GiB line never sat in the master's memory.
	hwm := peakRSS(t, m.pid())
	t.Logf("master peak RSS (VmHWM) after a worker sent a 1 GiB line: %d MiB", hwm>>20)
	if hwm > 200<<20 {
		t.Errorf("master peak RSS %d MiB after a 1 GiB line, want it bounded", hwm>>20)
	}
	m.signal(syscall.SIGTERM)
	if code := m.wait(15 * time.Second); code != 0 {
		t.Errorf("exit code %d, want 0", code)
	}
}

// peakRSS returns a process's peak resident set (VmHWM) in bytes.
func peakRSS(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmHWM:" {
			kb, _ := strconv.Atoi(f[1])
			return kb << 10
		}
	}
	t.Fatal("no VmHWM in /proc/PID/status")
	return 0
}
