package replay_test

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

func deliver(t *testing.T, tb *testbed.Testbed, n, from int) {
	t.Helper()
	for i := from; i < from+n; i++ {
		c, err := smtp.Dial(tb.SMTPAddr())
		if err != nil {
			t.Fatal(err)
		}
		msg := fmt.Sprintf("Subject: m%d\r\nMessage-Id: <m%d@client.test>\r\n\r\nbody\r\n", i, i)
		if err := c.SendMail("s@example.test", []string{"alice@example.test"}, strings.NewReader(msg)); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
}

// aliceInbox logs in to Dovecot directly as alice and selects her INBOX;
// the connection is closed when the test ends.
func aliceInbox(t *testing.T, tb *testbed.Testbed) (*imapclient.Client, *imap.SelectData) {
	t.Helper()
	c, err := imapclient.DialInsecure(tb.Stack.IMAPAddr, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.Login("alice", tb.Stack.Password("alice")).Wait(); err != nil {
		t.Fatal(err)
	}
	sel, err := c.Select("INBOX", nil).Wait()
	if err != nil {
		t.Fatal(err)
	}
	return c, sel
}

func inbox(t *testing.T, tb *testbed.Testbed) *imap.SelectData {
	t.Helper()
	c, sel := aliceInbox(t, tb)
	c.Logout().Wait()
	return sel
}

func waitCount(t *testing.T, tb *testbed.Testbed, n uint32) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for inbox(t, tb).NumMessages < n {
		if time.Now().After(deadline) {
			t.Fatalf("INBOX did not reach %d messages", n)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestRewindKeepsUIDsMonotonic rolls alice's store back past two
// deliveries and checks the rewind Dovecot's clients need: the snapshot's
// messages, the same UIDVALIDITY, and no UID handed out again (the next
// APPEND gets a UID above everything shown before the rewind).
func TestRewindKeepsUIDsMonotonic(t *testing.T) {
	snapDir := filepath.Join(t.TempDir(), "snaps")
	tb := testbedtest.Start(t, func(c *config.Config) { c.Store = "copy:" + snapDir })
	ctx := context.Background()
	deliver(t, tb, 3, 0)
	waitCount(t, tb, 3)
	store(t, tb, 1, imap.StoreFlagsAdd, imap.FlagFlagged)
	atSnapshot := flagsByMessageID(t, tb)
	snap, _, err := tb.Daemon.Snapshot(ctx, "test")
	if err != nil {
		t.Fatal(err)
	}
	// Changes after the snapshot: more mail, flags changed both ways.
	deliver(t, tb, 2, 3)
	waitCount(t, tb, 5)
	store(t, tb, 1, imap.StoreFlagsDel, imap.FlagFlagged)
	store(t, tb, 2, imap.StoreFlagsAdd, imap.FlagSeen)
	before := inbox(t, tb)

	resume, err := tb.Daemon.Gate.Wedge(ctx)
	if err != nil {
		t.Fatal(err)
	}
	out, err := replay.Rewind(ctx, tb.Daemon.Log, tb.Daemon.Store,
		replay.Upstream{Doveadm: []string{"doveadm", "-c", tb.Stack.DovecotConfig()}}, snap.Name)
	resume()
	if err != nil {
		t.Fatalf("rewind: %v", err)
	}
	after := inbox(t, tb)
	if after.NumMessages != 3 || after.UIDValidity != before.UIDValidity || after.UIDNext < before.UIDNext {
		t.Fatalf("after the rewind: %d messages, UIDVALIDITY %d (was %d), UIDNEXT %d (was %d); want 3, same, >= %d",
			after.NumMessages, after.UIDValidity, before.UIDValidity, after.UIDNext, before.UIDNext, before.UIDNext)
	}
	if out.Raised < 1 {
		t.Fatalf("rewind raised no counters: %+v", out)
	}
	// Exactly the snapshot's messages and flags (one of them flagged).
	if got := flagsByMessageID(t, tb); fmt.Sprint(got) != fmt.Sprint(atSnapshot) || !strings.Contains(fmt.Sprint(got), `\Flagged`) {
		t.Fatalf("after the rewind INBOX holds %v, at the snapshot it held %v", got, atSnapshot)
	}
	// The next message gets a fresh UID.
	c, err := imapclient.DialInsecure(tb.IMAPAddr(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Login("alice", tb.Stack.Password("alice")).Wait(); err != nil {
		t.Fatal(err)
	}
	data := appendMsg(t, c, "INBOX", "Subject: after the rewind\r\n\r\nnew\r\n")
	if data.UID < before.UIDNext {
		t.Fatalf("APPEND after the rewind got UID %d: UIDs below %d were already shown", data.UID, before.UIDNext)
	}
	// The counters were logged before the rollback.
	vs, err := tb.Daemon.Log.Verbs(ctx, undolog.Filter{Kinds: []string{verb.KindRewind}})
	if err != nil || len(vs) != 1 || vs[0].Outcome == nil {
		t.Fatalf("rewind verbs %+v, %v", vs, err)
	}
	var a verb.RewindArgs
	json.Unmarshal(vs[0].Args, &a)
	found := false
	for _, c := range a.Before {
		found = found || (c.User == "alice" && c.Mailbox == "INBOX" && imap.UID(c.UIDNext) == before.UIDNext)
	}
	if !found || a.Snapshot != snap.Name || a.AtSeq != snap.Seq {
		t.Fatalf("rewind args %+v", a)
	}
}

// store changes the flags of the UID in alice's INBOX, directly on Dovecot.
func store(t *testing.T, tb *testbed.Testbed, uid imap.UID, op imap.StoreFlagsOp, flag imap.Flag) {
	t.Helper()
	c, _ := aliceInbox(t, tb)
	if err := c.Store(imap.UIDSetNum(uid), &imap.StoreFlags{Op: op, Silent: true, Flags: []imap.Flag{flag}}, nil).Close(); err != nil {
		t.Fatal(err)
	}
}

// flagsByMessageID returns alice's INBOX as Message-Id -> flags.
func flagsByMessageID(t *testing.T, tb *testbed.Testbed) map[string]string {
	t.Helper()
	c, _ := aliceInbox(t, tb)
	var all imap.SeqSet
	all.AddRange(1, 0)
	msgs, err := c.Fetch(all, &imap.FetchOptions{Flags: true, Envelope: true}).Collect()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, m := range msgs {
		var fl []string
		for _, f := range m.Flags {
			if f != `\Recent` {
				fl = append(fl, string(f))
			}
		}
		out[m.Envelope.MessageID] = fmt.Sprint(fl)
	}
	return out
}
