package supervisor

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"
)

// reload is a rolling reload in progress. The loop goroutine owns it.
type reload struct {
	todo    []int                 // slots not rolled yet, in order
	active  map[int]*worker       // slot -> replacement that does not serve yet
	readyBy map[*worker]time.Time // when each replacement must serve
	waiters []chan error          // callers of Reload, told the outcome
	started time.Time
	surge   int
	why     map[int]string // slot -> the death reason of its old process
	user    bool           // asked for by Reload, not only recycling
}

// nextDeadline is the earliest ready deadline, or zero.
func (r *reload) nextDeadline() time.Time {
	var next time.Time
	for _, t := range r.readyBy {
		if next.IsZero() || t.Before(next) {
			next = t
		}
	}
	return next
}

// ErrReloadAborted is wrapped by the error Reload returns when a
// replacement failed to start or to serve in time. The old workers then
// keep serving: capacity is never reduced for a broken release.
var ErrReloadAborted = errors.New("supervisor: reload aborted")

// Reload rolls every worker over without reducing capacity: for each slot
// in turn (Options.ReloadSurge at a time) it starts a replacement running
// the command as it is on disk now, waits until the replacement serves (see
// Options.Ready), and only then stops the old process gracefully (SIGTERM,
// StopTimeout, SIGKILL). A replacement that dies or does not serve within
// Options.ReadyTimeout aborts the reload: the remaining old workers keep
// serving, and Reload returns an error wrapping ErrReloadAborted.
//
// A reload requested while one runs joins it and gets its outcome. Reload
// returns when the reload has ended or ctx is done; in the latter case the
// reload goes on.
func (s *Supervisor) Reload(ctx context.Context) error {
	result := make(chan error, 1)
	if err := s.doContext(ctx, func() { s.requestReload(result) }); err != nil {
		return fmt.Errorf("supervisor: reload: %w", err)
	}
	select {
	case err := <-result:
		return err
	case <-ctx.Done():
		return ctx.Err()
	case <-s.done:
		select {
		case err := <-result:
			return err
		default:
			return fmt.Errorf("supervisor: reload: %w", errNotRunning)
		}
	}
}

func (s *Supervisor) requestReload(result chan error) {
	if s.stopping {
		result <- errors.New("supervisor: reload: the supervisor is stopping")
		return
	}
	if s.upgrading {
		result <- errors.New("supervisor: reload: the master is upgrading itself in place: reload when that is done")
		return
	}
	r := s.reload
	if r != nil && r.user {
		r.waiters = append(r.waiters, result)
		s.log.Info().Msg("reload requested while one runs: joining it")
		return
	}
	if r == nil {
		r = s.newReload()
		s.reload = r
	}
	// A recycle in progress becomes a reload of every slot.
	r.user = true
	r.waiters = append(r.waiters, result)
	for _, id := range s.slotIDs() {
		if sl := s.slots[id]; !sl.removed && !sl.finished && !r.has(id) {
			r.todo = append(r.todo, id)
			r.why[id] = ReasonReload
		}
	}
	s.log.Info().Int("workers", len(r.todo)+len(r.active)).Int("surge", r.surge).Msg("reload started")
	s.advanceReload()
}

func (s *Supervisor) newReload() *reload {
	return &reload{
		active:  map[int]*worker{},
		readyBy: map[*worker]time.Time{},
		why:     map[int]string{},
		started: s.now(),
		surge:   max(1, s.opts.ReloadSurge),
	}
}

// has reports whether slot id is still to roll or rolling.
func (r *reload) has(id int) bool {
	return r.active[id] != nil || slices.Contains(r.todo, id)
}

// recycle replaces w the way a reload does, for why: "max_requests" or
// "max_memory". Recycles run one slot at a time, in the reload's queue.
func (s *Supervisor) recycle(w *worker, why string) {
	sl := w.slot
	if s.stopping || sl.w != w || w.state != Listening {
		return
	}
	r := s.reload
	if r == nil {
		r = s.newReload()
		r.surge = 1
		s.reload = r
	}
	if r.has(sl.id) {
		return
	}
	r.todo = append(r.todo, sl.id)
	r.why[sl.id] = why
	s.log.Info().Int("worker", sl.id).Int("pid", w.pid).Str("reason", why).Msg("recycling worker")
	s.advanceReload()
}

// advanceReload starts replacements up to the surge, and ends the reload
// when every slot has rolled.
func (s *Supervisor) advanceReload() {
	r := s.reload
	if r == nil || s.advancing {
		return
	}
	s.advancing = true
	defer func() { s.advancing = false }()
	for s.reload == r && len(r.active) < r.surge && len(r.todo) > 0 {
		id := r.todo[0]
		r.todo = r.todo[1:]
		sl := s.slots[id]
		if sl == nil || sl.removed || sl.w == nil {
			// A dead slot restarts with the command as it is now anyway.
			continue
		}
		w, err := s.spawn(sl)
		if err != nil {
			sl.deaths[s.startFailed(sl, err).Class()]++
			s.abortReload(fmt.Errorf("%w: worker %d's replacement could not be started: %v", ErrReloadAborted, id, err))
			return
		}
		sl.next = w
		r.active[id] = w
		r.readyBy[w] = s.now().Add(s.opts.ReadyTimeout)
		s.online(w) // with no port to watch, it serves at once
	}
	if s.reload == r && len(r.active) == 0 && len(r.todo) == 0 {
		if r.user {
			s.reloads++
			s.log.Info().Float64("took_seconds", s.now().Sub(r.started).Seconds()).Msg("reload finished")
		}
		s.endReload(nil)
	}
}

// replacementServes puts a reload's replacement in its slot and stops the
// process it replaces.
func (s *Supervisor) replacementServes(w *worker) {
	r := s.reload
	sl := w.slot
	delete(r.active, sl.id)
	delete(r.readyBy, w)
	old := sl.w
	sl.w, sl.next = w, nil
	sl.reloads++
	if old != nil && old != w {
		why := r.why[sl.id]
		s.log.Info().Int("worker", sl.id).Int("old_pid", old.pid).Int("pid", w.pid).Str("reason", why).Msg("replacement serves: stopping the old worker")
		s.terminate(old, why, s.now())
	}
	s.advanceReload()
}

// dropFromReload takes sl out of the reload in progress, when its slot is
// scaled away: the stop of its replacement is then no broken release.
func (s *Supervisor) dropFromReload(sl *slot) {
	r := s.reload
	if r == nil {
		return
	}
	if w := r.active[sl.id]; w != nil {
		delete(r.active, sl.id)
		delete(r.readyBy, w)
	}
	r.todo = slices.DeleteFunc(r.todo, func(id int) bool { return id == sl.id })
}

// checkReload aborts the reload when a replacement is late.
func (s *Supervisor) checkReload(now time.Time) {
	r := s.reload
	if r == nil {
		return
	}
	for w, t := range r.readyBy {
		if now.Before(t) {
			continue
		}
		s.abortReload(fmt.Errorf("%w: worker %d's replacement (pid %d) did not serve within %s (ready timeout)",
			ErrReloadAborted, w.slot.id, w.pid, s.opts.ReadyTimeout))
		return
	}
}

// abortReload stops the replacements that do not serve yet and leaves the
// old workers serving.
func (s *Supervisor) abortReload(err error) {
	r := s.reload
	if r == nil {
		return
	}
	now := s.now()
	for _, w := range r.active {
		if w.slot.next == w {
			w.slot.next = nil
		}
		if w.state != Dead {
			s.terminate(w, ReasonReloadAbort, now)
		}
	}
	if r.user {
		s.reloadErrs++
	}
	s.log.Error().Err(err).Msg("reload aborted: the old workers keep serving")
	s.endReload(err)
}

// endReload tells every caller the outcome and forgets the reload.
func (s *Supervisor) endReload(err error) {
	r := s.reload
	if r == nil {
		return
	}
	s.reload = nil
	for _, ch := range r.waiters {
		ch <- err
	}
}
