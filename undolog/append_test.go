package undolog

import (
	"context"
	"database/sql"
	"path/filepath"
	"testing"
	"time"
)

// TestAppendNoSync checks that records appended without waiting for the
// fsync are committed and visible at once, share no fsync of their own,
// are made durable within SyncLag, and that HEAD only names durable ones.
func TestAppendNoSync(t *testing.T) {
	dir := t.TempDir()
	l, err := Open(dir, testOptions(t))
	if err != nil {
		t.Fatal(err)
	}
	intent := &Record{Kind: "smtp.submit"}
	if err := l.Append(context.Background(), intent); err != nil {
		t.Fatal(err)
	}
	before := l.Stats()
	for i := 0; i < 20; i++ {
		if err := l.AppendNoSync(context.Background(), &Record{Kind: KindOutcome, Ref: intent.Seq}); err != nil {
			t.Fatal(err)
		}
	}
	mid := l.Stats()
	if got := mid.Commits - before.Commits; got != 20 {
		t.Fatalf("20 sequential AppendNoSync made %d commits, want 20", got)
	}
	if mid.Fsyncs-before.Fsyncs > 2 {
		t.Fatalf("20 AppendNoSync cost %d fsyncs; they should share the deferred one", mid.Fsyncs-before.Fsyncs)
	}
	recs, err := l.Records(context.Background(), Filter{})
	if err != nil || len(recs) != 21 {
		t.Fatalf("Records = %d, %v; want 21 visible at once", len(recs), err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		seq, _, err := readHead(dir)
		if err == nil && seq == 21 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("HEAD = %d, %v after 5s; the deferred fsync did not run", seq, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	l = openTest(t, dir)
	defer l.Close()
	if seq, _ := l.Last(); seq != 21 {
		t.Fatalf("after reopen last = %d, want 21", seq)
	}
}

// TestFilterByUndoID finds records by the undo id in their arguments and
// ignores records without one.
func TestFilterByUndoID(t *testing.T) {
	l := openTest(t, t.TempDir())
	defer l.Close()
	for _, args := range []string{`{"undo_id":"A"}`, `{"other":"A"}`, ``, `{"undo_id":"B"}`, `{"undo_id":"A","x":1}`} {
		r := &Record{Kind: "smtp.submit"}
		if args != "" {
			r.Args = []byte(args)
		}
		if err := l.Append(context.Background(), r); err != nil {
			t.Fatalf("append %q: %v", args, err)
		}
	}
	recs, err := l.Records(context.Background(), Filter{UndoID: "A"})
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 2 || recs[0].Seq != 1 || recs[1].Seq != 5 {
		t.Fatalf("records with undo id A = %+v, want seqs 1 and 5", recs)
	}
}

// TestFirstByUndoID finds the first record of a kind by the undo id in its
// arguments, as Records with that filter would, and reports none found.
func TestFirstByUndoID(t *testing.T) {
	l := openTest(t, t.TempDir())
	defer l.Close()
	ref, err := storeBlob(l, []byte("message"))
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []*Record{
		{Kind: "lmtp.deliver", Args: []byte(`{"undo_id":"A"}`)},
		{Kind: "smtp.submit", Args: []byte(`{"undo_id":"B"}`)},
		{Kind: "smtp.submit", Args: []byte(`{"undo_id":"A"}`), Blob: ref.SHA256},
		{Kind: "smtp.submit", Args: []byte(`{"undo_id":"A"}`)},
	} {
		if r.Blob == "" {
			if err := l.Append(context.Background(), r); err != nil {
				t.Fatal(err)
			}
			continue
		}
		r.AttachBlob(ref)
		if err := l.Append(context.Background(), r); err != nil {
			t.Fatal(err)
		}
	}
	seq, blob, ok, err := l.FirstByUndoID(context.Background(), "A", "smtp.submit")
	if err != nil || !ok || seq != 3 || blob != ref.SHA256 {
		t.Fatalf("FirstByUndoID(A, smtp.submit) = %d %q %v %v, want record 3 and its blob", seq, blob, ok, err)
	}
	if _, _, ok, err := l.FirstByUndoID(context.Background(), "C", "smtp.submit"); ok || err != nil {
		t.Fatalf("FirstByUndoID of an unknown id: ok %v, %v", ok, err)
	}
}

// TestPageSize: a new log's database gets pageSize pages; an existing one
// keeps its own.
func TestPageSize(t *testing.T) {
	pageSizeOf := func(l *Log) int {
		var n int
		if err := l.db.QueryRow("PRAGMA page_size").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	dir := t.TempDir()
	l := openTest(t, dir)
	if err := l.Append(context.Background(), &Record{Kind: "smtp.submit"}); err != nil {
		t.Fatal(err)
	}
	if got := pageSizeOf(l); got != pageSize {
		t.Fatalf("new log: page_size %d, want %d", got, pageSize)
	}
	l.Close()
	l = openTest(t, dir)
	if got := pageSizeOf(l); got != pageSize {
		t.Fatalf("reopened log: page_size %d, want %d", got, pageSize)
	}
	l.Close()

	// A log created with SQLite's default page size keeps it.
	old := t.TempDir()
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(old, dbName)+"?_journal_mode=WAL")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec("PRAGMA page_size=4096; CREATE TABLE x(y)"); err != nil {
		t.Fatal(err)
	}
	db.Close()
	l = openTest(t, old)
	defer l.Close()
	if got := pageSizeOf(l); got != 4096 {
		t.Fatalf("existing log: page_size %d, want its own 4096", got)
	}
}
