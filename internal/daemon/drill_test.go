package daemon_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"

	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// TestDrill: a drill over two snapshots with mail and IMAP changes
// between them passes, and says so to the operator's webhook and
// mailbox; a change made behind undomail's back (a flag set directly on
// Dovecot: a verb missing from the log) makes the next drill fail with
// a report naming the message and the flags.
func TestDrill(t *testing.T) {
	var mu sync.Mutex
	var hooks []verb.DrillResult
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		var v verb.DrillResult
		if err := json.Unmarshal(b, &v); err != nil {
			t.Errorf("webhook body %q: %v", b, err)
		}
		mu.Lock()
		hooks = append(hooks, v)
		mu.Unlock()
	}))
	defer hook.Close()
	snapDir := filepath.Join(t.TempDir(), "snaps")
	tb := testbedtest.Start(t, func(c *config.Config) {
		c.Store = "copy:" + snapDir
		c.Drills.Webhook = hook.URL
		c.Drills.Notify = "bob@example.test"
	})
	ctx := context.Background()
	send(t, tb, "old@client.test")
	waitFor(t, tb, "INBOX", "old@client.test")
	s1, _, err := tb.Daemon.Snapshot(ctx, "drill start")
	if err != nil {
		t.Fatal(err)
	}
	// Mail, a folder, flags, a move and an append, all through undomail.
	send(t, tb, "n1@client.test")
	send(t, tb, "n2@client.test")
	waitFor(t, tb, "INBOX", "n1@client.test")
	waitFor(t, tb, "INBOX", "n2@client.test")
	c := testbedtest.IMAP(t, tb.IMAPAddr(), "alice", tb.Stack.Password("alice"))
	if err := c.Create("Keep", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	c.Select("INBOX", nil).Wait()
	if err := c.Store(uidOf(t, c, "old@client.test"), &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagFlagged, "$Work"}}, nil).Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Move(uidOf(t, c, "n1@client.test"), "Keep").Wait(); err != nil {
		t.Fatal(err)
	}
	msg := "Subject: draft\r\nMessage-Id: <draft@client.test>\r\n\r\nunsent\r\n"
	ap := c.Append("Keep", int64(len(msg)), &imap.AppendOptions{Flags: []imap.Flag{imap.FlagDraft}})
	ap.Write([]byte(msg))
	ap.Close()
	if _, err := ap.Wait(); err != nil {
		t.Fatal(err)
	}
	c.Logout().Wait()
	c.Close()
	if _, _, err := tb.Daemon.Snapshot(ctx, "drill end"); err != nil {
		t.Fatal(err)
	}

	v, err := tb.Daemon.Drill(ctx, "", "")
	if err != nil || !v.OK || v.Replayed < 6 || v.From != s1.Name {
		t.Fatalf("drill on a healthy system: %+v, %v", v, err)
	}
	if len(v.Acknowledged) != 2 || len(v.AckErrors) != 0 {
		t.Fatalf("drill acknowledgements %v, errors %v", v.Acknowledged, v.AckErrors)
	}
	mu.Lock()
	if len(hooks) != 1 || !hooks[0].OK {
		t.Fatalf("webhook got %+v", hooks)
	}
	mu.Unlock()
	waitForUser(t, tb, "bob", "undomail recovery drill PASSED")

	// Behind undomail's back: alice's message flagged on Dovecot directly.
	d := testbedtest.IMAP(t, tb.Stack.IMAPAddr, "alice", tb.Stack.Password("alice"))
	d.Select("INBOX", nil).Wait()
	if err := d.Store(uidOf(t, d, "n2@client.test"), &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagFlagged}}, nil).Close(); err != nil {
		t.Fatal(err)
	}
	d.Logout().Wait()
	d.Close()
	if _, _, err := tb.Daemon.Snapshot(ctx, "after the unlogged change"); err != nil {
		t.Fatal(err)
	}
	v, err = tb.Daemon.Drill(ctx, "", "")
	if err == nil || v.OK {
		t.Fatalf("a drill over an unlogged change passed: %+v", v)
	}
	if len(v.Differences) != 1 || !strings.Contains(v.Differences[0], "alice/INBOX: message ") ||
		!strings.Contains(v.Differences[0], `has flags [()] after replay, [(\Flagged)] in the snapshot`) {
		t.Fatalf("drill report %q, want exactly the flag alice's message got behind undomail's back", v.Differences)
	}
	mu.Lock()
	if len(hooks) != 2 || hooks[1].OK {
		t.Fatalf("webhook got %+v", hooks)
	}
	mu.Unlock()
	waitForUser(t, tb, "bob", "undomail recovery drill FAILED")
	// Both verdicts are in the log.
	drills, _ := tb.Daemon.Log.Verbs(ctx, undolog.Filter{Kinds: []string{verb.KindDrill}})
	if len(drills) != 2 || drills[0].Outcome == nil || drills[1].Outcome == nil {
		t.Fatalf("drill records %+v", drills)
	}
}

// waitForUser waits for a message with the subject in user's INBOX.
func waitForUser(t *testing.T, tb *testbed.Testbed, user, subject string) {
	t.Helper()
	for range 100 {
		c := testbedtest.IMAP(t, tb.Stack.IMAPAddr, user, tb.Stack.Password(user))
		c.Select("INBOX", nil).Wait()
		found, err := c.UIDSearch(&imap.SearchCriteria{Header: []imap.SearchCriteriaHeaderField{{Key: "Subject", Value: subject}}}, nil).Wait()
		c.Logout().Wait()
		c.Close()
		if err == nil && len(found.AllUIDs()) > 0 {
			return
		}
		tb.Stack.Flush(context.Background())
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("no %q in %s's INBOX", subject, user)
}

// TestScheduledLogPruning: with snapshots.prune_log, each scheduled
// snapshot's retention is followed by pruning the log before the oldest
// snapshot kept, archived into snapshots.log_archive; the remaining log
// still verifies.
func TestScheduledLogPruning(t *testing.T) {
	snapDir := filepath.Join(t.TempDir(), "snaps")
	archive := t.TempDir()
	tb := testbedtest.Start(t, func(c *config.Config) {
		c.Store = "copy:" + snapDir
		c.Snapshots.Every = config.Duration(time.Second)
		c.Snapshots.KeepHourly, c.Snapshots.KeepDaily = 1, 0 // keep the newest only
		c.Snapshots.PruneLog, c.Snapshots.LogArchive = true, archive
	})
	ctx := context.Background()
	send(t, tb, "s1@client.test")
	waitFor(t, tb, "INBOX", "s1@client.test")
	for deadline := time.Now().Add(30 * time.Second); ; {
		base, err := tb.Daemon.Log.Base(ctx)
		files, _ := filepath.Glob(filepath.Join(archive, "undo-*.jsonl.gz"))
		if err == nil && base > 0 && len(files) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the log was not pruned on schedule: base %d (%v), archives %v", base, err, files)
		}
		time.Sleep(200 * time.Millisecond)
	}
	tb.Daemon.StopSchedule() // a prune moving the base would race the check
	base, _ := tb.Daemon.Log.Base(ctx)
	if probs, err := tb.Daemon.Log.VerifyRange(ctx, base, 0); err != nil || len(probs) != 0 {
		t.Fatalf("the pruned log: %v %v", probs, err)
	}
}
