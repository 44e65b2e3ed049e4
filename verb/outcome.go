package verb

import (
	"encoding/json"
	"fmt"
)

// outcome: the result of an earlier record (Ref), logged apart from it
// because records are immutable (undolog.KindOutcome). It is normally
// shown on the record it completes; alone, it is told from its fields.
// system.note: a note of the first log format.
func init() {
	register(Kind{Name: KindOutcome, Replay: Replay{Why: "an outcome completes another record, which is the one replayed"}, Family: "outcome", System: true, Describe: func(r Record) Description {
		return Description{What: fmt.Sprintf("outcome of record #%d", r.Ref), Outcome: flatten(r.Outcome)}
	}})
	register(Kind{Name: KindNote, Replay: Replay{Why: "a note of the first log format changes no mail"}, Family: "outcome", System: true, Describe: func(r Record) Description {
		var a map[string]json.RawMessage
		var note string
		if json.Unmarshal(r.Args, &a) == nil && json.Unmarshal(a["note"], &note) == nil && note != "" {
			delete(a, "note")
			rest, _ := json.Marshal(a)
			if len(a) == 0 {
				return Description{What: "note: " + note}
			}
			return Description{What: "note: " + note + "; " + flatten(rest)}
		}
		return Description{What: "note: " + flatten(r.Args)}
	}})
}
