// Package peer is the tests' rule for outside programs they need (nginx,
// Node.js, Prometheus, unshare, ...): when one is missing the test skips,
// unless SHOAL_REQUIRE_PEERS=1, which .ci/run sets, where it fails, so CI
// can never pass by skipping.
package peer

import (
	"fmt"
	"os"
	"os/exec"
	"testing"
)

// Required reports whether a missing peer fails the test instead of
// skipping it.
func Required() bool { return os.Getenv("SHOAL_REQUIRE_PEERS") == "1" }

// Require returns the path of the program name, or ends the test: a skip,
// or a failure when peers are required.
func Require(tb testing.TB, name string) string {
	tb.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		Missing(tb, "%s not found in PATH; .ci/run installs it", name)
	}
	return path
}

// Missing ends the test because something it needs is not there: a skip,
// or a failure when peers are required.
func Missing(tb testing.TB, format string, args ...any) {
	tb.Helper()
	msg := fmt.Sprintf(format, args...)
	if Required() {
		tb.Fatalf("%s (SHOAL_REQUIRE_PEERS=1: required)", msg)
	}
	tb.Skip(msg)
}
