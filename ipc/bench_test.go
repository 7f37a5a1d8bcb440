package ipc

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"sync"
	"testing"
	"time"
)

// frames returns whole frames built by line, at least size bytes of them.
func frames(size int, line func(i int) string) []byte {
	var b bytes.Buffer
	for i := 0; b.Len() < size; i++ {
		b.WriteString(line(i))
		b.WriteByte('\n')
	}
	return b.Bytes()
}

// cycle reads data over and over; data holds whole frames, so the stream
// does too.
type cycle struct {
	data []byte
	off  int
}

func (c *cycle) Read(p []byte) (int, error) {
	n := copy(p, c.data[c.off:])
	c.off = (c.off + n) % len(c.data)
	return n, nil
}

// BenchmarkDecoder measures decoding from memory, one op per frame.
func BenchmarkDecoder(b *testing.B) {
	for _, bm := range []struct {
		name string
		line func(i int) string
	}{
		{"notifyRequest", func(int) string { return frameNotifyRequest }},
		{"requests", func(i int) string { return fmt.Sprintf(`{"cmd":"shoal:requests","n":%d}`, i%1000) }},
		{"mixed", func(i int) string {
			switch i % 4 {
			case 0:
				return frameNotifyRequest
			case 1:
				return fmt.Sprintf(`{"cmd":"app:event","id":%d,"user":"u%d","tags":["a","b"],"ok":true}`, i, i%97)
			case 2:
				return fmt.Sprintf(`{"cmd":"shoal:send","to":"all","msg":{"op":"invalidate","key":"k%d"}}`, i)
			default:
				return fmt.Sprintf(`[%d,"text with spaces and \"quotes\"",null]`, i)
			}
		}},
	} {
		b.Run(bm.name, func(b *testing.B) {
			data := frames(1<<20, bm.line)
			d := NewDecoder(&cycle{data: data}, 0)
			lines := bytes.Count(data, []byte("\n"))
			b.SetBytes(int64(len(data) / lines))
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if _, err := d.Next(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkChannelIngest measures what the master decodes from K workers at
// once over real socketpairs, one Channel each: one op per message, with
// msgs/s the total over all channels.
func BenchmarkChannelIngest(b *testing.B) {
	const workers = 4
	chunk := frames(64<<10-len(frameNotifyRequest), func(int) string { return frameNotifyRequest })
	perChunk := bytes.Count(chunk, []byte("\n"))
	frameLen := len(frameNotifyRequest) + 1

	per := (b.N + workers - 1) / workers
	total := per * workers
	var (
		chans   []*Channel
		ends    []*os.File
		arrived sync.WaitGroup
	)
	arrived.Add(workers)
	for range workers {
		master, worker, err := Pair()
		if err != nil {
			b.Fatal(err)
		}
		n := 0
		ch := NewChannel(master, ChannelOptions{
			OnMessage: func(m Message) {
				if m.Cmd == CmdNotifyRequest {
					if n++; n == per {
						arrived.Done()
					}
				}
			},
			OnError: func(err error) { b.Error(err) },
		})
		chans = append(chans, ch)
		ends = append(ends, worker)
	}
	b.SetBytes(int64(frameLen))
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	var wrote sync.WaitGroup
	for _, w := range ends {
		wrote.Add(1)
		go func() {
			defer wrote.Done()
			for left := per; left > 0; {
				n := min(left, perChunk)
				if _, err := w.Write(chunk[:n*frameLen]); err != nil {
					b.Error(err)
					return
				}
				left -= n
			}
		}()
	}
	done := make(chan struct{})
	go func() { arrived.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Minute):
		b.Fatal("messages did not arrive")
	}
	elapsed := time.Since(start)
	b.StopTimer()
	wrote.Wait()
	b.ReportMetric(float64(total)/elapsed.Seconds(), "msgs/s")
	var in uint64
	for i, ch := range chans {
		in += ch.Stats().MessagesIn
		ch.Close()
		ends[i].Close()
	}
	if in != uint64(total) {
		b.Errorf("%d messages in, want %d", in, total)
	}
}

// BenchmarkChannelSend measures queueing and writing frames to a worker that
// reads them, one op per frame: with the default limits, and with a Budget
// shared with other channels (the master's setup), whose cost is two more
// atomic updates a frame.
func BenchmarkChannelSend(b *testing.B) {
	for _, bm := range []struct {
		name   string
		budget *Budget
	}{
		{"queue", nil},
		{"budget", NewBudget(0)},
	} {
		b.Run(bm.name, func(b *testing.B) {
			master, worker, err := Pair()
			if err != nil {
				b.Fatal(err)
			}
			ch := NewChannel(master, ChannelOptions{Budget: bm.budget})
			drained := make(chan struct{})
			go func() {
				io.Copy(io.Discard, worker)
				close(drained)
			}()
			frame, _ := Encode(map[string]any{"cmd": "app:event", "key": "k1"})
			b.SetBytes(int64(len(frame)))
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				for ch.Send(frame) != nil {
					time.Sleep(10 * time.Microsecond) // queue full: let the writer catch up
				}
			}
			for deadline := time.Now().Add(time.Minute); ch.Stats().MessagesOut < uint64(b.N); {
				if time.Now().After(deadline) {
					b.Fatalf("%d of %d frames written", ch.Stats().MessagesOut, b.N)
				}
				time.Sleep(100 * time.Microsecond)
			}
			b.StopTimer()
			ch.Close()
			worker.Close()
			<-drained
		})
	}
}

// BenchmarkChannelSendDrop measures Send to a worker that does not read,
// once its queue is full: the cost of a refusal, which a flooding worker
// makes the master pay for each of its messages.
func BenchmarkChannelSendDrop(b *testing.B) {
	master, worker, err := Pair()
	if err != nil {
		b.Fatal(err)
	}
	defer worker.Close()
	ch := NewChannel(master, ChannelOptions{QueueLen: 4, Budget: NewBudget(0)})
	defer ch.Close()
	frame, _ := Encode(map[string]any{"cmd": "app:event", "key": "k1"})
	// Fill the socket buffer and the queue: refused a hundred times in a
	// row, with pauses for the writer, means the writer is blocked.
	for refused := 0; refused < 100; {
		if ch.Send(frame) == nil {
			refused = 0
		} else {
			refused++
			time.Sleep(100 * time.Microsecond)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if ch.Send(frame) == nil {
			b.Fatal("queued to a full queue")
		}
	}
}
