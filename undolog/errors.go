package undolog

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/mattn/go-sqlite3"
)

// Sentinel errors. The proxy maps ErrFull to SMTP 452 and ErrUnavailable to
// SMTP 451 / IMAP NO [UNAVAILABLE]; every error Append returns wraps one of
// them, so the proxy never has to guess.
var (
	// ErrFull means the disk (or quota) is full. It is not sticky: the next
	// Append may succeed once space has been freed.
	ErrFull = errors.New("undo log full")

	// ErrUnavailable means the log cannot be written right now: a read-only
	// file system, a permission problem, or a failed log (see FailedError).
	ErrUnavailable = errors.New("undo log unavailable")

	// ErrClosed is returned by Append and NewBlob after Close. It wraps
	// ErrUnavailable, since for a client the log is simply not there.
	ErrClosed = fmt.Errorf("undo log closed: %w", ErrUnavailable)

	// ErrCorrupt means stored data does not match its checksum or the hash
	// chain is broken. Open refuses such a log; run Check to see where.
	ErrCorrupt = errors.New("undo log corrupt")

	// ErrTruncated means records that were once committed are gone: HEAD names
	// a later record than the database holds.
	ErrTruncated = errors.New("undo log truncated")

	// ErrChecksumMismatch is wrapped by every ChecksumError.
	ErrChecksumMismatch = errors.New("checksum mismatch")
)

// ChecksumError reports content whose SHA-256 differs from the one it was
// stored under: a record (Seq != 0) or a blob (Blob != "").
type ChecksumError struct {
	Seq      int64  // record sequence number, 0 for a blob
	Blob     string // blob name (sha256 hex), "" for a record
	Stored   string // hex sum the content was stored under
	Computed string // hex sum of the content as read now
}

// Error implements error.
func (e *ChecksumError) Error() string {
	if e.Blob != "" {
		return fmt.Sprintf("blob %s: content hashes to %s: %v", e.Blob, e.Computed, ErrChecksumMismatch)
	}
	return fmt.Sprintf("record %d: %v (stored %s, computed %s)", e.Seq, ErrChecksumMismatch, e.Stored, e.Computed)
}

// Unwrap returns ErrChecksumMismatch.
func (e *ChecksumError) Unwrap() error { return ErrChecksumMismatch }

// FailedError is returned by every Append once the log has failed: after an
// I/O error on commit or fsync, corruption, or a chain inconsistency. After a
// failed fsync nobody can know what reached the disk, so the log refuses all
// further writes until the process reopens it (and Open re-verifies the tail).
// It wraps both ErrUnavailable and the original cause.
type FailedError struct {
	Cause error
}

// Error implements error.
func (e *FailedError) Error() string {
	return "undo log failed, reopen required: " + e.Cause.Error()
}

// Unwrap returns ErrUnavailable and the original cause.
func (e *FailedError) Unwrap() []error { return []error{ErrUnavailable, e.Cause} }

// errClass says how a write error affects the log.
type errClass int

const (
	// classFatal: the on-disk state is unknown; the log fails (sticky).
	classFatal errClass = iota
	// classFull: out of space; nothing was written, retry later.
	classFull
	// classUnavailable: read-only, permission or lock contention; retry later.
	classUnavailable
)

// classify maps an error from SQLite or the file system to an errClass.
// Anything not recognised is fatal: when in doubt about what reached the disk
// the log must stop rather than keep on trucking (docs/architecture.md,
// "Binding rules": write-ahead, fail-safe).
func classify(err error) errClass {
	var se sqlite3.Error
	if errors.As(err, &se) {
		switch se.Code {
		case sqlite3.ErrFull:
			return classFull
		case sqlite3.ErrReadonly, sqlite3.ErrPerm, sqlite3.ErrCantOpen, sqlite3.ErrBusy, sqlite3.ErrLocked, sqlite3.ErrAuth:
			return classUnavailable
		default:
			return classFatal
		}
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		switch errno {
		case syscall.ENOSPC, syscall.EDQUOT:
			return classFull
		case syscall.EROFS, syscall.EACCES, syscall.EPERM:
			return classUnavailable
		}
	}
	return classFatal
}

// wrapClass wraps err with the sentinel of its class. Fatal errors become a
// FailedError; the caller decides whether that also fails the log.
func wrapClass(c errClass, err error) error {
	switch c {
	case classFull:
		return fmt.Errorf("%w: %w", ErrFull, err)
	case classUnavailable:
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	default:
		return &FailedError{Cause: err}
	}
}
