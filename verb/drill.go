package verb

import (
	"encoding/json"
	"fmt"
	"strings"
)

// drill: a recovery drill, the log replayed from one snapshot onto a
// clone and compared with the next (docs/operations.md, drills).
func init() {
	register(Kind{Name: KindDrill, Replay: Replay{Why: "a drill changed only a clone of the store, never the mail"}, Family: "drill", System: true, Describe: func(r Record) Description {
		var a struct {
			From string `json:"from"`
			To   string `json:"to"`
		}
		json.Unmarshal(r.Args, &a)
		var o DrillResult
		if r.Answered && json.Unmarshal(r.Outcome, &o) != nil {
			return Description{What: "recovery drill: " + flatten(r.Args), Outcome: flatten(r.Outcome)}
		}
		if a.From == "" {
			a.From, a.To = o.From, o.To
		}
		d := Description{What: fmt.Sprintf("recovery drill: replay from snapshot %s onto a clone, compare with %s", a.From, a.To)}
		if !r.Answered {
			d.Outcome = "no verdict: cut off while it ran"
			return d
		}
		d.Outcome = o.Words()
		return d
	}})
}

// DrillResult is the part of a drill's verdict that is told.
type DrillResult struct {
	OK           bool     `json:"ok"`
	From         string   `json:"from"`
	To           string   `json:"to"`
	Replayed     int      `json:"replayed"`
	Messages     int      `json:"messages"`
	Differences  []string `json:"differences"`
	More         int      `json:"more"`
	Seconds      float64  `json:"seconds"`
	Error        string   `json:"error"`
	Acknowledged []string `json:"acknowledged"`
	AckErrors    []string `json:"ack_errors"`
}

// Words tells the drill's verdict.
func (o DrillResult) Words() string {
	var parts []string
	if o.OK {
		parts = append(parts, fmt.Sprintf("passed: %d replayed, %s compared, %.1f s", o.Replayed, plural(o.Messages, "message"), o.Seconds))
	} else {
		s := "FAILED"
		if n := len(o.Differences) + o.More; n > 0 {
			s += fmt.Sprintf(": %s, first: %s", plural(n, "difference"), o.Differences[0])
		}
		parts = append(parts, s)
	}
	if o.Error != "" {
		parts = append(parts, o.Error)
	}
	if len(o.Acknowledged) > 0 {
		parts = append(parts, "reported to "+strings.Join(o.Acknowledged, ", "))
	}
	if len(o.AckErrors) > 0 {
		parts = append(parts, "could not report: "+strings.Join(o.AckErrors, "; "))
	}
	return strings.Join(parts, "; ")
}
