package timetravel

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// writeManyMessages writes a store of users×perUser small message files in
// maildirs, plus each maildir's index files.
func writeManyMessages(tb testing.TB, root string, users, perUser int) {
	tb.Helper()
	body := []byte("From: x\r\nSubject: benchmark\r\n\r\n" + fmt.Sprintf("%0200d", 0))
	for u := range users {
		md := filepath.Join(root, fmt.Sprintf("user%02d", u), "Maildir")
		for _, d := range []string{"cur", "new", "tmp"} {
			if err := os.MkdirAll(filepath.Join(md, d), 0o700); err != nil {
				tb.Fatal(err)
			}
		}
		for _, f := range []string{"dovecot.index", "dovecot.index.log", "dovecot-uidlist"} {
			if err := os.WriteFile(filepath.Join(md, f), body, 0o600); err != nil {
				tb.Fatal(err)
			}
		}
		for i := range perUser {
			name := fmt.Sprintf("17321%05d.M%dP1.host,S=%d:2,S", i, i, len(body))
			if err := os.WriteFile(filepath.Join(md, "cur", name), body, 0o600); err != nil {
				tb.Fatal(err)
			}
		}
	}
}

// benchBackends are the stores the benchmarks compare, each opened empty.
func benchBackends() []struct {
	name string
	open func(b *testing.B) Store
} {
	return []struct {
		name string
		open func(b *testing.B) Store
	}{
		{"copy", func(b *testing.B) Store {
			live := filepath.Join(b.TempDir(), "live")
			if err := os.Mkdir(live, 0o755); err != nil {
				b.Fatal(err)
			}
			s, err := OpenCopy(filepath.Join(b.TempDir(), "snaps"), live, Options{Logger: testLogger(b)})
			if err != nil {
				b.Fatal(err)
			}
			return s
		}},
		{"zfs", func(b *testing.B) Store { return openZFS(b) }},
	}
}

// BenchmarkSnapshot10k measures one snapshot of a 10,000-message store.
func BenchmarkSnapshot10k(b *testing.B) {
	for _, bb := range benchBackends() {
		b.Run(bb.name, func(b *testing.B) {
			s := bb.open(b)
			writeManyMessages(b, s.Path(), 10, 1000)
			ctx := testCtx(b)
			i := 0
			for b.Loop() {
				i++
				if _, err := s.Snapshot(ctx, fmt.Sprintf("bench-%d", i), int64(i), nil); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkRollback10k measures one rollback of a 10,000-message store to
// an older snapshot, with a newer one to keep.
func BenchmarkRollback10k(b *testing.B) {
	for _, bb := range benchBackends() {
		b.Run(bb.name, func(b *testing.B) {
			s := bb.open(b)
			writeManyMessages(b, s.Path(), 10, 1000)
			ctx := testCtx(b)
			if _, err := s.Snapshot(ctx, "old", 1, nil); err != nil {
				b.Fatal(err)
			}
			if _, err := s.Snapshot(ctx, "new", 2, nil); err != nil {
				b.Fatal(err)
			}
			target := []string{"old", "new"}
			i := 0
			for b.Loop() {
				if err := s.Rollback(ctx, target[i%2]); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
	}
}
