// Package verb is the undo log's vocabulary: the kinds of record the log
// holds, the argument and outcome types the proxies write
// (imapargs.go, delivery_types.go), and, in one place per kind family,
// how each record is told to people. The web timeline, `undomail log`
// and the admin API describe records only through Describe (issue #18,
// item 4). It depends on nothing but undolog, so the packages that read
// the log (replay, compensate, admin, the CLI) need not import the
// proxies that write it.
package verb

import (
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/undomail/undomail/undolog"
)

// Description is a record in words. No field holds JSON.
type Description struct {
	// What is the one-line summary for operators: what was done, on which
	// mailbox or messages, by whom when it is not the record's user.
	What string
	// Outcome is the result in words ("OK", "refused by the server:
	// ..."); empty for records that have no result of their own.
	Outcome string
	// ForUser is how the record is told to the user it concerns, when
	// that differs from What (users do not read protocol commands).
	ForUser string
}

// Line is the description in one line: what, then the outcome.
func (d Description) Line() string {
	if d.Outcome == "" {
		return d.What
	}
	return d.What + " — " + d.Outcome
}

// User is the description for the user the record concerns.
func (d Description) User() string {
	if d.ForUser != "" {
		return d.ForUser
	}
	return d.What
}

// Record is what a describer reads: the record, its arguments and its
// outcome, wherever the outcome was logged (an outcome record referring
// to it, or on the record itself as drills, replays and compensations
// carry it).
type Record struct {
	undolog.Verb
	Outcome json.RawMessage
	// Answered says an outcome was logged. A user's command without one
	// was cut off by a crash before its client was answered.
	Answered bool
}

// Kind is a registered record kind.
type Kind struct {
	Name string
	// Family names the file that defines it ("delivery", "store", ...).
	Family string
	// System is set for the records undomail writes about itself, not on
	// a user's behalf.
	System bool
	// Answered is set for the kinds whose client is told a result: one
	// without a logged outcome was cut off.
	Answered bool
	// Describe tells one record in words; Record.Outcome may be empty.
	Describe func(Record) Description
	// Replay says how a replay makes a record of this kind again, or
	// why it never does. Every kind says one or the other (register
	// refuses a kind that says neither, or both), so nothing a user did
	// is left out of a cycle without a reason.
	Replay Replay
}

// Replay is how a kind is replayed, or why it is not.
type Replay struct {
	// How says how a replay makes the record again, when it had an
	// effect (its client was told OK, its delivery was accepted).
	How string
	// Why says why a replay never makes it again.
	Why string
}

// Replayed reports whether a replay makes records of this kind again
// (when they had an effect).
func (k Kind) Replayed() bool { return k.Replay.How != "" }

var registry = map[string]Kind{}

// register adds a kind; each kind family's file registers its own.
func register(k Kind) {
	if _, dup := registry[k.Name]; dup {
		panic("verb: kind " + k.Name + " registered twice")
	}
	if k.Describe == nil {
		panic("verb: kind " + k.Name + " has no describer")
	}
	if (k.Replay.How == "") == (k.Replay.Why == "") {
		panic("verb: kind " + k.Name + " must say how it is replayed (Replay.How) or why it is not (Replay.Why)")
	}
	registry[k.Name] = k
}

// Lookup returns a registered kind.
func Lookup(name string) (Kind, bool) {
	k, ok := registry[name]
	return k, ok
}

// Kinds lists the registered kinds, sorted.
func Kinds() []string {
	out := make([]string, 0, len(registry))
	for k := range registry {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// noOutcome is said of a user's command whose outcome was never logged.
const noOutcome = "no outcome: cut off before the client was answered"

// Describe tells a logged record in words. A kind nobody registered (a
// record of a newer version, say) is told from its fields, flattened into
// words, never as JSON.
func Describe(v undolog.Verb) Description {
	r := Record{Verb: v, Outcome: v.Record.Outcome, Answered: len(v.Record.Outcome) > 0}
	if v.Outcome != nil {
		r.Outcome, r.Answered = v.Outcome.Outcome, true
	}
	k, ok := registry[v.Kind]
	if !ok {
		d := Description{What: v.Kind + " record"}
		if f := flatten(v.Args); f != "" {
			d.What += ": " + f
		}
		d.Outcome = flatten(r.Outcome)
		return d
	}
	d := k.Describe(r)
	if k.Answered && !r.Answered {
		d.Outcome = noOutcome
	}
	return d
}

// Words renders a JSON value logged in a field no describer covers (a
// drill's difference, say) as words; a JSON string is its text.
func Words(raw json.RawMessage) string { return flatten(raw) }

// flatten renders any JSON value as words: "key value, key value", lists
// joined with commas, nested objects in parentheses. Used for records of
// unknown kinds and fields no describer knows.
func flatten(raw json.RawMessage) string {
	if len(raw) == 0 {
		return ""
	}
	var v any
	if json.Unmarshal(raw, &v) != nil {
		return ""
	}
	return words(v)
}

func words(v any) string {
	switch x := v.(type) {
	case nil:
		return "none"
	case string:
		return x
	case bool:
		if x {
			return "yes"
		}
		return "no"
	case float64:
		return fmt.Sprint(x)
	case []any:
		parts := make([]string, len(x))
		for i, e := range x {
			parts[i] = words(e)
		}
		return strings.Join(parts, ", ")
	case map[string]any:
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		parts := make([]string, 0, len(keys))
		for _, k := range keys {
			w := words(x[k])
			if _, nested := x[k].(map[string]any); nested {
				w = "(" + w + ")"
			}
			parts = append(parts, strings.ReplaceAll(k, "_", " ")+" "+w)
		}
		return strings.Join(parts, ", ")
	}
	return fmt.Sprint(v)
}

// plural is "1 message", "2 messages".
func plural(n int, one string) string {
	if n == 1 {
		return "1 " + one
	}
	if strings.HasSuffix(one, "x") {
		return fmt.Sprintf("%d %ses", n, one)
	}
	return fmt.Sprintf("%d %ss", n, one)
}

// seqList is "#3, #5".
func seqList(seqs []int64) string {
	parts := make([]string, len(seqs))
	for i, s := range seqs {
		parts[i] = fmt.Sprintf("#%d", s)
	}
	return strings.Join(parts, ", ")
}

// LeftAlone tells, one line a kind, the verbs a replay leaves alone
// (neither makes again nor cancels), counted by kind: how many, and why.
// A kind that is replayed when it has an effect is left alone only when
// it had none; a kind this version does not define cannot be replayed.
func LeftAlone(counts map[string]int) []string {
	kinds := make([]string, 0, len(counts))
	for k := range counts {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	out := make([]string, 0, len(kinds))
	for _, name := range kinds {
		why := "no replay is defined for this kind: its effect is lost"
		if k, ok := registry[name]; ok {
			why = k.Replay.Why
			if k.Replayed() {
				why = "no effect of its own (its client was not told it happened, or it changed nothing)"
			}
		}
		out = append(out, fmt.Sprintf("%d %s: %s", counts[name], name, why))
	}
	return out
}
