package ipc

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/internal/testutil"
)

// A worker writes numbered frames, some cut across writes, while the master
// detaches its channel and resumes it three times: every frame arrives
// once, in order, and the resumed channels count on.
func TestDetachResumeLosesNoFrame(t *testing.T) {
	testutil.LeakCheck(t)
	master, worker := mustPair(t)
	const total = 20000
	var got []int
	var bad atomic.Int64
	var next atomic.Int64 // the n the handler expects; read by the test
	opts := ChannelOptions{
		OnMessage: func(m Message) {
			n, err := strconv.Atoi(string(m.Msg))
			if err != nil || int64(n) != next.Load() {
				bad.Add(1)
			}
			got = append(got, n)
			next.Store(int64(n) + 1)
		},
		OnError: func(err error) { bad.Add(1) },
	}
	wrote := make(chan error, 1)
	go func() {
		defer worker.Close()
		// Writes of odd sizes, so frames are cut at every place.
		var buf bytes.Buffer
		for i := range total {
			fmt.Fprintf(&buf, `{"cmd":"shoal:send","to":"1","msg":%d}`+"\n", i)
		}
		b := buf.Bytes()
		for len(b) > 0 {
			n := min(len(b), 1+len(b)%997)
			if _, err := worker.Write(b[:n]); err != nil {
				wrote <- err
				return
			}
			b = b[n:]
		}
		wrote <- nil
	}()
	c := NewChannel(master, opts)
	var in uint64
	for range 3 {
		time.Sleep(2 * time.Millisecond)
		h, err := c.Detach()
		if err != nil {
			t.Fatal(err)
		}
		select {
		case <-c.Done():
		default:
			t.Fatal("Done is not closed after Detach")
		}
		if err := c.Send([]byte("{}\n")); !isDrop(err, DropClosed) {
			t.Fatalf("Send after Detach: %v, want a drop (closed)", err)
		}
		if _, err := c.Detach(); !errors.Is(err, ErrDetached) {
			t.Fatalf("second Detach: %v, want ErrDetached", err)
		}
		in += c.Stats().MessagesIn
		c = ResumeChannel(h, opts)
	}
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	waitFor(t, c.Done(), 10*time.Second, "the last channel's end")
	c.Close()
	in += c.Stats().MessagesIn
	if bad.Load() != 0 || len(got) != total || in != total {
		t.Fatalf("got %d frames (%d counted, %d out of order or bad), want %d once each in order", len(got), in, bad.Load(), total)
	}
}

// Frames queued for a worker that does not read, one cut in the middle by
// Detach, reach it whole and once after ResumeChannel.
func TestDetachKeepsUnsentFrames(t *testing.T) {
	testutil.LeakCheck(t)
	master, worker := mustPair(t)
	defer worker.Close()
	// A small send buffer, so most frames wait in the queue.
	unix.SetsockoptInt(int(master.Fd()), unix.SOL_SOCKET, unix.SO_SNDBUF, 4096)
	c := NewChannel(master, ChannelOptions{})
	const total = 300
	payload := bytes.Repeat([]byte("x"), 1000)
	for i := range total {
		if err := c.Send(mustEncode(t, map[string]any{"n": i, "pad": string(payload)})); err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
	}
	time.Sleep(50 * time.Millisecond) // the writer blocks on the full socket
	h, err := c.Detach()
	if err != nil {
		t.Fatal(err)
	}
	if len(h.Unsent) == 0 {
		t.Fatal("Detach left nothing unsent although the worker read nothing")
	}
	sentBefore := c.Stats().MessagesOut
	if d := c.Stats().Dropped; d != 0 {
		t.Fatalf("Detach dropped %d frames", d)
	}
	c = ResumeChannel(h, ChannelOptions{})
	defer c.Close()
	r := bufio.NewReader(worker)
	worker.SetReadDeadline(time.Now().Add(10 * time.Second))
	for i := range total {
		line, err := r.ReadBytes('\n')
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		want := mustEncode(t, map[string]any{"n": i, "pad": string(payload)})
		if !bytes.Equal(line, want) {
			t.Fatalf("frame %d: got %.60q..., want %.60q...", i, line, want)
		}
	}
	// Each frame is counted once written, by one channel or the other.
	deadline := time.Now().Add(5 * time.Second)
	for c.Stats().MessagesOut+sentBefore != total && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if out := c.Stats().MessagesOut + sentBefore; out != total {
		t.Errorf("%d frames counted as written (%d before Detach), want %d", out, sentBefore, total)
	}
	t.Logf("%d frames written before Detach, %d bytes handed over", sentBefore, len(h.Unsent))
}

// A channel whose worker had gone before Detach says so, and the resumed
// channel ends at once.
func TestDetachAfterTheWorkerClosed(t *testing.T) {
	testutil.LeakCheck(t)
	master, worker := mustPair(t)
	worker.Write([]byte("{\"cmd\":\"notifyRequest\"}\n{\"cut"))
	worker.Close()
	r := newRecorder()
	c := NewChannel(master, r.options())
	r.next(t)
	waitFor(t, c.Done(), 5*time.Second, "end of the channel")
	h, err := c.Detach()
	if err != nil {
		t.Fatal(err)
	}
	if !h.Ended {
		t.Fatal("Handoff.Ended is false for a channel whose worker closed its end")
	}
	c = ResumeChannel(h, ChannelOptions{})
	waitFor(t, c.Done(), 5*time.Second, "end of the resumed channel")
	c.Close()
}
