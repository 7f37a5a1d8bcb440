package sdnotify

import (
	"errors"
	"fmt"
	"os"
	"testing"
	"time"
)

func TestSendAndRead(t *testing.T) {
	name := fmt.Sprintf("shoal-test-%d-%d", os.Getpid(), time.Now().UnixNano())
	l, err := Listen(name)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	t.Setenv("NOTIFY_SOCKET", l.Addr())
	if err := Send("READY=1\nSTATUS=2/2 workers listening"); err != nil {
		t.Fatal(err)
	}
	m, err := l.Read()
	if err != nil {
		t.Fatal(err)
	}
	if m.PID != os.Getpid() || m.Fields["READY"] != "1" || m.Fields["STATUS"] != "2/2 workers listening" {
		t.Errorf("got %+v, want READY=1 and the status from pid %d", m, os.Getpid())
	}
	for _, bad := range []string{"READY", "=1", string(make([]byte, MaxDatagram+10))} {
		if err := SendTo(l.Addr(), bad); err != nil {
			t.Fatal(err)
		}
		m, err := l.Read()
		if !errors.Is(err, ErrBadDatagram) || m.PID != os.Getpid() {
			t.Errorf("datagram %.10q: %+v, %v; want ErrBadDatagram naming pid %d", bad, m, err, os.Getpid())
		}
	}
	t.Setenv("NOTIFY_SOCKET", "")
	if err := Send("READY=1"); err != nil {
		t.Errorf("Send without NOTIFY_SOCKET: %v, want nil", err)
	}
}
