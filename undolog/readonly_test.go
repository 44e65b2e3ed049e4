package undolog

import (
	"context"
	"errors"
	"testing"
)

func TestOpenReadOnlyWhileOpen(t *testing.T) {
	dir := t.TempDir()
	l, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := l.Append(context.Background(), &Record{Kind: "test.verb", User: "alice"}); err != nil {
		t.Fatal(err)
	}
	ro, err := OpenReadOnly(dir)
	if err != nil {
		t.Fatalf("OpenReadOnly while the writer has it open: %v", err)
	}
	defer ro.Close()
	// A record committed after the reader opened is visible to it.
	if err := l.Append(context.Background(), &Record{Kind: "test.verb", User: "bob"}); err != nil {
		t.Fatal(err)
	}
	recs, err := ro.Records(context.Background(), Filter{})
	if err != nil || len(recs) != 2 {
		t.Fatalf("read-only Records = %d records, %v; want 2", len(recs), err)
	}
	if err := ro.Append(context.Background(), &Record{Kind: "test.verb"}); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Append on a read-only log: %v, want ErrUnavailable", err)
	}
	if _, err := ro.NewBlob(); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("NewBlob on a read-only log: %v, want ErrUnavailable", err)
	}
	if _, err := OpenReadOnly(t.TempDir()); err == nil {
		t.Fatal("OpenReadOnly of an empty directory succeeded")
	}
}
