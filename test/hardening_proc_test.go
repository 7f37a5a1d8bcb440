package test

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/peer"
	"github.com/shoal-sh/shoal/internal/testutil"
)

// TestInheritedFilesDoNotReachWorkers: a file the shell opened on fd 7
// before starting shoal stays with the master and reaches no worker.
func TestInheritedFilesDoNotReachWorkers(t *testing.T) {
	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte("hunter2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	args := []string{"--workers", "2", "--port", "0"}
	if os.Getuid() == 0 {
		args = append(args, "--user", "nobody")
	}
	m := startShoalVia(t, []string{"bash", "-c", `exec 7<"$0" && exec "$@"`, secret}, nil, append(args, "--", "sleep", "60")...)
	for _, e := range m.waitFor(10*time.Second, 2, "2 workers started", msg("worker started")) {
		pid := e.num("pid")
		waitExec(t, pid, "sleep")
		fds := openFiles(t, pid)
		for fd, target := range fds {
			if fd > 3 || target == secret {
				t.Errorf("worker %d (pid %d) holds fd %d on %s; want only 0, 1, 2 and the channel on 3", e.num("worker"), pid, fd, target)
			}
		}
	}
	// The test means something only if the master did hold the file.
	if got := openFiles(t, m.pid())[7]; got != secret {
		t.Errorf("master's fd 7 is %q, want %s: the wrapper did not pass it", got, secret)
	}
}

// waitExec waits until pid runs the program named comm and sleeps: before
// its exec a forked worker still holds what the master holds, and just
// after it the dynamic loader holds the libraries it opens.
func waitExec(t *testing.T, pid int, comm string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if st, ok := readStat(pid); ok && st.comm == comm && st.state == "S" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d does not run %s within 5s", pid, comm)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// openFiles returns what each of pid's descriptors refers to.
func openFiles(t *testing.T, pid int) map[int]string {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("list %s: %v", dir, err)
	}
	out := map[int]string{}
	for _, e := range ents {
		fd, _ := strconv.Atoi(e.Name())
		out[fd], _ = os.Readlink(filepath.Join(dir, e.Name()))
	}
	return out
}

// TestMasterProcFilesClosedToWorkers runs the master as nobody with a
// secret in its environment, and its workers as nobody too: a worker
// cannot read the master's environ, mem or fd, while the master still reads
// its own /proc for its metrics and its workers' for their sockets.
func TestMasterProcFilesClosedToWorkers(t *testing.T) {
	if os.Getuid() != 0 {
		peer.Missing(t, "needs root, to run the master as nobody")
	}
	setpriv := peer.Require(t, "setpriv")
	asNobody := []string{setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"}
	// Each check opens one of the master's files and says whether it could.
	probe := `p=/proc/$SHOAL_MASTER_PID
try() { if ( eval "$2" ) >/dev/null 2>&1; then echo "OPENED $1"; else echo "DENIED $1"; fi; }
try environ 'grep -q AKIAHUNTER2 $p/environ'
try mem 'exec 9<$p/mem'
try fd 'ls $p/fd/ | grep -q .'
try fdlink 'exec 8<$p/fd/0'
echo "UID $(id -u)"
exec sleep 60`
	addr := loopbackAddr(t)
	m := startShoalVia(t, asNobody, []string{"AWS_SECRET_ACCESS_KEY=AKIAHUNTER2", "SHOAL_METRICS_ADDR=" + addr},
		"--workers", "1", "--port", "0", "--", "sh", "-c", probe)
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(m.stdout.String(), "UID ") {
		if time.Now().After(deadline) {
			t.Fatalf("the worker's probe did not finish within 10s; stdout:\n%s", m.stdout)
		}
		time.Sleep(20 * time.Millisecond)
	}
	out := m.stdout.String()
	if !strings.Contains(out, "UID 65534") {
		t.Fatalf("worker is not nobody:\n%s", out)
	}
	for _, what := range []string{"environ", "mem", "fd", "fdlink"} {
		if !strings.Contains(out, "DENIED "+what) {
			t.Errorf("a worker of the master's uid opened the master's %s:\n%s", what, out)
		}
	}
	// The master, non-dumpable, still reads its own /proc.
	s := waitMetric(t, "http://"+addr+"/metrics", 10*time.Second, "process metrics", func(s map[string]float64) bool {
		return s["process_open_fds"] > 0 && s["process_resident_memory_bytes"] > 0
	})
	t.Logf("non-dumpable master as nobody: process_open_fds %v, resident %v MiB", s["process_open_fds"], s["process_resident_memory_bytes"]/(1<<20))
	if warn := m.logs.entries(func(e entry) bool { return e.str("level") == "warn" || e.str("level") == "error" }); len(warn) > 0 {
		t.Errorf("master warned: %v", warn)
	}

	// And it still sees its workers' LISTEN sockets in their /proc.
	port := testutil.FreePort(t)
	m2 := startShoalVia(t, asNobody, nil, "--workers", "2", "--port", strconv.Itoa(port), "--host", "127.0.0.1")
	m2.listening(15*time.Second, 2)
	if code, body := get(t, fmt.Sprintf("http://127.0.0.1:%d/", port)); code != 200 || body != "hello world\n" {
		t.Errorf("GET = %d %q", code, body)
	}
}
