package verb

import (
	"encoding/json"
	"strings"
)

// smtp.submit and lmtp.deliver: a transaction at the front door (SMTP,
// RFC 5321) and a final delivery captured on the LMTP path (RFC 2033).
// The message is the record's blob.
func init() {
	register(Kind{Name: KindSMTPSubmit, Replay: Replay{Why: "a submission changes no mailbox itself: the deliveries it caused (lmtp.deliver) are replayed, or it is handed to the repaired Postfix again when a replay service is configured (docs/operations.md, \"Replay through Postfix\")"}, Family: "delivery", Answered: true, Describe: func(r Record) Description {
		d, a, ok := delivery(r)
		if ok {
			d.ForUser = "you sent " + subject(a.Header) + " to " + strings.Join(a.Rcpts, ", ")
		}
		return d
	}})
	register(Kind{Name: KindLMTPDeliver, Replay: Replay{How: "re-delivered over LMTP to each recipient that accepted it, or re-injected through Postfix's replay service"}, Family: "delivery", Answered: true, Describe: func(r Record) Description {
		d, a, ok := delivery(r)
		if ok {
			from := a.Header.From
			if from == "" {
				from = a.MailFrom
			}
			d.ForUser = "mail from " + from + " arrived: " + subject(a.Header)
		}
		return d
	}})
}

// delivery describes a delivery's envelope and the replies it was given.
func delivery(r Record) (Description, DeliveryArgs, bool) {
	var a DeliveryArgs
	if json.Unmarshal(r.Args, &a) != nil {
		return Description{What: r.Kind + ": " + flatten(r.Args), Outcome: deliveryOutcome(r.Outcome)}, a, false
	}
	return Description{What: a.Summary(), Outcome: deliveryOutcome(r.Outcome)}, a, true
}

// deliveryOutcome tells the SMTP reply, or the LMTP reply per recipient
// (RFC 2033 section 4.2), in words: accepted, deferred (4xx) or refused
// (5xx), with the server's own text.
func deliveryOutcome(raw json.RawMessage) string {
	var o DeliveryOutcome
	if len(raw) == 0 || json.Unmarshal(raw, &o) != nil {
		return flatten(raw)
	}
	var parts []string
	if o.Reply != nil {
		parts = append(parts, replyWord(*o.Reply)+": "+o.Reply.String())
	}
	for _, rr := range o.Rcpts {
		w := "delivered to"
		if !rr.Reply.Positive() {
			w = replyWord(rr.Reply) + " for"
		}
		parts = append(parts, w+" <"+rr.Rcpt+"> "+rr.Reply.String())
	}
	if o.Filtered != "" {
		parts = append(parts, "held back by the live filter "+o.Filtered)
	}
	if o.Error != "" {
		parts = append(parts, "undomail answered itself: "+o.Error)
	}
	if len(parts) == 0 {
		return "no reply logged"
	}
	return strings.Join(parts, "; ")
}

// replyWord names an SMTP reply's class (RFC 5321 section 4.2.1).
func replyWord(r Reply) string {
	switch {
	case r.Positive():
		return "accepted"
	case r.Code >= 400 && r.Code < 500:
		return "deferred"
	}
	return "refused"
}

func subject(h HeaderInfo) string {
	if h.Subject == "" {
		return "a message without subject"
	}
	return `"` + h.Subject + `"`
}
