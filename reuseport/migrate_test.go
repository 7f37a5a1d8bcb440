package reuseport

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/peer"
)

// TestMigrateReqInOwnNamespace sets net.ipv4.tcp_migrate_req inside a new
// network namespace, so the machine's own setting is left as it was.
func TestMigrateReqInOwnNamespace(t *testing.T) {
	if os.Getenv("REUSEPORT_MIGRATE_HELPER") == "1" {
		// A new network namespace starts with the kernel's default, 0.
		before, err := MigrateReq()
		if err != nil {
			fmt.Println("error:", err)
			return
		}
		if err := SetMigrateReq(true); err != nil {
			fmt.Println("error:", err)
			return
		}
		after, err := MigrateReq()
		fmt.Printf("before=%v after=%v err=%v\n", before, after, err)
		return
	}
	if os.Getuid() != 0 {
		peer.Missing(t, "a network namespace of its own needs root")
	}
	unshare := peer.Require(t, "unshare")
	host, err := MigrateReq()
	if err != nil {
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, unshare, "--net", os.Args[0], "-test.run=^TestMigrateReqInOwnNamespace$", "-test.v")
	cmd.Env = append(os.Environ(), "REUSEPORT_MIGRATE_HELPER=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper in a new network namespace: %v\n%s", err, out)
	}
	want := "before=false after=true err=<nil>"
	if !strings.Contains(string(out), want) {
		t.Errorf("in the namespace: %s; want %q", out, want)
	}
	if now, _ := MigrateReq(); now != host {
		t.Errorf("the host's tcp_migrate_req changed from %v to %v", host, now)
	}
}
