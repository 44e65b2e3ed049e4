package daemon_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"mime"
	"path/filepath"
	"strings"
	"testing"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-message"
	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/compensate"
	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/undolog"
)

// mailMsg is a test message with the header fields a digest must name.
type mailMsg struct {
	id, from, subject, date string
}

// sendMsg hands msg to undomail's front door, authenticated as auth
// unless it is "".
func sendMsg(t *testing.T, tb *testbed.Testbed, auth, mailFrom, to string, m mailMsg, extra string) {
	t.Helper()
	c, err := smtp.Dial(tb.SMTPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if auth != "" {
		if err := c.Auth(sasl.NewPlainClient("", auth, tb.Stack.Password(auth))); err != nil {
			t.Fatalf("AUTH %s: %v", auth, err)
		}
	}
	name, addr, _ := strings.Cut(m.from, " <")
	body := "From: " + mime.QEncoding.Encode("utf-8", name) + " <" + addr + "\r\n" +
		"Subject: " + mime.QEncoding.Encode("utf-8", m.subject) + "\r\n" +
		"Date: " + m.date + "\r\nMessage-Id: <" + m.id + ">\r\n" + extra + "\r\nbody of " + m.id + "\r\n"
	if err := c.SendMail(mailFrom, []string{to}, strings.NewReader(body)); err != nil {
		t.Fatalf("send %s: %v", m.id, err)
	}
}

// digest is a compensating message found in a mailbox.
type digest struct {
	subject, from, text, html string
}

// userDigests returns the compensating messages in a user's INBOX, read
// directly from Dovecot and parsed with go-message.
func userDigests(t *testing.T, tb *testbed.Testbed, user string) []digest {
	t.Helper()
	c, err := imapclient.DialInsecure(tb.Stack.IMAPAddr, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Login(user, tb.Stack.Password(user)).Wait(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Select("INBOX", &imap.SelectOptions{ReadOnly: true}).Wait(); err != nil {
		t.Fatal(err)
	}
	found, err := c.UIDSearch(&imap.SearchCriteria{Header: []imap.SearchCriteriaHeaderField{{Key: "Auto-Submitted", Value: "auto-generated"}}}, nil).Wait()
	if err != nil {
		t.Fatal(err)
	}
	var out []digest
	for _, uid := range found.AllUIDs() {
		msgs, err := c.Fetch(imap.UIDSetNum(uid), &imap.FetchOptions{BodySection: []*imap.FetchItemBodySection{{Peek: true}}}).Collect()
		if err != nil || len(msgs) != 1 {
			t.Fatalf("fetch digest %d: %v", uid, err)
		}
		var raw []byte
		for _, b := range msgs[0].BodySection {
			raw = b.Bytes
		}
		e, err := message.Read(bytes.NewReader(raw))
		if err != nil {
			t.Fatalf("digest %d does not parse: %v\n%s", uid, err, raw)
		}
		var d digest
		d.subject, _ = e.Header.Text("Subject")
		d.from = e.Header.Get("From")
		e.Walk(func(_ []int, p *message.Entity, err error) error {
			if err != nil {
				t.Fatalf("digest %d: %v", uid, err)
			}
			switch mt, _, _ := p.Header.ContentType(); mt {
			case "text/plain":
				b, _ := io.ReadAll(p.Body)
				d.text = string(b)
			case "text/html":
				b, _ := io.ReadAll(p.Body)
				d.html = string(b)
			}
			return nil
		})
		out = append(out, d)
	}
	return out
}

// read fetches the messages with these Message-Ids through undomail's
// IMAP front end (FETCH BODY[], not PEEK), so imap.fetch records say
// alice saw them.
func read(t *testing.T, tb *testbed.Testbed, user, mailbox string, ids ...string) {
	t.Helper()
	c, err := imapclient.DialInsecure(tb.IMAPAddr(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Login(user, tb.Stack.Password(user)).Wait(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Select(mailbox, nil).Wait(); err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		found, err := c.UIDSearch(&imap.SearchCriteria{Header: []imap.SearchCriteriaHeaderField{{Key: "Message-Id", Value: id}}}, nil).Wait()
		if err != nil || len(found.AllUIDs()) != 1 {
			t.Fatalf("find %s: %v", id, err)
		}
		if _, err := c.Fetch(imap.UIDSetNum(found.AllUIDs()[0]), &imap.FetchOptions{BodySection: []*imap.FetchItemBodySection{{}}}).Collect(); err != nil {
			t.Fatal(err)
		}
	}
	c.Logout().Wait()
}

// TestCompensationSpamWave: ten spam messages and some ham arrive; alice
// reads three of the spam. A cycle filters the spam out afterwards. Her
// INBOX then holds the ham and exactly one digest, which names the three
// she read (subject, sender, date) and none of the seven she never saw;
// the verdict counts 3 explained, 7 silent. A second cycle over the same
// period re-delivers the digest and explains nothing twice.
func TestCompensationSpamWave(t *testing.T) {
	snapDir := filepath.Join(t.TempDir(), "snaps")
	tb := testbedtest.Start(t, func(c *config.Config) {
		c.Store = "copy:" + snapDir
		c.Compensation.Contact = "the help desk, help@example.test"
		c.Compensation.Postmaster = "Postmaster Zoë <postmaster@example.test>"
	})
	ctx := context.Background()
	snap, _, err := tb.Daemon.Snapshot(ctx, "before the wave")
	if err != nil {
		t.Fatal(err)
	}
	var spam, ham []mailMsg
	for i := range 10 {
		spam = append(spam, mailMsg{id: fmt.Sprintf("spam%d@spam.test", i), from: fmt.Sprintf("Glücksfee %d <luck%d@spam.test>", i, i),
			subject: fmt.Sprintf("Sie haben gewonnen – Lottery %d", i), date: fmt.Sprintf("Fri, 20 Nov 2026 10:%02d:00 +0100", i)})
	}
	for i := range 3 {
		ham = append(ham, mailMsg{id: fmt.Sprintf("ham%d@client.test", i), from: "Bob <bob@example.test>",
			subject: fmt.Sprintf("minutes %d", i), date: "Fri, 20 Nov 2026 09:00:00 +0100"})
	}
	for i, m := range spam {
		sendMsg(t, tb, "", "luck@spam.test", "alice@example.test", m, "")
		if i < len(ham) {
			sendMsg(t, tb, "", "bob@example.test", "alice@example.test", ham[i], "")
		}
	}
	for _, m := range append(append([]mailMsg{}, spam...), ham...) {
		waitFor(t, tb, "INBOX", m.id)
	}
	read(t, tb, "alice", "INBOX", spam[2].id, spam[5].id, spam[7].id, ham[0].id)

	v, err := tb.Daemon.Cycle(ctx, admin.CycleRequest{To: snap.Name, Reason: "A spam wave got past the filter; it is now removed.",
		Filters: []admin.FilterRequest{{Rule: "header:Subject=~(?i)lottery", Action: "drop"}}})
	if err != nil || !v.OK {
		t.Fatalf("cycle verdict %+v, %v", v, err)
	}
	c := v.Compensation
	if c == nil {
		t.Fatalf("verdict without compensation: %+v", v)
	}
	if c.Explained != 3 || c.Silent != 7 || c.Notified != 0 || c.Kinds[compensate.ReadRemoved] != (compensate.Counts{Explained: 3, Silent: 7}) {
		t.Fatalf("compensation %+v: want 3 explained, 7 silent, all read_removed", c)
	}
	got := aliceMail(t, tb)["INBOX"]
	if len(got) != len(ham)+1 {
		t.Fatalf("alice's INBOX after the cycle: %v; want the ham and one digest", got)
	}
	ds := userDigests(t, tb, "alice")
	if len(ds) != 1 {
		t.Fatalf("alice has %d digests, want 1", len(ds))
	}
	d := ds[0]
	text := strings.Join(strings.Fields(d.text), " ") // undo line wrapping
	if d.subject != compensate.DefaultSubject || !strings.Contains(d.from, "postmaster@example.test") {
		t.Fatalf("digest subject %q from %q", d.subject, d.from)
	}
	for i, m := range spam {
		named := strings.Contains(text, m.subject)
		if want := i == 2 || i == 5 || i == 7; named != want {
			t.Errorf("digest names %q: %v, want %v", m.subject, named, want)
		}
		if named && (!strings.Contains(text, m.date) || !strings.Contains(text, m.from)) {
			t.Errorf("digest does not name the sender and date of %q:\n%s", m.subject, d.text)
		}
	}
	for _, want := range []string{"A spam wave got past the filter", "the help desk, help@example.test", "Hello alice"} {
		if !strings.Contains(text, want) || !strings.Contains(d.html, want) {
			t.Errorf("digest lacks %q:\n%s\n%s", want, d.text, d.html)
		}
	}
	if strings.Contains(text, "minutes") {
		t.Errorf("digest names ham:\n%s", d.text)
	}
	t.Logf("digest:\n%s", d.text)

	// A second cycle over the same period: the first cycle's filter is
	// applied again, the digest is re-delivered, nothing is explained twice.
	v2, err := tb.Daemon.Cycle(ctx, admin.CycleRequest{To: snap.Name})
	if err != nil || !v2.OK {
		t.Fatalf("second cycle verdict %+v, %v", v2, err)
	}
	if c2 := v2.Compensation; c2 == nil || c2.Explained != 0 || c2.Already != 3 || c2.Silent != 7 || len(c2.Digests) != 0 {
		t.Fatalf("second cycle compensation %+v: want 3 already explained, 7 silent, no digest", c2)
	}
	if ds := userDigests(t, tb, "alice"); len(ds) != 1 {
		t.Fatalf("after the second cycle alice has %d digests, want 1", len(ds))
	}
	comps, err := compensate.List(ctx, tb.Daemon.Log, undolog.Filter{})
	if err != nil || len(comps) != 1 || comps[0].Args.User != "alice" || len(comps[0].Args.Paradoxes) != 3 || !comps[0].Delivered() {
		t.Fatalf("compensations in the log: %+v, %v", comps, err)
	}
}
