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

// runRefused runs shoal with args through sh -c prefix, and wants it to
// refuse to start: exit 2 within a few seconds, no worker started, and a
// message that contains want.
func runRefused(t *testing.T, prefix string, args []string, want string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "sh", append([]string{"-c", prefix + `exec "$@"`, "sh", shoalBin}, args...)...)
	cmd.Env = append(os.Environ(), "SHOAL_LOG_FORMAT=json", "SHOAL_METRICS_ADDR=", "SHOAL_CONTROL=", "SHOAL_MIGRATE_REQ=off")
	cmd.WaitDelay = 2 * time.Second
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("shoal %v still ran after 5s (killed), want it refused at once; output:\n%.2000s", args, out)
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 {
		t.Fatalf("shoal %v: %v, want exit code 2; output:\n%.2000s", args, err, out)
	}
	if !strings.Contains(string(out), want) {
		t.Errorf("output lacks %q:\n%.2000s", want, out)
	}
	if strings.Contains(string(out), "worker started") {
		t.Errorf("a worker was started despite bad input:\n%.2000s", out)
	}
	return string(out)
}

// TestEnvFileRefusedAtStart feeds --env-file what once hung the master,
// grew it without bound, or let it start workers that could never exec.
func TestEnvFileRefusedAtStart(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cmd := []string{"--workers", "1", "--port", "0", "--", "sleep", "60"}
	t.Run("fifo", func(t *testing.T) {
		fifo := filepath.Join(dir, "fifo")
		if err := syscall.Mkfifo(fifo, 0o600); err != nil {
			t.Fatal(err)
		}
		runRefused(t, "", append([]string{"--env-file", fifo}, cmd...), "a FIFO, not a regular file")
	})
	t.Run("dev_zero", func(t *testing.T) {
		runRefused(t, "", append([]string{"--env-file", "/dev/zero"}, cmd...), "a character device, not a regular file")
	})
	t.Run("too_large", func(t *testing.T) {
		p := write("large", strings.Repeat("# padding\n", 110_000))
		runRefused(t, "", append([]string{"--env-file", p}, cmd...), "more than the limit of 1048576 bytes")
	})
	t.Run("nul", func(t *testing.T) {
		p := write("nul", "A=1\nB=x\x00y\n")
		runRefused(t, "", append([]string{"--env-file", p}, cmd...), "line 2 holds a NUL byte")
	})
	t.Run("variable_over_128KiB", func(t *testing.T) {
		p := write("long", "BIG="+strings.Repeat("x", 200<<10)+"\n")
		runRefused(t, "", append([]string{"--env-file", p}, cmd...), "worker environment variable BIG is 204804 bytes: exec allows at most 131071")
	})
	t.Run("environment_over_arg_max", func(t *testing.T) {
		// With a 1 MiB stack limit exec takes 256 KiB of arguments and
		// environment: ten variables of 60 KiB pass one by one, not
		// together.
		var b strings.Builder
		for i := range 10 {
			b.WriteString("V" + strconv.Itoa(i) + "=" + strings.Repeat("x", 60<<10) + "\n")
		}
		p := write("many", b.String())
		runRefused(t, "ulimit -s 1024; ", append([]string{"--env-file", p}, cmd...), "over the 262144 that exec allows here")
	})
	t.Run("bad_line_not_echoed", func(t *testing.T) {
		p := write("secret", "A=1\n# a comment\nAWS_SECRET_ACCESS_KEY wJalrXUtnFEMI/K7MDENG\n")
		out := runRefused(t, "", append([]string{"--env-file", p}, cmd...), p+": line 3: want KEY=VALUE")
		if strings.Contains(out, "wJalrXUtnFEMI") || strings.Contains(out, "AWS_SECRET") {
			t.Errorf("the bad line, with its secret, is in the output:\n%s", out)
		}
	})
}

// TestEnvFileStillWorks: a plain file still sets the workers' environment,
// and --env wins over it.
func TestEnvFileStillWorks(t *testing.T) {
	p := filepath.Join(t.TempDir(), "env")
	os.WriteFile(p, []byte("# db\nexport DB_URL='postgres://x'\nMODE=file\n"), 0o600)
	m := startShoal(t, nil, "--workers", "1", "--port", "0", "--env-file", p, "--env", "MODE=flag", "--", "sleep", "60")
	pid := m.waitFor(10*time.Second, 1, "worker listening", msg("worker listening"))[0].num("pid")
	if env := environ(t, pid); env["DB_URL"] != "postgres://x" || env["MODE"] != "flag" {
		t.Errorf("worker environment DB_URL=%q MODE=%q, want postgres://x and flag", env["DB_URL"], env["MODE"])
	}
}

// TestNumericUserAndHome: a uid with no passwd entry runs the workers with
// the same gid and HOME=/; a named user's workers get its home, not the
// master's.
func TestNumericUserAndHome(t *testing.T) {
	if os.Getuid() != 0 {
		peer.Missing(t, "needs root")
	}
	for _, tc := range []struct {
		user, status, home string
	}{
		{"4242", `Uid:	4242	4242	4242	4242`, "/"},
		{"nobody", `Uid:	65534	65534	65534	65534`, homeOf(t, "nobody")},
	} {
		t.Run(tc.user, func(t *testing.T) {
			port := testutil.FreePort(t)
			m := startShoal(t, nil, "--workers", "1", "--port", strconv.Itoa(port), "--host", "127.0.0.1", "--user", tc.user)
			pid := m.listening(15*time.Second, 1)[1]
			b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(string(b), tc.status) || (tc.user == "4242" && !strings.Contains(string(b), "Gid:	4242	4242")) {
				t.Errorf("worker status:\n%s\nwant %q", b, tc.status)
			}
			if home := environ(t, pid)["HOME"]; home != tc.home {
				t.Errorf("worker HOME=%q, want %q", home, tc.home)
			}
			if code, body := get(t, "http://127.0.0.1:"+strconv.Itoa(port)+"/"); code != 200 || body != "hello world\n" {
				t.Errorf("GET = %d %q", code, body)
			}
		})
	}
}

// homeOf reads a user's home from /etc/passwd.
func homeOf(t *testing.T, name string) string {
	b, err := os.ReadFile("/etc/passwd")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Split(line, ":"); len(f) >= 7 && f[0] == name {
			return f[5]
		}
	}
	t.Fatalf("no %s in /etc/passwd", name)
	return ""
}
