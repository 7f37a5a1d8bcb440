package supervisor

import (
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/reuseport"
)

// fakeSystem is the seam's stand-in for the state-machine tests: processes
// are records, exits are what the test says, the clock moves when the test
// moves it. Nothing is forked, so a whole lifecycle runs in microseconds.
type fakeSystem struct {
	mu         sync.Mutex
	clock      time.Time
	nextPID    int
	procs      map[int]*fakeProc
	pending    []exit // exited, not reaped yet
	tick       chan struct{}
	failStart  error // the next starts fail with it, while set
	failListen error // BindMaster: the next sockets fail to open, while set
	opened     int   // BindMaster: sockets opened
	rssOf      map[int]uint64
	execErr    error             // what exec returns; nil stands for a successful exec
	execs      []fakeExec        // what was executed in place
	state      []byte            // the state the last exec was handed
	onStart    func(p *fakeProc) // called with mu held at the end of each start
}

// fakeExec is one exec of an in-place upgrade.
type fakeExec struct {
	path      string
	argv, env []string
}

// fakeProc is one "process": it holds the worker's end of its channel, as a
// real worker holds fd 3, until it exits.
type fakeProc struct {
	sys     *fakeSystem
	id      int
	slot    int // SHOAL_WORKER_ID from its environment
	env     []string
	peer    *os.File
	signals []syscall.Signal
	ignore  map[syscall.Signal]bool // signals that do not end it
	alive   bool
	holds   []Listener // the sockets it has bound, as listeners
	files   []*os.File // what it inherited
	path    string     // what was executed
	argv    []string
	waitsOn []uint64 // BindMaster: the socket inodes it waits on
}

func newFakeSystem() *fakeSystem {
	return &fakeSystem{
		clock:   time.Unix(1_700_000_000, 0),
		nextPID: 100,
		procs:   map[int]*fakeProc{},
		tick:    make(chan struct{}, 1),
		rssOf:   map[int]uint64{},
	}
}

func (f *fakeSystem) now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.clock
}

func (f *fakeSystem) advance(d time.Duration) {
	f.mu.Lock()
	f.clock = f.clock.Add(d)
	f.mu.Unlock()
}

func (f *fakeSystem) setup(bool) error             { return nil }
func (f *fakeSystem) childExited() <-chan struct{} { return f.tick }
func (f *fakeSystem) close()                       {}

func (f *fakeSystem) start(path string, argv []string, attr *os.ProcAttr) (process, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failStart != nil {
		return nil, f.failStart
	}
	// Keep the worker's end of the channel, as the child would: the
	// last file, after any sockets the master passes.
	fd, err := unix.Dup(int(attr.Files[len(attr.Files)-1].Fd()))
	if err != nil {
		return nil, err
	}
	f.nextPID++
	p := &fakeProc{sys: f, id: f.nextPID, peer: os.NewFile(uintptr(fd), "peer"), alive: true, ignore: map[syscall.Signal]bool{}, env: attr.Env}
	for _, kv := range attr.Env {
		if v, ok := strings.CutPrefix(kv, EnvWorkerID+"="); ok {
			p.slot, _ = strconv.Atoi(v)
		}
	}
	p.files, p.path, p.argv = attr.Files, path, argv
	f.procs[p.id] = p
	if f.onStart != nil {
		f.onStart(p)
	}
	return p, nil
}

func (f *fakeSystem) adopt(pid int) process {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.procs[pid]
}

func (f *fakeSystem) exec(path string, argv, env []string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.execs = append(f.execs, fakeExec{path, argv, env})
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, envUpgradeState+"="); ok {
			f.state, _ = os.ReadFile("/proc/self/fd/" + v)
		}
	}
	return f.execErr
}

func (p *fakeProc) pid() int { return p.id }

func (p *fakeProc) signal(sig syscall.Signal) error {
	f := p.sys
	f.mu.Lock()
	defer f.mu.Unlock()
	p.signals = append(p.signals, sig)
	if !p.alive || p.ignore[sig] {
		return nil
	}
	switch sig {
	case syscall.SIGTERM, syscall.SIGKILL, syscall.SIGQUIT, syscall.SIGINT:
		f.exitLocked(p, unix.WaitStatus(sig))
	}
	return nil
}

func (p *fakeProc) release() {}

// exitLocked ends p with status ws: its channel end closes and its exit
// waits to be reaped.
func (f *fakeSystem) exitLocked(p *fakeProc, ws unix.WaitStatus) {
	p.alive, p.holds = false, nil
	p.peer.Close()
	f.pending = append(f.pending, exit{p.id, ws})
	select {
	case f.tick <- struct{}{}:
	default:
	}
}

func (f *fakeSystem) reap(pids []int, all bool) []exit {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out, keep []exit
	for _, e := range f.pending {
		if all || slices.Contains(pids, e.pid) {
			out = append(out, e)
		} else {
			keep = append(keep, e)
		}
	}
	f.pending = keep
	return out
}

// sockets lists the sockets the live processes hold. A socket's inode is
// its holder's pid times 1000 plus its place in the holder's list.
func (f *fakeSystem) sockets(l Listener) ([]reuseport.Socket, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var socks []reuseport.Socket
	for pid, p := range f.procs {
		for i, h := range p.holds {
			if h.Network == l.Network && (l.Port == 0 || h.Port == l.Port) {
				socks = append(socks, reuseport.Socket{
					Inode: uint64(pid*1000 + i),
					Addr:  netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(h.Port)),
				})
			}
		}
	}
	return socks, nil
}

func (f *fakeSystem) inodes(pid int) (map[uint64]struct{}, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	set := map[uint64]struct{}{}
	if p := f.procs[pid]; p != nil {
		for i := range p.holds {
			set[uint64(pid*1000+i)] = struct{}{}
		}
	}
	return set, nil
}

func (f *fakeSystem) rss(pid int) (uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.rssOf[pid], nil
}

// machine drives a Supervisor's state machine step by step on the loop's
// own handlers, with a fakeSystem: each step is what the loop would do for
// one kernel event, tick or call, run synchronously.
type machine struct {
	t      *testing.T
	s      *Supervisor
	sys    *fakeSystem
	events []Event
	closed bool
}

// newMachine builds a supervisor of opts on a fake system and starts its
// first workers. Port 0 means workers serve as soon as they run; give a
// port to make listening a step of the test (machine.listen).
func newMachine(t *testing.T, opts Options) *machine {
	t.Helper()
	m := &machine{t: t, sys: newFakeSystem()}
	opts.Command = []string{"/bin/true"}
	opts.OnEvent = func(e Event) { m.events = append(m.events, e) }
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	s.sys = m.sys
	s.ran.Store(true)
	m.s = s
	t.Cleanup(m.close)
	s.begin()
	m.settle()
	return m
}

// settle reaps what exited and runs what the channel readers handed over,
// as the loop would, until nothing is pending.
func (m *machine) settle() {
	for {
		select {
		case <-m.sys.tick:
			m.s.reap()
		case e := <-m.s.events:
			m.s.handleEvent(e)
		case f := <-m.s.calls:
			f()
		default:
			return
		}
	}
}

// advance moves the clock by d and runs the loop's tick.
func (m *machine) advance(d time.Duration) {
	m.sys.advance(d)
	m.s.tick(m.sys.now())
	m.settle()
}

// proc returns the process now in slot id (the current one, not a reload's
// replacement), failing the test when there is none.
func (m *machine) proc(id int) *fakeProc {
	m.t.Helper()
	sl := m.s.slots[id]
	if sl == nil || sl.w == nil {
		m.t.Fatalf("slot %d has no process; slots: %s", id, m.describe())
	}
	return m.sys.procs[sl.w.pid]
}

// next returns the reload's replacement in slot id.
func (m *machine) next(id int) *fakeProc {
	m.t.Helper()
	sl := m.s.slots[id]
	if sl == nil || sl.next == nil {
		m.t.Fatalf("slot %d has no replacement; slots: %s", id, m.describe())
	}
	return m.sys.procs[sl.next.pid]
}

// exit makes p exit with code and lets the loop reap it.
func (m *machine) exit(p *fakeProc, code int) {
	m.sys.mu.Lock()
	m.sys.exitLocked(p, unix.WaitStatus(code<<8))
	m.sys.mu.Unlock()
	m.settle()
}

// listen makes p listen on every listener and lets the loop's next poll
// see it.
func (m *machine) listen(p *fakeProc) {
	m.hold(p, m.s.opts.Listeners...)
}

// hold makes p bind ls and lets the loop's next poll see it.
func (m *machine) hold(p *fakeProc, ls ...Listener) {
	m.sys.mu.Lock()
	p.holds = append(p.holds, ls...)
	m.sys.mu.Unlock()
	m.advance(10 * time.Millisecond)
}

// pids returns the pid of every slot's current process, by slot; 0 for
// none.
func (m *machine) pids() []int {
	var out []int
	for _, id := range m.s.slotIDs() {
		if w := m.s.slots[id].w; w != nil {
			out = append(out, w.pid)
		} else {
			out = append(out, 0)
		}
	}
	return out
}

// reload asks for a reload and returns where its outcome arrives.
func (m *machine) reload() <-chan error {
	ch := make(chan error, 1)
	m.s.requestReload(ch)
	m.settle()
	return ch
}

// deaths returns the death events since the start, in order.
func (m *machine) deaths() []*Death {
	var out []*Death
	for _, e := range m.events {
		if e.Type == EventDeath {
			out = append(out, e.Death)
		}
	}
	return out
}

func (m *machine) describe() string {
	var b strings.Builder
	for _, id := range m.s.slotIDs() {
		sl := m.s.slots[id]
		fmt.Fprintf(&b, " %d:", id)
		if sl.w != nil {
			fmt.Fprintf(&b, "%d/%s", sl.w.pid, sl.w.state)
		} else {
			b.WriteString("-")
		}
		if sl.next != nil {
			fmt.Fprintf(&b, "+%d/%s", sl.next.pid, sl.next.state)
		}
	}
	return b.String()
}

// await runs the loop's handlers until cond holds, for what a channel
// reader goroutine hands over; it fails the test after two seconds.
func (m *machine) await(what string, cond func() bool) {
	m.t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			m.t.Fatalf("timed out waiting for %s; slots: %s", what, m.describe())
		}
		time.Sleep(time.Millisecond)
		m.settle()
	}
}

// send writes one line to the master from p, as a worker writes to fd 3.
func (m *machine) send(p *fakeProc, line string) {
	m.t.Helper()
	if _, err := p.peer.Write([]byte(line + "\n")); err != nil {
		m.t.Fatal(err)
	}
}

// close ends the machine as Run would end: every process is gone and
// reaped, then done closes and the retiring goroutines finish.
func (m *machine) close() {
	if m.closed {
		return
	}
	m.closed = true
	m.sys.mu.Lock()
	for _, p := range m.sys.procs {
		if p.alive {
			m.sys.exitLocked(p, unix.WaitStatus(syscall.SIGKILL))
		}
	}
	m.sys.mu.Unlock()
	m.s.stopping = true
	m.settle()
	close(m.s.done)
	m.s.retiring.Wait()
	for _, p := range m.sys.procs {
		p.peer.Close()
	}
}

// children lists every live process: the workers, and the daemons the test
// made with daemon; the supervisor tells them apart.
func (f *fakeSystem) children() []child {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []child
	for pid, p := range f.procs {
		if p.alive {
			out = append(out, child{pid: pid, cmd: "fake"})
		}
	}
	return out
}

func (f *fakeSystem) kill(pid int, sig syscall.Signal) error {
	f.mu.Lock()
	p := f.procs[pid]
	f.mu.Unlock()
	if p == nil {
		return syscall.ESRCH
	}
	return p.signal(sig)
}

// daemon makes p fork a process into the background, which the master will
// find as its child once p is gone.
func (m *machine) daemon(p *fakeProc) *fakeProc {
	f := m.sys
	f.mu.Lock()
	defer f.mu.Unlock()
	f.nextPID++
	fd, err := unix.Dup(int(p.peer.Fd()))
	if err != nil {
		m.t.Fatal(err)
	}
	d := &fakeProc{sys: f, id: f.nextPID, peer: os.NewFile(uintptr(fd), "inherited fd 3"), alive: true, ignore: map[syscall.Signal]bool{}}
	f.procs[d.id] = d
	return d
}

// listen opens a stand-in for a listening socket: a pipe's read end, whose
// inode the fake's waiting reports once the test says a process waits.
func (f *fakeSystem) listen(l Listener, host string) (*os.File, uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failListen != nil {
		return nil, 0, f.failListen
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, 0, err
	}
	w.Close()
	var st unix.Stat_t
	unix.Fstat(int(r.Fd()), &st)
	f.opened++
	return r, st.Ino, nil
}

func (f *fakeSystem) waiting(pid int) (map[uint64]struct{}, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p := f.procs[pid]
	if p == nil {
		return nil, syscall.ESRCH
	}
	out := map[uint64]struct{}{}
	for _, ino := range p.waitsOn {
		out[ino] = struct{}{}
	}
	return out, nil
}

// sockInode returns the inode of the socket p inherited at fd 3+i.
func (p *fakeProc) sockInode(t *testing.T, i int) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(int(p.files[3+i].Fd()), &st); err != nil {
		t.Fatalf("fd %d of pid %d: %v", 3+i, p.id, err)
	}
	return st.Ino
}

// accept makes p wait on the sockets it inherited, and lets the loop's
// next poll see it.
func (m *machine) accept(p *fakeProc) {
	m.t.Helper()
	n := len(p.files) - 4 // stdin, stdout, stderr, the sockets, the channel
	m.sys.mu.Lock()
	for i := 0; i < n; i++ {
		var st unix.Stat_t
		unix.Fstat(int(p.files[3+i].Fd()), &st)
		p.waitsOn = append(p.waitsOn, st.Ino)
	}
	m.sys.mu.Unlock()
	m.advance(10 * time.Millisecond)
}

func (f *fakeSystem) parent(int) int { return 0 }

// fakeSteerer records what the supervisor asks of the steering.
type fakeSteerer struct {
	calls []string
}

func (f *fakeSteerer) add(slot, pid int, addr netip.AddrPort) error {
	f.calls = append(f.calls, fmt.Sprintf("add %d %d", slot, pid))
	return nil
}
func (f *fakeSteerer) addFD(slot int, _ *os.File) error {
	f.calls = append(f.calls, fmt.Sprintf("addfd %d", slot))
	return nil
}
func (f *fakeSteerer) remove(slot int) { f.calls = append(f.calls, fmt.Sprintf("remove %d", slot)) }
func (f *fakeSteerer) skip(slot int, skip bool) {
	f.calls = append(f.calls, fmt.Sprintf("skip %d %v", slot, skip))
}
func (f *fakeSteerer) counts() map[int]uint64 { return map[int]uint64{1: 4, 2: 4} }
func (f *fakeSteerer) close()                 {}

// steered gives m a fake round-robin steering.
func (m *machine) steered() *fakeSteerer {
	f := &fakeSteerer{}
	m.s.steer, m.s.steering = f, SteeringRoundRobin
	return f
}
