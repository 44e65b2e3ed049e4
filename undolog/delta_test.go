package undolog

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
)

// deltaLog opens a log with blobs up to inlineMax inline (negative: all
// files).
func deltaLog(t *testing.T, dir string, inlineMax int) *Log {
	t.Helper()
	o := testOptions(t)
	o.InlineBlobMax = inlineMax
	l, err := Open(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// appendBlob logs a record with the blob attached.
func appendBlob(t *testing.T, l *Log, kind string, ref BlobRef) *Record {
	t.Helper()
	r := &Record{Kind: kind}
	r.AttachBlob(ref)
	if err := l.Append(context.Background(), r); err != nil {
		t.Fatalf("append %s: %v", kind, err)
	}
	return r
}

func writeBlob(t *testing.T, l *Log, data []byte, base string) BlobRef {
	t.Helper()
	w, err := l.NewBlob()
	if err != nil {
		t.Fatal(err)
	}
	w.Write(data)
	var ref BlobRef
	if base == "" {
		ref, err = w.Commit()
	} else {
		ref, err = w.CommitDelta(base)
	}
	if err != nil {
		t.Fatal(err)
	}
	return ref
}

func checkNoProblems(t *testing.T, dir string) {
	t.Helper()
	var probs []string
	sum, err := Check(context.Background(), dir, func(p Problem) {
		if p.Severity != Info {
			probs = append(probs, p.What)
		}
	})
	if err != nil || sum.Errors+sum.Warnings != 0 {
		t.Fatalf("Check: %v, %s: %q", err, sum, probs)
	}
}

// TestCommitDelta stores a message as delivered (header lines added
// before the message as submitted) as those lines and a reference, reads
// it back whole through every reader, and falls back to a whole copy
// when the content does not end with the base.
func TestCommitDelta(t *testing.T) {
	for _, tc := range []struct {
		name   string
		inline int
	}{{"inline base", 0}, {"file base", -1}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			l := deltaLog(t, dir, tc.inline)
			msg := []byte("Subject: hi\r\n\r\n" + strings.Repeat("body line\r\n", 500))
			base := writeBlob(t, l, msg, "")
			appendBlob(t, l, "smtp.submit", base)

			added := []byte("Received: from x by y; Thu, 3 Dec 2026\r\nUndomail-Id: abc\r\n")
			whole := append(append([]byte(nil), added...), msg...)
			ref := writeBlob(t, l, whole, base.SHA256)
			if b, ok := ref.Delta(); !ok || b != base.SHA256 {
				t.Fatalf("CommitDelta did not store a delta of the base: %v %q", ok, b)
			}
			if ref.SHA256 != sha256hex(whole) || ref.Size != int64(len(whole)) {
				t.Fatalf("ref %s/%d does not name the whole content", ref.SHA256, ref.Size)
			}
			rc, err := l.OpenRef(ref)
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(rc)
			rc.Close()
			if err != nil || !bytes.Equal(got, whole) {
				t.Fatalf("OpenRef read %d bytes, %v; want the whole message", len(got), err)
			}
			deliver := appendBlob(t, l, "lmtp.deliver", ref)
			if got, err := l.ReadBlob(deliver.Blob); err != nil || !bytes.Equal(got, whole) {
				t.Fatalf("ReadBlob read %d bytes, %v; want the whole message", len(got), err)
			}
			var n int
			l.db.QueryRow(`SELECT count(*) FROM inline_blobs WHERE sha = ?`, ref.SHA256).Scan(&n)
			if _, err := os.Stat(l.blobPath(ref.SHA256)); n != 0 || err == nil {
				t.Fatalf("the delivered message was stored whole as well (inline rows %d, file %v)", n, err)
			}
			// A second record naming the blob without attaching it.
			if err := l.Append(context.Background(), &Record{Kind: "imap.fetch", Blob: ref.SHA256}); err != nil {
				t.Fatalf("append a record naming the delta blob: %v", err)
			}
			if probs, err := l.VerifyRange(context.Background(), 0, 0); err != nil || len(probs) != 0 {
				t.Fatalf("VerifyRange: %v %+v", err, probs)
			}
			l.Close()
			checkNoProblems(t, dir)

			// Not ending with the base: stored whole.
			l = deltaLog(t, dir, tc.inline)
			other := append(append([]byte(nil), whole...), "tail\r\n"...)
			if ref := writeBlob(t, l, other, base.SHA256); ref.delta != nil {
				t.Fatal("a blob not ending with its base was stored as a delta")
			}
			// A delta is never the base of another.
			if ref := writeBlob(t, l, append([]byte("X: y\r\n"), whole...), ref.SHA256); ref.delta != nil {
				t.Fatal("a delta was used as a base")
			}
		})
	}
}

// TestDeltaBaseDamage: a damaged base makes the delta unreadable (a
// checksum error, never other bytes) and fsck names it.
func TestDeltaBaseDamage(t *testing.T) {
	dir := t.TempDir()
	l := deltaLog(t, dir, -1)
	msg := []byte(strings.Repeat("line\r\n", 100))
	base := writeBlob(t, l, msg, "")
	appendBlob(t, l, "smtp.submit", base)
	ref := writeBlob(t, l, append([]byte("Received: x\r\n"), msg...), base.SHA256)
	appendBlob(t, l, "lmtp.deliver", ref)
	l.Close()
	bad := bytes.Replace(msg, []byte("line"), []byte("LINE"), 1)
	if err := os.WriteFile(l.blobPath(base.SHA256), bad, 0o600); err != nil {
		t.Fatal(err)
	}
	l = deltaLog(t, dir, -1)
	if _, err := l.ReadBlob(ref.SHA256); !errors.Is(err, ErrChecksumMismatch) {
		t.Fatalf("ReadBlob of a delta over a damaged base: %v, want a checksum mismatch", err)
	}
	var deltaErr bool
	Check(context.Background(), dir, func(p Problem) {
		if p.Severity == Error && p.Blob == ref.SHA256 {
			deltaErr = true
		}
	})
	if !deltaErr {
		t.Fatal("Check did not report the delta blob over a damaged base")
	}
}

// TestPruneKeepsDeltaBase: pruning the submission whose blob a kept
// delivery's delta refers to keeps that blob; pruning both removes both.
func TestPruneKeepsDeltaBase(t *testing.T) {
	dir := t.TempDir()
	l := deltaLog(t, dir, 0)
	msg := []byte(strings.Repeat("line\r\n", 100))
	base := writeBlob(t, l, msg, "")
	sub := appendBlob(t, l, "smtp.submit", base)
	whole := append([]byte("Received: x\r\n"), msg...)
	ref := writeBlob(t, l, whole, base.SHA256)
	del := appendBlob(t, l, "lmtp.deliver", ref)
	last := appendBlob(t, l, "x", BlobRef{})
	if _, err := l.Prune(context.Background(), sub.Seq+1, nil); err != nil {
		t.Fatal(err)
	}
	if got, err := l.ReadBlob(ref.SHA256); err != nil || !bytes.Equal(got, whole) {
		t.Fatalf("after pruning the submission the delivery's message reads %d bytes, %v", len(got), err)
	}
	st, err := l.Prune(context.Background(), last.Seq, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st.Blobs != 2 {
		t.Fatalf("pruning both removed %d blobs, want the delta and its base", st.Blobs)
	}
	if _, err := l.ReadBlob(base.SHA256); err == nil {
		t.Fatal("the base is still there after every record naming it or its delta was pruned")
	}
	_ = del
	l.Close()
	checkNoProblems(t, dir)
}

func sha256hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}
