package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"time"

	"github.com/undomail/undomail/timetravel"
	"github.com/undomail/undomail/undolog"
)

// KindSnapshot is the verb of a snapshot of the mail store. Its args name
// the snapshot and the log position it was cut at; the same position is
// stored with the snapshot itself (timetravel), so the two can be checked
// against each other (timetravel.Verify) rather than one trusted blindly.
const KindSnapshot = "snapshot"

// SnapshotArgs are the arguments of a snapshot verb.
type SnapshotArgs struct {
	Name   string `json:"name"`
	AtSeq  int64  `json:"at_seq"` // the last record whose effect the snapshot contains
	Store  string `json:"store"`
	Reason string `json:"reason,omitempty"` // "schedule", "on demand", ...
}

// SnapshotOutcome is how the snapshot went.
type SnapshotOutcome struct {
	OK    bool    `json:"ok"`
	Error string  `json:"error,omitempty"`
	Pause float64 `json:"pause_ms"` // how long mutations were held back
}

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
	name := "undomail-" + time.Now().UTC().Format("20060102T150405.000Z")
	wctx, cancel := context.WithTimeout(ctx, wedgeTimeout)
	defer cancel()
	start := time.Now()
	resume, err := d.Gate.Wedge(wctx)
	if err != nil {
		return timetravel.Snapshot{}, 0, fmt.Errorf("snapshot %s: mutations did not finish within %v: %w", name, wedgeTimeout, err)
	}
	at, _ := d.Log.Last()
	args, _ := json.Marshal(SnapshotArgs{Name: name, AtSeq: at, Store: d.storeSpec, Reason: reason})
	intent := &undolog.Record{Kind: KindSnapshot, Session: "daemon", Args: args}
	if err := d.Log.Append(ctx, intent); err != nil {
		resume()
		return timetravel.Snapshot{}, 0, fmt.Errorf("snapshot %s: log intent: %w", name, err)
	}
	snap, serr := d.Store.Snapshot(ctx, name, at, map[string]string{"reason": reason, "log_record": strconv.FormatInt(intent.Seq, 10)})
	resume()
	pause := time.Since(start)
	o := SnapshotOutcome{OK: serr == nil, Pause: float64(pause.Microseconds()) / 1000}
	if serr != nil {
		o.Error = serr.Error()
	}
	out, _ := json.Marshal(o)
	if err := d.Log.Append(ctx, &undolog.Record{Kind: undolog.KindOutcome, Session: "daemon", Ref: intent.Seq, Outcome: out}); err != nil {
		d.logger.Error("log snapshot outcome", "snapshot", name, "err", err)
	}
	if serr != nil {
		return timetravel.Snapshot{}, pause, fmt.Errorf("snapshot %s: %w", name, serr)
	}
	d.logger.Info("snapshot taken", "snapshot", name, "at_seq", at, "pause", pause, "reason", reason)
	return snap, pause, nil
}

// schedule takes snapshots every interval and prunes by the retention
// policy, until ctx ends.
func (d *Daemon) schedule(ctx context.Context, every time.Duration, keepHourly, keepDaily int) {
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
		if err := d.Prune(ctx, keepHourly, keepDaily); err != nil {
			d.logger.Error("pruning snapshots failed", "err", err)
		}
	}
}

// Prune destroys undomail's snapshots the retention policy no longer
// keeps. A snapshot in use (a clone depends on it) is kept and logged.
func (d *Daemon) Prune(ctx context.Context, keepHourly, keepDaily int) error {
	snaps, err := d.Store.List(ctx)
	if err != nil {
		return err
	}
	var ours []timetravel.Snapshot
	for _, s := range snaps {
		if s.Seq != timetravel.NoSeq {
			ours = append(ours, s)
		}
	}
	keep := Retain(ours, time.Now(), keepHourly, keepDaily)
	for _, s := range ours {
		if keep[s.Name] {
			continue
		}
		if err := d.Store.Destroy(ctx, s.Name); err != nil {
			d.logger.Warn("snapshot kept: cannot destroy", "snapshot", s.Name, "err", err)
			continue
		}
		d.logger.Info("snapshot pruned", "snapshot", s.Name, "at_seq", s.Seq)
	}
	return nil
}

// Retain says which snapshots a retention policy keeps: the newest of
// each of the last keepHourly hours and of each of the last keepDaily
// days (UTC), and always the newest snapshot of all.
func Retain(snaps []timetravel.Snapshot, now time.Time, keepHourly, keepDaily int) map[string]bool {
	sorted := append([]timetravel.Snapshot(nil), snaps...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Created.After(sorted[j].Created) })
	keep := map[string]bool{}
	if len(sorted) > 0 {
		keep[sorted[0].Name] = true
	}
	bucket := func(n int, size time.Duration, trunc func(time.Time) time.Time) {
		seen := map[time.Time]bool{}
		for _, s := range sorted { // newest first: the first of a bucket is its newest
			b := trunc(s.Created.UTC())
			if now.Sub(b) >= time.Duration(n)*size || seen[b] {
				continue
			}
			seen[b] = true
			keep[s.Name] = true
		}
	}
	bucket(keepHourly, time.Hour, func(t time.Time) time.Time { return t.Truncate(time.Hour) })
	bucket(keepDaily, 24*time.Hour, func(t time.Time) time.Time {
		return time.Date(t.Year(), t.Month(), t.Day(), 0, 0, 0, 0, time.UTC)
	})
	return keep
}
