package admin

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// The timeline folds a cycle's own records into the cycle's row (issue
// #18): its rewind, the snapshot of the present it took first and the
// replay records, each of which is shown on the row of the verb it
// replayed instead. After a cycle the timeline reads as the original
// history, the cycle as one row with its verdict, and its abandoned
// branch.

// row is one row of the timeline's table.
type row struct {
	Verb
	// Replayed is what the newest cycle's replay did with this verb, in
	// words; "" if no cycle replayed it.
	Replayed string
	// ReplayClass colours it: "made" (made again), "removed" (cancelled,
	// filtered, repaired) or "failed".
	ReplayClass string
	// Cycle is set on a cycle's row.
	Cycle *cycleRow
}

// cycleRow is what a cycle's row says besides its arguments and verdict.
type cycleRow struct {
	Rewind  string // the rewind in words
	Present string // the snapshot of the present the cycle took first
	OK      bool
	Done    bool // it has a verdict
}

// folded reports whether records of kind are folded into their cycle on
// a timeline that asks for kinds (none: all).
func folded(kind string, asked []string) bool {
	if kind != verb.KindReplay && kind != verb.KindRewind {
		return false
	}
	return !slices.Contains(asked, kind)
}

// timelinePage reads up to q.Limit rows, newest first, leaving out the
// records folded into their cycles: replays and rewinds, and the
// snapshots cycles took of the present. next is the cursor of older rows
// (0: none). At most maxPages pages are read; a window of nothing but
// folded records ends early with a cursor.
func (s *Server) timelinePage(ctx context.Context, q undolog.PageQuery, cycles []Cycle) (verbs []undolog.Verb, next int64, err error) {
	const maxPages = 40
	presents := map[string]bool{}
	for _, c := range cycles {
		if c.Present != "" {
			presents[c.Present] = true
		}
	}
	want := q.Limit
	for range maxPages {
		p, err := s.log.Page(ctx, q)
		if err != nil {
			return nil, 0, err
		}
		for _, v := range p.Verbs {
			if len(verbs) == want {
				return verbs, verbs[len(verbs)-1].Seq, nil
			}
			if folded(v.Kind, q.Kinds) || (v.Kind == verb.KindSnapshot && len(q.Kinds) == 0 && presents[snapshotName(v)]) {
				continue
			}
			verbs = append(verbs, v)
		}
		if p.Next == 0 {
			return verbs, 0, nil
		}
		q.BeforeSeq = p.Next
	}
	return verbs, q.BeforeSeq, nil
}

func snapshotName(v undolog.Verb) string {
	var a verb.SnapshotArgs
	json.Unmarshal(v.Args, &a)
	return a.Name
}

// cycleRecords reads the records of one kind a cycle wrote between its
// intent and end: its verdict, or for a cycle cut off or running, the
// next cycle (0: the end of the log).
func (s *Server) cycleRecords(ctx context.Context, c Cycle, end int64, kind string) ([]undolog.Verb, error) {
	var out []undolog.Verb
	q := undolog.PageQuery{Kinds: []string{kind}, AfterSeq: c.Seq, BeforeSeq: end, Limit: undolog.MaxPageLimit}
	for {
		p, err := s.log.Page(ctx, q)
		if err != nil {
			return nil, fmt.Errorf("read the %s records of cycle %d: %w", kind, c.Seq, err)
		}
		out = append(out, p.Verbs...)
		if p.Next == 0 {
			return out, nil
		}
		q.AfterSeq = p.Next
	}
}

// fold turns verbs into rows: each verb a cycle replayed says what the
// newest such cycle's replay did, and each cycle's row carries its
// rewind. Only cycles that can concern the verbs shown are read.
func (s *Server) fold(ctx context.Context, verbs []undolog.Verb, cycles []Cycle) ([]row, error) {
	rows := make([]row, len(verbs))
	at := map[int64]int{}
	lo, hi := int64(0), int64(0)
	for i, v := range verbs {
		rows[i] = row{Verb: NewVerb(v)}
		at[v.Seq] = i
		if lo == 0 || v.Seq < lo {
			lo = v.Seq
		}
		hi = max(hi, v.Seq)
	}
	for ci, c := range cycles { // oldest first: the newest replay wins
		if c.Seq < lo || c.AtSeq > hi {
			continue // replays only verbs before it and after its snapshot
		}
		end := c.VerdictSeq
		if end == 0 && ci+1 < len(cycles) {
			end = cycles[ci+1].Seq
		}
		replays, err := s.cycleRecords(ctx, c, end, verb.KindReplay)
		if err != nil {
			return nil, err
		}
		seen := map[int64]bool{}
		for _, r := range replays {
			i, ok := at[r.Ref]
			if !ok {
				continue
			}
			f := verb.DecodeReplayOutcome(r.Record.Outcome)
			text := fmt.Sprintf("cycle #%d: %s", c.Seq, f.Words())
			if f.Status == verb.ReplayOK {
				text = "replayed by " + text
			}
			if f.Detail != "" {
				text += " (" + f.Detail + ")"
			}
			if seen[r.Ref] { // a delivery replayed per recipient
				text = rows[i].Replayed + "; " + f.Line()
			}
			class := "removed"
			switch {
			case strings.Contains(string(f.Status), string(verb.ReplayFailed)):
				class = "failed"
			case f.Status == verb.ReplayOK:
				class = "made"
			}
			rows[i].Replayed, rows[i].ReplayClass, seen[r.Ref] = text, class, true
		}
		if i, ok := at[c.Seq]; ok {
			cr := &cycleRow{Present: c.Present, Done: c.Verdict != nil, OK: c.Verdict != nil && c.Verdict.OK}
			rewinds, err := s.cycleRecords(ctx, c, end, verb.KindRewind)
			if err != nil {
				return nil, err
			}
			for _, rw := range rewinds {
				cr.Rewind = verb.Describe(rw).Line()
			}
			rows[i].Cycle = cr
		}
	}
	return rows, nil
}
