package admin

import (
	"fmt"
	"strings"
	"time"

	"github.com/undomail/undomail/compensate"
	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// The requests and replies of the control socket and the admin API, one
// set shared by the daemon (which answers them), this package (which
// serves them) and the CLI (which asks, through Client). The daemon's
// methods return these types; Client decodes into the same ones.

// CycleRequest is the body of POST /cycles.
type CycleRequest struct {
	To      string          `json:"to"`
	Cancel  []int64         `json:"cancel"`
	Filters []FilterRequest `json:"filters"`
	// Keep leaves the filters active for live mail after the cycle.
	Keep bool `json:"keep,omitempty"`
	// Reason is the operator's why, for the log and the people affected.
	Reason string `json:"reason,omitempty"`
	// Users, if set, are the only users the cycle rewinds and replays;
	// everyone else's mail is left as it is.
	Users []string `json:"users,omitempty"`
}

// FilterRequest is a retroactive filter: a rule and drop or
// move:FOLDER, as the operator gives it and the cycle record keeps it.
type FilterRequest = verb.FilterSpec

// SnapshotReply is the JSON answer to POST /snapshots.
type SnapshotReply struct {
	Name    string    `json:"name"`
	AtSeq   int64     `json:"at_seq"`
	Created time.Time `json:"created"`
	PauseMS float64   `json:"pause_ms"`
	Error   string    `json:"error,omitempty"`
}

// CycleVerdict ends every cycle (DESIGN: "Positive acknowledgement").
type CycleVerdict struct {
	OK        bool   `json:"ok"`
	Cycle     int64  `json:"cycle"` // the cycle's log position
	Present   string `json:"present,omitempty"`
	Replayed  int    `json:"replayed"`
	Cancelled int    `json:"cancelled"`
	Filtered  int    `json:"filtered"`
	Repaired  int    `json:"repaired"` // verbs skipped: their messages were removed by the repair
	Failed    int    `json:"failed"`
	// Skipped counts, by kind, the users' verbs the replay neither made
	// again nor cancelled (package verb says why: no effect of their own,
	// or a kind that is never replayed).
	Skipped map[string]int `json:"skipped,omitempty"`
	// Unreplayable counts, by kind, the verbs of kinds no replay is
	// defined for (a newer undomail wrote them): they were left out, so
	// the verdict is not OK.
	Unreplayable map[string]int `json:"unreplayable,omitempty"`
	Users        int            `json:"users"`
	Messages     int            `json:"messages"` // messages made again
	// Verify compares the store after the replay with the log's
	// prediction. Cycles leave it out (it is empty): they compare with
	// the present instead (Compared). The split form (undomail replay),
	// where the operator repairs the server by hand, still uses it.
	Verify replay.Verification `json:"verify"`
	// Compared is the cycle's verification: the store after the replay
	// compared with the snapshot of the present taken before the rewind;
	// every difference must be explained by the repair. The cycle is OK
	// only if it found nothing else.
	Compared *replay.PresentCheck `json:"compared,omitempty"`
	// Users given to the cycle (--user): the only users rewound, replayed
	// and compared.
	OnlyUsers []string `json:"only_users,omitempty"`
	// ReplayS is how long the replay took, Held how long changes were
	// held back in all.
	ReplayS float64 `json:"replay_s"`
	Held    float64 `json:"held_s"`
	// VerifyS is how long the comparison with the present took.
	VerifyS float64 `json:"verify_s,omitempty"`
	Error   string  `json:"error,omitempty"`
	// Compensation counts the paradoxes the cycle created and what was
	// done about them: explained, silent, notified, by kind (issue 6).
	Compensation *compensate.Report `json:"compensation,omitempty"`
	// Outbound are the messages the cycle cancelled in the outbound delay
	// window (their submissions were cancelled): they never leave.
	// OutboundErr says what could not be cancelled (it had left).
	Outbound    []string `json:"outbound,omitempty"`
	OutboundErr string   `json:"outbound_error,omitempty"`
}

// Problems counts the differences verification found.
func (v *CycleVerdict) Problems() int {
	n := len(v.Verify.Problems) + v.Verify.More
	if v.Compared != nil {
		n += len(v.Compared.Problems) + v.Compared.More
	}
	return n
}

// Check turns a verdict that is not OK into an error.
func (v *CycleVerdict) Check() error {
	switch {
	case v.Failed > 0:
		return fmt.Errorf("%d verbs failed to replay", v.Failed)
	case len(v.Unreplayable) > 0:
		return fmt.Errorf("verbs of kinds this undomail cannot replay were left out: %s", strings.Join(verb.LeftAlone(v.Unreplayable), "; "))
	case !v.Verify.OK():
		return fmt.Errorf("verification found %d differences between the store and the log", len(v.Verify.Problems)+v.Verify.More)
	case v.Compared != nil && !v.Compared.Done:
		return fmt.Errorf("verification: %s", v.Compared.Summary())
	case v.Compared != nil && !v.Compared.OK():
		return fmt.Errorf("verification: the store differs from the present in %d ways the repair does not explain (first: %s); undo this cycle: %s",
			len(v.Compared.Problems)+v.Compared.More, v.Compared.Problems[0], v.UndoCommand())
	}
	return nil
}

// UndoCommand is the one command that undoes the cycle: a cycle back to
// the present it snapshotted first, for the same users.
func (v *CycleVerdict) UndoCommand() string {
	cmd := "undomail cycle run --to " + v.Present
	if len(v.OnlyUsers) > 0 {
		cmd += " --user " + strings.Join(v.OnlyUsers, ",")
	}
	return cmd
}

// PruneReply is the answer to a prune of the undo log.
type PruneReply struct {
	undolog.PruneStats
	Archive   string   `json:"archive,omitempty"`
	Snapshots []string `json:"snapshots,omitempty"` // older snapshots destroyed with it
}
