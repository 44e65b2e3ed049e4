package verb

import (
	"fmt"
)

// imap.append: APPEND (RFC 9051 section 6.3.12); the message is the
// record's blob.
func init() {
	register(Kind{Name: KindIMAPAppend, Replay: Replay{How: "appended again as its user, with the recorded message, flags and date; the new UID is mapped to the message's undo id"}, Family: "append", Answered: true,
		Describe: imapCommand(func(a IMAPArgs) string {
			s := "you added a message to " + folder(a.Mailbox)
			if a.Size > 0 {
				s += fmt.Sprintf(" (%d bytes)", a.Size)
			}
			return s
		})})
}
