package undolog

import (
	"cmp"
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
)

// Severity grades a Problem found by Check.
type Severity int

// Severities, most severe first.
const (
	// Error: data is damaged or missing; replay from this log is not safe.
	Error Severity = iota + 1
	// Warning: something is off but no logged data is lost (e.g. HEAD missing,
	// users index out of date).
	Warning
	// Info: expected leftovers such as temporary files from a crash or blobs
	// no record refers to.
	Info
)

// String returns "error", "warning" or "info".
func (s Severity) String() string {
	switch s {
	case Error:
		return "error"
	case Warning:
		return "warning"
	case Info:
		return "info"
	}
	return "severity(" + strconv.Itoa(int(s)) + ")"
}

// Problem is one finding of Check.
type Problem struct {
	Seq      int64  // record concerned (first of a range), 0 if none
	Blob     string // blob concerned, "" if none
	Severity Severity
	What     string // what is wrong and where, in words for an operator
}

// String formats the problem as "error: record 812: ...".
func (p Problem) String() string { return p.Severity.String() + ": " + p.What }

// Summary counts what Check looked at and found.
type Summary struct {
	Records  int64 // records read
	Blobs    int64 // blob files hashed
	Errors   int
	Warnings int
	Infos    int
}

// OK reports whether Check found no errors.
func (s Summary) OK() bool { return s.Errors == 0 }

// String is the verdict line for an operator, e.g.
// "verified 1280 records, 64 blobs: 0 errors, 0 warnings".
func (s Summary) String() string {
	return fmt.Sprintf("verified %d records, %d blobs: %d errors, %d warnings", s.Records, s.Blobs, s.Errors, s.Warnings)
}

// Check verifies the undo log in dir completely, for `undomail fsck`. It only
// reads: it works on a log Open refuses, and while another process has the
// log open. It checks SQLite's integrity, that sequence numbers run from 1
// without gaps, the hash chain and every record's sum, HEAD against the last
// record, that every referenced blob exists, and that every blob in the store
// hashes to its name. Each finding goes to report (which may be nil); Check
// keeps going after errors. The returned error is non-nil only if the check
// could not run (dir missing, ctx done); damage is reported, not returned.
func Check(ctx context.Context, dir string, report func(Problem)) (Summary, error) {
	c := &checker{dir: dir, report: report, refs: make(map[string]int64), inline: make(map[string]bool)}
	if _, err := os.Stat(dir); err != nil {
		return c.sum, fmt.Errorf("check undo log %s: %w", dir, err)
	}
	if err := c.checkDB(ctx); err != nil {
		return c.sum, fmt.Errorf("check undo log %s: %w", dir, err)
	}
	if err := c.checkBlobs(ctx); err != nil {
		return c.sum, fmt.Errorf("check undo log %s: %w", dir, err)
	}
	return c.sum, nil
}

type checker struct {
	dir    string
	report func(Problem)
	sum    Summary
	refs   map[string]int64 // blob -> first record referencing it
	inline map[string]bool  // blobs found in inline_blobs
	// inlineCols selects data, codec and size of inline_blobs, in a log
	// of any schema version.
	inlineCols string
}

func (c *checker) add(sev Severity, seq int64, blob, format string, args ...any) {
	switch sev {
	case Error:
		c.sum.Errors++
	case Warning:
		c.sum.Warnings++
	default:
		c.sum.Infos++
	}
	if c.report != nil {
		c.report(Problem{Seq: seq, Blob: blob, Severity: sev, What: fmt.Sprintf(format, args...)})
	}
}

// checkDB checks everything stored in undo.db plus HEAD. Database errors are
// reported as problems so the blob check still runs.
func (c *checker) checkDB(ctx context.Context) error {
	headSeq, headSum, headErr := readHead(c.dir)
	path := filepath.Join(c.dir, dbName)
	if _, err := os.Stat(path); err != nil {
		if headErr == nil && headSeq > 0 {
			c.add(Error, 1, "", "records 1-%d missing: database %s: %v (HEAD says %d)", headSeq, path, err, headSeq)
		} else {
			c.add(Error, 0, "", "database %s: %v", path, err)
		}
		return nil
	}
	db, err := openReadOnly(ctx, path)
	if err != nil {
		c.add(Error, 0, "", "database %s: cannot open: %v", path, err)
		return nil
	}
	defer db.Close()

	if err := c.integrity(ctx, db); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		c.add(Error, 0, "", "database %s: %v", path, err)
		return nil
	}
	version, err := readSchemaVersion(ctx, db)
	switch {
	case err != nil:
		c.add(Error, 0, "", "database %s: cannot read schema version: %v", path, err)
	case version > schemaVersion:
		c.add(Error, 0, "", "database %s: %v", path, &SchemaError{Found: version, Known: schemaVersion})
	case version < schemaVersion:
		c.add(Info, 0, "", "database %s: schema version %d; undomail serve migrates it to %d at its next start", path, version, schemaVersion)
	}

	base, baseSum, err := readBase(ctx, db)
	if err != nil {
		c.add(Error, 0, "", "database %s: %v", path, err)
	}
	if base > 0 {
		c.add(Info, 0, "", "records 1-%d were pruned (archived); the chain is checked from record %d on", base, base+1)
	}
	last, sumAtHead, err := c.walkRecords(ctx, db, headSeq, base, baseSum)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		c.add(Error, 0, "", "database %s: reading records stopped: %v", path, err)
	}
	c.checkHead(last, headSeq, headSum, sumAtHead, headErr)
	// The first logs (schema version 1, before inline_blobs) keep every
	// blob as a file. Logs written later but before versioning also say
	// version 1 and do have the table: look for it, not at the version.
	var tables int
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'inline_blobs'`).Scan(&tables); err == nil && tables == 0 && version == 1 {
		return nil
	}
	// Logs before schema version 5 store every inline blob plain.
	c.inlineCols = "data, 0, NULL"
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM pragma_table_info('inline_blobs') WHERE name = 'codec'`).Scan(&tables); err == nil && tables > 0 {
		c.inlineCols = "data, codec, size"
	}
	if err := c.checkInlineBlobs(ctx, db); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		c.add(Error, 0, "", "database %s: reading inline blobs stopped: %v", path, err)
	}
	// Logs before schema version 4 have no delta blobs.
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'blob_deltas'`).Scan(&tables); err == nil && tables == 0 {
		return nil
	}
	if err := c.checkDeltaBlobs(ctx, db); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		c.add(Error, 0, "", "database %s: reading delta blobs stopped: %v", path, err)
	}
	return nil
}

// checkDeltaBlobs verifies the blobs stored as a prefix and a base blob
// (CommitDelta): the base is an inline or file blob, and prefix + base
// hashes to the name. A referenced delta's base counts as referenced by
// the same record, so checkBlobs reports it missing if it is.
func (c *checker) checkDeltaBlobs(ctx context.Context, db *sql.DB) error {
	type delta struct {
		sha, base string
		prefix    []byte
	}
	var ds []delta
	rows, err := db.QueryContext(ctx, `SELECT sha, base, prefix FROM blob_deltas ORDER BY sha`)
	if err != nil {
		return err
	}
	for rows.Next() {
		var d delta
		if err := rows.Scan(&d.sha, &d.base, &d.prefix); err != nil {
			rows.Close()
			return err
		}
		ds = append(ds, d)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	for _, d := range ds {
		if err := ctx.Err(); err != nil {
			return err
		}
		c.sum.Blobs++
		seq, referenced := c.refs[d.sha]
		if !validBlobName(d.sha) || !validBlobName(d.base) {
			c.add(Error, seq, d.sha, "delta blob %q of base %q: not sha256 names", d.sha, d.base)
			continue
		}
		c.inline[d.sha] = true
		if referenced {
			if _, ok := c.refs[d.base]; !ok {
				c.refs[d.base] = seq
			}
		} else {
			c.add(Info, 0, d.sha, "delta blob %s: not referenced by any record", shortHex(mustHex(d.sha)))
		}
		h := sha256.New()
		h.Write(d.prefix)
		var data []byte
		var codec int64
		var size sql.NullInt64
		err := db.QueryRowContext(ctx, `SELECT `+c.inlineCols+` FROM inline_blobs WHERE sha = ?`, d.base).Scan(&data, &codec, &size)
		switch {
		case err == nil:
			content, uerr := unpack(d.base, data, codec, size)
			if uerr != nil {
				// checkInlineBlobs reports the damaged base.
				c.add(Error, seq, d.sha, "delta blob %s: base %s unreadable: %v", shortHex(mustHex(d.sha)), shortHex(mustHex(d.base)), uerr)
				continue
			}
			h.Write(content)
		case errors.Is(err, sql.ErrNoRows):
			f, ferr := os.Open(filepath.Join(c.dir, blobsName, d.base[:2], d.base))
			if ferr != nil {
				// checkBlobs reports the missing base.
				c.add(Error, seq, d.sha, "delta blob %s: base %s unreadable: %v", shortHex(mustHex(d.sha)), shortHex(mustHex(d.base)), ferr)
				continue
			}
			_, ferr = io.Copy(h, f)
			f.Close()
			if ferr != nil {
				c.add(Error, seq, d.sha, "delta blob %s: base %s unreadable: %v", shortHex(mustHex(d.sha)), shortHex(mustHex(d.base)), ferr)
				continue
			}
		default:
			return err
		}
		if got := h.Sum(nil); hex.EncodeToString(got) != d.sha {
			c.add(Error, seq, d.sha, "delta blob %s: prefix and base %s hash to %s: blob corrupted%s",
				shortHex(mustHex(d.sha)), shortHex(mustHex(d.base)), shortHex(got), referencedBy(seq))
		}
	}
	return nil
}

// checkInlineBlobs verifies the blobs stored in the database, which
// walkRecords has already collected references to.
func (c *checker) checkInlineBlobs(ctx context.Context, db *sql.DB) error {
	rows, err := db.QueryContext(ctx, `SELECT sha, `+c.inlineCols+` FROM inline_blobs ORDER BY sha`)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var name string
		var data []byte
		var codec int64
		var size sql.NullInt64
		if err := rows.Scan(&name, &data, &codec, &size); err != nil {
			return err
		}
		c.sum.Blobs++
		seq, referenced := c.refs[name]
		if !validBlobName(name) {
			c.add(Error, seq, name, "inline blob %q: not a sha256 name", name)
			continue
		}
		c.inline[name] = true
		content, err := unpack(name, data, codec, size)
		if err != nil {
			c.add(Error, seq, name, "%v%s", err, referencedBy(seq))
			continue
		}
		sum := sha256.Sum256(content)
		switch got := hex.EncodeToString(sum[:]); {
		case got != name:
			c.add(Error, seq, name, "inline blob %s: content hashes to %s: blob corrupted%s", shortHex(mustHex(name)), shortHex(sum[:]), referencedBy(seq))
		case !referenced:
			c.add(Info, 0, name, "inline blob %s: not referenced by any record", shortHex(mustHex(name)))
		}
	}
	return rows.Err()
}

// openReadOnly opens the database without writing to it. A WAL database
// needs its -shm file, which SQLite cannot create on a read-only file system
// (a snapshot, a read-only mount). If there is no -wal file either, the
// database was closed cleanly, everything is in the main file, and it is safe
// to open it as immutable instead.
func openReadOnly(ctx context.Context, path string) (*sql.DB, error) {
	db, err := sql.Open("sqlite3", "file:"+escapeDSNPath(path)+"?mode=ro&_busy_timeout=5000")
	if err != nil {
		return nil, err
	}
	err = db.QueryRowContext(ctx, "SELECT count(*) FROM sqlite_master").Scan(new(int))
	if err == nil {
		return db, nil
	}
	db.Close()
	if fi, serr := os.Stat(path + "-wal"); serr == nil && fi.Size() > 0 {
		return nil, err
	}
	db, ierr := sql.Open("sqlite3", "file:"+escapeDSNPath(path)+"?mode=ro&immutable=1")
	if ierr != nil {
		return nil, errors.Join(err, ierr)
	}
	if ierr := db.QueryRowContext(ctx, "SELECT count(*) FROM sqlite_master").Scan(new(int)); ierr != nil {
		db.Close()
		return nil, errors.Join(err, ierr)
	}
	return db, nil
}

func (c *checker) integrity(ctx context.Context, db *sql.DB) error {
	rows, err := db.QueryContext(ctx, "PRAGMA integrity_check")
	if err != nil {
		return fmt.Errorf("integrity_check: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var msg string
		if err := rows.Scan(&msg); err != nil {
			return fmt.Errorf("integrity_check: %w", err)
		}
		if msg != "ok" {
			c.add(Error, 0, "", "database: integrity_check: %s", msg)
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("integrity_check: %w", err)
	}
	return nil
}

// walkRecords checks contiguity, the chain, each sum and the users index in
// one pass. It returns the last record's seq and sum, and the sum of the
// record HEAD names (nil if there is none).
func (c *checker) walkRecords(ctx context.Context, db *sql.DB, headSeq, base int64, baseSum [32]byte) (last Record, sumAtHead []byte, err error) {
	// Records at or below the base are left by an interrupted prune.
	rows, err := db.QueryContext(ctx, `SELECT `+recordCols+` FROM records r WHERE r.seq > ? ORDER BY r.seq`, base)
	if err != nil {
		return last, nil, err
	}
	defer rows.Close()
	idx, err := newIndexCursor(ctx, db)
	if err != nil {
		return last, nil, err
	}
	defer idx.close()

	prevSeq := base
	prevSum := baseSum // record 1 links to all zeros
	linked := true     // false right after a gap: the predecessor is unknown
	for rows.Next() {
		if err := ctx.Err(); err != nil {
			return last, sumAtHead, err
		}
		var r Record
		sc := scanInto(&r)
		if err := rows.Scan(sc.dest()...); err != nil {
			return last, sumAtHead, fmt.Errorf("after record %d: %w", prevSeq, err)
		}
		if err := sc.finish(); err != nil {
			c.add(Error, r.Seq, "", "record %d: unreadable: %v", r.Seq, err)
		}
		c.sum.Records++
		if r.Seq != prevSeq+1 {
			c.add(Error, prevSeq+1, "", "%s missing: gap in the log (record %d follows record %d)", seqRange(prevSeq+1, r.Seq-1), r.Seq, prevSeq)
			linked = false
		}
		// A record stored with an empty prev_sum (schema version 5 on)
		// links to its predecessor through its sum alone, which covers
		// the predecessor's sum: right after a gap (reported above) it
		// cannot be checked; a replaced predecessor fails it.
		switch {
		case r.prevImplicit && !linked:
		case r.prevImplicit:
			r.PrevSum = prevSum
			if got := r.computeSum(); got != r.Sum {
				c.add(Error, r.Seq, "", "record %d: checksum mismatch (stored %s, computed %s): the record, or record %d whose sum it covers, "+
					"changed after it was written (a record was replaced or rewritten)", r.Seq, shortHex(r.Sum[:]), shortHex(got[:]), prevSeq)
			}
		default:
			if linked && r.PrevSum != prevSum {
				c.add(Error, r.Seq, "", "record %d: prev_sum %s does not match record %d's sum %s: chain broken (a record was replaced or rewritten)",
					r.Seq, shortHex(r.PrevSum[:]), prevSeq, shortHex(prevSum[:]))
			}
			if got := r.computeSum(); got != r.Sum {
				c.add(Error, r.Seq, "", "record %d: checksum mismatch (stored %s, computed %s): record content changed after it was written",
					r.Seq, shortHex(r.Sum[:]), shortHex(got[:]))
			}
		}
		if r.Blob != "" {
			if _, ok := c.refs[r.Blob]; !ok {
				c.refs[r.Blob] = r.Seq
			}
		}
		if want, got := sortedUsers(&r), idx.usersOf(r.Seq); !slices.Equal(want, got) {
			c.add(Warning, r.Seq, "", "record %d: users index lists %q, record names %q: index out of date, filtering by user misses or adds this record", r.Seq, got, want)
		}
		if r.Seq == headSeq {
			sumAtHead = slices.Clone(r.Sum[:])
		}
		prevSeq, prevSum, linked = r.Seq, r.Sum, true
		last = r
	}
	if err := rows.Err(); err != nil {
		return last, sumAtHead, err
	}
	return last, sumAtHead, idx.err
}

// checkHead compares HEAD with the tail; see Log.checkHead for why HEAD may
// lag but never lead.
func (c *checker) checkHead(last Record, headSeq int64, headSum [32]byte, sumAtHead []byte, headErr error) {
	switch {
	case errors.Is(headErr, fs.ErrNotExist):
		if last.Seq > 0 {
			c.add(Warning, 0, "", "HEAD missing: cannot tell whether records after %d were lost", last.Seq)
		}
	case headErr != nil:
		c.add(Warning, 0, "", "HEAD unreadable, cannot tell whether records after %d were lost: %v", last.Seq, headErr)
	case headSeq > last.Seq:
		c.add(Error, last.Seq+1, "", "%s missing: log truncated (HEAD says %d, last record is %d)", seqRange(last.Seq+1, headSeq), headSeq, last.Seq)
	case headSeq == 0:
	case sumAtHead == nil:
		c.add(Error, headSeq, "", "record %d named by HEAD is missing", headSeq)
	case string(sumAtHead) != string(headSum[:]):
		c.add(Error, headSeq, "", "record %d: sum %s differs from HEAD's %s: record replaced after HEAD was written",
			headSeq, shortHex(sumAtHead), shortHex(headSum[:]))
	case headSeq < last.Seq:
		c.add(Info, headSeq, "", "HEAD says %d, last record is %d: the process stopped between a commit and the HEAD update (the next Open fixes HEAD)", headSeq, last.Seq)
	}
}

// checkBlobs hashes every file in the blob store and looks for referenced
// blobs that are missing.
func (c *checker) checkBlobs(ctx context.Context) error {
	root := filepath.Join(c.dir, blobsName)
	tops, err := os.ReadDir(root)
	if err != nil {
		if len(c.refs) > 0 || !errors.Is(err, fs.ErrNotExist) {
			c.add(Error, 0, "", "blob store %s: %v", root, err)
		}
	}
	seen := make(map[string]bool)
	for _, top := range tops {
		p := filepath.Join(root, top.Name())
		if top.Name() == tmpName && top.IsDir() {
			tmps, err := os.ReadDir(p)
			if err != nil {
				c.add(Warning, 0, "", "blob store %s: %v", p, err)
			}
			for _, t := range tmps {
				c.add(Info, 0, "", "blob store: leftover temporary file %s (crash debris; the next Open removes it)", filepath.Join(p, t.Name()))
			}
			continue
		}
		if !top.IsDir() || len(top.Name()) != 2 || !isLowerHex(top.Name()) {
			c.add(Info, 0, "", "blob store: unexpected entry %s", p)
			continue
		}
		files, err := os.ReadDir(p)
		if err != nil {
			c.add(Error, 0, "", "blob store %s: %v", p, err)
			continue
		}
		for _, f := range files {
			if err := ctx.Err(); err != nil {
				return err
			}
			name := f.Name()
			fp := filepath.Join(p, name)
			if !f.Type().IsRegular() || !validBlobName(name) || name[:2] != top.Name() {
				c.add(Warning, 0, "", "blob store: unexpected entry %s", fp)
				continue
			}
			seen[name] = true
			c.sum.Blobs++
			seq, referenced := c.refs[name]
			got, _, err := hashFile(fp)
			switch {
			case err != nil:
				c.add(Error, seq, name, "blob %s: unreadable: %v", shortHex(mustHex(name)), err)
			case got != name:
				c.add(Error, seq, name, "blob %s: content hashes to %s: blob corrupted%s", shortHex(mustHex(name)), shortHex(mustHex(got)), referencedBy(seq))
			case !referenced:
				c.add(Info, 0, name, "blob %s: not referenced by any record (its verb failed or was never logged)", shortHex(mustHex(name)))
			}
		}
	}
	missing := make([]string, 0)
	for b := range c.refs {
		if !seen[b] && !c.inline[b] {
			missing = append(missing, b)
		}
	}
	slices.SortFunc(missing, func(a, b string) int { return cmp.Compare(c.refs[a], c.refs[b]) })
	for _, b := range missing {
		c.add(Error, c.refs[b], b, "record %d: blob %s missing (%s)", c.refs[b], shortHex(mustHex(b)), filepath.Join(root, b[:2], b))
	}
	return nil
}

func referencedBy(seq int64) string {
	if seq == 0 {
		return " (unreferenced)"
	}
	return fmt.Sprintf(" (referenced by record %d)", seq)
}

// mustHex decodes a name already known to be hex, for shortHex.
func mustHex(s string) []byte {
	b, _ := hex.DecodeString(s)
	return b
}

// seqRange formats "record 5" or "records 5-9".
func seqRange(from, to int64) string {
	if from == to {
		return fmt.Sprintf("record %d", from)
	}
	return fmt.Sprintf("records %d-%d", from, to)
}

// sortedUsers is usersKey in the order the index cursor returns them.
func sortedUsers(r *Record) []string {
	u := r.usersKey()
	slices.Sort(u)
	return u
}

// indexCursor walks record_users in (seq, user) order alongside the records.
type indexCursor struct {
	rows *sql.Rows
	seq  int64
	user string
	ok   bool
	err  error
}

func newIndexCursor(ctx context.Context, db *sql.DB) (*indexCursor, error) {
	rows, err := db.QueryContext(ctx, `SELECT seq, user FROM record_users ORDER BY seq, user`)
	if err != nil {
		return nil, fmt.Errorf("read users index: %w", err)
	}
	ic := &indexCursor{rows: rows}
	ic.next()
	return ic, nil
}

func (ic *indexCursor) next() {
	ic.ok = ic.rows.Next()
	if ic.ok {
		if err := ic.rows.Scan(&ic.seq, &ic.user); err != nil {
			ic.ok, ic.err = false, fmt.Errorf("read users index: %w", err)
		}
	} else if err := ic.rows.Err(); err != nil {
		ic.err = fmt.Errorf("read users index: %w", err)
	}
}

// usersOf returns the index entries for seq, skipping entries of records that
// do not exist (those are reported as gaps already).
func (ic *indexCursor) usersOf(seq int64) []string {
	for ic.ok && ic.seq < seq {
		ic.next()
	}
	var users []string
	for ic.ok && ic.seq == seq {
		users = append(users, ic.user)
		ic.next()
	}
	return users
}

func (ic *indexCursor) close() { ic.rows.Close() }
