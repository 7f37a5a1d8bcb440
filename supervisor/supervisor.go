package supervisor

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/internal/ratelog"
	"github.com/shoal-sh/shoal/internal/sdnotify"
	"github.com/shoal-sh/shoal/ipc"
)

// Supervisor runs and watches a set of worker processes. Build one with New
// and call Run; the other methods may be called from any goroutine while Run
// runs.
type Supervisor struct {
	opts Options
	log  zerolog.Logger
	path string   // the resolved program
	argv []string // its argv, argv[0] included

	calls  chan func()    // work for the loop goroutine
	events chan loopEvent // from the channel readers, for the loop
	done   chan struct{}  // closed when Run returns
	loop   chan struct{}  // closed when Run's loop starts
	ran    atomic.Bool

	retiring sync.WaitGroup // goroutines closing dead workers' channels and copying their output

	mu        sync.Mutex // guards preForks and handlers
	preForks  int
	handlers  map[int]func(Message) // per-slot message handlers
	requested atomic.Uint64         // requests reported by all workers, ever

	notify     *sdnotify.Listener        // ReadyNotify: where workers send READY=1
	steer      steerer                   // round-robin steering; nil without
	steering   SteeringMode              // in force: SteeringHash or SteeringRoundRobin
	stallCheck time.Time                 // when checkStalls looks next
	budget     *ipc.Budget               // bytes queued to all workers together
	warns      *ratelog.Limiter[warnKey] // warnings caused by workers, per worker and reason

	// Owned by the loop goroutine.
	slots      map[int]*slot
	byPID      map[int]*worker
	orphans    map[int]*orphan // processes left behind by workers, being stopped
	sys        system
	devnull    *os.File
	limiter    restartLimiter
	stopping   bool
	abandonAt  time.Time // when Run stops waiting for SIGKILLed workers
	exitErr    error
	failed     *Death // an unclean death that will not be replaced
	restarts   uint64 // replacements started after a death
	giveUps    uint64
	reload     *reload                      // the rolling reload in progress, or nil
	advancing  bool                         // advanceReload is on the stack
	reloads    uint64                       // reloads finished
	reloadErrs uint64                       // reloads aborted
	upgrading  bool                         // an in-place upgrade runs
	upgrades   uint64                       // in-place upgrades of this master, this program's included
	replaced   bool                         // an upgrade\'s exec returned without an error: only a fake system does that
	helpers    map[int]chan unix.WaitStatus // short-lived programs (an upgrade's check), by pid
	notifyDone chan struct{}                // closed when the notify reader ends
	stopAsked  func() bool                  // reports whether Run's context ended
}

// slot is one worker position, 1..N. It outlives the processes that fill it,
// so its counters stay continuous across restarts.
type slot struct {
	id           int
	w            *worker   // the current process, or nil
	next         *worker   // a reload's replacement, until it serves
	failures     int       // quick deaths in a row, for the backoff
	restartAt    time.Time // when a delayed replacement is due; zero if none
	starts       int
	notifyErrors uint64     // bad systemd notifications from the slot's workers
	skipped      bool       // out of the steering selection: its worker stalls
	lastDeath    string     // the Death.Class of the slot's latest death
	lastQueue    uint32     // its accept queue at the last stall check
	stuck        int        // stall checks in a row with a queue that did not shrink
	socks        []*os.File // BindMaster: the slot's sockets, one per listener; nil when closed
	sockInodes   []uint64   // their inodes
	restarts     int        // replacements started after a death
	reloads      int        // replacements that took over from a live process: reloads and recycles
	finished     bool       // dead and not to be replaced
	removed      bool       // scaled away: delete on death
	requests     atomic.Uint64
	deaths       map[string]uint64 // by Death.Class
	ipcBase      ipc.Stats         // folded stats of channels closed for good
	retired      []*ipc.Channel    // channels of dead workers not folded yet
}

// worker is one process filling a slot.
type worker struct {
	slot      *slot
	proc      process
	pid       int
	state     State
	started   time.Time
	ch        *ipc.Channel
	out       OutputPipe       // its output, when it goes through the master (Options.Output)
	reason    string           // why the master is stopping it
	stopAt    time.Time        // when it was sent SIGTERM
	killed    bool             // it was sent SIGKILL
	polled    time.Time        // when the kernel was last asked whether it listens
	inodes    []uint64         // its sockets on the listeners, as first seen
	waiting   string           // why it does not serve, once diagnosed
	tcpAddrs  []netip.AddrPort // the local addresses of its TCP listening sockets, for steering
	signalled bool             // the stop signal was sent (it may wait for the steering drain delay)

	// Set by its channel's reader goroutine.
	beat      atomic.Int64  // unix nanoseconds of its last heartbeat; 0 if none yet
	served    atomic.Uint64 // requests it reported
	limit     uint64        // requests after which it is recycled; 0 for no limit
	recycling atomic.Bool   // a recycle was asked for
	memAt     time.Time     // when its memory was last read
}

// New checks opts and returns a Supervisor ready to Run. It fails, before
// anything is started, when the command cannot be found or run.
func New(opts Options) (*Supervisor, error) {
	opts = opts.withDefaults()
	if opts.Workers < 0 {
		return nil, fmt.Errorf("supervisor: workers %d: want 1 or more (0 means one per available CPU)", opts.Workers)
	}
	if lim := HostMaxWorkers(); opts.Workers > lim.N {
		return nil, fmt.Errorf("supervisor: workers %d: this host allows at most %d workers, from %s: ask for fewer, or raise that limit", opts.Workers, lim.N, lim.Reason)
	}
	if opts.Port < 0 || opts.Port > 65535 {
		return nil, fmt.Errorf("supervisor: port %d: want 1..65535, or 0 for none", opts.Port)
	}
	for i, l := range opts.Listeners {
		if _, err := parseListener(l.String()); err != nil {
			return nil, fmt.Errorf("supervisor: %w", err)
		}
		if slices.Contains(opts.Listeners[:i], l) {
			return nil, fmt.Errorf("supervisor: listener %s given twice", l)
		}
	}
	s := &Supervisor{
		opts:    opts,
		log:     zerolog.Nop(),
		calls:   make(chan func()),
		events:  make(chan loopEvent, 64),
		done:    make(chan struct{}),
		loop:    make(chan struct{}),
		slots:   make(map[int]*slot),
		byPID:   make(map[int]*worker),
		orphans: make(map[int]*orphan),
		helpers: make(map[int]chan unix.WaitStatus),
		budget:  ipc.NewBudget(0),
		warns:   ratelog.New[warnKey](0),
		sys:     &realSystem{},
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

// Running returns a channel that is closed once Run has started (or
// adopted) the workers and its loop answers: Snapshot and the other calls
// are served from then on.
func (s *Supervisor) Running() <-chan struct{} { return s.loop }

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
	defer func() {
		close(s.done)
		// The goroutines that close dead workers' channels end once done
		// is closed: wait, so nothing of the supervisor outlives Run.
		s.retiring.Wait()
	}()

	if os.Getpid() == 1 {
		s.opts.Subreaper = true
	}
	if err := s.sys.setup(s.opts.Subreaper); err != nil {
		return err
	}
	defer s.sys.close()
	in := s.opts.Inherited
	if in != nil {
		if err := s.adoptSteering(in.st); err != nil {
			return err
		}
	} else if err := s.setupSteering(); err != nil {
		return err
	}
	if s.steer != nil {
		defer s.steer.close()
	}
	if err := s.listenNotify(in); err != nil {
		return err
	}
	if s.notify != nil {
		defer s.notify.Close()
	}
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return fmt.Errorf("supervisor: open %s for the workers' stdin: %w", os.DevNull, err)
	}
	s.devnull = devnull
	defer devnull.Close()

	if in != nil {
		s.adopt(in)
		// Children that ended during the exec sent a SIGCHLD nobody
		// caught.
		s.reap()
	} else {
		s.begin()
	}

	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	// Warnings are rate-limited where the channel readers log them; the
	// counts of a burst that ended are logged from here.
	warnTick := time.NewTicker(s.warns.Interval() / 10)
	defer warnTick.Stop()
	ctxDone := ctx.Done()
	s.stopAsked = func() bool { return ctx.Err() != nil }
	close(s.loop)
	for {
		if s.replaced {
			return nil
		}
		if s.finished() {
			return s.exitErr
		}
		timer.Reset(s.nextWake(s.now()))
		select {
		case <-ctxDone:
			ctxDone = nil
			s.log.Info().Msg("stopping all workers")
			s.beginStop(ReasonStop)
		case <-s.sys.childExited():
			s.reap()
		case <-timer.C:
			s.tick(s.now())
		case <-warnTick.C:
			s.flushWarnings(s.now())
		case f := <-s.calls:
			f()
		case e := <-s.events:
			s.handleEvent(e)
		}
	}
}

// begin starts the first workers: the forked ones, or Options.Workers, or
// one per available CPU.
func (s *Supervisor) begin() {
	n := s.opts.Workers
	s.mu.Lock()
	if s.preForks > 0 {
		n = s.preForks
	}
	s.mu.Unlock()
	if n == 0 {
		n = AvailableCPUs()
	}
	s.log.Info().Int("workers", n).Str("command", strings.Join(s.argv, " ")).Str("listeners", listenersText(s.opts.Listeners)).
		Str("restart", s.opts.Restart.String()).Msg("starting workers")
	if s.opts.Bind == BindMaster {
		s.log.Info().Str("ready", s.opts.Ready.String()).Msg(readySignText(s.opts.Ready))
	} else {
		s.checkPortFree()
	}
	// Every slot first, so each worker's SHOAL_WORKERS is the count.
	for id := 1; id <= n; id++ {
		s.addSlot(id)
	}
	if err := s.openSockets(s.slots[1]); err != nil {
		// Nothing was started: a port held by another program is bad
		// input, not a crash loop.
		s.exitErr = fmt.Errorf("%w%s", err, s.holders())
		s.log.Error().Err(s.exitErr).Msg("cannot open the listeners")
		s.stopping = true
		return
	}
	for id := 1; id <= n; id++ {
		s.start(s.slots[id])
	}
}

// finished reports whether Run should return now.
func (s *Supervisor) finished() bool {
	if len(s.byPID) > 0 || len(s.orphans) > 0 {
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

// warnKey is what a rate-limited warning is about.
type warnKey struct {
	worker int
	reason string // an ipc FrameError or DropError reason, or "read"
}

// flushWarnings logs the counts of suppressed warnings that no later
// warning will carry.
func (s *Supervisor) flushWarnings(now time.Time) {
	for _, d := range s.warns.Due(now) {
		s.log.Warn().Int("worker", d.Key.worker).Str("reason", d.Key.reason).Uint64("suppressed", d.Suppressed).Msg("more warnings about worker suppressed")
	}
}

// now reads the supervisor's clock.
func (s *Supervisor) now() time.Time { return s.sys.now() }

func (s *Supervisor) emit(e Event) {
	if s.opts.OnEvent != nil {
		e.Time = s.now()
		s.opts.OnEvent(e)
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
		if w.state == Stopping && !w.signalled && !now.Before(w.stopAt) {
			w.signalled = true
			s.signal(w, s.opts.StopSignal)
		}
		if w.state == Stopping && !w.killed && !now.Before(s.stopDeadline(w)) {
			w.killed = true
			s.log.Warn().Int("worker", w.slot.id).Int("pid", w.pid).Float64("stop_timeout_seconds", s.opts.StopTimeout.Seconds()).
				Msgf("worker did not exit after %s: sending SIGKILL", unix.SignalName(s.opts.StopSignal))
			s.signal(w, syscall.SIGKILL)
		}
	}
	if s.stopping && !s.abandonAt.IsZero() && !now.Before(s.abandonAt) {
		for pid, w := range s.byPID {
			s.log.Error().Int("worker", w.slot.id).Int("pid", pid).Msg("worker survived SIGKILL (stuck in the kernel?): giving up on it")
			w.proc.release()
			s.retire(w)
			if w.slot.w == w {
				w.slot.w = nil
			}
			if w.slot.next == w {
				w.slot.next = nil
			}
			delete(s.byPID, pid)
		}
		for pid, o := range s.orphans {
			s.log.Error().Int("pid", pid).Str("cmd", o.cmd).Msg("left-behind process survived SIGKILL: giving up on it")
			delete(s.orphans, pid)
		}
	}
	s.killOrphans(now)
	s.checkStalls(now)
	s.pollListening(now)
	s.checkReload(now)
	s.checkHealth(now)
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
	earlier(s.nextOrphanKill())
	if s.steering == SteeringRoundRobin {
		earlier(s.stallCheck)
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
			if !w.signalled {
				earlier(w.stopAt)
			}
			if !w.killed {
				earlier(s.stopDeadline(w))
			}
		case Online:
			if s.opts.Ready == ReadyListen && len(s.opts.Listeners) > 0 {
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
