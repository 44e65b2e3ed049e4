package verb

import (
	"encoding/json"
	"fmt"
	"strings"
)

// compensation: a message undomail delivered to explain what a cycle
// changed after someone had seen it (README: "What alice is told"). Its
// arguments are a delivery's plus the cycle and the paradoxes; its
// outcome is the LMTP reply.
func init() {
	register(Kind{Name: KindCompensation, Replay: Replay{How: "re-delivered over LMTP like a captured delivery, so the explanation survives later cycles and is never written twice"}, Family: "compensation", System: true, Answered: true, Describe: func(r Record) Description {
		var a CompensationArgs
		if json.Unmarshal(r.Args, &a) != nil {
			return Description{What: "compensation: " + flatten(r.Args), Outcome: deliveryOutcome(r.Outcome)}
		}
		to := "a digest for " + a.User
		if a.Audience == "operator" {
			to = "a notice for the operator"
		}
		d := Description{What: fmt.Sprintf("%s explaining %s of cycle #%d", to, plural(len(a.Paradoxes), "paradox"), a.Cycle),
			Outcome: deliveryOutcome(r.Outcome)}
		if len(a.Paradoxes) > 0 {
			kinds := make([]string, len(a.Paradoxes))
			for i, p := range a.Paradoxes {
				kinds[i] = fmt.Sprintf("%s (#%d)", strings.ReplaceAll(p.Kind, "_", " "), p.Verb)
			}
			d.What += ": " + strings.Join(kinds, ", ")
		}
		if a.Header.Subject != "" {
			d.What += fmt.Sprintf("; subject %q", a.Header.Subject)
		}
		d.ForUser = "undomail explained what a repair of your mailbox changed: " + subject(a.Header)
		return d
	}})
}

// CompensationArgs are a compensation's arguments (compensate.Args).
type CompensationArgs struct {
	DeliveryArgs
	Cycle     int64  `json:"cycle"`
	Audience  string `json:"audience"`
	User      string `json:"user"`
	Paradoxes []struct {
		Kind     string `json:"kind"`
		User     string `json:"user,omitempty"`
		Verb     int64  `json:"verb"`
		VerbKind string `json:"verb_kind"`
	} `json:"paradoxes"`
}
