package supervisor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/internal/sdnotify"
	"github.com/shoal-sh/shoal/ipc"
	"github.com/shoal-sh/shoal/steering"
)

// StateFormat is the version of the state a master hands to the program
// that replaces it in place. A master upgrades only to a program whose
// check (see [WriteCheck]) lists this format.
const StateFormat = 1

// envUpgradeState names the descriptor of the handed-over state in the new
// program's environment.
const envUpgradeState = "SHOAL_UPGRADE_STATE"

// ErrUpgrade is wrapped by every error of [Supervisor.Upgrade]: the upgrade
// did not happen and the master runs on as it was.
var ErrUpgrade = errors.New("supervisor: upgrade refused")

// Check is what a program says of itself when a master asks it, before an
// in-place upgrade: one JSON line, written by [WriteCheck].
type Check struct {
	Program      string `json:"program"`
	Version      string `json:"version"`
	StateFormats []int  `json:"state_formats"`
}

// WriteCheck writes the check line of a program: its name, its version and
// the state formats it reads ([StateFormat]). A program that can replace a
// master in place is run as "PROGRAM upgrade-check ARGS...", with the
// master's arguments and environment: it prints the line, and exits 0 when
// it accepts them, or 2 with the reason on stderr when it does not.
func WriteCheck(w io.Writer, program, version string) error {
	b, err := json.Marshal(Check{Program: program, Version: version, StateFormats: []int{StateFormat}})
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// Upgrade says what replaces the master in [Supervisor.Upgrade].
type Upgrade struct {
	// Path is the program to run in place of this one: the path the
	// master was started from, where a new version was put.
	Path string
	// Args are its arguments, argv[0] included; nil means os.Args.
	Args []string
	// Program is the name the program must give in its check.
	Program string
	// CheckTimeout bounds the check; 0 means 10 seconds.
	CheckTimeout time.Duration
	// Handoff, if set, is called once the check passed, before the
	// workers' channels are handed over: it stops what the caller serves
	// (a control socket, a metrics server) and returns the descriptors
	// the new program needs, by name, and the caller's own state. They
	// reach the new program in [Inherited].
	Handoff func() (files map[string]*os.File, state []byte, err error)
	// Resume, if set, is called when the new program could not be
	// started after Handoff: the caller serves again from what it handed
	// over.
	Resume func(files map[string]*os.File, state []byte)
}

// Inherited is what the master before an in-place upgrade handed to this
// program: see [Inherit]. Give it to [Options].Inherited so that Run
// adopts the running workers instead of starting new ones.
type Inherited struct {
	// Files are the descriptors the old master's Upgrade.Handoff named.
	Files map[string]*os.File
	// State is the old master's own state from Upgrade.Handoff.
	State []byte
	// Upgrades counts the in-place upgrades of this master so far, this
	// one included.
	Upgrades uint64

	st *handState
}

// Inherit returns what the master that this program replaced in place
// handed over, or nil when this program was started afresh. It reads the
// state once and removes its variable from the environment, so workers
// never see it. An error means the state is there and unreadable: the
// workers cannot be adopted.
func Inherit() (*Inherited, error) {
	v, ok := os.LookupEnv(envUpgradeState)
	if !ok {
		return nil, nil
	}
	os.Unsetenv(envUpgradeState)
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil, fmt.Errorf("supervisor: %s=%q is not a descriptor", envUpgradeState, v)
	}
	f := os.NewFile(uintptr(fd), "shoal upgrade state")
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("supervisor: read the state of the master before the upgrade: %w", err)
	}
	return inherit(b)
}

// inherit decodes a handed-over state.
func inherit(b []byte) (*Inherited, error) {
	var st handState
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("supervisor: read the state of the master before the upgrade: %w", err)
	}
	if st.Format != StateFormat {
		return nil, fmt.Errorf("supervisor: the master before the upgrade wrote state format %d; this program reads %d", st.Format, StateFormat)
	}
	in := &Inherited{Files: map[string]*os.File{}, State: st.Extra, Upgrades: st.Upgrades, st: &st}
	for name, fd := range st.ExtraFDs {
		in.Files[name] = os.NewFile(uintptr(fd), name)
	}
	return in, nil
}

// handState is the supervisor's state as it crosses an exec. Times are
// durations relative to Taken, on the monotonic clock, except Started.
type handState struct {
	Format     int
	Taken      int64 // wall clock, unix nanoseconds: how long the exec took, for the log
	Desired    int
	Restarts   uint64
	GiveUps    uint64
	Reloads    uint64
	ReloadErrs uint64
	Upgrades   uint64
	Failed     *handDeath      // an unclean death that will not be replaced
	Limiter    []time.Duration // ages of the restarts in the window
	Steering   SteeringMode
	Groups     []handGroup
	Notify     *handNotify
	Slots      []handSlot
	Workers    []handWorker
	Orphans    []handOrphan
	Extra      json.RawMessage
	ExtraFDs   map[string]int
}

type handDeath struct {
	Worker, PID, ExitCode int
	Signal                syscall.Signal
	Reason                string
}

type handGroup struct {
	Addr string
	FDs  []int // program and maps, see steering.Files
}

type handNotify struct {
	Name string
	FD   int
}

type handSlot struct {
	ID, Failures, Starts, Restarts, Reloads int
	RestartIn                               time.Duration // -1: none pending
	NotifyErrors                            uint64
	LastDeath                               string
	Finished, Removed                       bool
	Requests                                uint64
	Deaths                                  map[string]uint64
	IPC                                     ipc.Stats
	Socks                                   []int
	SockInodes                              []uint64
}

type handWorker struct {
	Slot      int
	Current   bool // it fills its slot; else a process being stopped
	PID       int
	State     State
	Age       time.Duration
	Started   int64 // wall clock, unix nanoseconds
	Reason    string
	StopIn    time.Duration // from the stop signal's time to Taken
	Signalled bool
	Killed    bool
	Inodes    []uint64
	Waiting   string
	TCPAddrs  []string
	Beat      int64
	Served    uint64
	Limit     uint64
	Channel   handChannel
	Output    *handOutput // when its output goes through the master
}

type handOutput struct {
	FDs  [2]int
	Rest [2][]byte
	Cont [2]bool
}

type handChannel struct {
	FD      int
	Unread  []byte
	Discard bool
	Unsent  []byte
	Ended   bool
}

type handOrphan struct {
	PID    int
	Cmd    string
	Slot   int
	StopAt time.Duration // stop signal's time before Taken
	Killed bool
}

// Upgrade replaces the master's program in place: the process, its pid and
// its children stay; the new program adopts every worker, channel and
// socket and goes on. First the program at u.Path is run with the
// argument "upgrade-check" and must say, within u.CheckTimeout, that it is
// u.Program, reads this StateFormat, and accepts the master's arguments
// and environment; then the master stops reading the
// workers' channels between two messages, writes its state to a memory
// file, keeps the descriptors the new program needs open across exec, and
// calls execve from the thread that forked the workers (see [Main]).
//
// Upgrade returns only when the upgrade did not happen, with an error
// wrapping ErrUpgrade that says why; the master then runs on as before.
// It is refused while a reload or recycle runs, while stopping, and while
// another upgrade runs. The new program learns what it inherits from
// [Inherit].
func (s *Supervisor) Upgrade(ctx context.Context, u Upgrade) (Check, error) {
	var busy error
	if err := s.doContext(ctx, func() { busy = s.beginUpgrade() }); err != nil {
		return Check{}, fmt.Errorf("%w: %w", ErrUpgrade, err)
	}
	if busy != nil {
		return Check{}, busy
	}
	defer s.do(func() { s.upgrading = false })
	if u.Args == nil {
		u.Args = os.Args
	}
	check, err := s.check(ctx, u)
	if err != nil {
		return check, err
	}
	// A dead worker's channel is read to its end before it is folded:
	// wait for those, so nothing they hold is left behind.
	if err := s.waitRetired(ctx); err != nil {
		return check, err
	}
	var files map[string]*os.File
	var extra []byte
	if u.Handoff != nil {
		if files, extra, err = u.Handoff(); err != nil {
			return check, fmt.Errorf("%w: %w", ErrUpgrade, err)
		}
	}
	var execErr error
	if err := s.doContext(context.Background(), func() { execErr = s.handOver(u.Path, u.Args, files, extra) }); err != nil {
		execErr = err
	}
	if errors.Is(execErr, errReplaced) {
		return check, nil
	}
	if u.Resume != nil {
		u.Resume(files, extra)
	}
	return check, fmt.Errorf("%w: %w", ErrUpgrade, execErr)
}

// errReplaced is what handOver returns when exec "succeeded" without
// replacing the process: only the state-machine tests' system does that.
var errReplaced = errors.New("supervisor: replaced")

// beginUpgrade checks that an upgrade may start now, on the loop.
func (s *Supervisor) beginUpgrade() error {
	switch {
	case s.upgrading:
		return fmt.Errorf("%w: another upgrade runs now", ErrUpgrade)
	case s.stopping:
		return fmt.Errorf("%w: shoal is stopping", ErrUpgrade)
	case s.reload != nil && s.reload.user:
		return fmt.Errorf("%w: a reload runs now: upgrade when it is done", ErrUpgrade)
	case s.reload != nil:
		return fmt.Errorf("%w: a worker is being recycled now: try again in a moment", ErrUpgrade)
	case s.opts.Output != nil && s.opts.ResumeOutput == nil:
		return fmt.Errorf("%w: the workers' output goes through the master and Options.ResumeOutput is not set", ErrUpgrade)
	}
	for _, w := range s.byPID {
		if _, ok := w.out.(outputDetacher); w.out != nil && !ok {
			return fmt.Errorf("%w: worker %d's output pipe cannot be handed over (no Detach method)", ErrUpgrade, w.slot.id)
		}
	}
	s.upgrading = true
	return nil
}

// check runs the new program in check mode and reads what it says.
func (s *Supervisor) check(ctx context.Context, u Upgrade) (Check, error) {
	refuse := func(format string, a ...any) (Check, error) {
		return Check{}, fmt.Errorf("%w: %s: %s", ErrUpgrade, u.Path, fmt.Sprintf(format, a...))
	}
	st, err := os.Stat(u.Path)
	switch {
	case err != nil:
		return refuse("%v", unwrapPath(err))
	case !st.Mode().IsRegular():
		return refuse("not a regular file (%s)", st.Mode().Type())
	case st.Mode().Perm()&0o111 == 0:
		return refuse("not executable (mode %s): chmod +x it", st.Mode().Perm())
	case st.Mode().Perm()&0o022 != 0:
		return refuse("writable by others than its owner (mode %s): a program the master runs as itself must not be; chmod go-w it", st.Mode().Perm())
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && sys.Uid != 0 && int(sys.Uid) != os.Getuid() {
		return refuse("owned by uid %d, neither root nor the master's uid %d: chown it", sys.Uid, os.Getuid())
	}
	timeout := u.CheckTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	// The check reads the master's arguments and environment as the new
	// program will: one that cannot is refused here, not after the exec.
	argv := append([]string{u.Path, "upgrade-check"}, u.Args[1:]...)
	out, errOut, ws, err := s.runHelper(ctx, u.Path, argv)
	if err != nil {
		return refuse("check: %v", err)
	}
	line, _, _ := bytes.Cut(out, []byte("\n"))
	var c Check
	jerr := json.Unmarshal(line, &c)
	switch {
	case jerr == nil && c.Program == u.Program && ws.Exited() && ws.ExitStatus() == 2:
		return c, fmt.Errorf("%w: %s: %s %s does not accept the master's arguments or environment: %s", ErrUpgrade, u.Path, c.Program, c.Version, oneLine(errOut))
	case !ws.Exited() || ws.ExitStatus() != 0:
		return refuse("check (%s upgrade-check) ended with %s%s: is it a %s that can upgrade in place?", u.Path, (&Death{ExitCode: ws.ExitStatus(), Signal: signalOf(ws)}).Status(), saying(errOut), u.Program)
	case jerr != nil || c.Program == "":
		return refuse("check (%s upgrade-check) printed %q, not a %s check line: it is another program, or a %s too old to upgrade in place", u.Path, truncate(string(line), 80), u.Program, u.Program)
	case c.Program != u.Program:
		return refuse("it is %q, not %s", c.Program, u.Program)
	case !slices.Contains(c.StateFormats, StateFormat):
		return c, fmt.Errorf("%w: %s: %s %s reads state formats %v, not this master's %d: upgrade through a version that reads both, or restart shoal", ErrUpgrade, u.Path, c.Program, c.Version, c.StateFormats, StateFormat)
	}
	return c, nil
}

// saying quotes what a check wrote to stderr, if anything.
func saying(b []byte) string {
	if len(bytes.TrimSpace(b)) == 0 {
		return ""
	}
	return fmt.Sprintf(", saying %q", truncate(oneLine(b), 200))
}

// oneLine joins the lines of b.
func oneLine(b []byte) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(string(b), "\n", " ")), " ")
}

func signalOf(ws unix.WaitStatus) syscall.Signal {
	if ws.Signaled() {
		return ws.Signal()
	}
	return 0
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// runHelper runs a short-lived program, with the master's environment, to
// its end and returns what it wrote to stdout and stderr (at most 64 KiB
// each) and how it ended. It is forked and reaped by the loop like a
// worker, so the loop's reaper never takes its exit from under it; when
// ctx ends first it is killed.
func (s *Supervisor) runHelper(ctx context.Context, path string, argv []string) (stdout, stderr []byte, ws unix.WaitStatus, err error) {
	null, err := os.Open(os.DevNull)
	if err != nil {
		return nil, nil, 0, err
	}
	defer null.Close()
	var rs, ws2 [2]*os.File
	for i := range rs {
		if rs[i], ws2[i], err = os.Pipe(); err != nil {
			return nil, nil, 0, err
		}
		defer rs[i].Close()
		defer ws2[i].Close()
	}
	env := make([]string, 0, len(os.Environ()))
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, envUpgradeState+"=") {
			env = append(env, kv)
		}
	}
	exited := make(chan unix.WaitStatus, 1)
	var pid int
	var serr error
	if err := s.doContext(ctx, func() {
		attr := &os.ProcAttr{Env: env, Files: []*os.File{null, ws2[0], ws2[1]},
			Sys: &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}}
		var p process
		if p, serr = s.sys.start(path, argv, attr); serr == nil {
			pid = p.pid()
			p.release()
			s.helpers[pid] = exited
		}
	}); err != nil {
		return nil, nil, 0, err
	}
	ws2[0].Close()
	ws2[1].Close()
	if serr != nil {
		return nil, nil, 0, unwrapPath(serr)
	}
	var outs [2]chan []byte
	for i, r := range rs {
		outs[i] = make(chan []byte, 1)
		go func() {
			b, _ := io.ReadAll(io.LimitReader(r, 64<<10))
			outs[i] <- b
		}()
	}
	select {
	case st := <-exited:
		for _, r := range rs {
			r.SetReadDeadline(time.Now().Add(time.Second)) // a grandchild may hold the pipe
		}
		return <-outs[0], <-outs[1], st, nil
	case <-ctx.Done():
		s.do(func() { s.sys.kill(pid, syscall.SIGKILL) })
		for _, r := range rs {
			r.SetReadDeadline(time.Now())
		}
		<-outs[0]
		<-outs[1]
		select {
		case <-exited:
		case <-time.After(2 * time.Second):
		}
		return nil, nil, 0, fmt.Errorf("no answer: %w", ctx.Err())
	}
}

// waitRetired waits until every dead worker's channel is folded.
func (s *Supervisor) waitRetired(ctx context.Context) error {
	for {
		n := 0
		if err := s.doContext(ctx, func() {
			for _, sl := range s.slots {
				n += len(sl.retired)
			}
		}); err != nil {
			return fmt.Errorf("%w: %w", ErrUpgrade, err)
		}
		if n == 0 {
			return nil
		}
		select {
		case <-time.After(20 * time.Millisecond):
		case <-ctx.Done():
			return fmt.Errorf("%w: the channels of dead workers are still being read: %w", ErrUpgrade, ctx.Err())
		}
	}
}

// handOver, on the loop, stops every reader between two messages, writes
// the state and execs path. It returns only when the exec failed, after
// putting everything back as it was; or errReplaced with a fake system.
func (s *Supervisor) handOver(path string, argv []string, files map[string]*os.File, extra []byte) error {
	switch {
	case s.stopping:
		return errors.New("shoal was asked to stop meanwhile")
	case s.reload != nil:
		return errors.New("a worker began to be recycled meanwhile: try again in a moment")
	}
	workers := make([]*worker, 0, len(s.byPID))
	for _, w := range s.byPID {
		workers = append(workers, w)
	}
	slices.SortFunc(workers, func(a, b *worker) int { return a.pid - b.pid })
	// Stop every reader first and keep serving what they hand over: a
	// relay still queues to a channel whose writer runs.
	var waits []<-chan struct{}
	for _, w := range workers {
		w.ch.Pause()
		waits = append(waits, w.ch.Done())
	}
	if s.notify != nil {
		s.notify.Pause()
		waits = append(waits, s.notifyDone)
	}
	paused := make(chan struct{})
	go func() {
		for _, c := range waits {
			<-c
		}
		close(paused)
	}()
	for done := false; !done; {
		select {
		case e := <-s.events:
			s.handleFrozen(e)
		case <-paused:
			done = true
		}
	}
	for drained := false; !drained; {
		select {
		case e := <-s.events:
			s.handleFrozen(e)
		default:
			drained = true
		}
	}
	hand := make(map[*worker]ipc.Handoff, len(workers))
	for _, w := range workers {
		h, err := w.ch.Detach()
		if err != nil {
			s.log.Error().Int("worker", w.slot.id).Int("pid", w.pid).Err(err).Msg("upgrade: the worker's channel cannot be handed over: it loses its channel")
			continue
		}
		hand[w] = h
		// Its counters are final now: they go with the slot, and the
		// channel that takes over, here or in the new program, counts
		// from zero.
		addStats(&w.slot.ipcBase, w.ch.Stats())
	}
	outs := map[*worker]OutputHandoff{}
	for _, w := range workers {
		d, ok := w.out.(outputDetacher)
		if !ok {
			continue
		}
		h, err := d.Detach()
		if err != nil {
			s.log.Error().Int("worker", w.slot.id).Int("pid", w.pid).Err(err).Msg("upgrade: the worker's output cannot be handed over: it is lost")
			continue
		}
		outs[w] = h
	}
	st := s.state(extra, files, hand, outs)
	var notifyFile *os.File
	if s.notify != nil {
		f, err := s.notify.Detach()
		if err == nil {
			notifyFile = f
			st.Notify = &handNotify{Name: s.notify.Name(), FD: int(f.Fd())}
		}
	}
	// The new program gets duplicates, open across exec; this program's
	// own descriptors stay close-on-exec and stay its own, so that
	// nothing is closed twice whatever happens.
	dups, err := dupState(st)
	if err == nil && s.stopAsked != nil && s.stopAsked() {
		// A stop came while the readers stopped: it wins.
		err = errors.New("shoal was asked to stop meanwhile")
	}
	if err == nil {
		err = s.exec(path, argv, st)
	}
	if errors.Is(err, errReplaced) {
		s.replaced = true
		return err
	}
	for _, fd := range dups {
		unix.Close(fd)
	}
	// Put everything back: the channels read on from where they stopped.
	for _, w := range workers {
		if h, ok := hand[w]; ok {
			s.resumeChannel(w, h)
		}
		if h, ok := outs[w]; ok {
			s.resumeOutput(w, h)
		}
	}
	if notifyFile != nil {
		if l, lerr := sdnotify.FromFile(st.Notify.Name, notifyFile); lerr == nil {
			s.readNotify(l)
		}
	}
	return err
}

// handleFrozen handles an event while the readers stop for an upgrade.
// A recycle waits for the new program; a closed channel is seen again
// there.
func (s *Supervisor) handleFrozen(e loopEvent) {
	switch e.kind {
	case evRecycle:
		e.w.recycling.Store(false)
	case evDisconnect:
	default:
		s.handleEvent(e)
	}
}

// dupState replaces every descriptor st names with a duplicate that stays
// open across exec, and returns the duplicates.
func dupState(st *handState) ([]int, error) {
	var dups []int
	var err error
	dup := func(fd *int) {
		if err != nil || *fd < 0 {
			return
		}
		var d int
		if d, err = unix.FcntlInt(uintptr(*fd), unix.F_DUPFD, 3); err != nil {
			err = fmt.Errorf("keep descriptor %d open across exec: %w", *fd, err)
			return
		}
		dups = append(dups, d)
		*fd = d
	}
	for i := range st.Workers {
		w := &st.Workers[i]
		dup(&w.Channel.FD)
		if w.Output != nil {
			dup(&w.Output.FDs[0])
			dup(&w.Output.FDs[1])
		}
	}
	if st.Notify != nil {
		dup(&st.Notify.FD)
	}
	for i := range st.Slots {
		for j := range st.Slots[i].Socks {
			dup(&st.Slots[i].Socks[j])
		}
	}
	for i := range st.Groups {
		for j := range st.Groups[i].FDs {
			dup(&st.Groups[i].FDs[j])
		}
	}
	for name, fd := range st.ExtraFDs {
		dup(&fd)
		st.ExtraFDs[name] = fd
	}
	if err != nil {
		for _, d := range dups {
			unix.Close(d)
		}
		return nil, err
	}
	return dups, nil
}

// exec writes st to a memory file, which stays open across exec, and
// execs path.
func (s *Supervisor) exec(path string, argv []string, st *handState) error {
	b, err := json.Marshal(st)
	if err != nil {
		return fmt.Errorf("encode the state: %w", err)
	}
	fd, err := unix.MemfdCreate("shoal-upgrade-state", 0)
	if err != nil {
		return fmt.Errorf("create the state file: memfd_create: %w", err)
	}
	mem := os.NewFile(uintptr(fd), "shoal-upgrade-state")
	defer mem.Close()
	if _, err := mem.Write(b); err != nil {
		return fmt.Errorf("write the state file: %w", err)
	}
	if _, err := mem.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("write the state file: %w", err)
	}
	env := make([]string, 0, len(os.Environ())+1)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, envUpgradeState+"=") {
			env = append(env, kv)
		}
	}
	env = append(env, envUpgradeState+"="+strconv.Itoa(fd))
	s.log.Info().Str("path", path).Int("workers", len(st.Workers)).Msg("upgrade: state handed over, executing the new program")
	if err := s.sys.exec(path, argv, env); err != nil {
		s.log.Error().Err(err).Msg("upgrade: the new program could not be started: going on as before")
		return err
	}
	return errReplaced
}

// state captures the supervisor's state, on the loop, once the workers'
// channels and output pipes are detached (hand, outs).
func (s *Supervisor) state(extra []byte, files map[string]*os.File, hand map[*worker]ipc.Handoff, outs map[*worker]OutputHandoff) *handState {
	now := s.now()
	st := &handState{
		Format: StateFormat, Taken: time.Now().UnixNano(), Desired: s.desired(),
		Restarts: s.restarts, GiveUps: s.giveUps, Reloads: s.reloads, ReloadErrs: s.reloadErrs, Upgrades: s.upgrades + 1,
		Steering: s.steering, Extra: extra, ExtraFDs: map[string]int{},
	}
	if d := s.failed; d != nil {
		st.Failed = &handDeath{Worker: d.Worker, PID: d.PID, ExitCode: d.ExitCode, Signal: d.Signal, Reason: d.Reason}
	}
	for _, t := range s.limiter.times {
		st.Limiter = append(st.Limiter, now.Sub(t))
	}
	for name, f := range files {
		st.ExtraFDs[name] = int(f.Fd())
	}
	if e, ok := s.steer.(*ebpfSteerer); ok {
		for addr, g := range e.groups {
			st.Groups = append(st.Groups, handGroup{Addr: addr.String(), FDs: g.FDs()})
		}
	}
	for _, id := range s.slotIDs() {
		sl := s.slots[id]
		hs := handSlot{ID: sl.id, Failures: sl.failures, Starts: sl.starts, Restarts: sl.restarts, Reloads: sl.reloads, RestartIn: -1,
			NotifyErrors: sl.notifyErrors, LastDeath: sl.lastDeath, Finished: sl.finished, Removed: sl.removed,
			Requests: sl.requests.Load(), Deaths: sl.deaths, SockInodes: sl.sockInodes}
		addStats(&hs.IPC, sl.ipcBase)
		if !sl.restartAt.IsZero() {
			hs.RestartIn = max(sl.restartAt.Sub(now), 0)
		}
		for _, f := range sl.socks {
			hs.Socks = append(hs.Socks, int(f.Fd()))
		}
		st.Slots = append(st.Slots, hs)
	}
	for _, w := range s.byPID {
		hw := handWorker{Slot: w.slot.id, Current: w.slot.w == w, PID: w.pid, State: w.state, Age: now.Sub(w.started), Started: time.Now().Add(-now.Sub(w.started)).UnixNano(),
			Reason: w.reason, Signalled: w.signalled, Killed: w.killed, Inodes: w.inodes, Waiting: w.waiting,
			Beat: w.beat.Load(), Served: w.served.Load(), Limit: w.limit, Channel: handChannel{FD: -1}}
		if !w.stopAt.IsZero() {
			hw.StopIn = w.stopAt.Sub(now)
		}
		for _, a := range w.tcpAddrs {
			hw.TCPAddrs = append(hw.TCPAddrs, a.String())
		}
		if h, ok := hand[w]; ok {
			hw.Channel = handChannel{FD: int(h.File.Fd()), Unread: h.Unread, Discard: h.Discard, Unsent: h.Unsent, Ended: h.Ended}
		}
		if h, ok := outs[w]; ok {
			hw.Output = &handOutput{FDs: [2]int{int(h.Stdout.Fd()), int(h.Stderr.Fd())}, Rest: h.Rest, Cont: h.Cont}
		}
		st.Workers = append(st.Workers, hw)
	}
	for _, o := range s.orphans {
		st.Orphans = append(st.Orphans, handOrphan{PID: o.pid, Cmd: o.cmd, Slot: o.slot, StopAt: now.Sub(o.stopAt), Killed: o.killed})
	}
	return st
}

// adopt takes over the state a master handed over before it became this
// program: Run's start in place of begin.
func (s *Supervisor) adopt(in *Inherited) {
	st := in.st
	now := s.now()
	s.restarts, s.giveUps, s.reloads, s.reloadErrs, s.upgrades = st.Restarts, st.GiveUps, st.Reloads, st.ReloadErrs, st.Upgrades
	if d := st.Failed; d != nil {
		s.failed = &Death{Worker: d.Worker, PID: d.PID, ExitCode: d.ExitCode, Signal: d.Signal, Reason: d.Reason}
	}
	for _, age := range st.Limiter {
		s.limiter.times = append(s.limiter.times, now.Add(-age))
	}
	for _, hs := range st.Slots {
		sl := s.addSlot(hs.ID)
		sl.failures, sl.starts, sl.restarts, sl.reloads = hs.Failures, hs.Starts, hs.Restarts, hs.Reloads
		sl.notifyErrors, sl.lastDeath, sl.finished, sl.removed = hs.NotifyErrors, hs.LastDeath, hs.Finished, hs.Removed
		sl.requests.Store(hs.Requests)
		if hs.Deaths != nil {
			sl.deaths = hs.Deaths
		}
		sl.ipcBase = hs.IPC
		if hs.RestartIn >= 0 {
			sl.restartAt = now.Add(hs.RestartIn)
		}
		for i, fd := range hs.Socks {
			sl.socks = append(sl.socks, os.NewFile(uintptr(fd), "shoal "+s.opts.Listeners[min(i, len(s.opts.Listeners)-1)].String()))
		}
		sl.sockInodes = hs.SockInodes
	}
	var requested uint64
	for _, sl := range s.slots {
		requested += sl.requests.Load()
	}
	s.requested.Store(requested)
	for _, hw := range st.Workers {
		sl := s.slots[hw.Slot]
		if sl == nil {
			sl = s.addSlot(hw.Slot)
			sl.removed = true
		}
		w := &worker{slot: sl, proc: s.sys.adopt(hw.PID), pid: hw.PID, state: hw.State, started: now.Add(-hw.Age),
			reason: hw.Reason, signalled: hw.Signalled, killed: hw.Killed, inodes: hw.Inodes, waiting: hw.Waiting, limit: hw.Limit}
		if hw.StopIn != 0 {
			w.stopAt = now.Add(hw.StopIn)
		}
		for _, a := range hw.TCPAddrs {
			if ap, err := netip.ParseAddrPort(a); err == nil {
				w.tcpAddrs = append(w.tcpAddrs, ap)
			}
		}
		w.beat.Store(hw.Beat)
		w.served.Store(hw.Served)
		s.byPID[w.pid] = w
		if hw.Current {
			sl.w = w
		}
		if o := hw.Output; o != nil && s.opts.ResumeOutput != nil {
			s.resumeOutput(w, OutputHandoff{Stdout: os.NewFile(uintptr(o.FDs[0]), "stdout"), Stderr: os.NewFile(uintptr(o.FDs[1]), "stderr"), Rest: o.Rest, Cont: o.Cont})
		}
		if hw.Channel.FD >= 0 {
			s.resumeChannel(w, ipc.Handoff{File: os.NewFile(uintptr(hw.Channel.FD), "shoal-ipc-master"),
				Unread: hw.Channel.Unread, Discard: hw.Channel.Discard, Unsent: hw.Channel.Unsent, Ended: hw.Channel.Ended})
		} else {
			// Lost in the hand-over: a closed channel, as if it had
			// closed its end.
			m, p, err := ipc.Pair()
			if err == nil {
				p.Close()
				s.resumeChannel(w, ipc.Handoff{File: m})
			}
		}
	}
	for _, ho := range st.Orphans {
		s.orphans[ho.PID] = &orphan{pid: ho.PID, cmd: ho.Cmd, slot: ho.Slot, stopAt: now.Add(-ho.StopAt), killed: ho.Killed}
	}
	s.log.Info().Int("workers", len(st.Workers)).Uint64("upgrades", s.upgrades).Float64("paused_seconds", time.Since(time.Unix(0, st.Taken)).Seconds()).
		Msg("upgraded in place: adopted the running workers (paused_seconds: from the state handed over to now)")
}

// adoptSteering takes over the steering programs and maps of the master
// before an upgrade.
func (s *Supervisor) adoptSteering(st *handState) error {
	s.steering = st.Steering
	if st.Steering != SteeringRoundRobin {
		return nil
	}
	e := &ebpfSteerer{groups: map[netip.AddrPort]*steering.Steering{}}
	for _, hg := range st.Groups {
		addr, err := netip.ParseAddrPort(hg.Addr)
		if err != nil {
			return fmt.Errorf("supervisor: adopt steering of %q: %w", hg.Addr, err)
		}
		g, err := steering.FromFDs(steering.Options{Addr: addr, MaxSlots: 4096}, hg.FDs)
		if err != nil {
			return fmt.Errorf("supervisor: adopt steering: %w", err)
		}
		e.groups[addr] = g
	}
	s.steer = e
	return nil
}

// resumeOutput goes on copying w's output from h.
func (s *Supervisor) resumeOutput(w *worker, h OutputHandoff) {
	out, err := s.opts.ResumeOutput(w.slot.id, w.pid, h)
	if err != nil {
		s.log.Error().Int("worker", w.slot.id).Int("pid", w.pid).Err(err).Msg("upgrade: the worker's output cannot be taken over: it is lost")
		h.Stdout.Close()
		h.Stderr.Close()
		return
	}
	s.copyOutput(w, out)
}

// resumeChannel gives w a channel that reads on from h.
func (s *Supervisor) resumeChannel(w *worker, h ipc.Handoff) {
	w.ch = ipc.ResumeChannel(h, s.channelOptions(w))
	s.watchChannel(w)
}
