package supervisor

import (
	"slices"
	"time"
)

// checkPortFree warns when the port has listeners before any worker: a
// socket bound without SO_REUSEPORT, or by another user, makes every
// worker's bind fail; one that joined the group takes a share of the
// connections.
func (s *Supervisor) checkPortFree() {
	if s.opts.Port == 0 {
		return
	}
	socks, err := s.sys.listeners(s.opts.Port)
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

func (s *Supervisor) setListening(w *worker) {
	w.state = Listening
	s.log.Info().Int("worker", w.slot.id).Int("pid", w.pid).Float64("after_seconds", s.now().Sub(w.started).Seconds()).Msg("worker listening")
	s.emit(Event{Type: EventListening, Worker: w.slot.id, PID: w.pid})
	if r := s.reload; r != nil && r.active[w.slot.id] == w {
		s.replacementServes(w)
	}
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
			s.log.Warn().Int("worker", w.slot.id).Int("pid", w.pid).Float64("heartbeat_timeout_seconds", s.opts.HeartbeatTimeout.Seconds()).
				Msg("worker hung: no heartbeat within the timeout; stopping it")
			s.terminate(w, ReasonHung, now)
			continue
		}
		if s.opts.MaxMemory > 0 && w.state == Listening && !now.Before(w.memAt.Add(time.Second)) {
			w.memAt = now
			if rss, err := s.sys.rss(w.pid); err == nil && rss > s.opts.MaxMemory && !w.recycling.Swap(true) {
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
	socks, err := s.sys.listeners(s.opts.Port)
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
		held, err := s.sys.inodes(w.pid)
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
