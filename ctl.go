package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/rs/zerolog"

	"github.com/shoal-sh/shoal/control"
	"github.com/shoal-sh/shoal/supervisor"
)

// statusResult is the result of the control command "status".
type statusResult struct {
	Desired   int            `json:"desired"`
	Reloading bool           `json:"reloading"`
	Stopping  bool           `json:"stopping"`
	Workers   []workerStatus `json:"workers"`
}

type workerStatus struct {
	Slot     int     `json:"slot"`
	PID      int     `json:"pid"`
	State    string  `json:"state"`
	Uptime   float64 `json:"uptime_seconds"`
	Restarts int     `json:"restarts"`
	Requests uint64  `json:"requests"`
}

// serveControl serves the control socket at path until ctx ends. It fails
// at once, before any worker starts, when the path is taken by a live
// master or cannot be created.
func serveControl(ctx context.Context, path string, sup *supervisor.Supervisor, stop func(), log *zerolog.Logger) (func(), error) {
	srv, err := control.Listen(path)
	if err != nil {
		return nil, err
	}
	log.Info().Str("path", srv.Path()).Msg("control socket ready for 'shoal ctl'")
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ctx, func(ctx context.Context, req control.Request) control.Response {
			return handleControl(ctx, req, sup, stop, log)
		}); err != nil {
			log.Error().Err(err).Msg("control socket stopped")
		}
	}()
	return func() {
		srv.Close()
		<-done
	}, nil
}

func handleControl(ctx context.Context, req control.Request, sup *supervisor.Supervisor, stop func(), log *zerolog.Logger) control.Response {
	log.Info().Str("cmd", req.Cmd).Msg("control request")
	fail := func(err error) control.Response { return control.Response{Error: err.Error()} }
	switch req.Cmd {
	case "status":
		snap, err := sup.SnapshotContext(ctx)
		if err != nil {
			return fail(err)
		}
		res := statusResult{Desired: snap.Desired, Reloading: snap.Reloading, Stopping: snap.Stopping, Workers: []workerStatus{}}
		for _, w := range snap.Workers {
			res.Workers = append(res.Workers, workerStatus{Slot: w.ID, PID: w.PID, State: w.State.String(),
				Uptime: w.Uptime.Seconds(), Restarts: max(0, w.Starts-1), Requests: w.Requests})
		}
		b, _ := json.Marshal(res)
		return control.Response{OK: true, Result: b}
	case "reload":
		if err := sup.Reload(ctx); err != nil {
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
	case "stop":
		stop()
	default:
		return fail(fmt.Errorf("unknown command %q", req.Cmd))
	}
	return control.Response{OK: true}
}

const ctlUsage = `Usage: shoal ctl [--control PATH] [--json] COMMAND

Commands:
  status             a table of the workers: slot, pid, state, uptime, restarts, requests
  reload             roll every worker over with no downtime; exits 1 if the reload aborted
  scale N            run N workers
  send SLOT JSON     send a message to one worker through the message bus
  broadcast JSON     send a message to every worker
  stop               stop shoal gracefully

Flags:
`

// runCtl is 'shoal ctl': one request to a running master's control socket.
func runCtl(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("shoal ctl", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	path := fs.String("control", envOr("SHOAL_CONTROL", control.DefaultPath()), "path of the master's control socket ($SHOAL_CONTROL)")
	asJSON := fs.Bool("json", false, "print the master's JSON answer")
	timeout := fs.Duration("timeout", 0, "give up after this long (0: wait as long as the command takes)")
	usage := func() {
		fmt.Fprint(stderr, ctlUsage)
		fs.SetOutput(stderr)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			usage()
			return exitOK
		}
		fmt.Fprintf(stderr, "shoal ctl: %v\n", err)
		return exitUsage
	}
	req, err := ctlRequest(fs.Args())
	if err != nil {
		fmt.Fprintf(stderr, "shoal ctl: %v\nRun 'shoal ctl -h' for usage.\n", err)
		return exitUsage
	}
	ctx := context.Background()
	if *timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *timeout)
		defer cancel()
	}
	c, err := control.Dial(*path)
	if err != nil {
		fmt.Fprintf(stderr, "shoal ctl: %v\n", err)
		return exitFailure
	}
	defer c.Close()
	resp, err := c.Do(ctx, req)
	if err != nil {
		fmt.Fprintf(stderr, "shoal ctl: %s: %v\n", req.Cmd, err)
		return exitFailure
	}
	if *asJSON {
		b, _ := json.Marshal(resp)
		fmt.Fprintln(stdout, string(b))
	}
	if !resp.OK {
		fmt.Fprintf(stderr, "shoal ctl: %s: %s\n", req.Cmd, resp.Error)
		return exitFailure
	}
	if *asJSON {
		return exitOK
	}
	if req.Cmd == "status" {
		var st statusResult
		if err := json.Unmarshal(resp.Result, &st); err != nil {
			fmt.Fprintf(stderr, "shoal ctl: status: bad answer from the master: %v\n", err)
			return exitFailure
		}
		printStatus(stdout, st)
		return exitOK
	}
	fmt.Fprintln(stdout, "ok")
	return exitOK
}

// ctlRequest builds the request that the command line asks for.
func ctlRequest(args []string) (control.Request, error) {
	if len(args) == 0 {
		return control.Request{}, errors.New("no command")
	}
	want := map[string]int{"status": 0, "reload": 0, "stop": 0, "scale": 1, "send": 2, "broadcast": 1}
	n, ok := want[args[0]]
	if !ok {
		return control.Request{}, fmt.Errorf("unknown command %q", args[0])
	}
	if len(args)-1 != n {
		return control.Request{}, fmt.Errorf("%s takes %d argument(s), got %d", args[0], n, len(args)-1)
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
	}
	return req, err
}

func printStatus(w io.Writer, st statusResult) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SLOT\tPID\tSTATE\tUPTIME\tRESTARTS\tREQUESTS")
	for _, wk := range st.Workers {
		pid, up := "-", "-"
		if wk.PID != 0 {
			pid = strconv.Itoa(wk.PID)
			up = time.Duration(wk.Uptime * float64(time.Second)).Round(time.Second).String()
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%d\t%d\n", wk.Slot, pid, wk.State, up, wk.Restarts, wk.Requests)
	}
	tw.Flush()
}

func envOr(name, def string) string {
	if v, ok := os.LookupEnv(name); ok {
		return v
	}
	return def
}
