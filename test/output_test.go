package test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The flood each helper worker writes: floodLines lines on stdout and as
// many on stderr at once, every floodLongEvery-th of them floodLong bytes
// (more than the 64 KiB a line may have before it is cut), then a last
// stdout line with no newline.
const (
	floodLines     = 10000
	floodLongEvery = 100
	floodLong      = 100 << 10
	maxLine        = 64 << 10 // logpipe.MaxLine
)

// floodLine is line n of a stream of the worker in slot: its stream, slot,
// number and length, then letters that depend on n.
func floodLine(stream string, slot, n int) string {
	size := n % 7 * 13
	if n%floodLongEvery == floodLongEvery/2 {
		size = floodLong
	}
	return fmt.Sprintf("%s %d %d %d ", stream, slot, n, size) + strings.Repeat(string(rune('a'+n%26)), size)
}

func floodTail(slot int) string { return fmt.Sprintf("tail of %d, with no newline", slot) }

// helperOutputFlood writes the flood to stdout and stderr from two
// goroutines, in writes of up to 64 KiB that end anywhere in a line.
func helperOutputFlood() int {
	slot, _ := strconv.Atoi(os.Getenv("SHOAL_WORKER_ID"))
	var wg sync.WaitGroup
	for _, s := range []struct {
		name string
		f    *os.File
	}{{"out", os.Stdout}, {"err", os.Stderr}} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w := bufio.NewWriterSize(s.f, 64<<10)
			for n := range floodLines {
				w.WriteString(floodLine(s.name, slot, n) + "\n")
			}
			if s.f == os.Stdout {
				w.WriteString(floodTail(slot))
			}
			w.Flush()
		}()
	}
	wg.Wait()
	return 0
}

// piece is one line as the master wrote it.
type piece struct {
	slot, pid int
	cont      bool // it continues the line before, which was cut
	text      string
}

// parsePrefixed reads "w1 4321 | text" and "w1 4321 + text".
func parsePrefixed(line string) (piece, bool) {
	var p piece
	head, text, ok := strings.Cut(line, " | ")
	if h, t, ok2 := strings.Cut(line, " + "); ok2 && (!ok || len(h) < len(head)) {
		head, text, ok, p.cont = h, t, true, true
	}
	if !ok {
		return p, false
	}
	if _, err := fmt.Sscanf(head, "w%d %d", &p.slot, &p.pid); err != nil {
		return p, false
	}
	p.text = text
	return p, true
}

// parseRecord reads a JSON record of a worker's line on stream.
func parseRecord(line, stream string) (piece, bool) {
	var r struct {
		Worker, PID int
		Stream      string
		Message     string
		Continued   bool
		Level       string
		Component   string
	}
	if json.Unmarshal([]byte(line), &r) != nil || r.Stream == "" {
		return piece{}, false
	}
	if r.Stream != stream || r.Level != "info" || r.Component != "shoal" {
		return piece{slot: -1}, true
	}
	return piece{slot: r.Worker, pid: r.PID, cont: r.Continued, text: r.Message}, true
}

// TestWorkerOutputLabelledWholeLines: two workers flood stdout and stderr
// at once, with lines longer than 64 KiB and a last line with no newline.
// With --worker-output prefix and json, every line arrives whole (a long
// one in marked pieces of at most 64 KiB), labelled with its worker's slot
// and pid, in order, on the stream it was written to; the master's peak
// memory stays far below what went through it.
func TestWorkerOutputLabelledWholeLines(t *testing.T) {
	for _, tc := range []struct {
		mode  string
		stall time.Duration // the master's stdout takes nothing for so long
	}{{"prefix", 0}, {"json", 0}, {"prefix", 2 * time.Second}} {
		name := tc.mode
		if tc.stall > 0 {
			name += "/stdout-stalled"
		}
		t.Run(name, func(t *testing.T) {
			mode := tc.mode
			flags, argv := helperCmd("output-flood")
			args := append([]string{"--workers", "2", "--port", "0", "--restart", "never"}, flags...)
			args = append(append(args, "--"), argv...)
			env := []string{"SHOAL_WORKER_OUTPUT=" + mode}
			var m *master
			var stalled *stalledWriter
			if tc.stall > 0 {
				m, stalled = startShoalStalled(t, tc.stall, env, args...)
			} else {
				m = startShoal(t, env, args...)
			}

			// VmHWM is the peak: a read at any time after the peak sees it.
			var hwm int
			polled := make(chan struct{})
			go func() {
				defer close(polled)
				for {
					if kb := vmHWM(m.pid()); kb > hwm {
						hwm = kb
					}
					select {
					case <-m.done:
						return
					case <-time.After(20 * time.Millisecond):
					}
				}
			}()
			start := time.Now()
			if code := m.wait(120 * time.Second); code != 0 {
				t.Fatalf("shoal exited %d, want 0 once both workers exited 0", code)
			}
			<-polled
			took := time.Since(start)

			pids := map[int]int{}
			for _, e := range m.logs.entries(msg("worker started")) {
				pids[e.num("worker")] = e.num("pid")
			}
			if len(pids) != 2 {
				t.Fatalf("worker started for %v, want slots 1 and 2", pids)
			}
			outLines, _ := m.stdout.snapshot()
			errLines, _ := m.logs.snapshot()
			volume := 0
			for _, stream := range []struct {
				name     string
				lines    []string
				record   string
				optional bool // lines that are not the workers' (the master's own log)
			}{{"out", outLines, "stdout", false}, {"err", errLines, "stderr", true}} {
				got := map[int][]string{} // whole lines by slot
				cuts := 0
				for _, line := range stream.lines {
					volume += len(line) + 1
					var p piece
					var ok bool
					if mode == "prefix" {
						p, ok = parsePrefixed(line)
					} else {
						p, ok = parseRecord(line, stream.record)
					}
					if !ok {
						if stream.optional {
							continue
						}
						t.Fatalf("%s: line %.100q is not a worker's labelled line", stream.record, line)
					}
					if pids[p.slot] == 0 || p.pid != pids[p.slot] {
						t.Fatalf("%s: line %.100q: want slot 1 or 2 with its pid %v", stream.record, line, pids)
					}
					if len(p.text) > maxLine {
						t.Fatalf("%s: a piece of %d bytes, more than %d", stream.record, len(p.text), maxLine)
					}
					if p.cont {
						cuts++
						if n := len(got[p.slot]); n > 0 {
							got[p.slot][n-1] += p.text
							continue
						}
						t.Fatalf("%s: worker %d's first line %.100q is marked as continuing", stream.record, p.slot, line)
					}
					got[p.slot] = append(got[p.slot], p.text)
				}
				for slot := 1; slot <= 2; slot++ {
					want := floodLines
					if stream.name == "out" {
						want++
					}
					lines := got[slot]
					if len(lines) != want {
						t.Errorf("%s: worker %d: %d lines, want %d", stream.record, slot, len(lines), want)
					}
					for n := range min(len(lines), floodLines) {
						if w := floodLine(stream.name, slot, n); lines[n] != w {
							t.Fatalf("%s: worker %d's line %d is %.80q (%d bytes), want %.80q (%d bytes)",
								stream.record, slot, n, lines[n], len(lines[n]), w, len(w))
						}
					}
					if stream.name == "out" && len(lines) == want && lines[want-1] != floodTail(slot) {
						t.Errorf("stdout: worker %d's last line %q, want %q, the bytes it wrote with no newline", slot, lines[want-1], floodTail(slot))
					}
				}
				if want := 2 * floodLines / floodLongEvery; cuts < want {
					t.Errorf("%s: %d continued pieces, want at least %d: one per line over 64 KiB", stream.record, cuts, want)
				}
			}
			if stalled != nil {
				// The workers write all of it before they exit, far more
				// than a pipe and a buffer hold: none can have exited
				// while the master's stdout took nothing.
				for _, e := range m.logs.entries(msg("worker died")) {
					if at, err := time.Parse(time.RFC3339Nano, e.str("time")); err == nil && at.Before(stalled.until.Truncate(time.Second)) {
						t.Errorf("worker %d exited at %s, before the master's stdout took anything (%s): its output went somewhere", e.num("worker"), at, stalled.until)
					}
				}
			}
			t.Logf("%s: %.1f MiB of worker output in %s; the master's peak RSS (VmHWM) %.1f MiB",
				mode, float64(volume)/(1<<20), took.Round(time.Millisecond), float64(hwm)/1024)
			// A master that held what the workers wrote would need the
			// volume; the race detector multiplies memory, so the bound
			// is checked without it only.
			if hwm == 0 {
				t.Error("the master's VmHWM was never read")
			} else if !raceEnabled && hwm*1024 > volume/2 {
				t.Errorf("the master's peak RSS %d KiB is over half the %d KiB that went through it: want memory bounded by buffers, not by the output", hwm, volume/1024)
			}
		})
	}
}

// stalledWriter is a master's stdout that takes nothing until until.
type stalledWriter struct {
	until time.Time
	w     *logs
}

func (s *stalledWriter) Write(p []byte) (int, error) {
	time.Sleep(time.Until(s.until))
	return s.w.Write(p)
}

// startShoalStalled starts shoal as startShoal does, with a stdout that
// takes nothing for the first stall.
func startShoalStalled(t *testing.T, stall time.Duration, env []string, args ...string) (*master, *stalledWriter) {
	t.Helper()
	m := newMaster(t)
	stalled := &stalledWriter{until: time.Now().Add(stall), w: m.stdout}
	m.cmd = exec.Command(shoalBin, args...)
	m.cmd.Env = testEnv(env...)
	m.cmd.Stdout = stalled
	m.launch()
	return m, stalled
}

// vmHWM returns the peak resident set size of pid in KiB, 0 if unknown.
func vmHWM(pid int) int {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return n
		}
	}
	return 0
}

// TestWorkerOutputRawIsTheMastersOwn: by default, and with --worker-output
// raw, a worker's fds 1 and 2 are the master's stdout and stderr
// themselves, with no pipe of the master's in between; with prefix they
// are not.
func TestWorkerOutputRawIsTheMastersOwn(t *testing.T) {
	for _, mode := range []string{"", "raw", "prefix"} {
		t.Run("mode="+mode, func(t *testing.T) {
			args := []string{"--workers", "1", "--port", "0", "--stop-timeout", "2s"}
			if mode != "" {
				args = append(args, "--worker-output", mode)
			}
			args = append(args, "--", "/bin/sh", "-c", `echo "fd1 $(readlink /proc/$$/fd/1)"; echo "fd2 $(readlink /proc/$$/fd/2)" >&2; exec sleep 60`)
			m := startShoal(t, nil, args...)
			m.waitFor(10*time.Second, 1, "worker started", msg("worker started"))
			var got [3]string
			deadline := time.Now().Add(10 * time.Second)
			for time.Now().Before(deadline) && (got[1] == "" || got[2] == "") {
				for fd, l := range map[int]*logs{1: m.stdout, 2: m.logs} {
					lines, _ := l.snapshot()
					for _, line := range lines {
						// The worker's own line, raw or labelled; not the
						// master's log line that quotes the command.
						key := fmt.Sprintf("fd%d ", fd)
						if v, ok := strings.CutPrefix(line, key); ok {
							got[fd] = v
						} else if _, v, ok := strings.Cut(line, "| "+key); ok {
							got[fd] = v
						}
					}
				}
				time.Sleep(20 * time.Millisecond)
			}
			for fd := 1; fd <= 2; fd++ {
				master, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", m.pid(), fd))
				if err != nil {
					t.Fatal(err)
				}
				if got[fd] == "" {
					t.Fatalf("the worker's line about its fd %d never arrived", fd)
				}
				if same := got[fd] == master; same != (mode != "prefix") {
					t.Errorf("worker's fd %d is %q, the master's %q: want them the same only in raw mode", fd, got[fd], master)
				}
			}
			m.signal(syscall.SIGTERM)
			if code := m.wait(15 * time.Second); code != 0 {
				t.Errorf("shoal exited %d after SIGTERM, want 0", code)
			}
		})
	}
}
