package test

// The files under deploy/ and the Dockerfile are checked against the binary
// they configure, so that a default that changes in the code cannot
// silently leave them behind. This file holds what those checks share: the
// binary's defaults, and what a deployment file asks of shoal.

import (
	"net"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// moduleRoot is the module's root, seen from this package's directory.
const moduleRoot = ".."

// flagDefaults returns each flag's default as `shoal -h` prints it, run
// with env (nil: the test's environment) and, when uid >= 0, as that user.
func flagDefaults(t *testing.T, env []string, uid, gid int) map[string]string {
	t.Helper()
	cmd := exec.Command(shoalBin, "-h")
	if env == nil {
		env = os.Environ()
	}
	cmd.Env = append(slices.Clip(env), noRaceSleep)
	if uid >= 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("shoal -h: %v", err)
	}
	defaults := map[string]string{}
	flagLine := regexp.MustCompile(`^\s+-([a-z][a-z-]*)\b`)
	defaultOf := regexp.MustCompile(`\(default (.*)\)$`)
	name := ""
	for _, line := range strings.Split(string(out), "\n") {
		if m := flagLine.FindStringSubmatch(line); m != nil {
			name = m[1]
			continue
		}
		if m := defaultOf.FindStringSubmatch(strings.TrimSpace(line)); m != nil && name != "" {
			defaults[name] = m[1]
		}
	}
	for _, f := range []string{"port", "metrics-addr", "stop-timeout", "control"} {
		if _, ok := defaults[f]; !ok {
			t.Fatalf("shoal -h shows no default for --%s:\n%s", f, out)
		}
	}
	return defaults
}

// shoalConfig is what a deployment file asks of shoal: its flags, its
// environment, and the binary's defaults for the rest.
type shoalConfig struct {
	where    string            // the file, for messages
	flags    map[string]string // --name value, before "--"
	env      map[string]string
	defaults map[string]string
}

func newShoalConfig(t *testing.T, where string, args []string, env map[string]string, defaults map[string]string) shoalConfig {
	t.Helper()
	c := shoalConfig{where: where, flags: map[string]string{}, env: env, defaults: defaults}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" || !strings.HasPrefix(a, "-") {
			break
		}
		name, value, ok := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !ok {
			if i+1 >= len(args) {
				t.Fatalf("%s: flag %s without a value", c.where, a)
			}
			i++
			value = args[i]
		}
		c.flags[name] = value
	}
	return c
}

// get returns the value of flag name: flag, else SHOAL_NAME, else default.
func (c shoalConfig) get(name string) string {
	if v, ok := c.flags[name]; ok {
		return v
	}
	if v, ok := c.env["SHOAL_"+strings.ToUpper(strings.ReplaceAll(name, "-", "_"))]; ok {
		return v
	}
	return c.defaults[name]
}

func (c shoalConfig) set(name string) bool {
	_, f := c.flags[name]
	_, e := c.env["SHOAL_"+strings.ToUpper(strings.ReplaceAll(name, "-", "_"))]
	return f || e
}

func (c shoalConfig) port(t *testing.T) int {
	t.Helper()
	n, err := strconv.Atoi(c.get("port"))
	if err != nil || n <= 0 {
		t.Fatalf("%s: port %q: want a port number", c.where, c.get("port"))
	}
	return n
}

func (c shoalConfig) metricsPort(t *testing.T) int {
	t.Helper()
	_, p, err := net.SplitHostPort(c.get("metrics-addr"))
	n, err2 := strconv.Atoi(p)
	if err != nil || err2 != nil {
		t.Fatalf("%s: metrics address %q: want host:port", c.where, c.get("metrics-addr"))
	}
	return n
}

func (c shoalConfig) stopTimeout(t *testing.T) time.Duration {
	t.Helper()
	d, err := time.ParseDuration(c.get("stop-timeout"))
	if err != nil {
		t.Fatalf("%s: stop timeout %q: %v", c.where, c.get("stop-timeout"), err)
	}
	return d
}

func atoiOr0(s string) int { n, _ := strconv.Atoi(s); return n }

func firstNonEmpty(a, b string) string {
	if a != "" {
		return a
	}
	return b
}
