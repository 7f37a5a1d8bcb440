package test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/peer"
	"github.com/shoal-sh/shoal/internal/testutil"
)

// TestMetricsPrometheusCountsEveryRequest runs shoal with its built-in
// workers under a real Prometheus server, sends K requests with one worker
// SIGKILLed halfway, and checks that Prometheus sees exactly K, and keeps
// seeing K: the slot's count survives the restart.
func TestMetricsPrometheusCountsEveryRequest(t *testing.T) {
	promBin := peer.Require(t, "prometheus")
	promtool := peer.Require(t, "promtool")
	const k = 300

	port, mport := testutil.FreePort(t), testutil.FreePort(t)
	m := startShoal(t, nil, "--workers", "2", "--port", strconv.Itoa(port), "--host", "127.0.0.1",
		"--metrics-addr", "127.0.0.1:"+strconv.Itoa(mport), "--stop-timeout", "5s")
	pids := m.listening(15*time.Second, 2)
	shoalURL := fmt.Sprintf("http://127.0.0.1:%d", mport)
	waitStatus(t, shoalURL+"/readyz", 200, 10*time.Second)
	if code, body := get(t, shoalURL+"/readyz"); code != 200 || body != "2 of 2 workers listening\n" {
		t.Errorf("GET /readyz = %d %q", code, body)
	}
	if code, _ := get(t, shoalURL+"/healthz"); code != 200 {
		t.Errorf("GET /healthz = %d, want 200", code)
	}
	if code := post(t, shoalURL+"/metrics"); code != http.StatusMethodNotAllowed {
		t.Errorf("POST /metrics = %d, want 405", code)
	}

	prom := startPrometheus(t, promBin, mport)

	// Each request on a new connection, and none retried: the count must
	// be exact.
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	defer client.CloseIdleConnections()
	send := func(n int) {
		t.Helper()
		for i := 0; i < n; i++ {
			resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
			if err != nil {
				t.Fatalf("request: %v", err)
			}
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || resp.StatusCode != 200 || string(body) != "hello world\n" {
				t.Fatalf("request = %d %q %v, want 200 hello world", resp.StatusCode, body, err)
			}
		}
	}
	send(k / 2)
	// Workers report in batches every 100ms. Requests a worker served but
	// had not reported yet when SIGKILL came are lost with it by design, so
	// wait until the master has them all.
	waitMetric(t, shoalURL+"/metrics", 10*time.Second, fmt.Sprintf("%d requests counted", k/2), func(s map[string]float64) bool {
		return sumOf(s, "shoal_requests_total") == k/2
	})

	victim := pids[1]
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	m.waitFor(10*time.Second, 1, "the death of the SIGKILLed worker", func(e entry) bool {
		return e.str("message") == "worker died" && e.num("pid") == victim
	})
	deadline := time.Now().Add(10 * time.Second)
	for cur := m.current(); cur[1] == 0 || cur[1] == victim || len(cur) < 2; cur = m.current() {
		if time.Now().After(deadline) {
			t.Fatalf("worker 1 not replaced within 10s: %v", cur)
		}
		time.Sleep(10 * time.Millisecond)
	}
	send(k - k/2)

	// Prometheus scrapes every second; the last batch comes within 100ms.
	const query = "sum(shoal_requests_total)"
	deadline = time.Now().Add(20 * time.Second)
	var got float64
	for {
		v, ok := prom.query(t, query)
		if ok {
			got = v
		}
		if ok && v == k {
			break
		}
		if ok && v > k {
			t.Fatalf("%s = %v, want %d: requests counted twice", query, v, k)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s = %v after 20s, want %d", query, got, k)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// It stays K over three more scrapes.
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(300 * time.Millisecond) {
		if v, ok := prom.query(t, query); !ok || v != k {
			t.Fatalf("%s = %v (found %v) after it was %d, want it to stay %d", query, v, ok, k, k)
		}
	}
	for q, want := range map[string]float64{
		`shoal_worker_deaths_total{worker="1",reason="signal_SIGKILL"}`: 1,
		`shoal_worker_starts_total{worker="1"}`:                         2,
		`shoal_workers_listening`:                                       2,
		`shoal_port_foreign_listen_sockets`:                             0,
		`shoal_port_listen_sockets`:                                     2,
		`up{job="shoal"}`:                                               1,
	} {
		if v, ok := prom.query(t, q); !ok || v != want {
			t.Errorf("%s = %v (found %v), want %v", q, v, ok, want)
		}
	}

	// The exposition passes promtool's checks.
	code, body := get(t, shoalURL+"/metrics")
	if code != 200 {
		t.Fatalf("GET /metrics = %d", code)
	}
	check := exec.Command(promtool, "check", "metrics")
	check.Stdin = strings.NewReader(body)
	if out, err := check.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}

// waitStatus polls url until it answers code.
func waitStatus(t *testing.T, url string, code int, timeout time.Duration) {
	t.Helper()
	c := &http.Client{Timeout: time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	deadline := time.Now().Add(timeout)
	last := "no answer"
	for time.Now().Before(deadline) {
		resp, err := c.Get(url)
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == code {
				return
			}
			last = fmt.Sprintf("%d %q", resp.StatusCode, b)
		} else {
			last = err.Error()
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("GET %s: want %d within %s, last %s", url, code, timeout, last)
}

// post does one POST on a fresh connection and returns the status.
func post(t *testing.T, url string) int {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Post(url, "text/plain", strings.NewReader("x"))
	if err != nil {
		t.Fatalf("POST %s: %v", url, err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// promServer is a Prometheus server under test.
type promServer struct {
	url string // of its HTTP API
}

// promConfig scrapes shoal's metrics port every second.
const promConfig = `global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: shoal
    static_configs:
      - targets: ['127.0.0.1:%d']
`

// startPrometheus starts a Prometheus server on loopback that scrapes
// 127.0.0.1:target, and waits until it is ready. It is killed and reaped
// when the test ends; its output is shown only if the test failed.
func startPrometheus(t *testing.T, bin string, target int) *promServer {
	t.Helper()
	dir := t.TempDir()
	conf := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(promConfig, target)), 0o644); err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
	out := newLogs()
	cmd := exec.Command(bin,
		"--config.file="+conf,
		"--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr,
		"--log.level=info")
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start prometheus: %v", err)
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Errorf("prometheus (pid %d) not reaped 10s after SIGKILL", cmd.Process.Pid)
		}
		if t.Failed() {
			t.Logf("prometheus output:\n%s", out)
		}
	})
	p := &promServer{url: "http://" + addr}
	c := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := c.Get(p.url + "/-/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return p
			}
		}
		select {
		case <-done:
			t.Fatalf("prometheus exited before it was ready")
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("prometheus not ready within 20s")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// query evaluates an instant query that should yield one sample, and
// returns its value; ok is false when the result is empty.
func (p *promServer) query(t *testing.T, q string) (v float64, ok bool) {
	t.Helper()
	code, body := get(t, p.url+"/api/v1/query?query="+url.QueryEscape(q))
	if code != 200 {
		t.Fatalf("query %s = %d %s", q, code, body)
	}
	var r struct {
		Status string
		Data   struct {
			Result []struct {
				Value [2]any
			}
		}
	}
	if err := json.Unmarshal([]byte(body), &r); err != nil || r.Status != "success" {
		t.Fatalf("query %s: %v: %s", q, err, body)
	}
	switch len(r.Data.Result) {
	case 0:
		return 0, false
	case 1:
	default:
		t.Fatalf("query %s: %d samples, want one: %s", q, len(r.Data.Result), body)
	}
	s, _ := r.Data.Result[0].Value[1].(string)
	v, err := strconv.ParseFloat(s, 64)
	if err != nil {
		t.Fatalf("query %s: value %q: %v", q, s, err)
	}
	return v, true
}

// TestMasterProcs: the master runs its Go code on one P by default
// (--master-procs 1), on as many as --master-procs or SHOAL_MASTER_PROCS
// say, and on Go's default with 0, which heeds GOMAXPROCS; --env
// GOMAXPROCS passes shoal's GOMAXPROCS to the workers whatever the
// master's setting.
func TestMasterProcs(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  []string
		args []string
		want float64
	}{
		{"default", []string{"GOMAXPROCS=3"}, nil, 1},
		{"--master-procs 2", []string{"GOMAXPROCS=3"}, []string{"--master-procs", "2"}, 2},
		{"SHOAL_MASTER_PROCS=0", []string{"GOMAXPROCS=3", "SHOAL_MASTER_PROCS=0"}, nil, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			port, maddr := testutil.FreePort(t), loopbackAddr(t)
			m := startShoal(t, tc.env, append([]string{"--workers", "1", "--port", strconv.Itoa(port), "--host", "127.0.0.1", "--metrics-addr", maddr, "--env", "GOMAXPROCS"}, tc.args...)...)
			pids := m.listening(15*time.Second, 1)
			s := waitMetric(t, "http://"+maddr+"/metrics", 10*time.Second, "the master's GOMAXPROCS", func(s map[string]float64) bool {
				_, ok := s["go_sched_gomaxprocs_threads"]
				return ok
			})
			if got := s["go_sched_gomaxprocs_threads"]; got != tc.want {
				t.Errorf("the master's GOMAXPROCS (go_sched_gomaxprocs_threads) is %v, want %v", got, tc.want)
			}
			env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pids[1]))
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Contains(strings.Split(string(env), "\x00"), "GOMAXPROCS=3") {
				t.Errorf("worker %d's environment has no GOMAXPROCS=3, with --env GOMAXPROCS", pids[1])
			}
		})
	}
}
