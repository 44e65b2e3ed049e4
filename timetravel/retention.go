package timetravel

import (
	"context"
	"log/slog"
	"sort"
	"time"
)

// Retain says which snapshots a retention policy keeps: the newest of
// each of the last keepHourly hours and of each of the last keepDaily
// days (UTC), and always the newest snapshot of all.
func Retain(snaps []Snapshot, now time.Time, keepHourly, keepDaily int) map[string]bool {
	sorted := append([]Snapshot(nil), snaps...)
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

// Prune destroys the snapshots undomail took (those with a log position)
// that the retention policy no longer keeps, and returns their names.
// Snapshots of other tools are left alone, and so is one the store
// refuses to destroy (ErrInUse: a drill's clone or a branch depends on
// it), which is logged.
func Prune(ctx context.Context, s Store, now time.Time, keepHourly, keepDaily int, logger *slog.Logger) ([]string, error) {
	if logger == nil {
		logger = slog.Default()
	}
	snaps, err := s.List(ctx)
	if err != nil {
		return nil, err
	}
	var ours []Snapshot
	for _, sn := range snaps {
		if sn.Seq != NoSeq {
			ours = append(ours, sn)
		}
	}
	keep := Retain(ours, now, keepHourly, keepDaily)
	var pruned []string
	for _, sn := range ours {
		if keep[sn.Name] {
			continue
		}
		if err := s.Destroy(ctx, sn.Name); err != nil {
			logger.Warn("snapshot kept: cannot destroy", "snapshot", sn.Name, "err", err)
			continue
		}
		logger.Info("snapshot pruned", "snapshot", sn.Name, "seq", sn.Seq)
		pruned = append(pruned, sn.Name)
	}
	return pruned, nil
}
