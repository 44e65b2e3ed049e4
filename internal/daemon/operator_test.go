package daemon_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
)

// The operator meant to file mailing-list traffic into Lists, but the
// rule matches every message (an address test on an empty string).
const (
	badSieve = `require ["fileinto", "mailbox"];
if address :contains "from" "" { fileinto :create "Lists"; }
`
	goodSieve = `require ["fileinto", "mailbox"];
if exists "List-Id" { fileinto :create "Lists"; }
`
)

// TestOperatorErrorRepairedDuringThePause: a bad global Sieve script
// misfiles all of alice's mail into Lists for a while; she reads and
// flags some of it there. The operator rewinds with the changes held
// (undomail rewind --hold), fixes the script during the pause, and
// replays (undomail replay): every message is where the fixed script
// puts it, alice's flags followed her messages, and her clients' UID
// caches and mbsync copy stay valid.
func TestOperatorErrorRepairedDuringThePause(t *testing.T) {
	snapDir := filepath.Join(t.TempDir(), "snaps")
	tb := testbedtest.StartWith(t, testbed.Options{Sieve: true, Tweak: func(c *config.Config) { c.Store = "copy:" + snapDir }})
	ctx := context.Background()
	if err := tb.Stack.SetSieve(ctx, goodSieve); err != nil {
		t.Fatal(err)
	}
	sendList(t, tb, "old@client.test", "before the mistake", false)
	waitIn(t, tb, "INBOX", "old@client.test")
	snap, _, err := tb.Daemon.Snapshot(ctx, "hourly")
	if err != nil {
		t.Fatal(err)
	}

	// The mistake, and an hour of mail.
	if err := tb.Stack.SetSieve(ctx, badSieve); err != nil {
		t.Fatal(err)
	}
	personal := []string{"p1@client.test", "p2@client.test", "p3@client.test"}
	lists := []string{"l1@list.test", "l2@list.test"}
	for i, id := range personal {
		sendList(t, tb, id, fmt.Sprintf("personal %d", i), false)
	}
	for i, id := range lists {
		sendList(t, tb, id, fmt.Sprintf("newsletter %d", i), true)
	}
	for _, id := range append(slices.Clone(personal), lists...) {
		waitIn(t, tb, "Lists", id)
	}
	// Alice finds her mail in Lists: reads p1 and l1, flags p2.
	c, err := imapclient.DialInsecure(tb.IMAPAddr(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Login("alice", tb.Stack.Password("alice")).Wait(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Select("Lists", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"p1@client.test", "l1@list.test"} {
		if _, err := c.Fetch(uidOf(t, c, id), &imap.FetchOptions{BodySection: []*imap.FetchItemBodySection{{}}}).Collect(); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Store(uidOf(t, c, "p2@client.test"), &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagFlagged}}, nil).Close(); err != nil {
		t.Fatal(err)
	}
	c.Logout().Wait()
	c.Close()
	client := cacheBefore(t, tb, "alice")

	// Rewind, holding changes; mail arriving now waits (451 4.3.2).
	if _, err := tb.Daemon.Rewind(ctx, snap.Name, true); err != nil {
		t.Fatal(err)
	}
	err = smtpSend(tb, "held@client.test", "during the pause", false)
	var se *smtp.SMTPError
	if !errors.As(err, &se) || se.Code != 451 || se.EnhancedCode != (smtp.EnhancedCode{4, 3, 2}) {
		t.Fatalf("a message sent during the pause got %v, want 451 4.3.2", err)
	}
	// The repair, by hand.
	if err := tb.Stack.SetSieve(ctx, goodSieve); err != nil {
		t.Fatal(err)
	}
	res, err := tb.Daemon.Replay(ctx, nil)
	if err != nil {
		t.Fatalf("replay: %+v, %v", res, err)
	}
	if !res.Verify.OK() || res.Failed != 0 {
		t.Fatalf("replay result %+v", res)
	}

	got := flagStateOf(t, tb, "alice")
	want := map[string]string{
		"INBOX old@client.test": "[]",
		"INBOX p1@client.test":  `[\Seen]`,
		"INBOX p2@client.test":  `[\Flagged]`,
		"INBOX p3@client.test":  "[]",
		"Lists l1@list.test":    `[\Seen]`,
		"Lists l2@list.test":    "[]",
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("after the repair alice has\n%v\nwant\n%v", got, want)
	}
	client.checkAfter(t, tb)
}

// sendList sends a message through the front door, as a mailing list
// would when list is set.
func sendList(t *testing.T, tb *testbed.Testbed, id, subject string, list bool) {
	t.Helper()
	if err := smtpSend(tb, id, subject, list); err != nil {
		t.Fatal(err)
	}
}

func smtpSend(tb *testbed.Testbed, id, subject string, list bool) error {
	c, err := smtp.Dial(tb.SMTPAddr())
	if err != nil {
		return err
	}
	defer c.Close()
	msg := "From: sender@client.test\r\nSubject: " + subject + "\r\nMessage-Id: <" + id + ">\r\n"
	if list {
		msg += "List-Id: <news.list.test>\r\n"
	}
	msg += "\r\nbody\r\n"
	return c.SendMail("sender@client.test", []string{"alice@example.test"}, strings.NewReader(msg))
}

// waitIn waits until a message is in one of alice's mailboxes, asking
// Postfix to retry deferred mail meanwhile.
func waitIn(t *testing.T, tb *testbed.Testbed, mailbox, id string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		for _, got := range aliceMail(t, tb)[mailbox] {
			if got == id {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not in %s: alice has %v", id, mailbox, aliceMail(t, tb))
		}
		tb.Stack.Flush(context.Background())
		time.Sleep(200 * time.Millisecond)
	}
}

func uidOf(t *testing.T, c *imapclient.Client, id string) imap.UIDSet {
	t.Helper()
	found, err := c.UIDSearch(&imap.SearchCriteria{Header: []imap.SearchCriteriaHeaderField{{Key: "Message-Id", Value: id}}}, nil).Wait()
	if err != nil || len(found.AllUIDs()) != 1 {
		t.Fatalf("find %s: %v %v", id, found, err)
	}
	return imap.UIDSetNum(found.AllUIDs()[0])
}
