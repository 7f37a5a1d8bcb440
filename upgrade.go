package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/shoal-sh/shoal/control"
	"github.com/shoal-sh/shoal/metrics"
	"github.com/shoal-sh/shoal/supervisor"
)

// The names of the descriptors the master hands to the program that
// replaces it in place.
const (
	fileControl = "control"
	fileMetrics = "metrics"
)

// upgradeState is the main package's part of the state handed over.
type upgradeState struct {
	From    string `json:"from"`    // the version of the master before
	Control string `json:"control"` // the control socket's path
	Started int64  `json:"started"` // when the master started, unix nanoseconds: its uptime goes on
}

// startPath is the path the master was started from, which an upgrade
// runs again: argv[0] as the shell found it, not /proc/self/exe, which
// names the old file even after a new one took its place (or a symlink
// was changed).
func startPath() (string, error) {
	arg0 := os.Args[0]
	if !strings.Contains(arg0, "/") {
		p, err := exec.LookPath(arg0)
		if err != nil {
			return "", fmt.Errorf("find %s in PATH: %w", arg0, err)
		}
		arg0 = p
	}
	return filepath.Abs(arg0)
}

// servers are the master's control and metrics servers, which an upgrade
// stops and hands over, and which serve again if it fails.
type servers struct {
	mu      sync.Mutex
	ctx     context.Context
	m       *master
	log     *zerolog.Logger
	mopts   metrics.Options
	metrics *metrics.Server
	control *control.Server
	ctlDone chan struct{}
	ctlPath string
}

// serveControl serves srv on a goroutine.
func (s *servers) serveControl(srv *control.Server) {
	s.control, s.ctlPath = srv, srv.Path()
	done := make(chan struct{})
	s.ctlDone = done
	go func() {
		defer close(done)
		if err := srv.Serve(s.ctx, func(ctx context.Context, req control.Request) control.Response {
			return handleControl(ctx, req, s.m)
		}); err != nil {
			s.log.Error().Err(err).Msg("control socket stopped")
		}
	}()
}

// close stops both servers for good, at exit.
func (s *servers) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.control != nil {
		s.control.Close()
		<-s.ctlDone
		s.control = nil
	}
	if s.metrics != nil {
		s.metrics.Close()
		s.metrics = nil
	}
}

// handoff stops both servers and returns their listening sockets; ctx is
// the context of the control request that asked for the upgrade, if one
// did, whose answer is not waited for.
func (s *servers) handoff(ctx context.Context) (map[string]*os.File, []byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	files := map[string]*os.File{}
	if s.metrics != nil {
		f, err := s.metrics.Detach()
		if err != nil {
			return nil, nil, err
		}
		files[fileMetrics], s.metrics = f, nil
	}
	if s.control != nil {
		f, err := s.control.Detach(ctx)
		if err != nil {
			s.resumeLocked(files)
			return nil, nil, err
		}
		files[fileControl], s.control = f, nil
	}
	started := time.Now().Add(-time.Since(processStart)).UnixNano()
	b, err := json.Marshal(upgradeState{From: version, Control: s.ctlPath, Started: started})
	return files, b, err
}

// resume serves again from what handoff returned, when the upgrade failed.
func (s *servers) resume(files map[string]*os.File, _ []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.resumeLocked(files)
}

func (s *servers) resumeLocked(files map[string]*os.File) {
	if err := s.adopt(files, s.ctlPath); err != nil {
		s.log.Error().Err(err).Msg("after the failed upgrade")
	}
}

// adopt serves on inherited listening sockets.
func (s *servers) adopt(files map[string]*os.File, ctlPath string) error {
	var errs []error
	if f := files[fileMetrics]; f != nil {
		ln, err := netFileListener(f)
		if err == nil {
			opts := s.mopts
			opts.Listener = ln
			s.metrics, err = metrics.Listen("", s.m.sup, opts)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("serve /metrics again: %w", err))
		}
	}
	if f := files[fileControl]; f != nil {
		srv, err := control.FromFile(ctlPath, f)
		if err != nil {
			errs = append(errs, fmt.Errorf("serve the control socket again: %w", err))
		} else {
			s.serveControl(srv)
		}
	}
	return errors.Join(errs...)
}

// upgrade replaces the master's program with the one at its start path,
// in place. It returns only when that did not happen.
func (m *master) upgrade(ctx context.Context) (supervisor.Check, error) {
	path, err := startPath()
	if err != nil {
		return supervisor.Check{}, fmt.Errorf("%w: %w", supervisor.ErrUpgrade, err)
	}
	m.log.Info().Str("path", path).Str("version", version).Msg("upgrade requested: checking the program at the master's path")
	m.notify.send("STATUS=upgrading in place from " + version)
	c, err := m.sup.Upgrade(ctx, supervisor.Upgrade{
		Path: path, Program: "shoal",
		Handoff: func() (map[string]*os.File, []byte, error) { return m.servers.handoff(ctx) },
		Resume:  m.servers.resume,
	})
	m.notify.send("STATUS=upgrade refused: " + oneLine(fmt.Sprint(err)))
	return c, err
}

// runUpgradeCheck is 'shoal upgrade-check ARGS...', which a master runs
// on the program that is to replace it, with its own arguments and
// environment: it says what this program is and which state it reads, and
// exits 2 when it would refuse the master's configuration.
func runUpgradeCheck(args []string, stdout, stderr io.Writer) int {
	if err := supervisor.WriteCheck(stdout, "shoal", version); err != nil {
		return exitFailure
	}
	if _, err := parseConfig(args, os.LookupEnv, io.Discard, io.Discard); err != nil {
		fmt.Fprintf(stderr, "shoal %s: %v\n", version, err)
		return exitUsage
	}
	return exitOK
}

// ctlUpgrade is 'shoal ctl upgrade': it asks the master to upgrade, and
// once the master's connection closes (the exec closed it), waits for the
// new program to answer on the same socket with the same pid and one
// upgrade more. With asJSON, the outcome of the request is one
// control.Response line on stdout: an upgradeResult, or the reason it
// failed (also on stderr). A master that cannot be reached is reported on
// stderr alone, as by every command.
func ctlUpgrade(ctx context.Context, path string, asJSON bool, stdout, stderr io.Writer) int {
	before, err := ctlStatus(ctx, path)
	if err != nil {
		fmt.Fprintf(stderr, "shoal ctl: upgrade: %s\n", control.Printable(err.Error()))
		return exitFailure
	}
	c, err := control.Dial(path)
	if err != nil {
		fmt.Fprintf(stderr, "shoal ctl: upgrade: %s\n", control.Printable(err.Error()))
		return exitFailure
	}
	fail := func(why string) int {
		if asJSON {
			printResponse(stdout, control.Response{Error: why})
		}
		fmt.Fprintf(stderr, "shoal ctl: upgrade: %s\n", control.Printable(why))
		return exitFailure
	}
	resp, err := c.Do(ctx, control.Request{Cmd: control.CmdUpgrade})
	c.Close()
	if err == nil {
		if !resp.OK {
			return fail(resp.Error)
		}
		return fail("the master answered without upgrading")
	}
	// The connection closed without an answer: the master executed the
	// new program. Wait for it.
	wait, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var last error
	for {
		st, err := ctlStatus(wait, path)
		if err == nil && st.Master.PID == before.Master.PID && st.Upgrades > before.Upgrades {
			r := upgradeResult{From: before.Version, To: st.Version, PID: st.Master.PID, WorkersKept: running(st), Upgrades: st.Upgrades}
			if asJSON {
				b, _ := json.Marshal(r)
				printResponse(stdout, control.Response{OK: true, Result: b})
			} else {
				fmt.Fprintf(stdout, "upgraded in place: shoal %s -> %s, master pid %d, %d workers kept\n", r.From, r.To, r.PID, r.WorkersKept)
			}
			return exitOK
		}
		if err == nil {
			last = fmt.Errorf("the master at %s answers with pid %d and %d upgrades (before: pid %d, %d)", path, st.Master.PID, st.Upgrades, before.Master.PID, before.Upgrades)
		} else {
			last = err
		}
		select {
		case <-wait.Done():
			return fail(fmt.Sprintf("the new master did not answer within 30s: %s. See the master's log", last))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// upgradeResult is the result of 'shoal ctl --json upgrade' once the new
// program answers: the version before and after, the master's pid (the
// same), the workers it kept running and its upgrades so far.
type upgradeResult struct {
	From        string `json:"from"`
	To          string `json:"to"`
	PID         int    `json:"pid"`
	WorkersKept int    `json:"workers_kept"`
	Upgrades    uint64 `json:"upgrades"`
}

func running(st control.Status) int {
	n := 0
	for _, w := range st.Workers {
		if w.PID != 0 {
			n++
		}
	}
	return n
}

// ctlStatus asks the master at path for its status, on a connection of
// its own.
func ctlStatus(ctx context.Context, path string) (control.Status, error) {
	c, err := control.Dial(path)
	if err != nil {
		return control.Status{}, err
	}
	defer c.Close()
	return c.Status(ctx)
}

// netFileListener returns the listener over an inherited socket and closes
// f, whose descriptor the listener has duplicated.
func netFileListener(f *os.File) (net.Listener, error) {
	defer f.Close()
	return net.FileListener(f)
}
