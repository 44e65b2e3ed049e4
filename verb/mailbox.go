package verb

import (
	"github.com/undomail/undomail/proxy"
)

// The mailbox operations: CREATE, DELETE, RENAME, SUBSCRIBE and
// UNSUBSCRIBE (RFC 9051 sections 6.3.4 to 6.3.8).
func init() {
	for kind, user := range map[string]func(proxy.IMAPArgs) string{
		proxy.KindIMAPCreate: func(a proxy.IMAPArgs) string { return "you created the folder " + folder(a.Mailbox) },
		proxy.KindIMAPDelete: func(a proxy.IMAPArgs) string {
			return "you deleted the folder " + folder(a.Mailbox) + " with its messages"
		},
		proxy.KindIMAPRename: func(a proxy.IMAPArgs) string {
			return "you renamed the folder " + folder(a.Mailbox) + " to " + folder(a.Dest)
		},
		proxy.KindIMAPSubscribe:   func(a proxy.IMAPArgs) string { return "you subscribed to the folder " + folder(a.Mailbox) },
		proxy.KindIMAPUnsubscribe: func(a proxy.IMAPArgs) string { return "you unsubscribed from the folder " + folder(a.Mailbox) },
	} {
		register(Kind{Name: kind, Family: "mailbox", Answered: true, Describe: imapCommand(user)})
	}
}
