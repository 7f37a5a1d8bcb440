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

	"golang.org/x/sys/unix"
)

// procReaders holds buffered readers for the /proc/net tables across calls.
var procReaders = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 64<<10) }}

// listenersProc reads the listeners on port from /proc/net/tcp and
// /proc/net/tcp6.
func listenersProc(port int) ([]Socket, error) {
	return readProcNet(tcpListeners(port), "/proc/net/tcp", "/proc/net/tcp6")
}

// udpSocketsProc reads the UDP sockets bound to port from /proc/net/udp
// and /proc/net/udp6.
func udpSocketsProc(port int) ([]Socket, error) {
	return readProcNet(udpBound(port), "/proc/net/udp", "/proc/net/udp6")
}

// readProcNet reads the sockets that q selects from the table of IPv4
// sockets name4 and from that of IPv6 sockets name6. A missing name6 (IPv6
// disabled) is not an error.
func readProcNet(q query, name4, name6 string) ([]Socket, error) {
	var socks []Socket
	for _, name := range [...]string{name4, name6} {
		f, err := os.Open(name)
		if err != nil {
			if name == name6 && errors.Is(err, fs.ErrNotExist) {
				continue
			}
			return nil, err
		}
		br := procReaders.Get().(*bufio.Reader)
		br.Reset(f)
		socks, err = parseProcNet(br, q, socks)
		br.Reset(nil)
		procReaders.Put(br)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", name, err)
		}
	}
	return socks, nil
}

// parseProcNet appends to socks the sockets that q selects from a
// /proc/net/tcp, tcp6, udp or udp6 table:
//
//	sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
//	 0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 12345 ...
//
// Addresses are hexadecimal 32-bit words in host byte order, ports are
// hexadecimal. For a TCP listener rx_queue is the accept queue; for a UDP
// socket it is the receive queue in bytes, and the 13th field is the drops.
func parseProcNet(r *bufio.Reader, q query, socks []Socket) ([]Socket, error) {
	header := true
	for lineno := 1; ; lineno++ {
		line, err := r.ReadSlice('\n')
		if err == bufio.ErrBufferFull {
			return socks, fmt.Errorf("line %d too long", lineno)
		}
		if len(line) > 0 && !header {
			s, ok, perr := parseProcNetLine(line, q)
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

// parseProcNetLine parses one socket line and reports whether q selects
// the socket.
func parseProcNetLine(line []byte, q query) (Socket, bool, error) {
	var f [13][]byte
	want := 10 // up to the inode
	if q.proto == unix.IPPROTO_UDP {
		want = 13 // up to the drops
	}
	n := 0
	for i := 0; i < len(line) && n < want; {
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
	if n < 4 {
		return Socket{}, false, errProcNetSyntax
	}
	// f[1] is ADDR:PORT, f[2] the remote ADDR:PORT, f[3] the state, f[4]
	// tx_queue:rx_queue, f[7] the uid, f[9] the inode and, for UDP, f[12]
	// the drops.
	st, ok := parseHex(f[3])
	if !ok {
		return Socket{}, false, errProcNetSyntax
	}
	if len(f[1]) < 6 || f[1][len(f[1])-5] != ':' {
		return Socket{}, false, errProcNetSyntax
	}
	p, ok := parseHex(f[1][len(f[1])-4:])
	if !ok {
		return Socket{}, false, errProcNetSyntax
	}
	if st >= 32 || q.states&(1<<st) == 0 || (q.port != 0 && int(p) != q.port) {
		return Socket{}, false, nil // most lines: parse no further
	}
	if n < want {
		return Socket{}, false, errProcNetSyntax
	}
	local, ok := parseProcAddr(f[1])
	if !ok {
		return Socket{}, false, errProcNetSyntax
	}
	qs := f[4]
	if len(qs) != 17 || qs[8] != ':' {
		return Socket{}, false, errProcNetSyntax
	}
	rxq, ok := parseHex(qs[9:])
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
	s := Socket{
		Inode: ino,
		UID:   uint32(uid),
		Addr:  local,
	}
	if q.proto != unix.IPPROTO_UDP {
		s.Queue = uint32(rxq)
		return s, true, nil
	}
	remote, ok := parseProcAddr(f[2])
	if !ok {
		return Socket{}, false, errProcNetSyntax
	}
	if remote.Port() != 0 {
		s.Peer = remote
	}
	drops, ok := parseDec(f[12])
	if !ok || drops > 1<<32-1 {
		return Socket{}, false, errProcNetSyntax
	}
	s.RecvQueueBytes = uint32(rxq)
	s.Drops = uint32(drops)
	return s, true, nil
}

// parseProcAddr parses an address "0100007F:1F40" of a /proc/net table:
// 8 or 32 hexadecimal digits, a colon and 4 for the port.
func parseProcAddr(b []byte) (netip.AddrPort, bool) {
	if len(b) < 6 || b[len(b)-5] != ':' {
		return netip.AddrPort{}, false
	}
	p, ok := parseHex(b[len(b)-4:])
	if !ok {
		return netip.AddrPort{}, false
	}
	var addr netip.Addr
	hexAddr := b[:len(b)-5]
	switch len(hexAddr) {
	case 8:
		var a [4]byte
		if !parseHexWords(a[:], hexAddr) {
			return netip.AddrPort{}, false
		}
		addr = netip.AddrFrom4(a)
	case 32:
		var a [16]byte
		if !parseHexWords(a[:], hexAddr) {
			return netip.AddrPort{}, false
		}
		addr = netip.AddrFrom16(a)
	default:
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(addr, uint16(p)), true
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
