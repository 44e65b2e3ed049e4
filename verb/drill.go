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
		var a DrillArgs
		json.Unmarshal(r.Args, &a)
		var o DrillVerdict
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

// DrillArgs say what a drill replayed: the log between two snapshots.
type DrillArgs struct {
	From    string `json:"from"`
	To      string `json:"to"`
	FromSeq int64  `json:"from_seq"`
	ToSeq   int64  `json:"to_seq"`
}

// DrillResult is a drill's verdict: the replay of the log from snapshot
// From to snapshot To, on a clone of From, compared with To.
type DrillResult struct {
	OK   bool   `json:"ok"`
	From string `json:"from"`
	To   string `json:"to"`
	// Replayed counts the verbs replayed; Messages the messages compared.
	Replayed int `json:"replayed"`
	Messages int `json:"messages"`
	// Differences say exactly where the replayed clone and the snapshot
	// differ (the first 100; More counts the rest).
	Differences []string `json:"differences,omitempty"`
	More        int      `json:"more,omitempty"`
	Seconds     float64  `json:"seconds"`
	Error       string   `json:"error,omitempty"`
}

// DrillVerdict is a drill's verdict as logged (the drill record's
// outcome) and answered to the operator: the result, and where it was
// reported.
type DrillVerdict struct {
	DrillResult
	// Acknowledged lists where the verdict was sent (mail, webhook);
	// AckErrors what failed. A drill reports every time, pass or fail.
	Acknowledged []string `json:"acknowledged,omitempty"`
	AckErrors    []string `json:"ack_errors,omitempty"`
}

// Summary says why a drill failed, in a few words.
func (o DrillVerdict) Summary() string {
	if o.Error != "" {
		return o.Error
	}
	return fmt.Sprintf("%d differences", len(o.Differences)+o.More)
}

// Words tells the drill's verdict.
func (o DrillVerdict) Words() string {
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
