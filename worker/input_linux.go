package worker

import (
	"net"
	"syscall"
)

// hasInput reports whether bytes wait to be read on c, without reading
// them. It reports false when the peer has closed its side and nothing is
// left to read, and when it cannot tell.
func hasInput(c net.Conn) bool {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	var b [1]byte
	var n int
	var rerr error
	err = rc.Control(func(fd uintptr) {
		n, _, rerr = syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	})
	return err == nil && rerr == nil && n > 0
}
