package undolog

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
)

// The log's schema version lives in SQLite's header field user_version
// (PRAGMA user_version), which a transaction updates atomically with the
// DDL that changes the schema. It is mirrored into meta.schema_version,
// the key binaries before versioned migrations read and refuse unless it
// is "1": so even such an old binary refuses a migrated log instead of
// writing records it cannot describe.
//
// To change the schema: append a migration below, never edit one that has
// shipped (logs in the field were built by it), and extend
// TestMigrateFromV1 if the migration moves data.

// schemaVersion is the newest schema this binary reads and writes: the
// version of the last migration.
var schemaVersion = migrations[len(migrations)-1].version

// migration turns a log of schema version-1 into version.
type migration struct {
	version int
	what    string // for the log line that reports the upgrade
	sql     string
}

// migrations are applied in order, all pending ones in one transaction.
var migrations = []migration{
	{1, "records, record_users and meta (the first undo log)", `
CREATE TABLE IF NOT EXISTS meta (
	key   TEXT PRIMARY KEY,
	value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS records (
	seq      INTEGER PRIMARY KEY,  -- rowid: paging by seq needs no extra index
	time     INTEGER NOT NULL,     -- unix nanoseconds
	user     TEXT NOT NULL,
	session  TEXT NOT NULL,
	kind     TEXT NOT NULL,
	ref      INTEGER NOT NULL,
	blob     TEXT NOT NULL,
	users    TEXT NOT NULL,        -- JSON array, exactly as hashed
	args     BLOB NOT NULL,
	outcome  BLOB NOT NULL,
	prev_sum BLOB NOT NULL,
	sum      BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_time ON records(time);
CREATE INDEX IF NOT EXISTS records_kind ON records(kind);
CREATE INDEX IF NOT EXISTS records_outcome ON records(ref) WHERE kind = 'outcome';

-- record_users files each record under its actor and every affected user, so
-- a user's timeline is an index range scan ordered by seq.
CREATE TABLE IF NOT EXISTS record_users (
	user TEXT NOT NULL,
	seq  INTEGER NOT NULL,
	PRIMARY KEY (user, seq)
) WITHOUT ROWID;
`},
	{2, "inline_blobs: small message blobs inside the database", `
-- inline_blobs holds blobs up to Options.InlineBlobMax, named by SHA-256 like
-- the files in blobs/. They are written in the same transaction as the first
-- record naming them, so one fsync makes both durable; see blob.go.
CREATE TABLE IF NOT EXISTS inline_blobs (
	sha  TEXT PRIMARY KEY,
	data BLOB NOT NULL
) WITHOUT ROWID;
`},
	{3, "records_undo_id: records indexed by the undo id in their arguments", `
CREATE INDEX IF NOT EXISTS records_undo_id ON records(` + undoIDExpr + `) WHERE ` + undoIDExpr + ` IS NOT NULL;
`},
	{4, "blob_deltas: a blob stored as the bytes it adds before another blob", `
-- blob_deltas holds blobs whose content is prefix followed by the content
-- of blob base (an inline or file blob, never another delta): a message as
-- delivered is the message as submitted with the delivering server's
-- header lines before it, and is stored as those lines and a reference
-- (BlobWriter.CommitDelta). Written in the same transaction as the first
-- record naming sha, like inline_blobs.
CREATE TABLE IF NOT EXISTS blob_deltas (
	sha    TEXT PRIMARY KEY,
	base   TEXT NOT NULL,
	prefix BLOB NOT NULL
) WITHOUT ROWID;
`},
	{5, "inline_blobs a rowid table with compressed blobs; prev_sum implicit; no time index; no outcomes in the kind index", `
-- inline_blobs becomes a rowid table: a WITHOUT ROWID table keeps at most
-- about a quarter page of a row in its b-tree and the rest in whole
-- overflow pages, so a 2.5 KB blob took 4.3 KB; a rowid table keeps up to
-- a page less 35 bytes in the leaf (https://www.sqlite.org/fileformat2.html,
-- "Cell Payload Overflow Pages"). codec 0: data is the blob; codec 1: data
-- is the blob compressed with DEFLATE (RFC 1951) and size is the blob's
-- length (see pack.go). Blobs written before keep codec 0.
ALTER TABLE inline_blobs RENAME TO inline_blobs_v4;
CREATE TABLE inline_blobs (
	id    INTEGER PRIMARY KEY,
	sha   TEXT NOT NULL UNIQUE,
	codec INTEGER NOT NULL DEFAULT 0,
	size  INTEGER,
	data  BLOB NOT NULL
);
INSERT INTO inline_blobs (sha, data) SELECT sha, data FROM inline_blobs_v4 ORDER BY sha;
DROP TABLE inline_blobs_v4;

-- Records from now on store an empty prev_sum: it is the sum of the
-- record before, which that record holds (Record.PrevSum).
-- Record times never go backwards from now on (the committer sees to
-- it), so a time bound is found by bisecting seqs (page.go) and the
-- time index goes.
DROP INDEX IF EXISTS records_time;

-- Outcome records are half the log and are found by ref
-- (records_outcome), never by kind: the kind index leaves them out.
-- Queries by kind say kind != 'outcome' so SQLite may use it
-- (https://www.sqlite.org/partialindex.html).
DROP INDEX IF EXISTS records_kind;
CREATE INDEX records_kind ON records(kind) WHERE kind != 'outcome';
`},
}

// ErrSchemaTooNew means the log was written by a newer undomail, with a
// schema this binary does not know. The log is left untouched.
var ErrSchemaTooNew = errors.New("undo log written by a newer undomail")

// SchemaError reports a log whose schema version this binary cannot use.
type SchemaError struct {
	Found int // the log's schema version
	Known int // the newest version this binary knows
}

// Error implements error.
func (e *SchemaError) Error() string {
	return fmt.Sprintf("schema version %d is newer than this undomail knows (%d): run the undomail release that wrote it, "+
		"or a later one; the log was not changed", e.Found, e.Known)
}

// Unwrap returns ErrSchemaTooNew.
func (e *SchemaError) Unwrap() error { return ErrSchemaTooNew }

// querier is what schema reads need: a *sql.DB, *sql.Conn or *sql.Tx.
type querier interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// readSchemaVersion returns the log's schema version: user_version, or for
// a log written before user_version was kept, 1 if it has a records table
// (those logs say schema_version 1 in meta) and 0 for an empty database.
func readSchemaVersion(ctx context.Context, db querier) (int, error) {
	var v int
	if err := db.QueryRowContext(ctx, "PRAGMA user_version").Scan(&v); err != nil {
		return 0, fmt.Errorf("read user_version: %w", err)
	}
	if v != 0 {
		return v, nil
	}
	var n int
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'records'`).Scan(&n); err != nil {
		return 0, fmt.Errorf("look for the records table: %w", err)
	}
	if n == 0 {
		return 0, nil
	}
	var meta string
	if err := db.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = 'schema_version'`).Scan(&meta); err != nil {
		return 0, fmt.Errorf("read meta.schema_version of a log without user_version: %w", err)
	}
	if meta != "1" {
		return 0, fmt.Errorf("meta.schema_version is %q but user_version is 0: not a log this undomail wrote", meta)
	}
	return 1, nil
}

// migrate brings the database to schemaVersion in one transaction: a crash
// or error leaves the log at its old version, whole. A log newer than
// schemaVersion is refused before anything is written.
func migrate(ctx context.Context, db *sql.DB, logger *slog.Logger) error {
	// The DSN's _txlock=immediate makes this BEGIN IMMEDIATE: the version
	// read and the DDL cannot interleave with another writer.
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin schema migration: %w", err)
	}
	defer tx.Rollback()
	from, err := readSchemaVersion(ctx, tx)
	if err != nil {
		return fmt.Errorf("schema: %w", err)
	}
	switch {
	case from > schemaVersion:
		return &SchemaError{Found: from, Known: schemaVersion}
	case from == schemaVersion:
		return nil
	}
	for _, m := range migrations {
		if m.version <= from {
			continue
		}
		if _, err := tx.ExecContext(ctx, m.sql); err != nil {
			return fmt.Errorf("migrate schema to version %d (%s): %w", m.version, m.what, err)
		}
		if from > 0 {
			logger.Info("migrating undo log schema", "from", m.version-1, "to", m.version, "change", m.what)
		}
	}
	// PRAGMA takes no parameters; schemaVersion is our own integer.
	if _, err := tx.ExecContext(ctx, "PRAGMA user_version = "+strconv.Itoa(schemaVersion)); err != nil {
		return fmt.Errorf("set user_version to %d: %w", schemaVersion, err)
	}
	if _, err := tx.ExecContext(ctx, `INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)`, strconv.Itoa(schemaVersion)); err != nil {
		return fmt.Errorf("record schema version %d in meta: %w", schemaVersion, err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit schema migration %d -> %d: %w", from, schemaVersion, err)
	}
	if from > 0 {
		logger.Info("undo log schema migrated", "from", from, "to", schemaVersion)
	}
	return nil
}
