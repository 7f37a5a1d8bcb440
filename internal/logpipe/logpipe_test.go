package logpipe

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// lockedBuffer is a master stream that tests can read while it is written.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// waitDone waits for p to reach EOF, at most 10 seconds.
func waitDone(t *testing.T, p *Pipe) {
	t.Helper()
	select {
	case <-p.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the pipe did not reach EOF within 10s")
	}
	p.Close()
}

// childStdout returns a copy of p's stdout write end, for the test to
// write as the worker would: Start closes the master's.
func childStdout(t *testing.T, p *Pipe) *os.File {
	t.Helper()
	w, _ := p.Files()
	fd, err := unix.FcntlInt(w.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return os.NewFile(uintptr(fd), "child stdout")
}

// run starts a real process with p's files as its stdout and stderr, and
// reaps it when the test ends.
func run(t *testing.T, p *Pipe, script string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("/bin/sh", "-c", script)
	cmd.Stdout, cmd.Stderr = p.Files()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p.Start(cmd.Process.Pid)
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

func TestPrefixLabelsEveryLineOfARealProcess(t *testing.T) {
	var stdout, stderr lockedBuffer
	o := New(Options{Stdout: &stdout, Stderr: &stderr})
	p, err := o.Open(3)
	if err != nil {
		t.Fatal(err)
	}
	cmd := run(t, p, `printf 'one\ntwo\n'; printf 'oops\n' >&2; printf 'no newline'`)
	waitDone(t, p)
	pid := cmd.Process.Pid
	if want := fmt.Sprintf("w3 %d | one\nw3 %d | two\nw3 %d | no newline\n", pid, pid, pid); stdout.String() != want {
		t.Errorf("stdout:\n%q\nwant\n%q", stdout.String(), want)
	}
	if want := fmt.Sprintf("w3 %d | oops\n", pid); stderr.String() != want {
		t.Errorf("stderr:\n%q\nwant\n%q", stderr.String(), want)
	}
}

func TestJSONRecords(t *testing.T) {
	var stdout, stderr lockedBuffer
	outLog := zerolog.New(&stdout).Level(zerolog.ErrorLevel) // the level does not filter workers' lines
	errLog := zerolog.New(&stderr)
	o := New(Options{Format: JSON, StdoutLog: &outLog, StderrLog: &errLog})
	p, err := o.Open(2)
	if err != nil {
		t.Fatal(err)
	}
	long := strings.Repeat("x", MaxLine+10)
	cmd := run(t, p, `printf 'hello "you"\n'; printf 'bad\n' >&2; printf '%s\n' `+long)
	waitDone(t, p)
	type record struct {
		Level     string
		Worker    int
		PID       int
		Stream    string
		Message   string
		Continued bool
	}
	parse := func(s string) []record {
		var rs []record
		for _, line := range strings.Split(strings.TrimSuffix(s, "\n"), "\n") {
			var r record
			if err := json.Unmarshal([]byte(line), &r); err != nil {
				t.Fatalf("not a JSON record: %q: %v", line, err)
			}
			rs = append(rs, r)
		}
		return rs
	}
	pid := cmd.Process.Pid
	want := []record{
		{"info", 2, pid, "stdout", `hello "you"`, false},
		{"info", 2, pid, "stdout", long[:MaxLine], false},
		{"info", 2, pid, "stdout", long[MaxLine:], true},
	}
	if got := parse(stdout.String()); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("stdout records:\n%.300v\nwant\n%.300v", got, want)
	}
	if got, want := parse(stderr.String()), []record{{"info", 2, pid, "stderr", "bad", false}}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("stderr records: %v, want %v", got, want)
	}
}

// TestLongLines: a line of MaxLine bytes is whole; a longer one is cut into
// marked pieces, all of it written.
func TestLongLines(t *testing.T) {
	var stdout lockedBuffer
	o := New(Options{Stdout: &stdout})
	p, err := o.Open(1)
	if err != nil {
		t.Fatal(err)
	}
	w := childStdout(t, p)
	p.Start(42)
	exact := strings.Repeat("a", MaxLine)
	long := strings.Repeat("b", 2*MaxLine+5)
	// A 3-byte character that straddles the cut stays whole.
	utf := strings.Repeat("c", MaxLine-1) + "€" + "d"
	go func() {
		fmt.Fprintf(w, "%s\n%s\n%s\nend", exact, long, utf)
		w.Close()
	}()
	waitDone(t, p)
	want := "w1 42 | " + exact + "\n" +
		"w1 42 | " + long[:MaxLine] + "\n" + "w1 42 + " + long[MaxLine:2*MaxLine] + "\n" + "w1 42 + bbbbb\n" +
		"w1 42 | " + strings.Repeat("c", MaxLine-1) + "\n" + "w1 42 + €d\n" +
		"w1 42 | end\n"
	if got := stdout.String(); got != want {
		t.Errorf("got %d bytes, want %d; lines: %q", len(got), len(want), shorten(got))
	}
}

func shorten(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if len(l) > 40 {
			l = fmt.Sprintf("%s...(%d bytes)", l[:20], len(l))
		}
		out = append(out, l)
	}
	return out
}

// TestConcurrentWorkersNeverMixWithinALine: many writers, lines of many
// lengths, one master stream: every line arrives whole, in order per
// worker.
func TestConcurrentWorkersNeverMixWithinALine(t *testing.T) {
	var stdout yieldingBuffer
	o := New(Options{Stdout: &stdout})
	const workers, lines = 4, 1000
	var pipes []*Pipe
	for i := 1; i <= workers; i++ {
		p, err := o.Open(i)
		if err != nil {
			t.Fatal(err)
		}
		w := childStdout(t, p)
		p.Start(1000 + i)
		pipes = append(pipes, p)
		go func(i int, w *os.File) {
			defer w.Close()
			for n := range lines {
				fmt.Fprintf(w, "%d:%d:%s\n", i, n, strings.Repeat("z", (n*37)%3000))
			}
		}(i, w)
	}
	for _, p := range pipes {
		waitDone(t, p)
	}
	next := map[int]int{}
	for _, line := range strings.Split(strings.TrimSuffix(stdout.String(), "\n"), "\n") {
		var slot, pid, i, n int
		var sep, rest string
		if _, err := fmt.Sscanf(line, "w%d %d %s %d:%d:%s", &slot, &pid, &sep, &i, &n, &rest); err != nil && !strings.HasSuffix(line, ":") {
			t.Fatalf("line %.80q: %v", line, err)
		}
		if slot != i || pid != 1000+i || sep != "|" || n != next[i] || len(rest) != (n*37)%3000 {
			t.Fatalf("line %.80q: want worker %d's line %d, whole", line, i, next[i])
		}
		next[i]++
	}
	for i := 1; i <= workers; i++ {
		if next[i] != lines {
			t.Errorf("worker %d: %d lines arrived, want %d", i, next[i], lines)
		}
	}
}

// yieldingBuffer lets other goroutines run before each write, so that
// writes not kept whole by a lock would mix.
type yieldingBuffer struct{ lockedBuffer }

func (b *yieldingBuffer) Write(p []byte) (int, error) {
	runtime.Gosched()
	return b.lockedBuffer.Write(p)
}

// blockingWriter is a master stream that takes nothing until released.
type blockingWriter struct {
	release chan struct{}
	lockedBuffer
}

func (b *blockingWriter) Write(p []byte) (int, error) {
	<-b.release
	return b.lockedBuffer.Write(p)
}

// TestSlowMasterStreamBlocksTheWorker: while the master's stream takes
// nothing, the worker's writes block once the pipe and one buffer are full;
// nothing is dropped once it drains.
func TestSlowMasterStreamBlocksTheWorker(t *testing.T) {
	stdout := &blockingWriter{release: make(chan struct{})}
	o := New(Options{Stdout: stdout})
	p, err := o.Open(1)
	if err != nil {
		t.Fatal(err)
	}
	w := childStdout(t, p)
	p.Start(7)
	var written atomic.Int64
	const total = 8 << 20
	line := strings.Repeat("y", 99) + "\n"
	go func() {
		defer w.Close()
		for written.Load() < total {
			n, err := w.WriteString(line)
			written.Add(int64(n))
			if err != nil {
				return
			}
		}
	}()
	time.Sleep(500 * time.Millisecond)
	held := written.Load()
	t.Logf("the worker could write %d bytes while the master's stream took none", held)
	if held > 1<<20 {
		t.Errorf("the worker wrote %d bytes while the master's stream was blocked: want back-pressure within a pipe and a buffer (<1 MiB)", held)
	}
	close(stdout.release)
	waitDone(t, p)
	if got, want := strings.Count(stdout.String(), "w1 7 | "+line), total/len(line)+1; got < want-1 || got > want {
		t.Errorf("%d lines arrived, want %d", got, want)
	}
}

// TestCloseWritesWhatThePipeHolds: a child of the worker still holds the
// pipe, so no EOF comes; Close writes what was written, ends, and the
// child then gets EPIPE.
func TestCloseWritesWhatThePipeHolds(t *testing.T) {
	var stdout lockedBuffer
	o := New(Options{Stdout: &stdout})
	p, err := o.Open(1)
	if err != nil {
		t.Fatal(err)
	}
	cmd := run(t, p, `printf 'first\nlast without newline'; exec sleep 30`)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) && !strings.Contains(stdout.String(), "first") {
		time.Sleep(10 * time.Millisecond)
	}
	start := time.Now()
	p.Close()
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("Close took %s with the writer still alive: want it bounded", took)
	}
	pid := cmd.Process.Pid
	if want := fmt.Sprintf("w1 %d | first\nw1 %d | last without newline\n", pid, pid); stdout.String() != want {
		t.Errorf("stdout %q, want %q", stdout.String(), want)
	}
}

func TestCloseBeforeStartClosesThePipes(t *testing.T) {
	o := New(Options{})
	p, err := o.Open(1)
	if err != nil {
		t.Fatal(err)
	}
	w, _ := p.Files()
	p.Close()
	if _, err := w.Write([]byte("x")); !errors.Is(err, os.ErrClosed) {
		t.Errorf("write to a closed pipe's child end: %v, want os.ErrClosed", err)
	}
	select {
	case <-p.Done():
	default:
		t.Error("Done is not closed after Close")
	}
}

type failingWriter struct{}

func (failingWriter) Write(p []byte) (int, error) { return 0, errors.New("disk full") }

// TestWriteErrorReportedOnceAndTheWorkerGoesOn: a master stream that fails
// is reported once, and the worker's output is still read, so it never
// blocks.
func TestWriteErrorReportedOnceAndTheWorkerGoesOn(t *testing.T) {
	var errs []error
	var mu sync.Mutex
	o := New(Options{Stdout: failingWriter{}, OnError: func(err error) { mu.Lock(); errs = append(errs, err); mu.Unlock() }})
	p, err := o.Open(1)
	if err != nil {
		t.Fatal(err)
	}
	cmd := run(t, p, `i=0; while [ $i -lt 20000 ]; do echo "line $i of some length"; i=$((i+1)); done`)
	waitDone(t, p)
	if err := cmd.Wait(); err != nil {
		t.Errorf("the worker: %v, want a clean exit", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), "disk full") || !strings.Contains(errs[0].Error(), "worker 1's stdout") {
		t.Errorf("errors %v, want one naming worker 1's stdout and the cause", errs)
	}
}

func TestCutAt(t *testing.T) {
	for _, c := range []struct {
		in   string
		want int
	}{
		{"abc", 3},
		{"ab€", 5},
		{"ab\xe2\x82", 2},
		{"ab\xe2", 2},
		{"ab\xf0\x9f\x98", 2},
		{"\xe2\x82", 2}, // nothing to keep before it: cut anyway
		{"ab\x82\x82", 4},
	} {
		if got := cutAt([]byte(c.in)); got != c.want {
			t.Errorf("cutAt(%q) = %d, want %d", c.in, got, c.want)
		}
	}
}

// A real process writes numbered lines, some longer than MaxLine and some
// cut across writes, while the master detaches its pipes and resumes them
// 30 times: every line arrives once, whole, in order, and the last one
// without a newline too.
func TestDetachResumeLosesNoLine(t *testing.T) {
	var stdout, stderr lockedBuffer
	o := New(Options{Stdout: &stdout, Stderr: &stderr})
	p, err := o.Open(2)
	if err != nil {
		t.Fatal(err)
	}
	const lines = 3000
	cmd := run(t, p, `i=0; while [ $i -lt `+fmt.Sprint(lines)+` ]; do printf 'line %d ' $i; if [ $((i % 500)) = 7 ]; then head -c 70000 /dev/zero | tr '\0' x; fi; printf 'end\n'; i=$((i+1)); done; printf 'last'`)
	pid := cmd.Process.Pid
	for range 30 {
		time.Sleep(2 * time.Millisecond)
		h, err := p.Detach()
		if err != nil {
			t.Fatal(err)
		}
		p.Close() // does nothing after Detach
		p = o.Resume(2, pid, h)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	waitDone(t, p)
	got := strings.Split(strings.TrimSuffix(stdout.String(), "\n"), "\n")
	prefix := fmt.Sprintf("w2 %d ", pid)
	n := 0
	var line strings.Builder
	for _, g := range got {
		rest, ok := strings.CutPrefix(g, prefix)
		if !ok || len(rest) < 2 {
			t.Fatalf("unlabelled line %.80q", g)
		}
		if rest[0] == '+' {
			line.WriteString(rest[2:])
		} else {
			if line.Len() > 0 {
				if want := fmt.Sprintf("line %d ", n); !strings.HasPrefix(line.String(), want) || !strings.HasSuffix(line.String(), "end") {
					t.Fatalf("line %d: %.60q...%q, want %q...end", n, line.String(), line.String()[max(0, line.Len()-10):], want)
				}
				n++
			}
			line.Reset()
			line.WriteString(rest[2:])
		}
	}
	if line.String() != "last" || n != lines {
		t.Fatalf("%d whole lines then %.40q; want %d then \"last\"", n, line.String(), lines)
	}
}
