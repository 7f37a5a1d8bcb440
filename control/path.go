package control

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// maxLinks is how many symlinks a path may go through, as in the kernel.
const maxLinks = 40

// An ownerError says that a file on the way to the socket belongs to a
// user who is neither the caller nor root: that user could have put it
// there, or could replace it.
type ownerError struct {
	path  string // the file
	what  string // "directory", "symlink", "socket", ...
	owner int
	uid   int // the caller's
}

func (e *ownerError) Error() string {
	return fmt.Sprintf("%s %s belongs to %s, not to you (uid %d) or root: its owner could have put it there to impersonate the master, or could replace it",
		e.what, e.path, userName(e.owner), e.uid)
}

// Unwrap returns ErrNotTrusted.
func (e *ownerError) Unwrap() error { return ErrNotTrusted }

// A writableError says that the socket's directory is writable by others,
// who could then put a socket of their own at the socket's name.
type writableError struct {
	dir  string
	mode fs.FileMode
}

func (e *writableError) Error() string {
	return fmt.Sprintf("directory %s is writable by others (mode %v), so anyone could replace the socket or block its lock", e.dir, e.mode)
}

// Unwrap returns ErrNotTrusted.
func (e *writableError) Unwrap() error { return ErrNotTrusted }

// A peerError says that the process listening on the socket is neither
// the caller's nor root's.
type peerError struct {
	pid, owner, uid int
}

func (e *peerError) Error() string {
	return fmt.Sprintf("refusing to talk to the process that listens there (pid %d): it runs as %s, not as you (uid %d) or root, so it is not your master",
		e.pid, userName(e.owner), e.uid)
}

// Unwrap returns ErrNotTrusted.
func (e *peerError) Unwrap() error { return ErrNotTrusted }

// ErrNotTrusted is what the errors of [Dial] wrap when a file on the way
// to the socket, or the process that listens on it, is neither the
// caller's nor root's, and what those of [Listen] wrap when a file on the
// way is not the master's user's or root's, or the socket's directory is
// writable by others.
var ErrNotTrusted = errors.New("not the caller's or root's")

// userName names uid for an error message: "uid 65534 (nobody)".
func userName(uid int) string {
	s := strconv.Itoa(uid)
	if u, err := user.LookupId(s); err == nil && u.Username != "" {
		return fmt.Sprintf("uid %d (%s)", uid, u.Username)
	}
	return "uid " + s
}

// trusted reports whether a file of owner may be on the way to the
// socket of a master of uid, or of a client of uid.
func trusted(owner uint32, uid int) bool {
	return owner == 0 || int(owner) == uid
}

// kindOf names the file type in mode for an error message.
func kindOf(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return "directory"
	case unix.S_IFLNK:
		return "symlink"
	case unix.S_IFSOCK:
		return "socket"
	case unix.S_IFREG:
		return "file"
	}
	return "file"
}

// A walk is the outcome of [walkPath]: the socket's directory, open, and
// the socket's name in it.
type walk struct {
	dirfd int    // the socket's directory, opened O_PATH; the caller closes it
	dir   string // its path, with the symlinks on the way resolved
	base  string // the socket's name in dir
}

// path returns the socket's path, with the symlinks on the way resolved.
func (w *walk) path() string { return filepath.Join(w.dir, w.base) }

// walkPath opens the directory of the socket at path, an absolute path,
// checking each file on the way without trusting any it has not checked:
// it looks at each entry with lstat (fstatat with AT_SYMLINK_NOFOLLOW),
// opens each directory with O_NOFOLLOW relative to the one before, and
// resolves symlinks itself. Every directory and symlink on the way must
// belong to uid or root, and the socket's own directory must be writable
// by no one else (a sticky directory like /tmp is refused too: anyone may
// create a name in it). A directory above it that others may write to is
// accepted: they could rename what is in it, but not make files of uid's.
//
// With create (the master), missing directories are created mode 0700 and
// the last name is taken as it is, a symlink included; without (a client),
// a symlink at the last name is followed.
func walkPath(path string, uid int, create bool) (*walk, error) {
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("%s is not an absolute path", path)
	}
	fd, err := unix.Open("/", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: "/", Err: err}
	}
	fail := func(err error) (*walk, error) {
		unix.Close(fd)
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fail(&fs.PathError{Op: "fstat", Path: "/", Err: err})
	}
	if !trusted(st.Uid, uid) {
		return fail(&ownerError{"/", "directory", int(st.Uid), uid})
	}
	cur, base := "/", ""
	rest := strings.Split(filepath.Clean(path)[1:], "/")
	links := 0
	for base == "" && len(rest) > 0 {
		c := rest[0]
		rest = rest[1:]
		last := len(rest) == 0
		switch c {
		case "", ".":
			if last {
				return fail(fmt.Errorf("%s: no socket name at the end of the path", path))
			}
			continue
		case "..":
			nfd, err := unix.Openat(fd, "..", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
			if err != nil {
				return fail(&fs.PathError{Op: "open", Path: filepath.Join(cur, ".."), Err: err})
			}
			unix.Close(fd)
			fd, cur = nfd, filepath.Dir(cur)
			if last {
				return fail(fmt.Errorf("%s: no socket name at the end of the path", path))
			}
			continue
		}
		next := filepath.Join(cur, c)
		if last && create {
			base = c // the master's socket name: Listen looks at it itself
			continue
		}
		err := unix.Fstatat(fd, c, &st, unix.AT_SYMLINK_NOFOLLOW)
		if err == unix.ENOENT && create && !last {
			if err = mkdirat(fd, c); err == nil {
				err = unix.Fstatat(fd, c, &st, unix.AT_SYMLINK_NOFOLLOW)
			}
		}
		if err != nil {
			return fail(&fs.PathError{Op: "lstat", Path: next, Err: err})
		}
		if !trusted(st.Uid, uid) {
			return fail(&ownerError{next, kindOf(st.Mode), int(st.Uid), uid})
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFLNK:
			if links++; links > maxLinks {
				return fail(&fs.PathError{Op: "resolve", Path: path, Err: unix.ELOOP})
			}
			target, err := readlinkat(fd, c)
			if err != nil {
				return fail(&fs.PathError{Op: "readlink", Path: next, Err: err})
			}
			if filepath.IsAbs(target) {
				nfd, err := unix.Open("/", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
				if err != nil {
					return fail(&fs.PathError{Op: "open", Path: "/", Err: err})
				}
				unix.Close(fd)
				fd, cur = nfd, "/"
			}
			rest = append(strings.Split(target, "/"), rest...)
			continue
		case unix.S_IFDIR:
			if last {
				return fail(fmt.Errorf("%s is a directory, not a socket", next))
			}
			nfd, err := unix.Openat(fd, c, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			if err != nil {
				return fail(&fs.PathError{Op: "open", Path: next, Err: err})
			}
			// What was opened is what counts: check it again.
			if err := unix.Fstat(nfd, &st); err != nil {
				unix.Close(nfd)
				return fail(&fs.PathError{Op: "fstat", Path: next, Err: err})
			}
			unix.Close(fd)
			fd, cur = nfd, next
			if !trusted(st.Uid, uid) {
				return fail(&ownerError{next, "directory", int(st.Uid), uid})
			}
			continue
		}
		if !last {
			return fail(&fs.PathError{Op: "open", Path: next, Err: unix.ENOTDIR})
		}
		base = c // a client's socket, or whatever is there: Dial says what
	}
	if base == "" {
		return fail(fmt.Errorf("%s: no socket name at the end of the path", path))
	}
	if err := unix.Fstat(fd, &st); err != nil {
		return fail(&fs.PathError{Op: "fstat", Path: cur, Err: err})
	}
	if mode := fs.FileMode(st.Mode & 0o7777); mode&0o022 != 0 {
		fm := fs.ModeDir | mode.Perm()
		if mode&unix.S_ISVTX != 0 {
			fm |= fs.ModeSticky
		}
		return fail(&writableError{cur, fm})
	}
	return &walk{dirfd: fd, dir: cur, base: base}, nil
}

// mkdirat creates the directory name in dirfd mode 0700, whatever the
// umask. It is no error if another process creates it first.
func mkdirat(dirfd int, name string) error {
	err := unix.Mkdirat(dirfd, name, 0o700)
	if err == unix.EEXIST {
		return nil
	}
	if err != nil {
		return err
	}
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Fchmod(fd, 0o700)
}

// readlinkat returns the target of the symlink name in dirfd.
func readlinkat(dirfd int, name string) (string, error) {
	for n := 256; ; n *= 2 {
		buf := make([]byte, n)
		m, err := unix.Readlinkat(dirfd, name, buf)
		if err != nil {
			return "", err
		}
		if m < n {
			return string(buf[:m]), nil
		}
		if n > 1<<16 {
			return "", unix.ENAMETOOLONG
		}
	}
}

// procFD reports whether /proc/self/fd is there, to reach files by a
// directory's file descriptor.
var procFD = sync.OnceValue(func() bool {
	_, err := os.Stat("/proc/self/fd")
	return err == nil
})

// addr returns the address by which to bind or connect to name in the
// directory w.dirfd: through /proc/self/fd, so that no path is looked up
// again, or the plain path if /proc is not mounted.
func (w *walk) addr(name string) (string, error) {
	max := len(unix.RawSockaddrUnix{}.Path)
	if procFD() {
		a := fmt.Sprintf("/proc/self/fd/%d/%s", w.dirfd, name)
		if len(a) < max {
			return a, nil
		}
		return "", fmt.Errorf("socket name %q is too long for a Unix socket address", name)
	}
	a := filepath.Join(w.dir, name)
	if len(a) >= max {
		return "", errors.New("the path is too long for a Unix socket address and /proc is not mounted to shorten it")
	}
	return a, nil
}
