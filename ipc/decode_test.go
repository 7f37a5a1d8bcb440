package ipc

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"testing/iotest"
	"time"
	"unicode/utf8"
)

// result is one outcome of Decoder.Next in a comparable form.
type result struct {
	Cmd    string
	N      int64
	To     string
	Msg    string
	Raw    string
	Reason string // FrameError.Reason, or "" for a good frame
}

func (r result) String() string {
	b, _ := json.Marshal(r)
	return string(b)
}

// decodeAll runs d to the end and returns its outcomes and the error that
// ended it.
func decodeAll(t testing.TB, d *Decoder) ([]result, error) {
	t.Helper()
	var out []result
	for range 1 << 20 {
		m, err := d.Next()
		if err != nil {
			var fe *FrameError
			if errors.As(err, &fe) {
				out = append(out, result{Reason: fe.Reason})
				continue
			}
			return out, err
		}
		out = append(out, result{Cmd: m.Cmd, N: m.N, To: m.To, Msg: string(m.Msg), Raw: string(m.Raw)})
	}
	t.Fatal("decoder does not end")
	return nil, nil
}

var (
	countRE = regexp.MustCompile(`^(0|[1-9][0-9]{0,17})$`)
	slotRE  = regexp.MustCompile(`^[1-9][0-9]{0,17}$`)
)

// reference decodes data the slow and obvious way, as the spec says: split
// into lines, limit, check UTF-8 and JSON, then read the members through a
// map. It returns the outcomes and the ending error.
func reference(data []byte, max int) ([]result, error) {
	var out []result
	lines := bytes.Split(data, []byte("\n"))
	tail := lines[len(lines)-1]
	for _, line := range lines[:len(lines)-1] {
		line = bytes.TrimSuffix(line, []byte("\r"))
		switch {
		case len(line) == 0:
			continue
		case len(line) > max:
			out = append(out, result{Reason: ReasonTooLong})
			continue
		case !utf8.Valid(line):
			out = append(out, result{Reason: ReasonInvalidUTF8})
			continue
		case !json.Valid(line):
			out = append(out, result{Reason: ReasonInvalidJSON})
			continue
		}
		r := result{Raw: string(line)}
		var obj map[string]json.RawMessage
		if json.Unmarshal(line, &obj) == nil && obj != nil {
			var cmd string
			if raw, ok := obj["cmd"]; ok && json.Unmarshal(raw, &cmd) == nil {
				r.Cmd = cmd
			}
			bad := false
			switch r.Cmd {
			case CmdRequests:
				n, ok := obj["n"]
				if !ok || !countRE.Match(n) {
					bad = true
					break
				}
				json.Unmarshal(n, &r.N)
				if r.N > 1_000_000 { // MaxRequestsPerMessage, as the README says
					bad = true
				}
			case CmdSend:
				to, ok := obj["to"]
				var s string
				switch {
				case !ok:
					bad = true
				case json.Unmarshal(to, &s) == nil:
					if s != "all" && !slotRE.MatchString(s) {
						bad = true
					}
					r.To = s
				case slotRE.Match(to):
					r.To = string(to)
				default:
					bad = true
				}
				msg, ok := obj["msg"]
				if !ok {
					bad = true
				}
				r.Msg = string(msg)
			}
			if bad {
				r = result{Reason: ReasonBadField}
			}
		}
		out = append(out, r)
	}
	if len(tail) == 0 {
		return out, io.EOF
	}
	if len(tail) > max+1 {
		out = append(out, result{Reason: ReasonTooLong})
	}
	return out, io.ErrUnexpectedEOF
}

func checkDecode(t *testing.T, input string, max int, want []result, wantErr error) {
	t.Helper()
	for _, size := range []int{readSize, 7, 1} {
		for name, r := range map[string]io.Reader{
			"whole":   strings.NewReader(input),
			"onebyte": iotest.OneByteReader(strings.NewReader(input)),
			"half":    iotest.HalfReader(strings.NewReader(input)),
		} {
			got, err := decodeAll(t, newDecoderSize(r, max, size))
			if err != wantErr {
				t.Errorf("%s/%d: %q: ended with %v, want %v", name, size, input, err, wantErr)
			}
			if !equalResults(got, want) {
				t.Errorf("%s/%d: %q:\n got %v\nwant %v", name, size, input, got, want)
			}
		}
	}
}

func equalResults(a, b []result) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestDecoderReserved(t *testing.T) {
	tests := []struct {
		line string
		want result
	}{
		{`{"cmd":"notifyRequest"}`, result{Cmd: CmdNotifyRequest}},
		{`{"cmd":"shoal:ready"}`, result{Cmd: CmdReady}},
		{`{"cmd":"shoal:heartbeat"}`, result{Cmd: CmdHeartbeat}},
		{`{"cmd":"shoal:requests","n":0}`, result{Cmd: CmdRequests, N: 0}},
		{`{"cmd":"shoal:requests","n":42}`, result{Cmd: CmdRequests, N: 42}},
		{`{"cmd":"shoal:requests","n":1000000}`, result{Cmd: CmdRequests, N: MaxRequestsPerMessage}},
		{`{"n":7,"cmd":"shoal:requests"}`, result{Cmd: CmdRequests, N: 7}},
		{`{"cmd":"shoal:send","to":"all","msg":{"a":[1,"}"]}}`, result{Cmd: CmdSend, To: "all", Msg: `{"a":[1,"}"]}`}},
		{`{"cmd":"shoal:send","to":3,"msg":"hi"}`, result{Cmd: CmdSend, To: "3", Msg: `"hi"`}},
		{`{"cmd":"shoal:send","to":"12","msg":null}`, result{Cmd: CmdSend, To: "12", Msg: `null`}},
		// Whitespace, escapes and member order go through the slow path
		// and must come out the same.
		{` { "cmd" : "notifyRequest" } `, result{Cmd: CmdNotifyRequest}},
		{`{"cmd": "shoal:requests", "n": 5}`, result{Cmd: CmdRequests, N: 5}},
		{`{"cmd":"shoal:\u0072eady"}`, result{Cmd: CmdReady}},
		{`{"c\u006dd":"shoal:heartbeat"}`, result{Cmd: CmdHeartbeat}},
		{`{"cmd":"x","cmd":"shoal:ready"}`, result{Cmd: CmdReady}}, // the last wins, as in JSON.parse
		{`{"cmd":"NODE_HANDLE","x":1}`, result{Cmd: "NODE_HANDLE"}},
		// Application messages.
		{`{"cmd":"hello","n":-1}`, result{Cmd: "hello"}},
		{`{"CMD":"shoal:ready"}`, result{}}, // names are case-sensitive
		{`{"cmd":5}`, result{}},
		{`{}`, result{}},
		{`"just a string"`, result{}},
		{`[1,2,{"cmd":"shoal:ready"}]`, result{}},
		{`42`, result{}},
		{`null`, result{}},
		{`{"msg":"\u2028 é ☃"}`, result{}},
	}
	for _, tt := range tests {
		want := tt.want
		want.Raw = tt.line
		checkDecode(t, tt.line+"\n", 0, []result{want}, io.EOF)
		ref, _ := reference([]byte(tt.line+"\n"), DefaultMaxMessage)
		if !equalResults(ref, []result{want}) {
			t.Errorf("reference disagrees on %q: %v", tt.line, ref)
		}
	}
}

func TestDecoderFastSlowAgree(t *testing.T) {
	for _, line := range []string{
		frameNotifyRequest, frameReady, frameHeartbeat,
		`{"cmd":"shoal:requests","n":0}`,
		`{"cmd":"shoal:requests","n":123456789012345678}`,
		`{"cmd":"shoal:requests","n":1000000}`,
		`{"cmd":"shoal:requests","n":1000001}`,
		`{"cmd":"shoal:requests","n":1234567890123456789}`, // 19 digits: slow path only
		`{"cmd":"shoal:requests","n":01}`,
		`{"cmd":"shoal:requests","n":1.5}`,
		`{"cmd":"shoal:requests","n":-1}`,
		`{"cmd":"shoal:requests","n":}`,
	} {
		fm, ferr := parse([]byte(line))
		sm, serr := parseSlow([]byte(line))
		if !sameMessage(fm, sm) || errReason(ferr) != errReason(serr) {
			t.Errorf("%s: fast path %+v, %v; slow path %+v, %v", line, fm, ferr, sm, serr)
		}
	}
}

func sameMessage(a, b Message) bool {
	return a.Cmd == b.Cmd && a.N == b.N && a.To == b.To && bytes.Equal(a.Msg, b.Msg) && bytes.Equal(a.Raw, b.Raw)
}

func errReason(err error) string {
	var fe *FrameError
	if errors.As(err, &fe) {
		return fe.Reason
	}
	if err != nil {
		return err.Error()
	}
	return ""
}

func TestDecoderBadFrames(t *testing.T) {
	good := `{"cmd":"shoal:ready"}`
	tests := []struct {
		line   string
		reason string
	}{
		{`{"cmd":"notifyRequest"`, ReasonInvalidJSON},
		{`not json`, ReasonInvalidJSON},
		{`   `, ReasonInvalidJSON},
		{`{"a":1}{"b":2}`, ReasonInvalidJSON},
		{`{"a":"` + "\t" + `"}`, ReasonInvalidJSON},
		{"{\"a\":\"\xff\"}", ReasonInvalidUTF8},
		{"\xc3\x28", ReasonInvalidUTF8},
		{`{"cmd":"shoal:requests"}`, ReasonBadField},
		{`{"cmd":"shoal:requests","n":-3}`, ReasonBadField},
		{`{"cmd":"shoal:requests","n":2.5}`, ReasonBadField},
		{`{"cmd":"shoal:requests","n":1e3}`, ReasonBadField},
		{`{"cmd":"shoal:requests","n":"3"}`, ReasonBadField},
		{`{"cmd":"shoal:requests","n":12345678901234567890}`, ReasonBadField},
		{`{"cmd":"shoal:requests","n":1000001}`, ReasonBadField},
		{`{"cmd":"shoal:requests","n":999999999999999999}`, ReasonBadField},
		{`{"cmd": "shoal:requests", "n": 999999999999999999}`, ReasonBadField},
		{`{"cmd":"shoal:send","msg":1}`, ReasonBadField},
		{`{"cmd":"shoal:send","to":0,"msg":1}`, ReasonBadField},
		{`{"cmd":"shoal:send","to":"03","msg":1}`, ReasonBadField},
		{`{"cmd":"shoal:send","to":"everyone","msg":1}`, ReasonBadField},
		{`{"cmd":"shoal:send","to":[1],"msg":1}`, ReasonBadField},
		{`{"cmd":"shoal:send","to":"all"}`, ReasonBadField},
	}
	for _, tt := range tests {
		input := tt.line + "\n" + good + "\n"
		checkDecode(t, input, 0, []result{{Reason: tt.reason}, {Cmd: CmdReady, Raw: good}}, io.EOF)
		ref, _ := reference([]byte(input), DefaultMaxMessage)
		if len(ref) != 2 || ref[0].Reason != tt.reason {
			t.Errorf("reference disagrees on %q: %v", tt.line, ref)
		}
		_, err := NewDecoder(strings.NewReader(input), 0).Next()
		var fe *FrameError
		if !errors.As(err, &fe) || fe.Len != len(tt.line) {
			t.Errorf("%q: error %#v, want a FrameError with Len %d", tt.line, err, len(tt.line))
		} else if msg := fe.Error(); !strings.HasPrefix(msg, "ipc: bad frame: "+tt.reason) || strings.Contains(msg, "cmd") && tt.reason != ReasonBadField {
			t.Errorf("%q: Error() = %q", tt.line, msg)
		}
	}
}

func TestDecoderLimit(t *testing.T) {
	const max = 16
	good := `{"cmd":"shoal:ready"}` // 21 bytes: over max on its own
	short := `"0123456789abcd"`     // exactly 16
	ready := result{Cmd: CmdReady, Raw: good}
	tests := []struct {
		input string
		want  []result
		err   error
	}{
		{short + "\n", []result{{Raw: short}}, io.EOF},
		{short + "\r\n", []result{{Raw: short}}, io.EOF},
		{`"0123456789abcde"` + "\n", []result{{Reason: ReasonTooLong}}, io.EOF},
		{`"0123456789abcde"` + "\r\n", []result{{Reason: ReasonTooLong}}, io.EOF},
		{strings.Repeat("x", 1000) + "\n" + short + "\n", []result{{Reason: ReasonTooLong}, {Raw: short}}, io.EOF},
		{strings.Repeat("\r", 18) + "\n" + short + "\n", []result{{Reason: ReasonTooLong}, {Raw: short}}, io.EOF},
		{strings.Repeat("x", 17), []result{}, io.ErrUnexpectedEOF},
		{strings.Repeat("x", 18), []result{{Reason: ReasonTooLong}}, io.ErrUnexpectedEOF},
		{strings.Repeat("x", 5000), []result{{Reason: ReasonTooLong}}, io.ErrUnexpectedEOF},
	}
	for _, tt := range tests {
		checkDecode(t, tt.input, max, tt.want, tt.err)
		ref, rerr := reference([]byte(tt.input), max)
		if !equalResults(ref, tt.want) || rerr != tt.err {
			t.Errorf("reference disagrees on %q: %v, %v", tt.input, ref, rerr)
		}
	}
	// With the default limit, a long line grows the buffer past its first
	// 64 KiB, and the line after it still arrives.
	long := `"` + strings.Repeat("é", 300<<10) + `"`
	input := long + "\n" + good + "\n" + `"` + strings.Repeat("a", DefaultMaxMessage) + `"` + "\n" + good + "\n"
	got, err := decodeAll(t, NewDecoder(strings.NewReader(input), 0))
	want := []result{{Raw: long}, ready, {Reason: ReasonTooLong}, ready}
	if err != io.EOF || !equalResults(got, want) {
		var reasons []string
		for _, r := range got {
			reasons = append(reasons, r.Cmd+r.Reason)
		}
		t.Errorf("long lines: got %q, ended with %v", reasons, err)
	}
}

func TestDecoderEnds(t *testing.T) {
	ready := `{"cmd":"shoal:ready"}`
	r := result{Cmd: CmdReady, Raw: ready}
	checkDecode(t, "", 0, nil, io.EOF)
	checkDecode(t, "\n\r\n\n", 0, nil, io.EOF)
	checkDecode(t, ready+"\r\n\r\n"+ready+"\n", 0, []result{r, r}, io.EOF)
	checkDecode(t, ready+"\n"+ready, 0, []result{r}, io.ErrUnexpectedEOF)
	checkDecode(t, ready+"\n\r", 0, []result{r}, io.ErrUnexpectedEOF)

	// After io.ErrUnexpectedEOF the decoder says io.EOF.
	d := NewDecoder(strings.NewReader(`{"a"`), 0)
	if _, err := d.Next(); err != io.ErrUnexpectedEOF {
		t.Fatalf("mid-line end: %v", err)
	}
	if _, err := d.Next(); err != io.EOF {
		t.Fatalf("after mid-line end: %v", err)
	}

	// Another read error comes after the complete lines before it.
	boom := errors.New("boom")
	d = NewDecoder(io.MultiReader(strings.NewReader(ready+"\n"+ready+"\n"), iotest.ErrReader(boom)), 0)
	got, err := decodeAll(t, d)
	if err != boom || len(got) != 2 {
		t.Fatalf("read error: got %v, %v", got, err)
	}
	if _, err := d.Next(); err != boom {
		t.Fatalf("read error is not sticky: %v", err)
	}
}

// noNewline is a long stream with no newline, cheap to produce.
type noNewline struct {
	left  int64
	chunk []byte
	// peak records the decoder's largest heap while it streams.
	every, since int64
	peak         uint64
}

func (r *noNewline) Read(p []byte) (int, error) {
	if r.left <= 0 {
		return 0, io.EOF
	}
	p = p[:min(int64(len(p)), r.left)]
	n := 0
	for n < len(p) {
		n += copy(p[n:], r.chunk)
	}
	r.left -= int64(n)
	r.since += int64(n)
	if r.since >= r.every {
		r.since = 0
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		r.peak = max(r.peak, ms.HeapInuse)
	}
	return n, nil
}

func TestDecoderNoNewlineBounded(t *testing.T) {
	size := int64(1 << 30)
	if testing.Short() {
		size = 256 << 20
	}
	chunk := bytes.Repeat([]byte("x"), 64<<10)
	src := &noNewline{left: size, chunk: chunk, every: 32 << 20}
	good := `{"cmd":"shoal:ready"}`
	d := NewDecoder(io.MultiReader(src, strings.NewReader("\n"+good+"\n")), 0)

	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	start := time.Now()
	_, err := d.Next()
	var fe *FrameError
	if !errors.As(err, &fe) || fe.Reason != ReasonTooLong {
		t.Fatalf("first Next: %v, want too_long", err)
	}
	m, err := d.Next()
	if err != nil || m.Cmd != CmdReady {
		t.Fatalf("second Next: %+v, %v; want the line after the long one", m, err)
	}
	elapsed := time.Since(start)
	runtime.ReadMemStats(&after)
	if _, err := d.Next(); err != io.EOF {
		t.Fatalf("third Next: %v", err)
	}
	growth := int64(max(after.HeapInuse, src.peak)) - int64(before.HeapInuse)
	t.Logf("%d MiB without a newline in %v; heap in use %.2f MiB before, peak %.2f MiB (growth %.2f MiB)",
		size>>20, elapsed.Round(time.Millisecond), mib(before.HeapInuse), mib(max(after.HeapInuse, src.peak)), float64(growth)/(1<<20))
	// The decoder holds at most max+2 bytes (1 MiB) and leaves at most as
	// much garbage from growing its buffer up to that.
	if growth > 5<<20 {
		t.Errorf("heap grew by %d bytes while discarding a long line", growth)
	}
}

func mib(n uint64) float64 { return float64(n) / (1 << 20) }

func TestEncode(t *testing.T) {
	frame, err := Encode(map[string]any{"cmd": "hello", "html": "<a&b>", "nl": "x\ny"})
	if err != nil {
		t.Fatal(err)
	}
	want := `{"cmd":"hello","html":"<a&b>","nl":"x\ny"}` + "\n"
	if string(frame) != want {
		t.Errorf("Encode = %q, want %q", frame, want)
	}
	frame, err = Encode(json.RawMessage("{\n \"cmd\" : \"shoal:ready\"\n}"))
	if err != nil || string(frame) != frameReady+"\n" {
		t.Errorf("Encode(RawMessage) = %q, %v", frame, err)
	}
	if _, err := Encode(func() {}); err == nil || !strings.HasPrefix(err.Error(), "ipc: encode message: ") {
		t.Errorf("Encode(func) error = %v", err)
	}
}

func TestMessageInternal(t *testing.T) {
	for cmd, want := range map[string]bool{
		"NODE_HANDLE": true, "NODE_CLUSTER": true, "NODE_": false, "node_x": false, "": false, CmdReady: false,
	} {
		if got := (Message{Cmd: cmd}).Internal(); got != want {
			t.Errorf("Internal(%q) = %v", cmd, got)
		}
	}
}

func TestMessageClone(t *testing.T) {
	line := []byte(`{"cmd":"shoal:send","to":"all","msg":[1,2]}`)
	m, err := parse(line)
	if err != nil {
		t.Fatal(err)
	}
	c := m.clone()
	for i := range line {
		line[i] = 'x'
	}
	if string(c.Raw) != `{"cmd":"shoal:send","to":"all","msg":[1,2]}` || string(c.Msg) != `[1,2]` {
		t.Errorf("clone shares memory: %q %q", c.Raw, c.Msg)
	}
}
