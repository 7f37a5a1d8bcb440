package supervisor

import (
	"fmt"
	"strconv"
	"strings"
)

// Listener is one port the workers serve, TCP or UDP.
type Listener struct {
	Network string // "tcp" or "udp"
	Port    int    // 1..65535
}

// String returns the listener as the command line spells it: "tcp:8000".
func (l Listener) String() string { return l.Network + ":" + strconv.Itoa(l.Port) }

// ParseListeners parses one or more listeners, separated by commas: "8000"
// (TCP), "tcp:8000", "udp:5353", "tcp:443,udp:443". A listener given twice
// is an error.
func ParseListeners(text string) ([]Listener, error) {
	var out []Listener
	for _, f := range strings.Split(text, ",") {
		f = strings.TrimSpace(f)
		l, err := parseListener(f)
		if err != nil {
			return nil, err
		}
		for _, seen := range out {
			if seen == l {
				return nil, fmt.Errorf("listener %s given twice", l)
			}
		}
		out = append(out, l)
	}
	return out, nil
}

func parseListener(f string) (Listener, error) {
	network, port, found := strings.Cut(f, ":")
	if !found {
		network, port = "tcp", f
	}
	network = strings.ToLower(network)
	if network != "tcp" && network != "udp" {
		return Listener{}, fmt.Errorf("listener %q: want tcp:PORT, udp:PORT or a bare PORT for TCP", f)
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 1 || n > 65535 {
		return Listener{}, fmt.Errorf("listener %q: want a port number 1..65535", f)
	}
	return Listener{network, n}, nil
}

// listenersText is the SHOAL_PORTS value for ls: "tcp:443,udp:443".
func listenersText(ls []Listener) string {
	parts := make([]string, len(ls))
	for i, l := range ls {
		parts[i] = l.String()
	}
	return strings.Join(parts, ",")
}
