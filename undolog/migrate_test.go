package undolog

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

func itoa(i int) string { return strconv.Itoa(i) }

// fixtureRecord is a record as testdata/v1/records.json lists it: what the
// first undo log code (commit 5f5be7c) returned from Records for the log
// it wrote into testdata/v1/log (see testdata/v1/gen/main.go).
type fixtureRecord struct {
	Seq                 int64
	Time                time.Time
	User, Session, Kind string
	Ref                 int64
	Blob                string
	Users               []string
	Args, Outcome       string
	PrevSum, Sum        string
}

// materializeV1 builds the v1 fixture log in a new directory.
func materializeV1(t *testing.T) string { return materialize(t, "v1") }

// materialize builds a fixture log (testdata/<version>/log) in a new
// directory: the SQL dump executed into undo.db, HEAD and the blob files
// copied as they were.
func materialize(t *testing.T, version string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "undo")
	src := filepath.Join("testdata", version, "log")
	err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dir, rel), 0o755)
		}
		if rel == "undo.sql" {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dir, rel), b, 0o644)
	})
	if err != nil {
		t.Fatalf("copy %s fixture: %v", version, err)
	}
	dump, err := os.ReadFile(filepath.Join(src, "undo.sql"))
	if err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(dir, dbName))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec(string(dump)); err != nil {
		t.Fatalf("load %s dump: %v", version, err)
	}
	return dir
}

func readV1Records(t *testing.T) []fixtureRecord { return readFixtureRecords(t, "v1") }

// readFixtureRecords returns what the fixture's own code read back from it.
func readFixtureRecords(t *testing.T, version string) []fixtureRecord {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", version, "records.json"))
	if err != nil {
		t.Fatal(err)
	}
	var want []fixtureRecord
	if err := json.Unmarshal(b, &want); err != nil {
		t.Fatalf("parse records.json: %v", err)
	}
	if len(want) == 0 {
		t.Fatal("records.json lists no records")
	}
	return want
}

func userVersion(t *testing.T, dir string) int {
	t.Helper()
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(dir, dbName)+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var v int
	if err := db.QueryRow("PRAGMA user_version").Scan(&v); err != nil {
		t.Fatal(err)
	}
	return v
}

// TestMigrateFromV1 opens a log written by the first undo log code with
// today's: every record comes back field for field with its original sum,
// the hash chain verifies, the blobs read back, the migrated indexes serve
// their queries, and new records continue the same chain.
func TestMigrateFromV1(t *testing.T) {
	dir := materializeV1(t)
	want := readV1Records(t)
	ctx := context.Background()

	// Before the upgrade: fsck of the old log by the new binary finds it
	// whole and says it will be migrated.
	var notes []string
	sum, err := Check(ctx, dir, func(p Problem) { notes = append(notes, p.String()) })
	if err != nil || !sum.OK() {
		t.Fatalf("Check of the v1 log before migration: %v %v\n%s", sum, err, strings.Join(notes, "\n"))
	}
	if !strings.Contains(strings.Join(notes, "\n"), "schema version 1; undomail serve migrates it") {
		t.Fatalf("Check does not say the log will be migrated:\n%s", strings.Join(notes, "\n"))
	}
	if _, err := OpenReadOnly(dir); err == nil || !strings.Contains(err.Error(), "start undomail serve with this release once") {
		t.Fatalf("OpenReadOnly of an unmigrated log: %v, want a refusal that says how to migrate", err)
	}

	l := openInline(t, dir) // inline blobs are new in schema version 2
	defer l.Close()
	if v := userVersion(t, dir); v != schemaVersion {
		t.Fatalf("user_version after Open = %d, want %d", v, schemaVersion)
	}
	sameRecords(t, l, want)

	// The index migration 3 built serves the undo-id lookup replay uses;
	// the user index from v1 still files every record under its users.
	byID, err := l.Records(ctx, Filter{UndoID: "01KEAAAAAAAAAAAAAAAAAAAAAA"})
	if err != nil {
		t.Fatal(err)
	}
	var wantByID []int64
	for _, w := range want {
		if strings.Contains(w.Args, `"undo_id":"01KEAAAAAAAAAAAAAAAAAAAAAA"`) {
			wantByID = append(wantByID, w.Seq)
		}
	}
	if len(wantByID) == 0 || !slices.Equal(seqsOf(byID), wantByID) {
		t.Fatalf("records by undo id: %v, want %v", seqsOf(byID), wantByID)
	}
	verbs, err := l.Verbs(ctx, Filter{User: "dave@example.test"})
	if err != nil {
		t.Fatal(err)
	}
	var wantDave []int64
	for _, w := range want {
		if w.Kind != KindOutcome && (w.User == "dave@example.test" || slices.Contains(w.Users, "dave@example.test")) {
			wantDave = append(wantDave, w.Seq)
		}
	}
	if !slices.Equal(seqsOfVerbs(verbs), wantDave) {
		t.Fatalf("dave's verbs after migration: %v, want %v", seqsOfVerbs(verbs), wantDave)
	}

	// The chain goes on from the v1 tail, with inline blobs (new in v2).
	ref, err := storeBlob(l, []byte("after the upgrade"))
	if err != nil {
		t.Fatal(err)
	}
	if !ref.Inline() {
		t.Fatal("a small blob after the migration was not stored inline")
	}
	r := Record{User: "alice@example.test", Kind: "imap.append", Users: []string{"alice@example.test"}, Args: json.RawMessage(`{"mailbox":"INBOX"}`)}
	r.AttachBlob(ref)
	r = appendRec(t, l, r)
	if r.Seq != want[len(want)-1].Seq+1 || hex.EncodeToString(r.PrevSum[:]) != want[len(want)-1].Sum {
		t.Fatalf("first record after migration: seq %d prev %x, want seq %d prev %s", r.Seq, r.PrevSum, want[len(want)-1].Seq+1, want[len(want)-1].Sum)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	checkClean(t, dir)

	// Opening again is not a second migration, and read-only opens work.
	l2 := openTest(t, dir)
	if got, _ := l2.Last(); got != r.Seq {
		t.Fatalf("after reopening, last record is %d, want %d", got, r.Seq)
	}
	l2.Close()
	ro, err := OpenReadOnly(dir)
	if err != nil {
		t.Fatalf("OpenReadOnly after migration: %v", err)
	}
	ro.Close()
}

// TestNewerSchemaRefused: a log from a later undomail (higher
// user_version) is refused by Open, OpenReadOnly and Check with an error
// that says so, and nothing in it changes.
func TestNewerSchemaRefused(t *testing.T) {
	dir := t.TempDir()
	l := openTest(t, dir)
	ref, err := storeBlob(l, []byte("a message"))
	if err != nil {
		t.Fatal(err)
	}
	rec := Record{User: "alice", Kind: "smtp.submit", Users: []string{"alice"}}
	rec.AttachBlob(ref)
	appendRec(t, l, rec)
	appendRec(t, l, Record{Kind: KindOutcome, Ref: 1, Outcome: json.RawMessage(`{"code":250}`)})
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	newer := schemaVersion + 1
	tamper(t, dir, "PRAGMA user_version = "+itoa(newer))
	before := snapshotFiles(t, dir)

	_, err = Open(dir, testOptions(t))
	var se *SchemaError
	if !errors.Is(err, ErrSchemaTooNew) || !errors.As(err, &se) || se.Found != newer || se.Known != schemaVersion {
		t.Fatalf("Open of a log with schema %d: %v, want a SchemaError", newer, err)
	}
	for _, want := range []string{dir, "schema version " + itoa(newer) + " is newer than this undomail knows", "not changed"} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("Open error %q does not say %q", err, want)
		}
	}
	if _, err := OpenReadOnly(dir); !errors.Is(err, ErrSchemaTooNew) {
		t.Fatalf("OpenReadOnly of a newer log: %v, want ErrSchemaTooNew", err)
	}
	var problems []string
	sum, err := Check(context.Background(), dir, func(p Problem) { problems = append(problems, p.String()) })
	if err != nil || sum.OK() || !strings.Contains(strings.Join(problems, "\n"), "is newer than this undomail knows") {
		t.Fatalf("Check of a newer log: %v %v %v", sum, err, problems)
	}

	after := snapshotFiles(t, dir)
	for name, s := range before {
		if after[name] != s {
			t.Errorf("%s changed although the log was refused", name)
		}
	}
	if v := userVersion(t, dir); v != newer {
		t.Fatalf("user_version is %d after the refusal, want %d untouched", v, newer)
	}
	// And the records are all still there for the binary that knows them.
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(dir, dbName)+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var n int
	if err := db.QueryRow("SELECT count(*) FROM records").Scan(&n); err != nil || n != 2 {
		t.Fatalf("records after the refusal: %d (%v), want 2", n, err)
	}
}

// TestOldBinaryRefusesMigratedLog: binaries from before versioned
// migrations accept only meta.schema_version "1"; a migrated log must say
// its real version there so they refuse it rather than write into it.
func TestOldBinaryRefusesMigratedLog(t *testing.T) {
	dir := t.TempDir()
	l := openTest(t, dir)
	l.Close()
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(dir, dbName)+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var v string
	if err := db.QueryRow(`SELECT value FROM meta WHERE key = 'schema_version'`).Scan(&v); err != nil {
		t.Fatal(err)
	}
	if v != itoa(schemaVersion) {
		t.Fatalf("meta.schema_version = %q, want %d (what user_version says)", v, schemaVersion)
	}
}

// TestMigrationsAreOrdered guards the list future migrations are added to.
func TestMigrationsAreOrdered(t *testing.T) {
	for i, m := range migrations {
		if m.version != i+1 || m.what == "" || strings.TrimSpace(m.sql) == "" {
			t.Fatalf("migration %d: version %d, what %q: migrations must be numbered 1, 2, 3, ... and say what they do", i, m.version, m.what)
		}
	}
}

// TestCheckUnversionedLogWithInlineBlobs: logs written after inline blobs
// came but before versioning say schema version 1 (user_version 0) and do
// hold inline blobs; fsck must still verify them before the migration.
func TestCheckUnversionedLogWithInlineBlobs(t *testing.T) {
	dir := t.TempDir()
	l := openInline(t, dir)
	ref, err := storeBlob(l, []byte("a small message"))
	if err != nil {
		t.Fatal(err)
	}
	if !ref.Inline() {
		t.Fatal("blob not inline")
	}
	rec := Record{User: "alice", Kind: "lmtp.deliver", Users: []string{"alice"}}
	rec.AttachBlob(ref)
	appendRec(t, l, rec)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	// What the binaries before versioning left: user_version 0, meta 1.
	tamper(t, dir, "PRAGMA user_version = 0")
	tamper(t, dir, "UPDATE meta SET value = '1' WHERE key = 'schema_version'")
	checkClean(t, dir)
	// A damaged inline blob in such a log is found.
	tamper(t, dir, "UPDATE inline_blobs SET data = ?", []byte("a small messagE"))
	sum, err := Check(context.Background(), dir, nil)
	if err != nil || sum.OK() {
		t.Fatalf("Check of an unversioned log with a damaged inline blob: %v %v", sum, err)
	}
}

// sameRecords checks that l holds exactly the fixture's records, field for
// field with their stored sums, that today's code computes the same sums,
// and that every blob they name reads back under its name.
func sameRecords(t *testing.T, l *Log, want []fixtureRecord) {
	t.Helper()
	got, err := l.Records(context.Background(), Filter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("%d records after migration, the old log had %d", len(got), len(want))
	}
	for i, w := range want {
		g := got[i]
		users := w.Users
		if users == nil {
			users = []string{}
		}
		gu := g.Users
		if gu == nil {
			gu = []string{}
		}
		if g.Seq != w.Seq || !g.Time.Equal(w.Time) || g.User != w.User || g.Session != w.Session || g.Kind != w.Kind ||
			g.Ref != w.Ref || g.Blob != w.Blob || !slices.Equal(gu, users) || string(g.Args) != w.Args ||
			string(g.Outcome) != w.Outcome || hex.EncodeToString(g.PrevSum[:]) != w.PrevSum || hex.EncodeToString(g.Sum[:]) != w.Sum {
			t.Errorf("record %d changed in migration:\n got %+v\nwant %+v", w.Seq, g, w)
		}
		if c := g.computeSum(); hex.EncodeToString(c[:]) != w.Sum {
			t.Errorf("record %d: today's code computes sum %x, the old code stored %s", w.Seq, c, w.Sum)
		}
		if w.Blob != "" {
			b, err := l.ReadBlob(w.Blob)
			if err != nil {
				t.Errorf("record %d: blob %s: %v", w.Seq, w.Blob, err)
			} else if s := sha256.Sum256(b); hex.EncodeToString(s[:]) != w.Blob {
				t.Errorf("record %d: blob reads back as %x", w.Seq, s)
			}
		}
	}
}

// TestMigrateFromV4 opens a log written by the schema version 4 code
// (f88d349: inline blobs plain in a WITHOUT ROWID table, a delta blob on
// one of them, a file blob, stored prev_sums, a time index) with today's:
// the records come back with their sums, every blob reads back as the old
// code stored it (checked against the fixture's own copy of the bytes),
// and new records, stored without prev_sum and with compressed blobs,
// continue the chain, which Check, VerifyRange and a reopen verify.
func TestMigrateFromV4(t *testing.T) {
	dir := materialize(t, "v4")
	want := readFixtureRecords(t, "v4")
	ctx := context.Background()
	var notes []string
	if sum, err := Check(ctx, dir, func(p Problem) { notes = append(notes, p.String()) }); err != nil || !sum.OK() {
		t.Fatalf("Check of the v4 log before migration: %v %v\n%s", sum, err, strings.Join(notes, "\n"))
	}
	if !strings.Contains(strings.Join(notes, "\n"), "schema version 4; undomail serve migrates it") {
		t.Fatalf("Check does not say the log will be migrated:\n%s", strings.Join(notes, "\n"))
	}
	b, err := os.ReadFile(filepath.Join("testdata", "v4", "blobs.json"))
	if err != nil {
		t.Fatal(err)
	}
	var blobs map[string]string
	if err := json.Unmarshal(b, &blobs); err != nil || len(blobs) != 3 {
		t.Fatalf("blobs.json: %d blobs, %v", len(blobs), err)
	}

	o := testOptions(t)
	o.InlineBlobMax = 3000 // as the fixture was written
	l, err := Open(dir, o)
	if err != nil {
		t.Fatalf("Open of the v4 log: %v", err)
	}
	defer l.Close()
	if v := userVersion(t, dir); v != schemaVersion {
		t.Fatalf("user_version after Open = %d, want %d", v, schemaVersion)
	}
	sameRecords(t, l, want)
	for sha, content := range blobs {
		got, err := l.ReadBlob(sha)
		if err != nil || string(got) != content {
			t.Errorf("blob %.12s after migration: %d bytes (%v), the old code stored %d", sha, len(got), err, len(content))
		}
	}
	// The delivery's delta and its base, plain in the old table, moved.
	var plain, deltas int
	l.db.QueryRow(`SELECT (SELECT count(*) FROM inline_blobs WHERE codec = 0), (SELECT count(*) FROM blob_deltas)`).Scan(&plain, &deltas)
	if plain != 1 || deltas != 1 {
		t.Fatalf("after migration: %d plain inline blobs and %d deltas, want 1 and 1", plain, deltas)
	}

	// New records go on from the v4 tail: a compressed blob, a delta on
	// the migrated base, an outcome, with an earlier clock than the tail.
	last := want[len(want)-1]
	text := mailText(2500)
	ref, err := storeBlob(l, text)
	if err != nil {
		t.Fatal(err)
	}
	r := appendBlob(t, l, "smtp.submit", ref)
	if hex.EncodeToString(r.PrevSum[:]) != last.Sum || !r.Time.After(last.Time) {
		t.Fatalf("first record after migration: prev %x time %v; want prev %s, after %v", r.PrevSum, r.Time, last.Sum, last.Time)
	}
	var base string
	for sha, content := range blobs {
		if strings.HasPrefix(content, "From: bob") {
			base = sha
		}
	}
	w, _ := l.NewBlob()
	w.Write([]byte("Received: again\r\n" + blobs[base]))
	dref, err := w.CommitDelta(base)
	if _, ok := dref.Delta(); err != nil || !ok {
		t.Fatalf("a delta on a migrated blob: %v, delta %v", err, ok)
	}
	appendBlob(t, l, "lmtp.deliver", dref)
	appendRec(t, l, Record{Kind: KindOutcome, Ref: r.Seq, Outcome: json.RawMessage(`{"reply":{"code":250}}`), Time: last.Time.Add(-time.Hour)})
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	checkClean(t, dir)
	l2, err := Open(dir, o)
	if err != nil {
		t.Fatalf("reopen after migration and appends: %v", err)
	}
	defer l2.Close()
	if probs, err := l2.VerifyRange(ctx, 0, 0); err != nil || len(probs) != 0 {
		t.Fatalf("VerifyRange over old and new records: %v %v", probs, err)
	}
	if got, err := l2.ReadBlob(dref.SHA256); err != nil || string(got) != "Received: again\r\n"+blobs[base] {
		t.Fatalf("the new delta reads back %d bytes, %v", len(got), err)
	}
	// Time bounds over the old records and the new ones find both.
	recs, err := l2.Records(ctx, Filter{Since: last.Time})
	if err != nil || len(recs) != 4 || recs[0].Seq != last.Seq {
		t.Fatalf("records since the v4 tail's time: %v %v, want the tail and the 3 new ones", seqsOf(recs), err)
	}
}
