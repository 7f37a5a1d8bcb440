package supervisor

import (
	"context"
	"errors"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// checkAnswer makes the fake system's next starts of path behave like a
// program in check mode: print line and exit with code.
func checkAnswer(sys *fakeSystem, path, line string, code int) {
	sys.onStart = func(p *fakeProc) {
		if p.path != path {
			return
		}
		if line != "" {
			p.files[1].Write([]byte(line + "\n"))
		}
		sys.exitLocked(p, unix.WaitStatus(code<<8))
	}
}

// upgrade runs m's Upgrade to path on a goroutine, serving the loop's
// calls meanwhile, and returns its outcome.
func (m *machine) upgrade(path string) (Check, error) {
	m.t.Helper()
	type result struct {
		c   Check
		err error
	}
	res := make(chan result, 1)
	go func() {
		c, err := m.s.Upgrade(context.Background(), Upgrade{Path: path, Program: "shoal", CheckTimeout: 5 * time.Second})
		res <- result{c, err}
	}()
	var r result
	m.await("the upgrade's end", func() bool {
		select {
		case r = <-res:
			return true
		default:
			return false
		}
	})
	m.settle()
	return r.c, r.err
}

// goodCheck is what a shoal that reads this state format says.
const goodCheck = `{"program":"shoal","version":"v9.9.9","state_formats":[1]}`

// An upgrade hands every worker, its channel with a message cut in two,
// and every counter to the next program, which goes on with them.
func TestMachineUpgradeHandsEverythingOver(t *testing.T) {
	m := listening(t, Options{Workers: 2, MaxRestarts: 100})
	exe, _ := os.Executable()
	checkAnswer(m.sys, exe, goodCheck, 0)
	p1, p2 := m.proc(1), m.proc(2)
	m.send(p1, `{"cmd":"notifyRequest"}`)
	m.send(p2, `{"cmd":"shoal:requests","n":5}`)
	m.await("6 requests", func() bool { return m.s.requested.Load() == 6 })
	m.exit(p2, 1) // a restart to carry
	p2 = m.proc(2)
	m.listen(p2)
	// Half a message before the exec, the rest after.
	p1.peer.Write([]byte(`{"cmd":"notifyRe`))
	time.Sleep(10 * time.Millisecond)
	before, _ := m.s.snapshotNow()

	c, err := m.upgrade(exe)
	if err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	if c.Version != "v9.9.9" {
		t.Errorf("check version %q, want v9.9.9", c.Version)
	}
	if len(m.sys.execs) != 1 || m.sys.execs[0].path != exe || !slices.Equal(m.sys.execs[0].argv, os.Args) {
		t.Fatalf("execs %+v, want one of %s with the master's argv", m.sys.execs, exe)
	}
	if !m.s.replaced {
		t.Fatal("the old supervisor does not know it was replaced")
	}
	in, err := inherit(m.sys.state)
	if err != nil {
		t.Fatal(err)
	}

	// The new program.
	m2 := adoptMachine(t, m.sys, Options{Workers: 2, Port: 8000, MaxRestarts: 100, Inherited: in})
	after, _ := m2.s.snapshotNow()
	if got, want := m2.pids(), []int{p1.id, p2.id}; !slices.Equal(got, want) {
		t.Fatalf("adopted pids %v, want %v", got, want)
	}
	if after.Upgrades != 1 || after.Restarts != before.Restarts || after.Desired != 2 {
		t.Errorf("after: upgrades %d restarts %d desired %d; before: restarts %d", after.Upgrades, after.Restarts, after.Desired, before.Restarts)
	}
	for i, w := range after.Workers {
		b := before.Workers[i]
		if w.State != Listening || w.Requests != b.Requests || w.Restarts != b.Restarts || w.Starts != b.Starts || w.IPC.MessagesIn != b.IPC.MessagesIn {
			t.Errorf("worker %d after the upgrade: %+v\nbefore: %+v", w.ID, w, b)
		}
		if d := w.Uptime - b.Uptime; d < 0 || d > time.Second {
			t.Errorf("worker %d uptime %v after, %v before", w.ID, w.Uptime, b.Uptime)
		}
	}
	// The cut message is read once, by the new program.
	p1.peer.Write([]byte("quest\"}\n"))
	m2.await("the cut message", func() bool { return m2.s.requested.Load() == 7 })
	m2.send(p1, `{"cmd":"notifyRequest"}`)
	m2.await("one more", func() bool { return m2.s.slots[1].requests.Load() == 3 })
	// Deaths are the new program's to handle.
	m2.exit(p1, 1)
	if w := m2.s.slots[1].w; w == nil || w.pid == p1.id {
		t.Fatalf("slot 1 not replaced after the upgrade: %s", m2.describe())
	}
}

// adoptMachine is newMachine for the program after an upgrade.
func adoptMachine(t *testing.T, sys *fakeSystem, opts Options) *machine {
	t.Helper()
	m := &machine{t: t, sys: sys}
	opts.Command = []string{"/bin/true"}
	opts.OnEvent = func(e Event) { m.events = append(m.events, e) }
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	s.sys = sys
	s.ran.Store(true)
	m.s = s
	t.Cleanup(m.close)
	s.adopt(opts.Inherited)
	m.settle()
	return m
}

// snapshotNow takes a snapshot on the test's goroutine, which stands for
// the loop in a machine test.
func (s *Supervisor) snapshotNow() (Snapshot, bool) { return s.snapshot(), true }

// What the new program says in its check decides; a refusal changes
// nothing.
func TestMachineUpgradeRefusals(t *testing.T) {
	exe, _ := os.Executable()
	for _, tc := range []struct {
		name, path, line string
		code             int
		want             string
	}{
		{"missing", "/nonexistent/shoal", "", 0, "no such file"},
		{"not executable", "", "", 0, "not executable"},
		{"says nothing", exe, "", 0, "not a shoal check line"},
		{"exits at once", exe, "", 3, "ended with exit status 3"},
		{"another program", exe, `{"program":"nginx","version":"1","state_formats":[1]}`, 0, `it is "nginx"`},
		{"another state format", exe, `{"program":"shoal","version":"v0","state_formats":[0]}`, 0, "reads state formats [0]"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := listening(t, Options{Workers: 2})
			path := tc.path
			if path == "" {
				path = t.TempDir() + "/shoal"
				os.WriteFile(path, []byte("#!/bin/sh\n"), 0o644)
			}
			checkAnswer(m.sys, path, tc.line, tc.code)
			pids := m.pids()
			_, err := m.upgrade(path)
			if !errors.Is(err, ErrUpgrade) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("upgrade: %v, want ErrUpgrade saying %q", err, tc.want)
			}
			if len(m.sys.execs) != 0 || !slices.Equal(m.pids(), pids) || m.s.upgrading {
				t.Fatalf("after a refusal: execs %d, pids %v (were %v), upgrading %v", len(m.sys.execs), m.pids(), pids, m.s.upgrading)
			}
			// The channels were never touched: messages count.
			m.send(m.proc(1), `{"cmd":"notifyRequest"}`)
			m.await("a request", func() bool { return m.s.requested.Load() == 1 })
		})
	}
}

// A shoal that would not accept the master's arguments says so in its
// check, and is refused with its reason.
func TestMachineUpgradeRefusesAProgramThatRejectsTheConfiguration(t *testing.T) {
	exe, _ := os.Executable()
	m := listening(t, Options{Workers: 1})
	m.sys.onStart = func(p *fakeProc) {
		if p.path == exe {
			if !slices.Equal(p.argv, append([]string{exe, "upgrade-check"}, os.Args[1:]...)) {
				t.Errorf("check argv %q, want the master's arguments after upgrade-check", p.argv)
			}
			p.files[1].Write([]byte(goodCheck + "\n"))
			p.files[2].Write([]byte("shoal v9.9.9: flag provided but not defined: -steering\n"))
			m.sys.exitLocked(p, unix.WaitStatus(2<<8))
		}
	}
	_, err := m.upgrade(exe)
	if !errors.Is(err, ErrUpgrade) || !strings.Contains(err.Error(), "does not accept the master's arguments or environment: shoal v9.9.9: flag provided but not defined: -steering") {
		t.Fatalf("upgrade: %v, want a refusal quoting the check", err)
	}
	if len(m.sys.execs) != 0 {
		t.Fatal("executed a program that refused the configuration")
	}
}

// A program that others may write, or that belongs to another user, is
// not run as the master.
func TestMachineUpgradeRefusesAProgramOthersMayWrite(t *testing.T) {
	m := listening(t, Options{Workers: 1})
	path := t.TempDir() + "/shoal"
	os.WriteFile(path, []byte("#!/bin/sh\n"), 0o755)
	os.Chmod(path, 0o777)
	if _, err := m.upgrade(path); err == nil || !strings.Contains(err.Error(), "writable by others") {
		t.Fatalf("upgrade to a mode 0777 program: %v, want a refusal", err)
	}
	if os.Getuid() == 0 {
		os.Chmod(path, 0o755)
		os.Chown(path, 4242, 4242)
		if _, err := m.upgrade(path); err == nil || !strings.Contains(err.Error(), "owned by uid 4242") {
			t.Fatalf("upgrade to another user's program: %v, want a refusal", err)
		}
	}
}

func TestMachineUpgradeRefusedWhileBusy(t *testing.T) {
	exe, _ := os.Executable()
	m := listening(t, Options{Workers: 2})
	checkAnswer(m.sys, exe, goodCheck, 0)
	m.reload()
	if _, err := m.upgrade(exe); err == nil || !strings.Contains(err.Error(), "a reload runs") {
		t.Fatalf("upgrade during a reload: %v, want a refusal naming the reload", err)
	}
	m.s.reload = nil
	m.s.upgrading = true
	if _, err := m.upgrade(exe); err == nil || !strings.Contains(err.Error(), "another upgrade") {
		t.Fatalf("upgrade during an upgrade: %v, want a refusal", err)
	}
	m.s.upgrading = false
	m.s.beginStop(ReasonStop)
	if _, err := m.upgrade(exe); err == nil || !strings.Contains(err.Error(), "stopping") {
		t.Fatalf("upgrade while stopping: %v, want a refusal", err)
	}
	if len(m.sys.execs) != 0 {
		t.Fatal("a refused upgrade executed something")
	}
}

// When execve fails, the master goes on as before: its channels read on
// from where they stopped.
func TestMachineUpgradeExecFails(t *testing.T) {
	exe, _ := os.Executable()
	m := listening(t, Options{Workers: 2})
	checkAnswer(m.sys, exe, goodCheck, 0)
	m.sys.execErr = unix.ENOEXEC
	p1 := m.proc(1)
	m.send(p1, `{"cmd":"heartbeat"}`)
	m.await("a message counted", func() bool { snap, _ := m.s.snapshotNow(); return snap.Workers[0].IPC.MessagesIn == 1 })
	p1.peer.Write([]byte(`{"cmd":"notify`))
	time.Sleep(10 * time.Millisecond)
	_, err := m.upgrade(exe)
	if !errors.Is(err, ErrUpgrade) || !errors.Is(err, unix.ENOEXEC) {
		t.Fatalf("upgrade: %v, want ErrUpgrade wrapping ENOEXEC", err)
	}
	if m.s.replaced || m.s.upgrading {
		t.Fatalf("replaced %v upgrading %v after a failed exec", m.s.replaced, m.s.upgrading)
	}
	p1.peer.Write([]byte("Request\"}\n"))
	m.await("the cut message", func() bool { return m.s.requested.Load() == 1 })
	// The slot's message counts go on from the detached channel's.
	if snap, _ := m.s.snapshotNow(); snap.Workers[0].IPC.MessagesIn != 2 {
		t.Errorf("slot 1 counts %d messages in after a failed exec, want 2", snap.Workers[0].IPC.MessagesIn)
	}
	m.exit(p1, 1)
	if w := m.s.slots[1].w; w == nil || w.pid == p1.id {
		t.Fatalf("slot 1 not replaced: %s", m.describe())
	}
}

// A worker being stopped when the master upgrades is still stopped by the
// new program: SIGKILL at its stop timeout, counted from the stop signal.
func TestMachineUpgradeCarriesAStoppingWorker(t *testing.T) {
	exe, _ := os.Executable()
	m := listening(t, Options{Workers: 2, StopTimeout: 10 * time.Second})
	checkAnswer(m.sys, exe, goodCheck, 0)
	stubborn := m.proc(2)
	stubborn.ignore[syscall.SIGTERM] = true
	if err := m.s.scale(1); err != nil {
		t.Fatal(err)
	}
	m.advance(4 * time.Second)
	if _, err := m.upgrade(exe); err != nil {
		t.Fatal(err)
	}
	in, err := inherit(m.sys.state)
	if err != nil {
		t.Fatal(err)
	}
	m2 := adoptMachine(t, m.sys, Options{Workers: 1, Port: 8000, StopTimeout: 10 * time.Second, Inherited: in})
	if w := m2.s.byPID[stubborn.id]; w == nil || w.state != Stopping || m2.s.desired() != 1 {
		t.Fatalf("the stopping worker after the upgrade: %+v, desired %d", w, m2.s.desired())
	}
	m2.advance(5*time.Second + 900*time.Millisecond)
	if slices.Contains(stubborn.signals, syscall.SIGKILL) {
		t.Fatal("SIGKILL before the stop timeout")
	}
	m2.advance(200 * time.Millisecond)
	if !slices.Contains(stubborn.signals, syscall.SIGKILL) {
		t.Fatalf("no SIGKILL 10s after the stop signal; signals %v", stubborn.signals)
	}
	m2.settle()
	if _, ok := m2.s.byPID[stubborn.id]; ok || m2.s.slots[2] != nil {
		t.Fatalf("the stopped worker's slot is still there: %s", m2.describe())
	}
}

// A stop asked for while the readers stop for an upgrade wins: no exec,
// and the master goes on to stop.
func TestMachineUpgradeYieldsToAStop(t *testing.T) {
	exe, _ := os.Executable()
	m := listening(t, Options{Workers: 2})
	checkAnswer(m.sys, exe, goodCheck, 0)
	m.s.stopAsked = func() bool { return true }
	_, err := m.upgrade(exe)
	if err == nil || !strings.Contains(err.Error(), "asked to stop") || len(m.sys.execs) != 0 {
		t.Fatalf("upgrade with a stop pending: %v, %d execs; want a refusal and none", err, len(m.sys.execs))
	}
	// The channels read on.
	m.send(m.proc(2), `{"cmd":"notifyRequest"}`)
	m.await("a request", func() bool { return m.s.requested.Load() == 1 })
}

// A reload asked for while an upgrade runs is refused with the reason.
func TestMachineReloadRefusedDuringUpgrade(t *testing.T) {
	m := listening(t, Options{Workers: 1})
	m.s.upgrading = true
	if err := <-m.reload(); err == nil || !strings.Contains(err.Error(), "upgrading") {
		t.Fatalf("reload during an upgrade: %v, want a refusal", err)
	}
	if m.s.reload != nil {
		t.Fatal("a reload started during an upgrade")
	}
}
