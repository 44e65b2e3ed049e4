package undolog

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// VerifyRange checks the records after < seq < before (before 0: to the
// end) before anything acts on them: each record's checksum, its link to
// the record before it, and the content of every blob they name. A replay
// must not use a range with problems (docs/architecture.md, "Binding
// rules": never replay a damaged record blindly); undomail fsck --repair mends blobs that have a copy.
func (l *Log) VerifyRange(ctx context.Context, after, before int64) ([]Problem, error) {
	var probs []Problem
	add := func(seq int64, blob, format string, args ...any) {
		probs = append(probs, Problem{Seq: seq, Blob: blob, Severity: Error, What: fmt.Sprintf(format, args...)})
	}
	base, baseSum, err := readBase(ctx, l.db)
	if err != nil {
		return nil, err
	}
	if after < base {
		add(base, "", "records 1-%d were pruned: the range from %d cannot be replayed", base, after+1)
		after = base
	}
	var prevSum [32]byte
	prevKnown := true
	if after == base {
		prevSum = baseSum
	} else if after > 0 {
		var s []byte
		err := l.db.QueryRowContext(ctx, `SELECT sum FROM records WHERE seq = ?`, after).Scan(&s)
		switch {
		case errors.Is(err, sql.ErrNoRows):
			add(after, "", "record %d, where the range starts, is missing", after)
			prevKnown = false
		case err != nil:
			return nil, fmt.Errorf("verify records after %d: %w", after, err)
		default:
			copy(prevSum[:], s)
		}
	}
	recs, err := l.Records(ctx, Filter{AfterSeq: after})
	if err != nil {
		return nil, fmt.Errorf("verify records after %d: %w", after, err)
	}
	prev := after
	blobs := map[string]int64{}
	for _, r := range recs {
		if before > 0 && r.Seq >= before {
			break
		}
		// A record stored with an empty prev_sum links to the one before
		// by its sum alone: right after a gap (reported) it cannot be
		// checked.
		checkable := !r.prevImplicit || r.Seq == prev+1 && prevKnown
		if r.prevImplicit {
			r.PrevSum = prevSum
		}
		if r.Seq != prev+1 {
			add(prev+1, "", "%s missing: gap in the log", seqRange(prev+1, r.Seq-1))
		} else if prev > 0 && r.PrevSum != prevSum {
			add(r.Seq, "", "record %d does not link to record %d: chain broken", r.Seq, prev)
		}
		if checkable && r.computeSum() != r.Sum {
			add(r.Seq, "", "record %d: checksum mismatch: its content changed after it was written", r.Seq)
		}
		prevKnown = true
		if r.Blob != "" {
			if _, ok := blobs[r.Blob]; !ok {
				blobs[r.Blob] = r.Seq
			}
		}
		prev, prevSum = r.Seq, r.Sum
	}
	for sha, seq := range blobs {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		rd, err := l.OpenBlob(sha)
		if err != nil {
			add(seq, sha, "blob %s of record %d: %v", sha, seq, err)
			continue
		}
		_, err = io.Copy(io.Discard, rd)
		rd.Close()
		if err != nil {
			add(seq, sha, "blob %s of record %d: %v", sha, seq, err)
		}
	}
	return probs, nil
}

// RepairBlob writes data as blob sha in the log at dir, replacing a
// damaged or missing copy, but only if data hashes to sha: a
// content-addressed blob can be mended from any copy of the message and
// never from a wrong one. An inline blob is updated in the database, a
// file blob replaced atomically.
func RepairBlob(ctx context.Context, dir, sha string, data []byte) error {
	if !validBlobName(sha) {
		return fmt.Errorf("repair blob %q: not a sha256 hex name", sha)
	}
	sum := sha256.Sum256(data)
	if got := hex.EncodeToString(sum[:]); got != sha {
		return fmt.Errorf("repair blob %s: the copy hashes to %s", sha, got)
	}
	db, err := sql.Open("sqlite3", "file:"+escapeDSNPath(filepath.Join(dir, dbName))+"?_busy_timeout=5000")
	if err != nil {
		return fmt.Errorf("repair blob %s: %w", sha, err)
	}
	defer db.Close()
	// The repaired copy is stored plain; a log before schema version 5
	// has no codec column (and only plain inline blobs).
	q := `UPDATE inline_blobs SET data = ?, codec = 0, size = NULL WHERE sha = ?`
	var cols int
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM pragma_table_info('inline_blobs') WHERE name = 'codec'`).Scan(&cols); err == nil && cols == 0 {
		q = `UPDATE inline_blobs SET data = ? WHERE sha = ?`
	}
	res, err := db.ExecContext(ctx, q, data, sha)
	if err != nil {
		return fmt.Errorf("repair inline blob %s: %w", sha, err)
	}
	if n, _ := res.RowsAffected(); n > 0 {
		return nil
	}
	path := filepath.Join(dir, blobsName, sha[:2], sha)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("repair blob %s: %w", sha, err)
	}
	tmp := path + ".repair"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("repair blob %s: %w", sha, err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = syncDir(filepath.Dir(path))
	}
	if err == nil {
		// A blob stored as a delta (CommitDelta) is whole in its file
		// now; the delta, which OpenBlob would read first, goes.
		var n int
		if db.QueryRowContext(ctx, `SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'blob_deltas'`).Scan(&n); n > 0 {
			_, err = db.ExecContext(ctx, `DELETE FROM blob_deltas WHERE sha = ?`, sha)
		}
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("repair blob %s: %w", sha, err)
	}
	return nil
}
