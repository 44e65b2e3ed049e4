package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"sync"

	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// liveFilters are the filters cycles left active for live mail (cycle
// run --keep): the repair stays. They are rebuilt from the log at start.
type liveFilters struct {
	mu   sync.Mutex
	list []replay.KeptFilter
}

func (lf *liveFilters) active() []replay.KeptFilter {
	lf.mu.Lock()
	defer lf.mu.Unlock()
	return append([]replay.KeptFilter(nil), lf.list...)
}

// loadFilters reads the kept filters that are still active from the log.
func (d *Daemon) loadFilters(ctx context.Context) error {
	kept, err := replay.KeptFilters(ctx, d.Log)
	if err != nil {
		return err
	}
	d.live.mu.Lock()
	defer d.live.mu.Unlock()
	d.live.list = nil
	for _, k := range kept {
		if k.Removed == 0 {
			d.live.list = append(d.live.list, k)
		}
	}
	if len(d.live.list) > 0 {
		d.logger.Info("filters active for live mail", "count", len(d.live.list))
	}
	return nil
}

// keepFilters makes a successful cycle's filters judge live mail.
func (d *Daemon) keepFilters(cycle int64, at int64, specs []verb.FilterSpec, fs []*replay.Filter) {
	d.live.mu.Lock()
	defer d.live.mu.Unlock()
	for i, f := range fs {
		d.live.list = append(d.live.list, replay.KeptFilter{Cycle: cycle, Spec: specs[i], Since: at, Filter: f})
	}
}

// Filters lists the filters active for live mail.
func (d *Daemon) Filters() []replay.KeptFilter { return d.live.active() }

// RemoveFilters stops the filters cycle kept from judging live mail. It
// is logged, so later replays stop applying them at the same point.
func (d *Daemon) RemoveFilters(ctx context.Context, cycle int64) error {
	d.live.mu.Lock()
	defer d.live.mu.Unlock()
	var rest []replay.KeptFilter
	for _, k := range d.live.list {
		if k.Cycle != cycle {
			rest = append(rest, k)
		}
	}
	if len(rest) == len(d.live.list) {
		return fmt.Errorf("no active filter was kept by cycle %d", cycle)
	}
	args, _ := json.Marshal(map[string]int64{"cycle": cycle})
	if err := d.Log.Append(ctx, &undolog.Record{Kind: verb.KindFilterRemoved, Session: "daemon", Args: args}); err != nil {
		return fmt.Errorf("log filter removal: %w", err)
	}
	d.live.list = rest
	return nil
}

// divert applies the live filters to a delivery the LMTP capture logged:
// a match is dropped (accepted and discarded) or filed into its folder
// through the master user instead of being forwarded. A failure to judge
// or file gets a temporary failure, so Postfix retries: nothing is lost.
func (d *Daemon) divert(ctx context.Context, a verb.DeliveryArgs, blob undolog.BlobRef) *verb.DeliveryOutcome {
	live := d.live.active()
	if len(live) == 0 {
		return nil
	}
	msg, err := readRef(d.Log, blob)
	if err != nil {
		return tempFail(a, fmt.Sprintf("read message for live filters: %v", err))
	}
	for _, k := range live {
		hit, err := k.Filter.Match(ctx, a, msg)
		if err != nil {
			d.logger.Warn("live filter failed; delivery deferred", "filter", k.Spec.Rule, "undo_id", a.UndoID, "err", err)
			return tempFail(a, fmt.Sprintf("filter %s: %v", k.Spec.Rule, err))
		}
		if !hit {
			continue
		}
		what := k.Spec.Rule + " -> " + k.Spec.Action
		out := &verb.DeliveryOutcome{Filtered: what}
		folder, move := strings.CutPrefix(k.Spec.Action, "move:")
		if move && a.Submission == 0 {
			msg = append([]byte(verb.TraceHeader+": "+a.UndoID+"\r\n"), msg...)
		}
		for _, rc := range a.Rcpts {
			rep := verb.Reply{Code: 250, Enhanced: "2.0.0", Text: "dropped by undomail filter " + k.Spec.Rule}
			if move {
				rep.Text = "filed into " + folder + " by undomail filter " + k.Spec.Rule
				if _, err := replay.FileInto(d.target, replay.UserOf(rc), folder, msg); err != nil {
					d.logger.Warn("live filter could not file; delivery deferred", "rcpt", rc, "err", err)
					rep = verb.Reply{Code: 451, Enhanced: "4.3.0", Text: "filing by undomail filter failed, try again later"}
					out.Error = err.Error()
				}
			}
			out.Rcpts = append(out.Rcpts, verb.RcptReply{Rcpt: rc, Reply: rep})
		}
		d.logger.Info("live filter matched", "undo_id", a.UndoID, "filter", what)
		return out
	}
	return nil
}

func tempFail(a verb.DeliveryArgs, why string) *verb.DeliveryOutcome {
	out := &verb.DeliveryOutcome{Error: why}
	for _, rc := range a.Rcpts {
		out.Rcpts = append(out.Rcpts, verb.RcptReply{Rcpt: rc, Reply: verb.Reply{Code: 451, Enhanced: "4.3.0", Text: "undomail could not apply its filters, try again later"}})
	}
	return out
}

func readRef(l *undolog.Log, ref undolog.BlobRef) ([]byte, error) {
	r, err := l.OpenRef(ref)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	return io.ReadAll(r)
}
