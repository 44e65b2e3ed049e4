package verb

import (
	"encoding/json"
	"fmt"
	"strings"
)

// replay: what replaying one logged verb did; Ref names the verb. The
// outcome (a ReplayOutcome) is on the record itself. A delivery to
// several recipients is replayed per recipient, with one record per
// recipient's user.
func init() {
	register(Kind{Name: KindReplay, Replay: Replay{Why: "it is the result of replaying another record"}, Family: "replay", System: true, Describe: func(r Record) Description {
		d := Description{What: fmt.Sprintf("replay of #%d", r.Ref)}
		if r.User != "" {
			d.What += " for " + r.User
		}
		d.Outcome = DecodeReplayOutcome(r.Outcome).Line()
		return d
	}})
}

// ReplayStatus is what a replay did with one verb: the status of a
// replay record's outcome. It is a string in the log's JSON. Where one
// verb has several replay records (a delivery replayed per recipient),
// their statuses may be shown joined with commas.
type ReplayStatus string

// The statuses a replay gives a verb. Each is defined here once; replay
// writes them, compensate, the plan, the CLI and the web timeline read
// them.
const (
	// ReplayOK: the verb was made again.
	ReplayOK ReplayStatus = "ok"
	// ReplayFailed: making it again failed; the cycle is not OK.
	ReplayFailed ReplayStatus = "failed"
	// ReplayCancelled: the repair (or an earlier one) left it out.
	ReplayCancelled ReplayStatus = "cancelled"
	// ReplayFiltered: a retroactive filter dropped the delivery or filed
	// it elsewhere.
	ReplayFiltered ReplayStatus = "filtered"
	// ReplayRepaired: the verb acted only on messages the repair removed.
	ReplayRepaired ReplayStatus = "repaired"
	// ReplaySkipped: it had no effect of its own to make again. Counted
	// by kind, never recorded.
	ReplaySkipped ReplayStatus = "skipped"
	// ReplayRerouted: the repaired Postfix delivered the re-injected
	// message, but not to this recipient: its first delivery here was the
	// mistake the repair corrected (a wrong virtual alias). Detail names
	// where it went.
	ReplayRerouted ReplayStatus = "rerouted"
	// ReplayRefused: the repaired Postfix refused the message or gave it
	// to no local mailbox at all.
	ReplayRefused ReplayStatus = "refused"
	// ReplayReinjected is the record of a re-injection itself, Ref the
	// front-door submission: its Args are the delivery Postfix made (a
	// DeliveryArgs), its blob the message as Postfix delivered it.
	ReplayReinjected ReplayStatus = "reinjected"
	// ReplayHeld: the repaired Postfix delivers the message to a
	// destination that is no mailbox here (an alias fixed to point
	// outside). A replay never sends mail off the machine: it is held for
	// the operator, who finds it in the re-injection's record.
	ReplayHeld ReplayStatus = "held"
	// NotReplayed is said of a verb on an abandoned branch that no replay
	// touched (no effect of its own, or no replay yet); never recorded.
	NotReplayed ReplayStatus = "not replayed"
	// ReplayUnknown is said of a replay record whose outcome does not
	// decode; never recorded.
	ReplayUnknown ReplayStatus = "unknown"
)

// replayWords names each status for people.
var replayWords = map[ReplayStatus]string{
	ReplayOK: "made again", ReplayCancelled: "cancelled", ReplayFiltered: "removed by a filter",
	ReplayRepaired: "skipped: its messages were removed by the repair", ReplayFailed: "FAILED", ReplaySkipped: "no effect of its own",
	ReplayRerouted: "rerouted by the repaired mail system", ReplayRefused: "refused by the repaired mail system",
	ReplayReinjected: "handed to the repaired mail system again", ReplayHeld: "held for the operator",
	NotReplayed: "not replayed", ReplayUnknown: "unknown",
}

// Words names the status: "made again", "cancelled", ... Joined
// statuses are named one by one, comma-separated.
func (s ReplayStatus) Words() string {
	parts := strings.Split(string(s), ",")
	for i, p := range parts {
		if n, ok := replayWords[ReplayStatus(p)]; ok {
			parts[i] = n
		}
	}
	return strings.Join(parts, ", ")
}

// ReplayOutcome is the result of replaying one verb: the outcome of a
// replay record.
type ReplayOutcome struct {
	Status ReplayStatus `json:"status"`
	Detail string       `json:"detail,omitempty"`
	// Placed says where the replay put messages that carry no
	// Undomail-Id field of their own (APPENDs and their copies): the IMAP
	// front end learns their undo ids from it, so the user's verbs on them
	// after the cycle name them by undo id too.
	Placed []Placed `json:"placed,omitempty"`
}

// Placed is one message a replay put in a mailbox.
type Placed struct {
	Mailbox     string `json:"mailbox"`
	UIDValidity uint32 `json:"uidvalidity"`
	UID         uint32 `json:"uid"`
	UndoID      string `json:"undo_id"`
}

// DecodeReplayOutcome decodes a replay record's outcome; one that does
// not decode is ReplayUnknown, its JSON told in words.
func DecodeReplayOutcome(raw json.RawMessage) ReplayOutcome {
	var o ReplayOutcome
	if json.Unmarshal(raw, &o) != nil || o.Status == "" {
		return ReplayOutcome{Status: ReplayUnknown, Detail: flatten(raw)}
	}
	return o
}

// Words names the outcome's status (ReplayStatus.Words).
func (o ReplayOutcome) Words() string { return o.Status.Words() }

// Line is the status and its detail: "cancelled: left out by the repair".
func (o ReplayOutcome) Line() string {
	s := o.Words()
	if o.Detail != "" {
		s += ": " + o.Detail
	}
	if len(o.Placed) > 0 {
		where := make([]string, len(o.Placed))
		for i, p := range o.Placed {
			where[i] = fmt.Sprintf("%q uid %d", p.Mailbox, p.UID)
		}
		s += "; placed " + plural(len(o.Placed), "message") + " at " + strings.Join(where, ", ")
	}
	return s
}
