package undolog

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func openInline(t *testing.T, dir string) *Log {
	t.Helper()
	o := testOptions(t)
	o.InlineBlobMax = 1024
	l, err := Open(dir, o)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return l
}

// TestInlineAndFileBlobs stores one blob under the inline limit and one
// over it: the small one lives in the database, the big one in a file, and
// both read back verified.
func TestInlineAndFileBlobs(t *testing.T) {
	dir := t.TempDir()
	l := openInline(t, dir)
	defer l.Close()
	small, big := []byte("small message\r\n"), bytes.Repeat([]byte("x"), 5000)
	var refs []BlobRef
	for _, data := range [][]byte{small, big} {
		w, err := l.NewBlob()
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < len(data); i += 700 { // several writes cross the limit
			w.Write(data[i:min(i+700, len(data))])
		}
		ref, err := w.Commit()
		if err != nil {
			t.Fatal(err)
		}
		appendBlob(t, l, "smtp.submit", ref)
		refs = append(refs, ref)
	}
	if !refs[0].Inline() || refs[1].Inline() {
		t.Fatalf("inline = %v, %v; want true for %d bytes, false for %d", refs[0].Inline(), refs[1].Inline(), len(small), len(big))
	}
	files, _ := filepath.Glob(filepath.Join(dir, blobsName, "*", "*"))
	if len(files) != 1 || filepath.Base(files[0]) != refs[1].SHA256 {
		t.Fatalf("blob files %v, want only the big blob's", files)
	}
	for i, data := range [][]byte{small, big} {
		got, err := l.ReadBlob(refs[i].SHA256)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("ReadBlob(%d) = %d bytes, %v", i, len(got), err)
		}
	}
	// A second record may name a stored inline blob without attaching it.
	appendRec(t, l, Record{Kind: "smtp.submit", Blob: refs[0].SHA256})
	if err := l.Append(context.Background(), &Record{Kind: "smtp.submit", Blob: strings.Repeat("ab", 32)}); err == nil {
		t.Fatal("Append naming an unknown blob succeeded")
	}
	sum, err := Check(context.Background(), dir, func(p Problem) { t.Errorf("clean log: %s", p) })
	if err != nil || sum.Blobs != 2 || sum.Errors != 0 {
		t.Fatalf("Check = %+v, %v; want 2 blobs, no errors", sum, err)
	}
}

// TestInlineBlobDamageDetected corrupts and deletes inline blobs behind the
// log's back: reading and Check both notice.
func TestInlineBlobDamageDetected(t *testing.T) {
	dir := t.TempDir()
	l := openInline(t, dir)
	var shas []string
	for _, body := range []string{"first\r\n", "second\r\n"} {
		w, _ := l.NewBlob()
		w.Write([]byte(body))
		ref, err := w.Commit()
		if err != nil {
			t.Fatal(err)
		}
		appendBlob(t, l, "smtp.submit", ref)
		shas = append(shas, ref.SHA256)
	}
	l.Close()
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(dir, dbName))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`UPDATE inline_blobs SET data = ? WHERE sha = ?`, []byte("tampered\r\n"), shas[0]); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`DELETE FROM inline_blobs WHERE sha = ?`, shas[1]); err != nil {
		t.Fatal(err)
	}
	db.Close()
	var problems []Problem
	sum, err := Check(context.Background(), dir, func(p Problem) { problems = append(problems, p) })
	if err != nil {
		t.Fatal(err)
	}
	var corrupted, missing bool
	for _, p := range problems {
		corrupted = corrupted || (p.Severity == Error && p.Seq == 1 && strings.Contains(p.What, "blob corrupted"))
		missing = missing || (p.Severity == Error && p.Seq == 2 && strings.Contains(p.What, "missing"))
	}
	if !corrupted || !missing || sum.Errors != 2 {
		t.Fatalf("Check found %v (%d errors); want the corrupted inline blob of record 1 and the missing one of record 2", problems, sum.Errors)
	}
	l = openInline(t, dir)
	defer l.Close()
	if _, err := l.ReadBlob(shas[0]); !errors.Is(err, ErrChecksumMismatch) {
		t.Fatalf("ReadBlob of a tampered inline blob: %v, want ErrChecksumMismatch", err)
	}
	if _, err := l.ReadBlob(shas[1]); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("ReadBlob of a deleted inline blob: %v, want not found", err)
	}
}
