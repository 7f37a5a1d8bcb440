// Package reuseport opens listeners that share a port with SO_REUSEPORT and
// reads, from the kernel, which sockets listen on a port.
//
// Several processes (or several listeners in one process) that each open a
// listener with this package on the same address form one SO_REUSEPORT
// group, and the kernel spreads new connections (or, for UDP, datagrams)
// over the group's sockets. Linux only joins sockets of the same effective
// uid into a group, and "tcp" on ":port" (a dual-stack IPv6 socket) forms a
// different group from "tcp4" on "0.0.0.0:port".
//
// [Listeners], [UDPSockets] and [Inodes] let a supervisor see, without the
// workers' cooperation, which sockets listen on a port, how many
// connections wait in each accept queue, how many bytes wait in each UDP
// receive queue and how many datagrams were dropped, and which process owns
// each socket.
package reuseport

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
)

// ErrUnsupported is returned, wrapped, when the kernel refuses the
// SO_REUSEPORT socket option, which Linux supports from version 3.9 on.
var ErrUnsupported = errors.New("reuseport: SO_REUSEPORT is not supported by this kernel or platform (Linux 3.9 or later is needed)")

// ListenConfig is a [net.ListenConfig] that sets SO_REUSEPORT on every socket
// it opens, and SO_REUSEADDR on TCP sockets, before the socket is bound.
//
// If the embedded Control function is set, it runs first, and an error from
// it stops the listen. Multipath TCP is always turned off, whatever
// SetMultipathTCP was told, because SO_REUSEPORT groups are plain TCP
// sockets. The zero value is ready to use.
type ListenConfig struct {
	net.ListenConfig
}

// Listen announces on the local network address with SO_REUSEPORT set.
// The network must be "tcp", "tcp4" or "tcp6"; see [net.Listen] for the
// address syntax.
//
// Errors name the operation, network and address, wrap the
// [*net.OpError] of package net, and match [ErrUnsupported] when the kernel
// has no SO_REUSEPORT.
func (lc *ListenConfig) Listen(ctx context.Context, network, address string) (net.Listener, error) {
	switch network {
	case "tcp", "tcp4", "tcp6":
	default:
		return nil, fmt.Errorf("reuseport: listen %s %s: unsupported network %q (want tcp, tcp4 or tcp6)", network, address, network)
	}
	if err := supported(); err != nil {
		return nil, err
	}
	c := lc.config()
	l, err := c.Listen(ctx, network, address)
	if err != nil {
		return nil, wrapListenError(err)
	}
	return l, nil
}

// ListenPacket announces on the local network address with SO_REUSEPORT set.
// The network must be "udp", "udp4" or "udp6"; see [net.ListenPacket] for
// the address syntax. Errors are as for [ListenConfig.Listen].
func (lc *ListenConfig) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	switch network {
	case "udp", "udp4", "udp6":
	default:
		return nil, fmt.Errorf("reuseport: listen %s %s: unsupported network %q (want udp, udp4 or udp6)", network, address, network)
	}
	if err := supported(); err != nil {
		return nil, err
	}
	c := lc.config()
	pc, err := c.ListenPacket(ctx, network, address)
	if err != nil {
		return nil, wrapListenError(err)
	}
	return pc, nil
}

// Listen is like [ListenConfig.Listen] with a zero ListenConfig and a
// background context.
func Listen(network, address string) (net.Listener, error) {
	var lc ListenConfig
	return lc.Listen(context.Background(), network, address)
}

// ListenPacket is like [ListenConfig.ListenPacket] with a zero ListenConfig
// and a background context.
func ListenPacket(network, address string) (net.PacketConn, error) {
	var lc ListenConfig
	return lc.ListenPacket(context.Background(), network, address)
}

// config returns a copy of the embedded net.ListenConfig whose Control runs
// the user's Control and then sets the socket options, with MPTCP off.
func (lc *ListenConfig) config() net.ListenConfig {
	c := lc.ListenConfig
	c.SetMultipathTCP(false)
	user := c.Control
	c.Control = func(network, address string, rc syscall.RawConn) error {
		if user != nil {
			if err := user(network, address, rc); err != nil {
				return err
			}
		}
		return control(network, rc)
	}
	return c
}

// unsupportedError marks a setsockopt failure that means the kernel has no
// SO_REUSEPORT.
type unsupportedError struct{ err error }

func (e *unsupportedError) Error() string { return e.err.Error() }
func (e *unsupportedError) Unwrap() error { return e.err }

// wrapListenError prefixes an error of net.ListenConfig (usually a
// *net.OpError naming the operation, network and address) with the package
// name, and adds ErrUnsupported when the kernel refused SO_REUSEPORT.
func wrapListenError(err error) error {
	var u *unsupportedError
	if errors.As(err, &u) {
		return fmt.Errorf("%w: %w", ErrUnsupported, err)
	}
	return fmt.Errorf("reuseport: %w", err)
}

// Socket is one socket as the kernel reports it: a TCP socket in the
// LISTEN state, from [Listeners], or a bound UDP socket, from [UDPSockets].
type Socket struct {
	// Inode is the socket's inode number, as in the /proc/PID/fd/N link
	// "socket:[INODE]" of every process that holds the socket open.
	Inode uint64

	// UID is the socket's owner. SO_REUSEPORT groups only join sockets of
	// the same effective uid.
	UID uint32

	// Addr is the local address and port. A socket bound to every address
	// has the unspecified address (0.0.0.0 or ::).
	Addr netip.AddrPort

	// Peer is, for a connected UDP socket, the remote address it is
	// connected to. It is the zero AddrPort (Peer.IsValid() is false) for a
	// TCP listener and for an unconnected UDP socket, which receives
	// datagrams from anyone.
	Peer netip.AddrPort

	// Queue is, for a TCP listener, the number of connections that wait in
	// the accept queue now: established, but not yet accepted by the
	// process. It is 0 for UDP sockets; see RecvQueueBytes.
	Queue uint32

	// Backlog is, for a TCP listener, the accept-queue limit: the backlog
	// given to listen(2) capped by net.core.somaxconn. It is 0 when
	// unknown, that is when the sockets were read from /proc/net/tcp rather
	// than with netlink, and 0 for UDP sockets.
	Backlog uint32

	// RecvQueueBytes is, for a UDP socket, the memory that the datagrams
	// waiting to be read take in the receive buffer, in bytes: their
	// payload and the kernel's bookkeeping of each (several hundred bytes
	// a datagram), as the Recv-Q of "ss -u". It is 0 for TCP listeners.
	RecvQueueBytes uint32

	// RecvBufBytes is, for a UDP socket, the receive buffer's size in
	// bytes: twice the SO_RCVBUF asked for (the kernel doubles it, and caps
	// the request at net.core.rmem_max), or net.core.rmem_default. A datagram that arrives when RecvQueueBytes
	// has reached it is dropped. It is 0 when unknown, that is when the
	// sockets were read from /proc/net/udp rather than with netlink, and 0
	// for TCP listeners.
	RecvBufBytes uint32

	// Drops is, for a UDP socket, the number of datagrams that the kernel
	// dropped on their way to this socket since it was opened, mostly
	// because the receive buffer was full: the drops column of
	// /proc/net/udp. It wraps around at 1<<32, and is
	// 0 on kernels older than Linux 4.7 and for TCP listeners.
	Drops uint32
}

// goneError reports that a process no longer exists. It matches
// os.ErrNotExist with errors.Is whatever the underlying error is (ENOENT or
// ESRCH).
type goneError struct {
	pid int
	err error
}

func (e *goneError) Error() string {
	return fmt.Sprintf("reuseport: sockets of process %d: process is gone: %v", e.pid, e.err)
}

func (e *goneError) Unwrap() error { return e.err }

func (e *goneError) Is(target error) bool { return target == os.ErrNotExist }

// Listeners returns the TCP sockets, IPv4 and IPv6, that are in the LISTEN
// state on port, or on every port if port is 0.
//
// It asks the kernel with netlink socket diagnostics (NETLINK_SOCK_DIAG) for
// listening sockets only, and the kernel skips those on other ports, so its
// cost does not grow with the number of established connections on the
// host. Where netlink is not available it reads /proc/net/tcp and
// /proc/net/tcp6 instead, which list every TCP socket of the network
// namespace, and are much slower; Backlog is then 0.
//
// Sockets of every process and every user in the caller's network namespace
// are returned; use [Inodes] to tell which belong to a process.
func Listeners(port int) ([]Socket, error) {
	if port < 0 || port > 65535 {
		return nil, fmt.Errorf("reuseport: listeners on port %d: port out of range", port)
	}
	return listeners(port)
}

// UDPSockets returns the UDP sockets, IPv4 and IPv6, bound to port, or
// every bound UDP socket if port is 0. Unconnected sockets, which receive
// from anyone, and connected ones (whose Peer is set) are both returned: a
// server may connect a socket of its SO_REUSEPORT group to one client.
// With port 0, the connected sockets are mostly clients' (a DNS lookup's,
// say): the sockets without a Peer are those that serve.
//
// Like [Listeners], it asks the kernel with netlink socket diagnostics,
// which here also report each socket's receive buffer and drops, and reads
// /proc/net/udp and /proc/net/udp6 where netlink is not available (or the
// kernel lacks the udp_diag module); RecvBufBytes is then 0.
//
// Sockets of every process and every user in the caller's network namespace
// are returned; use [Inodes] to tell which belong to a process.
func UDPSockets(port int) ([]Socket, error) {
	if port < 0 || port > 65535 {
		return nil, fmt.Errorf("reuseport: UDP sockets on port %d: port out of range", port)
	}
	return udpSockets(port)
}

// Inodes returns the inodes of the sockets held open by the process pid and
// by its descendants: children, grandchildren and so on. These are the
// numbers in the "socket:[INODE]" links of /proc/PID/fd, and the Inode of a
// [Socket].
//
// Descendants are found through /proc/PID/task/TID/children or, on kernels
// built without it, through the parent pids in /proc/*/stat. Processes that
// exit meanwhile, or whose descriptors cannot be read, contribute what could
// be read. The error matches [os.ErrNotExist] when pid itself is gone, and
// [os.ErrPermission] when nothing at all could be read for lack of
// permission.
//
// Inodes reads one /proc link per open descriptor, so a process with many
// connections costs more to inspect than [Listeners] costs to call: where
// possible, call it only when the listeners on a port have changed.
func Inodes(pid int) (map[uint64]struct{}, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("reuseport: sockets of process %d: invalid pid", pid)
	}
	return inodes(pid)
}

// Descendants returns the children, grandchildren... of pid, without pid
// itself, from /proc (/proc/PID/task/TID/children, or every process's
// parent where the kernel lacks those files). It is the walk Inodes,
// Waiting and Holders make; it returns nil on platforms other than Linux.
func Descendants(pid int) []int { return descendants(pid) }
