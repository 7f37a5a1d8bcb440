package supervisor

import "time"

// Backoff is the crash-loop delay policy for one slot. The first restart
// after a stable run is immediate; each quick death after that doubles the
// delay from Initial up to Max. A worker that stays up for StableAfter resets
// the count. The zero value uses 100ms, 30s and 10s.
type Backoff struct {
	Initial     time.Duration // first non-zero delay; 0 means 100ms
	Max         time.Duration // cap; 0 means 30s
	StableAfter time.Duration // uptime that resets the delay; 0 means 10s
}

func (b Backoff) withDefaults() Backoff {
	if b.Initial <= 0 {
		b.Initial = DefaultBackoffInitial
	}
	if b.Max <= 0 {
		b.Max = DefaultBackoffMax
	}
	if b.Max < b.Initial {
		b.Max = b.Initial
	}
	if b.StableAfter <= 0 {
		b.StableAfter = DefaultStableAfter
	}
	return b
}

// Delay returns how long to wait before the next start of a slot whose
// worker has died quickly failures times in a row (0 for the first death).
func (b Backoff) Delay(failures int) time.Duration {
	b = b.withDefaults()
	if failures <= 0 {
		return 0
	}
	d := b.Initial
	for i := 1; i < failures; i++ {
		d *= 2
		if d >= b.Max {
			return b.Max
		}
	}
	return min(d, b.Max)
}

// restartLimiter counts restarts in a sliding window for --max-restarts.
// The zero value with max 0 never limits.
type restartLimiter struct {
	max    int
	window time.Duration
	times  []time.Time // monotonic readings, oldest first
}

// allow records a restart at now and reports whether it stays within the
// limit.
func (l *restartLimiter) allow(now time.Time) bool {
	if l.max <= 0 {
		return true
	}
	cut := 0
	for cut < len(l.times) && now.Sub(l.times[cut]) > l.window {
		cut++
	}
	l.times = append(l.times[:0], l.times[cut:]...)
	if len(l.times) >= l.max {
		return false
	}
	l.times = append(l.times, now)
	return true
}
