package verb

import (
	"encoding/json"
	"fmt"
	"strings"
)

// replay: what replaying one logged verb did; Ref names the verb. The
// outcome is on the record itself.
func init() {
	register(Kind{Name: KindReplay, Family: "replay", System: true, Describe: func(r Record) Description {
		d := Description{What: fmt.Sprintf("replay of #%d", r.Ref)}
		if r.User != "" {
			d.What += " for " + r.User
		}
		d.Outcome = ReplayWords(r.Outcome).Line()
		return d
	}})
}

// Fate is what a replay did with a verb.
type Fate struct {
	Status string `json:"status"` // ok, failed, cancelled, filtered, repaired, "not replayed"
	Detail string `json:"detail,omitempty"`
	// Placed are the messages without an Undomail-Id field of their own
	// the replay put somewhere (APPENDs and their copies).
	Placed []struct {
		Mailbox string `json:"mailbox"`
		UID     uint32 `json:"uid"`
	} `json:"placed,omitempty"`
}

// ReplayWords decodes a replay record's outcome.
func ReplayWords(raw json.RawMessage) Fate {
	var f Fate
	if json.Unmarshal(raw, &f) != nil || f.Status == "" {
		return Fate{Status: "unknown", Detail: flatten(raw)}
	}
	return f
}

// Words names the fate: "made again", "cancelled", ... A delivery
// replayed for several recipients may have several, comma-separated.
func (f Fate) Words() string {
	names := map[string]string{"ok": "made again", "cancelled": "cancelled", "filtered": "removed by a filter",
		"repaired": "skipped: its messages were removed by the repair", "failed": "FAILED", "skipped": "no effect of its own",
		"not replayed": "not replayed", "unknown": "unknown"}
	parts := strings.Split(f.Status, ",")
	for i, p := range parts {
		if n, ok := names[p]; ok {
			parts[i] = n
		}
	}
	return strings.Join(parts, ", ")
}

// Line is the fate and its detail: "cancelled: left out by the repair".
func (f Fate) Line() string {
	s := f.Words()
	if f.Detail != "" {
		s += ": " + f.Detail
	}
	if len(f.Placed) > 0 {
		where := make([]string, len(f.Placed))
		for i, p := range f.Placed {
			where[i] = fmt.Sprintf("%q uid %d", p.Mailbox, p.UID)
		}
		s += "; placed " + plural(len(f.Placed), "message") + " at " + strings.Join(where, ", ")
	}
	return s
}
