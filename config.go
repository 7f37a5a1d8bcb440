package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/user"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/control"
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
	migrateReq string // auto, on or off
	logFormat  string
	logLevel   string
	version    bool
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

// choiceFlag accepts one of a few words.
type choiceFlag struct {
	v       *string
	choices []string
}

func (f choiceFlag) String() string {
	if f.v == nil {
		return ""
	}
	return *f.v
}

func (f choiceFlag) Set(s string) error {
	s = strings.ToLower(strings.TrimSpace(s))
	for _, c := range f.choices {
		if s == c {
			*f.v = s
			return nil
		}
	}
	return fmt.Errorf("want one of %s", strings.Join(f.choices, ", "))
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

// parseConfig reads flags from args and, for flags not given there, from
// the environment (SHOAL_ and the flag's name in upper case).
func parseConfig(args []string, lookupEnv func(string) (string, bool), stdout, stderr io.Writer) (config, error) {
	var (
		c         config
		restart   = "always"
		ready     = "listen"
		workers   = 0
		envFile   string
		userName  string
		groupName string
		bindCap   bool
		maxMsg    = 1 << 20
		fs        = flag.NewFlagSet("shoal", flag.ContinueOnError)
		envNames  = map[string]string{}
	)
	c.opts.Port = 8000
	c.opts.StopTimeout = 10 * time.Second
	c.opts.RestartWindow = time.Minute
	c.logFormat, c.logLevel = "auto", "info"
	c.metrics = ":9441"
	c.migrateReq = "auto"
	c.control = control.DefaultPath()
	c.opts.ReloadSurge = 1
	c.opts.Backoff.Max = 30 * time.Second
	c.opts.ReadyTimeout = 30 * time.Second

	def := func(name string, v flag.Value, usage string) {
		env := "SHOAL_" + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
		envNames[name] = env
		fs.Var(v, name, usage+" ($"+env+")")
	}
	def("workers", intFlag{&workers, 1, 1 << 16, "a whole number of workers, 1 or more"},
		"number of workers (default: the CPUs this process may use, after affinity and cgroup quota)")
	def("port", intFlag{&c.opts.Port, 0, 65535, "a port number 1..65535, or 0 for none"},
		"port exported to workers as PORT and watched for their LISTEN sockets; 0 for none")
	def("host", &stringFlag{&c.host},
		"address exported to workers as HOST; the built-in worker listens there (default: all addresses)")
	def("env", listFlag{&c.opts.Env},
		"set a worker environment variable (KEY=VALUE) or pass the master's (KEY); repeatable; the environment variable takes one per line")
	def("env-file", &stringFlag{&envFile},
		"file of KEY=VALUE lines (# comments) to set in the workers' environment")
	def("inherit-env", boolFlag{&c.opts.InheritEnv},
		"pass the master's whole environment to the workers; by default they get only PATH, HOME, USER, LANG, LC_*, TZ, TMPDIR, TERM, SHELL, LOGNAME, --env and --env-file")
	def("user", &stringFlag{&userName},
		"run the workers as this user (name or uid), with its group unless --group; supplementary groups are cleared; needs root")
	def("group", &stringFlag{&groupName},
		"run the workers with this group (name or gid)")
	def("cap-net-bind-service", boolFlag{&bindCap},
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
	def("restart", choiceFlag{&restart, []string{"always", "on-failure", "never"}},
		"restart policy: always, on-failure or never")
	def("stop-timeout", durationFlag{&c.opts.StopTimeout, 0},
		"time a worker has to exit after SIGTERM before SIGKILL")
	def("max-restarts", intFlag{&c.opts.MaxRestarts, 0, 1 << 30, "a whole number, 0 (no limit) or more"},
		"give up and exit 1 after this many restarts within --restart-window; 0 for no limit")
	def("restart-window", durationFlag{&c.opts.RestartWindow, time.Second},
		"window for --max-restarts")
	def("ready", choiceFlag{&ready, []string{"listen", "message"}},
		`how a worker counts as serving: "listen" (the kernel shows its LISTEN socket on the port) or "message" (it sends {"cmd":"shoal:ready"})`)
	def("ipc-max-message", intFlag{&maxMsg, 64, 1 << 30, "a size in bytes, 64 or more"},
		"largest message a worker may send, in bytes; longer ones are skipped and counted")
	def("metrics-addr", &stringFlag{&c.metrics},
		`address of the master's /metrics, /healthz and /readyz; "" turns them off`)
	def("min-ready", intFlag{&c.minReady, 0, 1 << 16, "a whole number, 0 (all workers) or more"},
		"workers that must be listening for /readyz to answer 200; 0 means all")
	def("reload-surge", intFlag{&c.opts.ReloadSurge, 1, 1 << 16, "a whole number of workers, 1 or more"},
		"workers a reload (SIGHUP, shoal ctl reload) rolls at a time")
	def("ready-timeout", durationFlag{&c.opts.ReadyTimeout, time.Millisecond},
		"how long a reload waits for a replacement to serve before it aborts, keeping the old workers")
	def("migrate-req", choiceFlag{&c.migrateReq, []string{"auto", "on", "off"}},
		"net.ipv4.tcp_migrate_req, so a stopping worker's queued connections move to the others: auto (set it when allowed, else warn), on (fail if it cannot be set), off (leave it)")
	def("control", &stringFlag{&c.control},
		`path of the control socket for 'shoal ctl'; "" turns it off`)
	def("log-format", choiceFlag{&c.logFormat, []string{"auto", "json", "console"}},
		"log format: json, console, or auto (console when stderr is a terminal)")
	def("log-level", choiceFlag{&c.logLevel, []string{"debug", "info", "warn", "error"}},
		"log level: debug, info, warn or error")

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
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var envErr error
	fs.VisitAll(func(f *flag.Flag) {
		env := envNames[f.Name]
		if set[f.Name] || envErr != nil {
			return
		}
		// An empty variable counts as unset, but for a string flag,
		// where empty is a value: SHOAL_METRICS_ADDR= turns metrics off.
		_, isString := f.Value.(*stringFlag)
		if v, ok := lookupEnv(env); ok && (v != "" || isString) {
			if err := f.Value.Set(v); err != nil {
				envErr = fmt.Errorf("%s=%q: %v", env, v, err)
			}
		}
	})
	if envErr != nil {
		return c, envErr
	}

	rest := fs.Args()
	if len(rest) == 1 && rest[0] == "version" {
		c.version = true
		return c, nil
	}
	c.opts.Command = rest
	if envFile != "" {
		fromFile, err := readEnvFile(envFile)
		if err != nil {
			return c, err
		}
		// The file first: --env wins over it.
		c.opts.Env = append(fromFile, c.opts.Env...)
	}
	for _, kv := range c.opts.Env {
		if k, _, _ := strings.Cut(kv, "="); k == "" || strings.ContainsAny(k, " \t\x00") {
			return c, fmt.Errorf("--env %q: want KEY=VALUE or KEY", kv)
		}
	}
	if c.host != "" {
		c.opts.Env = append(c.opts.Env, "HOST="+c.host)
	}
	if userName != "" || groupName != "" {
		cred, err := lookupCredential(userName, groupName)
		if err != nil {
			return c, err
		}
		c.opts.Credential = cred
	}
	if bindCap {
		c.opts.AmbientCaps = []uintptr{unix.CAP_NET_BIND_SERVICE}
	}
	c.opts.Workers = workers
	c.opts.MaxMessage = maxMsg
	var err error
	if c.opts.Restart, err = supervisor.ParseRestartPolicy(restart); err != nil {
		return c, err
	}
	if c.opts.Ready, err = supervisor.ParseReadyMode(ready); err != nil {
		return c, err
	}
	if len(rest) == 0 && c.opts.Port == 0 {
		return c, errors.New("the built-in worker needs a port: give --port 1..65535")
	}
	return c, nil
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

// readEnvFile reads KEY=VALUE lines: blank lines and # comments are
// skipped, an "export " prefix and quotes around the value are removed.
func readEnvFile(path string) ([]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--env-file: %w", err)
	}
	var env []string
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		line = strings.TrimPrefix(line, "export ")
		k, v, ok := strings.Cut(line, "=")
		k = strings.TrimSpace(k)
		if !ok || k == "" || strings.ContainsAny(k, " \t") {
			return nil, fmt.Errorf("--env-file %s:%d: want KEY=VALUE, got %q", path, i+1, line)
		}
		v = strings.TrimSpace(v)
		if len(v) >= 2 && (v[0] == '"' && v[len(v)-1] == '"' || v[0] == '\'' && v[len(v)-1] == '\'') {
			v = v[1 : len(v)-1]
		}
		env = append(env, k+"="+v)
	}
	return env, nil
}

// lookupCredential resolves --user and --group to the ids the workers run
// with, with no supplementary groups.
func lookupCredential(userName, groupName string) (*syscall.Credential, error) {
	cred := &syscall.Credential{Uid: uint32(os.Getuid()), Gid: uint32(os.Getgid()), Groups: []uint32{}}
	if userName != "" {
		u, err := user.Lookup(userName)
		if err != nil {
			if u, err = user.LookupId(userName); err != nil {
				return nil, fmt.Errorf("--user %q: no such user", userName)
			}
		}
		uid, _ := strconv.ParseUint(u.Uid, 10, 32)
		gid, _ := strconv.ParseUint(u.Gid, 10, 32)
		cred.Uid, cred.Gid = uint32(uid), uint32(gid)
	}
	if groupName != "" {
		g, err := user.LookupGroup(groupName)
		if err != nil {
			if g, err = user.LookupGroupId(groupName); err != nil {
				return nil, fmt.Errorf("--group %q: no such group", groupName)
			}
		}
		gid, _ := strconv.ParseUint(g.Gid, 10, 32)
		cred.Gid = uint32(gid)
	}
	if os.Geteuid() != 0 && (cred.Uid != uint32(os.Geteuid()) || cred.Gid != uint32(os.Getegid())) {
		return nil, fmt.Errorf("--user/--group: changing the workers' user needs root (shoal runs as uid %d)", os.Geteuid())
	}
	return cred, nil
}
