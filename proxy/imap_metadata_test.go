package proxy_test

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/verb"
)

// TestSetMetadataLoggedAndReplayed: annotations a client sets and removes
// with SETMETADATA (RFC 5464) through undomail are logged entry by entry,
// and a cycle with no repair back to a snapshot taken before gives them
// back exactly as Dovecot had them.
func TestSetMetadataLoggedAndReplayed(t *testing.T) {
	snapDir := filepath.Join(t.TempDir(), "snaps")
	tb := testbedtest.Start(t, func(c *config.Config) { c.Store = "copy:" + snapDir })
	ctx := context.Background()
	conn, r := rawSession(t, tb.IMAPAddr(), "alice", tb.Stack.Password("alice"))
	send := func(s string) { t.Helper(); conn.Write([]byte(s + "\r\n")) }
	send(`p SETMETADATA INBOX (/private/comment "before")`)
	r.until(t, "p OK")
	snap, _, err := tb.Daemon.Snapshot(ctx, "hourly")
	if err != nil {
		t.Fatal(err)
	}
	send(`a SETMETADATA INBOX (/private/comment "Grüße, with a {literal}" /private/vendor/undomail/x {5+}`)
	send(`hello)`)
	r.until(t, "a OK")
	send(`b SETMETADATA "" (/private/vendor/undomail/server "on the server")`)
	r.until(t, "b OK")
	send(`c SETMETADATA INBOX (/private/vendor/undomail/x NIL)`)
	r.until(t, "c OK")

	vs := imapVerbs(t, tb.Daemon.Log, verb.KindIMAPSetMetadata)
	if len(vs) != 4 {
		t.Fatalf("%d SETMETADATA logged, want 4", len(vs))
	}
	if a := argsOf(t, vs[1]); a.Mailbox != "INBOX" || a.Metadata["/private/comment"] == nil || *a.Metadata["/private/comment"] != "Grüße, with a {literal}" ||
		a.Metadata["/private/vendor/undomail/x"] == nil || *a.Metadata["/private/vendor/undomail/x"] != "hello" {
		t.Fatalf("SETMETADATA logged as %+v", a)
	}
	if a := argsOf(t, vs[3]); a.Metadata["/private/vendor/undomail/x"] != nil {
		t.Fatalf("removal logged as %+v", a)
	}
	before := metadata(t, tb)
	v, err := tb.Daemon.Cycle(ctx, admin.CycleRequest{To: snap.Name})
	if err != nil || !v.OK {
		t.Fatalf("cycle %+v, %v", v, err)
	}
	after := metadata(t, tb)
	if before != after {
		t.Fatalf("annotations before the cycle:\n%s\nafter:\n%s", before, after)
	}
	want := "* METADATA INBOX (/private/comment {25}\nGrüße, with a {literal} /private/vendor/undomail/x NIL)\n"
	if !strings.Contains(before, "on the server") || !strings.HasPrefix(before, want) || strings.Contains(before, "hello") {
		t.Fatalf("annotations read back:\n%s", before)
	}
}

// metadata reads alice's annotations straight from Dovecot.
func metadata(t *testing.T, tb *testbed.Testbed) string {
	t.Helper()
	conn, r := rawSession(t, tb.Stack.IMAPAddr, "alice", tb.Stack.Password("alice"))
	conn.Write([]byte("g1 GETMETADATA INBOX (/private/comment /private/vendor/undomail/x)\r\ng2 GETMETADATA \"\" (/private/vendor/undomail/server)\r\n"))
	var out string
	for _, l := range r.until(t, "g2 ") {
		if !strings.HasPrefix(l, "g1 ") && !strings.HasPrefix(l, "g2 ") {
			out += l + "\n"
		}
	}
	return out
}
