package proxy_test

import (
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/verb"
)

// TestIMAPAppendCutOffByDovecot: Dovecot ends a session whose selected
// mailbox another session deleted, after it completed the command in
// progress, and never sends that command's tagged OK. An APPEND caught
// so is in the store all the same: the log must say so (OK, with the UID
// Dovecot gave it, found afterwards), or replay would leave the message
// out. Checked against Dovecot's own listing of the mailbox.
func TestIMAPAppendCutOffByDovecot(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	pass := tb.Stack.Password("alice")
	a, ar := rawSession(t, tb.IMAPAddr(), "alice", pass)
	b, br := rawSession(t, tb.IMAPAddr(), "alice", pass)
	a.Write([]byte("a1 CREATE Doomed\r\na2 SELECT Doomed\r\n"))
	ar.until(t, "a2 OK")
	b.Write([]byte("b1 DELETE Doomed\r\n"))
	br.until(t, "b1 OK")
	msg := "From: a@example.test\r\nSubject: cut off\r\nMessage-Id: <cutoff@example.test>\r\n\r\nstored all the same\r\n"
	fmt.Fprintf(a, "a3 APPEND INBOX {%d+}\r\n%s\r\n", len(msg), msg)
	// Read what a gets until the connection ends: Dovecot's BYE, and
	// perhaps (if a later Dovecot answers first) the APPEND's OK.
	a.SetReadDeadline(time.Now().Add(30 * time.Second))
	got, _ := io.ReadAll(a)
	t.Logf("session a was told:\n%s", got)

	// Dovecot's own view of INBOX: the message is there.
	c, cr := rawSession(t, tb.Stack.IMAPAddr, "alice", pass)
	c.Write([]byte("c1 EXAMINE INBOX\r\nc2 UID SEARCH HEADER Message-Id cutoff@example.test\r\n"))
	var uid string
	for _, l := range cr.until(t, "c2 ") {
		if f := strings.Fields(l); len(f) > 2 && f[1] == "SEARCH" {
			uid = f[2]
		}
	}
	if uid == "" {
		// Not stored: the log must not say it was.
		for _, v := range imapVerbs(t, tb.Daemon.Log, verb.KindIMAPAppend) {
			if argsOf(t, v).Mailbox == "INBOX" && v.Outcome != nil && imapOutcome(t, v).Status == "OK" {
				t.Fatalf("Dovecot has no such message, yet the log says the APPEND was done: %+v", imapOutcome(t, v))
			}
		}
		t.Fatalf("Dovecot did not store the APPEND (session told %q): the test no longer reproduces a command cut off after it was done", got)
	}

	// The log: the APPEND, with an outcome naming that UID.
	deadline := time.Now().Add(20 * time.Second)
	for {
		var found bool
		for _, v := range imapVerbs(t, tb.Daemon.Log, verb.KindIMAPAppend) {
			if argsOf(t, v).Mailbox != "INBOX" {
				continue
			}
			found = true
			if v.Outcome == nil {
				break
			}
			o := imapOutcome(t, v)
			if o.Status != "OK" || !strings.HasSuffix(o.AppendUID, " "+uid) {
				t.Fatalf("the cut-off APPEND is logged with outcome %+v; Dovecot has the message at uid %s", o, uid)
			}
			return
		}
		if !found {
			t.Fatal("the APPEND is not in the log")
		}
		if time.Now().After(deadline) {
			t.Fatalf("the APPEND Dovecot stored at uid %s has no outcome in the log", uid)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
