package timetravel

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func openCopy(t *testing.T) *CopyStore {
	t.Helper()
	live := filepath.Join(t.TempDir(), "live")
	if err := os.Mkdir(live, 0o755); err != nil {
		t.Fatal(err)
	}
	s, err := OpenCopy(filepath.Join(t.TempDir(), "snapshots"), live, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestCopyRules proves what the copy backend links and what it copies:
// Dovecot's in-place rewrites of index files and the maildir operations
// (rename for a flag change, unlink for an expunge, append to the uidlist)
// must leave a snapshot byte-for-byte unchanged.
func TestCopyRules(t *testing.T) {
	ctx := testCtx(t)
	s := openCopy(t)
	writeFixture(t, s.Path())
	want := readTree(t, s.Path())
	if _, err := s.Snapshot(ctx, "a", 1, nil); err != nil {
		t.Fatal(err)
	}
	snap := filepath.Join(s.Dir(), "a")
	md := filepath.Join(s.Path(), "alice", "Maildir")

	// Message files are shared, index files are not.
	same := func(rel string) bool {
		a, err := os.Stat(filepath.Join(md, rel))
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.Stat(filepath.Join(snap, "alice", "Maildir", rel))
		if err != nil {
			t.Fatal(err)
		}
		return os.SameFile(a, b)
	}
	if !same("cur/" + msgA) {
		t.Errorf("message file cur/%s was copied, want a hard link", msgA)
	}
	if !same("new/" + msgC) {
		t.Errorf("message file new/%s was copied, want a hard link", msgC)
	}
	for _, f := range []string{"dovecot.index", "dovecot-uidlist", "dovecot-keywords", "subscriptions"} {
		if same(f) {
			t.Errorf("%s is a hard link, want a copy (Dovecot rewrites it in place)", f)
		}
	}

	rewriteInPlace(t, filepath.Join(md, "dovecot.index"), "REWRITTEN")                                    // (a)
	if err := os.Rename(filepath.Join(md, "cur", msgA), filepath.Join(md, "cur", msgA+"T")); err != nil { // (b)
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(md, "cur", msgB)); err != nil { // (c)
		t.Fatal(err)
	}
	appendTo(t, filepath.Join(md, "dovecot-uidlist"), "4 more\n") // (d)

	assertTree(t, snap, want)
	if err := s.Rollback(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	assertTree(t, s.Path(), want)
	assertTree(t, snap, want)
	if left, _ := filepath.Glob(s.Path() + ".undomail-*"); len(left) != 0 {
		t.Fatalf("rollback left %v", left)
	}
}

// TestCopyNotMaildir checks the rule's edge: a directory called cur that is
// not part of a maildir is copied, not linked.
func TestCopyNotMaildir(t *testing.T) {
	ctx := testCtx(t)
	s := openCopy(t)
	p := filepath.Join(s.Path(), "alice", "sieve", "cur", "script")
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte("v1"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Snapshot(ctx, "a", 1, nil); err != nil {
		t.Fatal(err)
	}
	rewriteInPlace(t, p, "v2")
	b, err := os.ReadFile(filepath.Join(s.Dir(), "a", "alice", "sieve", "cur", "script"))
	if err != nil || string(b) != "v1" {
		t.Fatalf("snapshot copy = %q, %v; want v1", b, err)
	}
}

// TestCopyRecoversInterruptedRollback simulates a crash between the two
// renames of the fallback swap: OpenCopy must finish the rollback.
func TestCopyRecoversInterruptedRollback(t *testing.T) {
	dir := t.TempDir()
	live := filepath.Join(dir, "live")
	for _, p := range []string{live + ".undomail-new-X/n", live + ".undomail-old-X/o"} {
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	s, err := OpenCopy(filepath.Join(dir, "snaps"), live, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(s.Path(), "n")); err != nil {
		t.Fatalf("new tree not moved into place: %v", err)
	}
	if left, _ := filepath.Glob(live + ".undomail-*"); len(left) != 0 {
		t.Fatalf("leftovers %v", left)
	}
}

func TestOpenSpec(t *testing.T) {
	ctx := testCtx(t)
	dir := t.TempDir()
	live := filepath.Join(dir, "live")
	if err := os.Mkdir(live, 0o755); err != nil {
		t.Fatal(err)
	}
	s, err := Open(ctx, "copy:"+filepath.Join(dir, "snaps"), Options{LivePath: live})
	if err != nil {
		t.Fatal(err)
	}
	if s.Path() != live {
		t.Fatalf("Path = %s, want %s", s.Path(), live)
	}
	for _, spec := range []string{"", "copy", "copy:", "btrfs:x", "zfs:pool", "zfs:pool/a@b"} {
		if _, err := Open(ctx, spec, Options{LivePath: live}); err == nil {
			t.Errorf("Open(%q) succeeded, want an error", spec)
		}
	}
	if _, err := Open(ctx, "copy:"+filepath.Join(live, "snaps"), Options{LivePath: live}); err == nil {
		t.Error("Open with the snapshot dir inside the live store succeeded")
	}
	if _, err := s.Snapshot(ctx, "x.json", 1, nil); !errors.Is(err, ErrInvalidName) {
		t.Errorf("copy Snapshot x.json: %v, want ErrInvalidName", err)
	}
}
