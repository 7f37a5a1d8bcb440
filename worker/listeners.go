package worker

import (
	"errors"
	"net"
	"os"
	"strings"
	"sync"
)

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

// join returns a listener that accepts on every one of lns.
func join(lns []net.Listener) net.Listener {
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
