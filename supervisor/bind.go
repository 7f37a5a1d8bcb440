package supervisor

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/shoal-sh/shoal/reuseport"
)

// BindMode says who binds the listeners.
type BindMode int

const (
	// BindWorker: each worker binds its listeners itself with
	// SO_REUSEPORT, the design's default.
	BindWorker BindMode = iota
	// BindMaster: for each slot the master opens one SO_REUSEPORT socket
	// per listener before the slot's first worker starts, and passes them
	// with systemd's socket-activation protocol: fds 3, 4, ... in listener
	// order, LISTEN_FDS, LISTEN_PID (the worker's own pid) and
	// LISTEN_FDNAMES ("tcp-8000:udp-8000"); the message channel follows
	// them (SHOAL_IPC_FD, NODE_CHANNEL_FD). A worker restarted at once, and
	// a reload's replacement, get the slot's sockets, so no listener closes
	// under them. A slot that will not get a worker soon (a backoff delay,
	// a give-up, a scale-down) closes its sockets, and opens new ones when
	// it gets a worker again.
	BindMaster
)

// String returns the mode as the command line spells it.
func (m BindMode) String() string {
	if m == BindMaster {
		return "master"
	}
	return "worker"
}

// MarshalText returns the mode as the command line spells it.
func (m BindMode) MarshalText() ([]byte, error) { return []byte(m.String()), nil }

// UnmarshalText parses "worker" or "master", in any case.
func (m *BindMode) UnmarshalText(text []byte) error {
	switch strings.ToLower(strings.TrimSpace(string(text))) {
	case "worker":
		*m = BindWorker
	case "master":
		*m = BindMaster
	default:
		return fmt.Errorf("bind mode %q: want worker or master", text)
	}
	return nil
}

// ErrBind is wrapped by the error Run returns when, with BindMaster, the
// master cannot open a listener at start: nothing was started.
var ErrBind = errors.New("supervisor: bind")

// Environment of the exec shim: a worker in BindMaster mode is started as
// this program with envExecShim naming the real command; the shim sets
// LISTEN_PID to its own pid, which is not known before the fork, and execs
// the command in the same process (see init).
const envExecShim = "SHOAL_EXEC_SHIM"

// handOff names the variables of systemd's socket activation, which the
// master sets for its workers in BindMaster mode and never passes on from
// its own environment.
var handOff = []string{"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", envExecShim}

func init() {
	if path := os.Getenv(envExecShim); path != "" {
		execShim(path)
	}
}

// execShim runs in a worker started in BindMaster mode, before anything
// else: it sets LISTEN_PID to this process's pid and execs path with the
// same arguments, file descriptors and environment. It does not return.
func execShim(path string) {
	env := make([]string, 0, len(os.Environ())+1)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, envExecShim+"=") && !strings.HasPrefix(kv, "LISTEN_PID=") {
			env = append(env, kv)
		}
	}
	env = append(env, "LISTEN_PID="+strconv.Itoa(os.Getpid()))
	err := syscall.Exec(path, os.Args, env)
	fmt.Fprintf(os.Stderr, "shoal: exec %s: %v\n", path, err)
	os.Exit(127)
}

// readySignText says how a worker counts as serving in BindMaster mode,
// for the one log line at start.
func readySignText(r ReadyMode) string {
	if r == ReadyListen {
		return "bind master: the master holds each slot's sockets; a worker serves once it waits on them (an epoll watch, or a thread in accept or a receive, read from /proc). For a worker that waits in select or poll, give --ready message or notify"
	}
	return "bind master: the master holds each slot's sockets; a worker serves once it says it is ready (--ready " + r.String() + ")"
}

// holders names who holds the listeners' ports, for the error when the
// master cannot bind them: the sockets there, their owners and processes.
func (s *Supervisor) holders() string {
	var parts []string
	for _, l := range s.opts.Listeners {
		socks, err := s.sys.sockets(l)
		if err != nil || len(socks) == 0 {
			continue
		}
		inodes := make([]uint64, len(socks))
		for i, sk := range socks {
			inodes[i] = sk.Inode
		}
		pids := reuseport.Holders(inodes)
		for _, sk := range socks {
			who := fmt.Sprintf("%s is held by uid %d", l, sk.UID)
			if p := pids[sk.Inode]; len(p) > 0 {
				who += fmt.Sprintf(", pid %v", p)
			}
			parts = append(parts, who)
		}
	}
	if len(parts) == 0 {
		return ""
	}
	return "; " + strings.Join(parts, "; ") + " (a socket bound without SO_REUSEPORT, or by another user, keeps others out: stop it, or use another port)"
}

// fdName is a listener's name in LISTEN_FDNAMES: systemd separates names
// with colons, so "tcp:8000" is "tcp-8000" there.
func fdName(l Listener) string { return l.Network + "-" + strconv.Itoa(l.Port) }

// openSockets gives sl one socket per listener, unless it has them.
func (s *Supervisor) openSockets(sl *slot) error {
	if s.opts.Bind != BindMaster || sl.socks != nil {
		return nil
	}
	socks := make([]*os.File, 0, len(s.opts.Listeners))
	inodes := make([]uint64, 0, len(s.opts.Listeners))
	for _, l := range s.opts.Listeners {
		f, ino, err := s.sys.listen(l, s.opts.Host)
		if err != nil {
			for _, f := range socks {
				f.Close()
			}
			return err
		}
		socks, inodes = append(socks, f), append(inodes, ino)
	}
	sl.socks, sl.sockInodes = socks, inodes
	return nil
}

// closeSockets closes the master's copies of sl's sockets: a worker that
// holds them keeps them open until it exits. With tcp_migrate_req=1 the
// connections waiting in a closed socket's queue move to the others;
// without, they are reset.
func (s *Supervisor) closeSockets(sl *slot) {
	for _, f := range sl.socks {
		f.Close()
	}
	sl.socks, sl.sockInodes = nil, nil
}
