//go:build linux

package steering_test

import (
	"errors"
	"log"
	"net/netip"
	"time"

	"github.com/shoal-sh/shoal/steering"
)

// A supervisor's use: one Steering per listener address; each worker's
// socket goes in at the worker's slot once the kernel shows it listening,
// and comes out 50 ms before the worker is told to stop.
func Example() {
	if err := steering.Check(); err != nil {
		log.Printf("kernel steering off, the kernel's hash places connections: %v", err)
		return
	}
	s, err := steering.New(steering.Options{
		Addr:     netip.MustParseAddrPort("0.0.0.0:8080"),
		MaxSlots: 16,
		PinPath:  "/sys/fs/bpf/shoal/tcp4-0.0.0.0-8080", // used only if /sys/fs/bpf is a bpffs
	})
	if err != nil {
		log.Print(err)
		return
	}
	defer s.Close()

	var slot, pid int // a worker that the kernel shows listening
	if err := s.Add(slot, pid); errors.Is(err, steering.ErrMPTCP) {
		log.Printf("slot %d: %v", slot, err) // the fix is in the message: GODEBUG=multipathtcp=0
	}

	// A reload or a stop: out of the selection, then the stop signal.
	s.Remove(slot)
	time.Sleep(50 * time.Millisecond)
	// ... send the stop signal; Add the replacement at the same slot.

	// A stalled worker (its accept queue grows): skipped until it recovers.
	s.Skip(slot, true)

	counts, _ := s.Counts() // shoal_worker_steered_connections_total{worker="SLOT"}
	_ = counts
}
