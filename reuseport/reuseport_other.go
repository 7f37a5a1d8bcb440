//go:build !linux

package reuseport

import (
	"errors"
	"syscall"
)

func supported() error { return errNotLinux }

func control(string, syscall.RawConn) error { return errNotLinux }

func listeners(int) ([]Socket, error) { return nil, errNoProc }

func inodes(int) (map[uint64]struct{}, error) { return nil, errNoProc }

// errNoProc is returned by Listeners and Inodes on platforms other than Linux.
var errNoProc = errors.New("reuseport: reading sockets from the kernel needs Linux")
