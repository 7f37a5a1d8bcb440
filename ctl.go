package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/control"
	"github.com/shoal-sh/shoal/supervisor"
)

func handleControl(ctx context.Context, req control.Request, m *master) control.Response {
	sup, log := m.sup, m.log
	log.Info().Str("cmd", req.Cmd).Msg("control request")
	fail := func(err error) control.Response { return control.Response{Error: err.Error()} }
	switch req.Cmd {
	case "status":
		snap, err := sup.SnapshotContext(ctx)
		if err != nil {
			return fail(err)
		}
		b, err := json.Marshal(statusOf(snap))
		if err != nil {
			return fail(fmt.Errorf("status: %w", err))
		}
		return control.Response{OK: true, Result: b}
	case "reload":
		if err := m.reload(ctx); err != nil {
			return fail(err)
		}
	case "scale":
		if err := sup.Scale(req.N); err != nil {
			return fail(err)
		}
	case "send":
		if err := sup.Send(req.Worker, req.Msg); err != nil {
			return fail(err)
		}
	case "broadcast":
		if err := sup.Broadcast(req.Msg); err != nil {
			return fail(err)
		}
	case "signal":
		sig, err := parseSignal(req.Signal)
		if err != nil {
			return fail(err)
		}
		n, err := sup.Signal(req.Worker, sig)
		if err != nil {
			return fail(err)
		}
		log.Info().Str("signal", unix.SignalName(sig)).Int("workers", n).Msg("signal sent to workers")
	case "stop":
		m.stop()
	case "upgrade":
		// Returns only when the upgrade did not happen: on success the
		// exec closes this connection, and ctl asks the new program.
		_, err := m.upgrade(ctx)
		return fail(err)
	default:
		return fail(fmt.Errorf("unknown command %q", req.Cmd))
	}
	return control.Response{OK: true}
}

// statusOf is the answer to status: restarts and reloads come from the
// supervisor's own counts, so a reload does not look like a restart. CPU,
// memory and accept queues are read from /proc and the kernel here, on the
// control socket's goroutine, not the supervisor's.
func statusOf(snap supervisor.Snapshot) control.Status {
	st := control.Status{Desired: snap.Desired, Reloading: snap.Reloading, Stopping: snap.Stopping, Workers: []control.WorkerStatus{},
		Restarts: snap.Restarts, Reloads: snap.Reloads, ReloadsAborted: snap.ReloadFailures,
		Master: masterStatus(time.Now()), Version: version, Upgrades: snap.Upgrades}
	if snap.Steering == "round-robin" {
		st.Steering = snap.Steering
	}
	for _, w := range snap.Workers {
		ws := control.WorkerStatus{Slot: w.ID, PID: w.PID, State: w.State.String(),
			Uptime: w.Uptime.Seconds(), Restarts: w.Restarts, Reloads: w.Reloads, Requests: w.Requests, Waiting: w.Waiting,
			Deaths: w.Deaths, LastDeath: w.LastDeath, Steered: w.Steered}
		if w.PID != 0 {
			ws.CPUSeconds, ws.RSSBytes, _ = procUsage(w.PID)
		}
		st.Workers = append(st.Workers, ws)
	}
	listenQueues(snap, st.Workers)
	return st
}

// A ctlCommand is one command of 'shoal ctl'.
type ctlCommand struct {
	name, args, what string
	nargs            int
	optional         int // arguments that may be left out, at the end
}

var ctlCommands = []ctlCommand{
	{"status", "", "a table of the workers: slot, pid, state, uptime, restarts, reloads, requests", 0, 0},
	{"reload", "", "roll every worker over with no downtime; exits 1 if the reload aborted", 0, 0},
	{"scale", "N", "run N workers", 1, 0},
	{"send", "SLOT JSON", "send a message to one worker through the message bus", 2, 0},
	{"broadcast", "JSON", "send a message to every worker", 1, 0},
	{"signal", "SIG [SLOT|all]", "send a signal (USR1, HUP, 10) to one worker or to all", 2, 1},
	{"stop", "", "stop shoal gracefully", 0, 0},
	{"upgrade", "", "replace the master's program with the one now at its path, in place: no worker restarts; exits 1 with the reason if refused", 0, 0},
	{"top", "[--once]", "a live view of the workers, refreshed every second: requests/s, CPU, memory, accept queues, deaths; q quits", 0, 0},
}

const ctlFlagsUsage = "[--port PORT | --control PATH] [--json] [--timeout D]"

// usage is the usage line of one command.
func (c ctlCommand) usage() string {
	line := "shoal ctl " + ctlFlagsUsage + " " + c.name
	if c.args != "" {
		line += " " + c.args
	}
	return fmt.Sprintf("Usage: %s\n  %s\nFlags may come before or after the command; put -- before a message that starts with '-'.\nRun 'shoal ctl -h' for every command and flag.\n", line, c.what)
}

// ctlUsage is the whole usage of 'shoal ctl'.
func ctlUsage() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Usage: shoal ctl %s COMMAND\n\nCommands:\n", ctlFlagsUsage)
	for _, c := range ctlCommands {
		fmt.Fprintf(&b, "  %-18s %s\n", strings.TrimSpace(c.name+" "+c.args), c.what)
	}
	b.WriteString("\nFlags, before or after the command:\n")
	return b.String()
}

// parseCtlArgs parses the flags in args, before and after the command,
// and returns the command and its arguments. After "--" every argument is
// the command's, and a negative number is an argument, not a flag.
func parseCtlArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		// flag stops at the first argument that is not a flag, and after
		// "--", which it removes.
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			return append(pos, rest...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
		for len(args) > 0 && isNegativeNumber(args[0]) {
			pos = append(pos, args[0])
			args = args[1:]
		}
	}
}

// ctlPath finds the master's control socket: the path given; else the
// default path of the master of port (or $SHOAL_PORT); else the only
// master's at a default path. With several, it lists them and asks.
func ctlPath(path, port string) (string, error) {
	if path != "" {
		return path, nil
	}
	if port == "" {
		port = os.Getenv("SHOAL_PORT")
	}
	if strings.TrimSpace(port) == "0" {
		return control.DefaultPath(0), nil
	}
	if port != "" {
		ls, err := supervisor.ParseListeners(port)
		if err != nil {
			return "", fmt.Errorf("--port: %w", err)
		}
		return control.DefaultPath(ls[0].Port), nil
	}
	masters, err := control.Masters()
	if err != nil {
		return "", err
	}
	return pickMaster(masters)
}

// pickMaster chooses among the control sockets at default paths: the only
// one, or the only one a master listens on; sockets that masters killed
// with SIGKILL left behind do not count.
func pickMaster(masters []string) (string, error) {
	if len(masters) == 0 {
		return "", fmt.Errorf("no shoal master found: no control socket in %s. Is shoal running as this user? Give --port, or --control with the master's --control", control.DefaultDir())
	}
	if len(masters) == 1 {
		return masters[0], nil
	}
	var live, dead []string
	for _, p := range masters {
		c, err := net.DialTimeout("unix", p, time.Second)
		if errors.Is(err, syscall.ECONNREFUSED) {
			dead = append(dead, p)
			continue
		}
		if err == nil {
			c.Close()
		}
		live = append(live, p)
	}
	switch len(live) {
	case 0:
		return "", fmt.Errorf("no shoal master answers: the control sockets %s are left from masters that were killed; give --port or --control, or remove them", strings.Join(dead, ", "))
	case 1:
		return live[0], nil
	}
	return "", fmt.Errorf("%d shoal masters found, choose one with --port PORT (or --control PATH): %s", len(live), strings.Join(live, ", "))
}

// isNegativeNumber reports whether a looks like -5 or -2.5: a message or a
// count, not a flag.
func isNegativeNumber(a string) bool {
	return len(a) > 1 && a[0] == '-' && a[1] >= '0' && a[1] <= '9'
}

// runCtl is 'shoal ctl': one request to a running master's control socket.
func runCtl(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("shoal ctl", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	path := fs.String("control", os.Getenv("SHOAL_CONTROL"), "path of the master's control socket ($SHOAL_CONTROL; default: the master of --port, or the only one running)")
	port := fs.String("port", "", "find the master whose first listener is this port (8000, tcp:8000); $SHOAL_PORT")
	asJSON := fs.Bool("json", false, "print the master's JSON answer")
	timeout := fs.Duration("timeout", 0, "give up after this long (0: wait as long as the command takes); for top, on each request (default 5s)")
	once := fs.Bool("once", false, "top: print one plain snapshot, measured over one second, and exit")
	usage := func() {
		fmt.Fprint(stderr, ctlUsage())
		fs.SetOutput(stderr)
		fs.PrintDefaults()
	}
	pos, err := parseCtlArgs(fs, args)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			usage()
			return exitOK
		}
		fmt.Fprintf(stderr, "shoal ctl: %v\nRun 'shoal ctl -h' for usage.\n", err)
		return exitUsage
	}
	req, err := ctlRequest(pos)
	if err != nil {
		fmt.Fprintf(stderr, "shoal ctl: %v\n", err)
		if c, ok := findCtlCommand(pos); ok {
			fmt.Fprint(stderr, c.usage())
		} else {
			fmt.Fprint(stderr, "Run 'shoal ctl -h' for usage.\n")
		}
		return exitUsage
	}
	if *once && req.Cmd != "top" {
		fmt.Fprintf(stderr, "shoal ctl: --once is a flag of top, not of %s\n", req.Cmd)
		return exitUsage
	}
	if *asJSON && req.Cmd == "top" {
		fmt.Fprint(stderr, "shoal ctl: top draws a view and has no JSON: use 'shoal ctl --json status'\n")
		return exitUsage
	}
	ctx := context.Background()
	if *timeout > 0 && req.Cmd != "top" {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *timeout)
		defer cancel()
	}
	*path, err = ctlPath(*path, *port)
	if err != nil {
		fmt.Fprintf(stderr, "shoal ctl: %s\n", control.Printable(err.Error()))
		return exitFailure
	}
	if req.Cmd == "top" {
		return runTop(ctx, *path, *timeout, *once, stdout, stderr)
	}
	if req.Cmd == control.CmdUpgrade {
		return ctlUpgrade(ctx, *path, *asJSON, stdout, stderr)
	}
	c, err := control.Dial(*path)
	if err != nil {
		fmt.Fprintf(stderr, "shoal ctl: %s\n", control.Printable(err.Error()))
		return exitFailure
	}
	defer c.Close()
	resp, err := c.Do(ctx, req)
	if err != nil {
		fmt.Fprintf(stderr, "shoal ctl: %s: %s\n", req.Cmd, control.Printable(err.Error()))
		return exitFailure
	}
	if *asJSON {
		printResponse(stdout, resp)
	}
	if !resp.OK {
		fmt.Fprintf(stderr, "shoal ctl: %s: %s\n", req.Cmd, control.Printable(resp.Error))
		return exitFailure
	}
	if *asJSON {
		return exitOK
	}
	if req.Cmd == control.CmdStatus {
		var st control.Status
		if err := json.Unmarshal(resp.Result, &st); err != nil {
			fmt.Fprintf(stderr, "shoal ctl: status: bad answer from the master at %s: %v\n", *path, err)
			return exitFailure
		}
		st.WriteTable(stdout)
		return exitOK
	}
	fmt.Fprintln(stdout, "ok")
	return exitOK
}

// printResponse writes resp as one JSON line, what 'shoal ctl --json'
// prints.
func printResponse(w io.Writer, resp control.Response) {
	b, _ := json.Marshal(resp)
	fmt.Fprintln(w, string(b))
}

// findCtlCommand returns the command that args name.
func findCtlCommand(args []string) (ctlCommand, bool) {
	if len(args) > 0 {
		for _, c := range ctlCommands {
			if c.name == args[0] {
				return c, true
			}
		}
	}
	return ctlCommand{}, false
}

// ctlRequest builds the request that the command line asks for.
func ctlRequest(args []string) (control.Request, error) {
	if len(args) == 0 {
		return control.Request{}, errors.New("no command: want one of status, reload, scale, send, broadcast, signal, stop, upgrade, top")
	}
	c, ok := findCtlCommand(args)
	if !ok {
		return control.Request{}, fmt.Errorf("unknown command %q: want one of status, reload, scale, send, broadcast, signal, stop, upgrade, top", args[0])
	}
	if got := len(args) - 1; got > c.nargs || got < c.nargs-c.optional {
		what := "no arguments"
		if c.nargs > 0 {
			what = fmt.Sprintf("%d argument(s), %s", c.nargs, c.args)
		}
		return control.Request{}, fmt.Errorf("%s takes %s, got %d: %q", c.name, what, got, args[1:])
	}
	req := control.Request{Cmd: args[0]}
	msg := func(s string) (json.RawMessage, error) {
		if !json.Valid([]byte(s)) {
			return nil, fmt.Errorf("%s: %q is not JSON (quote strings: '\"hi\"')", args[0], s)
		}
		return json.RawMessage(s), nil
	}
	var err error
	switch args[0] {
	case "scale":
		if req.N, err = strconv.Atoi(args[1]); err != nil || req.N < 1 {
			return req, fmt.Errorf("scale %q: want a whole number of workers, 1 or more", args[1])
		}
	case "send":
		if req.Worker, err = strconv.Atoi(args[1]); err != nil || req.Worker < 1 {
			return req, fmt.Errorf("send %q: want a worker slot, 1 or more", args[1])
		}
		req.Msg, err = msg(args[2])
	case "broadcast":
		req.Msg, err = msg(args[1])
	case "signal":
		req.Signal = args[1]
		if len(args) == 3 && args[2] != "all" {
			if req.Worker, err = strconv.Atoi(args[2]); err != nil || req.Worker < 1 {
				return req, fmt.Errorf("signal %q: want a worker slot, 1 or more, or all", args[2])
			}
		}
	}
	return req, err
}
