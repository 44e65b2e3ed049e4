package undolog

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// testOptions sends the log's own events to the test output.
// testOptions keeps every blob in a file: most tests here damage blob files
// on purpose. inline_test.go covers blobs stored in the database.
func testOptions(t testing.TB) Options {
	return Options{
		Logger:        slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo})),
		InlineBlobMax: -1,
	}
}

func openTest(t testing.TB, dir string) *Log {
	t.Helper()
	l, err := Open(dir, testOptions(t))
	if err != nil {
		t.Fatalf("Open(%s): %v", dir, err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// storeBlob writes data as a blob.
func storeBlob(l *Log, data []byte) (BlobRef, error) {
	w, err := l.NewBlob()
	if err != nil {
		return BlobRef{}, err
	}
	if _, err := w.Write(data); err != nil {
		w.Abort()
		return BlobRef{}, err
	}
	return w.Commit()
}

// appendRec appends one record and fails the test on error.
func appendRec(t testing.TB, l *Log, r Record) Record {
	t.Helper()
	if err := l.Append(context.Background(), &r); err != nil {
		t.Fatalf("Append(%s): %v", r.Kind, err)
	}
	return r
}

// checkClean runs Check and fails on any error or warning.
func checkClean(t *testing.T, dir string) Summary {
	t.Helper()
	var problems []string
	sum, err := Check(context.Background(), dir, func(p Problem) {
		if p.Severity != Info {
			problems = append(problems, p.String())
		}
	})
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	if len(problems) > 0 || !sum.OK() {
		t.Fatalf("Check found problems in a clean log (%v):\n%s", sum, strings.Join(problems, "\n"))
	}
	return sum
}

func TestAppendRoundTrip(t *testing.T) {
	dir := t.TempDir()
	l := openTest(t, dir)
	ref, err := storeBlob(l, []byte("Subject: hi\r\n\r\nhello\r\n"))
	if err != nil {
		t.Fatalf("storeBlob: %v", err)
	}
	when := time.Date(2025, 3, 1, 12, 0, 0, 123456789, time.FixedZone("CET", 3600))
	in := Record{
		Time: when, User: "alice", Session: "s1", Kind: "smtp.submit", Blob: ref.SHA256,
		Users: []string{"bob", "carol"}, Args: json.RawMessage(`{"from":"alice@example.org","rcpt":["bob@example.org"]}`),
	}
	got := appendRec(t, l, in)
	if got.Seq != 1 || got.PrevSum != ([32]byte{}) || got.Sum == ([32]byte{}) {
		t.Fatalf("first record: seq %d prev %x sum %x, want seq 1, zero prev, a sum", got.Seq, got.PrevSum, got.Sum)
	}
	if !got.Time.Equal(when) {
		t.Fatalf("Time = %v, want %v", got.Time, when)
	}
	second := appendRec(t, l, Record{User: "bob", Kind: "imap.store", Args: json.RawMessage(`{}`)})
	if second.Seq != 2 || second.PrevSum != got.Sum {
		t.Fatalf("second record: seq %d prev %x, want 2 and %x", second.Seq, second.PrevSum, got.Sum)
	}
	if second.Time.IsZero() {
		t.Fatalf("Append did not default Time")
	}
	if seq, sum := l.Last(); seq != 2 || sum != second.Sum {
		t.Fatalf("Last() = %d %x, want 2 %x", seq, sum, second.Sum)
	}

	recs, err := l.Records(context.Background(), Filter{})
	if err != nil {
		t.Fatalf("Records: %v", err)
	}
	if len(recs) != 2 {
		t.Fatalf("Records returned %d records, want 2", len(recs))
	}
	r := recs[0]
	if r.Seq != 1 || !r.Time.Equal(when) || r.User != "alice" || r.Session != "s1" || r.Kind != "smtp.submit" ||
		r.Blob != ref.SHA256 || !slices.Equal(r.Users, in.Users) || string(r.Args) != string(in.Args) ||
		r.Outcome != nil || r.Sum != got.Sum || r.PrevSum != got.PrevSum {
		t.Fatalf("read back %+v\nwant       %+v", r, got)
	}
	if r.computeSum() != r.Sum {
		t.Fatalf("sum of the record read back does not recompute")
	}

	// HEAD names the tail, and the log reopens from it.
	b, err := os.ReadFile(filepath.Join(dir, headName))
	if err != nil {
		t.Fatalf("read HEAD: %v", err)
	}
	if want := fmt.Sprintf("%020d %x\n", 2, second.Sum); string(b) != want {
		t.Fatalf("HEAD = %q, want %q", b, want)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	l2 := openTest(t, dir)
	if seq, sum := l2.Last(); seq != 2 || sum != second.Sum {
		t.Fatalf("after reopen Last() = %d %x, want 2 %x", seq, sum, second.Sum)
	}
	if third := appendRec(t, l2, Record{Kind: "imap.expunge"}); third.Seq != 3 || third.PrevSum != second.Sum {
		t.Fatalf("after reopen: seq %d prev %x, want 3 linked to %x", third.Seq, third.PrevSum, second.Sum)
	}
}

func TestAppendRejects(t *testing.T) {
	l := openTest(t, t.TempDir())
	appendRec(t, l, Record{Kind: "smtp.submit"})
	tests := []struct {
		name string
		rec  Record
	}{
		{"no kind", Record{}},
		{"invalid args", Record{Kind: "x", Args: json.RawMessage(`{`)}},
		{"outcome without ref", Record{Kind: KindOutcome}},
		{"ref to the future", Record{Kind: KindOutcome, Ref: 2}},
		{"bad blob name", Record{Kind: "x", Blob: "ABC"}},
		{"blob not stored", Record{Kind: "x", Blob: strings.Repeat("ab", 32)}},
		{"invalid utf-8 user", Record{Kind: "x", Users: []string{"\xff"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := tt.rec
			if err := l.Append(context.Background(), &r); err == nil {
				t.Fatalf("Append accepted %+v", tt.rec)
			}
		})
	}
	if seq, _ := l.Last(); seq != 1 {
		t.Fatalf("rejected appends moved the head to %d", seq)
	}
	appendRec(t, l, Record{Kind: "smtp.submit"})
}

func TestVerbsJoinOutcome(t *testing.T) {
	l := openTest(t, t.TempDir())
	ctx := context.Background()
	a := appendRec(t, l, Record{User: "alice", Kind: "smtp.submit", Args: json.RawMessage(`{"n":1}`)})
	b := appendRec(t, l, Record{User: "bob", Kind: "imap.append"})
	oa := appendRec(t, l, Record{User: "alice", Kind: KindOutcome, Ref: a.Seq, Outcome: json.RawMessage(`{"code":250}`)})
	c := appendRec(t, l, Record{User: "alice", Kind: "imap.store"})
	// b never got an outcome (as after a crash between intent and outcome).

	verbs, err := l.Verbs(ctx, Filter{})
	if err != nil {
		t.Fatalf("Verbs: %v", err)
	}
	if len(verbs) != 3 {
		t.Fatalf("Verbs returned %d verbs, want 3 (outcomes are not verbs)", len(verbs))
	}
	if verbs[0].Seq != a.Seq || verbs[0].Outcome == nil || verbs[0].Outcome.Seq != oa.Seq || string(verbs[0].Outcome.Outcome) != `{"code":250}` {
		t.Fatalf("verb %d: outcome %+v, want record %d with code 250", verbs[0].Seq, verbs[0].Outcome, oa.Seq)
	}
	if verbs[0].Outcome.Sum != oa.Sum {
		t.Fatalf("joined outcome has sum %x, want %x", verbs[0].Outcome.Sum, oa.Sum)
	}
	if verbs[1].Seq != b.Seq || verbs[1].Outcome != nil {
		t.Fatalf("verb %d: outcome %+v, want none", verbs[1].Seq, verbs[1].Outcome)
	}
	if verbs[2].Seq != c.Seq || verbs[2].Outcome != nil {
		t.Fatalf("verb %d: outcome %+v, want none", verbs[2].Seq, verbs[2].Outcome)
	}
	alice, err := l.Verbs(ctx, Filter{User: "alice"})
	if err != nil {
		t.Fatalf("Verbs(alice): %v", err)
	}
	if len(alice) != 2 || alice[0].Seq != a.Seq || alice[1].Seq != c.Seq || alice[0].Outcome == nil {
		t.Fatalf("Verbs(alice) = %v, want records %d (with outcome) and %d", seqsOfVerbs(alice), a.Seq, c.Seq)
	}
}

func seqsOfVerbs(vs []Verb) []int64 {
	var out []int64
	for _, v := range vs {
		out = append(out, v.Seq)
	}
	return out
}

func seqsOf(rs []Record) []int64 {
	var out []int64
	for _, r := range rs {
		out = append(out, r.Seq)
	}
	return out
}

func TestRecordsFilter(t *testing.T) {
	l := openTest(t, t.TempDir())
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	at := func(min int) time.Time { return t0.Add(time.Duration(min) * time.Minute) }
	appendRec(t, l, Record{Time: at(0), User: "alice", Kind: "smtp.submit", Users: []string{"bob"}})      // 1
	appendRec(t, l, Record{Time: at(1), User: "bob", Kind: "imap.store"})                                 // 2
	appendRec(t, l, Record{Time: at(2), User: "carol", Kind: "imap.expunge"})                             // 3
	appendRec(t, l, Record{Time: at(3), User: "", Kind: "lmtp.deliver", Users: []string{"carol", "bob"}}) // 4
	appendRec(t, l, Record{Time: at(4), User: "bob", Kind: KindOutcome, Ref: 2})                          // 5
	appendRec(t, l, Record{Time: at(5), User: "alice", Kind: "imap.store"})                               // 6

	tests := []struct {
		name string
		f    Filter
		want []int64
	}{
		{"all", Filter{}, []int64{1, 2, 3, 4, 5, 6}},
		{"user as actor or affected", Filter{User: "bob"}, []int64{1, 2, 4, 5}},
		{"user only affected", Filter{User: "carol"}, []int64{3, 4}},
		{"unknown user", Filter{User: "mallory"}, nil},
		{"since inclusive", Filter{Since: at(3)}, []int64{4, 5, 6}},
		{"until exclusive", Filter{Until: at(2)}, []int64{1, 2}},
		{"since and until", Filter{Since: at(1), Until: at(3)}, []int64{2, 3}},
		{"kinds", Filter{Kinds: []string{"imap.store", "imap.expunge"}}, []int64{2, 3, 6}},
		{"after seq", Filter{AfterSeq: 4}, []int64{5, 6}},
		{"limit", Filter{Limit: 2}, []int64{1, 2}},
		{"page two of a user", Filter{User: "bob", AfterSeq: 2, Limit: 1}, []int64{4}},
		{"user and kind and since", Filter{User: "bob", Kinds: []string{"imap.store", KindOutcome}, Since: at(2)}, []int64{5}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			recs, err := l.Records(context.Background(), tt.f)
			if err != nil {
				t.Fatalf("Records(%+v): %v", tt.f, err)
			}
			if got := seqsOf(recs); !slices.Equal(got, tt.want) {
				t.Fatalf("Records(%+v) = %v, want %v", tt.f, got, tt.want)
			}
		})
	}
}

// TestFilterUsesIndexes guards the query plans the timeline depends on at
// 10^6 records: no filter may scan the records table.
func TestFilterUsesIndexes(t *testing.T) {
	l := openTest(t, t.TempDir())
	var times []time.Time
	for range 5 {
		times = append(times, appendRec(t, l, Record{Kind: "imap.store", User: "bob"}).Time)
	}
	for _, f := range []Filter{
		{User: "bob", AfterSeq: 10, Limit: 50},
		{Since: times[1], Until: times[3].Add(time.Nanosecond)}, // a time range is a seq range (timeBounds)
		{Kinds: []string{"imap.store"}},
		{AfterSeq: 1000, Limit: 50},
		{UndoID: "01M7YQNTKW0CX075BND4H0BSRQ", Kinds: []string{"smtp.submit"}},
	} {
		sb, _, err := l.timeBounds(context.Background(), f.Since, f.Until)
		if err != nil {
			t.Fatal(err)
		}
		q, args := buildQuery(f, sb, recordCols, "", "")
		rows, err := l.db.Query("EXPLAIN QUERY PLAN "+q, args...)
		if err != nil {
			t.Fatalf("explain %q: %v", q, err)
		}
		var plan []string
		for rows.Next() {
			var id, parent, notused int
			var detail string
			if err := rows.Scan(&id, &parent, &notused, &detail); err != nil {
				t.Fatalf("scan plan: %v", err)
			}
			plan = append(plan, detail)
		}
		rows.Close()
		for _, step := range plan {
			if step == "SCAN r" || step == "SCAN records" || step == "SCAN u" {
				t.Fatalf("filter %+v scans a table:\n%s", f, strings.Join(plan, "\n"))
			}
		}
		if f.UndoID != "" && !strings.Contains(strings.Join(plan, "\n"), "records_undo_id") {
			t.Fatalf("undo id filter not driven by its index:\n%s", strings.Join(plan, "\n"))
		}
		t.Logf("%+v: %s", f, strings.Join(plan, "; "))
	}
}

func TestConcurrentAppendsGroupCommit(t *testing.T) {
	dir := t.TempDir()
	l := openTest(t, dir)
	const writers, each = 64, 20
	var wg sync.WaitGroup
	seqs := make(chan int64, writers*each)
	errs := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				r := Record{User: fmt.Sprintf("user%d", w), Session: fmt.Sprintf("s%d", w), Kind: "imap.store",
					Args: json.RawMessage(fmt.Sprintf(`{"i":%d}`, i))}
				if err := l.Append(context.Background(), &r); err != nil {
					errs <- err
					return
				}
				seqs <- r.Seq
			}
		}()
	}
	wg.Wait()
	close(seqs)
	close(errs)
	for err := range errs {
		t.Fatalf("Append: %v", err)
	}
	var got []int64
	for s := range seqs {
		got = append(got, s)
	}
	slices.Sort(got)
	for i, s := range got {
		if s != int64(i+1) {
			t.Fatalf("sequence numbers not unique and contiguous: position %d holds %d", i, s)
		}
	}
	if len(got) != writers*each {
		t.Fatalf("got %d sequence numbers, want %d", len(got), writers*each)
	}
	st := l.Stats()
	t.Logf("group commit: %d records in %d commits (%.1f records per fsync)", st.Records, st.Commits, float64(st.Records)/float64(st.Commits))
	if st.Records != writers*each || st.Commits >= st.Records {
		t.Fatalf("Stats() = %+v: want %d records in fewer commits", st, writers*each)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	sum := checkClean(t, dir)
	if sum.Records != writers*each {
		t.Fatalf("Check read %d records, want %d", sum.Records, writers*each)
	}
}

func TestCloseFlushesPending(t *testing.T) {
	l, err := Open(t.TempDir(), testOptions(t))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	ok := 0
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if l.Append(context.Background(), &Record{Kind: "x"}) == nil {
				mu.Lock()
				ok++
				mu.Unlock()
			}
		}()
	}
	time.Sleep(time.Millisecond)
	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	wg.Wait()
	if seq, _ := l.Last(); seq != int64(ok) {
		t.Fatalf("%d appends returned nil but the log ends at %d", ok, seq)
	}
	if err := l.Append(context.Background(), &Record{Kind: "x"}); !errors.Is(err, ErrClosed) || !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Append after Close = %v, want ErrClosed (and ErrUnavailable)", err)
	}
}

// tamper runs SQL against a closed log's database, like an operator with the
// sqlite3 shell or a bit flip would.
func tamper(t *testing.T, dir string, query string, args ...any) {
	t.Helper()
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(dir, dbName))
	if err != nil {
		t.Fatalf("open db to tamper: %v", err)
	}
	defer db.Close()
	if _, err := db.Exec(query, args...); err != nil {
		t.Fatalf("tamper %q: %v", query, err)
	}
}

// flipArgs flips one bit in the middle of a record's args in the database.
func flipArgs(t *testing.T, dir string, seq int64) {
	t.Helper()
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(dir, dbName))
	if err != nil {
		t.Fatalf("open db to tamper: %v", err)
	}
	defer db.Close()
	var args []byte
	if err := db.QueryRow(`SELECT args FROM records WHERE seq = ?`, seq).Scan(&args); err != nil {
		t.Fatalf("read args of record %d: %v", seq, err)
	}
	args[len(args)/2] ^= 0x01
	if _, err := db.Exec(`UPDATE records SET args = ? WHERE seq = ?`, args, seq); err != nil {
		t.Fatalf("flip args of record %d: %v", seq, err)
	}
}

// forge replaces a record's args and recomputes its own sum, as a forger
// who knows the format would; only the chain (or HEAD) can catch it.
func forge(t *testing.T, dir string, seq int64) {
	t.Helper()
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(dir, dbName))
	if err != nil {
		t.Fatalf("open db to forge: %v", err)
	}
	defer db.Close()
	var r Record
	sc := scanInto(&r)
	if err := db.QueryRow(`SELECT `+recordCols+` FROM records r WHERE seq = ?`, seq).Scan(sc.dest()...); err != nil {
		t.Fatalf("read record %d: %v", seq, err)
	}
	if err := sc.finish(); err != nil {
		t.Fatalf("read record %d: %v", seq, err)
	}
	if r.prevImplicit && seq > 1 {
		// The forger links the record to its predecessor properly.
		var prev []byte
		if err := db.QueryRow(`SELECT sum FROM records WHERE seq = ?`, seq-1).Scan(&prev); err != nil {
			t.Fatalf("read record %d: %v", seq-1, err)
		}
		copy(r.PrevSum[:], prev)
	}
	r.Args = json.RawMessage(`{"forged":true}`)
	r.Sum = r.computeSum()
	if _, err := db.Exec(`UPDATE records SET args = ?, sum = ? WHERE seq = ?`, []byte(r.Args), r.Sum[:], seq); err != nil {
		t.Fatalf("forge record %d: %v", seq, err)
	}
}

func TestOpenRefuses(t *testing.T) {
	tests := []struct {
		name    string
		damage  func(t *testing.T, dir string)
		want    error
		wantMsg string
	}{
		{"tail tampered", func(t *testing.T, dir string) { flipArgs(t, dir, 5) }, ErrCorrupt, "record 5"},
		{"tail truncated", func(t *testing.T, dir string) { tamper(t, dir, `DELETE FROM records WHERE seq > 3`) }, ErrTruncated, "records 4-5 missing"},
		{"tail rewritten with valid sums but HEAD disagrees", func(t *testing.T, dir string) {
			// A self-consistent forgery of record 5: only HEAD catches it.
			forge(t, dir, 5)
		}, ErrCorrupt, "HEAD"},
		{"middle link broken at the tail", func(t *testing.T, dir string) { tamper(t, dir, `DELETE FROM records WHERE seq = 4`) }, ErrCorrupt, "record 4 missing"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			l := openTest(t, dir)
			for i := range 5 {
				appendRec(t, l, Record{Kind: "imap.store", Args: json.RawMessage(fmt.Sprintf(`{"i":%d}`, i))})
			}
			l.Close()
			tt.damage(t, dir)
			l2, err := Open(dir, testOptions(t))
			if err == nil {
				l2.Close()
				t.Fatalf("Open accepted a damaged log")
			}
			if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.wantMsg) {
				t.Fatalf("Open error = %v, want %v mentioning %q", err, tt.want, tt.wantMsg)
			}
		})
	}
}

func TestOpenAcceptsLaggingHead(t *testing.T) {
	dir := t.TempDir()
	l := openTest(t, dir)
	for range 3 {
		appendRec(t, l, Record{Kind: "x"})
	}
	first, err := l.Records(context.Background(), Filter{Limit: 1})
	if err != nil {
		t.Fatalf("Records: %v", err)
	}
	l.Close()
	// A crash after commit 3 but before its HEAD update leaves HEAD at 1.
	if err := os.WriteFile(filepath.Join(dir, headName), fmt.Appendf(nil, "1 %x\n", first[0].Sum), 0o644); err != nil {
		t.Fatalf("write HEAD: %v", err)
	}
	l2 := openTest(t, dir)
	if seq, _ := l2.Last(); seq != 3 {
		t.Fatalf("Last() = %d, want 3", seq)
	}
	l2.Close()
	if seq, _, err := readHead(dir); err != nil || seq != 3 {
		t.Fatalf("HEAD after Open = %d, %v; want it caught up to 3", seq, err)
	}
}

func TestOpenRemovesTempBlobs(t *testing.T) {
	dir := t.TempDir()
	l := openTest(t, dir)
	w, err := l.NewBlob()
	if err != nil {
		t.Fatalf("NewBlob: %v", err)
	}
	w.Write([]byte("half a message"))
	// Simulate a crash: the writer is never committed or aborted.
	l.Close()
	l2 := openTest(t, dir)
	entries, err := os.ReadDir(filepath.Join(dir, blobsName, tmpName))
	if err != nil {
		t.Fatalf("read tmp: %v", err)
	}
	if len(entries) != 0 {
		t.Fatalf("Open left %d temporary blobs", len(entries))
	}
	l2.Close()
}

func TestOpenLocksDir(t *testing.T) {
	dir := t.TempDir()
	openTest(t, dir)
	l2, err := Open(dir, testOptions(t))
	if err == nil {
		l2.Close()
		t.Fatalf("second Open of the same dir succeeded")
	}
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("second Open = %v, want ErrUnavailable", err)
	}
}

// TestFailedIsSticky makes a commit fail with a chain inconsistency (another
// writer slipped a row into the database) and checks that the log refuses
// every later append until it is reopened.
func TestFailedIsSticky(t *testing.T) {
	dir := t.TempDir()
	l := openTest(t, dir)
	appendRec(t, l, Record{Kind: "x"})
	tamper(t, dir, `INSERT INTO records (seq, time, user, session, kind, ref, blob, users, args, outcome, prev_sum, sum)
		VALUES (2, 0, '', '', 'intruder', 0, '', '[]', x'', x'', x'', x'')`)
	err := l.Append(context.Background(), &Record{Kind: "x"})
	var fe *FailedError
	if !errors.Is(err, ErrUnavailable) || !errors.As(err, &fe) {
		t.Fatalf("Append after a foreign write = %v, want a FailedError wrapping ErrUnavailable", err)
	}
	for range 2 {
		err := l.Append(context.Background(), &Record{Kind: "x"})
		if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "UNIQUE") {
			t.Fatalf("later Append = %v, want ErrUnavailable naming the original cause", err)
		}
	}
	if _, err := l.NewBlob(); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("NewBlob on a failed log = %v, want ErrUnavailable", err)
	}
	if seq, _ := l.Last(); seq != 1 {
		t.Fatalf("failed commit moved the head to %d", seq)
	}
	l.Close()
	tamper(t, dir, `DELETE FROM records WHERE seq = 2`)
	l2 := openTest(t, dir)
	if r := appendRec(t, l2, Record{Kind: "x"}); r.Seq != 2 {
		t.Fatalf("after reopen: seq %d, want 2", r.Seq)
	}
}

func TestAppendContextCancelled(t *testing.T) {
	l := openTest(t, t.TempDir())
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r := Record{Kind: "x"}
	err := l.Append(ctx, &r)
	if err == nil {
		// The committer may have been faster than the select; that is allowed.
		if r.Seq != 1 {
			t.Fatalf("Append returned nil without assigning a seq")
		}
		return
	}
	if !errors.Is(err, context.Canceled) || r.Seq != 0 {
		t.Fatalf("Append = %v (seq %d), want context.Canceled and the caller's record untouched", err, r.Seq)
	}
}

// TestTimesNeverGoBack: a record appended with an earlier time than the
// record before it gets that record's time, so a time bound is a seq
// bound (timeBounds) without a time index; the time range queries find
// exactly the records in range.
func TestTimesNeverGoBack(t *testing.T) {
	dir := t.TempDir()
	l := openTest(t, dir)
	t0 := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	a := appendRec(t, l, Record{Kind: "imap.store", Time: t0.Add(10 * time.Second)})
	b := appendRec(t, l, Record{Kind: "imap.store", Time: t0})
	c := appendRec(t, l, Record{Kind: "imap.store", Time: t0.Add(20 * time.Second)})
	if !b.Time.Equal(a.Time) {
		t.Fatalf("record 2 appended at %v after record 1 at %v got time %v, want record 1's", t0, a.Time, b.Time)
	}
	l.Close()
	l = openTest(t, dir)
	d := appendRec(t, l, Record{Kind: "imap.store", Time: t0.Add(15 * time.Second)})
	if !d.Time.Equal(c.Time) {
		t.Fatalf("after reopening, a record at %v after one at %v got %v", t0.Add(15*time.Second), c.Time, d.Time)
	}
	checkClean(t, dir)
	for _, tc := range []struct {
		since, until time.Duration
		want         []int64
	}{
		{0, 10 * time.Second, nil},
		{10 * time.Second, 11 * time.Second, []int64{1, 2}},
		{11 * time.Second, time.Minute, []int64{3, 4}},
		{21 * time.Second, time.Minute, nil},
	} {
		recs, err := l.Records(context.Background(), Filter{Since: t0.Add(tc.since), Until: t0.Add(tc.until)})
		if err != nil {
			t.Fatal(err)
		}
		if got := seqsOf(recs); !slices.Equal(got, tc.want) {
			t.Errorf("records in [%v, %v): %v, want %v", tc.since, tc.until, got, tc.want)
		}
	}
}

// TestPrevSumNotStored: records store an empty prev_sum (the previous
// record holds that sum), and the chain still verifies through the sums:
// Open's tail check, Check and VerifyRange all link each record to the
// one before.
func TestPrevSumNotStored(t *testing.T) {
	dir := t.TempDir()
	l := openTest(t, dir)
	for i := range 3 {
		appendRec(t, l, Record{Kind: "imap.store", User: "alice", Args: json.RawMessage(fmt.Sprintf(`{"n":%d}`, i))})
	}
	l.Close()
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(dir, dbName))
	if err != nil {
		t.Fatal(err)
	}
	var stored int
	if err := db.QueryRow(`SELECT count(*) FROM records WHERE length(prev_sum) > 0`).Scan(&stored); err != nil || stored != 0 {
		t.Fatalf("%d records store a prev_sum (%v), want none", stored, err)
	}
	db.Close()
	checkClean(t, dir)
	l = openTest(t, dir) // verifies the tail's link
	if probs, err := l.VerifyRange(context.Background(), 0, 0); err != nil || len(probs) != 0 {
		t.Fatalf("VerifyRange: %v %v", probs, err)
	}
	l.Close()
	// Record 2 rewritten with its own sum recomputed against record 1:
	// record 3, whose sum covers record 2's, no longer verifies.
	forge(t, dir, 2)
	if l, err := Open(dir, testOptions(t)); !errors.Is(err, ErrCorrupt) {
		if l != nil {
			l.Close()
		}
		t.Fatalf("Open after forging record 2 (the tail's predecessor): %v, want ErrCorrupt", err)
	}
	var found []string
	Check(context.Background(), dir, func(p Problem) {
		if p.Severity == Error {
			found = append(found, p.What)
		}
	})
	if len(found) != 1 || !strings.Contains(found[0], "record 3: checksum mismatch") || !strings.Contains(found[0], "record 2") {
		t.Fatalf("Check after forging record 2: %q, want record 3 named, and record 2 as what may have changed", found)
	}
}
