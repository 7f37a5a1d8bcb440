// Package metrics serves the master's view of its workers to Prometheus,
// and the health and readiness checks of a load balancer or orchestrator.
//
// [Handler] serves three read-only endpoints:
//
//   - GET /metrics: the Prometheus text format, gathered from a registry the
//     caller passes in (usually one from [NewRegistry]; the global registry
//     is never used).
//   - GET /healthz: 200 while the supervisor's loop answers within about a
//     second, 503 otherwise (stuck, or not running).
//   - GET /readyz: 200 when enough workers are listening (see
//     [Options].MinReady), 503 with a one-line reason otherwise.
//
// HEAD is served like GET; every other method gets 405. Nothing served over
// HTTP changes the supervisor's state. Concurrent scrapes share one gather:
// a scrape that arrives while another gathers waits for that gather's
// result instead of starting its own, so any number of scrapers cost one
// snapshot at a time and none is refused.
//
// [Listen] serves the handler on a TCP address with the bounds a port open
// to a network needs: timeouts, and a cap on connections derived from the
// process's file-descriptor limit, so that connections to it never take the
// descriptors the supervisor needs for its workers.
//
// Everything here reads the supervisor through a [Source]: a
// *supervisor.Supervisor, or anything else that returns its snapshots, such
// as fixed ones in a test.
//
// [NewCollector] is one [prometheus.Collector] that takes one snapshot of
// the supervisor per scrape and emits every shoal_ series from it, plus what
// the kernel says about the port and /proc says about each worker process.
// Per-worker series carry one label, worker, the slot number ("1".."N"), so
// they stay continuous across restarts and their number is bounded by the
// worker count; the series of a slot that was scaled away disappear.
//
// # Series
//
// From the supervisor:
//
//	shoal_requests_total{worker}                   counter  requests the slot's workers reported, across restarts
//	shoal_workers_desired                          gauge    slots wanted
//	shoal_workers_running                          gauge    slots whose process exists
//	shoal_workers_listening                        gauge    slots whose process is listening
//	shoal_worker_up{worker}                        gauge    1 when the slot's process is listening, else 0
//	shoal_worker_starts_total{worker}              counter  processes started in the slot
//	shoal_worker_deaths_total{worker,reason}       counter  deaths in the slot by how they ended (supervisor.Death.Class)
//	shoal_worker_start_time_seconds{worker}        gauge    unix start time of the slot's current process; absent when none
//	shoal_worker_backoff_seconds{worker}           gauge    delay left before the slot's pending restart; 0 when none
//	shoal_worker_restarts_total{worker}            counter  replacements started in the slot after a death
//	shoal_worker_reloads_total{worker}             counter  replacements that took over the slot in a reload or recycle
//	shoal_restarts_total                           counter  replacements started after deaths
//	shoal_give_ups_total                           counter  times the restart limit stopped the supervisor
//	shoal_reloads_total{result}                    counter  rolling reloads: result "ok" or "aborted"
//	shoal_reloading                                gauge    1 while a rolling reload runs
//	shoal_steering_mode{mode}                      gauge    1 for the steering in force: "round-robin" or "hash"
//	shoal_worker_steered_connections_total{worker} counter  new TCP connections the round-robin program placed on the slot
//	shoal_ipc_received_messages_total{worker}      counter  good messages read from the slot's workers
//	shoal_ipc_received_bytes_total{worker}         counter  bytes read from the slot's workers
//	shoal_ipc_sent_messages_total{worker}          counter  messages written to the slot's workers
//	shoal_ipc_sent_bytes_total{worker}             counter  bytes written to the slot's workers
//	shoal_ipc_dropped_messages_total{worker}       counter  messages to the slot's workers dropped
//	shoal_ipc_errors_total{worker,reason}          counter  bad messages from the slot's workers, by ipc reason
//
// From the kernel, without the workers' help, per listener (listener is
// "tcp:8000", "udp:5353": one of the supervisor's, so the label count stays
// bounded):
//
//	shoal_worker_listen_queue{worker,listener}            gauge    TCP: connections waiting in the accept queues of the slot's LISTEN sockets
//	shoal_worker_listen_backlog{worker,listener}          gauge    TCP: the accept-queue limits of those sockets, summed
//	shoal_worker_udp_receive_queue_bytes{worker,listener} gauge    UDP: bytes of datagrams waiting in the slot's sockets
//	shoal_worker_udp_drops_total{worker,listener}         counter  UDP: datagrams dropped on the slot's current sockets (resets with a new process)
//	shoal_port_listen_sockets{listener}                   gauge    sockets on the listener of any process: LISTEN for TCP, bound for UDP
//	shoal_port_foreign_listen_sockets{listener}           gauge    sockets on the listener held by no current worker
//
// From /proc:
//
//	shoal_worker_cpu_seconds_total{worker}         counter  CPU time (user and system) of the slot's processes
//	shoal_worker_resident_memory_bytes{worker}     gauge    resident memory of the slot's current process
//
// The two listen series of a worker are absent while it holds no LISTEN
// socket on the port. A foreign socket is an orphan of a dead worker or
// another process of the workers' uid that joined the port's SO_REUSEPORT
// group: it takes a share of the connections and nobody watches it.
//
// shoal_worker_cpu_seconds_total is kept monotonic per slot by the
// collector: when a slot's process is replaced, the last reading of the old
// one is added to the slot's base. The CPU a process used between the last
// scrape and its death is therefore not counted, and a process that lived
// and died between two scrapes is not counted at all: the counter
// undercounts by at most one scrape interval per restart, but never goes
// back. It covers the worker process itself, not its children.
//
// [NewRegistry] adds the master's own Go runtime and process collectors
// (go_* and process_* series).
//
// When the supervisor is not running (before Run, or after it returned) the
// collector emits nothing; when its loop does not answer within five
// seconds, the scrape fails. When the kernel's sockets or a worker's /proc
// entry cannot be read, the series that depend on them are left out.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/rs/zerolog"

	"github.com/shoal-sh/shoal/supervisor"
)

// Options configure [Handler] and [Listen].
type Options struct {
	// MinReady is the number of listening workers at which /readyz answers
	// 200. 0 means every desired worker.
	MinReady int

	// MaxConns is the number of connections the server of [Listen] keeps
	// open at most; 0 means [DefaultMaxConns]. The server keeps fewer when
	// RLIMIT_NOFILE requires.
	MaxConns int
	// Logger receives the log lines of the server of [Listen]; nil
	// discards them.
	Logger *zerolog.Logger
	// Version, if set, is exported by the server of [Listen] as the
	// label of shoal_build_info, with the Go version.
	Version string
	// Listener, if set, is where the server of [Listen] serves, in place
	// of listening on its address: a listener [Server.Detach] left, in a
	// master that replaced its program in place.
	Listener net.Listener
}

// healthTimeout bounds the snapshot behind /healthz and /readyz.
const healthTimeout = time.Second

// NewRegistry returns a new registry holding the collector of src
// ([NewCollector]) and the master's own Go runtime and process collectors.
func NewRegistry(src Source) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		NewCollector(src),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return reg
}

// Handler returns the handler of /metrics, which serves what reg gathers,
// and of /healthz and /readyz, which ask src. It registers
// promhttp_metric_handler_errors_total in reg. Paths other than those three
// get 404; methods other than GET and HEAD get 405. Concurrent requests to
// /metrics share one reg.Gather.
func Handler(src Source, reg *prometheus.Registry, opts Options) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(&sharedGatherer{g: reg}, promhttp.HandlerOpts{
		Registry: reg,
	}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		if _, err := snapshot(r.Context(), src); err != nil {
			reply(w, http.StatusServiceUnavailable, err.Error())
			return
		}
		reply(w, http.StatusOK, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		snap, err := snapshot(r.Context(), src)
		if err != nil {
			reply(w, http.StatusServiceUnavailable, err.Error())
			return
		}
		code, text := readiness(snap, opts.MinReady)
		reply(w, code, text)
	})
	return mux
}

// sharedGatherer lets concurrent callers share one Gather: a caller that
// comes while a Gather runs waits for its result. A caller that comes after
// it ended starts a new one, so no result is older than its caller.
type sharedGatherer struct {
	g prometheus.Gatherer

	mu  sync.Mutex
	cur *gathering // the Gather running now, if any
}

// gathering is one Gather and its result, set before done is closed.
type gathering struct {
	done chan struct{}
	mfs  []*dto.MetricFamily
	err  error
}

// Gather returns the result of the Gather running now, or of a new one. The
// families are shared with other callers and must not be changed; the slice
// is the caller's.
func (s *sharedGatherer) Gather() ([]*dto.MetricFamily, error) {
	s.mu.Lock()
	g := s.cur
	if g == nil {
		g = &gathering{done: make(chan struct{})}
		s.cur = g
		s.mu.Unlock()
		panicked := true
		defer func() {
			// Joiners of a Gather that panicked get an error, not an
			// empty page; the panic goes on to net/http.
			if panicked {
				g.err = errors.New("metrics: gather panicked")
			}
			s.mu.Lock()
			s.cur = nil
			s.mu.Unlock()
			close(g.done)
		}()
		g.mfs, g.err = s.g.Gather()
		panicked = false
	} else {
		s.mu.Unlock()
		<-g.done
	}
	return slices.Clone(g.mfs), g.err
}

// snapshot asks src for a snapshot within healthTimeout and words the
// failure for a health check.
func snapshot(ctx context.Context, src Source) (supervisor.Snapshot, error) {
	ctx, cancel := context.WithTimeout(ctx, healthTimeout)
	defer cancel()
	snap, err := src.SnapshotContext(ctx)
	switch {
	case err == nil:
		return snap, nil
	case ctx.Err() != nil:
		return snap, fmt.Errorf("supervisor did not answer within %s", healthTimeout)
	default:
		return snap, fmt.Errorf("supervisor not running")
	}
}

// readiness decides /readyz from a snapshot.
func readiness(snap supervisor.Snapshot, minReady int) (int, string) {
	if snap.Stopping {
		return http.StatusServiceUnavailable, "stopping"
	}
	listening := 0
	for _, w := range snap.Workers {
		if w.State == supervisor.Listening {
			listening++
		}
	}
	want := minReady
	if want <= 0 {
		want = snap.Desired
	}
	if want < 1 {
		want = 1
	}
	text := fmt.Sprintf("%d of %d workers listening", listening, snap.Desired)
	if listening < want {
		return http.StatusServiceUnavailable, fmt.Sprintf("%s, want %d", text, want)
	}
	return http.StatusOK, text
}

func reply(w http.ResponseWriter, code int, text string) {
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	fmt.Fprintln(w, text)
}
