package main

import (
	"bytes"
	"context"
	"encoding/json"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// TestLogInWordsFoldsCycles writes the records of a delivery, a DELETE
// and a cycle that cancels the DELETE and replays the delivery, as the
// proxies and the daemon write them, and reads them with `undomail log`'s
// printer: every record in words, the replays told on the rows of the
// verbs they replayed, the rewind under its cycle; with --kind replay the
// replay records are listed themselves.
func TestLogInWordsFoldsCycles(t *testing.T) {
	ctx := context.Background()
	l, js, add := handLog(t, filepath.Join(t.TempDir(), "undo"))
	defer l.Close()
	add(&undolog.Record{Kind: "snapshot", Args: js(map[string]any{"name": "s1", "at_seq": 0, "reason": "hourly"})}, map[string]any{"ok": true, "pause_ms": 3.5})
	del := add(&undolog.Record{Kind: verb.KindIMAPDelete, User: "alice", Users: []string{"alice"}, Args: js(verb.IMAPArgs{Command: "DELETE", Mailbox: "Projects"})},
		verb.IMAPOutcome{Status: "OK", Text: "Delete completed."})
	dlv := add(&undolog.Record{Kind: verb.KindLMTPDeliver, Users: []string{"alice@example.test"}, Args: js(verb.DeliveryArgs{UndoID: "01X", MailFrom: "bob@example.test",
		Rcpts: []string{"alice@example.test"}, Size: 300, Header: verb.HeaderInfo{Subject: "Lunch on Friday?"}})},
		verb.DeliveryOutcome{Rcpts: []verb.RcptReply{{Rcpt: "alice@example.test", Reply: verb.Reply{Code: 250, Enhanced: "2.0.0", Text: "Saved"}}}})
	cyc := &undolog.Record{Kind: verb.KindCycle, Args: js(verb.CycleArgs{To: "s1", At: 2, Cancel: []int64{del}, Reason: "alice deleted Projects by mistake"})}
	add(cyc, nil)
	add(&undolog.Record{Kind: verb.KindRewind, Args: js(verb.RewindArgs{Snapshot: "s1", AtSeq: 2,
		Before: []verb.MailboxCounters{{User: "alice", Mailbox: "INBOX", UIDValidity: 7, UIDNext: 9, HighestModSeq: 12}}})}, verb.RewindOutcome{OK: true, Raised: 1})
	add(&undolog.Record{Kind: verb.KindReplay, User: "alice", Ref: del, Outcome: js(verb.ReplayOutcome{Status: verb.ReplayCancelled, Detail: "left out by the repair"})}, nil)
	add(&undolog.Record{Kind: verb.KindReplay, User: "alice", Ref: dlv, Outcome: js(verb.ReplayOutcome{Status: verb.ReplayOK, Detail: "INBOX uid 9"})}, nil)
	if err := l.Append(ctx, &undolog.Record{Kind: undolog.KindOutcome, Ref: cyc.Seq, Outcome: js(map[string]any{"ok": true, "replayed": 1, "cancelled": 1,
		"verify": map[string]any{"users": 1, "mailboxes": 1, "messages": 1}})}); err != nil {
		t.Fatal(err)
	}
	verbs, err := l.Verbs(ctx, undolog.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	printVerbs(&b, verbs, true)
	out := b.String()
	t.Logf("undomail log:\n%s", out)
	if strings.ContainsAny(out, "{}") {
		t.Errorf("JSON in `undomail log`:\n%s", out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	find := func(prefix string) string {
		for _, l := range lines {
			if strings.HasPrefix(l, prefix) {
				return l
			}
		}
		t.Fatalf("no line starting %q in:\n%s", prefix, out)
		return ""
	}
	for _, l := range lines[1:] {
		if f := strings.Fields(l); len(f) > 3 && (f[3] == verb.KindReplay || f[3] == verb.KindRewind) {
			t.Errorf("a %s record has a row of its own: %q", f[3], l)
		}
	}
	if l := find(itoa(del) + " "); !strings.Contains(l, `DELETE "Projects"`) || !strings.Contains(l, "OK Delete completed; replayed by cycle #") ||
		!strings.Contains(l, "cancelled: left out by the repair") {
		t.Errorf("the DELETE's row: %q", l)
	}
	if l := find(itoa(dlv) + " "); !strings.Contains(l, "delivered to <alice@example.test> 250 2.0.0 Saved; replayed by cycle #") || !strings.Contains(l, "made again: INBOX uid 9") {
		t.Errorf("the delivery's row: %q", l)
	}
	if l := find(itoa(cyc.Seq) + " "); !strings.Contains(l, "cycle: rewind to snapshot s1 (log position 2), cancel #") || !strings.Contains(l, "verified: 1 replayed, 1 cancelled") {
		t.Errorf("the cycle's row: %q", l)
	}
	if !strings.Contains(out, "rewound 1 mailbox of 1 user to snapshot s1 (log position 2) — OK") {
		t.Errorf("the rewind is not told under its cycle:\n%s", out)
	}
	// Asked for by kind, replay records are rows, in words.
	b.Reset()
	rs, err := l.Verbs(ctx, undolog.Filter{Kinds: []string{verb.KindReplay}})
	if err != nil {
		t.Fatal(err)
	}
	printVerbs(&b, rs, false)
	if out := b.String(); strings.Count(out, "replay of #") != 2 || !strings.Contains(out, "made again: INBOX uid 9") || strings.Contains(out, "{") {
		t.Errorf("undomail log --kind replay:\n%s", out)
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// handLog opens a new undo log in dir for records written by hand, as
// the proxies and the daemon write them: js marshals a value, add
// appends a record and, if outcome is not nil, its outcome record.
func handLog(t *testing.T, dir string) (l *undolog.Log, js func(any) json.RawMessage, add func(r *undolog.Record, outcome any) int64) {
	t.Helper()
	l, err := undolog.Open(dir, undolog.Options{})
	if err != nil {
		t.Fatal(err)
	}
	js = func(v any) json.RawMessage {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	add = func(r *undolog.Record, outcome any) int64 {
		t.Helper()
		if err := l.Append(context.Background(), r); err != nil {
			t.Fatal(err)
		}
		if outcome != nil {
			if err := l.Append(context.Background(), &undolog.Record{Kind: undolog.KindOutcome, Ref: r.Seq, Outcome: js(outcome)}); err != nil {
				t.Fatal(err)
			}
		}
		return r.Seq
	}
	return l, js, add
}
