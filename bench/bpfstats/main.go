// Command bpfstats measures what shoal's steering program costs the kernel,
// from the kernel's own accounting of BPF program run time.
//
//	bpfstats -hold           turns the accounting on until it is stopped
//	bpfstats -pid MASTER     prints the master's SK_REUSEPORT programs' totals
//
// -hold asks the kernel for run-time statistics with BPF_ENABLE_STATS (root):
// the kernel counts them for every BPF program while the returned file
// descriptor is open, and stops when it closes, which happens when this
// process ends however it ends (SIGTERM, SIGKILL): nothing stays changed.
// It prints "enabled" once the accounting is on.
//
// -pid reads /proc/PID/fdinfo of every BPF program the process holds whose
// type is SK_REUSEPORT (21) and prints
//
//	run_time_ns=... run_cnt=... progs=...
//
// the time spent in the programs and the number of times they ran (one run
// per new connection placed); the difference of two readings, divided,
// is the cost per connection.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

func main() {
	hold := flag.Bool("hold", false, "turn the kernel's BPF run-time accounting on until stopped (SIGTERM, SIGINT)")
	pid := flag.Int("pid", 0, "print the run-time totals of the SK_REUSEPORT programs this process holds")
	flag.Parse()
	switch {
	case *hold:
		if err := holdStats(); err != nil {
			fmt.Fprintln(os.Stderr, "bpfstats:", err)
			os.Exit(1)
		}
	case *pid > 0:
		t, c, n, err := totals(*pid)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bpfstats:", err)
			os.Exit(1)
		}
		fmt.Printf("run_time_ns=%d run_cnt=%d progs=%d\n", t, c, n)
	default:
		fmt.Fprintln(os.Stderr, "bpfstats: want -hold or -pid PID")
		os.Exit(2)
	}
}

func holdStats() error {
	attr := struct{ typ uint32 }{unix.BPF_STATS_RUN_TIME}
	fd, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_ENABLE_STATS, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	if errno != 0 {
		return fmt.Errorf("bpf(BPF_ENABLE_STATS): %w (needs root or CAP_SYS_ADMIN)", errno)
	}
	defer unix.Close(int(fd))
	fmt.Println("enabled")
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	return nil
}

// totals sums run_time_ns and run_cnt over pid's SK_REUSEPORT program fds.
func totals(pid int) (runTime, runCnt uint64, progs int, err error) {
	fds, err := filepath.Glob(fmt.Sprintf("/proc/%d/fd/*", pid))
	if err != nil || len(fds) == 0 {
		return 0, 0, 0, fmt.Errorf("read the fds of pid %d: no such process, or not allowed", pid)
	}
	for _, fd := range fds {
		if l, err := os.Readlink(fd); err != nil || l != "anon_inode:bpf-prog" {
			continue
		}
		info, err := os.Open(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, filepath.Base(fd)))
		if err != nil {
			continue
		}
		kv := map[string]string{}
		sc := bufio.NewScanner(info)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok {
				kv[k] = strings.TrimSpace(v)
			}
		}
		info.Close()
		if kv["prog_type"] != "21" { // BPF_PROG_TYPE_SK_REUSEPORT
			continue
		}
		t, _ := strconv.ParseUint(kv["run_time_ns"], 10, 64)
		c, _ := strconv.ParseUint(kv["run_cnt"], 10, 64)
		runTime += t
		runCnt += c
		progs++
	}
	return runTime, runCnt, progs, nil
}
