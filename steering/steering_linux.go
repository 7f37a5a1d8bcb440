//go:build linux

package steering

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// Steering steers the new connections of one SO_REUSEPORT group (one
// listener address) over the sockets put in its slots. Create it with
// [New]; the zero value is not usable.
type Steering struct {
	addr     netip.AddrPort
	what     string // "for ADDR", or "" for Check
	maxSlots int
	pinPath  string // "" when not pinned

	mu      sync.Mutex
	socks   *ebpf.Map
	rings   *ebpf.Map
	active  *ebpf.Map
	counts  *ebpf.Map
	prog    *ebpf.Program
	ring    uint32         // the ring the program reads: 0 or 1
	present map[int]uint64 // slot -> socket cookie
	skipped map[int]bool   // stalled slots
	adopted bool           // the maps were found pinned
	closed  bool
}

// Check reports whether this process can load and attach the steering
// program: nil when it can, else an error naming the missing piece (a
// capability such as CAP_BPF, or kernel support, matching [ErrUnsupported]).
// It loads a program and its maps, and unloads them at once.
func Check() error {
	s, err := newSteering(Options{Addr: netip.AddrPortFrom(netip.IPv4Unspecified(), 1), MaxSlots: 1}, "")
	if err != nil {
		return err
	}
	if err := s.Close(); err != nil {
		return err
	}
	// pidfd_getfd (Linux 5.6) on this process itself.
	pidfd, err := unix.PidfdOpen(os.Getpid(), 0)
	if err != nil {
		return fmt.Errorf("%w: pidfd_open: %w (Linux 5.3 or later is needed)", ErrUnsupported, err)
	}
	defer unix.Close(pidfd)
	fd, err := unix.PidfdGetfd(pidfd, pidfd, 0)
	if err != nil {
		if errors.Is(err, unix.ENOSYS) {
			return fmt.Errorf("%w: pidfd_getfd: %w (Linux 5.6 or later is needed)", ErrUnsupported, err)
		}
		return fmt.Errorf("steering: pidfd_getfd on this process: %w", err)
	}
	unix.Close(fd)
	return nil
}

// New loads the steering program and creates (or, with a PinPath that
// holds them, adopts) its maps for the listener address opts.Addr. The
// program is attached to the group by the first [Steering.Add] or
// [Steering.AddFD]: until then the kernel's hash (or the program of an
// earlier master) places connections.
//
// Errors name the missing capability (CAP_BPF) or match [ErrUnsupported].
func New(opts Options) (*Steering, error) {
	return newSteering(opts, " for "+opts.Addr.String())
}

func newSteering(opts Options, what string) (*Steering, error) {
	if !opts.Addr.IsValid() || opts.Addr.Port() == 0 {
		return nil, fmt.Errorf("steering: new: invalid listener address %q (want an address and a port)", opts.Addr)
	}
	max := opts.MaxSlots
	if max == 0 {
		max = DefaultMaxSlots
	}
	if max < 0 || max > maxMaxSlots {
		return nil, fmt.Errorf("steering: new %s: MaxSlots %d out of range (1 to %d)", opts.Addr, opts.MaxSlots, maxMaxSlots)
	}
	s := &Steering{
		addr:     opts.Addr,
		what:     what,
		maxSlots: max,
		present:  make(map[int]uint64),
		skipped:  make(map[int]bool),
	}
	if opts.PinPath != "" && onBPFFS(opts.PinPath) {
		if err := os.MkdirAll(opts.PinPath, 0o700); err != nil {
			return nil, fmt.Errorf("steering: new %s: create pin directory: %w", opts.Addr, err)
		}
		s.pinPath = opts.PinPath
	}
	// Kernels before 5.11 charge eBPF maps to RLIMIT_MEMLOCK; later ones
	// need nothing, and RemoveMemlock then does nothing. Its error
	// matters only if the load fails.
	memlockErr := rlimit.RemoveMemlock()
	if err := s.load(); err != nil {
		s.Close()
		if memlockErr != nil && hasCap(unix.CAP_BPF) {
			return nil, fmt.Errorf("%w (raising RLIMIT_MEMLOCK, which kernels before 5.11 need for eBPF maps, failed too: %v)", err, memlockErr)
		}
		return nil, err
	}
	return s, nil
}

// load creates or adopts the maps, loads the program and, for fresh maps,
// writes an empty ring.
func (s *Steering) load() error {
	_, err := os.Stat(filepath.Join(s.pinPath, socksName))
	s.adopted = s.pinPath != "" && err == nil
	err = s.newMaps()
	if errors.Is(err, ebpf.ErrMapIncompatible) {
		// Pinned by a master with another MaxSlots (or another
		// version): start afresh. The old program keeps its maps until
		// this one is attached.
		s.closeMaps()
		s.removePins()
		s.adopted = false
		err = s.newMaps()
	}
	if err != nil {
		return err
	}
	if err := s.loadProgram(); err != nil {
		return err
	}
	if s.adopted {
		return s.adopt()
	}
	return s.writeRing()
}

// newMaps creates the four maps, or loads them from the pin path.
func (s *Steering) newMaps() error {
	socks, rings, active, counts := mapSpecs(s.maxSlots, s.pinPath != "")
	mopts := ebpf.MapOptions{PinPath: s.pinPath}
	var err error
	for _, m := range []struct {
		spec *ebpf.MapSpec
		dst  **ebpf.Map
	}{{socks, &s.socks}, {rings, &s.rings}, {active, &s.active}, {counts, &s.counts}} {
		*m.dst, err = ebpf.NewMapWithOptions(m.spec, mopts)
		if err != nil {
			return s.loadError("create eBPF map "+m.spec.Name, err)
		}
	}
	return nil
}

// loadProgram loads the program with the select-or-migrate attach type, or,
// on kernels before 5.14, the plain select type.
func (s *Steering) loadProgram() error {
	spec := &ebpf.ProgramSpec{
		Name:         "shoal_steer",
		Type:         ebpf.SkReuseport,
		AttachType:   ebpf.AttachSkReuseportSelectOrMigrate,
		Instructions: program(s.socks, s.rings, s.active, s.counts, s.maxSlots),
		License:      "Dual MIT/GPL",
	}
	prog, err := ebpf.NewProgramWithOptions(spec, ebpf.ProgramOptions{LogDisabled: true})
	if err != nil && !isPerm(err) {
		spec.AttachType = ebpf.AttachSkReuseportSelect
		if p, err2 := ebpf.NewProgramWithOptions(spec, ebpf.ProgramOptions{}); err2 == nil {
			prog, err = p, nil
		}
	}
	if err != nil {
		return s.loadError("load the SK_REUSEPORT eBPF program", err)
	}
	s.prog = prog
	return nil
}

// adopt reads back the state of pinned maps: the ring the program reads,
// and the slots whose sockets are still in the map. Stalled marks are not
// kept: every adopted slot is selectable at the next change.
func (s *Steering) adopt() error {
	var ring uint32
	if err := s.active.Lookup(uint32(0), &ring); err != nil {
		return fmt.Errorf("steering: adopt the maps in %s: read the active ring: %w", s.pinPath, err)
	}
	s.ring = ring & 1
	for slot := 0; slot < s.maxSlots; slot++ {
		var cookie uint64
		if err := s.socks.Lookup(uint32(slot), &cookie); err == nil {
			s.present[slot] = cookie
		}
	}
	return nil
}

// loadError wraps an error of map creation or program load, naming the
// missing capability when the kernel said EPERM.
func (s *Steering) loadError(op string, err error) error {
	if isPerm(err) {
		return fmt.Errorf("steering: %s%s: %w: %s", op, s.what, err, permAdvice())
	}
	if errors.Is(err, ebpf.ErrNotSupported) || errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("%w: %s%s: %w (Linux 4.19 or later with CONFIG_BPF_SYSCALL is needed)", ErrUnsupported, op, s.what, err)
	}
	return fmt.Errorf("steering: %s%s: %w", op, s.what, err)
}

func isPerm(err error) bool {
	return errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) || errors.Is(err, os.ErrPermission)
}

// permAdvice says which capability is missing, from the effective set.
func permAdvice() string {
	if !hasCap(unix.CAP_BPF) && !hasCap(unix.CAP_SYS_ADMIN) {
		return "this process lacks CAP_BPF, which loading an eBPF program needs: run the master as root or grant it CAP_BPF (systemd: AmbientCapabilities=CAP_BPF; docker: --cap-add BPF); without it, the kernel's hash places new connections"
	}
	return "this process has CAP_BPF but the kernel refused: a security module (SELinux, AppArmor), a seccomp filter or a container runtime may forbid bpf(2)"
}

// hasCap reports whether capability c is in this thread's effective set.
func hasCap(c int) bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false
	}
	return data[c/32].Effective&(1<<(uint(c)%32)) != 0
}

// onBPFFS reports whether path, or its nearest existing parent, is on a BPF
// file system.
func onBPFFS(path string) bool {
	for p := filepath.Clean(path); ; p = filepath.Dir(p) {
		var st unix.Statfs_t
		err := unix.Statfs(p, &st)
		if err == nil {
			return uint32(st.Type) == unix.BPF_FS_MAGIC
		}
		if !errors.Is(err, unix.ENOENT) || p == "/" || p == "." {
			return false
		}
	}
}

// Add finds the socket that process pid, or one of its descendants, holds
// listening on the address, and puts it at slot, in the selection: new
// connections are dealt to it in turn from now on. The master's duplicate
// of the socket is closed before Add returns; the socket stays in the map
// until [Steering.Remove] or until it closes.
//
// Call it once the kernel shows the worker listening (reuseport.Listeners).
// A socket that joined the group but is in no slot gets no connection while
// slotted sockets live, so call it promptly for a replacement worker.
// Adding the socket that is already at slot does nothing; a socket already
// at another slot is an error. Add also (re)attaches the program to the
// group, which a group formed anew needs.
//
// The error matches [ErrNoListener] when no such socket was found,
// [ErrMPTCP] for a Multipath TCP socket, and os.ErrNotExist when pid is
// gone.
func (s *Steering) Add(slot, pid int) error {
	if err := s.checkSlot("add", slot); err != nil {
		return err
	}
	fd, cookie, err := s.take(slot, pid)
	if err != nil {
		return fmt.Errorf("steering: add slot %d of %s: process %d: %w", slot, s.addr, pid, err)
	}
	defer unix.Close(fd)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.insert(slot, fd, cookie); err != nil {
		return fmt.Errorf("steering: add slot %d of %s: process %d: %w", slot, s.addr, pid, err)
	}
	return nil
}

// AddFD is Add for a socket that this process holds itself: fd is
// checked, put at slot, and left open (the caller still owns it).
func (s *Steering) AddFD(slot, fd int) error {
	if err := s.checkSlot("add", slot); err != nil {
		return err
	}
	cookie, err := s.check(fd)
	if err != nil {
		return fmt.Errorf("steering: add slot %d of %s: fd %d: %w", slot, s.addr, fd, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.insert(slot, fd, cookie); err != nil {
		return fmt.Errorf("steering: add slot %d of %s: fd %d: %w", slot, s.addr, fd, err)
	}
	return nil
}

// insert puts the checked socket fd at slot and attaches the program.
// s.mu is held.
func (s *Steering) insert(slot, fd int, cookie uint64) error {
	if s.closed {
		return errors.New("steering is closed")
	}
	for other, c := range s.present {
		if c == cookie && other != slot {
			return fmt.Errorf("the socket is already at slot %d: a socket can be in one slot only", other)
		}
	}
	// Attach first: the program of an earlier master (whose maps were not
	// pinned, or not compatible) holds its maps, and a socket in them
	// cannot join ours (EBUSY) until that program is replaced and freed.
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_EBPF, s.prog.FD()); err != nil {
		return fmt.Errorf("attach the program to the group: setsockopt SO_ATTACH_REUSEPORT_EBPF: %w", err)
	}
	if s.present[slot] != cookie {
		err := s.socks.Update(uint32(slot), uint64(fd), ebpf.UpdateAny)
		// The kernel frees a replaced program's maps after an RCU grace
		// period, in a work queue: wait for that, up to about a second.
		for wait := time.Millisecond; errors.Is(err, unix.EBUSY) && wait < time.Second; wait *= 2 {
			time.Sleep(wait)
			err = s.socks.Update(uint32(slot), uint64(fd), ebpf.UpdateAny)
		}
		if errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("put the socket in the map: %w: it is in another REUSEPORT_SOCKARRAY map (of another Steering or another master?); a socket can be in one such map only", err)
		}
		if errors.Is(err, errnoENOTSUPP) || errors.Is(err, unix.EOPNOTSUPP) {
			return fmt.Errorf("put the socket in the map: %w: %w", err, ErrMPTCP)
		}
		if err != nil {
			return fmt.Errorf("put the socket in the map: %w", err)
		}
		s.present[slot] = cookie
	}
	delete(s.skipped, slot)
	return s.writeRing()
}

// Remove takes slot out of the selection at once, and its socket out of
// the map: no new connection is steered to it. Call it before the slot's
// worker is told to stop (the feasibility run left 50 ms), and when a
// worker dies. Removing an empty slot does nothing.
func (s *Steering) Remove(slot int) error {
	if err := s.checkSlot("remove", slot); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("steering: remove slot %d of %s: steering is closed", slot, s.addr)
	}
	_, had := s.present[slot]
	delete(s.present, slot)
	delete(s.skipped, slot)
	if had {
		if err := s.writeRing(); err != nil {
			return fmt.Errorf("steering: remove slot %d of %s: %w", slot, s.addr, err)
		}
	}
	if err := s.socks.Delete(uint32(slot)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("steering: remove slot %d of %s: delete from the map: %w", slot, s.addr, err)
	}
	return nil
}

// Skip takes slot out of the selection (skip true) while its socket stays
// in the map, or puts it back (skip false): for a stalled worker. A slot
// is skipped only while at least one other slot serves: when every slot is
// skipped, all are selected. Add on the slot clears the mark.
func (s *Steering) Skip(slot int, skip bool) error {
	if err := s.checkSlot("skip", slot); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("steering: skip slot %d of %s: steering is closed", slot, s.addr)
	}
	if s.skipped[slot] == skip {
		return nil
	}
	if skip {
		s.skipped[slot] = true
	} else {
		delete(s.skipped, slot)
	}
	if err := s.writeRing(); err != nil {
		return fmt.Errorf("steering: skip slot %d of %s: %w", slot, s.addr, err)
	}
	return nil
}

// writeRing writes the selectable slots into the ring the program does
// not read, then points the program at it. s.mu is held.
func (s *Steering) writeRing() error {
	var all, serving []int
	for slot := range s.present {
		all = append(all, slot)
		if !s.skipped[slot] {
			serving = append(serving, slot)
		}
	}
	if len(serving) == 0 {
		serving = all
	}
	slices.Sort(serving)
	buf := make([]byte, 4+4*s.maxSlots)
	binary.NativeEndian.PutUint32(buf, uint32(len(serving)))
	for i, slot := range serving {
		binary.NativeEndian.PutUint32(buf[4+4*i:], uint32(slot))
	}
	next := s.ring ^ 1
	if err := s.rings.Update(next, buf, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write the ring of selectable slots: %w", err)
	}
	if err := s.active.Update(uint32(0), next, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("switch to the new ring of selectable slots: %w", err)
	}
	s.ring = next
	return nil
}

// Counts returns, per slot, the number of connections the program steered
// to it since the maps were created (adopted maps keep counting): every
// slot that holds a socket, and every slot with a count. A slot's count is
// not reset when a new worker takes the slot.
func (s *Steering) Counts() (map[int]uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, fmt.Errorf("steering: counts of %s: steering is closed", s.addr)
	}
	counts, err := s.readCounts()
	if err != nil {
		return nil, fmt.Errorf("steering: counts of %s: %w", s.addr, err)
	}
	out := make(map[int]uint64)
	for slot, n := range counts {
		if _, ok := s.present[slot]; ok || n != 0 {
			out[slot] = n
		}
	}
	return out, nil
}

// readCounts reads the whole counts map, in one system call where the
// kernel has batch operations (5.6+; every snapshot of the master reads
// it, a metrics scrape, shoal ctl status, a second's check), else one per
// slot.
func (s *Steering) readCounts() ([]uint64, error) {
	keys := make([]uint32, s.maxSlots)
	vals := make([]uint64, s.maxSlots)
	var cursor ebpf.MapBatchCursor
	n, err := s.counts.BatchLookup(&cursor, keys, vals, nil)
	if err == nil || errors.Is(err, ebpf.ErrKeyNotExist) {
		// An array map has every key: the batch holds them all.
		if n == s.maxSlots {
			out := make([]uint64, s.maxSlots)
			for i, k := range keys {
				if int(k) < len(out) {
					out[k] = vals[i]
				}
			}
			return out, nil
		}
	} else if !errors.Is(err, ebpf.ErrNotSupported) {
		return nil, err
	}
	for slot := range vals {
		if err := s.counts.Lookup(uint32(slot), &vals[slot]); err != nil {
			return nil, fmt.Errorf("read slot %d: %w", slot, err)
		}
	}
	return vals, nil
}

// Slots returns the slots that hold a socket, in order. After New adopted
// pinned maps, these are the sockets an earlier master put there that are
// still open.
func (s *Steering) Slots() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []int
	for slot := range s.present {
		out = append(out, slot)
	}
	slices.Sort(out)
	return out
}

// FDs returns the descriptors of the program and its maps, for a master
// that replaces its program in place and hands them to the next, which
// takes them over with [FromFDs]. They stay the Steering's: do not close
// them.
func (s *Steering) FDs() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	return []int{s.prog.FD(), s.socks.FD(), s.rings.FD(), s.active.FD(), s.counts.FD()}
}

// FromFDs is [New] for the program and maps of a Steering whose FDs this
// process inherited across exec: the sockets in the map stay selected, the
// counts go on. It takes ownership of fds. opts.PinPath is not used.
func FromFDs(opts Options, fds []int) (*Steering, error) {
	if len(fds) != 5 {
		return nil, fmt.Errorf("steering: adopt %s: want 5 descriptors (program and 4 maps), got %d", opts.Addr, len(fds))
	}
	max := opts.MaxSlots
	if max == 0 {
		max = DefaultMaxSlots
	}
	s := &Steering{addr: opts.Addr, what: " for " + opts.Addr.String(), maxSlots: max, present: map[int]uint64{}, skipped: map[int]bool{}, adopted: true}
	prog, err := ebpf.NewProgramFromFD(fds[0])
	if err != nil {
		return nil, fmt.Errorf("steering: adopt %s: program from fd %d: %w", opts.Addr, fds[0], err)
	}
	s.prog = prog
	for i, m := range []**ebpf.Map{&s.socks, &s.rings, &s.active, &s.counts} {
		if *m, err = ebpf.NewMapFromFD(fds[i+1]); err != nil {
			s.Close()
			return nil, fmt.Errorf("steering: adopt %s: map from fd %d: %w", opts.Addr, fds[i+1], err)
		}
	}
	if err := s.adopt(); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// Pinned reports whether the maps are pinned in Options.PinPath, and
// whether New found them there (adopted) rather than creating them.
func (s *Steering) Pinned() (pinned, adopted bool) {
	return s.pinPath != "", s.adopted
}

// Close releases this process's handles on the program and its maps. The
// program stays attached to the group, and keeps steering over the
// sockets in the map, until another program replaces it or the group's
// last socket closes; pinned maps stay pinned for a restarted master (see
// [Steering.Unpin]).
func (s *Steering) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	var errs []error
	if s.prog != nil {
		errs = append(errs, s.prog.Close())
		s.prog = nil
	}
	errs = append(errs, s.closeMaps())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("steering: close %s: %w", s.addr, err)
	}
	return nil
}

// closeMaps closes the maps that are open.
func (s *Steering) closeMaps() error {
	var errs []error
	for _, m := range []**ebpf.Map{&s.socks, &s.rings, &s.active, &s.counts} {
		if *m != nil {
			errs = append(errs, (*m).Close())
			*m = nil
		}
	}
	return errors.Join(errs...)
}

// Unpin removes the pinned maps and their directory, for a master that
// stops for good: the maps then live only as long as the program.
func (s *Steering) Unpin() error {
	if s.pinPath == "" {
		return nil
	}
	if err := s.removePins(); err != nil {
		return fmt.Errorf("steering: unpin the maps of %s in %s: %w", s.addr, s.pinPath, err)
	}
	return nil
}

// removePins removes the pinned map files and the directory if empty.
func (s *Steering) removePins() error {
	var errs []error
	for _, name := range []string{socksName, ringName, activeName, countsName} {
		if err := os.Remove(filepath.Join(s.pinPath, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := os.Remove(s.pinPath); err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.ENOTEMPTY) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func (s *Steering) checkSlot(op string, slot int) error {
	if slot < 0 || slot >= s.maxSlots {
		return fmt.Errorf("steering: %s slot %d of %s: slot out of range (0 to %d)", op, slot, s.addr, s.maxSlots-1)
	}
	return nil
}

// errnoENOTSUPP is the kernel's internal ENOTSUPP (524), which
// REUSEPORT_SOCKARRAY returns for a socket it cannot hold (MPTCP).
const errnoENOTSUPP = unix.Errno(524)
