package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/internal/sdnotify"
	"github.com/shoal-sh/shoal/supervisor"
)

// master is what the master's signal handler and control socket act on.
type master struct {
	sup     *supervisor.Supervisor
	stop    func() // a graceful stop
	log     *zerolog.Logger
	notify  *notifier
	servers *servers
}

// reload rolls every worker over, telling systemd about it.
func (m *master) reload(ctx context.Context) error {
	m.notify.send("RELOADING=1\nMONOTONIC_USEC=" + strconv.FormatInt(monotonicUsec(), 10))
	err := m.sup.Reload(ctx)
	if err != nil {
		m.notify.send("READY=1\nSTATUS=reload aborted, the old workers serve: " + oneLine(err.Error()))
	} else {
		m.notify.send("READY=1\nSTATUS=reloaded")
	}
	m.notify.wake()
	return err
}

// notifier speaks systemd's notification protocol for the master when
// NOTIFY_SOCKET is set (Type=notify or notify-reload): READY=1 once
// --min-ready workers serve, STATUS= lines as the workers change,
// RELOADING=1 and READY=1 around a reload, STOPPING=1 at stop, and
// WATCHDOG=1 every half WATCHDOG_USEC while the supervisor's loop answers.
// A nil notifier does nothing.
type notifier struct {
	addr     string
	sup      *supervisor.Supervisor
	minReady int
	log      *zerolog.Logger
	watchdog time.Duration // 0: none
	kick     chan struct{}
	done     chan struct{}
}

// startNotifier starts the notifier's goroutine, which ends with ctx; it
// returns nil when NOTIFY_SOCKET is not set.
func startNotifier(ctx context.Context, sup *supervisor.Supervisor, minReady int, log *zerolog.Logger) *notifier {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		return nil
	}
	n := &notifier{addr: addr, sup: sup, minReady: minReady, log: log, kick: make(chan struct{}, 1), done: make(chan struct{})}
	if usec, err := strconv.ParseInt(os.Getenv("WATCHDOG_USEC"), 10, 64); err == nil && usec > 0 {
		if pid := os.Getenv("WATCHDOG_PID"); pid == "" || pid == strconv.Itoa(os.Getpid()) {
			n.watchdog = time.Duration(usec) * time.Microsecond / 2
		}
	}
	go n.run(ctx)
	return n
}

func (n *notifier) run(ctx context.Context) {
	defer close(n.done)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var dog <-chan time.Time
	if n.watchdog > 0 {
		t := time.NewTicker(n.watchdog)
		defer t.Stop()
		dog = t.C
	}
	ready, status := false, ""
	update := func() {
		sctx, cancel := context.WithTimeout(ctx, time.Second)
		snap, err := n.sup.SnapshotContext(sctx)
		cancel()
		if err != nil {
			return
		}
		listening := 0
		for _, w := range snap.Workers {
			if w.State == supervisor.Listening {
				listening++
			}
		}
		want := n.minReady
		if want <= 0 || want > snap.Desired {
			want = snap.Desired
		}
		s := fmt.Sprintf("%d/%d workers listening, %d restarts", listening, snap.Desired, snap.Restarts)
		if snap.Reloading {
			s += ", reloading"
		}
		switch {
		case !ready && listening >= want && want > 0:
			ready = true
			n.send("READY=1\nSTATUS=" + s)
		case s != status:
			n.send("STATUS=" + s)
		}
		status = s
	}
	for {
		select {
		case <-ctx.Done():
			n.send("STOPPING=1\nSTATUS=stopping")
			return
		case <-tick.C:
			update()
		case <-n.kick:
			update()
		case <-dog:
			// Only a loop that answers is healthy.
			sctx, cancel := context.WithTimeout(ctx, n.watchdog/2)
			_, err := n.sup.SnapshotContext(sctx)
			cancel()
			if err == nil {
				n.send("WATCHDOG=1")
			}
		}
	}
}

// send sends state, logging a failure at debug level: systemd may be gone.
func (n *notifier) send(state string) {
	if n == nil {
		return
	}
	if err := sdnotify.SendTo(n.addr, state); err != nil {
		n.log.Debug().Err(err).Msg("sd_notify")
	}
}

// wake makes the notifier look at the workers now.
func (n *notifier) wake() {
	if n == nil {
		return
	}
	select {
	case n.kick <- struct{}{}:
	default:
	}
}

// wait waits for the notifier's goroutine to end, after its context.
func (n *notifier) wait() {
	if n != nil {
		<-n.done
	}
}

func monotonicUsec() int64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano() / 1000
}

func oneLine(s string) string { return strings.ReplaceAll(s, "\n", " ") }
