// Package ratelog limits repeated log lines: the first occurrence of an
// event is logged at once, later ones at most once an interval, as one line
// that says how many were left out since the last.
//
// A worker that floods the master with bad lines or undeliverable messages
// would otherwise fill the master's log as fast as it can write: 1.6 million
// two-byte bad lines once made 388 MB of warnings in five seconds. With a
// Limiter keyed by worker and reason, the same flood makes one line at once
// and one every interval after.
//
// Use:
//
//	l := ratelog.New[Key](0) // DefaultInterval
//	...
//	if n, ok := l.Allow(Key{worker, reason}, time.Now()); ok {
//		log.Warn()....Uint64("suppressed", n).Msg(...)
//	}
//
// and, on a ticker (a tenth of the interval, say), report the counts that
// no later event will:
//
//	for _, s := range l.Due(time.Now()) {
//		log.Warn()....Uint64("suppressed", s.Suppressed).Msg(...)
//	}
//
// A Limiter starts no goroutine; it is safe for concurrent use. The time is
// the caller's, so tests need no clock.
package ratelog

import (
	"sync"
	"time"
)

// DefaultInterval is the interval New uses for an interval of zero or less.
const DefaultInterval = 10 * time.Second

// minSweep is the number of keys below which Allow does not sweep.
const minSweep = 64

// Limiter decides which events of each key to log: the first, and then at
// most one an interval, which carries the count of those suppressed since
// the last logged. Its memory is bounded by the number of keys seen in
// about the last interval: a key quiet for an interval is forgotten.
type Limiter[K comparable] struct {
	interval time.Duration

	mu      sync.Mutex
	keys    map[K]*entry
	sweepAt int // Allow sweeps when a new key makes len(keys) reach this
}

type entry struct {
	logged     time.Time // when the key's last line was allowed
	suppressed uint64    // events since then not allowed
}

// Summary is a key's count of suppressed events, returned by
// [Limiter.Due].
type Summary[K comparable] struct {
	Key        K
	Suppressed uint64
}

// New returns a Limiter that allows one line per key an interval; an
// interval of zero or less means DefaultInterval.
func New[K comparable](interval time.Duration) *Limiter[K] {
	if interval <= 0 {
		interval = DefaultInterval
	}
	return &Limiter[K]{interval: interval, keys: make(map[K]*entry), sweepAt: minSweep}
}

// Interval returns the Limiter's interval.
func (l *Limiter[K]) Interval() time.Duration { return l.interval }

// Allow records an event of key at now and reports whether to log it. It
// allows the first event of a key, and the first after an interval has
// passed since the key's last allowed line; then suppressed is the number of
// events of key not allowed since that line, to be logged with it. Events it
// does not allow are counted for the next allowed line or for Due.
func (l *Limiter[K]) Allow(key K, now time.Time) (suppressed uint64, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.keys[key]
	if e == nil {
		if len(l.keys)+1 >= l.sweepAt {
			l.sweep(now)
		}
		l.keys[key] = &entry{logged: now}
		return 0, true
	}
	if now.Sub(e.logged) < l.interval {
		e.suppressed++
		return 0, false
	}
	n := e.suppressed
	e.logged, e.suppressed = now, 0
	return n, true
}

// Due returns the keys whose interval has passed at now with events
// suppressed since their last line, so that the caller logs those counts
// now instead of when (or whether) the key's next event comes. Each returned
// key counts as logged at now: its next event within the interval is
// suppressed. Keys whose interval has passed with nothing suppressed are
// forgotten; their next event is logged at once, as a first. A count is
// due an interval after its key's last line: called on every tick of a
// ticker, Due reports it at most a tick late. It returns nil when nothing
// is due.
func (l *Limiter[K]) Due(now time.Time) []Summary[K] {
	l.mu.Lock()
	defer l.mu.Unlock()
	var due []Summary[K]
	for k, e := range l.keys {
		if now.Sub(e.logged) < l.interval {
			continue
		}
		if e.suppressed == 0 {
			delete(l.keys, k)
			continue
		}
		due = append(due, Summary[K]{Key: k, Suppressed: e.suppressed})
		e.logged, e.suppressed = now, 0
	}
	return due
}

// Len returns the number of keys the Limiter remembers.
func (l *Limiter[K]) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.keys)
}

// sweep forgets the keys quiet for an interval with nothing suppressed, so
// that memory stays bounded when Due is never called, and sets the size at
// which to sweep again to twice what is left: the cost per new key stays
// constant. Keys with suppressed events are kept for Due or their next
// event.
func (l *Limiter[K]) sweep(now time.Time) {
	for k, e := range l.keys {
		if e.suppressed == 0 && now.Sub(e.logged) >= l.interval {
			delete(l.keys, k)
		}
	}
	l.sweepAt = max(2*len(l.keys), minSweep)
}
