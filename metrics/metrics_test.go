package metrics

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/shoal-sh/shoal/internal/peer"
	shoaltest "github.com/shoal-sh/shoal/internal/testutil"
	"github.com/shoal-sh/shoal/ipc"
	"github.com/shoal-sh/shoal/reuseport"
	"github.com/shoal-sh/shoal/supervisor"
)

// TestMain doubles as the workers' main: with no Command the supervisor
// re-executes this test binary, and the copies see IsWorker() == true.
func TestMain(m *testing.M) {
	if supervisor.IsWorker() {
		os.Exit(testWorker())
	}
	os.Exit(m.Run())
}

// envWaitListen lists, comma-separated, the slots whose test worker listens
// only when told {"listen":true}.
const envWaitListen = "METRICS_TEST_WAIT_LISTEN"

// testWorker listens on 127.0.0.1:$PORT and never accepts, so connections
// wait in its accept queue. It answers messages: {"report":N} reports N
// requests; {"burn":MS} uses MS milliseconds of CPU, then sends
// {"burned":ID}; {"bad":true} sends a request report the master rejects;
// {"listen":true} listens if it did not yet. It exits 0 on SIGTERM or when
// the master is gone.
func testWorker() int {
	c, err := ipc.FromEnv()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 3
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM)
	listenNow := make(chan struct{}, 1)
	listen := func() {
		port := os.Getenv(supervisor.EnvPort)
		if port == "" {
			return
		}
		ln, err := reuseport.Listen("tcp4", "127.0.0.1:"+port)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(4)
		}
		_ = ln // held open until exit
	}
	if !slices.Contains(strings.Split(os.Getenv(envWaitListen), ","), strconv.Itoa(supervisor.WorkerID())) {
		listen()
	}
	c.Handle(func(m ipc.Message) {
		var in struct {
			Report *uint64 `json:"report"`
			Burn   int     `json:"burn"`
			Bad    bool    `json:"bad"`
			Listen bool    `json:"listen"`
		}
		json.Unmarshal(m.Raw, &in)
		switch {
		case in.Report != nil:
			c.Send(map[string]any{"cmd": ipc.CmdRequests, "n": *in.Report})
		case in.Burn > 0:
			// MS of this process's own CPU time, not of the wall clock:
			// on a busy machine the scheduler gives it less.
			var ru syscall.Rusage
			cpu := func() time.Duration {
				syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
				return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
			}
			end := cpu() + time.Duration(in.Burn)*time.Millisecond
			for cpu() < end {
			}
			c.Send(map[string]any{"burned": supervisor.WorkerID()})
		case in.Bad:
			c.Send(map[string]any{"cmd": ipc.CmdRequests, "n": -1})
		case in.Listen:
			listenNow <- struct{}{}
		}
	})
	for {
		select {
		case <-sig:
			return 0
		case <-c.Done():
			return 0
		case <-listenNow:
			listen()
		}
	}
}

// noRaceExitSleep spares each worker built with -race the race detector's
// one-second sleep at exit.
var noRaceExitSleep = "GORACE=" + strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0")

// start runs a supervisor with opts and stops it when the test ends.
func start(tb testing.TB, opts supervisor.Options) *supervisor.Supervisor {
	tb.Helper()
	if opts.StopTimeout == 0 {
		opts.StopTimeout = 5 * time.Second
	}
	opts.Env = append(opts.Env, noRaceExitSleep)
	s, err := supervisor.New(opts)
	if err != nil {
		tb.Fatal(err)
	}
	run(tb, s)
	return s
}

// run runs s until the test ends.
func run(tb testing.TB, s *supervisor.Supervisor) {
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- s.Run(ctx) }()
	tb.Cleanup(func() {
		cancel()
		select {
		case err := <-errc:
			if err != nil {
				tb.Errorf("Run: %v", err)
			}
		case <-time.After(20 * time.Second):
			tb.Error("Run did not return within 20s of cancel")
		}
	})
}

// waitEvent waits up to 15s for an event that matches.
func waitEvent(tb testing.TB, events <-chan supervisor.Event, what string, match func(supervisor.Event) bool) supervisor.Event {
	tb.Helper()
	return shoaltest.Recv(tb, events, 15*time.Second, what, match)
}

// waitListening waits until each of the slots ids has had a listening
// event.
func waitListening(tb testing.TB, events <-chan supervisor.Event, ids ...int) {
	tb.Helper()
	left := map[int]bool{}
	for _, id := range ids {
		left[id] = true
	}
	for len(left) > 0 {
		e := waitEvent(tb, events, fmt.Sprintf("listening of workers %v", ids), func(e supervisor.Event) bool {
			return e.Type == supervisor.EventListening
		})
		delete(left, e.Worker)
	}
}

// waitFor polls cond every 10ms for up to 10s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	shoaltest.Eventually(t, 10*time.Second, what, cond)
}

// scrape gathers reg into a map from series ("name{k="v",...}", labels
// sorted as the registry sorts them) to value.
func scrape(t *testing.T, reg prometheus.Gatherer) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("Gather: %v", err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			out[series(mf.GetName(), m)] = value(mf.GetType(), m)
		}
	}
	return out
}

// oneListener returns got with the listener label of a supervisor that has
// one TCP listener taken off, so that the series read as with one port;
// it fails the test when a socket series lacks that label.
func oneListener(t *testing.T, got map[string]float64, port int) map[string]float64 {
	t.Helper()
	label := `listener="tcp:` + strconv.Itoa(port) + `"`
	out := make(map[string]float64, len(got))
	for k, v := range got {
		if strings.HasPrefix(k, "shoal_port_") || strings.HasPrefix(k, "shoal_worker_listen_") {
			if !strings.Contains(k, label) {
				t.Errorf("%s has no %s label", k, label)
			}
			k = strings.Replace(strings.Replace(k, label+",", "", 1), "{"+label+"}", "", 1)
		}
		out[k] = v
	}
	return out
}

func series(name string, m *dto.Metric) string {
	if len(m.GetLabel()) == 0 {
		return name
	}
	var b strings.Builder
	b.WriteString(name + "{")
	for i, l := range m.GetLabel() {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%s=%q", l.GetName(), l.GetValue())
	}
	b.WriteByte('}')
	return b.String()
}

func value(typ dto.MetricType, m *dto.Metric) float64 {
	switch typ {
	case dto.MetricType_COUNTER:
		return m.GetCounter().GetValue()
	case dto.MetricType_GAUGE:
		return m.GetGauge().GetValue()
	case dto.MetricType_UNTYPED:
		return m.GetUntyped().GetValue()
	}
	return 0
}

// want checks that the scraped series have the values given, in pairs of
// series and value.
func want(t *testing.T, got map[string]float64, pairs ...any) {
	t.Helper()
	for i := 0; i < len(pairs); i += 2 {
		name, v := pairs[i].(string), toFloat(pairs[i+1])
		g, ok := got[name]
		if !ok {
			t.Errorf("%s missing", name)
		} else if g != v {
			t.Errorf("%s = %v, want %v", name, g, v)
		}
	}
}

func toFloat(v any) float64 {
	switch v := v.(type) {
	case int:
		return float64(v)
	case float64:
		return v
	}
	panic(fmt.Sprintf("value %v of type %T", v, v))
}

func pidOf(t *testing.T, s *supervisor.Supervisor, id int) int {
	t.Helper()
	for _, w := range s.Status() {
		if w.ID == id && w.PID != 0 {
			return w.PID
		}
	}
	t.Fatalf("worker %d has no process", id)
	return 0
}

func TestCollector(t *testing.T) {
	port := shoaltest.FreePort(t)
	events := make(chan supervisor.Event, 256)
	msgs := make(chan supervisor.Message, 64)
	s := start(t, supervisor.Options{
		Workers:   2,
		Port:      port,
		OnEvent:   func(e supervisor.Event) { events <- e },
		OnMessage: func(m supervisor.Message) { msgs <- m },
	})
	waitListening(t, events, 1, 2)
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewCollector(s))

	s.Send(1, map[string]any{"report": 5})
	s.Send(2, map[string]any{"report": 7})
	waitFor(t, "12 requests reported", func() bool { return s.Requests() == 12 })
	err := testutil.GatherAndCompare(reg, strings.NewReader(strings.ReplaceAll(`
# HELP shoal_requests_total Requests the slot's workers reported, across restarts.
# TYPE shoal_requests_total counter
shoal_requests_total{worker="1"} 5
shoal_requests_total{worker="2"} 7
# HELP shoal_workers_desired Worker slots wanted.
# TYPE shoal_workers_desired gauge
shoal_workers_desired 2
# HELP shoal_workers_listening Worker slots whose process is listening.
# TYPE shoal_workers_listening gauge
shoal_workers_listening 2
# HELP shoal_workers_running Worker slots whose process exists.
# TYPE shoal_workers_running gauge
shoal_workers_running 2
# HELP shoal_worker_up 1 when the slot's process is listening, else 0.
# TYPE shoal_worker_up gauge
shoal_worker_up{worker="1"} 1
shoal_worker_up{worker="2"} 1
# HELP shoal_worker_starts_total Processes started in the slot.
# TYPE shoal_worker_starts_total counter
shoal_worker_starts_total{worker="1"} 1
shoal_worker_starts_total{worker="2"} 1
# HELP shoal_port_listen_sockets Sockets on a listener of any process: LISTEN sockets for TCP, bound sockets for UDP.
# TYPE shoal_port_listen_sockets gauge
shoal_port_listen_sockets{listener="tcp:PORT"} 2
# HELP shoal_port_foreign_listen_sockets Sockets on a listener held by no current worker.
# TYPE shoal_port_foreign_listen_sockets gauge
shoal_port_foreign_listen_sockets{listener="tcp:PORT"} 0
# HELP shoal_restarts_total Replacements started after worker deaths.
# TYPE shoal_restarts_total counter
shoal_restarts_total 0
`, "PORT", strconv.Itoa(port))), "shoal_requests_total", "shoal_workers_desired", "shoal_workers_listening", "shoal_workers_running",
		"shoal_worker_up", "shoal_worker_starts_total", "shoal_port_listen_sockets",
		"shoal_port_foreign_listen_sockets", "shoal_restarts_total")
	if err != nil {
		t.Error(err)
	}
	got := oneListener(t, scrape(t, reg), port)
	for _, id := range []string{"1", "2"} {
		w := `{worker="` + id + `"}`
		if v := got["shoal_worker_resident_memory_bytes"+w]; v < 1<<20 {
			t.Errorf("resident memory of worker %s = %v, want at least 1 MiB", id, v)
		}
		if v := got["shoal_worker_start_time_seconds"+w]; v < float64(time.Now().Add(-time.Minute).Unix()) || v > float64(time.Now().Unix()+1) {
			t.Errorf("start time of worker %s = %v, want about now", id, v)
		}
		if v := got["shoal_worker_listen_backlog"+w]; v < 1 {
			t.Errorf("listen backlog of worker %s = %v, want the backlog of its socket", id, v)
		}
		want(t, got, "shoal_worker_listen_queue"+w, 0, "shoal_worker_backoff_seconds"+w, 0,
			`shoal_ipc_errors_total{reason="bad_field",worker="`+id+`"}`, 0)
		if _, ok := got["shoal_worker_cpu_seconds_total"+w]; !ok {
			t.Errorf("no CPU time for worker %s", id)
		}
		if got["shoal_ipc_received_messages_total"+w] < 1 || got["shoal_ipc_received_bytes_total"+w] < 10 ||
			got["shoal_ipc_sent_messages_total"+w] < 1 || got["shoal_ipc_sent_bytes_total"+w] < 10 {
			t.Errorf("IPC counters of worker %s: got %v", id, got)
		}
	}

	// A listener the workers do not hold joins the port's group.
	foreign, err := reuseport.Listen("tcp4", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	want(t, oneListener(t, scrape(t, reg), port), "shoal_port_listen_sockets", 3, "shoal_port_foreign_listen_sockets", 1)
	foreign.Close()
	want(t, oneListener(t, scrape(t, reg), port), "shoal_port_listen_sockets", 2, "shoal_port_foreign_listen_sockets", 0)

	// The workers never accept: connections wait in their accept queues.
	var conns []net.Conn
	for range 6 {
		c, err := net.Dial("tcp4", "127.0.0.1:"+strconv.Itoa(port))
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	waitFor(t, "6 connections in the accept queues", func() bool {
		got := oneListener(t, scrape(t, reg), port)
		return got[`shoal_worker_listen_queue{worker="1"}`]+got[`shoal_worker_listen_queue{worker="2"}`] == 6
	})
	for _, c := range conns {
		c.Close()
	}

	// A bad message costs its sender.
	s.Send(2, map[string]any{"bad": true})
	waitFor(t, "a bad_field error from worker 2", func() bool {
		return oneListener(t, scrape(t, reg), port)[`shoal_ipc_errors_total{reason="bad_field",worker="2"}`] == 1
	})

	// CPU time survives the death of the process that used it.
	s.Send(1, map[string]any{"burn": 300})
	select {
	case <-msgs:
	case <-time.After(10 * time.Second):
		t.Fatal("worker 1 did not report burning CPU within 10s")
	}
	before := oneListener(t, scrape(t, reg), port)
	cpu := before[`shoal_worker_cpu_seconds_total{worker="1"}`]
	if cpu < 0.1 {
		t.Errorf("CPU time of worker 1 after burning 300ms = %v, want at least 0.1", cpu)
	}
	pid := pidOf(t, s, 1)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, events, "death of worker 1", func(e supervisor.Event) bool {
		return e.Type == supervisor.EventDeath && e.Worker == 1
	})
	waitListening(t, events, 1)
	after := oneListener(t, scrape(t, reg), port)
	want(t, after,
		`shoal_worker_deaths_total{reason="signal_SIGKILL",worker="1"}`, 1,
		`shoal_requests_total{worker="1"}`, 5,
		`shoal_worker_starts_total{worker="1"}`, 2,
		`shoal_worker_up{worker="1"}`, 1,
		"shoal_restarts_total", 1,
		"shoal_port_listen_sockets", 2,
		"shoal_port_foreign_listen_sockets", 0)
	if _, ok := after[`shoal_worker_deaths_total{reason="signal_SIGKILL",worker="2"}`]; ok {
		t.Error("worker 2 has a death series, but it did not die")
	}
	if v := after[`shoal_worker_cpu_seconds_total{worker="1"}`]; v < cpu {
		t.Errorf("CPU time of slot 1 went back from %v to %v after a restart", cpu, v)
	}
	if a, b := after[`shoal_worker_start_time_seconds{worker="1"}`], before[`shoal_worker_start_time_seconds{worker="1"}`]; a <= b {
		t.Errorf("start time of slot 1 = %v after a restart, want later than %v", a, b)
	}
	s.Send(1, map[string]any{"report": 3})
	waitFor(t, "3 more requests from worker 1", func() bool {
		return oneListener(t, scrape(t, reg), port)[`shoal_requests_total{worker="1"}`] == 8
	})

	// A slot scaled away takes its series with it.
	if err := s.Scale(1); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, events, "death of worker 2", func(e supervisor.Event) bool {
		return e.Type == supervisor.EventDeath && e.Worker == 2
	})
	got = oneListener(t, scrape(t, reg), port)
	for name := range got {
		if strings.Contains(name, `worker="2"`) {
			t.Errorf("series %s of scaled-away worker 2 still there", name)
		}
	}
	want(t, got, "shoal_workers_desired", 1, "shoal_workers_running", 1, "shoal_workers_listening", 1,
		"shoal_port_listen_sockets", 1, `shoal_requests_total{worker="1"}`, 8)
}

// TestCollectorSocketsFromProc covers workers whose sockets the supervisor
// does not know (here: ready by message, which they never send), found
// through /proc only when a LISTEN socket on the port is unexplained.
func TestCollectorSocketsFromProc(t *testing.T) {
	var reads atomic.Int64
	t.Cleanup(func() { readInodes = reuseport.Inodes })
	readInodes = func(pid int) (map[uint64]struct{}, error) {
		reads.Add(1)
		return reuseport.Inodes(pid)
	}
	port := shoaltest.FreePort(t)
	s := start(t, supervisor.Options{Workers: 3, Port: port, Ready: supervisor.ReadyMessage,
		Env: []string{envWaitListen + "=3"}})
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewCollector(s))
	waitFor(t, "the sockets of workers 1 and 2 found", func() bool {
		got := oneListener(t, scrape(t, reg), port)
		return got["shoal_port_listen_sockets"] == 2 && got["shoal_port_foreign_listen_sockets"] == 0 &&
			got["shoal_workers_running"] == 3
	})
	reads.Store(0)
	foreign, err := reuseport.Listen("tcp4", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	defer foreign.Close()
	for range 3 {
		got := oneListener(t, scrape(t, reg), port)
		want(t, got, "shoal_port_listen_sockets", 3, "shoal_port_foreign_listen_sockets", 1,
			"shoal_workers_listening", 0, `shoal_worker_up{worker="1"}`, 0,
			`shoal_worker_listen_queue{worker="1"}`, 0, `shoal_worker_listen_queue{worker="2"}`, 0)
		if _, ok := got[`shoal_worker_listen_queue{worker="3"}`]; ok {
			t.Error("worker 3 has a listen queue, but it does not listen")
		}
	}
	// Only worker 3's sockets are unknown, and the foreign socket is new
	// to it once.
	if n := reads.Load(); n != 1 {
		t.Errorf("/proc/PID/fd read %d times over 3 scrapes, want once (worker 3, for the new foreign socket)", n)
	}
	s.Send(3, map[string]any{"listen": true})
	waitFor(t, "the socket of worker 3 found", func() bool {
		got := oneListener(t, scrape(t, reg), port)
		_, ok := got[`shoal_worker_listen_queue{worker="3"}`]
		return ok && got["shoal_port_listen_sockets"] == 4 && got["shoal_port_foreign_listen_sockets"] == 1
	})
	if n := reads.Load(); n != 2 {
		t.Errorf("/proc/PID/fd read %d times, want twice", n)
	}
}

func TestCollectorCrashLoop(t *testing.T) {
	events := make(chan supervisor.Event, 64)
	s := start(t, supervisor.Options{
		Command: []string{"sh", "-c", "exit 3"},
		Workers: 1,
		Backoff: supervisor.Backoff{Initial: 5 * time.Second},
		OnEvent: func(e supervisor.Event) { events <- e },
	})
	for range 2 {
		waitEvent(t, events, "death", func(e supervisor.Event) bool { return e.Type == supervisor.EventDeath })
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewCollector(s))
	got := scrape(t, reg)
	want(t, got,
		`shoal_worker_deaths_total{reason="exit_nonzero",worker="1"}`, 2,
		`shoal_worker_starts_total{worker="1"}`, 2,
		`shoal_worker_up{worker="1"}`, 0,
		"shoal_workers_running", 0,
		"shoal_workers_desired", 1)
	if b := got[`shoal_worker_backoff_seconds{worker="1"}`]; b <= 0 || b > 5 {
		t.Errorf("backoff = %v, want in (0, 5]", b)
	}
	for name := range got {
		if strings.HasPrefix(name, "shoal_worker_start_time_seconds") || strings.HasPrefix(name, "shoal_worker_resident_memory_bytes") {
			t.Errorf("%s present for a slot without a process", name)
		}
		if strings.HasPrefix(name, "shoal_port_") || strings.HasPrefix(name, "shoal_worker_listen_") {
			t.Errorf("%s present without a port", name)
		}
	}
}

func TestCollectorNotRunning(t *testing.T) {
	s, err := supervisor.New(supervisor.Options{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewCollector(s))
	if got := scrape(t, reg); len(got) != 0 {
		t.Errorf("series of a supervisor that is not running: %v", got)
	}
}

// do serves one request through h.
func do(h http.Handler, method, path string) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(method, path, nil))
	return rec
}

func expect(t *testing.T, h http.Handler, method, path string, code int, body string) {
	t.Helper()
	rec := do(h, method, path)
	if rec.Code != code || (body != "" && strings.TrimSpace(rec.Body.String()) != body) {
		t.Errorf("%s %s = %d %q, want %d %q", method, path, rec.Code, rec.Body.String(), code, body)
	}
}

func TestHandler(t *testing.T) {
	old := scrapeTimeout
	t.Cleanup(func() { scrapeTimeout = old })
	scrapeTimeout = 300 * time.Millisecond

	events := make(chan supervisor.Event, 256)
	var block atomic.Bool
	stuck, unblock := make(chan struct{}, 1), make(chan struct{})
	s, err := supervisor.New(supervisor.Options{
		Workers:     2,
		Port:        shoaltest.FreePort(t),
		Env:         []string{envWaitListen + "=3", noRaceExitSleep},
		StopTimeout: 5 * time.Second,
		OnEvent: func(e supervisor.Event) {
			if block.Load() {
				stuck <- struct{}{}
				<-unblock // a stuck supervisor loop
			}
			events <- e
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	h := Handler(s, NewRegistry(s), Options{})
	expect(t, h, "GET", "/healthz", 503, "supervisor not running")
	expect(t, h, "GET", "/readyz", 503, "supervisor not running")

	run(t, s)
	waitListening(t, events, 1, 2)
	expect(t, h, "GET", "/healthz", 200, "ok")
	expect(t, h, "GET", "/readyz", 200, "2 of 2 workers listening")
	expect(t, h, "HEAD", "/readyz", 200, "")
	expect(t, h, "HEAD", "/metrics", 200, "")
	expect(t, h, "GET", "/nothing", 404, "")
	for _, m := range []string{"POST", "PUT", "DELETE", "PATCH"} {
		for _, p := range []string{"/metrics", "/healthz", "/readyz"} {
			rec := do(h, m, p)
			if rec.Code != http.StatusMethodNotAllowed || !strings.Contains(rec.Header().Get("Allow"), "GET") {
				t.Errorf("%s %s = %d, Allow %q; want 405, Allow: GET, HEAD", m, p, rec.Code, rec.Header().Get("Allow"))
			}
		}
	}

	rec := do(h, "GET", "/metrics")
	body := rec.Body.String()
	if rec.Code != 200 || !strings.HasPrefix(rec.Header().Get("Content-Type"), "text/plain") {
		t.Fatalf("GET /metrics = %d %s\n%s", rec.Code, rec.Header().Get("Content-Type"), body)
	}
	for _, s := range []string{"shoal_workers_listening 2\n", `shoal_requests_total{worker="1"} 0`,
		"go_goroutines ", "process_resident_memory_bytes ", "process_cpu_seconds_total "} {
		if !strings.Contains(body, s) {
			t.Errorf("/metrics lacks %q:\n%s", s, body)
		}
	}
	t.Run("promtool", func(t *testing.T) {
		promtool := peer.Require(t, "promtool")
		cmd := exec.Command(promtool, "check", "metrics")
		cmd.Stdin = strings.NewReader(body)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Errorf("promtool check metrics: %v\n%s", err, out)
		}
	})

	// A new slot whose worker does not listen yet.
	if err := s.Scale(3); err != nil {
		t.Fatal(err)
	}
	expect(t, h, "GET", "/readyz", 503, "2 of 3 workers listening, want 3")
	expect(t, Handler(s, NewRegistry(s), Options{MinReady: 2}), "GET", "/readyz", 200, "2 of 3 workers listening")
	expect(t, Handler(s, NewRegistry(s), Options{MinReady: 4}), "GET", "/readyz", 503, "2 of 3 workers listening, want 4")
	s.Send(3, map[string]any{"listen": true})
	waitFor(t, "readiness with 3 workers", func() bool { return do(h, "GET", "/readyz").Code == 200 })
	expect(t, h, "GET", "/readyz", 200, "3 of 3 workers listening")

	// A stuck loop fails the health check and the scrape.
	block.Store(true)
	forked := make(chan error, 1)
	go func() {
		_, err := s.Fork() // its fork event blocks the loop
		forked <- err
	}()
	<-stuck
	expect(t, h, "GET", "/healthz", 503, "supervisor did not answer within 1s")
	expect(t, h, "GET", "/readyz", 503, "supervisor did not answer within 1s")
	if rec := do(h, "GET", "/metrics"); rec.Code != 500 || !strings.Contains(rec.Body.String(), "did not answer") {
		t.Errorf("GET /metrics while stuck = %d %q, want 500", rec.Code, rec.Body.String())
	}
	block.Store(false)
	close(unblock)
	if err := <-forked; err != nil {
		t.Fatal(err)
	}
	expect(t, h, "GET", "/healthz", 200, "ok")
	if !bytes.Contains(do(h, "GET", "/metrics").Body.Bytes(), []byte(`promhttp_metric_handler_errors_total{cause="gathering"} 1`)) {
		t.Error("the failed scrape was not counted")
	}
}

// TestHandlerServer checks the handler behind a real HTTP server on
// loopback, as the binary serves it.
func TestHandlerServer(t *testing.T) {
	events := make(chan supervisor.Event, 64)
	s := start(t, supervisor.Options{Workers: 1, Port: shoaltest.FreePort(t), OnEvent: func(e supervisor.Event) { events <- e }})
	waitListening(t, events, 1)
	srv := httptest.NewServer(Handler(s, NewRegistry(s), Options{}))
	defer srv.Close()
	for path, code := range map[string]int{"/metrics": 200, "/healthz": 200, "/readyz": 200} {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != code {
			t.Errorf("GET %s = %d, want %d", path, resp.StatusCode, code)
		}
		resp, err = http.Post(srv.URL+path, "text/plain", strings.NewReader("x"))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("POST %s = %d, want 405", path, resp.StatusCode)
		}
	}
}
