package test

import (
	"syscall"
	"testing"
	"time"
)

// deafScript: worker 1 relays 1 MiB messages to every other worker as fast
// as it can; the others never read fd 3 (the flood that once took a master
// to 4.78 GB in 33 s). Worker 1 then floods 2-byte bad lines.
const deafScript = `if [ "$SHOAL_WORKER_ID" = 1 ]; then
  f=$(mktemp)
  { printf '{"cmd":"shoal:send","to":"all","msg":"'; head -c 1048000 /dev/zero | tr '\0' a; printf '"}\n'; } >"$f"
  end=$(( $(date +%s) + 4 ))
  while [ "$(date +%s)" -lt "$end" ]; do cat "$f" "$f" "$f" "$f" "$f" "$f" "$f" "$f"; done >&3
  rm -f "$f"
  timeout 3 yes x >&3
fi
if [ "$SHOAL_WORKER_ID" = 2 ]; then
  # Deaf too, but it reports exactly 1000 requests amid the flood.
  i=0; while [ $i -lt 1000 ]; do echo '{"cmd":"notifyRequest"}'; i=$((i+1)); done >&3
fi
exec sleep 3600`

// TestDeafWorkersCannotExhaustTheMaster: workers that never read cost the
// master a bounded amount of memory, and a flooding worker a bounded number
// of log lines, while every drop and bad line is still counted.
func TestDeafWorkersCannotExhaustTheMaster(t *testing.T) {
	maddr := loopbackAddr(t)
	m := startShoal(t, []string{"SHOAL_LOG_LEVEL=info"}, "--workers", "4", "--port", "0",
		"--metrics-addr", maddr, "--", "sh", "-c", deafScript)
	url := "http://" + maddr + "/metrics"
	peak := 0
	deadline := time.Now().Add(7500 * time.Millisecond)
	for time.Now().Before(deadline) {
		peak = max(peak, rssOf(t, m.pid()))
		time.Sleep(50 * time.Millisecond)
	}
	s := scrape(t, url)
	var dropped float64
	for _, w := range []string{"2", "3", "4"} {
		dropped += s[`shoal_ipc_dropped_messages_total{worker="`+w+`"}`]
	}
	relayed := s[`shoal_ipc_received_messages_total{worker="1"}`]
	bad := s[`shoal_ipc_errors_total{reason="invalid_json",worker="1"}`]
	t.Logf("%v 1 MiB messages relayed from worker 1, %v copies dropped; %v bad lines; master peak RSS %d MiB",
		relayed, dropped, bad, peak>>20)
	if got := s[`shoal_requests_total{worker="2"}`]; got != 1000 {
		t.Errorf("worker 2 reported 1000 requests amid the flood, the master counted %v", got)
	}
	limit := 100 << 20
	if raceEnabled {
		limit = 300 << 20 // the race detector's shadow memory
	}
	if peak > limit {
		t.Errorf("master peak RSS %d MiB, want under %d MiB (4 MiB queued per worker, 64 MiB in all)", peak>>20, limit>>20)
	}
	if dropped == 0 || bad < 1000 {
		t.Fatalf("no flood: %v dropped, %v bad lines", dropped, bad)
	}

	// Every drop and every bad line is in the log, as a line or in the
	// count of a later one; the counts of the bursts come within 10 s of
	// their end.
	account := func() (lines int, drops, bads float64) {
		for _, e := range m.logs.entries(func(e entry) bool { return e.str("level") == "warn" }) {
			n, _ := e["suppressed"].(float64)
			if e.str("message") != "more warnings about worker suppressed" {
				n++
			}
			switch e.str("reason") {
			case "queue_full", "queue_bytes", "budget", "too_large", "closed":
				drops += n
			case "invalid_json":
				bads += n
			}
			lines++
		}
		return lines, drops, bads
	}
	var lines int
	var drops, bads float64
	for end := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		// The flood may still run on a busy machine: compare with the
		// counters as they are now; both stop once it ends.
		s := scrape(t, url)
		dropped = 0
		for _, w := range []string{"2", "3", "4"} {
			dropped += s[`shoal_ipc_dropped_messages_total{worker="`+w+`"}`]
		}
		bad = s[`shoal_ipc_errors_total{reason="invalid_json",worker="1"}`]
		if lines, drops, bads = account(); drops == dropped && bads == bad {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("the log accounts for %v drops and %v bad lines, want %v and %v", drops, bads, dropped, bad)
		}
	}
	t.Logf("%d warnings, %d bytes of log in all", lines, len(m.logs.String()))
	if lines > 20 {
		t.Errorf("%d warnings for one flooding worker, want a few (rate-limited)", lines)
	}
	m.signal(syscall.SIGTERM)
	if code := m.wait(15 * time.Second); code != 0 {
		t.Errorf("exit code %d, want 0", code)
	}
}
