package ratelog

import (
	"sync"
	"testing"
	"time"
)

type key struct {
	worker int
	reason string
}

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// A flood of a million events, one a microsecond, makes the first line and
// then one line an interval, each with the exact count suppressed since the
// last; Due reports the tail once the flood stops, and then the key is
// forgotten.
func TestFlood(t *testing.T) {
	const events = 1_000_000
	l := New[key](100 * time.Millisecond)
	k := key{3, "invalid_json"}
	type line struct {
		at         time.Duration
		suppressed uint64
	}
	var lines []line
	for i := range events {
		at := time.Duration(i) * time.Microsecond
		if n, ok := l.Allow(k, t0.Add(at)); ok {
			lines = append(lines, line{at, n})
		}
	}
	want := []line{{0, 0}}
	for at := 100 * time.Millisecond; at < time.Second; at += 100 * time.Millisecond {
		want = append(want, line{at, 99_999})
	}
	if len(lines) != len(want) {
		t.Fatalf("%d lines for %d events: %v, want %v", len(lines), events, lines, want)
	}
	for i := range want {
		if lines[i] != want[i] {
			t.Errorf("line %d: %+v, want %+v", i, lines[i], want[i])
		}
	}
	t.Logf("%d events, %d lines", events, len(lines))

	// The flood stopped at 999,999 µs; the last line was at 900 ms.
	if due := l.Due(t0.Add(999 * time.Millisecond)); due != nil {
		t.Errorf("Due before the interval passed: %v", due)
	}
	due := l.Due(t0.Add(time.Second))
	if len(due) != 1 || due[0] != (Summary[key]{k, 99_999}) {
		t.Fatalf("Due = %v, want the last 99,999", due)
	}
	var total uint64 = uint64(len(lines)) + due[0].Suppressed
	for _, ln := range lines {
		total += ln.suppressed
	}
	if total != events {
		t.Errorf("lines and suppressed counts add up to %d, want %d", total, events)
	}
	// Due counted as a line: nothing more is due, and an event within the
	// interval is suppressed.
	if n, ok := l.Allow(k, t0.Add(1050*time.Millisecond)); ok {
		t.Errorf("event 50 ms after Due's line allowed (suppressed %d)", n)
	}
	if due := l.Due(t0.Add(2 * time.Second)); len(due) != 1 || due[0].Suppressed != 1 {
		t.Errorf("Due = %v, want the one event", due)
	}
	// Quiet for an interval: forgotten, and the next event is a first.
	if due := l.Due(t0.Add(3 * time.Second)); due != nil || l.Len() != 0 {
		t.Errorf("Due = %v, %d keys; want nothing, none", due, l.Len())
	}
	if n, ok := l.Allow(k, t0.Add(3*time.Second)); !ok || n != 0 {
		t.Errorf("Allow after quiet = %d, %v; want 0, true", n, ok)
	}
}

// The next event after the interval carries the count without Due.
func TestNextEventReports(t *testing.T) {
	l := New[string](0)
	if l.Interval() != DefaultInterval {
		t.Fatalf("Interval() = %v, want %v", l.Interval(), DefaultInterval)
	}
	l.Allow("a", t0)
	for i := range 5 {
		if _, ok := l.Allow("a", t0.Add(time.Duration(i)*time.Second)); ok {
			t.Fatalf("event at %ds allowed", i)
		}
	}
	if n, ok := l.Allow("a", t0.Add(time.Hour)); !ok || n != 5 {
		t.Errorf("Allow an hour later = %d, %v; want 5, true", n, ok)
	}
}

// Keys are independent: one key's flood does not hide another's first.
func TestKeys(t *testing.T) {
	l := New[key](time.Second)
	for w := 1; w <= 3; w++ {
		for _, r := range []string{"queue_full", "too_long"} {
			for i := range 100 {
				_, ok := l.Allow(key{w, r}, t0.Add(time.Duration(i)*time.Millisecond))
				if ok != (i == 0) {
					t.Fatalf("worker %d %s event %d: allowed %v", w, r, i, ok)
				}
			}
		}
	}
	due := l.Due(t0.Add(time.Second))
	if len(due) != 6 {
		t.Fatalf("Due = %v, want 6 keys", due)
	}
	for _, s := range due {
		if s.Suppressed != 99 {
			t.Errorf("%v: %d suppressed, want 99", s.Key, s.Suppressed)
		}
	}
}

// Memory stays bounded without Due: a million distinct keys, each seen once,
// while time moves on, leave about the keys of the last interval.
func TestBoundedWithoutDue(t *testing.T) {
	l := New[int](time.Second)
	most := 0
	for i := range 1_000_000 {
		l.Allow(i, t0.Add(time.Duration(i)*time.Millisecond)) // 1,000 new keys a second
		most = max(most, l.Len())
	}
	t.Logf("at most %d keys remembered", most)
	if most > 4*1000 {
		t.Errorf("%d keys remembered, want about the 1,000 of the last interval", most)
	}
}

// Concurrent events of a few keys are all accounted for: allowed lines plus
// the suppressed counts they and Due carry equal the events. Run with -race.
func TestConcurrent(t *testing.T) {
	const (
		goroutines = 8
		per        = 20_000
	)
	l := New[int](time.Millisecond)
	var mu sync.Mutex
	var total uint64
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine uint64
			for i := range per {
				if n, ok := l.Allow(g%3, t0.Add(time.Duration(i)*time.Microsecond)); ok {
					mine += 1 + n
				}
				if i%1000 == 0 {
					for _, s := range l.Due(t0.Add(time.Duration(i) * time.Microsecond)) {
						mine += s.Suppressed
					}
				}
			}
			mu.Lock()
			total += mine
			mu.Unlock()
		}()
	}
	wg.Wait()
	for _, s := range l.Due(t0.Add(time.Hour)) {
		total += s.Suppressed
	}
	if total != goroutines*per {
		t.Errorf("accounted for %d events, want %d", total, goroutines*per)
	}
}

func BenchmarkAllow(b *testing.B) {
	l := New[key](time.Second)
	k := key{1, "invalid_json"}
	now := time.Now()
	b.ReportAllocs()
	for b.Loop() {
		l.Allow(k, now)
	}
}
