package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/timetravel"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// PruneLog removes the undo log before snapshot `before` (whose log
// position is where the log starts afterwards), writing what it removes
// to archive (a gzip'd JSON-lines file; "" for none), and destroys the
// older snapshots: without their log they could never be replayed from.
// It refuses to remove the cycle that keeps a live filter active.
func (d *Daemon) PruneLog(ctx context.Context, before, archive string) (admin.PruneReply, error) {
	var rep admin.PruneReply
	d.repairMu.Lock()
	defer d.repairMu.Unlock()
	if d.pending != nil {
		return rep, fmt.Errorf("prune: a rewind to %s is waiting for undomail replay", d.pending.snapshot)
	}
	logged, err := LoggedSnapshots(ctx, d.Log)
	if err != nil {
		return rep, err
	}
	at, ok := logged[before]
	if !ok {
		return rep, fmt.Errorf("prune: no snapshot %s in the undo log (undomail snapshots lists them)", before)
	}
	for _, k := range d.Filters() {
		if k.Cycle <= at {
			return rep, fmt.Errorf("prune: cycle %d keeps a filter active for live mail (%s); remove it first (undomail filters --remove %d) or prune to an earlier snapshot", k.Cycle, k.Spec.Rule, k.Cycle)
		}
	}
	var w io.Writer // nil: no archive
	if archive != "" {
		f, err := os.OpenFile(archive, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if err != nil {
			return rep, fmt.Errorf("prune: archive: %w", err)
		}
		defer f.Close()
		w, rep.Archive = f, archive
	}
	st, err := d.Log.Prune(ctx, at+1, w)
	rep.PruneStats = st
	if err != nil {
		return rep, err
	}
	if d.Store != nil {
		snaps, err := d.Store.List(ctx)
		if err != nil {
			return rep, fmt.Errorf("prune: list snapshots: %w", err)
		}
		for _, s := range snaps {
			if s.Seq == timetravel.NoSeq || s.Seq >= at {
				continue
			}
			if err := d.Store.Destroy(ctx, s.Name); err != nil {
				if errors.Is(err, timetravel.ErrInUse) {
					d.logger.Warn("prune: snapshot kept, something depends on it", "snapshot", s.Name, "err", err)
					continue
				}
				return rep, fmt.Errorf("prune: destroy snapshot %s: %w", s.Name, err)
			}
			args, _ := json.Marshal(verb.SnapshotArgs{Name: s.Name, Store: d.storeSpec, Reason: "log pruned"})
			if err := d.Log.Append(ctx, &undolog.Record{Kind: verb.KindSnapshotPruned, Session: "daemon", Args: args}); err != nil {
				d.logger.Error("log pruned snapshot", "snapshot", s.Name, "err", err)
			}
			rep.Snapshots = append(rep.Snapshots, s.Name)
		}
	}
	return rep, nil
}
