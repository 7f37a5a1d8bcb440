package worker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/testutil"
	"github.com/shoal-sh/shoal/ipc"
)

// The test binary runs as a worker process when WORKER_TEST_HELPER is set:
// the signal and master-gone tests need a process of their own.
func TestMain(m *testing.M) {
	if os.Getenv("WORKER_TEST_HELPER") != "" {
		os.Exit(runHelper())
	}
	os.Exit(m.Run())
}

// runHelper serves on WORKER_TEST_ADDR with ListenAndServe, as a shoal
// worker would, and exits 0 after a clean drain.
func runHelper() int {
	s := &Server{
		Handler:      testHandler("helper"),
		Addr:         os.Getenv("WORKER_TEST_ADDR"),
		Heartbeat:    100 * time.Millisecond,
		DrainTimeout: 5 * time.Second,
	}
	if err := s.ListenAndServe(context.Background()); err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	return 0
}

// helper is a worker process running runHelper.
type helper struct {
	cmd    *exec.Cmd
	m      *master
	addr   string
	exited chan struct{}
	err    error // of Wait, once exited is closed
}

// startHelper starts a worker process with a real channel on its fd 3, and
// waits for its shoal:ready. The process is killed and reaped at the end of
// the test if it is still running.
func startHelper(t *testing.T) *helper {
	t.Helper()
	mf, wf, err := ipc.Pair()
	if err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(),
		"WORKER_TEST_HELPER=1",
		"WORKER_TEST_ADDR="+addr,
		ipc.EnvFD+"=3",
		// Under the race detector, a process sleeps a second before it
		// exits unless told otherwise.
		"GORACE="+os.Getenv("GORACE")+" atexit_sleep_ms=0",
	)
	cmd.ExtraFiles = []*os.File{wf}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	wf.Close()
	h := &helper{cmd: cmd, addr: addr, exited: make(chan struct{})}
	go func() {
		h.err = cmd.Wait()
		close(h.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-h.exited:
		default:
			cmd.Process.Kill()
			<-h.exited
		}
	})
	h.m = newMasterFile(t, mf)
	h.m.next(t, ipc.CmdReady, 10*time.Second)
	return h
}

// waitExit waits for the helper to exit and fails unless it exits 0 within
// timeout.
func (h *helper) waitExit(t *testing.T, timeout time.Duration) time.Duration {
	t.Helper()
	t0 := time.Now()
	select {
	case <-h.exited:
	case <-time.After(timeout):
		t.Fatalf("helper still running %v after it was told to stop", timeout)
	}
	if h.err != nil {
		t.Fatalf("helper exited with %v, want exit status 0", h.err)
	}
	return time.Since(t0)
}

func TestHelperStopsOnSIGTERM(t *testing.T) {
	h := startHelper(t)
	ta := newTally()
	rc := &rawClient{addr: h.addr, ta: ta}
	// Served as soon as it said it was ready.
	for range 3 {
		rc.do("/", true)
	}
	if ta.fail.Load() != 0 {
		t.Fatalf("requests failed: %v", ta)
	}
	h.m.next(t, ipc.CmdHeartbeat, 5*time.Second)

	if err := h.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// rc's connection is idle: it is closed after the grace, and the
	// helper exits.
	d := h.waitExit(t, 8*time.Second)
	t.Logf("exited %v after SIGTERM", d)
	if !rc.peerClosed() {
		t.Error("idle connection still open after the worker exited")
	}
	h.m.wait(t, 5*time.Second)
	if got := h.m.requests.Load(); got != 3 {
		t.Errorf("master was told of %d requests, want 3", got)
	}
}

func TestHelperStopsWhenMasterIsGone(t *testing.T) {
	h := startHelper(t)
	ta := newTally()
	rc := &rawClient{addr: h.addr, ta: ta}
	rc.do("/", false)
	if ta.fail.Load() != 0 {
		t.Fatalf("request failed: %v", ta)
	}
	h.m.c.Close() // the master's end: the worker reads end of file
	d := h.waitExit(t, 8*time.Second)
	t.Logf("exited %v after the master's end was closed", d)
}

func TestServeTalksToMaster(t *testing.T) {
	conn, m := newMaster(t)
	ln := listen(t, 0)
	s := &Server{Handler: testHandler("a"), Heartbeat: 30 * time.Millisecond, master: conn}
	r := start(t, s, ln, "a")
	msg := m.next(t, ipc.CmdReady, 5*time.Second)
	if string(msg.Raw) != `{"cmd":"shoal:ready"}` {
		t.Errorf("ready frame %s", msg.Raw)
	}
	ta := newTally()
	rc := &rawClient{addr: ln.Addr().String(), ta: ta}
	const n = 25
	for i := range n {
		rc.do("/", i%2 == 0)
	}
	for range 3 {
		msg := m.next(t, ipc.CmdHeartbeat, 5*time.Second)
		if string(msg.Raw) != `{"cmd":"shoal:heartbeat"}` {
			t.Errorf("heartbeat frame %s", msg.Raw)
		}
	}
	rc.close()
	if _, err := r.stop(t, 5*time.Second); err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if ta.fail.Load() != 0 {
		t.Fatalf("requests failed: %v", ta)
	}
	// The final report went out before Serve returned.
	conn.Close()
	m.wait(t, 5*time.Second)
	if got := m.requests.Load(); got != n {
		t.Fatalf("master was told of %d requests, want %d", got, n)
	}
	// The listener is closed.
	if c, err := net.DialTimeout("tcp4", ln.Addr().String(), time.Second); err == nil {
		c.Close()
		t.Fatal("listener still accepts after Serve returned")
	}
}

func TestServeWithoutMaster(t *testing.T) {
	if os.Getenv(ipc.EnvFD) != "" {
		t.Skip("the test process is itself a shoal worker")
	}
	ln := listen(t, 0)
	r := start(t, &Server{Handler: testHandler("a")}, ln, "a")
	ta := newTally()
	rc := &rawClient{addr: ln.Addr().String(), ta: ta}
	rc.do("/", false)
	if _, err := r.stop(t, 5*time.Second); err != nil || ta.fail.Load() != 0 {
		t.Fatalf("Serve: %v; %v", err, ta)
	}
}

func TestListenAndServe(t *testing.T) {
	port := testutil.FreePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- (&Server{Handler: testHandler("a"), Addr: addr}).ListenAndServe(ctx) }()
	stopped := false
	defer func() {
		cancel()
		if !stopped {
			<-errc
		}
	}()
	// Wait until it listens.
	var c net.Conn
	var err error
	for range 100 {
		if c, err = net.Dial("tcp4", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	// A second one joins the port: SO_REUSEPORT.
	ctx2, cancel2 := context.WithCancel(context.Background())
	errc2 := make(chan error, 1)
	go func() { errc2 <- (&Server{Handler: testHandler("b"), Addr: addr}).ListenAndServe(ctx2) }()
	time.Sleep(100 * time.Millisecond)
	cancel2()
	if err := <-errc2; err != nil {
		t.Fatalf("second ListenAndServe on the same port: %v", err)
	}
	cancel()
	stopped = true
	if err := <-errc; err != nil {
		t.Fatalf("ListenAndServe: %v", err)
	}
}

func TestListenAndServeErrors(t *testing.T) {
	// A plain listener, without SO_REUSEPORT, holds the port.
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addr := ln.Addr().String()
	err = (&Server{Handler: testHandler("a"), Addr: addr}).ListenAndServe(context.Background())
	if err == nil {
		t.Fatal("ListenAndServe on a port held without SO_REUSEPORT: no error")
	}
	if want := "worker: listen tcp " + addr + ": "; !strings.HasPrefix(err.Error(), want) || !errors.Is(err, syscall.EADDRINUSE) {
		t.Errorf("error %q, want %q... wrapping EADDRINUSE", err, want)
	}

	err = (&Server{}).ListenAndServe(context.Background())
	if err == nil || !strings.Contains(err.Error(), "Handler is nil") {
		t.Errorf("ListenAndServe without a Handler: %v", err)
	}
	ln2 := listen(t, 0)
	err = (&Server{}).Serve(context.Background(), ln2)
	if err == nil || !strings.Contains(err.Error(), "Handler is nil") {
		t.Errorf("Serve without a Handler: %v", err)
	}
	if _, err := ln2.Accept(); err == nil {
		t.Error("Serve did not close the listener")
	}
}

func TestDefaultAddr(t *testing.T) {
	t.Setenv("PORT", "")
	os.Unsetenv("PORT")
	if got := (&Server{}).addrs(); !slices.Equal(got, []string{":8000"}) {
		t.Errorf("addr without PORT = %q", got)
	}
	t.Setenv("PORT", "9123")
	if got := (&Server{}).addrs(); !slices.Equal(got, []string{":9123"}) {
		t.Errorf("addr with PORT=9123 = %q", got)
	}
	if got := (&Server{Addr: "127.0.0.1:1"}).addrs(); !slices.Equal(got, []string{"127.0.0.1:1"}) {
		t.Errorf("addr with Addr = %q", got)
	}
	t.Setenv("SHOAL_PORTS", "tcp:9123,udp:9123,tcp:9124")
	t.Setenv("HOST", "127.0.0.1")
	if got := (&Server{}).addrs(); !slices.Equal(got, []string{"127.0.0.1:9123", "127.0.0.1:9124"}) {
		t.Errorf("addrs with SHOAL_PORTS and HOST = %q, want both TCP listeners on HOST", got)
	}
}

// TestServeEveryTCPListener: with two TCP listeners in SHOAL_PORTS, one
// Server answers on both, and stops both.
func TestServeEveryTCPListener(t *testing.T) {
	p1, p2 := testutil.FreePort(t), testutil.FreePort(t)
	t.Setenv("SHOAL_PORTS", fmt.Sprintf("tcp:%d,udp:%d,tcp:%d", p1, p1, p2))
	t.Setenv("HOST", "127.0.0.1")
	t.Setenv("SHOAL_IPC_FD", "")
	os.Unsetenv("SHOAL_IPC_FD")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- (&Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "ok") }), Heartbeat: -1}).ListenAndServe(ctx)
	}()
	for _, p := range []int{p1, p2} {
		var body []byte
		testutil.Eventually(t, 5*time.Second, fmt.Sprintf("an answer on port %d", p), func() bool {
			resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/", p))
			if err != nil {
				return false
			}
			defer resp.Body.Close()
			body, _ = io.ReadAll(resp.Body)
			return true
		})
		if string(body) != "ok" {
			t.Errorf("port %d answered %q", p, body)
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("ListenAndServe: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("ListenAndServe did not return 15s after its context ended")
	}
	for _, p := range []int{p1, p2} {
		if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", p)); err == nil {
			c.Close()
			t.Errorf("port %d still listens after the server stopped", p)
		}
	}
}

// TestDrainEndsWaitingConnections checks the grace: a connection that
// waits for its first or its next request is ended, without a reset, a
// second into the drain; one that sends within the grace is answered with
// Connection: close.
func TestDrainEndsWaitingConnections(t *testing.T) {
	ln := listen(t, 0)
	addr := ln.Addr().String()
	r := start(t, &Server{Handler: testHandler("a")}, ln, "a")
	ta := newTally()

	silent, err := net.Dial("tcp4", addr) // never sends
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	idle := &rawClient{addr: addr, ta: ta} // one request, then nothing
	idle.do("/", true)
	late := &rawClient{addr: addr, ta: ta} // sends again during the grace
	late.do("/", true)
	if ta.fail.Load() != 0 || idle.c == nil || late.c == nil {
		t.Fatalf("requests before the drain: %v", ta)
	}
	time.Sleep(50 * time.Millisecond) // let Serve see the silent one

	t0 := time.Now()
	r.cancel()
	time.Sleep(300 * time.Millisecond)
	late.do("/", true)
	if ta.fail.Load() != 0 {
		t.Fatalf("request during the grace: %v", ta)
	}
	if late.c != nil {
		t.Error("response during the drain did not carry Connection: close")
	}
	_, err = r.stop(t, 5*time.Second)
	d := time.Since(t0)
	if err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if d < idleGrace-50*time.Millisecond || d > idleGrace+time.Second {
		t.Errorf("drain took %v, want about the grace of %v", d, idleGrace)
	}
	// The waiting connections were ended with a FIN, not a reset.
	silent.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := silent.Read(make([]byte, 1)); !isEOF(err) {
		t.Errorf("silent connection: read %v, want EOF", err)
	}
	idle.c.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := idle.br.ReadByte(); !isEOF(err) {
		t.Errorf("idle keep-alive connection: read %v, want EOF", err)
	}
}

func TestDrainTimeout(t *testing.T) {
	ln := listen(t, 0)
	addr := ln.Addr().String()
	release := make(chan struct{})
	defer close(release)
	started := make(chan struct{}, 1)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	r := start(t, &Server{Handler: h, DrainTimeout: 300 * time.Millisecond}, ln, "a")
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: test\r\n\r\n")
	<-started
	d, err := r.stop(t, 5*time.Second)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Serve after the drain timed out: %v, want DeadlineExceeded", err)
	}
	if !strings.HasPrefix(err.Error(), "worker: drain "+addr+": 1 connection still open after 300ms, closed: ") {
		t.Errorf("error %q", err)
	}
	if d < 300*time.Millisecond || d > 2*time.Second {
		t.Errorf("drain took %v with DrainTimeout 300ms", d)
	}
	// The connection was closed.
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := bufio.NewReader(c).ReadByte(); err == nil {
		t.Error("connection still open after the drain timed out")
	}
}

// TestTrackedConnEnd checks the end of a waiting connection at the level
// of one connection: without input the reader gets EOF; with input that
// arrived before it woke, it gets the input.
func TestTrackedConnEnd(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	pair := func() (*trackedConn, net.Conn) {
		client, err := net.Dial("tcp4", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		server, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { client.Close(); server.Close() })
		return &trackedConn{Conn: server, state: http.StateIdle}, client
	}

	// No input: EOF, also if the server sets a deadline after the wake-up.
	c, _ := pair()
	c.mu.Lock()
	c.endIfWaiting()
	c.mu.Unlock()
	c.SetReadDeadline(time.Time{})
	if n, err := c.Read(make([]byte, 10)); n != 0 || err != io.EOF {
		t.Fatalf("Read of an ended waiting connection: %d, %v; want 0, EOF", n, err)
	}

	// Input already in the socket: it is read, and the server's deadline
	// is back.
	c, client := pair()
	io.WriteString(client, "GET /")
	deadline := time.Now().Add(time.Hour)
	c.SetReadDeadline(deadline)
	time.Sleep(50 * time.Millisecond)
	c.mu.Lock()
	c.endIfWaiting()
	c.mu.Unlock()
	buf := make([]byte, 10)
	n, err := c.Read(buf)
	if err != nil || string(buf[:n]) != "GET /" {
		t.Fatalf("Read: %q, %v; want the input", buf[:n], err)
	}
	if c.ending || !c.gotBytes || !c.deadline.Equal(deadline) {
		t.Fatalf("after input: ending=%v gotBytes=%v deadline=%v", c.ending, c.gotBytes, c.deadline)
	}
	// And the connection reads on normally.
	go func() {
		time.Sleep(20 * time.Millisecond)
		io.WriteString(client, " HTTP/1.1")
	}()
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != " HTTP/1.1" {
		t.Fatalf("next Read: %q, %v", buf[:n], err)
	}

	// A server deadline that expires while not ending is the server's.
	c, _ = pair()
	c.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
	if _, err := c.Read(buf); !isTimeout(err) {
		t.Fatalf("Read past the server's deadline: %v, want a timeout", err)
	}
}
