package compensate

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// Audiences of a compensating message.
const (
	AudienceUser     = "user"     // a user's digest
	AudienceOperator = "operator" // the operator notice
)

// Args are the arguments of a compensation verb (kind
// verb.KindCompensation). They are a delivery's arguments, so replay
// re-delivers the message (the record's blob) like a captured delivery,
// plus what the message compensated: a later cycle that finds the same
// paradoxes (by Paradox.Key) leaves them alone.
type Args struct {
	verb.DeliveryArgs
	Cycle     int64     `json:"cycle"`    // seq of the cycle that created the paradoxes
	Audience  string    `json:"audience"` // AudienceUser or AudienceOperator
	User      string    `json:"user"`     // whose digest; the operator's mailbox for a notice
	Paradoxes []Paradox `json:"paradoxes"`
}

// Compensation is a logged compensation verb with its outcome.
type Compensation struct {
	Seq  int64
	Time time.Time
	Args Args
	// Outcome is what Dovecot's LMTP answered; nil if the delivery was
	// cut off before it was logged.
	Outcome *verb.DeliveryOutcome
}

// Delivered reports whether every recipient accepted the message.
func (c Compensation) Delivered() bool {
	if c.Outcome == nil || len(c.Outcome.Rcpts) == 0 {
		return false
	}
	for _, r := range c.Outcome.Rcpts {
		if !r.Reply.Positive() {
			return false
		}
	}
	return true
}

// List returns the compensation verbs in the log, oldest first, matching
// f (Kinds is set by List).
func List(ctx context.Context, l *undolog.Log, f undolog.Filter) ([]Compensation, error) {
	f.Kinds = []string{verb.KindCompensation}
	verbs, err := l.Verbs(ctx, f)
	if err != nil {
		return nil, fmt.Errorf("list compensations: %w", err)
	}
	out := make([]Compensation, 0, len(verbs))
	for _, v := range verbs {
		c := Compensation{Seq: v.Seq, Time: v.Time}
		if err := json.Unmarshal(v.Args, &c.Args); err != nil {
			return nil, fmt.Errorf("list compensations: record %d: %w", v.Seq, err)
		}
		if v.Outcome != nil {
			var o verb.DeliveryOutcome
			if err := json.Unmarshal(v.Outcome.Outcome, &o); err != nil {
				return nil, fmt.Errorf("list compensations: outcome of record %d: %w", v.Seq, err)
			}
			c.Outcome = &o
		}
		out = append(out, c)
	}
	return out, nil
}

// done are the paradoxes earlier compensations took care of, by audience
// and Paradox.Key. Only delivered messages count: a digest that did not
// arrive explained nothing, and the next cycle tries again.
type done map[string]map[string]bool

func compensated(cs []Compensation) done {
	d := done{AudienceUser: {}, AudienceOperator: {}}
	for _, c := range cs {
		if !c.Delivered() || d[c.Args.Audience] == nil {
			continue
		}
		for _, p := range c.Args.Paradoxes {
			d[c.Args.Audience][p.Key()] = true
		}
	}
	return d
}

// send logs a compensating message as a verb of its own and delivers it
// to Dovecot's LMTP, write-ahead like the LMTP capture: blob and intent
// are durable before the message is handed over, and the outcome is
// logged after. The message is delivered with an Undomail-Id trace field
// naming a fresh undo id, as replay will re-deliver it.
func send(ctx context.Context, l *undolog.Log, lmtpAddr, hostname string, a Args, msg []byte) (int64, verb.DeliveryOutcome, error) {
	w, err := l.NewBlob()
	if err != nil {
		return 0, verb.DeliveryOutcome{}, fmt.Errorf("store the message: %w", err)
	}
	if _, err := w.Write(msg); err != nil {
		w.Abort()
		return 0, verb.DeliveryOutcome{}, fmt.Errorf("store the message: %w", err)
	}
	ref, err := w.Commit()
	if err != nil {
		return 0, verb.DeliveryOutcome{}, fmt.Errorf("store the message: %w", err)
	}
	a.Size = ref.Size
	args, err := json.Marshal(a)
	if err != nil {
		return 0, verb.DeliveryOutcome{}, fmt.Errorf("encode the compensation: %w", err)
	}
	users := []string{a.User}
	for _, r := range a.Rcpts {
		if r != a.User {
			users = append(users, r)
		}
	}
	intent := &undolog.Record{User: a.User, Session: "compensation", Kind: verb.KindCompensation, Ref: a.Cycle,
		Users: users, Args: args}
	intent.AttachBlob(ref)
	if err := l.Append(ctx, intent); err != nil {
		return 0, verb.DeliveryOutcome{}, fmt.Errorf("log the compensation: %w", err)
	}
	out, derr := deliver(ctx, lmtpAddr, hostname, a, msg)
	b, _ := json.Marshal(out)
	if err := l.Append(ctx, &undolog.Record{User: a.User, Session: "compensation", Kind: undolog.KindOutcome,
		Ref: intent.Seq, Users: users, Outcome: b}); err != nil {
		return intent.Seq, out, errors.Join(derr, fmt.Errorf("log the outcome of compensation %d: %w", intent.Seq, err))
	}
	if derr == nil {
		for _, r := range out.Rcpts {
			if !r.Reply.Positive() {
				derr = fmt.Errorf("LMTP %s refused <%s>: %s", lmtpAddr, r.Rcpt, r.Reply)
			}
		}
	}
	return intent.Seq, out, derr
}

// deliver hands the message to Dovecot's LMTP, one reply per recipient
// (RFC 2033 section 4.2). It never returns an outcome without a reply for
// each recipient: failures on undomail's side become 451 replies, as the
// LMTP capture records them.
func deliver(ctx context.Context, addr, hostname string, a Args, msg []byte) (verb.DeliveryOutcome, error) {
	fail := func(op string, err error) (verb.DeliveryOutcome, error) {
		out := verb.DeliveryOutcome{Error: fmt.Sprintf("%s: %v", op, err)}
		rep := verb.Reply{Code: 451, Enhanced: "4.3.0", Text: "not delivered: " + out.Error}
		var se *smtp.SMTPError
		if errors.As(err, &se) {
			rep = verb.Reply{Code: se.Code, Text: se.Message}
		}
		for _, r := range a.Rcpts {
			out.Rcpts = append(out.Rcpts, verb.RcptReply{Rcpt: r, Reply: rep})
		}
		return out, fmt.Errorf("deliver to LMTP %s: %s: %w", addr, op, err)
	}
	conn, err := (&net.Dialer{Timeout: 30 * time.Second}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return fail("connect", err)
	}
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	} else {
		conn.SetDeadline(time.Now().Add(5 * time.Minute))
	}
	c := smtp.NewClientLMTP(conn)
	defer c.Close()
	if err := c.Hello(hostname); err != nil {
		return fail("LHLO", err)
	}
	if err := c.Mail(a.MailFrom, nil); err != nil {
		return fail("MAIL FROM", err)
	}
	for _, r := range a.Rcpts {
		if err := c.Rcpt(r, nil); err != nil {
			return fail("RCPT TO <"+r+">", err)
		}
	}
	w, err := c.Data()
	if err != nil {
		return fail("DATA", err)
	}
	var buf bytes.Buffer
	fmt.Fprintf(&buf, "%s: %s\r\n", verb.TraceHeader, a.UndoID)
	buf.Write(msg)
	if _, err := w.Write(buf.Bytes()); err != nil {
		return fail("send message", err)
	}
	resps, err := w.CloseWithLMTPResponse()
	var lerr smtp.LMTPDataError
	if err != nil && !errors.As(err, &lerr) {
		return fail("end of data", err)
	}
	c.Quit()
	var out verb.DeliveryOutcome
	for _, r := range a.Rcpts {
		rep := verb.Reply{Code: 451, Enhanced: "4.3.0", Text: "no reply for this recipient"}
		if e, ok := lerr[r]; ok {
			rep = verb.Reply{Code: e.Code, Text: e.Message}
		} else if resp, ok := resps[r]; ok {
			rep = verb.Reply{Code: 250, Text: resp.StatusText}
		}
		out.Rcpts = append(out.Rcpts, verb.RcptReply{Rcpt: r, Reply: rep})
	}
	return out, nil
}
