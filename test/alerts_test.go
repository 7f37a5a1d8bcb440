package test

// deploy/prometheus's alert rules, checked by promtool and against the
// metrics the binary serves.

import (
	"context"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/peer"
	"github.com/shoal-sh/shoal/internal/testutil"
)

// TestAlertRules checks deploy/prometheus/alerts.yml with promtool, runs
// its unit tests, and checks that every metric it names is one the binary
// serves.
func TestAlertRules(t *testing.T) {
	promtool := peer.Require(t, "promtool")
	dir := filepath.Join(moduleRoot, "deploy", "prometheus")
	for _, args := range [][]string{{"check", "rules", "alerts.yml"}, {"test", "rules", "alerts_test.yml"}} {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		cmd := exec.CommandContext(ctx, promtool, args...)
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		cancel()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}

	// The names, against a live scrape.
	port := testutil.FreePort(t)
	addr := loopbackAddr(t)
	startShoal(t, nil, "--workers", "1", "--port", strconv.Itoa(port), "--host", "127.0.0.1", "--metrics-addr", addr)
	waitHTTPStatus(t, http.DefaultClient, "http://"+addr+"/readyz", 200, 15*time.Second, nil)
	samples := waitMetric(t, "http://"+addr+"/metrics", 15*time.Second, "a listening worker", func(s map[string]float64) bool {
		return s["shoal_workers_listening"] == 1
	})
	served := map[string]bool{}
	for series := range samples {
		name, _, _ := strings.Cut(series, "{")
		served[name] = true
	}
	names := regexp.MustCompile(`\b(?:shoal|process)_[a-z_]+\b`)
	for _, f := range []string{"alerts.yml", "alerts_test.yml"} {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			// Expressions and series, not the prose of descriptions.
			trimmed := strings.TrimSpace(line)
			if !strings.HasPrefix(trimmed, "expr:") && !strings.HasPrefix(trimmed, "- series:") {
				continue
			}
			for _, n := range names.FindAllString(trimmed, -1) {
				if !served[n] {
					t.Errorf("%s: %s is not a metric the binary serves: %s", f, n, trimmed)
				}
			}
		}
	}
}
