package verb

// imap.copy and imap.move: COPY (RFC 9051 section 6.4.7) and MOVE (RFC
// 6851), by UID or sequence number.
func init() {
	register(Kind{Name: KindIMAPCopy, Family: "copymove", Answered: true,
		Describe: imapCommand(func(a IMAPArgs) string {
			return "you copied " + messages(a) + " from " + folder(a.Mailbox) + " to " + folder(a.Dest)
		})})
	register(Kind{Name: KindIMAPMove, Family: "copymove", Answered: true,
		Describe: imapCommand(func(a IMAPArgs) string {
			return "you moved " + messages(a) + " from " + folder(a.Mailbox) + " to " + folder(a.Dest)
		})})
}
