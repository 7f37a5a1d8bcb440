// Package control is shoal's control socket: a Unix socket on which the
// master takes JSON-line requests (status, reload, scale, send, broadcast,
// stop) from `shoal ctl`, open only to the master's own user and root.
//
// The master calls [Listen] and [Server.Serve] with a [Handler] that carries
// out the commands; `shoal ctl` calls [Dial] and [Client.Do]. [DefaultPath]
// is where both look when no path is given. The result of status is a
// [Status], which [Status.WriteTable] prints as `shoal ctl status` does.
//
// # Protocol
//
// One JSON object per line each way, UTF-8, ended by '\n'. A connection may
// carry several requests; each is answered, in order, by one response line,
// and the next request is read only after the previous one is answered.
//
// A request names its command in "cmd":
//
//	{"cmd":"status"}                            the workers and their states
//	{"cmd":"reload"}                            roll every worker over; answered when the reload ends
//	{"cmd":"scale","n":4}                       run n workers (n >= 1)
//	{"cmd":"send","worker":2,"msg":{"op":"x"}}  send msg to the worker in slot 2 (worker >= 1)
//	{"cmd":"broadcast","msg":{"op":"x"}}        send msg to every worker
//	{"cmd":"signal","signal":"USR1"}            send a signal to every worker
//	{"cmd":"signal","signal":"HUP","worker":2}  send a signal to the worker in slot 2
//	{"cmd":"stop"}                              stop shoal gracefully
//
// "n" and "worker" are whole numbers; "msg" is any JSON value, null
// included. A request has no other members, no member twice, and only the
// members its command takes: {"cmd":"stop","worker":2} is refused rather
// than read as "stop", so that a mistake never turns into another command.
// A request is at most [MaxRequest] bytes (1 MiB), not counting its line
// end; a "\r\n" line end is accepted.
//
// A response says whether the command succeeded, with a result for the
// commands that have one (status, a [Status]) or an error message:
//
//	{"ok":true}
//	{"ok":true,"result":{"desired":2,"reloading":false,"stopping":false,"workers":[{"slot":1,"pid":40112,"state":"listening","uptime_seconds":192.4,"restarts":0,"reloads":1,"requests":18234},...]}}
//	{"ok":false,"error":"control: bad request: unknown cmd \"halt\": want one of status, reload, scale, send, broadcast, signal, stop"}
//
// Every request line is answered, a bad one with "ok":false, and the
// connection goes on. A line longer than MaxRequest is answered with an
// error and the connection is closed. The master closes a connection that
// sends nothing for 30 seconds, and it serves at most 16 connections at
// once: when 16 are open, a new connection takes the place of the one that
// has been idle (between requests) the longest, which is closed, so idle
// connections cannot keep the owner out; only when all 16 are in the middle
// of a request is a new one answered {"ok":false,"error":"busy: ..."} and
// closed.
//
// # Access
//
// The master: every directory and symlink on the way to the socket must
// belong to the master's user or root, and the socket's own directory must
// be writable by no one else, not even if it is sticky like /tmp, where
// anyone could take the socket's name first. Each is looked at with lstat
// and opened with O_NOFOLLOW, relative to the one before; symlinks are
// resolved by hand, each checked. Missing directories are created mode
// 0700. The socket is a file mode 0600, created under that mode. Its lock,
// held while a master checks and replaces the path, is a file mode 0600
// beside it, so that no other user can hold it. Each connection is checked
// with SO_PEERCRED: a peer that is neither the master's user nor root is
// answered
// {"ok":false,"error":"permission denied: uid N is not the master's uid M or root"}
// and closed. Abstract Unix sockets, which have no permissions, are not
// used.
//
// The client: [Dial] makes the same checks of the path (every directory
// and symlink on the way, and the socket itself, the caller's or root's;
// the socket's directory writable by no one else), connects through the
// directory it checked, and then checks with SO_PEERCRED that the process
// that listens is the caller's or root's. So a request, and the secrets a
// broadcast may carry, never reach a socket another user made, at a path
// they could predict, and an answer is never another user's. Root talks
// only to root's masters: to control another user's master, run `shoal
// ctl` as that user. A directory above the socket's that others may write
// to without the sticky bit lets them rename what is in it: they can make
// `shoal ctl` fail, not talk to them.
package control

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"
)

// MaxRequest is the limit on one request line in bytes, not counting its
// line end.
const MaxRequest = 1 << 20

// The commands, the values of [Request].Cmd.
const (
	CmdStatus    = "status"    // report the workers; the result is the handler's
	CmdReload    = "reload"    // roll every worker over
	CmdScale     = "scale"     // run Request.N workers
	CmdSend      = "send"      // send Request.Msg to the worker in slot Request.Worker
	CmdBroadcast = "broadcast" // send Request.Msg to every worker
	CmdSignal    = "signal"    // send Request.Signal to the worker in slot Request.Worker, or to all when it is 0
	CmdStop      = "stop"      // stop shoal gracefully
	CmdUpgrade   = "upgrade"   // replace the master's program in place; on success the connection closes with no answer
)

// cmds lists the commands in the order error messages name them.
var cmds = []string{CmdStatus, CmdReload, CmdScale, CmdSend, CmdBroadcast, CmdSignal, CmdStop, CmdUpgrade}

// wantCmd ends the error messages about a bad or missing cmd.
var wantCmd = "want one of " + strings.Join(cmds, ", ")

// Request is one request to the master. [ParseRequest] accepts exactly the
// members a command takes, so N is 0 except for scale, Worker is 0 except
// for send, and Msg is nil except for send and broadcast.
type Request struct {
	Cmd    string          `json:"cmd"`              // one of the Cmd constants
	N      int             `json:"n,omitempty"`      // scale: the number of workers, at least 1
	Worker int             `json:"worker,omitempty"` // send: the worker's slot, at least 1; signal: the same, or 0 (absent) for every worker
	Signal string          `json:"signal,omitempty"` // signal: the signal's name (USR1, SIGHUP) or number
	Msg    json.RawMessage `json:"msg,omitempty"`    // send, broadcast: the message, any JSON value
}

// Response is the master's answer to one request.
type Response struct {
	OK     bool            `json:"ok"`
	Error  string          `json:"error,omitempty"`  // why the command failed, when OK is false
	Result json.RawMessage `json:"result,omitempty"` // command-specific, such as status's workers
}

// members are the members other than "cmd", in the order error messages
// name them, with what each is.
var members = []struct{ name, what string }{
	{"n", "the number of workers, at least 1"},
	{"worker", "the worker's slot, at least 1"},
	{"msg", "the message, any JSON value"},
	{"signal", "the signal's name, such as USR1, or its number"},
}

// takes reports whether cmd takes the member name.
func takes(cmd, name string) bool {
	switch name {
	case "cmd":
		return true
	case "n":
		return cmd == CmdScale
	case "worker":
		return cmd == CmdSend || cmd == CmdSignal
	case "msg":
		return cmd == CmdSend || cmd == CmdBroadcast
	case "signal":
		return cmd == CmdSignal
	}
	return false
}

// optional reports whether cmd may go without the member name: a signal
// with no "worker" goes to every worker.
func optional(cmd, name string) bool { return cmd == CmdSignal && name == "worker" }

// ParseRequest decodes and checks one request line, with or without its
// line end. It accepts a JSON object of at most MaxRequest bytes, in UTF-8,
// whose members are "cmd", a known command, and exactly the members that
// command takes, each once and of the right type: "n" >= 1 for scale,
// "worker" >= 1 and "msg" for send, "msg" for broadcast. Otherwise the
// error says what is wrong and what is expected. Msg is returned compacted.
func ParseRequest(line []byte) (Request, error) {
	line = bytes.TrimSuffix(line, []byte("\n"))
	line = bytes.TrimSuffix(line, []byte("\r"))
	if len(line) > MaxRequest {
		return Request{}, badf("%d bytes, over the limit of %d (MaxRequest)", len(line), MaxRequest)
	}
	if len(bytes.TrimSpace(line)) == 0 {
		return Request{}, badf(`empty line: want a JSON object such as {"cmd":"status"}`)
	}
	if !utf8.Valid(line) {
		return Request{}, badf("not valid UTF-8")
	}
	var top json.RawMessage
	if err := json.Unmarshal(line, &top); err != nil {
		var se *json.SyntaxError
		if errors.As(err, &se) {
			return Request{}, badf("invalid JSON at byte %d: %v", se.Offset, err)
		}
		return Request{}, badf("invalid JSON: %v", err)
	}
	if top[0] != '{' {
		return Request{}, badf(`a JSON %s, want an object such as {"cmd":"status"}`, kind(top))
	}
	m, err := objectMembers(top)
	if err != nil {
		return Request{}, err
	}

	var req Request
	raw, ok := m["cmd"]
	if !ok {
		return Request{}, badf(`no "cmd": %s`, wantCmd)
	}
	if raw[0] != '"' {
		return Request{}, badf(`"cmd" is a JSON %s, want a string: %s`, kind(raw), wantCmd)
	}
	if err := json.Unmarshal(raw, &req.Cmd); err != nil {
		return Request{}, badf(`"cmd": %v`, err)
	}
	known := false
	for _, c := range cmds {
		known = known || req.Cmd == c
	}
	if !known {
		return Request{}, badf("unknown cmd %s: %s", snippet(raw), wantCmd)
	}
	for _, mb := range members {
		if _, ok := m[mb.name]; ok && !takes(req.Cmd, mb.name) {
			return Request{}, badf("%s takes no %q", req.Cmd, mb.name)
		}
	}
	for _, mb := range members {
		if !takes(req.Cmd, mb.name) {
			continue
		}
		raw, ok := m[mb.name]
		if !ok && optional(req.Cmd, mb.name) {
			continue
		}
		if !ok {
			return Request{}, badf("%s needs %q, %s", req.Cmd, mb.name, mb.what)
		}
		switch mb.name {
		case "n":
			req.N, err = count(req.Cmd, mb.name, raw)
		case "worker":
			req.Worker, err = count(req.Cmd, mb.name, raw)
		case "msg":
			var b bytes.Buffer
			err = json.Compact(&b, raw)
			req.Msg = b.Bytes()
		case "signal":
			req.Signal, err = signalName(raw)
		}
		if err != nil {
			return Request{}, err
		}
	}
	return req, nil
}

// objectMembers returns the members of the JSON object obj, which is valid
// JSON. It refuses unknown and repeated members.
func objectMembers(obj []byte) (map[string]json.RawMessage, error) {
	d := json.NewDecoder(bytes.NewReader(obj))
	if _, err := d.Token(); err != nil { // '{'
		return nil, badf("invalid JSON: %v", err)
	}
	m := make(map[string]json.RawMessage, 4)
	for d.More() {
		tok, err := d.Token()
		if err != nil {
			return nil, badf("invalid JSON: %v", err)
		}
		name, _ := tok.(string)
		var v json.RawMessage
		if err := d.Decode(&v); err != nil {
			return nil, badf("invalid JSON: %v", err)
		}
		switch name {
		case "cmd", "n", "worker", "msg", "signal":
		default:
			return nil, badf(`unknown member %q: a request has "cmd" and, by command, "n" (scale), "worker" (send, signal), "msg" (send, broadcast) or "signal" (signal)`, name)
		}
		if _, dup := m[name]; dup {
			return nil, badf("%q given twice", name)
		}
		m[name] = v
	}
	return m, nil
}

// count parses raw, the member name of a cmd request, as a whole number of
// at least 1.
func count(cmd, name string, raw json.RawMessage) (int, error) {
	s := string(raw)
	if strings.ContainsAny(s, ".eE") || (s[0] != '-' && (s[0] < '0' || s[0] > '9')) {
		return 0, badf("%s: %q is %s, want a whole number of at least 1", cmd, name, snippet(raw))
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0, badf("%s: %q is %s, too large", cmd, name, snippet(raw))
	}
	if n < 1 {
		return 0, badf("%s: %q is %d, want at least 1", cmd, name, n)
	}
	return n, nil
}

// signalName parses the "signal" member: a string of at most 16 letters
// and digits. Whether it names a signal is for the handler to say.
func signalName(raw json.RawMessage) (string, error) {
	var s string
	if raw[0] != '"' || json.Unmarshal(raw, &s) != nil {
		return "", badf(`signal: "signal" is a JSON %s, want a string such as "USR1"`, kind(raw))
	}
	if s == "" || len(s) > 16 || strings.IndexFunc(s, func(r rune) bool {
		return !(r >= 'A' && r <= 'Z' || r >= 'a' && r <= 'z' || r >= '0' && r <= '9')
	}) >= 0 {
		return "", badf(`signal: "signal" is %s, want a signal's name such as "USR1" or its number`, snippet(raw))
	}
	return s, nil
}

// badf returns a bad request error.
func badf(format string, args ...any) error {
	return fmt.Errorf("control: bad request: "+format, args...)
}

// kind names the type of the JSON value v.
func kind(v []byte) string {
	switch v[0] {
	case '{':
		return "object"
	case '[':
		return "array"
	case '"':
		return "string"
	case 't', 'f':
		return "boolean"
	case 'n':
		return "null"
	}
	return "number"
}

// snippet returns the JSON value v for an error message, cut short if long.
func snippet(v []byte) string {
	const max = 40
	if len(v) <= max {
		return string(v)
	}
	cut := max
	for cut > 0 && !utf8.RuneStart(v[cut]) {
		cut--
	}
	return string(v[:cut]) + "..."
}
