package supervisor

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"sync/atomic"

	"github.com/shoal-sh/shoal/internal/sdnotify"
	"github.com/shoal-sh/shoal/ipc"
)

// loopEvent is something a worker's channel goroutine hands to the loop,
// because it changes the supervisor's state.
type loopEvent struct {
	kind loopEventKind
	w    *worker
	msg  ipc.Message  // for evReady and evRelay, copied off the reader's buffer
	ch   *ipc.Channel // for evDisconnect: the channel that ended

	note    sdnotify.Message // for evNotify
	noteErr error            // for evNotify: why the datagram is bad, if it is
}

type loopEventKind int

const (
	evDisconnect loopEventKind = iota // the worker's channel closed
	evFirstBeat                       // its first heartbeat: the loop starts watching it
	evReady                           // it sent shoal:ready
	evRelay                           // it sent shoal:send: relay msg
	evRecycle                         // it reached its request limit
	evNotify                          // a systemd notification arrived (ReadyNotify); w is nil
)

// post hands e to the loop, or drops it once Run has returned.
func (s *Supervisor) post(e loopEvent) {
	select {
	case s.events <- e:
	case <-s.done:
	}
}

// Worker is a handle on one slot, valid across the processes that fill it:
// the Node.js cluster module's worker object.
type Worker struct {
	s  *Supervisor
	id int
}

// Worker returns the handle of slot id. The slot need not exist yet.
func (s *Supervisor) Worker(id int) *Worker { return &Worker{s: s, id: id} }

// ID returns the slot, 1..N.
func (w *Worker) ID() int { return w.id }

// Send sends v to the process now in the slot: worker.send in Node.js.
func (w *Worker) Send(v any) error { return w.s.Send(w.id, v) }

// Handle sets the handler for application messages from this slot, in
// place of Options.OnMessage: worker.on('message') in Node.js. It runs on
// the worker's channel goroutine and must be safe to call concurrently with
// other slots' handlers. A nil h removes it.
func (w *Worker) Handle(h func(Message)) {
	w.s.mu.Lock()
	defer w.s.mu.Unlock()
	if w.s.handlers == nil {
		w.s.handlers = map[int]func(Message){}
	}
	if h == nil {
		delete(w.s.handlers, w.id)
		return
	}
	w.s.handlers[w.id] = h
}

// Send sends v, encoded as one JSON line, to the worker in slot id. It never
// blocks: when the worker's queue is full the message is dropped, counted,
// and an error says so.
func (s *Supervisor) Send(id int, v any) error {
	frame, err := ipc.Encode(v)
	if err != nil {
		return fmt.Errorf("supervisor: send to worker %d: %w", id, err)
	}
	var sendErr error
	if !s.do(func() { sendErr = s.sendFrame(id, frame) }) {
		return errors.New("supervisor: send: the supervisor is not running")
	}
	return sendErr
}

// Broadcast sends v to every running worker. It returns an error naming the
// workers whose queue was full.
func (s *Supervisor) Broadcast(v any) error {
	frame, err := ipc.Encode(v)
	if err != nil {
		return fmt.Errorf("supervisor: broadcast: %w", err)
	}
	var errs []error
	if !s.do(func() {
		for _, id := range s.slotIDs() {
			if s.slots[id].w == nil {
				continue
			}
			if err := s.sendFrame(id, frame); err != nil {
				errs = append(errs, err)
			}
		}
	}) {
		return errors.New("supervisor: broadcast: the supervisor is not running")
	}
	return errors.Join(errs...)
}

// onMessage runs on the worker's channel goroutine. Request reports are
// counted right here, so the hot path costs an atomic add and no hand-off.
func (s *Supervisor) onMessage(w *worker, m ipc.Message) {
	switch m.Cmd {
	case ipc.CmdNotifyRequest:
		s.count(w, 1)
	case ipc.CmdRequests:
		s.count(w, uint64(m.N))
	case ipc.CmdHeartbeat:
		if w.beat.Swap(s.now().UnixNano()) == 0 && s.opts.HeartbeatTimeout > 0 {
			// The first one: the loop starts watching w.
			s.post(loopEvent{kind: evFirstBeat, w: w})
		}
	case ipc.CmdReady:
		s.post(loopEvent{kind: evReady, w: w})
	case ipc.CmdSend:
		m.Msg = append([]byte(nil), m.Msg...)
		m.Raw = nil
		s.post(loopEvent{kind: evRelay, w: w, msg: m})
	case "":
		if string(m.Raw) == `"ready"` {
			// PM2's convention: process.send('ready').
			s.post(loopEvent{kind: evReady, w: w})
			return
		}
		s.application(w, m)
	default:
		s.application(w, m)
	}
}

// application hands an application message to its handler, on the
// channel's goroutine.
func (s *Supervisor) application(w *worker, m ipc.Message) {
	s.log.Debug().Int("worker", w.slot.id).Int("pid", w.pid).RawJSON("message", m.Raw).Msg("message from worker")
	s.mu.Lock()
	h := s.handlers[w.slot.id]
	s.mu.Unlock()
	if h == nil {
		h = s.opts.OnMessage
	}
	if h != nil {
		h(Message{Worker: w.slot.id, PID: w.pid, Cmd: m.Cmd, Raw: append([]byte(nil), m.Raw...)})
	}
}

// count adds n reported requests to w's slot and the total. The sums
// saturate, so a counter never goes down whatever a worker sends.
func (s *Supervisor) count(w *worker, n uint64) {
	addSaturating(&w.slot.requests, n)
	addSaturating(&s.requested, n)
	s.served(w, n)
}

// addSaturating adds n to c, stopping at the largest uint64.
func addSaturating(c *atomic.Uint64, n uint64) {
	for {
		old := c.Load()
		sum := old + n
		if sum < old {
			sum = math.MaxUint64
		}
		if c.CompareAndSwap(old, sum) {
			return
		}
	}
}

// served counts requests of w's process and asks for its recycle once it
// reaches its limit. It runs on the channel's goroutine.
func (s *Supervisor) served(w *worker, n uint64) {
	if w.limit == 0 || w.served.Add(n) < w.limit || !w.recycling.CompareAndSwap(false, true) {
		return
	}
	s.post(loopEvent{kind: evRecycle, w: w})
}

// handleEvent runs on the loop goroutine for what a channel reader hands
// over.
func (s *Supervisor) handleEvent(e loopEvent) {
	w := e.w
	switch e.kind {
	case evNotify:
		s.handleNotify(e.note, e.noteErr)
		return
	case evDisconnect:
		if e.ch != w.ch {
			return // a channel an upgrade detached and that was resumed
		}
		s.log.Debug().Int("worker", w.slot.id).Int("pid", w.pid).Msg("worker channel closed")
		s.emit(Event{Type: EventDisconnect, Worker: w.slot.id, PID: w.pid})
	case evFirstBeat:
		// Nothing to do: the loop's next wake now counts w's deadline.
	case evReady:
		if s.opts.Ready == ReadyMessage && w.state == Online {
			s.setListening(w)
		}
	case evRelay:
		s.relay(w, e.msg)
	case evRecycle:
		s.log.Info().Int("worker", w.slot.id).Int("pid", w.pid).Uint64("requests", w.served.Load()).Uint64("max_requests", w.limit).Msg("worker reached its request limit")
		s.recycle(w, ReasonMaxRequests)
	}
}

// relay delivers a shoal:send message to the workers it names.
func (s *Supervisor) relay(from *worker, m ipc.Message) {
	frame := append(append([]byte(nil), m.Msg...), '\n')
	if len(m.Msg) == 0 {
		s.log.Warn().Int("worker", from.slot.id).Msg(`shoal:send without "msg" ignored`)
		return
	}
	if m.To == "all" {
		for _, id := range s.slotIDs() {
			if id != from.slot.id && s.slots[id].w != nil {
				s.sendFrame(id, frame)
			}
		}
		return
	}
	id, err := strconv.Atoi(m.To)
	if err != nil || s.slots[id] == nil {
		s.log.Warn().Int("worker", from.slot.id).Str("to", m.To).Msg(`shoal:send to no such worker ignored: "to" must be a slot number or "all"`)
		return
	}
	s.sendFrame(id, frame)
}

func (s *Supervisor) sendFrame(id int, frame []byte) error {
	sl := s.slots[id]
	if sl == nil || sl.w == nil || sl.w.ch == nil {
		return fmt.Errorf("supervisor: send to worker %d: no such running worker", id)
	}
	if err := sl.w.ch.Send(frame); err != nil {
		var de *ipc.DropError
		reason := "dropped"
		if errors.As(err, &de) {
			reason = de.Reason
		}
		if n, ok := s.warns.Allow(warnKey{id, reason}, s.now()); ok {
			s.log.Warn().Int("worker", id).Int("pid", sl.w.pid).Str("reason", reason).Uint64("suppressed", n).Err(err).
				Msg("message to worker dropped (is it reading fd 3?)")
		}
		return fmt.Errorf("supervisor: send to worker %d: %w", id, err)
	}
	return nil
}
