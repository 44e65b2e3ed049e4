package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"

	"github.com/undomail/undomail/internal/mailstack"
	"github.com/undomail/undomail/internal/mailstack/mailstacktest"
)

// TestCompensationsThroughTheCLI: an operator runs a cycle that filters
// out spam, with a reason, through the undomail binary. alice had read
// one of the two spam messages: the verdict counts one explained, one
// nobody saw, and undomail compensations, run while the daemon serves,
// lists her digest.
func TestCompensationsThroughTheCLI(t *testing.T) {
	st := mailstacktest.Start(t, mailstack.Options{})
	s := newServer(t, st)
	cfg := repairConfig(t, st)
	f, err := os.OpenFile(cfg, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("compensation:\n  contact: \"the help desk, help@example.test\"\n")
	f.Close()
	s.extra = []string{"--config", cfg}
	s.start()
	if err := st.SetLMTPRelay(context.Background(), s.lmtpAdr); err != nil {
		t.Fatal(err)
	}
	out, err := run(t, "snapshot", "--data-dir", s.dataDir)
	if err != nil {
		t.Fatalf("snapshot: %v %s", err, out)
	}
	snap := strings.Fields(out)[1]
	for _, id := range []string{"l1@spam.test", "l2@spam.test"} {
		if err := sendPlain(s.smtpAddr, "From: Luck <luck@spam.test>\r\nSubject: Lottery win "+id+"\r\nMessage-Id: <"+id+">\r\n\r\nx\r\n"); err != nil {
			t.Fatal(err)
		}
		waitInbox(t, st, id)
	}
	c, err := imapclient.DialInsecure(s.imapAddr, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Login("alice", st.Password("alice")).Wait(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	found, err := c.UIDSearch(&imap.SearchCriteria{Header: []imap.SearchCriteriaHeaderField{{Key: "Message-Id", Value: "l1@spam.test"}}}, nil).Wait()
	if err != nil || len(found.AllUIDs()) != 1 {
		t.Fatalf("find l1: %v", err)
	}
	if _, err := c.Fetch(imap.UIDSetNum(found.AllUIDs()[0]), &imap.FetchOptions{BodySection: []*imap.FetchItemBodySection{{}}}).Collect(); err != nil {
		t.Fatal(err)
	}
	c.Logout().Wait()

	out, err = run(t, "cycle", "run", "--data-dir", s.dataDir, "--to", snap, "--filter", "header:Subject=~(?i)lottery",
		"--reason", "Spam got past the filter.", "--yes")
	if err != nil || !strings.Contains(out, "verdict: OK") ||
		!strings.Contains(out, "paradoxes: 1 explained to users in 1 digests, 0 for the operator, 1 nobody saw, 0 ignored, 0 explained before") {
		t.Fatalf("cycle run: %v\n%s", err, out)
	}
	js, err := run(t, "compensations", "--data-dir", s.dataDir, "--json")
	if err != nil {
		t.Fatalf("compensations --json: %v\n%s", err, js)
	}
	lines := strings.Split(strings.TrimSpace(js), "\n")
	var comp compensationJSON
	if len(lines) != 1 || json.Unmarshal([]byte(lines[0]), &comp) != nil || comp.User != "alice" || !comp.Delivered ||
		len(comp.Paradoxes) != 1 || comp.Paradoxes[0].Message == nil || comp.Paradoxes[0].Message.Subject != "Lottery win l1@spam.test" {
		t.Fatalf("compensations --json:\n%s", js)
	}
	table, err := run(t, "compensations", "--data-dir", s.dataDir, "--user", "alice", "--cycle", fmt.Sprint(comp.Cycle))
	if err != nil || !strings.Contains(table, "read_removed:1") || !strings.Contains(table, "alice@example.test") {
		t.Fatalf("compensations --user alice: %v\n%s", err, table)
	}
	ids, err := inboxMessageIDs(st, "alice")
	if err != nil || ids["l1@spam.test"] != 0 || ids["l2@spam.test"] != 0 || len(ids) != 1 {
		t.Fatalf("alice's INBOX after the cycle: %v, %v; want only the digest", ids, err)
	}
	s.stop()
}
