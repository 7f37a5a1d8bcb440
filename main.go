// Command shoal runs N worker processes that all serve one port. Each worker
// binds the port itself with SO_REUSEPORT and the kernel spreads connections
// over them; shoal forks them, replaces the dead, rolls them over and stops
// them cleanly. With no command it runs its built-in hello-world HTTP worker.
//
//	shoal [flags] [-- COMMAND [ARGS...]]
//	shoal version
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/control"
	"github.com/shoal-sh/shoal/metrics"
	"github.com/shoal-sh/shoal/reuseport"
	"github.com/shoal-sh/shoal/supervisor"
)

// version is stamped at build time: -ldflags "-X main.version=v1.2.3".
var version = "dev"

// Exit codes of the master.
const (
	exitOK      = 0 // a requested stop, or every worker exited cleanly
	exitFailure = 1 // gave up (--max-restarts) or the workers failed
	exitUsage   = 2 // bad flags, environment or command: nothing was started
)

// The main goroutine keeps the main thread: the master forks every worker
// from it (supervisor.Main), so that the workers survive an in-place
// upgrade.
func init() { runtime.LockOSThread() }

func main() {
	if supervisor.IsWorker() {
		runtime.UnlockOSThread()
		os.Exit(runHello())
	}
	if len(os.Args) > 1 && os.Args[1] == "ctl" {
		runtime.UnlockOSThread()
		os.Exit(runCtl(os.Args[2:], os.Stdout, os.Stderr))
	}
	if len(os.Args) >= 2 && os.Args[1] == "upgrade-check" {
		runtime.UnlockOSThread()
		os.Exit(runUpgradeCheck(os.Args[2:], os.Stdout, os.Stderr))
	}
	os.Exit(supervisor.Main(func() int { return run(os.Args[1:], os.Stdout, os.Stderr) }))
}

// run is the master's main: it parses args and supervises until a signal
// or a give-up, and returns the exit code.
func run(args []string, stdout, stderr io.Writer) int {
	// Before anything opens a file: no descriptor the master inherited
	// reaches a worker, and no process of the master's uid reads its
	// memory or environment.
	for _, err := range hardenProcess() {
		fmt.Fprintf(stderr, "shoal: warning: %v\n", err)
	}
	// Handle signals before anything is forked: a Go PID 1 that does not
	// would die of SIGTERM with no drain.
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, masterSignals...)
	defer signal.Stop(sigs)

	cfg, err := parseConfig(args, os.LookupEnv, stdout, stderr)
	if errors.Is(err, errHelp) {
		return exitOK
	}
	if err != nil {
		fmt.Fprintf(stderr, "shoal: %v\n", err)
		fmt.Fprintln(stderr, "Run 'shoal -h' for usage.")
		return exitUsage
	}
	if cfg.version {
		fmt.Fprintf(stdout, "shoal %s\n", version)
		return exitOK
	}
	if cfg.procs > 0 {
		// The master's work comes in short bursts on many goroutines
		// (a tick of the workers' channels, an event of the loop): on one
		// P they run one after the other on the thread that woke,
		// instead of waking a second thread to share them.
		runtime.GOMAXPROCS(cfg.procs)
	}
	// After an in-place upgrade: what the master before handed over.
	inherited, err := supervisor.Inherit()
	if err != nil {
		fmt.Fprintf(stderr, "shoal: upgrade: %v\n", err)
		return exitFailure
	}
	cfg.opts.Inherited = inherited
	log := newLogger(cfg.logFormat, cfg.logLevel, stderr)
	cfg.opts.Logger = &log
	cfg.opts.Output, cfg.opts.ResumeOutput = outputPipes(cfg.output, cfg.logFormat, &log, stdout, stderr)
	cfg.opts.Subreaper = true
	// sd_notify's READY=1 follows the workers' listening at once, not at
	// the notifier's next second.
	var nt atomic.Pointer[notifier]
	cfg.opts.OnEvent = func(e supervisor.Event) {
		if e.Type == supervisor.EventListening || e.Type == supervisor.EventDeath {
			nt.Load().wake()
		}
	}

	sup, err := supervisor.New(cfg.opts)
	if err != nil {
		fmt.Fprintf(stderr, "shoal: %v\n", err)
		return exitUsage
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	m := &master{sup: sup, stop: cancel, log: &log}
	m.servers = &servers{ctx: ctx, m: m, log: &log, mopts: metrics.Options{MinReady: cfg.minReady, Logger: &log, Version: version}}
	defer m.servers.close()
	if inherited != nil {
		var st upgradeState
		json.Unmarshal(inherited.State, &st)
		if st.Started != 0 {
			processStart = time.Unix(0, st.Started)
		}
		// Once the loop answers: until then, the clients of /healthz and
		// the control socket wait in the sockets' queues.
		go func() {
			select {
			case <-sup.Running():
			case <-ctx.Done():
				return
			}
			m.servers.mu.Lock()
			defer m.servers.mu.Unlock()
			if err := m.servers.adopt(inherited.Files, st.Control); err != nil {
				log.Error().Err(err).Msg("upgrade")
			}
			log.Info().Str("from", st.From).Str("version", version).Uint64("upgrades", inherited.Upgrades).Msg("shoal upgraded in place")
		}()
	} else {
		if cfg.metrics != "" {
			srv, err := metrics.Listen(cfg.metrics, sup, m.servers.mopts)
			if err != nil {
				fmt.Fprintf(stderr, "shoal: %v (give another --metrics-addr, or \"\" to turn metrics off)\n", err)
				return exitUsage
			}
			m.servers.metrics = srv
		}
		if cfg.control != "" {
			srv, err := control.Listen(cfg.control)
			if err != nil {
				fmt.Fprintf(stderr, "shoal: %v\n", err)
				return exitUsage
			}
			log.Info().Str("path", srv.Path()).Msg("control socket ready for 'shoal ctl'")
			m.servers.serveControl(srv)
		}
	}
	if err := setupMigrateReq(cfg.migrateReq, &log); err != nil {
		fmt.Fprintf(stderr, "shoal: %v\n", err)
		return exitUsage
	}
	m.notify = startNotifier(ctx, sup, cfg.minReady, &log)
	nt.Store(m.notify)
	go handleSignals(ctx, sigs, m)
	err = sup.Run(ctx)
	cancel()
	m.notify.wait()
	if err != nil {
		log.Error().Err(err).Msg("shoal stopped")
		if errors.Is(err, supervisor.ErrBind) || errors.Is(err, supervisor.ErrSteering) {
			fmt.Fprintf(stderr, "shoal: %v\n", err)
			return exitUsage // nothing was started
		}
		return exitFailure
	}
	log.Info().Msg("shoal stopped")
	return exitOK
}

// hardenProcess marks every descriptor above 2 close-on-exec, so that a
// file the caller left open (a shell's "exec 7<secret") cannot reach the
// workers: the master passes them only what it means to. It also makes the
// master non-dumpable, so that its /proc files (environ, mem, fd, maps)
// belong to root and a worker of the same uid cannot read its secrets or
// ptrace it. The master itself still reads its own /proc. It returns what
// it could not do; shoal runs on with a warning.
func hardenProcess() []error {
	var errs []error
	if err := cloexecFrom(3); err != nil {
		errs = append(errs, fmt.Errorf("inherited file descriptors may reach the workers: %w", err))
	}
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		errs = append(errs, fmt.Errorf("prctl(PR_SET_DUMPABLE, 0): %w: processes of shoal's uid may read its environment", err))
	}
	return errs
}

// cloexecFrom sets close-on-exec on every descriptor from first up. Go's
// own descriptors have it already.
func cloexecFrom(first int) error {
	err := unix.CloseRange(uint(first), math.MaxUint32, unix.CLOSE_RANGE_CLOEXEC)
	if err == nil {
		return nil
	}
	// Before Linux 5.11.
	if perr := cloexecByProc(first); perr != nil {
		return fmt.Errorf("close_range: %v; %w", err, perr)
	}
	return nil
}

// cloexecByProc sets close-on-exec on every descriptor from first up that
// /proc/self/fd lists. The directory's own descriptor has it already.
func cloexecByProc(first int) error {
	dir, err := os.Open("/proc/self/fd")
	if err != nil {
		return err
	}
	defer dir.Close()
	names, err := dir.Readdirnames(-1)
	if err != nil {
		return fmt.Errorf("read /proc/self/fd: %w", err)
	}
	for _, name := range names {
		if fd, err := strconv.Atoi(name); err == nil && fd >= first {
			if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC); err != nil && err != unix.EBADF {
				return fmt.Errorf("fcntl(%d, F_SETFD, FD_CLOEXEC): %w", fd, err)
			}
		}
	}
	return nil
}

// setupMigrateReq applies --migrate-req: with auto it turns
// net.ipv4.tcp_migrate_req on when it may and otherwise warns once with the
// fix; with on failing to turn it on is an error; off leaves it alone.
func setupMigrateReq(mode migrateMode, log *zerolog.Logger) error {
	if mode == migrateOff {
		return nil
	}
	on, err := reuseport.MigrateReq()
	if err == nil && on {
		return nil
	}
	if err == nil {
		err = reuseport.SetMigrateReq(true)
	}
	if err == nil {
		log.Info().Msg("set net.ipv4.tcp_migrate_req=1 in this network namespace: a stopping worker's queued connections move to the others")
		return nil
	}
	if mode == migrateOn {
		return fmt.Errorf("--migrate-req on: %w", err)
	}
	log.Warn().Err(err).Msg("net.ipv4.tcp_migrate_req is not 1 and shoal cannot set it: when a worker stops (reload, scale down, restart), " +
		"the connections waiting in its accept queue are reset. Fix: 'sysctl -w net.ipv4.tcp_migrate_req=1' on the host, " +
		"'docker run --sysctl net.ipv4.tcp_migrate_req=1', or the Kubernetes pod's securityContext.sysctls")
	return nil
}
