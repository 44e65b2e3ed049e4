package verb

import (
	"fmt"
	"strings"
)

// imap.setmetadata: SETMETADATA (RFC 5464 section 4.3), recorded entry by
// entry (IMAPArgs.Metadata: a value, or null for a removal) and
// replayed as such.
func init() {
	register(Kind{Name: KindIMAPSetMetadata, Replay: Replay{How: "SETMETADATA again as its user with the recorded entries (RFC 5464)"}, Family: "metadata", Answered: true,
		Describe: imapCommand(func(a IMAPArgs) string {
			set, removed := a.MetadataEntries()
			var what []string
			if len(set) > 0 {
				what = append(what, "set "+strings.Join(set, ", "))
			}
			if len(removed) > 0 {
				what = append(what, "removed "+strings.Join(removed, ", "))
			}
			where := "your account"
			if a.Mailbox != "" {
				where = "the folder " + folder(a.Mailbox)
			}
			if len(what) == 0 {
				return "you changed an annotation of " + where
			}
			return fmt.Sprintf("you %s on %s", strings.Join(what, " and "), where)
		})})
}
