package verb

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// The outbound delay window's records (internal/outbound,
// docs/operations.md "Outbound delay window"): mail Postfix would relay
// to an external host waits in its deferred queue; the log keeps which
// messages wait, and what became of each.
const (
	// KindOutboundHeld: a message waits in the window. Args are an
	// OutboundHeld.
	KindOutboundHeld = "outbound.held"
	// KindOutboundReleased: a held message (Ref) was handed back to
	// Postfix to leave. Args are an OutboundEnd.
	KindOutboundReleased = "outbound.released"
	// KindOutboundCancelled: a held message (Ref) was removed from
	// Postfix's queue; it never leaves. Args are an OutboundEnd.
	KindOutboundCancelled = "outbound.cancelled"
)

// OutboundHeld is a message the window holds: Postfix's queue id, the
// front door's undo id and submission it came from (when it came through
// the front door), its envelope as Postfix queued it (the recipients
// that wait are the external ones), and when its time is up.
type OutboundHeld struct {
	QueueID    string    `json:"queue_id"`
	UndoID     string    `json:"undo_id,omitempty"`
	Submission int64     `json:"submission,omitempty"`
	Sender     string    `json:"sender"`
	Rcpts      []string  `json:"rcpts"`
	Subject    string    `json:"subject,omitempty"`
	MessageID  string    `json:"message_id,omitempty"`
	Arrived    time.Time `json:"arrived"`
	ReleaseAt  time.Time `json:"release_at"`
}

// Who ended a held message's wait (OutboundEnd.By).
const (
	// OutboundByWindow: its time was up.
	OutboundByWindow = "window"
	// OutboundByOperator: the operator released or cancelled it.
	OutboundByOperator = "operator"
	// OutboundByCycle: a cycle cancelled the verb that sent it.
	OutboundByCycle = "cycle"
	// OutboundByPostfix: it left Postfix's queue without undomail (a
	// flush of the whole queue, postsuper -d, its lifetime expired).
	OutboundByPostfix = "postfix"
)

// OutboundEnd is how a held message's wait ended.
type OutboundEnd struct {
	QueueID string `json:"queue_id"`
	By      string `json:"by"`
	// Cycle is the cycle that cancelled it (By "cycle").
	Cycle  int64  `json:"cycle,omitempty"`
	Reason string `json:"reason,omitempty"`
}

// Summary describes a held message in one line.
func (h OutboundHeld) Summary() string {
	var b strings.Builder
	fmt.Fprintf(&b, "<%s> -> %s", h.Sender, strings.Join(angled(h.Rcpts), ", "))
	if h.Subject != "" {
		fmt.Fprintf(&b, " %q", h.Subject)
	}
	fmt.Fprintf(&b, " (Postfix queue id %s", h.QueueID)
	if h.Submission != 0 {
		fmt.Fprintf(&b, ", sent by #%d", h.Submission)
	}
	b.WriteString(")")
	return b.String()
}

func angled(addrs []string) []string {
	out := make([]string, len(addrs))
	for i, a := range addrs {
		out[i] = "<" + a + ">"
	}
	return out
}

func init() {
	register(Kind{Name: KindOutboundHeld, Replay: Replay{Why: "the outbound window's own record of mail Postfix holds; the submission it belongs to is what a cycle replays or cancels"}, Family: "outbound", System: true, Describe: func(r Record) Description {
		var h OutboundHeld
		if json.Unmarshal(r.Args, &h) != nil || h.QueueID == "" {
			return Description{What: "outbound mail held: " + flatten(r.Args)}
		}
		return Description{What: fmt.Sprintf("outbound mail held until %s: %s", h.ReleaseAt.UTC().Format(time.RFC3339), h.Summary())}
	}})
	end := func(verb, tail string) func(Record) Description {
		return func(r Record) Description {
			var e OutboundEnd
			if json.Unmarshal(r.Args, &e) != nil || e.QueueID == "" {
				return Description{What: "outbound mail " + verb + ": " + flatten(r.Args)}
			}
			what := fmt.Sprintf("outbound mail #%d (Postfix queue id %s) %s", r.Ref, e.QueueID, verb)
			switch e.By {
			case OutboundByWindow:
				what += ": its time in the window was up"
			case OutboundByOperator:
				what += " by the operator"
			case OutboundByCycle:
				what += fmt.Sprintf(" by cycle #%d", e.Cycle)
			case OutboundByPostfix:
				what += ": it left Postfix's queue without undomail"
			}
			if e.Reason != "" {
				what += " (" + e.Reason + ")"
			}
			return Description{What: what + tail}
		}
	}
	register(Kind{Name: KindOutboundReleased, Replay: Replay{Why: "mail that left for other hosts cannot be sent again or called back"}, Family: "outbound", System: true, Describe: end("released", "")})
	register(Kind{Name: KindOutboundCancelled, Replay: Replay{Why: "a cancelled message never left; there is nothing to make again"}, Family: "outbound", System: true, Describe: end("cancelled", ": it never leaves")})
}
