package undolog

import (
	"compress/gzip"
	"context"
	"database/sql"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
)

// The log's base: after a prune, the records up to base_seq are gone and
// the chain starts from base_sum, the sum of the last pruned record. Both
// live in meta; a log never pruned has neither.
const (
	metaBaseSeq = "base_seq"
	metaBaseSum = "base_sum"
)

type queryer interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// readBase returns the log's base (0 and zeros: never pruned).
func readBase(ctx context.Context, db queryer) (int64, [32]byte, error) {
	var sum [32]byte
	var seqText, sumText string
	err := db.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = ?`, metaBaseSeq).Scan(&seqText)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, sum, nil
	}
	if err != nil {
		return 0, sum, fmt.Errorf("read the log's base: %w", err)
	}
	if err := db.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = ?`, metaBaseSum).Scan(&sumText); err != nil {
		return 0, sum, fmt.Errorf("read the log's base sum: %w", err)
	}
	seq, err := strconv.ParseInt(seqText, 10, 64)
	b, herr := hex.DecodeString(sumText)
	if err != nil || herr != nil || len(b) != 32 {
		return 0, sum, fmt.Errorf("the log's base is unreadable: %q %q", seqText, sumText)
	}
	copy(sum[:], b)
	return seq, sum, nil
}

// Base returns the sequence number of the last pruned record: the log
// holds the records after it (0: nothing was ever pruned).
func (l *Log) Base(ctx context.Context) (int64, error) {
	seq, _, err := readBase(ctx, l.db)
	return seq, err
}

// PruneStats says what a prune removed.
type PruneStats struct {
	Base    int64 `json:"base"`    // the log now starts after this record
	Records int64 `json:"records"` // records removed
	Blobs   int   `json:"blobs"`   // blobs no remaining record names, removed
	Bytes   int64 `json:"bytes"`   // their size
}

// archiveLine is one line of a prune's archive (gzip'd JSON lines): a
// record, or the content of a blob only pruned records named.
type archiveLine struct {
	Record *Record `json:"record,omitempty"`
	Blob   string  `json:"blob,omitempty"`
	Data   string  `json:"data,omitempty"` // base64
}

// Prune removes the records before seq `before` (and the blobs only they
// name), after writing them to archive (gzip'd JSON lines; nil: no
// archive). The chain goes on from the last removed record's sum, kept
// as the log's base, so fsck and VerifyRange still check every record
// that remains. It runs beside appends, in short transactions. A prune
// interrupted by a crash is finished by running it again; records at or
// below the base are ignored meanwhile.
func (l *Log) Prune(ctx context.Context, before int64, archive io.Writer) (PruneStats, error) {
	base, baseSum, err := readBase(ctx, l.db)
	if err != nil {
		return PruneStats{}, err
	}
	st := PruneStats{Base: base}
	head, _ := l.Last()
	if before > head {
		// The last record always stays: the chain goes on from it.
		return st, fmt.Errorf("prune before %d: the log ends at %d and its last record stays", before, head)
	}
	newBase := before - 1
	if newBase < base {
		newBase = base
	}
	var newSum []byte
	if newBase > base {
		if err := l.db.QueryRowContext(ctx, `SELECT sum FROM records WHERE seq = ?`, newBase).Scan(&newSum); err != nil {
			return st, fmt.Errorf("prune before %d: read record %d: %w", before, newBase, err)
		}
	}
	// Blobs the remaining records still name stay.
	keep := map[string]bool{}
	rows, err := l.db.QueryContext(ctx, `SELECT DISTINCT blob FROM records WHERE seq > ? AND blob != ''`, newBase)
	if err != nil {
		return st, fmt.Errorf("prune: list blobs in use: %w", err)
	}
	for rows.Next() {
		var b string
		rows.Scan(&b)
		keep[b] = true
	}
	rows.Close()
	// So do the bases of the delta blobs among them (CommitDelta).
	rows, err = l.db.QueryContext(ctx, `SELECT DISTINCT d.base FROM blob_deltas d JOIN records r ON r.blob = d.sha WHERE r.seq > ?`, newBase)
	if err != nil {
		return st, fmt.Errorf("prune: list the bases of delta blobs in use: %w", err)
	}
	for rows.Next() {
		var b string
		rows.Scan(&b)
		keep[b] = true
	}
	rows.Close()
	// The archive first: nothing is removed that is not written there.
	drop := map[string]bool{}
	var gz *gzip.Writer
	var enc *json.Encoder
	if archive != nil {
		gz = gzip.NewWriter(archive)
		enc = json.NewEncoder(gz)
	}
	rows, err = l.db.QueryContext(ctx, `SELECT `+recordCols+` FROM records r WHERE r.seq > ? AND r.seq <= ? ORDER BY r.seq`, base, newBase)
	if err != nil {
		return st, fmt.Errorf("prune: read records: %w", err)
	}
	prevSum := baseSum
	for rows.Next() {
		var r Record
		sc := scanInto(&r)
		if err := rows.Scan(sc.dest()...); err != nil {
			rows.Close()
			return st, fmt.Errorf("prune: read records: %w", err)
		}
		sc.finish()
		if r.prevImplicit {
			// The archive holds each record whole, its link included.
			r.PrevSum = prevSum
		}
		prevSum = r.Sum
		if r.Blob != "" && !keep[r.Blob] && !drop[r.Blob] {
			drop[r.Blob] = true
			if enc != nil {
				data, err := l.ReadBlob(r.Blob)
				if err != nil {
					rows.Close()
					return st, fmt.Errorf("prune: archive blob %s of record %d: %w", r.Blob, r.Seq, err)
				}
				if err := enc.Encode(archiveLine{Blob: r.Blob, Data: base64.StdEncoding.EncodeToString(data)}); err != nil {
					rows.Close()
					return st, fmt.Errorf("prune: write archive: %w", err)
				}
			}
		}
		if enc != nil {
			if err := enc.Encode(archiveLine{Record: &r}); err != nil {
				rows.Close()
				return st, fmt.Errorf("prune: write archive: %w", err)
			}
		}
	}
	rows.Close()
	if gz != nil {
		if err := gz.Close(); err != nil {
			return st, fmt.Errorf("prune: write archive: %w", err)
		}
		if f, ok := archive.(*os.File); ok {
			if err := f.Sync(); err != nil {
				return st, fmt.Errorf("prune: sync archive: %w", err)
			}
		}
	}
	if newBase > base {
		tx, err := l.db.BeginTx(ctx, nil)
		if err != nil {
			return st, fmt.Errorf("prune: %w", err)
		}
		_, err = tx.ExecContext(ctx, `INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?), (?, ?)`,
			metaBaseSeq, strconv.FormatInt(newBase, 10), metaBaseSum, hex.EncodeToString(newSum))
		if err == nil {
			err = tx.Commit()
		} else {
			tx.Rollback()
		}
		if err != nil {
			return st, fmt.Errorf("prune: record the new base: %w", err)
		}
	}
	st.Base = newBase
	// A dropped delta blob's base goes too unless something kept needs it
	// (its submission may have been pruned before).
	for sha := range drop {
		var b string
		if err := l.db.QueryRowContext(ctx, `SELECT base FROM blob_deltas WHERE sha = ?`, sha).Scan(&b); err == nil && !keep[b] {
			drop[b] = true
		}
	}
	// Remove in batches, so appends never wait long for the write lock.
	for {
		res, err := l.db.ExecContext(ctx, `DELETE FROM records WHERE seq IN (SELECT seq FROM records WHERE seq <= ? ORDER BY seq LIMIT 2000)`, newBase)
		if err != nil {
			return st, fmt.Errorf("prune: remove records: %w", err)
		}
		n, _ := res.RowsAffected()
		st.Records += n
		if n == 0 {
			break
		}
	}
	if _, err := l.db.ExecContext(ctx, `DELETE FROM record_users WHERE seq <= ?`, newBase); err != nil {
		return st, fmt.Errorf("prune: remove index entries: %w", err)
	}
	for sha := range drop {
		var size int64
		if keep[sha] { // a base still in use by a kept delta
			continue
		}
		res, err := l.db.ExecContext(ctx, `DELETE FROM blob_deltas WHERE sha = ?`, sha)
		if err == nil {
			if n, _ := res.RowsAffected(); n > 0 {
				st.Blobs++
				continue
			}
		}
		res, err = l.db.ExecContext(ctx, `DELETE FROM inline_blobs WHERE sha = ?`, sha)
		if err == nil {
			if n, _ := res.RowsAffected(); n > 0 {
				st.Blobs++
				continue
			}
		}
		path := l.blobPath(sha)
		if fi, err := os.Stat(path); err == nil {
			size = fi.Size()
		}
		if err := os.Remove(path); err == nil {
			st.Blobs++
			st.Bytes += size
		}
	}
	l.logger.Info("pruned the undo log", "base", st.Base, "records", st.Records, "blobs", st.Blobs)
	return st, nil
}
