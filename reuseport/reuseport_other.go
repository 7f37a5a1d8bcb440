//go:build !linux

package reuseport

import (
	"errors"
	"syscall"
)

// errNotLinux is returned on platforms other than Linux.
var errNotLinux = errors.New("reuseport: SO_REUSEPORT listeners need Linux")

func supported() error { return errNotLinux }

func control(string, syscall.RawConn) error { return errNotLinux }

func listeners(int) ([]Socket, error) { return nil, errNoProc }

func udpSockets(int) ([]Socket, error) { return nil, errNoProc }

func inodes(int) (map[uint64]struct{}, error) { return nil, errNoProc }

// errNoProc is returned by Listeners, UDPSockets and Inodes on platforms other than Linux.
var errNoProc = errors.New("reuseport: reading sockets from the kernel needs Linux")

// ErrNoMigrateReq is returned where there is no net.ipv4.tcp_migrate_req.
var ErrNoMigrateReq = errors.New("reuseport: net.ipv4.tcp_migrate_req needs Linux 5.14 or later")

// MigrateReq reports ErrNoMigrateReq on platforms other than Linux.
func MigrateReq() (bool, error) { return false, ErrNoMigrateReq }

// SetMigrateReq reports ErrNoMigrateReq on platforms other than Linux.
func SetMigrateReq(bool) error { return ErrNoMigrateReq }

// Waiting reports errNoProc on platforms other than Linux.
func Waiting(int) (map[uint64]struct{}, error) { return nil, errNoProc }

// Holders finds nothing on platforms other than Linux.
func Holders([]uint64) map[uint64][]int { return nil }

func descendants(int) []int { return nil }
