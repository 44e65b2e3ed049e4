package verb

import (
	"encoding/json"
	"fmt"
)

// snapshot and snapshot.pruned: a snapshot of the mail store, cut at a
// log position, and its destruction by retention.
func init() {
	register(Kind{Name: KindSnapshot, Replay: Replay{Why: "a snapshot copies the store, it changes no mail"}, Family: "snapshot", System: true, Describe: func(r Record) Description {
		a, ok := snapshotArgs(r)
		if !ok {
			return Description{What: "snapshot: " + flatten(r.Args), Outcome: flatten(r.Outcome)}
		}
		d := Description{What: fmt.Sprintf("snapshot %s at log position %d", a.Name, a.AtSeq)}
		if a.Reason != "" {
			d.What += " (" + a.Reason + ")"
		}
		var o SnapshotOutcome
		switch {
		case !r.Answered:
			d.Outcome = "no outcome: cut off while it was taken"
		case json.Unmarshal(r.Outcome, &o) != nil:
			d.Outcome = flatten(r.Outcome)
		case o.OK:
			d.Outcome = fmt.Sprintf("taken; changes were held back %.1f ms", o.Pause)
		default:
			d.Outcome = "FAILED: " + o.Error
		}
		return d
	}})
	register(Kind{Name: KindSnapshotPruned, Replay: Replay{Why: "retention destroyed a snapshot; no mail changed"}, Family: "snapshot", System: true, Describe: func(r Record) Description {
		a, ok := snapshotArgs(r)
		if !ok {
			return Description{What: "snapshot pruned: " + flatten(r.Args)}
		}
		d := Description{What: "snapshot " + a.Name + " destroyed"}
		if a.Reason != "" {
			d.What += " by " + a.Reason
		}
		return d
	}})
}

// SnapshotArgs are the arguments of a snapshot record (and of a
// snapshot.pruned one, which names the snapshot destroyed).
type SnapshotArgs struct {
	Name   string `json:"name"`
	AtSeq  int64  `json:"at_seq"` // the last record whose effect the snapshot contains
	Store  string `json:"store"`
	Reason string `json:"reason,omitempty"` // "schedule", "on demand", ...
}

// SnapshotOutcome is how a snapshot went.
type SnapshotOutcome struct {
	OK    bool    `json:"ok"`
	Error string  `json:"error,omitempty"`
	Pause float64 `json:"pause_ms"` // how long mutations were held back
}

func snapshotArgs(r Record) (SnapshotArgs, bool) {
	var a SnapshotArgs
	return a, json.Unmarshal(r.Args, &a) == nil && a.Name != ""
}
