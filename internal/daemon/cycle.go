package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// CycleVerdict is admin.CycleVerdict, named here for the daemon's
// tests; new code uses admin.CycleVerdict.
type CycleVerdict = admin.CycleVerdict

// progress is the state of the cycle that runs, for CycleProgress.
type progress struct {
	mu sync.Mutex
	p  replay.Progress
}

func (p *progress) set(v replay.Progress) {
	p.mu.Lock()
	p.p = v
	p.mu.Unlock()
}

func (p *progress) phase(name string) { p.set(replay.Progress{Phase: name}) }

// CycleProgress says how far the running cycle (or split-form replay)
// is; Phase is "" when none has run since start.
func (d *Daemon) CycleProgress() replay.Progress {
	d.prog.mu.Lock()
	defer d.prog.mu.Unlock()
	return d.prog.p
}

// Cycle runs a 3R cycle: it snapshots the present (the cycle can itself
// be undone), holds every change back, rewinds to the snapshot req.To,
// replays every logged verb since except those the repair leaves out,
// verifies the store against the log, explains the paradoxes, and lets
// changes through again. Changes that arrive meanwhile wait at the gate
// or get a temporary failure and are retried by their clients.
func (d *Daemon) Cycle(ctx context.Context, req admin.CycleRequest) (CycleVerdict, error) {
	if d.Store == nil {
		return CycleVerdict{}, fmt.Errorf("cycle: no store configured")
	}
	var fs []*replay.Filter
	var specs []verb.FilterSpec
	for _, f := range req.Filters {
		pf, err := replay.ParseFilter(f.Rule, f.Action)
		if err != nil {
			return CycleVerdict{}, fmt.Errorf("cycle: %w", err)
		}
		fs = append(fs, pf)
		specs = append(specs, f)
	}
	if req.Keep && len(fs) == 0 {
		return CycleVerdict{}, fmt.Errorf("cycle: keep: no filter to keep active")
	}
	snap, err := d.Store.Get(ctx, req.To)
	if err != nil {
		return CycleVerdict{}, fmt.Errorf("cycle: %w", err)
	}
	d.repairMu.Lock()
	defer d.repairMu.Unlock()
	if d.pending != nil {
		return CycleVerdict{}, fmt.Errorf("cycle: a rewind to %s is waiting for undomail replay", d.pending.snapshot)
	}
	if err := d.verifyRange(ctx, snap.Seq); err != nil {
		return CycleVerdict{}, fmt.Errorf("cycle: %w", err)
	}
	if req.Cancel, err = ExpandSubmissions(ctx, d.Log, snap.Seq, req.Cancel); err != nil {
		return CycleVerdict{}, fmt.Errorf("cycle: %w", err)
	}
	start := time.Now()
	intent, present, resume, err := d.beginRepair(ctx, verb.CycleArgs{To: req.To, At: snap.Seq, Cancel: req.Cancel, Filters: specs, Reason: req.Reason, Keep: req.Keep, Users: req.Users})
	if err != nil {
		return CycleVerdict{}, fmt.Errorf("cycle: %w", err)
	}
	v, ran, cerr := d.cycle(ctx, snap.Seq, req.To, intent.Seq, present, req.Cancel, fs, req.Users)
	v.Cycle, v.Present, v.OnlyUsers = intent.Seq, present, req.Users
	if ran {
		// The replay ran to its end (some verbs may have failed): explain
		// what changed, failures included.
		d.prog.phase("compensate")
		cerr = errors.Join(cerr, d.compensate(ctx, intent.Seq, &v))
		// Nothing left the window while changes were held back.
		d.cancelOutbound(ctx, intent.Seq, req.Cancel, req.Reason, &v)
		d.cancelRerouted(ctx, snap.Seq, intent.Seq, &v)
	}
	if cerr == nil && req.Keep {
		d.keepFilters(intent.Seq, snap.Seq, specs, fs)
	}
	v.Held = time.Since(start).Seconds()
	if cerr != nil {
		v.OK = false
		v.Error = cerr.Error()
	}
	// The verdict is logged before changes flow again: a crash after it
	// leaves a finished repair; a crash before it is rolled back at start
	// (recoverRepair), which must never lose a change accepted after it.
	d.endRepair(ctx, intent.Seq, v)
	resume()
	d.logger.Info("cycle done", "to", req.To, "ok", v.OK, "replayed", v.Replayed, "cancelled", v.Cancelled,
		"filtered", v.Filtered, "failed", v.Failed, "problems", v.Problems(), "held", v.Held)
	return v, cerr
}

// cycle rewinds and replays; ran reports that the replay ran to its end,
// whatever its verdict.
func (d *Daemon) cycle(ctx context.Context, at int64, to string, cycleSeq int64, present string, cancel []int64, filters []*replay.Filter, users []string) (v CycleVerdict, ran bool, err error) {
	v.Present, v.OnlyUsers = present, users
	d.prog.phase("rewind")
	rw, err := replay.RewindUsers(ctx, d.Log, d.Store, d.upstream, to, users)
	if err != nil {
		return v, false, err
	}
	c := map[int64]bool{}
	for _, s := range cancel {
		c[s] = true
	}
	start := time.Now()
	res, err := replay.Replay(ctx, d.Log, replay.Plan{After: at, Before: cycleSeq, Cancel: c, Filters: filters, Workers: d.replayWorkers, Progress: d.prog.set,
		Gone: rw.Gone, Restore: d.upstream.Restore, Returning: rw.Returning, Users: userSet(users), NoModelCheck: true}, d.target)
	v.ReplayS = time.Since(start).Seconds()
	fillVerdict(&v, res)
	if err != nil {
		return v, false, err
	}
	d.prog.phase("verify")
	if d.BeforeVerify != nil {
		d.BeforeVerify()
	}
	vstart := time.Now()
	v.Compared = d.comparePresent(ctx, at, cycleSeq, present, c, res.FilteredIDs, userSet(users))
	v.VerifyS = time.Since(vstart).Seconds()
	v.OK = v.OK && v.Compared.OK()
	return v, true, v.Check()
}

// comparePresent verifies a cycle against the present it snapshotted
// before the rewind: what differs must be what the repair (the verbs in
// cancel, the deliveries filtered) explains.
func (d *Daemon) comparePresent(ctx context.Context, at, cycleSeq int64, present string, cancel map[int64]bool,
	filtered map[string]replay.FilteredDelivery, users map[string]bool) *replay.PresentCheck {
	rs, err := replay.ExplainRepair(ctx, d.Log, at, cycleSeq, cancel, filtered, users)
	if err != nil {
		return &replay.PresentCheck{Snapshot: present, Error: err.Error()}
	}
	c := replay.ComparePresent(ctx, d.Store, present, users, rs)
	for _, p := range c.Problems {
		d.logger.Error("cycle: the store differs from the present where the repair does not explain it", "difference", p)
	}
	return &c
}

// fillVerdict copies a replay's result into the verdict.
// The replay's skipped kinds become the verbs left alone, by kind
// (undomail's own records are none), and those of kinds no replay is
// defined for, which make the verdict not OK.
func fillVerdict(v *CycleVerdict, res replay.Result) {
	v.Replayed, v.Cancelled, v.Failed = res.Replayed, res.Cancelled, res.Failed
	v.Filtered, v.Repaired = res.Filtered, res.Repaired
	v.Users, v.Messages, v.Verify = res.Users, res.Messages, res.Verify
	v.Skipped, v.Unreplayable = nil, nil
	for kind, n := range res.Skipped {
		k, ok := verb.Lookup(kind)
		switch {
		case !ok:
			if v.Unreplayable == nil {
				v.Unreplayable = map[string]int{}
			}
			v.Unreplayable[kind] = n
		case !k.System:
			if v.Skipped == nil {
				v.Skipped = map[string]int{}
			}
			v.Skipped[kind] = n
		}
	}
	v.OK = res.Failed == 0 && res.Verify.OK() && len(v.Unreplayable) == 0
}

// verifyRange refuses to replay a damaged stretch of the log: every
// record after the snapshot must check and every blob they name must
// hash to its name. Nothing is touched when it fails.
func (d *Daemon) verifyRange(ctx context.Context, after int64) error {
	probs, err := d.Log.VerifyRange(ctx, after, 0)
	if err != nil {
		return fmt.Errorf("verify the log to replay: %w", err)
	}
	if len(probs) == 0 {
		return nil
	}
	var what []string
	for _, p := range probs {
		d.logger.Error("undo log damaged in the range to replay", "problem", p.What)
		what = append(what, p.What)
	}
	return fmt.Errorf("the undo log is damaged after log position %d, nothing was changed (undomail fsck --repair mends blobs that have a copy in the mail store):\n  %s",
		after, strings.Join(what, "\n  "))
}

// beginRepair starts a cycle or a split-form rewind: it holds every
// change back, snapshots the present (the repair can itself be undone,
// and a crash in the middle is rolled back to it: RecoverRepair), and
// logs the repair's intent with that snapshot. Nothing is accepted
// between the snapshot and the intent: the gate is held first.
func (d *Daemon) beginRepair(ctx context.Context, args verb.CycleArgs) (intent *undolog.Record, present string, resume func(), err error) {
	wctx, cancelWait := context.WithTimeout(ctx, wedgeTimeout)
	defer cancelWait()
	d.prog.phase("hold")
	resume, err = d.Gate.Hold(wctx)
	if err != nil {
		return nil, "", nil, fmt.Errorf("changes in flight did not finish: %w", err)
	}
	d.prog.phase("snapshot")
	snap, err := d.snapshotHeld(ctx, "before repair to "+args.To, nil, time.Now())
	if err != nil {
		resume()
		return nil, "", nil, fmt.Errorf("snapshot the present first: %w", err)
	}
	args.Present, args.PresentAt = snap.Name, snap.Seq
	b, _ := json.Marshal(args)
	intent = &undolog.Record{Kind: verb.KindCycle, Session: "cycle", Args: b}
	if err := d.Log.Append(ctx, intent); err != nil {
		resume()
		return nil, "", nil, fmt.Errorf("log intent: %w", err)
	}
	if err := d.writeRepairMarker(repairMarker{Cycle: intent.Seq, To: args.To, Present: snap.Name}); err != nil {
		d.logger.Error("write the repair marker (the log's intent record stands)", "err", err)
	}
	return intent, snap.Name, resume, nil
}

func userSet(users []string) map[string]bool {
	if len(users) == 0 {
		return nil
	}
	m := map[string]bool{}
	for _, u := range users {
		m[u] = true
	}
	return m
}
