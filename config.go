package main

import (
	"encoding"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/user"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/control"
	"github.com/shoal-sh/shoal/internal/logpipe"
	"github.com/shoal-sh/shoal/supervisor"
)

var errHelp = errors.New("help shown")

// config is what the command line and the environment ask for.
type config struct {
	opts       supervisor.Options
	host       string
	metrics    string // address for /metrics, /healthz, /readyz; "" for none
	minReady   int
	control    string // the control socket's path; "" for none
	controlSet bool   // --control or SHOAL_CONTROL was given
	migrateReq migrateMode
	logFormat  logFormat
	logLevel   logLevel
	output     workerOutput
	procs      int // the master's GOMAXPROCS; 0 for Go's default
	version    bool

	// Raw inputs that finish turns into opts.
	envFile   string
	userName  string
	groupName string
	bindCap   bool
}

const usageHead = `shoal runs N copies of a server that all serve one port.

Each worker binds the port itself with SO_REUSEPORT and the kernel spreads
connections over them. shoal forks the workers, replaces the dead, and stops
them cleanly. With no command it runs its built-in hello-world HTTP worker.

Usage:
  shoal [flags] [-- COMMAND [ARGS...]]
  shoal version

Examples:
  shoal                                   # hello world on :8000, one worker per CPU
  shoal --workers 4 --port 3000 -- node server.js
  shoal --restart on-failure --max-restarts 5 -- ./my-server
  SHOAL_WORKERS=2 SHOAL_PORT=8080 shoal -- nginx -c /etc/nginx/shoal.conf

Workers get SHOAL_WORKER_ID (1..N), SHOAL_MASTER_PID, PORT, and fd 3, a Unix
socket to the master (SHOAL_IPC_FD=3, NODE_CHANNEL_FD=3).

Signals: SIGTERM or SIGINT stop the workers gracefully (SIGTERM, then SIGKILL
after --stop-timeout). Exit codes: 0 after a requested stop, 1 after giving up
or when the workers failed, 2 for bad usage (nothing started).

Flags (each also read from the environment variable shown):
`

// intFlag is an int flag with bounds and a message that says what is wanted.
type intFlag struct {
	v        *int
	min, max int
	what     string
}

func (f intFlag) String() string {
	if f.v == nil {
		return ""
	}
	return strconv.Itoa(*f.v)
}

func (f intFlag) Set(s string) error {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil || n < f.min || n > f.max {
		return fmt.Errorf("want %s", f.what)
	}
	*f.v = n
	return nil
}

// durationFlag is a duration flag that accepts 10s, 1m30s or 500ms.
type durationFlag struct {
	v   *time.Duration
	min time.Duration
}

func (f durationFlag) String() string {
	if f.v == nil {
		return ""
	}
	return f.v.String()
}

func (f durationFlag) Set(s string) error {
	d, err := time.ParseDuration(strings.TrimSpace(s))
	if err != nil || d < f.min {
		return fmt.Errorf("want a duration such as 10s, 1m30s or 500ms, at least %s", f.min)
	}
	*f.v = d
	return nil
}

// stringFlag is a plain string flag.
type stringFlag struct{ v *string }

func (f *stringFlag) String() string {
	if f.v == nil {
		return ""
	}
	return *f.v
}

func (f *stringFlag) Set(s string) error { *f.v = s; return nil }

// listFlag collects repeated values. From the environment, one value per
// line.
type listFlag struct{ v *[]string }

func (f listFlag) String() string {
	if f.v == nil {
		return ""
	}
	return strings.Join(*f.v, " ")
}

func (f listFlag) Set(s string) error {
	for _, line := range strings.Split(s, "\n") {
		if line = strings.TrimSpace(line); line != "" {
			*f.v = append(*f.v, line)
		}
	}
	return nil
}

// boolFlag is a flag that takes no value (--inherit-env), or true/false
// from the environment.
type boolFlag struct{ v *bool }

func (f boolFlag) String() string {
	if f.v == nil {
		return "false"
	}
	return strconv.FormatBool(*f.v)
}

func (f boolFlag) Set(s string) error {
	b, err := strconv.ParseBool(strings.TrimSpace(s))
	if err != nil {
		return errors.New("want true or false")
	}
	*f.v = b
	return nil
}

func (f boolFlag) IsBoolFlag() bool { return true }

// sizeFlag is a size in bytes: 536870912, 512MiB, 512M, 2GiB.
type sizeFlag struct{ v *uint64 }

func (f sizeFlag) String() string {
	if f.v == nil {
		return "0"
	}
	return strconv.FormatUint(*f.v, 10)
}

func (f sizeFlag) Set(s string) error {
	n, err := parseSize(s)
	if err != nil {
		return err
	}
	*f.v = n
	return nil
}

func parseSize(s string) (uint64, error) {
	s = strings.TrimSpace(s)
	num := strings.TrimRightFunc(s, func(r rune) bool { return r < '0' || r > '9' })
	unit := strings.ToLower(strings.TrimSpace(s[len(num):]))
	mult := map[string]uint64{"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
		"g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}[unit]
	n, err := strconv.ParseUint(num, 10, 64)
	if err != nil || mult == 0 {
		return 0, errors.New("want a size in bytes such as 536870912, 512MiB or 2GiB")
	}
	return n * mult, nil
}

// defaultPort is the first listener's port, or 0 with none.
func (c *config) defaultPort() int {
	if len(c.opts.Listeners) == 0 {
		return 0
	}
	return c.opts.Listeners[0].Port
}

// controlFlag is --control: a path, "" for none; left unset, the default
// follows the first port.
type controlFlag struct {
	v   *string
	set *bool
	def string // shown in the usage: the default for the default port
}

func (f *controlFlag) String() string {
	if f.v == nil || !*f.set {
		return f.def
	}
	return *f.v
}

func (f *controlFlag) Set(s string) error { *f.v, *f.set = s, true; return nil }

// portsFlag takes listeners, comma-separated or repeated; the first use
// replaces the default. "0" means none.
type portsFlag struct {
	v   *[]supervisor.Listener
	set bool
}

func (f *portsFlag) String() string {
	if f.v == nil || len(*f.v) == 0 {
		return "0"
	}
	if ls := *f.v; len(ls) == 1 && ls[0].Network == "tcp" {
		return strconv.Itoa(ls[0].Port) // as --port 8000 is written
	}
	parts := make([]string, len(*f.v))
	for i, l := range *f.v {
		parts[i] = l.String()
	}
	return strings.Join(parts, ",")
}

func (f *portsFlag) Set(s string) error {
	if !f.set {
		*f.v, f.set = nil, true
	}
	if strings.TrimSpace(s) == "0" {
		*f.v = nil
		return nil
	}
	ls, err := supervisor.ParseListeners(s)
	if err != nil {
		return err
	}
	for _, l := range ls {
		if slices.Contains(*f.v, l) {
			return fmt.Errorf("listener %s given twice", l)
		}
		*f.v = append(*f.v, l)
	}
	return nil
}

// signalFlag is a signal: TERM, SIGTERM, term or 15.
type signalFlag struct{ v *syscall.Signal }

func (f signalFlag) String() string {
	if f.v == nil || *f.v == 0 {
		return "TERM"
	}
	return strings.TrimPrefix(unix.SignalName(*f.v), "SIG")
}

func (f signalFlag) Set(s string) error {
	sig, err := parseSignal(s)
	if err != nil {
		return err
	}
	*f.v = sig
	return nil
}

// parseSignal reads a signal's name, with or without SIG, in any case, or
// its number.
func parseSignal(s string) (syscall.Signal, error) {
	s = strings.ToUpper(strings.TrimSpace(s))
	if n, err := strconv.Atoi(s); err == nil && n > 0 && n < 65 {
		return syscall.Signal(n), nil
	}
	if !strings.HasPrefix(s, "SIG") {
		s = "SIG" + s
	}
	if sig := unix.SignalNum(s); sig != 0 {
		return sig, nil
	}
	return 0, fmt.Errorf("signal %q: want a name such as TERM, QUIT, INT, USR1 or a number 1..64", strings.TrimPrefix(s, "SIG"))
}

// uint64Flag is a count.
type uint64Flag struct{ v *uint64 }

func (f uint64Flag) String() string {
	if f.v == nil {
		return "0"
	}
	return strconv.FormatUint(*f.v, 10)
}

func (f uint64Flag) Set(s string) error {
	n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 64)
	if err != nil {
		return errors.New("want a whole number, 0 or more")
	}
	*f.v = n
	return nil
}

// textVar is a value that parses itself from text and prints itself back:
// supervisor.RestartPolicy, supervisor.ReadyMode and the enumerations below.
type textVar interface {
	encoding.TextUnmarshaler
	fmt.Stringer
}

// textFlag makes any textVar a flag, so that every enumeration is parsed
// one way, by its own UnmarshalText, from the command line and from the
// environment alike.
type textFlag struct{ v textVar }

func (f textFlag) String() string {
	if f.v == nil {
		return ""
	}
	return f.v.String()
}

func (f textFlag) Set(s string) error { return f.v.UnmarshalText([]byte(s)) }

// parseWord returns the index of text among words, ignoring case and
// surrounding space, or an error that lists them.
func parseWord(what string, text []byte, words ...string) (int, error) {
	s := strings.ToLower(strings.TrimSpace(string(text)))
	if i := slices.Index(words, s); i >= 0 {
		return i, nil
	}
	return 0, fmt.Errorf("%s %q: want %s or %s", what, text, strings.Join(words[:len(words)-1], ", "), words[len(words)-1])
}

// migrateMode is --migrate-req: whether shoal sets net.ipv4.tcp_migrate_req.
type migrateMode int

const (
	migrateAuto migrateMode = iota // set it when allowed, else warn
	migrateOn                      // fail when it cannot be set
	migrateOff                     // leave it alone
)

var migrateWords = []string{"auto", "on", "off"}

func (m migrateMode) String() string { return migrateWords[m] }

// UnmarshalText parses auto, on or off, in any case.
func (m *migrateMode) UnmarshalText(text []byte) error {
	i, err := parseWord("migrate-req mode", text, migrateWords...)
	if err == nil {
		*m = migrateMode(i)
	}
	return err
}

// logFormat is --log-format.
type logFormat int

const (
	logAuto    logFormat = iota // console when stderr is a terminal, else JSON
	logJSON                     // JSON lines
	logConsole                  // for people
)

var logFormatWords = []string{"auto", "json", "console"}

func (f logFormat) String() string { return logFormatWords[f] }

// UnmarshalText parses auto, json or console, in any case.
func (f *logFormat) UnmarshalText(text []byte) error {
	i, err := parseWord("log format", text, logFormatWords...)
	if err == nil {
		*f = logFormat(i)
	}
	return err
}

// logLevel is --log-level: the zerolog levels the command line offers.
type logLevel zerolog.Level

var logLevels = []zerolog.Level{zerolog.DebugLevel, zerolog.InfoLevel, zerolog.WarnLevel, zerolog.ErrorLevel}

func (l logLevel) String() string { return zerolog.Level(l).String() }

// UnmarshalText parses debug, info, warn or error, in any case.
func (l *logLevel) UnmarshalText(text []byte) error {
	i, err := parseWord("log level", text, "debug", "info", "warn", "error")
	if err == nil {
		*l = logLevel(logLevels[i])
	}
	return err
}

// workerOutput is --worker-output: how the workers' output reaches the
// master's stdout and stderr.
type workerOutput int

const (
	outputRaw    workerOutput = iota // the workers write to them directly
	outputPrefix                     // "w1 4321 | line", whole lines
	outputJSON                       // one log record per line
)

var workerOutputWords = []string{"raw", "prefix", "json"}

func (o workerOutput) String() string { return workerOutputWords[o] }

// UnmarshalText parses raw, prefix or json, in any case.
func (o *workerOutput) UnmarshalText(text []byte) error {
	i, err := parseWord("worker output", text, workerOutputWords...)
	if err == nil {
		*o = workerOutput(i)
	}
	return err
}

// outputPipes returns the supervisor's Output for --worker-output: nil for
// raw; otherwise pipes whose lines go to stdout and stderr labelled, or as
// records in the master's log format (log is the master's logger, on
// stderr). A failed write is logged.
func outputPipes(mode workerOutput, format logFormat, log *zerolog.Logger, stdout, stderr io.Writer) (func(int) (supervisor.OutputPipe, error), func(int, int, supervisor.OutputHandoff) (supervisor.OutputPipe, error)) {
	if mode == outputRaw {
		return nil, nil
	}
	opts := logpipe.Options{
		Stdout: stdout, Stderr: stderr,
		OnError: func(err error) { log.Warn().Err(err).Msg("worker output lost: fix the master's stdout or stderr") },
	}
	if mode == outputJSON {
		outLog := newLogger(format, logLevel(zerolog.InfoLevel), stdout)
		opts.Format, opts.StdoutLog, opts.StderrLog = logpipe.JSON, &outLog, log
	}
	out := logpipe.New(opts)
	return func(slot int) (supervisor.OutputPipe, error) {
			p, err := out.Open(slot)
			if err != nil {
				return nil, err
			}
			return handPipe{p}, nil
		}, func(slot, pid int, h supervisor.OutputHandoff) (supervisor.OutputPipe, error) {
			return handPipe{out.Resume(slot, pid, logpipe.Handoff(h))}, nil
		}
}

// handPipe is a logpipe.Pipe that an in-place upgrade can hand over.
type handPipe struct{ *logpipe.Pipe }

func (p handPipe) Detach() (supervisor.OutputHandoff, error) {
	h, err := p.Pipe.Detach()
	return supervisor.OutputHandoff(h), err
}

// parseConfig reads flags from args and, for flags not given there, from
// the environment (SHOAL_ and the flag's name in upper case). It runs four
// steps: defaults, flag definitions, the environment, and finish, which
// reads the files the flags name and checks what only makes sense whole.
func parseConfig(args []string, lookupEnv func(string) (string, bool), stdout, stderr io.Writer) (config, error) {
	c := defaultConfig()
	fs, envNames := c.flags()
	// The flag package prints its own complaint and the whole usage on
	// any error; shoal prints one line instead, and the usage on -h only.
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, usageHead)
			fs.SetOutput(stdout)
			fs.PrintDefaults()
			return c, errHelp
		}
		return c, err
	}
	if err := applyEnv(fs, envNames, lookupEnv); err != nil {
		return c, err
	}
	rest := fs.Args()
	if len(rest) == 1 && rest[0] == "version" {
		c.version = true
		return c, nil
	}
	c.opts.Command = rest
	return c, c.finish()
}

// defaultConfig is the configuration with no flag and no environment. The
// supervisor's defaults are its own, so a flag left out and an Options
// field left zero mean one thing.
func defaultConfig() config {
	var c config
	c.opts.Listeners = []supervisor.Listener{{Network: "tcp", Port: 8000}}
	c.opts.StopSignal = supervisor.DefaultStopSignal
	c.opts.Steering = supervisor.SteeringAuto
	c.opts.SteeringDrainDelay = supervisor.DefaultSteeringDrainDelay
	c.opts.StopTimeout = supervisor.DefaultStopTimeout
	c.opts.ReadyTimeout = supervisor.DefaultReadyTimeout
	c.opts.RestartWindow = supervisor.DefaultRestartWindow
	c.opts.Backoff.Max = supervisor.DefaultBackoffMax
	c.opts.MaxMessage = supervisor.DefaultMaxMessage
	c.opts.QueueLen = supervisor.DefaultQueueLen
	c.opts.ReloadSurge = 1
	c.opts.Restart = supervisor.RestartAlways
	c.opts.Ready = supervisor.ReadyListen
	c.logFormat, c.logLevel = logAuto, logLevel(zerolog.InfoLevel)
	c.metrics = ":9441"
	c.migrateReq = migrateAuto
	c.procs = 1
	return c
}

// flags defines a flag for every field of c, and returns them with the
// environment variable that stands for each.
func (c *config) flags() (*flag.FlagSet, map[string]string) {
	fs := flag.NewFlagSet("shoal", flag.ContinueOnError)
	envNames := map[string]string{}
	def := func(name string, v flag.Value, usage string) {
		env := "SHOAL_" + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
		envNames[name] = env
		fs.Var(v, name, usage+" ($"+env+")")
	}
	def("workers", intFlag{&c.opts.Workers, 1, 1 << 16, "a whole number of workers, 1 or more"},
		"number of workers (default: the CPUs this process may use, after affinity and cgroup quota)")
	def("port", &portsFlag{v: &c.opts.Listeners},
		"listeners the workers serve: 8000 (TCP), tcp:8000, udp:5353, comma-separated or repeated; workers get the first one's port as PORT and all as SHOAL_PORTS; 0 for none")
	def("bind", textFlag{&c.opts.Bind},
		"who binds the listeners: worker (each worker binds its own with SO_REUSEPORT) or master (the master opens one SO_REUSEPORT socket per worker and listener and passes them as systemd does: LISTEN_FDS, fds 3, 4, ...)")
	def("steering", textFlag{&c.opts.Steering},
		"how new TCP connections are placed on the workers: auto (round-robin where the master can load an eBPF program, else hash), round-robin (exact turns; a stopping or stalled worker gets none; needs CAP_BPF), hash (the kernel's)")
	def("steering-drain-delay", durationFlag{&c.opts.SteeringDrainDelay, time.Millisecond},
		"with round-robin steering, how long a worker is out of the selection before its stop signal")
	def("host", &stringFlag{&c.host},
		"address exported to workers as HOST; the built-in worker listens there (default: all addresses)")
	def("env", listFlag{&c.opts.Env},
		"set a worker environment variable (KEY=VALUE) or pass the master's (KEY); repeatable; the environment variable takes one per line")
	def("env-file", &stringFlag{&c.envFile},
		"regular file of KEY=VALUE lines (# comments), at most 1 MiB, to set in the workers' environment")
	def("inherit-env", boolFlag{&c.opts.InheritEnv},
		"pass the master's whole environment to the workers; by default they get only PATH, HOME, USER, LANG, LC_*, TZ, TMPDIR, TERM, SHELL, LOGNAME, --env and --env-file")
	def("user", &stringFlag{&c.userName},
		"run the workers as this user (name or uid; a uid with no passwd entry gets gid the same number and HOME=/), with its group unless --group and its home as HOME unless set; supplementary groups are cleared; needs root")
	def("group", &stringFlag{&c.groupName},
		"run the workers with this group (name or gid)")
	def("cap-net-bind-service", boolFlag{&c.bindCap},
		"keep CAP_NET_BIND_SERVICE in the workers' ambient set, so a non-root worker may bind a port below 1024")
	def("heartbeat-timeout", durationFlag{&c.opts.HeartbeatTimeout, 0},
		`kill and replace a worker that sent {"cmd":"shoal:heartbeat"} and then none for this long (reason "hung"); 0 turns it off`)
	def("max-requests", uint64Flag{&c.opts.MaxRequests},
		"recycle a worker, the way a reload does, after it reported this many requests; 0 for no limit")
	def("max-requests-jitter", uint64Flag{&c.opts.MaxRequestsJitter},
		"add a random 0..J to each worker's --max-requests, so they do not recycle at once")
	def("max-memory", sizeFlag{&c.opts.MaxMemory},
		"recycle a worker whose resident memory exceeds this size (512MiB, 2GiB); 0 for no limit")
	def("restart-delay-max", durationFlag{&c.opts.Backoff.Max, time.Millisecond},
		"the crash-loop backoff's cap: restarts of a worker that keeps dying wait 100ms, doubling up to this")
	def("restart", textFlag{&c.opts.Restart},
		"restart policy: always, on-failure or never")
	def("stop-timeout", durationFlag{&c.opts.StopTimeout, 0},
		"time a worker has to exit after the stop signal before SIGKILL")
	def("stop-signal", signalFlag{&c.opts.StopSignal},
		"the signal that asks a worker to finish and exit, on stop, reload, scale-down and recycle: TERM, QUIT (nginx), INT, SIGQUIT or a number")
	def("max-restarts", intFlag{&c.opts.MaxRestarts, 0, 1 << 30, "a whole number, 0 (no limit) or more"},
		"give up and exit 1 after this many restarts within --restart-window; 0 for no limit")
	def("restart-window", durationFlag{&c.opts.RestartWindow, time.Second},
		"window for --max-restarts")
	def("ready", textFlag{&c.opts.Ready},
		`how a worker counts as serving: "listen" (the kernel shows its LISTEN socket on the port) or "message" (it sends {"cmd":"shoal:ready"})`)
	def("ipc-max-message", intFlag{&c.opts.MaxMessage, 64, 1 << 30, "a size in bytes, 64 or more"},
		"largest message a worker may send, in bytes; longer ones are skipped and counted")
	def("master-procs", intFlag{&c.procs, 0, 1 << 16, "a whole number, 0 (Go's default) or more"},
		"CPUs the master's own Go code may run on at once (its GOMAXPROCS, whatever GOMAXPROCS in the environment says; --env GOMAXPROCS passes that to the workers): 1 costs the least CPU per message of a busy worker; 0 for Go's default, one per CPU or $GOMAXPROCS")
	def("metrics-addr", &stringFlag{&c.metrics},
		`address of the master's /metrics, /healthz and /readyz; "" turns them off`)
	def("min-ready", intFlag{&c.minReady, 0, 1 << 16, "a whole number, 0 (all workers) or more"},
		"workers that must be listening for /readyz to answer 200; 0 means all")
	def("reload-surge", intFlag{&c.opts.ReloadSurge, 1, 1 << 16, "a whole number of workers, 1 or more"},
		"workers a reload (SIGHUP, shoal ctl reload) rolls at a time")
	def("ready-timeout", durationFlag{&c.opts.ReadyTimeout, time.Millisecond},
		"how long a reload waits for a replacement to serve before it aborts, keeping the old workers")
	def("migrate-req", textFlag{&c.migrateReq},
		"net.ipv4.tcp_migrate_req, so a stopping worker's queued connections move to the others: auto (set it when allowed, else warn), on (fail if it cannot be set), off (leave it)")
	def("control", &controlFlag{&c.control, &c.controlSet, control.DefaultPath(c.defaultPort())},
		`path of the control socket for 'shoal ctl' (shoal-PORT.sock, PORT the first listener's, in /run/shoal for root, else $XDG_RUNTIME_DIR or $TMPDIR/shoal-UID); "" turns it off`)
	def("log-format", textFlag{&c.logFormat},
		"log format: json, console, or auto (console when stderr is a terminal)")
	def("log-level", textFlag{&c.logLevel},
		"log level: debug, info, warn or error")
	def("worker-output", textFlag{&c.output},
		`how the workers' stdout and stderr reach shoal's: raw (written directly), prefix (each line as "w1 4321 | line", slot and pid) or json (each line a log record in the --log-format); lines of different workers never mix`)
	return fs, envNames
}

// applyEnv sets every flag that the command line did not from its
// environment variable.
func applyEnv(fs *flag.FlagSet, envNames map[string]string, lookupEnv func(string) (string, bool)) error {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] || err != nil {
			return
		}
		env := envNames[f.Name]
		// An empty variable counts as unset, but for a string flag,
		// where empty is a value: SHOAL_METRICS_ADDR= turns metrics off.
		_, isString := f.Value.(*stringFlag)
		_, isControl := f.Value.(*controlFlag)
		if v, ok := lookupEnv(env); ok && (v != "" || isString || isControl) {
			if serr := f.Value.Set(v); serr != nil {
				err = fmt.Errorf("%s=%q: %v", env, v, serr)
			}
		}
	})
	return err
}

// finish reads what the flags name (--env-file, --user, --group), and
// checks what only makes sense with every flag known.
func (c *config) finish() error {
	if c.envFile != "" {
		fromFile, err := readEnvFile(c.envFile)
		if err != nil {
			return err
		}
		// The file first: --env wins over it.
		c.opts.Env = append(fromFile, c.opts.Env...)
	}
	for _, kv := range c.opts.Env {
		k, _, _ := strings.Cut(kv, "=")
		switch {
		case k == "":
			return errors.New("--env: an entry has an empty name: want KEY=VALUE or KEY")
		case strings.ContainsAny(k, " \t\x00"):
			return fmt.Errorf("--env %q: a name holds a space, tab or NUL: want KEY=VALUE or KEY", k)
		case strings.ContainsRune(kv, 0):
			return fmt.Errorf("--env %s: the value holds a NUL byte, which no environment can carry", k)
		}
	}
	if c.host != "" {
		c.opts.Env = append(c.opts.Env, "HOST="+c.host)
		c.opts.Host = c.host
	}
	if c.userName != "" || c.groupName != "" {
		cred, home, err := lookupCredential(c.userName, c.groupName)
		if err != nil {
			return err
		}
		c.opts.Credential = cred
		// The master's HOME (/root) is not the workers' when they run as
		// another user; what --env or --env-file say wins.
		if c.userName != "" && !setsVar(c.opts.Env, "HOME") {
			c.opts.Env = append([]string{"HOME=" + home}, c.opts.Env...)
		}
	}
	if c.bindCap {
		c.opts.AmbientCaps = []uintptr{unix.CAP_NET_BIND_SERVICE}
	}
	if !c.controlSet {
		// One socket per port, so a second service on the host needs no
		// --control of its own.
		c.control = control.DefaultPath(c.defaultPort())
	}
	if len(c.opts.Command) == 0 && !slices.ContainsFunc(c.opts.Listeners, func(l supervisor.Listener) bool { return l.Network == "tcp" }) {
		return errors.New("the built-in worker needs a port: it serves HTTP on a TCP listener; give --port 8000 or --port tcp:PORT")
	}
	return checkExecSize(c.opts)
}

// setsVar reports whether env, as Options.Env, sets or passes name.
func setsVar(env []string, name string) bool {
	for _, kv := range env {
		if k, _, _ := strings.Cut(kv, "="); k == name {
			return true
		}
	}
	return false
}

// maxEnvFile bounds --env-file: more is a mistake (a device, a log file),
// and no environment that large could reach a worker anyway.
const maxEnvFile = 1 << 20

// readEnvFile reads KEY=VALUE lines: blank lines and # comments are
// skipped, an "export " prefix and quotes around the value are removed.
// Only a regular file of at most maxEnvFile bytes is read. It is checked
// before the open, so that no device is opened (some act on open), and
// after it, on what was opened; the open is non-blocking, so a FIFO put in
// its place meanwhile cannot hang the master. An error names the line but
// never shows it, since a line may hold a secret.
func readEnvFile(path string) ([]string, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil, fmt.Errorf("--env-file: stat %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, fmt.Errorf("--env-file %s: %s, not a regular file: give a file of KEY=VALUE lines", path, fileKind(st.Mode))
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("--env-file: open %s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("--env-file: stat %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, fmt.Errorf("--env-file %s: %s, not a regular file: give a file of KEY=VALUE lines", path, fileKind(st.Mode))
	}
	if st.Size > maxEnvFile {
		return nil, fmt.Errorf("--env-file %s: %d bytes, more than the limit of %d bytes (1 MiB)", path, st.Size, maxEnvFile)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxEnvFile+1))
	if err != nil {
		return nil, fmt.Errorf("--env-file: read %s: %w", path, err)
	}
	if len(data) > maxEnvFile {
		return nil, fmt.Errorf("--env-file %s: more than the limit of %d bytes (1 MiB)", path, maxEnvFile)
	}
	var env []string
	for i, line := range strings.Split(string(data), "\n") {
		if strings.IndexByte(line, 0) >= 0 {
			return nil, fmt.Errorf("--env-file %s: line %d holds a NUL byte, which no environment can carry", path, i+1)
		}
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		line = strings.TrimPrefix(line, "export ")
		k, v, ok := strings.Cut(line, "=")
		k = strings.TrimSpace(k)
		if !ok || k == "" || strings.ContainsAny(k, " \t") {
			return nil, fmt.Errorf("--env-file %s: line %d: want KEY=VALUE, with no space in KEY (the line is not shown: it may hold a secret)", path, i+1)
		}
		v = strings.TrimSpace(v)
		if len(v) >= 2 && (v[0] == '"' && v[len(v)-1] == '"' || v[0] == '\'' && v[len(v)-1] == '\'') {
			v = v[1 : len(v)-1]
		}
		env = append(env, k+"="+v)
	}
	return env, nil
}

// fileKind names a file type for an error message.
func fileKind(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFIFO:
		return "a FIFO"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFSOCK:
		return "a socket"
	}
	return "a special file"
}

// Linux's limits on what execve takes (fs/exec.c): each argument or
// environment string at most maxArgStrlen bytes with its NUL, and all of
// them with their pointers at most a quarter of the stack limit, capped at
// 6 MiB and at least 128 KiB.
const (
	maxArgStrlen  = 32 * 4096
	minArgMax     = 32 * 4096
	maxArgMax     = 6 << 20
	contractBytes = 512 // SHOAL_WORKER_ID, SHOAL_MASTER_PID, PORT and the channel variables, with room to spare
)

// passedEnv names the master's variables that reach the workers without
// --inherit-env. It must agree with the supervisor's own list.
var passedEnv = []string{"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM"}

// checkExecSize refuses, before anything starts, a worker environment or
// command line that execve would refuse ("argument list too long"), which
// would otherwise fail every start of every worker.
func checkExecSize(o supervisor.Options) error {
	argv := o.Command
	if len(argv) == 0 {
		argv = os.Args // the built-in worker: this program and its arguments
	}
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if o.InheritEnv && !strings.HasPrefix(k, "SHOAL_") || slices.Contains(passedEnv, k) || strings.HasPrefix(k, "LC_") {
			env = append(env, kv)
		}
	}
	for _, kv := range o.Env {
		if !strings.Contains(kv, "=") {
			if v, ok := os.LookupEnv(kv); ok {
				kv += "=" + v
			}
		}
		env = append(env, kv)
	}
	total := contractBytes
	for _, s := range argv {
		if len(s)+1 > maxArgStrlen {
			return fmt.Errorf("the command's argument %.20q... is %d bytes: exec allows at most %d per argument", s, len(s), maxArgStrlen-1)
		}
		total += len(s) + 1 + 8
	}
	for _, kv := range env {
		if len(kv)+1 > maxArgStrlen {
			k, _, _ := strings.Cut(kv, "=")
			return fmt.Errorf("worker environment variable %s is %d bytes: exec allows at most %d per variable (name, = and value); "+
				"pass large data in a file instead", k, len(kv), maxArgStrlen-1)
		}
		total += len(kv) + 1 + 8
	}
	if limit := argMax(); total > limit {
		return fmt.Errorf("the workers' environment and command line come to about %d bytes, over the %d that exec allows here "+
			"(a quarter of the stack limit, ulimit -s): set fewer or smaller variables (--env, --env-file, --inherit-env)", total, limit)
	}
	return nil
}

// argMax is the room execve gives to arguments and environment together,
// from this process's stack limit, which the workers inherit.
func argMax() int {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_STACK, &rl); err != nil || rl.Cur == unix.RLIM_INFINITY || rl.Cur/4 > maxArgMax {
		return maxArgMax
	}
	return max(int(rl.Cur/4), minArgMax)
}

// lookupCredential resolves --user and --group to the ids the workers run
// with, with no supplementary groups, and returns the user's home
// directory. A number with no passwd or group entry is taken as an id; such
// a user's group is the same number and its home "/".
func lookupCredential(userName, groupName string) (*syscall.Credential, string, error) {
	cred := &syscall.Credential{Uid: uint32(os.Getuid()), Gid: uint32(os.Getgid()), Groups: []uint32{}}
	home := "/"
	if userName != "" {
		u, err := user.Lookup(userName)
		if err != nil {
			u, err = user.LookupId(userName)
		}
		switch id, ok := parseID(userName); {
		case err == nil:
			uid, _ := strconv.ParseUint(u.Uid, 10, 32)
			gid, _ := strconv.ParseUint(u.Gid, 10, 32)
			cred.Uid, cred.Gid = uint32(uid), uint32(gid)
			if u.HomeDir != "" {
				home = u.HomeDir
			}
		case ok:
			cred.Uid, cred.Gid = id, id
		default:
			return nil, "", fmt.Errorf("--user %q: no such user (give a name from /etc/passwd or a numeric uid)", userName)
		}
	}
	if groupName != "" {
		g, err := user.LookupGroup(groupName)
		if err != nil {
			g, err = user.LookupGroupId(groupName)
		}
		switch id, ok := parseID(groupName); {
		case err == nil:
			gid, _ := strconv.ParseUint(g.Gid, 10, 32)
			cred.Gid = uint32(gid)
		case ok:
			cred.Gid = id
		default:
			return nil, "", fmt.Errorf("--group %q: no such group (give a name from /etc/group or a numeric gid)", groupName)
		}
	}
	if os.Geteuid() != 0 && (cred.Uid != uint32(os.Geteuid()) || cred.Gid != uint32(os.Getegid())) {
		return nil, "", fmt.Errorf("--user/--group: changing the workers' user needs root (shoal runs as uid %d)", os.Geteuid())
	}
	return cred, home, nil
}

// parseID parses a numeric uid or gid. -1 (4294967295) is not one: to the
// kernel it means "unchanged".
func parseID(s string) (uint32, bool) {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || n == math.MaxUint32 {
		return 0, false
	}
	return uint32(n), true
}
