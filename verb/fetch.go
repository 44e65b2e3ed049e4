package verb

import (
	"encoding/json"
	"strconv"
	"strings"
)

// imap.fetch: an externalization, the bodies or headers of messages a
// user was sent (FETCH, RFC 9051 section 6.4.5). It has no outcome: it
// records what was shown, not a command.
func init() {
	register(Kind{Name: KindIMAPFetch, Replay: Replay{How: "the \\Seen flag it set is set again (a FETCH that set no \\Seen has no effect to replay)"}, Family: "fetch", Describe: func(r Record) Description {
		var a IMAPFetchArgs
		if json.Unmarshal(r.Args, &a) != nil {
			return Description{What: "read: " + flatten(r.Args)}
		}
		d := Description{What: a.Summary()}
		n := "the messages"
		if c, ok := setSize(a.UIDs); ok && a.UIDs != "" {
			n = plural(c, "message")
		} else if len(a.UndoIDs) > 0 {
			n = plural(len(a.UndoIDs), "message")
		}
		d.ForUser = "you read " + n + " in " + folder(a.Mailbox)
		if a.Seen {
			d.What += " (marked read)"
			d.ForUser += ", which marked them read"
			if n == "1 message" {
				d.ForUser = strings.TrimSuffix(d.ForUser, "them read") + "it read"
			}
		}
		if a.UIDValidity != 0 && a.UndoIDs == nil && a.UIDs == "" {
			d.What += " of UIDVALIDITY " + strconv.FormatUint(uint64(a.UIDValidity), 10)
		}
		return d
	}})
}
