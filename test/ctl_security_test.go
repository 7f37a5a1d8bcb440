package test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/peer"
)

// The attacks on the control socket: a victim, uid 1001, runs a master and
// 'shoal ctl'; an attacker, nobody (uid 65534), shares their $TMPDIR, a
// sticky directory like /tmp.
const (
	victim   = 1001
	attacker = 65534
)

func init() {
	// The test binary, run as the attacker, is a fake master.
	if path := os.Getenv("E2E_CTL_FAKE_MASTER"); path != "" {
		os.Exit(fakeMaster(path))
	}
}

// forgedStatus is the fake master's answer to status: escape codes that
// set the terminal's title and clear the screen.
const forgedStatus = `{"ok":true,"result":{"desired":1,"workers":[{"slot":1,"pid":1,"state":"\u001b]0;pwned\u0007\u001b[2Jlistening","uptime_seconds":1,"restarts":0,"reloads":0,"requests":0}]}}`

// fakeMaster listens at path, open to all, and answers every request ok,
// as an attacker's impostor would; it prints each request it gets as
// "got REQUEST". It prints "ready" once it listens and exits when its stdin
// closes.
func fakeMaster(path string) int {
	dir := filepath.Dir(path)
	os.MkdirAll(dir, 0o755)
	os.Chmod(dir, 0o755)
	os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		fmt.Println(err)
		return 1
	}
	os.Chmod(path, 0o777)
	var mu sync.Mutex
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					line, err := br.ReadString('\n')
					if err != nil {
						return
					}
					mu.Lock()
					fmt.Printf("got %s", line)
					mu.Unlock()
					resp := `{"ok":true}`
					if strings.Contains(line, `"status"`) {
						resp = forgedStatus
					}
					c.Write([]byte(resp + "\n"))
				}
			}()
		}
	}()
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
	return 0
}

// sec is the stage of an attack: a directory every user may enter, with a
// copy of the test binary and a sticky $TMPDIR shared by victim and
// attacker.
type sec struct {
	t       *testing.T
	base    string // mode 0755, removed at the end
	tmp     string // base/tmp, mode 1777: the users' $TMPDIR
	bin     string // the test binary, for fake masters
	setpriv string
}

func newSec(t *testing.T) *sec {
	t.Helper()
	if os.Getuid() != 0 {
		peer.Missing(t, "acting as uid %d and nobody needs root", victim)
	}
	s := &sec{t: t, setpriv: peer.Require(t, "setpriv")}
	base, err := os.MkdirTemp("", "shoal-ctl-sec-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	s.base = base
	s.tmp = filepath.Join(base, "tmp")
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(s.tmp, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(s.tmp, 0o777|os.ModeSticky); err != nil {
		t.Fatal(err)
	}
	s.bin = filepath.Join(base, "e2e.test")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(s.bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return s
}

// as returns the command line that runs args as uid.
func (s *sec) as(uid int, args ...string) []string {
	return append([]string{s.setpriv, "--reuid=" + strconv.Itoa(uid), "--regid=" + strconv.Itoa(uid), "--clear-groups"}, args...)
}

// env is the environment of the victim and the attacker: their $TMPDIR is
// the shared one, and nothing else tells shoal where its socket is.
func (s *sec) env() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if k == "TMPDIR" || k == "XDG_RUNTIME_DIR" || k == "HOME" || strings.HasPrefix(k, "SHOAL_") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "TMPDIR="+s.tmp, "HOME=/")
}

// userDir makes a directory of uid's, mode 0700.
func (s *sec) userDir(name string, uid int) string {
	s.t.Helper()
	d := filepath.Join(s.base, name)
	if err := os.Mkdir(d, 0o700); err != nil {
		s.t.Fatal(err)
	}
	if err := os.Chown(d, uid, uid); err != nil {
		s.t.Fatal(err)
	}
	return d
}

// run runs args as uid and returns its stdout, stderr and exit code.
func (s *sec) run(uid int, args ...string) (string, string, int) {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	argv := s.as(uid, args...)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = s.env()
	cmd.Dir = s.base
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		s.t.Fatalf("%v: %v", args, err)
	}
	return stdout.String(), stderr.String(), code
}

// ctl runs 'shoal ctl args' as uid.
func (s *sec) ctl(uid int, args ...string) (string, string, int) {
	s.t.Helper()
	return s.run(uid, append([]string{shoalBin, "ctl"}, args...)...)
}

// fake is a fake master of the attacker's.
type fake struct {
	pid int
	out *logs
}

// got returns the requests the fake master got.
func (f *fake) got() string {
	lines, _ := f.out.snapshot()
	var got []string
	for _, l := range lines {
		if strings.HasPrefix(l, "got ") {
			got = append(got, l)
		}
	}
	return strings.Join(got, "\n")
}

// fake starts a fake master as the attacker at path; it is stopped and
// reaped at the end of the test.
func (s *sec) fake(path string) *fake {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	argv := s.as(attacker, s.bin, "-test.run=^$")
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = append(s.env(), "E2E_CTL_FAKE_MASTER="+path)
	cmd.Dir = s.base
	cmd.WaitDelay = 5 * time.Second
	f := &fake{out: newLogs()}
	cmd.Stdout = f.out
	stdin, err := cmd.StdinPipe()
	if err != nil {
		s.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		cancel()
		s.t.Fatal(err)
	}
	s.t.Cleanup(func() {
		stdin.Close()
		cmd.Wait()
		cancel()
	})
	f.pid = cmd.Process.Pid
	deadline := time.Now().Add(20 * time.Second)
	for {
		lines, changed := f.out.snapshot()
		if len(lines) > 0 {
			if lines[0] != "ready" {
				s.t.Fatalf("fake master: %q", lines)
			}
			return f
		}
		select {
		case <-changed:
		case <-time.After(time.Until(deadline)):
			s.t.Fatalf("fake master at %s not ready within 20s", path)
		}
	}
}

// master starts a shoal master as uid with args; it is killed and reaped
// at the end of the test.
func (s *sec) master(uid int, args ...string) *master {
	t := s.t
	t.Helper()
	m := newMaster(t)
	argv := s.as(uid, append([]string{shoalBin, "--workers", "1", "--port", "0", "--metrics-addr", ""}, args...)...)
	m.cmd = exec.Command(argv[0], argv[1:]...)
	m.cmd.Env = append(s.env(), "SHOAL_LOG_FORMAT=json", "SHOAL_LOG_LEVEL=debug", "SHOAL_MIGRATE_REQ=off")
	m.cmd.Dir = s.base
	m.launch()
	return m
}

// refused checks that a command failed with exit code 1 and an error
// that says want.
func refused(t *testing.T, what string, stdout, stderr string, code int, want string) {
	t.Helper()
	if code != 1 || !strings.Contains(stderr, want) {
		t.Errorf("%s: exit %d, stderr %q\nwant exit 1 and %q", what, code, stderr, want)
	}
	if strings.ContainsAny(stdout+stderr, "\x1b\x07") {
		t.Errorf("%s printed escape codes: %q %q", what, stdout, stderr)
	}
}

// TestCtlRefusesAnAttackersDirectory: the attacker makes the victim's
// default socket directory, $TMPDIR/shoal-1001, before the victim does, with
// a fake master in it. The victim's 'shoal ctl' refuses to talk to it,
// whatever the command, naming the directory and its owner, and the
// victim's master refuses to start there.
func TestCtlRefusesAnAttackersDirectory(t *testing.T) {
	s := newSec(t)
	dir := filepath.Join(s.tmp, fmt.Sprintf("shoal-%d", victim))
	f := s.fake(filepath.Join(dir, "shoal.sock"))
	want := fmt.Sprintf("refusing it: directory %s belongs to uid %d (nobody), not to you (uid %d) or root", dir, attacker, victim)
	for _, args := range [][]string{{"broadcast", `{"db_password":"hunter2"}`}, {"send", "1", `{"db_password":"hunter2"}`}, {"status"}, {"--json", "status"}, {"reload"}, {"stop"}} {
		stdout, stderr, code := s.ctl(victim, args...)
		refused(t, fmt.Sprintf("ctl %q", args), stdout, stderr, code, want)
	}
	if got := f.got(); got != "" {
		t.Errorf("the attacker's fake master got:\n%s", got)
	}

	m := s.master(victim, "--", "sleep", "60")
	if code := m.wait(15 * time.Second); code != 2 || !strings.Contains(m.logs.String(), fmt.Sprintf("directory %s belongs to uid %d (nobody), not to you (uid %d) or root", dir, attacker, victim)) {
		t.Errorf("the victim's master in the attacker's directory: exit %d, want 2 with an error naming the directory and its owner", code)
	}
}

// TestCtlRefusesAnAttackersSymlink: the attacker makes $TMPDIR/shoal-1001 a
// symlink, first to the victim's own socket directory, then to a fake
// master's. The victim's 'shoal ctl' refuses the symlink either way, and
// the victim's master refuses to start through it.
func TestCtlRefusesAnAttackersSymlink(t *testing.T) {
	s := newSec(t)
	home := s.userDir("home", victim)
	real := filepath.Join(home, "run", "shoal.sock")
	m := s.master(victim, "--control", real, "--", "sleep", "60")
	m.waitFor(15*time.Second, 1, "control socket", msg("control socket ready for 'shoal ctl'"))
	if _, stderr, code := s.ctl(victim, "--control", real, "status"); code != 0 {
		t.Fatalf("the victim's own ctl status: exit %d: %s", code, stderr)
	}

	link := filepath.Join(s.tmp, fmt.Sprintf("shoal-%d", victim))
	if _, stderr, code := s.run(attacker, "ln", "-s", filepath.Dir(real), link); code != 0 {
		t.Fatalf("ln -s as nobody: %s", stderr)
	}
	want := fmt.Sprintf("refusing it: symlink %s belongs to uid %d (nobody), not to you (uid %d) or root", link, attacker, victim)
	stdout, stderr, code := s.ctl(victim, "status")
	refused(t, "ctl status through the attacker's symlink to the real master", stdout, stderr, code, want)

	f := s.fake(filepath.Join(s.tmp, "evil", "shoal.sock"))
	if _, stderr, code := s.run(attacker, "ln", "-sfn", filepath.Join(s.tmp, "evil"), link); code != 0 {
		t.Fatalf("ln -sfn as nobody: %s", stderr)
	}
	for _, args := range [][]string{{"stop"}, {"broadcast", `{"db_password":"hunter2"}`}, {"status"}} {
		stdout, stderr, code := s.ctl(victim, args...)
		refused(t, fmt.Sprintf("ctl %q through the repointed symlink", args), stdout, stderr, code, want)
	}
	if got := f.got(); got != "" {
		t.Errorf("the attacker's fake master got:\n%s", got)
	}
	if _, stderr, code := s.ctl(victim, "--control", real, "status"); code != 0 {
		t.Errorf("the victim's master after the attack: exit %d: %s", code, stderr)
	}

	m2 := s.master(victim, "--", "sleep", "60")
	if code := m2.wait(15 * time.Second); code != 2 || !strings.Contains(m2.logs.String(), fmt.Sprintf("symlink %s belongs to uid %d (nobody)", link, attacker)) {
		t.Errorf("the victim's master through the attacker's symlink: exit %d, want 2 with an error naming the symlink and its owner", code)
	}
}

// TestCtlRefusesAnImpostorProcess: a socket that passes every check of
// its path (here moved into the victim's own directory and given to the
// victim) but is served by the attacker's process is refused on the peer's
// credentials, before any request is sent; its forged status with escape
// codes never reaches the terminal.
func TestCtlRefusesAnImpostorProcess(t *testing.T) {
	s := newSec(t)
	f := s.fake(filepath.Join(s.tmp, "evil", "shoal.sock"))
	home := s.userDir("home", victim)
	path := filepath.Join(home, "shoal.sock")
	if err := os.Rename(filepath.Join(s.tmp, "evil", "shoal.sock"), path); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(path, victim, victim); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("refusing to talk to the process that listens there (pid %d): it runs as uid %d (nobody), not as you (uid %d) or root, so it is not your master", f.pid, attacker, victim)
	for _, args := range [][]string{{"status"}, {"broadcast", `{"db_password":"hunter2"}`}, {"stop"}} {
		stdout, stderr, code := s.ctl(victim, append([]string{"--control", path}, args...)...)
		refused(t, fmt.Sprintf("ctl %q to an impostor", args), stdout, stderr, code, want)
	}
	if got := f.got(); got != "" {
		t.Errorf("the impostor got:\n%s", got)
	}
}

// TestCtlLockCannotBeHeldByAnotherUser: the master's lock is a file only
// its user and root can open, so another user holding a flock on the
// socket's directory does not keep a root master from starting; and a
// socket right in a sticky directory like /tmp, where anyone could take
// the name or the lock, is refused at once with a clear error.
func TestCtlLockCannotBeHeldByAnotherUser(t *testing.T) {
	s := newSec(t)
	run := filepath.Join(s.base, "run")
	if err := os.Mkdir(run, 0o755); err != nil {
		t.Fatal(err)
	}
	// The attacker holds a flock on the directory for as long as the test.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	argv := s.as(attacker, "flock", run, "sleep", "60")
	hold := exec.CommandContext(ctx, argv[0], argv[1:]...)
	if err := hold.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		hold.Process.Kill()
		hold.Wait()
		cancel()
	})
	time.Sleep(200 * time.Millisecond) // flock(1) takes the lock
	t0 := time.Now()
	m := s.master(0, "--control", filepath.Join(run, "shoal.sock"), "--", "sleep", "60")
	m.waitFor(15*time.Second, 1, "control socket despite the attacker's flock", msg("control socket ready for 'shoal ctl'"))
	t.Logf("control socket ready %v after start, with the attacker's flock held", time.Since(t0).Round(time.Millisecond))
	if _, stderr, code := s.ctl(0, "--control", filepath.Join(run, "shoal.sock"), "status"); code != 0 {
		t.Errorf("status: exit %d: %s", code, stderr)
	}

	sticky := filepath.Join(s.tmp, "shoal.sock")
	m2 := s.master(0, "--control", sticky, "--", "sleep", "60")
	if code := m2.wait(15 * time.Second); code != 2 || !strings.Contains(m2.logs.String(), fmt.Sprintf("directory %s is writable by others (mode dtrwxrwxrwx)", s.tmp)) {
		t.Errorf("a master with its socket right in a sticky directory: exit %d, want 2 naming the directory", code)
	}
}
