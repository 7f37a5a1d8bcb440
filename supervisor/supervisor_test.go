package supervisor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/internal/peer"
	"github.com/shoal-sh/shoal/internal/testutil"
	"github.com/shoal-sh/shoal/ipc"
	"github.com/shoal-sh/shoal/reuseport"
)

// TestMain doubles as the workers' main: with no Command the supervisor
// re-executes this test binary, and the copies see IsWorker() == true.
func TestMain(m *testing.M) {
	if IsWorker() {
		os.Exit(testWorker())
	}
	// Every goroutine a supervisor starts ends when Run returns; only
	// os/signal's own stays.
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("os/signal.signal_recv"), goleak.IgnoreTopFunction("os/signal.loop"))
}

// testWorker listens on 127.0.0.1:$PORT, reports two requests, and answers
// messages: {"echo":X} comes back as {"echoed":X,"from":ID}; {"relay":TO}
// sends {"hello":ID} to worker TO through the master; {"exit":N} exits N.
func testWorker() int {
	switch os.Getenv("SUP_TEST_MODE") {
	case "hang":
		// One heartbeat, then silence.
		c, _ := ipc.FromEnv()
		c.Send(map[string]string{"cmd": ipc.CmdHeartbeat})
		time.Sleep(time.Hour)
	case "busy":
		// Serves (listens) and reports 10 requests every 20ms.
		ln, err := reuseport.Listen("tcp4", "127.0.0.1:"+os.Getenv(EnvPort))
		if err != nil {
			return 4
		}
		defer ln.Close()
		c, _ := ipc.FromEnv()
		for {
			if c.Send(map[string]any{"cmd": ipc.CmdRequests, "n": 10}) != nil {
				return 0
			}
			time.Sleep(20 * time.Millisecond)
		}
	case "report":
		// Tells the master who it runs as and what it sees.
		c, _ := ipc.FromEnv()
		groups, _ := os.Getgroups()
		env := map[string]string{}
		for _, k := range []string{"SECRET", "PASSED", "SET", "PATH", "SHOAL_WORKER_ID"} {
			if v, ok := os.LookupEnv(k); ok {
				env[k] = v
			}
		}
		bindErr := ""
		if p := os.Getenv("PRIV_PORT"); p != "" {
			if ln, err := net.Listen("tcp4", "127.0.0.1:"+p); err != nil {
				bindErr = err.Error()
			} else {
				ln.Close()
			}
		}
		c.Send(map[string]any{"uid": os.Getuid(), "gid": os.Getgid(), "groups": groups, "env": env, "bind": bindErr})
		<-c.Done()
		return 0
	}
	if os.Getenv("SUP_TEST_MODE") == "deaf" {
		// Never reads its channel.
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM)
		<-sig
		return 0
	}
	if f := os.Getenv("SUP_TEST_RELEASE"); f != "" {
		// The "release" on disk: a file that says how this worker behaves.
		b, _ := os.ReadFile(f)
		switch strings.TrimSpace(string(b)) {
		case "broken":
			return 1
		case "hang":
			time.Sleep(time.Hour)
		}
	}
	c, err := ipc.FromEnv()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 3
	}
	if port := os.Getenv(EnvPort); port != "" {
		ln, err := reuseport.Listen("tcp4", "127.0.0.1:"+port)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 4
		}
		defer ln.Close()
	}
	c.Send(map[string]string{"cmd": ipc.CmdNotifyRequest})
	c.Send(map[string]any{"cmd": ipc.CmdRequests, "n": 1})
	exit := make(chan int, 1)
	c.Handle(func(m ipc.Message) {
		var in struct {
			Echo  any  `json:"echo"`
			Relay int  `json:"relay"`
			Exit  *int `json:"exit"`
			Hello int  `json:"hello"`
		}
		json.Unmarshal(m.Raw, &in)
		switch {
		case in.Echo != nil:
			c.Send(map[string]any{"echoed": in.Echo, "from": WorkerID()})
		case in.Relay != 0:
			c.Send(map[string]any{"cmd": ipc.CmdSend, "to": in.Relay, "msg": map[string]int{"hello": WorkerID()}})
		case in.Hello != 0:
			c.Send(map[string]any{"gotHelloFrom": in.Hello, "from": WorkerID()})
		case in.Exit != nil:
			exit <- *in.Exit
		}
	})
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM)
	select {
	case <-sig:
		return 0
	case <-c.Done():
		return 0
	case code := <-exit:
		return code
	}
}

// run starts s in the background and returns a function that stops it and
// returns Run's error.
func run(t *testing.T, s *Supervisor) (stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- s.Run(ctx) }()
	var err error
	stopped := false
	stop = func() error {
		if stopped {
			return err
		}
		stopped = true
		cancel()
		select {
		case err = <-errc:
		case <-time.After(20 * time.Second):
			t.Fatal("Run did not return within 20s of cancel")
		}
		return err
	}
	t.Cleanup(func() { stop() })
	return stop
}

// waitEvent waits up to 10s for an event that matches.
func waitEvent(t *testing.T, events <-chan Event, what string, match func(Event) bool) Event {
	t.Helper()
	return testutil.Recv(t, events, 10*time.Second, what, match)
}

func waitMessage(t *testing.T, msgs <-chan Message, match func(map[string]any) bool) Message {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case m := <-msgs:
			var v map[string]any
			json.Unmarshal(m.Raw, &v)
			if match(v) {
				return m
			}
		case <-deadline:
			t.Fatal("no matching message within 10s")
		}
	}
}

func TestLibraryLifecycleAndMessages(t *testing.T) {
	events := make(chan Event, 256)
	msgs := make(chan Message, 256)
	s, err := New(Options{
		Workers:     2,
		Port:        testutil.FreePort(t),
		StopTimeout: 5 * time.Second,
		OnEvent:     func(e Event) { events <- e },
		OnMessage:   func(m Message) { msgs <- m },
	})
	if err != nil {
		t.Fatal(err)
	}
	stop := run(t, s)

	seen := map[EventType]int{}
	for len(seen) < 3 || seen[EventListening] < 2 {
		e := waitEvent(t, events, "fork, online and listening for 2 workers", func(Event) bool { return true })
		seen[e.Type]++
	}
	if seen[EventFork] != 2 || seen[EventOnline] != 2 {
		t.Errorf("events %v, want 2 fork, 2 online, 2 listening", seen)
	}

	// Master -> worker -> master round trip, to one worker and to all.
	if err := s.Send(1, map[string]any{"echo": "ping"}); err != nil {
		t.Fatal(err)
	}
	m := waitMessage(t, msgs, func(v map[string]any) bool { return v["echoed"] == "ping" })
	if m.Worker != 1 {
		t.Errorf("echo came from worker %d, want 1", m.Worker)
	}
	if err := s.Broadcast(map[string]any{"echo": "all"}); err != nil {
		t.Fatal(err)
	}
	from := map[int]bool{}
	for len(from) < 2 {
		from[waitMessage(t, msgs, func(v map[string]any) bool { return v["echoed"] == "all" }).Worker] = true
	}
	// Worker 1 -> master -> worker 2 relay.
	s.Send(1, map[string]any{"relay": 2})
	m = waitMessage(t, msgs, func(v map[string]any) bool { return v["gotHelloFrom"] == float64(1) })
	if m.Worker != 2 {
		t.Errorf("relay answered by worker %d, want 2", m.Worker)
	}
	if err := s.Send(7, map[string]any{"echo": 1}); err == nil {
		t.Error("Send to a slot that does not exist succeeded")
	}

	// Each worker reports 1 + 1 requests at start.
	deadline := time.Now().Add(5 * time.Second)
	for s.Requests() != 4 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := s.Requests(); got != 4 {
		t.Errorf("Requests() = %d, want 4", got)
	}

	// Fork adds slot 3; a death is replaced in its slot; Scale removes the
	// highest slots first.
	w3, err := s.Fork()
	if err != nil || w3.ID() != 3 {
		t.Fatalf("Fork() = %v, %v; want slot 3", w3, err)
	}
	waitEvent(t, events, "slot 3 listening", func(e Event) bool { return e.Type == EventListening && e.Worker == 3 })
	// A per-worker handler takes that worker's messages instead of
	// Options.OnMessage: worker.on('message').
	mine := make(chan Message, 8)
	w3.Handle(func(m Message) { mine <- m })
	if err := w3.Send(map[string]any{"echo": "three"}); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-mine:
		if m.Worker != 3 || !strings.Contains(string(m.Raw), `"three"`) {
			t.Errorf("worker 3's handler got %+v", m)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("worker 3's handler got nothing within 10s")
	}
	s.Send(2, map[string]any{"exit": 7})
	d := waitEvent(t, events, "death of worker 2", func(e Event) bool { return e.Type == EventDeath && e.Worker == 2 })
	if d.Death.ExitCode != 7 || d.Death.Clean() || d.Death.Status() != "exit status 7" {
		t.Errorf("death = %+v, want exit status 7", d.Death)
	}
	waitEvent(t, events, "slot 2 listening again", func(e Event) bool { return e.Type == EventListening && e.Worker == 2 })
	if err := s.Scale(1); err != nil {
		t.Fatal(err)
	}
	for gone := map[int]bool{}; len(gone) < 2; {
		e := waitEvent(t, events, "deaths of workers 2 and 3", func(e Event) bool { return e.Type == EventDeath })
		if e.Worker == 1 || e.Death.Reason != "scale" {
			t.Errorf("scale down ended worker %d (reason %q), want workers 2 and 3 (reason scale)", e.Worker, e.Death.Reason)
		}
		gone[e.Worker] = true
	}
	st := s.Status()
	if len(st) != 1 || st[0].ID != 1 || st[0].State != Listening || st[0].Requests != 2 {
		t.Errorf("Status() = %+v, want slot 1 listening with 2 requests", st)
	}
	if err := stop(); err != nil {
		t.Errorf("Run = %v, want nil after cancel", err)
	}
	if s.Status() != nil {
		t.Error("Status() after Run returned is not nil")
	}
}

func TestForkBeforeRunSetsTheCount(t *testing.T) {
	events := make(chan Event, 64)
	s, err := New(Options{Workers: 5, OnEvent: func(e Event) { events <- e }})
	if err != nil {
		t.Fatal(err)
	}
	s.Fork()
	s.Fork()
	stop := run(t, s)
	for i := 0; i < 2; i++ {
		waitEvent(t, events, "online", func(e Event) bool { return e.Type == EventOnline })
	}
	if n := len(s.Status()); n != 2 {
		t.Errorf("%d workers, want the 2 forked before Run", n)
	}
	stop()
}

func TestGiveUpAfterMaxRestarts(t *testing.T) {
	s, err := New(Options{
		Command:     []string{"sh", "-c", "exit 1"},
		Workers:     1,
		MaxRestarts: 2,
		Backoff:     Backoff{Initial: time.Millisecond},
	})
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- s.Run(context.Background()) }()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrTooManyRestarts) {
			t.Errorf("Run = %v, want ErrTooManyRestarts", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not give up within 10s")
	}
}

func TestNewRejectsBadOptions(t *testing.T) {
	for _, o := range []Options{
		{Workers: -1},
		{Port: 70000},
		{Command: []string{"no-such-command-for-shoal"}},
	} {
		if _, err := New(o); err == nil {
			t.Errorf("New(%+v) succeeded, want an error", o)
		}
	}
}

func TestEnvironmentDedup(t *testing.T) {
	got := dedupEnv([]string{"A=1", "B=2", "A=3"})
	if fmt.Sprint(got) != "[B=2 A=3]" && fmt.Sprint(got) != "[A=3 B=2]" {
		t.Errorf("dedupEnv = %v, want the last A", got)
	}
}

func TestWorkerThatStopsReadingNeverBlocksTheMaster(t *testing.T) {
	events := make(chan Event, 64)
	s, err := New(Options{Workers: 1, QueueLen: 16, Env: []string{"SUP_TEST_MODE=deaf"}, OnEvent: func(e Event) { events <- e }})
	if err != nil {
		t.Fatal(err)
	}
	stop := run(t, s)
	waitEvent(t, events, "online", func(e Event) bool { return e.Type == EventOnline })
	big := strings.Repeat("x", 64<<10)
	var dropped int
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 200; i++ { // 12.8 MiB: far more than the socket buffer and the queue
			if err := s.Send(1, map[string]string{"pad": big}); err != nil {
				if !strings.Contains(err.Error(), "queue is full") {
					t.Errorf("Send error %q does not say the queue is full", err)
				}
				dropped++
			}
		}
	}()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("Send blocked on a worker that does not read")
	}
	if dropped == 0 {
		t.Fatal("no message dropped although the worker never reads")
	}
	st := s.Status()
	if len(st) != 1 || st[0].IPC.Dropped != uint64(dropped) {
		t.Errorf("IPC.Dropped = %+v, want %d", st, dropped)
	}
	// The master still answers.
	if _, ok := s.Snapshot(); !ok {
		t.Error("Snapshot failed while a worker's queue is full")
	}
	if err := stop(); err != nil {
		t.Errorf("Run = %v", err)
	}
}

// listeningSet follows events and keeps the set of serving pids; it
// records the smallest size seen after it first reached want.
type listeningSet struct {
	pids    map[int]bool
	want    int
	reached bool
	min     int
}

func (l *listeningSet) add(e Event) {
	switch e.Type {
	case EventListening:
		l.pids[e.PID] = true
	case EventDeath, EventDisconnect:
		delete(l.pids, e.PID)
	}
	if len(l.pids) >= l.want {
		l.reached = true
	}
	if l.reached && len(l.pids) < l.min {
		l.min = len(l.pids)
	}
}

func TestReloadRollsEverySlotWithoutLosingCapacity(t *testing.T) {
	events := make(chan Event, 1024)
	s, err := New(Options{Workers: 3, Port: testutil.FreePort(t), OnEvent: func(e Event) { events <- e }})
	if err != nil {
		t.Fatal(err)
	}
	stop := run(t, s)
	set := &listeningSet{pids: map[int]bool{}, want: 3, min: 3}
	for !set.reached {
		set.add(waitEvent(t, events, "3 listening", func(Event) bool { return true }))
	}
	before := s.Status()
	// Two reloads asked at once are one reload.
	errs := make(chan error, 2)
	for i := 0; i < 2; i++ {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			errs <- s.Reload(ctx)
		}()
	}
	for i := 0; i < 2; i++ {
		if err := <-errs; err != nil {
			t.Fatalf("Reload = %v", err)
		}
	}
	// Drain the events of the reload.
	deadline := time.After(10 * time.Second)
	for deaths := 0; deaths < 3; {
		select {
		case e := <-events:
			set.add(e)
			if e.Type == EventDeath {
				deaths++
				if e.Death.Reason != "reload" {
					t.Errorf("death during reload with reason %q, want reload", e.Death.Reason)
				}
			}
		case <-deadline:
			t.Fatal("old workers not all gone 10s after the reload")
		}
	}
	if set.min < 3 {
		t.Errorf("serving workers fell to %d during the reload, want never below 3", set.min)
	}
	after := s.Status()
	for i := range after {
		if after[i].PID == before[i].PID || after[i].State != Listening {
			t.Errorf("slot %d: pid %d -> %d, state %s; want a new listening pid", after[i].ID, before[i].PID, after[i].PID, after[i].State)
		}
		if after[i].Starts != 2 {
			t.Errorf("slot %d started %d processes, want 2: two reloads asked at once are one", after[i].ID, after[i].Starts)
		}
	}
	snap, _ := s.Snapshot()
	if snap.Reloads != 1 || snap.Reloading {
		t.Errorf("Snapshot reloads=%d reloading=%v, want 1 and false", snap.Reloads, snap.Reloading)
	}
	stop()
}

func TestBrokenReloadKeepsTheOldWorkers(t *testing.T) {
	release := filepath.Join(t.TempDir(), "release")
	os.WriteFile(release, []byte("good"), 0o644)
	events := make(chan Event, 1024)
	s, err := New(Options{
		Workers:      2,
		Port:         testutil.FreePort(t),
		ReadyTimeout: time.Second,
		Env:          []string{"SUP_TEST_RELEASE=" + release},
		OnEvent:      func(e Event) { events <- e },
	})
	if err != nil {
		t.Fatal(err)
	}
	stop := run(t, s)
	for n := 0; n < 2; {
		waitEvent(t, events, "listening", func(e Event) bool { return e.Type == EventListening })
		n++
	}
	before := s.Status()
	for _, tc := range []struct{ release, want string }{
		{"broken", "before it served"},
		{"hang", "did not serve within 1s"},
	} {
		os.WriteFile(release, []byte(tc.release), 0o644)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := s.Reload(ctx)
		cancel()
		if !errors.Is(err, ErrReloadAborted) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("reload to a %s release = %v, want ErrReloadAborted saying %q", tc.release, err, tc.want)
		}
		now := s.Status()
		for i := range now {
			if now[i].PID != before[i].PID || now[i].State != Listening {
				t.Errorf("%s release: slot %d pid %d -> %d (%s), want the old worker serving", tc.release, now[i].ID, before[i].PID, now[i].PID, now[i].State)
			}
		}
	}
	snap, _ := s.Snapshot()
	if snap.ReloadFailures != 2 {
		t.Errorf("ReloadFailures = %d, want 2", snap.ReloadFailures)
	}
	// A good release rolls.
	os.WriteFile(release, []byte("good"), 0o644)
	if err := s.Reload(context.Background()); err != nil {
		t.Errorf("reload to a good release = %v", err)
	}
	stop()
}

func TestHungWorkerIsReplaced(t *testing.T) {
	events := make(chan Event, 64)
	s, err := New(Options{Workers: 1, HeartbeatTimeout: 300 * time.Millisecond, StopTimeout: time.Second,
		Env: []string{"SUP_TEST_MODE=hang"}, OnEvent: func(e Event) { events <- e }})
	if err != nil {
		t.Fatal(err)
	}
	stop := run(t, s)
	first := waitEvent(t, events, "fork", func(e Event) bool { return e.Type == EventFork })
	d := waitEvent(t, events, "death of the hung worker", func(e Event) bool { return e.Type == EventDeath })
	if d.PID != first.PID || d.Death.Reason != "hung" || d.Death.Class() != "hung" {
		t.Errorf("death %+v, want pid %d with reason hung", d.Death, first.PID)
	}
	next := waitEvent(t, events, "replacement", func(e Event) bool { return e.Type == EventFork })
	if next.Worker != 1 || next.PID == first.PID {
		t.Errorf("replacement %+v, want a new process in slot 1", next)
	}
	stop()
}

func TestWorkersWithoutHeartbeatsAreNotWatched(t *testing.T) {
	events := make(chan Event, 64)
	s, err := New(Options{Workers: 1, HeartbeatTimeout: 100 * time.Millisecond, Env: []string{"SUP_TEST_MODE=deaf"},
		OnEvent: func(e Event) { events <- e }})
	if err != nil {
		t.Fatal(err)
	}
	stop := run(t, s)
	waitEvent(t, events, "online", func(e Event) bool { return e.Type == EventOnline })
	time.Sleep(500 * time.Millisecond)
	for len(events) > 0 {
		if e := <-events; e.Type == EventDeath {
			t.Errorf("a worker that never sent a heartbeat was stopped: %+v", e.Death)
		}
	}
	stop()
}

func TestMaxRequestsRecyclesThroughTheReloadPath(t *testing.T) {
	events := make(chan Event, 256)
	s, err := New(Options{Workers: 1, Port: testutil.FreePort(t), MaxRequests: 50, MaxRequestsJitter: 20,
		Env: []string{"SUP_TEST_MODE=busy"}, OnEvent: func(e Event) { events <- e }})
	if err != nil {
		t.Fatal(err)
	}
	stop := run(t, s)
	first := waitEvent(t, events, "listening", func(e Event) bool { return e.Type == EventListening })
	// The replacement serves before the old worker is stopped.
	next := waitEvent(t, events, "the replacement listening", func(e Event) bool { return e.Type == EventListening })
	d := waitEvent(t, events, "the old worker's death", func(e Event) bool { return e.Type == EventDeath })
	if next.PID == first.PID || d.PID != first.PID || d.Death.Reason != "max_requests" {
		t.Errorf("first %d, next %d, death %+v; want the first recycled (max_requests) after the next listened", first.PID, next.PID, d.Death)
	}
	if st := s.Status(); st[0].Requests < 50 {
		t.Errorf("slot requests %d, want at least the 50 of the recycled worker (never decreasing)", st[0].Requests)
	}
	stop()
}

func TestMaxMemoryRecycles(t *testing.T) {
	events := make(chan Event, 256)
	s, err := New(Options{Workers: 1, Port: testutil.FreePort(t), MaxMemory: 1 << 20, // every Go process is above 1 MiB
		Env: []string{"SUP_TEST_MODE=busy"}, OnEvent: func(e Event) { events <- e }})
	if err != nil {
		t.Fatal(err)
	}
	stop := run(t, s)
	d := waitEvent(t, events, "a recycle", func(e Event) bool { return e.Type == EventDeath })
	if d.Death.Reason != "max_memory" || d.Death.Class() != "max_memory" {
		t.Errorf("death %+v, want reason max_memory", d.Death)
	}
	stop()
}

func reportFrom(t *testing.T, opts Options) map[string]any {
	t.Helper()
	msgs := make(chan Message, 4)
	opts.Workers = 1
	opts.Env = append(opts.Env, "SUP_TEST_MODE=report")
	opts.OnMessage = func(m Message) { msgs <- m }
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	stop := run(t, s)
	defer stop()
	select {
	case m := <-msgs:
		var v map[string]any
		json.Unmarshal(m.Raw, &v)
		return v
	case <-time.After(10 * time.Second):
		t.Fatal("no report from the worker within 10s")
		return nil
	}
}

func TestCleanEnvironmentByDefault(t *testing.T) {
	t.Setenv("SECRET", "hunter2")
	t.Setenv("PASSED", "yes")
	v := reportFrom(t, Options{Env: []string{"PASSED", "SET=1"}})
	env := v["env"].(map[string]any)
	if _, ok := env["SECRET"]; ok {
		t.Error("the master's SECRET reached the worker")
	}
	if env["PASSED"] != "yes" || env["SET"] != "1" || env["PATH"] == nil || env["SHOAL_WORKER_ID"] != "1" {
		t.Errorf("worker environment %v, want PASSED=yes, SET=1, PATH and the contract", env)
	}
	v = reportFrom(t, Options{InheritEnv: true})
	if env := v["env"].(map[string]any); env["SECRET"] != "hunter2" {
		t.Errorf("with InheritEnv the worker sees %v, want SECRET", env)
	}
}

// TestWorkersRunAsAnotherUser runs the master as root and the workers as
// nobody, with no supplementary groups, and checks that the ambient
// CAP_NET_BIND_SERVICE lets them bind a port below 1024.
func TestWorkersRunAsAnotherUser(t *testing.T) {
	if os.Getuid() != 0 {
		peer.Missing(t, "changing the workers' user needs root")
	}
	// nobody must be able to execute the test binary.
	dir, err := os.MkdirTemp("", "shoal-nobody-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	bin := filepath.Join(dir, "worker")
	data, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	port := privilegedPort(t)
	cred := &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{}}
	env := []string{"PRIV_PORT=" + strconv.Itoa(port)}
	v := reportFrom(t, Options{Command: []string{bin}, Credential: cred, Env: env})
	groups, _ := v["groups"].([]any)
	if v["uid"] != float64(65534) || v["gid"] != float64(65534) || len(groups) != 0 {
		t.Errorf("worker runs as %v, want uid and gid 65534 and no supplementary groups", v)
	}
	if !strings.Contains(v["bind"].(string), "permission denied") {
		t.Errorf("bind of port %d as nobody without the capability: %q, want permission denied", port, v["bind"])
	}
	v = reportFrom(t, Options{Command: []string{bin}, Credential: cred, Env: env, AmbientCaps: []uintptr{unix.CAP_NET_BIND_SERVICE}})
	if v["bind"] != "" {
		t.Errorf("bind of port %d as nobody with ambient CAP_NET_BIND_SERVICE: %q, want success", port, v["bind"])
	}
}

// privilegedPort returns a free port below the unprivileged start on
// 127.0.0.1, or skips.
func privilegedPort(t *testing.T) int {
	t.Helper()
	start := 1024
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_unprivileged_port_start"); err == nil {
		start, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	}
	for p := start - 1; p > start-200 && p > 0; p-- {
		if ln, err := net.Listen("tcp4", "127.0.0.1:"+strconv.Itoa(p)); err == nil {
			ln.Close()
			return p
		}
	}
	t.Skipf("no free port below %d on 127.0.0.1", start)
	return 0
}

// TestSnapshotContextThatTimesOut: a snapshot asked for with a context
// that ends while the loop is busy returns the context's error, and the
// loop's late answer races with nothing (the race detector would say).
func TestSnapshotContextThatTimesOut(t *testing.T) {
	s, err := New(Options{Command: []string{"sleep", "60"}, Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	run(t, s)
	timedOut := 0
	for i := range 300 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Duration(i%7)*time.Microsecond)
		snap, err := s.SnapshotContext(ctx)
		cancel()
		if err != nil {
			timedOut++
			if snap.Desired != 0 {
				t.Fatalf("a timed-out snapshot carries data: %+v", snap)
			}
		}
	}
	t.Logf("%d of 300 snapshots timed out", timedOut)
}
