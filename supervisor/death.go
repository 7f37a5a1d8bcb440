package supervisor

import (
	"fmt"
	"time"

	"github.com/shoal-sh/shoal/ipc"
	"golang.org/x/sys/unix"
)

// reap collects every exited child without blocking. As a subreaper it
// collects orphans too; otherwise only its own workers.
func (s *Supervisor) reap() {
	pids := make([]int, 0, len(s.byPID)+len(s.helpers))
	for pid := range s.byPID {
		pids = append(pids, pid)
	}
	for pid := range s.helpers {
		pids = append(pids, pid)
	}
	for _, e := range s.sys.reap(pids, s.opts.Subreaper) {
		if h := s.helpers[e.pid]; h != nil {
			delete(s.helpers, e.pid)
			h <- e.status
		} else if w := s.byPID[e.pid]; w != nil {
			s.exited(w, e.status)
		} else if o := s.orphans[e.pid]; o != nil {
			delete(s.orphans, e.pid)
			s.log.Info().Int("pid", e.pid).Str("cmd", o.cmd).Msg("left-behind process exited")
		} else {
			s.log.Debug().Int("pid", e.pid).Msg("reaped an orphan")
		}
	}
}

// exited records the death of w and applies the restart policy.
func (s *Supervisor) exited(w *worker, ws unix.WaitStatus) {
	sl := w.slot
	delete(s.byPID, w.pid)
	w.state = Dead
	w.proc.release()
	s.retire(w)
	if s.adoptOrphans(w, ws) && w.reason == "" {
		w.reason = ReasonDaemonized
	}
	d := &Death{Worker: sl.id, PID: w.pid, ExitCode: ws.ExitStatus(), Uptime: s.now().Sub(w.started), Reason: w.reason}
	if ws.Signaled() {
		d.ExitCode, d.Signal = -1, ws.Signal()
	}
	ev := s.log.Info()
	if w.reason == "" && !d.Clean() {
		ev = s.log.Warn()
	}
	ev = ev.Int("worker", sl.id).Int("pid", w.pid).Float64("uptime_seconds", d.Uptime.Seconds())
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
	sl.lastDeath = d.Class()
	replacement := s.reload != nil && s.reload.active[sl.id] == w
	switch w {
	case sl.next:
		sl.next = nil
		sl.deaths[d.Class()]++
	case sl.w:
		sl.w = nil
		s.steerRemove(sl)
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

// retire closes a dead (or abandoned) worker's channel once its reader
// has taken everything the worker wrote, and folds the channel's counters
// into its slot's.
func (s *Supervisor) retire(w *worker) {
	sl := w.slot
	sl.retired = append(sl.retired, w.ch)
	s.retiring.Add(1)
	go func(ch *ipc.Channel) {
		defer s.retiring.Done()
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
	if dst.Drops == nil {
		dst.Drops = map[string]uint64{}
	}
	for k, v := range src.Drops {
		dst.Drops[k] += v
	}
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
		s.closeSockets(sl)
		return
	}
	if sl.removed {
		s.closeSockets(sl)
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
		s.closeSockets(sl)
		if !d.Clean() {
			s.failed = d
		}
		return
	}
	sl.failures++
	if !s.limiter.allow(s.now()) {
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
	sl.restartAt = s.now().Add(delay)
	// No worker takes connections from the slot's sockets until then.
	s.closeSockets(sl)
	s.log.Info().Int("worker", sl.id).Float64("delay_seconds", delay.Seconds()).Int("quick_deaths", sl.failures).Msg("restarting worker after backoff")
}
