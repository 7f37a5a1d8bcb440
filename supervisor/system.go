package supervisor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/reuseport"
)

// system is the supervisor's seam to the operating system: starting,
// signalling and reaping processes, asking the kernel who listens, and the
// clock. Only the supervisor's loop calls it, but for now, which the
// message readers call too. realSystem is what Run uses; the state-machine
// tests put a fake in its place that forks nothing.
type system interface {
	// now reads the clock. Real readings carry the monotonic clock, so a
	// wall-clock jump never moves a backoff or an uptime.
	now() time.Time
	// setup prepares the system before the first start; childExited then
	// ticks when a child may have exited, until close.
	setup(subreaper bool) error
	childExited() <-chan struct{}
	close()
	// start starts path with argv and attr.
	start(path string, argv []string, attr *os.ProcAttr) (process, error)
	// reap collects the exits of pids that have exited, without waiting.
	// With all, it collects any child's (orphans are a subreaper's too),
	// reporting them by pid.
	reap(pids []int, all bool) []exit
	// sockets returns the kernel's sockets of a listener that count as
	// serving it: TCP sockets in LISTEN state, bound UDP sockets; port 0
	// means every port. inodes returns the socket inodes that pid and its
	// descendants hold.
	sockets(l Listener) ([]reuseport.Socket, error)
	inodes(pid int) (map[uint64]struct{}, error)
	// rss returns pid's resident memory in bytes.
	rss(pid int) (uint64, error)
	// listen opens one SO_REUSEPORT socket of l on host (all addresses
	// when empty), in blocking mode as systemd passes them, for a worker
	// to inherit; it returns the socket's inode.
	listen(l Listener, host string) (*os.File, uint64, error)
	// waiting returns the inodes of the sockets that pid's process tree
	// waits on: watched by one of its epoll sets, or the object of an
	// accept or a receive a thread of it is blocked in.
	waiting(pid int) (map[uint64]struct{}, error)
	// children lists the running children of the master, with their
	// command lines; kill signals one of them, and its process group when
	// it leads one.
	children() []child
	kill(pid int, sig syscall.Signal) error
	// parent returns pid's parent, or 0 when it is gone.
	parent(pid int) int
	// adopt returns a handle on pid, a child this process inherited
	// from the program it was before an in-place upgrade.
	adopt(pid int) process
	// exec replaces the program of this process with path, from the
	// thread that forks the workers; it returns only when it failed.
	exec(path string, argv, env []string) error
}

// child is a running child process of the master.
type child struct {
	pid int
	cmd string // its command line, for logs
}

// process is one started process, as the system knows it.
type process interface {
	pid() int
	// signal sends sig to the process's group, or to the process alone
	// when it left its group.
	signal(sig syscall.Signal) error
	// release frees what the handle holds, once the process is reaped or
	// abandoned.
	release()
}

// exit is one reaped child.
type exit struct {
	pid    int
	status unix.WaitStatus
}

// realSystem is the operating system: processes are forked from one
// locked OS thread, exits are seen through SIGCHLD and wait4, sockets
// through netlink socket diagnostics.
type realSystem struct {
	sigchld chan os.Signal
	tick    chan struct{}
	stop    chan struct{}
	done    chan struct{}
	forks   chan forkReq
	forked  chan struct{} // closed when the forker's thread ends
	shared  bool          // forks is Main's: the main thread forks
}

type forkReq struct {
	path  string
	argv  []string
	attr  *os.ProcAttr
	env   []string // exec only
	exec  bool     // execve in place of a fork
	reply chan forkReply
}

// do runs q on the calling thread.
func (q forkReq) do() {
	if q.exec {
		q.reply <- forkReply{err: syscall.Exec(q.path, q.argv, q.env)}
		return
	}
	p, err := os.StartProcess(q.path, q.argv, q.attr)
	q.reply <- forkReply{p, err}
}

type forkReply struct {
	proc *os.Process
	err  error
}

func (*realSystem) now() time.Time { return time.Now() }

func (r *realSystem) setup(subreaper bool) error {
	// Register for SIGCHLD before anything is forked, so no exit is missed.
	r.sigchld = make(chan os.Signal, 1)
	signal.Notify(r.sigchld, syscall.SIGCHLD)
	if subreaper {
		if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
			signal.Stop(r.sigchld)
			return fmt.Errorf("supervisor: become child subreaper: %w", err)
		}
	}
	r.tick, r.stop, r.done = make(chan struct{}, 1), make(chan struct{}), make(chan struct{})
	go func() {
		defer close(r.done)
		for {
			select {
			case <-r.sigchld:
				select {
				case r.tick <- struct{}{}:
				default:
				}
			case <-r.stop:
				return
			}
		}
	}()
	// The forker: Pdeathsig fires when the thread that forked a child
	// exits, not when the process does. Forking from goroutines that Go
	// may move between short-lived threads would kill workers at random,
	// so every fork runs on one thread that lives as long as the loop.
	// With Main, the process's main thread forks, which outlives
	// everything and survives an in-place upgrade.
	if main := mainForks.Load(); main != nil {
		r.forks, r.shared = *main, true
		return nil
	}
	r.forks, r.forked = make(chan forkReq), make(chan struct{})
	go func() {
		// Never unlocked: when this goroutine returns, after every worker
		// is gone, its thread exits with it.
		runtime.LockOSThread()
		defer close(r.forked)
		for q := range r.forks {
			q.do()
		}
	}()
	return nil
}

func (r *realSystem) childExited() <-chan struct{} { return r.tick }

func (r *realSystem) close() {
	if !r.shared {
		close(r.forks)
		<-r.forked
	}
	signal.Stop(r.sigchld)
	close(r.stop)
	<-r.done
}

func (r *realSystem) start(path string, argv []string, attr *os.ProcAttr) (process, error) {
	reply := make(chan forkReply, 1)
	r.forks <- forkReq{path: path, argv: argv, attr: attr, reply: reply}
	rep := <-reply
	if rep.err != nil {
		return nil, fmt.Errorf("start %s: %w", path, rep.err)
	}
	return osProcess{rep.proc}, nil
}

func (r *realSystem) exec(path string, argv, env []string) error {
	reply := make(chan forkReply, 1)
	r.forks <- forkReq{path: path, argv: argv, env: env, exec: true, reply: reply}
	if err := (<-reply).err; err != nil {
		return fmt.Errorf("execve %s: %w", path, err)
	}
	return nil
}

func (*realSystem) adopt(pid int) process { return pidProcess(pid) }

func (*realSystem) reap(pids []int, all bool) []exit {
	var out []exit
	if all {
		for {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			if err == unix.EINTR {
				continue
			}
			if err != nil || pid <= 0 {
				break
			}
			out = append(out, exit{pid, ws})
		}
	}
	for _, pid := range pids {
		var ws unix.WaitStatus
		got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		for err == unix.EINTR {
			got, err = unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		}
		if got == pid {
			out = append(out, exit{pid, ws})
		}
	}
	return out
}

func (*realSystem) sockets(l Listener) ([]reuseport.Socket, error) {
	if l.Network == "udp" {
		return reuseport.UDPSockets(l.Port)
	}
	return reuseport.Listeners(l.Port)
}

func (*realSystem) inodes(pid int) (map[uint64]struct{}, error) { return reuseport.Inodes(pid) }

// rss reads a process's resident set size from /proc.
func (*realSystem) rss(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/statm")
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0, fmt.Errorf("supervisor: /proc/%d/statm: %q", pid, b)
	}
	pages, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return 0, err
	}
	return pages * uint64(os.Getpagesize()), nil
}

// children scans /proc for the processes whose parent is the master.
func (*realSystem) children() []child {
	self := os.Getpid()
	dir, err := os.Open("/proc")
	if err != nil {
		return nil
	}
	defer dir.Close()
	names, _ := dir.Readdirnames(-1)
	var out []child
	buf := make([]byte, 512)
	for _, name := range names {
		pid, err := strconv.Atoi(name)
		if err != nil || pid == self {
			continue
		}
		f, err := os.Open("/proc/" + name + "/stat")
		if err != nil {
			continue
		}
		n, _ := f.Read(buf)
		f.Close()
		if ppid, ok := parseStatPPid(buf[:n]); !ok || ppid != self {
			continue
		}
		cmd, _ := os.ReadFile("/proc/" + name + "/cmdline")
		out = append(out, child{pid, strings.TrimSpace(strings.ReplaceAll(string(cmd), "\x00", " "))})
	}
	return out
}

// parseStatPPid reads the parent pid from /proc/PID/stat: the fourth field,
// after the command in parentheses (which may hold spaces and parentheses).
func parseStatPPid(b []byte) (int, bool) {
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 2 {
		return 0, false
	}
	ppid, err := strconv.Atoi(f[1])
	return ppid, err == nil
}

func (*realSystem) parent(pid int) int {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	ppid, _ := parseStatPPid(b)
	return ppid
}

// kill signals a child by pid. Safe while it is not reaped: only the
// supervisor's loop reaps, so the pid cannot have been reused.
func (*realSystem) kill(pid int, sig syscall.Signal) error {
	if err := unix.Kill(-pid, sig); err == nil {
		return nil
	}
	if err := unix.Kill(pid, sig); err != nil && err != unix.ESRCH {
		return err
	}
	return nil
}

func (*realSystem) listen(l Listener, host string) (*os.File, uint64, error) {
	addr := net.JoinHostPort(host, strconv.Itoa(l.Port))
	var lc reuseport.ListenConfig
	var c syscall.Conn
	var closer io.Closer
	if l.Network == "udp" {
		pc, err := lc.ListenPacket(context.Background(), "udp", addr)
		if err != nil {
			return nil, 0, fmt.Errorf("%w: %w", ErrBind, err)
		}
		c, closer = pc.(syscall.Conn), pc
	} else {
		ln, err := lc.Listen(context.Background(), "tcp", addr)
		if err != nil {
			return nil, 0, fmt.Errorf("%w: %w", ErrBind, err)
		}
		c, closer = ln.(syscall.Conn), ln
	}
	defer closer.Close()
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, 0, err
	}
	dup := -1
	var derr error
	rc.Control(func(fd uintptr) { dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 3) })
	if derr != nil {
		return nil, 0, fmt.Errorf("supervisor: %s: dup the socket: %w", l, derr)
	}
	// Blocking, as systemd passes sockets; an os.File made from a
	// blocking descriptor never changes its mode, so the master never
	// changes the mode its workers chose for the socket they share.
	unix.SetNonblock(dup, false)
	var st unix.Stat_t
	if err := unix.Fstat(dup, &st); err != nil {
		unix.Close(dup)
		return nil, 0, err
	}
	return os.NewFile(uintptr(dup), "shoal "+l.String()), st.Ino, nil
}

func (*realSystem) waiting(pid int) (map[uint64]struct{}, error) { return reuseport.Waiting(pid) }

// osProcess is a started child. Its pid is safe to signal until it is
// reaped: only the supervisor's loop reaps, so the pid and its process
// group cannot have been reused while the loop holds it.
type osProcess struct{ p *os.Process }

func (o osProcess) signal(sig syscall.Signal) error {
	if err := unix.Kill(-o.p.Pid, sig); err == nil {
		return nil
	}
	// The worker left its process group: signal the process alone.
	if err := o.p.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	return nil
}

func (o osProcess) pid() int { return o.p.Pid }

func (o osProcess) release() { o.p.Release() }

// pidProcess is a child inherited across an in-place upgrade, known by its
// pid alone. Like osProcess, it is safe to signal until reaped.
type pidProcess int

func (p pidProcess) pid() int { return int(p) }

func (p pidProcess) signal(sig syscall.Signal) error {
	if err := unix.Kill(-int(p), sig); err == nil {
		return nil
	}
	if err := unix.Kill(int(p), sig); err != nil && err != unix.ESRCH {
		return err
	}
	return nil
}

func (pidProcess) release() {}
