package main

import (
	"testing"

	"golang.org/x/sys/unix"
)

// TestCloexec checks both ways of marking inherited descriptors: the
// close_range call and the /proc/self/fd walk for kernels before 5.11.
func TestCloexec(t *testing.T) {
	for name, mark := range map[string]func(int) error{"close_range": cloexecFrom, "proc": cloexecByProc} {
		// An inherited descriptor: opened without O_CLOEXEC.
		fd, err := unix.Open("/dev/null", unix.O_RDONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		if flags, _ := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); flags&unix.FD_CLOEXEC != 0 {
			t.Fatalf("fd %d is close-on-exec before the test", fd)
		}
		if err := mark(fd); err != nil {
			t.Errorf("%s: %v", name, err)
		}
		if flags, _ := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); flags&unix.FD_CLOEXEC == 0 {
			t.Errorf("%s: fd %d not close-on-exec", name, fd)
		}
		// Standard input, output and error are left alone.
		if flags, _ := unix.FcntlInt(2, unix.F_GETFD, 0); flags&unix.FD_CLOEXEC != 0 {
			t.Errorf("%s: fd 2 became close-on-exec", name)
		}
		unix.Close(fd)
	}
}
