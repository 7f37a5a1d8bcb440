//go:build linux

package steering

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"

	"github.com/shoal-sh/shoal/reuseport"
	"golang.org/x/sys/unix"
)

// check verifies that fd is a TCP (not MPTCP) socket with SO_REUSEPORT,
// listening on s.addr, and returns its cookie.
func (s *Steering) check(fd int) (uint64, error) {
	proto, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	if err != nil {
		return 0, fmt.Errorf("%w: getsockopt SO_PROTOCOL: %w", ErrNoListener, err)
	}
	if proto == unix.IPPROTO_MPTCP {
		return 0, ErrMPTCP
	}
	if proto != unix.IPPROTO_TCP {
		return 0, fmt.Errorf("%w: the socket's protocol is %d, not TCP", ErrNoListener, proto)
	}
	if acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || acc == 0 {
		return 0, fmt.Errorf("%w: the socket is not listening", ErrNoListener)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return 0, fmt.Errorf("%w: getsockname: %w", ErrNoListener, err)
	}
	if got := addrPort(sa); got != s.addr {
		return 0, fmt.Errorf("%w: the socket is bound to %s, not %s", ErrNoListener, got, s.addr)
	}
	if rp, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT); err != nil || rp == 0 {
		return 0, fmt.Errorf("the socket on %s does not have SO_REUSEPORT set: only SO_REUSEPORT groups can be steered", s.addr)
	}
	cookie, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("getsockopt SO_COOKIE: %w", err)
	}
	return cookie, nil
}

// addrPort converts a socket address; other families give the zero value.
func addrPort(sa unix.Sockaddr) netip.AddrPort {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port))
	}
	return netip.AddrPort{}
}

// take finds the socket that pid or a descendant holds listening on s.addr,
// duplicates it into this process with pidfd_getfd, checks it, and returns
// the duplicate (close-on-exec) and its cookie. A socket already in
// another slot is passed over for another candidate.
func (s *Steering) take(slot, pid int) (int, uint64, error) {
	if pid <= 0 {
		return -1, 0, fmt.Errorf("invalid pid")
	}
	ls, err := reuseport.Listeners(int(s.addr.Port()))
	if err != nil {
		return -1, 0, err
	}
	want := make(map[uint64]bool)
	for _, l := range ls {
		if l.Addr == s.addr {
			want[l.Inode] = true
		}
	}
	procs := append([]int{pid}, reuseport.Descendants(pid)...)
	var lastErr error
	seen := make(map[uint64]bool)
	for i, p := range procs {
		fds, err := socketFDs(p)
		if err != nil {
			if i == 0 && (errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ESRCH)) {
				return -1, 0, fmt.Errorf("the process is gone: %w", os.ErrNotExist)
			}
			if errors.Is(err, os.ErrPermission) {
				lastErr = fmt.Errorf("%w: reading the descriptors of a process of another user needs CAP_SYS_PTRACE", err)
			}
			continue
		}
		for _, f := range fds {
			if !want[f.inode] || seen[f.inode] {
				continue
			}
			seen[f.inode] = true
			fd, cookie, err := s.takeFD(slot, p, f.fd)
			if err != nil {
				lastErr = err
				continue
			}
			return fd, cookie, nil
		}
	}
	if lastErr != nil {
		return -1, 0, lastErr
	}
	// No TCP listener on the address: tell an MPTCP listener apart, whose
	// descriptor's inode is not the one socket diagnostics report.
	for _, p := range procs {
		fds, _ := socketFDs(p)
		for _, f := range fds {
			if fd, err := s.dup(p, f.fd); err == nil {
				_, err := s.check(fd)
				unix.Close(fd)
				if errors.Is(err, ErrMPTCP) {
					return -1, 0, err
				}
			}
		}
	}
	return -1, 0, fmt.Errorf("%w: none of its descriptors (nor its descendants') is a TCP socket listening on %s", ErrNoListener, s.addr)
}

// takeFD duplicates descriptor fd of process pid, checks it and returns it
// with its cookie, unless it is at a slot other than slot already.
func (s *Steering) takeFD(slot, pid, fd int) (int, uint64, error) {
	dup, err := s.dup(pid, fd)
	if err != nil {
		return -1, 0, err
	}
	cookie, err := s.check(dup)
	if err == nil {
		s.mu.Lock()
		for other, c := range s.present {
			if c == cookie && other != slot {
				err = fmt.Errorf("its socket on %s is already at slot %d: a socket can be in one slot only", s.addr, other)
			}
		}
		s.mu.Unlock()
	}
	if err != nil {
		unix.Close(dup)
		return -1, 0, err
	}
	return dup, cookie, nil
}

// dup duplicates descriptor fd of process pid into this process.
func (s *Steering) dup(pid, fd int) (int, error) {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return -1, fmt.Errorf("pidfd_open %d: %w", pid, os.ErrNotExist)
		}
		return -1, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	defer unix.Close(pidfd)
	dup, err := unix.PidfdGetfd(pidfd, fd, 0)
	if err != nil {
		if errors.Is(err, unix.EPERM) {
			return -1, fmt.Errorf("pidfd_getfd of process %d's fd %d: %w: taking the socket of a process of another user needs CAP_SYS_PTRACE (and kernel.yama.ptrace_scope 2 needs it for any process, 3 forbids it)", pid, fd, err)
		}
		return -1, fmt.Errorf("pidfd_getfd of process %d's fd %d: %w", pid, fd, err)
	}
	return dup, nil
}

// sockFD is a descriptor of a process that refers to a socket.
type sockFD struct {
	fd    int
	inode uint64
}

// socketFDs lists the socket descriptors of pid from /proc/PID/fd.
func socketFDs(pid int) ([]sockFD, error) {
	dir, err := os.Open("/proc/" + strconv.Itoa(pid) + "/fd")
	if err != nil {
		return nil, err
	}
	defer dir.Close()
	names, err := dir.Readdirnames(-1)
	if err != nil {
		return nil, err
	}
	var out []sockFD
	var buf [64]byte
	for _, name := range names {
		n, err := unix.Readlinkat(int(dir.Fd()), name, buf[:])
		if errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM) {
			return nil, &os.PathError{Op: "readlink", Path: dir.Name() + "/" + name, Err: err}
		}
		if err != nil {
			continue // closed meanwhile
		}
		link := buf[:n]
		const prefix = "socket:["
		if !bytes.HasPrefix(link, []byte(prefix)) || link[len(link)-1] != ']' {
			continue
		}
		ino, err := strconv.ParseUint(string(link[len(prefix):len(link)-1]), 10, 64)
		fd, err2 := strconv.Atoi(name)
		if err == nil && err2 == nil {
			out = append(out, sockFD{fd: fd, inode: ino})
		}
	}
	return out, nil
}
