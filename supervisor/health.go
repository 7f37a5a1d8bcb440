package supervisor

import (
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/shoal-sh/shoal/reuseport"
)

// checkPortFree warns when a listener has sockets before any worker: a
// socket bound without SO_REUSEPORT, or by another user, makes every
// worker's bind fail; one that joined the group takes a share of the
// connections or datagrams.
func (s *Supervisor) checkPortFree() {
	for _, l := range s.opts.Listeners {
		socks, err := s.sys.sockets(l)
		if err != nil || len(socks) == 0 {
			continue
		}
		uids := make([]uint32, 0, len(socks))
		for _, sk := range socks {
			uids = append(uids, sk.UID)
		}
		s.log.Warn().Str("listener", l.String()).Int("sockets", len(socks)).Interface("uids", uids).
			Msgf("%s already has %d socket(s) before any worker started: if one was bound without SO_REUSEPORT or by another user, the workers cannot bind it; find the owner with 'ss -%slnp sport = :%d'",
				l, len(socks), l.Network[:1], l.Port)
	}
}

func (s *Supervisor) setListening(w *worker) {
	w.state = Listening
	s.log.Info().Int("worker", w.slot.id).Int("pid", w.pid).Float64("after_seconds", s.now().Sub(w.started).Seconds()).Msg("worker listening")
	s.emit(Event{Type: EventListening, Worker: w.slot.id, PID: w.pid})
	s.steerAdd(w)
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

// pollListening asks the kernel which of the online workers listen on
// every listener, and says once why a worker that runs for a while does
// not.
func (s *Supervisor) pollListening(now time.Time) {
	if s.opts.Ready != ReadyListen || len(s.opts.Listeners) == 0 {
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
	if s.opts.Bind == BindMaster {
		s.pollWaiting(now, due)
		return
	}
	// The kernel's sockets of each listener, read once for all workers.
	byListener := make([]map[uint64]reuseport.Socket, len(s.opts.Listeners))
	for i, l := range s.opts.Listeners {
		socks, err := s.sys.sockets(l)
		if err != nil {
			s.log.Warn().Err(err).Str("listener", l.String()).Msg("cannot read the kernel's sockets")
		}
		byListener[i] = make(map[uint64]reuseport.Socket, len(socks))
		for _, sk := range socks {
			byListener[i][sk.Inode] = sk
		}
	}
	for _, w := range due {
		w.polled = now
		held, err := s.sys.inodes(w.pid)
		if err != nil {
			continue
		}
		var found []uint64
		var tcpAddrs []netip.AddrPort
		serves := true
		for i, l := range s.opts.Listeners {
			n := 0
			for ino := range held {
				if sk, ok := byListener[i][ino]; ok {
					found = append(found, ino)
					if l.Network == "tcp" && !slices.Contains(tcpAddrs, sk.Addr) {
						tcpAddrs = append(tcpAddrs, sk.Addr)
					}
					n++
				}
			}
			serves = serves && n > 0
		}
		if serves {
			slices.Sort(found)
			w.inodes, w.waiting, w.tcpAddrs = found, "", tcpAddrs
			s.setListening(w)
			continue
		}
		if w.waiting == "" && !now.Before(w.started.Add(s.diagnoseAfter())) {
			s.diagnose(w, held)
		}
	}
}

// pollWaiting is pollListening for BindMaster: a worker holds its slot's
// sockets from its first instant, so it serves once it waits on every one
// of them (an epoll watch, or a thread blocked in accept or a receive).
func (s *Supervisor) pollWaiting(now time.Time, due []*worker) {
	for _, w := range due {
		w.polled = now
		inodes := w.slot.sockInodes
		waiting, err := s.sys.waiting(w.pid)
		if err != nil || len(inodes) == 0 {
			continue
		}
		serves := true
		for _, ino := range inodes {
			_, ok := waiting[ino]
			serves = serves && ok
		}
		if serves {
			w.inodes, w.waiting = slices.Clone(inodes), ""
			s.setListening(w)
			continue
		}
		if w.waiting == "" && !now.Before(w.started.Add(s.diagnoseAfter())) {
			w.waiting = "holds the sockets the master passed (LISTEN_FDS) but waits on none of them in epoll or accept"
			s.log.Warn().Int("worker", w.slot.id).Int("pid", w.pid).
				Msgf("worker runs for %s but does not serve: it %s; check that it takes its sockets from LISTEN_FDS (fds 3, 4, ...), or give --ready message or notify if it waits in select or poll", s.diagnoseAfter(), w.waiting)
		}
	}
}

// diagnoseAfter is how long a worker may run without listening before the
// master says why: 5 seconds, or the ready timeout when shorter.
func (s *Supervisor) diagnoseAfter() time.Duration {
	return min(5*time.Second, s.opts.ReadyTimeout)
}

// diagnose logs once what w's process tree listens on instead of every
// listener, and keeps it for the status.
func (s *Supervisor) diagnose(w *worker, held map[uint64]struct{}) {
	var has []string
	var missing []string
	for _, network := range []string{"tcp", "udp"} {
		socks, err := s.sys.sockets(Listener{Network: network})
		if err != nil {
			continue
		}
		for _, sk := range socks {
			// A connected UDP socket is a client's (a DNS lookup): not one
			// that serves.
			if _, ok := held[sk.Inode]; ok && !sk.Peer.IsValid() {
				has = append(has, network+":"+sk.Addr.String())
			}
		}
	}
	for _, l := range s.opts.Listeners {
		found := false
		for _, h := range has {
			if strings.HasPrefix(h, l.Network+":") && strings.HasSuffix(h, ":"+strconv.Itoa(l.Port)) {
				found = true
			}
		}
		if !found {
			missing = append(missing, l.String())
		}
	}
	slices.Sort(has)
	has = slices.Compact(has)
	if len(has) == 0 {
		w.waiting = "holds no listening socket; not listening on " + strings.Join(missing, ", ")
	} else {
		w.waiting = "listens on " + strings.Join(has, ", ") + ", not on " + strings.Join(missing, ", ")
	}
	hint := "check that it binds the port in PORT or SHOAL_PORTS, with SO_REUSEPORT"
	if s.opts.Ready == ReadyListen && len(has) == 0 {
		hint += ", or that it has not failed to bind (its own log says)"
	}
	s.log.Warn().Int("worker", w.slot.id).Int("pid", w.pid).Str("listens_on", strings.Join(has, ",")).Str("missing", strings.Join(missing, ",")).
		Msgf("worker runs for %s but does not serve: it %s; %s", s.diagnoseAfter(), w.waiting, hint)
}
