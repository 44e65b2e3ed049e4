package replay_test

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"testing"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"

	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// TestRewindThenReplay: after a snapshot, mail is delivered and alice
// creates a folder and appends to it through undomail; a rewind takes it
// all away, and the replay brings it all back, with fresh UIDs.
func TestRewindThenReplay(t *testing.T) {
	snapDir := filepath.Join(t.TempDir(), "snaps")
	tb := testbedtest.Start(t, func(c *config.Config) { c.Store = "copy:" + snapDir })
	ctx := context.Background()
	deliver(t, tb, 1, 0)
	waitCount(t, tb, 1)
	snap, _, err := tb.Daemon.Snapshot(ctx, "test")
	if err != nil {
		t.Fatal(err)
	}
	deliver(t, tb, 2, 1)
	waitCount(t, tb, 3)
	c, err := imapclient.DialInsecure(tb.IMAPAddr(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Login("alice", tb.Stack.Password("alice")).Wait(); err != nil {
		t.Fatal(err)
	}
	if err := c.Create("Archive", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	appendMsg(t, c, "Archive", "Subject: filed away\r\nMessage-Id: <filed@client.test>\r\n\r\nkeep me\r\n", imap.FlagSeen)
	c.Logout().Wait()
	c.Close()
	before := flagsByMessageID(t, tb)

	out, err := tb.Daemon.Rewind(ctx, snap.Name, false)
	if err != nil || !out.OK {
		t.Fatalf("rewind: %+v %v", out, err)
	}
	if got := flagsByMessageID(t, tb); len(got) != 1 {
		t.Fatalf("after the rewind INBOX holds %v, want the one message of the snapshot", got)
	}
	rewinds, _ := tb.Daemon.Log.Verbs(ctx, undolog.Filter{Kinds: []string{verb.KindRewind}})
	res, err := replay.Replay(ctx, tb.Daemon.Log, replay.Plan{After: snap.Seq, Before: rewinds[0].Seq}, replay.Target{
		LMTPAddr: tb.Stack.LMTPAddr, IMAPAddr: tb.Stack.IMAPAddr,
		MasterUser: tb.Stack.MasterUser, MasterPassword: tb.Stack.MasterPassword,
	})
	if err != nil {
		t.Fatalf("replay: %v", err)
	}
	// 2 deliveries, CREATE, APPEND; the front-door submissions have no
	// effect of their own.
	if res.Replayed != 4 || res.Failed != 0 || res.Skipped[verb.KindSMTPSubmit] != 2 {
		t.Fatalf("replay result %+v", res)
	}
	if got := flagsByMessageID(t, tb); len(got) != 3 || got["m1@client.test"] != before["m1@client.test"] || got["m2@client.test"] == "" {
		t.Fatalf("after the replay INBOX holds %v, before the rewind %v", got, before)
	}
	_, sel := aliceInbox(t, tb)
	d, err := imapclient.DialInsecure(tb.Stack.IMAPAddr, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	d.Login("alice", tb.Stack.Password("alice")).Wait()
	arch, err := d.Select("Archive", nil).Wait()
	if err != nil || arch.NumMessages != 1 {
		t.Fatalf("Archive after the replay: %+v, %v", arch, err)
	}
	// Replayed deliveries got UIDs above everything shown before.
	if sel.UIDNext < 6 {
		t.Fatalf("UIDNEXT after the replay %d: replayed mail reused UIDs", sel.UIDNext)
	}
	recs, _ := tb.Daemon.Log.Records(ctx, undolog.Filter{Kinds: []string{verb.KindReplay}})
	if len(recs) != 4 {
		t.Fatalf("%d replay records, want 4", len(recs))
	}
}

// mailboxState returns every message of alice's mailboxes as
// "mailbox Message-Id" -> flags, read directly from Dovecot.
func mailboxState(t *testing.T, tb *testbed.Testbed, mailboxes ...string) map[string]string {
	t.Helper()
	c := testbedtest.IMAP(t, tb.Stack.IMAPAddr, "alice", tb.Stack.Password("alice"))
	defer c.Close()
	out := map[string]string{}
	for _, mb := range mailboxes {
		sel, err := c.Select(mb, nil).Wait()
		if err != nil {
			t.Fatalf("select %s: %v", mb, err)
		}
		if sel.NumMessages == 0 {
			continue
		}
		var all imap.SeqSet
		all.AddRange(1, 0)
		msgs, err := c.Fetch(all, &imap.FetchOptions{Flags: true, Envelope: true}).Collect()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range msgs {
			var fl []string
			for _, f := range m.Flags {
				if f != `\Recent` {
					fl = append(fl, string(f))
				}
			}
			slices.Sort(fl)
			out[mb+" "+m.Envelope.MessageID] = fmt.Sprint(fl)
		}
	}
	return out
}

// uidOf finds a message's UID by Message-Id in the selected mailbox.
func uidOf(t *testing.T, c *imapclient.Client, msgID string) imap.UID {
	t.Helper()
	found, err := c.UIDSearch(&imap.SearchCriteria{Header: []imap.SearchCriteriaHeaderField{{Key: "Message-Id", Value: msgID}}}, nil).Wait()
	if err != nil || len(found.AllUIDs()) != 1 {
		t.Fatalf("find %s: %v %v", msgID, found, err)
	}
	return found.AllUIDs()[0]
}

// TestReplayMessageVerbs: flag changes, copies, moves and an expunge made
// through undomail after a snapshot, on messages from before and after it,
// come back exactly after a rewind and replay.
func TestReplayMessageVerbs(t *testing.T) {
	snapDir := filepath.Join(t.TempDir(), "snaps")
	tb := testbedtest.Start(t, func(c *config.Config) { c.Store = "copy:" + snapDir })
	ctx := context.Background()
	deliver(t, tb, 2, 0) // m0, m1: at the snapshot
	waitCount(t, tb, 2)
	snap, _, err := tb.Daemon.Snapshot(ctx, "test")
	if err != nil {
		t.Fatal(err)
	}
	deliver(t, tb, 2, 2) // m2, m3: after it
	waitCount(t, tb, 4)

	c := testbedtest.IMAP(t, tb.IMAPAddr(), "alice", tb.Stack.Password("alice"))
	defer c.Close()
	if err := c.Create("Archive", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	flag := func(id string, op imap.StoreFlagsOp, f imap.Flag) {
		t.Helper()
		if err := c.Store(imap.UIDSetNum(uidOf(t, c, id)), &imap.StoreFlags{Op: op, Silent: true, Flags: []imap.Flag{f}}, nil).Close(); err != nil {
			t.Fatal(err)
		}
	}
	flag("m0@client.test", imap.StoreFlagsAdd, imap.FlagFlagged) // before the snapshot
	flag("m2@client.test", imap.StoreFlagsAdd, imap.FlagSeen)    // after it
	if _, err := c.Copy(imap.UIDSetNum(uidOf(t, c, "m2@client.test")), "Archive").Wait(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Move(imap.UIDSetNum(uidOf(t, c, "m3@client.test")), "Archive").Wait(); err != nil {
		t.Fatal(err)
	}
	flag("m1@client.test", imap.StoreFlagsAdd, imap.FlagDeleted)
	if err := c.Expunge().Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Select("Archive", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	flag("m2@client.test", imap.StoreFlagsAdd, imap.FlagAnswered) // on the copy
	c.Logout().Wait()
	want := mailboxState(t, tb, "INBOX", "Archive")

	out, err := tb.Daemon.Rewind(ctx, snap.Name, false)
	if err != nil || !out.OK {
		t.Fatalf("rewind: %+v %v", out, err)
	}
	rewinds, _ := tb.Daemon.Log.Verbs(ctx, undolog.Filter{Kinds: []string{verb.KindRewind}})
	res, err := replay.Replay(ctx, tb.Daemon.Log, replay.Plan{After: snap.Seq, Before: rewinds[0].Seq}, replay.Target{
		LMTPAddr: tb.Stack.LMTPAddr, IMAPAddr: tb.Stack.IMAPAddr,
		MasterUser: tb.Stack.MasterUser, MasterPassword: tb.Stack.MasterPassword,
	})
	if err != nil || res.Failed != 0 {
		t.Fatalf("replay: %+v %v", res, err)
	}
	if got := mailboxState(t, tb, "INBOX", "Archive"); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("after rewind and replay:\n%v\nbefore the rewind:\n%v", got, want)
	}
}
