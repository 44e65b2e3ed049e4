// Command gen writes an undo log with the v1 (foundation, 5f5be7c) code.
package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/undomail/undomail/undolog"
)

func main() {
	dir := os.Args[1]
	l, err := undolog.Open(dir, undolog.Options{})
	if err != nil {
		panic(err)
	}
	ctx := context.Background()
	blob := func(s string) string {
		w, err := l.NewBlob()
		if err != nil {
			panic(err)
		}
		w.Write([]byte(s))
		ref, err := w.Commit()
		if err != nil {
			panic(err)
		}
		return ref.SHA256
	}
	t0 := time.Date(2026, 1, 5, 9, 0, 0, 123456789, time.UTC)
	at := func(i int) time.Time { return t0.Add(time.Duration(i) * 1500 * time.Millisecond) }
	msg1 := "From: bob@example.test\r\nTo: alice@example.test\r\nSubject: v1 fixture\r\nMessage-Id: <v1.1@example.test>\r\n\r\nThe first message of the oldest log.\r\n"
	msg2 := "From: carol@example.test\r\nTo: alice@example.test, dave@example.test\r\nSubject: list\r\n\r\n" + strings.Repeat("line of a longer body\r\n", 400)
	b1, b2 := blob(msg1), blob(msg2)
	add := func(r *undolog.Record) int64 {
		if err := l.Append(ctx, r); err != nil {
			panic(err)
		}
		return r.Seq
	}
	j := func(v any) json.RawMessage { b, _ := json.Marshal(v); return b }
	s := add(&undolog.Record{Time: at(0), User: "bob@example.test", Session: "S1", Kind: "smtp.submit", Blob: b1,
		Users: []string{"alice@example.test"}, Args: j(map[string]any{"from": "bob@example.test", "rcpt": []string{"alice@example.test"}, "undo_id": "01KEAAAAAAAAAAAAAAAAAAAAAA"})})
	add(&undolog.Record{Time: at(1), Session: "S1", Kind: undolog.KindOutcome, Ref: s, Outcome: j(map[string]any{"code": 250, "text": "2.0.0 Ok: queued as 4ABC"})})
	d := add(&undolog.Record{Time: at(2), Session: "L1", Kind: "lmtp.deliver", Blob: b1,
		Users: []string{"alice@example.test"}, Args: j(map[string]any{"from": "bob@example.test", "rcpt": []string{"alice@example.test"}, "undo_id": "01KEAAAAAAAAAAAAAAAAAAAAAA"})})
	add(&undolog.Record{Time: at(3), Session: "L1", Kind: undolog.KindOutcome, Ref: d, Outcome: j([]map[string]any{{"rcpt": "alice@example.test", "code": 250}})})
	d2 := add(&undolog.Record{Time: at(4), Session: "L2", Kind: "lmtp.deliver", Blob: b2,
		Users: []string{"alice@example.test", "dave@example.test"}, Args: j(map[string]any{"from": "carol@example.test", "rcpt": []string{"alice@example.test", "dave@example.test"}, "undo_id": "01KEBBBBBBBBBBBBBBBBBBBBBB"})})
	add(&undolog.Record{Time: at(5), Session: "L2", Kind: undolog.KindOutcome, Ref: d2, Outcome: j([]map[string]any{{"rcpt": "alice@example.test", "code": 250}, {"rcpt": "dave@example.test", "code": 250}})})
	st := add(&undolog.Record{Time: at(6), User: "alice@example.test", Session: "I1", Kind: "imap.store",
		Users: []string{"alice@example.test"}, Args: j(map[string]any{"mailbox": "INBOX", "uids": "1:2", "flags": "+FLAGS (\\Seen)", "undo_id": "01KEAAAAAAAAAAAAAAAAAAAAAA"})})
	add(&undolog.Record{Time: at(7), User: "alice@example.test", Session: "I1", Kind: undolog.KindOutcome, Ref: st, Outcome: j(map[string]any{"status": "OK"})})
	// An intent whose outcome never came (a crash in between), and a
	// system record without a user.
	add(&undolog.Record{Time: at(8), User: "dave@example.test", Session: "I2", Kind: "imap.expunge", Users: []string{"dave@example.test"}, Args: j(map[string]any{"mailbox": "INBOX"})})
	add(&undolog.Record{Time: at(9), Session: "sys", Kind: "system.note", Args: j(map[string]any{"note": "snapshot taken", "snapshot": "undomail-20260105T090014"})})
	if err := l.Close(); err != nil {
		panic(err)
	}
	recs := func() []undolog.Record {
		l, err := undolog.Open(dir, undolog.Options{})
		if err != nil {
			panic(err)
		}
		defer l.Close()
		rs, err := l.Records(ctx, undolog.Filter{})
		if err != nil {
			panic(err)
		}
		return rs
	}()
	type rec struct {
		Seq                 int64
		Time                time.Time
		User, Session, Kind string
		Ref                 int64
		Blob                string
		Users               []string
		Args, Outcome       string
		PrevSum, Sum        string
	}
	var rs []rec
	for _, r := range recs {
		rs = append(rs, rec{r.Seq, r.Time, r.User, r.Session, r.Kind, r.Ref, r.Blob, r.Users, string(r.Args), string(r.Outcome), hex.EncodeToString(r.PrevSum[:]), hex.EncodeToString(r.Sum[:])})
	}
	out, _ := json.MarshalIndent(rs, "", "  ")
	fmt.Println(string(out))
}
