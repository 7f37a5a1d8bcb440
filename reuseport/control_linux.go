//go:build linux

package reuseport

import (
	"errors"
	"os"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// setsockoptInt is unix.SetsockoptInt; tests replace it to fake a kernel
// without SO_REUSEPORT.
var setsockoptInt = unix.SetsockoptInt

func supported() error { return nil }

// control sets SO_REUSEPORT, and SO_REUSEADDR for TCP, on the socket rc.
func control(network string, rc syscall.RawConn) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		if err := setsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			serr = os.NewSyscallError("setsockopt SO_REUSEPORT", err)
			if errors.Is(err, unix.ENOPROTOOPT) || errors.Is(err, unix.EINVAL) {
				serr = &unsupportedError{serr}
			}
			return
		}
		if strings.HasPrefix(network, "tcp") {
			if err := setsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
				serr = os.NewSyscallError("setsockopt SO_REUSEADDR", err)
			}
		}
	})
	if err != nil {
		return err
	}
	return serr
}
