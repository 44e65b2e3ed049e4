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
		var a RewindArgs
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
		var o RewindOutcome
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

// MailboxCounters are a mailbox's UID and MODSEQ counters.
type MailboxCounters struct {
	User          string `json:"user"`
	Mailbox       string `json:"mailbox"`
	UIDValidity   uint32 `json:"uidvalidity"`
	UIDNext       uint32 `json:"uidnext"`
	HighestModSeq uint64 `json:"highestmodseq"`
}

// RewindArgs are the arguments of a rewind verb.
type RewindArgs struct {
	Snapshot string            `json:"snapshot"`
	AtSeq    int64             `json:"at_seq"` // the snapshot's log position
	Before   []MailboxCounters `json:"before"`
	// Users, if set, are the only users rewound; everyone else's mail
	// was left as it was.
	Users []string `json:"users,omitempty"`
}

// RewindOutcome is how the rewind went.
type RewindOutcome struct {
	OK bool `json:"ok"`
	// Raised lists the mailboxes whose UIDNEXT/HIGHESTMODSEQ were raised
	// to their pre-rewind values; Renewed those that could not keep their
	// UIDVALIDITY (gone, or recreated since the snapshot).
	Raised  int      `json:"raised"`
	Renewed []string `json:"renewed,omitempty"`
	Error   string   `json:"error,omitempty"`
	// Gone are the counters of the mailboxes the rollback took away
	// (created after the snapshot): when the replay makes one again, it
	// gets its old UIDVALIDITY back with UIDNEXT above every UID it had,
	// so clients that cached it need not start over (Plan.Gone).
	Gone []MailboxCounters `json:"-"`
	// Returning are messages the rollback brought back under UIDs that
	// clients saw disappear (expunged or moved away after the snapshot,
	// or renumbered by an earlier cycle), by user, mailbox and UID: the
	// replay gives those still there at its end a new UID, so a client
	// that synced their disappearance sees them as new mail.
	Returning map[string]map[string][]uint32 `json:"-"`
}
