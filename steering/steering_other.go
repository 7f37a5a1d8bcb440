//go:build !linux

package steering

import "fmt"

// Steering steers the new connections of one SO_REUSEPORT group; on this
// platform every method fails with [ErrUnsupported].
type Steering struct{}

var errNotLinux = fmt.Errorf("%w: eBPF SK_REUSEPORT steering needs Linux", ErrUnsupported)

// Check reports that steering needs Linux.
func Check() error { return errNotLinux }

// New fails: steering needs Linux.
func New(opts Options) (*Steering, error) { return nil, errNotLinux }

// Add fails: steering needs Linux.
func (s *Steering) Add(slot, pid int) error { return errNotLinux }

// AddFD fails: steering needs Linux.
func (s *Steering) AddFD(slot, fd int) error { return errNotLinux }

// Remove fails: steering needs Linux.
func (s *Steering) Remove(slot int) error { return errNotLinux }

// Skip fails: steering needs Linux.
func (s *Steering) Skip(slot int, skip bool) error { return errNotLinux }

// Counts fails: steering needs Linux.
func (s *Steering) Counts() (map[int]uint64, error) { return nil, errNotLinux }

// Slots returns nothing: steering needs Linux.
func (s *Steering) Slots() []int { return nil }

// Pinned reports false: steering needs Linux.
func (s *Steering) Pinned() (pinned, adopted bool) { return false, false }

// Close does nothing.
func (s *Steering) Close() error { return nil }

// Unpin does nothing.
func (s *Steering) Unpin() error { return nil }

// FDs returns nil: steering needs Linux.
func (s *Steering) FDs() []int { return nil }

// FromFDs fails: steering needs Linux.
func FromFDs(opts Options, fds []int) (*Steering, error) { return nil, errNotLinux }
