package supervisor

import (
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
)

// RestartPolicy says which deaths are followed by a replacement.
type RestartPolicy int

const (
	// RestartAlways replaces every worker that dies, however it ended.
	RestartAlways RestartPolicy = iota
	// RestartOnFailure replaces a worker unless it exited with status 0.
	RestartOnFailure
	// RestartNever never replaces a worker; the supervisor returns when
	// the last one has died.
	RestartNever
)

// String returns the policy as the command line spells it.
func (p RestartPolicy) String() string {
	switch p {
	case RestartAlways:
		return "always"
	case RestartOnFailure:
		return "on-failure"
	case RestartNever:
		return "never"
	}
	return fmt.Sprintf("RestartPolicy(%d)", int(p))
}

// ParseRestartPolicy parses "always", "on-failure" or "never", in any case.
func ParseRestartPolicy(s string) (RestartPolicy, error) {
	var p RestartPolicy
	err := p.UnmarshalText([]byte(s))
	return p, err
}

// MarshalText returns the policy as the command line spells it.
func (p RestartPolicy) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// UnmarshalText parses "always", "on-failure" or "never", in any case. It
// makes a RestartPolicy usable as a flag or a configuration field.
func (p *RestartPolicy) UnmarshalText(text []byte) error {
	switch strings.ToLower(strings.TrimSpace(string(text))) {
	case "always":
		*p = RestartAlways
	case "on-failure":
		*p = RestartOnFailure
	case "never":
		*p = RestartNever
	default:
		return fmt.Errorf("restart policy %q: want always, on-failure or never", text)
	}
	return nil
}

// ReadyMode says how the master learns that a worker is serving.
type ReadyMode int

const (
	// ReadyListen waits until the kernel shows the worker's process (or one
	// of its descendants) owning a socket on every one of Options.Listeners:
	// a TCP socket in LISTEN state, or a bound UDP socket. It needs no
	// cooperation from the worker: nginx is seen listening too.
	ReadyListen ReadyMode = iota
	// ReadyMessage waits for the worker to send {"cmd":"shoal:ready"}.
	ReadyMessage
	// ReadyNotify waits for the worker (or a descendant) to send READY=1
	// with systemd's notification protocol, to the socket the supervisor
	// names in its NOTIFY_SOCKET. Its WATCHDOG=1 counts as a heartbeat.
	ReadyNotify
)

// String returns the mode as the command line spells it.
func (m ReadyMode) String() string {
	switch m {
	case ReadyMessage:
		return "message"
	case ReadyNotify:
		return "notify"
	}
	return "listen"
}

// ParseReadyMode parses "listen", "message" or "notify", in any case.
func ParseReadyMode(s string) (ReadyMode, error) {
	var m ReadyMode
	err := m.UnmarshalText([]byte(s))
	return m, err
}

// MarshalText returns the mode as the command line spells it.
func (m ReadyMode) MarshalText() ([]byte, error) { return []byte(m.String()), nil }

// UnmarshalText parses "listen", "message" or "notify", in any case.
func (m *ReadyMode) UnmarshalText(text []byte) error {
	switch strings.ToLower(strings.TrimSpace(string(text))) {
	case "listen":
		*m = ReadyListen
	case "message":
		*m = ReadyMessage
	case "notify":
		*m = ReadyNotify
	default:
		return fmt.Errorf("ready mode %q: want listen, message or notify", text)
	}
	return nil
}

// Options configure a Supervisor. The zero value runs one copy of the
// running program per available CPU, restarts the dead, and gives each
// worker 10 seconds to stop.
type Options struct {
	// Command is the program and its arguments. Empty means the running
	// program itself (os.Executable) with its own arguments: its copies are
	// the workers and see IsWorker() == true. A command without a slash is
	// looked up in PATH once, by New.
	Command []string
	// Dir is the workers' working directory; empty means the master's.
	Dir string
	// Env sets the workers' environment on top of what they inherit: an
	// entry "KEY=VALUE" sets KEY, an entry "KEY" passes the master's value
	// of KEY (if it has one).
	Env []string
	// InheritEnv passes the master's whole environment to the workers
	// (less the master's own SHOAL_ variables). Without it, workers get
	// only the basics (PATH, HOME, USER, LOGNAME, SHELL, LANG, LANGUAGE,
	// LC_*, TZ, TMPDIR, TERM), Env and the worker contract, so no secret of
	// the master reaches them unless it is named.
	InheritEnv bool

	// Credential, if set, runs the workers as that user and group, with
	// the supplementary groups it lists (none when empty): the master may
	// be root while the workers are not. It needs the privilege to change
	// ids (root, or CAP_SETUID and CAP_SETGID).
	Credential *syscall.Credential
	// AmbientCaps are capabilities the workers keep in their ambient set
	// across the change of user and exec, e.g. unix.CAP_NET_BIND_SERVICE
	// to bind a port below 1024 as a non-root worker. The master must have
	// them itself.
	AmbientCaps []uintptr

	// Workers is the number of workers. 0 means AvailableCPUs(), unless Fork
	// was called before Run: then the forked workers alone.
	Workers int
	// Listeners are the ports the workers serve, TCP or UDP. Workers get
	// the first one's port as PORT and all of them as SHOAL_PORTS
	// ("tcp:443,udp:443"); with ReadyListen a worker serves once it, or a
	// descendant, holds a socket on every listener: a TCP socket in LISTEN
	// state, or a bound UDP socket. None means no port: no PORT, and with
	// ReadyListen a worker counts as serving once it runs.
	Listeners []Listener
	// Port is a shorthand for one TCP listener when Listeners is empty;
	// otherwise New sets it to the first listener's port.
	Port int
	// Bind says who binds the listeners: the workers (BindWorker, the
	// zero value) or the master, which passes them (BindMaster).
	Bind BindMode
	// Host is the address the master binds the listeners on with
	// BindMaster; empty means every address (IPv6 and IPv4).
	Host string
	// Steering says how new TCP connections are placed on the workers:
	// the kernel's hash (the zero value), round-robin by an eBPF program
	// of the master's, or auto.
	Steering SteeringMode
	// SteeringDrainDelay is how long a worker is out of the selection
	// before its stop signal, with round-robin steering; 0 means 50 ms.
	SteeringDrainDelay time.Duration
	// Ready says how the master learns that a worker serves.
	Ready ReadyMode

	// Restart is the restart policy; the zero value is RestartAlways.
	Restart RestartPolicy
	// Backoff is the crash-loop delay policy per slot.
	Backoff Backoff
	// MaxRestarts, when above 0, makes the supervisor give up (stop every
	// worker and return an error wrapping ErrTooManyRestarts) when it would
	// restart workers more than MaxRestarts times within RestartWindow.
	MaxRestarts int
	// RestartWindow is the window of MaxRestarts; 0 means one minute.
	RestartWindow time.Duration
	// ReadyTimeout bounds how long a reload waits for a replacement to
	// serve before it aborts; 0 means 30 seconds.
	ReadyTimeout time.Duration
	// ReloadSurge is how many slots a reload rolls at a time; 0 means 1.
	ReloadSurge int

	// HeartbeatTimeout, when above 0, kills a worker that has sent a
	// {"cmd":"shoal:heartbeat"} and then none for this long (SIGTERM, then
	// SIGKILL after StopTimeout): its death reason is "hung". Workers that
	// never send a heartbeat are not watched. Go workers served by package
	// worker send one every second.
	HeartbeatTimeout time.Duration

	// MaxRequests, when above 0, recycles a worker (replaces it the way a
	// reload does, with no lost request) once it has reported this many
	// requests plus a random 0..MaxRequestsJitter, so workers do not all
	// recycle at once. The death reason is "max_requests".
	MaxRequests       uint64
	MaxRequestsJitter uint64
	// MaxMemory, when above 0, recycles a worker whose resident memory
	// (from /proc, checked every second) exceeds this many bytes. The
	// death reason is "max_memory".
	MaxMemory uint64

	// StopTimeout is how long a worker has to exit after the stop signal
	// before it and its process group get SIGKILL. 0 means 10 seconds.
	StopTimeout time.Duration
	// StopSignal asks a worker to finish its work and exit, on stop,
	// reload, scale-down and recycle: the server's graceful stop signal
	// (nginx's is SIGQUIT; SIGTERM makes it stop fast). 0 means SIGTERM.
	StopSignal syscall.Signal

	// Subreaper makes the master a child subreaper (PR_SET_CHILD_SUBREAPER)
	// that reaps every child, workers and their orphans alike. The program
	// must then start no other child processes with os/exec, whose Wait
	// would race with the reaper. It is always on when the master is PID 1.
	Subreaper bool

	// MaxMessage bounds one IPC message from a worker; 0 means
	// ipc.DefaultMaxMessage (1 MiB).
	MaxMessage int
	// QueueLen bounds the messages queued to one worker; 0 means 1024.
	QueueLen int

	// Stdout and Stderr receive the workers' output; nil means the
	// master's own (the workers write to them directly).
	Stdout, Stderr *os.File
	// Output, if set, is called before each worker is started, with its
	// slot, for the pipes its stdout and stderr go to in place of Stdout
	// and Stderr, which are then not used. Run waits for every OutputPipe
	// to end before it returns.
	Output func(slot int) (OutputPipe, error)
	// ResumeOutput, with Output, takes over the output of a worker this
	// program inherited in an in-place upgrade (see Inherited): what the
	// old master's OutputPipe.Detach left. Without it, or when an
	// OutputPipe has no Detach method, Upgrade is refused.
	ResumeOutput func(slot, pid int, h OutputHandoff) (OutputPipe, error)

	// Inherited, from Inherit, makes Run adopt the workers, channels and
	// sockets of the master this program replaced in place (see
	// Supervisor.Upgrade) instead of starting workers; the other options
	// must be the ones that master ran with.
	Inherited *Inherited

	// Logger receives the supervisor's log lines; nil discards them.
	Logger *zerolog.Logger

	// OnEvent, if set, is called for every lifecycle event, on the
	// supervisor's own goroutine: it must not block.
	OnEvent func(Event)
	// OnMessage, if set, is called for every application message (every
	// message whose cmd is not reserved) from any worker. It runs on that
	// worker's channel goroutine: calls for different workers may run at
	// the same time, and a slow handler delays only its worker's messages.
	OnMessage func(Message)
}

// OutputHandoff is an OutputPipe as it crosses an in-place upgrade: the
// master's read ends of the worker's stdout and stderr, and what was read
// from each and not yet written (the start of a line). An OutputPipe that
// can be handed over has a method Detach() (OutputHandoff, error) that
// stops its copying without closing the pipes.
type OutputHandoff struct {
	Stdout, Stderr *os.File
	Rest           [2][]byte
	Cont           [2]bool // the next piece written continues a cut line
}

// outputDetacher is an OutputPipe that can be handed over.
type outputDetacher interface {
	Detach() (OutputHandoff, error)
}

// OutputPipe carries one worker's stdout and stderr to the master's.
type OutputPipe interface {
	// Files returns what the worker gets as its fds 1 and 2.
	Files() (stdout, stderr *os.File)
	// Start is called once the worker runs: the master's copies of Files
	// are to be closed, and the copying to begin.
	Start(pid int)
	// Done is closed when the copying has ended: the worker, and every
	// process it passed Files to, has closed them.
	Done() <-chan struct{}
	// Close ends the copying without waiting for Done, in bounded time,
	// and closes Files if Start was not called. It is called once, after
	// Done or when Run returns, or after a failed start.
	Close()
}

// Message is an application message from a worker.
type Message struct {
	Worker int    // the sender's slot
	PID    int    // the sender's pid
	Cmd    string // the "cmd" member when the message is an object with one
	Raw    []byte // the message's JSON, safe to keep
}

// ErrTooManyRestarts is wrapped by the error Run returns when MaxRestarts
// was exceeded.
var ErrTooManyRestarts = fmt.Errorf("supervisor: too many restarts")

func (o Options) withDefaults() Options {
	if o.StopTimeout <= 0 {
		o.StopTimeout = DefaultStopTimeout
	}
	if len(o.Listeners) == 0 && o.Port != 0 {
		o.Listeners = []Listener{{"tcp", o.Port}}
	}
	if len(o.Listeners) > 0 {
		o.Port = o.Listeners[0].Port
	}
	if o.SteeringDrainDelay <= 0 {
		o.SteeringDrainDelay = DefaultSteeringDrainDelay
	}
	if o.StopSignal == 0 {
		o.StopSignal = DefaultStopSignal
	}
	if o.ReadyTimeout <= 0 {
		o.ReadyTimeout = DefaultReadyTimeout
	}
	if o.RestartWindow <= 0 {
		o.RestartWindow = DefaultRestartWindow
	}
	if o.MaxMessage <= 0 {
		o.MaxMessage = DefaultMaxMessage
	}
	if o.QueueLen <= 0 {
		o.QueueLen = DefaultQueueLen
	}
	o.Backoff = o.Backoff.withDefaults()
	if o.Stdout == nil {
		o.Stdout = os.Stdout
	}
	if o.Stderr == nil {
		o.Stderr = os.Stderr
	}
	return o
}
