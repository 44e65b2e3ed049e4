package undolog

import (
	"bytes"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/base64"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
)

// mailText is a message of about n bytes that DEFLATE shrinks the way it
// shrinks mail: header fields and a text part.
func mailText(n int) []byte {
	var b bytes.Buffer
	b.WriteString("From: a@example.test\r\nTo: b@example.test\r\nSubject: the quarterly figures\r\n\r\n")
	for i := 0; b.Len() < n; i++ {
		fmt.Fprintf(&b, "Line %d of the report: revenue in region %d grew while costs in region %d fell.\r\n", i, i%7, i%5)
	}
	return b.Bytes()
}

// TestInlineBlobsCompressed stores a text message, which is kept
// compressed in inline_blobs, and an attachment of random bytes, which is
// not worth compressing and is kept plain. Both read back whole and
// verified, through the BlobRef, OpenBlob and Check; and the compressed
// one serves as a delta's base.
func TestInlineBlobsCompressed(t *testing.T) {
	dir := t.TempDir()
	open := func() *Log {
		o := testOptions(t)
		o.InlineBlobMax = 0 // the default
		l, err := Open(dir, o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		return l
	}
	l := open()
	raw := make([]byte, 3000)
	rand.Read(raw)
	// Random bytes (a binary MIME part, already compressed data) do not
	// compress; a base64 attachment does, by about a quarter.
	text, random, b64 := mailText(4000), raw, []byte(base64.StdEncoding.EncodeToString(raw))
	var refs []BlobRef
	for _, data := range [][]byte{text, random, b64} {
		ref, err := storeBlob(l, data)
		if err != nil {
			t.Fatal(err)
		}
		appendBlob(t, l, "smtp.submit", ref)
		refs = append(refs, ref)
	}
	// The delivered copy: header lines before the submitted message.
	delivered := append([]byte("Received: from mx\r\n"), text...)
	w, _ := l.NewBlob()
	w.Write(delivered)
	dref, err := w.CommitDelta(refs[0].SHA256)
	if base, ok := dref.Delta(); err != nil || !ok || base != refs[0].SHA256 {
		t.Fatalf("CommitDelta on a compressed base: %v, delta %v", err, ok)
	}
	appendBlob(t, l, "lmtp.deliver", dref)
	l.Close()

	db, err := sql.Open("sqlite3", "file:"+filepath.Join(dir, dbName))
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []struct {
		codec int
		name  string
	}{{codecDeflate, "text"}, {codecPlain, "random"}, {codecDeflate, "base64"}} {
		var codec, stored int
		var size sql.NullInt64
		if err := db.QueryRow(`SELECT codec, length(data), size FROM inline_blobs WHERE sha = ?`, refs[i].SHA256).Scan(&codec, &stored, &size); err != nil {
			t.Fatal(err)
		}
		t.Logf("%s blob: %d bytes stored as %d (codec %d)", want.name, refs[i].Size, stored, codec)
		if codec != want.codec {
			t.Errorf("%s blob stored with codec %d, want %d", want.name, codec, want.codec)
		}
		if codec == codecDeflate && (stored > int(refs[i].Size)*4/5 || !size.Valid || size.Int64 != refs[i].Size) {
			t.Errorf("%s blob: %d bytes stored as %d, size column %v", want.name, refs[i].Size, stored, size)
		}
	}
	db.Close()

	l = open()
	for i, data := range [][]byte{text, random, b64, delivered} {
		sha := dref.SHA256
		if i < len(refs) {
			sha = refs[i].SHA256
		}
		got, err := l.ReadBlob(sha)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("ReadBlob(%d) = %d bytes, %v; want %d bytes", i, len(got), err, len(data))
		}
	}
	l.Close()
	checkClean(t, dir)

	// Damage the compressed bytes: reading and Check both notice, and so
	// does the delta built on it.
	tamper(t, dir, `UPDATE inline_blobs SET data = substr(data, 1, 40) || x'00ff00ff' || substr(data, 45) WHERE sha = ?`, refs[0].SHA256)
	var problems []string
	if _, err := Check(context.Background(), dir, func(p Problem) {
		if p.Severity == Error {
			problems = append(problems, p.What)
		}
	}); err != nil {
		t.Fatal(err)
	}
	all := strings.Join(problems, "\n")
	if !strings.Contains(all, "inline blob "+refs[0].SHA256) || !strings.Contains(all, "blob corrupted") || !strings.Contains(all, "delta blob") {
		t.Fatalf("Check after damaging a compressed blob found:\n%s\nwant the blob and the delta on it named", all)
	}
	l = open()
	defer l.Close()
	if _, err := l.ReadBlob(refs[0].SHA256); err == nil {
		t.Fatal("ReadBlob of a damaged compressed blob succeeded")
	}
	if _, err := l.ReadBlob(dref.SHA256); err == nil {
		t.Fatal("ReadBlob of a delta on a damaged compressed blob succeeded")
	}
	// Mended from a good copy, it is stored plain and reads back.
	if err := RepairBlob(context.Background(), dir, refs[0].SHA256, text); err != nil {
		t.Fatal(err)
	}
	if got, err := l.ReadBlob(dref.SHA256); err != nil || !bytes.Equal(got, delivered) {
		t.Fatalf("after RepairBlob, ReadBlob of the delta: %d bytes, %v", len(got), err)
	}
}
