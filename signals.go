package main

import (
	"context"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// masterSignals are the signals the master handles. Besides those it acts
// on, it takes every signal that would end a Go program by default (SIGQUIT
// and SIGABRT dump goroutines and exit 2; SIGTRAP, SIGSTKFLT and SIGSYS
// sent with kill(2) too), so that only SIGKILL can take the master down
// from outside, and SIGPIPE, so that a closed stdout or stderr (a log
// collector that went away) makes writes fail instead of ending the
// master. Handled signals are reset to their defaults in the workers at
// exec; signals the Go runtime ignores by default (SIGUSR2 aside: SIGALRM,
// SIGIO, SIGPWR, SIGXCPU, SIGXFSZ, SIGVTALRM, real-time signals) stay
// ignored by the master alone.
var masterSignals = []os.Signal{
	syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT, // stop
	syscall.SIGHUP,                   // reload
	syscall.SIGTTIN, syscall.SIGTTOU, // scale
	syscall.SIGUSR1, // forwarded to every worker
	syscall.SIGUSR2, // upgrade the master's program in place
	syscall.SIGPIPE,
	syscall.SIGABRT, syscall.SIGTRAP, syscall.SIGSTKFLT, syscall.SIGSYS,
}

// handleSignals turns signals to the master into supervisor calls until ctx
// ends.
func handleSignals(ctx context.Context, sigs <-chan os.Signal, m *master) {
	sup, log := m.sup, m.log
	for {
		var sig os.Signal
		select {
		case sig = <-sigs:
		case <-ctx.Done():
			return
		}
		name := unix.SignalName(sig.(syscall.Signal))
		switch sig {
		case syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT:
			log.Info().Str("signal", name).Msg("stop requested")
			m.stop()
		case syscall.SIGHUP:
			log.Info().Msg("reload requested (SIGHUP)")
			go func() {
				if err := m.reload(ctx); err != nil && ctx.Err() == nil {
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
				log.Info().Str("signal", name).Int("workers", n).Msg("scale requested")
			}
		case syscall.SIGUSR1:
			n, err := sup.Signal(0, syscall.SIGUSR1)
			if err != nil {
				log.Error().Err(err).Msg("forward SIGUSR1")
			} else {
				log.Info().Int("workers", n).Msg("SIGUSR1 forwarded to every worker")
			}
		case syscall.SIGUSR2:
			log.Info().Msg("upgrade requested (SIGUSR2)")
			go func() {
				// Returns only when the upgrade did not happen.
				if _, err := m.upgrade(ctx); err != nil {
					log.Error().Err(err).Msg("upgrade refused: shoal runs on as it was")
				}
			}()
		case syscall.SIGPIPE:
			// A write to a closed pipe failed; the write says so.
		default:
			log.Warn().Str("signal", name).Msgf("%s ignored: shoal stops on SIGTERM, SIGINT or SIGQUIT", name)
		}
	}
}
