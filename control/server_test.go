package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
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

// echo answers every request with the request as its result.
func echo(ctx context.Context, req Request) Response {
	b, err := json.Marshal(req)
	if err != nil {
		return Response{Error: err.Error()}
	}
	return Response{OK: true, Result: b}
}

// mustListen creates a server at path, failing t if it cannot.
func mustListen(t *testing.T, path string) *Server {
	t.Helper()
	srv, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	return srv
}

// serve runs srv.Serve(ctx, h) until the end of t, when it closes srv and
// checks that Serve returns nil soon. It returns a channel closed when
// Serve returns.
func serve(t *testing.T, ctx context.Context, srv *Server, h Handler) <-chan struct{} {
	t.Helper()
	done := make(chan struct{})
	var err error
	go func() {
		defer close(done)
		err = srv.Serve(ctx, h)
	}()
	t.Cleanup(func() {
		srv.Close()
		select {
		case <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Errorf("Serve did not return within 5s of Close")
		}
	})
	return done
}

// start listens at path and serves h until the end of t.
func start(t *testing.T, path string, h Handler) *Server {
	t.Helper()
	srv := mustListen(t, path)
	serve(t, context.Background(), srv, h)
	return srv
}

func sockPath(t *testing.T) string {
	return filepath.Join(t.TempDir(), "shoal.sock")
}

// dial connects a Client to path, closed at the end of t.
func dial(t *testing.T, path string) *Client {
	t.Helper()
	c, err := Dial(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// do sends req on c with a bounded wait.
func do(t *testing.T, c *Client, req Request) Response {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := c.Do(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// rawConn is a plain connection to a control socket, for writing what a
// Client would not.
type rawConn struct {
	t *testing.T
	c *net.UnixConn
	r *bufio.Reader
}

func dialRaw(t *testing.T, path string) *rawConn {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { c.Close() })
	return &rawConn{t, c, bufio.NewReader(c)}
}

func (rc *rawConn) write(s string) {
	rc.t.Helper()
	if _, err := rc.c.Write([]byte(s)); err != nil {
		rc.t.Fatal(err)
	}
}

// response reads one response line.
func (rc *rawConn) response() Response {
	rc.t.Helper()
	line, err := rc.r.ReadBytes('\n')
	if err != nil {
		rc.t.Fatalf("reading a response: %v (read %q)", err, line)
	}
	var resp Response
	if err := json.Unmarshal(line, &resp); err != nil {
		rc.t.Fatalf("response %q: %v", line, err)
	}
	return resp
}

// eof checks that the server closes the connection.
func (rc *rawConn) eof() {
	rc.t.Helper()
	b, err := rc.r.ReadBytes('\n')
	if len(b) != 0 || (err != io.EOF && !errors.Is(err, syscall.ECONNRESET)) {
		rc.t.Fatalf("read %q, %v; want the connection closed", b, err)
	}
}

func TestRoundTrip(t *testing.T) {
	testutil.LeakCheck(t)
	path := sockPath(t)
	srv := start(t, path, echo)
	if srv.Path() != path {
		t.Errorf("Path() = %q, want %q", srv.Path(), path)
	}
	c := dial(t, path)
	for _, req := range []Request{
		{Cmd: CmdStatus},
		{Cmd: CmdReload},
		{Cmd: CmdScale, N: 7},
		{Cmd: CmdSend, Worker: 3, Msg: json.RawMessage(`{"op":"x","v":[1, 2,"<\u2028>"]}`)},
		{Cmd: CmdBroadcast, Msg: json.RawMessage(`"hello"`)},
		{Cmd: CmdStop},
	} {
		resp := do(t, c, req)
		if !resp.OK || resp.Error != "" {
			t.Fatalf("%s: %+v", req.Cmd, resp)
		}
		got, err := ParseRequest(resp.Result)
		if err != nil {
			t.Fatalf("%s: the handler got a bad request: %v", req.Cmd, err)
		}
		var want, gotMsg any
		json.Unmarshal(req.Msg, &want)
		json.Unmarshal(got.Msg, &gotMsg)
		if got.Cmd != req.Cmd || got.N != req.N || got.Worker != req.Worker || fmt.Sprint(want) != fmt.Sprint(gotMsg) {
			t.Errorf("the handler got %+v (msg %s), want %+v (msg %s)", got, got.Msg, req, req.Msg)
		}
	}
	// A failing command and a bad request are answers, not errors of Do.
	resp := do(t, c, Request{Cmd: "halt"})
	if resp.OK || !strings.Contains(resp.Error, `unknown cmd "halt"`) {
		t.Errorf("halt: %+v", resp)
	}
	if resp := do(t, c, Request{Cmd: CmdStatus}); !resp.OK {
		t.Errorf("status after a bad request: %+v", resp)
	}
}

func TestPipelined(t *testing.T) {
	testutil.LeakCheck(t)
	path := sockPath(t)
	start(t, path, func(ctx context.Context, req Request) Response {
		if req.Cmd == CmdScale {
			time.Sleep(20 * time.Millisecond) // a later request must still wait
		}
		return echo(ctx, req)
	})
	rc := dialRaw(t, path)
	rc.write(`{"cmd":"scale","n":3}` + "\n" +
		`{"cmd":"nope"}` + "\n" +
		"\n" +
		`{"cmd":"send","worker":2,"msg":[1]}` + "\r\n" +
		`not json` + "\n" +
		`{"cmd":"status"}` + "\n")
	for i, want := range []string{`{"cmd":"scale","n":3}`, `unknown cmd "nope"`, "empty line", `{"cmd":"send","worker":2,"msg":[1]}`, "invalid JSON", `{"cmd":"status"}`} {
		resp := rc.response()
		got := string(resp.Result)
		if !resp.OK {
			got = resp.Error
		}
		if !strings.Contains(got, want) {
			t.Errorf("response %d: %+v, want %s", i, resp, want)
		}
	}
}

func TestSlowHandler(t *testing.T) {
	testutil.LeakCheck(t)
	path := sockPath(t)
	started, release := make(chan struct{}), make(chan struct{})
	start(t, path, func(ctx context.Context, req Request) Response {
		if req.Cmd == CmdReload {
			close(started)
			select {
			case <-release:
			case <-ctx.Done():
			}
		}
		return echo(ctx, req)
	})
	slow, fast := dial(t, path), dial(t, path)
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() {
		if resp := do(t, slow, Request{Cmd: CmdReload}); !resp.OK {
			t.Errorf("reload: %+v", resp)
		}
	})
	defer close(release)
	select {
	case <-started:
	case <-time.After(5 * time.Second):
		t.Fatal("the reload handler did not start")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	for range 3 {
		if resp, err := fast.Do(ctx, Request{Cmd: CmdStatus}); err != nil || !resp.OK {
			t.Fatalf("status during a slow reload: %+v, %v", resp, err)
		}
	}
	// And a new connection is served too.
	if resp, err := dial(t, path).Do(ctx, Request{Cmd: CmdStatus}); err != nil || !resp.OK {
		t.Fatalf("status on a new connection during a slow reload: %+v, %v", resp, err)
	}
}

func TestSocketMode(t *testing.T) {
	testutil.LeakCheck(t)
	old := syscall.Umask(0) // the socket must be 0600 all the same
	defer syscall.Umask(old)
	base := t.TempDir()
	path := filepath.Join(base, "a", "b", "shoal.sock")
	srv := mustListen(t, path)
	defer srv.Close()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != fs.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want Srw-------", fi.Mode())
	}
	for _, d := range []string{filepath.Join(base, "a"), filepath.Join(base, "a", "b")} {
		if fi, err := os.Stat(d); err != nil || fi.Mode().Perm() != 0o700 {
			t.Errorf("directory %s: %v, %v; want mode 0700", d, fi.Mode(), err)
		}
	}
	if names := dirNames(t, filepath.Dir(path)); len(names) != 1 || names[0] != "shoal.sock" {
		t.Errorf("directory holds %q, want only shoal.sock", names)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if names := dirNames(t, filepath.Dir(path)); len(names) != 0 {
		t.Errorf("after Close the directory holds %q", names)
	}
}

func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

func TestLongPath(t *testing.T) {
	testutil.LeakCheck(t)
	dir := t.TempDir()
	for len(dir) < 150 {
		dir = filepath.Join(dir, "a-rather-long-directory-name")
	}
	path := filepath.Join(dir, "shoal.sock")
	start(t, path, echo)
	if fi, err := os.Lstat(path); err != nil || fi.Mode().Perm() != 0o600 || fi.Mode().Type() != fs.ModeSocket {
		t.Fatalf("socket at a %d-byte path: %v, %v", len(path), fi.Mode(), err)
	}
	if resp := do(t, dial(t, path), Request{Cmd: CmdStatus}); !resp.OK {
		t.Errorf("status: %+v", resp)
	}
	if _, err := Listen(path); err == nil || !strings.Contains(err.Error(), "another shoal master is running there") {
		t.Errorf("second Listen at a long path: %v", err)
	}
}

func TestSecondListen(t *testing.T) {
	testutil.LeakCheck(t)
	path := sockPath(t)
	start(t, path, echo)
	_, err := Listen(path)
	want := fmt.Sprintf("control: listen unix %s: another shoal master is running there (pid %d): stop it, or pass --control with another path", path, os.Getpid())
	if err == nil || err.Error() != want {
		t.Fatalf("second Listen: %v\nwant %s", err, want)
	}
	if resp := do(t, dial(t, path), Request{Cmd: CmdStatus}); !resp.OK {
		t.Errorf("the first server after a second Listen: %+v", resp)
	}
}

func TestConcurrentListen(t *testing.T) {
	testutil.LeakCheck(t)
	path := sockPath(t)
	const n = 8
	var wg sync.WaitGroup
	srvs := make([]*Server, n)
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() { srvs[i], errs[i] = Listen(path) })
	}
	wg.Wait()
	won := 0
	for i := range n {
		if errs[i] == nil {
			won++
			defer srvs[i].Close()
		} else if !strings.Contains(errs[i].Error(), "another shoal master is running there") {
			t.Errorf("Listen: %v", errs[i])
		}
	}
	if won != 1 {
		t.Errorf("%d of %d concurrent Listens succeeded, want 1", won, n)
	}
}

// staleSocket leaves a socket at path with no listener behind it, as a
// master that died does.
func staleSocket(t *testing.T, path string) {
	t.Helper()
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	if fi, err := os.Lstat(path); err != nil || fi.Mode().Type() != fs.ModeSocket {
		t.Fatalf("no stale socket: %v", err)
	}
}

func TestStaleSocket(t *testing.T) {
	testutil.LeakCheck(t)
	path := sockPath(t)
	staleSocket(t, path)
	start(t, path, echo)
	if resp := do(t, dial(t, path), Request{Cmd: CmdStatus}); !resp.OK {
		t.Errorf("status: %+v", resp)
	}
	if fi, err := os.Lstat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("replaced socket: %v, %v", fi.Mode(), err)
	}
}

func TestNotASocket(t *testing.T) {
	testutil.LeakCheck(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "real.sock")
	start(t, sock, echo)
	link := filepath.Join(dir, "link")
	if err := os.Symlink(sock, link); err != nil {
		t.Fatal(err)
	}
	sub := filepath.Join(dir, "sub")
	if err := os.Mkdir(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{file, link, sub} {
		_, err := Listen(path)
		if err == nil || !strings.Contains(err.Error(), "a file that is not a socket is there") ||
			!strings.Contains(err.Error(), "it is left alone: remove it yourself, or pass --control with another path") {
			t.Errorf("Listen(%s): %v", path, err)
		}
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "precious" {
		t.Errorf("the file after Listen: %q, %v", b, err)
	}
	if target, err := os.Readlink(link); err != nil || target != sock {
		t.Errorf("the symlink after Listen: %q, %v", target, err)
	}
	if fi, err := os.Stat(sub); err != nil || !fi.IsDir() {
		t.Errorf("the directory after Listen: %v", err)
	}
}

func TestDirChecks(t *testing.T) {
	testutil.LeakCheck(t)
	open := t.TempDir()
	if err := os.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	_, err := Listen(filepath.Join(open, "shoal.sock"))
	if err == nil || !strings.Contains(err.Error(), "is writable by others (mode drwxrwxrwx), so anyone could replace the socket") {
		t.Errorf("Listen in a 0777 directory: %v", err)
	}
	sticky := t.TempDir()
	if err := os.Chmod(sticky, 0o777|fs.ModeSticky); err != nil {
		t.Fatal(err)
	}
	// Sticky like /tmp: anyone may still create the socket's name, or a
	// lock file, in it.
	_, err = Listen(filepath.Join(sticky, "shoal.sock"))
	if err == nil || !strings.Contains(err.Error(), "is writable by others (mode dtrwxrwxrwx)") || !errors.Is(err, ErrNotTrusted) {
		t.Errorf("Listen in a sticky directory like /tmp: %v", err)
	}
	// A sticky directory above is fine.
	srv, err := Listen(filepath.Join(sticky, "sub", "shoal.sock"))
	if err != nil {
		t.Errorf("Listen below a sticky directory like /tmp: %v", err)
	} else {
		srv.Close()
	}
	group := t.TempDir()
	if err := os.Chmod(group, 0o770); err != nil {
		t.Fatal(err)
	}
	if _, err = Listen(filepath.Join(group, "shoal.sock")); err == nil || !strings.Contains(err.Error(), "is writable by others (mode drwxrwx---)") {
		t.Errorf("Listen in a group-writable directory: %v", err)
	}
	if os.Getuid() != 0 {
		t.Skip("not root: cannot make a directory of another user's")
	}
	theirs := t.TempDir()
	if err := os.Chown(theirs, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{filepath.Join(theirs, "shoal.sock"), filepath.Join(theirs, "sub", "shoal.sock")} {
		_, err = Listen(path)
		want := "directory " + theirs + " belongs to uid 65534 (nobody), not to you (uid 0) or root"
		if err == nil || !strings.Contains(err.Error(), want) || !errors.Is(err, ErrNotTrusted) {
			t.Errorf("Listen(%s) in another user's directory: %v\nwant %s", path, err, want)
		}
	}
	if _, err := os.Lstat(filepath.Join(theirs, "sub")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Listen created a directory in another user's: %v", err)
	}
	// A symlink of another user's on the way is not followed, even to a
	// directory of this user's.
	mine := t.TempDir()
	link := filepath.Join(open, "link")
	if err := os.Symlink(mine, link); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(link, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	_, err = Listen(filepath.Join(link, "shoal.sock"))
	if want := "symlink " + link + " belongs to uid 65534 (nobody)"; err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("Listen through another user's symlink: %v\nwant %s", err, want)
	}
}

func TestCloseRemovesOnlyOurs(t *testing.T) {
	testutil.LeakCheck(t)
	path := sockPath(t)
	srv := mustListen(t, path)
	// Another socket takes the path, as a master that found ours stale
	// would.
	other := path + ".other"
	staleSocket(t, other)
	if err := os.Rename(other, path); err != nil {
		t.Fatal(err)
	}
	before, _ := os.Lstat(path)
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	after, err := os.Lstat(path)
	if err != nil || !os.SameFile(before, after) {
		t.Errorf("Close removed a socket that is not its own: %v", err)
	}
	if err := srv.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestServeContext(t *testing.T) {
	testutil.LeakCheck(t)
	path := sockPath(t)
	srv := mustListen(t, path)
	ctx, cancel := context.WithCancel(context.Background())
	done := serve(t, ctx, srv, echo)
	c := dial(t, path)
	if resp := do(t, c, Request{Cmd: CmdStatus}); !resp.OK {
		t.Fatalf("status: %+v", resp)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return within 5s of its context's end")
	}
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the socket is still there after Serve: %v", err)
	}
	if _, err := c.Do(context.Background(), Request{Cmd: CmdStatus}); err == nil {
		t.Errorf("a connection still works after Serve")
	}
	if err := srv.Close(); err != nil {
		t.Errorf("Close after Serve: %v", err)
	}
	if err := srv.Serve(context.Background(), echo); err != nil {
		t.Errorf("Serve after Close: %v", err)
	}
}

func TestServeTwice(t *testing.T) {
	testutil.LeakCheck(t)
	srv := start(t, sockPath(t), echo)
	do(t, dial(t, srv.Path()), Request{Cmd: CmdStatus}) // Serve has begun once a request is answered
	if err := srv.Serve(context.Background(), echo); err == nil || !strings.Contains(err.Error(), "already serving") {
		t.Fatalf("second Serve: %v", err)
	}
	if err := srv.Serve(context.Background(), nil); err == nil {
		t.Errorf("Serve with a nil handler succeeded")
	}
}

func TestCloseDuringHandler(t *testing.T) {
	testutil.LeakCheck(t)
	path := sockPath(t)
	srv := mustListen(t, path)
	started := make(chan struct{})
	done := serve(t, context.Background(), srv, func(ctx context.Context, req Request) Response {
		if req.Cmd == CmdStop {
			srv.Close() // as the master's stop does, from a handler
			return Response{OK: true}
		}
		close(started)
		<-ctx.Done()
		return Response{Error: "reload cut short: " + ctx.Err().Error()}
	})
	c, idle := dial(t, path), dialRaw(t, path)
	idle.write(`{"cmd":"status","n":1}` + "\n")
	idle.response()
	errc := make(chan error, 1)
	go func() {
		resp, err := c.Do(context.Background(), Request{Cmd: CmdReload})
		if err == nil && resp.Error != "reload cut short: context canceled" {
			err = fmt.Errorf("response %+v", resp)
		}
		errc <- err
	}()
	<-started
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Errorf("reload during Close: %v", err)
	}
	idle.eof()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return within 5s of Close")
	}

	// Close from a handler.
	path = sockPath(t)
	srv = mustListen(t, path)
	done = serve(t, context.Background(), srv, func(ctx context.Context, req Request) Response {
		srv.Close()
		return Response{OK: true}
	})
	if resp := do(t, dial(t, path), Request{Cmd: CmdStop}); !resp.OK {
		t.Errorf("stop: %+v", resp)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return within 5s of Close from a handler")
	}
}

func TestIdleTimeout(t *testing.T) {
	testutil.LeakCheck(t)
	path := sockPath(t)
	srv := mustListen(t, path)
	srv.idle = 100 * time.Millisecond
	serve(t, context.Background(), srv, echo)
	rc := dialRaw(t, path)
	rc.write(`{"cmd":"status"}` + "\n")
	rc.response()
	rc.write(`{"cmd":"sta`) // half a request, then nothing
	t0 := time.Now()
	rc.eof()
	if d := time.Since(t0); d < 50*time.Millisecond || d > 3*time.Second {
		t.Errorf("closed after %v, want about 100ms", d)
	}
}

func TestTooLong(t *testing.T) {
	testutil.LeakCheck(t)
	path := sockPath(t)
	start(t, path, echo)

	// A request of exactly MaxRequest bytes is served.
	rc := dialRaw(t, path)
	pad := MaxRequest - len(`{"cmd":"broadcast","msg":""}`)
	go rc.c.Write([]byte(`{"cmd":"broadcast","msg":"` + strings.Repeat("x", pad) + `"}` + "\r\n"))
	if resp := rc.response(); !resp.OK {
		t.Errorf("a request of MaxRequest bytes: %+v", resp)
	}

	// One byte more is answered and the connection closed, whether or not a
	// newline follows.
	for _, end := range []string{"\n", ""} {
		rc := dialRaw(t, path)
		done := make(chan struct{})
		go func() {
			defer close(done)
			rc.c.Write([]byte(`{"cmd":"broadcast","msg":"` + strings.Repeat("x", pad+1) + `"}` + end + strings.Repeat("y", 1<<20)))
		}()
		resp := rc.response()
		if resp.OK || resp.Error != "control: bad request: a line of more than 1048576 bytes (MaxRequest); closing the connection" {
			t.Errorf("too long a line: %+v", resp)
		}
		rc.eof()
		<-done
	}
}

func TestLastLineWithoutNewline(t *testing.T) {
	testutil.LeakCheck(t)
	path := sockPath(t)
	start(t, path, echo)
	rc := dialRaw(t, path)
	rc.write(`{"cmd":"status"}` + "\n" + `{"cmd":"scale","n":2}`)
	rc.c.CloseWrite()
	rc.response()
	if resp := rc.response(); !resp.OK || string(resp.Result) != `{"cmd":"scale","n":2}` {
		t.Errorf("last line without a newline: %+v", resp)
	}
	rc.eof()
}

func TestBadResult(t *testing.T) {
	testutil.LeakCheck(t)
	path := sockPath(t)
	start(t, path, func(ctx context.Context, req Request) Response {
		return Response{OK: true, Result: json.RawMessage(`{"workers":`)}
	})
	resp := do(t, dial(t, path), Request{Cmd: CmdStatus})
	if resp.OK || !strings.Contains(resp.Error, "control: the master's response cannot be encoded") {
		t.Errorf("a handler's invalid result: %+v", resp)
	}
}

func TestBusy(t *testing.T) {
	testutil.LeakCheck(t)
	path := sockPath(t)
	srv := mustListen(t, path)
	srv.maxConns = 2
	held, release := make(chan struct{}, 2), make(chan struct{})
	defer close(release)
	serve(t, context.Background(), srv, func(ctx context.Context, req Request) Response {
		if req.Cmd == CmdReload {
			held <- struct{}{}
			select {
			case <-release:
			case <-ctx.Done():
			}
		}
		return Response{OK: true}
	})
	// Two connections in the middle of a request: a third is answered busy.
	for range 2 {
		rc := dialRaw(t, path)
		rc.write(`{"cmd":"reload"}` + "\n")
		<-held
	}
	rc := dialRaw(t, path) // answered at once, before it writes
	if resp := rc.response(); resp.OK || resp.Error != "busy: the master already serves 2 control connections, each in the middle of a request; try again" {
		t.Errorf("a third connection: %+v", resp)
	}
	rc.eof()
}

// TestIdleEvicted checks that idle connections cannot lock the owner
// out: when maxConns are open, a new one takes the place of the one idle
// the longest.
func TestIdleEvicted(t *testing.T) {
	testutil.LeakCheck(t)
	path := sockPath(t)
	srv := mustListen(t, path)
	srv.maxConns = 3
	serve(t, context.Background(), srv, echo)
	var idle []*rawConn
	for range 3 {
		rc := dialRaw(t, path)
		rc.write(`{"cmd":"status"}` + "\n")
		rc.response() // served, and now idle
		idle = append(idle, rc)
		noneBusy(t, srv)
		time.Sleep(5 * time.Millisecond)
	}
	idle[2].write(`{"cmd":"sta`) // half a request is idle too
	time.Sleep(5 * time.Millisecond)
	c := dial(t, path)
	if resp := do(t, c, Request{Cmd: CmdStatus}); !resp.OK {
		t.Fatalf("a fourth connection: %+v", resp)
	}
	idle[0].eof() // the oldest idle one made room
	if resp := do(t, c, Request{Cmd: CmdScale, N: 2}); !resp.OK {
		t.Errorf("the fourth connection again: %+v", resp)
	}
	noneBusy(t, srv)
	// The next one takes the place of idle[1], not of c, which was
	// busy more recently.
	if resp := do(t, dial(t, path), Request{Cmd: CmdStatus}); !resp.OK {
		t.Errorf("a fifth connection: %+v", resp)
	}
	idle[1].eof()
	idle[2].write(`tus"}` + "\n")
	if resp := idle[2].response(); !resp.OK {
		t.Errorf("the connection with half a request: %+v", resp)
	}
}

// noneBusy waits until srv has marked every connection idle: a client
// has its answer a moment before the server does, later on a loaded
// machine, and the connection idle the longest is the one evicted.
func noneBusy(t *testing.T, srv *Server) {
	t.Helper()
	testutil.Eventually(t, 5*time.Second, "every connection idle after its answer", func() bool {
		srv.mu.Lock()
		defer srv.mu.Unlock()
		for _, st := range srv.conns {
			if st.busy {
				return false
			}
		}
		return true
	})
}

func TestDefaultPath(t *testing.T) {
	if os.Getuid() != 0 {
		want := filepath.Join(os.TempDir(), fmt.Sprintf("shoal-%d", os.Getuid()), "shoal.sock")
		t.Setenv("XDG_RUNTIME_DIR", "")
		if got := DefaultPath(0); got != want {
			t.Errorf("DefaultPath(0) = %q without XDG_RUNTIME_DIR, want %q", got, want)
		}
		t.Setenv("XDG_RUNTIME_DIR", "/run/user/1000")
		if got := DefaultPath(0); got != "/run/user/1000/shoal.sock" {
			t.Errorf("DefaultPath(0) = %q with XDG_RUNTIME_DIR, want /run/user/1000/shoal.sock", got)
		}
		return
	}
	t.Setenv("XDG_RUNTIME_DIR", "/run/user/0")
	if got := DefaultPath(0); got != "/run/shoal/shoal.sock" {
		t.Errorf("DefaultPath(0) = %q for root, want /run/shoal/shoal.sock", got)
	}
	if got := DefaultPath(8000); got != "/run/shoal/shoal-8000.sock" {
		t.Errorf("DefaultPath(8000) = %q for root, want /run/shoal/shoal-8000.sock", got)
	}
}

// TestMain runs the test binary as a helper process when
// SHOAL_CONTROL_TEST_DIAL is set: see runHelper.
func TestMain(m *testing.M) {
	if path := os.Getenv("SHOAL_CONTROL_TEST_DIAL"); path != "" {
		os.Exit(helperDial(path))
	}
	if path := os.Getenv("SHOAL_CONTROL_TEST_LISTEN"); path != "" {
		os.Exit(helperListen(path))
	}
	os.Exit(m.Run())
}

// helperResult is what the helper process reports on its stdout.
type helperResult struct {
	UID       int
	DialError string
	DoError   string
	Response  *Response
}

// helperDial dials path, sends a status request and prints a helperResult.
func helperDial(path string) int {
	r := helperResult{UID: os.Getuid()}
	c, err := Dial(path)
	if err != nil {
		r.DialError = err.Error()
		if !errors.Is(err, unix.EACCES) && !errors.Is(err, unix.EPERM) {
			r.DialError += " (does not wrap EACCES or EPERM)"
		}
	} else {
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		resp, err := c.Do(ctx, Request{Cmd: CmdStatus})
		if err != nil {
			r.DoError = err.Error()
		} else {
			r.Response = &resp
		}
	}
	json.NewEncoder(os.Stdout).Encode(r)
	return 0
}

// runHelper runs bin, a copy of the test binary, as uid and gid 65534
// (nobody) to dial path, and returns what it reports.
func runHelper(t *testing.T, bin, path string) helperResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), "SHOAL_CONTROL_TEST_DIAL="+path)
	cmd.Dir = filepath.Dir(bin)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	cmd.WaitDelay = 2 * time.Second
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output() // reaps the helper; ctx bounds the wait
	if err != nil {
		t.Fatalf("helper: %v\n%s", err, stderr.Bytes())
	}
	var r helperResult
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("helper output %q: %v\n%s", out, err, stderr.Bytes())
	}
	if r.UID != 65534 {
		t.Fatalf("helper ran as uid %d", r.UID)
	}
	return r
}

// TestPeerCred checks that only the master's user and root may talk to it:
// another user is refused first by the socket's mode and then, when the
// mode lets it in, by SO_PEERCRED.
func TestPeerCred(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("not root: running a helper process as another user (nobody, uid 65534) needs root; run the tests as root to check the permission refusals")
	}
	testutil.LeakCheck(t)
	// A directory that nobody may enter, with a copy of the test binary:
	// go test's own directory may be closed to nobody.
	base, err := os.MkdirTemp("", "shoal-control-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(base, "control.test")
	copyExecutable(t, bin)

	dir := filepath.Join(base, "run") // Listen creates it 0700
	path := filepath.Join(dir, "shoal.sock")
	var calls sync.Map
	start(t, path, func(ctx context.Context, req Request) Response {
		calls.Store(req.Cmd, true)
		return Response{OK: true}
	})

	// (a) The socket's mode (and its directory's) keeps nobody out.
	r := runHelper(t, bin, path)
	want := fmt.Sprintf("control: dial unix %s: permission denied: run as the master's user or root", path)
	if r.DialError != want {
		t.Errorf("nobody dialing a 0600 socket: %+v\nwant dial error %s", r, want)
	}

	// (b) With the socket open to all, SO_PEERCRED keeps nobody out.
	if err := os.Chmod(path, 0o666); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	r = runHelper(t, bin, path)
	if r.Response == nil || r.Response.OK || r.Response.Error != "permission denied: uid 65534 is not the master's uid 0 or root" {
		t.Errorf("nobody talking to a 0666 socket: %+v", r)
	}
	calls.Range(func(k, v any) bool {
		t.Errorf("the handler ran a request from nobody: %v", k)
		return true
	})
}

// copyExecutable copies the running test binary to dst, mode 0755.
func copyExecutable(t *testing.T, dst string) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	src, err := os.Open(exe)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, src); err != nil {
		out.Close()
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// Detach answers the first request of a connection it accepted before it
// began, sent after; an idle connection that was served is closed; the
// socket Detach returns still takes clients, for the next program.
func TestDetachAnswersAcceptedConnections(t *testing.T) {
	testutil.LeakCheck(t)
	path := sockPath(t)
	srv := mustListen(t, path)
	done := serve(t, context.Background(), srv, func(ctx context.Context, req Request) Response {
		return Response{OK: true}
	})
	idle := dialRaw(t, path)
	idle.write(`{"cmd":"status"}` + "\n")
	idle.response()
	quiet := dialRaw(t, path)
	testutil.Eventually(t, 5*time.Second, "both connections accepted", func() bool {
		srv.mu.Lock()
		defer srv.mu.Unlock()
		return len(srv.conns) == 2
	})
	type result struct {
		f   *os.File
		err error
	}
	detached := make(chan result, 1)
	go func() {
		f, err := srv.Detach(context.Background())
		detached <- result{f, err}
	}()
	time.Sleep(100 * time.Millisecond) // Detach is under way
	quiet.write(`{"cmd":"status"}` + "\n")
	if resp := quiet.response(); !resp.OK {
		t.Errorf("the request of a connection accepted before Detach, sent after it began: %+v", resp)
	}
	r := testutil.Recv(t, detached, 5*time.Second, "Detach's return", func(result) bool { return true })
	if r.err != nil {
		t.Fatal(r.err)
	}
	defer r.f.Close()
	idle.eof()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return within 5s of Detach")
	}
	ln, err := net.FileListener(r.f)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c := dialRaw(t, path) // waits in the queue of the socket Detach kept
	acc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	acc.Close()
	c.c.Close()
}
