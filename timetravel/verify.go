package timetravel

import (
	"context"
	"errors"
	"fmt"
	"sort"
)

// MismatchKind says how a snapshot and the undo log disagree.
type MismatchKind int

const (
	// MissingSnapshot: the log records a snapshot the store does not have.
	MissingSnapshot MismatchKind = iota + 1
	// SeqDiffers: both have the snapshot, with different undo-log positions.
	SeqDiffers
	// Unrecorded: the store has a snapshot with an undo-log position (so
	// undomail took it) that the log does not record.
	Unrecorded
)

// String implements fmt.Stringer.
func (k MismatchKind) String() string {
	switch k {
	case MissingSnapshot:
		return "missing snapshot"
	case SeqDiffers:
		return "seq differs"
	case Unrecorded:
		return "unrecorded snapshot"
	}
	return fmt.Sprintf("MismatchKind(%d)", int(k))
}

// Mismatch is one disagreement between the seq the undo log recorded for a
// snapshot and the seq stored with the snapshot itself.
type Mismatch struct {
	Name string
	Kind MismatchKind
	// LogSeq is the log's position for the snapshot (NoSeq if Unrecorded).
	LogSeq int64
	// StoreSeq is the position stored with the snapshot (NoSeq if
	// MissingSnapshot).
	StoreSeq int64
}

// String implements fmt.Stringer.
func (m Mismatch) String() string {
	return fmt.Sprintf("snapshot %s: %s (log seq %d, store seq %d)", m.Name, m.Kind, m.LogSeq, m.StoreSeq)
}

// Verify compares the undo log's record of snapshots (name → seq) with the
// seq stored with each snapshot in s, and returns every disagreement, sorted
// by name. The caller reports them; it must not guess which side is right.
// Snapshots without a seq (taken by other tools) are ignored. The error is
// non-nil only if the store could not be read.
func Verify(ctx context.Context, s Store, logged map[string]int64) ([]Mismatch, error) {
	snaps, err := s.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("verify snapshots against log: %w", err)
	}
	inStore := make(map[string]Snapshot, len(snaps))
	for _, sn := range snaps {
		inStore[sn.Name] = sn
	}
	var out []Mismatch
	for name, seq := range logged {
		sn, ok := inStore[name]
		if !ok {
			// List is the source of truth, but confirm: a snapshot List
			// skipped as damaged must still be reported, not guessed at.
			got, err := s.Get(ctx, name)
			if err != nil && !errors.Is(err, ErrNotFound) {
				return nil, fmt.Errorf("verify snapshot %s: %w", name, err)
			}
			if err != nil {
				out = append(out, Mismatch{Name: name, Kind: MissingSnapshot, LogSeq: seq, StoreSeq: NoSeq})
				continue
			}
			sn = got
		}
		if sn.Seq != seq {
			out = append(out, Mismatch{Name: name, Kind: SeqDiffers, LogSeq: seq, StoreSeq: sn.Seq})
		}
	}
	for name, sn := range inStore {
		if _, ok := logged[name]; !ok && sn.Seq != NoSeq {
			out = append(out, Mismatch{Name: name, Kind: Unrecorded, LogSeq: NoSeq, StoreSeq: sn.Seq})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}
