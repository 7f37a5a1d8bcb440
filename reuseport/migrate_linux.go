package reuseport

import (
	"errors"
	"fmt"
	"os"
	"strings"
)

// migrateReqPath is the sysctl net.ipv4.tcp_migrate_req of the current
// network namespace.
const migrateReqPath = "/proc/sys/net/ipv4/tcp_migrate_req"

// ErrNoMigrateReq is returned (wrapped) when the kernel has no
// net.ipv4.tcp_migrate_req (Linux before 5.14).
var ErrNoMigrateReq = errors.New("reuseport: net.ipv4.tcp_migrate_req is missing: Linux 5.14 or later is needed")

// MigrateReq reports whether net.ipv4.tcp_migrate_req is 1 in this
// process's network namespace: then, when one of several SO_REUSEPORT
// listeners closes, the kernel moves the connections waiting in its accept
// queue to the other listeners instead of resetting them.
func MigrateReq() (bool, error) {
	b, err := os.ReadFile(migrateReqPath)
	if errors.Is(err, os.ErrNotExist) {
		return false, ErrNoMigrateReq
	}
	if err != nil {
		return false, fmt.Errorf("reuseport: read %s: %w", migrateReqPath, err)
	}
	return strings.TrimSpace(string(b)) == "1", nil
}

// SetMigrateReq sets net.ipv4.tcp_migrate_req in this process's network
// namespace. It needs CAP_NET_ADMIN over the namespace (root in it).
func SetMigrateReq(on bool) error {
	v := "0\n"
	if on {
		v = "1\n"
	}
	f, err := os.OpenFile(migrateReqPath, os.O_WRONLY, 0)
	if errors.Is(err, os.ErrNotExist) {
		return ErrNoMigrateReq
	}
	if err != nil {
		return fmt.Errorf("reuseport: set net.ipv4.tcp_migrate_req: %w", err)
	}
	defer f.Close()
	if _, err := f.WriteString(v); err != nil {
		return fmt.Errorf("reuseport: set net.ipv4.tcp_migrate_req: %w", err)
	}
	return nil
}
