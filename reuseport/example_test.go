package reuseport_test

import (
	"fmt"
	"log"
	"net"
	"os"
	"strconv"

	"github.com/shoal-sh/shoal/reuseport"
)

// Two listeners on one port: with SO_REUSEPORT the second bind succeeds,
// and the kernel spreads new connections over both. In shoal each worker
// process opens one such listener.
func ExampleListen() {
	first, err := reuseport.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer first.Close()
	second, err := reuseport.Listen("tcp4", first.Addr().String())
	if err != nil {
		log.Fatal(err)
	}
	defer second.Close()

	// A plain listener cannot join the group.
	_, err = net.Listen("tcp4", first.Addr().String())
	fmt.Println("same port:", first.Addr().String() == second.Addr().String())
	fmt.Println("plain listen refused:", err != nil)
	// Output:
	// same port: true
	// plain listen refused: true
}

// A supervisor's view of a port, asked of the kernel: every socket that
// listens on it, and which of them this process holds.
func ExampleListeners() {
	first, err := reuseport.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer first.Close()
	second, err := reuseport.Listen("tcp4", first.Addr().String())
	if err != nil {
		log.Fatal(err)
	}
	defer second.Close()
	_, p, _ := net.SplitHostPort(first.Addr().String())
	port, _ := strconv.Atoi(p)

	socks, err := reuseport.Listeners(port)
	if err != nil {
		log.Fatal(err)
	}
	ours, err := reuseport.Inodes(os.Getpid())
	if err != nil {
		log.Fatal(err)
	}
	mine := 0
	for _, s := range socks {
		if _, ok := ours[s.Inode]; ok {
			mine++
		}
	}
	fmt.Printf("%d sockets listen on the port, %d of them this process's\n", len(socks), mine)
	// Output:
	// 2 sockets listen on the port, 2 of them this process's
}
