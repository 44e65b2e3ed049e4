package undolog

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

func TestBlobRoundTripAndDedup(t *testing.T) {
	dir := t.TempDir()
	l := openTest(t, dir)
	data := []byte("From: alice@example.org\r\nSubject: twice\r\n\r\nsame body\r\n")
	a, err := storeBlob(l, data)
	if err != nil {
		t.Fatalf("storeBlob: %v", err)
	}
	sum := sha256.Sum256(data)
	if a.SHA256 != hex.EncodeToString(sum[:]) || a.Size != int64(len(data)) {
		t.Fatalf("BlobRef = %+v, want sha %x size %d", a, sum, len(data))
	}
	b, err := storeBlob(l, data)
	if err != nil {
		t.Fatalf("storeBlob again: %v", err)
	}
	if b.SHA256 != a.SHA256 || b.Size != a.Size {
		t.Fatalf("second store of identical content = %+v, want %+v", b, a)
	}
	files, _ := filepath.Glob(filepath.Join(dir, blobsName, "*", "*"))
	if len(files) != 1 || files[0] != filepath.Join(dir, blobsName, a.SHA256[:2], a.SHA256) {
		t.Fatalf("blob store holds %v, want exactly the one blob under its fan-out dir", files)
	}
	got, err := l.ReadBlob(a.SHA256)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("ReadBlob = %q, %v; want the content", got, err)
	}
	if _, err := l.OpenBlob(hex.EncodeToString(make([]byte, 32))); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("OpenBlob of an unknown blob = %v, want fs.ErrNotExist", err)
	}
}

func TestBlobAbort(t *testing.T) {
	dir := t.TempDir()
	l := openTest(t, dir)
	w, err := l.NewBlob()
	if err != nil {
		t.Fatalf("NewBlob: %v", err)
	}
	w.Write([]byte("rejected by upstream"))
	if err := w.Abort(); err != nil {
		t.Fatalf("Abort: %v", err)
	}
	left, _ := filepath.Glob(filepath.Join(dir, blobsName, "*", "*"))
	if len(left) != 0 {
		t.Fatalf("Abort left %v", left)
	}
}

func TestOpenBlobDetectsCorruption(t *testing.T) {
	dir := t.TempDir()
	l := openTest(t, dir)
	ref, err := storeBlob(l, bytes.Repeat([]byte("message line\r\n"), 1000))
	if err != nil {
		t.Fatalf("storeBlob: %v", err)
	}
	corruptFile(t, filepath.Join(dir, blobsName, ref.SHA256[:2], ref.SHA256))
	_, err = l.ReadBlob(ref.SHA256)
	var ce *ChecksumError
	if !errors.Is(err, ErrChecksumMismatch) || !errors.As(err, &ce) || ce.Blob != ref.SHA256 {
		t.Fatalf("ReadBlob of a corrupted blob = %v, want a ChecksumError for %s", err, ref.SHA256)
	}
	// Storing the same content again repairs the damaged copy.
	if _, err := storeBlob(l, bytes.Repeat([]byte("message line\r\n"), 1000)); err != nil {
		t.Fatalf("storeBlob again: %v", err)
	}
	if _, err := l.ReadBlob(ref.SHA256); err != nil {
		t.Fatalf("ReadBlob after re-storing the content: %v", err)
	}
}

// corruptFile flips one bit in the middle of a file.
func corruptFile(t *testing.T, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	b[len(b)/2] ^= 0x01
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
}

// patternReader produces n deterministic bytes without holding them.
type patternReader struct{ n, off int64 }

func (p *patternReader) Read(b []byte) (int, error) {
	if p.off >= p.n {
		return 0, io.EOF
	}
	if int64(len(b)) > p.n-p.off {
		b = b[:p.n-p.off]
	}
	for i := range b {
		b[i] = byte((p.off + int64(i)) * 7 % 251)
	}
	p.off += int64(len(b))
	return len(b), nil
}

func TestBlobStreams25MB(t *testing.T) {
	l := openTest(t, t.TempDir())
	const size = 25 << 20
	w, err := l.NewBlob()
	if err != nil {
		t.Fatalf("NewBlob: %v", err)
	}
	h := sha256.New()
	if _, err := io.Copy(io.MultiWriter(w, h), &patternReader{n: size}); err != nil {
		t.Fatalf("stream into blob: %v", err)
	}
	ref, err := w.Commit()
	if err != nil {
		t.Fatalf("Commit: %v", err)
	}
	if ref.Size != size || ref.SHA256 != hex.EncodeToString(h.Sum(nil)) {
		t.Fatalf("BlobRef = %+v, want size %d sha %x", ref, size, h.Sum(nil))
	}
	rec := appendRec(t, l, Record{Kind: "smtp.submit", Blob: ref.SHA256})
	r, err := l.OpenBlob(rec.Blob)
	if err != nil {
		t.Fatalf("OpenBlob: %v", err)
	}
	defer r.Close()
	n, err := io.Copy(io.Discard, r)
	if err != nil || n != size {
		t.Fatalf("streamed %d bytes back, %v; want %d", n, err, size)
	}
	if recs, _ := l.Records(context.Background(), Filter{}); len(recs) != 1 || recs[0].Blob != ref.SHA256 {
		t.Fatalf("record does not name the blob")
	}
}
