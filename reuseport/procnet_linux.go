//go:build linux

package reuseport

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"sync"
)

// procReaders holds buffered readers for /proc/net/tcp across calls.
var procReaders = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 64<<10) }}

// listenersProc reads the listeners on port from /proc/net/tcp and
// /proc/net/tcp6. A missing tcp6 file (IPv6 disabled) is not an error.
func listenersProc(port int) ([]Socket, error) {
	var socks []Socket
	for _, name := range [...]string{"/proc/net/tcp", "/proc/net/tcp6"} {
		f, err := os.Open(name)
		if err != nil {
			if name == "/proc/net/tcp6" && errors.Is(err, fs.ErrNotExist) {
				continue
			}
			return nil, err
		}
		br := procReaders.Get().(*bufio.Reader)
		br.Reset(f)
		socks, err = parseProcNet(br, port, socks)
		br.Reset(nil)
		procReaders.Put(br)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", name, err)
		}
	}
	return socks, nil
}

// parseProcNet appends to socks the LISTEN sockets on port (every port if
// port is 0) of a /proc/net/tcp or /proc/net/tcp6 table:
//
//	sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
//	 0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 12345 ...
//
// Addresses are hexadecimal 32-bit words in host byte order, ports are
// hexadecimal, and for a listener rx_queue is the accept queue.
func parseProcNet(r *bufio.Reader, port int, socks []Socket) ([]Socket, error) {
	header := true
	for lineno := 1; ; lineno++ {
		line, err := r.ReadSlice('\n')
		if err == bufio.ErrBufferFull {
			return socks, fmt.Errorf("line %d too long", lineno)
		}
		if len(line) > 0 && !header {
			s, ok, perr := parseProcNetLine(line, port)
			if perr != nil {
				return socks, fmt.Errorf("line %d: %w", lineno, perr)
			}
			if ok {
				socks = append(socks, s)
			}
		}
		header = false
		if err == io.EOF {
			return socks, nil
		}
		if err != nil {
			return socks, err
		}
	}
}

var errProcNetSyntax = errors.New("unexpected syntax")

// parseProcNetLine parses one socket line and reports whether it is a
// listener on port.
func parseProcNetLine(line []byte, port int) (Socket, bool, error) {
	var f [10][]byte
	n := 0
	for i := 0; i < len(line) && n < len(f); {
		for i < len(line) && isSpace(line[i]) {
			i++
		}
		j := i
		for j < len(line) && !isSpace(line[j]) {
			j++
		}
		if j > i {
			f[n] = line[i:j]
			n++
		}
		i = j
	}
	if n == 0 {
		return Socket{}, false, nil // a blank line
	}
	if n < len(f) {
		return Socket{}, false, errProcNetSyntax
	}
	// f[1] is ADDR:PORT, f[3] the state, f[4] tx_queue:rx_queue, f[7] the
	// uid and f[9] the inode.
	local := f[1]
	if len(local) < 6 || local[len(local)-5] != ':' {
		return Socket{}, false, errProcNetSyntax
	}
	st, ok := parseHex(f[3])
	if !ok {
		return Socket{}, false, errProcNetSyntax
	}
	p, ok := parseHex(local[len(local)-4:])
	if !ok {
		return Socket{}, false, errProcNetSyntax
	}
	if st != tcpListen || (port != 0 && int(p) != port) {
		return Socket{}, false, nil
	}
	var addr netip.Addr
	hexAddr := local[:len(local)-5]
	switch len(hexAddr) {
	case 8:
		var a [4]byte
		if !parseHexWords(a[:], hexAddr) {
			return Socket{}, false, errProcNetSyntax
		}
		addr = netip.AddrFrom4(a)
	case 32:
		var a [16]byte
		if !parseHexWords(a[:], hexAddr) {
			return Socket{}, false, errProcNetSyntax
		}
		addr = netip.AddrFrom16(a)
	default:
		return Socket{}, false, errProcNetSyntax
	}
	q := f[4]
	if len(q) != 17 || q[8] != ':' {
		return Socket{}, false, errProcNetSyntax
	}
	rxq, ok := parseHex(q[9:])
	if !ok {
		return Socket{}, false, errProcNetSyntax
	}
	uid, ok := parseDec(f[7])
	if !ok || uid > 1<<32-1 {
		return Socket{}, false, errProcNetSyntax
	}
	ino, ok := parseDec(f[9])
	if !ok {
		return Socket{}, false, errProcNetSyntax
	}
	return Socket{
		Inode: ino,
		UID:   uint32(uid),
		Addr:  netip.AddrPortFrom(addr, uint16(p)),
		Queue: uint32(rxq),
	}, true, nil
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

// parseHexWords decodes groups of 8 hexadecimal digits, each a 32-bit word
// printed in host byte order, into dst.
func parseHexWords(dst []byte, s []byte) bool {
	for i := 0; i < len(dst); i += 4 {
		w, ok := parseHex(s[2*i : 2*i+8])
		if !ok {
			return false
		}
		binary.NativeEndian.PutUint32(dst[i:], uint32(w))
	}
	return true
}

// parseHex parses up to 16 hexadecimal digits.
func parseHex(s []byte) (uint64, bool) {
	if len(s) == 0 || len(s) > 16 {
		return 0, false
	}
	var v uint64
	for _, c := range s {
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c -= 'a' - 10
		case 'A' <= c && c <= 'F':
			c -= 'A' - 10
		default:
			return 0, false
		}
		v = v<<4 | uint64(c)
	}
	return v, true
}

// parseDec parses a decimal number of up to 19 digits.
func parseDec(s []byte) (uint64, bool) {
	if len(s) == 0 || len(s) > 19 {
		return 0, false
	}
	var v uint64
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, false
		}
		v = v*10 + uint64(c-'0')
	}
	return v, true
}
