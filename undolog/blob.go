package undolog

import (
	"bytes"
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// BlobRef names a committed blob. Attach it to the record that refers to
// it with Record.AttachBlob.
type BlobRef struct {
	SHA256 string // lowercase hex; the blob's name and Record.Blob
	Size   int64  // bytes

	// inline is the content of a blob small enough to live in the
	// database; it is stored with the record it is attached to, as
	// packed where that is set (pack.go).
	inline []byte
	packed []byte
	// mem is the whole content where the writer held it in memory (an
	// inline blob, or a delta of one): OpenRef reads it from here.
	mem []byte
	// delta, if set, stores the blob as a prefix and a stored base blob
	// (CommitDelta); it is stored with the record like inline.
	delta *blobDelta
}

// blobDelta is a blob stored as prefix + the content of blob base.
type blobDelta struct {
	base     string
	baseFile bool // base is a file blob: its directory entry is made durable with the record
	prefix   []byte
}

// maxDeltaPrefix bounds the bytes a delta blob stores before its base: a
// delivering server's added header lines, never a message.
const maxDeltaPrefix = 64 << 10

// Inline reports whether the blob is stored in the database with its
// record rather than as a file.
func (r BlobRef) Inline() bool { return r.inline != nil || r.delta != nil }

// Delta reports whether the blob is stored as the bytes before another
// blob (CommitDelta), and which one.
func (r BlobRef) Delta() (base string, ok bool) {
	if r.delta == nil {
		return "", false
	}
	return r.delta.base, true
}

// BlobWriter streams one blob into the store. Write hashes as it goes;
// Commit makes the blob durable under its hash, Abort discards it. A writer
// is not safe for concurrent use.
//
// A blob up to Options.InlineBlobMax stays in memory and is stored in the
// database in the same transaction as the record it is attached to; a larger
// one spills to a file in DIR/blobs/tmp and is never held whole in memory.
type BlobWriter struct {
	l    *Log
	buf  []byte   // content while it fits inline
	f    *os.File // temporary file once it does not
	h    hash.Hash
	n    int64
	err  error // first write error; Commit returns it
	done bool
}

// NewBlob starts a blob. The caller must call Commit or Abort. Errors wrap
// ErrFull or ErrUnavailable.
func (l *Log) NewBlob() (*BlobWriter, error) {
	l.mu.Lock()
	closed, failed := l.closed, l.failed
	l.mu.Unlock()
	switch {
	case closed:
		return nil, fmt.Errorf("new blob in %s: %w", l.dir, ErrClosed)
	case failed != nil:
		return nil, fmt.Errorf("new blob in %s: %w", l.dir, failed)
	}
	return &BlobWriter{l: l, buf: make([]byte, 0, 8<<10), h: sha256.New()}, nil
}

// Write appends p to the blob.
func (w *BlobWriter) Write(p []byte) (int, error) {
	if w.done {
		return 0, errors.New("write blob: writer already committed or aborted")
	}
	if w.err != nil {
		return 0, w.err
	}
	if w.f == nil && len(w.buf)+len(p) <= w.l.inline {
		w.buf = append(w.buf, p...)
		w.h.Write(p)
		w.n += int64(len(p))
		return len(p), nil
	}
	if w.f == nil {
		if err := w.spill(); err != nil {
			w.err = err
			return 0, err
		}
	}
	n, err := w.f.Write(p)
	w.h.Write(p[:n])
	w.n += int64(n)
	if err != nil {
		w.err = w.l.blobErr(fmt.Errorf("write blob %s: %w", w.f.Name(), err))
		return n, w.err
	}
	return n, nil
}

// Commit fsyncs the blob and renames it to DIR/blobs/ab/<sha256>. If a blob
// with that content already exists and verifies, it is kept and the new copy
// dropped (deduplication); a corrupt existing copy is replaced. The rename is
// made durable by the committer, which fsyncs the fan-out directory before it
// commits any record naming the blob; until then the blob may vanish in a
// crash, which is harmless because nothing refers to it yet.
func (w *BlobWriter) Commit() (BlobRef, error) {
	if w.done {
		return BlobRef{}, errors.New("commit blob: writer already committed or aborted")
	}
	if w.f == nil && w.err == nil {
		w.done = true
		return BlobRef{SHA256: hex.EncodeToString(w.h.Sum(nil)), Size: w.n, inline: w.buf, packed: pack(w.buf), mem: w.buf}, nil
	}
	w.done = true
	if w.f == nil {
		return BlobRef{}, w.err
	}
	tmp := w.f.Name()
	if w.err != nil {
		w.f.Close()
		os.Remove(tmp)
		return BlobRef{}, w.err
	}
	if err := w.f.Sync(); err != nil {
		w.f.Close()
		os.Remove(tmp)
		return BlobRef{}, w.l.blobErr(fmt.Errorf("fsync blob %s: %w", tmp, err))
	}
	if err := w.f.Close(); err != nil {
		os.Remove(tmp)
		return BlobRef{}, w.l.blobErr(fmt.Errorf("close blob %s: %w", tmp, err))
	}
	ref := BlobRef{SHA256: hex.EncodeToString(w.h.Sum(nil)), Size: w.n}
	final := w.l.blobPath(ref.SHA256)

	got, _, err := hashFile(final)
	switch {
	case err == nil && got == ref.SHA256:
		os.Remove(tmp)
		return ref, nil
	case err == nil:
		w.l.logger.Warn("existing blob corrupted, replacing it with the identical new copy", "blob", ref.SHA256, "computed", got)
	case !errors.Is(err, fs.ErrNotExist):
		os.Remove(tmp)
		return BlobRef{}, w.l.blobErr(fmt.Errorf("verify existing blob %s: %w", final, err))
	}
	if err := os.Rename(tmp, final); err != nil {
		os.Remove(tmp)
		return BlobRef{}, w.l.blobErr(fmt.Errorf("rename blob %s to %s: %w", tmp, final, err))
	}
	return ref, nil
}

// CommitDelta commits the blob like Commit, except that when its content
// ends with the whole content of the stored blob base, only the bytes
// before that (at most 64 KiB) are stored, with a reference to base: one
// copy of a message in the log whether it was logged as submitted or as
// delivered with the delivering server's header lines added. The BlobRef
// names the whole content either way, and OpenBlob and ReadBlob return it
// whole, so readers need not know. A base that is missing, is itself a
// delta, or does not match leads to a plain Commit.
func (w *BlobWriter) CommitDelta(base string) (BlobRef, error) {
	if w.done || w.err != nil || !validBlobName(base) {
		return w.Commit()
	}
	size, file, err := w.l.plainBlobSize(base)
	if err != nil || size <= 0 || size > w.n || w.n-size > maxDeltaPrefix {
		return w.Commit()
	}
	off := w.n - size
	h := sha256.New()
	var prefix []byte
	if w.f == nil {
		h.Write(w.buf[off:])
		prefix = w.buf[:off]
	} else {
		prefix = make([]byte, off)
		if _, err := w.f.ReadAt(prefix, 0); err != nil {
			return w.Commit()
		}
		if _, err := io.Copy(h, io.NewSectionReader(w.f, off, size)); err != nil {
			return w.Commit()
		}
	}
	if hex.EncodeToString(h.Sum(nil)) != base {
		return w.Commit()
	}
	w.done = true
	if w.f != nil {
		w.f.Close()
		os.Remove(w.f.Name())
	}
	// The content held in memory was hashed as it came, and its tail
	// against base's name just now.
	return BlobRef{SHA256: hex.EncodeToString(w.h.Sum(nil)), Size: w.n, mem: w.buf,
		delta: &blobDelta{base: base, baseFile: file, prefix: bytes.Clone(prefix)}}, nil
}

// plainBlobSize returns the size of a stored inline or file blob and
// whether it is a file; an error if it is not stored (or only as a delta).
func (l *Log) plainBlobSize(sha string) (int64, bool, error) {
	var n int64
	err := l.db.QueryRow(`SELECT coalesce(size, length(data)) FROM inline_blobs WHERE sha = ?`, sha).Scan(&n)
	if err == nil {
		return n, false, nil
	}
	if !errors.Is(err, sql.ErrNoRows) {
		return 0, false, err
	}
	fi, err := os.Stat(l.blobPath(sha))
	if err != nil {
		return 0, false, err
	}
	return fi.Size(), true, nil
}

// Abort discards the blob. It is a no-op after Commit or a previous Abort.
func (w *BlobWriter) Abort() error {
	if w.done {
		return nil
	}
	w.done = true
	if w.f == nil {
		return nil
	}
	w.f.Close()
	if err := os.Remove(w.f.Name()); err != nil {
		return fmt.Errorf("abort blob %s: %w", w.f.Name(), err)
	}
	return nil
}

// spill moves the in-memory content to a temporary file once the blob
// outgrows Options.InlineBlobMax.
func (w *BlobWriter) spill() error {
	f, err := os.CreateTemp(filepath.Join(w.l.dir, blobsName, tmpName), "blob-*")
	if err != nil {
		return w.l.blobErr(fmt.Errorf("create temporary blob: %w", err))
	}
	if _, err := f.Write(w.buf); err != nil {
		f.Close()
		os.Remove(f.Name())
		return w.l.blobErr(fmt.Errorf("write blob %s: %w", f.Name(), err))
	}
	w.f, w.buf = f, nil
	return nil
}

// blobStored checks that a blob a record names without attaching it (a
// second reference to a known blob) is in the store, as a file or inline.
func (l *Log) blobStored(sha string) error {
	_, ferr := os.Stat(l.blobPath(sha))
	if ferr == nil {
		return nil
	}
	var n int
	if err := l.db.QueryRow(`SELECT (SELECT count(*) FROM inline_blobs WHERE sha = ?1) + (SELECT count(*) FROM blob_deltas WHERE sha = ?1)`, sha).Scan(&n); err != nil {
		return fmt.Errorf("look up inline blob: %w", err)
	}
	if n == 0 {
		return ferr
	}
	return nil
}

// AttachBlob makes r refer to the blob. An inline blob is stored in the
// same transaction as r, so it is durable exactly when r is.
func (r *Record) AttachBlob(ref BlobRef) {
	r.Blob = ref.SHA256
	r.inline, r.packed = ref.inline, ref.packed
	r.delta = ref.delta
}

// blobErr classifies a blob store error. An I/O error fails the whole log:
// the blob store and the records share a disk, and after a failed fsync the
// state of neither is known.
func (l *Log) blobErr(err error) error {
	c := classify(err)
	if c != classFatal {
		return wrapClass(c, err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.failed == nil {
		l.failed = &FailedError{Cause: err}
		l.logger.Error("undo log failed on the blob store; refusing all appends until reopened", "err", err)
	}
	return l.failed
}

// OpenBlob opens a committed blob for streaming. The content is hashed while
// it is read; the Read that reaches the end returns an error wrapping
// ErrChecksumMismatch (a *ChecksumError) instead of io.EOF if the content
// does not hash to sha. A missing blob is an error wrapping fs.ErrNotExist.
func (l *Log) OpenBlob(sha string) (io.ReadCloser, error) {
	if !validBlobName(sha) {
		return nil, fmt.Errorf("open blob %q: not a sha256 hex name", sha)
	}
	data, ok, err := readInline(context.Background(), l.db, sha)
	switch {
	case err != nil:
		return nil, fmt.Errorf("open inline blob %s: %w", sha, err)
	case ok:
		return &blobReader{r: bytes.NewReader(data), h: sha256.New(), name: sha, where: "inline blob " + sha}, nil
	}
	var base string
	err = l.db.QueryRow(`SELECT base, prefix FROM blob_deltas WHERE sha = ?`, sha).Scan(&base, &data)
	switch {
	case err == nil:
		if base == sha || !validBlobName(base) {
			return nil, fmt.Errorf("open blob %s: stored as a delta of %q", sha, base)
		}
		br, err := l.OpenBlob(base)
		if err != nil {
			return nil, fmt.Errorf("open blob %s: its base: %w", sha, err)
		}
		return &blobReader{r: io.MultiReader(bytes.NewReader(data), br), c: br, h: sha256.New(), name: sha,
			where: "blob " + sha + " (stored as a delta of " + base + ")"}, nil
	case !errors.Is(err, sql.ErrNoRows):
		return nil, fmt.Errorf("open delta blob %s: %w", sha, err)
	}
	f, err := os.Open(l.blobPath(sha))
	if err != nil {
		return nil, fmt.Errorf("open blob %s: %w", sha, err)
	}
	return &blobReader{r: f, c: f, h: sha256.New(), name: sha, where: f.Name()}, nil
}

// OpenRef opens a blob this process has just committed. A blob the writer
// held in memory (an inline blob, or a delta of a message that fits
// inline) is read from the BlobRef's own bytes, which were hashed to its
// name, without a database round trip; a file blob is opened and verified
// like OpenBlob.
func (l *Log) OpenRef(ref BlobRef) (io.ReadCloser, error) {
	if ref.mem != nil {
		return io.NopCloser(bytes.NewReader(ref.mem)), nil
	}
	if d := ref.delta; d != nil {
		br, err := l.OpenBlob(d.base)
		if err != nil {
			return nil, fmt.Errorf("open blob %s: its base: %w", ref.SHA256, err)
		}
		return &blobReader{r: io.MultiReader(bytes.NewReader(d.prefix), br), c: br, h: sha256.New(), name: ref.SHA256,
			where: "blob " + ref.SHA256 + " (a delta of " + d.base + ")"}, nil
	}
	return l.OpenBlob(ref.SHA256)
}

// ReadBlob reads a whole blob and verifies it, see OpenBlob. Use it only for
// blobs known to be small.
func (l *Log) ReadBlob(sha string) ([]byte, error) {
	r, err := l.OpenBlob(sha)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	b, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	return b, nil
}

// blobReader verifies a blob's hash when the read reaches the end.
type blobReader struct {
	r     io.Reader
	c     io.Closer // nil for an inline blob
	h     hash.Hash
	name  string
	where string // file path or "inline blob <sha>", for errors
	err   error  // sticky final result: io.EOF or the checksum error
}

func (r *blobReader) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	n, err := r.r.Read(p)
	r.h.Write(p[:n])
	if err == io.EOF {
		if got := hex.EncodeToString(r.h.Sum(nil)); got != r.name {
			r.err = fmt.Errorf("read blob %s: %w", r.where, &ChecksumError{Blob: r.name, Stored: r.name, Computed: got})
		} else {
			r.err = io.EOF
		}
		return n, r.err
	}
	if err != nil {
		return n, fmt.Errorf("read blob %s: %w", r.where, err)
	}
	return n, nil
}

func (r *blobReader) Close() error {
	if r.c == nil {
		return nil
	}
	return r.c.Close()
}

// blobPath returns DIR/blobs/ab/abcd...; sha must be valid.
func (l *Log) blobPath(sha string) string {
	return filepath.Join(l.dir, blobsName, sha[:2], sha)
}

// validBlobName reports whether s is 64 lowercase hex digits.
func validBlobName(s string) bool { return len(s) == 64 && isLowerHex(s) }

// isLowerHex reports whether s is non-empty lowercase hex.
func isLowerHex(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range []byte(s) {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// hashFile streams a file through SHA-256.
func hashFile(path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", n, fmt.Errorf("read %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

// prepareDirs creates the directory layout, including all 256 fan-out
// directories up front: then a blob's durability only ever needs an fsync of
// its fan-out directory, never of a directory created on the fly.
func prepareDirs(dir string) error {
	_, statErr := os.Stat(dir)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("create directory: %w", err)
	}
	blobs := filepath.Join(dir, blobsName)
	newBlobs, err := mkdir(blobs)
	if err != nil {
		return err
	}
	changed := false
	subs := []string{tmpName}
	for i := range 256 {
		subs = append(subs, fmt.Sprintf("%02x", i))
	}
	for _, s := range subs {
		c, err := mkdir(filepath.Join(blobs, s))
		if err != nil {
			return err
		}
		changed = changed || c
	}
	if changed {
		if err := syncDir(blobs); err != nil {
			return err
		}
	}
	if newBlobs {
		if err := syncDir(dir); err != nil {
			return err
		}
	}
	if errors.Is(statErr, fs.ErrNotExist) {
		return syncDir(filepath.Dir(dir))
	}
	return nil
}

// mkdir creates path unless it exists and reports whether it did.
func mkdir(path string) (bool, error) {
	err := os.Mkdir(path, 0o750)
	if err == nil {
		return true, nil
	}
	if errors.Is(err, fs.ErrExist) {
		if fi, serr := os.Stat(path); serr == nil && fi.IsDir() {
			return false, nil
		}
	}
	return false, fmt.Errorf("create directory: %w", err)
}

// removeTempBlobs deletes everything in DIR/blobs/tmp: blobs that were being
// written when the process stopped and were never committed, so no record can
// refer to them.
func removeTempBlobs(dir string) (int, error) {
	tmp := filepath.Join(dir, blobsName, tmpName)
	entries, err := os.ReadDir(tmp)
	if err != nil {
		return 0, fmt.Errorf("list temporary blobs: %w", err)
	}
	for i, e := range entries {
		if err := os.RemoveAll(filepath.Join(tmp, e.Name())); err != nil {
			return i, fmt.Errorf("remove temporary blob: %w", err)
		}
	}
	return len(entries), nil
}

// probeWritable creates and removes a file in dir, so a read-only file system
// is reported by Open rather than by the first client's append.
func probeWritable(dir string) error {
	f, err := os.CreateTemp(dir, "probe-*")
	if err != nil {
		return err
	}
	name := f.Name()
	f.Close()
	return os.Remove(name)
}
