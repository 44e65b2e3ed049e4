package verb

import (
	"strings"
)

// imap.expunge: EXPUNGE, UID EXPUNGE (RFC 4315) and the CLOSE of a
// writable mailbox (RFC 9051 section 6.4.1), which expunges silently.
func init() {
	register(Kind{Name: KindIMAPExpunge, Replay: Replay{How: "the same messages, named by undo id, expunged again as its user"}, Family: "expunge", Answered: true,
		Describe: imapCommand(func(a IMAPArgs) string {
			if strings.EqualFold(a.Command, "CLOSE") {
				return "closing " + folder(a.Mailbox) + " permanently removed the messages marked deleted"
			}
			if a.UIDs == "" {
				return "you permanently removed the messages marked deleted in " + folder(a.Mailbox)
			}
			return "you permanently removed " + messages(a) + " marked deleted in " + folder(a.Mailbox)
		})})
}
