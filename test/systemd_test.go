package test

// deploy/systemd/shoal.service, checked against the binary and by
// systemd-analyze where it is installed.

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// systemdUnit is a unit file: section, key, values in order.
type systemdUnit map[string]map[string][]string

func (u systemdUnit) get(section, key string) string {
	v := u[section][key]
	if len(v) == 0 {
		return ""
	}
	return v[len(v)-1]
}

func parseUnit(t *testing.T, path string) systemdUnit {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	u := systemdUnit{}
	section := ""
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			u[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" || strings.HasSuffix(line, "\\") {
				t.Fatalf("%s:%d: %q: want KEY=VALUE in a section, on one line", path, i+1, line)
			}
			u[section][strings.TrimSpace(k)] = append(u[section][strings.TrimSpace(k)], strings.TrimSpace(v))
		}
	}
	return u
}

// systemdWords splits a value into words, with double quotes.
func systemdWords(s string) []string {
	var out []string
	var cur strings.Builder
	quoted, inWord := false, false
	for _, r := range s {
		switch {
		case r == '"':
			quoted, inWord = !quoted, true
		case r == ' ' && !quoted:
			if inWord {
				out = append(out, cur.String())
			}
			cur.Reset()
			inWord = false
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if inWord {
		out = append(out, cur.String())
	}
	return out
}

// systemdSpan parses a systemd time span: "30", "30s", "1min 30s", "2m".
func systemdSpan(s string) (time.Duration, error) {
	if n, err := strconv.Atoi(s); err == nil {
		return time.Duration(n) * time.Second, nil
	}
	s = strings.ReplaceAll(strings.ReplaceAll(s, " ", ""), "min", "m")
	return time.ParseDuration(s)
}

// TestSystemdUnit checks deploy/systemd/shoal.service against the binary:
// systemd signals shoal alone and waits longer than its stop timeout,
// reloads with SIGHUP, and sets an environment the binary accepts.
func TestSystemdUnit(t *testing.T) {
	const file = "deploy/systemd/shoal.service"
	u := parseUnit(t, filepath.Join(moduleRoot, file))
	for key, want := range map[string]string{
		"Type":         "notify-reload", // shoal speaks sd_notify, and reloads on SIGHUP
		"NotifyAccess": "main",
		"KillMode":     "mixed", // SIGTERM to shoal alone, SIGKILL to what is left at the end
		"KillSignal":   "SIGTERM",
		"Restart":      "on-failure",
	} {
		if got := u.get("Service", key); got != want {
			t.Errorf("%s: %s=%q, want %q", file, key, got, want)
		}
	}
	// The form for systemd before 253, in a comment.
	raw, _ := os.ReadFile(filepath.Join(moduleRoot, file))
	if !regexp.MustCompile(`(?m)^#Type=notify$`).Match(raw) || !regexp.MustCompile(`(?m)^#ExecReload=(/usr)?/bin/kill\s+(-HUP|-SIGHUP|-s\s+HUP)\s+\$MAINPID$`).Match(raw) {
		t.Errorf("%s: no commented Type=notify with ExecReload=/bin/kill -HUP $MAINPID for systemd before 253", file)
	}
	if w := u.get("Service", "WatchdogSec"); w == "" {
		t.Errorf("%s: no WatchdogSec: shoal sends WATCHDOG=1 when asked", file)
	}
	if !slices.Contains(strings.Fields(u.get("Service", "RestartPreventExitStatus")), "2") {
		t.Errorf("%s: RestartPreventExitStatus lacks 2: bad usage does not get better by restarting", file)
	}
	if u.get("Service", "DynamicUser") != "yes" && (u.get("Service", "User") == "" || u.get("Service", "User") == "root") {
		t.Errorf("%s: runs as root: set DynamicUser=yes or User=", file)
	}

	exe := systemdWords(u.get("Service", "ExecStart"))
	if len(exe) == 0 || !filepath.IsAbs(exe[0]) || filepath.Base(exe[0]) != "shoal" {
		t.Fatalf("%s: ExecStart=%q, want /PATH/shoal ...", file, u.get("Service", "ExecStart"))
	}
	env := map[string]string{}
	for _, line := range u["Service"]["Environment"] {
		for _, w := range systemdWords(line) {
			k, v, _ := strings.Cut(w, "=")
			env[k] = v
		}
	}
	cfg := newShoalConfig(t, file, exe[1:], env, flagDefaults(t, nil, -1, -1))
	stop := cfg.stopTimeout(t)
	timeout := 90 * time.Second // DefaultTimeoutStopSec
	if v := firstNonEmpty(u.get("Service", "TimeoutStopSec"), u.get("Service", "TimeoutSec")); v != "" {
		d, err := systemdSpan(v)
		if err != nil {
			t.Fatalf("%s: TimeoutStopSec=%q: %v", file, v, err)
		}
		timeout = d
	}
	if timeout <= stop {
		t.Errorf("%s: TimeoutStopSec %s, want more than shoal's stop timeout %s", file, timeout, stop)
	}
	if dir := u.get("Service", "RuntimeDirectory"); dir != "" && env["SHOAL_CONTROL"] != "" &&
		filepath.Dir(env["SHOAL_CONTROL"]) != filepath.Join("/run", dir) {
		t.Errorf("%s: SHOAL_CONTROL=%s is not in the RuntimeDirectory /run/%s", file, env["SHOAL_CONTROL"], dir)
	}

	// The binary accepts the environment: 'shoal version' parses it as a
	// start would, and starts nothing.
	cmd := exec.Command(shoalBin, "version")
	cmd.Env = []string{"PATH=/usr/bin:/bin", noRaceSleep}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("%s: shoal rejects the unit's environment: %v: %s", file, err, out)
	}

	// systemd's own check of the file, where systemd is installed.
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Logf("systemd-analyze not found: %s checked by this test only", file)
		return
	}
	root := t.TempDir()
	for _, key := range []string{"ExecStart", "ExecReload"} {
		w := systemdWords(u.get("Service", key))
		if len(w) == 0 {
			continue
		}
		p := filepath.Join(root, strings.TrimLeft(w[0], "-@+!:"))
		os.MkdirAll(filepath.Dir(p), 0o755)
		b, _ := os.ReadFile("/bin/true")
		os.WriteFile(p, b, 0o755)
	}
	// The fallback form's ExecReload.
	os.MkdirAll(filepath.Join(root, "bin"), 0o755)
	if b, err := os.ReadFile("/bin/true"); err == nil {
		os.WriteFile(filepath.Join(root, "bin/kill"), b, 0o755)
	}
	units := filepath.Join(root, "usr/lib/systemd/system")
	os.MkdirAll(units, 0o755)
	for _, pat := range []string{"*.target", "*.slice"} {
		files, _ := filepath.Glob(filepath.Join("/usr/lib/systemd/system", pat))
		for _, f := range files {
			if l, err := os.Readlink(f); err == nil {
				os.Symlink(l, filepath.Join(units, filepath.Base(f)))
			} else if b, err := os.ReadFile(f); err == nil {
				os.WriteFile(filepath.Join(units, filepath.Base(f)), b, 0o644)
			}
		}
	}
	etc := filepath.Join(root, "etc/systemd/system")
	os.MkdirAll(etc, 0o755)
	b, _ := os.ReadFile(filepath.Join(moduleRoot, file))
	if v := systemdVersion(analyze); v < 253 {
		// This systemd predates notify-reload: check the unit in the form
		// its comment gives for it.
		t.Logf("systemd %d: verifying the Type=notify form of %s", v, file)
		b = bytes.Replace(b, []byte("\nType=notify-reload\n"), []byte("\nType=notify\nExecReload=/bin/kill -HUP $MAINPID\n"), 1)
	}
	os.WriteFile(filepath.Join(etc, "shoal.service"), b, 0o644)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, analyze, "verify", "--man=no", "--root="+root, "/etc/systemd/system/shoal.service").CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) != 0 {
		t.Errorf("systemd-analyze verify %s: %v\n%s", file, err, out)
	}
}

// systemdVersion returns the version of the systemd that analyze belongs
// to, or 0.
func systemdVersion(analyze string) int {
	out, err := exec.Command(analyze, "--version").Output()
	if err != nil {
		return 0
	}
	f := strings.Fields(string(out))
	if len(f) < 2 {
		return 0
	}
	v, _ := strconv.Atoi(f[1])
	return v
}
