package timetravel

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/undomail/undomail/timetravel/zfstest"
)

// TestZFSSeqProperty checks that the undo-log position is a real ZFS user
// property, visible to an operator with zfs get, on every child too, and
// that a rollback brings content back.
func TestZFSSeqProperty(t *testing.T) {
	ctx := testCtx(t)
	s := openZFS(t, "alice")
	p := filepath.Join(s.Path(), "alice", "msg")
	if err := os.WriteFile(p, []byte("before"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Snapshot(ctx, "s1", 42, map[string]string{"reason": "periodic"}); err != nil {
		t.Fatal(err)
	}
	for _, ds := range []string{s.Dataset() + "@s1", s.Dataset() + "/alice@s1"} {
		if got := zfstest.ZFS(t, "get", "-H", "-o", "value", "undomail:seq", ds); got != "42" {
			t.Fatalf("zfs get undomail:seq %s = %q, want 42", ds, got)
		}
	}
	if got := zfstest.ZFS(t, "get", "-H", "-o", "value", "undomail:labels", s.Dataset()+"@s1"); got != `{"reason":"periodic"}` {
		t.Fatalf("undomail:labels = %q", got)
	}
	if err := os.WriteFile(p, []byte("after"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.Rollback(ctx, "s1"); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(p); err != nil || string(b) != "before" {
		t.Fatalf("after rollback: %q, %v; want before", b, err)
	}
	// A snapshot another tool took has no seq.
	zfstest.ZFS(t, "snapshot", s.Dataset()+"@foreign")
	sn, err := s.Get(ctx, "foreign")
	if err != nil || sn.Seq != NoSeq {
		t.Fatalf("foreign snapshot = %+v, %v; want seq NoSeq", sn, err)
	}
}

// TestZFSRollbackUser rolls back one user's dataset and leaves the other
// alone, then rolls the whole store back, which must find alice's part of
// the snapshot although her rollback moved it.
func TestZFSRollbackUser(t *testing.T) {
	ctx := testCtx(t)
	s := openZFS(t, "alice", "bob")
	writeFixture(t, s.Path())
	stateA := readTree(t, s.Path())
	aliceA := readTree(t, filepath.Join(s.Path(), "alice"))
	if _, err := s.Snapshot(ctx, "a", 1, nil); err != nil {
		t.Fatal(err)
	}
	mutate(t, s.Path(), "1") // changes alice and bob
	bobNow := readTree(t, filepath.Join(s.Path(), "bob"))
	if _, err := s.Snapshot(ctx, "b", 2, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.RollbackUser(ctx, "a", "alice"); err != nil {
		t.Fatal(err)
	}
	assertTree(t, filepath.Join(s.Path(), "alice"), aliceA)
	assertTree(t, filepath.Join(s.Path(), "bob"), bobNow)
	if list, err := s.List(ctx); err != nil || names(list) != "a,b" {
		t.Fatalf("List = %s, %v; want a,b", names(list), err)
	}
	if err := s.RollbackUser(ctx, "a", "carol"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("RollbackUser carol: %v, want ErrNotFound", err)
	}
	if err := s.Rollback(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	assertTree(t, s.Path(), stateA)
	// And forward again to b, whose alice part lives on a branch now.
	if err := s.Rollback(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	assertTree(t, filepath.Join(s.Path(), "bob"), bobNow)
	for _, n := range []string{"b", "a"} {
		if err := s.Destroy(ctx, n); err != nil {
			t.Fatalf("Destroy %s: %v", n, err)
		}
	}
	out := zfstest.ZFS(t, "list", "-H", "-o", "name", "-r", strings.SplitN(s.Dataset(), "/", 2)[0])
	if strings.Contains(out, branchInfix) || strings.Contains(out, newInfix) || strings.Contains(out, "@") {
		t.Fatalf("datasets left after destroying every snapshot:\n%s", out)
	}
}

func TestZFSOpenRefusesPoolRoot(t *testing.T) {
	p := zfstest.NewPool(t)
	if _, err := OpenZFS(context.Background(), p.Name, Options{Logger: testLogger(t)}); err == nil {
		t.Fatal("OpenZFS on a pool's root dataset succeeded")
	}
	if _, err := OpenZFS(testCtx(t), p.Name+"/missing", Options{Logger: testLogger(t)}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("OpenZFS on a missing dataset: %v, want ErrNotFound", err)
	}
}
