package supervisor

import (
	"fmt"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// State is where a worker is in its life.
type State int

// A worker goes Starting -> Online -> Listening -> Stopping -> Dead.
const (
	Starting  State = iota // being forked
	Online                 // its process runs
	Listening              // it serves: it listens on the port, or said it is ready
	Stopping               // it was sent SIGTERM
	Dead                   // it has exited and been reaped
)

// String returns the state in lower case, as logs and status tables show it.
func (s State) String() string {
	switch s {
	case Starting:
		return "starting"
	case Online:
		return "online"
	case Listening:
		return "listening"
	case Stopping:
		return "stopping"
	case Dead:
		return "dead"
	}
	return fmt.Sprintf("State(%d)", int(s))
}

// EventType names a lifecycle event, after the Node.js cluster module's.
type EventType int

// The lifecycle events, in the order a worker's life produces them.
const (
	EventFork       EventType = iota // a worker process was started
	EventOnline                      // its process runs
	EventListening                   // it serves
	EventDisconnect                  // its message channel closed
	EventDeath                       // it exited and was reaped
)

// String returns the event's name as the Node.js cluster module spells it.
func (t EventType) String() string {
	switch t {
	case EventFork:
		return "fork"
	case EventOnline:
		return "online"
	case EventListening:
		return "listening"
	case EventDisconnect:
		return "disconnect"
	case EventDeath:
		return "death"
	}
	return fmt.Sprintf("EventType(%d)", int(t))
}

// Event is one lifecycle event of one worker.
type Event struct {
	Type   EventType
	Worker int       // the slot
	PID    int       // the worker's pid; 0 when it never started
	Time   time.Time // when the master saw it
	Death  *Death    // set for EventDeath
}

// Death describes how a worker ended.
type Death struct {
	Worker   int            // the slot
	PID      int            // 0 when the process could not be started
	ExitCode int            // the exit status, or -1 when a signal ended it
	Signal   syscall.Signal // the signal that ended it, or 0
	Uptime   time.Duration  // from start to reaping, on the monotonic clock
	Reason   string         // why the master stopped it, when it did: one of the Reason constants; empty otherwise
	Err      error          // why it could not be started, when it could not
}

// Clean reports whether the worker exited with status 0.
func (d Death) Clean() bool { return d.Err == nil && d.Signal == 0 && d.ExitCode == 0 }

// Class returns a bounded label for how the worker ended, for metrics:
// "hung", "max_requests" or "max_memory" when the master stopped it for
// that reason; otherwise
// "exit_zero", "exit_nonzero", "start_failed", or "signal_" and the
// signal's name for the common fatal signals (SIGKILL, SIGTERM, SIGINT,
// SIGQUIT, SIGHUP, SIGSEGV, SIGBUS, SIGABRT, SIGILL, SIGFPE, SIGPIPE), and
// "signal_other" for the rest.
func (d Death) Class() string {
	switch d.Reason {
	case ReasonHung, ReasonMaxRequests, ReasonMaxMemory, ReasonDaemonized:
		return d.Reason
	}
	switch {
	case d.Err != nil:
		return "start_failed"
	case d.Signal != 0:
		switch d.Signal {
		case unix.SIGKILL, unix.SIGTERM, unix.SIGINT, unix.SIGQUIT, unix.SIGHUP, unix.SIGSEGV,
			unix.SIGBUS, unix.SIGABRT, unix.SIGILL, unix.SIGFPE, unix.SIGPIPE:
			return "signal_" + unix.SignalName(d.Signal)
		}
		return "signal_other"
	case d.ExitCode == 0:
		return "exit_zero"
	default:
		return "exit_nonzero"
	}
}

// Status says how the worker ended: "exit status 1", "signal killed",
// "start failed: ...".
func (d Death) Status() string {
	switch {
	case d.Err != nil:
		return "start failed: " + d.Err.Error()
	case d.Signal != 0:
		return "signal " + unix.SignalName(d.Signal)
	default:
		return fmt.Sprintf("exit status %d", d.ExitCode)
	}
}
