package supervisor

import (
	"fmt"
	"os"
	"runtime"
)

// forker starts processes from one OS thread that lives as long as the
// supervisor. Pdeathsig fires when the thread that forked a child exits, not
// when the process does: forking from goroutines that Go may move between
// short-lived threads would kill workers at random.
type forker struct {
	reqs chan forkReq
	done chan struct{}
}

type forkReq struct {
	path  string
	argv  []string
	attr  *os.ProcAttr
	reply chan forkReply
}

type forkReply struct {
	proc *os.Process
	err  error
}

func startForker() *forker {
	f := &forker{reqs: make(chan forkReq), done: make(chan struct{})}
	go func() {
		// Never unlocked: when this goroutine returns, after every worker
		// is gone, its thread exits with it.
		runtime.LockOSThread()
		defer close(f.done)
		for r := range f.reqs {
			p, err := os.StartProcess(r.path, r.argv, r.attr)
			r.reply <- forkReply{p, err}
		}
	}()
	return f
}

// start starts a process on the forker's thread.
func (f *forker) start(path string, argv []string, attr *os.ProcAttr) (*os.Process, error) {
	reply := make(chan forkReply, 1)
	f.reqs <- forkReq{path, argv, attr, reply}
	r := <-reply
	if r.err != nil {
		return nil, fmt.Errorf("start %s: %w", path, r.err)
	}
	return r.proc, nil
}

// stop ends the forker's goroutine and thread, once no worker is left.
func (f *forker) stop() {
	close(f.reqs)
	<-f.done
}
