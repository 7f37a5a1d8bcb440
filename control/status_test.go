package control

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestStatusTable(t *testing.T) {
	var st Status
	// As the master sends it.
	in := `{"desired":2,"reloading":false,"stopping":false,"workers":[
		{"slot":1,"pid":40112,"state":"listening","uptime_seconds":192.4,"restarts":0,"reloads":1,"requests":18234},
		{"slot":2,"pid":0,"state":"dead","uptime_seconds":0,"restarts":3,"reloads":0,"requests":17990}]}`
	if err := json.Unmarshal([]byte(in), &st); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	if err := st.WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	want := "SLOT  PID    STATE      UPTIME  RESTARTS  RELOADS  REQUESTS\n" +
		"1     40112  listening  3m12s   0         1        18234\n" +
		"2     -      dead       -       3         0        17990\n"
	if b.String() != want {
		t.Errorf("table:\n%s\nwant:\n%s", b.String(), want)
	}
	out, err := json.Marshal(Status{Workers: []WorkerStatus{{Slot: 1, Restarts: 2, Reloads: 5}}})
	if err != nil || !strings.Contains(string(out), `"restarts":2,"reloads":5`) {
		t.Errorf("marshaled: %s, %v", out, err)
	}
}

func TestStatusTableEscapes(t *testing.T) {
	st := Status{Workers: []WorkerStatus{{Slot: 1, PID: 7, State: "\x1b]0;pwned\x07\x1b[2Jlistening\r\n\u009b31m\u202eevil\xff"}}}
	var b strings.Builder
	st.WriteTable(&b)
	got := b.String()
	for _, c := range []string{"\x1b", "\x07", "\r", "\u009b", "\u202e", "\xff"} {
		if strings.Contains(got, c) {
			t.Errorf("table has %q unescaped:\n%q", c, got)
		}
	}
	if want := `\x1b]0;pwned\a\x1b[2Jlistening\r\n\u009b31m\u202eevil\xff`; !strings.Contains(got, want) {
		t.Errorf("table:\n%s\nwant the state as %s", got, want)
	}
}

func TestPrintable(t *testing.T) {
	for in, want := range map[string]string{
		"":                        "",
		"listening":               "listening",
		"naïve 日本 ok":             "naïve 日本 ok",
		"a\tb":                    `a\tb`,
		"\x00":                    `\x00`,
		"\x7f":                    `\x7f`,
		"\u200b":                  `\u200b`,
		"bad \xc3 utf-8":          `bad \xc3 utf-8`,
		"real \ufffd replacement": `real \ufffd replacement`,
	} {
		if got := Printable(in); got != want {
			t.Errorf("Printable(%q) = %q, want %q", in, got, want)
		}
	}
}
