package daemon

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
)

// recoverRepair finishes a cycle or rewind that a crash interrupted: a
// repair intent without a verdict means the store may be half rewound or
// half replayed. Before any listener starts, the store is rolled back to
// the snapshot of the present the repair took first, exactly as clients
// last saw it, and the repair gets its verdict: interrupted, rolled back.
// The operator can run it again. Proxies never come back half-rewound.
func (d *Daemon) recoverRepair(ctx context.Context) error {
	verbs, err := d.Log.Verbs(ctx, undolog.Filter{Kinds: []string{KindCycle}})
	if err != nil {
		return fmt.Errorf("look for interrupted repairs: %w", err)
	}
	for _, v := range verbs {
		if v.Outcome != nil {
			continue
		}
		var a CycleArgs
		if err := json.Unmarshal(v.Args, &a); err != nil {
			return fmt.Errorf("interrupted repair %d: %w", v.Seq, err)
		}
		if d.Store == nil {
			return fmt.Errorf("repair %d (to %s) was interrupted and needs the store to roll back to %s: configure store", v.Seq, a.To, a.Present)
		}
		d.logger.Warn("a repair was interrupted: rolling back to the present it started from", "repair", v.Seq, "to", a.To, "present", a.Present)
		out, rerr := replay.Rewind(ctx, d.Log, d.Store, d.upstream, a.Present)
		verdict := CycleVerdict{Cycle: v.Seq, Present: a.Present,
			Error: fmt.Sprintf("interrupted (undomail stopped during the repair); rolled back to %s, the store as it was before", a.Present)}
		if rerr != nil {
			verdict.Error = fmt.Sprintf("interrupted; rolling back to %s failed: %v", a.Present, rerr)
		}
		d.endRepair(ctx, v.Seq, verdict)
		if rerr != nil {
			return fmt.Errorf("repair %d was interrupted and rolling back to %s failed: %w", v.Seq, a.Present, rerr)
		}
		d.logger.Warn("interrupted repair rolled back", "repair", v.Seq, "present", a.Present, "raised", out.Raised)
	}
	return nil
}
