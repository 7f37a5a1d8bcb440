package main

// 'shoal ctl top': a live view of a master's workers, built on one status
// request a second over the control socket.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	tea "charm.land/bubbletea/v2"
	"charm.land/lipgloss/v2"

	"github.com/shoal-sh/shoal/control"
)

// topInterval is the time between two status requests of 'shoal ctl top'.
const topInterval = time.Second

// topRequestTimeout bounds one status request when --timeout is not given.
const topRequestTimeout = 5 * time.Second

// runTop is 'shoal ctl top'. On a terminal it draws the live view until
// q; with once, or when stdin or stdout is not a terminal, it prints one
// plain snapshot, measured over one interval, and returns.
func runTop(ctx context.Context, path string, timeout time.Duration, once bool, stdout, stderr io.Writer) int {
	if timeout <= 0 {
		timeout = topRequestTimeout
	}
	src := &topSource{path: path, timeout: timeout}
	defer src.Close()
	first, err := src.fetch(ctx)
	if err != nil {
		fmt.Fprintf(stderr, "shoal ctl: top: %s\n", control.Printable(err.Error()))
		return exitFailure
	}
	if once || !isTerminal(os.Stdin) || !isTerminalWriter(stdout) {
		select {
		case <-time.After(topInterval):
		case <-ctx.Done():
			fmt.Fprintf(stderr, "shoal ctl: top: %v\n", ctx.Err())
			return exitFailure
		}
		second, err := src.fetch(ctx)
		if err != nil {
			fmt.Fprintf(stderr, "shoal ctl: top: %s\n", control.Printable(err.Error()))
			return exitFailure
		}
		v := topView{path: path, prev: &first, cur: &second}
		if _, err := io.WriteString(stdout, v.render(false, 0, 0)); err != nil {
			fmt.Fprintf(stderr, "shoal ctl: top: %v\n", err)
			return exitFailure
		}
		return exitOK
	}

	// The live view: requests go on their own goroutine, one at a time,
	// until the view ends; then ctx's end stops the one in flight.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	m := topModel{ctx: ctx, src: src, view: topView{path: path, cur: &first, styled: true}}
	p := tea.NewProgram(m, tea.WithContext(ctx), tea.WithInput(os.Stdin), tea.WithOutput(stdout))
	if _, err := p.Run(); err != nil && !errors.Is(err, tea.ErrProgramKilled) {
		fmt.Fprintf(stderr, "shoal ctl: top: the terminal: %v\n", err)
		return exitFailure
	}
	return exitOK
}

// isTerminalWriter reports whether w is a terminal.
func isTerminalWriter(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && isTerminal(f)
}

// topSource asks the master for its status over one connection, dialled
// again after a failure. Its requests are serialized.
type topSource struct {
	path    string
	timeout time.Duration // per request

	mu sync.Mutex
	c  *control.Client // nil until dialled, and after a failure
}

// fetch asks for the status once.
func (s *topSource) fetch(ctx context.Context) (topSample, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	for retried := false; ; retried = true {
		if s.c == nil {
			c, err := control.Dial(s.path)
			if err != nil {
				return topSample{}, err
			}
			s.c = c
		}
		st, err := s.c.Status(ctx)
		if err == nil {
			return topSample{at: time.Now(), st: st}, nil
		}
		s.c.Close()
		s.c = nil
		if errors.Is(err, context.DeadlineExceeded) {
			return topSample{}, fmt.Errorf("status: the master at %s did not answer within %s", s.path, s.timeout)
		}
		// The master closed the connection (it upgraded itself, or
		// evicted an idle one): once more, on a new one.
		if !retried && ctx.Err() == nil {
			continue
		}
		return topSample{}, err
	}
}

// Close closes the connection, once a request in flight has returned.
func (s *topSource) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.c != nil {
		s.c.Close()
		s.c = nil
	}
}

// topSample is one status answer and when it came.
type topSample struct {
	at time.Time
	st control.Status
}

// topRow is one slot with its rates over the last interval; a rate is NaN
// when it cannot be measured yet.
type topRow struct {
	control.WorkerStatus
	rate float64 // requests per second
	cpu  float64 // percent of one CPU
}

// topRows returns the slots of cur, with their rates since prev.
func topRows(prev, cur *topSample) []topRow {
	rows := make([]topRow, 0, len(cur.st.Workers))
	for _, w := range cur.st.Workers {
		r := topRow{WorkerStatus: w, rate: math.NaN(), cpu: math.NaN()}
		if prev != nil {
			dt := cur.at.Sub(prev.at).Seconds()
			for _, p := range prev.st.Workers {
				if p.Slot != w.Slot || dt <= 0 {
					continue
				}
				if w.Requests >= p.Requests {
					r.rate = float64(w.Requests-p.Requests) / dt
				}
				if w.PID != 0 && p.PID == w.PID && w.CPUSeconds >= p.CPUSeconds {
					r.cpu = 100 * (w.CPUSeconds - p.CPUSeconds) / dt
				}
			}
		}
		rows = append(rows, r)
	}
	return rows
}

// A topColumn is one column of the table.
type topColumn struct {
	title string
	left  bool // text, aligned left; numbers go right
	cell  func(topRow) string
	cmp   func(a, b topRow) int
	desc  bool // sorted largest first when first chosen
}

// nanLow orders NaN below every number.
func nanLow(a, b float64) int {
	switch {
	case math.IsNaN(a) && math.IsNaN(b):
		return 0
	case math.IsNaN(a):
		return -1
	case math.IsNaN(b):
		return 1
	}
	return cmp.Compare(a, b)
}

// topColumns are the table's columns; keys 1 to 9 and 0 sort by the first
// ten, s cycles through all.
var topColumns = []topColumn{
	{title: "SLOT", cell: func(r topRow) string { return strconv.Itoa(r.Slot) },
		cmp: func(a, b topRow) int { return cmp.Compare(a.Slot, b.Slot) }},
	{title: "PID", cell: func(r topRow) string { return dash(r.PID != 0, strconv.Itoa(r.PID)) },
		cmp: func(a, b topRow) int { return cmp.Compare(a.PID, b.PID) }},
	{title: "STATE", left: true, cell: func(r topRow) string { return control.Printable(r.State) },
		cmp: func(a, b topRow) int { return strings.Compare(a.State, b.State) }},
	{title: "UPTIME", cell: func(r topRow) string { return dash(r.PID != 0, fmtUptime(r.Uptime)) },
		cmp: func(a, b topRow) int { return cmp.Compare(a.Uptime, b.Uptime) }, desc: true},
	{title: "REQ/S", cell: func(r topRow) string { return fmtFloat(r.rate) },
		cmp: func(a, b topRow) int { return nanLow(a.rate, b.rate) }, desc: true},
	{title: "REQUESTS", cell: func(r topRow) string { return strconv.FormatUint(r.Requests, 10) },
		cmp: func(a, b topRow) int { return cmp.Compare(a.Requests, b.Requests) }, desc: true},
	{title: "CPU%", cell: func(r topRow) string { return fmtFloat(r.cpu) },
		cmp: func(a, b topRow) int { return nanLow(a.cpu, b.cpu) }, desc: true},
	{title: "RSS", cell: func(r topRow) string { return dash(r.RSSBytes != 0, fmtBytes(r.RSSBytes)) },
		cmp: func(a, b topRow) int { return cmp.Compare(a.RSSBytes, b.RSSBytes) }, desc: true},
	{title: "QUEUE", cell: func(r topRow) string {
		return dash(r.ListenBacklog != 0, fmt.Sprintf("%d/%d", r.ListenQueue, r.ListenBacklog))
	}, cmp: func(a, b topRow) int { return cmp.Compare(a.ListenQueue, b.ListenQueue) }, desc: true},
	{title: "RESTARTS", cell: func(r topRow) string { return strconv.Itoa(r.Restarts) },
		cmp: func(a, b topRow) int { return cmp.Compare(a.Restarts, b.Restarts) }, desc: true},
	{title: "LAST DEATH", left: true, cell: func(r topRow) string { return dash(r.LastDeath != "", control.Printable(r.LastDeath)) },
		cmp: func(a, b topRow) int { return strings.Compare(a.LastDeath, b.LastDeath) }},
}

// addKnown returns sum+f, where NaN is nothing: NaN only when both are.
func addKnown(sum, f float64) float64 {
	switch {
	case math.IsNaN(f):
		return sum
	case math.IsNaN(sum):
		return f
	}
	return sum + f
}

// dash returns s, or "-" when not ok.
func dash(ok bool, s string) string {
	if !ok {
		return "-"
	}
	return s
}

// fmtFloat formats a rate with one decimal; "-" for NaN.
func fmtFloat(f float64) string {
	if math.IsNaN(f) {
		return "-"
	}
	return strconv.FormatFloat(f, 'f', 1, 64)
}

// fmtUptime formats seconds as 42s, 3m12s, 5h03m or 3d04h.
func fmtUptime(sec float64) string {
	s := int64(sec)
	switch {
	case s < 60:
		return fmt.Sprintf("%ds", s)
	case s < 3600:
		return fmt.Sprintf("%dm%02ds", s/60, s%60)
	case s < 86400:
		return fmt.Sprintf("%dh%02dm", s/3600, s%3600/60)
	}
	return fmt.Sprintf("%dd%02dh", s/86400, s%86400/3600)
}

// fmtBytes formats a size in binary units: 812 KiB, 12.3 MiB, 1.21 GiB.
func fmtBytes(b uint64) string {
	switch {
	case b < 1<<20:
		return fmt.Sprintf("%d KiB", (b+1<<9)>>10)
	case b < 1<<30:
		return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
	}
	return fmt.Sprintf("%.2f GiB", float64(b)/(1<<30))
}

// topView is what the screen shows: the last two samples, the sort and
// the selection.
type topView struct {
	path      string
	prev, cur *topSample
	err       error // of the last request, shown until one succeeds

	styled  bool // a terminal: a selection, a sort, styles and keys
	sortCol int  // index in topColumns
	desc    bool
	sel     int // the selected slot; 0 for the first row
}

// rows returns the sorted rows.
func (v *topView) rows() []topRow {
	rows := topRows(v.prev, v.cur)
	c := topColumns[v.sortCol]
	slices.SortStableFunc(rows, func(a, b topRow) int {
		n := c.cmp(a, b)
		if v.desc {
			n = -n
		}
		if n == 0 {
			n = cmp.Compare(a.Slot, b.Slot)
		}
		return n
	})
	return rows
}

// selected returns the index of the selected row in rows.
func (v *topView) selected(rows []topRow) int {
	for i, r := range rows {
		if r.Slot == v.sel {
			return i
		}
	}
	return 0
}

// move moves the selection by d rows, within the table.
func (v *topView) move(d int) {
	rows := v.rows()
	if len(rows) == 0 {
		return
	}
	i := min(max(v.selected(rows)+d, 0), len(rows)-1)
	v.sel = rows[i].Slot
}

// sortBy sorts by column i; choosing the current column again reverses it.
func (v *topView) sortBy(i int) {
	if i == v.sortCol {
		v.desc = !v.desc
		return
	}
	v.sortCol, v.desc = i, topColumns[i].desc
}

var (
	topTitleStyle  = lipgloss.NewStyle().Bold(true)
	topHeadStyle   = lipgloss.NewStyle().Bold(true).Reverse(true)
	topSelStyle    = lipgloss.NewStyle().Reverse(true)
	topErrStyle    = lipgloss.NewStyle().Bold(true).Foreground(lipgloss.Red)
	topFaintStyle  = lipgloss.NewStyle().Faint(true)
	topStopStyle   = lipgloss.NewStyle().Bold(true).Foreground(lipgloss.Yellow)
	topReloadStyle = lipgloss.NewStyle().Bold(true).Foreground(lipgloss.Cyan)
)

// render draws the view. Unstyled, it is the plain snapshot: no selection,
// no keys, no escape sequences, every row. Styled, it fits in width
// columns and height lines (0: no limit).
func (v *topView) render(styled bool, width, height int) string {
	style := func(s lipgloss.Style, text string) string {
		if !styled {
			return text
		}
		return s.Render(text)
	}
	fit := func(line string) string {
		if width > 0 && len([]rune(line)) > width {
			line = string([]rune(line)[:width])
		}
		return line
	}
	st := v.cur.st
	rows := v.rows()
	var head []string

	// The header: what is watched, the master, the totals.
	when := v.cur.at.Format("15:04:05")
	head = append(head, style(topTitleStyle, fit(fmt.Sprintf("shoal top  %s  %s", control.Printable(v.path), when))))

	var mcpu float64 = math.NaN()
	if v.prev != nil && v.prev.st.Master.PID == st.Master.PID && st.Master.PID != 0 {
		if dt := v.cur.at.Sub(v.prev.at).Seconds(); dt > 0 && st.Master.CPUSeconds >= v.prev.st.Master.CPUSeconds {
			mcpu = 100 * (st.Master.CPUSeconds - v.prev.st.Master.CPUSeconds) / dt
		}
	}
	reload := "idle"
	if st.Reloading {
		reload = "RELOADING"
	}
	line := fmt.Sprintf("master  pid %s  up %s  cpu %s%%  rss %s  reload %s (%d done, %d aborted)",
		dash(st.Master.PID != 0, strconv.Itoa(st.Master.PID)), dash(st.Master.Uptime > 0, fmtUptime(st.Master.Uptime)),
		fmtFloat(mcpu), dash(st.Master.RSSBytes != 0, fmtBytes(st.Master.RSSBytes)), reload, st.Reloads, st.ReloadsAborted)
	if st.Steering != "" {
		line += "  steering " + control.Printable(st.Steering)
	}
	switch {
	case st.Stopping:
		head = append(head, style(topStopStyle, fit(line+"  STOPPING")))
	case st.Reloading:
		head = append(head, style(topReloadStyle, fit(line)))
	default:
		head = append(head, fit(line))
	}

	running, listening, restarts := 0, 0, 0
	var requests, rss uint64
	rate, cpu := math.NaN(), math.NaN()
	for _, r := range rows {
		if r.PID != 0 {
			running++
		}
		if r.State == "listening" {
			listening++
		}
		requests += r.Requests
		rss += r.RSSBytes
		restarts += r.Restarts
		rate, cpu = addKnown(rate, r.rate), addKnown(cpu, r.cpu)
	}
	head = append(head, fit(fmt.Sprintf("workers %d/%d listening, %d running  requests %d  %s/s  cpu %s%%  rss %s  restarts %d",
		listening, st.Desired, running, requests, fmtFloat(rate), fmtFloat(cpu), fmtBytes(rss), restarts)))
	if v.err != nil {
		head = append(head, style(topErrStyle, fit("shoal ctl: top: "+control.Printable(v.err.Error())+" (trying again every second)")))
	}
	head = append(head, "")

	// The table.
	cells := make([][]string, len(rows)+1)
	cells[0] = make([]string, len(topColumns))
	for i, c := range topColumns {
		cells[0][i] = c.title
		if styled && i == v.sortCol {
			cells[0][i] += map[bool]string{true: "▼", false: "▲"}[v.desc]
		}
	}
	for j, r := range rows {
		cells[j+1] = make([]string, len(topColumns))
		for i, c := range topColumns {
			cells[j+1][i] = c.cell(r)
		}
	}
	widths := make([]int, len(topColumns))
	for _, row := range cells {
		for i, s := range row {
			widths[i] = max(widths[i], len([]rune(s)))
		}
	}
	lines := make([]string, len(cells))
	for j, row := range cells {
		var b strings.Builder
		for i, s := range row {
			pad := strings.Repeat(" ", widths[i]-len([]rune(s)))
			if i > 0 {
				b.WriteString("  ")
			}
			if topColumns[i].left {
				if i < len(row)-1 {
					s += pad
				}
			} else {
				s = pad + s
			}
			b.WriteString(s)
		}
		lines[j] = b.String()
	}

	var out []string
	out = append(out, head...)
	if !styled {
		out = append(out, lines...)
		for _, r := range rows {
			if r.Waiting != "" {
				out = append(out, fmt.Sprintf("worker %d does not serve: it %s", r.Slot, control.Printable(r.Waiting)))
			}
		}
		return strings.Join(out, "\n") + "\n"
	}

	// Styled: a marker and reverse video on the selected row, the rows
	// that fit, the selected worker's details and the keys.
	sel := v.selected(rows)
	foot := []string{"", topFaintStyle.Render(fit(v.details(rows, sel))),
		topFaintStyle.Render(fit("q quit  ↑/↓ select  1-9,0 sort by column (again: reverse)  s next column  r reverse"))}
	room := len(rows)
	if height > 0 {
		room = max(1, height-len(head)-1-len(foot))
	}
	offset := max(0, sel-room+1) // the selected row stays on the screen
	out = append(out, topHeadStyle.Render(fit("  "+lines[0]+strings.Repeat(" ", max(0, width-2-len([]rune(lines[0])))))))
	for j := offset; j < len(rows) && j < offset+room; j++ {
		if j == sel {
			out = append(out, topSelStyle.Render(fit("> "+lines[j+1])))
		} else {
			out = append(out, fit("  "+lines[j+1]))
		}
	}
	out = append(out, foot...)
	return strings.Join(out, "\n")
}

// details describes the worker in row i: its deaths, and why it does not
// serve, if it does not.
func (v *topView) details(rows []topRow, i int) string {
	if i >= len(rows) {
		return "no workers"
	}
	r := rows[i]
	s := fmt.Sprintf("slot %d: %d reloads", r.Slot, r.Reloads)
	if len(r.Deaths) == 0 {
		s += ", no deaths"
	} else {
		var ds []string
		for _, class := range slices.Sorted(func(yield func(string) bool) {
			for k := range r.Deaths {
				if !yield(k) {
					return
				}
			}
		}) {
			ds = append(ds, fmt.Sprintf("%s %d", control.Printable(class), r.Deaths[class]))
		}
		s += ", deaths: " + strings.Join(ds, ", ")
	}
	if r.Waiting != "" {
		s += "; does not serve: it " + control.Printable(r.Waiting)
	}
	return s
}

// topModel is the live view as a Bubble Tea model.
type topModel struct {
	ctx  context.Context
	src  *topSource
	view topView

	width, height int
}

// topStatusMsg is the answer to one status request.
type topStatusMsg struct {
	sample topSample
	err    error
	sent   time.Time
}

// topTickMsg says that the next request may go.
type topTickMsg struct{}

// fetch is the command that asks for the status once.
func (m topModel) fetch() tea.Cmd {
	ctx, src := m.ctx, m.src
	return func() tea.Msg {
		sent := time.Now()
		s, err := src.fetch(ctx)
		return topStatusMsg{sample: s, err: err, sent: sent}
	}
}

// Init waits one interval after the first sample, taken before the view.
func (m topModel) Init() tea.Cmd {
	return tea.Tick(topInterval-time.Since(m.view.cur.at), func(time.Time) tea.Msg { return topTickMsg{} })
}

// Update handles an answer, the clock, the window's size and the keys.
func (m topModel) Update(msg tea.Msg) (tea.Model, tea.Cmd) {
	switch msg := msg.(type) {
	case topStatusMsg:
		if msg.err != nil {
			m.view.err = msg.err
		} else {
			s := msg.sample
			m.view.err, m.view.prev, m.view.cur = nil, m.view.cur, &s
		}
		// One request per interval, counted from when the last one went.
		return m, tea.Tick(max(0, topInterval-time.Since(msg.sent)), func(time.Time) tea.Msg { return topTickMsg{} })
	case topTickMsg:
		return m, m.fetch()
	case tea.WindowSizeMsg:
		m.width, m.height = msg.Width, msg.Height
	case tea.KeyPressMsg:
		switch k := msg.String(); k {
		case "q", "ctrl+c", "esc":
			return m, tea.Quit
		case "up", "k":
			m.view.move(-1)
		case "down", "j":
			m.view.move(1)
		case "home", "g":
			m.view.move(-len(m.view.cur.st.Workers))
		case "end", "G":
			m.view.move(len(m.view.cur.st.Workers))
		case "pgup":
			m.view.move(-max(1, m.height-8))
		case "pgdown":
			m.view.move(max(1, m.height-8))
		case "s":
			m.view.sortBy((m.view.sortCol + 1) % len(topColumns))
		case "r":
			m.view.desc = !m.view.desc
		case "1", "2", "3", "4", "5", "6", "7", "8", "9", "0":
			i := int(k[0]-'0') - 1
			if i < 0 {
				i = 9
			}
			m.view.sortBy(i)
		}
	}
	return m, nil
}

// View draws the screen on the terminal's alternate screen.
func (m topModel) View() tea.View {
	v := tea.NewView(m.view.render(true, m.width, m.height))
	v.AltScreen = true
	v.WindowTitle = "shoal top"
	return v
}
