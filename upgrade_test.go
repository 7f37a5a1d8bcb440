package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/shoal-sh/shoal/supervisor"
)

// 'shoal upgrade-check ARGS' says what this program is, and exits 2 with
// the reason when it would refuse the master's arguments.
func TestUpgradeCheck(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		err  string
	}{
		{[]string{"--workers", "2", "--port", "8000"}, exitOK, ""},
		{[]string{"--workers", "2", "--no-such-flag"}, exitUsage, "no-such-flag"},
		{[]string{"--workers", "-3"}, exitUsage, "workers"},
	} {
		var stdout, stderr bytes.Buffer
		code := runUpgradeCheck(tc.args, &stdout, &stderr)
		var c supervisor.Check
		if err := json.Unmarshal(stdout.Bytes(), &c); err != nil || c.Program != "shoal" || c.Version != version || len(c.StateFormats) == 0 || c.StateFormats[0] != supervisor.StateFormat {
			t.Errorf("%q: check line %q: %v", tc.args, stdout.String(), err)
		}
		if code != tc.code || !strings.Contains(stderr.String(), tc.err) {
			t.Errorf("%q: exit %d, stderr %q; want %d and %q", tc.args, code, stderr.String(), tc.code, tc.err)
		}
	}
}
