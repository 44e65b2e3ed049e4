package compensate

import (
	"bytes"
	"fmt"
	"html"
	"net/mail"
	"strings"
	"time"

	"github.com/emersion/go-message"
	gomail "github.com/emersion/go-message/mail"
	"github.com/undomail/undomail/verb"
)

// DefaultSubject is the subject of a digest when none is configured.
const DefaultSubject = "Your mailbox was repaired: what changed"

// Letter is a compensating message to build: a user's digest or the
// operator notice.
type Letter struct {
	From    string // "Mail administrator <postmaster@example.org>"
	To      string // the address it is delivered to
	Name    string // how to greet the reader
	Subject string
	// MessageID is the Message-ID field, without angle brackets.
	MessageID string
	Date      time.Time
	Cycle     Cycle
	Contact   string // whom to ask
	Paradoxes []Paradox
}

// BuildDigest writes a user's digest: one RFC 5322 message explaining in
// plain language every paradox of the cycle the user observed, what
// changed, when they saw it, why (the operator's reason) and whom to ask.
// It is multipart/alternative (RFC 2046 section 5.1.4), text/plain first,
// then the same text as HTML; both UTF-8, quoted-printable, so any
// language and any subject survive 7-bit transports. Header fields with
// non-ASCII text are RFC 2047 encoded words.
func BuildDigest(l Letter) ([]byte, error) {
	intro := fmt.Sprintf("On %s the mail administrator repaired the mail system. Your mailbox was put back "+
		"to an earlier state and everything that happened since was done again, with the repair. "+
		"A few things you had already seen are different now. They are listed below; "+
		"you do not need to do anything.", when(l.Cycle.Time))
	var items []string
	for _, p := range l.Paradoxes {
		items = append(items, explain(p))
	}
	contact := "your mail administrator"
	if l.Contact != "" {
		contact = l.Contact
	}
	doc := document{
		greeting: "Hello " + l.Name + ",",
		paras:    []string{intro, "Why: " + why(l.Cycle)},
		heading:  "What changed:",
		items:    items,
		closing:  []string{"If you have questions, please contact " + contact + "."},
		footer:   fmt.Sprintf("This message was written by undomail for your mail administrator (repair %d).", l.Cycle.Seq),
	}
	return build(l, doc)
}

// BuildNotice writes the operator notice: every paradox the cycle
// explained to users or left to the operator, one line each.
func BuildNotice(l Letter) ([]byte, error) {
	var items []string
	for _, p := range l.Paradoxes {
		who := p.User
		if who == "" {
			who = "a sender outside"
		}
		switch p.Kind {
		case Misdelivered:
			items = append(items, exposure(p))
			continue
		case HeldOutside:
			items = append(items, fmt.Sprintf("[%s] %s (undo id %s), sent on %s: %s. It is in the undo log: undomail log shows the re-injection with the message.",
				p.Kind, describeMessage(p.Message), messageID(p.Message), when(p.Seen), p.Now))
			continue
		case RefusedByMistake:
			items = append(items, fmt.Sprintf("[%s] sender %s was refused on %s: %s to <%s> (undo id %s); %s. After the repair it is in %s's mailbox.",
				p.Kind, p.Action, when(p.Seen), describeMessage(p.Message), p.Rcpt, messageID(p.Message), p.Now, p.User))
			continue
		}
		items = append(items, fmt.Sprintf("[%s] %s, verb %d (%s): %s", p.Kind, who, p.Verb, p.VerbKind, explain(p)))
	}
	doc := document{
		greeting: "Hello,",
		paras: []string{
			fmt.Sprintf("The cycle %d on %s changed %d things that people had already observed.", l.Cycle.Seq, when(l.Cycle.Time), len(l.Paradoxes)),
			"Why: " + why(l.Cycle),
		},
		heading: "Paradoxes:",
		items:   items,
		footer:  "undomail compensations --cycle " + fmt.Sprint(l.Cycle.Seq) + " lists them with the digests users were sent.",
	}
	return build(l, doc)
}

// exposure is the operator notice's line for mail someone read that was
// not theirs: which message, seen by whom, when, and where it belongs.
func exposure(p Paradox) string {
	id := ""
	if p.Message != nil {
		id = " (undo id " + p.Message.UndoID
		if p.Message.MessageID != "" {
			id += ", Message-ID " + p.Message.MessageID
		}
		id += ")"
	}
	return fmt.Sprintf("[%s] exposure: %s read %s%s on %s, delivered by verb %d (%s); %s.",
		p.Kind, p.User, describeMessage(p.Message), id, when(p.Seen), p.Verb, p.VerbKind, p.Now)
}

func messageID(m *Message) string {
	if m == nil {
		return ""
	}
	return m.UndoID
}

// why is the repair's reason, in the operator's words when given.
func why(c Cycle) string {
	switch {
	case c.Reason != "" && c.Repair != "":
		return c.Reason + " (" + c.Repair + ")"
	case c.Reason != "":
		return c.Reason
	case c.Repair != "":
		return "the administrator repaired damage to the mail system (" + c.Repair + ")."
	}
	return "the administrator repaired damage to the mail system."
}

// when formats a time for people: unambiguous, in UTC.
func when(t time.Time) string {
	return t.UTC().Format("Monday, 2 January 2006 at 15:04 UTC")
}

// describeMessage names a message the way a reader recognises it.
func describeMessage(m *Message) string {
	if m == nil {
		return ""
	}
	s := "the message"
	if m.Subject != "" {
		s += fmt.Sprintf(" %q", m.Subject)
	} else {
		s += " without a subject"
	}
	if m.From != "" {
		s += " from " + m.From
	}
	if m.Date != "" {
		s += ", dated " + m.Date
	}
	return s
}

// explain says what happened to one paradox, in plain language.
func explain(p Paradox) string {
	msg := describeMessage(p.Message)
	switch p.Kind {
	case ReadRemoved:
		return fmt.Sprintf("On %s you read %s. It is no longer in your mailbox: it was %s.", when(p.Seen), msg, p.Now)
	case ReadMoved:
		return fmt.Sprintf("On %s you read %s. It was %s.", when(p.Seen), msg, p.Now)
	case ReadChanged:
		return fmt.Sprintf("On %s you read %s. It is still in your mailbox, but %s.", when(p.Seen), msg, p.Now)
	case DeliveryLost:
		mine := "the message"
		if m := p.Message; m != nil && m.Subject != "" {
			mine += fmt.Sprintf(" %q", m.Subject)
		}
		return fmt.Sprintf("On %s you sent %s to %s and were told it was delivered. After the repair it was not: it was %s.",
			when(p.Seen), mine, p.Rcpt, p.Now)
	case ActionFailed:
		s := fmt.Sprintf("On %s %s, and it was done.", when(p.Seen), p.Action)
		if msg != "" {
			s = fmt.Sprintf("On %s %s (%s), and it was done.", when(p.Seen), p.Action, msg)
		}
		return s + " After the repair " + p.Now + "."
	case SentOnwards:
		if p.VerbKind == verb.KindSMTPSubmit {
			return fmt.Sprintf("On %s you replied to or forwarded %s %s. Since then it was %s; what you sent has already left.",
				when(p.Seen), msg, p.Action, p.Now)
		}
		return fmt.Sprintf("On %s %s (%s). Since then %s.", when(p.Seen), p.Action, msg, p.Now)
	case ActionCancelled:
		return fmt.Sprintf("On %s %s. The administrator undid this in the repair.", when(p.Seen), p.Action)
	case Misdelivered:
		return fmt.Sprintf("On %s you read %s. It was not meant for you: the mail system delivered it to you by mistake, "+
			"and after the repair %s. It is no longer in your mailbox; please treat what you read as confidential.",
			when(p.Seen), msg, p.Now)
	case HeldOutside:
		return fmt.Sprintf("%s, sent on %s: %s.", describeMessage(p.Message), when(p.Seen), p.Now)
	case RefusedByMistake:
		return fmt.Sprintf("On %s %s, addressed to you, was refused by mistake (%s). After the repair it was delivered: "+
			"it is in your mailbox now.", when(p.Seen), msg, p.Now)
	case Restored:
		return fmt.Sprintf("On %s you were told that %s had been removed. It is back in your mailbox: %s.", when(p.Seen), msg, p.Now)
	}
	return fmt.Sprintf("%s on %s: %s", p.Kind, when(p.Seen), p.Now)
}

// document is a letter's text, rendered as plain text and as HTML.
type document struct {
	greeting string
	paras    []string
	heading  string
	items    []string
	closing  []string
	footer   string
}

func (d document) text() string {
	var b strings.Builder
	b.WriteString(d.greeting + "\n\n")
	for _, p := range d.paras {
		b.WriteString(wrap(p, 72, "") + "\n\n")
	}
	b.WriteString(d.heading + "\n\n")
	for i, it := range d.items {
		n := fmt.Sprintf("%2d. ", i+1)
		b.WriteString(n + wrap(it, 72-len(n), strings.Repeat(" ", len(n))) + "\n\n")
	}
	for _, p := range d.closing {
		b.WriteString(wrap(p, 72, "") + "\n\n")
	}
	// "-- " starts a signature block (RFC 3676 section 4.3).
	b.WriteString("-- \n" + wrap(d.footer, 72, "") + "\n")
	return strings.ReplaceAll(b.String(), "\n", "\r\n")
}

func (d document) html() string {
	var b strings.Builder
	b.WriteString("<!DOCTYPE html>\r\n<html><head><meta charset=\"utf-8\"></head><body>\r\n")
	b.WriteString("<p>" + html.EscapeString(d.greeting) + "</p>\r\n")
	for _, p := range d.paras {
		b.WriteString("<p>" + html.EscapeString(p) + "</p>\r\n")
	}
	b.WriteString("<p>" + html.EscapeString(d.heading) + "</p>\r\n<ol>\r\n")
	for _, it := range d.items {
		b.WriteString("<li>" + html.EscapeString(it) + "</li>\r\n")
	}
	b.WriteString("</ol>\r\n")
	for _, p := range d.closing {
		b.WriteString("<p>" + html.EscapeString(p) + "</p>\r\n")
	}
	b.WriteString("<hr><p><small>" + html.EscapeString(d.footer) + "</small></p>\r\n</body></html>\r\n")
	return b.String()
}

// wrap breaks s into lines of at most width characters at spaces (longer
// words stay whole), indenting continuation lines.
func wrap(s string, width int, indent string) string {
	var b strings.Builder
	n := 0
	for i, w := range strings.Fields(s) {
		l := len([]rune(w))
		if i > 0 {
			if n+1+l > width {
				b.WriteString("\n" + indent)
				n = 0
			} else {
				b.WriteByte(' ')
				n++
			}
		}
		b.WriteString(w)
		n += l
	}
	return b.String()
}

// encodeText encodes an unstructured header field's text (RFC 2047) in
// encoded words short enough that the field can be folded between them
// within RFC 5322's 78 characters a line: mime.QEncoding makes words of up
// to 75 characters, which a "Subject: " line cannot hold. Whitespace
// between adjacent encoded words is not part of the text (RFC 2047
// section 6.2), so the words can be split anywhere between characters.
func encodeText(s string) string {
	ascii := true
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 || s[i] < 0x20 {
			ascii = false
			break
		}
	}
	if ascii && !strings.Contains(s, "=?") {
		return s
	}
	const maxChunk = 15 // bytes of text per word: at most 10+45+2 characters encoded
	var words []string
	var w strings.Builder
	n := 0
	flush := func() {
		if n > 0 {
			words = append(words, "=?utf-8?q?"+w.String()+"?=")
			w.Reset()
			n = 0
		}
	}
	for _, r := range s {
		b := string(r)
		if n+len(b) > maxChunk {
			flush()
		}
		for i := 0; i < len(b); i++ {
			c := b[i]
			switch {
			case c == ' ':
				w.WriteByte('_')
			case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', strings.IndexByte("!*+-/", c) >= 0:
				w.WriteByte(c)
			default:
				fmt.Fprintf(&w, "=%02X", c)
			}
		}
		n += len(b)
	}
	flush()
	return strings.Join(words, " ")
}

// build writes the message: header, then the multipart/alternative body.
func build(l Letter, d document) ([]byte, error) {
	from, err := mail.ParseAddress(l.From)
	if err != nil {
		return nil, fmt.Errorf("compensation sender %q: %w", l.From, err)
	}
	to, err := mail.ParseAddress(l.To)
	if err != nil {
		// A bare local user name is deliverable over LMTP but is no
		// address: name it in the display part only.
		to = &mail.Address{Address: l.To}
	}
	var h gomail.Header
	h.SetDate(l.Date)
	h.SetAddressList("From", []*gomail.Address{{Name: from.Name, Address: from.Address}})
	h.SetAddressList("To", []*gomail.Address{{Name: to.Name, Address: to.Address}})
	h.Set("Subject", encodeText(l.Subject))
	h.SetMessageID(l.MessageID)
	h.Set("MIME-Version", "1.0")
	// RFC 3834: an automatic message; responders must not answer it.
	h.Set("Auto-Submitted", "auto-generated")
	h.SetContentType("multipart/alternative", nil)
	var buf bytes.Buffer
	w, err := message.CreateWriter(&buf, h.Header)
	if err != nil {
		return nil, fmt.Errorf("write compensation message: %w", err)
	}
	for _, part := range []struct{ mediaType, body string }{{"text/plain", d.text()}, {"text/html", d.html()}} {
		var ph message.Header
		ph.SetContentType(part.mediaType, map[string]string{"charset": "utf-8"})
		ph.Set("Content-Transfer-Encoding", "quoted-printable")
		pw, err := w.CreatePart(ph)
		if err != nil {
			return nil, fmt.Errorf("write compensation message: %w", err)
		}
		if _, err := pw.Write([]byte(part.body)); err != nil {
			return nil, fmt.Errorf("write compensation message: %w", err)
		}
		if err := pw.Close(); err != nil {
			return nil, fmt.Errorf("write compensation message: %w", err)
		}
	}
	if err := w.Close(); err != nil {
		return nil, fmt.Errorf("write compensation message: %w", err)
	}
	return buf.Bytes(), nil
}
