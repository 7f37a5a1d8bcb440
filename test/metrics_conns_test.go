package test

import (
	"bufio"
	"context"
	"fmt"
	"net"
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

	"github.com/shoal-sh/shoal/internal/peer"
	"github.com/shoal-sh/shoal/internal/testutil"
)

// vmRSS returns the resident memory of pid as /proc/PID/status words it.
func vmRSS(pid int) string {
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			return strings.Join(strings.Fields(v), " ")
		}
	}
	return "unknown"
}

// fds returns the number of open file descriptors of pid.
func fds(t *testing.T, pid int) int {
	t.Helper()
	d, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
	if err != nil {
		t.Fatalf("count the descriptors of pid %d: %v", pid, err)
	}
	return len(d)
}

// TestMetricsIdleConnectionsSpareTheSupervisor runs the master under a
// 1,024-descriptor limit and opens 1,100 connections to its metrics port,
// each left idle after a keep-alive request and held by the client. The
// master must stay well under its limit, and still answer /healthz and
// 'shoal ctl status', and replace a SIGKILLed worker at once. Before the
// server had a connection limit, these connections took every descriptor:
// the health check and ctl timed out, and the replacement failed with
// "socketpair: too many open files".
func TestMetricsIdleConnectionsSpareTheSupervisor(t *testing.T) {
	prlimit := peer.Require(t, "prlimit")
	// With 1,024 descriptors the server's own maximum (256 connections)
	// binds; with 256, the reserve for the master: 256 - 64 - 4*4 = 176.
	for _, c := range []struct{ nofile, limit int }{{1024, 256}, {256, 176}} {
		t.Run(fmt.Sprintf("nofile=%d", c.nofile), func(t *testing.T) {
			idleConnections(t, prlimit, c.nofile, c.limit)
		})
	}
}

func idleConnections(t *testing.T, prlimit string, nofile, limit int) {
	const conns = 1100
	port, maddr := testutil.FreePort(t), loopbackAddr(t)
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	m := startShoalVia(t, []string{prlimit, fmt.Sprintf("--nofile=%d:%d", nofile, nofile)}, nil,
		"--workers", "4", "--port", strconv.Itoa(port), "--host", "127.0.0.1",
		"--metrics-addr", maddr, "--control", sock, "--stop-timeout", "5s")
	pids := m.listening(15*time.Second, 4)
	base := "http://" + maddr
	waitStatus(t, base+"/readyz", 200, 10*time.Second)
	before := fds(t, m.pid())

	// The connections: each idle after a keep-alive request. The client
	// holds them all to the end.
	var held []net.Conn
	t.Cleanup(func() {
		for _, c := range held {
			c.Close()
		}
	})
	peak := before
	unanswered := -1 // the first connection whose request went unanswered
	for i := range conns {
		c, err := net.DialTimeout("tcp", maddr, 5*time.Second)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		held = append(held, c)
		if unanswered < 0 {
			c.SetDeadline(time.Now().Add(3 * time.Second))
			fmt.Fprintf(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				// The rest stay silent: each would wait as long.
				t.Errorf("GET /healthz on connection %d of %d: %v", i, conns, err)
				unanswered = i
			} else {
				resp.Body.Close()
			}
		}
		if i%100 == 99 {
			peak = max(peak, fds(t, m.pid()))
		}
	}
	after := fds(t, m.pid())
	peak = max(peak, after)
	samples, err := tryScrape(base + "/metrics")
	if err != nil {
		t.Error(err)
	}
	t.Logf("master descriptors: %d before, %d after %d connections (peak sampled %d), RLIMIT_NOFILE %d; "+
		"server: %v connections open, limit %v, %v evicted; master RSS %s",
		before, after, conns, peak, nofile, samples["shoal_metrics_connections"],
		samples["shoal_metrics_connections_limit"], samples["shoal_metrics_connections_evicted_total"], vmRSS(m.pid()))
	if got := samples["shoal_metrics_connections_limit"]; got != float64(limit) {
		t.Errorf("shoal_metrics_connections_limit = %v, want %d", got, limit)
	}
	if peak > nofile-48 {
		t.Errorf("the master holds %d descriptors of %d: fewer than 48 left for its workers and control socket", peak, nofile)
	}

	// A health check, a ctl command and a worker's replacement, with the
	// connections still held.
	start := time.Now()
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	if resp, err := hc.Get(base + "/healthz"); err != nil {
		t.Errorf("GET /healthz: %v", err)
	} else if resp.Body.Close(); resp.StatusCode != 200 {
		t.Errorf("GET /healthz = %d, want 200", resp.StatusCode)
	}
	t.Logf("/healthz answered in %v", time.Since(start).Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start = time.Now()
	out, err := exec.CommandContext(ctx, shoalBin, "ctl", "--control", sock, "--timeout", "5s", "status").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "listening") {
		t.Errorf("shoal ctl status: %v\n%s", err, out)
	}
	t.Logf("shoal ctl status answered in %v", time.Since(start).Round(time.Millisecond))

	victim := pids[1]
	killed := time.Now()
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := killed.Add(5 * time.Second)
	for cur := m.current(); cur[1] == 0 || cur[1] == victim; cur = m.current() {
		if time.Now().After(deadline) {
			t.Fatalf("worker 1 not replaced within 5s of its SIGKILL: %v", cur)
		}
		time.Sleep(5 * time.Millisecond)
	}
	replaced := time.Since(killed)
	t.Logf("worker 1 replaced (listening) %v after its SIGKILL", replaced.Round(time.Millisecond))
	if replaced > time.Second {
		t.Errorf("worker 1 replaced %v after its SIGKILL, want within 1s", replaced.Round(time.Millisecond))
	}
	if bad := m.logs.entries(func(e entry) bool {
		return strings.Contains(e.str("error"), "too many open files") || strings.Contains(e.str("message"), "too many open files")
	}); len(bad) > 0 {
		t.Errorf("the master ran out of descriptors: %v", bad)
	}
	t.Logf("master descriptors at the end: %d", fds(t, m.pid()))
}

// TestMetricsParallelScrapes has 16 scrapers scrape at once, five times
// over: every scrape gets 200 and a whole page. Before concurrent scrapes
// shared one gather, more than 4 at once got 503, which let anyone deny
// monitoring.
func TestMetricsParallelScrapes(t *testing.T) {
	const scrapers, rounds = 16, 5
	port, maddr := testutil.FreePort(t), loopbackAddr(t)
	m := startShoal(t, nil, "--workers", "4", "--port", strconv.Itoa(port), "--host", "127.0.0.1",
		"--metrics-addr", maddr, "--stop-timeout", "5s")
	m.listening(15*time.Second, 4)
	url := "http://" + maddr + "/metrics"
	waitStatus(t, "http://"+maddr+"/readyz", 200, 10*time.Second)

	failed, total := 0, 0
	for round := range rounds {
		var wg sync.WaitGroup
		var mu sync.Mutex
		start := make(chan struct{})
		for range scrapers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				s, err := tryScrape(url)
				mu.Lock()
				defer mu.Unlock()
				total++
				if err != nil || s["shoal_workers_listening"] != 4 {
					failed++
					t.Errorf("round %d: scrape: %v (shoal_workers_listening %v)", round, err, s["shoal_workers_listening"])
				}
			}()
		}
		close(start)
		wg.Wait()
	}
	t.Logf("%d of %d parallel scrapes failed", failed, total)
}
