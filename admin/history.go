package admin

import (
	"context"
	"encoding/json"
	"time"

	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// Verb is a verb as the API returns it: the fields of `undomail log
// --json` plus the record in words, from package verb.
type Verb struct {
	Seq        int64           `json:"seq"`
	Time       time.Time       `json:"time"`
	User       string          `json:"user"`
	Session    string          `json:"session"`
	Kind       string          `json:"kind"`
	Users      []string        `json:"users,omitempty"`
	Blob       string          `json:"blob,omitempty"`
	Args       json.RawMessage `json:"args,omitempty"`
	Summary    string          `json:"summary"` // what was done, in words (verb.Description.What)
	OutcomeSeq int64           `json:"outcome_seq,omitempty"`
	Outcome    json.RawMessage `json:"outcome,omitempty"`
	Result     string          `json:"result,omitempty"` // the outcome in words
	// Description is the record in one line of words, what and outcome:
	// what a person reads where the JSON above is for programs.
	Description string `json:"description"`
	// ForUser is how the record is told to the user it concerns.
	ForUser string `json:"for_user,omitempty"`
	// Header is a delivered or compensating message's headers.
	Header *verb.HeaderInfo `json:"header,omitempty"`
	// Paradoxes are what a compensation explains: the verbs whose
	// result a cycle changed after someone had seen it.
	Paradoxes []Paradox `json:"paradoxes,omitempty"`
}

// Paradox is the part of a compensated paradox the admin shows.
type Paradox struct {
	Kind     string `json:"kind"`
	User     string `json:"user,omitempty"`
	Verb     int64  `json:"verb"`
	VerbKind string `json:"verb_kind"`
}

// NewVerb converts a logged verb and describes it (verb.Describe). An
// outcome carried on the record itself (drills, replays, compensations)
// is shown like a separate outcome record.
func NewVerb(v undolog.Verb) Verb {
	out := Verb{Seq: v.Seq, Time: v.Time, User: v.User, Session: v.Session, Kind: v.Kind,
		Users: v.Users, Blob: v.Blob, Args: v.Args, Outcome: v.Record.Outcome}
	if v.Outcome != nil {
		out.OutcomeSeq, out.Outcome = v.Outcome.Seq, v.Outcome.Outcome
	}
	d := verb.Describe(v)
	out.Summary, out.Result, out.Description, out.ForUser = d.What, d.Outcome, d.Line(), d.ForUser
	switch v.Kind {
	case verb.KindSMTPSubmit, verb.KindLMTPDeliver, verb.KindCompensation:
		var a struct {
			Header    verb.HeaderInfo `json:"header"`
			Paradoxes []Paradox       `json:"paradoxes"`
		}
		if json.Unmarshal(v.Args, &a) == nil {
			out.Header, out.Paradoxes = &a.Header, a.Paradoxes
		}
	}
	return out
}

// Snapshot is a snapshot the log says was taken.
type Snapshot struct {
	Name    string    `json:"name"`
	AtSeq   int64     `json:"at_seq"` // the last record whose effect it contains
	Seq     int64     `json:"seq"`    // the snapshot's own record
	Time    time.Time `json:"time"`
	Reason  string    `json:"reason,omitempty"`
	PauseMS float64   `json:"pause_ms"`
	Pruned  bool      `json:"pruned,omitempty"` // destroyed by retention
}

// Cycle is a 3R cycle from the log. Its abandoned branch is the verbs
// with AtSeq < seq < Seq: what happened between the snapshot it rewound
// to and the cycle.
type Cycle struct {
	Seq   int64     `json:"seq"`
	Time  time.Time `json:"time"`
	To    string    `json:"to"`
	AtSeq int64     `json:"at_seq"`
	// SnapshotSeq is the record of the snapshot it rewound to: the
	// abandoned branch starts after it.
	SnapshotSeq int64           `json:"snapshot_seq"`
	Cancel      []int64         `json:"cancel,omitempty"`
	Filters     []FilterRequest `json:"filters,omitempty"`
	Present     string          `json:"present,omitempty"`
	// Verdict is nil while the cycle runs (or if it was cut off);
	// VerdictSeq is its record. The cycle's own records (its rewind and
	// replays) are between Seq and VerdictSeq.
	Verdict    *CycleVerdict   `json:"verdict,omitempty"`
	VerdictSeq int64           `json:"verdict_seq,omitempty"`
	Raw        json.RawMessage `json:"verdict_raw,omitempty"`
}

// Drill is a recovery drill's verdict.
type Drill struct {
	Seq         int64             `json:"seq"`
	Time        time.Time         `json:"time"`
	OK          bool              `json:"ok"`
	From        string            `json:"from"`
	To          string            `json:"to"`
	Differences []json.RawMessage `json:"differences,omitempty"`
}

// allOf reads every verb of the given kinds, oldest first. Only for the
// kinds with few records (snapshots, cycles, drills).
func allOf(ctx context.Context, l *undolog.Log, kinds ...string) ([]undolog.Verb, error) {
	var out []undolog.Verb
	q := undolog.PageQuery{Kinds: kinds, Limit: undolog.MaxPageLimit}
	for {
		p, err := l.Page(ctx, q)
		if err != nil {
			return nil, err
		}
		out = append(out, p.Verbs...)
		if p.Next == 0 {
			return out, nil
		}
		q.AfterSeq = p.Next
	}
}

// Snapshots returns the snapshots the log records, oldest first, pruned
// ones marked; failed snapshots are left out.
func Snapshots(ctx context.Context, l *undolog.Log) ([]Snapshot, error) {
	vs, err := allOf(ctx, l, verb.KindSnapshot, verb.KindSnapshotPruned)
	if err != nil {
		return nil, err
	}
	var out []Snapshot
	idx := map[string]int{}
	for _, v := range vs {
		var a verb.SnapshotArgs
		if json.Unmarshal(v.Args, &a) != nil {
			continue
		}
		if v.Kind == verb.KindSnapshotPruned {
			if i, ok := idx[a.Name]; ok {
				out[i].Pruned = true
			}
			continue
		}
		var o verb.SnapshotOutcome
		if v.Outcome == nil || json.Unmarshal(v.Outcome.Outcome, &o) != nil || !o.OK {
			continue
		}
		idx[a.Name] = len(out)
		out = append(out, Snapshot{Name: a.Name, AtSeq: a.AtSeq, Seq: v.Seq, Time: v.Time, Reason: a.Reason, PauseMS: o.Pause})
	}
	return out, nil
}

// Cycles returns the cycles in the log, oldest first.
func Cycles(ctx context.Context, l *undolog.Log, snaps []Snapshot) ([]Cycle, error) {
	vs, err := allOf(ctx, l, verb.KindCycle)
	if err != nil {
		return nil, err
	}
	at := snapshotIndex(snaps)
	var out []Cycle
	for _, v := range vs {
		out = append(out, cycleOf(v, at))
	}
	return out, nil
}

// snapshotIndex maps snapshot names to snapshots.
func snapshotIndex(snaps []Snapshot) map[string]Snapshot {
	at := map[string]Snapshot{}
	for _, s := range snaps {
		at[s.Name] = s
	}
	return at
}

func cycleOf(v undolog.Verb, at map[string]Snapshot) Cycle {
	var a verb.CycleArgs
	json.Unmarshal(v.Args, &a)
	c := Cycle{Seq: v.Seq, Time: v.Time, To: a.To, AtSeq: at[a.To].AtSeq, SnapshotSeq: at[a.To].Seq,
		Cancel: a.Cancel, Filters: a.Filters, Present: a.Present}
	if v.Outcome != nil {
		c.Raw, c.VerdictSeq = v.Outcome.Outcome, v.Outcome.Seq
		var vd CycleVerdict
		if json.Unmarshal(v.Outcome.Outcome, &vd) == nil {
			c.Verdict = &vd
		}
	}
	return c
}

// Drills returns the drill verdicts in the log, oldest first.
func Drills(ctx context.Context, l *undolog.Log) ([]Drill, error) {
	vs, err := allOf(ctx, l, verb.KindDrill)
	if err != nil {
		return nil, err
	}
	return drillsOf(vs)
}

// drillsOf decodes drill records. The verdict may be carried on the
// record itself or on an outcome record referring to it.
func drillsOf(vs []undolog.Verb) ([]Drill, error) {
	var out []Drill
	for _, v := range vs {
		var d Drill
		o := v.Record.Outcome
		if v.Outcome != nil {
			o = v.Outcome.Outcome
		}
		json.Unmarshal(o, &d)
		d.Seq, d.Time = v.Seq, v.Time
		out = append(out, d)
	}
	return out, nil
}
