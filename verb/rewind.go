package verb

import (
	"encoding/json"
	"fmt"
	"strings"
)

// rewind: the mail store rolled back to a snapshot. Its arguments hold
// every mailbox's counters from before (README: the UIDs clients saw are
// never reused), which are told as a count, not listed.
func init() {
	register(Kind{Name: KindRewind, Replay: Replay{Why: "a rewind is part of the cycle that ran it; the mail it rolled back is made again by replaying the verbs since"}, Family: "rewind", System: true, Describe: func(r Record) Description {
		var a struct {
			Snapshot string `json:"snapshot"`
			AtSeq    int64  `json:"at_seq"`
			Before   []struct {
				User string `json:"user"`
			} `json:"before"`
			Users []string `json:"users"`
		}
		if json.Unmarshal(r.Args, &a) != nil || a.Snapshot == "" {
			return Description{What: "rewind: " + flatten(r.Args), Outcome: flatten(r.Outcome)}
		}
		users := map[string]bool{}
		for _, m := range a.Before {
			users[m.User] = true
		}
		who := plural(len(users), "user")
		if len(a.Users) > 0 {
			who = strings.Join(a.Users, ", ")
		}
		d := Description{What: fmt.Sprintf("rewound %s of %s to snapshot %s (log position %d)",
			plural(len(a.Before), "mailbox"), who, a.Snapshot, a.AtSeq)}
		var o struct {
			OK      bool     `json:"ok"`
			Raised  int      `json:"raised"`
			Renewed []string `json:"renewed"`
			Error   string   `json:"error"`
		}
		switch {
		case !r.Answered:
			d.Outcome = "no outcome: cut off during the rewind"
		case json.Unmarshal(r.Outcome, &o) != nil:
			d.Outcome = flatten(r.Outcome)
		case o.OK:
			d.Outcome = fmt.Sprintf("OK: the counters of %s raised to where clients saw them", plural(o.Raised, "mailbox"))
			if len(o.Renewed) > 0 {
				d.Outcome += "; new UIDVALIDITY for " + strings.Join(o.Renewed, ", ")
			}
		default:
			d.Outcome = "FAILED: " + o.Error
		}
		return d
	}})
}
