package control

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
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
