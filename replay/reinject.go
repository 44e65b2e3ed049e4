package replay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/internal/smtpclient"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// DefaultReinjectTimeout bounds how long a replay waits for Postfix to
// deliver a re-injected message to the capture.
const DefaultReinjectTimeout = 2 * time.Minute

// Capture is the LMTP capture's side of a re-injection: while a replay
// waits for a message it handed to Postfix again, the deliveries Postfix
// makes of it (the capture links them to the front door's undo id) are
// taken here instead of being logged as new deliveries and forwarded.
// The replay then delivers them itself, in the order of the log. Set
// Collect as the SMTP front end's SMTPConfig.Collect of the LMTP listener.
type Capture struct {
	mu   sync.Mutex
	want map[string]*catch
	// late are messages a replay stopped waiting for and replayed as
	// recorded instead: a delivery Postfix makes of one later is taken
	// and dropped, or the message would be delivered twice.
	late map[string]bool
}

// catch collects the deliveries of one re-injected message.
type catch struct {
	got     []captured
	arrived chan struct{} // closed at the first delivery
}

type captured struct {
	args verb.DeliveryArgs
	blob undolog.BlobRef
}

func (c *Capture) expect(id string) *catch {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.want == nil {
		c.want = map[string]*catch{}
	}
	k := &catch{arrived: make(chan struct{})}
	c.want[id] = k
	return k
}

func (c *Capture) forget(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.want, id)
}

// giveUp forgets a message whose re-injection failed and drops what
// Postfix may still deliver of it.
func (c *Capture) giveUp(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.want, id)
	if c.late == nil {
		c.late = map[string]bool{}
	}
	c.late[id] = true
}

// take returns what has arrived for a message so far.
func (c *Capture) take(k *catch) []captured {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]captured(nil), k.got...)
}

// Collect takes a delivery of a message a replay is waiting for and
// accepts it for every recipient; nil for any other delivery.
func (c *Capture) Collect(_ context.Context, args verb.DeliveryArgs, blob undolog.BlobRef) *verb.DeliveryOutcome {
	c.mu.Lock()
	defer c.mu.Unlock()
	text := "taken by undomail's replay"
	if k := c.want[args.UndoID]; k != nil {
		k.got = append(k.got, captured{args: args, blob: blob})
		if len(k.got) == 1 {
			close(k.arrived)
		}
	} else if c.late[args.UndoID] {
		text = "dropped: undomail's replay gave up waiting for it and replayed its recorded deliveries"
	} else {
		return nil
	}
	out := &verb.DeliveryOutcome{}
	for _, rc := range args.Rcpts {
		out.Rcpts = append(out.Rcpts, verb.RcptReply{Rcpt: rc, Reply: verb.Reply{Code: 250, Enhanced: "2.0.0", Text: text}})
	}
	return out
}

// reinjection is what handing the front door's mail to Postfix again
// decided: for each delivery verb it replaced, the tasks that take its
// place (the deliveries Postfix makes now, and the recipients it no
// longer delivers to, with a fixed outcome).
type reinjection struct {
	replace map[int64][]task
	// failed are re-injections that did not complete; their deliveries
	// replay as they were recorded.
	failed []string
	count  int // messages Postfix took again
}

// frontDoor is a submission to re-inject with the deliveries the first
// run made of it.
type frontDoor struct {
	sub   undolog.Verb
	args  verb.DeliveryArgs
	first []undolog.Verb // its lmtp.deliver verbs, in log order
	// refused: Postfix refused it permanently (5xx) the first time, and
	// its sender was told so (reply). The repaired Postfix may accept it
	// now.
	refused bool
	reply   string
}

// reinjectAll hands every front-door submission of the replayed period
// whose local deliveries the replay would redo to Postfix's replay
// service again and collects what Postfix delivers now. Submissions it
// cannot re-inject (cancelled, replayed for some users only, no
// re-injection configured) keep their recorded deliveries.
func reinjectAll(ctx context.Context, l *undolog.Log, p Plan, t Target, verbs []undolog.Verb, earlier decisions) (reinjection, error) {
	rj := reinjection{replace: map[int64][]task{}}
	if t.ReinjectAddr == "" || t.Capture == nil || p.NoRecord || len(p.Users) > 0 {
		return rj, nil
	}
	cancelled := func(seq int64) bool { return p.Cancel[seq] || earlier.cancelled[seq] != 0 }
	subs, order := frontDoors(verbs)
	timeout := t.ReinjectTimeout
	if timeout <= 0 {
		timeout = DefaultReinjectTimeout
	}
	// Re-injections are pipelined: up to reinjectWindow messages are with
	// Postfix at once, and each is settled, in log order, when the capture
	// has it.
	var pending []inflight
	defer func() {
		for _, in := range pending {
			t.Capture.forget(in.fd.args.UndoID)
		}
	}()
	settle := func(in inflight) error {
		fd, seq := in.fd, in.fd.sub.Seq
		defer t.Capture.forget(fd.args.UndoID)
		var got []captured
		err := in.err
		if err == nil && in.wait {
			got, err = waitCapture(ctx, t.Capture, in.k, in.sent.Add(timeout), timeout)
		}
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("replay: %w", ctx.Err())
			}
			msg := fmt.Sprintf("re-inject front-door message %d (undo id %s, Message-Id %s, %q) through Postfix at %s: %v",
				seq, fd.args.UndoID, fd.args.Header.MessageID, fd.args.Header.Subject, t.ReinjectAddr, err)
			t.Logger.Warn("replay: re-injection failed; its deliveries replay as recorded", "seq", seq, "undo_id", fd.args.UndoID, "err", err)
			if in.wait {
				t.Capture.giveUp(fd.args.UndoID)
			}
			rj.failed = append(rj.failed, msg)
			b, _ := json.Marshal(verb.ReplayOutcome{Status: verb.ReplayFailed, Detail: msg})
			if err := l.AppendNoSync(ctx, &undolog.Record{Kind: verb.KindReplay, Session: "replay", Ref: seq, Outcome: b}); err != nil {
				return fmt.Errorf("replay: record the re-injection of %d: %w", seq, err)
			}
			return nil
		}
		rj.count++
		tasks, err := rj.plan(ctx, l, fd, got, in.refused)
		if err != nil {
			return err
		}
		for s, ts := range tasks {
			rj.replace[s] = ts
		}
		return nil
	}
	for _, seq := range order {
		fd := subs[seq]
		if !fd.reinjectable(cancelled) {
			continue
		}
		k := t.Capture.expect(fd.args.UndoID)
		in := inflight{fd: fd, k: k, sent: time.Now()}
		in.refused, in.wait, in.err = reinject(ctx, l, t, fd, timeout)
		pending = append(pending, in)
		if len(pending) >= reinjectWindow {
			err := settle(pending[0])
			pending = pending[1:]
			if err != nil {
				return rj, err
			}
		}
	}
	for _, in := range pending {
		if err := settle(in); err != nil {
			return rj, err
		}
	}
	return rj, nil
}

// frontDoors finds the front door's submissions among verbs, by seq and
// in log order, with the local deliveries the first run made of each.
func frontDoors(verbs []undolog.Verb) (map[int64]*frontDoor, []int64) {
	subs := map[int64]*frontDoor{}
	var order []int64
	for _, v := range verbs {
		switch v.Kind {
		case verb.KindSMTPSubmit:
			var a verb.DeliveryArgs
			var o verb.DeliveryOutcome
			if v.Blob == "" || v.Outcome == nil || json.Unmarshal(v.Args, &a) != nil ||
				json.Unmarshal(v.Outcome.Outcome, &o) != nil || o.Reply == nil || len(a.Rcpts) == 0 {
				continue
			}
			// A 4xx the sender retries: the retry is a submission of its
			// own. Only a final answer decided the message's fate.
			if !o.Reply.Positive() && o.Reply.Code < 500 {
				continue
			}
			fd := &frontDoor{sub: v, args: a, refused: !o.Reply.Positive()}
			if fd.refused {
				fd.reply = o.Reply.String()
			}
			subs[v.Seq] = fd
			order = append(order, v.Seq)
		case verb.KindLMTPDeliver:
			var a verb.DeliveryArgs
			if json.Unmarshal(v.Args, &a) != nil || a.Submission == 0 || subs[a.Submission] == nil {
				continue
			}
			if ts, skip := split(v); skip || len(ts) == 0 {
				continue
			}
			subs[a.Submission].first = append(subs[a.Submission].first, v)
		}
	}
	return subs, order
}

// reinjectable reports whether a replay hands the submission to Postfix
// again: neither it nor one of its deliveries is cancelled (the
// operator's decision stands). That includes mail the first run relayed
// off the machine only (relayed): the replay service refuses recipients
// outside, so it does not leave again, but a local recipient the mistake
// had aliased outside gets it now.
func (fd *frontDoor) reinjectable(cancelled func(int64) bool) bool {
	if cancelled(fd.sub.Seq) {
		return false
	}
	return !slices.ContainsFunc(fd.first, func(v undolog.Verb) bool { return cancelled(v.Seq) })
}

// relayed reports that the first run delivered the message nowhere here:
// Postfix accepted it and sent it off the machine.
func (fd *frontDoor) relayed() bool { return len(fd.first) == 0 && !fd.refused }

// Route is where a front-door message went: the first time, and after a
// replay through Postfix (cycle plan and verdict, issue 15).
type Route struct {
	Submission  int64    `json:"submission"`
	UndoID      string   `json:"undo_id"`
	MessageID   string   `json:"message_id,omitempty"`
	Subject     string   `json:"subject,omitempty"`
	AddressedTo []string `json:"addressed_to"`
	// First are the mailboxes the first run delivered it to; Refused the
	// reply its sender got when Postfix refused it.
	First   []string `json:"first,omitempty"`
	Refused string   `json:"refused,omitempty"`
	// Relayed: the first run delivered it nowhere here (it left).
	Relayed bool `json:"relayed,omitempty"`
	// Held are the users whose delivery the replay held (outside).
	Held []string `json:"held,omitempty"`
	// Now is where the repaired Postfix delivered it, NowStatus
	// verb.ReplayReinjected, ReplayRefused or ReplayFailed (Failed says why); empty
	// before a replay.
	Now       []string          `json:"now,omitempty"`
	NowStatus verb.ReplayStatus `json:"now_status,omitempty"`
	Failed    string            `json:"failed,omitempty"`
}

// Routes lists the front-door messages with after < seq (and seq < before
// if before > 0) that a replay through Postfix hands to it again, minus
// cancel, with where each went the first time. With before > 0 it adds
// where the replay that followed before (a cycle's record) delivered them.
func Routes(ctx context.Context, l *undolog.Log, after, before int64, cancel map[int64]bool) ([]Route, error) {
	verbs, err := l.Verbs(ctx, undolog.Filter{AfterSeq: after})
	if err != nil {
		return nil, fmt.Errorf("routes: read the log: %w", err)
	}
	if before > 0 {
		n := sort.Search(len(verbs), func(i int) bool { return verbs[i].Seq >= before })
		verbs = verbs[:n]
	}
	subs, order := frontDoors(verbs)
	var out []Route
	index := map[int64]int{}
	for _, seq := range order {
		fd := subs[seq]
		if !fd.reinjectable(func(s int64) bool { return cancel[s] }) || (fd.relayed() && before <= 0) {
			continue // relayed mail is listed only where the replay delivered or held it
		}
		r := Route{Submission: seq, UndoID: fd.args.UndoID, MessageID: fd.args.Header.MessageID, Subject: fd.args.Header.Subject,
			AddressedTo: fd.args.Rcpts, Refused: fd.reply, Relayed: fd.relayed()}
		for _, d := range fd.first {
			ts, _ := split(d)
			for _, tk := range ts {
				r.First = append(r.First, tk.rcpt)
			}
		}
		index[seq] = len(out)
		out = append(out, r)
	}
	if before <= 0 || len(out) == 0 {
		return out, nil
	}
	recs, err := l.Records(ctx, undolog.Filter{AfterSeq: before, Kinds: []string{verb.KindReplay}})
	if err != nil {
		return nil, fmt.Errorf("routes: read the replay records: %w", err)
	}
	for _, rec := range recs {
		i, ok := index[rec.Ref]
		if !ok || rec.User != "" {
			continue
		}
		var o verb.ReplayOutcome
		if json.Unmarshal(rec.Outcome, &o) != nil {
			continue
		}
		switch o.Status {
		case verb.ReplayReinjected:
			var a verb.DeliveryArgs
			if json.Unmarshal(rec.Args, &a) == nil {
				out[i].Now = append(out[i].Now, a.Rcpts...)
			}
			out[i].NowStatus = o.Status
		case verb.ReplayFailed, verb.ReplayRefused:
			out[i].NowStatus, out[i].Failed = o.Status, o.Detail
		}
	}
	// What happened to relayed mail shows in its recipients' replay
	// records (delivered here now, or held).
	now := map[int64][]string{}
	for _, rec := range recs {
		var o verb.ReplayOutcome
		if _, ok := index[rec.Ref]; !ok || rec.User == "" || json.Unmarshal(rec.Outcome, &o) != nil {
			continue
		}
		if o.Status == verb.ReplayHeld {
			now[rec.Ref] = append(now[rec.Ref], rec.User+" (held, not sent)")
		}
	}
	keep := out[:0]
	for _, r := range out {
		if held := now[r.Submission]; len(held) > 0 {
			r.Held = held
		}
		if r.Relayed && len(r.Now) == 0 && len(r.Held) == 0 {
			continue
		}
		keep = append(keep, r)
	}
	return keep, nil
}

// reinjectWindow bounds how many re-injected messages are with Postfix at
// once, not yet found at the capture.
const reinjectWindow = 32

// inflight is a re-injection whose deliveries are awaited.
type inflight struct {
	fd      *frontDoor
	k       *catch
	sent    time.Time
	refused string // Postfix refused it outright
	wait    bool   // Postfix accepted it: wait for the capture
	err     error
}

// reinject hands one submission to Postfix's replay service as its client
// handed it to the front door (XCLIENT, envelope, message with the front
// door's Undomail-Id). wait reports that Postfix accepted it, so its
// deliveries are to come to the capture; refused is Postfix's reply when
// it refused the message outright (no recipient accepted, or refused at
// the end of DATA).
func reinject(ctx context.Context, l *undolog.Log, t Target, fd *frontDoor, timeout time.Duration) (refused string, wait bool, err error) {
	a := fd.args
	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := smtpclient.DialAs(dctx, t.ReinjectAddr, a.Client, a.Helo, "undomail-replay", timeout)
	if err != nil {
		return "", false, err
	}
	defer c.Close()
	opts := &smtp.MailOptions{Body: smtp.BodyType(a.Body), UTF8: a.SMTPUTF8}
	if err := c.Mail(a.MailFrom, opts); err != nil {
		return "", false, fmt.Errorf("MAIL FROM:<%s>: %w", a.MailFrom, err)
	}
	var said []string
	accepted := 0
	for _, rc := range a.Rcpts {
		if err := c.Rcpt(rc, nil); err != nil {
			var se *smtp.SMTPError
			if errors.As(err, &se) {
				said = append(said, fmt.Sprintf("<%s> %d %s", rc, se.Code, se.Message))
				continue
			}
			return "", false, fmt.Errorf("RCPT TO:<%s>: %w", rc, err)
		}
		accepted++
	}
	if accepted == 0 {
		c.Reset()
		c.Quit()
		return strings.Join(said, "; "), false, nil
	}
	w, err := c.Data()
	if err != nil {
		return "", false, fmt.Errorf("DATA: %w", err)
	}
	body, err := l.OpenBlob(fd.sub.Blob)
	if err != nil {
		return "", false, fmt.Errorf("open the front door's message blob: %w", err)
	}
	defer body.Close()
	// The front door's id, as the front door stamped it when it forwarded
	// the message the first time (verb.TraceHeader): the capture links
	// Postfix's deliveries to it.
	if _, err := fmt.Fprintf(w, "%s: %s\r\n", verb.TraceHeader, a.UndoID); err != nil {
		return "", false, fmt.Errorf("send message: %w", err)
	}
	if _, err := io.Copy(w, body); err != nil {
		return "", false, fmt.Errorf("send message: %w", err)
	}
	if err := w.Close(); err != nil {
		var se *smtp.SMTPError
		if errors.As(err, &se) && se.Code >= 500 {
			return fmt.Sprintf("%d %s", se.Code, se.Message), false, nil
		}
		return "", false, fmt.Errorf("end of DATA: %w", err)
	}
	c.Quit()
	return "", true, nil
}

// waitCapture waits until the capture has a delivery of a re-injected
// message, at most until deadline, and returns what it has then.
func waitCapture(ctx context.Context, c *Capture, k *catch, deadline time.Time, timeout time.Duration) ([]captured, error) {
	wctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	select {
	case <-k.arrived:
	case <-wctx.Done():
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("accepted by Postfix, but nothing delivered to the capture within %s "+
			"(is the replay service's content_filter the capture's address? see docs/operations.md)", timeout)
	}
	return c.take(k), nil
}

// plan turns what Postfix delivered now into the tasks that replace the
// first run's deliveries of the message, and records the re-injection.
// A recipient that had the message and still gets it gets the new
// delivery in place of the old one; one that had it and does not get it
// now loses it (rerouted, or refused if Postfix delivers it nowhere
// here); one that gets it only now gets it where the first delivery was
// in the log.
func (rj *reinjection) plan(ctx context.Context, l *undolog.Log, fd *frontDoor, got []captured, refused string) (map[int64][]task, error) {
	type newRcpt struct {
		rcpt string
		verb undolog.Verb // the delivery to make: the capture's args and blob
	}
	byAddr := map[string]*newRcpt{}
	var addrs []string
	for _, g := range got {
		rec := &undolog.Record{Kind: verb.KindReplay, Session: "replay", Ref: fd.sub.Seq}
		for _, rc := range g.args.Rcpts {
			rec.Users = append(rec.Users, UserOf(rc))
		}
		rec.Args, _ = json.Marshal(g.args)
		rec.Outcome, _ = json.Marshal(verb.ReplayOutcome{Status: verb.ReplayReinjected,
			Detail: "the repaired Postfix delivered it to " + strings.Join(angle(g.args.Rcpts), ", ")})
		rec.AttachBlob(g.blob)
		if err := l.AppendNoSync(ctx, rec); err != nil {
			return nil, fmt.Errorf("replay: record the re-injection of %d: %w", fd.sub.Seq, err)
		}
		for _, rc := range g.args.Rcpts {
			key := strings.ToLower(rc)
			if byAddr[key] != nil {
				continue
			}
			a := g.args
			a.Rcpts = []string{rc}
			v := undolog.Verb{Record: *rec}
			v.Kind = verb.KindLMTPDeliver
			v.Args, _ = json.Marshal(a)
			byAddr[key] = &newRcpt{rcpt: rc, verb: v}
			addrs = append(addrs, rc)
		}
	}
	if len(got) == 0 && !fd.relayed() { // relayed mail refused again: it went out, and stays out
		b, _ := json.Marshal(verb.ReplayOutcome{Status: verb.ReplayRefused, Detail: "the repaired mail system refused it: " + refused})
		if err := l.AppendNoSync(ctx, &undolog.Record{Kind: verb.KindReplay, Session: "replay", Ref: fd.sub.Seq, Outcome: b}); err != nil {
			return nil, fmt.Errorf("replay: record the re-injection of %d: %w", fd.sub.Seq, err)
		}
	}
	sort.Strings(addrs)
	now := "the repaired mail system delivered it to " + strings.Join(angle(addrs), ", ") + " instead"
	lost := verb.ReplayOutcome{Status: verb.ReplayRerouted, Detail: now}
	if len(addrs) == 0 {
		lost = verb.ReplayOutcome{Status: verb.ReplayRefused, Detail: "the repaired mail system refused it: " + refused}
	}
	out := map[int64][]task{}
	used := map[string]bool{}
	for _, d := range fd.first {
		ts, _ := split(d)
		repl := []task{}
		for _, tk := range ts {
			key := strings.ToLower(tk.rcpt)
			if n := byAddr[key]; n != nil && !used[key] {
				used[key] = true
				v := n.verb
				v.Seq = d.Seq // replayed in place of this delivery
				repl = append(repl, task{v: v, rcpt: n.rcpt})
				continue
			}
			fixed := lost
			repl = append(repl, task{v: d, rcpt: tk.rcpt, fixed: &fixed})
		}
		out[d.Seq] = repl
	}
	// Recipients only the repaired Postfix delivers to: in the place of
	// the first delivery (of the submission, if Postfix refused it the
	// first time), recorded against the submission.
	first := fd.sub.Seq
	if len(fd.first) > 0 {
		first = fd.first[0].Seq
	}
	for _, rc := range addrs {
		key := strings.ToLower(rc)
		if used[key] {
			continue
		}
		v := byAddr[key].verb
		v.Seq = fd.sub.Seq
		out[first] = append(out[first], task{v: v, rcpt: rc, outside: true})
	}
	return out, nil
}

// heldOutside asks Dovecot's LMTP whether a destination only the
// repaired Postfix delivers to is a mailbox here (RCPT, then RSET). One
// that is not would leave the machine, which a replay never does: it is
// held for the operator. A zero outcome means deliver it.
func heldOutside(ctx context.Context, t Target, tk task) (verb.ReplayOutcome, error) {
	var a verb.DeliveryArgs
	if err := json.Unmarshal(tk.v.Args, &a); err != nil {
		return verb.ReplayOutcome{}, fmt.Errorf("delivery args: %w", err)
	}
	conn, err := (&net.Dialer{Timeout: 30 * time.Second}).DialContext(ctx, "tcp", t.LMTPAddr)
	if err != nil {
		return verb.ReplayOutcome{}, err
	}
	c := smtp.NewClientLMTP(conn)
	defer c.Close()
	if err := c.Hello("undomail-replay"); err != nil {
		return verb.ReplayOutcome{}, err
	}
	if err := c.Mail(a.MailFrom, nil); err != nil {
		return verb.ReplayOutcome{}, err
	}
	err = c.Rcpt(tk.rcpt, nil)
	var se *smtp.SMTPError
	switch {
	case err == nil:
		c.Reset()
		c.Quit()
		return verb.ReplayOutcome{}, nil
	case errors.As(err, &se) && se.Code >= 500:
		c.Quit()
		return verb.ReplayOutcome{Status: verb.ReplayHeld, Detail: fmt.Sprintf("the repaired mail system delivers it to <%s>, which is no mailbox here "+
			"(%d %s): held for the operator, not sent", tk.rcpt, se.Code, se.Message)}, nil
	}
	return verb.ReplayOutcome{}, fmt.Errorf("RCPT %s: %w", tk.rcpt, err)
}

func angle(addrs []string) []string {
	out := make([]string, len(addrs))
	for i, a := range addrs {
		out[i] = "<" + a + ">"
	}
	return out
}
