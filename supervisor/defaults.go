package supervisor

import (
	"syscall"
	"time"

	"github.com/shoal-sh/shoal/ipc"
)

// The defaults that a zero field of Options stands for. The shoal command
// line uses the same values, so a flag left out and a field left zero mean
// one thing.
const (
	DefaultStopTimeout    = 10 * time.Second // Options.StopTimeout
	DefaultReadyTimeout   = 30 * time.Second // Options.ReadyTimeout
	DefaultRestartWindow  = time.Minute      // Options.RestartWindow
	DefaultBackoffInitial = 100 * time.Millisecond
	DefaultBackoffMax     = 30 * time.Second // Backoff.Max
	DefaultStableAfter    = 10 * time.Second // Backoff.StableAfter
	DefaultQueueLen       = 1024             // Options.QueueLen, messages
	DefaultMaxMessage     = ipc.DefaultMaxMessage
	DefaultStopSignal     = syscall.SIGTERM // Options.StopSignal
)

// Death reasons: why the master stopped a worker (Death.Reason). A death the
// master did not cause has an empty reason.
const (
	ReasonStop        = "stop"         // the supervisor is stopping
	ReasonScale       = "scale"        // its slot was scaled away
	ReasonReload      = "reload"       // a reload replaced it
	ReasonReloadAbort = "reload-abort" // it was a reload's replacement, and the reload aborted
	ReasonHung        = "hung"         // its heartbeats stopped (Options.HeartbeatTimeout)
	ReasonMaxRequests = "max_requests" // recycled after Options.MaxRequests
	ReasonMaxMemory   = "max_memory"   // recycled over Options.MaxMemory
	ReasonDaemonized  = "daemonized"   // it exited 0 and left a process in the background (see Options.Subreaper)
)
