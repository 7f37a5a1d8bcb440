package metrics

import (
	"io"
	"net/http/httptest"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"

	"github.com/shoal-sh/shoal/internal/testutil"
	"github.com/shoal-sh/shoal/supervisor"
)

// BenchmarkScrape64 measures one scrape of a supervisor with 64 idle
// workers listening on one port: the shoal collector alone (Gather and text
// encoding), and the whole /metrics handler with the Go and process
// collectors.
func BenchmarkScrape64(b *testing.B) {
	if testing.Short() {
		b.Skip("starts 64 worker processes")
	}
	const n = 64
	events := make(chan supervisor.Event, 4*n)
	s := start(b, supervisor.Options{
		Workers: n,
		Port:    testutil.FreePort(b),
		OnEvent: func(e supervisor.Event) {
			select {
			case events <- e:
			default: // not read after the start
			}
		},
	})
	ids := make([]int, n)
	for i := range ids {
		ids[i] = i + 1
	}
	waitListening(b, events, ids...)

	b.Run("collector", func(b *testing.B) {
		reg := prometheus.NewPedanticRegistry()
		reg.MustRegister(NewCollector(s))
		series := 0
		for b.Loop() {
			mfs, err := reg.Gather()
			if err != nil {
				b.Fatal(err)
			}
			series = 0
			enc := expfmt.NewEncoder(io.Discard, expfmt.NewFormat(expfmt.TypeTextPlain))
			for _, mf := range mfs {
				series += len(mf.GetMetric())
				if err := enc.Encode(mf); err != nil {
					b.Fatal(err)
				}
			}
		}
		b.ReportMetric(float64(series), "series")
	})
	b.Run("handler", func(b *testing.B) {
		h := Handler(s, NewRegistry(s), Options{})
		size := 0
		for b.Loop() {
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
			if rec.Code != 200 {
				b.Fatalf("GET /metrics = %d", rec.Code)
			}
			size = rec.Body.Len()
		}
		b.ReportMetric(float64(size), "bytes")
	})
	b.Run("snapshot", func(b *testing.B) {
		for b.Loop() {
			if _, ok := s.Snapshot(); !ok {
				b.Fatal("supervisor not running")
			}
		}
	})
}
