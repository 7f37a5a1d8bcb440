package testutil

import (
	"errors"
	"fmt"
	"net"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// recorder is a testing.TB whose failures are recorded instead of failing
// the real test. Fatal ends the calling goroutine, as testing's does, so
// run code that may call it through run.
type recorder struct {
	testing.TB
	mu       sync.Mutex
	failures []string
	cleanups []func()
}

func (r *recorder) Helper() {}

func (r *recorder) Errorf(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failures = append(r.failures, fmt.Sprintf(format, args...))
}

func (r *recorder) Fatalf(format string, args ...any) {
	r.Errorf(format, args...)
	runtime.Goexit()
}

func (r *recorder) Cleanup(f func()) { r.cleanups = append(r.cleanups, f) }

// run calls f on its own goroutine, then the cleanups, last first, and
// returns the failures.
func (r *recorder) run(f func()) []string {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	<-done
	for i := len(r.cleanups) - 1; i >= 0; i-- {
		r.cleanups[i]()
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failures
}

func TestFreePort(t *testing.T) {
	port := FreePort(t)
	ln, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatalf("listen on the free port %d: %v", port, err)
	}
	ln.Close()
}

// TestFreePortNeverRepeats asks for more ports than a test process
// does, with the kernel's own picks too: they are random in its ephemeral
// range (odd ports only), and 500 of them repeat one another 12 to 17
// times over in the usual range of 32768-60999. FreePort must never
// return a port twice, or a test that asks for a server port and a
// metrics port may get one port for both; and it picks below the
// ephemeral range, where other processes' binds to port 0 and connects do
// not go.
func TestFreePortNeverRepeats(t *testing.T) {
	seen := map[int]int{}
	check := func(i, port int) {
		t.Helper()
		if j, ok := seen[port]; ok {
			t.Fatalf("call %d returned port %d, as call %d did", i, port, j)
		}
		seen[port] = i
	}
	if low := ephemeralLow(); low-lowestPort < 1000 {
		t.Logf("the ephemeral range starts at %d, leaving no room below it: only the kernel's picks are checked", low)
	} else {
		for i := range 500 {
			port := FreePort(t)
			if port < lowestPort || port >= low {
				t.Errorf("call %d returned port %d, not in [%d, %d)", i, port, lowestPort, low)
			}
			check(i, port)
		}
	}
	// With no room below the ephemeral range, the kernel's picks.
	for i := 500; i < 1000; i++ {
		check(i, freshPort(t, 0))
	}
}

// TestFreePortRefusesABusyPort: a port taken on one loopback address only,
// or for UDP only, is not free for a server that binds every address, or
// both protocols, on it.
func TestFreePortRefusesABusyPort(t *testing.T) {
	for _, tc := range []struct{ network, addr string }{
		{"tcp4", "127.0.0.1:0"},
		{"tcp4", "127.0.0.2:0"},
		{"tcp6", "[::1]:0"},
		{"udp4", "127.0.0.1:0"},
		{"udp6", "[::1]:0"},
	} {
		var port int
		if strings.HasPrefix(tc.network, "tcp") {
			ln, err := net.Listen(tc.network, tc.addr)
			if err != nil {
				t.Fatalf("listen %s %s: %v", tc.network, tc.addr, err)
			}
			defer ln.Close()
			port = ln.Addr().(*net.TCPAddr).Port
		} else {
			pc, err := net.ListenPacket(tc.network, tc.addr)
			if err != nil {
				t.Fatalf("listen %s %s: %v", tc.network, tc.addr, err)
			}
			defer pc.Close()
			port = pc.LocalAddr().(*net.UDPAddr).Port
		}
		if _, err := usable(port); err == nil {
			t.Errorf("port %d, taken by %s %s: usable says it is free", port, tc.network, tc.addr)
		}
	}
}

func TestRecv(t *testing.T) {
	ch := make(chan int, 3)
	ch <- 1
	ch <- 2
	ch <- 3
	if got := Recv(t, ch, time.Second, "an even number", func(n int) bool { return n%2 == 0 }); got != 2 {
		t.Errorf("Recv = %d, want 2", got)
	}
	if got := Recv(t, ch, time.Second, "any number", func(int) bool { return true }); got != 3 {
		t.Errorf("Recv after a skip = %d, want 3", got)
	}

	r := &recorder{TB: t}
	begin := time.Now()
	failures := r.run(func() { Recv(r, ch, 50*time.Millisecond, "a number", func(int) bool { return true }) })
	if len(failures) != 1 || failures[0] != "no a number within 50ms" {
		t.Errorf("Recv on a quiet channel: failures %q, want [\"no a number within 50ms\"]", failures)
	}
	if took := time.Since(begin); took > 5*time.Second {
		t.Errorf("Recv on a quiet channel returned after %s, want about 50ms", took)
	}

	close(ch)
	r = &recorder{TB: t}
	failures = r.run(func() { Recv(r, ch, time.Minute, "a number", func(int) bool { return true }) })
	if len(failures) != 1 || failures[0] != "channel closed before a number" {
		t.Errorf("Recv on a closed channel: failures %q", failures)
	}
}

func TestEventually(t *testing.T) {
	n := 0
	Eventually(t, 5*time.Second, "three calls", func() bool { n++; return n == 3 })
	if n != 3 {
		t.Errorf("cond called %d times, want 3", n)
	}

	r := &recorder{TB: t}
	failures := r.run(func() { Eventually(r, 30*time.Millisecond, "the impossible", func() bool { return false }) })
	if len(failures) != 1 || failures[0] != "no the impossible within 30ms" {
		t.Errorf("Eventually of a false condition: failures %q", failures)
	}
}

func TestLeakCheck(t *testing.T) {
	defer func(d time.Duration) { leakWait = d }(leakWait)
	leakWait = 200 * time.Millisecond

	// A goroutine that outlives the test is reported, with its stack.
	stop := make(chan struct{})
	defer close(stop)
	r := &recorder{TB: t}
	failures := r.run(func() {
		LeakCheck(r)
		go leaky(stop)
	})
	if len(failures) != 1 || !strings.Contains(failures[0], "testutil.leaky") {
		t.Errorf("a leaked goroutine: failures %q, want one naming testutil.leaky", failures)
	}

	// One that a cleanup ends is not, nor one that ends a moment late.
	r = &recorder{TB: t}
	failures = r.run(func() {
		LeakCheck(r)
		done := make(chan struct{})
		go leaky(done)
		r.Cleanup(func() { close(done) })
		go time.Sleep(50 * time.Millisecond)
	})
	if len(failures) != 0 {
		t.Errorf("goroutines that end: failures %q, want none", failures)
	}
}

func leaky(stop <-chan struct{}) { <-stop }

func TestWait(t *testing.T) {
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh")
	}
	cmd := exec.Command(sh, "-c", "exit 3")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var exit *exec.ExitError
	if err := Wait(cmd, 10*time.Second); !errors.As(err, &exit) || exit.ExitCode() != 3 {
		t.Errorf("Wait of a process that exits 3 = %v, want exit status 3", err)
	}

	cmd = exec.Command(sh, "-c", "exec sleep 60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	begin := time.Now()
	err = Wait(cmd, 100*time.Millisecond)
	if !errors.Is(err, ErrStillRunning) {
		t.Errorf("Wait of a process that outlives the timeout = %v, want ErrStillRunning", err)
	}
	if took := time.Since(begin); took > 5*time.Second {
		t.Errorf("Wait returned after %s, want about 100ms", took)
	}
	if cmd.ProcessState == nil || cmd.ProcessState.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Errorf("process state after Wait: %v, want killed by SIGKILL and reaped", cmd.ProcessState)
	}
	t.Log(err)
}
