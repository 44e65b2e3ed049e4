package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"time"

	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/timetravel"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// wedgeTimeout bounds how long a snapshot waits for mutations in flight.
const wedgeTimeout = 30 * time.Second

// Snapshot takes a consistent snapshot of the mail store: it wedges the
// proxies (mutations in flight finish, new ones wait), notes the log
// position, snapshots the store with that position, and resumes. It
// returns the snapshot and how long mutations were held back.
func (d *Daemon) Snapshot(ctx context.Context, reason string) (timetravel.Snapshot, time.Duration, error) {
	if d.Store == nil {
		return timetravel.Snapshot{}, 0, fmt.Errorf("snapshot: no store configured (store: zfs:POOL/DATASET or copy:DIR)")
	}
	wctx, cancel := context.WithTimeout(ctx, wedgeTimeout)
	defer cancel()
	start := time.Now()
	resume, err := d.Gate.Wedge(wctx)
	if err != nil {
		return timetravel.Snapshot{}, 0, fmt.Errorf("snapshot: mutations did not finish within %v: %w", wedgeTimeout, err)
	}
	snap, err := d.snapshotHeld(ctx, reason, func() { resume() }, start)
	return snap, time.Since(start), err
}

// snapshotHeld takes the snapshot while the caller holds the gate;
// release, if set, is called as soon as the store has the snapshot.
func (d *Daemon) snapshotHeld(ctx context.Context, reason string, release func(), start time.Time) (timetravel.Snapshot, error) {
	if release == nil {
		release = func() {}
	}
	name := "undomail-" + time.Now().UTC().Format("20060102T150405.000Z")
	at, _ := d.Log.Last()
	args, _ := json.Marshal(verb.SnapshotArgs{Name: name, AtSeq: at, Store: d.storeSpec, Reason: reason})
	intent := &undolog.Record{Kind: verb.KindSnapshot, Session: "daemon", Args: args}
	if err := d.Log.Append(ctx, intent); err != nil {
		release()
		return timetravel.Snapshot{}, fmt.Errorf("snapshot %s: log intent: %w", name, err)
	}
	snap, serr := d.Store.Snapshot(ctx, name, at, map[string]string{"reason": reason, "log_record": strconv.FormatInt(intent.Seq, 10)})
	release()
	pause := time.Since(start)
	o := verb.SnapshotOutcome{OK: serr == nil, Pause: float64(pause.Microseconds()) / 1000}
	if serr != nil {
		o.Error = serr.Error()
	}
	out, _ := json.Marshal(o)
	if err := d.Log.Append(ctx, &undolog.Record{Kind: undolog.KindOutcome, Session: "daemon", Ref: intent.Seq, Outcome: out}); err != nil {
		d.logger.Error("log snapshot outcome", "snapshot", name, "err", err)
	}
	if serr != nil {
		return timetravel.Snapshot{}, fmt.Errorf("snapshot %s: %w", name, serr)
	}
	d.logger.Info("snapshot taken", "snapshot", name, "at_seq", at, "pause", pause, "reason", reason)
	return snap, nil
}

// schedule takes snapshots every interval and prunes by the retention
// policy, until ctx ends.
func (d *Daemon) schedule(ctx context.Context, every time.Duration, keepHourly, keepDaily int, logArchive string) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if _, _, err := d.Snapshot(ctx, "schedule"); err != nil {
			d.logger.Error("scheduled snapshot failed", "err", err)
			continue
		}
		pruned, err := timetravel.Prune(ctx, d.Store, time.Now(), keepHourly, keepDaily, d.logger)
		if err != nil {
			d.logger.Error("pruning snapshots failed", "err", err)
		}
		for _, name := range pruned {
			args, _ := json.Marshal(verb.SnapshotArgs{Name: name, Store: d.storeSpec, Reason: "retention"})
			if err := d.Log.Append(ctx, &undolog.Record{Kind: verb.KindSnapshotPruned, Session: "daemon", Args: args}); err != nil {
				d.logger.Error("log pruned snapshot", "snapshot", name, "err", err)
			}
		}
		if logArchive != "" {
			d.pruneToOldest(ctx, logArchive)
		}
	}
}

// pruneToOldest removes the log before the oldest snapshot kept, archived
// into dir (snapshots.prune_log).
func (d *Daemon) pruneToOldest(ctx context.Context, dir string) {
	logged, err := LoggedSnapshots(ctx, d.Log)
	if err != nil {
		d.logger.Error("prune the log: list snapshots", "err", err)
		return
	}
	oldest, at := "", int64(-1)
	for name, seq := range logged {
		if at < 0 || seq < at {
			oldest, at = name, seq
		}
	}
	base, err := d.Log.Base(ctx)
	if err != nil || oldest == "" || at <= base {
		return // nothing new to prune
	}
	archive := filepath.Join(dir, fmt.Sprintf("undo-%020d-%020d.jsonl.gz", base+1, at))
	rep, err := d.PruneLog(ctx, oldest, archive)
	if err != nil {
		d.logger.Error("prune the log before the oldest snapshot", "snapshot", oldest, "err", err)
		return
	}
	d.logger.Info("pruned the log before the oldest snapshot", "snapshot", oldest, "records", rep.Records, "archive", archive)
}

// Rewind rolls the mail store back to a snapshot (replay.Rewind) with the
// proxies held throughout, so no change reaches the store while it is
// rewound. It snapshots the present first and logs the repair's intent
// (like a cycle, so a crash in the middle is rolled back at start). With
// hold, changes stay held afterwards, for the split form of a cycle: the
// operator repairs the server by hand, then Replay brings the logged
// changes back and lets new ones through. Without hold the changes since
// the snapshot are left out: the rewind is the repair.
func (d *Daemon) Rewind(ctx context.Context, snapshot string, hold bool) (verb.RewindOutcome, error) {
	if d.Store == nil {
		return verb.RewindOutcome{}, fmt.Errorf("rewind: no store configured")
	}
	d.repairMu.Lock()
	defer d.repairMu.Unlock()
	if d.pending != nil {
		return verb.RewindOutcome{}, fmt.Errorf("rewind: a rewind to %s is waiting for undomail replay", d.pending.snapshot)
	}
	snap, err := d.Store.Get(ctx, snapshot)
	if err != nil {
		return verb.RewindOutcome{}, fmt.Errorf("rewind: %w", err)
	}
	if hold {
		if err := d.verifyRange(ctx, snap.Seq); err != nil {
			return verb.RewindOutcome{}, fmt.Errorf("rewind: %w", err)
		}
	}
	start := time.Now()
	intent, present, resume, err := d.beginRepair(ctx, verb.CycleArgs{To: snapshot, At: snap.Seq, Split: true, Reason: "undomail rewind"})
	if err != nil {
		return verb.RewindOutcome{}, fmt.Errorf("rewind to %s: %w", snapshot, err)
	}
	d.prog.phase("rewind")
	out, err := replay.Rewind(ctx, d.Log, d.Store, d.upstream, snapshot)
	if err != nil || !hold {
		v := CycleVerdict{Cycle: intent.Seq, Present: present, OK: err == nil, Held: time.Since(start).Seconds()}
		if err != nil {
			v.Error = err.Error()
		} else {
			v.Error = "rewound without replay: the changes since the snapshot were left out"
		}
		d.endRepair(ctx, intent.Seq, v)
		resume()
		return out, err
	}
	d.pending = &pendingReplay{snapshot: snapshot, after: snap.Seq, before: intent.Seq, resume: resume,
		gone: out.Gone, returning: out.Returning, intent: intent.Seq, present: present, start: start}
	d.logger.Warn("rewound and holding all changes until undomail replay", "snapshot", snapshot)
	return out, nil
}

// endRepair logs a cycle's or rewind's verdict.
func (d *Daemon) endRepair(ctx context.Context, seq int64, v CycleVerdict) {
	out, _ := json.Marshal(v)
	if err := d.Log.Append(ctx, &undolog.Record{Kind: undolog.KindOutcome, Session: "cycle", Ref: seq, Outcome: out}); err != nil {
		d.logger.Error("log repair verdict", "seq", seq, "err", err)
	} else {
		d.clearRepairMarker()
	}
	d.prog.set(replay.Progress{Phase: "done", Done: v.Replayed, Total: v.Replayed, Users: v.Users, Failed: v.Failed})
}

// pendingReplay is a split-form cycle between its rewind and its replay.
type pendingReplay struct {
	snapshot      string
	after, before int64 // the verbs to replay: after < seq < before
	resume        func()
	gone          []verb.MailboxCounters // mailboxes the rewind took away
	returning     map[string]map[string][]uint32
	intent        int64  // the repair's record
	present       string // the snapshot taken before the rewind
	start         time.Time
}

// Replay ends a split-form cycle: it replays the changes logged between
// the snapshot and the rewind (all but cancel), verifies, explains the
// paradoxes, then lets changes through.
func (d *Daemon) Replay(ctx context.Context, cancel []int64) (replay.Result, error) {
	d.repairMu.Lock()
	defer d.repairMu.Unlock()
	p := d.pending
	if p == nil {
		return replay.Result{}, fmt.Errorf("replay: no rewind is waiting (undomail rewind --to SNAPSHOT --hold first)")
	}
	cancel, err := ExpandSubmissions(ctx, d.Log, p.after, cancel) // outbound.go
	if err != nil {
		return replay.Result{}, fmt.Errorf("replay: %w", err)
	}
	c := map[int64]bool{}
	for _, s := range cancel {
		c[s] = true
	}
	start := time.Now()
	res, err := replay.Replay(ctx, d.Log, replay.Plan{After: p.after, Before: p.before, Cancel: c, Workers: d.replayWorkers, Progress: d.prog.set,
		Gone: p.gone, Restore: d.upstream.Restore, Returning: p.returning}, d.target)
	v := CycleVerdict{Cycle: p.intent, Present: p.present, ReplayS: time.Since(start).Seconds()}
	fillVerdict(&v, res)
	if err == nil {
		// The replay ran to its end: explain what changed, failures
		// included.
		err = v.Check()
		d.prog.phase("compensate")
		err = errors.Join(err, d.compensate(ctx, p.intent, &v))
		d.cancelOutbound(ctx, p.intent, cancel, "", &v)
		d.cancelRerouted(ctx, p.after, p.intent, &v)
	}
	d.pending = nil
	v.Held = time.Since(p.start).Seconds()
	if err != nil {
		v.OK = false
		v.Error = err.Error()
	}
	d.endRepair(ctx, p.intent, v) // before changes flow again: see Cycle
	p.resume()
	return res, err
}

// LoggedSnapshots returns the snapshots the log says exist (taken, not
// pruned), by name, with their positions.
func LoggedSnapshots(ctx context.Context, l *undolog.Log) (map[string]int64, error) {
	verbs, err := l.Verbs(ctx, undolog.Filter{Kinds: []string{verb.KindSnapshot, verb.KindSnapshotPruned}})
	if err != nil {
		return nil, err
	}
	out := map[string]int64{}
	for _, v := range verbs {
		var a verb.SnapshotArgs
		if json.Unmarshal(v.Args, &a) != nil {
			continue
		}
		if v.Kind == verb.KindSnapshotPruned {
			delete(out, a.Name)
			continue
		}
		var o verb.SnapshotOutcome
		if v.Outcome != nil && json.Unmarshal(v.Outcome.Outcome, &o) == nil && o.OK {
			out[a.Name] = a.AtSeq
		}
	}
	return out, nil
}

// verifySnapshots compares the log's snapshots with the store's and logs
// every disagreement loudly: which side is right is for an operator to
// decide, never guessed.
func (d *Daemon) verifySnapshots(ctx context.Context) {
	logged, err := LoggedSnapshots(ctx, d.Log)
	if err != nil {
		d.logger.Error("verify snapshots: read log", "err", err)
		return
	}
	ms, err := timetravel.Verify(ctx, d.Store, logged)
	if err != nil {
		d.logger.Error("verify snapshots: read store", "err", err)
		return
	}
	for _, m := range ms {
		d.logger.Error("snapshot record disagrees with the store", "mismatch", m.String())
	}
	if len(ms) == 0 {
		d.logger.Info("snapshots verified", "count", len(logged))
	}
}
