package control

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/internal/testutil"
)

func TestDialErrors(t *testing.T) {
	testutil.LeakCheck(t)
	dir := t.TempDir()

	missing := filepath.Join(dir, "missing.sock")
	_, err := Dial(missing)
	want := fmt.Sprintf("control: no shoal master at %s: the socket does not exist (is shoal running? pass --control or set SHOAL_CONTROL if it uses another path): no such file or directory", missing)
	if err == nil || err.Error() != want || !errors.Is(err, unix.ENOENT) {
		t.Errorf("Dial(missing) = %v\nwant %s", err, want)
	}
	_, err = Dial(filepath.Join(dir, "nodir", "shoal.sock"))
	if err == nil || !strings.Contains(err.Error(), "the socket does not exist") {
		t.Errorf("Dial in a missing directory: %v", err)
	}

	stale := filepath.Join(dir, "stale.sock")
	staleSocket(t, stale)
	_, err = Dial(stale)
	want = fmt.Sprintf("control: no shoal master at %s: a stale socket: its master is gone: connection refused", stale)
	if err == nil || err.Error() != want || !errors.Is(err, unix.ECONNREFUSED) {
		t.Errorf("Dial(stale) = %v\nwant %s", err, want)
	}

	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = Dial(file)
	if err == nil || !strings.Contains(err.Error(), "not a socket (mode -rw-------)") || !errors.Is(err, unix.ECONNREFUSED) {
		t.Errorf("Dial(a regular file) = %v", err)
	}
	// Dial refused for want of permission is checked, as another user, in
	// TestPeerCred.
}

// block is a handler that answers status at once and holds reload until
// its context is done.
func block(ctx context.Context, req Request) Response {
	if req.Cmd == CmdReload {
		<-ctx.Done()
	}
	return Response{OK: true}
}

func TestDoContext(t *testing.T) {
	testutil.LeakCheck(t)
	path := sockPath(t)
	start(t, path, block)

	c := dial(t, path)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	t0 := time.Now()
	_, err := c.Do(ctx, Request{Cmd: CmdReload})
	if !errors.Is(err, context.DeadlineExceeded) || !strings.HasPrefix(err.Error(), "control: reload via "+path+": ") {
		t.Errorf("Do past its deadline: %v", err)
	}
	if d := time.Since(t0); d > 3*time.Second {
		t.Errorf("Do returned %v after its deadline", d)
	}
	_, err = c.Do(context.Background(), Request{Cmd: CmdStatus})
	if err == nil || !strings.Contains(err.Error(), "connection unusable after an earlier error") {
		t.Errorf("Do after a timed-out Do: %v", err)
	}

	c = dial(t, path)
	ctx, cancel = context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	if _, err := c.Do(ctx, Request{Cmd: CmdReload}); !errors.Is(err, context.Canceled) {
		t.Errorf("Do cancelled: %v", err)
	}
	if _, err := dial(t, path).Do(ctx, Request{Cmd: CmdStatus}); !errors.Is(err, context.Canceled) {
		t.Errorf("Do with a context already done: %v", err)
	}

	// A deadline that does not run out leaves the connection usable.
	c = dial(t, path)
	for range 3 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		resp, err := c.Do(ctx, Request{Cmd: CmdStatus})
		cancel()
		if err != nil || !resp.OK {
			t.Fatalf("status: %+v, %v", resp, err)
		}
	}
}

func TestDoErrors(t *testing.T) {
	testutil.LeakCheck(t)
	path := sockPath(t)
	srv := start(t, path, block)
	c := dial(t, path)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.Do(ctx, Request{Cmd: CmdBroadcast, Msg: []byte("{not json")}); err == nil {
		t.Errorf("Do with a message that is not JSON succeeded")
	}
	if _, err := c.Do(ctx, Request{Cmd: CmdBroadcast, Msg: []byte(`"` + strings.Repeat("x", MaxRequest) + `"`)}); err == nil || !strings.Contains(err.Error(), "over the limit") {
		t.Errorf("Do with too long a request: %v", err)
	}
	if resp, err := c.Do(ctx, Request{Cmd: CmdStatus}); err != nil || !resp.OK {
		t.Errorf("status after requests refused before sending: %+v, %v", resp, err)
	}
	// The master going away in the middle of a request.
	errc := make(chan error, 1)
	go func() {
		_, err := c.Do(ctx, Request{Cmd: CmdReload})
		errc <- err
	}()
	time.Sleep(50 * time.Millisecond)
	srv.Close()
	if err := <-errc; err != nil {
		t.Errorf("reload answered during Close: %v", err)
	}
	if _, err := c.Do(ctx, Request{Cmd: CmdStatus}); err == nil || !strings.Contains(err.Error(), "the master closed the connection without answering") {
		t.Errorf("Do on a connection the master closed: %v", err)
	}
}

func TestDoConcurrent(t *testing.T) {
	testutil.LeakCheck(t)
	path := sockPath(t)
	start(t, path, func(ctx context.Context, req Request) Response {
		if req.Cmd == CmdReload {
			select {
			case <-time.After(300 * time.Millisecond):
			case <-ctx.Done():
			}
		}
		return echo(ctx, req)
	})
	c := dial(t, path)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 10 {
				req := Request{Cmd: CmdScale, N: 1 + g*100 + i}
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				resp, err := c.Do(ctx, req)
				cancel()
				want := fmt.Sprintf(`{"cmd":"scale","n":%d}`, req.N)
				if err != nil || string(resp.Result) != want {
					t.Errorf("Do(%+v) = %+v, %v; want result %s", req, resp, err, want)
					return
				}
			}
		})
	}
	wg.Wait()

	// A Do waiting for its turn gives up when its context is done.
	errc := make(chan error, 1)
	go func() {
		_, err := c.Do(context.Background(), Request{Cmd: CmdReload})
		errc <- err
	}()
	time.Sleep(50 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := c.Do(ctx, Request{Cmd: CmdStatus}); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Do waiting behind a slow one: %v", err)
	}
	if err := <-errc; err != nil {
		t.Errorf("the slow Do: %v", err)
	}
	if resp := do(t, c, Request{Cmd: CmdStatus}); !resp.OK {
		t.Errorf("status after a Do that gave up waiting: %+v", resp)
	}
}

// helperListen listens at path as a master would not: it answers every
// line {"ok":true} whoever the peer is. It prints "ready" once it
// listens and exits when its stdin closes.
func helperListen(path string) int {
	ln, err := net.Listen("unix", path)
	if err != nil {
		fmt.Println(err)
		return 1
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					if _, err := br.ReadBytes('\n'); err != nil {
						return
					}
					c.Write([]byte(`{"ok":true}` + "\n"))
				}
			}()
		}
	}()
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
	return 0
}

// TestDialRefusesOthers checks that Dial talks only to a socket that no
// one but the caller and root could have put there, served by a process
// of the caller's or root's.
func TestDialRefusesOthers(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("not root: making files of another user's (nobody, uid 65534) needs root")
	}
	testutil.LeakCheck(t)
	const nobody = "uid 65534 (nobody)"

	// A directory of another user's.
	theirs := t.TempDir()
	path := filepath.Join(theirs, "shoal.sock")
	start(t, path, echo)
	if err := os.Chown(theirs, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	_, err := Dial(path)
	want := fmt.Sprintf("control: dial unix %s: refusing it: directory %s belongs to %s, not to you (uid 0) or root", path, theirs, nobody)
	if err == nil || !strings.HasPrefix(err.Error(), want) || !errors.Is(err, ErrNotTrusted) {
		t.Errorf("Dial in another user's directory: %v\nwant %s...", err, want)
	}

	// A socket of another user's.
	path = sockPath(t)
	start(t, path, echo)
	if err := os.Lchown(path, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	_, err = Dial(path)
	want = fmt.Sprintf("control: dial unix %s: refusing it: socket %s belongs to %s", path, path, nobody)
	if err == nil || !strings.HasPrefix(err.Error(), want) || !errors.Is(err, ErrNotTrusted) {
		t.Errorf("Dial a socket of another user's: %v\nwant %s...", err, want)
	}

	// A symlink of another user's on the way, in a sticky directory, to a
	// directory of ours with a live socket.
	mine := filepath.Dir(sockPath(t))
	start(t, filepath.Join(mine, "shoal.sock"), echo)
	sticky := t.TempDir()
	if err := os.Chmod(sticky, 0o777|fs.ModeSticky); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(sticky, "shoal-1001")
	if err := os.Symlink(mine, link); err != nil {
		t.Fatal(err)
	}
	if resp := do(t, dial(t, filepath.Join(link, "shoal.sock")), Request{Cmd: CmdStatus}); !resp.OK {
		t.Errorf("status through a symlink of ours: %+v", resp)
	}
	if err := os.Lchown(link, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	_, err = Dial(filepath.Join(link, "shoal.sock"))
	want = fmt.Sprintf("refusing it: symlink %s belongs to %s", link, nobody)
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("Dial through another user's symlink: %v\nwant ...%s...", err, want)
	}

	// A socket of ours right in a sticky directory, where anyone may put
	// one.
	path = filepath.Join(sticky, "shoal.sock")
	staleSocket(t, path)
	_, err = Dial(path)
	want = fmt.Sprintf("control: dial unix %s: refusing it: directory %s is writable by others (mode dtrwxrwxrwx)", path, sticky)
	if err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Errorf("Dial a socket in a sticky directory: %v\nwant %s...", err, want)
	}

	// A socket of root's, made by a process of another user's: its peer
	// credentials give it away.
	base, err := os.MkdirTemp("", "shoal-control-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	os.Chmod(base, 0o755)
	bin := filepath.Join(base, "control.test")
	copyExecutable(t, bin)
	drop := filepath.Join(base, "drop")
	if err := os.Mkdir(drop, 0o700); err != nil {
		t.Fatal(err)
	}
	os.Chown(drop, 65534, 65534)
	pid := helperListener(t, bin, filepath.Join(drop, "fake.sock"))
	path = filepath.Join(mine, "fake.sock")
	if err := os.Rename(filepath.Join(drop, "fake.sock"), path); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(path, 0, 0); err != nil {
		t.Fatal(err)
	}
	_, err = Dial(path)
	want = fmt.Sprintf("control: dial unix %s: refusing to talk to the process that listens there (pid %d): it runs as %s, not as you (uid 0) or root, so it is not your master", path, pid, nobody)
	if err == nil || err.Error() != want || !errors.Is(err, ErrNotTrusted) {
		t.Errorf("Dial a socket served by another user: %v\nwant %s", err, want)
	}
}

// helperListener starts bin as nobody to listen at path with
// helperListen, and returns its pid once it listens. It is stopped and
// reaped at the end of t.
func helperListener(t *testing.T, bin, path string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	cmd := exec.CommandContext(ctx, bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), "SHOAL_CONTROL_TEST_LISTEN="+path)
	cmd.Dir = filepath.Dir(bin)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	cmd.WaitDelay = 2 * time.Second
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		cmd.Wait()
		cancel()
	})
	line, _ := bufio.NewReader(stdout).ReadString('\n')
	if line != "ready\n" {
		t.Fatalf("helper listener: %q", line)
	}
	return cmd.Process.Pid
}
