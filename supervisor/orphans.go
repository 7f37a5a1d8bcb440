package supervisor

import (
	"time"

	"golang.org/x/sys/unix"
)

// An orphan is a process the master adopted as a subreaper: a worker's
// descendant that outlived the worker, such as the daemon of a program that
// forks into the background (nginx with "daemon on"). No process started
// under shoal may outlive it, so the master stops each orphan as it finds
// it, with the stop signal and then SIGKILL at the stop timeout, and Run
// returns only once every orphan is gone.
type orphan struct {
	pid    int
	cmd    string
	slot   int       // the slot whose worker left it
	stopAt time.Time // when it was sent the stop signal
	killed bool      // it was sent SIGKILL
}

// adoptOrphans finds the processes left behind by w, which has just been
// reaped: children of the master that are not workers. It stops them, and
// reports whether w daemonized: it exited with status 0 and left a process
// running, which is how a program that forks into the background looks.
func (s *Supervisor) adoptOrphans(w *worker, ws unix.WaitStatus) (daemonized bool) {
	if !s.opts.Subreaper {
		return false
	}
	now := s.now()
	for _, c := range s.sys.children() {
		if s.byPID[c.pid] != nil || s.orphans[c.pid] != nil {
			continue
		}
		o := &orphan{pid: c.pid, cmd: c.cmd, slot: w.slot.id, stopAt: now}
		s.orphans[c.pid] = o
		clean := ws.Exited() && ws.ExitStatus() == 0
		if clean {
			daemonized = true
			s.log.Error().Int("worker", w.slot.id).Int("pid", w.pid).Int("daemon_pid", c.pid).Str("daemon", c.cmd).
				Msgf("worker daemonized: its process exited while process %d (%s) it started runs on in the background; shoal stops it. "+
					"Run the program in the foreground (nginx: 'daemon off;', others: a --foreground or --no-daemon flag)", c.pid, c.cmd)
		} else {
			s.log.Warn().Int("worker", w.slot.id).Int("pid", w.pid).Int("orphan_pid", c.pid).Str("orphan", c.cmd).
				Msg("worker died and left a process behind: stopping it")
		}
		if err := s.sys.kill(c.pid, s.opts.StopSignal); err != nil {
			s.log.Warn().Int("pid", c.pid).Err(err).Msgf("send %s", unix.SignalName(s.opts.StopSignal))
		}
	}
	return daemonized
}

// killOrphans sends SIGKILL to the orphans past the stop timeout.
func (s *Supervisor) killOrphans(now time.Time) {
	for _, o := range s.orphans {
		if !o.killed && !now.Before(o.stopAt.Add(s.opts.StopTimeout)) {
			o.killed = true
			s.log.Warn().Int("pid", o.pid).Str("cmd", o.cmd).Msg("left-behind process did not exit: sending SIGKILL")
			s.sys.kill(o.pid, unix.SIGKILL)
		}
	}
}

// nextOrphanKill is when the next orphan is due for SIGKILL, or zero.
func (s *Supervisor) nextOrphanKill() time.Time {
	var next time.Time
	for _, o := range s.orphans {
		if at := o.stopAt.Add(s.opts.StopTimeout); !o.killed && (next.IsZero() || at.Before(next)) {
			next = at
		}
	}
	return next
}
