package undolog

import (
	"context"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	_ "github.com/mattn/go-sqlite3" // registers the "sqlite3" driver
)

// File names inside a log directory.
const (
	dbName    = "undo.db"
	headName  = "HEAD"
	lockName  = "LOCK"
	blobsName = "blobs"
	tmpName   = "tmp"
)

// defaultMaxBatch caps the records in one group commit so one transaction (and
// the latency of everyone waiting on it) stays bounded.
const defaultMaxBatch = 1024

// Options configure Open.
type Options struct {
	// Logger receives the log's own events (crash debris removed, commit
	// failures). Nil means slog.Default().
	Logger *slog.Logger

	// MaxBatch caps the records committed in one transaction. Zero means 1024.
	MaxBatch int

	// InlineBlobMax is the largest blob kept inside the database rather than
	// as a file. Zero means DefaultInlineBlobMax; negative keeps every blob
	// in a file.
	InlineBlobMax int
}

// DefaultInlineBlobMax is the default Options.InlineBlobMax. SQLite reads
// and writes blobs up to about 100 KiB faster than separate files
// (https://www.sqlite.org/intern-v-extern-blob.html), and an inline blob
// needs no file create, rename and fsync of its own: it rides on the
// group commit of its record. Most mail is smaller than this.
const DefaultInlineBlobMax = 128 << 10

// Stats counts what a Log committed since Open.
type Stats struct {
	Records       int64 // records committed
	Commits       int64 // successful transactions
	Fsyncs        int64 // fsyncs of the WAL, each covering every commit written before it
	FailedCommits int64 // transactions that returned an error
}

// SyncLag bounds how long records appended with AppendNoSync may stay
// written but not yet fsynced when no durable Append comes along to carry
// them to disk.
const SyncLag = 20 * time.Millisecond

// Log is an open undo log. It is safe for concurrent use.
type Log struct {
	dir      string
	db       *sql.DB
	lock     *os.File
	logger   *slog.Logger
	maxBatch int
	inline   int // Options.InlineBlobMax resolved; 0 = no inline blobs
	headFile *os.File

	// Used by the committer goroutine only.
	wconn    *sql.Conn // the one connection that writes: PRAGMA synchronous is per connection
	stmts    writerStmts
	lastTime time.Time // the last committed record's Time: no record gets an earlier one

	// Used by the syncer goroutine only (and Close after it ended).
	walFile *os.File // undo.db-wal, fdatasynced by the syncer

	mu         sync.Mutex
	cond       *sync.Cond // signals the committer: queue non-empty or closed
	syncCond   *sync.Cond // signals the syncer: durable appends wait, a sync is due, or the committer ended
	queue      []*appendReq
	closed     bool
	failed     error // *FailedError once the log failed; sticky
	syncDue    bool  // SyncLag passed since an unsynced commit: fsync the WAL
	timer      *time.Timer
	headSeq    int64 // last record written (committed to the WAL, visible to readers)
	headSum    [32]byte
	syncedSeq  int64        // last record known durable (fdatasync of the WAL after it was written)
	waitSync   []*appendReq // durable appends written, waiting for the syncer
	writerDone bool         // the committer has ended: the syncer syncs what is left and ends
	syncing    bool         // the syncer is in an fsync
	stats      Stats

	sinceCkpt int // commits since the last checkpoint was started

	committerDone chan struct{} // closed when the committer, the syncer and the checkpointer have ended
	syncerDone    chan struct{}
	ckpt          chan struct{} // wakes the checkpointer; closed by the syncer as it ends
	ckptDone      chan struct{}

	observer atomic.Pointer[AppendObserver] // see Observe (observe.go)
}

// appendReq is one Append call waiting for the committer.
type appendReq struct {
	recs   []Record // private copies; the committer fills Seq, PrevSum, Sum
	noSync bool     // AppendNoSync: written, fsynced later
	err    error
	done   chan struct{}
}

// Open opens the undo log in dir, creating it if needed. It verifies the last
// record's checksum and its link to the one before, and compares the tail with
// HEAD; it refuses (ErrCorrupt, ErrTruncated) a log that fails those checks.
// Run Check for a full verification. Only one process may have a log open.
func Open(dir string, opts Options) (*Log, error) {
	logger := opts.Logger
	if logger == nil {
		logger = slog.Default()
	}
	logger = logger.With("dir", dir)
	maxBatch := opts.MaxBatch
	if maxBatch <= 0 {
		maxBatch = defaultMaxBatch
	}
	if err := prepareDirs(dir); err != nil {
		return nil, fmt.Errorf("open undo log %s: %w", dir, wrapOpen(err))
	}
	lock, err := lockDir(dir)
	if err != nil {
		return nil, fmt.Errorf("open undo log %s: %w", dir, err)
	}
	inline := opts.InlineBlobMax
	switch {
	case inline == 0:
		inline = DefaultInlineBlobMax
	case inline < 0:
		inline = 0
	}
	l := &Log{dir: dir, lock: lock, logger: logger, maxBatch: maxBatch, inline: inline,
		committerDone: make(chan struct{}), syncerDone: make(chan struct{}),
		ckpt: make(chan struct{}, 1), ckptDone: make(chan struct{})}
	l.cond = sync.NewCond(&l.mu)
	l.syncCond = sync.NewCond(&l.mu)
	if err := l.open(); err != nil {
		if l.db != nil {
			l.db.Close()
		}
		lock.Close()
		return nil, fmt.Errorf("open undo log %s: %w", dir, err)
	}
	l.syncedSeq = l.headSeq
	go l.committer()
	go l.syncer()
	go l.checkpointer()
	return l, nil
}

// wrapOpen classifies an error from Open. Nothing has been committed yet, so
// even an I/O error only makes this Open fail; there is no log to mark failed.
func wrapOpen(err error) error {
	switch classify(err) {
	case classFull:
		return fmt.Errorf("%w: %w", ErrFull, err)
	case classUnavailable:
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return err
}

// open does the part of Open that needs the Log; the caller cleans up on error.
func (l *Log) open() error {
	n, err := removeTempBlobs(l.dir)
	if err != nil {
		return wrapOpen(err)
	}
	if n > 0 {
		l.logger.Info("removed leftover temporary blobs from an earlier crash", "count", n)
	}
	if err := probeWritable(filepath.Join(l.dir, blobsName, tmpName)); err != nil {
		return fmt.Errorf("blob store not writable: %w", wrapOpen(err))
	}

	if err := createDB(filepath.Join(l.dir, dbName)); err != nil {
		return wrapOpen(err)
	}
	dsn := "file:" + escapeDSNPath(filepath.Join(l.dir, dbName)) +
		"?_journal_mode=WAL&_synchronous=FULL&_busy_timeout=5000&_txlock=immediate"
	db, err := sql.Open("sqlite3", dsn)
	if err != nil {
		return fmt.Errorf("open database: %w", err)
	}
	l.db = db
	ctx := context.Background()
	// Migrations (migrate.go) create a new log and upgrade an older one;
	// a log from a newer undomail is refused untouched.
	if err := migrate(ctx, db, l.logger); err != nil {
		return wrapOpen(err)
	}
	if err := l.checkPragmas(ctx); err != nil {
		return err
	}
	if l.wconn, err = db.Conn(ctx); err != nil {
		return fmt.Errorf("open writer connection: %w", err)
	}
	// Commits are made durable by syncWALFile; see there.
	if _, err := l.wconn.ExecContext(ctx, "PRAGMA synchronous=NORMAL"); err != nil {
		return fmt.Errorf("set synchronous=NORMAL on the writer: %w", err)
	}
	// The checkpointer copies the WAL into the database beside the
	// commits; SQLite's automatic checkpoint would run inside a commit
	// and stall every append behind it (https://www.sqlite.org/wal.html,
	// "Automatic Checkpoint").
	if _, err := l.wconn.ExecContext(ctx, "PRAGMA wal_autocheckpoint=0"); err != nil {
		return fmt.Errorf("turn off automatic checkpoints on the writer: %w", err)
	}
	if err := l.prepareWriter(ctx); err != nil {
		return err
	}
	last, ok, err := lastRecord(ctx, db)
	if err != nil {
		return wrapOpen(err)
	}
	if ok {
		if last, ok, err = l.discardTornTail(ctx, last); err != nil {
			return wrapOpen(err)
		}
	}
	if ok {
		if err := verifyTail(ctx, db, last); err != nil {
			return err
		}
		l.headSeq, l.headSum, l.lastTime = last.Seq, last.Sum, last.Time
	}
	return l.checkHead(ctx)
}

// pageSize is the page size of a new log's database. Every commit writes
// each page it changed whole to the WAL, and a commit of one record
// changes a page of the records table and of each index: with SQLite's
// default 4 KiB pages a logged delivery (intent with a 4 KiB message, and
// outcome) cost about 49 KB of disk writes for about 5 KB of log
// (BenchmarkDelivery, disk-bytes/op). 2 KiB pages cost about 31 KB and
// keep the log the same size (TestLogSizing); 1 KiB pages cost 23 KB but
// grow the log by 7-8% (more page headers), so 2 KiB
// (https://www.sqlite.org/pragma.html#pragma_page_size). Logs created
// before keep their page size.
const pageSize = 2048

// createDB creates a new log's database file with pageSize pages, which
// can only be chosen before the first table is written (and before WAL
// mode, which the regular connections switch on, fixes it). An existing
// file is left alone.
func createDB(path string) error {
	if _, err := os.Stat(path); err == nil || !errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	db, err := sql.Open("sqlite3", "file:"+escapeDSNPath(path))
	if err != nil {
		return fmt.Errorf("create database: %w", err)
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	for _, q := range []string{"PRAGMA page_size=" + strconv.Itoa(pageSize), "PRAGMA journal_mode=WAL"} {
		if _, err := db.Exec(q); err != nil {
			return fmt.Errorf("create database %s: %s: %w", path, q, err)
		}
	}
	return nil
}

// checkPragmas makes sure the durability settings really took effect: a file
// system without shared memory support silently keeps a rollback journal, and
// durability before acknowledgement depends on synchronous=FULL.
func (l *Log) checkPragmas(ctx context.Context) error {
	conn, err := l.db.Conn(ctx)
	if err != nil {
		return fmt.Errorf("check pragmas: %w", err)
	}
	defer conn.Close()
	var mode string
	var sync int
	if err := conn.QueryRowContext(ctx, "PRAGMA journal_mode").Scan(&mode); err != nil {
		return fmt.Errorf("read journal_mode: %w", err)
	}
	if err := conn.QueryRowContext(ctx, "PRAGMA synchronous").Scan(&sync); err != nil {
		return fmt.Errorf("read synchronous: %w", err)
	}
	if mode != "wal" || sync != 2 {
		return fmt.Errorf("database runs with journal_mode=%s synchronous=%d, need wal and 2 (FULL)", mode, sync)
	}
	return nil
}

// verifyTail is the cheap check Open runs on every start: the last record's
// sum recomputes and it links to the record before it. A torn tail after a
// crash cannot fail this (SQLite only ever exposes whole transactions); a
// failure means the content changed after it was written.
func verifyTail(ctx context.Context, db *sql.DB, last Record) error {
	if last.prevImplicit {
		prev, err := sumBefore(ctx, db, last.Seq)
		if err != nil {
			return err
		}
		last.PrevSum = prev
	}
	if got := last.computeSum(); got != last.Sum {
		return fmt.Errorf("%w: %w", ErrCorrupt, &ChecksumError{Seq: last.Seq, Stored: hex.EncodeToString(last.Sum[:]), Computed: hex.EncodeToString(got[:])})
	}
	if last.Seq == 1 {
		if last.PrevSum != ([32]byte{}) {
			return fmt.Errorf("%w: record 1: prev_sum is %s, want all zero", ErrCorrupt, shortHex(last.PrevSum[:]))
		}
		return nil
	}
	var prev []byte
	if base, baseSum, err := readBase(ctx, db); err != nil {
		return err
	} else if last.Seq-1 == base {
		if baseSum != last.PrevSum {
			return fmt.Errorf("%w: record %d: prev_sum %s does not match the pruned log's base %s: chain broken",
				ErrCorrupt, last.Seq, shortHex(last.PrevSum[:]), shortHex(baseSum[:]))
		}
		return nil
	}
	err := db.QueryRowContext(ctx, `SELECT sum FROM records WHERE seq = ?`, last.Seq-1).Scan(&prev)
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("%w: record %d missing before last record %d", ErrCorrupt, last.Seq-1, last.Seq)
	}
	if err != nil {
		return fmt.Errorf("read record %d: %w", last.Seq-1, err)
	}
	if string(prev) != string(last.PrevSum[:]) {
		return fmt.Errorf("%w: record %d: prev_sum %s does not match record %d's sum %s: chain broken",
			ErrCorrupt, last.Seq, shortHex(last.PrevSum[:]), last.Seq-1, shortHex(prev))
	}
	return nil
}

// sumBefore returns the sum record seq links to: all zero for record 1,
// the pruned log's base sum, or record seq-1's sum.
func sumBefore(ctx context.Context, db *sql.DB, seq int64) ([32]byte, error) {
	var out [32]byte
	if seq == 1 {
		return out, nil
	}
	base, baseSum, err := readBase(ctx, db)
	if err != nil {
		return out, err
	}
	if seq-1 == base {
		return baseSum, nil
	}
	var prev []byte
	err = db.QueryRowContext(ctx, `SELECT sum FROM records WHERE seq = ?`, seq-1).Scan(&prev)
	if errors.Is(err, sql.ErrNoRows) {
		return out, fmt.Errorf("%w: record %d missing before record %d", ErrCorrupt, seq-1, seq)
	}
	if err != nil {
		return out, fmt.Errorf("read record %d: %w", seq-1, err)
	}
	copy(out[:], prev)
	return out, nil
}

// discardTornTail drops damaged records past the durable HEAD. HEAD is
// written once a commit is durable and before anyone is told it
// succeeded, so a record past HEAD that fails its checksum (a write the
// disk tore in a crash) was never acknowledged durably: it and the
// records after it are discarded, loudly, and the log goes on from the
// last good record. A damaged record HEAD covers is another matter
// (corruption in the middle): that is refused (verifyTail) or, deeper in
// the log, reported by fsck and never replayed (VerifyRange).
func (l *Log) discardTornTail(ctx context.Context, last Record) (Record, bool, error) {
	headSeq, _, err := readHead(l.dir)
	if err != nil || headSeq >= last.Seq {
		return last, true, nil
	}
	recs, err := l.Records(ctx, Filter{AfterSeq: headSeq})
	if err != nil {
		return last, true, err
	}
	var prevSum []byte
	if headSeq > 0 {
		if err := l.db.QueryRowContext(ctx, `SELECT sum FROM records WHERE seq = ?`, headSeq).Scan(&prevSum); err != nil {
			return last, true, nil // HEAD names a missing record: checkHead reports it
		}
	} else {
		prevSum = make([]byte, 32)
	}
	for _, r := range recs {
		if r.prevImplicit {
			copy(r.PrevSum[:], prevSum)
		}
		if r.computeSum() == r.Sum && string(r.PrevSum[:]) == string(prevSum) {
			prevSum = r.Sum[:]
			continue
		}
		if _, err := l.db.ExecContext(ctx, `DELETE FROM record_users WHERE seq >= ?`, r.Seq); err != nil {
			return last, true, fmt.Errorf("discard torn tail from record %d: %w", r.Seq, err)
		}
		if _, err := l.db.ExecContext(ctx, `DELETE FROM records WHERE seq >= ?`, r.Seq); err != nil {
			return last, true, fmt.Errorf("discard torn tail from record %d: %w", r.Seq, err)
		}
		l.logger.Warn("discarded a torn tail: records past the last durable one failed their checksum; they were never acknowledged durably",
			"from", r.Seq, "to", last.Seq, "head", headSeq)
		return lastRecord(ctx, l.db)
	}
	return last, true, nil
}

// checkHead compares HEAD with the database tail.
//
// HEAD is rewritten after every commit, once the commit is durable, and is not
// fsynced itself. After a crash it can therefore only lag behind the database
// (or be missing), never lead: a HEAD that names a later record than the
// database holds means committed records were lost, i.e. the log was
// truncated (restored from an old copy, rolled back with the mail store,
// WAL deleted). A HEAD whose sum differs from the record at its seq means that
// record changed.
func (l *Log) checkHead(ctx context.Context) error {
	seq, sum, err := readHead(l.dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if l.headSeq > 0 {
			l.logger.Warn("HEAD file missing, rewriting it from the database tail", "seq", l.headSeq)
		}
		l.writeHead(l.headSeq, l.headSum)
		return nil
	case err != nil:
		// A torn HEAD (file system without atomic rename after a crash) says
		// nothing; the records themselves are checksummed.
		l.logger.Warn("HEAD file unreadable, rewriting it from the database tail", "seq", l.headSeq, "err", err)
		l.writeHead(l.headSeq, l.headSum)
		return nil
	case seq > l.headSeq:
		return fmt.Errorf("%w: records %d-%d missing (HEAD says %d, last record is %d)", ErrTruncated, l.headSeq+1, seq, seq, l.headSeq)
	case seq == l.headSeq:
		if sum != l.headSum {
			return fmt.Errorf("%w: record %d: sum %s differs from HEAD's %s", ErrCorrupt, seq, shortHex(l.headSum[:]), shortHex(sum[:]))
		}
		return nil
	}
	if seq > 0 {
		var stored []byte
		err := l.db.QueryRowContext(ctx, `SELECT sum FROM records WHERE seq = ?`, seq).Scan(&stored)
		if errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("%w: record %d named by HEAD is missing", ErrCorrupt, seq)
		}
		if err != nil {
			return fmt.Errorf("read record %d named by HEAD: %w", seq, err)
		}
		if string(stored) != string(sum[:]) {
			return fmt.Errorf("%w: record %d: sum %s differs from HEAD's %s", ErrCorrupt, seq, shortHex(stored), shortHex(sum[:]))
		}
	}
	l.logger.Info("HEAD lagged behind the database (crash after a commit), updating it", "head_seq", seq, "seq", l.headSeq)
	l.writeHead(l.headSeq, l.headSum)
	return nil
}

// Close flushes pending appends, stops the committer and closes the database.
func (l *Log) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	l.cond.Broadcast()
	if l.timer != nil {
		l.timer.Stop()
		l.timer = nil
	}
	l.mu.Unlock()
	<-l.committerDone
	if l.headFile != nil {
		l.headFile.Close()
	}
	if l.walFile != nil {
		l.walFile.Close()
	}
	if l.wconn != nil {
		for _, st := range []*sql.Stmt{l.stmts.ins, l.stmts.insBlob, l.stmts.insDelta, l.stmts.insUser} {
			if st != nil {
				st.Close()
			}
		}
		l.wconn.Close()
	}
	if l.lock == nil { // OpenReadOnly takes no lock
		return l.db.Close()
	}
	return errors.Join(l.db.Close(), l.lock.Close())
}

// Dir returns the log's directory.
func (l *Log) Dir() string { return l.dir }

// Last returns the seq and sum of the last committed record (0 and zeros for
// an empty log).
func (l *Log) Last() (seq int64, sum [32]byte) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.headSeq, l.headSum
}

// Stats returns counters since Open. Records/Commits is the group-commit
// factor: how many records shared one fsync on average.
func (l *Log) Stats() Stats {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.stats
}

// Append durably logs recs, in order, with contiguous sequence numbers. It
// returns nil only after they are committed and fsynced together with the
// directory entries of the blobs they reference; then each record's Seq,
// PrevSum, Sum and Time are filled in. Concurrent Appends share
// transactions, and every transaction written while one fsync runs shares
// the next fsync (see committer and syncer).
//
// On error nothing of recs was committed, except when ctx ends first: then
// Append returns ctx.Err() while the records may still be committed. Errors
// wrap ErrFull or ErrUnavailable (see FailedError for the sticky case).
func (l *Log) Append(ctx context.Context, recs ...*Record) error {
	return l.append(ctx, false, recs)
}

// AppendNoSync logs recs like Append but returns once they are committed to
// the write-ahead log, before the fsync: they are visible to readers and
// survive a crash of this process, and they reach the disk with the next
// durable Append or within SyncLag, whichever comes first. A power failure
// in that window can lose them. Use it only for records whose loss leaves
// the log safe, such as the outcome of an intent that was itself appended
// durably (the intent then reads as "outcome unknown").
func (l *Log) AppendNoSync(ctx context.Context, recs ...*Record) error {
	return l.append(ctx, true, recs)
}

func (l *Log) append(ctx context.Context, noSync bool, recs []*Record) error {
	if len(recs) == 0 {
		return nil
	}
	req := &appendReq{recs: make([]Record, len(recs)), noSync: noSync, done: make(chan struct{})}
	now := time.Now()
	for i, r := range recs {
		if err := r.validate(); err != nil {
			return fmt.Errorf("append to undo log %s: %w", l.dir, err)
		}
		c := *r
		if c.Time.IsZero() {
			c.Time = now
		}
		// Normalise to what the database returns, so the sum the caller sees
		// is the sum over what a query reads back.
		c.Time = time.Unix(0, c.Time.UnixNano()).UTC()
		c.Users = slices.Clone(c.Users)
		c.Args = slices.Clone(c.Args)
		c.Outcome = slices.Clone(c.Outcome)
		if c.Blob != "" && c.inline == nil && c.delta == nil {
			if err := l.blobStored(c.Blob); err != nil {
				return fmt.Errorf("append %s to undo log %s: blob %s: %w", c.Kind, l.dir, c.Blob, err)
			}
		}
		req.recs[i] = c
	}

	l.mu.Lock()
	switch {
	case l.closed:
		l.mu.Unlock()
		return fmt.Errorf("append to undo log %s: %w", l.dir, ErrClosed)
	case l.failed != nil:
		err := l.failed
		l.mu.Unlock()
		return fmt.Errorf("append to undo log %s: %w", l.dir, err)
	}
	for _, r := range req.recs {
		if r.Ref > l.headSeq {
			l.mu.Unlock()
			return fmt.Errorf("append %s to undo log %s: ref %d names a record not yet committed (last is %d)", r.Kind, l.dir, r.Ref, l.headSeq)
		}
	}
	l.queue = append(l.queue, req)
	l.cond.Signal()
	l.mu.Unlock()

	select {
	case <-req.done:
		l.observe(req, now)
	case <-ctx.Done():
		return fmt.Errorf("append to undo log %s: %w (the records may still be committed)", l.dir, ctx.Err())
	}
	if req.err != nil {
		return req.err
	}
	for i, r := range recs {
		*r = req.recs[i]
	}
	return nil
}

// committer is the single goroutine that writes records. Whatever queued up
// while the previous transaction was being written goes into the next one.
// It never waits for an fsync: that is the syncer's job, so while the WAL
// is being fsynced the next transactions are already written, and one
// fsync makes all of them durable (group commit across every session and
// both delivery hops, without any timer).
func (l *Log) committer() {
	defer close(l.committerDone)
	for {
		l.mu.Lock()
		for !l.closed && (len(l.queue) == 0 || l.syncing && !anyNoSync(l.queue)) {
			// Durable appends that queue during an fsync wait for the
			// next one anyway: they are written together when it starts,
			// one transaction instead of one each (each transaction
			// writes whole pages of every index it touches to the WAL).
			l.cond.Wait()
		}
		if len(l.queue) == 0 {
			l.writerDone = true
			l.syncCond.Signal()
			l.mu.Unlock()
			<-l.syncerDone
			return
		}
		var batch []*appendReq
		n := 0
		for len(l.queue) > 0 && (n == 0 || n+len(l.queue[0].recs) <= l.maxBatch) {
			n += len(l.queue[0].recs)
			batch = append(batch, l.queue[0])
			l.queue[0] = nil
			l.queue = l.queue[1:]
		}
		l.mu.Unlock()
		l.commit(batch)
	}
}

// ckptEvery is how many commits the WAL takes between checkpoints, about
// SQLite's default of 1000 WAL pages at a few pages per commit.
const ckptEvery = 300

// checkpointer copies committed WAL content into the database file when
// the syncer asks, on a connection of its own, so that appends never wait
// for it: a PASSIVE checkpoint runs beside the writer and copies what no
// reader still needs (https://www.sqlite.org/c3ref/wal_checkpoint_v2.html).
// It only ever moves content that is durable in the WAL already.
func (l *Log) checkpointer() {
	defer close(l.ckptDone)
	for range l.ckpt {
		start := time.Now()
		var busy, frames, copied int
		err := l.db.QueryRow("PRAGMA wal_checkpoint(PASSIVE)").Scan(&busy, &frames, &copied)
		if err != nil {
			l.logger.Warn("checkpoint of the undo log failed; the WAL grows until the next one", "err", err)
			continue
		}
		l.logger.Debug("checkpointed", "wal_frames", frames, "copied", copied, "duration", time.Since(start))
	}
}

// anyNoSync reports whether an AppendNoSync waits in q: it is written at
// once, whatever the syncer does.
func anyNoSync(q []*appendReq) bool {
	for _, r := range q {
		if r.noSync {
			return true
		}
	}
	return false
}

// commit writes one batch to the WAL. AppendNoSync callers are woken at
// once; Append callers wait for the syncer's next fsync.
func (l *Log) commit(batch []*appendReq) {
	finish := func(reqs []*appendReq, err error) {
		for _, req := range reqs {
			req.err = err
			close(req.done)
		}
	}
	l.mu.Lock()
	failed := l.failed
	seq, sum := l.headSeq, l.headSum
	l.mu.Unlock()
	if failed != nil {
		finish(batch, fmt.Errorf("append to undo log %s: %w", l.dir, failed))
		return
	}

	first := seq + 1
	dirs := make(map[string]bool)
	last := l.lastTime
	for _, req := range batch {
		for i := range req.recs {
			r := &req.recs[i]
			seq++
			// Times never go backwards along the seqs (appends race
			// between taking their time and queueing), so a time bound
			// is a seq bound (Log.firstAt) without a time index.
			if r.Time.Before(last) {
				r.Time = last
			}
			last = r.Time
			r.Seq, r.PrevSum = seq, sum
			r.Sum = r.computeSum()
			sum = r.Sum
			switch {
			case r.delta != nil:
				if r.delta.baseFile {
					dirs[r.delta.base[:2]] = true
				}
			case r.Blob != "" && r.inline == nil:
				dirs[r.Blob[:2]] = true
			}
		}
	}

	start := time.Now()
	if err := l.write(batch, dirs); err != nil {
		finish(batch, l.commitFailed(first, seq, err))
		return
	}
	var now, later []*appendReq
	for _, req := range batch {
		if req.noSync {
			now = append(now, req)
		} else {
			later = append(later, req)
		}
	}
	l.lastTime = last
	l.mu.Lock()
	l.headSeq, l.headSum = seq, sum
	l.stats.Records += seq - first + 1
	l.stats.Commits++
	l.sinceCkpt++
	if len(later) > 0 {
		l.waitSync = append(l.waitSync, later...)
		l.syncCond.Signal()
	} else if l.timer == nil && !l.closed {
		l.timer = time.AfterFunc(SyncLag, func() {
			l.mu.Lock()
			l.syncDue, l.timer = true, nil
			l.syncCond.Signal()
			l.mu.Unlock()
		})
	}
	l.mu.Unlock()
	l.logger.Debug("committed", "first_seq", first, "seq", seq, "records", seq-first+1, "duration", time.Since(start))
	finish(now, nil)
}

// syncer is the goroutine that makes written records durable: it fdatasyncs
// the WAL whenever an Append waits (or SyncLag passed since an AppendNoSync),
// covering every transaction written before the fsync began, then wakes the
// Appends it covered and updates HEAD. A transaction's frames are in the
// WAL file once its COMMIT returned, and an fdatasync that starts after
// that makes them durable (the contract synchronous=FULL relies on too).
func (l *Log) syncer() {
	defer close(l.syncerDone)
	defer func() {
		close(l.ckpt)
		<-l.ckptDone
	}()
	for {
		l.mu.Lock()
		for len(l.waitSync) == 0 && !(l.syncDue && l.syncedSeq < l.headSeq) && !l.writerDone {
			l.syncCond.Wait()
		}
		waiters := l.waitSync
		l.waitSync = nil
		l.syncDue = false
		done := l.writerDone
		seq, sum, synced, failed := l.headSeq, l.headSum, l.syncedSeq, l.failed
		l.syncing = failed == nil && seq > synced
		l.mu.Unlock()

		var err error
		switch {
		case failed != nil:
			err = fmt.Errorf("append to undo log %s: %w", l.dir, failed)
		case seq > synced:
			err = l.syncWAL(seq, sum)
		}
		l.mu.Lock()
		if l.syncing {
			l.syncing = false
			l.cond.Signal() // durable appends may be waiting to be written
		}
		if err == nil && l.sinceCkpt >= ckptEvery {
			l.sinceCkpt = 0
			select {
			case l.ckpt <- struct{}{}:
			default: // one is running; the next sync asks again
			}
		}
		l.mu.Unlock()
		for _, req := range waiters {
			req.err = err
			close(req.done)
		}
		if done {
			l.mu.Lock()
			left := len(l.waitSync) > 0
			l.mu.Unlock()
			if !left {
				return
			}
		}
	}
}

// commitFailed classifies a failed commit of records first..last and returns
// the error for the callers; fatal errors fail the log.
func (l *Log) commitFailed(first, last int64, err error) error {
	err = fmt.Errorf("commit records %d-%d to %s: %w", first, last, filepath.Join(l.dir, dbName), err)
	class := classify(err)
	if class != classFatal {
		// SQLite rolled the transaction back. Confirm nothing of it is
		// visible: the chain head in memory must still be the database tail,
		// or the next commit would fork the chain.
		if terr := l.checkDBTail(); terr != nil {
			class = classFatal
			err = fmt.Errorf("%w; afterwards: %w", err, terr)
		}
	}
	l.mu.Lock()
	l.stats.FailedCommits++
	if class == classFatal && l.failed == nil {
		l.failed = &FailedError{Cause: err}
		l.logger.Error("undo log failed; refusing all appends until reopened", "first_seq", first, "seq", last, "err", err)
	}
	failed := l.failed
	l.mu.Unlock()
	if class == classFatal {
		return failed
	}
	l.logger.Warn("commit failed, will retry with next append", "first_seq", first, "seq", last, "err", err)
	return wrapClass(class, err)
}

// checkDBTail checks that the database's last record is the in-memory head.
func (l *Log) checkDBTail() error {
	l.mu.Lock()
	want, wantSum := l.headSeq, l.headSum
	l.mu.Unlock()
	last, ok, err := lastRecord(context.Background(), l.db)
	if err != nil {
		return fmt.Errorf("read database tail: %w", err)
	}
	if !ok && want == 0 || ok && last.Seq == want && last.Sum == wantSum {
		return nil
	}
	return fmt.Errorf("chain inconsistency: database tail is record %d, chain head is %d", last.Seq, want)
}

// write fsyncs the blob directories the batch references, then inserts the
// records in one transaction, without an fsync of the WAL (the syncer's). The directory fsync makes each blob's name
// durable before any record naming it is; blob content was fsynced by
// BlobWriter.Commit.
func (l *Log) write(batch []*appendReq, dirs map[string]bool) error {
	for d := range dirs {
		if err := syncDir(filepath.Join(l.dir, blobsName, d)); err != nil {
			return err
		}
	}
	ctx := context.Background()
	// The writer connection's statements are prepared once (open); the
	// transaction is driven by hand so they need no re-preparing per batch.
	if _, err := l.wconn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	committed := false
	defer func() {
		if !committed {
			l.wconn.ExecContext(ctx, "ROLLBACK")
		}
	}()
	ins, insBlob, insDelta, insUser := l.stmts.ins, l.stmts.insBlob, l.stmts.insDelta, l.stmts.insUser
	for _, req := range batch {
		for i := range req.recs {
			r := &req.recs[i]
			if _, err := ins.ExecContext(ctx, r.Seq, r.Time.UnixNano(), r.User, r.Session, r.Kind, r.Ref, r.Blob,
				encodeUsers(r.Users), nonNil(r.Args), nonNil(r.Outcome), []byte{}, r.Sum[:]); err != nil {
				return fmt.Errorf("insert record %d: %w", r.Seq, err)
			}
			if r.inline != nil {
				data, codec, size := r.inline, codecPlain, any(nil)
				if r.packed != nil {
					data, codec, size = r.packed, codecDeflate, len(r.inline)
				}
				if _, err := insBlob.ExecContext(ctx, r.Blob, data, codec, size); err != nil {
					return fmt.Errorf("insert blob %s of record %d: %w", r.Blob, r.Seq, err)
				}
			}
			if d := r.delta; d != nil {
				if _, err := insDelta.ExecContext(ctx, r.Blob, d.base, d.prefix); err != nil {
					return fmt.Errorf("insert delta blob %s of record %d: %w", r.Blob, r.Seq, err)
				}
			}
			for _, u := range r.usersKey() {
				if _, err := insUser.ExecContext(ctx, u, r.Seq); err != nil {
					return fmt.Errorf("index record %d under user %q: %w", r.Seq, u, err)
				}
			}
		}
	}
	if _, err := l.wconn.ExecContext(ctx, "COMMIT"); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	committed = true
	return nil
}

// syncWALFile makes every committed transaction durable: the writer runs
// with synchronous=NORMAL, which in WAL mode writes a commit to the WAL
// without an fsync, and this fdatasync of the WAL (one file, synced
// whole) is the durability point. It is what synchronous=FULL does at
// each commit, done only for the batches that need it, without switching
// the pragma back and forth.
func (l *Log) syncWALFile() error {
	if l.walFile == nil {
		f, err := os.Open(filepath.Join(l.dir, dbName+"-wal"))
		if err != nil {
			return fmt.Errorf("open %s-wal: %w", dbName, err)
		}
		l.walFile = f
	}
	if err := syscall.Fdatasync(int(l.walFile.Fd())); err != nil {
		return fmt.Errorf("fdatasync %s-wal: %w", dbName, err)
	}
	return nil
}

// writerStmts are the committer's prepared statements on Log.wconn.
type writerStmts struct {
	ins, insBlob, insDelta, insUser *sql.Stmt
}

func (l *Log) prepareWriter(ctx context.Context) error {
	var err error
	prep := func(q string) *sql.Stmt {
		if err != nil {
			return nil
		}
		var st *sql.Stmt
		st, err = l.wconn.PrepareContext(ctx, q)
		return st
	}
	l.stmts.ins = prep(`INSERT INTO records
		(seq, time, user, session, kind, ref, blob, users, args, outcome, prev_sum, sum)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`)
	l.stmts.insUser = prep(`INSERT INTO record_users (user, seq) VALUES (?, ?)`)
	// A blob already stored (the same message twice) is kept: dedup.
	l.stmts.insBlob = prep(`INSERT OR IGNORE INTO inline_blobs (sha, data, codec, size) VALUES (?, ?, ?, ?)`)
	l.stmts.insDelta = prep(`INSERT OR IGNORE INTO blob_deltas (sha, base, prefix) VALUES (?, ?, ?)`)
	if err != nil {
		return fmt.Errorf("prepare writer statements: %w", err)
	}
	return nil
}

// syncWAL makes every record up to seq durable and names it in HEAD. A
// failed fsync fails the log: what reached the disk is unknown.
func (l *Log) syncWAL(seq int64, sum [32]byte) error {
	if err := l.syncWALFile(); err != nil {
		l.logger.Error("fsync of the undo log failed; the log is failed", "seq", seq, "err", err)
		l.mu.Lock()
		l.stats.FailedCommits++
		if l.failed == nil {
			l.failed = &FailedError{Cause: fmt.Errorf("records up to %d: %w", seq, err)}
		}
		failed := l.failed
		l.mu.Unlock()
		return fmt.Errorf("append to undo log %s: %w", l.dir, failed)
	}
	l.mu.Lock()
	l.syncedSeq = seq
	l.stats.Fsyncs++
	l.mu.Unlock()
	// HEAD names only durable records: it must never lead what a power
	// failure leaves on disk, or Open would call the log truncated.
	l.writeHead(seq, sum)
	return nil
}

// writeHead replaces DIR/HEAD with the given tail. It is written only after
// the commit is durable and deliberately not fsynced: see checkHead for why a
// lagging HEAD is safe. A failure only costs the truncation check some
// precision, so it is logged, not returned.
func (l *Log) writeHead(seq int64, sum [32]byte) {
	// HEAD is overwritten in place through a file kept open: a create and
	// rename per commit cost more than the commit itself on a busy ext4.
	// The line has a fixed width (seq padded to 20 digits) so a shorter one
	// never leaves stale bytes behind. A torn write is possible in a crash;
	// readHead then fails and Open treats HEAD as unreadable (a warning),
	// which is safe because HEAD only ever lags the records.
	data := fmt.Sprintf("%020d %s\n", seq, hex.EncodeToString(sum[:]))
	var err error
	if l.headFile == nil {
		l.headFile, err = os.OpenFile(filepath.Join(l.dir, headName), os.O_WRONLY|os.O_CREATE, 0o644)
	}
	if err == nil {
		_, err = l.headFile.WriteAt([]byte(data), 0)
	}
	if err != nil {
		l.logger.Warn("could not update HEAD; it lags until the next commit", "seq", seq, "err", err)
	}
}

// readHead parses DIR/HEAD.
func readHead(dir string) (int64, [32]byte, error) {
	var sum [32]byte
	b, err := os.ReadFile(filepath.Join(dir, headName))
	if err != nil {
		return 0, sum, err
	}
	seqStr, sumStr, ok := strings.Cut(strings.TrimSuffix(string(b), "\n"), " ")
	seq, err := strconv.ParseInt(seqStr, 10, 64)
	if !ok || err != nil || seq < 0 {
		return 0, sum, fmt.Errorf("HEAD %q: want \"<seq> <sum hex>\"", b)
	}
	raw, err := hex.DecodeString(sumStr)
	if err != nil || len(raw) != len(sum) {
		return 0, sum, fmt.Errorf("HEAD %q: sum is not 64 hex digits", b)
	}
	copy(sum[:], raw)
	return seq, sum, nil
}

// lockDir takes an exclusive flock on DIR/LOCK so two processes never append
// to one chain. The file is opened read-only: a lock needs no write access,
// and a file open for writing would keep the file system from being remounted
// read-only.
func lockDir(dir string) (*os.File, error) {
	path := filepath.Join(dir, lockName)
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE, 0o644)
	if err != nil {
		return nil, wrapOpen(err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s is locked by another process", ErrUnavailable, path)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return f, nil
}

// escapeDSNPath escapes the characters that end or escape the path part of a
// SQLite URI filename.
func escapeDSNPath(p string) string {
	return strings.NewReplacer("%", "%25", "?", "%3f", "#", "%23").Replace(p)
}

// syncDir fsyncs a directory so the names created in it are durable.
func syncDir(path string) error {
	d, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open directory for fsync: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync directory %s: %w", path, err)
	}
	return nil
}

// nonNil keeps empty JSON columns NOT NULL.
func nonNil(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
}
