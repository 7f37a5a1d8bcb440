//go:build linux

package reuseport

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"slices"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// listenUDP opens a reuseport UDP socket; the test closes it.
func listenUDP(t testing.TB, network, address string) *net.UDPConn {
	t.Helper()
	c, err := ListenPacket(network, address)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.UDPConn)
}

func udpPort(c net.PacketConn) int { return c.LocalAddr().(*net.UDPAddr).Port }

// waitUDP polls read(port) until ok accepts the sockets, for at most 5
// seconds, and returns the last sockets read.
func waitUDP(t *testing.T, port int, read func(int) ([]Socket, error), ok func([]Socket) bool) []Socket {
	t.Helper()
	return waitUDPFor(t, 5*time.Second, port, read, ok)
}

func waitUDPFor(t *testing.T, timeout time.Duration, port int, read func(int) ([]Socket, error), ok func([]Socket) bool) []Socket {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		socks, err := read(port)
		if err != nil {
			t.Fatal(err)
		}
		if ok(socks) || time.Now().After(deadline) {
			return socks
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// byInode finds the socket with the inode of c in socks.
func byInode(t *testing.T, socks []Socket, c syscall.Conn) (Socket, bool) {
	t.Helper()
	ino := connInode(t, c)
	for _, s := range socks {
		if s.Inode == ino {
			return s, true
		}
	}
	return Socket{}, false
}

// connInode reads the inode of the socket of c from its descriptor.
func connInode(t *testing.T, c syscall.Conn) uint64 {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.Fstat(int(fd), &st) }); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatal(serr)
	}
	return st.Ino
}

// Two reuseport sockets on one address, for each UDP network, form one
// group: a plain socket cannot bind there, UDPSockets finds both, with the
// inodes this process holds, and datagrams from many senders reach both.
func TestListenPacketGroup(t *testing.T) {
	for _, tc := range []struct{ network, address string }{
		{"udp4", "127.0.0.1:0"},
		{"udp", "127.0.0.1:0"},
		{"udp6", "[::1]:0"},
		{"udp", "[::1]:0"},
	} {
		t.Run(tc.network+"-"+tc.address, func(t *testing.T) {
			if netip.MustParseAddrPort(tc.address).Addr().Is6() {
				hasIPv6Loopback(t)
			}
			c1 := listenUDP(t, tc.network, tc.address)
			c2 := listenUDP(t, tc.network, c1.LocalAddr().String())
			port := udpPort(c1)
			if p := udpPort(c2); p != port {
				t.Fatalf("second socket on port %d, want %d", p, port)
			}
			for _, c := range []*net.UDPConn{c1, c2} {
				if sockoptInt(t, c, unix.SO_REUSEPORT) == 0 {
					t.Error("SO_REUSEPORT not set")
				}
			}
			pc, err := net.ListenPacket(tc.network, c1.LocalAddr().String())
			if err == nil {
				pc.Close()
				t.Fatal("plain net.ListenPacket on a reuseport port succeeded")
			}
			if !errors.Is(err, syscall.EADDRINUSE) {
				t.Errorf("plain net.ListenPacket: %v, want EADDRINUSE", err)
			}

			socks, err := UDPSockets(port)
			if err != nil {
				t.Fatal(err)
			}
			if len(socks) != 2 {
				t.Fatalf("UDPSockets(%d): %d sockets, want 2: %+v", port, len(socks), socks)
			}
			own, err := Inodes(os.Getpid())
			if err != nil {
				t.Fatal(err)
			}
			want := c1.LocalAddr().(*net.UDPAddr).AddrPort()
			for i, c := range []*net.UDPConn{c1, c2} {
				s, ok := byInode(t, socks, c)
				if !ok {
					t.Fatalf("socket %d (inode %d) not in %+v", i+1, connInode(t, c), socks)
				}
				if _, ok := own[s.Inode]; !ok {
					t.Errorf("inode %d not among the inodes of this process", s.Inode)
				}
				if s.Addr != want || s.Peer.IsValid() || s.UID != uint32(os.Getuid()) {
					t.Errorf("socket %d: %+v, want address %v, no peer, uid %d", i+1, s, want, os.Getuid())
				}
				if s.RecvBufBytes == 0 || s.RecvQueueBytes != 0 || s.Queue != 0 || s.Backlog != 0 {
					t.Errorf("socket %d: %+v, want a receive buffer, nothing queued", i+1, s)
				}
			}

			// The kernel picks a socket of the group by the sender's
			// address: 64 senders all landing on one socket has a chance
			// of 2^-63.
			const senders = 64
			for range senders {
				s, err := net.DialUDP(tc.network, nil, net.UDPAddrFromAddrPort(want))
				if err != nil {
					t.Fatal(err)
				}
				_, err = s.Write([]byte("x"))
				s.Close()
				if err != nil {
					t.Fatal(err)
				}
			}
			counts := [2]int{}
			deadline := time.Now().Add(5 * time.Second)
			buf := make([]byte, 16)
			for counts[0]+counts[1] < senders && time.Now().Before(deadline) {
				for i, c := range []*net.UDPConn{c1, c2} {
					c.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
					for {
						if _, _, err := c.ReadFrom(buf); err != nil {
							break
						}
						counts[i]++
					}
				}
			}
			t.Logf("received %d and %d of %d datagrams", counts[0], counts[1], senders)
			if counts[0]+counts[1] != senders {
				t.Errorf("received %d datagrams, want %d", counts[0]+counts[1], senders)
			}
			if counts[0] == 0 || counts[1] == 0 {
				t.Errorf("one socket received nothing: %d and %d", counts[0], counts[1])
			}
		})
	}
}

// Datagrams that are not read fill the receive queue, whose bytes
// UDPSockets reports; when the buffer is full the kernel drops them, and
// UDPSockets counts the drops. The /proc fallback agrees.
func TestUDPSocketsQueueAndDrops(t *testing.T) {
	for _, address := range []string{"127.0.0.1:0", "[::1]:0"} {
		t.Run(address, func(t *testing.T) {
			if netip.MustParseAddrPort(address).Addr().Is6() {
				hasIPv6Loopback(t)
			}
			testQueueAndDrops(t, address)
		})
	}
}

func testQueueAndDrops(t *testing.T, address string) {
	var lc ListenConfig
	lc.Control = func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			// The kernel doubles it, and raises it to its minimum.
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, 4096)
		})
		if err != nil {
			return err
		}
		return serr
	}
	pc, err := lc.ListenPacket(context.Background(), "udp", address)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	c := pc.(*net.UDPConn)
	port := udpPort(c)
	rcvbuf := sockoptInt(t, c, unix.SO_RCVBUF)

	sender, err := net.DialUDP("udp", nil, c.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer sender.Close()
	send := func(n int) {
		t.Helper()
		for range n {
			if _, err := sender.Write(make([]byte, 100)); err != nil {
				t.Fatal(err)
			}
		}
	}
	mine := func(socks []Socket) Socket {
		t.Helper()
		s, ok := byInode(t, socks, c)
		if !ok {
			t.Fatalf("socket not found in UDPSockets(%d): %+v", port, socks)
		}
		return s
	}

	s := mine(waitUDP(t, port, UDPSockets, func([]Socket) bool { return true }))
	if s.RecvQueueBytes != 0 || s.Drops != 0 || s.RecvBufBytes != uint32(rcvbuf) {
		t.Fatalf("fresh socket: %+v, want nothing queued, no drops, a buffer of %d (SO_RCVBUF)", s, rcvbuf)
	}

	send(1)
	s = mine(waitUDP(t, port, UDPSockets, func(ss []Socket) bool { return mine(ss).RecvQueueBytes > 0 }))
	one := s.RecvQueueBytes
	if one < 100 {
		t.Fatalf("one datagram of 100 bytes queued: %+v, want at least 100 bytes", s)
	}
	send(1)
	s = mine(waitUDP(t, port, UDPSockets, func(ss []Socket) bool { return mine(ss).RecvQueueBytes > one }))
	if s.RecvQueueBytes != 2*one {
		t.Fatalf("two datagrams queued: %d bytes, want %d", s.RecvQueueBytes, 2*one)
	}
	t.Logf("a datagram of 100 bytes takes %d bytes of a receive buffer of %d", one, s.RecvBufBytes)

	// Fill the buffer until the kernel drops (within 5 seconds).
	for range 20 {
		send(int(s.RecvBufBytes/one) + 1)
		s = mine(waitUDPFor(t, 250*time.Millisecond, port, UDPSockets, func(ss []Socket) bool { return mine(ss).Drops > 0 }))
		if s.Drops > 0 {
			break
		}
	}
	if s.Drops == 0 {
		t.Fatalf("no drops after filling the receive buffer: %+v", s)
	}
	if s.RecvQueueBytes < one || s.RecvQueueBytes > s.RecvBufBytes+one {
		t.Errorf("full buffer: %d bytes queued, want between %d and %d", s.RecvQueueBytes, one, s.RecvBufBytes+one)
	}
	t.Logf("full: %+v", s)

	// The /proc fallback reads the same, except the buffer size.
	p := mine(waitUDP(t, port, udpSocketsProc, func([]Socket) bool { return true }))
	want := s
	want.RecvBufBytes = 0
	if p != want {
		t.Errorf("from /proc: %+v\n   netlink: %+v", p, s)
	}

	// Reading empties the queue; the drops stay.
	buf := make([]byte, 200)
	for {
		c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if _, _, err := c.ReadFrom(buf); err != nil {
			break
		}
	}
	s2 := mine(waitUDP(t, port, UDPSockets, func(ss []Socket) bool { return mine(ss).RecvQueueBytes == 0 }))
	if s2.RecvQueueBytes != 0 || s2.Drops != s.Drops {
		t.Errorf("after reading: %+v, want nothing queued and %d drops", s2, s.Drops)
	}
}

// A reuseport socket connected to one peer, in the group of a listening
// socket, is returned with its peer; TCP listeners are not UDP sockets.
func TestUDPSocketsConnected(t *testing.T) {
	l := listenUDP(t, "udp4", "127.0.0.1:0")
	port := udpPort(l)
	peer := listenUDP(t, "udp4", "127.0.0.1:0")
	d := net.Dialer{
		LocalAddr: l.LocalAddr(),
		Control: func(network, _ string, rc syscall.RawConn) error {
			return control(network, rc)
		},
	}
	conn, err := d.Dial("udp4", peer.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	socks, err := UDPSockets(port)
	if err != nil {
		t.Fatal(err)
	}
	if len(socks) != 2 {
		t.Fatalf("UDPSockets(%d): %+v, want the listening and the connected socket", port, socks)
	}
	s, ok := byInode(t, socks, l)
	if !ok || s.Peer.IsValid() {
		t.Errorf("listening socket: %+v (found %v), want no peer", s, ok)
	}
	wantPeer := peer.LocalAddr().(*net.UDPAddr).AddrPort()
	s, ok = byInode(t, socks, conn.(*net.UDPConn))
	if !ok || s.Peer != wantPeer || int(s.Addr.Port()) != port {
		t.Errorf("connected socket: %+v (found %v), want port %d and peer %v", s, ok, port, wantPeer)
	}
	p, err := udpSocketsProc(port)
	if err != nil {
		t.Fatal(err)
	}
	if pc, ok := byInode(t, p, conn.(*net.UDPConn)); !ok || pc.Peer != wantPeer {
		t.Errorf("connected socket from /proc: %+v (found %v), want peer %v", pc, ok, wantPeer)
	}

	// TCP has its own ports: a TCP listener on the same number is not a
	// UDP socket, and the UDP sockets are no TCP listeners.
	tl, err := Listen("tcp4", l.LocalAddr().String())
	if err != nil {
		t.Skipf("TCP port %d is taken: %v", port, err)
	}
	defer tl.Close()
	socks, err = UDPSockets(port)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := byInode(t, socks, tl.(*net.TCPListener)); ok || len(socks) != 2 {
		t.Errorf("UDPSockets(%d) = %+v, want only the 2 UDP sockets", port, socks)
	}
	tcp, err := Listeners(port)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := byInode(t, tcp, l); ok || len(tcp) != 1 {
		t.Errorf("Listeners(%d) = %+v, want only the TCP listener", port, tcp)
	}
}

// UDPSockets(0) lists the bound UDP sockets of every port, IPv4 and IPv6,
// and no TCP listener.
func TestUDPSocketsEveryPort(t *testing.T) {
	hasIPv6Loopback(t)
	c4 := listenUDP(t, "udp4", "127.0.0.1:0")
	c6 := listenUDP(t, "udp6", "[::1]:0")
	tl, _ := listenTCP4(t)
	tcpIno := connInode(t, tl.(*net.TCPListener))
	for _, read := range []struct {
		name string
		f    func(int) ([]Socket, error)
	}{{"netlink", UDPSockets}, {"proc", udpSocketsProc}} {
		socks, err := read.f(0)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range []*net.UDPConn{c4, c6} {
			s, ok := byInode(t, socks, c)
			if !ok || s.Addr != c.LocalAddr().(*net.UDPAddr).AddrPort() {
				t.Errorf("%s: UDPSockets(0) has %+v (found %v) for %v", read.name, s, ok, c.LocalAddr())
			}
		}
		if slices.ContainsFunc(socks, func(s Socket) bool { return s.Inode == tcpIno }) {
			t.Errorf("%s: UDPSockets(0) has the TCP listener %d", read.name, tcpIno)
		}
	}
	one, err := UDPSockets(udpPort(c6))
	if err != nil {
		t.Fatal(err)
	}
	if len(one) != 1 || one[0].Addr.Addr() != netip.IPv6Loopback() {
		t.Errorf("UDPSockets(%d) = %+v, want the one socket on ::1", udpPort(c6), one)
	}
}

func TestUDPSocketsBadPort(t *testing.T) {
	for _, p := range []int{-1, 65536} {
		if _, err := UDPSockets(p); err == nil {
			t.Errorf("UDPSockets(%d): no error", p)
		}
	}
}

// The kernel honours the port in a UDP dump request too.
func TestKernelPortFilterUDP(t *testing.T) {
	p1 := udpPort(listenUDP(t, "udp4", "127.0.0.1:0"))
	listenUDP(t, "udp4", "127.0.0.1:0")
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		t.Skip(err)
	}
	defer unix.Close(fd)
	if err := sendDiagRequest(fd, 1, unix.AF_INET, udpBound(p1)); err != nil {
		t.Fatal(err)
	}
	socks, err := recvDiagDump(fd, make([]byte, diagBufSize), 1, udpBound(0), nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(socks) != 1 || int(socks[0].Addr.Port()) != p1 {
		t.Errorf("kernel returned %+v for port %d, want its one socket", socks, p1)
	}
}

// Without netlink, UDPSockets reads /proc/net/udp and leaves RecvBufBytes
// at 0.
func TestUDPSocketsFallback(t *testing.T) {
	c1 := listenUDP(t, "udp4", "127.0.0.1:0")
	listenUDP(t, "udp4", c1.LocalAddr().String())
	port := udpPort(c1)
	old := netlinkSocket
	netlinkSocket = func(int, int, int) (int, error) { return -1, unix.EPROTONOSUPPORT }
	defer func() { netlinkSocket = old }()
	socks, err := UDPSockets(port)
	if err != nil {
		t.Fatal(err)
	}
	if len(socks) != 2 {
		t.Fatalf("UDPSockets(%d) from /proc: %+v, want 2 sockets", port, socks)
	}
	for _, s := range socks {
		if int(s.Addr.Port()) != port || s.RecvBufBytes != 0 || s.UID != uint32(os.Getuid()) || s.Inode == 0 {
			t.Errorf("socket from /proc: %+v", s)
		}
	}
}

// diagMsg builds an inet_diag_msg of a UDP socket on 127.0.0.1:port,
// followed by attrs.
func diagMsg(port uint16, rqueue uint32, attrs ...[]byte) []byte {
	ne := binary.NativeEndian
	m := make([]byte, sizeofInetDiagMsg)
	m[0], m[1] = unix.AF_INET, tcpClose
	binary.BigEndian.PutUint16(m[4:], port)
	copy(m[8:], []byte{127, 0, 0, 1})
	ne.PutUint32(m[56:], rqueue)
	ne.PutUint32(m[64:], 1000)
	ne.PutUint32(m[68:], 4242)
	for _, a := range attrs {
		m = append(m, a...)
	}
	return m
}

// rtattr builds an attribute, padded to 4 bytes.
func rtattr(typ uint16, vals ...uint32) []byte {
	ne := binary.NativeEndian
	a := make([]byte, 4+4*len(vals))
	ne.PutUint16(a[0:], uint16(len(a)))
	ne.PutUint16(a[2:], typ)
	for i, v := range vals {
		ne.PutUint32(a[4+4*i:], v)
	}
	return a
}

func TestParseDiagMsgUDP(t *testing.T) {
	ap := netip.MustParseAddrPort
	q := udpBound(53)
	meminfo := rtattr(inetDiagSkMeminfo, 768, 4608, 0, 212992, 0, 0, 0, 0, 9)
	for _, tc := range []struct {
		name string
		msg  []byte
		want Socket
		ok   bool
	}{
		{"meminfo", diagMsg(53, 768, meminfo),
			Socket{Inode: 4242, UID: 1000, Addr: ap("127.0.0.1:53"), RecvQueueBytes: 768, RecvBufBytes: 4608, Drops: 9}, true},
		{"meminfo after another attribute, 5-byte one padded", diagMsg(53, 0, []byte{5, 0, 8, 0, 1, 0, 0, 0}, meminfo),
			Socket{Inode: 4242, UID: 1000, Addr: ap("127.0.0.1:53"), RecvBufBytes: 4608, Drops: 9}, true},
		{"no drops before Linux 4.7", diagMsg(53, 0, rtattr(inetDiagSkMeminfo, 0, 4608, 0, 0, 0, 0, 0, 0)),
			Socket{Inode: 4242, UID: 1000, Addr: ap("127.0.0.1:53"), RecvBufBytes: 4608}, true},
		{"no attributes", diagMsg(53, 0),
			Socket{Inode: 4242, UID: 1000, Addr: ap("127.0.0.1:53")}, true},
		{"malformed attribute", diagMsg(53, 0, []byte{200, 0, 7, 0}),
			Socket{Inode: 4242, UID: 1000, Addr: ap("127.0.0.1:53")}, true},
		{"other port", diagMsg(54, 0, meminfo), Socket{}, false},
	} {
		got, ok := parseDiagMsg(tc.msg, q)
		if got != tc.want || ok != tc.ok {
			t.Errorf("%s: %+v, %v\nwant %+v, %v", tc.name, got, ok, tc.want, tc.ok)
		}
	}
}
