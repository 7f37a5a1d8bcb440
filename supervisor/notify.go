package supervisor

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"

	"github.com/shoal-sh/shoal/internal/sdnotify"
)

// listenNotify opens the socket that workers send systemd notifications to
// with ReadyNotify, and reads it on a goroutine until Run ends.
func (s *Supervisor) listenNotify(in *Inherited) error {
	if s.opts.Ready != ReadyNotify {
		return nil
	}
	var l *sdnotify.Listener
	var err error
	if in != nil && in.st.Notify != nil {
		// The socket the workers' NOTIFY_SOCKET names, from the master
		// before the upgrade.
		l, err = sdnotify.FromFile(in.st.Notify.Name, os.NewFile(uintptr(in.st.Notify.FD), "notify"))
	} else {
		l, err = sdnotify.Listen(fmt.Sprintf("shoal-%d-%x", os.Getpid(), rand.Uint64()))
	}
	if err != nil {
		return fmt.Errorf("supervisor: --ready notify: %w", err)
	}
	s.readNotify(l)
	return nil
}

// readNotify reads l on a goroutine until it is closed or detached.
func (s *Supervisor) readNotify(l *sdnotify.Listener) {
	s.notify = l
	s.notifyDone = make(chan struct{})
	s.retiring.Add(1)
	go func() {
		defer s.retiring.Done()
		defer close(s.notifyDone)
		for {
			m, err := l.Read()
			if err != nil && !errors.Is(err, sdnotify.ErrBadDatagram) {
				return // closed
			}
			s.post(loopEvent{kind: evNotify, note: m, noteErr: err})
		}
	}()
}

// handleNotify acts on a notification from pid: READY=1 makes its worker
// serve, WATCHDOG=1 is a heartbeat, STOPPING=1 is logged. A sender that is
// neither a worker nor one of its descendants is ignored; a bad datagram
// is counted to its worker and skipped, like a bad message.
func (s *Supervisor) handleNotify(m sdnotify.Message, bad error) {
	w := s.workerOf(m.PID)
	if w == nil {
		if n, ok := s.warns.Allow(warnKey{0, "notify_stranger"}, s.now()); ok {
			s.log.Warn().Int("pid", m.PID).Uint64("suppressed", n).Msg("notification from a process that is no worker's ignored")
		}
		return
	}
	if bad != nil {
		w.slot.notifyErrors++
		if n, ok := s.warns.Allow(warnKey{w.slot.id, "bad_notify"}, s.now()); ok {
			s.log.Warn().Int("worker", w.slot.id).Int("pid", w.pid).Uint64("suppressed", n).Err(bad).Msg("bad notification from worker skipped")
		}
		return
	}
	if m.Fields["WATCHDOG"] == "1" {
		w.beat.Store(s.now().UnixNano())
	}
	if m.Fields["STOPPING"] == "1" {
		s.log.Info().Int("worker", w.slot.id).Int("pid", w.pid).Msg("worker says it is stopping")
	}
	if m.Fields["READY"] == "1" && w.state == Online {
		s.setListening(w)
	}
}

// workerOf returns the worker whose process is pid or an ancestor of pid.
func (s *Supervisor) workerOf(pid int) *worker {
	for i := 0; i < 64 && pid > 1; i++ {
		if w := s.byPID[pid]; w != nil {
			return w
		}
		pid = s.sys.parent(pid)
	}
	return nil
}
