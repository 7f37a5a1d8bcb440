package worker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/shoal-sh/shoal/reuseport"
	"golang.org/x/sys/unix"
)

// Listen returns the sockets a worker serves on, whichever way shoal binds
// them: the ones the master passed (shoal --bind master, or systemd's
// socket activation: LISTEN_FDS and LISTEN_PID naming this process, fds 3,
// 4, ... in order), or else its listeners bound here with SO_REUSEPORT:
// each of SHOAL_PORTS ("tcp:443,udp:443"), else PORT as TCP, else
// DefaultAddr, on HOST when shoal sets it. TCP listeners come in tcp,
// UDP sockets in udp, each in listener order. On an error, nothing stays
// open.
func Listen(ctx context.Context) (tcp []net.Listener, udp []net.PacketConn, err error) {
	if tcp, udp, ok, err := inherited(); ok || err != nil {
		return tcp, udp, err
	}
	defer func() {
		if err != nil {
			closeAll(tcp, udp)
			tcp, udp = nil, nil
		}
	}()
	var lc reuseport.ListenConfig
	for _, addr := range tcpAddrs() {
		ln, err := lc.Listen(ctx, "tcp", addr)
		if err != nil {
			return tcp, udp, listenError(err)
		}
		tcp = append(tcp, ln)
	}
	for _, addr := range udpAddrs() {
		pc, err := lc.ListenPacket(ctx, "udp", addr)
		if err != nil {
			return tcp, udp, listenError(err)
		}
		udp = append(udp, pc)
	}
	return tcp, udp, nil
}

func closeAll(tcp []net.Listener, udp []net.PacketConn) {
	for _, l := range tcp {
		l.Close()
	}
	for _, p := range udp {
		p.Close()
	}
}

// inherited returns the sockets passed with systemd's protocol, when
// LISTEN_PID is this process; ok is false when none were passed to it.
func inherited() (tcp []net.Listener, udp []net.PacketConn, ok bool, err error) {
	n, _ := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	if n <= 0 || os.Getenv("LISTEN_PID") != strconv.Itoa(os.Getpid()) {
		return nil, nil, false, nil
	}
	for fd := 3; fd < 3+n; fd++ {
		f := os.NewFile(uintptr(fd), "LISTEN_FDS "+strconv.Itoa(fd))
		typ, serr := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
		if serr != nil {
			err = fmt.Errorf("worker: inherited fd %d (LISTEN_FDS=%d): not a socket: %w", fd, n, serr)
		} else if typ == unix.SOCK_DGRAM {
			var pc net.PacketConn
			if pc, err = net.FilePacketConn(f); err == nil {
				udp = append(udp, pc)
			}
		} else {
			var ln net.Listener
			if ln, err = net.FileListener(f); err == nil {
				tcp = append(tcp, ln)
			}
		}
		f.Close() // the listener holds a duplicate
		if err != nil {
			closeAll(tcp, udp)
			return nil, nil, true, fmt.Errorf("worker: inherited fd %d: %w", fd, err)
		}
	}
	return tcp, udp, true, nil
}

// udpAddrs returns the UDP addresses of SHOAL_PORTS, on HOST.
func udpAddrs() []string {
	var addrs []string
	for _, l := range strings.Split(os.Getenv("SHOAL_PORTS"), ",") {
		if p, ok := strings.CutPrefix(strings.TrimSpace(l), "udp:"); ok && p != "" {
			addrs = append(addrs, net.JoinHostPort(os.Getenv("HOST"), p))
		}
	}
	return addrs
}

// tcpAddrs returns the TCP addresses a worker serves by default: one per
// TCP listener in SHOAL_PORTS ("tcp:443,udp:443"), else PORT, else
// DefaultAddr's port; on HOST when shoal sets it, else on every address.
func tcpAddrs() []string {
	host := os.Getenv("HOST")
	var ports []string
	for _, l := range strings.Split(os.Getenv("SHOAL_PORTS"), ",") {
		if p, ok := strings.CutPrefix(strings.TrimSpace(l), "tcp:"); ok && p != "" {
			ports = append(ports, p)
		}
	}
	if len(ports) == 0 {
		if p := os.Getenv("PORT"); p != "" {
			ports = []string{p}
		}
	}
	if len(ports) == 0 {
		return []string{DefaultAddr}
	}
	addrs := make([]string, len(ports))
	for i, p := range ports {
		addrs[i] = net.JoinHostPort(host, p)
	}
	return addrs
}

// joined is one net.Listener over several: Accept returns the next
// connection of any of them, Close closes them all.
type joined struct {
	lns   []net.Listener
	conns chan net.Conn
	errs  chan error
	done  chan struct{}
	once  sync.Once
	wg    sync.WaitGroup
}

// Join returns one listener that accepts on every one of lns, for
// [Server.Serve]: Accept returns the next connection of any of them, Close
// closes them all. With one listener it returns it.
func Join(lns ...net.Listener) net.Listener {
	if len(lns) == 1 {
		return lns[0]
	}
	j := &joined{lns: lns, conns: make(chan net.Conn), errs: make(chan error, len(lns)), done: make(chan struct{})}
	for _, ln := range lns {
		j.wg.Add(1)
		go func() {
			defer j.wg.Done()
			for {
				c, err := ln.Accept()
				if err != nil {
					var ne net.Error
					if errors.As(err, &ne) && ne.Timeout() {
						continue
					}
					j.errs <- err
					return
				}
				select {
				case j.conns <- c:
				case <-j.done:
					c.Close()
					return
				}
			}
		}()
	}
	return j
}

func (j *joined) Accept() (net.Conn, error) {
	select {
	case c := <-j.conns:
		return c, nil
	case <-j.done:
		return nil, net.ErrClosed
	case err := <-j.errs:
		return nil, err
	}
}

// Close closes every listener and waits for their accept loops to end.
func (j *joined) Close() error {
	var err error
	j.once.Do(func() {
		close(j.done)
		for _, ln := range j.lns {
			if cerr := ln.Close(); cerr != nil && err == nil {
				err = cerr
			}
		}
		j.wg.Wait()
	})
	return err
}

func (j *joined) Addr() net.Addr { return j.lns[0].Addr() }
