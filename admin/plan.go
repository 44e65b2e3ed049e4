package admin

import "time"

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
