package supervisor

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/shoal-sh/shoal/internal/sdnotify"
)

// The state machine, step by step, on a fake system: no process is forked,
// so each test runs in milliseconds. The end-to-end tests in test/ prove
// the same behaviour against real processes.

func TestMachineBackoffSequenceAndReset(t *testing.T) {
	m := newMachine(t, Options{Workers: 1})
	first := m.proc(1).id
	// The first death after a stable start: replaced at once.
	m.advance(DefaultStableAfter)
	m.exit(m.proc(1), 1)
	if p := m.proc(1).id; p == first {
		t.Fatalf("slot 1 not replaced at once: pid %d", p)
	}
	// Quick deaths: 100ms, 200ms, 400ms, 800ms, each exactly.
	for _, want := range []time.Duration{100, 200, 400, 800} {
		want *= time.Millisecond
		m.exit(m.proc(1), 1)
		if w := m.s.slots[1].w; w != nil {
			t.Fatalf("quick death replaced at once (pid %d), want a %s delay", w.pid, want)
		}
		m.advance(want - time.Millisecond)
		if m.s.slots[1].w != nil {
			t.Fatalf("restarted before its %s delay", want)
		}
		m.advance(time.Millisecond)
		if m.s.slots[1].w == nil {
			t.Fatalf("not restarted after its %s delay", want)
		}
	}
	// A stable run resets the count: the next death restarts at once.
	m.advance(DefaultStableAfter)
	m.exit(m.proc(1), 1)
	if m.s.slots[1].w == nil {
		t.Fatal("death after a stable run was not replaced at once")
	}
	if got := m.s.slots[1].restarts; got != 6 {
		t.Errorf("slot 1 restarts = %d, want 6", got)
	}
}

func TestMachineBackoffCap(t *testing.T) {
	m := newMachine(t, Options{Workers: 1, Backoff: Backoff{Max: 300 * time.Millisecond}})
	m.exit(m.proc(1), 1) // immediate
	var delays []time.Duration
	for range 4 {
		m.exit(m.proc(1), 1)
		delays = append(delays, m.s.slots[1].restartAt.Sub(m.sys.now()))
		m.advance(delays[len(delays)-1])
	}
	want := []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 300 * time.Millisecond, 300 * time.Millisecond}
	if !slices.Equal(delays, want) {
		t.Errorf("delays %v, want %v", delays, want)
	}
}

func TestMachineMaxRestartsGivesUp(t *testing.T) {
	m := newMachine(t, Options{Workers: 2, MaxRestarts: 3, RestartWindow: time.Minute})
	other := m.proc(2)
	for range 3 {
		m.exit(m.proc(1), 1)
		if m.s.stopping {
			t.Fatal("gave up too early")
		}
		m.advance(time.Second) // past any backoff
	}
	m.exit(m.proc(1), 1)
	if !m.s.stopping || !errors.Is(m.s.exitErr, ErrTooManyRestarts) {
		t.Fatalf("after 4 restarts within the window: stopping=%v err=%v, want a give-up", m.s.stopping, m.s.exitErr)
	}
	// The other worker was asked to stop.
	if !slices.Equal(other.signals, []syscall.Signal{syscall.SIGTERM}) {
		t.Errorf("worker 2 got %v, want SIGTERM", other.signals)
	}
	if m.s.giveUps != 1 {
		t.Errorf("giveUps = %d, want 1", m.s.giveUps)
	}
}

func TestMachineRestartWindowSlides(t *testing.T) {
	m := newMachine(t, Options{Workers: 1, MaxRestarts: 2, RestartWindow: 10 * time.Second})
	for range 5 {
		m.advance(6 * time.Second) // two restarts are never within 10s of a third
		m.exit(m.proc(1), 1)
		if m.s.stopping {
			t.Fatalf("gave up though restarts were spread out: %v", m.s.exitErr)
		}
	}
}

func TestMachineRestartPolicies(t *testing.T) {
	for _, tc := range []struct {
		policy    RestartPolicy
		code      int
		restarted bool
		failed    bool // Run ends with an error once all are done
	}{
		{RestartAlways, 0, true, false},
		{RestartAlways, 3, true, false},
		{RestartOnFailure, 0, false, false},
		{RestartOnFailure, 3, true, false},
		{RestartNever, 0, false, false},
		{RestartNever, 3, false, true},
	} {
		t.Run(tc.policy.String()+"/exit"+string(rune('0'+tc.code)), func(t *testing.T) {
			m := newMachine(t, Options{Workers: 1, Restart: tc.policy})
			m.exit(m.proc(1), tc.code)
			if got := m.s.slots[1].w != nil; got != tc.restarted {
				t.Fatalf("restarted = %v, want %v", got, tc.restarted)
			}
			if tc.restarted {
				return
			}
			if !m.s.finished() {
				t.Fatal("the supervisor goes on with no worker to run")
			}
			if got := m.s.exitErr != nil; got != tc.failed {
				t.Errorf("Run's error = %v, want an error: %v", m.s.exitErr, tc.failed)
			}
		})
	}
}

// listening starts a machine of n workers on a port and makes them all
// listen.
func listening(t *testing.T, opts Options) *machine {
	t.Helper()
	opts.Port = 8000
	m := newMachine(t, opts)
	for _, id := range m.s.slotIDs() {
		m.listen(m.proc(id))
	}
	for _, id := range m.s.slotIDs() {
		if st := m.s.slots[id].w.state; st != Listening {
			t.Fatalf("worker %d is %s, want listening", id, st)
		}
	}
	return m
}

func TestMachineReloadRollsEverySlot(t *testing.T) {
	m := listening(t, Options{Workers: 2})
	old := m.pids()
	done := m.reload()
	// One slot at a time: slot 1's replacement runs beside the old one.
	repl := m.next(1)
	if _, ok := m.s.slots[2].next, m.s.slots[2].next != nil; ok {
		t.Fatal("slot 2 rolls at the same time as slot 1 with surge 1")
	}
	m.listen(repl)
	if got := m.proc(1).id; got != repl.id {
		t.Fatalf("slot 1 is pid %d after its replacement served, want %d", got, repl.id)
	}
	if sig := m.sys.procs[old[0]].signals; !slices.Equal(sig, []syscall.Signal{syscall.SIGTERM}) {
		t.Fatalf("old worker 1 got %v, want SIGTERM once its replacement served", sig)
	}
	m.listen(m.next(2))
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("reload: %v", err)
		}
	default:
		t.Fatalf("reload not finished: %s", m.describe())
	}
	if pids := m.pids(); pids[0] == old[0] || pids[1] == old[1] {
		t.Errorf("pids %v after the reload, old %v", pids, old)
	}
	for _, d := range m.deaths() {
		if d.Reason != ReasonReload {
			t.Errorf("death of pid %d: reason %q, want %q", d.PID, d.Reason, ReasonReload)
		}
	}
	if m.s.reloads != 1 || m.s.reloadErrs != 0 || m.s.slots[1].reloads != 1 || m.s.slots[1].restarts != 0 {
		t.Errorf("reloads %d, failures %d, slot 1 reloads %d restarts %d; want 1, 0, 1, 0",
			m.s.reloads, m.s.reloadErrs, m.s.slots[1].reloads, m.s.slots[1].restarts)
	}
}

func TestMachineReloadAborts(t *testing.T) {
	for _, tc := range []struct {
		name   string
		break_ func(m *machine, repl *fakeProc)
		want   string
	}{
		{"replacement exits", func(m *machine, repl *fakeProc) { m.exit(repl, 1) }, "ended with exit status 1 before it served"},
		{"replacement never serves", func(m *machine, repl *fakeProc) { m.advance(DefaultReadyTimeout) }, "did not serve within 30s"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := listening(t, Options{Workers: 2})
			old := m.pids()
			done := m.reload()
			repl := m.next(1)
			tc.break_(m, repl)
			var err error
			select {
			case err = <-done:
			default:
				t.Fatalf("reload still runs: %s", m.describe())
			}
			if !errors.Is(err, ErrReloadAborted) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("reload error %v, want ErrReloadAborted saying %q", err, tc.want)
			}
			if pids := m.pids(); !slices.Equal(pids, old) {
				t.Errorf("pids %v after an aborted reload, want the old ones %v", pids, old)
			}
			if m.s.reloadErrs != 1 || m.s.reload != nil {
				t.Errorf("reload failures %d, reload %v; want 1, none", m.s.reloadErrs, m.s.reload)
			}
			if repl.alive && !slices.Contains(repl.signals, syscall.SIGTERM) {
				t.Errorf("the late replacement was not stopped: signals %v", repl.signals)
			}
		})
	}
}

func TestMachineReloadStartFailureIsADeath(t *testing.T) {
	var logs bytes.Buffer
	log := zerolog.New(&logs)
	m := listening(t, Options{Workers: 1, Logger: &log})
	m.sys.failStart = errors.New("fork/exec: resource temporarily unavailable")
	err := <-m.reload()
	if !errors.Is(err, ErrReloadAborted) {
		t.Fatalf("reload: %v, want ErrReloadAborted", err)
	}
	deaths := m.deaths()
	if len(deaths) != 1 || deaths[0].Class() != "start_failed" || deaths[0].Worker != 1 {
		t.Fatalf("death events %+v, want one start_failed of worker 1", deaths)
	}
	if got := m.s.slots[1].deaths["start_failed"]; got != 1 {
		t.Errorf("slot 1 start_failed deaths = %d, want 1", got)
	}
	if !strings.Contains(logs.String(), "could not be started") || !strings.Contains(logs.String(), "resource temporarily unavailable") {
		t.Errorf("no log line for the failed start:\n%s", logs.String())
	}
}

func TestMachineReloadJoinedBySecondRequest(t *testing.T) {
	m := listening(t, Options{Workers: 2})
	first := m.reload()
	second := m.reload()
	m.listen(m.next(1))
	m.listen(m.next(2))
	for i, ch := range []<-chan error{first, second} {
		select {
		case err := <-ch:
			if err != nil {
				t.Errorf("request %d: %v", i+1, err)
			}
		default:
			t.Fatalf("request %d not answered", i+1)
		}
	}
	if m.s.reloads != 1 || len(m.deaths()) != 2 {
		t.Errorf("%d reloads, %d deaths; want 1 reload of 2 workers", m.s.reloads, len(m.deaths()))
	}
}

func TestMachineScaleDuringReload(t *testing.T) {
	t.Run("up", func(t *testing.T) {
		m := listening(t, Options{Workers: 2})
		done := m.reload()
		if err := m.s.scale(3); err != nil {
			t.Fatal(err)
		}
		m.listen(m.proc(3))
		m.listen(m.next(1))
		m.listen(m.next(2))
		if err := <-done; err != nil {
			t.Fatalf("reload: %v", err)
		}
		if n := m.s.desired(); n != 3 {
			t.Errorf("desired %d, want 3", n)
		}
	})
	// With a surge of 2, slot 2's replacement runs when slot 2 is scaled
	// away: its stop must not read as a broken release.
	t.Run("down with surge 2", func(t *testing.T) {
		m := listening(t, Options{Workers: 2, ReloadSurge: 2})
		done := m.reload()
		repl2 := m.next(2)
		if err := m.s.scale(1); err != nil {
			t.Fatal(err)
		}
		m.settle()
		if repl2.alive {
			t.Fatalf("the removed slot's replacement still runs: %s", m.describe())
		}
		m.listen(m.next(1))
		if err := <-done; err != nil {
			t.Fatalf("reload after a scale-down: %v", err)
		}
		if m.s.reloadErrs != 0 || m.s.reloads != 1 {
			t.Errorf("reload failures %d, reloads %d; want 0, 1", m.s.reloadErrs, m.s.reloads)
		}
		if _, ok := m.s.slots[2]; ok || m.s.desired() != 1 {
			t.Errorf("slot 2 still there or desired %d: %s", m.s.desired(), m.describe())
		}
	})
	t.Run("down with surge 1", func(t *testing.T) {
		m := listening(t, Options{Workers: 3})
		done := m.reload()
		if err := m.s.scale(1); err != nil {
			t.Fatal(err)
		}
		m.listen(m.next(1))
		if err := <-done; err != nil {
			t.Fatalf("reload after a scale-down: %v", err)
		}
		if m.s.reloadErrs != 0 {
			t.Errorf("reload failures %d, want 0", m.s.reloadErrs)
		}
	})
}

func TestMachineStopKillsAWorkerThatIgnoresTheStopSignal(t *testing.T) {
	m := newMachine(t, Options{Workers: 2, StopTimeout: 3 * time.Second})
	stubborn := m.proc(1)
	stubborn.ignore[syscall.SIGTERM] = true
	m.s.beginStop(ReasonStop)
	m.settle()
	if m.s.finished() {
		t.Fatal("finished while a worker still runs")
	}
	m.advance(3*time.Second - time.Millisecond)
	if !slices.Equal(stubborn.signals, []syscall.Signal{syscall.SIGTERM}) {
		t.Fatalf("signals before the stop timeout: %v, want SIGTERM only", stubborn.signals)
	}
	m.advance(time.Millisecond)
	if !slices.Equal(stubborn.signals, []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL}) {
		t.Fatalf("signals at the stop timeout: %v, want SIGTERM then SIGKILL", stubborn.signals)
	}
	if !m.s.finished() || m.s.exitErr != nil {
		t.Fatalf("finished %v, err %v; want a clean end", m.s.finished(), m.s.exitErr)
	}
	for _, d := range m.deaths() {
		if d.Reason != ReasonStop {
			t.Errorf("death of worker %d: reason %q, want stop", d.Worker, d.Reason)
		}
	}
}

func TestMachineAbandonedWorkerLosesItsChannel(t *testing.T) {
	m := newMachine(t, Options{Workers: 1, StopTimeout: time.Second})
	stuck := m.proc(1)
	stuck.ignore[syscall.SIGTERM], stuck.ignore[syscall.SIGKILL] = true, true
	m.s.beginStop(ReasonStop)
	m.advance(time.Second)
	m.advance(5 * time.Second)
	if !m.s.finished() {
		t.Fatalf("Run would not return: %s", m.describe())
	}
	// The master's end of the channel is closed: the worker reads EOF.
	stuck.peer.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := stuck.peer.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("the abandoned worker's channel: read %v, want EOF (the master still holds it)", err)
	}
	m.close()
}

func TestMachineHeartbeats(t *testing.T) {
	m := newMachine(t, Options{Workers: 2, HeartbeatTimeout: time.Second})
	beating, silent := m.proc(1), m.proc(2)
	m.send(beating, `{"cmd":"shoal:heartbeat"}`)
	m.await("the heartbeat", func() bool { return m.s.slots[1].w.beat.Load() != 0 })
	m.advance(999 * time.Millisecond)
	if len(beating.signals) != 0 {
		t.Fatalf("stopped before its heartbeat timeout: %v", beating.signals)
	}
	m.advance(time.Millisecond)
	if !slices.Equal(beating.signals, []syscall.Signal{syscall.SIGTERM}) {
		t.Fatalf("a worker whose heartbeats stopped got %v, want SIGTERM", beating.signals)
	}
	if d := m.deaths(); len(d) != 1 || d[0].Reason != ReasonHung || d[0].Class() != ReasonHung {
		t.Fatalf("deaths %+v, want one hung", d)
	}
	if m.s.slots[1].w == nil {
		t.Error("the hung worker was not replaced")
	}
	// A worker that never sent a heartbeat is never watched.
	m.advance(time.Hour)
	if len(silent.signals) != 0 {
		t.Errorf("a worker without heartbeats got %v", silent.signals)
	}
}

func TestMachineRecycling(t *testing.T) {
	t.Run("max requests", func(t *testing.T) {
		m := listening(t, Options{Workers: 1, MaxRequests: 10})
		old := m.proc(1)
		m.send(old, `{"cmd":"shoal:requests","n":9}`)
		m.await("9 requests", func() bool { return m.s.slots[1].requests.Load() == 9 })
		if m.s.slots[1].next != nil {
			t.Fatal("recycled below its limit")
		}
		m.send(old, `{"cmd":"shoal:requests","n":1}`)
		m.await("the recycle", func() bool { return m.s.slots[1].next != nil })
		m.listen(m.next(1))
		if d := m.deaths(); len(d) != 1 || d[0].PID != old.id || d[0].Reason != ReasonMaxRequests {
			t.Fatalf("deaths %+v, want the old worker's, max_requests", d)
		}
		if m.s.reloads != 0 {
			t.Errorf("a recycle counted as a reload")
		}
	})
	t.Run("max memory", func(t *testing.T) {
		m := listening(t, Options{Workers: 2, MaxMemory: 100 << 20})
		fat := m.proc(2)
		m.sys.rssOf[fat.id] = 101 << 20
		m.sys.rssOf[m.proc(1).id] = 99 << 20
		m.advance(time.Second)
		if m.s.slots[1].next != nil {
			t.Fatal("recycled a worker under the limit")
		}
		m.listen(m.next(2))
		if d := m.deaths(); len(d) != 1 || d[0].PID != fat.id || d[0].Reason != ReasonMaxMemory {
			t.Fatalf("deaths %+v, want the fat worker's, max_memory", d)
		}
	})
}

func TestMachineRequestCounterNeverGoesDown(t *testing.T) {
	m := newMachine(t, Options{Workers: 1})
	p := m.proc(1)
	var last uint64
	for i := range 20 {
		// Each report is as large as the channel lets through.
		m.send(p, `{"cmd":"shoal:requests","n":1000000}`)
		m.await("the report", func() bool { return m.s.slots[1].requests.Load() > last || m.s.Requests() > last })
		got := m.s.slots[1].requests.Load()
		if got < last {
			t.Fatalf("report %d: the counter went down from %d to %d", i+1, last, got)
		}
		last = got
	}
	// Near the top, sums stop at the largest value instead of wrapping.
	m.s.slots[1].requests.Store(math.MaxUint64 - 5)
	addSaturating(&m.s.slots[1].requests, 1000)
	if got := m.s.slots[1].requests.Load(); got != math.MaxUint64 {
		t.Errorf("saturating add: %d, want %d", got, uint64(math.MaxUint64))
	}
}

func TestMachineStopSignal(t *testing.T) {
	m := listening(t, Options{Workers: 2, StopSignal: syscall.SIGQUIT})
	old := m.proc(1)
	done := m.reload()
	m.listen(m.next(1))
	if !slices.Equal(old.signals, []syscall.Signal{syscall.SIGQUIT}) {
		t.Fatalf("the reloaded worker got %v, want SIGQUIT", old.signals)
	}
	m.listen(m.next(2))
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	w := m.proc(2)
	m.s.beginStop(ReasonStop)
	m.settle()
	if !slices.Equal(w.signals, []syscall.Signal{syscall.SIGQUIT}) {
		t.Fatalf("on stop a worker got %v, want SIGQUIT", w.signals)
	}
}

func TestMachineReadyMessages(t *testing.T) {
	for _, line := range []string{`{"cmd":"shoal:ready"}`, `"ready"`} {
		t.Run(line, func(t *testing.T) {
			m := newMachine(t, Options{Workers: 1, Port: 8000, Ready: ReadyMessage})
			p := m.proc(1)
			m.send(p, `"not yet"`)
			m.advance(time.Second)
			if st := m.s.slots[1].w.state; st != Online {
				t.Fatalf("state %s before the ready message, want online", st)
			}
			m.send(p, line)
			m.await("listening", func() bool { return m.s.slots[1].w.state == Listening })
		})
	}
}

func TestMachineWorkerEnvironment(t *testing.T) {
	m := newMachine(t, Options{Workers: 3, Port: 8000})
	for id := 1; id <= 3; id++ {
		env := m.proc(id).env
		for _, want := range []string{
			"SHOAL_WORKER_ID=" + strconv.Itoa(id),
			"NODE_APP_INSTANCE=" + strconv.Itoa(id-1),
			"SHOAL_WORKERS=3",
			"PORT=8000",
			"NODE_CHANNEL_FD=3",
		} {
			if !slices.Contains(env, want) {
				t.Errorf("worker %d: no %s in %q", id, want, env)
			}
		}
	}
	if err := m.s.scale(4); err != nil {
		t.Fatal(err)
	}
	if env := m.proc(4).env; !slices.Contains(env, "SHOAL_WORKERS=4") {
		t.Errorf("a worker added by scale: no SHOAL_WORKERS=4 in %q", env)
	}
}

func TestMachineDaemonizedWorker(t *testing.T) {
	m := newMachine(t, Options{Workers: 1, Subreaper: true, StopSignal: syscall.SIGQUIT, StopTimeout: 2 * time.Second})
	first := m.proc(1)
	daemon := m.daemon(first)
	daemon.ignore[syscall.SIGQUIT] = true // it lingers until SIGKILL
	m.exit(first, 0)
	d := m.deaths()
	if len(d) != 1 || d[0].Reason != ReasonDaemonized || d[0].Class() != ReasonDaemonized {
		t.Fatalf("deaths %+v, want one daemonized", d)
	}
	if got := m.s.snapshot().Workers[0].LastDeath; got != ReasonDaemonized {
		t.Errorf("the snapshot's last death %q, want %q", got, ReasonDaemonized)
	}
	if !slices.Equal(daemon.signals, []syscall.Signal{syscall.SIGQUIT}) {
		t.Fatalf("the daemon got %v, want the stop signal", daemon.signals)
	}
	// The restart policy applies: the first death after start is replaced.
	if m.s.slots[1].w == nil {
		t.Fatal("the slot was not restarted")
	}
	m.advance(2 * time.Second)
	if !slices.Equal(daemon.signals, []syscall.Signal{syscall.SIGQUIT, syscall.SIGKILL}) || daemon.alive {
		t.Fatalf("the daemon got %v (alive %v), want SIGKILL at the stop timeout", daemon.signals, daemon.alive)
	}
	if len(m.s.orphans) != 0 {
		t.Errorf("orphans left after the daemon was reaped: %v", m.s.orphans)
	}
}

func TestMachineStopWaitsForOrphans(t *testing.T) {
	m := newMachine(t, Options{Workers: 1, Subreaper: true, StopTimeout: time.Second})
	w := m.proc(1)
	left := m.daemon(w)
	left.ignore[syscall.SIGTERM] = true
	m.exit(w, 1) // a crash that leaves a child behind
	if d := m.deaths(); len(d) != 1 || d[0].Reason != "" {
		t.Fatalf("deaths %+v, want one with no reason (not daemonized)", d)
	}
	m.s.beginStop(ReasonStop)
	m.settle()
	if m.s.finished() {
		t.Fatal("Run would return while a left-behind process runs")
	}
	m.advance(time.Second)
	if left.alive || !m.s.finished() {
		t.Fatalf("left-behind process alive %v, finished %v; want it killed and Run done", left.alive, m.s.finished())
	}
}

func TestMachineListeningNeedsEveryListener(t *testing.T) {
	tcp, udp := Listener{"tcp", 8443}, Listener{"udp", 8443}
	m := newMachine(t, Options{Workers: 1, Listeners: []Listener{tcp, udp}})
	p := m.proc(1)
	m.hold(p, tcp)
	if st := m.s.slots[1].w.state; st != Online {
		t.Fatalf("state %s with only the TCP socket, want online", st)
	}
	m.hold(p, udp)
	if st := m.s.slots[1].w.state; st != Listening {
		t.Fatalf("state %s with both sockets, want listening", st)
	}
	if got := len(m.s.slots[1].w.inodes); got != 2 {
		t.Errorf("%d sockets recorded, want 2", got)
	}
	if env := p.env; !slices.Contains(env, "PORT=8443") || !slices.Contains(env, "SHOAL_PORTS=tcp:8443,udp:8443") {
		t.Errorf("environment %q: want PORT=8443 and SHOAL_PORTS=tcp:8443,udp:8443", env)
	}
}

func TestMachineWrongPortIsDiagnosedOnce(t *testing.T) {
	var logs bytes.Buffer
	log := zerolog.New(&logs)
	m := newMachine(t, Options{Workers: 1, Port: 8000, Logger: &log})
	p := m.proc(1)
	m.hold(p, Listener{"tcp", 9000})
	m.advance(4 * time.Second)
	if strings.Contains(logs.String(), "does not serve") {
		t.Fatal("diagnosed before 5 s")
	}
	m.advance(time.Second)
	m.advance(time.Second)
	if n := strings.Count(logs.String(), "does not serve"); n != 1 {
		t.Fatalf("%d warnings, want 1:\n%s", n, logs.String())
	}
	if !strings.Contains(logs.String(), "listens on tcp:127.0.0.1:9000, not on tcp:8000") {
		t.Errorf("the warning does not name the port it listens on:\n%s", logs.String())
	}
	snap := m.s.snapshot()
	if w := snap.Workers[0].Waiting; !strings.Contains(w, "127.0.0.1:9000") {
		t.Errorf("status says %q, want why it does not serve", w)
	}
}

func TestMachineBindMaster(t *testing.T) {
	tcp, udp := Listener{"tcp", 8443}, Listener{"udp", 8443}
	m := newMachine(t, Options{Workers: 2, Listeners: []Listener{tcp, udp}, Bind: BindMaster})
	p := m.proc(1)
	if len(p.files) != 6 || p.path != "/proc/self/exe" {
		t.Fatalf("worker 1 started as %s with %d files, want the shim with stdin, stdout, stderr, 2 sockets and the channel", p.path, len(p.files))
	}
	for _, want := range []string{"LISTEN_FDS=2", "LISTEN_FDNAMES=tcp-8443:udp-8443", "SHOAL_IPC_FD=5", "NODE_CHANNEL_FD=5", "SHOAL_EXEC_SHIM=/bin/true"} {
		if !slices.Contains(p.env, want) {
			t.Errorf("no %s in %q", want, p.env)
		}
	}
	if got := m.sys.opened; got != 4 {
		t.Errorf("%d sockets opened for 2 slots of 2 listeners, want 4", got)
	}
	// Holding the sockets is not serving; waiting on them is.
	m.advance(time.Second)
	if st := m.s.slots[1].w.state; st != Online {
		t.Fatalf("worker 1 is %s while it only holds its sockets, want online", st)
	}
	m.accept(p)
	if st := m.s.slots[1].w.state; st != Listening {
		t.Fatalf("worker 1 is %s while it waits on its sockets, want listening", st)
	}
	first := p.sockInode(t, 0)

	// Restarted at once: the same sockets.
	m.advance(DefaultStableAfter)
	m.exit(p, 1)
	if got := m.proc(1).sockInode(t, 0); got != first {
		t.Errorf("worker 1 restarted at once got socket %d, want the slot's %d", got, first)
	}
	// A quick death: a backoff, the sockets closed, new ones at the restart.
	m.exit(m.proc(1), 1)
	if m.s.slots[1].socks != nil {
		t.Fatal("slot 1 keeps its sockets through a backoff delay")
	}
	m.advance(100 * time.Millisecond)
	second := m.proc(1).sockInode(t, 0)
	if second == first {
		t.Errorf("slot 1 after a backoff got the old socket %d", first)
	}
	m.accept(m.proc(1))
	m.accept(m.proc(2))

	// A reload's replacement gets the sockets of the worker it replaces.
	done := m.reload()
	if got := m.next(1).sockInode(t, 0); got != second {
		t.Errorf("replacement of slot 1 got socket %d, want the slot's %d", got, second)
	}
	m.accept(m.next(1))
	m.accept(m.next(2))
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// Scaled away: the master's copies close at once.
	if err := m.s.scale(1); err != nil {
		t.Fatal(err)
	}
	if _, ok := m.s.slots[2]; ok && m.s.slots[2].socks != nil {
		t.Error("a slot scaled away keeps the master's sockets")
	}
}

func TestMachineBindMasterFailsToListen(t *testing.T) {
	sys := newFakeSystem()
	sys.failListen = fmt.Errorf("%w: listen tcp :8443: address already in use", ErrBind)
	m := &machine{t: t, sys: sys}
	s, err := New(Options{Command: []string{"/bin/true"}, Workers: 1, Port: 8443, Bind: BindMaster, OnEvent: func(e Event) { m.events = append(m.events, e) }})
	if err != nil {
		t.Fatal(err)
	}
	s.sys, m.s = sys, s
	s.ran.Store(true)
	t.Cleanup(m.close)
	s.begin()
	m.settle()
	// At start, nothing is forked: Run ends with the error.
	if !s.finished() || !errors.Is(s.exitErr, ErrBind) || !strings.Contains(s.exitErr.Error(), "address already in use") || len(sys.procs) != 0 {
		t.Fatalf("finished %v, error %v, %d processes; want Run to end with ErrBind before any fork", s.finished(), s.exitErr, len(sys.procs))
	}
}

func TestMachineReadyNotify(t *testing.T) {
	m := newMachine(t, Options{Workers: 2, Port: 8000, Ready: ReadyNotify, HeartbeatTimeout: time.Second})
	p := m.proc(1)
	// Holding the port is not enough: READY=1 is.
	m.hold(p, Listener{"tcp", 8000})
	m.advance(time.Second)
	if st := m.s.slots[1].w.state; st != Online {
		t.Fatalf("state %s before READY=1, want online", st)
	}
	m.s.handleNotify(sdnotify.Message{PID: 999999, Fields: map[string]string{"READY": "1"}}, nil) // no worker's
	m.s.handleNotify(sdnotify.Message{PID: p.id}, fmt.Errorf("%w: READY", sdnotify.ErrBadDatagram))
	if st := m.s.slots[1].w.state; st != Online {
		t.Fatalf("state %s after a stranger's READY=1 and a bad datagram, want online", st)
	}
	m.s.handleNotify(sdnotify.Message{PID: p.id, Fields: map[string]string{"READY": "1", "STATUS": "up"}}, nil)
	if st := m.s.slots[1].w.state; st != Listening {
		t.Fatalf("state %s after READY=1, want listening", st)
	}
	if got := m.s.snapshot().Workers[0].IPC.Errors["bad_notify"]; got != 1 {
		t.Errorf("bad notifications counted %d, want 1", got)
	}
	// WATCHDOG=1 is a heartbeat: the worker is watched, and hung without.
	m.s.handleNotify(sdnotify.Message{PID: p.id, Fields: map[string]string{"WATCHDOG": "1"}}, nil)
	m.advance(999 * time.Millisecond)
	if len(p.signals) != 0 {
		t.Fatalf("stopped before the heartbeat timeout: %v", p.signals)
	}
	m.advance(time.Millisecond)
	if d := m.deaths(); len(d) != 1 || d[0].Reason != ReasonHung {
		t.Fatalf("deaths %+v, want one hung after WATCHDOG=1 stopped", d)
	}
}

func TestMachineSteering(t *testing.T) {
	m := newMachine(t, Options{Workers: 2, Port: 8000})
	f := m.steered()
	p1, p2 := m.proc(1), m.proc(2)
	m.listen(p1)
	m.listen(p2)
	want := []string{fmt.Sprintf("add 1 %d", p1.id), fmt.Sprintf("add 2 %d", p2.id)}
	if !slices.Equal(f.calls, want) {
		t.Fatalf("steering calls %q, want %q", f.calls, want)
	}
	// A reload: the replacement takes the slot in the selection, and the
	// old worker gets its stop signal only after the drain delay.
	f.calls = nil
	done := m.reload()
	m.listen(m.next(1))
	if len(p1.signals) != 0 {
		t.Fatalf("old worker signalled at once: %v", p1.signals)
	}
	m.advance(DefaultSteeringDrainDelay - time.Millisecond)
	if len(p1.signals) != 0 {
		t.Fatalf("old worker signalled before the drain delay: %v", p1.signals)
	}
	m.advance(time.Millisecond)
	if !slices.Equal(p1.signals, []syscall.Signal{syscall.SIGTERM}) {
		t.Fatalf("old worker got %v at the drain delay, want SIGTERM", p1.signals)
	}
	m.listen(m.next(2))
	m.advance(DefaultSteeringDrainDelay)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if slices.Contains(f.calls, "remove 1") {
		t.Errorf("calls %q: a reload removed the slot its replacement had just taken", f.calls)
	}
	// Scaled away: out of the selection first, then the signal.
	f.calls = nil
	last := m.proc(2)
	if err := m.s.scale(1); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(f.calls, []string{"remove 2"}) || len(last.signals) != 0 {
		t.Fatalf("scale down: calls %q, signals %v; want remove 2 and no signal yet", f.calls, last.signals)
	}
	m.advance(DefaultSteeringDrainDelay)
	if !slices.Equal(last.signals, []syscall.Signal{syscall.SIGTERM}) {
		t.Fatalf("scaled-away worker got %v, want SIGTERM after the drain delay", last.signals)
	}
	// A stop is immediate.
	m.s.beginStop(ReasonStop)
	if sig := m.proc(1).signals; !slices.Equal(sig, []syscall.Signal{syscall.SIGTERM}) {
		t.Errorf("on stop: %v, want SIGTERM at once", sig)
	}
}

func TestMachineSteeringSkipsAStalledWorker(t *testing.T) {
	m := newMachine(t, Options{Workers: 2, Port: 8000})
	f := m.steered()
	m.listen(m.proc(1))
	m.listen(m.proc(2))
	for _, id := range []int{1, 2} {
		m.send(m.proc(id), `{"cmd":"shoal:heartbeat"}`)
	}
	m.await("both heartbeats", func() bool { return m.s.slots[1].w.beat.Load() != 0 && m.s.slots[2].w.beat.Load() != 0 })
	f.calls = nil
	// Worker 2 goes on beating; worker 1 stops (SIGSTOP, say).
	for range 6 {
		m.advance(500 * time.Millisecond)
		m.s.slots[2].w.beat.Store(m.sys.now().UnixNano())
	}
	if !slices.Contains(f.calls, "skip 1 true") || slices.Contains(f.calls, "skip 2 true") {
		t.Fatalf("calls %q, want worker 1 skipped, worker 2 not", f.calls)
	}
	if !m.s.snapshot().Workers[0].Skipped {
		t.Error("the snapshot does not say worker 1 is skipped")
	}
	m.s.slots[1].w.beat.Store(m.sys.now().UnixNano())
	m.advance(200 * time.Millisecond)
	if f.calls[len(f.calls)-1] != "skip 1 false" {
		t.Errorf("calls %q, want worker 1 back after its heartbeat", f.calls)
	}
}
