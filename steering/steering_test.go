//go:build linux

package steering

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/shoal-sh/shoal/internal/testutil"
	"github.com/shoal-sh/shoal/reuseport"
	"golang.org/x/sys/unix"
)

// TestMain lets the test binary act as a helper process: a listener child
// for TestAddPID, or a Check run without CAP_BPF for TestCheckWithoutCapBPF.
func TestMain(m *testing.M) {
	switch os.Getenv("STEERING_TEST_HELPER") {
	case "listen":
		helperListen(os.Getenv("STEERING_TEST_ADDR"))
		return
	case "add":
		s, err := New(Options{Addr: netip.MustParseAddrPort(os.Getenv("STEERING_TEST_ADDR"))})
		if err == nil {
			pid, _ := strconv.Atoi(os.Getenv("STEERING_TEST_PID"))
			err = s.Add(0, pid)
			s.Close()
		}
		if err != nil {
			fmt.Println("add:", err)
		} else {
			fmt.Println("add: ok")
		}
		return
	case "check":
		if err := Check(); err != nil {
			fmt.Println("check:", err)
		} else {
			fmt.Println("check: ok")
		}
		return
	}
	os.Exit(m.Run())
}

// helperListen listens on addr with SO_REUSEPORT, prints "ready", and
// serves until its standard input closes.
func helperListen(addr string) {
	var lc reuseport.ListenConfig
	l, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		fmt.Println("listen:", err)
		os.Exit(1)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
}

// needBPF skips the test when this process cannot load the program.
func needBPF(t testing.TB) {
	t.Helper()
	if err := Check(); err != nil {
		t.Skipf("steering unavailable here: %v", err)
	}
}

// group is n SO_REUSEPORT listeners on one 127.0.0.1 port that accept and
// count connections.
type group struct {
	addr      netip.AddrPort
	listeners []*net.TCPListener
	accepted  []atomic.Int64
	wg        sync.WaitGroup
}

func newGroup(t testing.TB, n int) *group {
	t.Helper()
	return newGroupOn(t, "127.0.0.1", n)
}

// newGroupOn is newGroup on host.
func newGroupOn(t testing.TB, host string, n int) *group {
	t.Helper()
	g := &group{accepted: make([]atomic.Int64, n)}
	var lc reuseport.ListenConfig
	lc.SetMultipathTCP(false)
	addr := net.JoinHostPort(host, "0")
	for i := 0; i < n; i++ {
		l, err := lc.Listen(context.Background(), "tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		tl := l.(*net.TCPListener)
		g.listeners = append(g.listeners, tl)
		if i == 0 {
			g.addr = tl.Addr().(*net.TCPAddr).AddrPort()
			addr = g.addr.String()
		}
	}
	for i, l := range g.listeners {
		g.wg.Add(1)
		go func() {
			defer g.wg.Done()
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				g.accepted[i].Add(1)
				c.Close()
			}
		}()
	}
	t.Cleanup(g.close)
	return g
}

func (g *group) close() {
	for _, l := range g.listeners {
		l.Close()
	}
	g.wg.Wait()
}

// fd runs f with listener i's descriptor.
func (g *group) fd(t testing.TB, i int, f func(fd int) error) {
	t.Helper()
	rc, err := g.listeners[i].SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = f(int(fd)) }); err != nil {
		t.Fatal(err)
	}
	if ferr != nil {
		t.Fatal(ferr)
	}
}

// counts returns the accepted counts.
func (g *group) counts() []int64 {
	out := make([]int64, len(g.accepted))
	for i := range g.accepted {
		out[i] = g.accepted[i].Load()
	}
	return out
}

// total is the sum of the accepted counts.
func (g *group) total() int64 {
	var n int64
	for i := range g.accepted {
		n += g.accepted[i].Load()
	}
	return n
}

// dial makes n sequential connections, each closed at once, then waits
// (bounded) until the group accepted them all.
func (g *group) dial(t testing.TB, n int) {
	t.Helper()
	want := g.total() + int64(n)
	d := net.Dialer{Timeout: 5 * time.Second}
	for i := 0; i < n; i++ {
		c, err := d.Dial("tcp", g.addr.String())
		if err != nil {
			t.Fatalf("connection %d of %d: %v", i+1, n, err)
		}
		c.Close()
	}
	deadline := time.Now().Add(10 * time.Second)
	for g.total() < want {
		if time.Now().After(deadline) {
			t.Fatalf("accepted %d connections, want %d (per listener %v)", g.total(), want, g.counts())
		}
		time.Sleep(time.Millisecond)
	}
}

// steer creates a Steering for g and puts listener i at slot i.
func steer(t testing.TB, g *group, opts Options) *Steering {
	t.Helper()
	opts.Addr = g.addr
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	for i := range g.listeners {
		g.fd(t, i, func(fd int) error { return s.AddFD(i, fd) })
	}
	return s
}

func mustCounts(t testing.TB, s *Steering) map[int]uint64 {
	t.Helper()
	c, err := s.Counts()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestRoundRobinExact(t *testing.T) {
	needBPF(t)
	g := newGroup(t, 4)
	s := steer(t, g, Options{})
	g.dial(t, 16)
	if got := g.counts(); !slices.Equal(got, []int64{4, 4, 4, 4}) {
		t.Errorf("accepted per listener = %v, want [4 4 4 4]", got)
	}
	want := map[int]uint64{0: 4, 1: 4, 2: 4, 3: 4}
	if got := mustCounts(t, s); !mapsEqual(got, want) {
		t.Errorf("Counts() = %v, want %v", got, want)
	}
}

func mapsEqual(a, b map[int]uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func TestEvenSpread(t *testing.T) {
	needBPF(t)
	g := newGroup(t, 4)
	steer(t, g, Options{})
	start := time.Now()
	g.dial(t, 4000)
	got := g.counts()
	lo, hi := slices.Min(got), slices.Max(got)
	t.Logf("4000 connections in %v: per listener %v, max/min %.4f", time.Since(start).Round(time.Millisecond), got, float64(hi)/float64(lo))
	if lo == 0 || float64(hi)/float64(lo) > 1.01 {
		t.Errorf("per listener %v: max/min above 1.01", got)
	}
}

func TestRemove(t *testing.T) {
	needBPF(t)
	g := newGroup(t, 4)
	s := steer(t, g, Options{})
	g.dial(t, 8)
	if err := s.Remove(2); err != nil {
		t.Fatal(err)
	}
	before := g.counts()
	g.dial(t, 300)
	after := g.counts()
	if after[2] != before[2] {
		t.Errorf("removed slot 2 got %d new connections (before %v, after %v)", after[2]-before[2], before, after)
	}
	for _, i := range []int{0, 1, 3} {
		if d := after[i] - before[i]; d != 100 {
			t.Errorf("slot %d got %d of 300 connections, want 100 (before %v, after %v)", i, d, before, after)
		}
	}
	c := mustCounts(t, s)
	if c[2] != 2 {
		t.Errorf("Counts()[2] = %d after Remove, want the 2 from before", c[2])
	}
	if got := s.Slots(); !slices.Equal(got, []int{0, 1, 3}) {
		t.Errorf("Slots() = %v, want [0 1 3]", got)
	}
	// Put back: it is dealt connections again.
	g.fd(t, 2, func(fd int) error { return s.AddFD(2, fd) })
	before = g.counts()
	g.dial(t, 40)
	after = g.counts()
	for i := range after {
		if d := after[i] - before[i]; d != 10 {
			t.Errorf("after re-adding slot 2: slot %d got %d of 40, want 10", i, d)
		}
	}
}

func TestSkip(t *testing.T) {
	needBPF(t)
	g := newGroup(t, 3)
	s := steer(t, g, Options{})
	if err := s.Skip(1, true); err != nil {
		t.Fatal(err)
	}
	before := g.counts()
	g.dial(t, 30)
	after := g.counts()
	if d := after[1] - before[1]; d != 0 {
		t.Errorf("skipped slot 1 got %d of 30 connections", d)
	}
	// Every slot stalled: all are dealt connections rather than none.
	for i := range 3 {
		if err := s.Skip(i, true); err != nil {
			t.Fatal(err)
		}
	}
	before = g.counts()
	g.dial(t, 30)
	after = g.counts()
	for i := range after {
		if d := after[i] - before[i]; d != 10 {
			t.Errorf("all skipped: slot %d got %d of 30, want 10", i, d)
		}
	}
	// Recovered.
	if err := s.Skip(0, false); err != nil {
		t.Fatal(err)
	}
	before = g.counts()
	g.dial(t, 20)
	after = g.counts()
	if d := after[0] - before[0]; d != 20 {
		t.Errorf("slot 0, the only one not skipped, got %d of 20", d)
	}
}

// TestNoSelectableSlot: with no socket in the map the program chooses
// nothing, and the kernel's hash places every connection: none fails.
func TestNoSelectableSlot(t *testing.T) {
	needBPF(t)
	g := newGroup(t, 4)
	s := steer(t, g, Options{})
	g.dial(t, 4)
	for i := range 4 {
		if err := s.Remove(i); err != nil {
			t.Fatal(err)
		}
	}
	before := mustCounts(t, s)
	g.dial(t, 200) // fails the test if a connection fails
	used := 0
	for _, n := range g.counts() {
		if n > 1 {
			used++
		}
	}
	if used < 2 {
		t.Errorf("with no slot selectable, connections went to %d listener(s) (%v): want the kernel's hash over several", used, g.counts())
	}
	if after := mustCounts(t, s); !mapsEqual(after, before) {
		t.Errorf("Counts() changed with no slot selectable: %v -> %v", before, after)
	}
}

// TestMigrateQueued: when a listener closes with connections waiting in
// its accept queue, the kernel gives them to the program (select-or-migrate
// attach type) and they move to the other listener instead of being reset,
// even with net.ipv4.tcp_migrate_req=0.
func TestMigrateQueued(t *testing.T) {
	needBPF(t)
	if os.Getenv("STEERING_TEST_NETNS") == "" {
		inNetNS(t, "TestMigrateQueued")
		return
	}
	if on, err := reuseport.MigrateReq(); err != nil {
		t.Skip(err)
	} else if on {
		t.Fatal("net.ipv4.tcp_migrate_req=1 in a new network namespace")
	}
	var lc reuseport.ListenConfig
	la, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer la.Close()
	addr := la.Addr().(*net.TCPAddr).AddrPort()
	lb, err := lc.Listen(context.Background(), "tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer lb.Close()
	s, err := New(Options{Addr: addr})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i, l := range []net.Listener{la, lb} {
		rc, _ := l.(*net.TCPListener).SyscallConn()
		var aerr error
		rc.Control(func(fd uintptr) { aerr = s.AddFD(i, int(fd)) })
		if aerr != nil {
			t.Fatal(aerr)
		}
	}
	// 10 connections: 5 wait in la's queue (nobody accepts there).
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range 10 {
		c, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	if c := mustCounts(t, s); c[0] != 5 || c[1] != 5 {
		t.Fatalf("Counts() = %v, want 5 and 5", c)
	}
	la.Close()
	// lb accepts all 10, answers each, and every client reads the answer.
	done := make(chan int)
	go func() {
		n := 0
		for n < 10 {
			lb.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
			c, err := lb.Accept()
			if err != nil {
				break
			}
			c.Write([]byte("ok"))
			c.Close()
			n++
		}
		done <- n
	}()
	lost := 0
	for _, c := range conns {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, err := io.ReadAll(c)
		if err != nil || string(b) != "ok" {
			lost++
		}
	}
	if n := <-done; n != 10 || lost != 0 {
		t.Errorf("after closing a listener with 5 queued connections: the other accepted %d of 10, clients lost %d", n, lost)
	}
}

// inNetNS runs the test named name in a copy of the test binary in a new
// network namespace (where net.ipv4.tcp_migrate_req is 0), with lo up.
func inNetNS(t *testing.T, name string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root, for a network namespace")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "unshare", "--net", "--", "sh", "-c",
		`ip link set lo up && exec "$0" -test.run="^$1\$" -test.v -test.count=1`, os.Args[0], name)
	cmd.Env = append(os.Environ(), "STEERING_TEST_NETNS=1")
	out, err := cmd.CombinedOutput()
	t.Logf("in a new network namespace:\n%s", out)
	if err != nil || !bytes.Contains(out, []byte("--- PASS: "+name)) {
		t.Fatalf("%s in a new network namespace: %v", name, err)
	}
}

// mptcpListener opens a Multipath TCP listener with SO_REUSEPORT on addr,
// or skips the test when the kernel has no MPTCP.
func mptcpListener(t *testing.T, addr string) *net.TCPListener {
	t.Helper()
	var lc net.ListenConfig
	lc.SetMultipathTCP(true)
	lc.Control = func(network, address string, rc syscall.RawConn) error {
		var serr error
		rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) })
		return serr
	}
	l, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	tl := l.(*net.TCPListener)
	rc, err := tl.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	proto := 0
	rc.Control(func(fd uintptr) { proto, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL) })
	if proto != unix.IPPROTO_MPTCP {
		t.Skip("the kernel opened a plain TCP socket: no Multipath TCP here (net.mptcp.enabled=0?)")
	}
	return tl
}

func TestMPTCPRefused(t *testing.T) {
	needBPF(t)
	l := mptcpListener(t, "127.0.0.1:0")
	addr := l.Addr().(*net.TCPAddr).AddrPort()
	s, err := New(Options{Addr: addr})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	rc, _ := l.SyscallConn()
	var aerr error
	rc.Control(func(fd uintptr) { aerr = s.AddFD(0, int(fd)) })
	if !errors.Is(aerr, ErrMPTCP) || !strings.Contains(aerr.Error(), "GODEBUG=multipathtcp=0") {
		t.Errorf("AddFD(MPTCP listener) = %v, want ErrMPTCP naming GODEBUG=multipathtcp=0", aerr)
	}
	// Found through the process too: this test process holds it.
	err = s.Add(0, os.Getpid())
	if !errors.Is(err, ErrMPTCP) {
		t.Errorf("Add(0, own pid) with an MPTCP listener = %v, want ErrMPTCP", err)
	}
	t.Logf("error: %v", err)
	if got := s.Slots(); len(got) != 0 {
		t.Errorf("Slots() = %v after refusals, want none", got)
	}
}

// child starts the test binary as a listener on addr and waits until it
// listens; with a prefix (such as setpriv ... --), through it.
func child(t *testing.T, addr netip.AddrPort, prefix ...string) *exec.Cmd {
	t.Helper()
	args := append(prefix, os.Args[0], "-test.run=^$")
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = append(os.Environ(), "STEERING_TEST_HELPER=listen", "STEERING_TEST_ADDR="+addr.String())
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
		testutil.Wait(cmd, 5*time.Second)
	})
	line := make(chan string, 1)
	go func() {
		b := make([]byte, 64)
		n, _ := stdout.Read(b)
		line <- string(b[:n])
	}()
	select {
	case l := <-line:
		if !strings.HasPrefix(l, "ready") {
			t.Fatalf("listener child: %q", l)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("listener child not ready after 10s")
	}
	return cmd
}

// socketInodes returns the inodes of this process's socket descriptors.
func socketInodes(t *testing.T) map[uint64]bool {
	fds, err := socketFDs(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[uint64]bool)
	for _, f := range fds {
		out[f.inode] = true
	}
	return out
}

// TestAddPID: the master takes each worker's listening socket with
// pidfd_getfd, keeps no duplicate, and steers over them in turn.
func TestAddPID(t *testing.T) {
	needBPF(t)
	// Reserve a free port, then let the children listen on it.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().(*net.TCPAddr).AddrPort()
	l.Close()
	c1, c2 := child(t, addr), child(t, addr)
	s, err := New(Options{Addr: addr})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	mine := socketInodes(t)
	if err := s.Add(0, c1.Process.Pid); err != nil {
		t.Fatal(err)
	}
	if err := s.Add(1, c2.Process.Pid); err != nil {
		t.Fatal(err)
	}
	if err := s.Add(1, c2.Process.Pid); err != nil {
		t.Errorf("Add of the socket already at the slot: %v, want nil", err)
	}
	err = s.Add(2, c2.Process.Pid)
	if err == nil || !strings.Contains(err.Error(), "already at slot 1") {
		t.Errorf("Add of a socket that is at slot 1 to slot 2: %v, want an error naming slot 1", err)
	}
	for ino := range socketInodes(t) {
		if !mine[ino] {
			t.Errorf("the master kept a socket descriptor (inode %d) after Add", ino)
		}
	}
	for range 10 {
		c, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	want := map[int]uint64{0: 5, 1: 5}
	if got := mustCounts(t, s); !mapsEqual(got, want) {
		t.Errorf("Counts() = %v, want %v", got, want)
	}
	// A process with no listener on the address.
	sleeper := exec.Command("sleep", "30")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	err = s.Add(3, sleeper.Process.Pid)
	sleeper.Process.Kill()
	sleeper.Wait()
	if !errors.Is(err, ErrNoListener) {
		t.Errorf("Add(pid without a listener) = %v, want ErrNoListener", err)
	}
	t.Logf("no listener: %v", err)
	// A process that is gone.
	c1.Process.Kill()
	c1.Wait()
	err = s.Add(4, c1.Process.Pid)
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Add(gone pid) = %v, want os.ErrNotExist", err)
	}
}

// TestCheckWithoutCapBPF runs Check in a copy of the test binary without
// CAP_BPF and CAP_SYS_ADMIN.
func TestCheckWithoutCapBPF(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root, to drop capabilities from")
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Skip("setpriv not found")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, setpriv, "--inh-caps=-bpf,-sys_admin", "--bounding-set=-bpf,-sys_admin",
		"--", os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "STEERING_TEST_HELPER=check")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	t.Logf("%s", bytes.TrimSpace(out))
	if !bytes.Contains(out, []byte("check: ")) || bytes.Contains(out, []byte("check: ok")) || !bytes.Contains(out, []byte("CAP_BPF")) {
		t.Errorf("Check() without CAP_BPF said %q, want an error naming CAP_BPF", out)
	}
}

// TestFetchAddEncoding: the ticket counter's fetch-and-add must be encoded
// with BPF_FETCH (cilium/ebpf v0.22.0's asm helper leaves it out), else
// every connection goes to one slot. Checked in the bytes, then in the
// kernel with a socket filter that returns the fetched value.
func TestFetchAddEncoding(t *testing.T) {
	var buf bytes.Buffer
	if _, err := fetchAdd(asm.R0, asm.R1, 0).Marshal(&buf, nativeEndian()); err != nil {
		t.Fatal(err)
	}
	b := buf.Bytes()
	if b[0] != 0xdb || nativeEndian().Uint32(b[4:]) != 0x01 {
		t.Errorf("fetchAdd encodes as % x, want opcode 0xdb (BPF_STX|BPF_ATOMIC|BPF_DW) and imm 0x01 (BPF_ADD|BPF_FETCH)", b)
	}
	buf.Reset()
	asm.FetchAdd.Mem(asm.R0, asm.R1, asm.DWord, 0).Marshal(&buf, nativeEndian())
	t.Logf("cilium/ebpf's own asm.FetchAdd.Mem encodes as % x (imm %#x)", buf.Bytes(), nativeEndian().Uint32(buf.Bytes()[4:]))

	needBPF(t)
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:    ebpf.SocketFilter,
		License: "Dual MIT/GPL",
		Instructions: asm.Instructions{
			asm.StoreImm(asm.RFP, -4, 0, asm.Word),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -4),
			asm.LoadMapPtr(asm.R1, m.FD()),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "out"),
			asm.Mov.Imm(asm.R1, 1),
			fetchAdd(asm.R0, asm.R1, 0),
			asm.Mov.Reg(asm.R0, asm.R1),
			asm.Return().WithSymbol("out"),
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	var got []uint32
	for range 3 {
		ret, _, err := prog.Test(make([]byte, 64))
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, ret)
	}
	if !slices.Equal(got, []uint32{0, 1, 2}) {
		t.Errorf("three fetch-and-adds of 1 returned %v, want [0 1 2]", got)
	}
}

// TestPinAdopt: with PinPath on a bpffs, a second Steering (a restarted
// master) adopts the maps and the sockets in them.
func TestPinAdopt(t *testing.T) {
	needBPF(t)
	dir := t.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, ""); err != nil {
		t.Skipf("cannot mount a bpffs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	pin := dir + "/shoal/test"

	g := newGroup(t, 2)
	s1 := steer(t, g, Options{PinPath: pin, MaxSlots: 8})
	if p, a := s1.Pinned(); !p || a {
		t.Fatalf("first Steering: Pinned() = %v, %v, want true, false", p, a)
	}
	g.dial(t, 4)
	if err := s1.Close(); err != nil {
		t.Fatal(err)
	}
	// Between masters, the program keeps steering over the pinned maps.
	g.dial(t, 4)
	if got := g.counts(); !slices.Equal(got, []int64{4, 4}) {
		t.Errorf("accepted %v with the first master gone, want [4 4]", got)
	}

	s2, err := New(Options{Addr: g.addr, PinPath: pin, MaxSlots: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if p, a := s2.Pinned(); !p || !a {
		t.Errorf("second Steering: Pinned() = %v, %v, want true, true", p, a)
	}
	if got := s2.Slots(); !slices.Equal(got, []int{0, 1}) {
		t.Errorf("adopted Slots() = %v, want [0 1]", got)
	}
	want := map[int]uint64{0: 4, 1: 4}
	if got := mustCounts(t, s2); !mapsEqual(got, want) {
		t.Errorf("adopted Counts() = %v, want %v", got, want)
	}
	// The sockets already in the map are accepted again at their slots
	// (no EBUSY), and attach the new program.
	for i := range g.listeners {
		g.fd(t, i, func(fd int) error { return s2.AddFD(i, fd) })
	}
	if err := s2.Remove(0); err != nil {
		t.Fatal(err)
	}
	g.dial(t, 6)
	if got := g.counts(); !slices.Equal(got, []int64{4, 10}) {
		t.Errorf("accepted %v after the new master removed slot 0, want [4 10]", got)
	}
	if err := s2.Unpin(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(pin); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after Unpin, %s: %v, want it gone", pin, err)
	}

	// Not a bpffs: no pinning, no error.
	s3, err := New(Options{Addr: g.addr, PinPath: t.TempDir() + "/pins"})
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	if p, _ := s3.Pinned(); p {
		t.Errorf("PinPath on a tmpfs: Pinned() = true, want false")
	}
}

func TestOptionErrors(t *testing.T) {
	for _, o := range []Options{
		{},
		{Addr: netip.MustParseAddrPort("127.0.0.1:0")},
		{Addr: netip.MustParseAddrPort("127.0.0.1:80"), MaxSlots: -1},
		{Addr: netip.MustParseAddrPort("127.0.0.1:80"), MaxSlots: 5000},
	} {
		if s, err := New(o); err == nil {
			s.Close()
			t.Errorf("New(%+v) succeeded, want an error", o)
		}
	}
	needBPF(t)
	s, err := New(Options{Addr: netip.MustParseAddrPort("127.0.0.1:80"), MaxSlots: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, err := range []error{s.AddFD(2, 0), s.Remove(-1), s.Skip(7, true)} {
		if err == nil || !strings.Contains(err.Error(), "out of range") {
			t.Errorf("slot out of range: %v", err)
		}
	}
	// A descriptor that is not a socket.
	if err := s.AddFD(0, 0); !errors.Is(err, ErrNoListener) {
		t.Errorf("AddFD(stdin) = %v, want ErrNoListener", err)
	}
}

// nativeEndian is binary.LittleEndian or binary.BigEndian, as this machine.
func nativeEndian() binary.ByteOrder {
	if binary.NativeEndian.Uint16([]byte{1, 0}) == 1 {
		return binary.LittleEndian
	}
	return binary.BigEndian
}

// TestReplaceCycles replaces workers one after another under load, as a
// reload does: each slot is taken out of the selection 50 ms before its
// (naive, non-draining) listener closes, and its replacement is put in at
// once. With net.ipv4.tcp_migrate_req=0 (a new network namespace), no
// client connection may fail.
func TestReplaceCycles(t *testing.T) {
	needBPF(t)
	if os.Getenv("STEERING_TEST_NETNS") == "" {
		inNetNS(t, "TestReplaceCycles")
		return
	}
	const slots, cycles = 4, 40
	var lc reuseport.ListenConfig
	var wg sync.WaitGroup
	serve := func(l net.Listener) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				c.Write([]byte("ok"))
				c.Close()
			}
		}()
	}
	listen := func(addr string) *net.TCPListener {
		l, err := lc.Listen(context.Background(), "tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		serve(l)
		return l.(*net.TCPListener)
	}
	ls := []*net.TCPListener{listen("127.0.0.1:0")}
	addr := ls[0].Addr().(*net.TCPAddr).AddrPort()
	for len(ls) < slots {
		ls = append(ls, listen(addr.String()))
	}
	defer func() {
		for _, l := range ls {
			l.Close()
		}
		wg.Wait()
	}()
	s, err := New(Options{Addr: addr})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	add := func(slot int) {
		rc, _ := ls[slot].SyscallConn()
		var aerr error
		rc.Control(func(fd uintptr) { aerr = s.AddFD(slot, int(fd)) })
		if aerr != nil {
			t.Fatal(aerr)
		}
	}
	for i := range ls {
		add(i)
	}

	var ok, failed atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var clients sync.WaitGroup
	for range 2 {
		clients.Add(1)
		go func() {
			defer clients.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				c, err := net.DialTimeout("tcp", addr.String(), 2*time.Second)
				if err == nil {
					c.SetReadDeadline(time.Now().Add(2 * time.Second))
					var b []byte
					b, err = io.ReadAll(c)
					c.Close()
					if err == nil && string(b) != "ok" {
						err = fmt.Errorf("read %q, want \"ok\"", b)
					}
				}
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
				} else {
					ok.Add(1)
				}
			}
		}()
	}
	for i := range cycles {
		slot := i % slots
		if err := s.Remove(slot); err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond)
		ls[slot].Close() // no drain: whatever waits in its queue is left to the kernel
		ls[slot] = listen(addr.String())
		add(slot)
	}
	close(stop)
	clients.Wait()
	t.Logf("%d cycles: %d connections served, %d failed; steered per slot %v", cycles, ok.Load(), failed.Load(), mustCounts(t, s))
	if failed.Load() != 0 {
		t.Errorf("%d of %d connections failed across %d replacements; first: %v", failed.Load(), ok.Load()+failed.Load(), cycles, firstErr.Load())
	}
}

// BenchmarkConnect measures sequential connections per second to 4
// listeners through the program and without it (the kernel's hash),
// interleaved so that both see the same machine load, and reports the
// ratio.
func BenchmarkConnect(b *testing.B) {
	needBPF(b)
	hash := newGroup(b, 4)
	steered := newGroup(b, 4)
	steer(b, steered, Options{})
	d := net.Dialer{Timeout: 5 * time.Second}
	var th, ts time.Duration
	dial := func(g *group) time.Duration {
		start := time.Now()
		c, err := d.Dial("tcp", g.addr.String())
		if err != nil {
			b.Fatal(err)
		}
		c.Close()
		return time.Since(start)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if i%2 == 0 {
			th += dial(hash)
			ts += dial(steered)
		} else {
			ts += dial(steered)
			th += dial(hash)
		}
	}
	b.StopTimer()
	hps := float64(b.N) / th.Seconds()
	sps := float64(b.N) / ts.Seconds()
	b.ReportMetric(hps, "hash-conn/s")
	b.ReportMetric(sps, "steered-conn/s")
	b.ReportMetric(sps/hps, "steered/hash")
	b.Logf("N=%d: %.0f connections/s with the kernel's hash, %.0f through the program: ratio %.3f", b.N, hps, sps, sps/hps)
}

// TestRestartWithoutPins: a master that restarts without pinned maps
// (no bpffs) loads a fresh program; the sockets still in the earlier
// program's map join the new one (the earlier program is replaced by the
// first AddFD and freed), and connections are steered again.
func TestRestartWithoutPins(t *testing.T) {
	needBPF(t)
	g := newGroup(t, 2)
	s1 := steer(t, g, Options{})
	g.dial(t, 4)
	s1.Close()
	start := time.Now()
	s2 := steer(t, g, Options{})
	t.Logf("the new master put both sockets in its map in %v", time.Since(start).Round(time.Microsecond))
	g.dial(t, 10)
	if got := g.counts(); !slices.Equal(got, []int64{7, 7}) {
		t.Errorf("accepted %v, want [7 7]", got)
	}
	want := map[int]uint64{0: 5, 1: 5}
	if got := mustCounts(t, s2); !mapsEqual(got, want) {
		t.Errorf("new master's Counts() = %v, want %v", got, want)
	}
}

// TestIPv6: a group on ::1 is steered like one on 127.0.0.1, and a socket
// of another group (another family or bind address on the same port) is
// refused.
func TestIPv6(t *testing.T) {
	needBPF(t)
	g := newGroupOn(t, "::1", 3)
	s := steer(t, g, Options{})
	g.dial(t, 9)
	if got := g.counts(); !slices.Equal(got, []int64{3, 3, 3}) {
		t.Errorf("accepted per listener on ::1 = %v, want [3 3 3]", got)
	}
	var lc reuseport.ListenConfig
	for _, addr := range []string{
		netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), g.addr.Port()).String(),
		netip.AddrPortFrom(netip.IPv6Unspecified(), g.addr.Port()).String(),
	} {
		l, err := lc.Listen(context.Background(), "tcp", addr)
		if err != nil {
			t.Logf("listen %s: %v", addr, err)
			continue
		}
		rc, _ := l.(*net.TCPListener).SyscallConn()
		var aerr error
		rc.Control(func(fd uintptr) { aerr = s.AddFD(3, int(fd)) })
		l.Close()
		if !errors.Is(aerr, ErrNoListener) || !strings.Contains(aerr.Error(), "not "+g.addr.String()) {
			t.Errorf("AddFD(listener on %s) to the group on %s = %v, want ErrNoListener naming both", addr, g.addr, aerr)
		}
	}
}

// TestNotReusePort: a listener without SO_REUSEPORT is in no group and is
// refused with a clear error.
func TestNotReusePort(t *testing.T) {
	needBPF(t)
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	l, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	s, err := New(Options{Addr: l.Addr().(*net.TCPAddr).AddrPort()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	rc, _ := l.(*net.TCPListener).SyscallConn()
	var aerr error
	rc.Control(func(fd uintptr) { aerr = s.AddFD(0, int(fd)) })
	if aerr == nil || !strings.Contains(aerr.Error(), "SO_REUSEPORT") {
		t.Errorf("AddFD(listener without SO_REUSEPORT) = %v, want an error naming SO_REUSEPORT", aerr)
	}
}

// TestAddOtherUser: a master with CAP_SYS_PTRACE (root) takes the socket of
// a worker that runs as nobody; without CAP_SYS_PTRACE, Add says that it is
// what is missing.
func TestAddOtherUser(t *testing.T) {
	needBPF(t)
	setpriv, err := exec.LookPath("setpriv")
	if err != nil || os.Geteuid() != 0 {
		t.Skip("needs root and setpriv")
	}
	if _, err := os.Stat(os.Args[0]); err != nil {
		t.Skip(err)
	}
	// nobody must be able to run the test binary.
	if fi, err := os.Stat(os.Args[0]); err != nil || fi.Mode()&0o001 == 0 {
		t.Skip("the test binary is not executable by others")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().(*net.TCPAddr).AddrPort()
	l.Close()
	worker := child(t, addr, setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--")

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, setpriv, "--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace",
		"--", os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "STEERING_TEST_HELPER=add",
		"STEERING_TEST_ADDR="+addr.String(), "STEERING_TEST_PID="+strconv.Itoa(worker.Process.Pid))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	t.Logf("without CAP_SYS_PTRACE: %s", bytes.TrimSpace(out))
	if !bytes.Contains(out, []byte("add: ")) || !bytes.Contains(out, []byte("CAP_SYS_PTRACE")) {
		t.Errorf("Add of another user's socket without CAP_SYS_PTRACE said %q, want an error naming CAP_SYS_PTRACE", out)
	}

	s, err := New(Options{Addr: addr})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Add(0, worker.Process.Pid); err != nil {
		t.Fatalf("root: Add of nobody's socket: %v", err)
	}
	for range 3 {
		c, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	if got := mustCounts(t, s); got[0] != 3 {
		t.Errorf("Counts() = %v, want 3 at slot 0", got)
	}
}
