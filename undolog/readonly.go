package undolog

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
)

// errReadOnly is the cause every write to a log opened with OpenReadOnly
// fails with.
var errReadOnly = errors.New("undo log opened read-only")

// OpenReadOnly opens the undo log in dir for queries only, for operator
// commands such as `undomail log`. It takes no lock and writes nothing, so
// it works while `undomail serve` has the log open (SQLite's WAL lets
// readers see every committed transaction) and on a read-only copy. It does
// not verify the log; that is Check's job. Append and NewBlob fail with
// ErrUnavailable.
func OpenReadOnly(dir string) (*Log, error) {
	path := filepath.Join(dir, dbName)
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("open undo log %s read-only: no undo log there: %w", dir, err)
	}
	db, err := openReadOnly(context.Background(), path)
	if err != nil {
		return nil, fmt.Errorf("open undo log %s read-only: %w", dir, err)
	}
	// A newer schema may mean records this binary would misread; an older
	// one lacks what its queries use (migrate.go) until serve migrates it.
	switch v, err := readSchemaVersion(context.Background(), db); {
	case err != nil:
		db.Close()
		return nil, fmt.Errorf("open undo log %s read-only: %w", dir, err)
	case v > schemaVersion:
		db.Close()
		return nil, fmt.Errorf("open undo log %s read-only: %w", dir, &SchemaError{Found: v, Known: schemaVersion})
	case v < schemaVersion:
		db.Close()
		return nil, fmt.Errorf("open undo log %s read-only: schema version %d predates this undomail's %d: "+
			"start undomail serve with this release once to migrate it (undomail fsck reads it as it is)", dir, v, schemaVersion)
	}
	l := &Log{
		dir:           dir,
		db:            db,
		logger:        slog.Default().With("dir", dir),
		failed:        &FailedError{Cause: errReadOnly},
		committerDone: make(chan struct{}),
	}
	l.cond = sync.NewCond(&l.mu)
	close(l.committerDone) // no committer runs
	last, ok, err := lastRecord(context.Background(), db)
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open undo log %s read-only: %w", dir, err)
	}
	if ok {
		l.headSeq, l.headSum = last.Seq, last.Sum
	}
	return l, nil
}
