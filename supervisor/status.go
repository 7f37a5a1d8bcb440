package supervisor

import (
	"context"
	"maps"
	"slices"
	"time"

	"github.com/shoal-sh/shoal/ipc"
)

// WorkerStatus is a snapshot of one slot.
type WorkerStatus struct {
	ID        int               // the slot
	PID       int               // 0 when no process fills the slot now
	State     State             // Dead when no process fills the slot now
	Started   time.Time         // start of the current process
	Uptime    time.Duration     // of the current process, on the monotonic clock
	Starts    int               // processes started in this slot
	Restarts  int               // replacements after a death in this slot
	Reloads   int               // replacements by a reload or recycle that took over in this slot
	Requests  uint64            // requests reported from this slot, across restarts
	Deaths    map[string]uint64 // deaths in this slot by Death.Class
	Backoff   time.Duration     // delay before the pending restart, if one is pending
	IPC       ipc.Stats         // the slot's message counters, across restarts
	Sockets   []uint64          // inodes of the sockets on the listeners in which the master saw the current process listen
	Waiting   string            // why a running process does not serve yet, once the master has looked (see Options.Ready)
	Steered   uint64            // new connections the steering program placed on the slot, across restarts
	Skipped   bool              // out of the steering selection: the process stalls
	LastDeath string            // how the slot's latest death ended (Death.Class); empty when none
}

// Snapshot is the supervisor's state at one moment.
type Snapshot struct {
	Desired   int        // slots wanted
	Port      int        // the first listener's port; 0 for none
	Listeners []Listener // the ports workers serve
	Steering  string     // "round-robin" or "hash": how new TCP connections are placed
	Restarts  uint64     // replacements started after deaths
	GiveUps   uint64     // times MaxRestarts ended the supervisor
	Stopping  bool       // a stop was requested or the supervisor gave up
	Reloads   uint64     // reloads that finished
	// ReloadFailures counts reloads aborted by a broken replacement.
	ReloadFailures uint64
	Reloading      bool           // a reload runs now
	Upgrades       uint64         // in-place upgrades of the master (Supervisor.Upgrade), across them
	Upgrading      bool           // an in-place upgrade runs now
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
	// The loop may take the snapshot after ctx ended and this returned:
	// it hands it over through a channel, never through a shared variable.
	res := make(chan Snapshot, 1)
	if err := s.doContext(ctx, func() { res <- s.snapshot() }); err != nil {
		return Snapshot{}, err
	}
	return <-res, nil
}

// snapshot takes the snapshot, on the loop goroutine.
func (s *Supervisor) snapshot() Snapshot {
	now := s.now()
	steered := s.steeredCounts()
	snap := Snapshot{Desired: s.desired(), Port: s.opts.Port, Listeners: s.opts.Listeners, Steering: s.steering.String(), Restarts: s.restarts, GiveUps: s.giveUps, Stopping: s.stopping,
		Reloads: s.reloads, ReloadFailures: s.reloadErrs, Reloading: s.reload != nil, Upgrades: s.upgrades, Upgrading: s.upgrading}
	for _, id := range s.slotIDs() {
		sl := s.slots[id]
		st := WorkerStatus{ID: sl.id, State: Dead, Starts: sl.starts, Restarts: sl.restarts, Reloads: sl.reloads, Requests: sl.requests.Load(), Deaths: maps.Clone(sl.deaths)}
		st.Steered, st.Skipped, st.LastDeath = steered[sl.id], sl.skipped, sl.lastDeath
		addStats(&st.IPC, sl.ipcBase)
		if sl.notifyErrors > 0 {
			st.IPC.Errors["bad_notify"] += sl.notifyErrors
		}
		for _, ch := range sl.retired {
			addStats(&st.IPC, ch.Stats())
		}
		if w := sl.w; w != nil {
			st.PID, st.State, st.Started, st.Uptime = w.pid, w.state, w.started, now.Sub(w.started)
			st.Sockets = slices.Clone(w.inodes)
			st.Waiting = w.waiting
			addStats(&st.IPC, w.ch.Stats())
		} else if !sl.restartAt.IsZero() {
			st.Backoff = sl.restartAt.Sub(now)
		}
		snap.Workers = append(snap.Workers, st)
	}
	return snap
}

// Requests returns the number of requests all workers have reported, ever.
func (s *Supervisor) Requests() uint64 { return s.requested.Load() }
