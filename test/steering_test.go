package test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/peer"
	"github.com/shoal-sh/shoal/internal/testutil"
)

// Kernel steering (--steering) against real workers and a real kernel.

// askPID does one request on c (keep-alive) and returns the pid the
// pid-hello worker answered with.
func askPID(c net.Conn, br *bufio.Reader) (string, error) {
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: shoal\r\n\r\n"); err != nil {
		return "", err
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return "", err
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	return strings.TrimSpace(strings.TrimPrefix(string(b), "pid ")), err
}

// spread opens n connections one after another (keep each open when keep)
// and returns how many each worker pid got.
func spread(t *testing.T, addr string, n int, keep bool) map[string]int {
	t.Helper()
	got := map[string]int{}
	var open []net.Conn
	defer func() {
		for _, c := range open {
			c.Close()
		}
	}()
	for i := 0; i < n; i++ {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		pid, err := askPID(c, bufio.NewReader(c))
		if err != nil {
			c.Close()
			t.Fatalf("connection %d: %v", i, err)
		}
		got[pid]++
		if keep {
			open = append(open, c)
		} else {
			c.Close()
		}
	}
	return got
}

func ratio(counts map[string]int, workers int) float64 {
	if len(counts) < workers {
		return 0
	}
	lo, hi := -1, 0
	for _, n := range counts {
		hi = max(hi, n)
		if lo < 0 || n < lo {
			lo = n
		}
	}
	if lo == 0 {
		return 0
	}
	return float64(hi) / float64(lo)
}

// TestSteeringBalance: 16 keep-alive connections over 4 workers: exactly 4
// each, as the program's counters say too; 4,000 short connections:
// busiest / idlest <= 1.01. The kernel's hash is measured in the same run.
func TestSteeringBalance(t *testing.T) {
	flags, argv := helperCmd("pid-hello")
	for _, mode := range []string{"round-robin", "hash"} {
		port, maddr := testutil.FreePort(t), loopbackAddr(t)
		m := startShoal(t, nil, append(flags, "--steering", mode, "--workers", "4", "--port", strconv.Itoa(port), "--metrics-addr", maddr, "--", argv[0])...)
		m.listening(15*time.Second, 4)
		time.Sleep(100 * time.Millisecond) // the last worker's socket joins the map
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		kept := spread(t, addr, 16, true)
		short := spread(t, addr, 4000, false)
		keptCounts := mapValues(kept)
		t.Logf("--steering %s: 16 keep-alive connections over 4 workers: %v; 4,000 short: %v, busiest/idlest %.3f", mode, keptCounts, mapValues(short), ratio(short, 4))
		if mode == "round-robin" {
			if !slices.Equal(keptCounts, []int{4, 4, 4, 4}) {
				t.Errorf("16 keep-alive connections over 4 workers: %v, want exactly 4 each", kept)
			}
			if r := ratio(short, 4); r == 0 || r > 1.01 {
				t.Errorf("4,000 short connections: %v, busiest/idlest %.3f, want <= 1.01", short, r)
			}
			s := scrape(t, "http://"+maddr+"/metrics")
			total := 0.0
			for w := 1; w <= 4; w++ {
				n := s[fmt.Sprintf(`shoal_worker_steered_connections_total{worker="%d"}`, w)]
				if n < 1004 || n > 1005 {
					t.Errorf("worker %d: %v steered connections, want 1004 (4 + 1000)", w, n)
				}
				total += n
			}
			if s[`shoal_steering_mode{mode="round-robin"}`] != 1 || total != 4016 {
				t.Errorf("steering metrics: mode %v, total %v; want round-robin and 4016", s[`shoal_steering_mode{mode="round-robin"}`], total)
			}
		}
		m.signal(syscall.SIGTERM)
		m.wait(15 * time.Second)
	}
}

func mapValues(m map[string]int) []int {
	var out []int
	for _, v := range m {
		out = append(out, v)
	}
	sort.Ints(out)
	return out
}

// TestSteeringDrains, in a network namespace of its own with
// tcp_migrate_req=0: 200 reloads of naive workers (they close their
// listener and exit at once on SIGTERM, no drain) under new-connection load
// from a client that never retries lose nothing with round-robin steering,
// which takes a worker out of the selection before it is signalled (here
// 250 ms before, to cover a request in flight on a loaded machine); the
// kernel's hash is measured in the same run. Then 30 reloads of the
// built-in worker (which drains) under new-connection and keep-alive load,
// with the default 50 ms.
func TestSteeringDrains(t *testing.T) {
	failed := map[string]int{}
	for _, c := range []struct{ mode, kind string }{{"round-robin", "naive"}, {"hash", "naive"}, {"round-robin", "builtin"}, {"hash", "builtin"}} {
		out := netnsChild(t, "TestSteeringInNamespace", "E2E_STEERING="+c.mode, "E2E_KIND="+c.kind)
		m := resultLine.FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("no RESULT line from the namespace run:\n%s", out)
		}
		ok, _ := strconv.Atoi(m[1])
		n, _ := strconv.Atoi(m[2])
		failed[c.mode+"/"+c.kind] = n
		t.Logf("--steering %s, %s workers, tcp_migrate_req=0: %s reloads: %d answered, %d failed (%s)", c.mode, c.kind, m[3], ok, n, m[4])
		if ok == 0 {
			t.Errorf("%s/%s: no request answered", c.mode, c.kind)
		}
	}
	for _, k := range []string{"round-robin/naive", "round-robin/builtin"} {
		if failed[k] != 0 {
			t.Errorf("%s: %d requests failed during reloads, want 0", k, failed[k])
		}
	}
}

// TestSteeringInNamespace runs only inside netnsChild.
func TestSteeringInNamespace(t *testing.T) {
	if os.Getenv("E2E_NETNS_CHILD") != "1" {
		t.Skip("runs inside TestSteeringDrains' network namespace")
	}
	if err := os.WriteFile("/proc/sys/net/ipv4/tcp_migrate_req", []byte("0"), 0o644); err != nil {
		t.Fatal(err)
	}
	port, sock := testutil.FreePort(t), filepath.Join(t.TempDir(), "ctl.sock")
	args := []string{"--steering", os.Getenv("E2E_STEERING"), "--workers", "2", "--reload-surge", "2", "--port", strconv.Itoa(port),
		"--host", "127.0.0.1", "--control", sock, "--migrate-req", "off", "--stop-timeout", "5s"}
	naive := os.Getenv("E2E_KIND") == "naive"
	want := "hello world"
	reloads := 200
	if naive {
		// A worker that exits at once on its stop signal loses what it
		// has accepted and not answered: the drain delay must cover its
		// slowest request, which on this shared 2-core machine under the
		// test's own load reaches past the 50 ms default.
		// A small Python server: it starts in milliseconds, so 200 reloads
		// take seconds.
		python := peer.Require(t, "python3")
		args = append(append([]string{"--steering-drain-delay", "250ms"}, args...), "--", python, filepath.Join("testdata", "naive_pid.py"))
		want = "pid "
	} else {
		reloads = 30
	}
	m := startShoal(t, nil, args...)
	m.listening(15*time.Second, 2)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	loads := map[string]*load{"new connection": startLoadWant(addr, 2, false, want)}
	if !naive {
		loads["keep-alive"] = startLoadWant(addr, 2, true, want)
	}
	time.Sleep(200 * time.Millisecond)
	// SIGHUP and the log, rather than a 'shoal ctl reload' process per
	// reload: 200 of them are many process starts under the race detector.
	for i := 0; i < reloads; i++ {
		m.signal(syscall.SIGHUP)
		m.waitFor(30*time.Second, i+1, fmt.Sprintf("reload %d to finish", i+1), msg("reload finished"))
	}
	m.waitFor(60*time.Second, 2*reloads, "every old worker gone", func(e entry) bool {
		return e.str("message") == "worker died" && e.str("reason") == "reload"
	})
	finishAll(loads).result(reloads)
	m.signal(syscall.SIGTERM)
	m.wait(30 * time.Second)
}

// TestSteeringSkipsAStoppedWorker: one of 4 workers stopped with SIGSTOP
// for 5 s under load: with round-robin steering new connections keep being
// answered (it is taken out of the selection once its queue stops
// shrinking); with the hash, a share of them waits for it. Latencies are
// reported.
func TestSteeringSkipsAStoppedWorker(t *testing.T) {
	for _, mode := range []string{"round-robin", "hash"} {
		port := testutil.FreePort(t)
		m := startShoal(t, nil, "--steering", mode, "--workers", "4", "--port", strconv.Itoa(port), "--host", "127.0.0.1")
		pids := m.listening(15*time.Second, 4)
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		var mu sync.Mutex
		var lat []time.Duration
		timeouts := 0
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
				for {
					select {
					case <-stop:
						return
					default:
					}
					t0 := time.Now()
					resp, err := client.Get("http://" + addr + "/")
					d := time.Since(t0)
					mu.Lock()
					if err != nil {
						timeouts++
					} else {
						resp.Body.Close()
						lat = append(lat, d)
					}
					mu.Unlock()
				}
			}()
		}
		time.Sleep(300 * time.Millisecond)
		syscall.Kill(pids[2], syscall.SIGSTOP)
		time.Sleep(5 * time.Second)
		syscall.Kill(pids[2], syscall.SIGCONT)
		time.Sleep(500 * time.Millisecond)
		close(stop)
		wg.Wait()
		slices.Sort(lat)
		p99 := time.Duration(0)
		if len(lat) > 0 {
			p99 = lat[len(lat)*99/100]
		}
		t.Logf("--steering %s, one of 4 workers stopped 5 s: %d answered, %d errors, p50 %s, p99 %s, max %s",
			mode, len(lat), timeouts, lat[len(lat)/2], p99, lat[len(lat)-1])
		if mode == "round-robin" && (timeouts != 0 || p99 > 2*time.Second) {
			t.Errorf("round-robin: %d errors, p99 %s: want the stopped worker skipped (no error, p99 under 2 s)", timeouts, p99)
		}
		m.signal(syscall.SIGTERM)
		m.wait(15 * time.Second)
	}
}

// TestSteeringNeedsCapBPF: without CAP_BPF (dropped with setpriv), auto
// falls back to the hash with one line, and round-robin refuses to start
// with an error naming it.
func TestSteeringNeedsCapBPF(t *testing.T) {
	if os.Getuid() != 0 {
		peer.Missing(t, "dropping capabilities from a root master needs root")
	}
	setpriv := peer.Require(t, "setpriv")
	drop := []string{setpriv, "--bounding-set=-bpf,-sys_admin", "--inh-caps=-bpf,-sys_admin"}
	out, code := run(t, 30*time.Second, append(drop, "env", "SHOAL_CONTROL=", "SHOAL_METRICS_ADDR=", shoalBin, "--steering", "round-robin",
		"--workers", "1", "--port", strconv.Itoa(testutil.FreePort(t)))...)
	if code != 2 || !strings.Contains(out, "CAP_BPF") {
		t.Errorf("--steering round-robin without CAP_BPF: exit %d:\n%s\nwant exit 2 naming CAP_BPF", code, out)
	}
	port := testutil.FreePort(t)
	m := startShoalVia(t, drop, nil, "--steering", "auto", "--workers", "1", "--port", strconv.Itoa(port), "--host", "127.0.0.1")
	m.listening(15*time.Second, 1)
	lines := m.logs.entries(func(e entry) bool { return strings.HasPrefix(e.str("message"), "steering:") })
	if len(lines) != 1 || lines[0].str("steering") != "hash" || !strings.Contains(lines[0].str("message"), "CAP_BPF") {
		t.Errorf("auto without CAP_BPF: %v, want one line: the hash, naming CAP_BPF", lines)
	}
	getOK(t, fmt.Sprintf("http://127.0.0.1:%d/", port))
}

// TestSteeringAfterMasterKilled: the master killed with SIGKILL takes its
// workers with it as before; a new master on the same port steers anew.
func TestSteeringAfterMasterKilled(t *testing.T) {
	flags, argv := helperCmd("pid-hello")
	port := testutil.FreePort(t)
	args := append(flags, "--steering", "round-robin", "--workers", "2", "--port", strconv.Itoa(port), "--", argv[0])
	m := startShoal(t, nil, args...)
	pids := m.listening(15*time.Second, 2)
	m.cmd.Process.Kill()
	m.wait(10 * time.Second)
	waitGone(t, 5*time.Second, pids[1], pids[2])
	m2 := startShoal(t, nil, args...)
	m2.listening(15*time.Second, 2)
	time.Sleep(100 * time.Millisecond)
	if got := mapValues(spread(t, fmt.Sprintf("127.0.0.1:%d", port), 16, true)); !slices.Equal(got, []int{8, 8}) {
		t.Errorf("after a new master: 16 keep-alive connections over 2 workers %v, want 8 each", got)
	}
}
