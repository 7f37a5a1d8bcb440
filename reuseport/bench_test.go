//go:build linux

package reuseport

import (
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkListeners measures Listeners on a port with 2 reuseport listeners:
// on an idle host, with 10,000 established loopback sockets on that port,
// and with 1,000 listeners on other ports. It compares the netlink dump with
// the kernel's port filter (what Listeners does), the netlink dump filtered
// in user space only, and the /proc/net/tcp fallback.
func BenchmarkListeners(b *testing.B) {
	l1, port := listenTCP4(b)
	l2 := listenSame(b, l1)

	run := func(b *testing.B) { compareReaders(b, port, listenersNetlink, listenersProc) }

	b.Run("idle", run)

	b.Run("conns=10000", func(b *testing.B) {
		const pairs = 5000
		raiseNofile(b, 2*pairs+500)
		conns := make(chan net.Conn, 2*pairs)
		for _, l := range []net.Listener{l1, l2} {
			go func() {
				for {
					c, err := l.Accept()
					if err != nil {
						return
					}
					conns <- c
				}
			}()
		}
		var all []net.Conn
		defer func() {
			for _, c := range all {
				c.Close()
			}
		}()
		for range pairs {
			c, err := net.DialTimeout("tcp4", l1.Addr().String(), 5*time.Second)
			if err != nil {
				b.Fatalf("dial after %d connections: %v", len(all)/2, err)
			}
			all = append(all, c)
		}
		timeout := time.After(10 * time.Second)
		for range pairs {
			select {
			case c := <-conns:
				all = append(all, c)
			case <-timeout:
				b.Fatal("timeout accepting the connections")
			}
		}
		run(b)
		b.Run("inodes-self", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				set, err := Inodes(os.Getpid())
				if err != nil {
					b.Fatal(err)
				}
				if len(set) < 2*pairs {
					b.Fatalf("%d socket inodes, want at least %d", len(set), 2*pairs)
				}
			}
		})
	})

	b.Run("listeners=1000", func(b *testing.B) {
		const n = 1000
		raiseNofile(b, n+500)
		for range n {
			l, err := net.Listen("tcp4", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
		}
		run(b)
	})
}

// raiseNofile raises the soft RLIMIT_NOFILE to at least n, or skips.
func raiseNofile(b *testing.B, n uint64) {
	b.Helper()
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		b.Skipf("getrlimit: %v", err)
	}
	if lim.Cur >= n {
		return
	}
	old := lim
	lim.Cur = n
	if lim.Max < n {
		lim.Max = n
	}
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		b.Skipf("need %d open files, RLIMIT_NOFILE is %d (hard %d) and cannot be raised: %v", n, old.Cur, old.Max, err)
	}
	b.Cleanup(func() { unix.Setrlimit(unix.RLIMIT_NOFILE, &old) })
}

// BenchmarkUDPSockets measures UDPSockets on a port with 2 reuseport
// sockets: on an idle host and with 1,000 UDP sockets on other ports. It
// compares the netlink dump with the kernel's port filter (what UDPSockets
// does), the netlink dump filtered in user space only, and the
// /proc/net/udp fallback.
func BenchmarkUDPSockets(b *testing.B) {
	c1 := listenUDP(b, "udp4", "127.0.0.1:0")
	listenUDP(b, "udp4", c1.LocalAddr().String())
	port := udpPort(c1)

	run := func(b *testing.B) { compareReaders(b, port, udpSocketsNetlink, udpSocketsProc) }

	b.Run("idle", run)

	b.Run("sockets=1000", func(b *testing.B) {
		const n = 1000
		raiseNofile(b, n+500)
		for range n {
			c, err := net.ListenPacket("udp4", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
		}
		run(b)
	})
}

// compareReaders benchmarks the ways of reading a port's two sockets: the
// netlink dump with the kernel's port filter, the dump filtered in user
// space only, and the /proc fallback.
func compareReaders(b *testing.B, port int, netlink func(int, bool) ([]Socket, error), proc func(int) ([]Socket, error)) {
	for _, r := range []struct {
		name string
		read func() ([]Socket, error)
	}{
		{"netlink", func() ([]Socket, error) { return netlink(port, true) }},
		{"netlink-userfilter", func() ([]Socket, error) { return netlink(port, false) }},
		{"proc", func() ([]Socket, error) { return proc(port) }},
	} {
		b.Run(r.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				socks, err := r.read()
				if err != nil {
					b.Fatal(err)
				}
				if len(socks) != 2 {
					b.Fatalf("%d sockets, want 2", len(socks))
				}
			}
		})
	}
}
