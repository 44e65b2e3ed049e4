package main

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestRewindTargets: rewind --to takes what cycle run --to takes, a
// snapshot's name, a log position or a time, each meaning the newest
// snapshot at or before it.
func TestRewindTargets(t *testing.T) {
	st, s := repairServer(t)
	snapshot := func() (name, pos string) {
		t.Helper()
		out, err := run(t, "snapshot", "--data-dir", s.dataDir)
		if err != nil {
			t.Fatalf("snapshot: %v %s", err, out)
		}
		f := strings.Fields(out) // snapshot NAME at log position N; ...
		return f[1], strings.TrimSuffix(f[5], ";")
	}
	send := func(id string) {
		t.Helper()
		if err := sendPlain(s.smtpAddr, "Subject: "+id+"\r\nMessage-Id: <"+id+">\r\n\r\nhi\r\n"); err != nil {
			t.Fatal(err)
		}
		waitInbox(t, st, id)
	}
	inbox := func() map[string]int {
		t.Helper()
		ids, err := inboxMessageIDs(st, "alice")
		if err != nil {
			t.Fatal(err)
		}
		return ids
	}

	a, _ := snapshot()
	between := time.Now().Format(time.RFC3339Nano)
	send("m1@client.test")
	b, bPos := snapshot()
	send("m2@client.test")

	if out, err := run(t, "rewind", "--data-dir", s.dataDir, "--to", "2001-01-01", "--yes"); err == nil || !strings.Contains(out, "no snapshot") {
		t.Fatalf("rewind to a time before every snapshot: %v %s, want an error saying there is no snapshot", err, out)
	}
	if out, err := run(t, "rewind", "--data-dir", s.dataDir, "--to", "not-a-snapshot", "--yes"); err == nil || !strings.Contains(out, "not a snapshot in the log, a log position or a time") {
		t.Fatalf("rewind to nonsense: %v %s", err, out)
	}

	// A time between the two snapshots means the first.
	out, err := run(t, "rewind", "--data-dir", s.dataDir, "--to", between, "--yes")
	if err != nil || !strings.Contains(out, "snapshot "+a+" ") || !strings.Contains(out, "rewound to "+a) {
		t.Fatalf("rewind --to %s: %v\n%s\nwant snapshot %s", between, err, out, a)
	}
	if ids := inbox(); len(ids) != 0 {
		t.Fatalf("after rewinding to %s alice's INBOX holds %v, want nothing", a, ids)
	}

	// The second snapshot's log position (and one past it) means the second.
	pos := 0
	fmt.Sscan(bPos, &pos)
	out, err = run(t, "rewind", "--data-dir", s.dataDir, "--to", fmt.Sprint(pos+1), "--yes")
	if err != nil || !strings.Contains(out, fmt.Sprintf("snapshot %s (log position %d)", b, pos)) || !strings.Contains(out, "rewound to "+b) {
		t.Fatalf("rewind --to %d: %v\n%s\nwant snapshot %s", pos+1, err, out, b)
	}
	if ids := inbox(); len(ids) != 1 || ids["m1@client.test"] != 1 {
		t.Fatalf("after rewinding to %s alice's INBOX holds %v, want only m1", b, ids)
	}

	// A name is taken as it is.
	if out, err := run(t, "rewind", "--data-dir", s.dataDir, "--to", a, "--yes"); err != nil || !strings.Contains(out, "rewound to "+a) {
		t.Fatalf("rewind --to %s: %v\n%s", a, err, out)
	}
	if ids := inbox(); len(ids) != 0 {
		t.Fatalf("after rewinding to %s by name alice's INBOX holds %v, want nothing", a, ids)
	}
	s.stop()
}
