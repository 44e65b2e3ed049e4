package daemon_test

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"

	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/daemon"
	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/timetravel"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// TestSnapshotIsAConsistentCut snapshots the mail store (copy backend)
// again and again while mail is delivered through undomail: each snapshot
// must hold exactly the deliveries the log shows at or before its
// position, and its position is stored with it and in the log.
func TestSnapshotIsAConsistentCut(t *testing.T) {
	snapDir := filepath.Join(t.TempDir(), "snapshots")
	tb := testbedtest.Start(t, func(c *config.Config) { c.Store = "copy:" + snapDir })
	if tb.Daemon.Store == nil {
		t.Fatal("no store")
	}
	// An IMAP client works on bob's mail at the same time: Dovecot's own
	// lock and temporary files come and go under the snapshot.
	stopIMAP := busyIMAP(t, tb, "bob")
	defer stopIMAP()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		exec.Command("smtp-source", "-s", "4", "-m", "300", "-l", "1024", "-f", "load@example.test",
			"-t", tb.Stack.Address("alice"), tb.SMTPAddr()).Run()
		close(stop)
	}()
	var snaps []timetravel.Snapshot
	var pauses []time.Duration
	for i := 0; i < 4; i++ {
		time.Sleep(150 * time.Millisecond)
		s, pause, err := tb.Daemon.Snapshot(context.Background(), "test")
		if err != nil {
			t.Fatalf("snapshot %d: %v", i, err)
		}
		snaps, pauses = append(snaps, s), append(pauses, pause)
	}
	wg.Wait()
	<-stop
	t.Logf("pauses: %v", pauses)
	verbs, err := tb.Daemon.Log.Verbs(context.Background(), undolog.Filter{Kinds: []string{verb.KindLMTPDeliver, verb.KindSnapshot}})
	if err != nil {
		t.Fatal(err)
	}
	logged := map[string]int64{}
	for _, s := range snaps {
		// Deliveries that reached Dovecot at or before the cut.
		want := 0
		for _, v := range verbs {
			switch v.Kind {
			case verb.KindSnapshot:
				var a verb.SnapshotArgs
				json.Unmarshal(v.Args, &a)
				logged[a.Name] = a.AtSeq
			case verb.KindLMTPDeliver:
				if v.Seq > s.Seq || v.Outcome == nil {
					continue
				}
				var o verb.DeliveryOutcome
				json.Unmarshal(v.Outcome.Outcome, &o)
				if len(o.Rcpts) == 1 && o.Rcpts[0].Reply.Code == 250 {
					want++
				}
			}
		}
		got := 0
		for _, sub := range []string{"new", "cur"} {
			entries, _ := os.ReadDir(filepath.Join(snapDir, s.Name, "alice", "Maildir", sub))
			got += len(entries)
		}
		if got != want {
			t.Errorf("snapshot %s at seq %d holds %d of alice's messages; the log has %d deliveries up to there", s.Name, s.Seq, got, want)
		}
	}
	mismatches, err := timetravel.Verify(context.Background(), tb.Daemon.Store, logged)
	if err != nil || len(mismatches) != 0 {
		t.Fatalf("log and store disagree on snapshot positions: %v %v", mismatches, err)
	}
	if len(logged) != len(snaps) {
		t.Fatalf("%d snapshot verbs logged for %d snapshots", len(logged), len(snaps))
	}
}

// busyIMAP logs in as user through undomail again and again, reading and
// flagging, until the returned function is called.
func busyIMAP(t *testing.T, tb *testbed.Testbed, user string) func() {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			default:
			}
			c, err := imapclient.DialInsecure(tb.IMAPAddr(), nil)
			if err != nil {
				continue
			}
			if c.Login(user, tb.Stack.Password(user)).Wait() == nil {
				if sel, err := c.Select("INBOX", nil).Wait(); err == nil && sel.NumMessages > 0 {
					c.Store(imap.SeqSetNum(1), &imap.StoreFlags{Op: imap.StoreFlagsAdd, Flags: []imap.Flag{imap.FlagSeen}}, nil).Close()
				}
				msg := "Subject: busy\r\n\r\nx\r\n"
				ap := c.Append("INBOX", int64(len(msg)), nil)
				ap.Write([]byte(msg))
				ap.Close()
				ap.Wait()
				c.Logout().Wait()
			}
			c.Close()
		}
	}()
	return func() { close(done); wg.Wait() }
}

// TestScheduledSnapshotsAndRetention runs the schedule fast: snapshots
// appear on their own, retention keeps only the newest (no hourly or
// daily buckets configured), every prune is logged, and log and store
// agree throughout.
func TestScheduledSnapshotsAndRetention(t *testing.T) {
	snapDir := filepath.Join(t.TempDir(), "snaps")
	tb := testbedtest.Start(t, func(c *config.Config) {
		c.Store = "copy:" + snapDir
		c.Snapshots = config.Snapshots{Every: config.Duration(300 * time.Millisecond)}
	})
	ctx := context.Background()
	deadline := time.Now().Add(20 * time.Second)
	for {
		vs, err := tb.Daemon.Log.Verbs(ctx, undolog.Filter{Kinds: []string{verb.KindSnapshotPruned}})
		if err != nil {
			t.Fatal(err)
		}
		if len(vs) >= 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 20s only %d scheduled snapshots were pruned", len(vs))
		}
		time.Sleep(100 * time.Millisecond)
	}
	tb.Daemon.StopSchedule()
	logged, err := daemon.LoggedSnapshots(ctx, tb.Daemon.Log)
	if err != nil {
		t.Fatal(err)
	}
	// The schedule may have stopped between a snapshot and its prune.
	if len(logged) < 1 || len(logged) > 2 {
		t.Fatalf("log says %d snapshots exist, want the newest (and at most one not yet pruned): %v", len(logged), logged)
	}
	ms, err := timetravel.Verify(ctx, tb.Daemon.Store, logged)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		t.Errorf("log and store disagree: %s", m)
	}
}
