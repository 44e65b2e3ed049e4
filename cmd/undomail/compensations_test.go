package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/undomail/undomail/compensate"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// TestCompensationsCommand: undomail compensations lists the logged
// compensations with their paradoxes, filtered by user and cycle, as a
// table or JSON.
func TestCompensationsCommand(t *testing.T) {
	dir := t.TempDir()
	l, err := undolog.Open(dir, undolog.Options{})
	if err != nil {
		t.Fatal(err)
	}
	seen := time.Date(2026, 11, 21, 10, 0, 0, 0, time.UTC)
	// Cycles at seq 7 and 9 (the records before them are fillers).
	for range 9 {
		if err := l.Append(context.Background(), &undolog.Record{Kind: "cycle", Args: json.RawMessage(`{"to":"s"}`)}); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		user, rcpt string
		cycle      int64
		delivered  bool
	}{{"alice", "alice@example.test", 7, true}, {"bob", "bob@example.test", 7, false}, {"alice", "alice@example.test", 9, true}} {
		a := compensate.Args{
			DeliveryArgs: verb.DeliveryArgs{UndoID: "id-" + c.user, Rcpts: []string{c.rcpt}, Header: verb.HeaderInfo{Subject: compensate.DefaultSubject}},
			Cycle:        c.cycle, Audience: compensate.AudienceUser, User: c.user,
			Paradoxes: []compensate.Paradox{{Kind: compensate.ReadRemoved, User: c.user, Verb: 3, VerbKind: verb.KindLMTPDeliver, Seen: seen,
				Message: &compensate.Message{UndoID: "m", Subject: "Lottery", From: "x@spam.test"}, Now: "removed by the repair"}},
		}
		args, _ := json.Marshal(a)
		rec := &undolog.Record{Kind: verb.KindCompensation, User: c.user, Users: []string{c.user}, Ref: c.cycle, Args: args}
		if err := l.Append(context.Background(), rec); err != nil {
			t.Fatal(err)
		}
		rep := verb.Reply{Code: 250, Text: "ok"}
		if !c.delivered {
			rep = verb.Reply{Code: 452, Enhanced: "4.2.2", Text: "Quota exceeded"}
		}
		out, _ := json.Marshal(verb.DeliveryOutcome{Rcpts: []verb.RcptReply{{Rcpt: c.rcpt, Reply: rep}}})
		if err := l.Append(context.Background(), &undolog.Record{Kind: undolog.KindOutcome, Ref: rec.Seq, Outcome: out}); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
	run := func(args ...string) string {
		t.Helper()
		cmd := compensationsCmd()
		var out bytes.Buffer
		cmd.SetOut(&out)
		cmd.SetArgs(append([]string{"--data-dir", dir}, args...))
		if err := cmd.Execute(); err != nil {
			t.Fatalf("compensations %v: %v", args, err)
		}
		return out.String()
	}
	table := run("--cycle", "7")
	for _, want := range []string{"alice@example.test", "bob@example.test", "read_removed:1", "no: <bob@example.test> 452 4.2.2 Quota exceeded", `"Lottery" from x@spam.test`} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}
	lines := strings.Split(strings.TrimSpace(run("--json", "--user", "alice")), "\n")
	if len(lines) != 2 {
		t.Fatalf("--json --user alice: %d lines, want 2:\n%s", len(lines), strings.Join(lines, "\n"))
	}
	var j compensationJSON
	if err := json.Unmarshal([]byte(lines[1]), &j); err != nil || j.Cycle != 9 || j.User != "alice" || !j.Delivered || len(j.Paradoxes) != 1 ||
		j.Paradoxes[0].Kind != compensate.ReadRemoved {
		t.Fatalf("JSON %s: %+v, %v", lines[1], j, err)
	}
	if got := run("--cycle", "8"); !strings.Contains(got, "no compensations match") {
		t.Errorf("--cycle 8: %s", got)
	}
}
