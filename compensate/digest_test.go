package compensate

import (
	"bytes"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-message"
	gomail "github.com/emersion/go-message/mail"
)

func testLetter() Letter {
	seen := time.Date(2026, 11, 20, 9, 30, 0, 0, time.UTC)
	return Letter{
		From:      "Postmaster Zoë <postmaster@example.org>",
		To:        "juergen@example.org",
		Name:      "Jürgen",
		Subject:   "Änderungen an Ihrem Postfach – bitte lesen 📬",
		MessageID: "01J0000000000000000000000@undomail.example.org",
		Date:      time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC),
		Cycle:     Cycle{Seq: 42, Time: time.Date(2026, 11, 21, 11, 55, 0, 0, time.UTC), Reason: "Ein Spam-Filter wurde nachträglich installiert."},
		Contact:   "the help desk <help@example.org>",
		Paradoxes: []Paradox{
			{Kind: ReadRemoved, User: "jürgen", Verb: 7, VerbKind: "lmtp.deliver", Seen: seen, Now: "removed by the repair (a filter, header:Subject=~Gewinn)",
				Message: &Message{UndoID: "X1", Subject: "Grüße aus Köln 🎉 – Sie haben gewonnen", From: "Jürgen Müller <j@example.de>", Date: "Fri, 20 Nov 2026 08:00:00 +0100"}},
			{Kind: ActionFailed, User: "jürgen", Verb: 9, VerbKind: "imap.rename", Seen: seen.Add(time.Minute), Action: `you renamed the folder "Entwürfe" to "Archiv"`,
				Now: `it could not be redone: the mail server said "Target mailbox already exists"`},
		},
	}
}

// TestDigestMIME: a digest is multipart/alternative with a text/plain and
// a text/html part, both UTF-8 in quoted-printable, its header fields
// RFC 2047 encoded; non-ASCII subjects and names survive a round trip
// through go-message; every line fits RFC 5322's 78 characters and the
// message is 7-bit clean.
func TestDigestMIME(t *testing.T) {
	l := testLetter()
	raw, err := BuildDigest(l)
	if err != nil {
		t.Fatal(err)
	}
	for i, line := range strings.Split(string(raw), "\r\n") {
		if len(line) > 78 {
			t.Errorf("line %d is %d characters long: %q", i+1, len(line), line)
		}
	}
	for i, b := range raw {
		if b >= 0x80 || b == 0 {
			t.Fatalf("byte %d is %#x: the message is not 7-bit", i, b)
		}
	}
	if bytes.Contains(bytes.ReplaceAll(raw, []byte("\r\n"), nil), []byte("\n")) {
		t.Fatal("bare LF in the message")
	}
	r, err := gomail.CreateReader(bytes.NewReader(raw))
	if err != nil {
		t.Fatalf("go-message cannot read the digest: %v", err)
	}
	h := r.Header
	if subj, err := h.Subject(); err != nil || subj != l.Subject {
		t.Errorf("Subject %q, %v; want %q", subj, err, l.Subject)
	}
	if rawSubj := h.Get("Subject"); !strings.HasPrefix(rawSubj, "=?utf-8?") {
		t.Errorf("raw Subject %q is not an RFC 2047 encoded word", rawSubj)
	}
	from, err := h.AddressList("From")
	if err != nil || len(from) != 1 || from[0].Name != "Postmaster Zoë" || from[0].Address != "postmaster@example.org" {
		t.Errorf("From %v, %v", from, err)
	}
	if id, err := h.MessageID(); err != nil || id != l.MessageID {
		t.Errorf("Message-Id %q, %v", id, err)
	}
	if d, err := h.Date(); err != nil || !d.Equal(l.Date) {
		t.Errorf("Date %v, %v", d, err)
	}
	for _, f := range []string{"To", "MIME-Version", "Auto-Submitted"} {
		if h.Get(f) == "" {
			t.Errorf("no %s field", f)
		}
	}
	if mt, _, _ := h.ContentType(); mt != "multipart/alternative" {
		t.Fatalf("Content-Type %q", mt)
	}

	e, err := message.Read(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	mr := e.MultipartReader()
	var types []string
	parts := map[string]string{}
	for {
		p, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		mt, params, _ := p.Header.ContentType()
		types = append(types, mt)
		if params["charset"] != "utf-8" || p.Header.Get("Content-Transfer-Encoding") != "quoted-printable" {
			t.Errorf("%s part: charset %q, transfer encoding %q", mt, params["charset"], p.Header.Get("Content-Transfer-Encoding"))
		}
		b, err := io.ReadAll(p.Body)
		if err != nil {
			t.Fatal(err)
		}
		parts[mt] = string(b)
	}
	if strings.Join(types, ",") != "text/plain,text/html" {
		t.Fatalf("parts %v, want text/plain then text/html (RFC 2046: the plainest first)", types)
	}
	text := strings.Join(strings.Fields(parts["text/plain"]), " ")
	for _, want := range []string{
		"Hello Jürgen,",
		`"Grüße aus Köln 🎉 – Sie haben gewonnen" from Jürgen Müller <j@example.de>, dated Fri, 20 Nov 2026 08:00:00 +0100`,
		"On Friday, 20 November 2026 at 09:30 UTC you read",
		`you renamed the folder "Entwürfe" to "Archiv"`,
		"Why: Ein Spam-Filter wurde nachträglich installiert.",
		"please contact the help desk <help@example.org>",
		"repair 42",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("text/plain lacks %q:\n%s", want, parts["text/plain"])
		}
	}
	if strings.Index(text, "Grüße") > strings.Index(text, "Entwürfe") {
		t.Errorf("paradoxes out of order:\n%s", text)
	}
	html := parts["text/html"]
	for _, want := range []string{"Grüße aus Köln 🎉", "Jürgen Müller &lt;j@example.de&gt;", "<ol>", "<li>"} {
		if !strings.Contains(html, want) {
			t.Errorf("text/html lacks %q:\n%s", want, html)
		}
	}
}

// TestNoticeNamesEveryParadox: the operator notice lists each paradox
// with its kind, user and verb.
func TestNoticeNamesEveryParadox(t *testing.T) {
	l := testLetter()
	l.Paradoxes = append(l.Paradoxes, Paradox{Kind: DeliveryLost, Verb: 11, VerbKind: "lmtp.deliver", Rcpt: "bob@example.org",
		Message: &Message{Subject: "Rechnung"}, Seen: l.Cycle.Time, Now: `refused by the mail server when it was redone: "Quota exceeded"`})
	raw, err := BuildNotice(l)
	if err != nil {
		t.Fatal(err)
	}
	e, err := message.Read(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	var text string
	e.Walk(func(_ []int, p *message.Entity, err error) error {
		if mt, _, _ := p.Header.ContentType(); mt == "text/plain" {
			b, _ := io.ReadAll(p.Body)
			text = strings.Join(strings.Fields(string(b)), " ")
		}
		return nil
	})
	for _, want := range []string{"[read_removed] jürgen, verb 7 (lmtp.deliver)", "[action_failed] jürgen, verb 9 (imap.rename)",
		"[delivery_lost] a sender outside, verb 11", "changed 3 things"} {
		if !strings.Contains(text, want) {
			t.Errorf("notice lacks %q:\n%s", want, text)
		}
	}
}

// TestEncodeText: encoded subjects decode to what was encoded, whatever
// the script, and ASCII stays readable.
func TestEncodeText(t *testing.T) {
	for _, s := range []string{"Your mailbox was repaired", "Grüße – 🎉 a_b=?c?= d", "日本語のメールの件名はかなり長くなることがあります", "  two  spaces ", "=?not?encoded?="} {
		var h gomail.Header
		h.Set("Subject", encodeText(s))
		got, err := h.Subject()
		if err != nil || got != s {
			t.Errorf("encodeText(%q) = %q, decodes to %q, %v", s, encodeText(s), got, err)
		}
	}
	if got := encodeText("plain"); got != "plain" {
		t.Errorf("ASCII was encoded: %q", got)
	}
}

func TestServerSaid(t *testing.T) {
	for in, want := range map[string]string{
		"imap: NO [ALREADYEXISTS] Target mailbox already exists (0.001 + 0.000 secs).": `"Target mailbox already exists"`,
		"imap: NO Mailbox doesn't exist: Foo":                                          `"Mailbox doesn't exist: Foo"`,
		"RCPT bob@example.org: 552 5.2.2 Quota exceeded":                               `"RCPT bob@example.org: 552 5.2.2 Quota exceeded"`,
	} {
		if got := serverSaid(in); got != want {
			t.Errorf("serverSaid(%q) = %s, want %s", in, got, want)
		}
	}
}
