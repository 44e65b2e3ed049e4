package proxy_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// dial connects an SMTP client to addr from the given loopback source
// address ("" = default). 127.0.0.2 plays an outside client: the stack's
// Postfix has mynetworks = 127.0.0.1/32.
func dial(t *testing.T, addr, from string) *smtp.Client {
	t.Helper()
	d := net.Dialer{Timeout: 10 * time.Second}
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	c := smtp.NewClient(conn)
	t.Cleanup(func() { c.Close() })
	if err := c.Hello("client.test"); err != nil {
		t.Fatalf("EHLO %s: %v", addr, err)
	}
	return c
}

func dialLMTP(t *testing.T, addr string) *smtp.Client {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	c := smtp.NewClientLMTP(conn)
	t.Cleanup(func() { c.Close() })
	if err := c.Hello("client.test"); err != nil {
		t.Fatalf("LHLO %s: %v", addr, err)
	}
	return c
}

func smtpErr(err error) *smtp.SMTPError {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return se
	}
	return nil
}

func message(subject, msgID string) string {
	return "From: sender@example.test\r\nTo: alice@example.test\r\nSubject: " + subject +
		"\r\nMessage-Id: <" + msgID + ">\r\nDate: Sat, 21 Nov 2026 10:00:00 +0000\r\n\r\nHello.\r\n"
}

// rcptOutcome sends MAIL and RCPT to addr and returns RCPT's error.
func rcptOutcome(t *testing.T, addr, from string, auth sasl.Client, rcpt string) error {
	t.Helper()
	c := dial(t, addr, from)
	if auth != nil {
		if err := c.Auth(auth); err != nil {
			return err
		}
	}
	if err := c.Mail("sender@example.test", nil); err != nil {
		t.Fatalf("MAIL: %v", err)
	}
	return c.Rcpt(rcpt, nil)
}

// TestPolicyIsTheUpstreams checks that every accept or refuse decision at
// the front door is Postfix's own, with Postfix's own reply: a client gets
// through undomail exactly what it gets from Postfix directly.
func TestPolicyIsTheUpstreams(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	st := tb.Stack
	alice := func() sasl.Client { return sasl.NewPlainClient("", "alice", st.Password("alice")) }
	cases := []struct {
		name string
		from string
		auth func() sasl.Client
		rcpt string
		// want: "" accepted, else the reply must contain it.
		want string
	}{
		{"unknown local user", "", nil, "nobody@example.test",
			"550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown in virtual mailbox table"},
		{"outside client may not relay", "127.0.0.2", nil, "someone@elsewhere.example",
			"554 5.7.1 <someone@elsewhere.example>: Relay access denied"},
		{"outside client may deliver locally", "127.0.0.2", nil, "bob@example.test", ""},
		{"authenticated outside client may relay", "127.0.0.2", alice, "someone@elsewhere.example", ""},
	}
	describe := func(err error) string {
		if err == nil {
			return ""
		}
		if se := smtpErr(err); se != nil {
			return fmt.Sprintf("%d %d.%d.%d %s", se.Code, se.EnhancedCode[0], se.EnhancedCode[1], se.EnhancedCode[2], se.Message)
		}
		return err.Error()
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var auth sasl.Client
			if tc.auth != nil {
				auth = tc.auth()
			}
			direct := describe(rcptOutcome(t, st.SMTPAddr, tc.from, auth, tc.rcpt))
			if tc.auth != nil {
				auth = tc.auth()
			}
			ours := describe(rcptOutcome(t, tb.SMTPAddr(), tc.from, auth, tc.rcpt))
			if direct != ours {
				t.Fatalf("RCPT %s: Postfix says %q, through undomail %q", tc.rcpt, direct, ours)
			}
			if (tc.want == "") != (ours == "") || !strings.Contains(ours, tc.want) {
				t.Fatalf("RCPT %s: %q, want %q", tc.rcpt, ours, tc.want)
			}
		})
	}
}

func TestAuthIsRelayed(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	c := dial(t, tb.SMTPAddr(), "127.0.0.2")
	if ok, mechs := c.Extension("AUTH"); !ok || !strings.Contains(mechs, "PLAIN") {
		t.Fatalf("front door does not offer AUTH PLAIN: %v %q", ok, mechs)
	}
	err := c.Auth(sasl.NewPlainClient("", "alice", "wrong"))
	se := smtpErr(err)
	if se == nil || se.Code != 535 || se.EnhancedCode != (smtp.EnhancedCode{5, 7, 8}) {
		t.Fatalf("AUTH with a wrong password: %v, want Postfix's 535 5.7.8", err)
	}
	c2 := dial(t, tb.SMTPAddr(), "127.0.0.2")
	if err := c2.Auth(sasl.NewLoginClient("alice", tb.Stack.Password("alice"))); err != nil {
		t.Fatalf("AUTH LOGIN with the right password: %v", err)
	}
}

func TestExtensionsFollowUpstream(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	direct := dial(t, tb.Stack.SMTPAddr, "")
	ours := dial(t, tb.SMTPAddr(), "")
	for _, ext := range []string{"SIZE", "8BITMIME", "SMTPUTF8", "DSN"} {
		dok, dv := direct.Extension(ext)
		ook, ov := ours.Extension(ext)
		if dok != ook || dv != ov {
			t.Errorf("%s: Postfix offers %v %q, undomail %v %q", ext, dok, dv, ook, ov)
		}
	}
}

// waitForMessage polls user's INBOX for a message with the Message-Id and
// returns its header section.
func waitForMessage(t *testing.T, tb *testbed.Testbed, user, msgID string) string {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		hdr, err := fetchHeader(tb, user, msgID)
		if err == nil && hdr != "" {
			return hdr
		}
		if time.Now().After(deadline) {
			t.Fatalf("message %s not in %s's INBOX after 20s (last error %v)", msgID, user, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func fetchHeader(tb *testbed.Testbed, user, msgID string) (string, error) {
	c, err := imapclient.DialInsecure(tb.Stack.IMAPAddr, nil)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if err := c.Login(user, tb.Stack.Password(user)).Wait(); err != nil {
		return "", err
	}
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		return "", err
	}
	found, err := c.Search(&imap.SearchCriteria{Header: []imap.SearchCriteriaHeaderField{{Key: "Message-Id", Value: msgID}}}, nil).Wait()
	if err != nil || len(found.AllSeqNums()) == 0 {
		return "", err
	}
	msgs, err := c.Fetch(imap.SeqSetNum(found.AllSeqNums()[0]), &imap.FetchOptions{
		BodySection: []*imap.FetchItemBodySection{{Specifier: imap.PartSpecifierHeader, Peek: true}},
	}).Collect()
	if err != nil || len(msgs) == 0 {
		return "", err
	}
	for _, b := range msgs[0].BodySection {
		return string(b.Bytes), nil
	}
	return "", nil
}

// verbsOf returns the logged verbs whose delivery args name msgID.
func verbsOf(t *testing.T, l *undolog.Log, msgID string) map[string]undolog.Verb {
	t.Helper()
	verbs, err := l.Verbs(context.Background(), undolog.Filter{})
	if err != nil {
		t.Fatalf("read verbs: %v", err)
	}
	out := map[string]undolog.Verb{}
	for _, v := range verbs {
		var a verb.DeliveryArgs
		if json.Unmarshal(v.Args, &a) == nil && a.Header.MessageID == "<"+msgID+">" {
			out[v.Kind] = v
		}
	}
	return out
}

func outcomeOf(t *testing.T, v undolog.Verb) verb.DeliveryOutcome {
	t.Helper()
	if v.Outcome == nil {
		t.Fatalf("verb %d (%s) has no outcome", v.Seq, v.Kind)
	}
	var o verb.DeliveryOutcome
	if err := json.Unmarshal(v.Outcome.Outcome, &o); err != nil {
		t.Fatalf("verb %d outcome: %v", v.Seq, err)
	}
	return o
}

// TestDeliveryIsLoggedAndTraced follows one message through the front
// door, Postfix, the LMTP capture and Dovecot.
func TestDeliveryIsLoggedAndTraced(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	c := dial(t, tb.SMTPAddr(), "")
	msgID := "trace.1@client.test"
	if err := c.SendMail("sender@example.test", []string{"alice@example.test"}, strings.NewReader(message("traced", msgID))); err != nil {
		t.Fatalf("send: %v", err)
	}
	hdr := waitForMessage(t, tb, "alice", msgID)
	// Dovecot stores the message before it answers the capture, which
	// logs that answer before it relays it to Postfix: the delivery's
	// outcome may come a moment after the message is visible.
	verbs := verbsOf(t, tb.Daemon.Log, msgID)
	for deadline := time.Now().Add(20 * time.Second); verbs[verb.KindLMTPDeliver].Outcome == nil && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
		verbs = verbsOf(t, tb.Daemon.Log, msgID)
	}
	submit, ok1 := verbs[verb.KindSMTPSubmit]
	deliver, ok2 := verbs[verb.KindLMTPDeliver]
	if !ok1 || !ok2 {
		t.Fatalf("want an smtp.submit and an lmtp.deliver verb for the message, got %v", verbs)
	}
	var sa, da verb.DeliveryArgs
	json.Unmarshal(submit.Args, &sa)
	json.Unmarshal(deliver.Args, &da)
	// The delivery is linked to the submission and shares its id; the
	// stored message carries that one trace header.
	if da.UndoID != sa.UndoID || da.Submission != submit.Seq {
		t.Fatalf("delivery id %s submission %d, want the front door's id %s and seq %d", da.UndoID, da.Submission, sa.UndoID, submit.Seq)
	}
	if n := strings.Count(hdr, verb.TraceHeader+":"); n != 1 || !strings.Contains(hdr, fmt.Sprintf("%s: %s\r\n", verb.TraceHeader, sa.UndoID)) {
		t.Fatalf("stored message has %d trace headers, want one with %s:\n%s", n, sa.UndoID, hdr)
	}
	so := outcomeOf(t, submit)
	if so.Reply == nil || so.Reply.Code != 250 || so.Reply.Enhanced != "2.0.0" || !strings.HasPrefix(so.Reply.Text, "Ok: queued as ") {
		t.Fatalf("front door outcome = %+v, want Postfix's 250 2.0.0 Ok: queued as ...", so)
	}
	do := outcomeOf(t, deliver)
	if len(do.Rcpts) != 1 || do.Rcpts[0].Reply.Code != 250 || do.Rcpts[0].Rcpt != "alice@example.test" {
		t.Fatalf("delivery outcome = %+v, want 250 for alice", do)
	}
	// The blob is the message exactly as the client sent it.
	b, err := tb.Daemon.Log.ReadBlob(submit.Blob)
	if err != nil {
		t.Fatalf("read blob: %v", err)
	}
	if string(b) != message("traced", msgID) {
		t.Fatalf("blob = %q, want the message as sent", b)
	}
	// The delivery's blob is the message as Postfix handed it to the
	// capture: its lines, the trace header, the message as sent. The log
	// keeps it as a delta of the submission's blob (undolog CommitDelta)
	// and reads it back whole.
	d, err := tb.Daemon.Log.ReadBlob(deliver.Blob)
	if err != nil {
		t.Fatalf("read the delivery's blob: %v", err)
	}
	if want := verb.TraceHeader + ": " + sa.UndoID + "\r\n" + message("traced", msgID); !strings.HasSuffix(string(d), want) || !strings.HasPrefix(string(d), "Received: ") {
		t.Fatalf("delivery blob = %q, want Postfix's Received line, the trace header and the message as sent", d)
	}
}

// TestLMTPPerRecipientReplies sends one LMTP transaction for three
// recipients: one unknown (refused at RCPT by Dovecot), one whose mailbox
// cannot be written (fails at DATA), one fine. Each gets its own reply.
func TestLMTPPerRecipientReplies(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	// Make bob's maildir unwritable for Dovecot's mail user: a file where
	// his Maildir directory would be.
	bobDir := filepath.Join(tb.Stack.MailRoot, "bob")
	os.RemoveAll(bobDir)
	if err := os.MkdirAll(bobDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bobDir, "Maildir"), []byte("not a directory"), 0o600); err != nil {
		t.Fatal(err)
	}
	c := dialLMTP(t, tb.Daemon.LMTPAddr.String())
	if err := c.Mail("sender@example.test", nil); err != nil {
		t.Fatalf("MAIL: %v", err)
	}
	if err := c.Rcpt("alice@example.test", nil); err != nil {
		t.Fatalf("RCPT alice: %v", err)
	}
	err := c.Rcpt("nosuch@example.test", nil)
	if se := smtpErr(err); se == nil || se.Code != 550 || se.EnhancedCode != (smtp.EnhancedCode{5, 1, 1}) {
		t.Fatalf("RCPT nosuch: %v, want Dovecot's 550 5.1.1", err)
	}
	if err := c.Rcpt("bob@example.test", nil); err != nil {
		t.Fatalf("RCPT bob: %v", err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatalf("DATA: %v", err)
	}
	w.Write([]byte(message("per recipient", "lmtp.1@client.test")))
	resps, err := w.CloseWithLMTPResponse()
	var lerr smtp.LMTPDataError
	if !errors.As(err, &lerr) {
		t.Fatalf("end of data: %v, want a per-recipient error for bob", err)
	}
	if r, ok := resps["alice@example.test"]; !ok || !strings.Contains(r.StatusText, "Saved") {
		t.Fatalf("alice's reply = %+v, want Dovecot's 250 ... Saved", resps)
	}
	bob, ok := lerr["bob@example.test"]
	if !ok || bob.Code/100 != 4 {
		t.Fatalf("bob's reply = %+v, want a 4xx from Dovecot", lerr)
	}
	if strings.HasPrefix(bob.Message, "<bob@example.test> <bob@example.test>") {
		t.Fatalf("recipient repeated in bob's reply: %q", bob.Message)
	}
	waitForMessage(t, tb, "alice", "lmtp.1@client.test")
	v := verbsOf(t, tb.Daemon.Log, "lmtp.1@client.test")[verb.KindLMTPDeliver]
	var a verb.DeliveryArgs
	json.Unmarshal(v.Args, &a)
	if len(a.Rejected) != 1 || a.Rejected[0].Rcpt != "nosuch@example.test" || a.Rejected[0].Reply.Code != 550 {
		t.Fatalf("logged rejected recipients = %+v, want nosuch with 550", a.Rejected)
	}
	o := outcomeOf(t, v)
	got := map[string]int{}
	for _, r := range o.Rcpts {
		got[r.Rcpt] = r.Reply.Code
	}
	if got["alice@example.test"] != 250 || got["bob@example.test"] != bob.Code || len(got) != 2 {
		t.Fatalf("logged per-recipient outcome = %v, want alice 250, bob %d", got, bob.Code)
	}
}

func TestOversizedMessages(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	ok, v := dial(t, tb.SMTPAddr(), "").Extension("SIZE")
	if !ok || v != "10240000" {
		t.Fatalf("SIZE = %v %q, want Postfix's 10240000", ok, v)
	}
	// Declared in MAIL FROM.
	c := dial(t, tb.SMTPAddr(), "")
	err := c.Mail("sender@example.test", &smtp.MailOptions{Size: 20000000})
	if se := smtpErr(err); se == nil || se.Code != 552 {
		t.Fatalf("MAIL SIZE=20000000: %v, want 552", err)
	}
	// Not declared: refused at the end of DATA, and nothing logged.
	before, _ := tb.Daemon.Log.Last()
	c = dial(t, tb.SMTPAddr(), "")
	if err := c.Mail("sender@example.test", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt("alice@example.test", nil); err != nil {
		t.Fatal(err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte("Subject: big\r\n\r\n"))
	line := []byte(strings.Repeat("x", 998) + "\r\n")
	for n := 0; n < 10240000/len(line)+10; n++ {
		if _, err := w.Write(line); err != nil {
			break
		}
	}
	_, err = w.CloseWithResponse()
	if se := smtpErr(err); se == nil || se.Code != 552 || se.EnhancedCode != (smtp.EnhancedCode{5, 3, 4}) {
		t.Fatalf("oversized DATA: %v, want 552 5.3.4", err)
	}
	if after, _ := tb.Daemon.Log.Last(); after != before {
		t.Fatalf("log grew from %d to %d records for a refused message", before, after)
	}
}

// TestSMTPUTF8 sends an internationalised envelope and header (RFC 6531)
// through the front door: accepted by Postfix and logged as such. (Postfix
// cannot deliver it on to Dovecot 2.3, whose LMTP does not offer SMTPUTF8,
// with or without undomail; so this test stops at the front door.)
func TestSMTPUTF8(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	c := dial(t, tb.SMTPAddr(), "")
	if ok, _ := c.Extension("SMTPUTF8"); !ok {
		t.Fatal("front door does not offer SMTPUTF8 though Postfix does")
	}
	if err := c.Mail("jörg@example.test", &smtp.MailOptions{UTF8: true}); err != nil {
		t.Fatalf("MAIL SMTPUTF8: %v", err)
	}
	if err := c.Rcpt("alice@example.test", nil); err != nil {
		t.Fatal(err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte("From: Jörg <jörg@example.test>\r\nSubject: Grüße\r\nMessage-Id: <utf8.1@client.test>\r\n\r\nHallo.\r\n"))
	if err := w.Close(); err != nil {
		t.Fatalf("end of data: %v", err)
	}
	v := verbsOf(t, tb.Daemon.Log, "utf8.1@client.test")[verb.KindSMTPSubmit]
	var a verb.DeliveryArgs
	json.Unmarshal(v.Args, &a)
	if a.MailFrom != "jörg@example.test" || !a.SMTPUTF8 || a.Header.Subject != "Grüße" {
		t.Fatalf("logged %+v", a)
	}
	if o := outcomeOf(t, v); o.Reply == nil || o.Reply.Code != 250 {
		t.Fatalf("logged outcome %+v, want Postfix's 250", o)
	}
}

// TestForgedUndoIDIsNotTrusted: a sender that writes its own Undomail-Id
// field cannot make a delivery claim another identity. The front door puts
// its own id on top, and the LMTP capture links only ids the log knows.
func TestForgedUndoIDIsNotTrusted(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	forged := "Undomail-Id: 01FORGEDFORGEDFORGEDFORGED\r\n"
	c := dial(t, tb.SMTPAddr(), "")
	if err := c.SendMail("sender@example.test", []string{"alice@example.test"}, strings.NewReader(forged+message("forged", "forged.1@client.test"))); err != nil {
		t.Fatal(err)
	}
	waitForMessage(t, tb, "alice", "forged.1@client.test")
	verbs := verbsOf(t, tb.Daemon.Log, "forged.1@client.test")
	var sa, da verb.DeliveryArgs
	json.Unmarshal(verbs[verb.KindSMTPSubmit].Args, &sa)
	json.Unmarshal(verbs[verb.KindLMTPDeliver].Args, &da)
	if da.UndoID != sa.UndoID || sa.UndoID == "01FORGEDFORGEDFORGEDFORGED" {
		t.Fatalf("submission %s, delivery %s: want both the front door's own id", sa.UndoID, da.UndoID)
	}
	// Straight into the LMTP capture (no front door): the forged id is
	// unknown, so the delivery gets a fresh one, stamped on top.
	lc := dialLMTP(t, tb.Daemon.LMTPAddr.String())
	if err := lc.Mail("sender@example.test", nil); err != nil {
		t.Fatal(err)
	}
	if err := lc.Rcpt("alice@example.test", nil); err != nil {
		t.Fatal(err)
	}
	w, err := lc.Data()
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte(forged + message("forged lmtp", "forged.2@client.test")))
	if _, err := w.CloseWithLMTPResponse(); err != nil {
		t.Fatal(err)
	}
	hdr := waitForMessage(t, tb, "alice", "forged.2@client.test")
	da = verb.DeliveryArgs{}
	json.Unmarshal(verbsOf(t, tb.Daemon.Log, "forged.2@client.test")[verb.KindLMTPDeliver].Args, &da)
	if da.UndoID == "" || da.UndoID == "01FORGEDFORGEDFORGEDFORGED" || da.Submission != 0 {
		t.Fatalf("direct LMTP delivery took the forged id: %+v", da)
	}
	if i := strings.Index(hdr, verb.TraceHeader+":"); i < 0 || !strings.HasPrefix(hdr[i:], verb.TraceHeader+": "+da.UndoID+"\r\n") {
		t.Fatalf("the delivery's own id is not the topmost trace header:\n%s", hdr)
	}
}
