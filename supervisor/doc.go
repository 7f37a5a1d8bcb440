// Package supervisor runs N worker processes that all serve one port, the way
// the Node.js cluster module does: the master forks workers, emits their
// lifecycle events, replaces the dead under a restart policy with crash-loop
// backoff, and stops them gracefully. Each worker binds the port itself with
// SO_REUSEPORT (see package reuseport) and the kernel spreads connections
// over the workers; the master never touches client traffic.
//
// A Go program can be its own master and its own workers:
//
//	if supervisor.IsMaster() {
//		s, err := supervisor.New(supervisor.Options{Port: 8000}) // one worker per CPU
//		...
//		err = s.Run(ctx) // until ctx ends; then every worker drains and stops
//	} else {
//		// Binds $PORT with SO_REUSEPORT, serves, reports requests and
//		// heartbeats, and when ctx ends drains without losing a request.
//		ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM)
//		defer stop()
//		err := worker.ListenAndServe(ctx, handler)
//	}
//
// Package worker is the worker's side for Go programs; package reuseport
// binds a listener by hand.
//
// With no Options.Command, the supervisor re-executes the running program;
// the copies see IsWorker() == true.
//
// # The worker contract
//
// Every worker gets, in its environment, SHOAL_WORKER_ID (its slot, 1..N; a
// replacement gets the slot of the worker it replaces), SHOAL_MASTER_PID and,
// when Options.Port is set, PORT. File descriptor 3 is the worker's end of a
// Unix socketpair, its message channel (SHOAL_IPC_FD=3 and NODE_CHANNEL_FD=3,
// so a Node.js worker's process.send works unchanged; see package ipc). EOF
// on that channel tells a worker its master is gone.
package supervisor

import (
	"os"
	"strconv"
)

// Environment variables of the worker contract.
const (
	EnvWorkerID  = "SHOAL_WORKER_ID"
	EnvWorkers   = "SHOAL_WORKERS" // the desired number of workers when the worker started
	EnvMasterPID = "SHOAL_MASTER_PID"
	EnvPort      = "PORT"        // the first listener's port
	EnvPorts     = "SHOAL_PORTS" // every listener: "tcp:443,udp:443"
)

// IsWorker reports whether this process is a shoal worker, that is whether
// SHOAL_WORKER_ID is set in its environment.
func IsWorker() bool { return os.Getenv(EnvWorkerID) != "" }

// IsMaster reports whether this process is not a worker: the Node.js
// cluster module's isMaster.
func IsMaster() bool { return !IsWorker() }

// WorkerID returns this worker's slot (1..N), or 0 in the master.
func WorkerID() int {
	id, err := strconv.Atoi(os.Getenv(EnvWorkerID))
	if err != nil || id < 0 {
		return 0
	}
	return id
}
