package verb

import (
	"strings"
)

// imap.store: STORE and UID STORE (RFC 9051 section 6.4.6), flags and
// keywords.
func init() {
	register(Kind{Name: KindIMAPStore, Replay: Replay{How: "the same flag change (+FLAGS, -FLAGS or FLAGS) as its user, the messages named by undo id and translated to their UIDs now"}, Family: "store", Answered: true,
		Describe: imapCommand(func(a IMAPArgs) string {
			what := messages(a) + " in " + folder(a.Mailbox)
			flags := flagWords(a.Flags)
			switch a.Op {
			case "+":
				return "you marked " + what + " as " + flags
			case "-":
				return "you removed the mark " + flags + " from " + what
			}
			if len(a.Flags) == 0 {
				return "you cleared every mark of " + what
			}
			return "you set the marks of " + what + " to " + flags
		})})
}

// flagWords names system flags (RFC 9051 section 2.3.2) as a mail
// client shows them; keywords are kept as they are.
func flagWords(flags []string) string {
	names := map[string]string{`\seen`: "read", `\flagged`: "flagged", `\answered`: "answered",
		`\deleted`: "deleted", `\draft`: "draft", "$junk": "junk", "$notjunk": "not junk"}
	out := make([]string, len(flags))
	for i, f := range flags {
		if n, ok := names[strings.ToLower(f)]; ok {
			out[i] = n
		} else {
			out[i] = strings.TrimPrefix(f, `\`)
		}
	}
	if len(out) == 0 {
		return "nothing"
	}
	return strings.Join(out, " and ")
}
