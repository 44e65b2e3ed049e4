// Package timetravel keeps point-in-time snapshots of the mail store (a
// tree of maildirs) that undomail can list, roll back to, clone for
// recovery drills, and destroy.
//
// Two backends implement Store:
//
//   - zfs (ZFSStore): one ZFS dataset holds the store, optionally with one
//     child dataset per user. Snapshots are recursive ZFS snapshots; the
//     undo-log position is a ZFS user property on each of them.
//   - copy (CopyStore): a portable backend for laptops and the demo.
//     Snapshots are trees of hard links (for immutable maildir message
//     files) and copies (for everything Dovecot rewrites in place).
//
// A snapshot is a consistent cut only if nothing writes to the store while
// it is taken: the caller wedges the proxy first (docs/architecture.md, "Time travel").
// Likewise Rollback needs a quiet store: the caller stops Dovecot and waits
// until no process has a file open under Path. Backends check again and
// refuse with ErrBusy, because rolling back under an open file corrupts
// Dovecot's indexes (REFERENCE-mailserver.md, "Rolling back a maildir under
// Dovecot") and can leave zfs-fuse hung.
//
// A Store is safe for concurrent use by one process; two processes must not
// operate on the same store at once.
package timetravel

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"time"
)

// NoSeq is the Seq of a snapshot that carries no undo-log position, such as
// one taken by another tool (zfs-auto-snapshot) on the same dataset.
const NoSeq int64 = -1

// MaxLabelsSize bounds the JSON encoding of a snapshot's labels. Labels are
// small free-form metadata; 1024 bytes is the limit of a ZFS user property
// value in older pool versions (zfs-fuse), kept for both backends.
const MaxLabelsSize = 1024

// Snapshot is one point-in-time copy of the store.
type Snapshot struct {
	// Name is unique within the store, e.g.
	// "undomail-00000000000000001234-20261121T101500Z".
	Name string
	// Created is when the snapshot was taken.
	Created time.Time
	// Seq is the undo-log position recorded with the snapshot, or NoSeq.
	// ZFS keeps it in the user property undomail:seq, the copy backend in
	// the snapshot's metadata file.
	Seq int64
	// Labels is small free-form metadata (reason, cycle id) stored with the
	// snapshot. It is empty, possibly nil, when there are none.
	Labels map[string]string
}

// Store is a mail store that can be snapshotted and rolled back.
type Store interface {
	// Snapshot takes a snapshot of the store now and records seq and labels
	// with it, atomically: a snapshot is never visible without its seq. It
	// returns an error wrapping ErrExists if name is already taken (by a
	// snapshot, even one only reachable through an older branch), and
	// ErrInvalidName if name is not a valid snapshot name.
	Snapshot(ctx context.Context, name string, seq int64, labels map[string]string) (Snapshot, error)

	// List returns all snapshots of the store, oldest first, including those
	// taken after a snapshot the store was later rolled back to. An empty
	// store returns an empty slice and no error.
	List(ctx context.Context) ([]Snapshot, error)

	// Get returns one snapshot, or an error wrapping ErrNotFound.
	Get(ctx context.Context, name string) (Snapshot, error)

	// Rollback makes the live store identical to the snapshot: files and
	// directories created since come back, files created since disappear.
	// All snapshots, newer ones included, are kept, so a rollback can
	// itself be undone by rolling back to a newer snapshot.
	//
	// It returns an error wrapping ErrNotFound for an unknown snapshot and
	// ErrBusy (a *BusyError) if any process has a file or directory open
	// under Path; nothing is changed in either case. Rolling back to the
	// same snapshot twice gives the same result.
	Rollback(ctx context.Context, name string) error

	// Clone makes a writable copy of the snapshot, independent of the live
	// store and of the snapshot, for a recovery drill and returns its path.
	// It returns an error wrapping ErrNotFound for an unknown snapshot and
	// ErrExists if a clone called cloneName exists.
	Clone(ctx context.Context, name, cloneName string) (path string, err error)

	// DestroyClone removes a clone made by Clone. Idempotent: removing a
	// missing clone returns nil. It returns ErrBusy if a process has a file
	// open in the clone.
	DestroyClone(ctx context.Context, cloneName string) error

	// Destroy removes a snapshot. Idempotent: destroying a missing snapshot
	// returns nil. It returns an error wrapping ErrInUse if something
	// depends on the snapshot (ZFS: a clone, or a branch of newer snapshots
	// left by a rollback); the copy backend never does.
	Destroy(ctx context.Context, name string) error

	// Path is where the live store is mounted or located.
	Path() string
}

// UserRollbacker is implemented by stores that keep one dataset per user
// (ZFSStore with child datasets): it rolls back one user and leaves the
// rest of the store as it is.
type UserRollbacker interface {
	// RollbackUser makes the live store of user identical to that user's
	// part of snapshot name. Errors are as for Store.Rollback; ErrNotFound
	// also when user has no dataset of its own, live or in the snapshot.
	RollbackUser(ctx context.Context, name, user string) error
}

var (
	// ErrNotFound means the snapshot, clone or dataset does not exist.
	ErrNotFound = errors.New("timetravel: not found")
	// ErrExists means the snapshot or clone name is already taken.
	ErrExists = errors.New("timetravel: already exists")
	// ErrBusy means a process has files open in the store (see BusyError).
	ErrBusy = errors.New("timetravel: files open in store")
	// ErrInUse means a snapshot cannot be destroyed because something
	// depends on it (see InUseError).
	ErrInUse = errors.New("timetravel: snapshot in use")
	// ErrInvalidName means a snapshot, clone or user name is not allowed.
	ErrInvalidName = errors.New("timetravel: invalid name")
	// ErrTimeout means a zfs command did not finish within its time limit.
	ErrTimeout = errors.New("timetravel: command timed out")
)

// InUseError reports what depends on a snapshot that was to be destroyed.
type InUseError struct {
	Snapshot   string
	Dependents []string // e.g. ZFS datasets whose origin is the snapshot
}

// Error implements error.
func (e *InUseError) Error() string {
	return fmt.Sprintf("snapshot %s is in use by %s", e.Snapshot, strings.Join(e.Dependents, ", "))
}

// Unwrap makes errors.Is(err, ErrInUse) true.
func (e *InUseError) Unwrap() error { return ErrInUse }

// Options configures Open.
type Options struct {
	// LivePath is the live store directory. Required for the copy backend;
	// the zfs backend takes it from the dataset's mountpoint and, if
	// LivePath is set, checks that they agree.
	LivePath string
	// Logger receives one record per backend operation and per zfs
	// command. Nil means slog.Default().
	Logger *slog.Logger
	// CommandTimeout bounds each zfs command. Zero means 2 minutes.
	CommandTimeout time.Duration
	// CloneDir, for the zfs backend, is the directory under which clones
	// are mounted (CloneDir/cloneName). Empty means the mountpoint clones
	// inherit from the store dataset's parent.
	CloneDir string
}

func (o Options) logger() *slog.Logger {
	if o.Logger != nil {
		return o.Logger
	}
	return slog.Default()
}

func (o Options) timeout() time.Duration {
	if o.CommandTimeout > 0 {
		return o.CommandTimeout
	}
	return 2 * time.Minute
}

// Open opens a store from a config spec: "zfs:POOL/DATASET" or "copy:DIR",
// where DIR holds the copy backend's snapshots and opt.LivePath is the live
// store.
func Open(ctx context.Context, spec string, opt Options) (Store, error) {
	kind, arg, ok := strings.Cut(spec, ":")
	if !ok || arg == "" {
		return nil, fmt.Errorf("open store %q: want zfs:POOL/DATASET or copy:DIR", spec)
	}
	switch kind {
	case "zfs":
		return OpenZFS(ctx, arg, opt)
	case "copy":
		return OpenCopy(arg, opt.LivePath, opt)
	default:
		return nil, fmt.Errorf("open store %q: unknown backend %q (want zfs or copy)", spec, kind)
	}
}

// nameRE is the set of snapshot, clone and user names both backends accept:
// the characters ZFS allows in a snapshot name, not starting with a dot or
// dash so they can never be "." / ".." or look like an option.
var nameRE = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}$`)

// checkName returns an error wrapping ErrInvalidName if name is not valid.
func checkName(kind, name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%s name %q: %w (want [A-Za-z0-9_][A-Za-z0-9_.:-]*, at most 200 characters)", kind, name, ErrInvalidName)
	}
	return nil
}

// encodeLabels returns the JSON form of labels ("" for none).
func encodeLabels(labels map[string]string) (string, error) {
	if len(labels) == 0 {
		return "", nil
	}
	for k := range labels {
		if k == "" {
			return "", fmt.Errorf("labels: empty key: %w", ErrInvalidName)
		}
	}
	b, err := json.Marshal(labels)
	if err != nil {
		return "", fmt.Errorf("encode labels: %w", err)
	}
	if len(b) > MaxLabelsSize {
		return "", fmt.Errorf("labels: %d bytes encoded, limit %d: %w", len(b), MaxLabelsSize, ErrInvalidName)
	}
	return string(b), nil
}

// snapshotStamp is a unique, sortable, name-safe time stamp for the
// temporary names a rollback uses.
func snapshotStamp(t time.Time) string {
	return t.UTC().Format("20060102T150405.000000000Z")
}
