package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// recoverRepair finishes a cycle or rewind that a crash interrupted: a
// repair intent without a verdict means the store may be half rewound or
// half replayed. Before any listener starts, the store is rolled back to
// the snapshot of the present the repair took first, exactly as clients
// last saw it, and the repair gets its verdict: interrupted, rolled back.
// The operator can run it again. Proxies never come back half-rewound.
func (d *Daemon) recoverRepair(ctx context.Context) error {
	verbs, err := d.Log.Verbs(ctx, undolog.Filter{Kinds: []string{verb.KindCycle}})
	if err != nil {
		return fmt.Errorf("look for interrupted repairs: %w", err)
	}
	marker, hasMarker := d.readRepairMarker()
	seen := false
	for _, v := range verbs {
		if v.Seq == marker.Cycle {
			seen = true
		}
		if v.Outcome != nil {
			continue
		}
		var a verb.CycleArgs
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
	if hasMarker && !seen && marker.Present != "" && d.Store != nil {
		// The marker names a repair the log does not have: the log lost
		// it (damaged, restored from an old copy). The store may be half
		// rewound all the same: roll back to the present the marker names.
		d.logger.Error("the repair marker names a repair the undo log does not have: rolling back to its snapshot of the present",
			"repair", marker.Cycle, "present", marker.Present)
		if _, err := replay.Rewind(ctx, d.Log, d.Store, d.upstream, marker.Present); err != nil {
			return fmt.Errorf("repair %d (marker only) was interrupted and rolling back to %s failed: %w", marker.Cycle, marker.Present, err)
		}
	}
	d.clearRepairMarker()
	return nil
}

// repairMarker is the second copy of a running repair's state, beside the
// log's intent record: DATA_DIR/repair.json, written (fsynced) when the
// repair begins, removed when its verdict is logged.
type repairMarker struct {
	Cycle   int64  `json:"cycle"`
	To      string `json:"to"`
	Present string `json:"present"`
}

const repairMarkerName = "repair.json"

func (d *Daemon) writeRepairMarker(m repairMarker) error {
	b, _ := json.Marshal(m)
	path := filepath.Join(d.dataDir, repairMarkerName)
	f, err := os.OpenFile(path+".tmp", os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err = f.Write(b); err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(path+".tmp", path)
	}
	return err
}

func (d *Daemon) readRepairMarker() (repairMarker, bool) {
	var m repairMarker
	b, err := os.ReadFile(filepath.Join(d.dataDir, repairMarkerName))
	if err != nil || json.Unmarshal(b, &m) != nil {
		return m, false
	}
	return m, true
}

func (d *Daemon) clearRepairMarker() {
	if err := os.Remove(filepath.Join(d.dataDir, repairMarkerName)); err != nil && !os.IsNotExist(err) {
		d.logger.Warn("remove the repair marker", "err", err)
	}
}
