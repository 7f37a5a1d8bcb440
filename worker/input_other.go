//go:build !linux

package worker

import "net"

// hasInput reports whether bytes wait to be read on c. Outside Linux it
// cannot tell and reports false.
func hasInput(c net.Conn) bool { return false }
