package timetravel

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/undomail/undomail/timetravel/zfstest"
)

// backend opens a fresh, empty store for one test.
type backend struct {
	name string
	open func(t *testing.T) Store
	// cloneBlocksDestroy: Destroy of a cloned snapshot returns ErrInUse (zfs)
	// rather than succeeding and leaving the clone intact (copy).
	cloneBlocksDestroy bool
	// branchBlocksDestroy: after rolling back to a snapshot, it cannot be
	// destroyed while newer snapshots (on the branch) exist (zfs).
	branchBlocksDestroy bool
}

func backends() []backend {
	return []backend{
		{name: "copy", open: func(t *testing.T) Store {
			live := filepath.Join(t.TempDir(), "live")
			if err := os.Mkdir(live, 0o755); err != nil {
				t.Fatal(err)
			}
			s, err := OpenCopy(filepath.Join(t.TempDir(), "snapshots"), live, Options{Logger: testLogger(t)})
			if err != nil {
				t.Fatal(err)
			}
			return s
		}},
		{name: "zfs", open: func(t *testing.T) Store { return openZFS(t) }, cloneBlocksDestroy: true, branchBlocksDestroy: true},
		{name: "zfs-per-user", open: func(t *testing.T) Store { return openZFS(t, "alice", "bob") }, cloneBlocksDestroy: true, branchBlocksDestroy: true},
	}
}

// openZFS creates POOL/mail on a fresh pool, with one child dataset per
// user given.
func openZFS(t testing.TB, users ...string) *ZFSStore {
	t.Helper()
	p := zfstest.NewPool(t)
	p.ZFS(t, "create", p.Name+"/mail")
	for _, u := range users {
		p.ZFS(t, "create", p.Name+"/mail/"+u)
	}
	s, err := OpenZFS(testCtx(t), p.Name+"/mail", Options{Logger: testLogger(t), CommandTimeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(p.Mountpoint, "mail"); s.Path() != want {
		t.Fatalf("Path() = %s, want %s", s.Path(), want)
	}
	return s
}

var conformance = []struct {
	name string
	run  func(t *testing.T, b backend, s Store)
}{
	{"snapshot, list, get", func(t *testing.T, b backend, s Store) {
		ctx := testCtx(t)
		start := time.Now().Add(-2 * time.Second)
		writeFixture(t, s.Path())
		if got, err := s.List(ctx); err != nil || len(got) != 0 {
			t.Fatalf("List on empty store = %v, %v; want none", got, err)
		}
		a, err := s.Snapshot(ctx, "undomail-00000000000000001234-20261121T101500Z", 1234, map[string]string{"reason": "periodic", "cycle": "c-7"})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Snapshot(ctx, "b", 1300, nil); err != nil {
			t.Fatal(err)
		}
		list, err := s.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := names(list), a.Name+",b"; got != want {
			t.Fatalf("List = %s, want %s (oldest first)", got, want)
		}
		if list[0].Seq != 1234 || list[1].Seq != 1300 {
			t.Fatalf("seqs = %d, %d; want 1234, 1300", list[0].Seq, list[1].Seq)
		}
		if list[0].Labels["reason"] != "periodic" || list[0].Labels["cycle"] != "c-7" || len(list[0].Labels) != 2 {
			t.Fatalf("labels = %v", list[0].Labels)
		}
		if len(list[1].Labels) != 0 {
			t.Fatalf("labels of unlabelled snapshot = %v", list[1].Labels)
		}
		if list[0].Created.Before(start) || list[0].Created.After(time.Now()) || list[1].Created.Before(list[0].Created) {
			t.Fatalf("created times %v, %v out of order or range", list[0].Created, list[1].Created)
		}
		got, err := s.Get(ctx, a.Name)
		if err != nil {
			t.Fatal(err)
		}
		if got.Name != a.Name || got.Seq != 1234 || !got.Created.Equal(a.Created) || got.Labels["cycle"] != "c-7" {
			t.Fatalf("Get = %+v, want %+v", got, a)
		}
	}},
	{"name taken: ErrExists", func(t *testing.T, b backend, s Store) {
		ctx := testCtx(t)
		writeFixture(t, s.Path())
		if _, err := s.Snapshot(ctx, "a", 1, nil); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Snapshot(ctx, "a", 2, nil); !errors.Is(err, ErrExists) {
			t.Fatalf("second Snapshot a: %v, want ErrExists", err)
		}
		if sn, err := s.Get(ctx, "a"); err != nil || sn.Seq != 1 {
			t.Fatalf("Get a = %+v, %v; want seq 1 untouched", sn, err)
		}
	}},
	{"missing snapshot: ErrNotFound", func(t *testing.T, b backend, s Store) {
		ctx := testCtx(t)
		if _, err := s.Get(ctx, "nope"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Get: %v, want ErrNotFound", err)
		}
		if err := s.Rollback(ctx, "nope"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Rollback: %v, want ErrNotFound", err)
		}
		if _, err := s.Clone(ctx, "nope", "drill"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Clone: %v, want ErrNotFound", err)
		}
	}},
	{"invalid names", func(t *testing.T, b backend, s Store) {
		ctx := testCtx(t)
		for _, n := range []string{"", "../x", "a/b", ".hidden", "-r", "a b", "a@b"} {
			if _, err := s.Snapshot(ctx, n, 1, nil); !errors.Is(err, ErrInvalidName) {
				t.Errorf("Snapshot(%q): %v, want ErrInvalidName", n, err)
			}
		}
		if _, err := s.Snapshot(ctx, "ok", 1, map[string]string{"big": strings.Repeat("x", MaxLabelsSize)}); !errors.Is(err, ErrInvalidName) {
			t.Errorf("Snapshot with oversized labels: %v, want ErrInvalidName", err)
		}
		if _, err := s.Clone(ctx, "ok", "../escape"); !errors.Is(err, ErrInvalidName) {
			t.Errorf("Clone to ../escape: %v, want ErrInvalidName", err)
		}
	}},
	{"destroy is idempotent", func(t *testing.T, b backend, s Store) {
		ctx := testCtx(t)
		writeFixture(t, s.Path())
		if _, err := s.Snapshot(ctx, "a", 1, nil); err != nil {
			t.Fatal(err)
		}
		for i := range 2 {
			if err := s.Destroy(ctx, "a"); err != nil {
				t.Fatalf("Destroy #%d: %v", i+1, err)
			}
		}
		if err := s.Destroy(ctx, "never-existed"); err != nil {
			t.Fatalf("Destroy never-existed: %v", err)
		}
		if _, err := s.Get(ctx, "a"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Get after Destroy: %v, want ErrNotFound", err)
		}
		if list, err := s.List(ctx); err != nil || len(list) != 0 {
			t.Fatalf("List after Destroy = %s, %v", names(list), err)
		}
		// The name is free again.
		if _, err := s.Snapshot(ctx, "a", 2, nil); err != nil {
			t.Fatalf("Snapshot a again: %v", err)
		}
	}},
	{"rollback restores content exactly", func(t *testing.T, b backend, s Store) {
		ctx := testCtx(t)
		writeFixture(t, s.Path())
		want := readTree(t, s.Path())
		if _, err := s.Snapshot(ctx, "a", 1, nil); err != nil {
			t.Fatal(err)
		}
		mutate(t, s.Path(), "x")
		if d := diffTrees(want, readTree(t, s.Path())); d == "" {
			t.Fatal("mutate changed nothing; the test would prove nothing")
		}
		if err := s.Rollback(ctx, "a"); err != nil {
			t.Fatal(err)
		}
		assertTree(t, s.Path(), want)
		// Rolling back twice gives the same result.
		mutate(t, s.Path(), "y")
		if err := s.Rollback(ctx, "a"); err != nil {
			t.Fatal(err)
		}
		assertTree(t, s.Path(), want)
	}},
	{"newer snapshots survive a rollback", func(t *testing.T, b backend, s Store) {
		ctx := testCtx(t)
		writeFixture(t, s.Path())
		stateA := readTree(t, s.Path())
		if _, err := s.Snapshot(ctx, "a", 1, nil); err != nil {
			t.Fatal(err)
		}
		mutate(t, s.Path(), "1")
		stateB := readTree(t, s.Path())
		if _, err := s.Snapshot(ctx, "b", 2, map[string]string{"reason": "pre-cycle"}); err != nil {
			t.Fatal(err)
		}
		mutate(t, s.Path(), "2")
		if err := s.Rollback(ctx, "a"); err != nil {
			t.Fatal(err)
		}
		assertTree(t, s.Path(), stateA)
		list, err := s.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if got := names(list); got != "a,b" {
			t.Fatalf("List after rollback to a = %s, want a,b", got)
		}
		if list[1].Seq != 2 || list[1].Labels["reason"] != "pre-cycle" {
			t.Fatalf("b after rollback = %+v", list[1])
		}
		// Snapshots taken after the rollback sort after the older ones.
		mutate(t, s.Path(), "3")
		stateC := readTree(t, s.Path())
		if _, err := s.Snapshot(ctx, "c", 3, nil); err != nil {
			t.Fatal(err)
		}
		// Undo the rollback: forward to b.
		if err := s.Rollback(ctx, "b"); err != nil {
			t.Fatal(err)
		}
		assertTree(t, s.Path(), stateB)
		if err := s.Rollback(ctx, "c"); err != nil {
			t.Fatal(err)
		}
		assertTree(t, s.Path(), stateC)
		if list, err := s.List(ctx); err != nil || names(list) != "a,b,c" {
			t.Fatalf("List = %s, %v; want a,b,c", names(list), err)
		}
		for _, n := range []string{"c", "b", "a"} {
			if err := s.Destroy(ctx, n); err != nil {
				t.Fatalf("Destroy %s: %v", n, err)
			}
		}
		if list, err := s.List(ctx); err != nil || len(list) != 0 {
			t.Fatalf("List after destroying all = %s, %v", names(list), err)
		}
		assertTree(t, s.Path(), stateC)
	}},
	{"destroy after rollback", func(t *testing.T, b backend, s Store) {
		ctx := testCtx(t)
		writeFixture(t, s.Path())
		if _, err := s.Snapshot(ctx, "a", 1, nil); err != nil {
			t.Fatal(err)
		}
		mutate(t, s.Path(), "1")
		if _, err := s.Snapshot(ctx, "b", 2, nil); err != nil {
			t.Fatal(err)
		}
		if err := s.Rollback(ctx, "a"); err != nil {
			t.Fatal(err)
		}
		err := s.Destroy(ctx, "a")
		if b.branchBlocksDestroy {
			if !errors.Is(err, ErrInUse) {
				t.Fatalf("Destroy a while b's branch depends on it: %v, want ErrInUse", err)
			}
			if err := s.Destroy(ctx, "b"); err != nil {
				t.Fatal(err)
			}
			err = s.Destroy(ctx, "a")
		}
		if err != nil {
			t.Fatalf("Destroy a: %v", err)
		}
		if list, err := s.List(ctx); err != nil || (b.branchBlocksDestroy && len(list) != 0) || (!b.branchBlocksDestroy && names(list) != "b") {
			t.Fatalf("List = %s, %v", names(list), err)
		}
	}},
	{"clone is writable and independent", func(t *testing.T, b backend, s Store) {
		ctx := testCtx(t)
		writeFixture(t, s.Path())
		stateA := readTree(t, s.Path())
		if _, err := s.Snapshot(ctx, "a", 1, nil); err != nil {
			t.Fatal(err)
		}
		mutate(t, s.Path(), "live")
		liveState := readTree(t, s.Path())
		path, err := s.Clone(ctx, "a", "drill-1")
		if err != nil {
			t.Fatal(err)
		}
		assertTree(t, path, stateA)
		if _, err := s.Clone(ctx, "a", "drill-1"); !errors.Is(err, ErrExists) {
			t.Fatalf("second Clone drill-1: %v, want ErrExists", err)
		}
		// A drill writes to its clone the way Dovecot would.
		mutate(t, path, "drill")
		assertTree(t, s.Path(), liveState)
		if err := s.Rollback(ctx, "a"); err != nil {
			t.Fatal(err)
		}
		assertTree(t, s.Path(), stateA)
		mutate(t, s.Path(), "live2")
		if d := diffTrees(readTree(t, path), stateA); d == "" {
			t.Fatal("clone lost the drill's changes")
		}
		if err := s.DestroyClone(ctx, "drill-1"); err != nil {
			t.Fatal(err)
		}
		if entries, err := os.ReadDir(path); err == nil && len(entries) > 0 {
			t.Fatalf("clone %s still has %d entries after DestroyClone", path, len(entries))
		}
		if err := s.DestroyClone(ctx, "drill-1"); err != nil {
			t.Fatalf("DestroyClone again: %v", err)
		}
		if _, err := s.Clone(ctx, "a", "drill-1"); err != nil {
			t.Fatalf("Clone after DestroyClone: %v", err)
		}
		if err := s.DestroyClone(ctx, "drill-1"); err != nil {
			t.Fatal(err)
		}
	}},
	{"destroy a cloned snapshot", func(t *testing.T, b backend, s Store) {
		ctx := testCtx(t)
		writeFixture(t, s.Path())
		stateA := readTree(t, s.Path())
		if _, err := s.Snapshot(ctx, "a", 1, nil); err != nil {
			t.Fatal(err)
		}
		path, err := s.Clone(ctx, "a", "c")
		if err != nil {
			t.Fatal(err)
		}
		err = s.Destroy(ctx, "a")
		if b.cloneBlocksDestroy {
			var inUse *InUseError
			if !errors.Is(err, ErrInUse) || !errors.As(err, &inUse) || len(inUse.Dependents) == 0 {
				t.Fatalf("Destroy of cloned snapshot: %v, want an *InUseError", err)
			}
			if _, err := s.Get(ctx, "a"); err != nil {
				t.Fatalf("snapshot gone after refused Destroy: %v", err)
			}
		} else {
			if err != nil {
				t.Fatalf("Destroy of cloned snapshot: %v, want nil (clones are independent)", err)
			}
			assertTree(t, path, stateA)
		}
		if err := s.DestroyClone(ctx, "c"); err != nil {
			t.Fatal(err)
		}
		if err := s.Destroy(ctx, "a"); err != nil {
			t.Fatal(err)
		}
	}},
	{"rollback refuses while a file is open", func(t *testing.T, b backend, s Store) {
		ctx := testCtx(t)
		writeFixture(t, s.Path())
		if _, err := s.Snapshot(ctx, "a", 1, nil); err != nil {
			t.Fatal(err)
		}
		mutate(t, s.Path(), "x")
		mutated := readTree(t, s.Path())
		f, err := os.Open(filepath.Join(s.Path(), "alice", "Maildir", "dovecot.index"))
		if err != nil {
			t.Fatal(err)
		}
		err = s.Rollback(ctx, "a")
		var busy *BusyError
		if !errors.Is(err, ErrBusy) || !errors.As(err, &busy) {
			f.Close()
			t.Fatalf("Rollback with an open file: %v, want a *BusyError", err)
		}
		found := false
		for _, h := range busy.Holders {
			found = found || h.PID == os.Getpid()
		}
		f.Close()
		if !found {
			t.Fatalf("BusyError %v does not name this process (%d)", busy, os.Getpid())
		}
		assertTree(t, s.Path(), mutated)
		if err := s.Rollback(ctx, "a"); err != nil {
			t.Fatalf("Rollback after closing: %v", err)
		}
	}},
	{"verify reports seq mismatches", func(t *testing.T, b backend, s Store) {
		ctx := testCtx(t)
		writeFixture(t, s.Path())
		for i, n := range []string{"a", "b", "c"} {
			if _, err := s.Snapshot(ctx, n, int64(i+1), nil); err != nil {
				t.Fatal(err)
			}
		}
		got, err := Verify(ctx, s, map[string]int64{"a": 1, "b": 5, "gone": 7})
		if err != nil {
			t.Fatal(err)
		}
		want := []Mismatch{
			{Name: "b", Kind: SeqDiffers, LogSeq: 5, StoreSeq: 2},
			{Name: "c", Kind: Unrecorded, LogSeq: NoSeq, StoreSeq: 3},
			{Name: "gone", Kind: MissingSnapshot, LogSeq: 7, StoreSeq: NoSeq},
		}
		if len(got) != len(want) {
			t.Fatalf("Verify = %v, want %v", got, want)
		}
		for i := range want {
			if got[i] != want[i] {
				t.Fatalf("Verify[%d] = %v, want %v", i, got[i], want[i])
			}
		}
		if got, err := Verify(ctx, s, map[string]int64{"a": 1, "b": 2, "c": 3}); err != nil || len(got) != 0 {
			t.Fatalf("Verify of a consistent log = %v, %v; want none", got, err)
		}
	}},
}

// TestConformance runs the same behaviours against every backend.
func TestConformance(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			for _, c := range conformance {
				t.Run(c.name, func(t *testing.T) {
					c.run(t, b, b.open(t))
				})
			}
		})
	}
}
