package reuseport

import (
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TestWaiting: a listener in Go's poller (an epoll set) is waited on; a
// socket the process only holds, outside any epoll set, is not; Holders
// names this process for both.
func TestWaiting(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 8); err != nil {
		t.Fatal(err)
	}
	inode := func(fd int) uint64 {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			t.Fatal(err)
		}
		return st.Ino
	}
	var polled uint64
	rc, _ := ln.(*net.TCPListener).SyscallConn()
	rc.Control(func(p uintptr) { polled = inode(int(p)) })
	held := inode(fd)

	got, err := Waiting(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := got[polled]; !ok {
		t.Errorf("the listener in Go's epoll set (inode %d) is not among the waited-on sockets %v", polled, got)
	}
	if _, ok := got[held]; ok {
		t.Errorf("a socket outside any epoll set (inode %d) counts as waited on", held)
	}
	h := Holders([]uint64{polled, held})
	for _, ino := range []uint64{polled, held} {
		if len(h[ino]) != 1 || h[ino][0] != os.Getpid() {
			t.Errorf("holders of %d: %v, want this process (%d)", ino, h[ino], os.Getpid())
		}
	}
}
