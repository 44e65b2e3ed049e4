package daemon_test

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/clientcheck"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

func send(t *testing.T, tb *testbed.Testbed, id string) {
	t.Helper()
	c, err := smtp.Dial(tb.SMTPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msg := "Subject: " + id + "\r\nMessage-Id: <" + id + ">\r\n\r\nbody\r\n"
	if err := c.SendMail("s@example.test", []string{"alice@example.test"}, strings.NewReader(msg)); err != nil {
		t.Fatal(err)
	}
}

// aliceMail lists alice's mailboxes and the Message-Ids in each, read
// directly from Dovecot.
func aliceMail(t *testing.T, tb *testbed.Testbed) map[string][]string {
	t.Helper()
	return testbedtest.Mail(t, tb, "alice")
}

func waitFor(t *testing.T, tb *testbed.Testbed, mailbox, id string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		for _, got := range aliceMail(t, tb)[mailbox] {
			if got == id {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not in %s", id, mailbox)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestCycleCancelsAnAccidentalDelete: alice deletes a folder full of mail
// by mistake and mail keeps arriving; a cycle that cancels the DELETE
// brings the folder and its messages back and keeps the later mail.
func TestCycleCancelsAnAccidentalDelete(t *testing.T) {
	snapDir := filepath.Join(t.TempDir(), "snaps")
	tb := testbedtest.Start(t, func(c *config.Config) { c.Store = "copy:" + snapDir })
	ctx := context.Background()
	// A folder with two messages, filed through undomail.
	send(t, tb, "a1@client.test")
	send(t, tb, "a2@client.test")
	waitFor(t, tb, "INBOX", "a2@client.test")
	waitFor(t, tb, "INBOX", "a1@client.test")
	c := testbedtest.IMAP(t, tb.IMAPAddr(), "alice", tb.Stack.Password("alice"))
	defer c.Close()
	if err := c.Create("Projects", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	var all imap.SeqSet
	all.AddRange(1, 0)
	if _, err := c.Move(all, "Projects").Wait(); err != nil {
		t.Fatal(err)
	}
	snap, _, err := tb.Daemon.Snapshot(ctx, "hourly")
	if err != nil {
		t.Fatal(err)
	}
	// The mistake, then life goes on.
	if err := c.Delete("Projects").Wait(); err != nil {
		t.Fatal(err)
	}
	c.Logout().Wait()
	send(t, tb, "later@client.test")
	waitFor(t, tb, "INBOX", "later@client.test")
	if _, gone := aliceMail(t, tb)["Projects"]; gone {
		t.Fatal("the DELETE did not happen")
	}
	deletes, _ := tb.Daemon.Log.Verbs(ctx, undolog.Filter{Kinds: []string{verb.KindIMAPDelete}})
	if len(deletes) != 1 {
		t.Fatalf("DELETE verbs: %d", len(deletes))
	}

	client := cacheBefore(t, tb, "alice")
	v, err := tb.Daemon.Cycle(ctx, admin.CycleRequest{To: snap.Name, Cancel: []int64{deletes[0].Seq}})
	if err != nil || !v.OK || v.Cancelled != 1 {
		t.Fatalf("cycle verdict %+v, %v", v, err)
	}
	client.checkAfter(t, tb)
	got := aliceMail(t, tb)
	want := map[string][]string{"INBOX": {"later@client.test"}, "Projects": {"a1@client.test", "a2@client.test"}}
	for box, ids := range want {
		g := slices.Sorted(slices.Values(got[box]))
		if fmt.Sprint(g) != fmt.Sprint(ids) {
			t.Fatalf("after the cycle alice has %v, want %v", got, want)
		}
	}
	// The verdict is in the log, and the cycle can be undone: the present
	// was snapshotted first.
	cycles, _ := tb.Daemon.Log.Verbs(ctx, undolog.Filter{Kinds: []string{"cycle"}})
	if len(cycles) != 1 || cycles[0].Outcome == nil {
		t.Fatalf("cycle verbs %+v", cycles)
	}
	var a struct{ Present string }
	json.Unmarshal(cycles[0].Args, &a)
	if _, err := tb.Daemon.Store.Get(ctx, a.Present); err != nil {
		t.Fatalf("the present before the cycle was not kept: %v", err)
	}
	// Undo the cycle itself: back to the present it started from, with
	// what happened since (a new message) kept.
	send(t, tb, "after-cycle@client.test")
	waitFor(t, tb, "INBOX", "after-cycle@client.test")
	client = cacheBefore(t, tb, "alice")
	undo, err := tb.Daemon.Cycle(ctx, admin.CycleRequest{To: a.Present, Reason: "undo the previous cycle"})
	if err != nil || !undo.OK {
		t.Fatalf("undo cycle verdict %+v, %v", undo, err)
	}
	got = aliceMail(t, tb)
	if _, back := got["Projects"]; back {
		t.Fatalf("after undoing the cycle Projects is back: %v", got)
	}
	if g := slices.Sorted(slices.Values(got["INBOX"])); fmt.Sprint(g) != "[after-cycle@client.test later@client.test]" {
		t.Fatalf("after undoing the cycle INBOX has %v", g)
	}
	client.checkAfter(t, tb)
	// Both cycles left a branch on the timeline.
	bs, err := replay.Branches(ctx, tb.Daemon.Log)
	if err != nil || len(bs) != 2 || bs[0].Fates["cancelled"] != 1 || bs[1].Cycle != undo.Cycle {
		t.Fatalf("branches %+v, %v", bs, err)
	}
}

// clientSide is what a user's mail clients knew before a cycle: the UIDs
// a client cached, and an mbsync copy of every mailbox.
type clientSide struct {
	user   string
	before clientcheck.View
	mb     *clientcheck.Mbsync
}

// cacheBefore syncs a user's mail to an mbsync copy and notes every UID,
// through undomail's IMAP front end, as the user's clients would.
func cacheBefore(t *testing.T, tb *testbed.Testbed, user string) *clientSide {
	t.Helper()
	c := &clientSide{user: user, mb: clientcheck.NewMbsync(t, tb.IMAPAddr(), user, tb.Stack.Password(user))}
	c.mb.Sync(t)
	c.before = clientcheck.Look(t, tb.IMAPAddr(), user, tb.Stack.Password(user))
	c.mb.Matches(t, c.before)
	return c
}

// checkAfter checks that no UID the client cached was reused for another
// message, and that mbsync syncs without errors to an exact copy.
func (c *clientSide) checkAfter(t *testing.T, tb *testbed.Testbed) {
	t.Helper()
	after := clientcheck.Look(t, tb.IMAPAddr(), c.user, tb.Stack.Password(c.user))
	if kept := clientcheck.NoUIDReuse(t, c.before, after); kept == 0 {
		t.Errorf("no mailbox of %s kept its UIDVALIDITY through the cycle: clients must start over", c.user)
	}
	c.mb.Sync(t)
	c.mb.Matches(t, after)
}

// sendSubject sends a message with a subject through the front door.
func sendSubject(t *testing.T, tb *testbed.Testbed, to, id, subject string) {
	t.Helper()
	c, err := smtp.Dial(tb.SMTPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msg := "Subject: " + subject + "\r\nMessage-Id: <" + id + ">\r\n\r\nbody\r\n"
	if err := c.SendMail("s@example.test", []string{to}, strings.NewReader(msg)); err != nil {
		t.Fatal(err)
	}
}

// flagState returns "mailbox id" -> sorted flags of alice's messages.
func flagState(t *testing.T, tb *testbed.Testbed) map[string]string {
	t.Helper()
	return flagStateOf(t, tb, "alice")
}

// flagStateOf returns "mailbox id" -> sorted flags of a user's messages,
// read directly from Dovecot.
func flagStateOf(t *testing.T, tb *testbed.Testbed, user string) map[string]string {
	t.Helper()
	c := testbedtest.IMAP(t, tb.Stack.IMAPAddr, user, tb.Stack.Password(user))
	defer c.Close()
	out := map[string]string{}
	boxes, _ := c.List("", "*", nil).Collect()
	for _, b := range boxes {
		sel, err := c.Select(b.Mailbox, nil).Wait()
		if err != nil || sel.NumMessages == 0 {
			continue
		}
		var all imap.SeqSet
		all.AddRange(1, 0)
		msgs, _ := c.Fetch(all, &imap.FetchOptions{Flags: true, Envelope: true}).Collect()
		for _, m := range msgs {
			var fl []string
			for _, f := range m.Flags {
				if f != `\Recent` {
					fl = append(fl, string(f))
				}
			}
			slices.Sort(fl)
			out[b.Mailbox+" "+m.Envelope.MessageID] = fmt.Sprint(fl)
		}
	}
	return out
}

// TestCycleFiltersASpamWave: ham and spam arrive after a snapshot; alice
// reads, flags and files some of both, and sends mail. A cycle with a
// filter installed afterwards removes all spam and keeps every ham
// message exactly once with its flags and folder, and her later actions.
func TestCycleFiltersASpamWave(t *testing.T) {
	snapDir := filepath.Join(t.TempDir(), "snaps")
	tb := testbedtest.Start(t, func(c *config.Config) { c.Store = "copy:" + snapDir })
	ctx := context.Background()
	snap, _, err := tb.Daemon.Snapshot(ctx, "before the wave")
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		sendSubject(t, tb, "alice@example.test", fmt.Sprintf("h%d@client.test", i), fmt.Sprintf("minutes %d", i))
		sendSubject(t, tb, "alice@example.test", fmt.Sprintf("s%d@spam.test", i), "You WIN the Lottery!")
	}
	for _, id := range []string{"h0@client.test", "h1@client.test", "h2@client.test", "s0@spam.test", "s1@spam.test", "s2@spam.test"} {
		waitFor(t, tb, "INBOX", id)
	}
	c := testbedtest.IMAP(t, tb.IMAPAddr(), "alice", tb.Stack.Password("alice"))
	defer c.Close()
	if err := c.Create("Work", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	uid := func(id string) imap.UIDSet {
		found, err := c.UIDSearch(&imap.SearchCriteria{Header: []imap.SearchCriteriaHeaderField{{Key: "Message-Id", Value: id}}}, nil).Wait()
		if err != nil || len(found.AllUIDs()) != 1 {
			t.Fatalf("find %s: %v", id, err)
		}
		return imap.UIDSetNum(found.AllUIDs()[0])
	}
	for _, id := range []string{"h0@client.test", "s0@spam.test"} { // read
		if _, err := c.Fetch(uid(id), &imap.FetchOptions{BodySection: []*imap.FetchItemBodySection{{}}}).Collect(); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []string{"h1@client.test", "s1@spam.test"} { // flag
		if err := c.Store(uid(id), &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagFlagged}}, nil).Close(); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []string{"h2@client.test", "s2@spam.test"} { // file
		if _, err := c.Move(uid(id), "Work").Wait(); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Select("Work", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	if err := c.Store(uid("h2@client.test"), &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagAnswered}}, nil).Close(); err != nil {
		t.Fatal(err)
	}
	c.Logout().Wait()
	// Alice writes to bob: a later action the cycle must keep.
	sendSubject(t, tb, "bob@example.test", "reply@client.test", "re: minutes")

	before := flagState(t, tb)
	want := map[string]string{}
	for k, v := range before {
		if !strings.Contains(k, "@spam.test") {
			want[k] = v
		}
	}
	if len(want) != 3 || len(before) != 6 {
		t.Fatalf("before the cycle: %v", before)
	}
	client := cacheBefore(t, tb, "alice")
	v, err := tb.Daemon.Cycle(ctx, admin.CycleRequest{To: snap.Name, Keep: true, Filters: []admin.FilterRequest{{Rule: "header:Subject=~(?i)lottery", Action: "drop"}}})
	if err != nil || !v.OK {
		t.Fatalf("cycle verdict %+v, %v", v, err)
	}
	client.checkAfter(t, tb)
	if v.Filtered != 3 || v.Repaired != 3 {
		t.Fatalf("verdict %+v: want 3 spam deliveries filtered, and the read (\\Seen), flag and move of spam skipped", v)
	}
	// The filter stays active for live mail: the next lottery message is
	// accepted and dropped, and the log says why; ham still arrives.
	sendSubject(t, tb, "alice@example.test", "s9@spam.test", "Lottery, again")
	sendSubject(t, tb, "alice@example.test", "h9@client.test", "more minutes")
	waitFor(t, tb, "INBOX", "h9@client.test")
	if _, ok := flagState(t, tb)["INBOX s9@spam.test"]; ok {
		t.Fatal("the kept filter let live spam in")
	}
	if fs := tb.Daemon.Filters(); len(fs) != 1 || fs[0].Cycle != v.Cycle {
		t.Fatalf("active filters %+v", fs)
	}
	delivered, _ := tb.Daemon.Log.Verbs(ctx, undolog.Filter{Kinds: []string{verb.KindLMTPDeliver}})
	var out verb.DeliveryOutcome
	for _, d := range delivered {
		var a verb.DeliveryArgs
		if json.Unmarshal(d.Args, &a) == nil && strings.Contains(a.Header.MessageID, "s9@spam.test") && d.Outcome != nil {
			json.Unmarshal(d.Outcome.Outcome, &out)
		}
	}
	if !strings.Contains(out.Filtered, "lottery") || len(out.Rcpts) != 1 || !out.Rcpts[0].Reply.Positive() {
		t.Fatalf("the live spam's outcome %+v", out)
	}
	want["INBOX h9@client.test"] = "[]"
	got := flagState(t, tb)
	// Alice read one spam message: she gets one digest explaining it
	// (issue 6), in her INBOX, besides her mail.
	digests := 0
	for k := range got {
		if !strings.Contains(k, "@client.test") && !strings.Contains(k, "@spam.test") && strings.HasPrefix(k, "INBOX ") {
			digests++
			delete(got, k)
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(want) || digests != 1 {
		t.Fatalf("after the cycle alice has\n%v\nand %d digests, want\n%v\nand one digest", got, digests, want)
	}
	// bob still has alice's mail.
	b, err := imapclient.DialInsecure(tb.Stack.IMAPAddr, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	b.Login("bob", tb.Stack.Password("bob")).Wait()
	if sel, err := b.Select("INBOX", nil).Wait(); err != nil || sel.NumMessages != 1 {
		t.Fatalf("bob's INBOX after the cycle: %+v %v", sel, err)
	}
}

// TestCycleForOneUser: a cycle limited to alice brings back the folder she
// deleted and leaves bob's mail exactly as it was: same messages, same
// UIDs, his changes since the snapshot untouched, nothing replayed for him.
func TestCycleForOneUser(t *testing.T) {
	snapDir := filepath.Join(t.TempDir(), "snaps")
	tb := testbedtest.Start(t, func(c *config.Config) { c.Store = "copy:" + snapDir })
	ctx := context.Background()
	send(t, tb, "a1@client.test")
	waitFor(t, tb, "INBOX", "a1@client.test")
	c := testbedtest.IMAP(t, tb.IMAPAddr(), "alice", tb.Stack.Password("alice"))
	defer c.Close()
	if err := c.Create("Projects", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	c.Select("INBOX", nil).Wait()
	if _, err := c.Move(uidOf(t, c, "a1@client.test"), "Projects").Wait(); err != nil {
		t.Fatal(err)
	}
	snap, _, err := tb.Daemon.Snapshot(ctx, "hourly")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Delete("Projects").Wait(); err != nil {
		t.Fatal(err)
	}
	c.Logout().Wait()
	c.Close()
	// Bob's mail goes on meanwhile.
	sendSubject(t, tb, "bob@example.test", "b1@client.test", "for bob")
	sendSubject(t, tb, "bob@example.test", "b2@client.test", "for bob")
	for deadline := time.Now().Add(20 * time.Second); ; {
		if n := countIn(t, tb, "bob", "INBOX"); n == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("bob's mail did not arrive")
		}
		tb.Stack.Flush(ctx)
		time.Sleep(100 * time.Millisecond)
	}
	b := testbedtest.IMAP(t, tb.IMAPAddr(), "bob", tb.Stack.Password("bob"))
	defer b.Close()
	b.Select("INBOX", nil).Wait()
	if err := b.Store(uidOf(t, b, "b1@client.test"), &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagFlagged}}, nil).Close(); err != nil {
		t.Fatal(err)
	}
	b.Logout().Wait()
	b.Close()
	bobBefore := clientcheck.Look(t, tb.Stack.IMAPAddr, "bob", tb.Stack.Password("bob"))
	bobFlags := flagStateOf(t, tb, "bob")
	alice := cacheBefore(t, tb, "alice")

	deletes, _ := tb.Daemon.Log.Verbs(ctx, undolog.Filter{Kinds: []string{verb.KindIMAPDelete}})
	v, err := tb.Daemon.Cycle(ctx, admin.CycleRequest{To: snap.Name, Cancel: []int64{deletes[0].Seq}, Users: []string{"alice"}})
	if err != nil || !v.OK || v.Users != 1 {
		t.Fatalf("cycle verdict %+v, %v", v, err)
	}
	if got := aliceMail(t, tb)["Projects"]; fmt.Sprint(got) != "[a1@client.test]" {
		t.Fatalf("alice's Projects after the cycle: %v", aliceMail(t, tb))
	}
	alice.checkAfter(t, tb)
	if after := clientcheck.Look(t, tb.Stack.IMAPAddr, "bob", tb.Stack.Password("bob")); fmt.Sprint(after) != fmt.Sprint(bobBefore) {
		t.Fatalf("bob's mail changed in a cycle for alice:\nbefore %v\nafter  %v", bobBefore, after)
	}
	if got := flagStateOf(t, tb, "bob"); fmt.Sprint(got) != fmt.Sprint(bobFlags) {
		t.Fatalf("bob's flags changed: %v, were %v", got, bobFlags)
	}
}

// countIn counts a user's messages in a mailbox, on Dovecot directly.
func countIn(t *testing.T, tb *testbed.Testbed, user, mailbox string) int {
	t.Helper()
	c := testbedtest.IMAP(t, tb.Stack.IMAPAddr, user, tb.Stack.Password(user))
	defer c.Close()
	st, err := c.Status(mailbox, &imap.StatusOptions{NumMessages: true}).Wait()
	if err != nil || st.NumMessages == nil {
		return -1
	}
	return int(*st.NumMessages)
}
