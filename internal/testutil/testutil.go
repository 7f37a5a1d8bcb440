// Package testutil holds the helpers that the tests of several packages
// share: free loopback ports, bounded waits for a value on a channel, for a
// condition or for a child process, and goroutine-leak checks. Every wait has a deadline, and
// every failure says what was awaited.
package testutil

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// FreePort returns a port that was free a moment ago for TCP and for UDP
// on every address, IPv4 and IPv6, and that no earlier call of this
// process returned. It fails tb when no port can be had.
//
// The port is a random one below the kernel's ephemeral range
// (net.ipv4.ip_local_port_range) when there is room: the kernel gives
// ports of that range to every bind to port 0 and every connect, those of
// the tests of other packages running at the same time included, and may
// give a port it just gave out back at once. A test that asks for two
// ports, one to serve and one for metrics, gets two, and another process
// does not take them before the test binds them. The port is free on
// every address because a server started without a host binds them all,
// and free for UDP because some tests serve both on one number.
func FreePort(tb testing.TB) int {
	tb.Helper()
	return freshPort(tb, ephemeralLow())
}

// givenPorts holds every port FreePort returned.
var givenPorts = struct {
	sync.Mutex
	m map[int]bool
}{m: map[int]bool{}}

// lowestPort is the lowest port freshPort picks itself.
const lowestPort = 10000

// freshPort returns a port that usable accepts and that was not given
// before: a random one from lowestPort up to below, the start of the
// ephemeral range, else one the kernel picks (bind to port 0).
func freshPort(tb testing.TB, below int) int {
	tb.Helper()
	givenPorts.Lock()
	defer givenPorts.Unlock()
	if below-lowestPort >= 1000 {
		for range 100 {
			port := lowestPort + rand.IntN(below-lowestPort)
			if givenPorts.m[port] {
				continue
			}
			if _, err := usable(port); err == nil {
				givenPorts.m[port] = true
				return port
			}
		}
	}
	var last error
	for range 1000 {
		port, err := usable(0)
		if err != nil {
			last = err
			continue
		}
		if !givenPorts.m[port] {
			givenPorts.m[port] = true
			return port
		}
	}
	tb.Fatalf("find a free port: 1000 tries gave ports handed out before (%d given) or failed; the last error: %v", len(givenPorts.m), last)
	return 0
}

// usable binds port, or with 0 one the kernel picks, for TCP and then for
// UDP on every address (the IPv6 wildcard, which takes IPv4 too), closes
// both and returns the port.
func usable(port int) (int, error) {
	ln, err := net.Listen("tcp", fmt.Sprintf(":%d", port))
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	port = ln.Addr().(*net.TCPAddr).Port
	pc, err := net.ListenPacket("udp", fmt.Sprintf(":%d", port))
	if err != nil {
		return 0, err
	}
	pc.Close()
	return port, nil
}

// ephemeralLow returns the lowest port of the kernel's ephemeral range,
// or 0 when it cannot be read.
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 0
	}
	low, _ := strconv.Atoi(f[0])
	return low
}

// Recv receives from ch until a value satisfies match and returns it,
// dropping the others. It fails tb when none has come within timeout, or
// when ch is closed first; what names the awaited value in that message.
func Recv[T any](tb testing.TB, ch <-chan T, timeout time.Duration, what string, match func(T) bool) T {
	tb.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		select {
		case v, ok := <-ch:
			if !ok {
				tb.Fatalf("channel closed before %s", what)
			}
			if match(v) {
				return v
			}
		case <-deadline.C:
			tb.Fatalf("no %s within %s", what, timeout)
		}
	}
}

// Eventually calls cond every 10ms until it returns true. It fails tb when
// cond has not held within timeout; what names the condition in that
// message.
func Eventually(tb testing.TB, timeout time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("no %s within %s", what, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// leakWait bounds how long LeakCheck waits for goroutines to end: those
// of a closed connection or process may need a moment, more under -race
// on a loaded machine. A variable for this package's own tests.
var leakWait = 5 * time.Second

// LeakCheck fails tb if a goroutine started after the call is still
// running when tb's cleanups have run, after a bounded wait. Call it first
// in a test, so that its cleanup runs last, after those that stop what the
// test started. opts are goleak's, to ignore more goroutines.
//
// It cannot tell the goroutines of parallel tests apart: use it only in
// tests that do not call t.Parallel, and goleak.VerifyTestMain for a whole
// package.
func LeakCheck(tb testing.TB, opts ...goleak.Option) {
	tb.Helper()
	opts = append(slices.Clip(opts), goleak.IgnoreCurrent())
	tb.Cleanup(func() {
		deadline := time.Now().Add(leakWait)
		for {
			err := goleak.Find(opts...)
			if err == nil {
				return
			}
			if time.Now().After(deadline) {
				tb.Errorf("goroutines still running %s after the test: %v", leakWait, err)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

// ErrStillRunning is wrapped by the error of Wait when the process had not
// exited within the timeout.
var ErrStillRunning = errors.New("process still running")

// Wait waits for cmd, which must have been started, to exit, and returns
// the error of cmd.Wait. When cmd has not exited within timeout, Wait kills
// it with SIGKILL, reaps it, waiting as long again at most, and returns an
// error that wraps ErrStillRunning. It needs no testing.TB, so that a
// helper process can use it for its own children.
func Wait(cmd *exec.Cmd, timeout time.Duration) error {
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
	}
	cmd.Process.Kill()
	t.Reset(timeout)
	select {
	case err := <-done:
		return fmt.Errorf("pid %d: %w %s later; killed: %v", cmd.Process.Pid, ErrStillRunning, timeout, err)
	case <-t.C:
		return fmt.Errorf("pid %d: %w %s later, and %s after SIGKILL", cmd.Process.Pid, ErrStillRunning, timeout, timeout)
	}
}
