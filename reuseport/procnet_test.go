//go:build linux

package reuseport

import (
	"bufio"
	"encoding/binary"
	"net/netip"
	"strings"
	"testing"
)

// Samples of /proc/net/tcp and /proc/net/tcp6 as a little-endian kernel
// prints them (trailing blanks trimmed).
const (
	sampleTCP = `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F40 00000000:0000 0A 00000000:00000003 00:00000000 00000000  1000        0 16729 2 000000003471858a 100 0 0 10 0
   1: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1144 1 00000000db27c794 100 0 0 10 0
   2: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 16730 2 000000003471858b 100 0 0 10 0
   3: 0100007F:884D 0100007F:892E 06 00000000:00000000 03:00000E36 00000000     0        0 0 3 0000000065251ead
   4: 0100007F:1F40 0100007F:C764 01 00000000:00000000 00:00000000 00000000  1000        0 16800 1 00000000813df2b2 20 0 0 10 -1
  10000: 0100000A:1F40 00000000:0000 0A 00000000:0000000A 00:00000000 00000000 4294967294        0 4294967296 1 0000000000000000 100 0 0 10 0
`
	sampleTCP6 = `  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F40 00000000000000000000000000000000:0000 0A 00000000:00000001 00:00000000 00000000     0        0 16728 1 00000000fdfbc59e 100 0 0 10 0
   1: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000    33        0 555 1 00000000fdfbc59f 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:1F40 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 00000000fdfbc59f 100 0 0 10 0
   3: 000080FE00000000FF005452B5F1AEFE:1F40 000080FE00000000FF005452B5F1AEFF:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 888 1 00000000fdfbc59f 100 0 0 10 0
`
)

func littleEndian(t *testing.T) {
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		t.Skip("the samples are little-endian")
	}
}

func parseSample(t *testing.T, text string, port int) []Socket {
	t.Helper()
	socks, err := parseProcNet(bufio.NewReader(strings.NewReader(text)), tcpListeners(port), nil)
	if err != nil {
		t.Fatal(err)
	}
	return socks
}

func TestParseProcNetTCP(t *testing.T) {
	littleEndian(t)
	ap := netip.MustParseAddrPort
	got := parseSample(t, sampleTCP, 8000)
	want := []Socket{
		{Inode: 16729, UID: 1000, Addr: ap("127.0.0.1:8000"), Queue: 3},
		{Inode: 16730, UID: 1000, Addr: ap("127.0.0.1:8000")},
		{Inode: 4294967296, UID: 4294967294, Addr: ap("10.0.0.1:8000"), Queue: 10},
	}
	if !equalSockets(got, want) {
		t.Errorf("port 8000:\n got %+v\nwant %+v", got, want)
	}
	if got := parseSample(t, sampleTCP, 0); len(got) != 4 || got[1].Addr != ap("0.0.0.0:2024") {
		t.Errorf("every port: %+v", got)
	}
	if got := parseSample(t, sampleTCP, 9999); len(got) != 0 {
		t.Errorf("port 9999: %+v", got)
	}
}

func TestParseProcNetTCP6(t *testing.T) {
	littleEndian(t)
	ap := netip.MustParseAddrPort
	got := parseSample(t, sampleTCP6, 8000)
	want := []Socket{
		{Inode: 16728, Addr: ap("[::1]:8000"), Queue: 1},
		{Inode: 777, Addr: ap("[::ffff:127.0.0.1]:8000")},
	}
	if !equalSockets(got, want) {
		t.Errorf("port 8000:\n got %+v\nwant %+v", got, want)
	}
	got = parseSample(t, sampleTCP6, 80)
	want = []Socket{{Inode: 555, UID: 33, Addr: ap("[::]:80")}}
	if !equalSockets(got, want) {
		t.Errorf("port 80:\n got %+v\nwant %+v", got, want)
	}
}

func TestParseProcNetErrors(t *testing.T) {
	header := "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
	for _, line := range []string{
		"   0: 0100007F:1F40 00000000:0000 0A\n",
		"   0: 0100007F1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n",
		"   0: 0100007X:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n",
		"   0: 0100007F:1F40 00000000:0000 0A 0000000000000000 00:00000000 00000000     0        0 1 1\n",
		"   0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000    -1        0 1 1\n",
		"   0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 x 1\n",
		"   0: 00007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n",
	} {
		if socks, err := parseProcNet(bufio.NewReader(strings.NewReader(header+line)), tcpListeners(0), nil); err == nil {
			t.Errorf("no error for %q: %+v", line, socks)
		}
	}
	// Header only, blank lines and a missing final newline are fine.
	for _, text := range []string{header, header + "\n", ""} {
		if socks, err := parseProcNet(bufio.NewReader(strings.NewReader(text)), tcpListeners(0), nil); err != nil || len(socks) != 0 {
			t.Errorf("%q: %+v, %v", text, socks, err)
		}
	}
	text := strings.TrimSuffix(sampleTCP, "\n")
	if socks := parseSample(t, text, 8000); len(socks) != 3 {
		t.Errorf("without a final newline: %+v", socks)
	}
}

func equalSockets(a, b []Socket) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// Samples of /proc/net/udp and /proc/net/udp6 as a little-endian kernel
// prints them: an unconnected socket (st 07) with one datagram of 100 bytes
// queued (0x340 bytes), a connected one (st 01), and one with drops.
const (
	sampleUDP = `   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops            
 6685: 0100007F:9028 00000000:0000 07 00000000:00000340 00:00000000 00000000     0        0 449882 2 0000000098029d80 0        
 6695: 0100007F:D032 0100007F:9028 01 00000000:00000000 00:00000000 00000000     0        0 449883 2 0000000030f4fd32 0        
 6696: 00000000:9028 00000000:0000 07 00000000:00001D40 00:00000000 00000000  1000        0 449884 2 0000000030f4fd33 4294967295
`
	sampleUDP6 = `  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
14364: 00000000000000000000000001000000:AE27 00000000000000000000000000000000:0000 07 00000000:00000340 00:00000000 00000000     0        0 449880 2 000000007b32be3c 7
15988: 00000000000000000000000001000000:B47F 00000000000000000000000001000000:AE27 01 00000000:00000000 00:00000000 00000000     0        0 449881 2 00000000ea17fef4 0
`
)

func TestParseProcNetUDP(t *testing.T) {
	littleEndian(t)
	ap := netip.MustParseAddrPort
	parse := func(text string, port int) []Socket {
		t.Helper()
		socks, err := parseProcNet(bufio.NewReader(strings.NewReader(text)), udpBound(port), nil)
		if err != nil {
			t.Fatal(err)
		}
		return socks
	}
	got := parse(sampleUDP, 0x9028)
	want := []Socket{
		{Inode: 449882, Addr: ap("127.0.0.1:36904"), RecvQueueBytes: 0x340},
		{Inode: 449884, UID: 1000, Addr: ap("0.0.0.0:36904"), RecvQueueBytes: 0x1d40, Drops: 4294967295},
	}
	if !equalSockets(got, want) {
		t.Errorf("udp port 36904:\n got %+v\nwant %+v", got, want)
	}
	got = parse(sampleUDP, 0)
	if len(got) != 3 || got[1].Addr != ap("127.0.0.1:53298") || got[1].Peer != ap("127.0.0.1:36904") {
		t.Errorf("udp, every port: %+v", got)
	}
	got = parse(sampleUDP6, 0)
	want = []Socket{
		{Inode: 449880, Addr: ap("[::1]:44583"), RecvQueueBytes: 0x340, Drops: 7},
		{Inode: 449881, Addr: ap("[::1]:46207"), Peer: ap("[::1]:44583")},
	}
	if !equalSockets(got, want) {
		t.Errorf("udp6, every port:\n got %+v\nwant %+v", got, want)
	}
	// The TCP query skips the UDP states, the UDP query the LISTEN state
	// (here it keeps the one ESTABLISHED line of a TCP table).
	if got := parseSample(t, sampleUDP, 0); len(got) != 0 {
		t.Errorf("TCP listeners in a UDP table: %+v", got)
	}
	if got := parse(sampleTCP, 0); len(got) != 1 || got[0].Inode != 16800 {
		t.Errorf("UDP query on a TCP table: %+v, want the ESTABLISHED socket 16800", got)
	}
}

func TestParseProcNetUDPErrors(t *testing.T) {
	header := "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n"
	for _, line := range []string{
		// No drops column.
		" 6685: 0100007F:9028 00000000:0000 07 00000000:00000340 00:00000000 00000000     0        0 449882 2 0000000098029d80\n",
		" 6685: 0100007F:9028 00000000:0000 07 00000000:00000340 00:00000000 00000000     0        0 449882 2 0000000098029d80 -1\n",
		" 6685: 0100007F:9028 00000000:0000 07 00000000:00000340 00:00000000 00000000     0        0 449882 2 0000000098029d80 4294967296\n",
		" 6685: 0100007F:9028 0000000:0000 07 00000000:00000340 00:00000000 00000000     0        0 449882 2 0000000098029d80 0\n",
	} {
		if socks, err := parseProcNet(bufio.NewReader(strings.NewReader(header+line)), udpBound(0), nil); err == nil {
			t.Errorf("no error for %q: %+v", line, socks)
		}
	}
}
