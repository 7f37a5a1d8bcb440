package reuseport

import (
	"bufio"
	"bytes"
	"os"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Waiting returns the inodes of the sockets that the process pid and
// its descendants wait on: the targets of their epoll sets (the "tfd:"
// lines of /proc/PID/fdinfo of an eventpoll descriptor name each target's
// inode), and the sockets their threads are blocked on in accept or a
// receive (/proc/PID/task/TID/syscall names the call and its descriptor).
// A socket passed to a process is held at once, but waited on only once
// the program serves: this tells one from the other. A process that waits
// in select or poll leaves no such trace.
func Waiting(pid int) (map[uint64]struct{}, error) {
	out := map[uint64]struct{}{}
	pids := append([]int{pid}, descendants(pid)...)
	var firstErr error
	for _, p := range pids {
		if err := addWaiting(out, p); err != nil && firstErr == nil && p == pid {
			firstErr = err
		}
	}
	if len(out) == 0 && firstErr != nil {
		return nil, firstErr
	}
	return out, nil
}

// blockingCalls are the system calls whose first argument is a socket the
// caller waits on.
var blockingCalls = map[int]bool{
	unix.SYS_ACCEPT: true, unix.SYS_ACCEPT4: true,
	unix.SYS_RECVFROM: true, unix.SYS_RECVMSG: true, unix.SYS_RECVMMSG: true,
}

func addWaiting(out map[uint64]struct{}, pid int) error {
	dir := "/proc/" + strconv.Itoa(pid)
	ents, err := os.ReadDir(dir + "/fd")
	if err != nil {
		return err
	}
	sockets := map[int]uint64{} // fd -> inode
	for _, e := range ents {
		link, err := os.Readlink(dir + "/fd/" + e.Name())
		if err != nil {
			continue
		}
		fd, _ := strconv.Atoi(e.Name())
		switch {
		case strings.HasPrefix(link, "socket:["):
			if ino, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]"), 10, 64); err == nil {
				sockets[fd] = ino
			}
		case link == "anon_inode:[eventpoll]":
			addEpollTargets(out, dir+"/fdinfo/"+e.Name())
		}
	}
	tasks, _ := os.ReadDir(dir + "/task")
	for _, t := range tasks {
		b, err := os.ReadFile(dir + "/task/" + t.Name() + "/syscall")
		if err != nil {
			continue
		}
		f := strings.Fields(string(b))
		if len(f) < 2 {
			continue
		}
		nr, err := strconv.Atoi(f[0])
		if err != nil || !blockingCalls[nr] {
			continue
		}
		if fd, err := strconv.ParseInt(strings.TrimPrefix(f[1], "0x"), 16, 64); err == nil {
			if ino, ok := sockets[int(fd)]; ok {
				out[ino] = struct{}{}
			}
		}
	}
	return nil
}

// addEpollTargets adds the inodes an epoll set watches, from lines such as
// "tfd:        3 events:       19 data:                3  pos:0 ino:1a2b sdev:8".
func addEpollTargets(out map[uint64]struct{}, fdinfo string) {
	b, err := os.ReadFile(fdinfo)
	if err != nil {
		return
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "tfd:") {
			continue
		}
		i := strings.Index(line, " ino:")
		if i < 0 {
			continue
		}
		hex := strings.Fields(line[i+len(" ino:"):])
		if len(hex) == 0 {
			continue
		}
		if ino, err := strconv.ParseUint(hex[0], 16, 64); err == nil {
			out[ino] = struct{}{}
		}
	}
}

// Holders finds the processes that hold the sockets of inodes, from
// /proc/*/fd. It reads every process's descriptors: it is for saying who
// holds a port in an error, not for a loop.
func Holders(inodes []uint64) map[uint64][]int {
	want := map[string]uint64{}
	for _, ino := range inodes {
		want["socket:["+strconv.FormatUint(ino, 10)+"]"] = ino
	}
	out := map[uint64][]int{}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		fds, _ := os.ReadDir("/proc/" + p.Name() + "/fd")
		for _, fd := range fds {
			link, err := os.Readlink("/proc/" + p.Name() + "/fd/" + fd.Name())
			if ino, ok := want[link]; err == nil && ok && !slices.Contains(out[ino], pid) {
				out[ino] = append(out[ino], pid)
			}
		}
	}
	return out
}
