package ipc

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"testing"
	"unicode/utf8"
)

// chunkReader returns at most n bytes a read.
type chunkReader struct {
	r io.Reader
	n int
}

func (r chunkReader) Read(p []byte) (int, error) {
	return r.r.Read(p[:min(len(p), r.n)])
}

// FuzzDecoder decodes data with a limit, a read size and a first buffer size
// taken from the inputs. It checks that the decoder never panics, that every
// good frame is valid UTF-8 JSON within the limit, and that the decoder
// agrees frame by frame with the obvious reference in decode_test.go.
// The seed corpus is in testdata/fuzz/FuzzDecoder.
func FuzzDecoder(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte, limit uint16, chunk uint8) {
		max := int(limit)
		if max == 0 {
			max = DefaultMaxMessage
		}
		r := chunkReader{bytes.NewReader(data), int(chunk) + 1}
		d := newDecoderSize(r, max, int(chunk%17)+1)
		var got []result
		var end error
		for range len(data) + 2 {
			m, err := d.Next()
			if err != nil {
				var fe *FrameError
				if errors.As(err, &fe) {
					if fe.Len <= 0 {
						t.Fatalf("FrameError with Len %d", fe.Len)
					}
					got = append(got, result{Reason: fe.Reason})
					continue
				}
				end = err
				break
			}
			switch {
			case len(m.Raw) == 0 || len(m.Raw) > max:
				t.Fatalf("frame of %d bytes, limit %d", len(m.Raw), max)
			case bytes.IndexByte(m.Raw, '\n') >= 0:
				t.Fatalf("frame %q holds a newline", m.Raw)
			case !utf8.Valid(m.Raw) || !json.Valid(m.Raw):
				t.Fatalf("frame %q is not valid UTF-8 JSON", m.Raw)
			}
			if s, err := parseSlow(m.Raw); err != nil || !sameMessage(m, s) {
				t.Fatalf("fast and slow paths disagree on %q: %+v; %+v, %v", m.Raw, m, s, err)
			}
			got = append(got, result{Cmd: m.Cmd, N: m.N, To: m.To, Msg: string(m.Msg), Raw: string(m.Raw)})
		}
		if end == nil {
			t.Fatalf("decoder did not end within %d calls", len(data)+2)
		}
		want, wantEnd := reference(data, max)
		if end != wantEnd || !equalResults(got, want) {
			t.Fatalf("decoder and reference disagree on %q (limit %d):\n got %v, %v\nwant %v, %v", data, max, got, end, want, wantEnd)
		}
	})
}
