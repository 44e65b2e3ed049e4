package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/undomail/undomail/compensate"
	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// compensation is the compensation: configuration and the hostname that
// names undomail in LHLO and Message-IDs.
type compensation struct {
	config.Compensation
	hostname string
}

// compensate finds the paradoxes the cycle cycleSeq created and explains
// them to the people affected (issue 6). It runs after the replay, while
// changes are still held, so users find the explanation when they return.
// The verdict is not OK if an explanation could not be delivered.
func (d *Daemon) compensate(ctx context.Context, cycleSeq int64, v *CycleVerdict) error {
	rep, err := d.runCompensation(ctx, cycleSeq)
	v.Compensation = &rep
	if err != nil {
		v.OK = false
		return err
	}
	return nil
}

// Compensate runs compensation for an earlier cycle: the paradoxes it
// created that no compensation in the log has taken care of yet are
// explained now. It is what a cycle does after its replay, for a cycle
// that ended before compensating (its replay failed for some verbs, or
// an explanation could not be delivered).
func (d *Daemon) Compensate(ctx context.Context, cycleSeq int64) (compensate.Report, error) {
	d.repairMu.Lock()
	defer d.repairMu.Unlock()
	return d.runCompensation(ctx, cycleSeq)
}

func (d *Daemon) runCompensation(ctx context.Context, cycleSeq int64) (compensate.Report, error) {
	start := time.Now()
	recs, err := d.Log.Records(ctx, undolog.Filter{AfterSeq: cycleSeq - 1, Limit: 1})
	if err != nil {
		return compensate.Report{}, fmt.Errorf("compensate cycle %d: %w", cycleSeq, err)
	}
	if len(recs) != 1 || recs[0].Seq != cycleSeq || recs[0].Kind != verb.KindCycle {
		return compensate.Report{}, fmt.Errorf("compensate cycle %d: no cycle record at that seq", cycleSeq)
	}
	var a verb.CycleArgs
	if err := json.Unmarshal(recs[0].Args, &a); err != nil {
		return compensate.Report{}, fmt.Errorf("compensate cycle %d: read its arguments: %w", cycleSeq, err)
	}
	after := a.At
	if after == 0 && d.Store != nil {
		// Cycles logged before the record carried the snapshot's
		// position: ask the store.
		snap, err := d.Store.Get(ctx, a.To)
		if err != nil {
			return compensate.Report{}, fmt.Errorf("compensate cycle %d: %w", cycleSeq, err)
		}
		after = snap.Seq
	}
	c := compensate.Cycle{Seq: cycleSeq, After: after, Time: recs[0].Time, Reason: a.Reason, Repair: describeRepair(a)}
	checker := &compensate.IMAPChecker{Target: d.target}
	defer checker.Close()
	policies := map[compensate.Kind]compensate.Policy{}
	for k, p := range d.comp.Policies.ByKind() {
		policies[compensate.Kind(k)] = compensate.Policy(p)
	}
	rep, err := compensate.Run(ctx, d.Log, c, compensate.Options{
		Policies:   policies,
		Postmaster: d.comp.Postmaster,
		Contact:    d.comp.Contact,
		Operator:   d.comp.Operator,
		Subject:    d.comp.Subject,
		Domain:     d.comp.Domain,
		Hostname:   d.comp.hostname,
		LMTPAddr:   d.target.LMTPAddr,
		Checker:    checker,
		Logger:     d.logger,
	})
	d.logger.Info("compensation done", "cycle", cycleSeq, "explained", rep.Explained, "silent", rep.Silent,
		"notified", rep.Notified, "ignored", rep.Ignored, "already", rep.Already, "digests", len(rep.Digests), "took", time.Since(start), "err", err)
	return rep, err
}

// describeRepair says what a cycle's repair was, for people who were not
// there: the filters it applied and how many actions it left out.
func describeRepair(a verb.CycleArgs) string {
	var parts []string
	for _, f := range a.Filters {
		what := "removed"
		if folder, ok := strings.CutPrefix(f.Action, "move:"); ok {
			what = "filed into " + folder
		}
		parts = append(parts, fmt.Sprintf("mail matching the filter %s was %s", f.Rule, what))
	}
	switch n := len(a.Cancel); n {
	case 0:
	case 1:
		parts = append(parts, "one earlier action was undone")
	default:
		parts = append(parts, fmt.Sprintf("%d earlier actions were undone", n))
	}
	return strings.Join(parts, "; ")
}
