package supervisor

import (
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/shoal-sh/shoal/ipc"
)

// lookPath resolves a command the way a shell would and says what to do
// when it cannot.
func lookPath(name string) (string, error) {
	path, err := exec.LookPath(name)
	if err != nil {
		if strings.Contains(name, "/") {
			return "", fmt.Errorf("supervisor: command %q: %w", name, unwrapExec(err))
		}
		return "", fmt.Errorf("supervisor: command %q not found in PATH (%s): install it or give its full path", name, os.Getenv("PATH"))
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", fmt.Errorf("supervisor: command %q: %w", name, err)
	}
	return abs, nil
}

func unwrapExec(err error) error {
	var e *exec.Error
	if errors.As(err, &e) {
		return e.Err
	}
	return err
}

// start forks a process into sl. A process that cannot be started counts
// as a death, so the backoff applies.
func (s *Supervisor) start(sl *slot) {
	sl.restartAt = time.Time{}
	if err := s.openSockets(sl); err != nil {
		s.afterDeath(sl, s.startFailed(sl, err))
		return
	}
	w, err := s.spawn(sl)
	if err != nil {
		s.afterDeath(sl, s.startFailed(sl, err))
		return
	}
	sl.w = w
	s.online(w)
}

// spawn forks a process for sl without putting it in the slot: start puts
// it there, a reload keeps it aside until it serves.
func (s *Supervisor) spawn(sl *slot) (*worker, error) {
	sl.starts++
	master, peer, err := ipc.Pair()
	if err != nil {
		return nil, fmt.Errorf("create the message channel: %w", err)
	}
	stdout, stderr := s.opts.Stdout, s.opts.Stderr
	var out OutputPipe
	if s.opts.Output != nil {
		if out, err = s.opts.Output(sl.id); err != nil {
			master.Close()
			peer.Close()
			return nil, fmt.Errorf("create the output pipes: %w", err)
		}
		stdout, stderr = out.Files()
	}
	files := []*os.File{s.devnull, stdout, stderr}
	files = append(files, sl.socks...) // BindMaster: fds 3, 4, ...
	files = append(files, peer)
	path := s.path
	env := s.env(sl.id)
	if s.opts.Bind == BindMaster {
		// LISTEN_PID is the worker's pid, unknown before the fork: start
		// this program as a shim that sets it and execs the command.
		path, env = "/proc/self/exe", append(env, envExecShim+"="+s.path)
	}
	attr := &os.ProcAttr{
		Dir:   s.opts.Dir,
		Env:   env,
		Files: files,
		Sys: &syscall.SysProcAttr{
			Setpgid:     true,            // Ctrl-C at a terminal reaches the master only
			Pdeathsig:   syscall.SIGKILL, // the master's death ends the worker (Go sets it after the change of user)
			Credential:  s.opts.Credential,
			AmbientCaps: s.opts.AmbientCaps,
		},
	}
	w := &worker{slot: sl, state: Starting}
	if s.opts.MaxRequests > 0 {
		w.limit = s.opts.MaxRequests
		if j := s.opts.MaxRequestsJitter; j > 0 {
			w.limit += rand.Uint64N(j + 1)
		}
	}
	proc, err := s.sys.start(path, s.argv, attr)
	peer.Close()
	if err != nil {
		master.Close()
		if out != nil {
			out.Close()
		}
		return nil, err
	}
	w.proc, w.pid, w.started = proc, proc.pid(), s.now()
	if out != nil {
		out.Start(w.pid)
		s.copyOutput(w, out)
	}
	s.byPID[w.pid] = w
	w.ch = ipc.NewChannel(master, s.channelOptions(w))
	s.watchChannel(w)
	s.log.Info().Int("worker", sl.id).Int("pid", w.pid).Msg("worker started")
	s.emit(Event{Type: EventFork, Worker: sl.id, PID: w.pid})
	return w, nil
}

// channelOptions are the options of w's channel.
func (s *Supervisor) channelOptions(w *worker) ipc.ChannelOptions {
	sl := w.slot
	return ipc.ChannelOptions{
		MaxMessage: s.opts.MaxMessage,
		QueueLen:   s.opts.QueueLen,
		QueueBytes: max(ipc.DefaultQueueBytes, 2*(s.opts.MaxMessage+1)),
		Budget:     s.budget,
		OnMessage:  func(m ipc.Message) { s.onMessage(w, m) },
		OnError: func(err error) {
			reason, what := "read", "reading the worker's channel failed"
			var fe *ipc.FrameError
			switch {
			case errors.As(err, &fe):
				reason, what = fe.Reason, "bad message from worker skipped"
			case errors.Is(err, io.ErrUnexpectedEOF):
				// Its last line, cut by its exit.
				reason, what = "truncated", "bad message from worker skipped"
			}
			if n, ok := s.warns.Allow(warnKey{sl.id, reason}, s.now()); ok {
				s.log.Warn().Int("worker", sl.id).Int("pid", w.pid).Str("reason", reason).Uint64("suppressed", n).Err(err).Msg(what)
			}
		},
	}
}

// watchChannel tells the loop when w's channel ends.
func (s *Supervisor) watchChannel(w *worker) {
	go func(ch *ipc.Channel) {
		<-ch.Done()
		s.post(loopEvent{kind: evDisconnect, w: w, ch: ch})
	}(w.ch)
}

// copyOutput starts copying a worker's output. It ends at the pipes' EOF,
// or when Run returns, with what the pipes hold then; Run waits for it.
func (s *Supervisor) copyOutput(w *worker, out OutputPipe) {
	w.out = out
	s.retiring.Add(1)
	go func() {
		defer s.retiring.Done()
		select {
		case <-out.Done():
		case <-s.done:
		}
		out.Close()
	}()
}

// online marks a started process as running.
func (s *Supervisor) online(w *worker) {
	w.state = Online
	s.emit(Event{Type: EventOnline, Worker: w.slot.id, PID: w.pid})
	if s.opts.Ready == ReadyListen && len(s.opts.Listeners) == 0 {
		s.setListening(w)
	}
}

// startFailed reports a process that could not be started in sl as a
// death: logged, and an event. The caller applies the policy, so a failed
// fork gets the backoff of any death.
func (s *Supervisor) startFailed(sl *slot, err error) *Death {
	d := &Death{Worker: sl.id, ExitCode: -1, Err: err}
	s.log.Error().Int("worker", sl.id).Err(err).Str("command", s.path).Msg("worker could not be started")
	s.emit(Event{Type: EventDeath, Worker: sl.id, Death: d})
	sl.lastDeath = d.Class()
	return d
}

// basicEnv names the variables workers get from the master without
// InheritEnv: what programs need to run, nothing that is likely a secret.
var basicEnv = []string{"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM"}

// env builds a worker's environment: the basics of the master's (or all
// of it with InheritEnv, less its SHOAL_ and NODE_CHANNEL_ variables), then
// Options.Env, then the worker contract. A later entry replaces an earlier
// one with the same name.
func (s *Supervisor) env(id int) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch {
		case strings.HasPrefix(k, "SHOAL_"), strings.HasPrefix(k, "NODE_CHANNEL_"), k == "NODE_UNIQUE_ID", slices.Contains(handOff, k):
		case s.opts.InheritEnv, slices.Contains(basicEnv, k), strings.HasPrefix(k, "LC_"):
			env = append(env, kv)
		}
	}
	for _, kv := range s.opts.Env {
		if !strings.Contains(kv, "=") {
			// A bare name passes the master's value.
			if v, ok := os.LookupEnv(kv); ok {
				env = append(env, kv+"="+v)
			}
			continue
		}
		env = append(env, kv)
	}
	ipcFD := "3"
	if s.opts.Bind == BindMaster {
		names := make([]string, len(s.opts.Listeners))
		for i, l := range s.opts.Listeners {
			names[i] = fdName(l)
		}
		ipcFD = strconv.Itoa(3 + len(s.opts.Listeners))
		env = append(env, "LISTEN_FDS="+strconv.Itoa(len(s.opts.Listeners)), "LISTEN_FDNAMES="+strings.Join(names, ":"))
	}
	env = append(env,
		EnvWorkerID+"="+strconv.Itoa(id),
		EnvWorkers+"="+strconv.Itoa(s.desired()),
		"NODE_APP_INSTANCE="+strconv.Itoa(id-1), // as PM2 numbers its instances
		EnvMasterPID+"="+strconv.Itoa(os.Getpid()),
		ipc.EnvFD+"="+ipcFD,
		"NODE_CHANNEL_FD="+ipcFD,
		"NODE_CHANNEL_SERIALIZATION_MODE=json",
	)
	if s.notify != nil {
		env = append(env, "NOTIFY_SOCKET="+s.notify.Addr())
	}
	if len(s.opts.Listeners) > 0 {
		env = append(env, EnvPort+"="+strconv.Itoa(s.opts.Listeners[0].Port), EnvPorts+"="+listenersText(s.opts.Listeners))
	}
	return dedupEnv(env)
}

// dedupEnv keeps only the last entry of each name.
func dedupEnv(env []string) []string {
	last := make(map[string]int, len(env))
	for i, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		last[k] = i
	}
	out := env[:0:0]
	for i, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		if last[k] == i {
			out = append(out, kv)
		}
	}
	return out
}
