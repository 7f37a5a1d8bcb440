//go:build linux

package reuseport

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

func inodes(pid int) (map[uint64]struct{}, error) {
	set := make(map[uint64]struct{})
	err := addSocketInodes(set, pid)
	if err != nil && isGone(err) {
		return nil, &goneError{pid: pid, err: err}
	}
	readAny := err == nil
	for _, p := range descendants(pid) {
		if addSocketInodes(set, p) == nil {
			readAny = true
		}
	}
	if !readAny {
		return nil, fmt.Errorf("reuseport: sockets of process %d: %w", pid, err)
	}
	return set, nil
}

// isGone reports whether err means that a process does not exist.
func isGone(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ESRCH)
}

// addSocketInodes adds to set the inodes of the sockets in /proc/PID/fd.
// Descriptors closed while it reads are skipped.
func addSocketInodes(set map[uint64]struct{}, pid int) error {
	dir, err := os.Open("/proc/" + strconv.Itoa(pid) + "/fd")
	if err != nil {
		return err
	}
	defer dir.Close()
	names, err := dir.Readdirnames(-1)
	if err != nil {
		return err
	}
	dirfd := int(dir.Fd())
	var buf [64]byte
	for _, name := range names {
		n, err := unix.Readlinkat(dirfd, name, buf[:])
		if err != nil {
			continue // closed meanwhile
		}
		if ino, ok := socketInode(buf[:n]); ok {
			set[ino] = struct{}{}
		}
	}
	return nil
}

// socketInode parses a /proc/PID/fd link target "socket:[INODE]".
func socketInode(link []byte) (uint64, bool) {
	const prefix = "socket:["
	if len(link) < len(prefix)+2 || string(link[:len(prefix)]) != prefix || link[len(link)-1] != ']' {
		return 0, false
	}
	return parseDec(link[len(prefix) : len(link)-1])
}

// hasChildrenFiles reports whether the kernel provides
// /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN).
var hasChildrenFiles = sync.OnceValue(func() bool {
	_, err := os.Stat("/proc/self/task/" + strconv.Itoa(unix.Gettid()) + "/children")
	return err == nil
})

// descendants returns the children, grandchildren... of pid, without pid.
func descendants(pid int) []int {
	var children func(int) []int
	if hasChildrenFiles() {
		children = childrenFromTasks
	} else {
		tree := parentTree()
		children = func(p int) []int { return tree[p] }
	}
	seen := map[int]bool{pid: true}
	var out []int
	queue := []int{pid}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, c := range children(p) {
			if !seen[c] {
				seen[c] = true
				out = append(out, c)
				queue = append(queue, c)
			}
		}
	}
	return out
}

// childrenFromTasks reads the children of every thread of pid from
// /proc/PID/task/TID/children.
func childrenFromTasks(pid int) []int {
	dir := "/proc/" + strconv.Itoa(pid) + "/task/"
	d, err := os.Open(dir)
	if err != nil {
		return nil
	}
	tids, _ := d.Readdirnames(-1)
	d.Close()
	var out []int
	for _, tid := range tids {
		b, err := os.ReadFile(dir + tid + "/children")
		if err != nil {
			continue
		}
		out = appendPids(out, b)
	}
	return out
}

// appendPids appends the space-separated pids of a children file.
func appendPids(out []int, b []byte) []int {
	for _, f := range bytes.Fields(b) {
		if p, ok := parseDec(f); ok && p > 0 && p <= 1<<31-1 {
			out = append(out, int(p))
		}
	}
	return out
}

// parentTree maps each pid to its children, from the parent pids in
// /proc/*/stat.
func parentTree() map[int][]int {
	d, err := os.Open("/proc")
	if err != nil {
		return nil
	}
	names, _ := d.Readdirnames(-1)
	d.Close()
	tree := make(map[int][]int)
	var buf [512]byte
	for _, name := range names {
		p, ok := parseDec([]byte(name))
		if !ok || p == 0 {
			continue
		}
		ppid, ok := readPPid(name, buf[:])
		if ok {
			tree[ppid] = append(tree[ppid], int(p))
		}
	}
	return tree
}

// readPPid reads the parent pid from /proc/PID/stat.
func readPPid(pid string, buf []byte) (int, bool) {
	fd, err := unix.Open("/proc/"+pid+"/stat", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, false
	}
	n, err := unix.Read(fd, buf)
	unix.Close(fd)
	if err != nil || n <= 0 {
		return 0, false
	}
	return parseStatPPid(buf[:n])
}

// parseStatPPid parses the parent pid of a /proc/PID/stat line,
// "PID (COMM) STATE PPID ...", where COMM may hold spaces and parentheses.
func parseStatPPid(b []byte) (int, bool) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || len(b) < i+5 || b[i+1] != ' ' || b[i+3] != ' ' {
		return 0, false
	}
	b = b[i+4:] // after ") S "
	j := 0
	for j < len(b) && '0' <= b[j] && b[j] <= '9' {
		j++
	}
	p, ok := parseDec(b[:j])
	if !ok || p > 1<<31-1 {
		return 0, false
	}
	return int(p), true
}
