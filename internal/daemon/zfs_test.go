package daemon_test

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"testing"

	"github.com/emersion/go-imap/v2"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/timetravel/zfstest"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// TestCycleAndDrillOnZFS runs the mistaken-DELETE cycle and a drill with
// the mail store on a real ZFS dataset (zfs-fuse): the rollback, the
// clone the drill replays on, and the client checks, on the backend
// production uses.
func TestCycleAndDrillOnZFS(t *testing.T) {
	p := zfstest.NewPool(t)
	p.ZFS(t, "create", p.Name+"/mail")
	tb := testbedtest.StartWith(t, testbed.Options{
		MailRoot: filepath.Join(p.Mountpoint, "mail"),
		Tweak:    func(c *config.Config) { c.Store = "zfs:" + p.Name + "/mail" },
	})
	ctx := context.Background()
	send(t, tb, "z1@client.test")
	send(t, tb, "z2@client.test")
	waitFor(t, tb, "INBOX", "z1@client.test")
	waitFor(t, tb, "INBOX", "z2@client.test")
	c := testbedtest.IMAP(t, tb.IMAPAddr(), "alice", tb.Stack.Password("alice"))
	defer c.Close()
	if err := c.Create("Projects", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	c.Select("INBOX", nil).Wait()
	if _, err := c.Move(uidOf(t, c, "z1@client.test"), "Projects").Wait(); err != nil {
		t.Fatal(err)
	}
	snap, _, err := tb.Daemon.Snapshot(ctx, "hourly")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Store(uidOf(t, c, "z2@client.test"), &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagFlagged}}, nil).Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete("Projects").Wait(); err != nil {
		t.Fatal(err)
	}
	c.Logout().Wait()
	send(t, tb, "z3@client.test")
	waitFor(t, tb, "INBOX", "z3@client.test")
	if _, _, err := tb.Daemon.Snapshot(ctx, "hourly"); err != nil {
		t.Fatal(err)
	}
	// A drill over the two snapshots, on a ZFS clone.
	d, err := tb.Daemon.Drill(ctx, "", "")
	if err != nil || !d.OK || d.Replayed < 3 {
		t.Fatalf("drill on ZFS: %+v, %v", d, err)
	}
	client := cacheBefore(t, tb, "alice")
	deletes, _ := tb.Daemon.Log.Verbs(ctx, undolog.Filter{Kinds: []string{verb.KindIMAPDelete}})
	v, err := tb.Daemon.Cycle(ctx, admin.CycleRequest{To: snap.Name, Cancel: []int64{deletes[0].Seq}})
	if err != nil || !v.OK {
		t.Fatalf("cycle on ZFS: %+v, %v", v, err)
	}
	got := aliceMail(t, tb)
	if fmt.Sprint(got["Projects"]) != "[z1@client.test]" || fmt.Sprint(slices.Sorted(slices.Values(got["INBOX"]))) != "[z2@client.test z3@client.test]" {
		t.Fatalf("after the cycle on ZFS alice has %v", got)
	}
	if f := flagState(t, tb)["INBOX z2@client.test"]; f != `[\Flagged]` {
		t.Fatalf("z2's flags after the cycle: %q", f)
	}
	client.checkAfter(t, tb)
}
