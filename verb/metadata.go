package verb

import (
	"strings"

	"github.com/undomail/undomail/proxy"
)

// imap.setmetadata: SETMETADATA (RFC 5464 section 4.3), recorded when
// the server offers METADATA; its entries are kept as the client sent
// them.
func init() {
	register(Kind{Name: proxy.KindIMAPSetMetadata, Family: "metadata", Answered: true,
		Describe: imapCommand(func(a proxy.IMAPArgs) string {
			mailbox := a.Mailbox
			if f := strings.Fields(a.Raw); mailbox == "" && len(f) > 0 {
				mailbox = strings.Trim(f[0], `"`) // the first argument names the mailbox
			}
			if mailbox == "" {
				return "you changed an annotation of your account"
			}
			return "you changed an annotation of the folder " + folder(mailbox)
		})})
}
