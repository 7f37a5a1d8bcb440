package main

import (
	"net"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// staleSocket leaves a socket file with no listener, as a master killed
// with SIGKILL does.
func staleSocket(t *testing.T, path string) {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
}

// A socket a killed master left does not make 'shoal ctl' ask which master.
func TestPickMasterSkipsStaleSockets(t *testing.T) {
	dir := t.TempDir()
	live, stale, stale2 := filepath.Join(dir, "shoal-8000.sock"), filepath.Join(dir, "shoal-9000.sock"), filepath.Join(dir, "shoal-9001.sock")
	ln, err := net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	staleSocket(t, stale)
	staleSocket(t, stale2)
	if got, err := pickMaster([]string{live, stale}); err != nil || got != live {
		t.Errorf("live and stale: %q, %v; want %s", got, err, live)
	}
	if _, err := pickMaster([]string{stale, stale2}); err == nil || !strings.Contains(err.Error(), "left from masters that were killed") {
		t.Errorf("two stale sockets: %v, want an error naming them", err)
	}
	ln2, err := net.Listen("unix", stale2+".live")
	if err != nil {
		t.Fatal(err)
	}
	defer ln2.Close()
	if _, err := pickMaster([]string{live, stale2 + ".live"}); err == nil || !strings.Contains(err.Error(), "2 shoal masters found") {
		t.Errorf("two live masters: %v, want to be asked which", err)
	}
}
