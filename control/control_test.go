package control

import (
	"bytes"
	"encoding/json"
	"slices"
	"strings"
	"testing"
)

func TestParseRequest(t *testing.T) {
	for _, tc := range []struct {
		line string
		want Request
	}{
		{`{"cmd":"status"}`, Request{Cmd: CmdStatus}},
		{`{"cmd":"reload"}` + "\n", Request{Cmd: CmdReload}},
		{`{"cmd":"stop"}` + "\r\n", Request{Cmd: CmdStop}},
		{` { "n" : 4 , "cmd" : "scale" } `, Request{Cmd: CmdScale, N: 4}},
		{`{"cmd":"scale","n":9223372036854775807}`, Request{Cmd: CmdScale, N: 1<<63 - 1}},
		{`{"cmd":"send","worker":2,"msg":{"op": "x", "a": [1, 2]}}`, Request{Cmd: CmdSend, Worker: 2, Msg: json.RawMessage(`{"op":"x","a":[1,2]}`)}},
		{`{"cmd":"send","worker":1,"msg":null}`, Request{Cmd: CmdSend, Worker: 1, Msg: json.RawMessage(`null`)}},
		{`{"cmd":"broadcast","msg":"hi \u00e9\n"}`, Request{Cmd: CmdBroadcast, Msg: json.RawMessage(`"hi \u00e9\n"`)}},
		{`{"cmd":"broadcast","msg":0}`, Request{Cmd: CmdBroadcast, Msg: json.RawMessage(`0`)}},
		{`{"cmd":"signal","signal":"USR1"}`, Request{Cmd: CmdSignal, Signal: "USR1"}},
		{`{"cmd":"signal","signal":"hup","worker":2}`, Request{Cmd: CmdSignal, Signal: "hup", Worker: 2}},
		{`{"c\u006dd":"st\u0061tus"}`, Request{Cmd: CmdStatus}},
	} {
		got, err := ParseRequest([]byte(tc.line))
		if err != nil {
			t.Errorf("ParseRequest(%s): %v", tc.line, err)
			continue
		}
		if got.Cmd != tc.want.Cmd || got.N != tc.want.N || got.Worker != tc.want.Worker || !bytes.Equal(got.Msg, tc.want.Msg) {
			t.Errorf("ParseRequest(%s) = %+v (msg %s), want %+v (msg %s)", tc.line, got, got.Msg, tc.want, tc.want.Msg)
		}
	}
}

func TestParseRequestErrors(t *testing.T) {
	long := `{"cmd":"broadcast","msg":"` + strings.Repeat("x", MaxRequest) + `"}`
	for _, tc := range []struct {
		line string
		want string // in the error
	}{
		{long, "1048604 bytes, over the limit of 1048576 (MaxRequest)"},
		{"", `empty line: want a JSON object such as {"cmd":"status"}`},
		{" \t\r\n", "empty line"},
		{"\n", "empty line"},
		{"{\"cmd\":\"status\xff\"}", "not valid UTF-8"},
		{`{"cmd":"status"`, "invalid JSON at byte 15: unexpected end of JSON input"},
		{`{"cmd":status}`, "invalid JSON at byte 8: invalid character 's'"},
		{`{"cmd":"status"} {"cmd":"stop"}`, "invalid JSON at byte 18: invalid character '{' after top-level value"},
		{`{"cmd":"status"}` + "\n" + `{"cmd":"stop"}`, "invalid JSON"},
		{`[{"cmd":"status"}]`, `a JSON array, want an object such as {"cmd":"status"}`},
		{`"status"`, "a JSON string, want an object"},
		{`null`, "a JSON null, want an object"},
		{`42`, "a JSON number, want an object"},
		{`true`, "a JSON boolean, want an object"},
		{`{}`, `no "cmd": want one of status, reload, scale, send, broadcast, signal, stop`},
		{`{"n":2}`, `no "cmd"`},
		{`{"cmd":3}`, `"cmd" is a JSON number, want a string: want one of status, reload`},
		{`{"cmd":null}`, `"cmd" is a JSON null, want a string`},
		{`{"cmd":"halt"}`, `unknown cmd "halt": want one of status, reload, scale, send, broadcast, signal, stop`},
		{`{"cmd":"Status"}`, `unknown cmd "Status"`},
		{`{"cmd":""}`, `unknown cmd ""`},
		{`{"cmd":"status","cmd":"stop"}`, `"cmd" given twice`},
		{`{"cmd":"scale","n":2,"n":3}`, `"n" given twice`},
		{`{"cmd":"status","workers":2}`, `unknown member "workers": a request has "cmd" and, by command, "n" (scale), "worker" (send, signal), "msg" (send, broadcast) or "signal" (signal)`},
		{`{"cmd":"signal"}`, `signal needs "signal"`},
		{`{"cmd":"signal","signal":7}`, `"signal" is a JSON number, want a string`},
		{`{"cmd":"signal","signal":"USR1; rm"}`, `want a signal's name`},
		{`{"cmd":"signal","signal":"USR1","worker":0}`, `"worker" is 0, want at least 1`},
		{`{"cmd":"status","signal":"USR1"}`, `status takes no "signal"`},
		{`{"Cmd":"status"}`, `unknown member "Cmd"`},
		{`{"cmd":"status","N":2}`, `unknown member "N"`},
		{`{"cmd":"status","n":2}`, `status takes no "n"`},
		{`{"cmd":"stop","worker":2}`, `stop takes no "worker"`},
		{`{"cmd":"reload","msg":{}}`, `reload takes no "msg"`},
		{`{"cmd":"scale","msg":1,"n":1}`, `scale takes no "msg"`},
		{`{"cmd":"broadcast","worker":1,"msg":1}`, `broadcast takes no "worker"`},
		{`{"cmd":"send","n":1,"worker":1,"msg":1}`, `send takes no "n"`},
		{`{"cmd":"scale"}`, `scale needs "n", the number of workers, at least 1`},
		{`{"cmd":"scale","n":0}`, `scale: "n" is 0, want at least 1`},
		{`{"cmd":"scale","n":-3}`, `scale: "n" is -3, want at least 1`},
		{`{"cmd":"scale","n":-0}`, `scale: "n" is 0, want at least 1`},
		{`{"cmd":"scale","n":2.5}`, `scale: "n" is 2.5, want a whole number of at least 1`},
		{`{"cmd":"scale","n":2.0}`, `scale: "n" is 2.0, want a whole number`},
		{`{"cmd":"scale","n":1e3}`, `scale: "n" is 1e3, want a whole number`},
		{`{"cmd":"scale","n":"3"}`, `scale: "n" is "3", want a whole number`},
		{`{"cmd":"scale","n":null}`, `scale: "n" is null, want a whole number`},
		{`{"cmd":"scale","n":[1]}`, `scale: "n" is [1], want a whole number`},
		{`{"cmd":"scale","n":99999999999999999999}`, `scale: "n" is 99999999999999999999, too large`},
		{`{"cmd":"scale","n":"` + strings.Repeat("é", 30) + `"}`, `scale: "n" is "` + strings.Repeat("é", 19) + `..., want`},
		{`{"cmd":"send","msg":1}`, `send needs "worker", the worker's slot, at least 1`},
		{`{"cmd":"send","worker":1}`, `send needs "msg", the message, any JSON value`},
		{`{"cmd":"send"}`, `send needs "worker"`},
		{`{"cmd":"send","worker":0,"msg":1}`, `send: "worker" is 0, want at least 1`},
		{`{"cmd":"send","worker":true,"msg":1}`, `send: "worker" is true, want a whole number`},
		{`{"cmd":"broadcast"}`, `broadcast needs "msg", the message, any JSON value`},
	} {
		_, err := ParseRequest([]byte(tc.line))
		if err == nil {
			t.Errorf("ParseRequest(%.60q) succeeded, want an error with %q", tc.line, tc.want)
			continue
		}
		if !strings.HasPrefix(err.Error(), "control: bad request: ") || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseRequest(%.60q) = %q, want control: bad request: ...%s...", tc.line, err, tc.want)
		}
	}
}

func TestParseRequestLimit(t *testing.T) {
	pad := MaxRequest - len(`{"cmd":"broadcast","msg":""}`)
	line := []byte(`{"cmd":"broadcast","msg":"` + strings.Repeat("x", pad) + `"}`)
	if len(line) != MaxRequest {
		t.Fatalf("line is %d bytes", len(line))
	}
	for _, end := range []string{"", "\n", "\r\n"} {
		if _, err := ParseRequest(append(slices.Clip(line), end...)); err != nil {
			t.Errorf("a request of MaxRequest bytes with line end %q: %v", end, err)
		}
	}
	if _, err := ParseRequest(append([]byte(" "), line...)); err == nil {
		t.Errorf("a request of MaxRequest+1 bytes was accepted")
	}
}

// FuzzParseRequest checks that ParseRequest never panics, that what it
// accepts is a well-formed request of a known command that marshals to
// JSON, and that the JSON parses back to the same request. The seed corpus
// is in testdata/fuzz/FuzzParseRequest.
func FuzzParseRequest(f *testing.F) {
	f.Fuzz(func(t *testing.T, line []byte) {
		req, err := ParseRequest(line)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "control: bad request: ") {
				t.Fatalf("error %q", err)
			}
			return
		}
		switch req.Cmd {
		case CmdStatus, CmdReload, CmdStop, CmdUpgrade:
			if req.N != 0 || req.Worker != 0 || req.Msg != nil {
				t.Fatalf("%s with members: %+v", req.Cmd, req)
			}
		case CmdScale:
			if req.N < 1 || req.Worker != 0 || req.Msg != nil {
				t.Fatalf("bad scale: %+v", req)
			}
		case CmdSend:
			if req.N != 0 || req.Worker < 1 || !json.Valid(req.Msg) {
				t.Fatalf("bad send: %+v", req)
			}
		case CmdBroadcast:
			if req.N != 0 || req.Worker != 0 || !json.Valid(req.Msg) {
				t.Fatalf("bad broadcast: %+v", req)
			}
		default:
			t.Fatalf("unknown cmd %q accepted", req.Cmd)
		}
		b, err := json.Marshal(req)
		if err != nil || !json.Valid(b) || bytes.IndexByte(b, '\n') >= 0 {
			t.Fatalf("%+v marshals to %q, %v", req, b, err)
		}
		again, err := ParseRequest(b)
		if err != nil {
			t.Fatalf("%q, marshaled from %q, does not parse: %v", b, line, err)
		}
		// json.Marshal escapes <, >, & and U+2028/9 in the message.
		var msg bytes.Buffer
		json.HTMLEscape(&msg, req.Msg)
		if again.Cmd != req.Cmd || again.N != req.N || again.Worker != req.Worker || !bytes.Equal(again.Msg, msg.Bytes()) {
			t.Fatalf("%q parses to %+v, then to %+v", line, req, again)
		}
	})
}
