package main

import (
	"bytes"
	"maps"
	"strings"
	"testing"

	"github.com/undomail/undomail/internal/daemon"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// TestPlanCountsWhatIsNotReplayed: the plan counts, by kind, every verb
// after the snapshot the cycle neither replays nor cancels, with why,
// and warns that a verb of a kind no replay is defined for (here one a
// newer undomail might write) makes the verdict NOT OK. Limited to one
// user, it counts only that user's verbs.
func TestPlanCountsWhatIsNotReplayed(t *testing.T) {
	dir := t.TempDir()
	l, js, add := handLog(t, dir)
	ok := verb.IMAPOutcome{Status: "OK", Text: "done"}
	add(&undolog.Record{Kind: verb.KindSnapshot, Session: "daemon", Args: js(verb.SnapshotArgs{Name: "s1", AtSeq: 0, Reason: "test"})}, verb.SnapshotOutcome{OK: true})
	imap := func(user, kind, cmd string, outcome any) int64 {
		return add(&undolog.Record{Kind: kind, User: user, Users: []string{user}, Session: "i-" + user,
			Args: js(verb.IMAPArgs{Command: cmd, Mailbox: "INBOX", UIDValidity: 7, UIDs: "1", Op: "+", Flags: []string{`\Seen`}})}, outcome)
	}
	store := imap("alice", verb.KindIMAPStore, "UID STORE", ok)                                // replayed
	imap("alice", verb.KindIMAPStore, "UID STORE", verb.IMAPOutcome{Status: "NO", Text: "no"}) // no effect
	imap("bob", verb.KindIMAPDelete, "DELETE", verb.IMAPOutcome{Status: "NO", Text: "no"})     // no effect, bob's
	add(&undolog.Record{Kind: verb.KindSMTPSubmit, User: "alice", Session: "s-1", Args: js(verb.DeliveryArgs{UndoID: "01A", MailFrom: "alice@example.test",
		Rcpts: []string{"carol@example.org"}})}, verb.DeliveryOutcome{Reply: &verb.Reply{Code: 250, Text: "queued"}}) // never replayed
	imap("alice", "imap.setquota", "SETQUOTA", ok) // a kind this version does not know
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}

	p, err := planFromFlags(dir, "s1", "", daemon.CancelSelector{}, nil, "drop", nil)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int{verb.KindIMAPStore: 1, verb.KindIMAPDelete: 1, verb.KindSMTPSubmit: 1}
	if !maps.Equal(p.NotReplayed, want) || !maps.Equal(p.Unreplayable, map[string]int{"imap.setquota": 1}) || p.Counts.Replay != 1 {
		t.Fatalf("plan: not replayed %v, unreplayable %v, %d to replay; want %v, imap.setquota 1, 1", p.NotReplayed, p.Unreplayable, p.Counts.Replay, want)
	}
	var out bytes.Buffer
	p.print(&out)
	text := out.String()
	for _, w := range []string{"1 smtp.submit: a submission changes no mailbox itself", "1 imap.store: no effect of its own",
		"1 imap.setquota: no replay is defined", "verdict will be NOT OK"} {
		if !strings.Contains(text, w) {
			t.Errorf("the plan does not say %q:\n%s", w, text)
		}
	}

	p, err = planFromFlags(dir, "s1", "", daemon.CancelSelector{}, nil, "drop", []string{"alice"})
	if err != nil {
		t.Fatal(err)
	}
	delete(want, verb.KindIMAPDelete) // bob's
	if !maps.Equal(p.NotReplayed, want) || p.Unreplayable["imap.setquota"] != 1 || len(p.Verbs) == 0 || p.Verbs[0].Seq != store {
		t.Fatalf("plan for alice: not replayed %v, unreplayable %v, steps %+v; want %v", p.NotReplayed, p.Unreplayable, p.Verbs, want)
	}
}
