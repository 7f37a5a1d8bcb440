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
	"sort"
	"sync"
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

// DefaultDir returns the directory of the default control sockets:
// /run/shoal for root; $XDG_RUNTIME_DIR for other users when it is set to
// an absolute path; otherwise shoal-UID in [os.TempDir]. The master and
// `shoal ctl` agree on it only when they run as the same user, and [Dial]
// talks only to a master of the caller's or root's: to control another
// user's master, run `shoal ctl` as that user. The shoal-UID directory in
// a shared temporary directory is predictable: if another user made it
// first, Listen and Dial refuse it, naming its owner.
func DefaultDir() string {
	uid := os.Getuid()
	if uid == 0 {
		return "/run/shoal"
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" && filepath.IsAbs(d) {
		return d
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("shoal-%d", uid))
}

// DefaultPath returns the default control socket of a master whose first
// listener is port: shoal-PORT.sock in [DefaultDir], so that two masters
// on other ports never share a socket; with port 0 (no listener),
// shoal.sock.
func DefaultPath(port int) string {
	if port == 0 {
		return filepath.Join(DefaultDir(), "shoal.sock")
	}
	return filepath.Join(DefaultDir(), fmt.Sprintf("shoal-%d.sock", port))
}

// Masters returns the control sockets at default paths, sorted: the
// masters of the caller's user (or root's, for root) that run, or that
// ended without removing theirs. `shoal ctl` uses the only one, or the
// only one a master listens on, or asks.
func Masters() ([]string, error) {
	dir := DefaultDir()
	var out []string
	for _, pattern := range []string{"shoal.sock", "shoal-*.sock"} {
		m, err := filepath.Glob(filepath.Join(dir, pattern))
		if err != nil {
			return nil, err
		}
		for _, p := range m {
			if fi, err := os.Lstat(p); err == nil && fi.Mode().Type() == os.ModeSocket {
				out = append(out, p)
			}
		}
	}
	sort.Strings(out)
	return out, nil
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
	path     string // absolute, as given
	ln       *net.UnixListener
	uid      int    // the master's uid
	w        *walk  // the socket's directory, open until Close
	dev, ino uint64 // the socket file's identity

	// Limits, variables for the tests.
	idle     time.Duration
	maxConns int

	mu      sync.Mutex
	closed  bool
	serving bool
	cancel  context.CancelFunc // ends Serve's context
	conns   map[*net.UnixConn]*connState

	closeOnce sync.Once
	closeErr  error
}

// connState is what the Server knows of one connection it serves; under
// Server.mu.
type connState struct {
	busy      bool      // a request is being served
	served    bool      // a request was answered on it
	idleSince time.Time // when it last became idle
	evicted   bool      // closed to make room for a new connection
}

// Listen creates the control socket at path and listens on it.
//
// Every directory and symlink on the way to path must belong to the
// master's user or root, and path's own directory must be writable by no
// one else, not even if it is sticky like /tmp; each is looked at with
// lstat, opened with O_NOFOLLOW, and missing directories are created mode
// 0700. The socket is bound under a temporary name in the same directory
// with its mode already 0600, so that it is never more open, and then
// renamed to path. A socket left at path by a master that is gone is
// replaced. A live one is never taken over: Listen fails, naming the pid
// that listens there. Listen holds a lock while it checks and renames, so
// two masters starting at once cannot both take the path: a flock on a
// file mode 0600 next to the socket, .NAME.lock, that only the master's
// user and root can open, and that is removed when released. A file at
// path that is not a socket is left alone and Listen fails. Paths longer
// than a Unix socket address holds work, through /proc/self/fd.
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
	w, err := walkPath(path, uid, true)
	if err != nil {
		var oe *ownerError
		var we *writableError
		if errors.As(err, &oe) || errors.As(err, &we) {
			return nil, fmt.Errorf("%w; pass --control with a path in a directory of your own that only you can write to", err)
		}
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			unix.Close(w.dirfd)
		}
	}()
	unlock, err := w.lock(uid)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := w.checkInTheWay(); err != nil {
		return nil, err
	}
	ln, st, err := w.bindRename()
	if err != nil {
		return nil, err
	}
	ok = true
	return &Server{
		path:     path,
		ln:       ln,
		uid:      uid,
		w:        w,
		dev:      st.Dev,
		ino:      st.Ino,
		idle:     idleTimeout,
		maxConns: maxConns,
		conns:    make(map[*net.UnixConn]*connState),
	}, nil
}

// lock takes an exclusive flock on the lock file of the socket, so that
// two masters never decide at once that a path is free, and a closing
// master never removes the socket of a master that has just replaced it.
// The lock file is mode 0600, so that only uid and root can open it and
// hold the lock (a flock on the directory could be taken by anyone who may
// read it); unlock removes it.
func (w *walk) lock(uid int) (unlock func(), err error) {
	name := "." + w.base + ".lock"
	path := filepath.Join(w.dir, name)
	deadline := time.Now().Add(lockTimeout)
	for {
		fd, err := unix.Openat(w.dirfd, name, unix.O_RDWR|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return nil, &fs.PathError{Op: "open", Path: path, Err: err}
		}
		var st, now unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			unix.Close(fd)
			return nil, &fs.PathError{Op: "fstat", Path: path, Err: err}
		}
		if !trusted(st.Uid, uid) {
			unix.Close(fd)
			return nil, &ownerError{path, "lock file", int(st.Uid), uid}
		}
		err = unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			// The holder before may have removed the file: the lock counts
			// only if it is on the file now at the name.
			if unix.Fstatat(w.dirfd, name, &now, unix.AT_SYMLINK_NOFOLLOW) == nil && now.Dev == st.Dev && now.Ino == st.Ino {
				return func() {
					unix.Unlinkat(w.dirfd, name, 0)
					unix.Close(fd) // closing releases the lock
				}, nil
			}
			unix.Close(fd)
			continue
		}
		unix.Close(fd)
		if err != unix.EWOULDBLOCK && err != unix.EINTR {
			return nil, &fs.PathError{Op: "flock", Path: path, Err: err}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("lock file %s stayed locked by another process of this user or root for %v", path, lockTimeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// checkInTheWay returns nil if the socket's name is free or holds a stale
// socket, which bindRename then replaces.
func (w *walk) checkInTheWay() error {
	var st unix.Stat_t
	err := unix.Fstatat(w.dirfd, w.base, &st, unix.AT_SYMLINK_NOFOLLOW)
	if err == unix.ENOENT {
		return nil
	}
	if err != nil {
		return &fs.PathError{Op: "lstat", Path: w.path(), Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return fmt.Errorf("a file that is not a socket is there (mode %v); it is left alone: remove it yourself, or pass --control with another path", fileMode(st.Mode))
	}
	addr, err := w.addr(w.base)
	if err != nil {
		return err
	}
	c, err := net.DialTimeout("unix", addr, time.Second)
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

// bindRename creates a listening socket at the socket's name: it binds
// one mode 0600 at a temporary name in the same directory and renames it
// into place. It returns the listener and the socket file's stat.
func (w *walk) bindRename() (*net.UnixListener, *unix.Stat_t, error) {
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
		tmp = fmt.Sprintf(".shoal-%08x.sock", rand.Uint32())
		var addr string
		addr, err = w.addr(tmp)
		if err != nil {
			unix.Close(fd)
			return nil, nil, err
		}
		err = unix.Bind(fd, &unix.SockaddrUnix{Name: addr})
		if err != unix.EADDRINUSE {
			break
		}
	}
	if err != nil {
		unix.Close(fd)
		return nil, nil, &fs.PathError{Op: "bind", Path: filepath.Join(w.dir, tmp), Err: err}
	}
	fail := func(err error) (*net.UnixListener, *unix.Stat_t, error) {
		unix.Unlinkat(w.dirfd, tmp, 0)
		return nil, nil, err
	}
	var st unix.Stat_t
	// Exactly 0600, whatever the umask took. The name is the socket's:
	// no one else may write to the directory.
	if err := unix.Fchmodat(w.dirfd, tmp, 0o600, 0); err != nil {
		unix.Close(fd)
		return fail(&fs.PathError{Op: "chmod", Path: filepath.Join(w.dir, tmp), Err: err})
	}
	if err := unix.Fstatat(w.dirfd, tmp, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		unix.Close(fd)
		return fail(&fs.PathError{Op: "lstat", Path: filepath.Join(w.dir, tmp), Err: err})
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
	if err := unix.Renameat(w.dirfd, tmp, w.dirfd, w.base); err != nil {
		ln.Close()
		return fail(&os.LinkError{Op: "rename", Old: filepath.Join(w.dir, tmp), New: w.path(), Err: err})
	}
	return ln, &st, nil
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
		// Check the peer first, so that only the master's user and root
		// take a place among the connections served.
		if cred, err := peerCred(c); err != nil {
			s.reply(c, Response{Error: fmt.Sprintf("control: %v", err)})
			c.Close()
			continue
		} else if int(cred.Uid) != s.uid && cred.Uid != 0 {
			s.reply(c, Response{Error: fmt.Sprintf("permission denied: uid %d is not the master's uid %d or root", cred.Uid, s.uid)})
			c.Close()
			continue
		}
		switch st := s.track(c); st {
		case nil:
			c.Close()
		case busyConn:
			s.reply(c, Response{Error: fmt.Sprintf("busy: the master already serves %d control connections, each in the middle of a request; try again", s.maxConns)})
			c.Close()
		default:
			wg.Go(func() {
				defer s.untrack(c)
				s.serveConn(ctx, c, st, h)
			})
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

// busyConn is what track returns when every connection is busy.
var busyConn = new(connState)

// track adds c to the connections being served and returns its state. If
// there are already maxConns, it makes room by closing the one that has
// been idle the longest; if none is idle, it returns busyConn. It returns
// nil if the server is closing.
func (s *Server) track(c *net.UnixConn) *connState {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	if len(s.conns) >= s.maxConns {
		var oldest *net.UnixConn
		for oc, st := range s.conns {
			if !st.busy && (oldest == nil || st.idleSince.Before(s.conns[oldest].idleSince)) {
				oldest = oc
			}
		}
		if oldest == nil {
			return busyConn
		}
		s.conns[oldest].evicted = true
		delete(s.conns, oldest)
		oldest.Close() // its goroutine sees it closed and ends
	}
	st := &connState{idleSince: time.Now()}
	s.conns[c] = st
	return st
}

func (s *Server) untrack(c *net.UnixConn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// begin marks st busy with a request, unless it was evicted.
func (s *Server) begin(st *connState) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	st.busy = !st.evicted
	return st.busy
}

// end marks st idle again.
func (s *Server) end(st *connState) {
	s.mu.Lock()
	st.busy, st.served = false, true
	st.idleSince = time.Now()
	s.mu.Unlock()
}

// serveConn serves the requests on c, one after the other, and closes it.
func (s *Server) serveConn(ctx context.Context, c *net.UnixConn, st *connState, h Handler) {
	defer c.Close()
	br := bufio.NewReader(c)
	for ctx.Err() == nil {
		c.SetReadDeadline(time.Now().Add(s.idle))
		line, err := readLine(br, MaxRequest)
		if errors.Is(err, errTooLong) {
			s.reply(c, Response{Error: fmt.Sprintf("control: bad request: a line of more than %d bytes (MaxRequest); closing the connection", MaxRequest)})
			return
		}
		if err != nil && (len(line) == 0 || !errors.Is(err, io.EOF)) {
			return // end of file, idle, evicted or closing; a last line without '\n' is served
		}
		if !s.begin(st) {
			return // evicted as it read: the request is not carried out
		}
		var resp Response
		if ctx.Err() != nil {
			resp = Response{Error: "control: the master is shutting down"}
		} else if req, perr := ParseRequest(line); perr != nil {
			resp = Response{Error: perr.Error()}
		} else {
			resp = h(context.WithValue(ctx, connKey{}, st), req)
		}
		ok := s.reply(c, resp)
		s.end(st)
		if !ok || err != nil {
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

// Detach stops the server without removing its socket file or closing its
// listening socket, and returns the socket, for a master that replaces its
// program in place: clients that connect meanwhile wait in the socket's
// queue, and the new program serves them after [FromFile]. The requests
// being served are answered first, and so is the first request of every
// connection accepted (Detach waits up to 2 seconds for them), except the
// one whose handler's context is ctx, if any; then every connection is
// closed for reading (a request already sent is still read and answered),
// and Serve returns once their handlers have. The caller owns the file.
func (s *Server) Detach(ctx context.Context) (*os.File, error) {
	f, err := s.ln.File()
	if err != nil {
		return nil, fmt.Errorf("control: detach unix %s: %w", s.path, err)
	}
	s.ln.SetUnlinkOnClose(false)
	own, _ := ctx.Value(connKey{}).(*connState)
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		// The handlers' context stays: an upgrade asked for on one of
		// these connections is still running.
		unix.Close(s.w.dirfd)
		s.ln.Close()
		for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(2 * time.Millisecond) {
			if !s.owedOtherThan(own) {
				break
			}
		}
		s.mu.Lock()
		for c, st := range s.conns {
			if st != own {
				c.CloseRead()
			}
		}
		s.mu.Unlock()
	})
	return f, nil
}

// connKey is the context key of a handler's connState.
type connKey struct{}

// owedOtherThan reports whether a connection other than own is serving a
// request, or has not had its first one answered: a client that connected
// sends its request at once, and may have sent it already.
func (s *Server) owedOtherThan(own *connState) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, st := range s.conns {
		if st != own && (st.busy || !st.served) {
			return true
		}
	}
	return false
}

// FromFile returns the server of the control socket at path over f, the
// listening socket a master's [Server.Detach] left before it replaced its
// program in place, and takes ownership of f. The path is checked as
// Listen checks it, and must still name the socket.
func FromFile(path string, f *os.File) (*Server, error) {
	defer f.Close()
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("control: listen unix %s: %w", path, err)
	}
	uid := os.Getuid()
	w, err := walkPath(abs, uid, false)
	if err != nil {
		return nil, fmt.Errorf("control: listen unix %s: %w", abs, err)
	}
	var st unix.Stat_t
	if err := unix.Fstatat(w.dirfd, w.base, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		unix.Close(w.dirfd)
		return nil, fmt.Errorf("control: listen unix %s: the socket file is gone: %w", abs, err)
	}
	l, err := net.FileListener(f)
	if err != nil {
		unix.Close(w.dirfd)
		return nil, fmt.Errorf("control: listen unix %s from fd %d: %w", abs, f.Fd(), err)
	}
	ul, ok := l.(*net.UnixListener)
	if !ok {
		l.Close()
		unix.Close(w.dirfd)
		return nil, fmt.Errorf("control: listen unix %s from fd %d: not a Unix socket", abs, f.Fd())
	}
	ul.SetUnlinkOnClose(false) // Close removes the file itself, if it is still this one
	return &Server{path: abs, ln: ul, uid: uid, w: w, dev: st.Dev, ino: st.Ino, idle: idleTimeout, maxConns: maxConns,
		conns: make(map[*net.UnixConn]*connState)}, nil
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
// created, and closes the socket's directory.
func (s *Server) removeSocket() error {
	defer unix.Close(s.w.dirfd)
	unlock, err := s.w.lock(s.uid)
	if errors.Is(err, fs.ErrNotExist) {
		return nil // the directory is gone
	}
	if err != nil {
		return err // a stale socket is left; the next Listen replaces it
	}
	defer unlock()
	var st unix.Stat_t
	if err := unix.Fstatat(s.w.dirfd, s.w.base, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if err == unix.ENOENT {
			return nil
		}
		return &fs.PathError{Op: "lstat", Path: s.path, Err: err}
	}
	if st.Dev != s.dev || st.Ino != s.ino {
		return nil // not ours any more
	}
	if err := unix.Unlinkat(s.w.dirfd, s.w.base, 0); err != nil && err != unix.ENOENT {
		return &fs.PathError{Op: "remove", Path: s.path, Err: err}
	}
	return nil
}
