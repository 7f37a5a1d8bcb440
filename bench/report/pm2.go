package main

// Scenario 9: PM2's cluster mode against shoal, with the same Node.js app.

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

func init() {
	names["pm2"] = "PM2 cluster mode (its daemon hands connections round-robin)"
	names["pm2-reuseport"] = "PM2 cluster mode, workers with reusePort"
	scenTitle["s9"] = "9. PM2"
}

// pm2MasterLabel names the master of each contender of scenario 9 in the chart.
var pm2MasterLabel = map[string]string{
	"shoal":         "shoal master",
	"pm2":           "PM2 daemon (round-robin)",
	"pm2-reuseport": "PM2 daemon, workers with reusePort",
}

// pm2Who are the contenders of scenario 9, shoal first.
var pm2Who = []string{"shoal", "pm2", "pm2-reuseport"}

// pm2Markdown is the section of scenario 9; empty when the run did not
// include it.
func pm2Markdown(d *data, res *results) string {
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	n := d.meta["workers"]
	var skips []string
	seen := false
	for _, r := range d.recs {
		switch {
		case r.kind == "s9skip":
			skips = append(skips, r.s("reason"))
		case strings.HasPrefix(r.kind, "s9"):
			seen = true
		}
	}
	if !seen && len(skips) == 0 {
		return ""
	}

	p("## 9. PM2: cluster mode, the same app\n\n")
	p("PM2 %s (npm `pm2`, installed into `~/.cache/shoal-ci/pm2`, never globally) in cluster mode, against shoal, ", dash(d.meta["pm2"]))
	p("both with %s workers of `bench/node/app.js` run with `BENCH_GRACEFUL=1`: the app calls `process.send('ready')` once it listens ", n)
	p("and, on `SIGINT` (PM2's stop signal) or `SIGTERM` (shoal's), stops accepting, answers every later request with `Connection: close` ")
	p("and exits when its last connection has closed. PM2 is configured as its documentation recommends for graceful reloads ")
	p("(`wait_ready: true`, `listen_timeout: 10000`, `kill_timeout: 5000`); shoal waits for the same message (`--ready message`, `--stop-timeout 5s`). ")
	p("*PM2 cluster mode*: the workers call `listen()` without `reusePort`, as PM2's users do, so PM2's God daemon, the cluster primary, ")
	p("accepts every connection and passes it to a worker. *PM2, workers with reusePort*: the app exactly as under shoal; ")
	p("since Node.js 22.12 each worker then binds its own socket and the daemon carries no traffic. ")
	p("That row is also a control: its request path is shoal's (each worker accepts its own connections), so its distance from shoal's figures is the noise of the run. ")
	p("Throughput is measured as in scenario 1 (same rounds, rotation and wrk settings); the master's CPU is PM2's God daemon's or shoal's master's. ")
	p("PM2 runs with `--no-daemon`, which runs the same daemon in the `pm2` process instead of detaching it, so that the harness owns it and counts its CPU as the benchmark's own. ")
	if d.meta["s9_date"] != "" && d.meta["s9_date"] != d.meta["date"] {
		// Merged from a run of this scenario alone (BENCH_SCENARIOS=9).
		p("This scenario was measured in a run of its own (`BENCH_SCENARIOS=9 bench/run.sh`) on %s, on %s, "+
			"with other jobs using %s CPUs on average during its measured runs; its ratios compare contenders within that run only.\n\n",
			d.meta["s9_date"], dash(d.meta["s9_machine"]), pm2Foreign(res))
	} else {
		p("Measured on %s.\n\n", dash(d.meta["s9_date"]))
	}

	for _, mode := range []string{"keepalive", "close"} {
		if res.cells[key("s9", "shoal", mode)] == nil {
			continue
		}
		p("**%s**\n\n", upperFirst(modeName(mode)))
		p("| contender | requests/s | min–max | p50 | p99 | shoal ÷ this (middle half) | failed | master's CPU, median (max) |\n")
		p("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
		for _, w := range pm2Who {
			c := res.cells[key("s9", w, mode)]
			if c == nil {
				continue
			}
			ratio := "1"
			if w != "shoal" {
				ratio = "–"
				if v, ok := res.ratio("s9", w, mode); ok {
					rs := res.ratios[key("s9", w, mode)]
					ratio = fmt.Sprintf("%.2fx", v)
					if len(rs) >= 4 {
						ratio += fmt.Sprintf(" (%.2f–%.2f)", quantile(rs, 0.25), quantile(rs, 0.75))
					}
				}
			}
			cpu := "–"
			if len(c.masterPct) > 0 {
				cpu = fmt.Sprintf("%.1f%% (%.1f%%)", median(c.masterPct), slices.Max(c.masterPct))
			}
			p("| %s | %s | %s–%s | %s | %s | %s | %d | %s |\n", name(w, n), thousands(c.median()),
				thousands(slices.Min(c.rps)), thousands(slices.Max(c.rps)), ms(median(c.p50)), ms(median(c.p99)), ratio, c.errs, cpu)
		}
		p("\n")
	}

	var mem, idle []rec
	for _, r := range d.recs {
		switch r.kind {
		case "s9mem":
			mem = append(mem, r)
		case "s9idle":
			idle = append(idle, r)
		}
	}
	if len(mem) > 0 {
		p("The master's cost outside the request path: resident memory (`VmRSS`) of the master and of its workers after the load above, ")
		p("and the master's CPU over a few seconds with no load at all.\n\n")
		p("| contender | master VmRSS | workers' VmRSS (sum) | master's CPU, idle |\n| --- | ---: | ---: | ---: |\n")
		for _, w := range pm2Who {
			for _, r := range mem {
				if r.s("contender") != w {
					continue
				}
				idleCol := "–"
				for _, i := range idle {
					if i.s("contender") == w && i.f("secs") > 0 {
						idleCol = fmt.Sprintf("%.2f%% of a core over %s s", i.f("ticks")/i.f("secs"), i.s("secs"))
					}
				}
				p("| %s | %.1f MiB | %.1f MiB (%s processes) | %s |\n", name(w, n), r.f("master_kb")/1024, r.f("workers_kb")/1024, r.s("workers"), idleCol)
			}
		}
		p("\n")
	}

	type reloadCell struct {
		runs, reloads, failed, reqs int
		perRun                      []float64 // failed requests of each run
		durs                        []float64 // ms, every reload
		conn, read, write, tmo, st  int
	}
	cells := map[string]*reloadCell{}
	for _, r := range d.recs {
		if r.kind != "s9reload" {
			continue
		}
		k := r.s("contender") + "/" + r.s("mode")
		c := cells[k]
		if c == nil {
			c = &reloadCell{}
			cells[k] = c
		}
		c.runs++
		c.reloads += int(r.f("reloads")) - int(r.f("reload_fail"))
		c.failed += r.errs()
		c.perRun = append(c.perRun, float64(r.errs()))
		c.reqs += int(r.f("requests"))
		c.conn += int(r.f("err_connect"))
		c.read += int(r.f("err_read"))
		c.write += int(r.f("err_write"))
		c.tmo += int(r.f("err_timeout"))
		c.st += int(r.f("err_status"))
		for _, v := range strings.Split(r.s("reload_ms"), ",") {
			if v != "" {
				if ms, err := strconv.ParseFloat(v, 64); err == nil {
					c.durs = append(c.durs, ms)
				}
			}
		}
	}
	if len(cells) > 0 {
		p("**Reloads under load.** 3 reloads back to back, `shoal ctl reload` or `pm2 reload bench`, each returning when its last replacement serves, ")
		p("from 1 s after wrk starts; wrk stops 1 s after the last one returns. wrk never retries: every connect, read, write or timeout error and every ")
		p("non-2xx answer is a failed request. Both run in one private network namespace (`bench/reload-pm2.sh`), where `net.ipv4.tcp_migrate_req=1` ")
		p("is set for shoal as its README recommends (PM2's daemon keeps the one listening socket open through a reload, so it does not need it). ")
		p("The runs of the two alternate. Reload time includes starting the command: `pm2` is a Node.js program, `shoal ctl` a Go one.\n\n")
		p("| contender | mode | runs × reloads | reload time p50 / max | requests | failed (per run) | connect / read / write / timeout / non-2xx |\n")
		p("| --- | --- | ---: | ---: | ---: | ---: | --- |\n")
		for _, mode := range []string{"close", "keepalive"} {
			for _, w := range []string{"shoal", "pm2"} {
				c := cells[w+"/"+mode]
				if c == nil {
					continue
				}
				label := map[string]string{"shoal": "shoal (`shoal ctl reload`)", "pm2": "PM2 cluster mode (`pm2 reload`)"}[w]
				p("| %s | %s | %d × 3 (%d ok) | %.0f ms / %.0f ms | %s | %d (%s) | %d / %d / %d / %d / %d |\n", label, modeName(mode), c.runs, c.reloads,
					median(c.durs), slices.Max(c.durs), thousands(float64(c.reqs)), c.failed, joinf(c.perRun, "%.0f"),
					c.conn, c.read, c.write, c.tmo, c.st)
			}
		}
		p("\n")
	}
	for _, s := range skips {
		switch s {
		case "no-pm2":
			p("Skipped: pm2 was not installed and npm could not install it.\n\n")
		case "reload-needs-root-unshare-ip":
			p("Reloads skipped: they need root, `unshare` and `ip` for a private network namespace.\n\n")
		}
	}
	return b.String()
}

// pm2Foreign is the mean CPU other processes used during the measured
// throughput runs of scenario 9.
func pm2Foreign(res *results) string {
	var all []float64
	for k, c := range res.cells {
		if strings.HasPrefix(k, "s9/") {
			all = append(all, c.foreign...)
		}
	}
	if len(all) == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f", mean(all))
}
