package test

import (
	"context"
	"encoding/json"
	"net"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/control"
)

// ctlSplit runs 'shoal ctl' with args as given (no --control added) and
// returns its stdout, stderr and exit code.
func ctlSplit(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, shoalBin, append([]string{"ctl"}, args...)...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("shoal ctl %v: %v", args, err)
	}
	return stdout.String(), stderr.String(), code
}

// ctlStatusOf runs 'shoal ctl --json status' and decodes its result.
func ctlStatusOf(t *testing.T, sock string) control.Status {
	t.Helper()
	stdout, stderr, code := ctlSplit(t, "--control", sock, "--json", "status")
	if code != 0 {
		t.Fatalf("shoal ctl --json status: exit %d: %s", code, stderr)
	}
	var resp struct {
		OK     bool           `json:"ok"`
		Result control.Status `json:"result"`
	}
	if err := json.Unmarshal([]byte(stdout), &resp); err != nil || !resp.OK {
		t.Fatalf("shoal ctl --json status = %q: %v", stdout, err)
	}
	return resp.Result
}

// TestCtlStatusCountsReloadsApartFromRestarts: after a reload every worker
// shows 0 restarts and 1 reload, in the table and in --json; a worker
// killed afterwards shows 1 restart.
func TestCtlStatusCountsReloadsApartFromRestarts(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	m := startShoal(t, nil, "--workers", "2", "--port", "0", "--control", sock, "--", "sleep", "60")
	m.waitFor(15*time.Second, 2, "2 workers started", msg("worker started"))
	before := ctlStatusOf(t, sock)
	if out, code := ctl(t, sock, "reload"); code != 0 {
		t.Fatalf("ctl reload: exit %d: %s", code, out)
	}
	st := ctlStatusOf(t, sock)
	if len(st.Workers) != 2 {
		t.Fatalf("status after a reload: %+v", st)
	}
	for i, w := range st.Workers {
		if w.Restarts != 0 || w.Reloads != 1 || w.PID == 0 || w.PID == before.Workers[i].PID {
			t.Errorf("slot %d after a reload: %+v (pid before %d), want 0 restarts, 1 reload and a new pid", w.Slot, w, before.Workers[i].PID)
		}
	}
	out, code := ctl(t, sock, "status")
	if code != 0 || !regexp.MustCompile(`(?m)^SLOT\s+PID\s+STATE\s+UPTIME\s+RESTARTS\s+RELOADS\s+REQUESTS$`).MatchString(out) ||
		!regexp.MustCompile(`(?m)^1\s+\d+\s+\S+\s+\S+\s+0\s+1\s+0$`).MatchString(out) ||
		!regexp.MustCompile(`(?m)^2\s+\d+\s+\S+\s+\S+\s+0\s+1\s+0$`).MatchString(out) {
		t.Errorf("ctl status after a reload: exit %d:\n%s\nwant 0 restarts and 1 reload per worker", code, out)
	}

	// A death is a restart.
	killed := st.Workers[0].PID
	if err := syscall.Kill(killed, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		st = ctlStatusOf(t, sock)
		if w := st.Workers[0]; w.PID != 0 && w.PID != killed {
			if w.Restarts != 1 || w.Reloads != 1 {
				t.Errorf("slot 1 after a death: %+v, want 1 restart and 1 reload", w)
			}
			if w := st.Workers[1]; w.Restarts != 0 || w.Reloads != 1 {
				t.Errorf("slot 2 after slot 1's death: %+v, want 0 restarts and 1 reload", w)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("slot 1 not replaced within 15s: %+v", st)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestCtlFlagsAfterTheCommand: flags may follow the command, and a command
// used wrongly prints its own usage, not the whole.
func TestCtlFlagsAfterTheCommand(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	m := startShoal(t, nil, "--workers", "1", "--port", "0", "--control", sock, "--", "sleep", "60")
	m.waitFor(15*time.Second, 1, "control socket", msg("control socket ready for 'shoal ctl'"))
	for _, args := range [][]string{
		{"--json", "--control", sock, "status"},
		{"--control", sock, "status", "--json"},
		{"status", "--control", sock, "--json"},
		{"status", "--json", "--control=" + sock, "--timeout", "10s"},
	} {
		stdout, stderr, code := ctlSplit(t, args...)
		var resp control.Response
		if code != 0 || json.Unmarshal([]byte(stdout), &resp) != nil || !resp.OK {
			t.Errorf("shoal ctl %q: exit %d, stdout %q, stderr %q; want the JSON answer", args, code, stdout, stderr)
		}
	}
	// A negative number and "--" stay the command's.
	if _, stderr, code := ctlSplit(t, "--control", sock, "broadcast", "-5"); code != 0 {
		t.Errorf("broadcast -5: exit %d: %s", code, stderr)
	}
	if _, stderr, code := ctlSplit(t, "broadcast", "--control", sock, "--", `"--json"`); code != 0 {
		t.Errorf(`broadcast -- "--json": exit %d: %s`, code, stderr)
	}

	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"status", "--json", "extra"}, []string{`shoal ctl: status takes no arguments, got 1: ["extra"]`, "Usage: shoal ctl [--port PORT | --control PATH] [--json] [--timeout D] status\n  a table of the workers"}},
		{[]string{"scale"}, []string{"shoal ctl: scale takes 1 argument(s), N, got 0", "Usage: shoal ctl [--port PORT | --control PATH] [--json] [--timeout D] scale N\n  run N workers"}},
		{[]string{"send", "x", "{}"}, []string{`shoal ctl: send "x": want a worker slot, 1 or more`, "Usage: shoal ctl [--port PORT | --control PATH] [--json] [--timeout D] send SLOT JSON\n"}},
		{[]string{"broadcast", "not-json"}, []string{`is not JSON`, "Usage: shoal ctl [--port PORT | --control PATH] [--json] [--timeout D] broadcast JSON\n"}},
	} {
		stdout, stderr, code := ctlSplit(t, append([]string{"--control", sock}, tc.args...)...)
		if code != 2 || stdout != "" || strings.Contains(stderr, "Commands:") {
			t.Errorf("shoal ctl %q: exit %d, stdout %q, stderr:\n%s\nwant exit 2 and the command's usage only", tc.args, code, stdout, stderr)
		}
		for _, w := range tc.want {
			if !strings.Contains(stderr, w) {
				t.Errorf("shoal ctl %q: stderr:\n%s\nwant %q", tc.args, stderr, w)
			}
		}
	}
	if _, stderr, code := ctlSplit(t, "frobnicate"); code != 2 || !strings.Contains(stderr, `unknown command "frobnicate": want one of status, reload, scale, send, broadcast, signal, stop`) {
		t.Errorf("an unknown command: exit %d: %s", code, stderr)
	}
}

// TestCtlIdleConnectionsDoNotLockOut: 16 idle connections, as many as the
// master serves, do not keep 'shoal ctl status' out.
func TestCtlIdleConnectionsDoNotLockOut(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	m := startShoal(t, nil, "--workers", "1", "--port", "0", "--control", sock, "--", "sleep", "60")
	m.waitFor(15*time.Second, 1, "control socket", msg("control socket ready for 'shoal ctl'"))
	for range 16 {
		c, err := net.DialTimeout("unix", sock, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		// One request each, so the master is serving them all.
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write([]byte(`{"cmd":"status"}` + "\n")); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 64<<10)
		if n, err := c.Read(buf); err != nil || !strings.Contains(string(buf[:n]), `"ok":true`) {
			t.Fatalf("an idle connection's first answer: %q, %v", buf[:n], err)
		}
	}
	t0 := time.Now()
	stdout, stderr, code := ctlSplit(t, "--control", sock, "--timeout", "10s", "status")
	d := time.Since(t0)
	t.Logf("shoal ctl status answered in %v with 16 idle connections open", d.Round(time.Millisecond))
	if code != 0 || !strings.Contains(stdout, "SLOT") {
		t.Errorf("shoal ctl status with 16 idle connections: exit %d after %v: %s%s", code, d, stdout, stderr)
	}
}
