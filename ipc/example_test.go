package ipc_test

import (
	"errors"
	"fmt"
	"io"
	"log"
	"strings"
	"time"

	"github.com/shoal-sh/shoal/ipc"
)

// A master reads a worker's frames with a Decoder: a bad line costs only
// itself, and the next line is read as usual.
func ExampleDecoder() {
	stream := strings.NewReader(`{"cmd":"shoal:ready"}
{"cmd":"shoal:requests","n":42}
not json
{"cmd":"shoal:send","to":2,"msg":{"hello":"worker 2"}}
{"app":"data"}
`)
	d := ipc.NewDecoder(stream, 0)
	for {
		m, err := d.Next()
		if err == io.EOF {
			break
		}
		var fe *ipc.FrameError
		if errors.As(err, &fe) {
			fmt.Printf("bad frame: %s, %d bytes\n", fe.Reason, fe.Len)
			continue
		}
		if err != nil {
			log.Fatal(err)
		}
		switch m.Cmd {
		case ipc.CmdReady:
			fmt.Println("ready")
		case ipc.CmdRequests:
			fmt.Println("requests:", m.N)
		case ipc.CmdSend:
			fmt.Printf("relay to %s: %s\n", m.To, m.Msg)
		default:
			fmt.Printf("application message: %s\n", m.Raw)
		}
	}
	// Output:
	// ready
	// requests: 42
	// bad frame: invalid_json, 8 bytes
	// relay to 2: {"hello":"worker 2"}
	// application message: {"app":"data"}
}

// Both ends of a channel in one process: the master's Channel and the
// worker's Conn, over a socketpair from Pair. In shoal the worker end is
// the worker's file descriptor 3, and the worker gets its Conn from
// FromEnv.
func ExampleChannel() {
	masterEnd, workerEnd, err := ipc.Pair()
	if err != nil {
		log.Fatal(err)
	}
	fromWorker := make(chan string, 1)
	ch := ipc.NewChannel(masterEnd, ipc.ChannelOptions{
		// On the channel's reader goroutine: m.Raw is valid only during the call.
		OnMessage: func(m ipc.Message) { fromWorker <- string(m.Raw) },
	})
	defer ch.Close()
	conn := ipc.NewConn(workerEnd)
	defer conn.Close()

	// Worker to master.
	if err := conn.Send(map[string]string{"hello": "master"}); err != nil {
		log.Fatal(err)
	}
	select {
	case raw := <-fromWorker:
		fmt.Println("master got:", raw)
	case <-time.After(10 * time.Second):
		log.Fatal("no message for the master within 10s")
	}

	// Master to worker: Send only queues, and never blocks.
	frame, err := ipc.Encode(map[string]string{"hello": "worker"})
	if err != nil {
		log.Fatal(err)
	}
	ch.Send(frame)
	select {
	case m := <-conn.Messages():
		fmt.Println("worker got:", string(m.Raw))
	case <-time.After(10 * time.Second):
		log.Fatal("no message for the worker within 10s")
	}
	// Output:
	// master got: {"hello":"master"}
	// worker got: {"hello":"worker"}
}
