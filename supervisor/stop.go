package supervisor

import (
	"errors"
	"fmt"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

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
		if s.stopping || s.desired() >= HostMaxWorkers().N {
			return
		}
		id = s.nextSlotID()
		s.start(s.addSlot(id))
	}) || id == 0 {
		return nil, fmt.Errorf("supervisor: fork: the supervisor is stopping, or runs the most workers this host allows (%s)", HostMaxWorkers().Reason)
	}
	return s.Worker(id), nil
}

// Scale sets the number of workers. New slots start at once; removed slots,
// the highest first, go through the graceful stop.
func (s *Supervisor) Scale(n int) error {
	if n < 1 {
		return fmt.Errorf("supervisor: scale to %d: want 1 or more workers", n)
	}
	if lim := HostMaxWorkers(); n > lim.N {
		return fmt.Errorf("supervisor: scale to %d: this host allows at most %d workers, from %s: ask for fewer, or raise that limit", n, lim.N, lim.Reason)
	}
	var err error
	if !s.do(func() { err = s.scale(n) }) {
		return errors.New("supervisor: scale: the supervisor is not running")
	}
	return err
}

// ScaleBy adds delta workers (or removes them, when delta is negative) and
// returns the new count; it never goes below 1. SIGTTIN and SIGTTOU do this
// with +1 and -1.
func (s *Supervisor) ScaleBy(delta int) (int, error) {
	var n int
	var err error
	if !s.do(func() {
		n = min(HostMaxWorkers().N, max(1, s.desired()+delta))
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
	var added []*slot
	for len(live) < n {
		id := s.nextSlotID()
		added = append(added, s.addSlot(id))
		live = append(live, id)
	}
	for _, sl := range added {
		s.start(sl)
	}
	for len(live) > n {
		id := live[len(live)-1]
		live = live[:len(live)-1]
		sl := s.slots[id]
		sl.removed = true
		s.closeSockets(sl) // its worker keeps its own copies while it drains
		s.dropFromReload(sl)
		if sl.next != nil {
			s.terminate(sl.next, ReasonScale, s.now())
		}
		if sl.w == nil {
			delete(s.slots, id)
			continue
		}
		s.terminate(sl.w, ReasonScale, s.now())
	}
	s.log.Info().Int("workers", n).Msg("scaled")
	// A reload whose remaining slots were scaled away is over.
	s.advanceReload()
	return nil
}

// beginStop asks every worker to stop.
func (s *Supervisor) beginStop(reason string) {
	if s.stopping {
		return
	}
	s.stopping = true
	for _, sl := range s.slots {
		s.closeSockets(sl)
	}
	now := s.now()
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

// terminate sends the stop signal to w's process group; SIGKILL follows
// at the stop timeout (tick).
func (s *Supervisor) terminate(w *worker, reason string, now time.Time) {
	if w.state == Stopping {
		return
	}
	listening := w.state == Listening
	w.state, w.reason, w.stopAt = Stopping, reason, now
	if s.steering == SteeringRoundRobin && listening {
		switch reason {
		case ReasonReload, ReasonMaxRequests, ReasonMaxMemory:
			// Its replacement took its place in the selection already.
			w.stopAt = now.Add(s.opts.SteeringDrainDelay)
		case ReasonScale, ReasonHung:
			if w.slot.w == w {
				s.steerRemove(w.slot)
			}
			w.stopAt = now.Add(s.opts.SteeringDrainDelay)
		}
	}
	if !w.stopAt.After(now) {
		w.signalled = true
		s.signal(w, s.opts.StopSignal)
	}
}

// Signal sends sig to the process in slot id, or to every worker when id
// is 0, the way SIGUSR1 to the master reaches every worker. It returns the
// number of workers signalled.
func (s *Supervisor) Signal(id int, sig syscall.Signal) (int, error) {
	if sig <= 0 || sig > 64 {
		return 0, fmt.Errorf("supervisor: signal %d: not a signal", sig)
	}
	n := 0
	var err error
	if !s.do(func() {
		for _, sid := range s.slotIDs() {
			sl := s.slots[sid]
			if (id == 0 || id == sid) && sl.w != nil && sl.w.state != Dead {
				s.signal(sl.w, sig)
				n++
			}
		}
		if id != 0 && n == 0 {
			err = fmt.Errorf("supervisor: signal %s to worker %d: no such running worker", unix.SignalName(sig), id)
		}
	}) {
		return 0, errors.New("supervisor: signal: the supervisor is not running")
	}
	return n, err
}

func (s *Supervisor) signal(w *worker, sig syscall.Signal) {
	if err := w.proc.signal(sig); err != nil {
		s.log.Warn().Int("worker", w.slot.id).Int("pid", w.pid).Err(err).Msgf("send %s", unix.SignalName(sig))
	}
}
