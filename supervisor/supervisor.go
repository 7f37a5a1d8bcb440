package supervisor

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/ipc"
	"github.com/shoal-sh/shoal/reuseport"
)

// Supervisor runs and watches a set of worker processes. Build one with New
// and call Run; the other methods may be called from any goroutine while Run
// runs.
type Supervisor struct {
	opts Options
	log  zerolog.Logger
	path string   // the resolved program
	argv []string // its argv, argv[0] included

	calls chan func()    // work for the loop goroutine
	msgs  chan workerMsg // reserved messages that need the loop
	done  chan struct{}  // closed when Run returns
	ran   atomic.Bool

	mu        sync.Mutex // guards preForks and handlers
	preForks  int
	handlers  map[int]func(Message) // per-slot message handlers
	requested atomic.Int64          // requests reported by all workers, ever

	// Owned by the loop goroutine.
	slots      map[int]*slot
	byPID      map[int]*worker
	forker     *forker
	devnull    *os.File
	limiter    restartLimiter
	stopping   bool
	abandonAt  time.Time // when Run stops waiting for SIGKILLed workers
	exitErr    error
	failed     *Death // an unclean death that will not be replaced
	restarts   uint64 // replacements started after a death
	giveUps    uint64
	reload     *reload // the rolling reload in progress, or nil
	advancing  bool    // advanceReload is on the stack
	reloads    uint64  // reloads finished
	reloadErrs uint64  // reloads aborted
}

// slot is one worker position, 1..N. It outlives the processes that fill it,
// so its counters stay continuous across restarts.
type slot struct {
	id        int
	w         *worker   // the current process, or nil
	next      *worker   // a reload's replacement, until it serves
	failures  int       // quick deaths in a row, for the backoff
	restartAt time.Time // when a delayed replacement is due; zero if none
	starts    int
	restarts  int // replacements started after a death
	reloads   int // replacements that took over from a live process: reloads and recycles
	finished  bool // dead and not to be replaced
	removed   bool // scaled away: delete on death
	requests  atomic.Uint64
	deaths    map[string]uint64 // by Death.Class
	ipcBase   ipc.Stats         // folded stats of channels closed for good
	retired   []*ipc.Channel    // channels of dead workers not folded yet
}

// worker is one process filling a slot.
type worker struct {
	slot    *slot
	proc    *os.Process
	pid     int
	state   State
	started time.Time
	ch      *ipc.Channel
	reason  string    // why the master is stopping it
	stopAt  time.Time // when it was sent SIGTERM
	killed  bool      // it was sent SIGKILL
	polled  time.Time // when the kernel was last asked whether it listens
	inodes  []uint64  // its LISTEN sockets on the port, as first seen

	// Set by its channel's reader goroutine.
	beat      atomic.Int64  // unix nanoseconds of its last heartbeat; 0 if none yet
	served    atomic.Uint64 // requests it reported
	limit     uint64        // requests after which it is recycled; 0 for no limit
	recycling atomic.Bool   // a recycle was asked for
	memAt     time.Time     // when its memory was last read
}

type workerMsg struct {
	w   *worker
	msg ipc.Message
	raw []byte
}

// New checks opts and returns a Supervisor ready to Run. It fails, before
// anything is started, when the command cannot be found or run.
func New(opts Options) (*Supervisor, error) {
	opts = opts.withDefaults()
	if opts.Workers < 0 {
		return nil, fmt.Errorf("supervisor: workers %d: want 1 or more (0 means one per available CPU)", opts.Workers)
	}
	if opts.Port < 0 || opts.Port > 65535 {
		return nil, fmt.Errorf("supervisor: port %d: want 1..65535, or 0 for none", opts.Port)
	}
	s := &Supervisor{
		opts:  opts,
		log:   zerolog.Nop(),
		calls: make(chan func()),
		msgs:  make(chan workerMsg, 64),
		done:  make(chan struct{}),
		slots: make(map[int]*slot),
		byPID: make(map[int]*worker),
	}
	if opts.Logger != nil {
		s.log = *opts.Logger
	}
	s.limiter = restartLimiter{max: opts.MaxRestarts, window: opts.RestartWindow}
	if len(opts.Command) == 0 {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("supervisor: find the running program to re-execute: %w", err)
		}
		s.path = exe
		s.argv = append([]string{os.Args[0]}, os.Args[1:]...)
	} else {
		path, err := lookPath(opts.Command[0])
		if err != nil {
			return nil, err
		}
		s.path = path
		s.argv = append([]string(nil), opts.Command...)
	}
	return s, nil
}

// lookPath resolves a command the way a shell would and says what to do
// when it cannot.
func lookPath(name string) (string, error) {
	path, err := exec.LookPath(name)
	if err != nil {
		if strings.Contains(name, "/") {
			return "", fmt.Errorf("supervisor: command %q: %w", name, unwrapExec(err))
		}
		return "", fmt.Errorf("supervisor: command %q not found in PATH (%s): install it or give its full path", name, os.Getenv("PATH"))
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", fmt.Errorf("supervisor: command %q: %w", name, err)
	}
	return abs, nil
}

func unwrapExec(err error) error {
	var e *exec.Error
	if errors.As(err, &e) {
		return e.Err
	}
	return err
}

// Fork adds one worker, as the Node.js cluster module's fork does, and
// returns its slot. Called before Run, it sets the initial workers instead
// of Options.Workers; while Run runs, it starts the new worker at once.
func (s *Supervisor) Fork() (*Worker, error) {
	if !s.ran.Load() {
		s.mu.Lock()
		defer s.mu.Unlock()
		s.preForks++
		return s.Worker(s.preForks), nil
	}
	var id int
	if !s.do(func() {
		if s.stopping {
			return
		}
		id = s.nextSlotID()
		s.start(s.addSlot(id))
	}) || id == 0 {
		return nil, errors.New("supervisor: fork: the supervisor is stopping")
	}
	return s.Worker(id), nil
}

// Worker is a handle on one slot, valid across the processes that fill it:
// the Node.js cluster module's worker object.
type Worker struct {
	s  *Supervisor
	id int
}

// Worker returns the handle of slot id. The slot need not exist yet.
func (s *Supervisor) Worker(id int) *Worker { return &Worker{s: s, id: id} }

// ID returns the slot, 1..N.
func (w *Worker) ID() int { return w.id }

// Send sends v to the process now in the slot: worker.send in Node.js.
func (w *Worker) Send(v any) error { return w.s.Send(w.id, v) }

// Handle sets the handler for application messages from this slot, in
// place of Options.OnMessage: worker.on('message') in Node.js. It runs on
// the worker's channel goroutine and must be safe to call concurrently with
// other slots' handlers. A nil h removes it.
func (w *Worker) Handle(h func(Message)) {
	w.s.mu.Lock()
	defer w.s.mu.Unlock()
	if w.s.handlers == nil {
		w.s.handlers = map[int]func(Message){}
	}
	if h == nil {
		delete(w.s.handlers, w.id)
		return
	}
	w.s.handlers[w.id] = h
}

// Scale sets the number of workers. New slots start at once; removed slots,
// the highest first, go through the graceful stop.
func (s *Supervisor) Scale(n int) error {
	if n < 1 || n > MaxWorkers {
		return fmt.Errorf("supervisor: scale to %d: want 1 to %d workers", n, MaxWorkers)
	}
	var err error
	if !s.do(func() { err = s.scale(n) }) {
		return errors.New("supervisor: scale: the supervisor is not running")
	}
	return err
}

// MaxWorkers bounds Scale, so a typo cannot fork-bomb the host.
const MaxWorkers = 1 << 16

// ScaleBy adds delta workers (or removes them, when delta is negative) and
// returns the new count; it never goes below 1. SIGTTIN and SIGTTOU do this
// with +1 and -1.
func (s *Supervisor) ScaleBy(delta int) (int, error) {
	var n int
	var err error
	if !s.do(func() {
		n = min(MaxWorkers, max(1, s.desired()+delta))
		err = s.scale(n)
	}) {
		return 0, errors.New("supervisor: scale: the supervisor is not running")
	}
	return n, err
}

// desired counts the slots that are wanted.
func (s *Supervisor) desired() int {
	n := 0
	for _, sl := range s.slots {
		if !sl.removed && !sl.finished {
			n++
		}
	}
	return n
}

// WorkerStatus is a snapshot of one slot.
type WorkerStatus struct {
	ID       int               // the slot
	PID      int               // 0 when no process fills the slot now
	State    State             // Dead when no process fills the slot now
	Started  time.Time         // start of the current process
	Uptime   time.Duration     // of the current process, on the monotonic clock
	Starts   int               // processes started in this slot
	Restarts int               // replacements after a death in this slot
	Reloads  int               // replacements by a reload or recycle that took over in this slot
	Requests uint64            // requests reported from this slot, across restarts
	Deaths   map[string]uint64 // deaths in this slot by Death.Class
	Backoff  time.Duration     // delay before the pending restart, if one is pending
	IPC      ipc.Stats         // the slot's message counters, across restarts
	Sockets  []uint64          // inodes of the LISTEN sockets on Port in which the master saw the current process listen
}

// Snapshot is the supervisor's state at one moment.
type Snapshot struct {
	Desired  int    // slots wanted
	Port     int    // the port workers listen on; 0 for none
	Restarts uint64 // replacements started after deaths
	GiveUps  uint64 // times MaxRestarts ended the supervisor
	Stopping bool   // a stop was requested or the supervisor gave up
	Reloads  uint64 // reloads that finished
	// ReloadFailures counts reloads aborted by a broken replacement.
	ReloadFailures uint64
	Reloading      bool           // a reload runs now
	Workers        []WorkerStatus // by slot
}

// Status returns a snapshot of every slot, ordered by slot. It returns nil
// when Run is not running.
func (s *Supervisor) Status() []WorkerStatus {
	snap, ok := s.Snapshot()
	if !ok {
		return nil
	}
	return snap.Workers
}

// Snapshot returns the supervisor's state; ok is false when Run is not
// running. It costs one hand-off to the supervisor's goroutine.
func (s *Supervisor) Snapshot() (snap Snapshot, ok bool) {
	snap, err := s.SnapshotContext(context.Background())
	return snap, err == nil
}

// SnapshotContext is Snapshot bounded by ctx: a health check uses it to
// tell a live supervisor from a stuck one. It fails when Run is not running
// or ctx ends first.
func (s *Supervisor) SnapshotContext(ctx context.Context) (Snapshot, error) {
	var snap Snapshot
	err := s.doContext(ctx, func() {
		now := time.Now()
		snap = Snapshot{Desired: s.desired(), Port: s.opts.Port, Restarts: s.restarts, GiveUps: s.giveUps, Stopping: s.stopping,
			Reloads: s.reloads, ReloadFailures: s.reloadErrs, Reloading: s.reload != nil}
		for _, id := range s.slotIDs() {
			sl := s.slots[id]
			st := WorkerStatus{ID: sl.id, State: Dead, Starts: sl.starts, Restarts: sl.restarts, Reloads: sl.reloads, Requests: sl.requests.Load(), Deaths: maps.Clone(sl.deaths)}
			addStats(&st.IPC, sl.ipcBase)
			for _, ch := range sl.retired {
				addStats(&st.IPC, ch.Stats())
			}
			if w := sl.w; w != nil {
				st.PID, st.State, st.Started, st.Uptime = w.pid, w.state, w.started, now.Sub(w.started)
				st.Sockets = slices.Clone(w.inodes)
				addStats(&st.IPC, w.ch.Stats())
			} else if !sl.restartAt.IsZero() {
				st.Backoff = sl.restartAt.Sub(now)
			}
			snap.Workers = append(snap.Workers, st)
		}
	})
	return snap, err
}

// Requests returns the number of requests all workers have reported, ever.
func (s *Supervisor) Requests() uint64 { return uint64(s.requested.Load()) }

// Send sends v, encoded as one JSON line, to the worker in slot id. It never
// blocks: when the worker's queue is full the message is dropped, counted,
// and an error says so.
func (s *Supervisor) Send(id int, v any) error {
	frame, err := ipc.Encode(v)
	if err != nil {
		return fmt.Errorf("supervisor: send to worker %d: %w", id, err)
	}
	var sendErr error
	if !s.do(func() { sendErr = s.sendFrame(id, frame) }) {
		return errors.New("supervisor: send: the supervisor is not running")
	}
	return sendErr
}

// Broadcast sends v to every running worker. It returns an error naming the
// workers whose queue was full.
func (s *Supervisor) Broadcast(v any) error {
	frame, err := ipc.Encode(v)
	if err != nil {
		return fmt.Errorf("supervisor: broadcast: %w", err)
	}
	var errs []error
	if !s.do(func() {
		for _, id := range s.slotIDs() {
			if s.slots[id].w == nil {
				continue
			}
			if err := s.sendFrame(id, frame); err != nil {
				errs = append(errs, err)
			}
		}
	}) {
		return errors.New("supervisor: broadcast: the supervisor is not running")
	}
	return errors.Join(errs...)
}

// do runs f on the loop goroutine and waits for it. It reports false when
// Run is not running.
func (s *Supervisor) do(f func()) bool {
	return s.doContext(context.Background(), f) == nil
}

// errNotRunning is returned by doContext when Run is not running.
var errNotRunning = errors.New("supervisor: not running")

// doContext runs f on the loop goroutine and waits for it or for ctx. Once
// f was handed over it always runs, even if ctx ends first.
func (s *Supervisor) doContext(ctx context.Context, f func()) error {
	if !s.ran.Load() {
		return errNotRunning
	}
	ran := make(chan struct{})
	select {
	case s.calls <- func() { f(); close(ran) }:
	case <-s.done:
		return errNotRunning
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-ran:
		return nil
	case <-s.done:
		return errNotRunning
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Run starts the workers and supervises them until ctx is cancelled, then
// stops them gracefully: SIGTERM, StopTimeout, SIGKILL. It returns nil after
// a requested stop, an error wrapping ErrTooManyRestarts after giving up,
// and, with RestartNever or RestartOnFailure, an error when the last worker
// has died unless all exited with status 0. Run may be called once.
func (s *Supervisor) Run(ctx context.Context) error {
	if !s.ran.CompareAndSwap(false, true) {
		return errors.New("supervisor: Run called twice")
	}
	defer close(s.done)

	// Register for SIGCHLD before anything is forked, so no exit is missed.
	sigchld := make(chan os.Signal, 1)
	signal.Notify(sigchld, syscall.SIGCHLD)
	defer signal.Stop(sigchld)

	if s.opts.Subreaper || os.Getpid() == 1 {
		s.opts.Subreaper = true
		if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("supervisor: become child subreaper: %w", err)
		}
	}
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return fmt.Errorf("supervisor: open %s for the workers' stdin: %w", os.DevNull, err)
	}
	s.devnull = devnull
	defer devnull.Close()
	s.forker = startForker()
	defer s.forker.stop()

	n := s.opts.Workers
	s.mu.Lock()
	if s.preForks > 0 {
		n = s.preForks
	}
	s.mu.Unlock()
	if n == 0 {
		n = AvailableCPUs()
	}
	s.log.Info().Int("workers", n).Str("command", strings.Join(s.argv, " ")).Int("port", s.opts.Port).
		Str("restart", s.opts.Restart.String()).Msg("starting workers")
	s.checkPortFree()
	for id := 1; id <= n; id++ {
		s.start(s.addSlot(id))
	}

	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	ctxDone := ctx.Done()
	for {
		if s.finished() {
			return s.exitErr
		}
		timer.Reset(s.nextWake(time.Now()))
		select {
		case <-ctxDone:
			ctxDone = nil
			s.log.Info().Msg("stopping all workers")
			s.beginStop(ReasonStop)
		case <-sigchld:
			s.reap()
		case <-timer.C:
			s.tick(time.Now())
		case f := <-s.calls:
			f()
		case m := <-s.msgs:
			s.handleMsg(m)
		}
	}
}

// checkPortFree warns when the port has listeners before any worker: a
// socket bound without SO_REUSEPORT, or by another user, makes every
// worker's bind fail; one that joined the group takes a share of the
// connections.
func (s *Supervisor) checkPortFree() {
	if s.opts.Port == 0 {
		return
	}
	socks, err := reuseport.Listeners(s.opts.Port)
	if err != nil || len(socks) == 0 {
		return
	}
	uids := make([]uint32, 0, len(socks))
	for _, sk := range socks {
		uids = append(uids, sk.UID)
	}
	s.log.Warn().Int("port", s.opts.Port).Int("sockets", len(socks)).Interface("uids", uids).
		Msgf("port %d already has %d listening socket(s) before any worker started: if it was bound without SO_REUSEPORT or by another user, the workers cannot bind it; find the owner with 'ss -ltnp sport = :%d'", s.opts.Port, len(socks), s.opts.Port)
}

// finished reports whether Run should return now.
func (s *Supervisor) finished() bool {
	if len(s.byPID) > 0 {
		return false
	}
	for _, sl := range s.slots {
		if !s.stopping && !sl.finished {
			return false
		}
	}
	if !s.stopping && s.exitErr == nil && s.failed != nil {
		s.exitErr = fmt.Errorf("supervisor: every worker has exited and none is to be restarted (restart policy %s); worker %d ended with %s",
			s.opts.Restart, s.failed.Worker, s.failed.Status())
	}
	return true
}

func (s *Supervisor) addSlot(id int) *slot {
	sl := &slot{id: id, deaths: map[string]uint64{}}
	s.slots[id] = sl
	return sl
}

func (s *Supervisor) nextSlotID() int {
	id := 1
	for s.slots[id] != nil {
		id++
	}
	return id
}

func (s *Supervisor) slotIDs() []int {
	ids := make([]int, 0, len(s.slots))
	for id := range s.slots {
		ids = append(ids, id)
	}
	sort.Ints(ids)
	return ids
}

func (s *Supervisor) emit(e Event) {
	if s.opts.OnEvent != nil {
		e.Time = time.Now()
		s.opts.OnEvent(e)
	}
}

// start forks a process into sl. A process that cannot be started counts
// as a death, so the backoff applies.
func (s *Supervisor) start(sl *slot) {
	sl.restartAt = time.Time{}
	w, err := s.spawn(sl)
	if err != nil {
		s.startFailed(sl, err)
		return
	}
	sl.w = w
	s.online(w)
}

// spawn forks a process for sl without putting it in the slot: start puts
// it there, a reload keeps it aside until it serves.
func (s *Supervisor) spawn(sl *slot) (*worker, error) {
	sl.starts++
	master, peer, err := ipc.Pair()
	if err != nil {
		return nil, fmt.Errorf("create the message channel: %w", err)
	}
	attr := &os.ProcAttr{
		Dir:   s.opts.Dir,
		Env:   s.env(sl.id),
		Files: []*os.File{s.devnull, s.opts.Stdout, s.opts.Stderr, peer},
		Sys: &syscall.SysProcAttr{
			Setpgid:     true,            // Ctrl-C at a terminal reaches the master only
			Pdeathsig:   syscall.SIGKILL, // the master's death ends the worker (Go sets it after the change of user)
			Credential:  s.opts.Credential,
			AmbientCaps: s.opts.AmbientCaps,
		},
	}
	w := &worker{slot: sl, state: Starting}
	if s.opts.MaxRequests > 0 {
		w.limit = s.opts.MaxRequests
		if j := s.opts.MaxRequestsJitter; j > 0 {
			w.limit += rand.Uint64N(j + 1)
		}
	}
	proc, err := s.forker.start(s.path, s.argv, attr)
	peer.Close()
	if err != nil {
		master.Close()
		return nil, err
	}
	w.proc, w.pid, w.started = proc, proc.Pid, time.Now()
	s.byPID[w.pid] = w
	w.ch = ipc.NewChannel(master, ipc.ChannelOptions{
		MaxMessage: s.opts.MaxMessage,
		QueueLen:   s.opts.QueueLen,
		OnMessage:  func(m ipc.Message) { s.onMessage(w, m) },
		OnError: func(err error) {
			s.log.Warn().Int("worker", sl.id).Int("pid", w.pid).Err(err).Msg("bad message from worker skipped")
		},
	})
	go func(ch *ipc.Channel) {
		<-ch.Done()
		select {
		case s.msgs <- workerMsg{w: w, msg: ipc.Message{Cmd: "disconnect"}}:
		case <-s.done:
		}
	}(w.ch)
	s.log.Info().Int("worker", sl.id).Int("pid", w.pid).Msg("worker started")
	s.emit(Event{Type: EventFork, Worker: sl.id, PID: w.pid})
	return w, nil
}

// online marks a started process as running.
func (s *Supervisor) online(w *worker) {
	w.state = Online
	s.emit(Event{Type: EventOnline, Worker: w.slot.id, PID: w.pid})
	if s.opts.Ready == ReadyListen && s.opts.Port == 0 {
		s.setListening(w)
	}
}

// startFailed treats a failed fork like a death, so backoff applies.
func (s *Supervisor) startFailed(sl *slot, err error) {
	d := &Death{Worker: sl.id, ExitCode: -1, Err: err}
	s.log.Error().Int("worker", sl.id).Err(err).Str("command", s.path).Msg("worker could not be started")
	s.emit(Event{Type: EventDeath, Worker: sl.id, Death: d})
	s.afterDeath(sl, d)
}

// basicEnv names the variables workers get from the master without
// InheritEnv: what programs need to run, nothing that is likely a secret.
var basicEnv = []string{"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM"}

// env builds a worker's environment: the basics of the master's (or all
// of it with InheritEnv, less its SHOAL_ and NODE_CHANNEL_ variables), then
// Options.Env, then the worker contract. A later entry replaces an earlier
// one with the same name.
func (s *Supervisor) env(id int) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch {
		case strings.HasPrefix(k, "SHOAL_"), strings.HasPrefix(k, "NODE_CHANNEL_"), k == "NODE_UNIQUE_ID":
		case s.opts.InheritEnv, slices.Contains(basicEnv, k), strings.HasPrefix(k, "LC_"):
			env = append(env, kv)
		}
	}
	for _, kv := range s.opts.Env {
		if !strings.Contains(kv, "=") {
			// A bare name passes the master's value.
			if v, ok := os.LookupEnv(kv); ok {
				env = append(env, kv+"="+v)
			}
			continue
		}
		env = append(env, kv)
	}
	env = append(env,
		EnvWorkerID+"="+strconv.Itoa(id),
		EnvMasterPID+"="+strconv.Itoa(os.Getpid()),
		ipc.EnvFD+"=3",
		"NODE_CHANNEL_FD=3",
		"NODE_CHANNEL_SERIALIZATION_MODE=json",
	)
	if s.opts.Port != 0 {
		env = append(env, EnvPort+"="+strconv.Itoa(s.opts.Port))
	}
	return dedupEnv(env)
}

// dedupEnv keeps only the last entry of each name.
func dedupEnv(env []string) []string {
	last := make(map[string]int, len(env))
	for i, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		last[k] = i
	}
	out := env[:0:0]
	for i, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		if last[k] == i {
			out = append(out, kv)
		}
	}
	return out
}

// onMessage runs on the worker's channel goroutine. Request reports are
// counted right here, so the hot path costs an atomic add and no hand-off.
func (s *Supervisor) onMessage(w *worker, m ipc.Message) {
	switch m.Cmd {
	case ipc.CmdNotifyRequest:
		w.slot.requests.Add(1)
		s.requested.Add(1)
		s.served(w, 1)
	case ipc.CmdRequests:
		w.slot.requests.Add(uint64(m.N))
		s.requested.Add(m.N)
		s.served(w, uint64(m.N))
	case ipc.CmdHeartbeat:
		if w.beat.Swap(time.Now().UnixNano()) == 0 && s.opts.HeartbeatTimeout > 0 {
			// The first one: the loop starts watching w.
			select {
			case s.msgs <- workerMsg{w: w, msg: m}:
			case <-s.done:
			}
		}
	case ipc.CmdReady, ipc.CmdSend:
		raw := append([]byte(nil), m.Raw...)
		m.Msg = append([]byte(nil), m.Msg...)
		select {
		case s.msgs <- workerMsg{w: w, msg: m, raw: raw}:
		case <-s.done:
		}
	default:
		s.log.Debug().Int("worker", w.slot.id).Int("pid", w.pid).RawJSON("message", m.Raw).Msg("message from worker")
		s.mu.Lock()
		h := s.handlers[w.slot.id]
		s.mu.Unlock()
		if h == nil {
			h = s.opts.OnMessage
		}
		if h != nil {
			h(Message{Worker: w.slot.id, PID: w.pid, Cmd: m.Cmd, Raw: append([]byte(nil), m.Raw...)})
		}
	}
}

// served counts requests of w's process and asks for its recycle once it
// reaches its limit. It runs on the channel's goroutine.
func (s *Supervisor) served(w *worker, n uint64) {
	if w.limit == 0 || w.served.Add(n) < w.limit || !w.recycling.CompareAndSwap(false, true) {
		return
	}
	select {
	case s.msgs <- workerMsg{w: w, msg: ipc.Message{Cmd: "recycle"}}:
	case <-s.done:
	}
}

// handleMsg runs on the loop goroutine for messages that change state.
func (s *Supervisor) handleMsg(m workerMsg) {
	w := m.w
	switch m.msg.Cmd {
	case "disconnect":
		s.log.Debug().Int("worker", w.slot.id).Int("pid", w.pid).Msg("worker channel closed")
		s.emit(Event{Type: EventDisconnect, Worker: w.slot.id, PID: w.pid})
	case ipc.CmdReady:
		if s.opts.Ready == ReadyMessage && w.state == Online {
			s.setListening(w)
		}
	case ipc.CmdSend:
		s.relay(w, m.msg)
	case "recycle":
		s.log.Info().Int("worker", w.slot.id).Int("pid", w.pid).Uint64("requests", w.served.Load()).Uint64("max_requests", w.limit).Msg("worker reached its request limit")
		s.recycle(w, ReasonMaxRequests)
	}
}

// relay delivers a shoal:send message to the workers it names.
func (s *Supervisor) relay(from *worker, m ipc.Message) {
	frame := append(append([]byte(nil), m.Msg...), '\n')
	if len(m.Msg) == 0 {
		s.log.Warn().Int("worker", from.slot.id).Msg(`shoal:send without "msg" ignored`)
		return
	}
	if m.To == "all" {
		for _, id := range s.slotIDs() {
			if id != from.slot.id && s.slots[id].w != nil {
				s.sendFrame(id, frame)
			}
		}
		return
	}
	id, err := strconv.Atoi(m.To)
	if err != nil || s.slots[id] == nil {
		s.log.Warn().Int("worker", from.slot.id).Str("to", m.To).Msg(`shoal:send to no such worker ignored: "to" must be a slot number or "all"`)
		return
	}
	s.sendFrame(id, frame)
}

func (s *Supervisor) sendFrame(id int, frame []byte) error {
	sl := s.slots[id]
	if sl == nil || sl.w == nil || sl.w.ch == nil {
		return fmt.Errorf("supervisor: send to worker %d: no such running worker", id)
	}
	if !sl.w.ch.Send(frame) {
		s.log.Warn().Int("worker", id).Int("pid", sl.w.pid).Msg("message to worker dropped: its queue is full (is it reading fd 3?)")
		return fmt.Errorf("supervisor: send to worker %d: its queue is full, message dropped", id)
	}
	return nil
}

func (s *Supervisor) setListening(w *worker) {
	w.state = Listening
	s.log.Info().Int("worker", w.slot.id).Int("pid", w.pid).Dur("after", time.Since(w.started)).Msg("worker listening")
	s.emit(Event{Type: EventListening, Worker: w.slot.id, PID: w.pid})
	if r := s.reload; r != nil && r.active[w.slot.id] == w {
		s.replacementServes(w)
	}
}

// reap collects every exited child without blocking. As a subreaper it
// collects orphans too; otherwise only its own workers.
func (s *Supervisor) reap() {
	if s.opts.Subreaper {
		for {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			if err == unix.EINTR {
				continue
			}
			if err != nil || pid <= 0 {
				return
			}
			if w := s.byPID[pid]; w != nil {
				s.exited(w, ws)
			} else {
				s.log.Debug().Int("pid", pid).Msg("reaped an orphan")
			}
		}
	}
	for pid, w := range s.byPID {
		var ws unix.WaitStatus
		got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		for err == unix.EINTR {
			got, err = unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		}
		if got == pid {
			s.exited(w, ws)
		}
	}
}

// exited records the death of w and applies the restart policy.
func (s *Supervisor) exited(w *worker, ws unix.WaitStatus) {
	sl := w.slot
	delete(s.byPID, w.pid)
	w.state = Dead
	w.proc.Release()
	sl.retired = append(sl.retired, w.ch)
	go func(ch *ipc.Channel) {
		// What the worker wrote before it died is still in the socket:
		// let the reader take it all, up to EOF, so no report is lost.
		// A child that inherited fd 3 may hold the channel open: wait
		// for EOF only so long. Close waits for the reader, which may be
		// handing the loop a message, so none of this runs on the loop.
		drain := time.NewTimer(2 * time.Second)
		select {
		case <-ch.Done():
		case <-drain.C:
		case <-s.done:
		}
		drain.Stop()
		ch.Close()
		select {
		case s.calls <- func() { s.fold(sl, ch) }:
		case <-s.done:
		}
	}(w.ch)
	d := &Death{Worker: sl.id, PID: w.pid, ExitCode: ws.ExitStatus(), Uptime: time.Since(w.started), Reason: w.reason}
	if ws.Signaled() {
		d.ExitCode, d.Signal = -1, ws.Signal()
	}
	ev := s.log.Info()
	if w.reason == "" && !d.Clean() {
		ev = s.log.Warn()
	}
	ev = ev.Int("worker", sl.id).Int("pid", w.pid).Dur("uptime", d.Uptime)
	if d.Signal != 0 {
		ev = ev.Str("signal", unix.SignalName(d.Signal))
	} else {
		ev = ev.Int("exit_code", d.ExitCode)
	}
	if w.reason != "" {
		ev = ev.Str("reason", w.reason)
	}
	ev.Msg("worker died")
	s.emit(Event{Type: EventDeath, Worker: sl.id, PID: w.pid, Death: d})
	replacement := s.reload != nil && s.reload.active[sl.id] == w
	switch w {
	case sl.next:
		sl.next = nil
		sl.deaths[d.Class()]++
	case sl.w:
		sl.w = nil
		if sl.next != nil {
			// The old process died during a reload: its replacement
			// takes the slot now instead of a restart.
			sl.deaths[d.Class()]++
			sl.w, sl.next = sl.next, nil
			break
		}
		s.afterDeath(sl, d)
	default:
		// A process the slot no longer counts on, replaced by a reload.
		sl.deaths[d.Class()]++
	}
	if replacement {
		s.abortReload(fmt.Errorf("%w: worker %d's replacement (pid %d) ended with %s before it served",
			ErrReloadAborted, sl.id, w.pid, d.Status()))
	}
}

// fold adds a closed channel's final counters to its slot's.
func (s *Supervisor) fold(sl *slot, ch *ipc.Channel) {
	for i, c := range sl.retired {
		if c == ch {
			sl.retired = append(sl.retired[:i], sl.retired[i+1:]...)
			addStats(&sl.ipcBase, ch.Stats())
			return
		}
	}
}

func addStats(dst *ipc.Stats, src ipc.Stats) {
	dst.MessagesIn += src.MessagesIn
	dst.BytesIn += src.BytesIn
	dst.MessagesOut += src.MessagesOut
	dst.BytesOut += src.BytesOut
	dst.Dropped += src.Dropped
	if dst.Errors == nil {
		dst.Errors = map[string]uint64{}
	}
	for k, v := range src.Errors {
		dst.Errors[k] += v
	}
}

// afterDeath decides what follows a death in sl.
func (s *Supervisor) afterDeath(sl *slot, d *Death) {
	sl.deaths[d.Class()]++
	if s.stopping || d.Reason == ReasonStop {
		return
	}
	if sl.removed {
		delete(s.slots, sl.id)
		return
	}
	if d.Uptime >= s.opts.Backoff.StableAfter {
		sl.failures = 0
	}
	restart := false
	switch s.opts.Restart {
	case RestartAlways:
		restart = true
	case RestartOnFailure:
		restart = !d.Clean()
	}
	if !restart {
		sl.finished = true
		if !d.Clean() {
			s.failed = d
		}
		return
	}
	sl.failures++
	if !s.limiter.allow(time.Now()) {
		s.exitErr = fmt.Errorf("%w: %d restarts within %s (--max-restarts %d --restart-window %s); the last, worker %d, ended with %s: fix the command, then start shoal again",
			ErrTooManyRestarts, s.opts.MaxRestarts, s.opts.RestartWindow, s.opts.MaxRestarts, s.opts.RestartWindow, sl.id, d.Status())
		s.giveUps++
		s.log.Error().Err(s.exitErr).Msg("giving up")
		s.beginStop(ReasonStop)
		return
	}
	s.restarts++
	sl.restarts++
	delay := s.opts.Backoff.Delay(sl.failures - 1)
	if delay == 0 {
		s.start(sl)
		return
	}
	sl.restartAt = time.Now().Add(delay)
	s.log.Info().Int("worker", sl.id).Dur("delay", delay).Int("quick_deaths", sl.failures).Msg("restarting worker after backoff")
}

// scale sets the number of slots.
func (s *Supervisor) scale(n int) error {
	if s.stopping {
		return errors.New("supervisor: scale: the supervisor is stopping")
	}
	var live []int
	for _, id := range s.slotIDs() {
		if sl := s.slots[id]; !sl.removed && !sl.finished {
			live = append(live, id)
		}
	}
	for len(live) < n {
		id := s.nextSlotID()
		s.start(s.addSlot(id))
		live = append(live, id)
	}
	for len(live) > n {
		id := live[len(live)-1]
		live = live[:len(live)-1]
		sl := s.slots[id]
		sl.removed = true
		if sl.next != nil {
			s.terminate(sl.next, ReasonScale, time.Now())
		}
		if sl.w == nil {
			delete(s.slots, id)
			continue
		}
		s.terminate(sl.w, ReasonScale, time.Now())
	}
	s.log.Info().Int("workers", n).Msg("scaled")
	return nil
}

// beginStop asks every worker to stop.
func (s *Supervisor) beginStop(reason string) {
	if s.stopping {
		return
	}
	s.stopping = true
	now := time.Now()
	s.abandonAt = now.Add(s.opts.StopTimeout + 5*time.Second)
	for _, sl := range s.slots {
		sl.restartAt = time.Time{}
	}
	for _, w := range s.byPID {
		s.terminate(w, reason, now)
	}
	s.endReload(errors.New("supervisor: reload: stopped before it finished"))
}

// stopDeadline is when w gets SIGKILL if it has not exited.
func (s *Supervisor) stopDeadline(w *worker) time.Time {
	return w.stopAt.Add(s.opts.StopTimeout)
}

// terminate sends SIGTERM to w's process group. The bare pid is safe here:
// only this goroutine reaps, and w is not reaped yet, so the pid and its
// group cannot have been reused.
func (s *Supervisor) terminate(w *worker, reason string, now time.Time) {
	if w.state == Stopping {
		return
	}
	w.state, w.reason, w.stopAt = Stopping, reason, now
	s.signal(w, syscall.SIGTERM)
}

func (s *Supervisor) signal(w *worker, sig syscall.Signal) {
	if err := unix.Kill(-w.pid, sig); err != nil {
		// The worker left its process group: signal the process alone.
		if err := w.proc.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
			s.log.Warn().Int("worker", w.slot.id).Int("pid", w.pid).Err(err).Msgf("send %s", unix.SignalName(sig))
		}
	}
}

// tick does what is due at now: delayed restarts, SIGKILL for workers past
// their stop timeout, and the check for workers that started listening.
func (s *Supervisor) tick(now time.Time) {
	for _, id := range s.slotIDs() {
		sl := s.slots[id]
		if sl.w == nil && !sl.restartAt.IsZero() && !now.Before(sl.restartAt) && !s.stopping {
			s.start(sl)
		}
	}
	for _, w := range s.byPID {
		if w.state == Stopping && !w.killed && !now.Before(s.stopDeadline(w)) {
			w.killed = true
			s.log.Warn().Int("worker", w.slot.id).Int("pid", w.pid).Dur("stop_timeout", s.opts.StopTimeout).Msg("worker did not exit after SIGTERM: sending SIGKILL")
			s.signal(w, syscall.SIGKILL)
		}
	}
	if s.stopping && !s.abandonAt.IsZero() && !now.Before(s.abandonAt) {
		for pid, w := range s.byPID {
			s.log.Error().Int("worker", w.slot.id).Int("pid", pid).Msg("worker survived SIGKILL (stuck in the kernel?): giving up on it")
			w.proc.Release()
			if w.slot.w == w {
				w.slot.w = nil
			}
			if w.slot.next == w {
				w.slot.next = nil
			}
			delete(s.byPID, pid)
		}
	}
	s.pollListening(now)
	s.checkReload(now)
	s.checkHealth(now)
}

// checkHealth kills workers whose heartbeats stopped and recycles those
// over the memory limit.
func (s *Supervisor) checkHealth(now time.Time) {
	if s.stopping {
		return
	}
	for _, w := range s.byPID {
		if w.state != Online && w.state != Listening {
			continue
		}
		if at := w.beatDeadline(s.opts.HeartbeatTimeout); !at.IsZero() && !now.Before(at) {
			s.log.Warn().Int("worker", w.slot.id).Int("pid", w.pid).Dur("heartbeat_timeout", s.opts.HeartbeatTimeout).
				Msg("worker hung: no heartbeat within the timeout; stopping it")
			s.terminate(w, ReasonHung, now)
			continue
		}
		if s.opts.MaxMemory > 0 && w.state == Listening && !now.Before(w.memAt.Add(time.Second)) {
			w.memAt = now
			if rss, err := residentBytes(w.pid); err == nil && rss > s.opts.MaxMemory && !w.recycling.Swap(true) {
				s.log.Info().Int("worker", w.slot.id).Int("pid", w.pid).Uint64("rss", rss).Uint64("max_memory", s.opts.MaxMemory).Msg("worker over its memory limit")
				s.recycle(w, ReasonMaxMemory)
			}
		}
	}
}

// beatDeadline is when w counts as hung, or zero when it is not watched.
func (w *worker) beatDeadline(timeout time.Duration) time.Time {
	b := w.beat.Load()
	if timeout <= 0 || b == 0 {
		return time.Time{}
	}
	return time.Unix(0, b).Add(timeout)
}

// residentBytes reads a process's resident set size from /proc.
func residentBytes(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/statm")
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0, fmt.Errorf("supervisor: /proc/%d/statm: %q", pid, b)
	}
	pages, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return 0, err
	}
	return pages * uint64(os.Getpagesize()), nil
}

// nextWake returns how long the loop may sleep.
func (s *Supervisor) nextWake(now time.Time) time.Duration {
	next := now.Add(time.Hour)
	earlier := func(t time.Time) {
		if !t.IsZero() && t.Before(next) {
			next = t
		}
	}
	for _, sl := range s.slots {
		if sl.w == nil && !s.stopping {
			earlier(sl.restartAt)
		}
	}
	if s.reload != nil {
		earlier(s.reload.nextDeadline())
	}
	for _, w := range s.byPID {
		if w.state == Online || w.state == Listening {
			earlier(w.beatDeadline(s.opts.HeartbeatTimeout))
			if s.opts.MaxMemory > 0 && w.state == Listening {
				earlier(w.memAt.Add(time.Second))
			}
		}
		switch w.state {
		case Stopping:
			if !w.killed {
				earlier(s.stopDeadline(w))
			}
		case Online:
			if s.opts.Ready == ReadyListen && s.opts.Port != 0 {
				earlier(w.nextPoll(now))
			}
		}
	}
	if s.stopping {
		earlier(s.abandonAt)
	}
	d := next.Sub(now)
	if d < time.Millisecond {
		d = time.Millisecond
	}
	return d
}

// nextPoll is when to look again whether w listens: often while it is
// young, so restarts are seen within milliseconds, then less often.
func (w *worker) nextPoll(now time.Time) time.Time {
	if now.Sub(w.started) < 2*time.Second {
		return w.polled.Add(10 * time.Millisecond)
	}
	return w.polled.Add(100 * time.Millisecond)
}

// pollListening asks the kernel which of the online workers listen.
func (s *Supervisor) pollListening(now time.Time) {
	if s.opts.Ready != ReadyListen || s.opts.Port == 0 {
		return
	}
	var due []*worker
	for _, w := range s.byPID {
		if w.state == Online && !now.Before(w.nextPoll(now)) {
			due = append(due, w)
		}
	}
	if len(due) == 0 {
		return
	}
	socks, err := reuseport.Listeners(s.opts.Port)
	if err != nil {
		s.log.Warn().Err(err).Int("port", s.opts.Port).Msg("cannot read the kernel's listening sockets")
	}
	inodes := make(map[uint64]bool, len(socks))
	for _, sk := range socks {
		inodes[sk.Inode] = true
	}
	for _, w := range due {
		w.polled = now
		if len(inodes) == 0 {
			continue
		}
		held, err := reuseport.Inodes(w.pid)
		if err != nil {
			continue
		}
		for ino := range held {
			if inodes[ino] {
				w.inodes = append(w.inodes, ino)
			}
		}
		if len(w.inodes) > 0 {
			slices.Sort(w.inodes)
			s.setListening(w)
		}
	}
}
