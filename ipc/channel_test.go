package ipc

import (
	"bytes"
	"errors"
	"io"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/internal/testutil"
)

// waitFor fails t unless ch is closed within d.
func waitFor(t *testing.T, ch <-chan struct{}, d time.Duration, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(d):
		t.Fatalf("%s: not within %v", what, d)
	}
}

func mustPair(t *testing.T) (master, worker *os.File) {
	t.Helper()
	master, worker, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	return master, worker
}

func mustEncode(t testing.TB, v any) []byte {
	t.Helper()
	b, err := Encode(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// recorder collects what a Channel's callbacks see.
type recorder struct {
	msgs chan Message
	mu   sync.Mutex
	errs []error
}

func newRecorder() *recorder { return &recorder{msgs: make(chan Message, 100)} }

func (r *recorder) options() ChannelOptions {
	return ChannelOptions{
		OnMessage: func(m Message) { r.msgs <- m.clone() },
		OnError: func(err error) {
			r.mu.Lock()
			r.errs = append(r.errs, err)
			r.mu.Unlock()
		},
	}
}

func (r *recorder) errors() []error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]error(nil), r.errs...)
}

func (r *recorder) next(t *testing.T) Message {
	t.Helper()
	select {
	case m := <-r.msgs:
		return m
	case <-time.After(5 * time.Second):
		t.Fatal("no message within 5s")
		return Message{}
	}
}

func TestPairCloexec(t *testing.T) {
	master, worker := mustPair(t)
	defer master.Close()
	defer worker.Close()
	for _, f := range []*os.File{master, worker} {
		if err := checkSocket(int(f.Fd())); err != nil {
			t.Errorf("%s: %v", f.Name(), err)
		}
		flags, err := unix.FcntlInt(f.Fd(), unix.F_GETFD, 0)
		if err != nil || flags&unix.FD_CLOEXEC == 0 {
			t.Errorf("%s: not close-on-exec (flags %#x, %v)", f.Name(), flags, err)
		}
	}
}

func TestChannelBothWays(t *testing.T) {
	testutil.LeakCheck(t)
	master, worker := mustPair(t)
	rec := newRecorder()
	ch := NewChannel(master, rec.options())
	defer ch.Close()
	w := NewConn(worker)
	defer w.Close()
	got := make(chan Message, 10)
	w.Handle(func(m Message) { got <- m })

	for _, v := range []any{
		map[string]any{"cmd": CmdReady},
		map[string]any{"cmd": "NODE_HANDLE", "type": "net.Socket"}, // Node.js's own: not delivered
		map[string]any{"cmd": CmdRequests, "n": 5},
		map[string]any{"cmd": CmdSend, "to": 2, "msg": map[string]any{"hello": "world"}},
		"an application message",
	} {
		if err := w.Send(v); err != nil {
			t.Fatal(err)
		}
	}
	if m := rec.next(t); m.Cmd != CmdReady {
		t.Errorf("first message %+v", m)
	}
	if m := rec.next(t); m.Cmd != CmdRequests || m.N != 5 {
		t.Errorf("second message %+v", m)
	}
	if m := rec.next(t); m.Cmd != CmdSend || m.To != "2" || string(m.Msg) != `{"hello":"world"}` {
		t.Errorf("third message %+v", m)
	}
	if m := rec.next(t); m.Cmd != "" || string(m.Raw) != `"an application message"` {
		t.Errorf("fourth message %+v", m)
	}

	for _, v := range []any{
		map[string]any{"cmd": CmdHeartbeat},
		map[string]any{"cmd": "NODE_CLUSTER"},
		[]int{1, 2, 3},
	} {
		if ch.Send(mustEncode(t, v)) != nil {
			t.Fatal("Send dropped a frame on an idle channel")
		}
	}
	for _, want := range []string{frameHeartbeat, `[1,2,3]`} {
		select {
		case m := <-got:
			if string(m.Raw) != want {
				t.Errorf("worker got %s, want %s", m.Raw, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("worker did not get %s", want)
		}
	}
	if err := ch.Send([]byte(`{"no":"newline"}`)); !isDrop(err, DropInvalidFrame) {
		t.Errorf("Send of a frame without a newline: %v, want a DropError %s", err, DropInvalidFrame)
	}

	s := ch.Stats()
	if s.MessagesIn != 5 || s.Dropped != 1 || s.Drops[DropInvalidFrame] != 1 || s.BytesIn == 0 {
		t.Errorf("stats %+v", s)
	}
	for _, r := range reasons {
		if n, ok := s.Errors[r]; !ok || n != 0 {
			t.Errorf("Errors[%s] = %d, %v", r, n, ok)
		}
	}
	if errs := rec.errors(); len(errs) != 0 {
		t.Errorf("OnError: %v", errs)
	}

	if err := ch.Close(); err != nil {
		t.Fatal(err)
	}
	if err := ch.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	waitFor(t, ch.Done(), time.Second, "channel Done after Close")
	if s := ch.Stats(); s.MessagesOut != 3 || s.BytesOut != uint64(len(frameHeartbeat)+len("{\"cmd\":\"NODE_CLUSTER\"}")+len("[1,2,3]")+3) {
		t.Errorf("stats after Close %+v", s)
	}
	// The worker sees its master go.
	waitFor(t, w.Done(), 5*time.Second, "worker Done after the master closed")
	if err := ch.Send(mustEncode(t, "late")); !isDrop(err, DropClosed) || !strings.Contains(err.Error(), "the worker is gone") {
		t.Errorf("Send after Close: %v, want a DropError %s", err, DropClosed)
	}
}

func TestChannelBadFrames(t *testing.T) {
	testutil.LeakCheck(t)
	master, worker := mustPair(t)
	defer worker.Close()
	rec := newRecorder()
	opts := rec.options()
	opts.MaxMessage = 64
	ch := NewChannel(master, opts)
	defer ch.Close()

	input := "not json\n" +
		"{\"a\":\"\xff\"}\n" +
		strings.Repeat("x", 100<<10) + "\n" +
		`{"cmd":"shoal:requests","n":-1}` + "\n" +
		`{"cmd":"shoal:ready"}` + "\n"
	if _, err := worker.Write([]byte(input)); err != nil {
		t.Fatal(err)
	}
	if m := rec.next(t); m.Cmd != CmdReady {
		t.Fatalf("got %+v, want the good frame after the bad ones", m)
	}
	errs := rec.errors()
	var reasons []string
	for _, err := range errs {
		var fe *FrameError
		if !errors.As(err, &fe) {
			t.Fatalf("OnError(%v): not a FrameError", err)
		}
		reasons = append(reasons, fe.Reason)
	}
	want := []string{ReasonInvalidJSON, ReasonInvalidUTF8, ReasonTooLong, ReasonBadField}
	if strings.Join(reasons, ",") != strings.Join(want, ",") {
		t.Errorf("OnError reasons %v, want %v", reasons, want)
	}
	s := ch.Stats()
	for _, r := range want {
		if s.Errors[r] != 1 {
			t.Errorf("Stats.Errors[%s] = %d, want 1", r, s.Errors[r])
		}
	}
	if s.MessagesIn != 1 || s.BytesIn != uint64(len(input)) {
		t.Errorf("stats %+v, want 1 message in, %d bytes", s, len(input))
	}

	// A worker that dies in the middle of a line ends the channel, and that
	// is reported.
	worker.Write([]byte(`{"cmd":`))
	worker.Close()
	waitFor(t, ch.Done(), 5*time.Second, "Done after the worker closed")
	errs = rec.errors()
	if last := errs[len(errs)-1]; !errors.Is(last, io.ErrUnexpectedEOF) || !strings.HasPrefix(last.Error(), "ipc: read from worker channel: ") {
		t.Errorf("last OnError %v, want the unexpected end", last)
	}
}

func TestChannelPeerClose(t *testing.T) {
	testutil.LeakCheck(t)
	master, worker := mustPair(t)
	rec := newRecorder()
	ch := NewChannel(master, rec.options())
	defer ch.Close()
	worker.Write([]byte(frameReady + "\n"))
	worker.Close()
	waitFor(t, ch.Done(), 5*time.Second, "Done after the worker closed")
	if m := rec.next(t); m.Cmd != CmdReady {
		t.Errorf("got %+v", m)
	}
	if errs := rec.errors(); len(errs) != 0 {
		t.Errorf("a clean end reported %v", errs)
	}
	// Frames to a gone worker are dropped and counted, never blocking.
	sent := 0
	for i := 0; i < 100; i++ {
		if ch.Send(mustEncode(t, i)) == nil {
			sent++
		}
	}
	if err := ch.Close(); err != nil {
		t.Fatal(err)
	}
	if s := ch.Stats(); s.MessagesOut != 0 || s.Dropped != 100 {
		t.Errorf("stats %+v, want 0 out and 100 dropped (%d were queued)", s, sent)
	}
}

func TestChannelWorkerNotReading(t *testing.T) {
	testutil.LeakCheck(t)
	master, worker := mustPair(t)
	defer worker.Close() // open, never read
	ch := NewChannel(master, ChannelOptions{QueueLen: 16})
	frame := mustEncode(t, strings.Repeat("a", 60<<10))

	var total, refused int
	var slowest time.Duration
	for total = 0; total < 10000 && refused < 100; total++ {
		start := time.Now()
		if err := ch.Send(frame); err != nil {
			if !isDrop(err, DropQueueFull) {
				t.Fatalf("Send: %v, want a DropError %s", err, DropQueueFull)
			}
			refused++
		}
		slowest = max(slowest, time.Since(start))
	}
	if refused == 0 {
		t.Fatalf("%d frames of %d bytes to a worker that never reads were all accepted", total, len(frame))
	}
	if slowest > 100*time.Millisecond {
		t.Errorf("Send took %v", slowest)
	}
	s := ch.Stats()
	t.Logf("%d sent, %d refused, slowest Send %v; %d written before the socket filled", total, refused, slowest, s.MessagesOut)
	if s.Dropped != uint64(refused) {
		t.Errorf("Dropped = %d, want %d", s.Dropped, refused)
	}

	start := time.Now()
	closed := make(chan struct{})
	go func() {
		ch.Close()
		close(closed)
	}()
	waitFor(t, closed, 2*time.Second, "Close with the writer blocked")
	t.Logf("Close took %v", time.Since(start))
	s = ch.Stats()
	if s.MessagesOut+s.Dropped != uint64(total) {
		t.Errorf("%d written + %d dropped != %d sent", s.MessagesOut, s.Dropped, total)
	}
}

// isDrop reports whether err is a *DropError for reason.
func isDrop(err error, reason string) bool {
	var de *DropError
	return errors.As(err, &de) && de.Reason == reason
}

func TestChannelNotASocket(t *testing.T) {
	testutil.LeakCheck(t)
	f, err := os.CreateTemp(t.TempDir(), "notasocket")
	if err != nil {
		t.Fatal(err)
	}
	rec := newRecorder()
	ch := NewChannel(f, rec.options())
	waitFor(t, ch.Done(), time.Second, "Done")
	if ch.Send(mustEncode(t, 1)) == nil {
		t.Log("queued; the writer drops it")
	}
	if err := ch.Close(); err != nil {
		t.Fatal(err)
	}
	if errs := rec.errors(); len(errs) != 1 || !strings.HasPrefix(errs[0].Error(), "ipc: open worker channel ") {
		t.Errorf("OnError: %v", errs)
	}
	if s := ch.Stats(); s.Dropped != 1 {
		t.Errorf("stats %+v", s)
	}
}

func TestChannelSameFrameToMany(t *testing.T) {
	testutil.LeakCheck(t)
	frame := mustEncode(t, map[string]string{"cmd": "broadcast"})
	var conns []*Conn
	var chans []*Channel
	for range 3 {
		master, worker := mustPair(t)
		chans = append(chans, NewChannel(master, ChannelOptions{}))
		conns = append(conns, NewConn(worker))
	}
	for _, ch := range chans {
		if ch.Send(frame) != nil {
			t.Fatal("dropped")
		}
	}
	for _, c := range conns {
		select {
		case m := <-c.Messages():
			if !bytes.Equal(m.Raw, frame[:len(frame)-1]) || m.Cmd != "broadcast" {
				t.Errorf("got %+v", m)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("no message")
		}
	}
	for i := range chans {
		chans[i].Close()
		conns[i].Close()
		<-conns[i].Done()
	}
}

// A worker cannot make the master's request count go down: twenty reports
// of 999999999999999999 requests once wrapped the slot's counter. Reports
// over MaxRequestsPerMessage are skipped and counted as bad_field; the good
// reports around them all arrive.
func TestChannelRequestsCap(t *testing.T) {
	testutil.LeakCheck(t)
	master, worker := mustPair(t)
	defer worker.Close()
	var sum, bad atomic.Int64
	done := make(chan struct{})
	ch := NewChannel(master, ChannelOptions{
		OnMessage: func(m Message) {
			sum.Add(m.N)
			if m.Cmd == CmdReady {
				close(done)
			}
		},
		OnError: func(err error) {
			var fe *FrameError
			if errors.As(err, &fe) && fe.Reason == ReasonBadField && strings.Contains(fe.Error(), "over 1000000") {
				bad.Add(1)
			}
		},
	})
	defer ch.Close()
	var in bytes.Buffer
	for range 20 {
		in.WriteString(`{"cmd":"shoal:requests","n":999999999999999999}` + "\n")
		in.WriteString(`{"cmd":"shoal:requests","n":1000000}` + "\n")
		in.WriteString(`{"n":1000001,"cmd":"shoal:requests"}` + "\n")
	}
	in.WriteString(frameReady + "\n")
	if _, err := worker.Write(in.Bytes()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, done, 5*time.Second, "the last message")
	if got, want := sum.Load(), int64(20*MaxRequestsPerMessage); got != want {
		t.Errorf("requests counted %d, want %d", got, want)
	}
	s := ch.Stats()
	if s.Errors[ReasonBadField] != 40 || bad.Load() != 40 || s.MessagesIn != 21 {
		t.Errorf("Errors[bad_field] = %d, OnError saw %d over the cap, %d messages in; want 40, 40, 21", s.Errors[ReasonBadField], bad.Load(), s.MessagesIn)
	}
}
