// Package ipc is the message channel between a shoal master and its workers:
// one end of a Unix socketpair each, inherited by the worker as file
// descriptor 3, carrying one JSON value per line, UTF-8, ended by '\n', both
// ways.
//
// That framing is Node.js's child-process IPC in its default "json"
// serialization, so a Node.js worker's process.send and
// process.on('message') work with shoal as their parent unchanged, and
// a worker in any language needs nothing more than a JSON encoder and a line
// reader. A Go worker uses [FromEnv] or the shortcut [Send]; the master
// runs one [Channel] per worker.
//
// # Messages
//
// A message whose "cmd" member is one of the reserved commands
// ([CmdNotifyRequest] and the "shoal:" namespace) is for the master. Every
// other JSON value is the application's. Messages whose "cmd" starts with
// "NODE_" are Node.js's own and are never delivered ([Message.Internal]).
//
// # Bad input
//
// A line that is too long, not UTF-8, not JSON, or a reserved command with
// bad fields costs its sender that one frame and nothing more: the
// [Decoder] reports it as a [*FrameError], skips it and goes on with the next
// line. This is safe because a '\n' never occurs inside JSON text (string
// literals escape it), so the stream is in step again at the next line
// whatever the bad line held. Closing the channel instead would throw away
// the worker's later messages (its request counts, its readiness) and, for a
// Node.js worker, fire 'disconnect' and usually end it: one oversized
// application message would take a serving worker down. The master counts
// bad frames by reason ([Stats].Errors) so they show in its metrics, and the
// supervisor may still decide to replace a worker that keeps sending them.
// Lines are bounded before anything is decoded ([DefaultMaxMessage]), and a
// line over the limit is discarded as it streams, so a worker cannot make
// the master buffer more than about the limit, even with no newline at all.
//
// # Flow control
//
// A master must never wait for a worker, nor hold without bound what it
// cannot deliver. [Channel.Send] only queues a frame; the channel's writer
// goroutine writes it. A worker that stops reading fills its socket buffer,
// then its queue, which is bounded in frames ([ChannelOptions].QueueLen) and
// in bytes ([ChannelOptions].QueueBytes); a [Budget] shared by all of a
// master's channels bounds the bytes of all the queues together, however
// many workers stop reading. From then on frames to it are dropped and
// counted by reason ([Stats].Drops) while Send returns a [*DropError] at
// once. Incoming frames are read by one goroutine per
// worker; a slow [ChannelOptions].OnMessage slows only that worker, whose
// own writes then block, as they would under a slow Node.js parent.
//
// # Reading in batches
//
// A Node.js worker that reports each request with process.send writes one
// small frame per request. So a Channel reads a busy worker in batches:
// after a read that brought two frames or more, or after a few quick reads
// in a row, its reader waits up to [ChannelOptions].ReadDelay
// ([DefaultReadDelay] and at most [MaxReadDelay]: 5 ms) before it reads
// again, and takes the frames sent meanwhile in one read ([Stats].Reads
// counts the reads). A frame that arrives while the channel is idle is read
// at once, so a lone message (a ready, a heartbeat, a relayed message) is
// never delayed; nor does the reader wait when the master has sent
// something to the worker since its last read, so a worker that waits for
// an answer to each message is not slowed. A wait is cut short so that a
// read takes about 64 frames or 16 KiB at most, and Close, [Channel.Pause]
// and [Channel.Detach] end it at once. The waits end on ticks of
// ReadDelay shared by all the channels, so that the busy workers are read
// together, one wakeup of the master for all of them: the ticks are the
// expiries of one timerfd in Go's network poller rather than Go timers,
// whose expiries the runtime rounds to whole milliseconds (two wakeups a
// wait, where one does).
//
// The master's sockets are not in Go's network poller, which watches a
// socket for good and wakes a thread at each write of the worker, whether
// or not a goroutine waits for it. One poller of the package's own (an
// epoll instance and one goroutine, so one thread, for all the channels of
// the process) watches a socket only while its reader waits for it: a
// reader that pauses before its next read leaves the socket unwatched, and
// the frames the worker writes meanwhile wake nothing at all. So busy
// workers' messages cost the master a few wakeups a tick, not one or two
// each. The poller only wakes the waiting reader (or writer); every
// channel's frames are read and handled on its own reader goroutine. A
// worker that counts requests itself and reports them with [CmdRequests]
// now and then costs the master almost nothing.
//
// # Goroutines
//
// A [Channel] runs exactly two goroutines, a reader and a writer, both ended
// by [Channel.Close] or [Channel.Detach]. The channels of a process share
// two more, their poller, started with the first channel and ended when
// the last one is closed, and the ticker that ends the waits of busy
// readers, started with the first wait and ended with the last channel. A [Conn] runs one reader, started by the first call of
// [Conn.Handle], [Conn.Messages] or [Conn.Done], and ended when the master's
// end is gone or by [Conn.Close].
package ipc

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// EnvFD is the environment variable that tells a worker which file
// descriptor is its channel to the master. shoal always sets it to "3".
const EnvFD = "SHOAL_IPC_FD"

// DefaultMaxMessage is the default limit on one frame: the bytes of a line
// without its "\n" (or "\r\n").
const DefaultMaxMessage = 1 << 20

// MaxRequestsPerMessage is the largest "n" of a [CmdRequests] message; a
// larger one is a bad frame ([ReasonBadField]), skipped and counted.
//
// A report covers the requests served since the previous one: the Go
// worker package reports every 100 ms, so reaching the cap takes 10 million
// requests a second from one process, or 100,000 a second reported every
// 10 s. The cap keeps the master's counters from wrapping: at most 10^6 a
// message, a worker must send over 9 * 10^12 messages (more than 300 TB) to
// carry an int64 total past its maximum, where without the cap ten messages
// of 18 digits did.
const MaxRequestsPerMessage = 1_000_000

// Reserved commands: the values of a message's "cmd" member that are for the
// master. All others are the application's.
const (
	// CmdNotifyRequest reports one request served: {"cmd":"notifyRequest"}.
	CmdNotifyRequest = "notifyRequest"
	// CmdRequests reports a batch of requests served:
	// {"cmd":"shoal:requests","n":42}.
	CmdRequests = "shoal:requests"
	// CmdReady reports that the worker listens: {"cmd":"shoal:ready"}.
	CmdReady = "shoal:ready"
	// CmdSend asks the master to relay msg to one worker or to all:
	// {"cmd":"shoal:send","to":"all","msg":...} or "to":3.
	CmdSend = "shoal:send"
	// CmdHeartbeat is a liveness report: {"cmd":"shoal:heartbeat"}.
	CmdHeartbeat = "shoal:heartbeat"
)

// Reasons for a [FrameError]; they are also the keys of [Stats].Errors.
const (
	ReasonTooLong     = "too_long"     // the line is longer than the limit
	ReasonInvalidJSON = "invalid_json" // the line is not one JSON value
	ReasonInvalidUTF8 = "invalid_utf8" // the line is not UTF-8
	ReasonBadField    = "bad_field"    // a reserved command with a missing or bad member
)

// reasons lists the FrameError reasons in the order of Channel's counters.
var reasons = [...]string{ReasonTooLong, ReasonInvalidJSON, ReasonInvalidUTF8, ReasonBadField}

// Message is one decoded frame.
type Message struct {
	// Cmd is the "cmd" member when the frame is an object and that member is
	// a string; otherwise it is "".
	Cmd string
	// N is the "n" member of a CmdRequests message, an integer from 0 to
	// MaxRequestsPerMessage.
	N int64
	// To is the "to" member of a CmdSend message: "all", or a worker slot
	// (1, 2, ...) as decimal text, whether it was sent as a JSON number or a
	// string.
	To string
	// Msg is the "msg" member of a CmdSend message, as it was sent.
	Msg json.RawMessage
	// Raw is the whole frame, valid JSON, without its line end.
	Raw []byte
}

// Internal reports whether m is one of Node.js's own messages (its "cmd"
// starts with "NODE_"), which shoal ignores, as Node.js keeps them from
// process.on('message').
func (m Message) Internal() bool {
	const prefix = "NODE_"
	return len(m.Cmd) > len(prefix) && m.Cmd[:len(prefix)] == prefix
}

// clone returns m with Raw and Msg copied into memory of their own.
func (m Message) clone() Message {
	b := make([]byte, len(m.Raw)+len(m.Msg))
	n := copy(b, m.Raw)
	copy(b[n:], m.Msg)
	if m.Raw != nil {
		m.Raw = b[:n:n]
	}
	if m.Msg != nil {
		m.Msg = b[n:]
	}
	return m
}

// FrameError is a bad frame. The frame has been skipped; the [Decoder] that
// returned it goes on with the next line.
type FrameError struct {
	// Reason is one of ReasonTooLong, ReasonInvalidJSON, ReasonInvalidUTF8
	// and ReasonBadField.
	Reason string
	// Len is the length of the line in bytes without its line end. For
	// ReasonTooLong it may be only the bytes seen before the limit was
	// crossed: the rest of the line is discarded unseen.
	Len int
	// Err says more, if anything: the JSON syntax error, the bad member.
	Err error
}

// Error describes the error without quoting the frame. Callers add which
// worker sent it.
func (e *FrameError) Error() string {
	s := "ipc: bad frame: " + e.Reason + " (" + strconv.Itoa(e.Len) + " bytes)"
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Unwrap returns e.Err.
func (e *FrameError) Unwrap() error { return e.Err }

// Encode returns v as one frame: its JSON, without HTML escaping, and '\n'.
func Encode(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, fmt.Errorf("ipc: encode message: %w", err)
	}
	frame := b.Bytes()
	// encoding/json writes compact JSON, so this holds; check it anyway,
	// since a stray newline would split the frame at the receiver.
	if bytes.IndexByte(frame[:len(frame)-1], '\n') >= 0 {
		return nil, errors.New("ipc: encode message: JSON contains a newline")
	}
	return frame, nil
}

// Pair returns a connected AF_UNIX SOCK_STREAM socketpair, both ends
// close-on-exec. The master end is for the master ([NewChannel]); the worker
// end is to be passed as ExtraFiles[0] of an exec.Cmd (or Files[3] of an
// os.ProcAttr), where it becomes the worker's fd 3. The master closes its
// copy of the worker end once the process has started, so that the worker's
// death shows as end of file.
func Pair() (master, worker *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("ipc: create socketpair: %w", err)
	}
	return os.NewFile(uintptr(fds[0]), "shoal-ipc-master"), os.NewFile(uintptr(fds[1]), "shoal-ipc-worker"), nil
}
