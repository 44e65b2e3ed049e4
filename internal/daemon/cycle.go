package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
)

// KindCycle is the verb of a 3R cycle; its outcome is the verdict.
const KindCycle = "cycle"

// CycleArgs are a cycle's arguments: where it rewinds to and the repair.
type CycleArgs struct {
	To      string       `json:"to"`               // snapshot
	Cancel  []int64      `json:"cancel,omitempty"` // verbs left out of the replay
	Filters []FilterSpec `json:"filters,omitempty"`
	// Present is the snapshot of the store taken before the rewind, so
	// the cycle itself can be undone.
	Present string `json:"present"`
}

// FilterSpec is a retroactive filter as given by the operator.
type FilterSpec struct {
	Rule   string `json:"rule"`
	Action string `json:"action"` // drop, move:FOLDER
}

// CycleVerdict ends every cycle (DESIGN: "Positive acknowledgement").
type CycleVerdict struct {
	OK        bool           `json:"ok"`
	Replayed  int            `json:"replayed"`
	Cancelled int            `json:"cancelled"`
	Filtered  int            `json:"filtered"`
	Repaired  int            `json:"repaired"` // verbs skipped: their messages were removed by the repair
	Failed    int            `json:"failed"`
	Skipped   map[string]int `json:"skipped,omitempty"`
	Held      float64        `json:"held_s"` // how long changes were held back
	Error     string         `json:"error,omitempty"`
}

// Cycle runs a 3R cycle: it snapshots the present (the cycle can itself
// be undone), holds every change back, rewinds to the snapshot `to`,
// replays every logged verb since except those cancelled, and lets
// changes through again. Changes that arrive meanwhile wait at the gate
// or get a temporary failure and are retried by their clients.
func (d *Daemon) Cycle(ctx context.Context, to string, cancel []int64, filters []FilterSpec) (CycleVerdict, error) {
	if d.Store == nil {
		return CycleVerdict{}, fmt.Errorf("cycle: no store configured")
	}
	var fs []*replay.Filter
	for _, f := range filters {
		pf, err := replay.ParseFilter(f.Rule, f.Action)
		if err != nil {
			return CycleVerdict{}, fmt.Errorf("cycle: %w", err)
		}
		fs = append(fs, pf)
	}
	snap, err := d.Store.Get(ctx, to)
	if err != nil {
		return CycleVerdict{}, fmt.Errorf("cycle: %w", err)
	}
	d.repairMu.Lock()
	defer d.repairMu.Unlock()
	if d.pending != nil {
		return CycleVerdict{}, fmt.Errorf("cycle: a rewind to %s is waiting for undomail replay", d.pending.snapshot)
	}
	present, _, err := d.Snapshot(ctx, "before cycle to "+to)
	if err != nil {
		return CycleVerdict{}, fmt.Errorf("cycle: snapshot the present first: %w", err)
	}
	args, _ := json.Marshal(CycleArgs{To: to, Cancel: cancel, Filters: filters, Present: present.Name})
	intent := &undolog.Record{Kind: KindCycle, Session: "cycle", Args: args}
	if err := d.Log.Append(ctx, intent); err != nil {
		return CycleVerdict{}, fmt.Errorf("cycle: log intent: %w", err)
	}
	wctx, cancelWait := context.WithTimeout(ctx, wedgeTimeout)
	defer cancelWait()
	start := time.Now()
	resume, err := d.Gate.Hold(wctx)
	if err != nil {
		return CycleVerdict{}, fmt.Errorf("cycle: changes in flight did not finish: %w", err)
	}
	v, cerr := d.cycle(ctx, snap.Seq, to, intent.Seq, cancel, fs)
	if cerr == nil {
		cerr = d.compensate(ctx, intent.Seq, &v)
	}
	resume()
	v.Held = time.Since(start).Seconds()
	if cerr != nil {
		v.Error = cerr.Error()
	}
	out, _ := json.Marshal(v)
	if err := d.Log.Append(ctx, &undolog.Record{Kind: undolog.KindOutcome, Session: "cycle", Ref: intent.Seq, Outcome: out}); err != nil {
		d.logger.Error("log cycle verdict", "err", err)
	}
	d.logger.Info("cycle done", "to", to, "ok", v.OK, "replayed", v.Replayed, "cancelled", v.Cancelled, "failed", v.Failed, "held", v.Held)
	return v, cerr
}

func (d *Daemon) cycle(ctx context.Context, at int64, to string, cycleSeq int64, cancel []int64, filters []*replay.Filter) (CycleVerdict, error) {
	var v CycleVerdict
	if _, err := replay.Rewind(ctx, d.Log, d.Store, d.upstream, to); err != nil {
		return v, err
	}
	c := map[int64]bool{}
	for _, s := range cancel {
		c[s] = true
	}
	res, err := replay.Replay(ctx, d.Log, replay.Plan{After: at, Before: cycleSeq, Cancel: c, Filters: filters}, d.target)
	v.Replayed, v.Cancelled, v.Failed, v.Skipped = res.Replayed, res.Cancelled, res.Failed, res.Skipped
	v.Filtered, v.Repaired = res.Filtered, res.Repaired
	if err != nil {
		return v, err
	}
	v.OK = res.Failed == 0
	if !v.OK {
		return v, fmt.Errorf("%d verbs failed to replay", res.Failed)
	}
	return v, nil
}

// CycleJSON is Cycle for the control socket.
func (d *Daemon) CycleJSON(ctx context.Context, req admin.CycleRequest) (json.RawMessage, error) {
	var fs []FilterSpec
	for _, f := range req.Filters {
		fs = append(fs, FilterSpec{Rule: f.Rule, Action: f.Action})
	}
	v, err := d.Cycle(ctx, req.To, req.Cancel, fs)
	b, _ := json.Marshal(v)
	return b, err
}
