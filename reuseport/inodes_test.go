//go:build linux

package reuseport

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/testutil"
)

// The test binary doubles as a helper process when this variable is set:
// "listen" opens a reuseport listener, prints "PID PORT" and waits until its
// stdin closes, after starting, if helperDepthEnv > 0, one helper of its own
// (a grandchild of the test); "exit" exits at once.
const (
	helperEnv      = "REUSEPORT_TEST_HELPER"
	helperDepthEnv = "REUSEPORT_TEST_HELPER_DEPTH"

	// noRaceSleep spares helpers built with -race the race detector's
	// one-second sleep at exit.
	noRaceSleep = "GORACE=atexit_sleep_ms=0"
)

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
		os.Exit(m.Run())
	case "exit":
		os.Exit(0)
	case "listen":
		os.Exit(runListenHelper())
	default:
		os.Exit(2)
	}
}

func runListenHelper() int {
	l, err := Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer l.Close()
	var child *exec.Cmd
	var childIn io.WriteCloser
	if d, _ := strconv.Atoi(os.Getenv(helperDepthEnv)); d > 0 {
		child = exec.Command(os.Args[0])
		child.Env = append(os.Environ(), helperDepthEnv+"="+strconv.Itoa(d-1))
		child.Stdout = os.Stdout // the child reports to the test directly
		child.Stderr = os.Stderr
		if childIn, err = child.StdinPipe(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		if err := child.Start(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	fmt.Printf("%d %d\n", os.Getpid(), l.Addr().(*net.TCPAddr).Port)
	io.Copy(io.Discard, os.Stdin) // until the test closes our stdin, or dies
	if child != nil {
		childIn.Close()
		testutil.Wait(child, 5*time.Second)
	}
	return 0
}

// startHelpers starts a chain of depth+1 listen helpers (child, grandchild,
// ...) and returns the port of each helper's listener by pid, and the pids
// in order from the child down. Cleanup closes the child's stdin, which
// ends the chain, and kills what is left.
func startHelpers(t *testing.T, depth int) (map[int]int, []int) {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), helperEnv+"=listen", helperDepthEnv+"="+strconv.Itoa(depth), noRaceSleep)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		if err := testutil.Wait(cmd, 5*time.Second); err != nil {
			t.Errorf("helper %d: %v", cmd.Process.Pid, err)
		}
	})
	type line struct {
		pid, port int
		err       error
	}
	lines := make(chan line, depth+1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var l line
			_, l.err = fmt.Sscan(sc.Text(), &l.pid, &l.port)
			lines <- l
		}
		close(lines)
	}()
	ports := map[int]int{}
	var order []int
	timeout := time.After(10 * time.Second)
	for len(ports) < depth+1 {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatal("helper exited before reporting its port")
			}
			if l.err != nil {
				t.Fatalf("helper output: %v", l.err)
			}
			ports[l.pid] = l.port
		case <-timeout:
			t.Fatal("timeout waiting for the helpers' ports")
		}
	}
	// The child reports first or later; order the pids by ancestry.
	order = append(order, cmd.Process.Pid)
	if _, ok := ports[cmd.Process.Pid]; !ok {
		t.Fatalf("child %d did not report: %v", cmd.Process.Pid, ports)
	}
	for pid := range ports {
		if pid != cmd.Process.Pid {
			order = append(order, pid)
		}
	}
	return ports, order
}

// inodeOf returns the inode of the one listener on port.
func inodeOf(t *testing.T, port int) uint64 {
	t.Helper()
	socks, err := Listeners(port)
	if err != nil {
		t.Fatal(err)
	}
	if len(socks) != 1 {
		t.Fatalf("Listeners(%d): %d sockets, want 1: %+v", port, len(socks), socks)
	}
	return socks[0].Inode
}

func TestInodesSelf(t *testing.T) {
	l1, port := listenTCP4(t)
	listenSame(t, l1)
	socks, err := Listeners(port)
	if err != nil {
		t.Fatal(err)
	}
	set, err := Inodes(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if len(socks) != 2 {
		t.Fatalf("Listeners(%d): %+v", port, socks)
	}
	for _, s := range socks {
		if _, ok := set[s.Inode]; !ok {
			t.Errorf("Inodes(self) misses listener inode %d", s.Inode)
		}
	}
}

func TestInodesDescendants(t *testing.T) {
	_, ownPort := listenTCP4(t)
	own := inodeOf(t, ownPort)
	ports, pids := startHelpers(t, 1)
	child, grandchild := pids[0], pids[1]
	childIno, grandIno := inodeOf(t, ports[child]), inodeOf(t, ports[grandchild])

	desc := descendants(os.Getpid())
	if !slices.Contains(desc, child) || !slices.Contains(desc, grandchild) {
		t.Errorf("descendants(self) = %v, want %d and %d among them", desc, child, grandchild)
	}
	if d := descendants(child); !slices.Equal(d, []int{grandchild}) {
		t.Errorf("descendants(child) = %v, want [%d]", d, grandchild)
	}
	if hasChildrenFiles() {
		// Both ways of finding descendants agree.
		tree := parentTree()
		if kids := tree[child]; !slices.Equal(kids, childrenFromTasks(child)) {
			t.Errorf("children of %d: /proc/*/stat says %v, task children files say %v", child, kids, childrenFromTasks(child))
		}
	} else {
		t.Log("no /proc/PID/task/TID/children; descendants found through /proc/*/stat")
	}
	t.Run("stat", func(t *testing.T) {
		// Find descendants as on kernels without the children files.
		old := hasChildrenFiles
		hasChildrenFiles = func() bool { return false }
		defer func() { hasChildrenFiles = old }()
		checkInodes(t, child, grandchild, childIno, grandIno, own)
	})
	t.Run("default", func(t *testing.T) {
		checkInodes(t, child, grandchild, childIno, grandIno, own)
	})
}

func checkInodes(t *testing.T, child, grandchild int, childIno, grandIno, own uint64) {
	has := func(pid int, ino uint64) bool {
		t.Helper()
		set, err := Inodes(pid)
		if err != nil {
			t.Fatal(err)
		}
		_, ok := set[ino]
		return ok
	}
	for _, c := range []struct {
		pid  int
		ino  uint64
		want bool
		what string
	}{
		{child, childIno, true, "child's own socket"},
		{child, grandIno, true, "grandchild's socket in the child's tree"},
		{child, own, false, "parent's socket in the child's tree"},
		{grandchild, grandIno, true, "grandchild's own socket"},
		{grandchild, childIno, false, "child's socket in the grandchild's tree"},
		{os.Getpid(), childIno, true, "child's socket in our tree"},
		{os.Getpid(), grandIno, true, "grandchild's socket in our tree"},
	} {
		if got := has(c.pid, c.ino); got != c.want {
			t.Errorf("%s: Inodes(%d) has %d = %v, want %v", c.what, c.pid, c.ino, got, c.want)
		}
	}
}

func TestInodesGone(t *testing.T) {
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), helperEnv+"=exit", noRaceSleep)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	if err := testutil.Wait(cmd, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	set, err := Inodes(pid)
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Inodes(%d) of a reaped process = %v, %v; want an error matching os.ErrNotExist", pid, set, err)
	}
	t.Log(err)
	if _, err := Inodes(0); err == nil {
		t.Error("Inodes(0): no error")
	}
}

func TestGoneErrorESRCH(t *testing.T) {
	err := &goneError{pid: 7, err: os.NewSyscallError("readdirent", syscall.ESRCH)}
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%v does not match os.ErrNotExist", err)
	}
}

func TestParseStatPPid(t *testing.T) {
	for _, c := range []struct {
		in   string
		ppid int
		ok   bool
	}{
		{"1234 (bash) S 1000 1234 1234 34816 ...", 1000, true},
		{"1234 (a) b) (c) R 42 1 1", 42, true},
		{"1234 (tricky ) S 9) S 7 1 1\n", 7, true},
		{"2 (kthreadd) S 0 0 0 0 -1", 0, true},
		{"garbage", 0, false},
		{"1 (x) S", 0, false},
	} {
		ppid, ok := parseStatPPid([]byte(c.in))
		if ppid != c.ppid || ok != c.ok {
			t.Errorf("parseStatPPid(%q) = %d, %v; want %d, %v", c.in, ppid, ok, c.ppid, c.ok)
		}
	}
}

func TestSocketInode(t *testing.T) {
	for _, c := range []struct {
		in  string
		ino uint64
		ok  bool
	}{
		{"socket:[12345]", 12345, true},
		{"socket:[]", 0, false},
		{"pipe:[12345]", 0, false},
		{"/dev/null", 0, false},
		{"socket:[12a]", 0, false},
		{"anon_inode:[eventpoll]", 0, false},
	} {
		ino, ok := socketInode([]byte(c.in))
		if ino != c.ino || ok != c.ok {
			t.Errorf("socketInode(%q) = %d, %v; want %d, %v", c.in, ino, ok, c.ino, c.ok)
		}
	}
}

func TestAppendPids(t *testing.T) {
	got := appendPids(nil, []byte("12 345 6789 \n"))
	if fmt.Sprint(got) != "[12 345 6789]" {
		t.Errorf("appendPids = %v", got)
	}
	if got := appendPids(nil, []byte("")); len(got) != 0 {
		t.Errorf("appendPids(empty) = %v", got)
	}
}
