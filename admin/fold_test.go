package admin

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// TestTimelineFoldsCycles renders the timeline over a log with two
// cycles back to one snapshot, the first cut off before its verdict: one
// row per cycle, no row for a replay or a rewind, and each replayed verb
// says what the newest cycle's replay did with it. Asked for by kind, the
// replay records are rows of their own, in words.
func TestTimelineFoldsCycles(t *testing.T) {
	ts := newTestServer(t)
	l := ts.f.l
	ctx := context.Background()
	at, _ := l.Last()
	if err := logSnapshot(ctx, l, "s1", at); err != nil {
		t.Fatal(err)
	}
	create := imapVerb(t, l, "alice", "imap.create", "Projects")
	del := imapVerb(t, l, "alice", "imap.delete", "Projects")
	appendRec := func(r *undolog.Record) int64 {
		t.Helper()
		if err := l.Append(ctx, r); err != nil {
			t.Fatal(err)
		}
		return r.Seq
	}
	js := func(v any) json.RawMessage { b, _ := json.Marshal(v); return b }
	cycle := func(verdict bool, fates map[int64]string) int64 {
		c := appendRec(&undolog.Record{Kind: verb.KindCycle, Session: "cycle", Args: js(map[string]any{"to": "s1", "cancel": []int64{del}})})
		rw := appendRec(&undolog.Record{Kind: verb.KindRewind, Session: "rewind", Args: js(map[string]any{"snapshot": "s1", "at_seq": at,
			"before": []map[string]any{{"user": "alice", "mailbox": "INBOX", "uidvalidity": 7, "uidnext": 9, "highestmodseq": 12}}})})
		appendRec(&undolog.Record{Kind: undolog.KindOutcome, Session: "rewind", Ref: rw, Outcome: js(map[string]any{"ok": true, "raised": 1})})
		for _, seq := range []int64{create, del} {
			st, detail, _ := strings.Cut(fates[seq], ":")
			appendRec(&undolog.Record{Kind: verb.KindReplay, Session: "replay", User: "alice", Ref: seq, Outcome: js(map[string]string{"status": st, "detail": detail})})
		}
		if verdict {
			appendRec(&undolog.Record{Kind: undolog.KindOutcome, Session: "cycle", Ref: c, Outcome: js(map[string]any{"ok": true, "replayed": 1, "cancelled": 1})})
		}
		return c
	}
	c1 := cycle(false, map[int64]string{create: "failed:IMAP connection lost", del: "cancelled:left out by the repair"})
	c2 := cycle(true, map[int64]string{create: "ok:created Projects", del: "cancelled:left out by the repair"})

	c, _ := ts.browser(t)
	get := func(path string) string {
		t.Helper()
		resp, err := c.Get(ts.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 {
			t.Fatalf("GET %s: %s\n%s", path, resp.Status, b)
		}
		return string(b)
	}
	page := get("/")
	table := page[strings.Index(page, "<table>"):]
	if strings.Contains(table, "{&#34;") || strings.Contains(table, `{"`) {
		t.Errorf("JSON in the timeline's table:\n%s", table)
	}
	if n := strings.Count(table, `class="cycle-row`); n != 2 {
		t.Errorf("%d cycle rows, want one per cycle:\n%s", n, table)
	}
	for _, kind := range []string{verb.KindReplay, verb.KindRewind} {
		if strings.Contains(table, fmt.Sprintf(`data-kind="%s"`, kind)) {
			t.Errorf("a %s record has a row of its own:\n%s", kind, table)
		}
	}
	row := func(seq int64) string {
		t.Helper()
		i := strings.Index(table, fmt.Sprintf(`data-seq="%d"><td>`, seq))
		if i < 0 {
			t.Fatalf("no row for %d:\n%s", seq, table)
		}
		r, _, _ := strings.Cut(table[i:], "</tr>")
		return r
	}
	if r := row(create); !strings.Contains(r, fmt.Sprintf("replayed by cycle #%d: made again (created Projects)", c2)) || strings.Contains(r, "connection lost") {
		t.Errorf("the CREATE's row, want the newest cycle's replay: %s", r)
	}
	if r := row(del); !strings.Contains(r, fmt.Sprintf("cycle #%d: cancelled (left out by the repair)", c2)) {
		t.Errorf("the DELETE's row: %s", r)
	}
	if r := row(c1); !strings.Contains(r, "no verdict yet: running, or cut off") || !strings.Contains(r, "rewound 1 mailbox of 1 user to snapshot s1") {
		t.Errorf("the cut-off cycle's row: %s", r)
	}
	if r := row(c2); !strings.Contains(r, "verified: 1 replayed, 1 cancelled") || !strings.Contains(r, "rewound 1 mailbox") {
		t.Errorf("the second cycle's row: %s", r)
	}
	// Asked for, the replay records are listed, in words.
	replays := get("/?kind=replay")
	replays = replays[strings.Index(replays, "<table>"):]
	if n := strings.Count(replays, `data-kind="replay"`); n != 4 || !strings.Contains(replays, "FAILED: IMAP connection lost") || strings.Contains(replays, "{&#34;") {
		t.Errorf("?kind=replay: %d replay rows, want 4 in words:\n%s", n, replays)
	}
}
