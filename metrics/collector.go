package metrics

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/procfs"

	"github.com/shoal-sh/shoal/ipc"
	"github.com/shoal-sh/shoal/reuseport"
	"github.com/shoal-sh/shoal/supervisor"
)

// scrapeTimeout bounds the snapshot behind one scrape. A variable so that
// tests can shorten it.
var scrapeTimeout = 5 * time.Second

// readInodes is reuseport.Inodes; tests count its calls.
var readInodes = reuseport.Inodes

var (
	byWorker         = []string{"worker"}
	byWorkerReason   = []string{"worker", "reason"}
	byWorkerListener = []string{"worker", "listener"}
	byListener       = []string{"listener"}

	descRequests   = newDesc("requests_total", "Requests the slot's workers reported, across restarts.", byWorker)
	descDesired    = newDesc("workers_desired", "Worker slots wanted.", nil)
	descRunning    = newDesc("workers_running", "Worker slots whose process exists.", nil)
	descListening  = newDesc("workers_listening", "Worker slots whose process is listening.", nil)
	descUp         = newDesc("worker_up", "1 when the slot's process is listening, else 0.", byWorker)
	descStarts     = newDesc("worker_starts_total", "Processes started in the slot.", byWorker)
	descDeaths     = newDesc("worker_deaths_total", "Deaths in the slot by how the process ended.", byWorkerReason)
	descStartTime  = newDesc("worker_start_time_seconds", "Start time of the slot's current process since the unix epoch.", byWorker)
	descBackoff    = newDesc("worker_backoff_seconds", "Delay left before the slot's pending restart; 0 when none is pending.", byWorker)
	descWRestarts  = newDesc("worker_restarts_total", "Replacements started in the slot after a death.", byWorker)
	descWReloads   = newDesc("worker_reloads_total", "Replacements that took over the slot in a reload or a recycle.", byWorker)
	descRestarts   = newDesc("restarts_total", "Replacements started after worker deaths.", nil)
	descGiveUps    = newDesc("give_ups_total", "Times the restart limit made the supervisor give up.", nil)
	descReloads    = newDesc("reloads_total", "Rolling reloads by result: ok, or aborted by a replacement that failed to start or serve.", []string{"result"})
	descUpgrades   = newDesc("upgrades_total", "In-place upgrades of the master's program (shoal ctl upgrade, SIGUSR2): the workers and counters carried on.", nil)
	descReloading  = newDesc("reloading", "1 while a rolling reload runs.", nil)
	descIPCInMsgs  = newDesc("ipc_received_messages_total", "Good messages read from the slot's workers.", byWorker)
	descIPCInBytes = newDesc("ipc_received_bytes_total", "Bytes read from the slot's workers.", byWorker)
	descIPCOutMsgs = newDesc("ipc_sent_messages_total", "Messages written to the slot's workers.", byWorker)
	descIPCOutByte = newDesc("ipc_sent_bytes_total", "Bytes written to the slot's workers.", byWorker)
	descIPCDropped = newDesc("ipc_dropped_messages_total", "Messages to the slot's workers dropped: queue full or channel closed.", byWorker)
	descIPCErrors  = newDesc("ipc_errors_total", "Bad messages from the slot's workers, by reason.", byWorkerReason)
	descQueue      = newDesc("worker_listen_queue", "Connections waiting in the accept queues of the slot's LISTEN sockets on a TCP listener.", byWorkerListener)
	descBacklog    = newDesc("worker_listen_backlog", "Accept-queue limits of the slot's LISTEN sockets on a TCP listener, summed.", byWorkerListener)
	descUDPQueue   = newDesc("worker_udp_receive_queue_bytes", "Bytes of datagrams waiting in the receive queues of the slot's sockets on a UDP listener.", byWorkerListener)
	descUDPDrops   = newDesc("worker_udp_drops_total", "Datagrams the kernel dropped on the slot's current sockets on a UDP listener (a full receive queue).", byWorkerListener)
	descPortSocks  = newDesc("port_listen_sockets", "Sockets on a listener of any process: LISTEN sockets for TCP, bound sockets for UDP.", byListener)
	descForeign    = newDesc("port_foreign_listen_sockets", "Sockets on a listener held by no current worker.", byListener)
	descSteered    = newDesc("worker_steered_connections_total", "New TCP connections the round-robin steering program placed on the slot's sockets.", byWorker)
	descSteering   = newDesc("steering_mode", "1 for the steering in force: round-robin (an eBPF program of the master's) or hash (the kernel's).", []string{"mode"})
	descCPU        = newDesc("worker_cpu_seconds_total", "User and system CPU time of the slot's processes; the time since the last scrape of a process that died is not counted.", byWorker)
	descRSS        = newDesc("worker_resident_memory_bytes", "Resident memory of the slot's current process.", byWorker)

	allDescs = []*prometheus.Desc{
		descRequests, descDesired, descRunning, descListening, descUp, descStarts,
		descDeaths, descStartTime, descBackoff, descWRestarts, descWReloads, descRestarts, descGiveUps, descReloads, descUpgrades, descReloading,
		descIPCInMsgs, descIPCInBytes, descIPCOutMsgs, descIPCOutByte, descIPCDropped, descIPCErrors,
		descSteered, descSteering, descQueue, descBacklog, descUDPQueue, descUDPDrops, descPortSocks, descForeign, descCPU, descRSS,
	}

	// ipcReasons are emitted for every slot, 0 until they happen.
	ipcReasons = []string{ipc.ReasonTooLong, ipc.ReasonInvalidJSON, ipc.ReasonInvalidUTF8, ipc.ReasonBadField}
)

func newDesc(name, help string, labels []string) *prometheus.Desc {
	return prometheus.NewDesc("shoal_"+name, help, labels, nil)
}

// Source is what the metrics read: the state of a supervisor at one moment.
// *supervisor.Supervisor is a Source; a test can pass fixed snapshots.
type Source interface {
	// SnapshotContext returns the supervisor's state. It fails when the
	// supervisor is not running, or with ctx's error when ctx ends first.
	SnapshotContext(ctx context.Context) (supervisor.Snapshot, error)
}

// procSample is what /proc says of one process.
type procSample struct {
	cpu float64 // user and system CPU time, in seconds
	rss float64 // resident memory, in bytes
}

// collector is the prometheus.Collector of one supervisor.
type collector struct {
	src      Source
	readProc func(pid int) (procSample, error)                       // nil without /proc
	sockets  func(l supervisor.Listener) ([]reuseport.Socket, error) // the kernel's sockets of a listener

	mu    sync.Mutex                                    // serializes scrapes; guards what follows
	cpu   map[int]*cpuAccount                           // by slot
	socks map[supervisor.Listener]map[int]*socketsCache // by listener and pid
}

// cpuAccount keeps a slot's CPU counter monotonic across its processes.
type cpuAccount struct {
	pid     int
	started time.Time
	last    float64 // last reading of the current process
	base    float64 // last readings of the slot's earlier processes, summed
}

// socketsCache is what /proc said about a worker's sockets on a listener,
// for workers whose snapshot does not name them.
type socketsCache struct {
	started time.Time
	inodes  []uint64            // the process's sockets on the listener when read
	seen    map[uint64]struct{} // every socket on the listener when read
}

// kernelSockets reads a listener's sockets: TCP LISTEN sockets, or bound
// UDP sockets.
func kernelSockets(l supervisor.Listener) ([]reuseport.Socket, error) {
	if l.Network == "udp" {
		return reuseport.UDPSockets(l.Port)
	}
	return reuseport.Listeners(l.Port)
}

// NewCollector returns a collector of the shoal_ series of src. Each
// scrape takes one snapshot of src, reads the port's LISTEN sockets from the
// kernel once, and each worker's /proc/PID/stat. Scrapes through one
// collector are serialized.
func NewCollector(src Source) prometheus.Collector {
	var readProc func(int) (procSample, error)
	if fs, err := procfs.NewDefaultFS(); err == nil {
		readProc = func(pid int) (procSample, error) {
			p, err := fs.Proc(pid)
			if err != nil {
				return procSample{}, err
			}
			st, err := p.Stat()
			if err != nil {
				return procSample{}, err
			}
			return procSample{cpu: st.CPUTime(), rss: float64(st.ResidentMemory())}, nil
		}
	}
	return newCollector(src, readProc, kernelSockets)
}

func newCollector(src Source, readProc func(int) (procSample, error), sockets func(supervisor.Listener) ([]reuseport.Socket, error)) *collector {
	return &collector{
		src:      src,
		readProc: readProc,
		sockets:  sockets,
		cpu:      make(map[int]*cpuAccount),
		socks:    make(map[supervisor.Listener]map[int]*socketsCache),
	}
}

// Describe sends the descriptors of every series the collector emits.
func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range allDescs {
		ch <- d
	}
}

// Collect takes one snapshot and sends its series.
func (c *collector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), scrapeTimeout)
	snap, err := c.src.SnapshotContext(ctx)
	cancel()
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			ch <- prometheus.NewInvalidMetric(descDesired,
				fmt.Errorf("shoal: the supervisor did not answer within %s", scrapeTimeout))
		}
		return // not running: no series
	}
	c.mu.Lock()
	defer c.mu.Unlock()

	running, listening := 0, 0
	for _, w := range snap.Workers {
		if w.PID != 0 {
			running++
		}
		if w.State == supervisor.Listening {
			listening++
		}
	}
	gauge(ch, descDesired, float64(snap.Desired))
	gauge(ch, descRunning, float64(running))
	gauge(ch, descListening, float64(listening))
	counter(ch, descRestarts, float64(snap.Restarts))
	counter(ch, descGiveUps, float64(snap.GiveUps))
	counter(ch, descReloads, float64(snap.Reloads), "ok")
	counter(ch, descReloads, float64(snap.ReloadFailures), "aborted")
	counter(ch, descUpgrades, float64(snap.Upgrades))
	reloading := 0.0
	if snap.Reloading {
		reloading = 1
	}
	gauge(ch, descReloading, reloading)

	for _, w := range snap.Workers {
		id := strconv.Itoa(w.ID)
		counter(ch, descRequests, float64(w.Requests), id)
		up := 0.0
		if w.State == supervisor.Listening {
			up = 1
		}
		gauge(ch, descUp, up, id)
		counter(ch, descStarts, float64(w.Starts), id)
		for _, reason := range slices.Sorted(maps.Keys(w.Deaths)) {
			counter(ch, descDeaths, float64(w.Deaths[reason]), id, reason)
		}
		if w.PID != 0 && !w.Started.IsZero() {
			gauge(ch, descStartTime, float64(w.Started.UnixNano())/1e9, id)
		}
		gauge(ch, descBackoff, max(w.Backoff, 0).Seconds(), id)
		counter(ch, descWRestarts, float64(w.Restarts), id)
		counter(ch, descWReloads, float64(w.Reloads), id)

		counter(ch, descIPCInMsgs, float64(w.IPC.MessagesIn), id)
		counter(ch, descIPCInBytes, float64(w.IPC.BytesIn), id)
		counter(ch, descIPCOutMsgs, float64(w.IPC.MessagesOut), id)
		counter(ch, descIPCOutByte, float64(w.IPC.BytesOut), id)
		counter(ch, descIPCDropped, float64(w.IPC.Dropped), id)
		for _, reason := range ipcReasons {
			counter(ch, descIPCErrors, float64(w.IPC.Errors[reason]), id, reason)
		}
		for _, reason := range slices.Sorted(maps.Keys(w.IPC.Errors)) {
			if !slices.Contains(ipcReasons, reason) {
				counter(ch, descIPCErrors, float64(w.IPC.Errors[reason]), id, reason)
			}
		}
	}
	if snap.Steering != "" {
		gauge(ch, descSteering, 1, snap.Steering)
	}
	if snap.Steering == "round-robin" {
		for _, w := range snap.Workers {
			counter(ch, descSteered, float64(w.Steered), strconv.Itoa(w.ID))
		}
	}
	c.collectProc(ch, snap)
	for _, l := range snap.Listeners {
		c.collectSockets(ch, snap, l)
	}
	for l := range c.socks {
		if !slices.Contains(snap.Listeners, l) {
			delete(c.socks, l)
		}
	}
}

// collectProc sends the CPU and memory series of each slot.
func (c *collector) collectProc(ch chan<- prometheus.Metric, snap supervisor.Snapshot) {
	if c.readProc == nil {
		return // no /proc
	}
	seen := make(map[int]bool, len(snap.Workers))
	for _, w := range snap.Workers {
		seen[w.ID] = true
		acct := c.cpu[w.ID]
		if acct == nil {
			acct = &cpuAccount{}
			c.cpu[w.ID] = acct
		}
		if acct.pid != w.PID || !acct.started.Equal(w.Started) {
			// Another process fills the slot now, or none: its
			// predecessor's last reading is all that will be known of it.
			acct.base += acct.last
			acct.pid, acct.started, acct.last = w.PID, w.Started, 0
		}
		if w.PID != 0 {
			if p, err := c.readProc(w.PID); err == nil {
				acct.last = max(acct.last, p.cpu)
				gauge(ch, descRSS, p.rss, strconv.Itoa(w.ID))
			}
		}
		counter(ch, descCPU, acct.base+acct.last, strconv.Itoa(w.ID))
	}
	for id := range c.cpu {
		if !seen[id] {
			delete(c.cpu, id) // scaled away
		}
	}
}

// collectSockets sends the kernel's view of listener l: each worker's
// accept queue (TCP) or receive queue and drops (UDP), and the sockets on
// the port that belong to no worker.
func (c *collector) collectSockets(ch chan<- prometheus.Metric, snap supervisor.Snapshot, l supervisor.Listener) {
	lname := l.String()
	cache := c.socks[l]
	if cache == nil {
		cache = make(map[int]*socketsCache)
		c.socks[l] = cache
	}
	socks, err := c.sockets(l)
	if err != nil {
		return
	}
	byInode := make(map[uint64]reuseport.Socket, len(socks))
	for _, s := range socks {
		byInode[s.Inode] = s
	}
	// held finds the LISTEN sockets of w: those the supervisor saw it
	// listen on, or else those /proc shows it holding.
	held := make(map[int][]uint64, len(snap.Workers)) // by slot
	claimed := make(map[uint64]bool, len(socks))
	var unknown []supervisor.WorkerStatus
	for _, w := range snap.Workers {
		if w.PID == 0 {
			continue
		}
		inodes := listening(w.Sockets, byInode)
		if len(inodes) == 0 {
			if sc := cache[w.PID]; sc != nil && sc.started.Equal(w.Started) {
				inodes = listening(sc.inodes, byInode)
			}
		}
		if len(inodes) == 0 {
			unknown = append(unknown, w)
		}
		held[w.ID] = inodes
		for _, ino := range inodes {
			claimed[ino] = true
		}
	}
	// Read /proc/PID/fd, which costs one readlink per descriptor, only for
	// workers whose sockets are unknown, and only when a LISTEN socket that
	// no worker claims appeared since the worker's last reading: a foreign
	// socket that stays costs one reading per worker, not one per scrape.
	for _, w := range unknown {
		var seen map[uint64]struct{}
		if sc := cache[w.PID]; sc != nil && sc.started.Equal(w.Started) {
			seen = sc.seen
		}
		if !unexplained(byInode, claimed, seen) {
			continue
		}
		sc := &socketsCache{started: w.Started, seen: make(map[uint64]struct{}, len(byInode))}
		for ino := range byInode {
			sc.seen[ino] = struct{}{}
		}
		if all, err := readInodes(w.PID); err == nil {
			for ino := range all {
				if _, ok := byInode[ino]; ok {
					sc.inodes = append(sc.inodes, ino)
				}
			}
			slices.Sort(sc.inodes)
		}
		cache[w.PID] = sc
		held[w.ID] = sc.inodes
		for _, ino := range sc.inodes {
			claimed[ino] = true
		}
	}
	pids := make(map[int]bool, len(snap.Workers))
	for _, w := range snap.Workers {
		pids[w.PID] = true
		inodes := held[w.ID]
		if len(inodes) == 0 {
			continue
		}
		var queue, backlog, drops float64
		for _, ino := range inodes {
			sk := byInode[ino]
			queue += float64(sk.Queue)
			backlog += float64(sk.Backlog)
			if l.Network == "udp" {
				queue += float64(sk.RecvQueueBytes)
				drops += float64(sk.Drops)
			}
		}
		id := strconv.Itoa(w.ID)
		if l.Network == "udp" {
			gauge(ch, descUDPQueue, queue, id, lname)
			counter(ch, descUDPDrops, drops, id, lname)
			continue
		}
		gauge(ch, descQueue, queue, id, lname)
		gauge(ch, descBacklog, backlog, id, lname)
	}
	for pid := range cache {
		if !pids[pid] {
			delete(cache, pid)
		}
	}
	foreign := 0
	for ino := range byInode {
		if !claimed[ino] {
			foreign++
		}
	}
	gauge(ch, descPortSocks, float64(len(byInode)), lname)
	gauge(ch, descForeign, float64(foreign), lname)
}

// unexplained reports whether a LISTEN socket that no worker claims is
// missing from seen.
func unexplained(now map[uint64]reuseport.Socket, claimed map[uint64]bool, seen map[uint64]struct{}) bool {
	for ino := range now {
		if _, ok := seen[ino]; !ok && !claimed[ino] {
			return true
		}
	}
	return false
}

// listening returns those of inodes that are LISTEN sockets now.
func listening(inodes []uint64, now map[uint64]reuseport.Socket) []uint64 {
	var out []uint64
	for _, ino := range inodes {
		if _, ok := now[ino]; ok {
			out = append(out, ino)
		}
	}
	return out
}

func gauge(ch chan<- prometheus.Metric, d *prometheus.Desc, v float64, labels ...string) {
	ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
}

func counter(ch chan<- prometheus.Metric, d *prometheus.Desc, v float64, labels ...string) {
	ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
}
