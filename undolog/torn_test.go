package undolog

import (
	"context"
	"database/sql"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// TestTornTailDiscardedMiddleCorruptionReported: a record past the
// durable HEAD that fails its checksum (a write torn in a crash) is
// discarded at Open with the records after it, and the log goes on; a
// damaged record HEAD covers, deeper in the log, is found by VerifyRange
// and Check, never silently dropped.
func TestTornTailDiscardedMiddleCorruptionReported(t *testing.T) {
	dir := t.TempDir()
	l := openTest(t, dir)
	ctx := context.Background()
	for i := range 5 {
		if err := l.Append(ctx, &Record{Kind: "test", Args: []byte(fmt.Sprintf(`{"n":%d}`, i))}); err != nil {
			t.Fatal(err)
		}
	}
	head, headSum := l.Last()
	for i := range 3 {
		if err := l.AppendNoSync(ctx, &Record{Kind: "test", Args: []byte(fmt.Sprintf(`{"late":%d}`, i))}); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	// The crash: HEAD still names record 5, and record 7 was torn.
	line := fmt.Sprintf("%020d %s\n", head, hex.EncodeToString(headSum[:]))
	if err := os.WriteFile(filepath.Join(dir, headName), []byte(line), 0o644); err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("sqlite3", filepath.Join(dir, dbName))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`UPDATE records SET args = ? WHERE seq = ?`, []byte(`{"late":X}`), head+2); err != nil {
		t.Fatal(err)
	}
	db.Close()
	l = openTest(t, dir)
	if last, _ := l.Last(); last != head+1 {
		t.Fatalf("after Open the log ends at %d, want %d (the torn record %d and the one after discarded)", last, head+1, head+2)
	}
	if err := l.Append(ctx, &Record{Kind: "test", Args: []byte(`{"after":1}`)}); err != nil {
		t.Fatalf("append after discarding the torn tail: %v", err)
	}
	if probs, err := l.VerifyRange(ctx, 0, 0); err != nil || len(probs) != 0 {
		t.Fatalf("the log after discarding the torn tail: %v %v", probs, err)
	}
	l.Close()

	// Corruption in the middle: record 2, covered by HEAD.
	db, _ = sql.Open("sqlite3", filepath.Join(dir, dbName))
	if _, err := db.Exec(`UPDATE records SET args = ? WHERE seq = 2`, []byte(`{"n":9}`)); err != nil {
		t.Fatal(err)
	}
	db.Close()
	l = openTest(t, dir)
	defer l.Close()
	probs, err := l.VerifyRange(ctx, 0, 0)
	if err != nil || len(probs) == 0 || probs[0].Seq != 2 {
		t.Fatalf("VerifyRange over a damaged record 2: %v %v", probs, err)
	}
	sum, err := Check(ctx, dir, func(Problem) {})
	if err != nil || sum.Errors == 0 {
		t.Fatalf("fsck over a damaged record 2: %+v %v", sum, err)
	}
}
