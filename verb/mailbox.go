package verb

// The mailbox operations: CREATE, DELETE, RENAME, SUBSCRIBE and
// UNSUBSCRIBE (RFC 9051 sections 6.3.4 to 6.3.8).
func init() {
	for kind, user := range map[string]func(IMAPArgs) string{
		KindIMAPCreate: func(a IMAPArgs) string { return "you created the folder " + folder(a.Mailbox) },
		KindIMAPDelete: func(a IMAPArgs) string {
			return "you deleted the folder " + folder(a.Mailbox) + " with its messages"
		},
		KindIMAPRename: func(a IMAPArgs) string {
			return "you renamed the folder " + folder(a.Mailbox) + " to " + folder(a.Dest)
		},
		KindIMAPSubscribe:   func(a IMAPArgs) string { return "you subscribed to the folder " + folder(a.Mailbox) },
		KindIMAPUnsubscribe: func(a IMAPArgs) string { return "you unsubscribed from the folder " + folder(a.Mailbox) },
	} {
		register(Kind{Name: kind, Family: "mailbox", Answered: true, Describe: imapCommand(user),
			Replay: Replay{How: "the same command again as its user"}})
	}
}
