package replay_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"

	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/replay"
)

// TestDrillOnAPrivateDovecot: a recovery drill over two snapshots with
// deliveries, a new folder, a flag change and an APPEND between them
// replays them on a clone of the first, served by a private Dovecot
// (internal/privdovecot), and finds the clone equal to the second. The
// live store is not touched.
func TestDrillOnAPrivateDovecot(t *testing.T) {
	snapDir := filepath.Join(t.TempDir(), "snaps")
	tb := testbedtest.Start(t, func(c *config.Config) { c.Store = "copy:" + snapDir })
	ctx := context.Background()
	deliver(t, tb, 1, 0)
	waitCount(t, tb, 1)
	s1, _, err := tb.Daemon.Snapshot(ctx, "drill start")
	if err != nil {
		t.Fatal(err)
	}
	deliver(t, tb, 2, 1)
	waitCount(t, tb, 3)
	c := testbedtest.IMAP(t, tb.IMAPAddr(), "alice", tb.Stack.Password("alice"))
	defer c.Close()
	if err := c.Create("Keep", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	if err := c.Store(imap.UIDSetNum(uidOf(t, c, "m0@client.test")), &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagFlagged}}, nil).Close(); err != nil {
		t.Fatal(err)
	}
	appendMsg(t, c, "Keep", "Subject: draft\r\nMessage-Id: <draft@client.test>\r\n\r\nunsent\r\n", imap.FlagDraft)
	c.Logout().Wait()
	s2, _, err := tb.Daemon.Snapshot(ctx, "drill end")
	if err != nil {
		t.Fatal(err)
	}
	before := flagsByMessageID(t, tb)

	res := replay.Drill(ctx, replay.DrillOptions{Store: tb.Daemon.Store, Log: tb.Daemon.Log, From: s1.Name, To: s2.Name, WorkDir: t.TempDir()})
	// 2 deliveries, CREATE, STORE, APPEND.
	if !res.OK || res.Replayed != 5 || res.Messages != 4 {
		t.Fatalf("drill: %+v, want OK with 5 verbs replayed and 4 messages compared", res)
	}
	if after := flagsByMessageID(t, tb); len(after) != len(before) || after["m0@client.test"] != before["m0@client.test"] {
		t.Fatalf("the drill changed the live store: %v, before %v", after, before)
	}
}

// appendMsg APPENDs msg to mailbox with flags and returns what the
// server said of it (APPENDUID).
func appendMsg(t *testing.T, c *imapclient.Client, mailbox, msg string, flags ...imap.Flag) *imap.AppendData {
	t.Helper()
	ap := c.Append(mailbox, int64(len(msg)), &imap.AppendOptions{Flags: flags})
	ap.Write([]byte(msg))
	ap.Close()
	data, err := ap.Wait()
	if err != nil {
		t.Fatalf("APPEND to %s: %v", mailbox, err)
	}
	return data
}
