package supervisor

import (
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// mainForks, while Main runs, takes the forks and execs of every
// supervisor to the main thread.
var mainForks atomic.Pointer[chan forkReq]

// Main runs run on a new goroutine and gives the calling goroutine's thread
// to the supervisors' forks until run returns, then returns run's result.
// Call it from func main, with the main goroutine locked to the process's
// main thread by runtime.LockOSThread in an init function of package main;
// elsewhere it only calls run.
//
// A worker's parent-death signal, which ends it when the master dies,
// follows the thread that forked it, and execve ends every thread of the
// process but the one that calls it. So a master that replaces its program
// in place ([Supervisor.Upgrade]) must fork and exec from one thread, and
// the program that follows must fork from that same thread, which is then
// its main thread: with Main, every fork and the exec run on the main
// thread, so the workers survive any number of upgrades. Without Main, a
// supervisor forks on a locked thread of its own, which is enough for a
// program that upgrades once, to a program that uses Main.
func Main(run func() int) int {
	if unix.Gettid() != unix.Getpid() {
		return run()
	}
	forks := make(chan forkReq)
	mainForks.Store(&forks)
	defer mainForks.Store(nil)
	done := make(chan int, 1)
	go func() { done <- run() }()
	for {
		select {
		case q := <-forks:
			q.do()
		case code := <-done:
			return code
		}
	}
}
