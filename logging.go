package main

import (
	"io"
	"os"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// newLogger returns the master's logger: JSON lines, or a console format for
// people (the default when w is a terminal).
//
// A duration goes into a log line as seconds, a float, under a name that
// says so (took_seconds), never with zerolog's Dur, whose unit depends on
// a global setting (milliseconds by default) and which the name would not
// show.
func newLogger(format logFormat, level logLevel, w io.Writer) zerolog.Logger {
	if format == logAuto {
		format = logJSON
		if f, ok := w.(*os.File); ok && isTerminal(f) {
			format = logConsole
		}
	}
	if format == logConsole {
		w = zerolog.ConsoleWriter{Out: w, TimeFormat: time.TimeOnly}
	}
	return zerolog.New(w).Level(zerolog.Level(level)).With().Timestamp().Str("component", "shoal").Logger()
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
