package control

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
)

// Status is the result of the command status: the master's workers and
// what it is doing. The master sends it as the response's result, and
// `shoal ctl` decodes and prints it.
type Status struct {
	Desired   int            `json:"desired"`   // slots wanted
	Reloading bool           `json:"reloading"` // a reload runs now
	Stopping  bool           `json:"stopping"`  // the master is stopping
	Workers   []WorkerStatus `json:"workers"`   // by slot; never null

	Restarts       uint64       `json:"restarts"`           // replacements started after deaths, every slot
	Reloads        uint64       `json:"reloads_done"`       // reloads that finished
	ReloadsAborted uint64       `json:"reloads_aborted"`    // reloads aborted by a replacement that failed to start or serve
	Steering       string       `json:"steering,omitempty"` // how the master spreads new connections, when it does; empty: the kernel's SO_REUSEPORT hash
	Master         MasterStatus `json:"master"`             // the master process itself
	Version        string       `json:"version,omitempty"`  // the version of the master's program
	Upgrades       uint64       `json:"upgrades"`           // in-place upgrades of the master's program (shoal ctl upgrade)
}

// MasterStatus is the master process of a [Status], as /proc shows it. A
// master that cannot read /proc sends only its pid.
type MasterStatus struct {
	PID        int     `json:"pid"`
	Uptime     float64 `json:"uptime_seconds"`        // since the process started
	CPUSeconds float64 `json:"cpu_seconds"`           // user and system CPU time used
	RSSBytes   uint64  `json:"resident_memory_bytes"` // resident memory now
}

// WorkerStatus is one slot of a [Status].
type WorkerStatus struct {
	Slot     int     `json:"slot"`              // 1, 2, ...
	PID      int     `json:"pid"`               // 0 when no process fills the slot now
	State    string  `json:"state"`             // "starting", "listening", ...
	Uptime   float64 `json:"uptime_seconds"`    // of the current process
	Restarts int     `json:"restarts"`          // replacements after a death in the slot
	Reloads  int     `json:"reloads"`           // replacements by a reload or recycle that took over the slot
	Requests uint64  `json:"requests"`          // requests reported from the slot, across restarts
	Waiting  string  `json:"waiting,omitempty"` // why a running worker does not serve yet, once the master has looked

	// CPUSeconds is the user and system CPU time of the current process;
	// RSSBytes its resident memory. Both are 0 with no process.
	CPUSeconds float64 `json:"cpu_seconds"`
	RSSBytes   uint64  `json:"resident_memory_bytes"`
	// ListenQueue is the number of connections waiting in the accept
	// queues of the current process's LISTEN sockets on the TCP listeners;
	// ListenBacklog the sum of those queues' limits. ListenBacklog is 0
	// when the master does not know the process's sockets (it has not seen
	// it listen) or cannot read the limits.
	ListenQueue   uint64 `json:"listen_queue"`
	ListenBacklog uint64 `json:"listen_backlog"`
	// Deaths counts the slot's deaths by how the process ended:
	// "signal_SIGKILL", "exit_nonzero", "hung", ... (the classes of the
	// shoal_worker_deaths_total metric).
	Deaths map[string]uint64 `json:"deaths,omitempty"`
	// Steered counts the new connections the round-robin steering placed
	// on the slot; 0 without it.
	Steered uint64 `json:"steered_connections,omitempty"`
	// LastDeath is the class of the slot's latest death, when the master
	// can tell; empty before the first death.
	LastDeath string `json:"last_death,omitempty"`
}

// WriteTable writes st as the table `shoal ctl status` prints:
//
//	SLOT  PID    STATE      UPTIME  RESTARTS  RELOADS  REQUESTS
//	1     40112  listening  3m12s   0         1        18234
//
// A slot with no process shows "-" for its pid and uptime. A worker that
// runs but does not serve gets a line after the table saying why. Text from the
// master is printed with control characters escaped, so that an answer
// cannot drive the terminal.
func (st *Status) WriteTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SLOT\tPID\tSTATE\tUPTIME\tRESTARTS\tRELOADS\tREQUESTS")
	for _, wk := range st.Workers {
		pid, up := "-", "-"
		if wk.PID != 0 {
			pid = strconv.Itoa(wk.PID)
			up = time.Duration(wk.Uptime * float64(time.Second)).Round(time.Second).String()
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%d\t%d\t%d\n", wk.Slot, pid, Printable(wk.State), up, wk.Restarts, wk.Reloads, wk.Requests)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, wk := range st.Workers {
		if wk.Waiting != "" {
			if _, err := fmt.Fprintf(w, "worker %d does not serve: it %s\n", wk.Slot, Printable(wk.Waiting)); err != nil {
				return err
			}
		}
	}
	return nil
}

// Printable returns s with what a terminal would act on escaped as Go
// does in a quoted string (\x1b, \n, \u009b, \t...): control characters,
// invalid UTF-8, and the characters that change the direction or the
// look of text without being seen. Printable text is left as it is. Use
// it for text from a master before printing it.
func Printable(s string) string {
	clean := true
	for _, r := range s {
		if !safe(r) {
			clean = false
			break
		}
	}
	if clean {
		return s
	}
	var b strings.Builder
	for i, r := range s {
		if r == unicode.ReplacementChar && !strings.HasPrefix(s[i:], "\xef\xbf\xbd") {
			fmt.Fprintf(&b, `\x%02x`, s[i])
			continue
		}
		if safe(r) {
			b.WriteRune(r)
			continue
		}
		q := strconv.QuoteRuneToASCII(r) // 'x' with the escape inside
		b.WriteString(q[1 : len(q)-1])
	}
	return b.String()
}

// safe reports whether r prints as itself on a terminal.
func safe(r rune) bool {
	if r == unicode.ReplacementChar {
		return false // invalid UTF-8 too; a real U+FFFD is escaped as well
	}
	if r == ' ' {
		return true
	}
	return unicode.IsGraphic(r) && !unicode.Is(unicode.Cf, r)
}
