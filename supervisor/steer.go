package supervisor

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/steering"
)

// SteeringMode says how new TCP connections are placed on the workers.
type SteeringMode int

const (
	// SteeringHash leaves placement to the kernel: a hash of each
	// connection's addresses picks a socket of the SO_REUSEPORT group.
	// It is the zero value.
	SteeringHash SteeringMode = iota
	// SteeringRoundRobin deals new TCP connections over the serving slots
	// in turn, with an eBPF program the master attaches to each listener's
	// group (package steering). A worker is taken out of the selection
	// Options.SteeringDrainDelay before it gets its stop signal, and while
	// it stalls. UDP listeners keep the kernel's hash. It needs CAP_BPF.
	SteeringRoundRobin
	// SteeringAuto is SteeringRoundRobin where the master can load the
	// program and has a TCP listener, and SteeringHash, with one log line
	// saying why, elsewhere.
	SteeringAuto
)

// String returns the mode as the command line spells it.
func (m SteeringMode) String() string {
	switch m {
	case SteeringRoundRobin:
		return "round-robin"
	case SteeringAuto:
		return "auto"
	}
	return "hash"
}

// MarshalText returns the mode as the command line spells it.
func (m SteeringMode) MarshalText() ([]byte, error) { return []byte(m.String()), nil }

// UnmarshalText parses "auto", "round-robin" or "hash", in any case.
func (m *SteeringMode) UnmarshalText(text []byte) error {
	switch strings.ToLower(strings.TrimSpace(string(text))) {
	case "auto":
		*m = SteeringAuto
	case "round-robin", "roundrobin":
		*m = SteeringRoundRobin
	case "hash":
		*m = SteeringHash
	default:
		return fmt.Errorf("steering %q: want auto, round-robin or hash", text)
	}
	return nil
}

// ErrSteering is wrapped by the error Run returns when round-robin
// steering was asked for and cannot be had: nothing was started.
var ErrSteering = errors.New("supervisor: steering")

// DefaultSteeringDrainDelay is Options.SteeringDrainDelay's default: how
// long a worker is out of the selection before its stop signal, so that no
// handshake is in flight against it.
const DefaultSteeringDrainDelay = 50 * time.Millisecond

// steerer places new connections; a fake stands in for it in the
// state-machine tests.
type steerer interface {
	// add puts the listening socket that pid (or a descendant) holds on
	// addr at slot; addFD puts the master's own socket there.
	add(slot, pid int, addr netip.AddrPort) error
	addFD(slot int, f *os.File) error
	// remove takes slot out of every group; skip out of the selection only.
	remove(slot int)
	skip(slot int, skip bool)
	// counts returns the connections placed per slot, over every group.
	counts() map[int]uint64
	close()
}

// setupSteering decides the steering mode at start. It fails only when
// round-robin was asked for and is impossible.
func (s *Supervisor) setupSteering() error {
	mode := s.opts.Steering
	if mode == SteeringHash {
		s.steering = SteeringHash
		return nil
	}
	why := ""
	hasTCP := false
	for _, l := range s.opts.Listeners {
		hasTCP = hasTCP || l.Network == "tcp"
	}
	switch {
	case !hasTCP:
		why = "no TCP listener (UDP keeps the kernel's hash)"
	case s.steer == nil:
		if err := steering.Check(); err != nil {
			why = err.Error()
		} else {
			s.steer = &ebpfSteerer{groups: map[netip.AddrPort]*steering.Steering{}}
		}
	}
	if why != "" {
		if mode == SteeringRoundRobin {
			return fmt.Errorf("%w: --steering round-robin: %s; give --steering auto or hash to start without it", ErrSteering, why)
		}
		s.log.Info().Str("steering", "hash").Msgf("steering: the kernel's hash places new connections, not round-robin: %s", why)
		s.steering = SteeringHash
		return nil
	}
	s.steering = SteeringRoundRobin
	s.log.Info().Str("steering", "round-robin").Float64("drain_delay_seconds", s.opts.SteeringDrainDelay.Seconds()).
		Msg("steering: an eBPF program deals new TCP connections over the serving workers in turn")
	return nil
}

// steerAdd puts w's sockets in the selection at its slot, once it serves.
func (s *Supervisor) steerAdd(w *worker) {
	if s.steering != SteeringRoundRobin {
		return
	}
	if s.opts.Bind == BindMaster {
		for i, l := range s.opts.Listeners {
			if l.Network == "tcp" && i < len(w.slot.socks) {
				s.steerErr(w, s.steer.addFD(w.slot.id, w.slot.socks[i]))
			}
		}
		return
	}
	for _, addr := range w.tcpAddrs {
		s.steerErr(w, s.steer.add(w.slot.id, w.pid, addr))
	}
}

func (s *Supervisor) steerErr(w *worker, err error) {
	if err == nil {
		return
	}
	reason := "steer"
	if errors.Is(err, steering.ErrMPTCP) {
		reason = "mptcp"
	}
	if n, ok := s.warns.Allow(warnKey{w.slot.id, reason}, s.now()); ok {
		s.log.Warn().Int("worker", w.slot.id).Int("pid", w.pid).Uint64("suppressed", n).Err(err).
			Msg("worker left to the kernel's hash: it cannot be steered")
	}
}

// steerRemove takes slot out of the selection.
func (s *Supervisor) steerRemove(sl *slot) {
	if s.steering == SteeringRoundRobin {
		s.steer.remove(sl.id)
		sl.skipped = false
	}
}

// checkStalls takes a serving worker that stalls out of the selection,
// while at least one other serves, and puts it back when it recovers. A
// worker stalls when its accept queue holds more than half its backlog;
// when its queue holds connections and has not shrunk for three checks in
// a row (600 ms: a worker stopped with SIGSTOP, or stuck); or when it sent
// heartbeats and then none for 2.5 s. It recovers when its queue shrinks
// or empties and its heartbeats, if any, come again.
func (s *Supervisor) checkStalls(now time.Time) {
	if s.steering != SteeringRoundRobin || now.Before(s.stallCheck) {
		return
	}
	s.stallCheck = now.Add(200 * time.Millisecond)
	queues := map[uint64][2]uint32{}
	for _, l := range s.opts.Listeners {
		if l.Network != "tcp" {
			continue
		}
		socks, _ := s.sys.sockets(l)
		for _, sk := range socks {
			queues[sk.Inode] = [2]uint32{sk.Queue, sk.Backlog}
		}
	}
	var serving, stalled []*slot
	for _, id := range s.slotIDs() {
		sl := s.slots[id]
		w := sl.w
		if w == nil || w.state != Listening {
			continue
		}
		stall := false
		if b := w.beat.Load(); b != 0 && now.Sub(time.Unix(0, b)) > 2500*time.Millisecond {
			stall = true
		}
		var queue uint32
		for _, ino := range w.inodes {
			if q, ok := queues[ino]; ok {
				queue += q[0]
				if q[1] > 0 && q[0] > q[1]/2 {
					stall = true
				}
			}
		}
		switch {
		case queue == 0 || queue < sl.lastQueue:
			sl.stuck = 0
		case queue >= 4:
			sl.stuck++
		}
		sl.lastQueue = queue
		if sl.stuck >= 3 {
			stall = true
		}
		if stall {
			stalled = append(stalled, sl)
		} else {
			serving = append(serving, sl)
		}
	}
	for _, sl := range serving {
		if sl.skipped {
			sl.skipped = false
			s.steer.skip(sl.id, false)
			s.log.Info().Int("worker", sl.id).Msg("steering: worker recovered, back in the selection")
		}
	}
	for _, sl := range stalled {
		if !sl.skipped && len(serving) > 0 {
			sl.skipped = true
			s.steer.skip(sl.id, true)
			s.log.Warn().Int("worker", sl.id).Int("pid", sl.w.pid).Msg("steering: worker stalls (accept queue over half its backlog, or heartbeats stopped): out of the selection until it recovers")
		}
	}
}

// steeredCounts returns the connections steered per slot, or nil.
func (s *Supervisor) steeredCounts() map[int]uint64 {
	if s.steering != SteeringRoundRobin {
		return nil
	}
	return s.steer.counts()
}

// ebpfSteerer is the kernel's steering: one steering.Steering per listener
// address, made when the first worker is seen listening there. Only the
// loop calls it (snapshots included), so it needs no lock.
type ebpfSteerer struct {
	groups map[netip.AddrPort]*steering.Steering
}

func (e *ebpfSteerer) group(addr netip.AddrPort) (*steering.Steering, error) {
	if g := e.groups[addr]; g != nil {
		return g, nil
	}
	g, err := steering.New(steering.Options{Addr: addr, MaxSlots: 4096})
	if err != nil {
		return nil, err
	}
	e.groups[addr] = g
	return g, nil
}

func (e *ebpfSteerer) add(slot, pid int, addr netip.AddrPort) error {
	g, err := e.group(addr)
	if err != nil {
		return err
	}
	return g.Add(slot, pid)
}

func (e *ebpfSteerer) addFD(slot int, f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var addr netip.AddrPort
	var fd int
	var serr error
	rc.Control(func(p uintptr) {
		fd = int(p)
		var sa unix.Sockaddr
		if sa, serr = unix.Getsockname(fd); serr == nil {
			switch a := sa.(type) {
			case *unix.SockaddrInet4:
				addr = netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
			case *unix.SockaddrInet6:
				addr = netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port))
			}
		}
	})
	if serr != nil {
		return serr
	}
	g, err := e.group(addr)
	if err != nil {
		return err
	}
	var aerr error
	rc.Control(func(p uintptr) { aerr = g.AddFD(slot, int(p)) })
	return aerr
}

func (e *ebpfSteerer) remove(slot int) {
	for _, g := range e.groups {
		g.Remove(slot)
	}
}

func (e *ebpfSteerer) skip(slot int, skip bool) {
	for _, g := range e.groups {
		g.Skip(slot, skip)
	}
}

func (e *ebpfSteerer) counts() map[int]uint64 {
	out := map[int]uint64{}
	for _, g := range e.groups {
		c, err := g.Counts()
		if err != nil {
			continue
		}
		for slot, n := range c {
			out[slot] += n
		}
	}
	return out
}

func (e *ebpfSteerer) close() {
	for _, g := range e.groups {
		g.Close()
	}
}
