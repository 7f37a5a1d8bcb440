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
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

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

func main() {
	if supervisor.IsWorker() {
		os.Exit(runHello())
	}
	if len(os.Args) > 1 && os.Args[1] == "ctl" {
		os.Exit(runCtl(os.Args[2:], os.Stdout, os.Stderr))
	}
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run is the master's main: it parses args and supervises until a signal
// or a give-up, and returns the exit code.
func run(args []string, stdout, stderr io.Writer) int {
	// Handle signals before anything is forked: a Go PID 1 that does not
	// would die of SIGTERM with no drain.
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGTTIN, syscall.SIGTTOU)
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
	log := newLogger(cfg.logFormat, cfg.logLevel, stderr)
	cfg.opts.Logger = &log
	cfg.opts.Subreaper = true

	sup, err := supervisor.New(cfg.opts)
	if err != nil {
		fmt.Fprintf(stderr, "shoal: %v\n", err)
		return exitUsage
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if cfg.metrics != "" {
		srv, err := metrics.Listen(cfg.metrics, sup, metrics.Options{MinReady: cfg.minReady, Logger: &log})
		if err != nil {
			fmt.Fprintf(stderr, "shoal: %v (give another --metrics-addr, or \"\" to turn metrics off)\n", err)
			return exitUsage
		}
		defer srv.Close()
	}
	if cfg.control != "" {
		stop, err := serveControl(ctx, cfg.control, sup, cancel, &log)
		if err != nil {
			fmt.Fprintf(stderr, "shoal: %v\n", err)
			return exitUsage
		}
		defer stop()
	}
	if err := setupMigrateReq(cfg.migrateReq, &log); err != nil {
		fmt.Fprintf(stderr, "shoal: %v\n", err)
		return exitUsage
	}
	go handleSignals(ctx, sigs, sup, cancel, &log)
	if err := sup.Run(ctx); err != nil {
		log.Error().Err(err).Msg("shoal stopped")
		return exitFailure
	}
	log.Info().Msg("shoal stopped")
	return exitOK
}

// handleSignals turns signals to the master into supervisor calls until ctx
// ends.
func handleSignals(ctx context.Context, sigs <-chan os.Signal, sup *supervisor.Supervisor, stop func(), log *zerolog.Logger) {
	for {
		var sig os.Signal
		select {
		case sig = <-sigs:
		case <-ctx.Done():
			return
		}
		switch sig {
		case syscall.SIGTERM, syscall.SIGINT:
			log.Info().Str("signal", sig.String()).Msg("stop requested")
			stop()
		case syscall.SIGHUP:
			log.Info().Msg("reload requested (SIGHUP)")
			go func() {
				if err := sup.Reload(ctx); err != nil && ctx.Err() == nil {
					log.Error().Err(err).Msg("reload failed")
				}
			}()
		case syscall.SIGTTIN, syscall.SIGTTOU:
			delta := 1
			if sig == syscall.SIGTTOU {
				delta = -1
			}
			if n, err := sup.ScaleBy(delta); err != nil {
				log.Error().Err(err).Msg("scale failed")
			} else {
				log.Info().Str("signal", unix.SignalName(sig.(syscall.Signal))).Int("workers", n).Msg("scale requested")
			}
		}
	}
}

// setupMigrateReq applies --migrate-req: with "auto" it turns
// net.ipv4.tcp_migrate_req on when it may and otherwise warns once with the
// fix; with "on" failing to turn it on is an error; "off" leaves it alone.
func setupMigrateReq(mode string, log *zerolog.Logger) error {
	if mode == "off" {
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
	if mode == "on" {
		return fmt.Errorf("--migrate-req on: %w", err)
	}
	log.Warn().Err(err).Msg("net.ipv4.tcp_migrate_req is not 1 and shoal cannot set it: when a worker stops (reload, scale down, restart), " +
		"the connections waiting in its accept queue are reset. Fix: 'sysctl -w net.ipv4.tcp_migrate_req=1' on the host, " +
		"'docker run --sysctl net.ipv4.tcp_migrate_req=1', or the Kubernetes pod's securityContext.sysctls")
	return nil
}
