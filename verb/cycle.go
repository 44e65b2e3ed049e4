package verb

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"
)

// cycle: a 3R cycle (rewind, repair, replay; docs: README "Undo your
// first mistake"). Its arguments are the repair, its outcome the verdict.
func init() {
	register(Kind{Name: KindCycle, Replay: Replay{Why: "a cycle changes no mail of its own: its repair (cancellations, filters) stays decided for every later replay"}, Family: "cycle", System: true, Describe: func(r Record) Description {
		var a CycleArgs
		if json.Unmarshal(r.Args, &a) != nil {
			return Description{What: "cycle: " + flatten(r.Args), Outcome: flatten(r.Outcome)}
		}
		d := Description{What: a.Words()}
		if !r.Answered {
			d.Outcome = "no verdict yet: running, or cut off"
			return d
		}
		var v Verdict
		if json.Unmarshal(r.Outcome, &v) != nil {
			d.Outcome = flatten(r.Outcome)
			return d
		}
		d.Outcome = v.Words()
		return d
	}})
}

// CycleArgs are a cycle record's arguments, as the daemon writes them:
// where it rewinds to, the repair, the reason, and the snapshot of the
// present taken first so the cycle itself can be undone. Replay reads
// the repairs of earlier cycles from them.
type CycleArgs struct {
	To      string       `json:"to"`
	At      int64        `json:"at,omitempty"` // the snapshot's log position
	Cancel  []int64      `json:"cancel,omitempty"`
	Filters []FilterSpec `json:"filters,omitempty"`
	Present string       `json:"present"`
	// PresentAt is the present snapshot's log position.
	PresentAt int64  `json:"present_at,omitempty"`
	Reason    string `json:"reason,omitempty"`
	// Users, if set, are the only users the repair rewound and replayed.
	Users []string `json:"users,omitempty"`
	// Split marks the split form: a rewind held for a repair by hand, the
	// replay (undomail replay) to follow; the outcome comes with it.
	Split bool `json:"split,omitempty"`
	// Keep makes the filters stay active for live mail after the cycle.
	Keep bool `json:"keep,omitempty"`
}

// FilterSpec is a retroactive filter as the operator gives it: a rule
// and drop or move:FOLDER.
type FilterSpec struct {
	Rule   string `json:"rule"`
	Action string `json:"action"` // drop, move:FOLDER
}

// Words tells the cycle's repair.
func (a CycleArgs) Words() string {
	var b strings.Builder
	b.WriteString("cycle: rewind")
	if len(a.Users) > 0 {
		b.WriteString(" " + strings.Join(a.Users, ", ") + "'s mail")
	}
	b.WriteString(" to snapshot " + a.To)
	if a.At > 0 {
		fmt.Fprintf(&b, " (log position %d)", a.At)
	}
	var repair []string
	if len(a.Cancel) > 0 {
		repair = append(repair, "cancel "+seqList(a.Cancel))
	}
	for _, f := range a.Filters {
		repair = append(repair, fmt.Sprintf("filter %q: %s", f.Rule, f.Action))
	}
	if a.Keep && len(a.Filters) > 0 {
		repair = append(repair, "keep the filters for live mail")
	}
	if len(repair) > 0 {
		b.WriteString(", " + strings.Join(repair, ", "))
	}
	if a.Split {
		b.WriteString(", held for a repair by hand")
	} else {
		b.WriteString(", replay the rest")
	}
	if a.Reason != "" {
		b.WriteString("; reason: " + a.Reason)
	}
	return b.String()
}

// Verdict is the part of a cycle's verdict that is told.
type Verdict struct {
	OK        bool           `json:"ok"`
	Replayed  int            `json:"replayed"`
	Cancelled int            `json:"cancelled"`
	Filtered  int            `json:"filtered"`
	Repaired  int            `json:"repaired"`
	Failed    int            `json:"failed"`
	Skipped   map[string]int `json:"skipped"`
	// Unreplayable: verbs of kinds no replay is defined for, by kind.
	Unreplayable map[string]int `json:"unreplayable"`
	Users        int            `json:"users"`
	Messages     int            `json:"messages"`
	Verify       struct {
		Users     int      `json:"users"`
		Mailboxes int      `json:"mailboxes"`
		Messages  int      `json:"messages"`
		Problems  []string `json:"problems"`
		More      int      `json:"more"`
	} `json:"verify"`
	Held         float64 `json:"held_s"`
	Error        string  `json:"error"`
	Compensation *struct {
		Explained int      `json:"explained"`
		Notified  int      `json:"notified"`
		Digests   []string `json:"digests"`
		Notice    bool     `json:"notice"`
		Failed    []string `json:"failed"`
	} `json:"compensation"`
}

// Words tells the verdict: verified or FAILED, what the replay did, what
// the check of the store found, and who was told.
func (v Verdict) Words() string {
	var parts []string
	head := "verified"
	if !v.OK {
		head = "FAILED"
	}
	counts := fmt.Sprintf("%d replayed, %d cancelled", v.Replayed, v.Cancelled)
	if v.Filtered > 0 {
		counts += fmt.Sprintf(", %d filtered", v.Filtered)
	}
	if v.Repaired > 0 {
		counts += fmt.Sprintf(", %d removed by the repair", v.Repaired)
	}
	counts += fmt.Sprintf(", %d failed", v.Failed)
	parts = append(parts, head+": "+counts)
	if len(v.Unreplayable) > 0 {
		parts = append(parts, "NOT replayed: "+strings.Join(LeftAlone(v.Unreplayable), ", "))
	}
	if len(v.Skipped) > 0 {
		kinds := make([]string, 0, len(v.Skipped))
		for k, n := range v.Skipped {
			kinds = append(kinds, fmt.Sprintf("%d %s", n, k))
		}
		sort.Strings(kinds)
		// Why each kind was left alone is LeftAlone's business; in one
		// line it is counts.
		parts = append(parts, "left alone (no effect of their own, or never replayed): "+strings.Join(kinds, ", "))
	}
	if v.Verify.Mailboxes > 0 || len(v.Verify.Problems) > 0 {
		s := fmt.Sprintf("store checked against the log: %s, %s, %s", plural(v.Verify.Users, "user"),
			plural(v.Verify.Mailboxes, "mailbox"), plural(v.Verify.Messages, "message"))
		if n := len(v.Verify.Problems) + v.Verify.More; n > 0 {
			s += fmt.Sprintf(", %s, first: %s", plural(n, "problem"), v.Verify.Problems[0])
		}
		parts = append(parts, s)
	}
	if c := v.Compensation; c != nil {
		if len(c.Digests) > 0 {
			parts = append(parts, "explained to "+strings.Join(c.Digests, ", "))
		}
		if c.Notice {
			parts = append(parts, "the operator was sent a notice")
		}
		if len(c.Failed) > 0 {
			parts = append(parts, "could not deliver: "+strings.Join(c.Failed, ", "))
		}
	}
	if v.Held > 0 {
		parts = append(parts, fmt.Sprintf("changes held back %.1f s", v.Held))
	}
	if v.Error != "" {
		parts = append(parts, v.Error)
	}
	return strings.Join(parts, "; ")
}
