package test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/peer"
	"github.com/shoal-sh/shoal/internal/testutil"
)

// nprocUID runs the task-limit test: a uid of its own, so that no other
// test's processes count against its RLIMIT_NPROC.
const nprocUID = 4243

// TestScaleRefusedAtTheTaskLimit: a master of its own uid under
// RLIMIT_NPROC=300 refuses 'ctl scale 65536' with the limit that applies,
// caps a SIGTTIN flood, and lives on: ctl status answers and a worker
// killed afterwards is replaced. Before the cap, such a master forked until
// the Go runtime could not start a thread and aborted, taking every worker
// down.
func TestScaleRefusedAtTheTaskLimit(t *testing.T) {
	if os.Getuid() != 0 {
		peer.Missing(t, "running a master as another uid needs root")
	}
	setpriv, prlimit := peer.Require(t, "setpriv"), peer.Require(t, "prlimit")
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	os.Chmod(filepath.Dir(dir), 0o755) // t.TempDir's own parent is 0700
	home := filepath.Join(dir, "ctl")
	if err := os.Mkdir(home, 0o700); err != nil {
		t.Fatal(err)
	}
	os.Chown(home, nprocUID, nprocUID)
	sock := filepath.Join(home, "ctl.sock")
	as := []string{setpriv, "--reuid=" + strconv.Itoa(nprocUID), "--regid=" + strconv.Itoa(nprocUID), "--clear-groups"}
	port := testutil.FreePort(t)
	m := startShoalVia(t, append([]string{prlimit, "--nproc=300:300"}, as...), nil,
		"--workers", "2", "--port", strconv.Itoa(port), "--host", "127.0.0.1", "--control", sock, "--stop-timeout", "5s")
	m.listening(15*time.Second, 2)
	ctlAs := func(args ...string) (string, int) {
		t.Helper()
		out, code := run(t, 30*time.Second, append(as, append([]string{shoalBin, "ctl", "--control", sock}, args...)...)...)
		return out, code
	}
	out, code := ctlAs("scale", "65536")
	if code != 1 || !strings.Contains(out, "at most 37 workers") || !strings.Contains(out, "RLIMIT_NPROC 300") {
		t.Fatalf("ctl scale 65536 under --nproc=300: exit %d: %s; want exit 1 naming the cap of 37 and RLIMIT_NPROC 300", code, out)
	}
	t.Logf("refused: %s", strings.TrimSpace(out))

	// A flood of SIGTTIN stops at the cap. The kernel merges a signal
	// sent while the same one is pending, so send until the cap is
	// reached, then 20 more.
	desired := func() int {
		out, code := ctlAs("--json", "status")
		if code != 0 {
			t.Fatalf("ctl status during the flood: exit %d: %s", code, out)
		}
		return jsonInt(out, `"desired":`)
	}
	deadline := time.Now().Add(30 * time.Second)
	for desired() < 37 && time.Now().Before(deadline) {
		for range 10 {
			m.signal(syscall.SIGTTIN)
			time.Sleep(5 * time.Millisecond)
		}
	}
	for range 20 {
		m.signal(syscall.SIGTTIN)
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	if n := desired(); n != 37 {
		t.Errorf("after a flood of SIGTTIN, %d workers desired, want the cap, 37", n)
	}
	select {
	case <-m.done:
		t.Fatalf("the master died under the task limit: %v", m.state)
	default:
	}
	t.Logf("master alive with %d workers desired; %d start failures logged", desired(),
		len(m.logs.entries(msg("worker could not be started"))))
	m.signal(syscall.SIGTERM)
	if code := m.wait(30 * time.Second); code != 0 {
		t.Errorf("exit code %d after SIGTERM, want 0", code)
	}
}

// jsonInt reads the whole number after key in s, or -1.
func jsonInt(s, key string) int {
	i := strings.Index(s, key)
	if i < 0 {
		return -1
	}
	s = s[i+len(key):]
	j := 0
	for j < len(s) && s[j] >= '0' && s[j] <= '9' {
		j++
	}
	n, err := strconv.Atoi(s[:j])
	if err != nil {
		return -1
	}
	return n
}

// run runs argv with a bounded time and returns its combined output and
// exit code.
func run(t *testing.T, timeout time.Duration, argv ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		return string(out), ee.ExitCode()
	case err != nil:
		t.Fatalf("%v: %v", argv, err)
	}
	return string(out), 0
}
