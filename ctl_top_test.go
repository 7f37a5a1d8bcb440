package main

import (
	"math"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	tea "charm.land/bubbletea/v2"

	"github.com/shoal-sh/shoal/control"
	"github.com/shoal-sh/shoal/supervisor"
)

// topSampleOf returns a sample of n listening workers at time at; worker i
// has served req[i] requests and used cpu[i] seconds.
func topSampleOf(at time.Time, req []uint64, cpu []float64) *topSample {
	s := &topSample{at: at, st: control.Status{Desired: len(req), Master: control.MasterStatus{PID: 1, CPUSeconds: 1}}}
	for i := range req {
		s.st.Workers = append(s.st.Workers, control.WorkerStatus{Slot: i + 1, PID: 100 + i, State: "listening", Uptime: 60,
			Requests: req[i], CPUSeconds: cpu[i], RSSBytes: 10 << 20, ListenBacklog: 4096})
	}
	return s
}

// TestTopRowsRates: requests/s and CPU % come from two samples; a slot
// whose process changed has no CPU % yet, and the first sample no rates.
func TestTopRowsRates(t *testing.T) {
	t0 := time.Unix(1000, 0)
	prev := topSampleOf(t0, []uint64{100, 50}, []float64{1, 2})
	cur := topSampleOf(t0.Add(2*time.Second), []uint64{300, 50}, []float64{1.5, 2})
	cur.st.Workers[1].PID = 999 // replaced
	rows := topRows(prev, cur)
	if rows[0].rate != 100 || rows[0].cpu != 25 {
		t.Errorf("slot 1: %.1f req/s, %.1f%% CPU; want 100 and 25", rows[0].rate, rows[0].cpu)
	}
	if rows[1].rate != 0 || !math.IsNaN(rows[1].cpu) {
		t.Errorf("slot 2, replaced: %.1f req/s, %.1f%% CPU; want 0 and unknown", rows[1].rate, rows[1].cpu)
	}
	for _, r := range topRows(nil, cur) {
		if !math.IsNaN(r.rate) || !math.IsNaN(r.cpu) {
			t.Errorf("first sample: slot %d has rates %v, %v; want unknown", r.Slot, r.rate, r.cpu)
		}
	}
}

// TestTopKeys drives the model with keys: arrows move the selection, a
// digit sorts and the same digit reverses, s moves to the next column, q
// quits.
func TestTopKeys(t *testing.T) {
	t0 := time.Now()
	m := topModel{view: topView{path: "/x", prev: topSampleOf(t0, []uint64{0, 0, 0}, []float64{0, 0, 0}),
		cur: topSampleOf(t0.Add(time.Second), []uint64{10, 30, 20}, []float64{0, 0, 0}), styled: true}}
	press := func(k string) tea.Cmd {
		t.Helper()
		var key tea.KeyPressMsg
		switch k {
		case "down":
			key = tea.KeyPressMsg{Code: tea.KeyDown}
		case "up":
			key = tea.KeyPressMsg{Code: tea.KeyUp}
		default:
			key = tea.KeyPressMsg{Code: rune(k[0]), Text: k}
		}
		nm, cmd := m.Update(key)
		m = nm.(topModel)
		return cmd
	}
	order := func() []int {
		var slots []int
		for _, r := range m.view.rows() {
			slots = append(slots, r.Slot)
		}
		return slots
	}
	press("down")
	press("down")
	press("down") // stays on the last row
	if m.view.sel != 3 {
		t.Errorf("after 3 downs: slot %d selected, want 3", m.view.sel)
	}
	press("5") // REQ/S, largest first
	if got := order(); got[0] != 2 || got[1] != 3 || got[2] != 1 {
		t.Errorf("sorted by requests/s: %v, want [2 3 1]", got)
	}
	press("up") // from slot 3, in the middle now, to slot 2
	if m.view.sel != 2 {
		t.Errorf("up from slot 3 sorted by rate: slot %d selected, want 2", m.view.sel)
	}
	press("5")
	if got := order(); got[0] != 1 || got[2] != 2 {
		t.Errorf("sorted by requests/s, reversed: %v, want [1 3 2]", got)
	}
	press("s")
	if topColumns[m.view.sortCol].title != "REQUESTS" {
		t.Errorf("s after REQ/S sorts by %s, want REQUESTS", topColumns[m.view.sortCol].title)
	}
	if cmd := press("q"); cmd == nil {
		t.Error("q returned no command, want tea.Quit")
	} else if _, ok := cmd().(tea.QuitMsg); !ok {
		t.Error("q did not quit")
	}
}

// TestTopRenderFits: the plain snapshot has no escape sequence and every
// row; the live view fits the terminal and keeps the selected row on it.
func TestTopRenderFits(t *testing.T) {
	t0 := time.Now()
	req := make([]uint64, 40)
	v := topView{path: "/run/shoal/shoal-8000.sock", prev: topSampleOf(t0, req, make([]float64, 40)),
		cur: topSampleOf(t0.Add(time.Second), req, make([]float64, 40))}
	plain := v.render(false, 0, 0)
	if strings.Contains(plain, "\x1b") || strings.Count(plain, " listening ") != 40 {
		t.Errorf("plain snapshot: escapes or not 40 rows:\n%s", plain)
	}
	v.styled, v.sel = true, 37
	screen := v.render(true, 60, 20)
	lines := strings.Split(screen, "\n")
	if len(lines) > 20 {
		t.Errorf("the view has %d lines on a terminal of 20", len(lines))
	}
	for _, l := range lines {
		if w := len([]rune(stripANSI(l))); w > 60 {
			t.Errorf("a line %d wide on a terminal of 60: %q", w, l)
		}
	}
	if !strings.Contains(stripANSI(screen), ">    37") {
		t.Errorf("the selected slot 37 is not on the screen:\n%s", stripANSI(screen))
	}
}

// stripANSI removes the CSI sequences of s.
func stripANSI(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == 0x1b && i+1 < len(s) && s[i+1] == '[' {
			i += 2
			for i < len(s) && (s[i] < 0x40 || s[i] > 0x7e) {
				i++
			}
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// BenchmarkStatusOf measures what one status answer costs the master
// beyond the supervisor's snapshot, for 64 workers on one TCP listener:
// /proc/PID/stat of each, one netlink dump, and the master's own /proc.
func BenchmarkStatusOf(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	snap := supervisor.Snapshot{Desired: 64, Port: port, Listeners: []supervisor.Listener{{Network: "tcp", Port: port}}}
	for i := range 64 {
		snap.Workers = append(snap.Workers, supervisor.WorkerStatus{ID: i + 1, PID: os.Getpid(), State: supervisor.Listening,
			Deaths: map[string]uint64{"signal_SIGKILL": 1}})
	}
	b.ReportAllocs()
	for b.Loop() {
		st := statusOf(snap)
		if st.Workers[63].RSSBytes == 0 {
			b.Fatal("no memory read")
		}
	}
}

// TestParseProcStat: CPU and memory from /proc/PID/stat, whatever the
// command name holds; a line cut short is not read.
func TestParseProcStat(t *testing.T) {
	line := "4242 (a) (b c)) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 130 0 0 20 0 7 0 12345 1258291200 3000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n"
	cpu, rss, ok := parseProcStat([]byte(line))
	if !ok || cpu != 3.8 || rss != 3000*uint64(os.Getpagesize()) {
		t.Errorf("parseProcStat: %v s, %d bytes, %v; want 3.8 s and 3000 pages", cpu, rss, ok)
	}
	if _, _, ok := parseProcStat([]byte("4242 (a) S 1 4242")); ok {
		t.Error("a cut line was read")
	}
	if cpu, rss, ok := procUsage(os.Getpid()); !ok || rss == 0 || cpu < 0 {
		t.Errorf("procUsage of the test itself: %v s, %d bytes, %v", cpu, rss, ok)
	}
}
