package daemon_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-message"
	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/compensate"
	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/replay"
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
	c := testbedtest.IMAP(t, tb.Stack.IMAPAddr, user, tb.Stack.Password(user))
	defer c.Close()
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
	c := testbedtest.IMAP(t, tb.IMAPAddr(), user, tb.Stack.Password(user))
	defer c.Close()
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

// waitDelivered waits until the LMTP capture logged the delivery of the
// message with this subject, and returns its seq. Postfix is asked to
// retry deferred mail rather than waited out.
func waitDelivered(t *testing.T, tb *testbed.Testbed, subject string) int64 {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		vs, err := tb.Daemon.Log.Verbs(context.Background(), undolog.Filter{Kinds: []string{"lmtp.deliver"}})
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range vs {
			if v.Outcome != nil && strings.Contains(string(v.Args), subject) {
				return v.Seq
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no delivery of %q logged", subject)
		}
		tb.Stack.Flush(context.Background())
		time.Sleep(100 * time.Millisecond)
	}
}

// TestCompensationForChangedResults: after a snapshot alice flags a spam
// message, replies to it, deletes her folder Archive and renames another
// folder to Archive, deletes Projects and creates it anew, and sends bob a
// message. The operator's cycle filters the spam out and cancels both
// DELETEs (the folders come back) and the delivery to bob. Replayed, the
// STORE acts on a removed message, the RENAME and the CREATE collide with
// the restored folders, and the sender of the cancelled delivery was told
// 250: each is explained in alice's one digest as configured; the
// cancelled DELETEs go to the operator only (configured notify), and the
// operator's notice lists everything.
func TestCompensationForChangedResults(t *testing.T) {
	snapDir := filepath.Join(t.TempDir(), "snaps")
	tb := testbedtest.Start(t, func(c *config.Config) {
		c.Store = "copy:" + snapDir
		c.Compensation.Operator = "carol@example.test"
		c.Compensation.Policies.ActionCancelled = "notify"
	})
	ctx := context.Background()
	c := testbedtest.IMAP(t, tb.IMAPAddr(), "alice", tb.Stack.Password("alice"))
	defer c.Close()
	for _, box := range []string{"Archive", "Projects"} {
		if err := c.Create(box, nil).Wait(); err != nil {
			t.Fatal(err)
		}
	}
	snap, _, err := tb.Daemon.Snapshot(ctx, "before")
	if err != nil {
		t.Fatal(err)
	}
	spam := mailMsg{id: "win@spam.test", from: "Lucky <lucky@spam.test>", subject: "You WIN the Lottery!", date: "Fri, 20 Nov 2026 10:00:00 +0000"}
	sendMsg(t, tb, "", "lucky@spam.test", "alice@example.test", spam, "")
	waitFor(t, tb, "INBOX", spam.id)
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	found, err := c.UIDSearch(&imap.SearchCriteria{Header: []imap.SearchCriteriaHeaderField{{Key: "Message-Id", Value: spam.id}}}, nil).Wait()
	if err != nil || len(found.AllUIDs()) != 1 {
		t.Fatalf("find the spam: %v", err)
	}
	if err := c.Store(imap.UIDSetNum(found.AllUIDs()[0]), &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagFlagged}}, nil).Close(); err != nil {
		t.Fatal(err)
	}
	reply := mailMsg{id: "re-win@example.test", from: "Alice <alice@example.test>", subject: "Re: You WIN the Lottery!", date: "Fri, 20 Nov 2026 11:00:00 +0000"}
	sendMsg(t, tb, "alice", "alice@example.test", "carol@example.test", reply, "In-Reply-To: <"+spam.id+">\r\n")
	for _, step := range []func() error{
		func() error { return c.Delete("Archive").Wait() },
		func() error { return c.Delete("Projects").Wait() },
		func() error { return c.Create("Projects", nil).Wait() },
		func() error { return c.Create("Drafts2", nil).Wait() },
		func() error { return c.Rename("Drafts2", "Archive", nil).Wait() },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	c.Logout().Wait()
	numbers := mailMsg{id: "q3@example.test", from: "Alice <alice@example.test>", subject: "Quarterly numbers", date: "Fri, 20 Nov 2026 12:00:00 +0000"}
	sendMsg(t, tb, "alice", "alice@example.test", "bob@example.test", numbers, "")

	deletes, _ := tb.Daemon.Log.Verbs(ctx, undolog.Filter{Kinds: []string{"imap.delete"}})
	if len(deletes) != 2 {
		t.Fatalf("DELETE verbs: %d", len(deletes))
	}
	waitDelivered(t, tb, reply.subject)
	cancel := []int64{deletes[0].Seq, deletes[1].Seq, waitDelivered(t, tb, numbers.subject)}
	v, cerr := tb.Daemon.Cycle(ctx, admin.CycleRequest{To: snap.Name, Cancel: cancel, Reason: "Alice asked for her Archive back.",
		Filters: []admin.FilterRequest{{Rule: "header:Subject=~^You WIN", Action: "drop"}}})
	if v.Failed != 2 || v.Cycle == 0 {
		t.Fatalf("cycle verdict %+v, %v: want the RENAME onto the restored Archive and the CREATE of the restored Projects to fail", v, cerr)
	}
	rep := v.Compensation
	if rep == nil {
		// The cycle stopped before compensating because a verb failed to
		// replay; the operator runs compensation for it.
		r, err := tb.Daemon.Compensate(ctx, v.Cycle)
		if err != nil {
			t.Fatalf("compensate cycle %d: %v", v.Cycle, err)
		}
		rep = &r
	}
	want := map[compensate.Kind]compensate.Counts{
		compensate.ActionFailed:    {Explained: 3}, // the STORE, the RENAME and the CREATE
		compensate.DeliveryLost:    {Explained: 1}, // alice was told 250 for bob
		compensate.SentOnwards:     {Explained: 1}, // her reply to the spam
		compensate.ActionCancelled: {Notified: 2},  // the DELETEs, configured notify
		compensate.ReadRemoved:     {Silent: 2},    // the spam and bob's message, never read
	}
	if fmt.Sprint(rep.Kinds) != fmt.Sprint(want) || !rep.Notice || fmt.Sprint(rep.Digests) != "[alice]" {
		t.Fatalf("compensation %+v\nwant kinds %v, a digest for alice and a notice", rep, want)
	}
	ds := userDigests(t, tb, "alice")
	if len(ds) != 1 {
		t.Fatalf("alice has %d digests, want 1", len(ds))
	}
	t.Logf("alice's digest:\n%s", ds[0].text)
	text := strings.Join(strings.Fields(ds[0].text), " ")
	for _, s := range []string{
		`added the flags \Flagged on a message in "INBOX" (the message "You WIN the Lottery!" from Lucky <lucky@spam.test>`,
		`renamed the folder "Drafts2" to "Archive"`,
		`created the folder "Projects", and it was done. After the repair it could not be redone: the mail server said`,
		`"Quarterly numbers"`, "to bob@example.test and were told it was delivered",
		`replied to or forwarded the message "You WIN the Lottery!" from Lucky <lucky@spam.test>, dated Fri, 20 Nov 2026 10:00:00 +0000 in your message "Re: You WIN the Lottery!" to carol@example.test`,
		`the mail server said "Target mailbox already exists"`,
		"Alice asked for her Archive back.",
	} {
		if !strings.Contains(text, s) {
			t.Errorf("alice's digest lacks %q:\n%s", s, ds[0].text)
		}
	}
	if strings.Contains(text, `deleted the folder "Archive"`) {
		t.Errorf("alice's digest explains the cancelled DELETE, configured notify:\n%s", ds[0].text)
	}
	notices := userDigests(t, tb, "carol")
	if len(notices) != 1 {
		t.Fatalf("the operator has %d notices, want 1", len(notices))
	}
	t.Logf("operator notice:\n%s", notices[0].text)
	notice := strings.Join(strings.Fields(notices[0].text), " ")
	for _, s := range []string{"[action_cancelled] alice", `deleted the folder "Archive"`, "[delivery_lost] alice", "[action_failed] alice", "[sent_onwards] alice"} {
		if !strings.Contains(notice, s) {
			t.Errorf("operator notice lacks %q:\n%s", s, notices[0].text)
		}
	}

	// Compensating the cycle again finds every paradox taken care of.
	again, err := tb.Daemon.Compensate(ctx, v.Cycle)
	if err != nil || again.Explained != 0 || again.Notified != 0 || again.Already != 7 || len(again.Digests) != 0 || again.Notice {
		t.Fatalf("compensating again: %+v, %v; want the 7 paradoxes already compensated", again, err)
	}
	if ds := userDigests(t, tb, "alice"); len(ds) != 1 {
		t.Fatalf("alice has %d digests after compensating again, want 1", len(ds))
	}
}

// TestIMAPCheckerFindsMessagesByUndoID: the read_changed check finds a
// message on the real Dovecot by its undo id, in whatever folder it is
// now, and finds nothing for an id no message carries.
func TestIMAPCheckerFindsMessagesByUndoID(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	ctx := context.Background()
	m := mailMsg{id: "filed@example.test", from: "Bob <bob@example.test>", subject: "to be filed", date: "Fri, 20 Nov 2026 09:00:00 +0100"}
	sendMsg(t, tb, "", "bob@example.test", "alice@example.test", m, "")
	seq := waitDelivered(t, tb, m.subject)
	waitFor(t, tb, "INBOX", m.id)
	c := testbedtest.IMAP(t, tb.IMAPAddr(), "alice", tb.Stack.Password("alice"))
	defer c.Close()
	if err := c.Create("Filed", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	var all imap.SeqSet
	all.AddRange(1, 0)
	if _, err := c.Move(all, "Filed").Wait(); err != nil {
		t.Fatal(err)
	}
	recs, err := tb.Daemon.Log.Records(ctx, undolog.Filter{AfterSeq: seq - 1, Limit: 1})
	if err != nil || len(recs) != 1 {
		t.Fatalf("delivery %d: %v", seq, err)
	}
	var a struct {
		UndoID string `json:"undo_id"`
	}
	if err := json.Unmarshal(recs[0].Args, &a); err != nil || a.UndoID == "" {
		t.Fatalf("delivery args %s: %v", recs[0].Args, err)
	}
	k := &compensate.IMAPChecker{Target: replay.Target{IMAPAddr: tb.Stack.IMAPAddr, MasterUser: tb.Stack.MasterUser, MasterPassword: tb.Stack.MasterPassword}}
	defer k.Close()
	got, err := k.Current(ctx, "alice", a.UndoID)
	if err != nil || !strings.Contains(string(got), "body of "+m.id) || !strings.Contains(string(got), "Message-Id: <"+m.id+">") {
		t.Fatalf("message %s now: %q, %v", a.UndoID, got, err)
	}
	if got, err := k.Current(ctx, "alice", "no-such-id"); err != nil || got != nil {
		t.Fatalf("unknown id: %q, %v", got, err)
	}
}

// TestCompensationWhenACycleIsUndone: a cycle removes spam alice had read
// and explains it; a second cycle back to the snapshot the first took of
// the present undoes it. The spam is back, the first digest stays (it was
// delivered and read), and a second digest corrects it.
func TestCompensationWhenACycleIsUndone(t *testing.T) {
	snapDir := filepath.Join(t.TempDir(), "snaps")
	tb := testbedtest.Start(t, func(c *config.Config) { c.Store = "copy:" + snapDir })
	ctx := context.Background()
	snap, _, err := tb.Daemon.Snapshot(ctx, "before")
	if err != nil {
		t.Fatal(err)
	}
	spam := mailMsg{id: "prize@spam.test", from: "Prize <prize@spam.test>", subject: "Your Lottery prize", date: "Fri, 20 Nov 2026 10:00:00 +0000"}
	sendMsg(t, tb, "", "prize@spam.test", "alice@example.test", spam, "")
	waitFor(t, tb, "INBOX", spam.id)
	read(t, tb, "alice", "INBOX", spam.id)
	v1, err := tb.Daemon.Cycle(ctx, admin.CycleRequest{To: snap.Name, Filters: []admin.FilterRequest{{Rule: "header:Subject=~(?i)lottery", Action: "drop"}}})
	if err != nil || !v1.OK || v1.Compensation == nil || v1.Compensation.Explained != 1 {
		t.Fatalf("first cycle %+v, %v", v1, err)
	}
	v2, err := tb.Daemon.Cycle(ctx, admin.CycleRequest{To: v1.Present, Reason: "The filter also caught real mail; the repair is undone."})
	if err != nil || !v2.OK || v2.Compensation == nil {
		t.Fatalf("undoing cycle %+v, %v", v2, err)
	}
	if got := v2.Compensation.Kinds; fmt.Sprint(got) != fmt.Sprint(map[compensate.Kind]compensate.Counts{compensate.Restored: {Explained: 1}}) {
		t.Fatalf("undoing cycle's compensation %+v", v2.Compensation)
	}
	inbox := aliceMail(t, tb)["INBOX"]
	if !slices.Contains(inbox, spam.id) {
		t.Fatalf("the spam is not back: %v", inbox)
	}
	ds := userDigests(t, tb, "alice")
	if len(ds) != 2 {
		t.Fatalf("alice has %d digests, want the first and its correction", len(ds))
	}
	var texts []string
	for _, d := range ds {
		texts = append(texts, strings.Join(strings.Fields(d.text), " "))
	}
	corr := ""
	for _, tx := range texts {
		if strings.Contains(tx, "It is back in your mailbox") {
			corr = tx
		}
	}
	if !strings.Contains(corr, `you were told that the message "Your Lottery prize" from Prize <prize@spam.test>`) ||
		!strings.Contains(corr, "The filter also caught real mail; the repair is undone.") {
		t.Fatalf("no correction naming the spam among:\n%s", strings.Join(texts, "\n\n"))
	}
}
