package replay

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// Branch is a stretch of the timeline a rewind abandoned: the verbs
// logged between the snapshot it went back to and the rewind itself.
// Their effects were rolled back; the replay that followed made the ones
// the repair kept again, on the new branch. The abandoned verbs stay in
// the log, queryable (DESIGN: "The timeline keeps abandoned branches").
type Branch struct {
	ID       int64     `json:"id"` // the rewind's log position
	Time     time.Time `json:"time"`
	Snapshot string    `json:"snapshot"`
	From     int64     `json:"from"` // the snapshot's position: the branch is From < seq < ID
	Cycle    int64     `json:"cycle,omitempty"`
	Reason   string    `json:"reason,omitempty"`
	// Users, if set, are the only users the rewind took back: only their
	// verbs are on the branch.
	Users []string `json:"users,omitempty"`
	Verbs int      `json:"verbs"` // verbs on the branch
	// Fates counts what the replay after the rewind did with them: ok,
	// cancelled, filtered, repaired, failed; verb.NotReplayed for verbs it
	// did not touch (no effect of their own, or no replay yet).
	Fates map[verb.ReplayStatus]int `json:"fates"`
}

// BranchVerb is a verb on an abandoned branch and what became of it.
type BranchVerb struct {
	undolog.Verb
	Fate   verb.ReplayStatus `json:"fate"`
	Detail string            `json:"detail,omitempty"`
}

// Branches lists every branch rewinds abandoned, oldest first.
func Branches(ctx context.Context, l *undolog.Log) ([]Branch, error) {
	bs, _, err := branches(ctx, l, 0)
	return bs, err
}

// BranchVerbs lists the verbs of the branch the rewind at id abandoned
// (id may also name the cycle that ran the rewind), with their fates.
func BranchVerbs(ctx context.Context, l *undolog.Log, id int64) (Branch, []BranchVerb, error) {
	bs, verbs, err := branches(ctx, l, id)
	if err != nil {
		return Branch{}, nil, err
	}
	for _, b := range bs {
		if b.ID == id || (b.Cycle != 0 && b.Cycle == id) {
			return b, verbs, nil
		}
	}
	return Branch{}, nil, fmt.Errorf("no branch %d: undomail log --branches lists them", id)
}

func branches(ctx context.Context, l *undolog.Log, want int64) ([]Branch, []BranchVerb, error) {
	marks, err := l.Verbs(ctx, undolog.Filter{Kinds: []string{verb.KindRewind, verb.KindCycle}})
	if err != nil {
		return nil, nil, fmt.Errorf("read rewinds: %w", err)
	}
	var out []Branch
	var lastCycle undolog.Verb
	for _, v := range marks {
		if v.Kind == verb.KindCycle {
			lastCycle = v
			continue
		}
		var a verb.RewindArgs
		if json.Unmarshal(v.Args, &a) != nil {
			continue
		}
		b := Branch{ID: v.Seq, Time: v.Time, Snapshot: a.Snapshot, From: a.AtSeq, Users: a.Users, Fates: map[verb.ReplayStatus]int{}}
		var c verb.CycleArgs
		if lastCycle.Seq != 0 && json.Unmarshal(lastCycle.Args, &c) == nil && c.To == a.Snapshot {
			b.Cycle, b.Reason = lastCycle.Seq, c.Reason
			lastCycle = undolog.Verb{}
		}
		out = append(out, b)
	}
	var detail []BranchVerb
	for i := range out {
		b := &out[i]
		next := int64(0) // the replay records of this branch come before the next rewind
		if i+1 < len(out) {
			next = out[i+1].ID
		}
		fates, err := replayFates(ctx, l, b.ID, next)
		if err != nil {
			return nil, nil, err
		}
		verbs, err := l.Verbs(ctx, undolog.Filter{AfterSeq: b.From})
		if err != nil {
			return nil, nil, err
		}
		keep := want != 0 && (b.ID == want || b.Cycle == want)
		for _, v := range verbs {
			if v.Seq >= b.ID {
				break
			}
			ts, skip := split(v)
			if skip || len(ts) == 0 || !onBranch(b.Users, ts) {
				continue
			}
			b.Verbs++
			fate, det := verb.NotReplayed, ""
			if f, ok := fates[v.Seq]; ok {
				fate, det = f.Status, f.Detail
			}
			b.Fates[fate]++
			if keep {
				detail = append(detail, BranchVerb{Verb: v, Fate: fate, Detail: det})
			}
		}
	}
	return out, detail, nil
}

// replayFates reads the replay records logged after < seq < before (0:
// to the end), by the verb they replayed. A delivery replayed for several
// recipients gets their statuses joined.
func replayFates(ctx context.Context, l *undolog.Log, after, before int64) (map[int64]verb.ReplayOutcome, error) {
	recs, err := l.Records(ctx, undolog.Filter{AfterSeq: after, Kinds: []string{verb.KindReplay}})
	if err != nil {
		return nil, fmt.Errorf("read replay records: %w", err)
	}
	out := map[int64]verb.ReplayOutcome{}
	for _, r := range recs {
		if before > 0 && r.Seq >= before {
			break
		}
		var o verb.ReplayOutcome
		if json.Unmarshal(r.Outcome, &o) != nil {
			continue
		}
		if prev, ok := out[r.Ref]; ok && prev.Status != o.Status {
			st := strings.Split(string(prev.Status), ",")
			st = append(st, string(o.Status))
			sort.Strings(st)
			o.Status = verb.ReplayStatus(strings.Join(dedup(st), ","))
			o.Detail = prev.Detail + "; " + o.Detail
		}
		out[r.Ref] = o
	}
	return out, nil
}

func dedup(s []string) []string {
	var out []string
	for i, x := range s {
		if i == 0 || x != s[i-1] {
			out = append(out, x)
		}
	}
	return out
}

// onBranch reports whether a verb's tasks touch one of the users a rewind
// took back (all users when it names none).
func onBranch(users []string, ts []task) bool {
	if len(users) == 0 {
		return true
	}
	for _, tk := range ts {
		for _, u := range users {
			if tk.user() == u {
				return true
			}
		}
	}
	return false
}
