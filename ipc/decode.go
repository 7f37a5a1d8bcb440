package ipc

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"unicode/utf8"
)

// readSize is the size of the decoder's first buffer and so of its reads.
const readSize = 64 << 10

// Decoder reads frames from a stream. It reads in large chunks, bounds every
// line before looking inside it, and recognises the frames workers send most
// without a general JSON decode. A Decoder is for one goroutine.
type Decoder struct {
	r   io.Reader
	max int
	buf []byte
	// The bytes not yet returned are buf[start:end]; buf[start:scan] is known
	// to hold no '\n'.
	start, end, scan int
	// discard is set inside a line longer than max: the bytes up to the next
	// '\n' are dropped.
	discard bool
	err     error // from r, returned once the buffered lines are used up
	size    int   // size of the first buffer
}

// NewDecoder returns a decoder that reads frames from r, each line at most
// max bytes without its line end; max <= 0 means DefaultMaxMessage.
func NewDecoder(r io.Reader, max int) *Decoder {
	return newDecoderSize(r, max, readSize)
}

// newDecoderSize is NewDecoder with the size of the first buffer, which
// grows up to max+2 bytes for long lines. Tests use small sizes to reach the
// growing and compacting code with small inputs.
func newDecoderSize(r io.Reader, limit, size int) *Decoder {
	if limit <= 0 {
		limit = DefaultMaxMessage
	}
	return &Decoder{r: r, max: limit, size: max(size, 1)}
}

// Next returns the next frame.
//
// The returned Message's Raw and Msg alias the decoder's buffer and are valid
// only until the next call. A bad frame returns a [*FrameError] and the
// decoder stays usable: the next call starts at the next line. A line longer
// than the limit is reported as soon as it crosses the limit and then
// discarded as it streams, so the decoder never holds much more than the
// limit however long the line is. Empty lines are skipped, and a "\r" before
// the "\n" is dropped. At the end of the stream Next returns io.EOF, or
// io.ErrUnexpectedEOF when the stream ended inside a line; another read
// error is returned as it is, after the complete lines before it.
func (d *Decoder) Next() (Message, error) {
	for {
		if i := bytes.IndexByte(d.buf[d.scan:d.end], '\n'); i >= 0 {
			i += d.scan
			line := d.buf[d.start:i]
			d.start, d.scan = i+1, i+1
			if d.discard {
				// The end of a line already reported as too long.
				d.discard = false
				continue
			}
			if n := len(line); n > 0 && line[n-1] == '\r' {
				line = line[:n-1]
			}
			if len(line) == 0 {
				continue
			}
			if len(line) > d.max {
				return Message{}, d.tooLong(len(line))
			}
			return parse(line)
		}
		d.scan = d.end
		if d.discard {
			d.start, d.end, d.scan = 0, 0, 0
		} else if n := d.end - d.start; n > d.max+1 {
			// No line end in more than max+1 bytes: whatever follows, the
			// line without "\r\n" is longer than max. Report it now and drop
			// it as it comes.
			d.discard = true
			d.start, d.end, d.scan = 0, 0, 0
			return Message{}, d.tooLong(n)
		}
		if d.err != nil {
			err := d.err
			if errors.Is(err, os.ErrDeadlineExceeded) {
				// A pause, not the end (a read deadline, or nothing to
				// read yet on the Channel's non-blocking socket): the
				// partial line stays buffered (see pending) and the
				// next call reads on.
				d.err = nil
				return Message{}, err
			}
			if d.end > d.start || d.discard {
				if err == io.EOF {
					err = io.ErrUnexpectedEOF
					d.err = io.EOF
				}
				d.start, d.end, d.scan, d.discard = 0, 0, 0, false
			}
			return Message{}, err
		}
		d.fill()
	}
}

// pending returns the bytes read but not yet returned as a frame (the
// start of a line; Next returns every complete line first) and whether
// they are inside a line too long to keep. A decoder made with
// resumeDecoder from them reads on exactly where this one stopped.
func (d *Decoder) pending() (rest []byte, discard bool) {
	return append([]byte(nil), d.buf[d.start:d.end]...), d.discard
}

// resumeDecoder returns a decoder over r that starts with the bytes
// another decoder had read but not returned (see pending).
func resumeDecoder(r io.Reader, limit int, rest []byte, discard bool) *Decoder {
	d := NewDecoder(r, limit)
	if len(rest) > 0 {
		d.buf = make([]byte, min(max(d.size, 2*len(rest)), d.max+2))
		d.end = copy(d.buf, rest)
	}
	d.discard = discard
	return d
}

// fill reads once into the free end of the buffer, first making room.
func (d *Decoder) fill() {
	if d.buf == nil {
		d.buf = make([]byte, min(d.size, d.max+2))
	}
	if d.start == d.end {
		d.start, d.end, d.scan = 0, 0, 0
	} else if d.start > 0 && len(d.buf)-d.end < len(d.buf)/4 {
		n := copy(d.buf, d.buf[d.start:d.end])
		d.scan -= d.start
		d.start, d.end = 0, n
	}
	if d.end == len(d.buf) {
		// One line fills the buffer, and it is at most max+1 bytes (see
		// Next), so the buffer is below max+2 and may grow.
		nb := make([]byte, min(2*len(d.buf), d.max+2))
		d.end = copy(nb, d.buf[d.start:d.end])
		d.scan -= d.start
		d.start = 0
		d.buf = nb
	}
	for range 100 {
		n, err := d.r.Read(d.buf[d.end:])
		if n < 0 || n > len(d.buf)-d.end {
			d.err = errors.New("ipc: read: invalid count from reader")
			return
		}
		d.end += n
		if err != nil {
			d.err = err
			return
		}
		if n > 0 {
			return
		}
	}
	d.err = io.ErrNoProgress
}

func (d *Decoder) tooLong(n int) *FrameError {
	return &FrameError{Reason: ReasonTooLong, Len: n, Err: fmt.Errorf("line longer than the limit of %d bytes", d.max)}
}

// The frames recognised without a JSON decode: what Node.js's JSON.stringify
// and a careful worker in any language write.
const (
	frameNotifyRequest = `{"cmd":"notifyRequest"}`
	frameReady         = `{"cmd":"shoal:ready"}`
	frameHeartbeat     = `{"cmd":"shoal:heartbeat"}`
	prefixRequests     = `{"cmd":"shoal:requests","n":`
)

// parse decodes one line: not empty, without its line end, within the limit.
func parse(line []byte) (Message, error) {
	switch len(line) {
	case len(frameNotifyRequest):
		if string(line) == frameNotifyRequest {
			return Message{Cmd: CmdNotifyRequest, Raw: line}, nil
		}
	case len(frameReady):
		if string(line) == frameReady {
			return Message{Cmd: CmdReady, Raw: line}, nil
		}
	case len(frameHeartbeat):
		if string(line) == frameHeartbeat {
			return Message{Cmd: CmdHeartbeat, Raw: line}, nil
		}
	}
	if len(line) > len(prefixRequests)+1 && line[len(line)-1] == '}' && string(line[:len(prefixRequests)]) == prefixRequests {
		if n, ok := parseCount(line[len(prefixRequests) : len(line)-1]); ok {
			if n > MaxRequestsPerMessage {
				return Message{}, badField(line, errBigN)
			}
			return Message{Cmd: CmdRequests, N: n, Raw: line}, nil
		}
	}
	return parseSlow(line)
}

// parseCount parses a JSON integer literal that is not negative: "0" or
// digits without a leading zero, up to 18 of them so that it fits an int64.
// Fractions and exponents are refused: JSON.stringify never writes them for
// a count.
func parseCount(b []byte) (int64, bool) {
	if len(b) == 0 || len(b) > 18 || (b[0] == '0' && len(b) > 1) {
		return 0, false
	}
	var n int64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return n, true
}

// Errors for the bad_field frames.
var (
	errNoN   = errors.New(`shoal:requests without "n"`)
	errBadN  = errors.New(`shoal:requests: "n" is not a non-negative integer`)
	errBigN  = errors.New(`shoal:requests: "n" is over ` + strconv.Itoa(MaxRequestsPerMessage) + `: report large counts in several messages`)
	errNoTo  = errors.New(`shoal:send without "to"`)
	errBadTo = errors.New(`shoal:send: "to" is neither "all" nor a worker slot`)
	errNoMsg = errors.New(`shoal:send without "msg"`)
)

// parseSlow decodes any line: it checks UTF-8 and JSON, then picks the
// members shoal reads out of a top-level object.
func parseSlow(line []byte) (Message, error) {
	if !utf8.Valid(line) {
		return Message{}, &FrameError{Reason: ReasonInvalidUTF8, Len: len(line), Err: utf8Error(line)}
	}
	if !json.Valid(line) {
		var v json.RawMessage
		err := json.Unmarshal(line, &v)
		if err == nil { // cannot happen
			err = errors.New("invalid JSON")
		}
		return Message{}, &FrameError{Reason: ReasonInvalidJSON, Len: len(line), Err: err}
	}
	m := Message{Raw: line}
	i := skipSpace(line, 0)
	if line[i] != '{' {
		return m, nil // an application message that is not an object
	}
	// Walk the members of the object, valid JSON by now. As in JSON.parse,
	// the last of duplicate members wins, and names are case-sensitive.
	var cmd, n, to, msg []byte
	i++
	for {
		i = skipSpace(line, i)
		if line[i] == '}' {
			break
		}
		if line[i] == ',' {
			i = skipSpace(line, i+1)
		}
		kEnd := skipString(line, i)
		key := line[i:kEnd]
		i = skipSpace(line, kEnd) + 1 // past ':'
		i = skipSpace(line, i)
		vEnd := skipValue(line, i)
		val := line[i:vEnd]
		i = vEnd
		switch memberName(key) {
		case "cmd":
			cmd = val
		case "n":
			n = val
		case "to":
			to = val
		case "msg":
			msg = val
		}
	}
	if cmd == nil || cmd[0] != '"' {
		return m, nil
	}
	m.Cmd = unquote(cmd)
	switch m.Cmd {
	case CmdRequests:
		if n == nil {
			return Message{}, badField(line, errNoN)
		}
		v, ok := parseCount(n)
		if !ok {
			return Message{}, badField(line, errBadN)
		}
		if v > MaxRequestsPerMessage {
			return Message{}, badField(line, errBigN)
		}
		m.N = v
	case CmdSend:
		if to == nil {
			return Message{}, badField(line, errNoTo)
		}
		if to[0] == '"' {
			m.To = unquote(to)
			if m.To != "all" && !isSlot(m.To) {
				return Message{}, badField(line, errBadTo)
			}
		} else if isSlot(string(to)) {
			m.To = string(to)
		} else {
			return Message{}, badField(line, errBadTo)
		}
		if msg == nil {
			return Message{}, badField(line, errNoMsg)
		}
		m.Msg = msg
	}
	return m, nil
}

func badField(line []byte, err error) *FrameError {
	return &FrameError{Reason: ReasonBadField, Len: len(line), Err: err}
}

// isSlot reports whether s is a worker slot in decimal: 1, 2, ... without a
// sign or leading zeros, fitting an int64.
func isSlot(s string) bool {
	if len(s) == 0 || len(s) > 18 || s[0] == '0' {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// utf8Error says where line stops being UTF-8.
func utf8Error(line []byte) error {
	for i := 0; i < len(line); {
		r, size := utf8.DecodeRune(line[i:])
		if r == utf8.RuneError && size == 1 {
			return errors.New("invalid UTF-8 at byte " + strconv.Itoa(i))
		}
		i += size
	}
	return errors.New("invalid UTF-8")
}

// The helpers below walk JSON text that json.Valid has accepted, so they
// need not check for its end or for bad syntax.

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\r' || b[i] == '\n') {
		i++
	}
	return i
}

// skipString returns the index just past the string literal at b[i].
func skipString(b []byte, i int) int {
	for j := i + 1; ; j++ {
		switch b[j] {
		case '\\':
			j++
		case '"':
			return j + 1
		}
	}
}

// skipValue returns the index just past the value at b[i].
func skipValue(b []byte, i int) int {
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		depth := 0
		for j := i; ; j++ {
			switch b[j] {
			case '"':
				j = skipString(b, j) - 1
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return j + 1
				}
			}
		}
	default: // number, true, false, null
		j := i
		for j < len(b) {
			switch b[j] {
			case ',', '}', ']', ' ', '\t', '\r', '\n':
				return j
			}
			j++
		}
		return j
	}
}

// memberName returns the member name for the quoted key, or "" for names
// shoal does not read, without allocating for plain names.
func memberName(key []byte) string {
	if bytes.IndexByte(key, '\\') < 0 {
		switch string(key[1 : len(key)-1]) {
		case "cmd":
			return "cmd"
		case "n":
			return "n"
		case "to":
			return "to"
		case "msg":
			return "msg"
		}
		return ""
	}
	return unquote(key)
}

// unquote returns the value of a valid JSON string literal. The reserved
// commands come back without allocating.
func unquote(lit []byte) string {
	s := lit[1 : len(lit)-1]
	if bytes.IndexByte(s, '\\') >= 0 {
		var v string
		if json.Unmarshal(lit, &v) == nil {
			return v
		}
		return "" // cannot happen: lit is valid
	}
	switch string(s) {
	case CmdNotifyRequest:
		return CmdNotifyRequest
	case CmdRequests:
		return CmdRequests
	case CmdReady:
		return CmdReady
	case CmdSend:
		return CmdSend
	case CmdHeartbeat:
		return CmdHeartbeat
	}
	return string(s)
}
