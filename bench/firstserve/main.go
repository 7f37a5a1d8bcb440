// Command firstserve measures how long a shoal slot serves nothing after its
// worker is killed, as a client sees it: from SIGKILL to the first request
// answered on the port.
//
//	firstserve -port P -kills 20 -- shoal --workers 1 --port P ...
//
// Method. For each kill it starts the command (a shoal master with one
// worker, in a process group of its own), waits until the port answers, then
// kills the master's worker with SIGKILL and at once sends requests, one
// new connection each, until one is answered with 200. A connection refused
// (no listening socket: --bind worker) is retried after -poll; a connection
// reset (it landed in the dying worker's queue) is retried at once. With
// --bind master the master keeps the slot's socket, so the first connection
// waits in its queue and the replacement answers it. A fresh master for each
// kill means each kill meets shoal's immediate restart, not its crash-loop
// backoff.
//
// It prints one line per kill and, at the end,
//
//	FIRSTSERVE kills=K p50_us=... p90_us=... max_us=... refused=... reset=... poll_us=...
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/shoal-sh/shoal/reuseport"
)

func main() {
	port := flag.Int("port", 0, "the port the command's worker serves")
	kills := flag.Int("kills", 20, "number of kills (one fresh command each)")
	poll := flag.Duration("poll", time.Millisecond, "wait before another attempt after a refused connection")
	timeout := flag.Duration("timeout", 10*time.Second, "give up on one kill after this long")
	flag.Parse()
	if *port <= 0 || flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "firstserve: -port and a command are required")
		os.Exit(2)
	}
	if err := run(*port, *kills, *poll, *timeout, flag.Args()); err != nil {
		fmt.Fprintln(os.Stderr, "firstserve:", err)
		os.Exit(1)
	}
}

func run(port, kills int, poll, timeout time.Duration, argv []string) error {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	var lat []time.Duration
	var refused, reset int
	for i := 1; i <= kills; i++ {
		d, rf, rs, err := once(addr, argv, poll, timeout)
		if err != nil {
			return fmt.Errorf("kill %d: %w", i, err)
		}
		lat = append(lat, d)
		refused += rf
		reset += rs
		fmt.Printf("kill %d: first request served after %.2f ms (%d refused, %d reset)\n", i, float64(d.Microseconds())/1000, rf, rs)
	}
	slices.Sort(lat)
	pct := func(p float64) int64 {
		k := int(p/100*float64(len(lat))+0.999999) - 1
		return lat[max(0, min(k, len(lat)-1))].Microseconds()
	}
	fmt.Printf("FIRSTSERVE kills=%d p50_us=%d p90_us=%d min_us=%d max_us=%d refused=%d reset=%d poll_us=%d\n",
		len(lat), pct(50), pct(90), lat[0].Microseconds(), lat[len(lat)-1].Microseconds(), refused, reset, poll.Microseconds())
	return nil
}

// once starts argv, kills its worker and measures the time to the first
// answered request.
func once(addr string, argv []string, poll, timeout time.Duration) (d time.Duration, refused, reset int, err error) {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return 0, 0, 0, fmt.Errorf("start %s: %w", argv[0], err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
	}()

	deadline := time.Now().Add(timeout)
	var worker int
	for {
		if kids := reuseport.Descendants(cmd.Process.Pid); len(kids) == 1 {
			if ok, _ := get(addr, time.Second); ok {
				worker = kids[0]
				break
			}
		}
		if time.Now().After(deadline) {
			return 0, 0, 0, fmt.Errorf("%s: one worker answering on %s: none after %s", argv[0], addr, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Let any late start-up work of the master settle before the kill.
	time.Sleep(100 * time.Millisecond)

	t0 := time.Now()
	if err := syscall.Kill(worker, syscall.SIGKILL); err != nil {
		return 0, 0, 0, fmt.Errorf("kill worker %d: %w", worker, err)
	}
	for {
		ok, err := get(addr, time.Until(deadline))
		if ok {
			return time.Since(t0), refused, reset, nil
		}
		switch {
		case errors.Is(err, syscall.ECONNREFUSED):
			refused++
			time.Sleep(poll)
		default:
			reset++
		}
		if time.Now().After(deadline) {
			return 0, refused, reset, fmt.Errorf("no request served on %s %s after the kill (last error: %v)", addr, timeout, err)
		}
	}
}

// get sends one GET on a new connection and reports whether it was answered
// with 200.
func get(addr string, timeout time.Duration) (bool, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return false, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte("GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")); err != nil {
		return false, err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return false, err
	}
	return strings.HasPrefix(line, "HTTP/1.1 200"), nil
}
