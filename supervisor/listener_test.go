package supervisor

import (
	"slices"
	"strings"
	"testing"
)

func TestParseListeners(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []Listener
		err  string
	}{
		{"8000", []Listener{{"tcp", 8000}}, ""},
		{"tcp:443,udp:443", []Listener{{"tcp", 443}, {"udp", 443}}, ""},
		{" UDP:5353 ", []Listener{{"udp", 5353}}, ""},
		{"udp:", nil, `listener "udp:": want a port number`},
		{"sctp:80", nil, `listener "sctp:80": want tcp:PORT`},
		{"tcp:70000", nil, "want a port number 1..65535"},
		{"tcp:0", nil, "want a port number 1..65535"},
		{"8000,tcp:8000", nil, "listener tcp:8000 given twice"},
		{"", nil, "want a port number"},
	} {
		got, err := ParseListeners(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ParseListeners(%q) = %v, %v; want an error saying %q", tc.in, got, err, tc.err)
			}
			continue
		}
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("ParseListeners(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
		}
	}
}
