package test

// deploy/grafana/shoal.json, the Grafana dashboard: every query in it is
// run against a real Prometheus server that scrapes a running shoal.

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-sh/shoal/internal/peer"
	"github.com/shoal-sh/shoal/internal/testutil"
)

// dashboard is the part of a Grafana dashboard's JSON model the test reads.
type dashboard struct {
	Title       string           `json:"title"`
	UID         string           `json:"uid"`
	Panels      []dashboardPanel `json:"panels"`
	Annotations struct {
		List []struct {
			Name       string          `json:"name"`
			Datasource json.RawMessage `json:"datasource"`
			Expr       string          `json:"expr"`
		} `json:"list"`
	} `json:"annotations"`
	Templating struct {
		List []struct {
			Name       string          `json:"name"`
			Type       string          `json:"type"`
			Query      json.RawMessage `json:"query"`
			Datasource json.RawMessage `json:"datasource"`
		} `json:"list"`
	} `json:"templating"`
}

type dashboardPanel struct {
	ID         int              `json:"id"`
	Type       string           `json:"type"`
	Title      string           `json:"title"`
	Datasource json.RawMessage  `json:"datasource"`
	Panels     []dashboardPanel `json:"panels"` // of a collapsed row
	Targets    []struct {
		RefID      string          `json:"refId"`
		Expr       string          `json:"expr"`
		Datasource json.RawMessage `json:"datasource"`
	} `json:"targets"`
}

// dashQuery is one PromQL expression of the dashboard and where it is.
type dashQuery struct {
	where, expr string
}

// promDatasource is how every panel, target, annotation and variable of the
// dashboard names its data source: the dashboard's datasource variable, so
// that it imports and provisions on any Grafana without editing.
const promDatasource = `{"type":"prometheus","uid":"${datasource}"}`

// readDashboard parses deploy/grafana/shoal.json, checks its structure, and
// returns its PromQL expressions and its query variables.
func readDashboard(t *testing.T) (queries []dashQuery, vars map[string]string) {
	t.Helper()
	path := filepath.Join(moduleRoot, "deploy", "grafana", "shoal.json")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if d.Title == "" || d.UID == "" {
		t.Errorf("%s: title %q, uid %q: want both", path, d.Title, d.UID)
	}
	sameDS := func(where string, ds json.RawMessage) {
		var got, want any
		json.Unmarshal([]byte(promDatasource), &want)
		if err := json.Unmarshal(ds, &got); err != nil || fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("%s: datasource %s, want %s", where, ds, promDatasource)
		}
	}

	vars = map[string]string{}
	hasDSVar := false
	for _, v := range d.Templating.List {
		switch v.Type {
		case "datasource":
			var q string
			json.Unmarshal(v.Query, &q)
			if v.Name != "datasource" || q != "prometheus" {
				t.Errorf("variable %s: a datasource variable named datasource of type prometheus is wanted, have %s %s", v.Name, v.Name, v.Query)
			}
			hasDSVar = true
		case "query":
			sameDS("variable "+v.Name, v.Datasource)
			var q struct {
				Query string `json:"query"`
			}
			if err := json.Unmarshal(v.Query, &q); err != nil || q.Query == "" {
				t.Errorf("variable %s: query %s: want {\"query\": ...}", v.Name, v.Query)
			}
			vars[v.Name] = q.Query
		default:
			t.Errorf("variable %s: type %s not expected", v.Name, v.Type)
		}
	}
	if !hasDSVar {
		t.Errorf("%s: no datasource variable", path)
	}
	for _, name := range []string{"job", "instance"} {
		if vars[name] == "" {
			t.Errorf("%s: no query variable %s", path, name)
		}
	}

	ids := map[int]string{}
	var walk func([]dashboardPanel)
	walk = func(ps []dashboardPanel) {
		for _, p := range ps {
			where := fmt.Sprintf("panel %d %q", p.ID, p.Title)
			if prev, dup := ids[p.ID]; dup {
				t.Errorf("%s: id already used by %s", where, prev)
			}
			ids[p.ID] = where
			if p.Type == "row" {
				walk(p.Panels)
				continue
			}
			sameDS(where, p.Datasource)
			if len(p.Targets) == 0 {
				t.Errorf("%s: no query", where)
			}
			for _, tg := range p.Targets {
				sameDS(where+" query "+tg.RefID, tg.Datasource)
				queries = append(queries, dashQuery{where + " query " + tg.RefID, tg.Expr})
			}
		}
	}
	walk(d.Panels)
	for _, a := range d.Annotations.List {
		if a.Expr == "" {
			continue // Grafana's built-in annotations
		}
		sameDS("annotation "+a.Name, a.Datasource)
		queries = append(queries, dashQuery{"annotation " + a.Name, a.Expr})
	}
	if len(queries) < 20 {
		t.Errorf("%s: %d queries, want the 20 or more of every panel", path, len(queries))
	}
	return queries, vars
}

// grafanaVar matches what Grafana substitutes in a query: $name, ${name}
// and ${name:format}.
var grafanaVar = regexp.MustCompile(`\$(?:\{(\w+)(?::\w+)?\}|(\w+))`)

// substitute replaces Grafana's variables in expr as Grafana would with
// values; it reports a variable it does not know.
func substitute(t *testing.T, where, expr string, values map[string]string) string {
	t.Helper()
	return grafanaVar.ReplaceAllStringFunc(expr, func(m string) string {
		sub := grafanaVar.FindStringSubmatch(m)
		name := sub[1] + sub[2]
		v, ok := values[name]
		if !ok {
			t.Errorf("%s: unknown variable %s in %s", where, m, expr)
		}
		return v
	})
}

// promResult is the answer of Prometheus's /api/v1/query.
type promResult struct {
	Status    string `json:"status"`
	ErrorType string `json:"errorType"`
	Error     string `json:"error"`
	Data      struct {
		ResultType string `json:"resultType"`
		Result     []struct {
			Metric map[string]string `json:"metric"`
		} `json:"result"`
	} `json:"data"`
}

// queryAll runs an instant query; the answer says whether it parsed
// (Status "success") and which series it returned.
func (p *promServer) queryAll(t *testing.T, q string) promResult {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get(p.url + "/api/v1/query?query=" + url.QueryEscape(q))
	if err != nil {
		t.Fatalf("query %s: %v", q, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var r promResult
	if err := json.Unmarshal(body, &r); err != nil {
		t.Fatalf("query %s: %d %s: %v", q, resp.StatusCode, body, err)
	}
	return r
}

// labelValues turns a Grafana variable query label_values(selector, label)
// into the PromQL that lists the same values.
var labelValues = regexp.MustCompile(`^label_values\((.+),\s*(\w+)\)$`)

// TestGrafanaDashboardQueries runs shoal (built-in workers on a TCP and a
// UDP listener) under a real Prometheus server, gives it traffic, a
// SIGKILLed worker and a rolling reload, and then runs every query of
// deploy/grafana/shoal.json with its variables filled in as Grafana would:
// each must parse and return at least one series. A query that ends in
// "or vector(0)" must also return data without it: the fallback is there
// for a quiet time range, not to hide a misspelt series.
func TestGrafanaDashboardQueries(t *testing.T) {
	queries, vars := readDashboard(t)
	promBin := peer.Require(t, "prometheus")

	port, mport := testutil.FreePort(t), testutil.FreePort(t)
	uport := testutil.FreePort(t)
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	m := startShoal(t, nil, "--workers", "2", "--port", fmt.Sprintf("tcp:%d,udp:%d", port, uport), "--host", "127.0.0.1",
		"--metrics-addr", "127.0.0.1:"+strconv.Itoa(mport), "--control", sock, "--stop-timeout", "5s")
	pids := m.listening(15*time.Second, 2)
	prom := startPrometheus(t, promBin, mport)
	// Events before Prometheus's first scrape would be invisible to
	// changes() and increase(): let it scrape the idle state twice.
	testutil.Eventually(t, 20*time.Second, "two scrapes of shoal", func() bool {
		v, ok := prom.query(t, `count_over_time(up{job="shoal"}[1m])`)
		return ok && v >= 2
	})

	load := func() {
		t.Helper()
		keep := &http.Client{Timeout: 5 * time.Second}
		fresh := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
		defer keep.CloseIdleConnections()
		for i := 0; i < 100; i++ {
			c := keep
			if i%2 == 1 {
				c = fresh
			}
			resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
			if err != nil {
				t.Fatalf("request %d: %v", i, err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Fatalf("request %d: %d", i, resp.StatusCode)
			}
		}
		conn, err := net.Dial("udp", fmt.Sprintf("127.0.0.1:%d", uport))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		for i := 0; i < 10; i++ {
			conn.Write([]byte("ping\n"))
		}
	}
	load()

	// A death: worker 1 SIGKILLed, and replaced.
	victim := pids[1]
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	m.waitFor(10*time.Second, 1, "the death of the SIGKILLed worker", func(e entry) bool {
		return e.str("message") == "worker died" && e.num("pid") == victim
	})
	testutil.Eventually(t, 10*time.Second, "worker 1 replaced", func() bool {
		cur := m.current()
		return len(cur) == 2 && cur[1] != victim
	})
	// A rolling reload.
	if out, code := ctl(t, sock, "reload"); code != 0 {
		t.Fatalf("shoal ctl reload: exit %d: %s", code, out)
	}
	load()

	// Prometheus has scraped the death and the reload, and a few more
	// times after, so that every rate has samples to work with.
	instance := "127.0.0.1:" + strconv.Itoa(mport)
	var seen float64 // the time of the first scrape with the reload
	testutil.Eventually(t, 30*time.Second, "Prometheus scraping the reload, then 3 more scrapes", func() bool {
		at, ok := prom.query(t, `timestamp(up{job="shoal"})`)
		if !ok {
			return false
		}
		if seen == 0 {
			if v, ok := prom.query(t, `sum(shoal_reloads_total{result="ok"})`); ok && v >= 1 {
				seen = at
			}
			return false
		}
		return at >= seen+3
	})

	// The variables list this shoal.
	values := map[string]string{
		"datasource": "prometheus",
		"job":        "shoal",
		// A multi-value variable is a regex, escaped for a PromQL string.
		"instance":        strings.ReplaceAll(regexp.QuoteMeta(instance), `\`, `\\`),
		"__rate_interval": "1m",
		"__interval":      "1m",
		"__range":         "5m",
	}
	for name, want := range map[string]string{"job": "shoal", "instance": instance} {
		q := vars[name]
		sub := labelValues.FindStringSubmatch(substitute(t, "variable "+name, q, values))
		if sub == nil {
			t.Errorf("variable %s: query %q: want label_values(selector, label)", name, q)
			continue
		}
		r := prom.queryAll(t, fmt.Sprintf("group by (%s) (%s)", sub[2], sub[1]))
		var got []string
		for _, s := range r.Data.Result {
			got = append(got, s.Metric[sub[2]])
		}
		if r.Status != "success" || len(got) != 1 || got[0] != want {
			t.Errorf("variable %s: %s lists %q (%s %s), want [%s]", name, q, got, r.Status, r.Error, want)
		}
	}

	for _, q := range queries {
		expr := substitute(t, q.where, q.expr, values)
		check := []string{expr}
		if base, ok := strings.CutSuffix(expr, " or vector(0)"); ok {
			check = append(check, base)
		}
		for _, e := range check {
			r := prom.queryAll(t, e)
			switch {
			case r.Status != "success":
				t.Errorf("%s: %s: %s: %s", q.where, e, r.ErrorType, r.Error)
			case len(r.Data.Result) == 0:
				t.Errorf("%s: %s: no series", q.where, e)
			default:
				t.Logf("%s: %d series: %s", q.where, len(r.Data.Result), e)
			}
		}
	}
}
