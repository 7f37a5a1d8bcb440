package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// maxResponse is the limit on one response line: a status of many workers
// is much longer than a request.
const maxResponse = 64 << 20

// A Client is a connection to a master's control socket. Its methods may be
// called from several goroutines; requests go one at a time.
type Client struct {
	path string
	conn *net.UnixConn
	br   *bufio.Reader

	turn   chan struct{} // holds a token while a request is under way
	broken error         // the error that left the connection out of step; under turn
}

// Dial connects to the control socket at path. Before it connects, it
// checks that no one but the caller and root could have put the socket
// there: every directory and symlink on the way must belong to the caller
// or root, the socket's own directory must be writable by no one else, and
// the socket must belong to the caller or root; each is looked at without
// following a symlink that has not been checked. Once connected, it checks
// with SO_PEERCRED that the process that listens is the caller's or root's,
// so a request never reaches another user's process. Its errors say what
// is wrong and what to do: no socket there, a stale socket whose master is
// gone, no permission, or a socket that belongs to someone else, naming the
// file and its owner; they wrap the errno, if any.
func Dial(path string) (*Client, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("control: dial unix %s: %w", path, err)
	}
	uid := os.Getuid()
	w, err := walkPath(abs, uid, false)
	if err != nil {
		return nil, dialError(path, err)
	}
	defer unix.Close(w.dirfd)
	var st unix.Stat_t
	if err := unix.Fstatat(w.dirfd, w.base, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return nil, dialError(path, &fs.PathError{Op: "lstat", Path: w.path(), Err: err})
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return nil, fmt.Errorf("control: dial unix %s: not a socket (mode %v): %w", path, fileMode(st.Mode), unix.ECONNREFUSED)
	}
	if !trusted(st.Uid, uid) {
		return nil, dialError(path, &ownerError{w.path(), "socket", int(st.Uid), uid})
	}
	addr, err := w.addr(w.base)
	if err != nil {
		return nil, fmt.Errorf("control: dial unix %s: %w", path, err)
	}
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: addr, Net: "unix"})
	if err != nil {
		return nil, dialError(path, err)
	}
	cred, err := peerCred(c)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("control: dial unix %s: %w", path, err)
	}
	if !trusted(cred.Uid, uid) {
		c.Close()
		return nil, fmt.Errorf("control: dial unix %s: %w", path, &peerError{int(cred.Pid), int(cred.Uid), uid})
	}
	return &Client{path: path, conn: c, br: bufio.NewReader(c), turn: make(chan struct{}, 1)}, nil
}

// fileMode converts a stat mode to an fs.FileMode, for error messages.
func fileMode(m uint32) fs.FileMode {
	mode := fs.FileMode(m & 0o777)
	switch m & unix.S_IFMT {
	case unix.S_IFDIR:
		mode |= fs.ModeDir
	case unix.S_IFLNK:
		mode |= fs.ModeSymlink
	case unix.S_IFSOCK:
		mode |= fs.ModeSocket
	case unix.S_IFIFO:
		mode |= fs.ModeNamedPipe
	case unix.S_IFCHR:
		mode |= fs.ModeDevice | fs.ModeCharDevice
	case unix.S_IFBLK:
		mode |= fs.ModeDevice
	}
	if m&unix.S_ISVTX != 0 {
		mode |= fs.ModeSticky
	}
	return mode
}

// dialError explains the error err of connecting to path.
func dialError(path string, err error) error {
	var oe *ownerError
	var we *writableError
	switch {
	case errors.As(err, &oe):
		return fmt.Errorf("control: dial unix %s: refusing it: %w; pass --control with the path of your own master's socket, or run shoal ctl as the master's user", path, oe)
	case errors.As(err, &we):
		return fmt.Errorf("control: dial unix %s: refusing it: %w; a shoal master never makes its socket there: pass --control with a path in a directory only its user can write to", path, we)
	}
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return fmt.Errorf("control: dial unix %s: %w", path, err)
	}
	switch errno {
	case unix.ENOENT, unix.ENOTDIR:
		return fmt.Errorf("control: no shoal master at %s: the socket does not exist (is shoal running? pass --control or set SHOAL_CONTROL if it uses another path): %w", path, errno)
	case unix.ECONNREFUSED:
		return fmt.Errorf("control: no shoal master at %s: a stale socket: its master is gone: %w", path, errno)
	case unix.EACCES, unix.EPERM:
		return fmt.Errorf("control: dial unix %s: %w: run as the master's user or root", path, errno)
	case unix.EAGAIN:
		return fmt.Errorf("control: dial unix %s: the master takes no more connections now (its queue is full); try again: %w", path, errno)
	}
	return fmt.Errorf("control: dial unix %s: %w", path, err)
}

// Do sends req and returns the master's response. A response with OK
// false is not an error of Do's: its Error says why the command failed.
// Do gives up when ctx is done, and the connection is then of no more use:
// a later Do fails at once.
func (c *Client) Do(ctx context.Context, req Request) (Response, error) {
	var resp Response
	var err error
	select {
	case c.turn <- struct{}{}:
		resp, err = c.do(ctx, req)
		<-c.turn
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err != nil {
		return Response{}, fmt.Errorf("control: %s via %s: %w", req.Cmd, c.path, err)
	}
	return resp, nil
}

// Status asks for the master's status. A refusal by the master is an error
// too.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	resp, err := c.Do(ctx, Request{Cmd: CmdStatus})
	if err != nil {
		return st, err
	}
	if !resp.OK {
		return st, fmt.Errorf("control: status via %s: %s", c.path, resp.Error)
	}
	if err := json.Unmarshal(resp.Result, &st); err != nil {
		return st, fmt.Errorf("control: status via %s: bad answer: %w", c.path, err)
	}
	return st, nil
}

func (c *Client) do(ctx context.Context, req Request) (Response, error) {
	if c.broken != nil {
		return Response{}, fmt.Errorf("connection unusable after an earlier error: %w", c.broken)
	}
	if err := ctx.Err(); err != nil {
		return Response{}, err
	}
	b, err := json.Marshal(req)
	if err != nil {
		return Response{}, err
	}
	if len(b) > MaxRequest {
		return Response{}, fmt.Errorf("the request is %d bytes, over the limit of %d (MaxRequest)", len(b), MaxRequest)
	}

	deadline, hasDeadline := ctx.Deadline()
	c.conn.SetDeadline(deadline)
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(fired)
		c.conn.SetDeadline(time.Unix(1, 0))
	})
	defer func() {
		if !stop() {
			<-fired
		}
		c.conn.SetDeadline(time.Time{})
	}()

	_, werr := c.conn.Write(append(b, '\n'))
	// Even if the write failed, the master may have answered first, as it
	// does a peer it refuses: read what it said.
	line, rerr := readLine(c.br, maxResponse)
	if rerr != nil {
		err := rerr
		switch {
		case ctx.Err() != nil:
			err = ctx.Err()
		case hasDeadline && errors.Is(rerr, os.ErrDeadlineExceeded):
			err = context.DeadlineExceeded
		case errors.Is(rerr, io.EOF), errors.Is(rerr, unix.ECONNRESET):
			err = errors.New("the master closed the connection without answering")
		case werr != nil:
			err = bare(werr)
		case errors.Is(rerr, errTooLong):
			err = fmt.Errorf("a response of more than %d bytes", maxResponse)
		default:
			err = bare(rerr)
		}
		c.broken = err
		return Response{}, err
	}
	var resp Response
	if err := json.Unmarshal(line, &resp); err != nil {
		c.broken = fmt.Errorf("bad response %s: %w", snippet(line), err)
		return Response{}, c.broken
	}
	return resp, nil
}

// bare returns the system call error in err, if any: a *net.OpError
// names the socket by the temporary name it was bound to.
func bare(err error) error {
	var se *os.SyscallError
	if errors.As(err, &se) {
		return se
	}
	return err
}

// Close closes the connection.
func (c *Client) Close() error {
	return c.conn.Close()
}
