//go:build linux

package reuseport

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Layouts from <linux/inet_diag.h> and <linux/sock_diag.h>, which
// golang.org/x/sys/unix does not define.
//
//	struct inet_diag_sockid {
//		__be16 idiag_sport, idiag_dport;  //  0
//		__be32 idiag_src[4], idiag_dst[4]; //  4, 20
//		__u32  idiag_if;                  // 36
//		__u32  idiag_cookie[2];           // 40
//	};                                    // 48 bytes
//
//	struct inet_diag_req_v2 {
//		__u8  sdiag_family, sdiag_protocol, idiag_ext, pad; // 0
//		__u32 idiag_states;                                 // 4
//		struct inet_diag_sockid id;                         // 8
//	};                                                      // 56 bytes
//
//	struct inet_diag_msg {
//		__u8  idiag_family, idiag_state, idiag_timer, idiag_retrans; // 0
//		struct inet_diag_sockid id;                                  // 4
//		__u32 idiag_expires, idiag_rqueue, idiag_wqueue;             // 52, 56, 60
//		__u32 idiag_uid, idiag_inode;                                // 64, 68
//	};                                                               // 72 bytes
//
// Attributes (struct rtattr: __u16 len, type; 4-byte aligned) follow an
// inet_diag_msg. INET_DIAG_SKMEMINFO holds __u32 values indexed by
// SK_MEMINFO_*.
const (
	sizeofInetDiagReqV2 = 56
	sizeofInetDiagMsg   = 72

	// States in the kernel's enum of TCP states, which UDP sockets share:
	// an unconnected UDP socket is in TCP_CLOSE, a connected one in
	// TCP_ESTABLISHED.
	tcpEstablished = 1
	tcpClose       = 7
	tcpListen      = 10

	inetDiagSkMeminfo = 7 // INET_DIAG_SKMEMINFO

	skMeminfoRcvbuf = 1 // SK_MEMINFO_RCVBUF
	skMeminfoDrops  = 8 // SK_MEMINFO_DROPS, from Linux 4.7

	// diagBufSize is the receive buffer for netlink dumps. The kernel sizes
	// a dump datagram by the reader's past buffers but caps it at 32 KiB,
	// so one datagram always fits; a truncated one restarts the dump with
	// a buffer twice as large.
	diagBufSize    = 32 << 10
	diagBufMaxSize = 1 << 20
)

// diagBufs holds receive buffers across calls of Listeners and UDPSockets.
var diagBufs = sync.Pool{New: func() any { b := make([]byte, diagBufSize); return &b }}

// netlinkSocket is unix.Socket; tests replace it to fake a kernel without
// NETLINK_SOCK_DIAG.
var netlinkSocket = unix.Socket

// errTruncated reports a netlink datagram larger than the receive buffer.
var errTruncated = errors.New("netlink message truncated")

// query selects the sockets of one protocol, in some states, on a port (on
// every port if port is 0), for a netlink dump or a /proc/net table.
type query struct {
	proto  uint8  // unix.IPPROTO_TCP or unix.IPPROTO_UDP
	states uint32 // 1<<state for each wanted state
	port   int

	// kernelFilter has the kernel skip the sockets on other ports, by
	// naming the port in the dump request; the port is checked again in
	// user space in any case.
	kernelFilter bool
}

// tcpListeners selects the TCP sockets in LISTEN state.
func tcpListeners(port int) query {
	return query{proto: unix.IPPROTO_TCP, states: 1 << tcpListen, port: port, kernelFilter: true}
}

// udpBound selects the UDP sockets bound to a port, connected or not.
func udpBound(port int) query {
	return query{proto: unix.IPPROTO_UDP, states: 1<<tcpClose | 1<<tcpEstablished, port: port, kernelFilter: true}
}

func listeners(port int) ([]Socket, error) {
	socks, err := sockDiag(tcpListeners(port))
	if err == nil {
		return socks, nil
	}
	socks, perr := listenersProc(port)
	if perr != nil {
		return nil, fmt.Errorf("reuseport: listeners on port %d: %w; fallback: %w", port, err, perr)
	}
	return socks, nil
}

func udpSockets(port int) ([]Socket, error) {
	socks, err := sockDiag(udpBound(port))
	if err == nil {
		return socks, nil
	}
	socks, perr := udpSocketsProc(port)
	if perr != nil {
		return nil, fmt.Errorf("reuseport: UDP sockets on port %d: %w; fallback: %w", port, err, perr)
	}
	return socks, nil
}

// listenersNetlink is sockDiag for the TCP listeners on port.
func listenersNetlink(port int, kernelFilter bool) ([]Socket, error) {
	q := tcpListeners(port)
	q.kernelFilter = kernelFilter
	return sockDiag(q)
}

// udpSocketsNetlink is sockDiag for the UDP sockets bound to port.
func udpSocketsNetlink(port int, kernelFilter bool) ([]Socket, error) {
	q := udpBound(port)
	q.kernelFilter = kernelFilter
	return sockDiag(q)
}

// sockDiag dumps the sockets that q selects with SOCK_DIAG_BY_FAMILY, one
// dump for AF_INET and one for AF_INET6.
func sockDiag(q query) ([]Socket, error) {
	bp := diagBufs.Get().(*[]byte)
	defer diagBufs.Put(bp)
	for {
		socks, err := dump(*bp, q)
		if err != errTruncated {
			return socks, err
		}
		if len(*bp) >= diagBufMaxSize {
			return nil, fmt.Errorf("netlink sock_diag: %w", err)
		}
		*bp = make([]byte, 2*len(*bp))
	}
}

func dump(buf []byte, q query) ([]Socket, error) {
	fd, err := netlinkSocket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, os.NewSyscallError("socket AF_NETLINK NETLINK_SOCK_DIAG", err)
	}
	defer unix.Close(fd)
	// The kernel answers a dump request at once, but never block forever.
	tv := unix.Timeval{Sec: 5}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return nil, os.NewSyscallError("setsockopt SO_RCVTIMEO", err)
	}
	socks := make([]Socket, 0, 4)
	for seq, family := range [...]uint8{unix.AF_INET, unix.AF_INET6} {
		if err := sendDiagRequest(fd, uint32(seq+1), family, q); err != nil {
			return nil, err
		}
		socks, err = recvDiagDump(fd, buf, uint32(seq+1), q, socks)
		if err != nil {
			return nil, err
		}
	}
	return socks, nil
}

// sendDiagRequest sends one nlmsghdr + inet_diag_req_v2 dump request. For
// UDP it asks for INET_DIAG_SKMEMINFO too.
func sendDiagRequest(fd int, seq uint32, family uint8, q query) error {
	var req [unix.SizeofNlMsghdr + sizeofInetDiagReqV2]byte
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	ne.PutUint32(req[8:], seq)
	// req[12:16], the port id, stays 0: the kernel fills it in.
	r := req[unix.SizeofNlMsghdr:]
	r[0] = family
	r[1] = q.proto
	if q.proto == unix.IPPROTO_UDP {
		r[2] = 1 << (inetDiagSkMeminfo - 1) // idiag_ext
	}
	ne.PutUint32(r[4:], q.states)
	if q.kernelFilter && q.port != 0 {
		binary.BigEndian.PutUint16(r[8:], uint16(q.port)) // id.idiag_sport
	}
	for {
		// Unconnected netlink sockets send to the kernel by default.
		_, err := unix.Write(fd, req[:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return os.NewSyscallError("write netlink", err)
		}
		return nil
	}
}

// recvDiagDump reads the answer to request seq until NLMSG_DONE and appends
// the sockets that q selects to socks.
func recvDiagDump(fd int, buf []byte, seq uint32, q query, socks []Socket) ([]Socket, error) {
	ne := binary.NativeEndian
	for {
		n, err := recvTrunc(fd, buf)
		if err != nil {
			return nil, os.NewSyscallError("recvfrom netlink", err)
		}
		if n > len(buf) {
			return nil, errTruncated
		}
		b := buf[:n]
		for len(b) >= unix.SizeofNlMsghdr {
			l := int(ne.Uint32(b[0:]))
			typ := ne.Uint16(b[4:])
			mseq := ne.Uint32(b[8:])
			if l < unix.SizeofNlMsghdr || l > len(b) {
				return nil, fmt.Errorf("netlink sock_diag: malformed message of %d bytes", l)
			}
			msg := b[unix.SizeofNlMsghdr:l]
			b = b[min(len(b), (l+unix.NLMSG_ALIGNTO-1)&^(unix.NLMSG_ALIGNTO-1)):]
			if mseq != seq {
				continue // a stale message; cannot happen on a fresh socket
			}
			switch typ {
			case unix.NLMSG_DONE:
				if len(msg) >= 4 {
					if e := int32(ne.Uint32(msg)); e < 0 {
						return nil, os.NewSyscallError("netlink sock_diag", unix.Errno(-e))
					}
				}
				return socks, nil
			case unix.NLMSG_ERROR:
				if len(msg) < 4 {
					return nil, errors.New("netlink sock_diag: short error message")
				}
				if e := int32(ne.Uint32(msg)); e != 0 {
					return nil, os.NewSyscallError("netlink sock_diag", unix.Errno(-e))
				}
				return socks, nil // an acknowledgement
			case unix.SOCK_DIAG_BY_FAMILY:
				if len(msg) < sizeofInetDiagMsg {
					return nil, fmt.Errorf("netlink sock_diag: short inet_diag_msg of %d bytes", len(msg))
				}
				if s, ok := parseDiagMsg(msg, q); ok {
					socks = append(socks, s)
				}
			}
		}
	}
}

// parseDiagMsg decodes an inet_diag_msg, with its attributes, and reports
// whether q selects the socket.
func parseDiagMsg(m []byte, q query) (Socket, bool) {
	ne := binary.NativeEndian
	family, state := m[0], m[1]
	sport := binary.BigEndian.Uint16(m[4:])
	if q.states&(1<<state) == 0 || (q.port != 0 && int(sport) != q.port) {
		return Socket{}, false
	}
	var addr netip.Addr
	switch family {
	case unix.AF_INET:
		addr = netip.AddrFrom4([4]byte(m[8:12]))
	case unix.AF_INET6:
		addr = netip.AddrFrom16([16]byte(m[8:24]))
	default:
		return Socket{}, false
	}
	s := Socket{
		Inode: uint64(ne.Uint32(m[68:])),
		UID:   ne.Uint32(m[64:]),
		Addr:  netip.AddrPortFrom(addr, sport),
	}
	if q.proto != unix.IPPROTO_UDP {
		s.Queue = ne.Uint32(m[56:])
		s.Backlog = ne.Uint32(m[60:])
		return s, true
	}
	if dport := binary.BigEndian.Uint16(m[6:]); dport != 0 {
		var peer netip.Addr
		if family == unix.AF_INET {
			peer = netip.AddrFrom4([4]byte(m[24:28]))
		} else {
			peer = netip.AddrFrom16([16]byte(m[24:40]))
		}
		s.Peer = netip.AddrPortFrom(peer, dport)
	}
	s.RecvQueueBytes = ne.Uint32(m[56:])
	if mem := diagAttr(m[sizeofInetDiagMsg:], inetDiagSkMeminfo); mem != nil {
		if len(mem) >= 4*(skMeminfoRcvbuf+1) {
			s.RecvBufBytes = ne.Uint32(mem[4*skMeminfoRcvbuf:])
		}
		if len(mem) >= 4*(skMeminfoDrops+1) {
			s.Drops = ne.Uint32(mem[4*skMeminfoDrops:])
		}
	}
	return s, true
}

// diagAttr returns the payload of the first attribute of type typ in b, a
// sequence of struct rtattr, or nil.
func diagAttr(b []byte, typ uint16) []byte {
	ne := binary.NativeEndian
	for len(b) >= unix.SizeofRtAttr {
		l := int(ne.Uint16(b[0:]))
		if l < unix.SizeofRtAttr || l > len(b) {
			return nil
		}
		if ne.Uint16(b[2:]) == typ {
			return b[unix.SizeofRtAttr:l]
		}
		b = b[min(len(b), (l+unix.RTA_ALIGNTO-1)&^(unix.RTA_ALIGNTO-1)):]
	}
	return nil
}

// recvTrunc receives one datagram into buf with MSG_TRUNC, so that the
// returned length is the datagram's full length even when it did not fit.
// It calls recvfrom directly because unix.Recvfrom allocates the sender's
// address.
func recvTrunc(fd int, buf []byte) (int, error) {
	for {
		n, _, errno := unix.Syscall6(unix.SYS_RECVFROM, uintptr(fd),
			uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)), unix.MSG_TRUNC, 0, 0)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return 0, errno
		}
		return int(n), nil
	}
}
