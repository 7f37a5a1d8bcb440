package main

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/shoal-sh/shoal/supervisor"
)

// env returns a lookupEnv over kv pairs.
func env(kv ...string) func(string) (string, bool) {
	m := map[string]string{}
	for _, s := range kv {
		k, v, _ := strings.Cut(s, "=")
		m[k] = v
	}
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

func parse(t *testing.T, lookup func(string) (string, bool), args ...string) (config, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	return parseConfig(args, lookup, &out, &errOut)
}

func TestDefaultsAreTheSupervisors(t *testing.T) {
	c, err := parse(t, env())
	if err != nil {
		t.Fatal(err)
	}
	o := c.opts
	if o.StopTimeout != supervisor.DefaultStopTimeout || o.ReadyTimeout != supervisor.DefaultReadyTimeout ||
		o.RestartWindow != supervisor.DefaultRestartWindow || o.Backoff.Max != supervisor.DefaultBackoffMax ||
		o.MaxMessage != supervisor.DefaultMaxMessage || o.QueueLen != supervisor.DefaultQueueLen {
		t.Errorf("defaults differ from the supervisor's: %+v", o)
	}
	if o.Restart != supervisor.RestartAlways || o.Ready != supervisor.ReadyListen || !slices.Equal(o.Listeners, []supervisor.Listener{{Network: "tcp", Port: 8000}}) || o.StopSignal != syscall.SIGTERM || o.Workers != 0 ||
		c.logFormat != logAuto || zerolog.Level(c.logLevel) != zerolog.InfoLevel || c.migrateReq != migrateAuto || c.procs != 1 {
		t.Errorf("defaults: %+v", c)
	}
}

func TestEnumerationsFromFlagsAndEnvironment(t *testing.T) {
	c, err := parse(t, env("SHOAL_READY=Message", "SHOAL_LOG_LEVEL=WARN", "SHOAL_MIGRATE_REQ=off"),
		"--restart", "On-Failure", "--log-format", "console", "--stop-timeout", "3s")
	if err != nil {
		t.Fatal(err)
	}
	if c.opts.Restart != supervisor.RestartOnFailure || c.opts.Ready != supervisor.ReadyMessage ||
		c.logFormat != logConsole || zerolog.Level(c.logLevel) != zerolog.WarnLevel || c.migrateReq != migrateOff ||
		c.opts.StopTimeout != 3*time.Second {
		t.Errorf("parsed %+v", c)
	}
	// The command line wins over the environment.
	c, err = parse(t, env("SHOAL_RESTART=never"), "--restart", "always")
	if err != nil || c.opts.Restart != supervisor.RestartAlways {
		t.Errorf("--restart always with SHOAL_RESTART=never: %v, %v", c.opts.Restart, err)
	}
}

func TestBadValuesOneLine(t *testing.T) {
	for _, tc := range []struct {
		env  []string
		args []string
		want string
	}{
		{nil, []string{"--restart", "sometimes"}, `invalid value "sometimes" for flag -restart: restart policy "sometimes": want always, on-failure or never`},
		{nil, []string{"--ready", "soon"}, `ready mode "soon": want listen, message or notify`},
		{nil, []string{"--log-format", "xml"}, `log format "xml": want auto, json or console`},
		{nil, []string{"--log-level", "trace"}, `log level "trace": want debug, info, warn or error`},
		{nil, []string{"--migrate-req", "yes"}, `migrate-req mode "yes": want auto, on or off`},
		{[]string{"SHOAL_LOG_LEVEL=loud"}, nil, `SHOAL_LOG_LEVEL="loud": log level "loud": want debug, info, warn or error`},
		{[]string{"SHOAL_RESTART=nope"}, nil, `SHOAL_RESTART="nope": restart policy "nope": want always, on-failure or never`},
		{nil, []string{"--workers", "0"}, "want a whole number of workers, 1 or more"},
		{nil, []string{"--stop-timeout", "soon"}, "want a duration"},
		{nil, []string{"--master-procs", "-1"}, "want a whole number, 0 (Go's default) or more"},
		{[]string{"SHOAL_MASTER_PROCS=all"}, nil, `SHOAL_MASTER_PROCS="all"`},
		{nil, []string{"--env", "=x"}, "--env: an entry has an empty name"},
		{nil, []string{"--port", "0"}, "the built-in worker needs a port"},
		{nil, []string{"--user", "no-such-user-xyz"}, `--user "no-such-user-xyz": no such user`},
		{nil, []string{"--user", "4294967295"}, "no such user"},
	} {
		_, err := parse(t, env(tc.env...), tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%v %v: error %v, want one line with %q", tc.env, tc.args, err, tc.want)
		}
	}
}

func TestRunBadUsageExits2(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := run([]string{"--log-level", "loud"}, &out, &errOut); code != exitUsage {
		t.Errorf("exit %d, want %d", code, exitUsage)
	}
	lines := strings.Split(strings.TrimSpace(errOut.String()), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], `log level "loud"`) || lines[1] != "Run 'shoal -h' for usage." {
		t.Errorf("stderr:\n%s\nwant the error on one line, then the usage hint", errOut.String())
	}
}

func TestHelpShowsDefaults(t *testing.T) {
	var out, errOut bytes.Buffer
	if _, err := parseConfig([]string{"-h"}, env(), &out, &errOut); !errors.Is(err, errHelp) {
		t.Fatal(err)
	}
	for _, want := range []string{"(default always)", "(default listen)", "(default auto)", "(default info)", "(default 10s)", "(default 30s)", "(default 1m0s)"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("-h lacks %q", want)
		}
	}
}

func TestNumericUserWithoutEntry(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("changing the workers' user needs root")
	}
	c, err := parse(t, env(), "--user", "4242")
	if err != nil {
		t.Fatal(err)
	}
	if cr := c.opts.Credential; cr == nil || cr.Uid != 4242 || cr.Gid != 4242 || len(cr.Groups) != 0 {
		t.Errorf("credential %+v, want uid 4242 gid 4242", c.opts.Credential)
	}
	if !contains(c.opts.Env, "HOME=/") {
		t.Errorf("env %q lacks HOME=/", c.opts.Env)
	}
	c, err = parse(t, env(), "--user", "4242", "--group", "4343", "--env", "HOME=/srv")
	if err != nil {
		t.Fatal(err)
	}
	if cr := c.opts.Credential; cr.Uid != 4242 || cr.Gid != 4343 || contains(c.opts.Env, "HOME=/") {
		t.Errorf("credential %+v env %q, want gid 4343 and only the user's HOME", cr, c.opts.Env)
	}
	c, err = parse(t, env(), "--user", "nobody")
	if err != nil {
		t.Fatal(err)
	}
	if c.opts.Credential.Uid != 65534 || !contains(c.opts.Env, "HOME=/nonexistent") {
		t.Errorf("--user nobody: %+v env %q, want uid 65534 and nobody's home from /etc/passwd", c.opts.Credential, c.opts.Env)
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func TestEnvFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "env")
	os.WriteFile(path, []byte("# comment\n\nexport A=1\nB = \"two words\"\nC='x'\n"), 0o600)
	c, err := parse(t, env(), "--env-file", path, "--env", "C=y")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(c.opts.Env, " "); got != "A=1 B=two words C=x C=y" {
		t.Errorf("env %q", got)
	}
	for name, content := range map[string]string{
		"secret": "A=1\nAWS_SECRET_ACCESS_KEY wJalrXUtnFEMI\n",
		"nul":    "A=1\nB=x\x00y\n",
	} {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(content), 0o600)
		_, err := parse(t, env(), "--env-file", p)
		if err == nil || !strings.Contains(err.Error(), ":") || !strings.Contains(err.Error(), "line 2") ||
			strings.Contains(err.Error(), "wJalr") || strings.Contains(err.Error(), "x\x00y") {
			t.Errorf("%s: error %v, want one naming line 2 and not showing it", name, err)
		}
	}
}

func TestPortsAndStopSignal(t *testing.T) {
	tcp := func(p int) supervisor.Listener { return supervisor.Listener{Network: "tcp", Port: p} }
	udp := func(p int) supervisor.Listener { return supervisor.Listener{Network: "udp", Port: p} }
	for _, tc := range []struct {
		args []string
		env  map[string]string
		want []supervisor.Listener
	}{
		{[]string{"--port", "3000"}, nil, []supervisor.Listener{tcp(3000)}},
		{[]string{"--port", "tcp:443", "--port", "udp:443"}, nil, []supervisor.Listener{tcp(443), udp(443)}},
		{[]string{"--port", "tcp:443,udp:443", "--", "srv"}, nil, []supervisor.Listener{tcp(443), udp(443)}},
		{nil, map[string]string{"SHOAL_PORT": "udp:5353,8080"}, []supervisor.Listener{udp(5353), tcp(8080)}},
		{[]string{"--port", "0", "--", "srv"}, nil, nil},
	} {
		c, err := parse(t, env(kv(tc.env)...), tc.args...)
		if err != nil {
			t.Errorf("%v %v: %v", tc.args, tc.env, err)
			continue
		}
		if !slices.Equal(c.opts.Listeners, tc.want) {
			t.Errorf("%v %v: listeners %v, want %v", tc.args, tc.env, c.opts.Listeners, tc.want)
		}
	}
	for _, args := range [][]string{{"--port", "udp:"}, {"--port", "sctp:80"}, {"--port", "tcp:70000"}, {"--port", "8000", "--port", "tcp:8000"},
		{"--port", "udp:53"}, {"--stop-signal", "NOPE"}, {"--stop-signal", "99"}} {
		if _, err := parse(t, env(), args...); err == nil || strings.Contains(err.Error(), "\n") {
			t.Errorf("%v: error %v, want one line", args, err)
		}
	}
	for text, want := range map[string]syscall.Signal{"QUIT": syscall.SIGQUIT, "sigquit": syscall.SIGQUIT, "3": syscall.SIGQUIT, "TERM": syscall.SIGTERM, "USR2": syscall.SIGUSR2} {
		c, err := parse(t, env(), "--stop-signal", text)
		if err != nil || c.opts.StopSignal != want {
			t.Errorf("--stop-signal %s: %v, %v; want %v", text, c.opts.StopSignal, err, want)
		}
	}
}

func kv(m map[string]string) []string {
	var out []string
	for k, v := range m {
		out = append(out, k+"="+v)
	}
	return out
}
