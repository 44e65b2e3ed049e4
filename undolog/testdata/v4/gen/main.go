// Command gen writes an undo log with the schema version 4 code (f88d349):
// inline blobs stored plain in a WITHOUT ROWID table, a delta blob, a file
// blob, stored prev_sums and the time index.
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
	// Blobs over 3000 bytes are files, so a small fixture has one.
	l, err := undolog.Open(dir, undolog.Options{InlineBlobMax: 3000})
	if err != nil {
		panic(err)
	}
	ctx := context.Background()
	write := func(s, base string) undolog.BlobRef {
		w, err := l.NewBlob()
		if err != nil {
			panic(err)
		}
		w.Write([]byte(s))
		var ref undolog.BlobRef
		if base != "" {
			ref, err = w.CommitDelta(base)
		} else {
			ref, err = w.Commit()
		}
		if err != nil {
			panic(err)
		}
		return ref
	}
	t0 := time.Date(2026, 11, 20, 9, 0, 0, 123456789, time.UTC)
	at := func(i int) time.Time { return t0.Add(time.Duration(i) * 1500 * time.Millisecond) }
	j := func(v any) json.RawMessage { b, _ := json.Marshal(v); return b }
	add := func(r *undolog.Record) int64 {
		if err := l.Append(ctx, r); err != nil {
			panic(err)
		}
		return r.Seq
	}
	msg1 := "From: bob@example.test\r\nTo: alice@example.test\r\nSubject: v4 fixture\r\nMessage-Id: <v4.1@example.test>\r\n\r\n" +
		strings.Repeat("A line of text that compresses well in a newer log.\r\n", 40)
	msg2 := "From: carol@example.test\r\nTo: dave@example.test\r\nSubject: big\r\n\r\n" + strings.Repeat("0123456789abcdef", 300)
	sub := write(msg1, "")
	// A record without a blob, then the front door's submit with one.
	add(&undolog.Record{Time: at(0), Session: "S0", Kind: "system.note", Args: j(map[string]any{"note": "v4 fixture"})})
	r := &undolog.Record{Time: at(1), Session: "S1", Kind: "smtp.submit", Users: []string{"alice@example.test"},
		Args: j(map[string]any{"undo_id": "01KF4BBBBBBBBBBBBBBBBBBBBB", "mail_from": "bob@example.test", "rcpts": []string{"alice@example.test"}})}
	r.AttachBlob(sub)
	s2 := add(r)
	add(&undolog.Record{Time: at(2), Session: "S1", Kind: undolog.KindOutcome, Ref: s2, Users: []string{"alice@example.test"}, Outcome: j(map[string]any{"reply": map[string]any{"code": 250}})})
	del := write("Received: from mx by here\r\nUndomail-Id: 01KF4BBBBBBBBBBBBBBBBBBBBB\r\n"+msg1, sub.SHA256)
	r = &undolog.Record{Time: at(3), Session: "L1", Kind: "lmtp.deliver", Users: []string{"alice@example.test"},
		Args: j(map[string]any{"undo_id": "01KF4BBBBBBBBBBBBBBBBBBBBB", "submission": s2})}
	r.AttachBlob(del)
	d := add(r)
	add(&undolog.Record{Time: at(4), Session: "L1", Kind: undolog.KindOutcome, Ref: d, Users: []string{"alice@example.test"}, Outcome: j(map[string]any{"rcpts": []any{map[string]any{"rcpt": "alice@example.test"}}})})
	big := write(msg2, "")
	r = &undolog.Record{Time: at(5), Session: "L2", Kind: "lmtp.deliver", Users: []string{"dave@example.test"},
		Args: j(map[string]any{"undo_id": "01KF4CCCCCCCCCCCCCCCCCCCCC"})}
	r.AttachBlob(big)
	d2 := add(r)
	add(&undolog.Record{Time: at(6), Session: "L2", Kind: undolog.KindOutcome, Ref: d2, Users: []string{"dave@example.test"}, Outcome: j(map[string]any{"rcpts": []any{}})})
	st := add(&undolog.Record{Time: at(7), User: "alice@example.test", Session: "I1", Kind: "imap.store", Users: []string{"alice@example.test"},
		Args: j(map[string]any{"mailbox": "INBOX", "uids": "1", "op": "+", "flags": []string{"\\Seen"}})})
	add(&undolog.Record{Time: at(8), User: "alice@example.test", Session: "I1", Kind: undolog.KindOutcome, Ref: st, Users: []string{"alice@example.test"},
		Outcome: j(map[string]any{"status": "OK", "text": "Store completed (0.001 + 0.000 secs)."})})
	add(&undolog.Record{Time: at(9), User: "dave@example.test", Session: "I2", Kind: "imap.expunge", Users: []string{"dave@example.test"}, Args: j(map[string]any{"mailbox": "INBOX"})})
	if err := l.Close(); err != nil {
		panic(err)
	}
	l, err = undolog.Open(dir, undolog.Options{InlineBlobMax: 3000})
	if err != nil {
		panic(err)
	}
	defer l.Close()
	recs, err := l.Records(ctx, undolog.Filter{})
	if err != nil {
		panic(err)
	}
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
	// The blobs as stored, for the test: name, then content.
	blobs := map[string]string{sub.SHA256: msg1, del.SHA256: "Received: from mx by here\r\nUndomail-Id: 01KF4BBBBBBBBBBBBBBBBBBBBB\r\n" + msg1, big.SHA256: msg2}
	b, _ := json.MarshalIndent(blobs, "", "  ")
	os.WriteFile(os.Args[2], b, 0o644)
}
