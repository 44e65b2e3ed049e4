package verb

// imap.copy and imap.move: COPY (RFC 9051 section 6.4.7) and MOVE (RFC
// 6851), by UID or sequence number.
func init() {
	register(Kind{Name: KindIMAPCopy, Replay: Replay{How: "copied again as its user, the messages named by undo id and translated to their UIDs now"}, Family: "copymove", Answered: true,
		Describe: imapCommand(func(a IMAPArgs) string {
			return "you copied " + messages(a) + " from " + folder(a.Mailbox) + " to " + folder(a.Dest)
		})})
	register(Kind{Name: KindIMAPMove, Replay: Replay{How: "moved again as its user, the messages named by undo id and translated to their UIDs now"}, Family: "copymove", Answered: true,
		Describe: imapCommand(func(a IMAPArgs) string {
			return "you moved " + messages(a) + " from " + folder(a.Mailbox) + " to " + folder(a.Dest)
		})})
}
