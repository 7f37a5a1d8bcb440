package ipc

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"go.uber.org/goleak"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/internal/testutil"
)

// helperEnv makes the test binary run as a worker (helperMain) instead of
// running tests.
const helperEnv = "SHOAL_IPC_TEST_HELPER"

func TestMain(m *testing.M) {
	if mode := os.Getenv(helperEnv); mode == "pace" {
		os.Exit(paceMain())
	} else if mode != "" {
		os.Exit(helperMain(mode))
	}
	// No goroutine of a Channel or Conn outlives its Close.
	goleak.VerifyTestMain(m)
}

// helperMain is a Go worker: it says it is ready with the package-level Send,
// echoes every message back until its master goes, then exits 0. Problems
// go to stderr with exit code 2.
func helperMain(mode string) int {
	fail := func(format string, args ...any) int {
		fmt.Fprintf(os.Stderr, "helper: "+format+"\n", args...)
		return 2
	}
	c, err := FromEnv()
	if err != nil {
		return fail("FromEnv: %v", err)
	}
	if again, _ := FromEnv(); again != c {
		return fail("FromEnv returned another Conn")
	}
	if v, ok := os.LookupEnv(EnvFD); ok {
		return fail("%s=%q is still set", EnvFD, v)
	}
	if err := unix.Fstat(3, new(unix.Stat_t)); err == nil {
		// fd 3 was moved to a close-on-exec descriptor; nothing else has
		// opened a file since, so 3 is free.
		return fail("fd 3 is still open")
	}
	c.Handle(func(m Message) {
		if err := c.Send(json.RawMessage(m.Raw)); err != nil {
			fmt.Fprintf(os.Stderr, "helper: echo: %v\n", err)
		}
	})
	if err := Send(map[string]any{"cmd": CmdReady, "pid": os.Getpid()}); err != nil {
		return fail("Send: %v", err)
	}
	select {
	case <-c.Done():
	case <-time.After(30 * time.Second):
		return fail("master did not go within 30s")
	}
	if err := c.Send("after the master went"); err == nil {
		return fail("Send to a gone master succeeded")
	}
	return 0
}

// startHelper starts the test binary as a worker on a new channel.
func startHelper(t *testing.T, rec *recorder) (*exec.Cmd, *Channel, *bytes.Buffer) {
	t.Helper()
	master, worker := mustPair(t)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=echo", EnvFD+"=3")
	cmd.ExtraFiles = []*os.File{worker}
	stderr := new(bytes.Buffer)
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	worker.Close() // the master's copy: the worker's death must show as EOF
	return cmd, NewChannel(master, rec.options()), stderr
}

// waitExit waits a bounded time for cmd to exit, killing it if it does not.
func waitExit(t *testing.T, cmd *exec.Cmd, d time.Duration) error {
	t.Helper()
	err := testutil.Wait(cmd, d)
	if errors.Is(err, testutil.ErrStillRunning) {
		t.Fatalf("worker: %v", err)
	}
	return err
}

func TestConnFromEnvWorker(t *testing.T) {
	testutil.LeakCheck(t)
	rec := newRecorder()
	cmd, ch, stderr := startHelper(t, rec)
	defer ch.Close()

	ready := rec.next(t)
	if ready.Cmd != CmdReady || !strings.Contains(string(ready.Raw), `"pid":`+strconv.Itoa(cmd.Process.Pid)) {
		t.Fatalf("first message %s, want shoal:ready from pid %d", ready.Raw, cmd.Process.Pid)
	}
	msgs := []string{
		`{"cmd":"shoal:heartbeat"}`,
		`{"cmd":"hello","data":[1,2,{"x":"é\n"}]}`,
		`"just text"`,
		`{"cmd":"NODE_INTERNAL"}`, // not delivered to the worker, so not echoed
		`42`,
	}
	for _, m := range msgs {
		if ch.Send(mustEncode(t, json.RawMessage(m))) != nil {
			t.Fatalf("Send(%s) dropped", m)
		}
	}
	for _, want := range []string{msgs[0], `{"cmd":"hello","data":[1,2,{"x":"é\n"}]}`, msgs[2], msgs[4]} {
		if m := rec.next(t); string(m.Raw) != want {
			t.Errorf("echo %s, want %s", m.Raw, want)
		}
	}

	// The master's end closing is the worker's cue to exit.
	start := time.Now()
	if err := ch.Close(); err != nil {
		t.Fatal(err)
	}
	err := waitExit(t, cmd, 10*time.Second)
	t.Logf("worker exited %v after the master closed its end", time.Since(start).Round(time.Millisecond))
	if err != nil {
		t.Fatalf("worker: %v; stderr:\n%s", err, stderr)
	}
}

func TestChannelWorkerDies(t *testing.T) {
	testutil.LeakCheck(t)
	rec := newRecorder()
	cmd, ch, _ := startHelper(t, rec)
	defer ch.Close()
	rec.next(t) // ready
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ch.Done(), 10*time.Second, "Done after the worker died")
	waitExit(t, cmd, 10*time.Second)
}

func TestOpenEnvErrors(t *testing.T) {
	file, err := os.CreateTemp(t.TempDir(), "file")
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	dgram, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(dgram[0])
	defer unix.Close(dgram[1])

	for _, tt := range []struct {
		value string
		want  string
	}{
		{"", ErrNotWorker.Error()},
		{"three", `ipc: SHOAL_IPC_FD="three" is not a file descriptor number`},
		{"-1", `ipc: SHOAL_IPC_FD="-1" is not a file descriptor number`},
		{"987654", "ipc: SHOAL_IPC_FD=987654: fd 987654 is not open: bad file descriptor"},
		{strconv.Itoa(int(file.Fd())), "is not a socket"},
		{strconv.Itoa(dgram[0]), "is not a Unix stream socket"},
	} {
		t.Setenv(EnvFD, tt.value)
		c, err := openEnv()
		if c != nil || err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s=%q: %v, %v; want error %q", EnvFD, tt.value, c, err, tt.want)
		}
	}
	os.Unsetenv(EnvFD)
	if _, err := openEnv(); err != ErrNotWorker {
		t.Errorf("unset: %v", err)
	}
	// This process is not a worker: FromEnv and Send say so.
	if _, err := FromEnv(); err != ErrNotWorker {
		t.Errorf("FromEnv: %v", err)
	}
	if err := Send("x"); err != ErrNotWorker {
		t.Errorf("Send: %v", err)
	}
}

func TestConnClose(t *testing.T) {
	testutil.LeakCheck(t)
	master, worker := mustPair(t)
	defer master.Close()
	c := NewConn(worker)
	msgs := c.Messages()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	waitFor(t, c.Done(), 5*time.Second, "Done after Close")
	if _, ok := <-msgs; ok {
		t.Error("Messages not closed")
	}
	if err := c.Send("x"); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Send after Close: %v, want net.ErrClosed", err)
	}

	// Close before reading ever started.
	master2, worker2 := mustPair(t)
	defer master2.Close()
	c2 := NewConn(worker2)
	c2.Close()
	waitFor(t, c2.Done(), time.Second, "Done after Close without reading")

	// Not a socket.
	f, err := os.CreateTemp(t.TempDir(), "file")
	if err != nil {
		t.Fatal(err)
	}
	c3 := NewConn(f)
	if err := c3.Send(1); err == nil || !strings.HasPrefix(err.Error(), "ipc: open master channel ") {
		t.Errorf("Send on a file: %v", err)
	}
	waitFor(t, c3.Done(), time.Second, "Done on a file")
	c3.Close()
}

func TestConnMasterGone(t *testing.T) {
	testutil.LeakCheck(t)
	master, worker := mustPair(t)
	c := NewConn(worker)
	defer c.Close()
	done := c.Done()
	master.Close()
	waitFor(t, done, 5*time.Second, "Done after the master closed")
	var err error
	for range 10 { // the first write may still land in the buffer
		if err = c.Send("x"); err != nil {
			break
		}
	}
	if !errors.Is(err, syscall.EPIPE) || !strings.HasPrefix(err.Error(), "ipc: send to master: ") {
		t.Errorf("Send to a gone master: %v", err)
	}
}

func TestConnMessagesFull(t *testing.T) {
	testutil.LeakCheck(t)
	master, worker := mustPair(t)
	c := NewConn(worker)
	defer c.Close()
	msgs := c.Messages()
	var b bytes.Buffer
	for i := range messagesLen + 50 {
		fmt.Fprintf(&b, "%d\n", i)
	}
	b.WriteString(`{"cmd":"NODE_X"}` + "\n")
	master.Write(b.Bytes())
	master.Close()
	waitFor(t, c.Done(), 5*time.Second, "Done")
	n := 0
	for m := range msgs {
		if string(m.Raw) != strconv.Itoa(n) {
			t.Fatalf("message %d is %s", n, m.Raw)
		}
		n++
	}
	if n != messagesLen {
		t.Errorf("%d messages kept, want %d (the rest dropped)", n, messagesLen)
	}
}
