// Package compensate finds the paradoxes a 3R cycle created and explains
// them to the people affected (docs/architecture.md,
// "Compensation": leave the inconsistency, but explain it to the user).
//
// A paradox is a difference between what someone already observed (the
// reply a sender got, the message a user was shown, the OK an IMAP client
// heard) and the timeline after the cycle. Each verb kind's check
// (checks.go) compares the result recorded when the verb first ran with the
// result its replay recorded. What nobody observed (a spam message never
// fetched) is counted as silent and explained to no one.
//
// Each observed paradox gets its kind's policy: ignore it, explain it to
// the user in one digest per user per cycle (digest.go), or only notify
// the operator. Digests and the operator notice are delivered straight to
// Dovecot's LMTP and logged as verbs of their own (kind
// verb.KindCompensation, record.go), so a later cycle re-delivers them
// and never explains the same paradox twice.
package compensate

import (
	"fmt"
	"slices"
	"time"
)

// Kind is a kind of paradox.
type Kind string

// The paradox kinds. Each names what the person observed and what is
// different now.
const (
	// ReadRemoved: a message the user read (an imap.fetch record names
	// it) no longer exists after the repair: a retroactive filter dropped
	// it, the operator cancelled its delivery, or it could not be made
	// again.
	ReadRemoved Kind = "read_removed"
	// ReadMoved: a message the user read in one place was filed
	// elsewhere by a retroactive filter (move:FOLDER).
	ReadMoved Kind = "read_moved"
	// ReadChanged: a message the user read has different content after
	// the replay than the message as it was first delivered or appended.
	ReadChanged Kind = "read_changed"
	// DeliveryLost: a sender was told a message was delivered (2xx) and
	// after the repair it is not (dropped, cancelled, rejected on replay).
	DeliveryLost Kind = "delivery_lost"
	// ActionFailed: an IMAP command the user was told succeeded (OK)
	// failed on replay, or acted on messages the repair removed: a flag
	// change on a message that is gone, a folder that can no longer be
	// created or renamed.
	ActionFailed Kind = "action_failed"
	// SentOnwards: the user copied, moved or sent onwards (a reply or
	// forward at the front door naming it) a message the repair removed.
	SentOnwards Kind = "sent_onwards"
	// ActionCancelled: a command the user was told succeeded was left
	// out of the replay by the operator (a cancelled DELETE: the folder
	// is back).
	ActionCancelled Kind = "action_cancelled"
	// Restored: a message an earlier digest told the user had been
	// removed is in their mailbox again: the repair that removed it was
	// undone (a cycle back to the snapshot taken before it). Its policy
	// follows read_removed's unless set on its own: it corrects what
	// that explanation said.
	Restored Kind = "restored"
	// Misdelivered: a message the user read was never theirs: the
	// repaired mail system (a wrong virtual alias fixed, replayed through
	// Postfix) delivers it to someone else, and it left the user's
	// mailbox. The operator notice lists it as exposure: which message,
	// seen by whom, when.
	Misdelivered Kind = "misdelivered"
	// RefusedByMistake: mail to the user was refused (5xx) during the bad
	// period, its sender told it could not be delivered; the repaired
	// mail system accepted it on replay and it is in the user's mailbox
	// now. The operator notice lists the sender who was told 5xx.
	RefusedByMistake Kind = "refused_by_mistake"
	// HeldOutside: the repaired mail system delivers a message to a
	// destination that is no mailbox here (an alias fixed to point
	// outside); the replay held it instead of sending it. For the
	// operator, who decides whether it goes.
	HeldOutside Kind = "held_outside"
)

// Kinds lists every paradox kind, in the order digests present them.
var Kinds = []Kind{ReadRemoved, ReadMoved, ReadChanged, DeliveryLost, ActionFailed, SentOnwards, ActionCancelled, Restored, Misdelivered, RefusedByMistake, HeldOutside}

// Policy says what is done about an observed paradox of a kind.
type Policy string

// Policies.
const (
	// Ignore: the inconsistency is tolerable (the seed: "appropriate where
	// the application already has loose consistency"); it is counted only.
	Ignore Policy = "ignore"
	// Explain: the user who observed it gets it explained in their digest;
	// the operator notice, when configured, lists it too. A paradox
	// observed by someone outside (an external sender) has no mailbox
	// here to explain to and is notified instead.
	Explain Policy = "explain"
	// Notify: only the operator is told (the cycle's verdict and, when
	// configured, the operator notice).
	Notify Policy = "notify"
)

// ParsePolicy parses a policy name.
func ParsePolicy(s string) (Policy, error) {
	switch p := Policy(s); p {
	case Ignore, Explain, Notify:
		return p, nil
	}
	return "", fmt.Errorf("policy %q: want ignore, explain or notify", s)
}

// DefaultPolicies returns the policy of each kind when none is configured.
// A message filed into another folder is still there to find: moving mail
// between folders is the loose consistency users live with, and a command
// the operator cancelled was cancelled on purpose, usually at the user's
// request. Everything else contradicts what a person was told and is
// explained.
func DefaultPolicies() map[Kind]Policy {
	return map[Kind]Policy{
		ReadRemoved:      Explain,
		ReadMoved:        Ignore,
		ReadChanged:      Explain,
		DeliveryLost:     Explain,
		ActionFailed:     Explain,
		SentOnwards:      Explain,
		ActionCancelled:  Ignore,
		Restored:         Explain,
		Misdelivered:     Explain,
		RefusedByMistake: Explain,
		HeldOutside:      Notify,
	}
}

// Message is what the log knows about a message a paradox is about.
type Message struct {
	UndoID    string `json:"undo_id"`
	MessageID string `json:"message_id,omitempty"`
	Subject   string `json:"subject,omitempty"`
	From      string `json:"from,omitempty"`
	Date      string `json:"date,omitempty"`
}

// Paradox is one observed difference between the first timeline and the
// one after a cycle.
type Paradox struct {
	Kind Kind `json:"kind"`
	// User observed it: the mailbox owner who read the message or whose
	// command was told OK, the local sender told 250. "" for someone
	// outside (an external sender told 250).
	User string `json:"user,omitempty"`
	// Verb is the seq of the original verb whose result changed (the
	// delivery, the STORE, the RENAME, the submission that sent it
	// onwards); VerbKind its kind.
	Verb     int64    `json:"verb"`
	VerbKind string   `json:"verb_kind"`
	Message  *Message `json:"message,omitempty"`
	// Action is the user's command in words (action_failed,
	// sent_onwards); Rcpt the recipient of a lost delivery.
	Action string `json:"action,omitempty"`
	Rcpt   string `json:"rcpt,omitempty"`
	// Seen is when the person observed the first result: the first fetch
	// of a message, the time of the command or delivery.
	Seen time.Time `json:"seen"`
	// Now says what the timeline holds instead, from the replay's record
	// ("dropped by filter header:Subject=~(?i)lottery").
	Now string `json:"now"`
	// Observed is false for a paradox nobody saw (counted as silent).
	Observed bool `json:"-"`
}

// Key identifies a paradox across cycles: who, which verb, which kind and
// which message. A later cycle that finds a paradox with the key of one
// already compensated leaves it alone.
func (p Paradox) Key() string {
	id := ""
	if p.Message != nil {
		id = p.Message.UndoID
	}
	return fmt.Sprintf("%s|%s|%d|%s|%s", p.Kind, p.User, p.Verb, id, p.Rcpt)
}

// Counts are the paradoxes of a cycle by what was done about them.
type Counts struct {
	Explained int `json:"explained"` // in a user's digest
	Silent    int `json:"silent"`    // nobody observed them
	Notified  int `json:"notified"`  // told the operator only
	Ignored   int `json:"ignored"`   // policy ignore
	// Already were compensated by an earlier cycle (a digest or notice in
	// the log names them).
	Already int `json:"already"`
}

func (c *Counts) add(o Counts) {
	c.Explained += o.Explained
	c.Silent += o.Silent
	c.Notified += o.Notified
	c.Ignored += o.Ignored
	c.Already += o.Already
}

// Report is the compensation part of a cycle's verdict.
type Report struct {
	Counts
	// Kinds breaks the counts down by paradox kind.
	Kinds map[Kind]Counts `json:"kinds,omitempty"`
	// Digests are the users who were sent a digest; Notice is set when
	// the operator was sent a notice.
	Digests []string `json:"digests,omitempty"`
	Notice  bool     `json:"notice,omitempty"`
	// Records are the seqs of the compensation verbs logged.
	Records []int64 `json:"records,omitempty"`
	// Failed lists digests or notices that could not be delivered.
	Failed []string `json:"failed,omitempty"`
	// Paradoxes are the observed paradoxes this cycle compensated or
	// notified (not the silent, ignored or already compensated ones).
	Paradoxes []Paradox `json:"paradoxes,omitempty"`
}

func (r *Report) count(k Kind, c Counts) {
	if r.Kinds == nil {
		r.Kinds = map[Kind]Counts{}
	}
	kc := r.Kinds[k]
	kc.add(c)
	r.Kinds[k] = kc
	r.Counts.add(c)
}

// sortParadoxes orders paradoxes for people: by kind as in Kinds, then by
// when they were observed, then by verb.
func sortParadoxes(ps []Paradox) {
	rank := func(k Kind) int { return slices.Index(Kinds, k) }
	slices.SortStableFunc(ps, func(a, b Paradox) int {
		if d := rank(a.Kind) - rank(b.Kind); d != 0 {
			return d
		}
		if c := a.Seen.Compare(b.Seen); c != 0 {
			return c
		}
		switch {
		case a.Verb < b.Verb:
			return -1
		case a.Verb > b.Verb:
			return 1
		}
		return 0
	})
}
