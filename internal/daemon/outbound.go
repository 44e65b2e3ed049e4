package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/outbound"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// startOutbound starts the outbound delay window (smtp.outbound_delay;
// internal/outbound) until sctx ends. Postfix must defer the transports
// it relays outside with (defer_transports): a window that holds
// nothing would let mail leave that the operator believes can still be
// cancelled, so undomail refuses to start instead.
func (d *Daemon) startOutbound(ctx, sctx context.Context, cfg config.Config) error {
	delay := time.Duration(cfg.SMTP.OutboundDelay)
	if delay <= 0 {
		return nil
	}
	pf := outbound.Postfix{Config: cfg.SMTP.PostfixConfig, Exec: cfg.SMTP.PostfixExec}
	dt, err := pf.DeferTransports(ctx)
	if err != nil {
		return fmt.Errorf("smtp.outbound_delay: %w", err)
	}
	if dt == "" {
		return fmt.Errorf("smtp.outbound_delay is %s, but Postfix's defer_transports is empty, so outbound mail leaves at once: "+
			"set defer_transports = smtp in main.cf (docs/operations.md, \"Outbound delay window\")", delay)
	}
	q, err := outbound.New(ctx, d.Log, outbound.Options{Delay: delay, Postfix: pf, Paused: d.Gate.Holding, Logger: d.logger})
	if err != nil {
		return err
	}
	d.Outbound = q
	d.scheduled.Add(1)
	go func() {
		defer d.scheduled.Done()
		q.Run(sctx)
	}()
	d.logger.Info("outbound delay window", "delay", delay, "defer_transports", dt)
	return nil
}

// submitted reports whether v is a front-door submission Postfix
// accepted: one a repair can cancel (its sender takes it back).
func submitted(v undolog.Verb) bool {
	if v.Kind != verb.KindSMTPSubmit || v.Outcome == nil {
		return false
	}
	var o verb.DeliveryOutcome
	return json.Unmarshal(v.Outcome.Outcome, &o) == nil && o.Reply != nil && o.Reply.Positive()
}

// ExpandSubmissions adds to cancel (after its own entries, which keep
// their order) the local deliveries of every front-door submission
// (after log position at) it names: cancelling a
// submission takes the sender's message back everywhere, in the
// mailboxes here and, while it waits in the outbound delay window,
// outside (the window's copy never leaves).
func ExpandSubmissions(ctx context.Context, l *undolog.Log, at int64, cancel []int64) ([]int64, error) {
	if len(cancel) == 0 {
		return cancel, nil
	}
	subs := cancelSet(cancel)
	verbs, err := l.Verbs(ctx, undolog.Filter{AfterSeq: at, Kinds: []string{verb.KindSMTPSubmit, verb.KindLMTPDeliver}})
	if err != nil {
		return nil, fmt.Errorf("cancel: read the submissions: %w", err)
	}
	out := cancel
	for _, v := range verbs {
		if v.Kind == verb.KindSMTPSubmit {
			if !submitted(v) {
				delete(subs, v.Seq)
			}
			continue
		}
		var a verb.DeliveryArgs
		if json.Unmarshal(v.Args, &a) == nil && a.Submission != 0 && subs[a.Submission] && !slices.Contains(out, v.Seq) {
			out = append(slices.Clip(out), v.Seq)
		}
	}
	return out, nil
}

// cancelOutbound cancels the messages the window holds that the cycle's
// repair cancels (their submission is in cancel); one that left already
// is said in the verdict.
func (d *Daemon) cancelOutbound(ctx context.Context, cycle int64, cancel []int64, reason string, v *CycleVerdict) {
	if d.Outbound == nil || len(cancel) == 0 {
		return
	}
	ms, err := d.Outbound.CancelSubmissions(ctx, cycle, cancelSet(cancel), reason)
	for _, m := range ms {
		v.Outbound = append(v.Outbound, m.Summary())
	}
	if err != nil {
		d.logger.Error("cycle: cancel held outbound mail", "cycle", cycle, "err", err)
		v.OutboundErr = err.Error()
	}
}

// cancelRerouted cancels the held messages the repaired Postfix no
// longer sends outside: the cycle's replay (records after cycle) handed
// their submission (after log position at) to Postfix again, and it
// delivered it here, or refused it, instead of routing it outside (no
// recipient was held as outside). Only messages whose waiting recipients
// all came from Postfix's routing (an alias), not from the envelope, are
// judged: an envelope recipient outside is refused by the replay service
// at RCPT and says nothing about the repair.
func (d *Daemon) cancelRerouted(ctx context.Context, at, cycle int64, v *CycleVerdict) {
	if d.Outbound == nil {
		return
	}
	var judge []outbound.Message
	for _, m := range d.Outbound.List() {
		if m.Submission > at && m.Submission < cycle {
			judge = append(judge, m)
		}
	}
	if len(judge) == 0 {
		return
	}
	recs, err := d.Log.Records(ctx, undolog.Filter{AfterSeq: cycle, Kinds: []string{verb.KindReplay}})
	if err != nil {
		d.logger.Error("cycle: read the replay's records for the outbound delay window", "err", err)
		return
	}
	routed, outside := map[int64]bool{}, map[int64]bool{}
	for _, r := range recs {
		var o verb.ReplayOutcome
		if json.Unmarshal(r.Outcome, &o) != nil {
			continue
		}
		switch {
		case o.Status == verb.ReplayHeld:
			outside[r.Ref] = true
		case r.User == "" && (o.Status == verb.ReplayReinjected || o.Status == verb.ReplayRefused):
			routed[r.Ref] = true
		}
	}
	subs := map[int64]bool{}
	for _, m := range judge {
		if !routed[m.Submission] || outside[m.Submission] {
			continue
		}
		sub, ok, err := d.Log.Verb(ctx, m.Submission)
		var a verb.DeliveryArgs
		if err != nil || !ok || json.Unmarshal(sub.Args, &a) != nil || enveloped(a.Rcpts, m.Rcpts) {
			continue
		}
		subs[m.Submission] = true
	}
	if len(subs) == 0 {
		return
	}
	ms, err := d.Outbound.CancelSubmissions(ctx, cycle, subs, "the repaired mail system no longer sends it outside")
	for _, m := range ms {
		v.Outbound = append(v.Outbound, m.Summary()+": the repaired mail system no longer sends it outside")
	}
	if err != nil {
		d.logger.Error("cycle: cancel held outbound mail the repair rerouted", "cycle", cycle, "err", err)
		v.OutboundErr = strings.TrimPrefix(v.OutboundErr+"; "+err.Error(), "; ")
	}
}

// enveloped reports whether one of the waiting recipients is an envelope
// recipient of the submission.
func enveloped(envelope, waiting []string) bool {
	for _, w := range waiting {
		for _, e := range envelope {
			if strings.EqualFold(w, e) {
				return true
			}
		}
	}
	return false
}

// planOutbound lists in a plan the messages the window holds: the
// ones the cycle cancels (their submission is cancelled) never leave.
func planOutbound(ctx context.Context, l *undolog.Log, p *admin.Plan, cancel map[int64]bool) error {
	ms, err := outbound.Waiting(ctx, l)
	if err != nil {
		return fmt.Errorf("plan: %w", err)
	}
	for _, m := range ms {
		po := admin.PlanOutbound{Seq: m.Seq, QueueID: m.QueueID, Submission: m.Submission, What: m.Summary(), ReleaseAt: m.ReleaseAt,
			Action: "leaves when its time is up, unless the repaired Postfix no longer sends it outside"}
		if m.Submission != 0 && cancel[m.Submission] {
			po.Action = "cancel"
		}
		p.Outbound = append(p.Outbound, po)
	}
	return nil
}

// submissionStep is the plan's step for a cancelled submission.
func submissionStep(v undolog.Verb, what string) admin.PlanStep {
	var a verb.DeliveryArgs
	json.Unmarshal(v.Args, &a)
	return admin.PlanStep{Seq: v.Seq, Kind: v.Kind, User: v.User, What: what, Action: "cancel",
		Effect: fmt.Sprintf("%s takes the message %q to %s back: its deliveries here go, and a copy waiting in the outbound delay window never leaves",
			a.MailFrom, a.Header.Subject, strings.Join(a.Rcpts, ", "))}
}

func cancelSet(seqs []int64) map[int64]bool {
	m := map[int64]bool{}
	for _, s := range seqs {
		m[s] = true
	}
	return m
}

// OutboundHeld, ReleaseOutbound and CancelOutbound serve the window to
// the admin API (admin.OutboundWindow).
func (b adminBackend) OutboundHeld() ([]outbound.Message, bool) {
	if b.Outbound == nil {
		return nil, false
	}
	return b.Outbound.List(), true
}

func (b adminBackend) ReleaseOutbound(ctx context.Context, queueID, reason string) error {
	if b.Outbound == nil {
		return errWindowOff
	}
	return b.Outbound.Release(ctx, queueID, reason)
}

func (b adminBackend) CancelOutbound(ctx context.Context, queueID, reason string) error {
	if b.Outbound == nil {
		return errWindowOff
	}
	return b.Outbound.Cancel(ctx, queueID, reason)
}

var errWindowOff = errors.New("the outbound delay window is off (smtp.outbound_delay)")
