package undolog

import (
	"errors"
	"fmt"
	"io/fs"
	"syscall"
	"testing"

	"github.com/mattn/go-sqlite3"
)

func TestClassify(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want errClass
	}{
		{"sqlite full", sqlite3.Error{Code: sqlite3.ErrFull}, classFull},
		{"sqlite readonly", sqlite3.Error{Code: sqlite3.ErrReadonly, ExtendedCode: sqlite3.ErrReadonlyDbMoved}, classUnavailable},
		{"sqlite busy", sqlite3.Error{Code: sqlite3.ErrBusy}, classUnavailable},
		{"sqlite ioerr fsync", sqlite3.Error{Code: sqlite3.ErrIoErr, ExtendedCode: sqlite3.ErrIoErrFsync}, classFatal},
		{"sqlite corrupt", sqlite3.Error{Code: sqlite3.ErrCorrupt}, classFatal},
		{"sqlite constraint (chain inconsistency)", sqlite3.Error{Code: sqlite3.ErrConstraint}, classFatal},
		{"ENOSPC wrapped", &fs.PathError{Op: "write", Path: "x", Err: syscall.ENOSPC}, classFull},
		{"EDQUOT", fmt.Errorf("write blob: %w", syscall.EDQUOT), classFull},
		{"EROFS", &fs.PathError{Op: "open", Path: "x", Err: syscall.EROFS}, classUnavailable},
		{"EACCES", &fs.PathError{Op: "open", Path: "x", Err: syscall.EACCES}, classUnavailable},
		{"EIO", &fs.PathError{Op: "sync", Path: "x", Err: syscall.EIO}, classFatal},
		{"unknown", errors.New("something else"), classFatal},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := classify(tt.err); got != tt.want {
				t.Fatalf("classify(%v) = %d, want %d", tt.err, got, tt.want)
			}
		})
	}
}

func TestErrorWrapping(t *testing.T) {
	cause := &fs.PathError{Op: "sync", Path: "undo.db-wal", Err: syscall.EIO}
	err := fmt.Errorf("append: %w", wrapClass(classFatal, cause))
	if !errors.Is(err, ErrUnavailable) || !errors.Is(err, syscall.EIO) || errors.Is(err, ErrFull) {
		t.Fatalf("fatal error %v: want ErrUnavailable and the cause, not ErrFull", err)
	}
	if err := wrapClass(classFull, cause); !errors.Is(err, ErrFull) || errors.Is(err, ErrUnavailable) {
		t.Fatalf("full error %v: want ErrFull only", err)
	}
	ce := &ChecksumError{Seq: 812, Stored: "3fa1", Computed: "9b0c"}
	if !errors.Is(fmt.Errorf("x: %w", ce), ErrChecksumMismatch) {
		t.Fatalf("ChecksumError does not wrap ErrChecksumMismatch")
	}
}
