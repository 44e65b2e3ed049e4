package loadtest

import (
	crand "crypto/rand"
	"encoding/base64"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"
)

var typicalWords = strings.Fields("the a report meeting budget figures team quarter region sales customer order delivery invoice " +
	"project schedule review draft update please thanks regards attached below above next last week month " +
	"we you they will would should could can our your their new old first second final revised agreed")

// TypicalMessage returns an RFC 5322 message of about n bytes (at least
// its header) from and to the given addresses, with a unique subject and
// Message-ID, made like typical mail for what compression does to it:
// half a text part of varied sentences (DEFLATE shrinks such text to about
// a third) and half a base64 attachment of random bytes (already
// compressed content such as a photo or a PDF; DEFLATE saves only
// base64's quarter). Lines end in CRLF.
func TypicalMessage(rng *rand.Rand, from, to, subject string, n int) string {
	var b strings.Builder
	now := time.Now()
	fmt.Fprintf(&b, "From: %s\r\nTo: %s\r\nSubject: %s\r\nMessage-Id: <%d.%d@load.test>\r\nDate: %s\r\n"+
		"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n",
		from, to, subject, now.UnixNano(), rng.Uint64(), now.Format(time.RFC1123Z))
	for b.Len() < n/2 {
		for range 12 {
			b.WriteString(typicalWords[rng.IntN(len(typicalWords))])
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%d.\r\n", rng.IntN(10000))
	}
	b.WriteString("\r\n--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n")
	raw := make([]byte, 57) // 76 base64 characters a line (RFC 2045 6.8)
	for b.Len() < n-80 {
		crand.Read(raw)
		b.WriteString(base64.StdEncoding.EncodeToString(raw))
		b.WriteString("\r\n")
	}
	b.WriteString("\r\n--b1--\r\n")
	return b.String()
}
