package verb

import (
	"github.com/undomail/undomail/proxy"
)

// imap.copy and imap.move: COPY (RFC 9051 section 6.4.7) and MOVE (RFC
// 6851), by UID or sequence number.
func init() {
	register(Kind{Name: proxy.KindIMAPCopy, Family: "copymove", Answered: true,
		Describe: imapCommand(func(a proxy.IMAPArgs) string {
			return "you copied " + messages(a) + " from " + folder(a.Mailbox) + " to " + folder(a.Dest)
		})})
	register(Kind{Name: proxy.KindIMAPMove, Family: "copymove", Answered: true,
		Describe: imapCommand(func(a proxy.IMAPArgs) string {
			return "you moved " + messages(a) + " from " + folder(a.Mailbox) + " to " + folder(a.Dest)
		})})
}
