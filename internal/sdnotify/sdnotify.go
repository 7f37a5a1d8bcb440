// Package sdnotify speaks systemd's notification protocol: datagrams of
// newline-separated KEY=VALUE assignments (READY=1, RELOADING=1,
// STOPPING=1, STATUS=..., WATCHDOG=1) sent to the Unix datagram socket named
// by $NOTIFY_SOCKET. Send is the sending side; Listen is a receiving side
// that, like systemd's, learns each sender's pid from the kernel
// (SO_PASSCRED), never from the datagram.
package sdnotify

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// MaxDatagram bounds one notification; systemd takes up to 4 KiB of state.
const MaxDatagram = 4096

// Send sends state ("READY=1", "STATUS=4/4 workers") to the socket named
// by $NOTIFY_SOCKET. It does nothing and returns nil when the variable is
// not set: a program not started by systemd (or shoal) has nobody to tell.
func Send(state string) error {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		return nil
	}
	return SendTo(addr, state)
}

// SendTo sends state to the notification socket addr: a path, or an
// abstract name starting with '@'.
func SendTo(addr, state string) error {
	if strings.HasPrefix(addr, "@") {
		addr = "\x00" + addr[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("sdnotify: %w", err)
	}
	defer c.Close()
	c.SetWriteDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte(state)); err != nil {
		return fmt.Errorf("sdnotify: send to %s: %w", strings.TrimPrefix(addr, "\x00"), err)
	}
	return nil
}

// Message is one notification received.
type Message struct {
	PID    int               // the sender, from the kernel
	Fields map[string]string // its assignments
}

// Listener receives notifications.
type Listener struct {
	conn *net.UnixConn
	name string
}

// Listen opens a notification socket at the abstract name (without the
// leading '@') and asks the kernel for the senders' credentials. Its
// Addr is the value for NOTIFY_SOCKET. An abstract socket has no file
// permissions: anyone in the network namespace may send to it, so a
// receiver must judge each sender by its pid.
func Listen(name string) (*Listener, error) {
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: "\x00" + name, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("sdnotify: listen @%s: %w", name, err)
	}
	rc, err := c.SyscallConn()
	if err == nil {
		var serr error
		err = rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1) })
		if err == nil {
			err = serr
		}
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("sdnotify: listen @%s: SO_PASSCRED: %w", name, err)
	}
	return &Listener{conn: c, name: name}, nil
}

// Addr returns the socket's NOTIFY_SOCKET value, "@name".
func (l *Listener) Addr() string { return "@" + l.name }

// ErrBadDatagram is wrapped by Read's error for a datagram that is not a
// notification: too large, without credentials, or not KEY=VALUE lines.
var ErrBadDatagram = errors.New("sdnotify: bad datagram")

// Read returns the next notification. A bad datagram is an error wrapping
// ErrBadDatagram, with the sender's pid when the kernel told it; the
// listener goes on. Other errors (the listener closed) end it.
func (l *Listener) Read() (Message, error) {
	buf := make([]byte, MaxDatagram+1)
	oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred))
	n, oobn, flags, _, err := l.conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return Message{}, err
	}
	var m Message
	if cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
		for _, c := range cmsgs {
			if cred, err := unix.ParseUnixCredentials(&c); err == nil {
				m.PID = int(cred.Pid)
			}
		}
	}
	if m.PID == 0 {
		return m, fmt.Errorf("%w: no sender credentials", ErrBadDatagram)
	}
	if n > MaxDatagram || flags&syscall.MSG_TRUNC != 0 {
		return m, fmt.Errorf("%w: from pid %d: over %d bytes", ErrBadDatagram, m.PID, MaxDatagram)
	}
	m.Fields = map[string]string{}
	for _, line := range strings.Split(strings.TrimRight(string(buf[:n]), "\n"), "\n") {
		k, v, ok := strings.Cut(line, "=")
		if !ok || k == "" || strings.ContainsAny(k, " \t\x00") {
			return m, fmt.Errorf("%w: from pid %d: %q is not KEY=VALUE", ErrBadDatagram, m.PID, truncate(line))
		}
		m.Fields[k] = v
	}
	return m, nil
}

func truncate(s string) string {
	if len(s) > 40 {
		return s[:40] + "..."
	}
	return s
}

// Close closes the listener; a Read in progress returns an error.
func (l *Listener) Close() error { return l.conn.Close() }

// Pause makes a Read in progress, and every later one, return an error
// without taking a datagram: a reader stops, and Detach follows.
func (l *Listener) Pause() { l.conn.SetReadDeadline(time.Now()) }

// Name returns the socket's abstract name, without the '@'.
func (l *Listener) Name() string { return l.name }

// Detach stops the listener without closing its socket, for a new master
// that goes on reading it (see FromFile): a Read in progress returns an
// error, and no datagram is lost. The caller owns the returned file.
func (l *Listener) Detach() (*os.File, error) {
	l.Pause()
	f, err := l.conn.File()
	l.conn.Close()
	if err != nil {
		return nil, fmt.Errorf("sdnotify: detach @%s: %w", l.name, err)
	}
	return f, nil
}

// FromFile returns the listener at the abstract name over f, a socket that
// Detach left, and takes ownership of f.
func FromFile(name string, f *os.File) (*Listener, error) {
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("sdnotify: listen @%s from fd %d: %w", name, f.Fd(), err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("sdnotify: listen @%s from fd %d: not a Unix socket", name, f.Fd())
	}
	return &Listener{conn: uc, name: name}, nil
}
