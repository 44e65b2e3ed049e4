package admin

import (
	"time"

	"github.com/undomail/undomail/verb"
)

// Plan is what a 3R cycle would do, computed from the log before it runs
// (DESIGN: "A cycle is planned first ... Plans are shown to the
// operator"). daemon.PlanCycle computes it.
type Plan struct {
	To     string     `json:"to"`
	AtSeq  int64      `json:"at_seq"`
	Verbs  []PlanStep `json:"verbs"`
	Counts struct {
		Replay   int `json:"replay"`
		Cancel   int `json:"cancel"`
		NoEffect int `json:"no_effect"`
	} `json:"counts"`
	// NotReplayed counts, by kind, the users' verbs after the snapshot
	// the cycle neither replays nor cancels: those without an effect of
	// their own and the kinds that are never replayed (package verb says
	// why). Unreplayable counts the verbs of kinds no replay is defined
	// for: the cycle would leave them out, and its verdict is not OK.
	NotReplayed  map[string]int `json:"not_replayed,omitempty"`
	Unreplayable map[string]int `json:"unreplayable,omitempty"`
	// ComesBack and Goes say, per cancelled verb, what the cycle undoes:
	// what the verb had taken away comes back, what it had added goes.
	ComesBack []string `json:"comes_back,omitempty"`
	Goes      []string `json:"goes,omitempty"`
	// Compensations are the people who were shown something the cycle
	// removes: they get an explanation (issue 6).
	Compensations []PlanCompensation `json:"compensations,omitempty"`
	// Outbound are the messages the outbound delay window holds
	// (smtp.outbound_delay): the cycle cancels those whose submission it
	// cancels; the others leave when their time is up.
	Outbound []PlanOutbound `json:"outbound,omitempty"`
}

// PlanOutbound is a message the outbound delay window holds.
type PlanOutbound struct {
	Seq        int64     `json:"seq"` // its outbound.held record
	QueueID    string    `json:"queue_id"`
	Submission int64     `json:"submission,omitempty"`
	What       string    `json:"what"`
	ReleaseAt  time.Time `json:"release_at"`
	Action     string    `json:"action"` // cancel, or leaves when its time is up
}

// LeftAlone tells the verbs the cycle neither replays nor cancels, a
// line a kind, with why.
func (p *Plan) LeftAlone() []string {
	return append(verb.LeftAlone(p.Unreplayable), verb.LeftAlone(p.NotReplayed)...)
}

// PlanStep is one logged change after the snapshot.
type PlanStep struct {
	Seq    int64  `json:"seq"`
	Kind   string `json:"kind"`
	User   string `json:"user"`
	What   string `json:"what"`
	Action string `json:"action"`           // replay, cancel, no effect
	Effect string `json:"effect,omitempty"` // for cancelled verbs: what the cancellation changes
}

// PlanCompensation is a user who saw a message the cycle removes.
type PlanCompensation struct {
	User string `json:"user"`
	Seq  int64  `json:"seq"` // the cancelled verb that made the message
	Why  string `json:"why"`
}
