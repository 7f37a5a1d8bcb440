package metrics

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/shoal-sh/shoal/ipc"
	"github.com/shoal-sh/shoal/reuseport"
	"github.com/shoal-sh/shoal/supervisor"
)

// fixedSource is a Source that returns a fixed snapshot, or err.
type fixedSource struct {
	mu   sync.Mutex
	snap supervisor.Snapshot
	err  error
}

func (f *fixedSource) SnapshotContext(ctx context.Context) (supervisor.Snapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.snap, f.err
}

func (f *fixedSource) set(snap supervisor.Snapshot) {
	f.mu.Lock()
	f.snap = snap
	f.mu.Unlock()
}

// stuckSource is a Source whose supervisor never answers.
type stuckSource struct{}

func (stuckSource) SnapshotContext(ctx context.Context) (supervisor.Snapshot, error) {
	<-ctx.Done()
	return supervisor.Snapshot{}, ctx.Err()
}

// fixedProc returns readings from procs, and "no such process" for others.
func fixedProc(procs map[int]procSample) func(int) (procSample, error) {
	return func(pid int) (procSample, error) {
		p, ok := procs[pid]
		if !ok {
			return procSample{}, os.ErrNotExist
		}
		return p, nil
	}
}

func fixedListeners(socks ...reuseport.Socket) func(supervisor.Listener) ([]reuseport.Socket, error) {
	return func(supervisor.Listener) ([]reuseport.Socket, error) { return socks, nil }
}

func ipcStats(in, inBytes, out, outBytes, dropped, invalidJSON uint64) ipc.Stats {
	return ipc.Stats{MessagesIn: in, BytesIn: inBytes, MessagesOut: out, BytesOut: outBytes, Dropped: dropped,
		Errors: map[string]uint64{ipc.ReasonTooLong: 0, ipc.ReasonInvalidJSON: invalidJSON, ipc.ReasonInvalidUTF8: 0, ipc.ReasonBadField: 0}}
}

// fixedSnapshot has three slots on port 8000: 1 listening on a socket the
// supervisor saw, after one SIGKILL; 2 in backoff after three failures;
// 3 ready by message, whose socket only /proc tells.
func fixedSnapshot() supervisor.Snapshot {
	started := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	return supervisor.Snapshot{
		Desired: 3, Port: 8000, Listeners: []supervisor.Listener{{Network: "tcp", Port: 8000}}, Restarts: 4, GiveUps: 0, Reloads: 1, ReloadFailures: 1, Upgrades: 2,
		Workers: []supervisor.WorkerStatus{
			{ID: 1, PID: 101, State: supervisor.Listening, Started: started, Starts: 3, Restarts: 1, Reloads: 1,
				Requests: 42, Deaths: map[string]uint64{"signal_SIGKILL": 1, "exit_zero": 1},
				IPC: ipcStats(10, 500, 3, 90, 0, 1), Sockets: []uint64{1001}},
			{ID: 2, State: supervisor.Dead, Starts: 3, Restarts: 3, Backoff: 1500 * time.Millisecond,
				Deaths: map[string]uint64{"exit_nonzero": 3}, IPC: ipcStats(0, 0, 0, 0, 2, 0)},
			{ID: 3, PID: 103, State: supervisor.Listening, Started: started.Add(time.Second), Starts: 1,
				Requests: 7, IPC: ipcStats(1, 40, 1, 30, 0, 0)},
		},
	}
}

var fixedSockets = []reuseport.Socket{
	{Inode: 1001, Addr: netip.MustParseAddrPort("0.0.0.0:8000"), Queue: 2, Backlog: 4096},
	{Inode: 1003, Addr: netip.MustParseAddrPort("0.0.0.0:8000"), Queue: 0, Backlog: 4096},
	{Inode: 1999, Addr: netip.MustParseAddrPort("0.0.0.0:8000"), Queue: 5, Backlog: 128}, // foreign
}

// fixedInodes stands for /proc/PID/fd: worker 3 holds socket 1003 and a
// socket that does not listen.
func fixedInodes(pid int) (map[uint64]struct{}, error) {
	if pid == 103 {
		return map[uint64]struct{}{1003: {}, 55: {}}, nil
	}
	return nil, os.ErrNotExist
}

const fixedGolden = `# HELP shoal_give_ups_total Times the restart limit made the supervisor give up.
# TYPE shoal_give_ups_total counter
shoal_give_ups_total 0
# HELP shoal_ipc_dropped_messages_total Messages to the slot's workers dropped: queue full or channel closed.
# TYPE shoal_ipc_dropped_messages_total counter
shoal_ipc_dropped_messages_total{worker="1"} 0
shoal_ipc_dropped_messages_total{worker="2"} 2
shoal_ipc_dropped_messages_total{worker="3"} 0
# HELP shoal_ipc_errors_total Bad messages from the slot's workers, by reason.
# TYPE shoal_ipc_errors_total counter
shoal_ipc_errors_total{reason="bad_field",worker="1"} 0
shoal_ipc_errors_total{reason="bad_field",worker="2"} 0
shoal_ipc_errors_total{reason="bad_field",worker="3"} 0
shoal_ipc_errors_total{reason="invalid_json",worker="1"} 1
shoal_ipc_errors_total{reason="invalid_json",worker="2"} 0
shoal_ipc_errors_total{reason="invalid_json",worker="3"} 0
shoal_ipc_errors_total{reason="invalid_utf8",worker="1"} 0
shoal_ipc_errors_total{reason="invalid_utf8",worker="2"} 0
shoal_ipc_errors_total{reason="invalid_utf8",worker="3"} 0
shoal_ipc_errors_total{reason="too_long",worker="1"} 0
shoal_ipc_errors_total{reason="too_long",worker="2"} 0
shoal_ipc_errors_total{reason="too_long",worker="3"} 0
# HELP shoal_ipc_received_bytes_total Bytes read from the slot's workers.
# TYPE shoal_ipc_received_bytes_total counter
shoal_ipc_received_bytes_total{worker="1"} 500
shoal_ipc_received_bytes_total{worker="2"} 0
shoal_ipc_received_bytes_total{worker="3"} 40
# HELP shoal_ipc_received_messages_total Good messages read from the slot's workers.
# TYPE shoal_ipc_received_messages_total counter
shoal_ipc_received_messages_total{worker="1"} 10
shoal_ipc_received_messages_total{worker="2"} 0
shoal_ipc_received_messages_total{worker="3"} 1
# HELP shoal_ipc_sent_bytes_total Bytes written to the slot's workers.
# TYPE shoal_ipc_sent_bytes_total counter
shoal_ipc_sent_bytes_total{worker="1"} 90
shoal_ipc_sent_bytes_total{worker="2"} 0
shoal_ipc_sent_bytes_total{worker="3"} 30
# HELP shoal_ipc_sent_messages_total Messages written to the slot's workers.
# TYPE shoal_ipc_sent_messages_total counter
shoal_ipc_sent_messages_total{worker="1"} 3
shoal_ipc_sent_messages_total{worker="2"} 0
shoal_ipc_sent_messages_total{worker="3"} 1
# HELP shoal_port_foreign_listen_sockets Sockets on a listener held by no current worker.
# TYPE shoal_port_foreign_listen_sockets gauge
shoal_port_foreign_listen_sockets{listener="tcp:8000"} 1
# HELP shoal_port_listen_sockets Sockets on a listener of any process: LISTEN sockets for TCP, bound sockets for UDP.
# TYPE shoal_port_listen_sockets gauge
shoal_port_listen_sockets{listener="tcp:8000"} 3
# HELP shoal_reloading 1 while a rolling reload runs.
# TYPE shoal_reloading gauge
shoal_reloading 0
# HELP shoal_reloads_total Rolling reloads by result: ok, or aborted by a replacement that failed to start or serve.
# TYPE shoal_reloads_total counter
shoal_reloads_total{result="aborted"} 1
shoal_reloads_total{result="ok"} 1
# HELP shoal_upgrades_total In-place upgrades of the master's program (shoal ctl upgrade, SIGUSR2): the workers and counters carried on.
# TYPE shoal_upgrades_total counter
shoal_upgrades_total 2
# HELP shoal_requests_total Requests the slot's workers reported, across restarts.
# TYPE shoal_requests_total counter
shoal_requests_total{worker="1"} 42
shoal_requests_total{worker="2"} 0
shoal_requests_total{worker="3"} 7
# HELP shoal_restarts_total Replacements started after worker deaths.
# TYPE shoal_restarts_total counter
shoal_restarts_total 4
# HELP shoal_worker_backoff_seconds Delay left before the slot's pending restart; 0 when none is pending.
# TYPE shoal_worker_backoff_seconds gauge
shoal_worker_backoff_seconds{worker="1"} 0
shoal_worker_backoff_seconds{worker="2"} 1.5
shoal_worker_backoff_seconds{worker="3"} 0
# HELP shoal_worker_cpu_seconds_total User and system CPU time of the slot's processes; the time since the last scrape of a process that died is not counted.
# TYPE shoal_worker_cpu_seconds_total counter
shoal_worker_cpu_seconds_total{worker="1"} 1.5
shoal_worker_cpu_seconds_total{worker="2"} 0
shoal_worker_cpu_seconds_total{worker="3"} 0.25
# HELP shoal_worker_deaths_total Deaths in the slot by how the process ended.
# TYPE shoal_worker_deaths_total counter
shoal_worker_deaths_total{reason="exit_nonzero",worker="2"} 3
shoal_worker_deaths_total{reason="exit_zero",worker="1"} 1
shoal_worker_deaths_total{reason="signal_SIGKILL",worker="1"} 1
# HELP shoal_worker_listen_backlog Accept-queue limits of the slot's LISTEN sockets on a TCP listener, summed.
# TYPE shoal_worker_listen_backlog gauge
shoal_worker_listen_backlog{listener="tcp:8000",worker="1"} 4096
shoal_worker_listen_backlog{listener="tcp:8000",worker="3"} 4096
# HELP shoal_worker_listen_queue Connections waiting in the accept queues of the slot's LISTEN sockets on a TCP listener.
# TYPE shoal_worker_listen_queue gauge
shoal_worker_listen_queue{listener="tcp:8000",worker="1"} 2
shoal_worker_listen_queue{listener="tcp:8000",worker="3"} 0
# HELP shoal_worker_reloads_total Replacements that took over the slot in a reload or a recycle.
# TYPE shoal_worker_reloads_total counter
shoal_worker_reloads_total{worker="1"} 1
shoal_worker_reloads_total{worker="2"} 0
shoal_worker_reloads_total{worker="3"} 0
# HELP shoal_worker_resident_memory_bytes Resident memory of the slot's current process.
# TYPE shoal_worker_resident_memory_bytes gauge
shoal_worker_resident_memory_bytes{worker="1"} 1.048576e+07
shoal_worker_resident_memory_bytes{worker="3"} 8.388608e+06
# HELP shoal_worker_restarts_total Replacements started in the slot after a death.
# TYPE shoal_worker_restarts_total counter
shoal_worker_restarts_total{worker="1"} 1
shoal_worker_restarts_total{worker="2"} 3
shoal_worker_restarts_total{worker="3"} 0
# HELP shoal_worker_start_time_seconds Start time of the slot's current process since the unix epoch.
# TYPE shoal_worker_start_time_seconds gauge
shoal_worker_start_time_seconds{worker="1"} 1.767323045e+09
shoal_worker_start_time_seconds{worker="3"} 1.767323046e+09
# HELP shoal_worker_starts_total Processes started in the slot.
# TYPE shoal_worker_starts_total counter
shoal_worker_starts_total{worker="1"} 3
shoal_worker_starts_total{worker="2"} 3
shoal_worker_starts_total{worker="3"} 1
# HELP shoal_worker_up 1 when the slot's process is listening, else 0.
# TYPE shoal_worker_up gauge
shoal_worker_up{worker="1"} 1
shoal_worker_up{worker="2"} 0
shoal_worker_up{worker="3"} 1
# HELP shoal_workers_desired Worker slots wanted.
# TYPE shoal_workers_desired gauge
shoal_workers_desired 3
# HELP shoal_workers_listening Worker slots whose process is listening.
# TYPE shoal_workers_listening gauge
shoal_workers_listening 2
# HELP shoal_workers_running Worker slots whose process exists.
# TYPE shoal_workers_running gauge
shoal_workers_running 2
`

// useInodes replaces readInodes for the test.
func useInodes(t *testing.T, f func(int) (map[uint64]struct{}, error)) {
	t.Cleanup(func() { readInodes = reuseport.Inodes })
	readInodes = f
}

// TestCollectorFixed checks every series of a fixed snapshot against the
// exposition a user would see, and lints it.
func TestCollectorFixed(t *testing.T) {
	useInodes(t, fixedInodes)
	src := &fixedSource{snap: fixedSnapshot()}
	c := newCollector(src, fixedProc(map[int]procSample{
		101: {cpu: 1.5, rss: 10 << 20},
		103: {cpu: 0.25, rss: 8 << 20},
	}), fixedListeners(fixedSockets...))
	if err := testutil.CollectAndCompare(c, strings.NewReader(fixedGolden)); err != nil {
		t.Error(err)
	}
	problems, err := testutil.CollectAndLint(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
	// Every series has a descriptor, and the registry checks them all.
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	if _, err := reg.Gather(); err != nil {
		t.Errorf("pedantic gather: %v", err)
	}
}

// TestCollectorFixedReplacement replaces, scales away and re-reads slots of
// the fixed snapshot, and checks the counters that must stay monotonic.
func TestCollectorFixedReplacement(t *testing.T) {
	useInodes(t, fixedInodes)
	procs := map[int]procSample{101: {cpu: 1.5, rss: 10 << 20}, 103: {cpu: 0.25, rss: 8 << 20}}
	src := &fixedSource{snap: fixedSnapshot()}
	c := newCollector(src, func(pid int) (procSample, error) { return fixedProc(procs)(pid) }, fixedListeners(fixedSockets...))
	testutil.CollectAndCount(c) // the first readings

	// Slot 1's process dies and a new one, 201, takes over; the /proc
	// reading of 103 is lower than before (it cannot be, but the counter
	// must not go back); slot 2 is scaled away.
	snap := fixedSnapshot()
	snap.Desired = 2
	w1 := snap.Workers[0]
	w1.PID, w1.Started, w1.Starts, w1.Restarts, w1.Sockets = 201, w1.Started.Add(time.Minute), 4, 2, []uint64{2001}
	w1.Deaths = map[string]uint64{"signal_SIGKILL": 2, "exit_zero": 1}
	snap.Workers = []supervisor.WorkerStatus{w1, snap.Workers[2]}
	src.set(snap)
	procs = map[int]procSample{201: {cpu: 0.5, rss: 12 << 20}, 103: {cpu: 0.2, rss: 8 << 20}}
	c.sockets = fixedListeners(
		reuseport.Socket{Inode: 2001, Queue: 0, Backlog: 4096},
		reuseport.Socket{Inode: 1003, Queue: 1, Backlog: 4096},
	)
	const want = `# HELP shoal_worker_cpu_seconds_total User and system CPU time of the slot's processes; the time since the last scrape of a process that died is not counted.
# TYPE shoal_worker_cpu_seconds_total counter
shoal_worker_cpu_seconds_total{worker="1"} 2
shoal_worker_cpu_seconds_total{worker="3"} 0.25
# HELP shoal_worker_deaths_total Deaths in the slot by how the process ended.
# TYPE shoal_worker_deaths_total counter
shoal_worker_deaths_total{reason="exit_zero",worker="1"} 1
shoal_worker_deaths_total{reason="signal_SIGKILL",worker="1"} 2
# HELP shoal_worker_listen_queue Connections waiting in the accept queues of the slot's LISTEN sockets on a TCP listener.
# TYPE shoal_worker_listen_queue gauge
shoal_worker_listen_queue{listener="tcp:8000",worker="1"} 0
shoal_worker_listen_queue{listener="tcp:8000",worker="3"} 1
# HELP shoal_worker_restarts_total Replacements started in the slot after a death.
# TYPE shoal_worker_restarts_total counter
shoal_worker_restarts_total{worker="1"} 2
shoal_worker_restarts_total{worker="3"} 0
# HELP shoal_workers_desired Worker slots wanted.
# TYPE shoal_workers_desired gauge
shoal_workers_desired 2
# HELP shoal_port_foreign_listen_sockets Sockets on a listener held by no current worker.
# TYPE shoal_port_foreign_listen_sockets gauge
shoal_port_foreign_listen_sockets{listener="tcp:8000"} 0
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want),
		"shoal_worker_cpu_seconds_total", "shoal_worker_deaths_total", "shoal_worker_listen_queue",
		"shoal_worker_restarts_total", "shoal_workers_desired", "shoal_port_foreign_listen_sockets"); err != nil {
		t.Error(err)
	}
	// Nothing of slot 2 is left: 20 series for each of the other two
	// slots, their 2 death series, 9 of the supervisor, 2 of the port.
	if n, want := testutil.CollectAndCount(c), 2*20+2+9+2; n != want {
		t.Errorf("%d series for 2 slots, want %d", n, want)
	}
}

// TestCollectorFixedNoPort checks that a supervisor without a port has no
// socket series, and that a slot without a process has no start time or
// memory.
func TestCollectorFixedNoPort(t *testing.T) {
	snap := fixedSnapshot()
	snap.Port, snap.Listeners = 0, nil
	c := newCollector(&fixedSource{snap: snap}, fixedProc(nil), func(supervisor.Listener) ([]reuseport.Socket, error) {
		t.Error("sockets read for a supervisor without a port")
		return nil, nil
	})
	for _, name := range []string{"shoal_port_listen_sockets", "shoal_port_foreign_listen_sockets",
		"shoal_worker_listen_queue", "shoal_worker_listen_backlog", "shoal_worker_resident_memory_bytes"} {
		if n := testutil.CollectAndCount(c, name); n != 0 {
			t.Errorf("%d series of %s, want none", n, name)
		}
	}
	if n := testutil.CollectAndCount(c, "shoal_worker_start_time_seconds"); n != 2 {
		t.Errorf("%d start times, want 2 (slots 1 and 3; slot 2 has no process)", n)
	}
}

// TestCollectorFixedFailures checks a supervisor that is not running (no
// series) and one that does not answer (a failed scrape that says so).
func TestCollectorFixedFailures(t *testing.T) {
	c := newCollector(&fixedSource{err: errors.New("supervisor: not running")}, fixedProc(nil), fixedListeners())
	if n := testutil.CollectAndCount(c); n != 0 {
		t.Errorf("%d series of a supervisor that is not running, want none", n)
	}

	old := scrapeTimeout
	t.Cleanup(func() { scrapeTimeout = old })
	scrapeTimeout = 50 * time.Millisecond
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(newCollector(stuckSource{}, fixedProc(nil), fixedListeners()))
	_, err := reg.Gather()
	if err == nil || !strings.Contains(err.Error(), "did not answer within 50ms") {
		t.Errorf("gather of a stuck supervisor: %v, want \"did not answer within 50ms\"", err)
	}
}

// TestCollectorFixedTCPAndUDP: with a TCP and a UDP listener, each socket
// series says which one, and a UDP socket shows its receive queue and drops.
func TestCollectorFixedTCPAndUDP(t *testing.T) {
	tcp, udp := supervisor.Listener{Network: "tcp", Port: 8443}, supervisor.Listener{Network: "udp", Port: 8443}
	snap := supervisor.Snapshot{Desired: 1, Port: 8443, Listeners: []supervisor.Listener{tcp, udp}, Workers: []supervisor.WorkerStatus{
		{ID: 1, PID: 4001, State: supervisor.Listening, Started: time.Unix(1_700_000_000, 0), Sockets: []uint64{11, 12}},
	}}
	sockets := func(l supervisor.Listener) ([]reuseport.Socket, error) {
		if l == udp {
			return []reuseport.Socket{
				{Inode: 12, Addr: netip.MustParseAddrPort("0.0.0.0:8443"), RecvQueueBytes: 1664, Drops: 3},
				{Inode: 99, Addr: netip.MustParseAddrPort("0.0.0.0:8443")}, // foreign
			}, nil
		}
		return []reuseport.Socket{{Inode: 11, Addr: netip.MustParseAddrPort("0.0.0.0:8443"), Queue: 1, Backlog: 4096}}, nil
	}
	c := newCollector(&fixedSource{snap: snap}, fixedProc(nil), sockets)
	err := testutil.CollectAndCompare(c, strings.NewReader(`
# HELP shoal_port_foreign_listen_sockets Sockets on a listener held by no current worker.
# TYPE shoal_port_foreign_listen_sockets gauge
shoal_port_foreign_listen_sockets{listener="tcp:8443"} 0
shoal_port_foreign_listen_sockets{listener="udp:8443"} 1
# HELP shoal_port_listen_sockets Sockets on a listener of any process: LISTEN sockets for TCP, bound sockets for UDP.
# TYPE shoal_port_listen_sockets gauge
shoal_port_listen_sockets{listener="tcp:8443"} 1
shoal_port_listen_sockets{listener="udp:8443"} 2
# HELP shoal_worker_listen_queue Connections waiting in the accept queues of the slot's LISTEN sockets on a TCP listener.
# TYPE shoal_worker_listen_queue gauge
shoal_worker_listen_queue{listener="tcp:8443",worker="1"} 1
# HELP shoal_worker_udp_drops_total Datagrams the kernel dropped on the slot's current sockets on a UDP listener (a full receive queue).
# TYPE shoal_worker_udp_drops_total counter
shoal_worker_udp_drops_total{listener="udp:8443",worker="1"} 3
# HELP shoal_worker_udp_receive_queue_bytes Bytes of datagrams waiting in the receive queues of the slot's sockets on a UDP listener.
# TYPE shoal_worker_udp_receive_queue_bytes gauge
shoal_worker_udp_receive_queue_bytes{listener="udp:8443",worker="1"} 1664
`), "shoal_port_foreign_listen_sockets", "shoal_port_listen_sockets", "shoal_worker_listen_queue",
		"shoal_worker_udp_drops_total", "shoal_worker_udp_receive_queue_bytes")
	if err != nil {
		t.Error(err)
	}
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
}
