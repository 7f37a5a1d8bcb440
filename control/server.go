package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Limits of a Server.
const (
	idleTimeout  = 30 * time.Second // a connection that sends nothing this long is closed
	writeTimeout = 10 * time.Second // a response not taken in this long ends its connection
	maxConns     = 16               // connections served at once; more are answered busy
	lockTimeout  = 5 * time.Second  // how long Listen and Close wait for the directory lock
	backlog      = 64               // the listen backlog
)

// DefaultPath returns the control socket's path when none is given:
// /run/shoal/shoal.sock for root; $XDG_RUNTIME_DIR/shoal.sock for other
// users when XDG_RUNTIME_DIR is set to an absolute path; otherwise
// shoal-UID/shoal.sock in [os.TempDir]. The master and `shoal ctl` agree on
// it only when they run as the same user: root controlling another user's
// master passes the path.
func DefaultPath() string {
	uid := os.Getuid()
	if uid == 0 {
		return "/run/shoal/shoal.sock"
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" && filepath.IsAbs(d) {
		return filepath.Join(d, "shoal.sock")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("shoal-%d", uid), "shoal.sock")
}

// A Handler carries out one request and returns its response. It runs on
// the request's connection's goroutine, so a slow handler holds up only its
// own connection; handlers for different connections may run at once. ctx
// is done when the Server closes: a handler must then return soon, since
// [Server.Serve] waits for it. ctx is not done when the client goes away,
// so a reload that has begun is not cut short.
type Handler func(ctx context.Context, req Request) Response

// A Server is a listening control socket. Create one with [Listen].
type Server struct {
	path     string // absolute
	ln       *net.UnixListener
	uid      int    // the master's uid
	dev, ino uint64 // the socket file's identity

	// Limits, variables for the tests.
	idle     time.Duration
	maxConns int

	mu      sync.Mutex
	closed  bool
	serving bool
	cancel  context.CancelFunc // ends Serve's context
	conns   map[*net.UnixConn]struct{}

	closeOnce sync.Once
	closeErr  error
}

// Listen creates the control socket at path and listens on it.
//
// The socket is bound under a temporary name in the same directory with
// its mode already 0600, so that it is never more open, and then renamed
// to path. The directory is created mode 0700 if missing; it must belong
// to the master's user or root and be writable by no one else, unless it
// is sticky like /tmp. A socket left at path by a master that is gone is
// replaced. A live one is never taken over: Listen fails, naming the pid
// that listens there; Listen holds a flock on the directory while it
// checks and renames, so two masters starting at once cannot both take
// the path. A file at path that is not a socket is left alone and Listen
// fails. Paths longer than a Unix socket address holds work,
// through /proc/self/fd.
func Listen(path string) (*Server, error) {
	if path == "" {
		return nil, errors.New("control: listen unix: empty path")
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("control: listen unix %s: %w", path, err)
	}
	s, err := listen(abs)
	if err != nil {
		return nil, fmt.Errorf("control: listen unix %s: %w", abs, err)
	}
	return s, nil
}

func listen(path string) (*Server, error) {
	uid := os.Getuid()
	dir := filepath.Dir(path)
	if err := makeDir(dir); err != nil {
		return nil, err
	}
	if err := checkDir(dir, uid); err != nil {
		return nil, err
	}
	unlock, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := checkInTheWay(path); err != nil {
		return nil, err
	}
	ln, st, err := bindRename(path)
	if err != nil {
		return nil, err
	}
	return &Server{
		path:     path,
		ln:       ln,
		uid:      uid,
		dev:      st.Dev,
		ino:      st.Ino,
		idle:     idleTimeout,
		maxConns: maxConns,
		conns:    make(map[*net.UnixConn]struct{}),
	}, nil
}

// makeDir creates dir mode 0700 if it does not exist.
func makeDir(dir string) error {
	if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
		return nil // checkDir reports other errors
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	return os.Chmod(dir, 0o700) // whatever the umask
}

// checkDir makes sure that no one but uid and root can put a file of their
// own at a name in dir.
func checkDir(dir string, uid int) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory", dir)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if int(st.Uid) != uid && st.Uid != 0 {
		return fmt.Errorf("directory %s belongs to uid %d, not to this user (uid %d) or root: pass --control with a path in a directory of your own", dir, st.Uid, uid)
	}
	if fi.Mode().Perm()&0o022 != 0 && fi.Mode()&fs.ModeSticky == 0 {
		return fmt.Errorf("directory %s is writable by others (mode %v), so anyone could replace the socket: pass --control with a path in a directory only you can write to", dir, fi.Mode())
	}
	return nil
}

// lockDir takes an exclusive flock on dir, so that two masters never
// decide at once that a path is free, and a closing master never removes
// the socket of a master that has just replaced it. The lock is held only
// that long.
func lockDir(dir string) (unlock func(), err error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: dir, Err: err}
	}
	deadline := time.Now().Add(lockTimeout)
	for {
		err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { unix.Close(fd) }, nil // closing releases the lock
		}
		if err != unix.EWOULDBLOCK && err != unix.EINTR {
			unix.Close(fd)
			return nil, &fs.PathError{Op: "flock", Path: dir, Err: err}
		}
		if time.Now().After(deadline) {
			unix.Close(fd)
			return nil, fmt.Errorf("directory %s stayed locked by another process for %v", dir, lockTimeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// checkInTheWay returns nil if path is free or holds a stale socket, which
// bindRename then replaces.
func checkInTheWay(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("a file that is not a socket is there (mode %v); it is left alone: remove it yourself, or pass --control with another path", fi.Mode())
	}
	addr, done, err := sockAddr(path)
	if err != nil {
		return err
	}
	c, err := net.DialTimeout("unix", addr, time.Second)
	done()
	switch {
	case err == nil:
		who := "another shoal master is running there"
		if cred, err := peerCred(c.(*net.UnixConn)); err == nil {
			who = fmt.Sprintf("another shoal master is running there (pid %d)", cred.Pid)
		}
		c.Close()
		return errors.New(who + ": stop it, or pass --control with another path")
	case errors.Is(err, unix.ECONNREFUSED):
		return nil // its master is gone
	case errors.Is(err, unix.EAGAIN):
		return errors.New("another shoal master is running there (its connection queue is full): stop it, or pass --control with another path")
	}
	return fmt.Errorf("cannot tell whether the socket there is in use: %w", err)
}

// bindRename creates a listening socket at path: it binds one mode 0600 at
// a temporary name next to path and renames it into place. It returns the
// listener and the socket file's stat.
func bindRename(path string) (*net.UnixListener, *unix.Stat_t, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, os.NewSyscallError("socket", err)
	}
	// On Linux bind creates the file with the socket's own mode, less the
	// umask: set it first, so the file is never more open than 0600.
	if err := unix.Fchmod(fd, 0o600); err != nil {
		unix.Close(fd)
		return nil, nil, os.NewSyscallError("fchmod", err)
	}
	var tmp string
	for range 5 {
		tmp = filepath.Join(filepath.Dir(path), fmt.Sprintf(".shoal-%08x.sock", rand.Uint32()))
		var addr string
		var done func()
		addr, done, err = sockAddr(tmp)
		if err != nil {
			unix.Close(fd)
			return nil, nil, err
		}
		err = unix.Bind(fd, &unix.SockaddrUnix{Name: addr})
		done()
		if err != unix.EADDRINUSE {
			break
		}
	}
	if err != nil {
		unix.Close(fd)
		return nil, nil, &fs.PathError{Op: "bind", Path: tmp, Err: err}
	}
	fail := func(err error) (*net.UnixListener, *unix.Stat_t, error) {
		os.Remove(tmp)
		return nil, nil, err
	}
	var st unix.Stat_t
	if err := os.Chmod(tmp, 0o600); err != nil { // exactly 0600, whatever the umask took
		unix.Close(fd)
		return fail(err)
	}
	if err := unix.Lstat(tmp, &st); err != nil {
		unix.Close(fd)
		return fail(&fs.PathError{Op: "lstat", Path: tmp, Err: err})
	}
	if err := unix.Listen(fd, backlog); err != nil {
		unix.Close(fd)
		return fail(os.NewSyscallError("listen", err))
	}
	f := os.NewFile(uintptr(fd), tmp)
	l, err := net.FileListener(f)
	f.Close()
	if err != nil {
		return fail(err)
	}
	ln := l.(*net.UnixListener)
	ln.SetUnlinkOnClose(false) // Close removes the file, if it is still ours
	if err := os.Rename(tmp, path); err != nil {
		ln.Close()
		return fail(err)
	}
	return ln, &st, nil
}

// sockAddr returns the address by which to bind or connect to the socket
// at path. A path too long for a Unix socket address is reached through
// the directory's file descriptor, which stays open until done is called.
func sockAddr(path string) (addr string, done func(), err error) {
	if len(path) < len(unix.RawSockaddrUnix{}.Path) {
		return path, func() {}, nil
	}
	dir, base := filepath.Split(path)
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", nil, &fs.PathError{Op: "open", Path: dir, Err: err}
	}
	addr = fmt.Sprintf("/proc/self/fd/%d/%s", fd, base)
	if len(addr) >= len(unix.RawSockaddrUnix{}.Path) {
		unix.Close(fd)
		return "", nil, fmt.Errorf("socket name %q is too long for a Unix socket address", base)
	}
	return addr, func() { unix.Close(fd) }, nil
}

// peerCred returns the credentials of c's peer: for a connection accepted
// by a server, those of the client; for a client, those of the process
// that listened.
func peerCred(c *net.UnixConn) (*unix.Ucred, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var serr error
	if err := rc.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	if serr != nil {
		return nil, os.NewSyscallError("getsockopt SO_PEERCRED", serr)
	}
	return cred, nil
}

// Path returns the absolute path of the socket.
func (s *Server) Path() string { return s.path }

// Serve accepts connections and hands their requests to h until ctx is
// done or Close is called, then returns nil; it closes the Server itself
// when ctx is done. Each connection has its own goroutine, so a slow
// handler holds up no other connection. Before it returns, Serve closes
// every connection and waits for the handlers that are running, whose
// context it cancels, and for their responses to be written. Serve may be
// called once.
func (s *Server) Serve(ctx context.Context, h Handler) error {
	if h == nil {
		return fmt.Errorf("control: serve unix %s: nil handler", s.path)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	if s.serving {
		s.mu.Unlock()
		return fmt.Errorf("control: serve unix %s: already serving", s.path)
	}
	s.serving = true
	ctx, cancel := context.WithCancel(ctx)
	s.cancel = cancel
	s.mu.Unlock()
	defer cancel()
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()

	var wg sync.WaitGroup
	var err error
	var delay time.Duration
	for {
		c, aerr := s.ln.AcceptUnix()
		if aerr != nil {
			if s.isClosed() {
				break
			}
			if retry(aerr) {
				// Out of file descriptors or memory: wait, as net/http does.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				select {
				case <-time.After(delay):
				case <-ctx.Done():
				}
				continue
			}
			err = fmt.Errorf("control: accept unix %s: %w", s.path, aerr)
			break
		}
		delay = 0
		switch s.track(c) {
		case tracked:
			wg.Go(func() {
				defer s.untrack(c)
				s.serveConn(ctx, c, h)
			})
		case busy:
			s.reply(c, Response{Error: fmt.Sprintf("busy: the master already serves %d control connections; try again", s.maxConns)})
			c.Close()
		case closing:
			c.Close()
		}
	}
	s.Close() // a failed accept too: ctl then says that no master is there
	wg.Wait()
	return err
}

// retry reports whether Accept may succeed later after failing with err.
func retry(err error) bool {
	for _, e := range []error{unix.EMFILE, unix.ENFILE, unix.ENOBUFS, unix.ENOMEM, unix.ECONNABORTED, unix.EINTR} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

const (
	tracked = iota
	busy
	closing
)

// track adds c to the connections being served, unless there are too many
// or the server is closing.
func (s *Server) track(c *net.UnixConn) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.closed:
		return closing
	case len(s.conns) >= s.maxConns:
		return busy
	}
	s.conns[c] = struct{}{}
	return tracked
}

func (s *Server) untrack(c *net.UnixConn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// serveConn serves the requests on c, one after the other, and closes it.
func (s *Server) serveConn(ctx context.Context, c *net.UnixConn, h Handler) {
	defer c.Close()
	cred, err := peerCred(c)
	if err != nil {
		s.reply(c, Response{Error: fmt.Sprintf("control: %v", err)})
		return
	}
	if int(cred.Uid) != s.uid && cred.Uid != 0 {
		s.reply(c, Response{Error: fmt.Sprintf("permission denied: uid %d is not the master's uid %d or root", cred.Uid, s.uid)})
		return
	}
	br := bufio.NewReader(c)
	for ctx.Err() == nil {
		c.SetReadDeadline(time.Now().Add(s.idle))
		line, err := readLine(br, MaxRequest)
		if errors.Is(err, errTooLong) {
			s.reply(c, Response{Error: fmt.Sprintf("control: bad request: a line of more than %d bytes (MaxRequest); closing the connection", MaxRequest)})
			return
		}
		if err != nil && (len(line) == 0 || !errors.Is(err, io.EOF)) {
			return // end of file, idle, or closing; a last line without '\n' is served
		}
		var resp Response
		if ctx.Err() != nil {
			resp = Response{Error: "control: the master is shutting down"}
		} else if req, perr := ParseRequest(line); perr != nil {
			resp = Response{Error: perr.Error()}
		} else {
			resp = h(ctx, req)
		}
		if !s.reply(c, resp) || err != nil {
			return
		}
	}
}

// reply writes resp to c as one line and reports whether it could.
func (s *Server) reply(c *net.UnixConn, resp Response) bool {
	b, err := json.Marshal(resp)
	if err != nil { // a Result that is not JSON
		b, _ = json.Marshal(Response{Error: fmt.Sprintf("control: the master's response cannot be encoded: %v", err)})
	}
	c.SetWriteDeadline(time.Now().Add(writeTimeout))
	_, err = c.Write(append(b, '\n'))
	return err == nil
}

var errTooLong = errors.New("line too long")

// readLine reads one line from br and returns it without its line end. A
// last line without '\n' is returned with the error that ended it. It
// returns errTooLong as soon as the line is longer than max bytes, not
// counting a "\n" or "\r\n" line end.
func readLine(br *bufio.Reader, max int) ([]byte, error) {
	var line []byte
	for {
		frag, err := br.ReadSlice('\n')
		if len(line)+len(frag) > max+2 {
			return nil, errTooLong
		}
		line = append(line, frag...)
		if err == bufio.ErrBufferFull {
			continue
		}
		if err == nil {
			line = line[:len(line)-1]
			if n := len(line); n > 0 && line[n-1] == '\r' {
				line = line[:n-1]
			}
		}
		if len(line) > max {
			return nil, errTooLong
		}
		return line, err
	}
}

// Close stops the server: it removes the socket file if it is still the
// one Listen created (another master may have replaced it since), closes
// the listener, cancels the handlers' context and closes every
// connection for reading. A response being made is still written. Close
// does not wait for Serve to return. It may be called more than once and
// from a Handler.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		cancel := s.cancel
		conns := make([]*net.UnixConn, 0, len(s.conns))
		for c := range s.conns {
			conns = append(conns, c)
		}
		s.mu.Unlock()
		if cancel != nil {
			cancel()
		}
		rmErr := s.removeSocket()
		lnErr := s.ln.Close()
		for _, c := range conns {
			c.CloseRead()
		}
		if err := errors.Join(rmErr, lnErr); err != nil {
			s.closeErr = fmt.Errorf("control: close unix %s: %w", s.path, err)
		}
	})
	return s.closeErr
}

// removeSocket removes the socket file if it is still the one Listen
// created.
func (s *Server) removeSocket() error {
	unlock, err := lockDir(filepath.Dir(s.path))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err // a stale socket is left; the next Listen replaces it
	}
	defer unlock()
	var st unix.Stat_t
	if err := unix.Lstat(s.path, &st); err != nil {
		if err == unix.ENOENT {
			return nil
		}
		return &fs.PathError{Op: "lstat", Path: s.path, Err: err}
	}
	if st.Dev != s.dev || st.Ino != s.ino {
		return nil // not ours any more
	}
	if err := os.Remove(s.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
