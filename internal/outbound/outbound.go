// Package outbound is the outbound delay window (smtp.outbound_delay;
// issue 15, item 5; docs/operations.md, "Outbound delay window"): mail
// Postfix would relay to an external host waits a configured time before
// it leaves, so a cycle inside that window can still cancel it, like the
// undo send of webmail services (Gmail holds 5-30 s).
//
// The waiting is Postfix's own: defer_transports = smtp (postconf(5))
// keeps every delivery through the smtp transport, the one Postfix
// relays to other hosts with, in the deferred queue, while local
// deliveries (virtual_transport, through undomail's LMTP capture) go on
// at once. Postfix decides what is external, after its aliases, virtual
// and transport maps, so undomail never re-implements its routing. The
// hold queue (a HOLD action in an access or header table) was the other
// candidate; it was not chosen because it holds a whole message, local
// recipients too, and its tables judge recipients before the aliases
// expand them.
//
// A Queue watches Postfix's queue (postqueue -j), writes each message
// the window holds to the undo log (verb.KindOutboundHeld, with the front
// door's submission it came from, found by the Undomail-Id its header
// carries), releases it when its time is up (postqueue -i, which
// overrides defer_transports for that message alone), and cancels it on
// request (postsuper -d): the operator's, or a cycle's whose repair
// cancels the submission. Every end is logged. While a repair holds
// changes back nothing is released, so a cycle decides first. The state
// is the log's: a restarted undomail reads it back.
package outbound

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// Options configure a Queue.
type Options struct {
	// Delay is how long a message waits from its arrival in Postfix's
	// queue.
	Delay time.Duration
	// Postfix runs Postfix's queue tools.
	Postfix Postfix
	// Paused reports that a repair holds changes back: nothing is
	// released meanwhile. Nil: never paused.
	Paused func() bool
	// Poll is how often Postfix's queue is read; 0 means DefaultPoll.
	Poll   time.Duration
	Logger *slog.Logger
}

// DefaultPoll is how often a Queue reads Postfix's queue by default: a
// message leaves at most this much after its time is up.
const DefaultPoll = time.Second

// Message is a message the window holds, with the seq of its
// outbound.held record.
type Message struct {
	Seq int64 `json:"seq"`
	verb.OutboundHeld
}

// Queue is the window over one Postfix's queue.
type Queue struct {
	o   Options
	log *undolog.Log

	mu       sync.Mutex
	held     map[string]*Message // by queue id
	released map[string]bool     // released, maybe still in Postfix's queue
	missing  map[string]bool     // held ids one listing did not show
}

// Errors of Release and Cancel.
var (
	// ErrNotHeld: no message with that queue id is held.
	ErrNotHeld = errors.New("no such message in the outbound delay window")
	// ErrGone: the message had already left Postfix's queue.
	ErrGone = errors.New("the message had already left Postfix's queue")
)

// New reads the window's state back from the log.
func New(ctx context.Context, l *undolog.Log, o Options) (*Queue, error) {
	if o.Poll <= 0 {
		o.Poll = DefaultPoll
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	q := &Queue{o: o, log: l, held: map[string]*Message{}, released: map[string]bool{}, missing: map[string]bool{}}
	ms, released, err := readLog(ctx, l)
	if err != nil {
		return nil, err
	}
	for _, m := range ms {
		q.held[m.QueueID] = &m
	}
	// The first Sync forgets those no longer in Postfix's queue.
	q.released = released
	return q, nil
}

// Waiting reads from the log the messages the window holds: held and
// neither released nor cancelled since. It is what `cycle plan` reads.
func Waiting(ctx context.Context, l *undolog.Log) ([]Message, error) {
	ms, _, err := readLog(ctx, l)
	return ms, err
}

// readLog reads the window's records: the messages still held, and the
// queue ids of those released.
func readLog(ctx context.Context, l *undolog.Log) ([]Message, map[string]bool, error) {
	recs, err := l.Records(ctx, undolog.Filter{Kinds: []string{verb.KindOutboundHeld, verb.KindOutboundReleased, verb.KindOutboundCancelled}})
	if err != nil {
		return nil, nil, fmt.Errorf("outbound delay window: read the log: %w", err)
	}
	byRef := map[int64]Message{}
	released := map[string]bool{}
	for _, r := range recs {
		switch r.Kind {
		case verb.KindOutboundHeld:
			m := Message{Seq: r.Seq}
			if json.Unmarshal(r.Args, &m.OutboundHeld) != nil || m.QueueID == "" {
				continue
			}
			byRef[r.Seq] = m
		case verb.KindOutboundReleased:
			if m, ok := byRef[r.Ref]; ok {
				released[m.QueueID] = true
			}
			delete(byRef, r.Ref)
		default:
			delete(byRef, r.Ref)
		}
	}
	out := make([]Message, 0, len(byRef))
	for _, m := range byRef {
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Seq < out[j].Seq })
	return out, released, nil
}

// Run watches Postfix's queue until ctx ends.
func (q *Queue) Run(ctx context.Context) {
	t := time.NewTicker(q.o.Poll)
	defer t.Stop()
	// The same failure (Postfix stopped, say) is logged once a minute,
	// not at every reading.
	var last string
	var lastAt time.Time
	for {
		if err := q.Sync(ctx); err != nil && ctx.Err() == nil {
			if err.Error() != last || time.Since(lastAt) >= time.Minute {
				q.o.Logger.Error("outbound delay window", "err", err)
				last, lastAt = err.Error(), time.Now()
			}
		} else {
			last = ""
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Sync reads Postfix's queue once: it logs the messages the window newly
// holds and the ones that left without undomail, and releases those
// whose time is up unless a repair holds changes back.
func (q *Queue) Sync(ctx context.Context) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	entries, err := q.o.Postfix.Queue(ctx)
	if err != nil {
		return err
	}
	inQueue := map[string]bool{}
	var errs []error
	for _, e := range entries {
		inQueue[e.ID] = true
		rcpts := e.Held()
		if len(rcpts) == 0 || q.held[e.ID] != nil {
			continue
		}
		if q.released[e.ID] {
			// Released before and deferred by defer_transports again: its
			// window is over, so it is released once more. This happens
			// when Postfix retried it after a failed attempt (its own
			// backoff spaced the retry), or when the release found the
			// message in the active queue, where postqueue -i does
			// nothing (flush(8) moves only deferred files).
			if err := q.o.Postfix.Release(ctx, e.ID); err != nil {
				errs = append(errs, err)
			}
			continue
		}
		if err := q.hold(ctx, e, rcpts); err != nil {
			errs = append(errs, err)
		}
	}
	for id := range q.released {
		if !inQueue[id] {
			delete(q.released, id)
		}
	}
	for id, m := range q.held {
		if inQueue[id] {
			delete(q.missing, id)
			continue
		}
		// showq reads Postfix's queue directories one after another: a
		// message that moved between two of them can be missing from one
		// listing. Two in a row mean it may have left; Postfix says
		// whether it did. qmgr tries a deferred message again every time
		// its backoff is over, as often as every second
		// (minimal_backoff_time), so with a listing every second the
		// moves can fall between directories at several listings in a row.
		if !q.missing[id] {
			q.missing[id] = true
			continue
		}
		in, err := q.o.Postfix.InQueue(ctx, id)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if in {
			q.o.Logger.Debug("outbound delay window: missing from two listings, still in Postfix's queue", "queue_id", id)
			continue
		}
		delete(q.missing, id)
		if err := q.end(ctx, m, verb.KindOutboundReleased, verb.OutboundEnd{QueueID: id, By: verb.OutboundByPostfix}); err != nil {
			errs = append(errs, err)
		}
	}
	if q.o.Paused != nil && q.o.Paused() {
		return errors.Join(errs...)
	}
	now := time.Now()
	for _, m := range q.sorted() {
		if now.Before(m.ReleaseAt) {
			continue
		}
		if err := q.release(ctx, m, verb.OutboundByWindow, ""); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// hold logs a message the window newly holds.
func (q *Queue) hold(ctx context.Context, e Entry, rcpts []string) error {
	h, err := q.o.Postfix.Header(ctx, e.ID)
	if err != nil {
		return err
	}
	arrived := time.Unix(e.ArrivalTime, 0).UTC()
	m := &Message{OutboundHeld: verb.OutboundHeld{QueueID: e.ID, UndoID: h.UndoID, Sender: e.Sender, Rcpts: rcpts,
		Subject: h.Subject, MessageID: h.MessageID, Arrived: arrived, ReleaseAt: arrived.Add(q.o.Delay)}}
	rec := &undolog.Record{Kind: verb.KindOutboundHeld, Session: "outbound"}
	if h.UndoID != "" {
		subs, err := q.log.Verbs(ctx, undolog.Filter{UndoID: h.UndoID, Kinds: []string{verb.KindSMTPSubmit}})
		if err != nil {
			return fmt.Errorf("outbound delay window: find the submission of %s (undo id %s): %w", e.ID, h.UndoID, err)
		}
		if len(subs) > 0 {
			m.Submission, rec.User = subs[0].Seq, subs[0].User
		}
	}
	rec.Args, _ = json.Marshal(m.OutboundHeld)
	if err := q.log.Append(ctx, rec); err != nil {
		return fmt.Errorf("outbound delay window: log held message %s: %w", e.ID, err)
	}
	m.Seq = rec.Seq
	q.held[e.ID] = m
	q.o.Logger.Info("outbound delay window: holding", "queue_id", e.ID, "undo_id", h.UndoID, "submission", m.Submission,
		"rcpts", rcpts, "release_at", m.ReleaseAt)
	return nil
}

// end logs how a held message's wait ended and forgets it.
func (q *Queue) end(ctx context.Context, m *Message, kind string, e verb.OutboundEnd) error {
	args, _ := json.Marshal(e)
	rec := &undolog.Record{Kind: kind, Session: "outbound", Ref: m.Seq, Args: args}
	if err := q.log.Append(ctx, rec); err != nil {
		return fmt.Errorf("outbound delay window: log %s of %s: %w", kind, m.QueueID, err)
	}
	delete(q.held, m.QueueID)
	q.o.Logger.Info("outbound delay window: "+kind, "queue_id", m.QueueID, "by", e.By, "cycle", e.Cycle)
	return nil
}

// release hands a held message back to Postfix and logs it. The record
// is written after Postfix was asked: a crash in between leaves it held
// in the log, and the next Sync finds it released (gone, or released
// again).
func (q *Queue) release(ctx context.Context, m *Message, by, reason string) error {
	if err := q.o.Postfix.Release(ctx, m.QueueID); err != nil {
		return err
	}
	q.released[m.QueueID] = true
	return q.end(ctx, m, verb.KindOutboundReleased, verb.OutboundEnd{QueueID: m.QueueID, By: by, Reason: reason})
}

// deleteTries is how many times cancel asks postsuper to delete a
// message that it did not find but that is still in Postfix's queue.
const deleteTries = 3

// cancel deletes a held message from Postfix's queue and logs it.
// postsuper -d looks through Postfix's queue directories one after
// another, so it can miss a message that qmgr moves from one to another
// meanwhile (a deferred message tried again): when it found nothing,
// Postfix is asked whether the message is still queued, and postsuper
// tries again if so. Only a message no longer queued has left.
func (q *Queue) cancel(ctx context.Context, m *Message, e verb.OutboundEnd) error {
	var deleted bool
	for try := 1; ; try++ {
		var err error
		if deleted, err = q.o.Postfix.Delete(ctx, m.QueueID); err != nil {
			return err
		}
		if deleted {
			break
		}
		in, err := q.o.Postfix.InQueue(ctx, m.QueueID)
		if err != nil {
			return fmt.Errorf("cancel %s: postsuper did not find it: %w", m.QueueID, err)
		}
		if !in {
			break
		}
		if try == deleteTries {
			return fmt.Errorf("cancel %s: postsuper did not find it %d times, but it is still in Postfix's queue", m.QueueID, deleteTries)
		}
	}
	if !deleted {
		if err := q.end(ctx, m, verb.KindOutboundReleased, verb.OutboundEnd{QueueID: m.QueueID, By: verb.OutboundByPostfix}); err != nil {
			return err
		}
		return fmt.Errorf("cancel %s: %w", m.QueueID, ErrGone)
	}
	return q.end(ctx, m, verb.KindOutboundCancelled, e)
}

func (q *Queue) sorted() []*Message {
	out := make([]*Message, 0, len(q.held))
	for _, m := range q.held {
		out = append(out, m)
	}
	slices.SortFunc(out, func(a, b *Message) int { return int(a.Seq - b.Seq) })
	return out
}

// List returns the messages the window holds, oldest first.
func (q *Queue) List() []Message {
	q.mu.Lock()
	defer q.mu.Unlock()
	var out []Message
	for _, m := range q.sorted() {
		out = append(out, *m)
	}
	return out
}

// Release lets a held message leave now: the operator's decision.
func (q *Queue) Release(ctx context.Context, queueID, reason string) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	m := q.held[queueID]
	if m == nil {
		return fmt.Errorf("release %s: %w", queueID, ErrNotHeld)
	}
	return q.release(ctx, m, verb.OutboundByOperator, reason)
}

// Cancel removes a held message from Postfix's queue: it never leaves.
func (q *Queue) Cancel(ctx context.Context, queueID, reason string) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	m := q.held[queueID]
	if m == nil {
		return fmt.Errorf("cancel %s: %w", queueID, ErrNotHeld)
	}
	return q.cancel(ctx, m, verb.OutboundEnd{QueueID: queueID, By: verb.OutboundByOperator, Reason: reason})
}

// CancelSubmissions cancels the held messages that the given front-door
// submissions sent: a cycle (its record's seq) whose repair cancels
// them. It returns the messages it cancelled; one that had left already
// is an error.
func (q *Queue) CancelSubmissions(ctx context.Context, cycle int64, submissions map[int64]bool, reason string) ([]Message, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	var out []Message
	var errs []error
	for _, m := range q.sorted() {
		if m.Submission == 0 || !submissions[m.Submission] {
			continue
		}
		if err := q.cancel(ctx, m, verb.OutboundEnd{QueueID: m.QueueID, By: verb.OutboundByCycle, Cycle: cycle, Reason: reason}); err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, *m)
	}
	return out, errors.Join(errs...)
}
