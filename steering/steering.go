// Package steering deals the new TCP connections of one SO_REUSEPORT group
// over its listening sockets in turn, with an eBPF program in the kernel.
//
// Without it, Linux places each new connection on a socket of the group
// by a hash of the connection's addresses and ports, which is uneven over
// few connections and keeps placing connections on a socket whose process
// is about to stop. With it, the master puts each worker's listening socket
// in a REUSEPORT_SOCKARRAY map at the worker's slot, and a
// BPF_PROG_TYPE_SK_REUSEPORT program attached to the group picks, for each
// new connection, the next slot of a ring of selectable slots (round
// robin). Taking a slot out of the ring before its worker is told to stop
// means no new connection reaches a worker that will not accept it, even a
// worker that does not drain.
//
// The program never refuses a connection: when no slot is selectable, or
// the chosen socket is gone, it returns without choosing and the kernel's
// hash applies. It is attached with the select-or-migrate attach type
// (Linux 5.14+): when a listener of the group closes, the kernel moves the
// connections waiting in its accept queue to the listener the program (or,
// failing it, the hash) picks, instead of resetting them, whatever
// net.ipv4.tcp_migrate_req says.
//
// The program is built from Go instructions (cilium/ebpf's asm package): no
// compiler, no cgo. Loading it needs CAP_BPF (or CAP_SYS_ADMIN); taking a
// worker's socket with pidfd_getfd needs nothing more for a child of the
// same user, and CAP_SYS_PTRACE for workers that run as another user.
//
// Each address family and bind address forms a group of its own: use one
// [Steering] per listener address. Multipath TCP sockets (the default of Go
// 1.24+ listeners where the kernel allows it) can be neither in the map nor
// under the program: [Steering.Add] refuses them with [ErrMPTCP].
//
// A Steering is safe for use by several goroutines; its methods are meant
// to be called by the supervisor's loop, and Counts by a metrics collector.
package steering

import (
	"errors"
	"net/netip"
)

// Options configure a [Steering]. Addr is required; the zero value of every
// other field is useful.
type Options struct {
	// Addr is the listeners' local address: its family and bind address
	// (0.0.0.0 or :: for every address) and its port. Only sockets bound
	// to exactly this address join the map.
	Addr netip.AddrPort

	// MaxSlots is the number of slots, 0 to MaxSlots-1: at least the
	// number of workers. Zero means 64; at most 4096.
	MaxSlots int

	// PinPath is a directory in a BPF file system (bpffs, usually mounted
	// on /sys/fs/bpf) where the maps are pinned, created if missing, such
	// as /sys/fs/bpf/shoal/tcp4-0.0.0.0-8080. A master that restarts with
	// the same PinPath adopts the maps, and the sockets in them keep being
	// selected meanwhile. When PinPath is empty, or not on a bpffs, the
	// maps live as long as the program (until the group's last socket
	// closes), and a restarted master attaches a fresh program: until its
	// first Add, new connections are placed by the kernel's hash.
	PinPath string
}

// DefaultMaxSlots is the number of slots when Options.MaxSlots is zero.
const DefaultMaxSlots = 64

// maxMaxSlots bounds Options.MaxSlots.
const maxMaxSlots = 4096

// ErrMPTCP is returned, wrapped, when a socket is a Multipath TCP socket,
// which the kernel lets neither into a REUSEPORT_SOCKARRAY map nor under
// an SK_REUSEPORT program. Go 1.24 and later open MPTCP listeners by
// default where the kernel allows it: run the worker with
// GODEBUG=multipathtcp=0, or have it call
// net.ListenConfig.SetMultipathTCP(false), or leave steering off (the
// kernel's hash then places connections).
var ErrMPTCP = errors.New("the socket is Multipath TCP (IPPROTO_MPTCP), which SK_REUSEPORT steering cannot use: run the worker with GODEBUG=multipathtcp=0 (Go 1.24+), or turn steering off")

// ErrNoListener is returned, wrapped, when [Steering.Add] finds no socket
// listening on the address in the process or its descendants, or
// [Steering.AddFD] is given a socket that is not listening on it.
var ErrNoListener = errors.New("no TCP socket listening on the address")

// ErrUnsupported is returned, wrapped, when the kernel or platform lacks
// what steering needs: eBPF SK_REUSEPORT programs (Linux 4.19+; 5.14+ for
// migration), REUSEPORT_SOCKARRAY maps, or pidfd_getfd (Linux 5.6+).
var ErrUnsupported = errors.New("steering: not supported by this kernel or platform")
