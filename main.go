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
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run is the master's main: it parses args and supervises until a signal
// or a give-up, and returns the exit code.
func run(args []string, stdout, stderr io.Writer) int {
	// Handle the stop signals before anything is forked: a Go PID 1 that
	// does not would die of SIGTERM with no drain.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)

	cfg, err := parseConfig(args, os.Getenv, stdout, stderr)
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
	go func() {
		select {
		case sig := <-sigs:
			log.Info().Str("signal", sig.String()).Msg("stop requested")
			cancel()
		case <-ctx.Done():
		}
	}()
	if err := sup.Run(ctx); err != nil {
		log.Error().Err(err).Msg("shoal stopped")
		return exitFailure
	}
	log.Info().Msg("shoal stopped")
	return exitOK
}
