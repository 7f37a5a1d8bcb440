//go:build linux

package reuseport

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// listenTCP4 opens a reuseport listener on a port chosen by the kernel.
func listenTCP4(t testing.TB) (net.Listener, int) {
	t.Helper()
	l, err := Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l, l.Addr().(*net.TCPAddr).Port
}

// listenSame opens another reuseport listener on the address of l.
func listenSame(t testing.TB, l net.Listener) net.Listener {
	t.Helper()
	l2, err := Listen(l.Addr().Network()+"4", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l2.Close() })
	return l2
}

func sockoptInt(t *testing.T, c syscall.Conn, opt int) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var serr error
	if err := rc.Control(func(fd uintptr) {
		v, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, opt)
	}); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatal(serr)
	}
	return v
}

func TestListenTCP4SamePort(t *testing.T) {
	l1, port := listenTCP4(t)
	l2 := listenSame(t, l1)
	if got := l2.Addr().(*net.TCPAddr).Port; got != port {
		t.Fatalf("second listener on port %d, want %d", got, port)
	}
	for _, l := range []net.Listener{l1, l2} {
		tl := l.(*net.TCPListener)
		if sockoptInt(t, tl, unix.SO_REUSEPORT) == 0 {
			t.Error("SO_REUSEPORT not set")
		}
		if sockoptInt(t, tl, unix.SO_REUSEADDR) == 0 {
			t.Error("SO_REUSEADDR not set")
		}
	}
	pl, err := net.Listen("tcp4", l1.Addr().String())
	if err == nil {
		pl.Close()
		t.Fatal("plain net.Listen on a reuseport port succeeded")
	}
	if !errors.Is(err, syscall.EADDRINUSE) {
		t.Errorf("plain net.Listen: %v, want EADDRINUSE", err)
	}
}

func TestListenBusyPortError(t *testing.T) {
	pl, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pl.Close()
	addr := pl.Addr().String()
	l, err := Listen("tcp4", addr)
	if err == nil {
		l.Close()
		t.Fatal("reuseport Listen on a port held by a plain listener succeeded")
	}
	want := "reuseport: listen tcp4 " + addr + ": "
	if !strings.HasPrefix(err.Error(), want) || !errors.Is(err, syscall.EADDRINUSE) {
		t.Errorf("error %q, want prefix %q and EADDRINUSE", err, want)
	}
	var op *net.OpError
	if !errors.As(err, &op) {
		t.Errorf("error %v does not wrap a *net.OpError", err)
	}
}

func hasIPv6Loopback(t *testing.T) {
	t.Helper()
	l, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	l.Close()
}

func TestListenTCP6SamePort(t *testing.T) {
	hasIPv6Loopback(t)
	l1, err := Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l1.Close()
	l2, err := Listen("tcp6", l1.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Close()
	if _, err := net.Listen("tcp6", l1.Addr().String()); err == nil {
		t.Fatal("plain net.Listen on a reuseport port succeeded")
	}
	socks, err := Listeners(l1.Addr().(*net.TCPAddr).Port)
	if err != nil {
		t.Fatal(err)
	}
	if len(socks) != 2 {
		t.Fatalf("Listeners: %d sockets, want 2: %+v", len(socks), socks)
	}
	for _, s := range socks {
		if s.Addr.Addr() != netip.IPv6Loopback() {
			t.Errorf("Listeners: address %v, want ::1", s.Addr)
		}
	}
}

func TestListenPacketUDPSamePort(t *testing.T) {
	c1, err := ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	c2, err := ListenPacket("udp4", c1.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if sockoptInt(t, c2.(*net.UDPConn), unix.SO_REUSEPORT) == 0 {
		t.Error("SO_REUSEPORT not set")
	}
	if pc, err := net.ListenPacket("udp4", c1.LocalAddr().String()); err == nil {
		pc.Close()
		t.Fatal("plain net.ListenPacket on a reuseport port succeeded")
	}
}

func TestControlCalled(t *testing.T) {
	var calls atomic.Int32
	var lc ListenConfig
	lc.Control = func(network, address string, c syscall.RawConn) error {
		calls.Add(1)
		return nil
	}
	lc.SetMultipathTCP(true) // must be overridden
	l, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if calls.Load() != 1 {
		t.Errorf("Control called %d times, want 1", calls.Load())
	}
	tl := l.(*net.TCPListener)
	if sockoptInt(t, tl, unix.SO_REUSEPORT) == 0 {
		t.Error("SO_REUSEPORT not set after a custom Control")
	}
	if p := sockoptInt(t, tl, unix.SO_PROTOCOL); p != unix.IPPROTO_TCP {
		t.Errorf("socket protocol %d, want IPPROTO_TCP (MPTCP off)", p)
	}

	pc, err := lc.ListenPacket(context.Background(), "udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	pc.Close()
	if calls.Load() != 2 {
		t.Errorf("Control called %d times, want 2", calls.Load())
	}

	boom := errors.New("boom")
	lc.Control = func(string, string, syscall.RawConn) error { return boom }
	if l, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0"); err == nil {
		l.Close()
		t.Fatal("Listen succeeded although Control failed")
	} else if !errors.Is(err, boom) || !strings.HasPrefix(err.Error(), "reuseport: listen tcp4 ") {
		t.Errorf("Listen error %q, want the Control error with the operation named", err)
	}
}

func TestUnknownNetwork(t *testing.T) {
	for _, tc := range []struct {
		network string
		packet  bool
	}{
		{"unix", false}, {"udp", false}, {"ip4:1", false}, {"", false},
		{"tcp", true}, {"unixgram", true}, {"ip", true},
	} {
		var err error
		if tc.packet {
			_, err = ListenPacket(tc.network, "127.0.0.1:0")
		} else {
			_, err = Listen(tc.network, "127.0.0.1:0")
		}
		if err == nil {
			t.Errorf("%q (packet %v): no error", tc.network, tc.packet)
			continue
		}
		if !strings.HasPrefix(err.Error(), "reuseport: listen "+tc.network+" ") ||
			!strings.Contains(err.Error(), "unsupported network") {
			t.Errorf("%q (packet %v): error %q does not name the network", tc.network, tc.packet, err)
		}
	}
}

func TestUnsupportedKernel(t *testing.T) {
	old := setsockoptInt
	setsockoptInt = func(fd, level, opt, value int) error {
		if opt == unix.SO_REUSEPORT {
			return unix.ENOPROTOOPT
		}
		return old(fd, level, opt, value)
	}
	defer func() { setsockoptInt = old }()
	_, err := Listen("tcp4", "127.0.0.1:0")
	if !errors.Is(err, ErrUnsupported) || !errors.Is(err, unix.ENOPROTOOPT) {
		t.Fatalf("Listen error %v, want ErrUnsupported and ENOPROTOOPT", err)
	}
	if !strings.Contains(err.Error(), "Linux 3.9") || !strings.Contains(err.Error(), "listen tcp4 127.0.0.1:0") {
		t.Errorf("error %q does not explain itself", err)
	}
	_, err = ListenPacket("udp4", "127.0.0.1:0")
	if !errors.Is(err, ErrUnsupported) {
		t.Fatalf("ListenPacket error %v, want ErrUnsupported", err)
	}
}

func TestConnectionsSpread(t *testing.T) {
	l1, _ := listenTCP4(t)
	l2 := listenSame(t, l1)
	const dials = 200
	var counts [2]atomic.Int32
	var wg sync.WaitGroup
	for i, l := range []net.Listener{l1, l2} {
		wg.Go(func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				counts[i].Add(1)
				c.Close()
			}
		})
	}
	for range dials {
		c, err := net.DialTimeout("tcp4", l1.Addr().String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	deadline := time.Now().Add(5 * time.Second)
	for counts[0].Load()+counts[1].Load() < dials && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	l1.Close()
	l2.Close()
	wg.Wait()
	a, b := counts[0].Load(), counts[1].Load()
	t.Logf("accepted %d and %d of %d", a, b, dials)
	if a+b != dials {
		t.Errorf("accepted %d connections, want %d", a+b, dials)
	}
	if a == 0 || b == 0 {
		t.Errorf("one listener accepted nothing: %d and %d", a, b)
	}
}

func TestListeners(t *testing.T) {
	l1, port := listenTCP4(t)
	l2 := listenSame(t, l1)
	_ = l2
	socks, err := Listeners(port)
	if err != nil {
		t.Fatal(err)
	}
	if len(socks) != 2 {
		t.Fatalf("Listeners(%d): %d sockets, want 2: %+v", port, len(socks), socks)
	}
	want := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port))
	for _, s := range socks {
		if s.Addr != want {
			t.Errorf("address %v, want %v", s.Addr, want)
		}
		if s.UID != uint32(os.Getuid()) {
			t.Errorf("uid %d, want %d", s.UID, os.Getuid())
		}
		if s.Backlog == 0 {
			t.Error("backlog 0")
		}
		if s.Queue != 0 {
			t.Errorf("queue %d before any dial", s.Queue)
		}
		if s.Inode == 0 {
			t.Error("inode 0")
		}
	}
	if socks[0].Inode == socks[1].Inode {
		t.Errorf("both sockets have inode %d", socks[0].Inode)
	}

	// Connections that are not accepted wait in the accept queues.
	const k = 5
	for range k {
		c, err := net.DialTimeout("tcp4", want.String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	queued := func(socks []Socket) (n uint32) {
		for _, s := range socks {
			n += s.Queue
		}
		return n
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		socks, err = Listeners(port)
		if err != nil {
			t.Fatal(err)
		}
		if queued(socks) == k || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if n := queued(socks); n != k {
		t.Fatalf("accept queues hold %d connections, want %d: %+v", n, k, socks)
	}

	// The /proc fallback sees the same sockets, without the backlog.
	psocks, err := listenersProc(port)
	if err != nil {
		t.Fatal(err)
	}
	if len(psocks) != 2 || queued(psocks) != k {
		t.Fatalf("listenersProc(%d) = %+v, want the 2 sockets with %d queued", port, psocks, k)
	}
	byInode := map[uint64]Socket{}
	for _, s := range socks {
		byInode[s.Inode] = s
	}
	for _, p := range psocks {
		s, ok := byInode[p.Inode]
		if !ok || p.Addr != s.Addr || p.UID != s.UID || p.Queue != s.Queue || p.Backlog != 0 {
			t.Errorf("listenersProc: %+v, netlink: %+v", p, s)
		}
	}
}

func TestListenersEveryPort(t *testing.T) {
	_, p1 := listenTCP4(t)
	_, p2 := listenTCP4(t)
	socks, err := Listeners(0)
	if err != nil {
		t.Fatal(err)
	}
	found := map[int]bool{}
	for _, s := range socks {
		found[int(s.Addr.Port())] = true
	}
	if !found[p1] || !found[p2] {
		t.Errorf("Listeners(0) misses port %d or %d: %+v", p1, p2, socks)
	}
	one, err := Listeners(p1)
	if err != nil {
		t.Fatal(err)
	}
	if len(one) != 1 || int(one[0].Addr.Port()) != p1 {
		t.Errorf("Listeners(%d) = %+v", p1, one)
	}
}

func TestListenersBadPort(t *testing.T) {
	for _, p := range []int{-1, 65536} {
		if _, err := Listeners(p); err == nil {
			t.Errorf("Listeners(%d): no error", p)
		}
	}
}

// The kernel honours the port in the request (id.idiag_sport) of a dump.
func TestKernelPortFilter(t *testing.T) {
	_, p1 := listenTCP4(t)
	_, p2 := listenTCP4(t)
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		t.Skip(err)
	}
	defer unix.Close(fd)
	if err := sendDiagRequest(fd, 1, unix.AF_INET, tcpListeners(p1)); err != nil {
		t.Fatal(err)
	}
	// Port 0: no filtering in user space.
	socks, err := recvDiagDump(fd, make([]byte, diagBufSize), 1, tcpListeners(0), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range socks {
		if int(s.Addr.Port()) != p1 {
			t.Errorf("kernel returned a listener on port %d (asked for %d, other %d)", s.Addr.Port(), p1, p2)
		}
	}
	if len(socks) != 1 {
		t.Errorf("kernel returned %d listeners on port %d, want 1", len(socks), p1)
	}
}

func TestNetlinkTruncated(t *testing.T) {
	listenTCP4(t)
	if _, err := dump(make([]byte, 64), tcpListeners(0)); err != errTruncated {
		t.Fatalf("dump into 64 bytes: %v, want errTruncated", err)
	}
}

// Without netlink, Listeners reads /proc/net/tcp and leaves Backlog at 0.
func TestListenersFallback(t *testing.T) {
	l1, port := listenTCP4(t)
	listenSame(t, l1)
	old := netlinkSocket
	netlinkSocket = func(int, int, int) (int, error) { return -1, unix.EPROTONOSUPPORT }
	defer func() { netlinkSocket = old }()
	socks, err := Listeners(port)
	if err != nil {
		t.Fatal(err)
	}
	if len(socks) != 2 {
		t.Fatalf("Listeners(%d) from /proc: %+v, want 2 sockets", port, socks)
	}
	for _, s := range socks {
		if int(s.Addr.Port()) != port || s.Backlog != 0 || s.UID != uint32(os.Getuid()) || s.Inode == 0 {
			t.Errorf("socket from /proc: %+v", s)
		}
	}
}
