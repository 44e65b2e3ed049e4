package verb_test

import (
	"encoding/json"
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/compensate"
	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

func j(t *testing.T, v any) json.RawMessage {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// sample is a realistic record of one kind, built from the types the
// code that writes it uses, and words its description must contain.
type sample struct {
	user    string
	ref     int64
	args    any
	outcome any // on an outcome record
	inline  any // on the record itself (drills' verdicts, replays, compensations)
	what    string
	result  string // "" : no outcome expected
}

func samples(t *testing.T) map[string][]sample {
	five := 5
	comment := "my inbox"
	hdr := verb.HeaderInfo{MessageID: "<p1@client.test>", From: "Sam <s@example.test>", Subject: "Budget 2027"}
	deliv := verb.DeliveryArgs{UndoID: "01M8XP28QFDH7P0GV4FAG085DP", MailFrom: "s@example.test", Rcpts: []string{"alice@example.test"}, Size: 345, Header: hdr}
	ok := verb.IMAPOutcome{Status: "OK", Text: "Completed"}
	no := verb.IMAPOutcome{Status: "NO", Code: "NONEXISTENT", Text: "Mailbox doesn't exist: Projects"}
	imapArgs := func(cmd, mb string, mod func(*verb.IMAPArgs)) verb.IMAPArgs {
		a := verb.IMAPArgs{Command: cmd, Mailbox: mb, UIDValidity: 1796292551}
		if mod != nil {
			mod(&a)
		}
		return a
	}
	var before []verb.MailboxCounters
	for _, u := range []string{"alice", "bob"} {
		for _, mb := range []string{"INBOX", "Projects"} {
			before = append(before, verb.MailboxCounters{User: u, Mailbox: mb, UIDValidity: 1796292551, UIDNext: 48, HighestModSeq: 90})
		}
	}
	verdict := admin.CycleVerdict{OK: true, Cycle: 35, Present: "undomail-20261203T100912.538Z", Replayed: 55, Cancelled: 1,
		Skipped: map[string]int{"smtp.submit": 55}, Users: 2, Messages: 55,
		Verify:       replay.Verification{Users: 2, Mailboxes: 4, Messages: 57},
		Held:         1.5,
		Compensation: &compensate.Report{Digests: []string{"alice"}, Records: []int64{99}}}
	failed := verdict
	failed.OK, failed.Failed, failed.Error = false, 1, "the store differs from the log"
	failed.Verify.Problems = []string{`alice "INBOX": 1 message missing`}
	lost := verdict
	lost.OK, lost.Unreplayable, lost.Error = false, map[string]int{"imap.setquota": 2}, "verbs of kinds this undomail cannot replay were left out"
	comp := compensate.Args{DeliveryArgs: deliv, Cycle: 35, Audience: compensate.AudienceUser, User: "alice",
		Paradoxes: []compensate.Paradox{{Kind: compensate.ReadRemoved, User: "alice", Verb: 19, VerbKind: verb.KindLMTPDeliver}}}
	comp.Header.Subject = "Your mailbox was repaired: what changed"
	drill := verb.DrillVerdict{DrillResult: verb.DrillResult{OK: true, From: "s1", To: "s2", Replayed: 12, Messages: 40, Seconds: 3.2},
		Acknowledged: []string{"mail ops@example.test"}}
	badDrill := verb.DrillVerdict{DrillResult: verb.DrillResult{OK: false, From: "s1", To: "s2", Differences: []string{`alice "INBOX" uid 3: flags differ`}, More: 2}}
	return map[string][]sample{
		verb.KindSMTPSubmit: {{user: "bob", args: deliv, outcome: verb.DeliveryOutcome{Reply: &verb.Reply{Code: 250, Enhanced: "2.0.0", Text: "Ok: queued as 4ABC"}},
			what: `"Budget 2027"`, result: "accepted: 250 2.0.0 Ok: queued as 4ABC"},
			{args: deliv, outcome: verb.DeliveryOutcome{Reply: &verb.Reply{Code: 550, Enhanced: "5.7.1", Text: "spam"}}, what: "<s@example.test>", result: "refused: 550"}},
		verb.KindLMTPDeliver: {{args: deliv, outcome: verb.DeliveryOutcome{Rcpts: []verb.RcptReply{{Rcpt: "alice@example.test", Reply: verb.Reply{Code: 250, Enhanced: "2.0.0", Text: "Saved"}}}},
			what: "<alice@example.test>", result: "delivered to <alice@example.test> 250 2.0.0 Saved"}},
		verb.KindIMAPAppend: {{user: "alice", args: imapArgs("APPEND", "Sent", func(a *verb.IMAPArgs) { a.Size, a.UndoID = 1200, "01M8X" }),
			outcome: verb.IMAPOutcome{Status: "OK", Code: "APPENDUID 1796292551 48", AppendUID: "1796292551 48"}, what: `APPEND "Sent"`, result: "OK [APPENDUID"}},
		verb.KindIMAPStore: {{user: "alice", args: imapArgs("UID STORE", "INBOX", func(a *verb.IMAPArgs) { a.UIDs, a.Op, a.Flags = "3:5", "+", []string{`\Seen`} }),
			outcome: ok, what: `UID STORE "INBOX" uid 3:5 +FLAGS (\Seen)`, result: "OK"},
			{user: "alice", args: imapArgs("UID STORE", "INBOX", func(a *verb.IMAPArgs) {
				a.UIDs, a.Op, a.Flags, a.UnchangedSince = "3:5", "-", []string{`\Flagged`}, 80
			}),
				outcome: verb.IMAPOutcome{Status: "OK", Code: "MODIFIED 4", Modified: "4"}, what: "uid 3:5", result: "left alone, changed since"}},
		verb.KindIMAPCopy: {{user: "alice", args: imapArgs("COPY", "INBOX", func(a *verb.IMAPArgs) { a.Seqs, a.UIDs, a.Dest = "1:2", "47:48", "Archive" }),
			outcome: no, what: `COPY "INBOX" seq 1:2 uid 47:48 -> "Archive"`, result: "refused by the server: [NONEXISTENT] Mailbox doesn't exist"}},
		verb.KindIMAPMove: {{user: "alice", args: imapArgs("UID MOVE", "INBOX", func(a *verb.IMAPArgs) { a.UIDs, a.Dest = "4", "Work" }),
			outcome: verb.IMAPOutcome{Status: "OK", CopyUID: "1796292552 4 1", Expunged: &five}, what: `UID MOVE "INBOX" uid 4 -> "Work"`, result: "OK [COPYUID"}},
		verb.KindIMAPExpunge: {{user: "alice", args: imapArgs("EXPUNGE", "INBOX", func(a *verb.IMAPArgs) { a.UIDs = "1:5" }),
			outcome: verb.IMAPOutcome{Status: "OK", Expunged: &five}, what: `EXPUNGE "INBOX" uid 1:5`, result: "the server expunged 5 messages"}},
		verb.KindIMAPCreate:      {{user: "alice", args: imapArgs("CREATE", "Projects", nil), outcome: ok, what: `CREATE "Projects"`, result: "OK"}},
		verb.KindIMAPDelete:      {{user: "alice", args: imapArgs("DELETE", "Projects", nil), outcome: ok, what: `DELETE "Projects"`, result: "OK"}},
		verb.KindIMAPRename:      {{user: "alice", args: imapArgs("RENAME", "Projects", func(a *verb.IMAPArgs) { a.Dest = "Old" }), outcome: verb.IMAPOutcome{Status: "BAD", Text: "Invalid arguments"}, what: `-> "Old"`, result: "rejected by the server as invalid: Invalid arguments"}},
		verb.KindIMAPSubscribe:   {{user: "alice", args: imapArgs("SUBSCRIBE", "Projects", nil), outcome: ok, what: "SUBSCRIBE", result: "OK"}},
		verb.KindIMAPUnsubscribe: {{user: "alice", args: imapArgs("UNSUBSCRIBE", "Projects", nil), outcome: ok, what: "UNSUBSCRIBE", result: "OK"}},
		verb.KindIMAPSetMetadata: {{user: "alice", args: verb.IMAPArgs{Command: "SETMETADATA", Mailbox: "INBOX", Metadata: map[string]*string{"/private/comment": &comment, "/private/old": nil}}, outcome: ok, what: `SETMETADATA "INBOX" set /private/comment, removed /private/old`, result: "OK"}},
		verb.KindIMAPFetch: {{user: "alice", args: verb.IMAPFetchArgs{Mailbox: "INBOX", UIDValidity: 1796292551, UIDs: "47", UndoIDs: map[string]string{"47": "01M8X"}, Seen: true},
			what: `seen "INBOX" uid 47`}},
		verb.KindSnapshot: {{args: verb.SnapshotArgs{Name: "undomail-20261203T100911.828Z", AtSeq: 12, Store: "copy:/snaps", Reason: "hourly"},
			outcome: verb.SnapshotOutcome{OK: true, Pause: 25.01}, what: "snapshot undomail-20261203T100911.828Z at log position 12 (hourly)", result: "taken"},
			{args: verb.SnapshotArgs{Name: "s2", AtSeq: 14}, outcome: verb.SnapshotOutcome{Error: "zfs: out of space"}, what: "s2", result: "FAILED: zfs: out of space"}},
		verb.KindSnapshotPruned: {{args: verb.SnapshotArgs{Name: "s1", Reason: "retention"}, what: "snapshot s1 destroyed by retention"}},
		verb.KindCycle: {{args: verb.CycleArgs{To: "s1", At: 12, Cancel: []int64{15}, Present: "s2", Reason: "alice deleted Projects by mistake"},
			outcome: verdict, what: "cycle: rewind to snapshot s1 (log position 12), cancel #15", result: "verified: 55 replayed, 1 cancelled"},
			{args: verb.CycleArgs{To: "s1", Filters: []verb.FilterSpec{{Rule: "subject:Offer", Action: "drop"}}, Users: []string{"alice"}},
				outcome: failed, what: `filter "subject:Offer": drop`, result: "FAILED"},
			{args: verb.CycleArgs{To: "s1"}, what: "s1", result: "running, or cut off"},
			{args: verb.CycleArgs{To: "s1"}, outcome: lost, what: "s1", result: "FAILED: 55 replayed, 1 cancelled, 0 failed; NOT replayed: 2 imap.setquota: no replay is defined for this kind"}},
		verb.KindReplay: {{user: "alice", ref: 19, inline: verb.ReplayOutcome{Status: verb.ReplayOK, Detail: "INBOX uid 47"}, what: "replay of #19", result: "made again: INBOX uid 47"},
			{user: "alice", ref: 15, inline: verb.ReplayOutcome{Status: verb.ReplayCancelled, Detail: "left out by the repair"}, what: "#15", result: "cancelled: left out by the repair"},
			{user: "alice", ref: 21, inline: verb.ReplayOutcome{Status: verb.ReplayOK, Detail: "appended to Sent", Placed: []verb.Placed{{Mailbox: "Sent", UIDValidity: 7, UID: 12, UndoID: "01M8X"}}},
				what: "#21", result: `made again: appended to Sent; placed 1 message at "Sent" uid 12`}},
		verb.KindRewind: {{args: verb.RewindArgs{Snapshot: "s1", AtSeq: 12, Before: before}, outcome: verb.RewindOutcome{OK: true, Raised: 4, Renewed: []string{"bob/Projects"}},
			what: "rewound 4 mailboxes of 2 users to snapshot s1", result: "OK: the counters of 4 mailboxes raised"}},
		verb.KindDrill: {{args: verb.DrillArgs{From: "s1", To: "s2", FromSeq: 12, ToSeq: 40}, outcome: drill, what: "recovery drill", result: "passed: 12 replayed"},
			{args: verb.DrillArgs{From: "s1", To: "s2"}, outcome: badDrill, what: "s1", result: "FAILED: 3 differences"}},
		verb.KindCompensation: {{user: "alice", ref: 35, args: comp, outcome: verb.DeliveryOutcome{Rcpts: []verb.RcptReply{{Rcpt: "alice", Reply: verb.Reply{Code: 250, Text: "Saved"}}}},
			what: "a digest for alice explaining 1 paradox of cycle #35: read removed (#19)", result: "delivered to <alice>"}},
		verb.KindFilterRemoved: {{args: map[string]int64{"cycle": 35}, what: "cycle #35"}},
		verb.KindOutboundHeld: {{args: verb.OutboundHeld{QueueID: "4ABC", UndoID: "01M8X", Submission: 12, Sender: "s@example.test", Rcpts: []string{"dana@outside.test"},
			Subject: "Budget 2027", ReleaseAt: time.Date(2026, 12, 3, 10, 0, 30, 0, time.UTC)},
			what: `outbound mail held until 2026-12-03T10:00:30Z: <s@example.test> -> <dana@outside.test> "Budget 2027" (Postfix queue id 4ABC, sent by #12)`}},
		verb.KindOutboundReleased: {{ref: 40, args: verb.OutboundEnd{QueueID: "4ABC", By: verb.OutboundByWindow}, what: "outbound mail #40 (Postfix queue id 4ABC) released: its time in the window was up"},
			{ref: 40, args: verb.OutboundEnd{QueueID: "4ABC", By: verb.OutboundByPostfix}, what: "left Postfix's queue without undomail"}},
		verb.KindOutboundCancelled: {{ref: 40, args: verb.OutboundEnd{QueueID: "4ABC", By: verb.OutboundByCycle, Cycle: 35, Reason: "bob sent it by mistake"},
			what: "outbound mail #40 (Postfix queue id 4ABC) cancelled by cycle #35 (bob sent it by mistake)"}},
		verb.KindOutcome: {{ref: 15, inline: verb.IMAPOutcome{Status: "OK"}, what: "outcome of record #15", result: "status OK"}},
		verb.KindNote:    {{args: map[string]string{"note": "snapshot taken", "snapshot": "undomail-20260105T090014"}, what: "note: snapshot taken"}},
	}
}

// TestEveryKindDescribedInWords describes a realistic record of every
// registered kind and checks the words: what it was, its outcome, no
// JSON.
func TestEveryKindDescribedInWords(t *testing.T) {
	all := samples(t)
	for _, kind := range verb.Kinds() {
		ss := all[kind]
		if len(ss) == 0 {
			t.Errorf("kind %s is registered but has no sample record in this test", kind)
		}
		for i, s := range ss {
			v := undolog.Verb{Record: undolog.Record{Seq: 40, Time: time.Now(), User: s.user, Kind: kind, Ref: s.ref}}
			if s.args != nil {
				v.Args = j(t, s.args)
			}
			if s.inline != nil {
				v.Record.Outcome = j(t, s.inline)
			}
			if s.outcome != nil {
				v.Outcome = &undolog.Record{Seq: 41, Kind: undolog.KindOutcome, Ref: 40, Outcome: j(t, s.outcome)}
			}
			d := verb.Describe(v)
			t.Logf("%s[%d]: %s | %s | user: %s", kind, i, d.What, d.Outcome, d.User())
			for name, text := range map[string]string{"what": d.What, "outcome": d.Outcome, "for the user": d.User()} {
				if strings.ContainsAny(text, "{}") {
					t.Errorf("%s[%d]: %s has JSON in it: %q", kind, i, name, text)
				}
			}
			if d.What == "" || !strings.Contains(d.What, s.what) {
				t.Errorf("%s[%d]: what = %q, want it to say %q", kind, i, d.What, s.what)
			}
			if s.result != "" && !strings.Contains(d.Outcome, s.result) {
				t.Errorf("%s[%d]: outcome = %q, want it to say %q", kind, i, d.Outcome, s.result)
			}
			if s.result == "" && s.outcome == nil && s.inline == nil && d.Outcome != "" {
				t.Errorf("%s[%d]: outcome = %q for a record that has none", kind, i, d.Outcome)
			}
		}
	}
}

// TestUnansweredCommand: a user's command whose outcome was never logged
// was cut off before its client was answered, and is told so.
func TestUnansweredCommand(t *testing.T) {
	v := undolog.Verb{Record: undolog.Record{Seq: 9, User: "alice", Kind: verb.KindIMAPDelete, Args: j(t, verb.IMAPArgs{Command: "DELETE", Mailbox: "Projects"})}}
	if d := verb.Describe(v); !strings.Contains(d.Outcome, "cut off before the client was answered") {
		t.Fatalf("an unanswered DELETE: %+v", d)
	}
}

// TestUnknownKindInWords: a record of a kind this version does not know
// (a newer one wrote it) is still told in words, not as JSON.
func TestUnknownKindInWords(t *testing.T) {
	v := undolog.Verb{Record: undolog.Record{Seq: 9, Kind: "quota.changed", Args: json.RawMessage(`{"user":"alice","limits":{"storage":1024}}`), Outcome: json.RawMessage(`{"ok":true}`)}}
	d := verb.Describe(v)
	if d.What != "quota.changed record: limits (storage 1024), user alice" || d.Outcome != "ok yes" {
		t.Fatalf("unknown kind described as %+v", d)
	}
}

// TestEveryWrittenKindRegistered reads the Kind constants of the
// packages that write records (the proxies, replay, compensation, the
// daemon and the log itself) from their source and fails for any that
// has no description: a new kind must be described before it is logged.
func TestEveryWrittenKindRegistered(t *testing.T) {
	found := map[string]string{}
	for _, dir := range []string{"../proxy", "../verb", "../replay", "../compensate", "../internal/daemon", "../internal/outbound", "../undolog"} {
		for name, c := range kindConstants(t, dir) {
			found[c.value] = c.file + ": " + name
		}
	}
	if len(found) < 20 {
		t.Fatalf("found only %d kind constants (%v): the scan is broken", len(found), found)
	}
	for kind, where := range found {
		if _, ok := verb.Lookup(kind); !ok {
			t.Errorf("%s (%s) is written to the log but has no description in package verb", kind, where)
		}
	}
	// A kind is spelled once, here (undolog's own outcome kind aside):
	// the writers use these names.
	for kind, where := range found {
		if !strings.HasPrefix(where, "../verb/") && !strings.HasPrefix(where, "../undolog/") {
			t.Errorf("%s spells the kind %q again: use package verb's constant", where, kind)
		}
	}
	t.Logf("%d kinds registered: %s", len(verb.Kinds()), strings.Join(verb.Kinds(), " "))
}

// TestEveryProxyKindSaysHowItIsReplayed reads, from the proxies' source,
// every record kind they write (the verb.Kind... constants they name)
// and fails for one that has no definition here, or whose definition
// says neither how a replay makes it again nor why it does not: a cycle
// must never drop a user's action without a word (issue #18: a
// SETMETADATA was recorded, then silently skipped).
func TestEveryProxyKindSaysHowItIsReplayed(t *testing.T) {
	consts := kindConstants(t, ".") // package verb's
	used := map[string]string{}     // kind -> where the proxy names it
	eachSource(t, "../proxy", func(fset *token.FileSet, file *ast.File) {
		ast.Inspect(file, func(n ast.Node) bool {
			sel, ok := n.(*ast.SelectorExpr)
			if !ok || !strings.HasPrefix(sel.Sel.Name, "Kind") {
				return true
			}
			if pkg, ok := sel.X.(*ast.Ident); !ok || pkg.Name != "verb" {
				return true
			}
			c, ok := consts[sel.Sel.Name]
			if !ok {
				t.Errorf("%s names verb.%s, which is no kind constant of package verb", fset.Position(sel.Pos()), sel.Sel.Name)
				return true
			}
			used[c.value] = fset.Position(sel.Pos()).String()
			return true
		})
	})
	// The IMAP front end writes twelve kinds, the SMTP and LMTP ones two:
	// far fewer found means the scan no longer sees them.
	if len(used) < 12 {
		t.Fatalf("found only %d kinds the proxies write (%v): the scan is broken", len(used), used)
	}
	// Kinds the proxy names to read them, never to write them.
	reads := map[string]string{verb.KindReplay: "the IMAP front end reads where replays put messages (imapids.go)"}
	for kind, where := range used {
		if _, ok := reads[kind]; ok {
			continue
		}
		k, ok := verb.Lookup(kind)
		switch {
		case !ok:
			t.Errorf("the proxy writes %s (%s), which package verb does not define: define it, with how it is replayed or why not", kind, where)
		case k.Replay.How == "" && k.Replay.Why == "":
			t.Errorf("the proxy writes %s (%s), but its definition says neither how it is replayed nor why not", kind, where)
		case k.System:
			t.Errorf("the proxy writes %s (%s), a kind defined as undomail's own record, not a user's", kind, where)
		}
	}
}

// eachSource parses every non-test Go file in dir.
func eachSource(t *testing.T, dir string, visit func(*token.FileSet, *ast.File)) {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil || len(files) == 0 {
		t.Fatalf("read %s: %v", dir, err)
	}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		fset := token.NewFileSet()
		file, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		visit(fset, file)
	}
}

type kindConst struct{ value, file string }

// kindConstants are the constants named Kind... with a string literal
// value that dir's source declares, by name.
func kindConstants(t *testing.T, dir string) map[string]kindConst {
	out := map[string]kindConst{}
	eachSource(t, dir, func(fset *token.FileSet, file *ast.File) {
		ast.Inspect(file, func(n ast.Node) bool {
			vs, ok := n.(*ast.ValueSpec)
			if !ok {
				return true
			}
			for i, name := range vs.Names {
				if !strings.HasPrefix(name.Name, "Kind") || i >= len(vs.Values) {
					continue
				}
				if lit, ok := vs.Values[i].(*ast.BasicLit); ok && lit.Kind == token.STRING {
					v, _ := strconv.Unquote(lit.Value)
					out[name.Name] = kindConst{value: v, file: filepath.Join(dir, filepath.Base(fset.Position(file.Pos()).Filename))}
				}
			}
			return true
		})
	})
	return out
}
