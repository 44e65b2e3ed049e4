package timetravel

import (
	"context"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/undomail/undomail/timetravel/zfstest"
)

func TestMain(m *testing.M) { os.Exit(zfstest.Main(m)) }

// tlog sends a store's log to the test log.
type tlog struct{ tb testing.TB }

func (w tlog) Write(p []byte) (int, error) {
	w.tb.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func testLogger(tb testing.TB) *slog.Logger {
	if os.Getenv("TIMETRAVEL_LOG") == "" {
		return slog.New(slog.NewTextHandler(tlog{tb}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	return slog.New(slog.NewTextHandler(tlog{tb}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func testCtx(tb testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	tb.Cleanup(cancel)
	return ctx
}

// Message file names as Dovecot writes them.
const (
	msgA = "1732183200.M1P100.host,S=10,W=11:2,S"
	msgB = "1732183201.M2P100.host,S=10,W=11:2,"
	msgC = "1732183202.M3P100.host,S=10,W=11"
)

// writeFixture writes a small mail store: two users with maildirs, index
// files and a subfolder, the way Dovecot lays them out.
func writeFixture(tb testing.TB, root string) {
	tb.Helper()
	files := map[string]string{}
	for _, u := range []string{"alice", "bob"} {
		md := u + "/Maildir/"
		files[md+"cur/"+msgA] = "From: a\r\n\r\nmessage A for " + u
		files[md+"cur/"+msgB] = "From: b\r\n\r\nmessage B for " + u
		files[md+"new/"+msgC] = "From: c\r\n\r\nmessage C for " + u
		files[md+"dovecot.index"] = "index v1 " + u
		files[md+"dovecot.index.log"] = "log v1"
		files[md+"dovecot-uidlist"] = "3 V1732183200 N4\n1 " + msgA + "\n"
		files[md+"dovecot-keywords"] = "0 $Forwarded\n"
		files[md+"subscriptions"] = "Sent\n"
		files[md+".Sent/cur/1732183300.M9P1.host,S=4:2,S"] = "sent"
		files[md+".Sent/dovecot-uidlist"] = "3 V1 N2\n"
	}
	for rel, content := range files {
		p := filepath.Join(root, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			tb.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			tb.Fatal(err)
		}
	}
	for _, u := range []string{"alice", "bob"} {
		for _, d := range []string{"tmp", ".Sent/new", ".Sent/tmp"} {
			if err := os.MkdirAll(filepath.Join(root, u, "Maildir", d), 0o700); err != nil {
				tb.Fatal(err)
			}
		}
	}
}

// readTree describes every entry under root: type, permissions, content
// and modification time, so two trees compare equal only if a user (or
// Dovecot) could not tell them apart.
func readTree(tb testing.TB, root string) map[string]string {
	tb.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case info.IsDir():
			out[rel] = fmt.Sprintf("dir %v", info.Mode().Perm())
		case info.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			out[rel] = fmt.Sprintf("file %v mtime=%d %q", info.Mode().Perm(), info.ModTime().UnixNano(), b)
		default:
			out[rel] = fmt.Sprintf("other %v", info.Mode())
		}
		return nil
	})
	if err != nil {
		tb.Fatalf("read tree %s: %v", root, err)
	}
	return out
}

// diffTrees returns a readable list of differences, empty if equal.
func diffTrees(want, got map[string]string) string {
	var d []string
	for k, w := range want {
		if g, ok := got[k]; !ok {
			d = append(d, "missing "+k)
		} else if g != w {
			d = append(d, fmt.Sprintf("%s: got %s, want %s", k, g, w))
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			d = append(d, "unexpected "+k)
		}
	}
	sort.Strings(d)
	return strings.Join(d, "\n")
}

func assertTree(tb testing.TB, root string, want map[string]string) {
	tb.Helper()
	if d := diffTrees(want, readTree(tb, root)); d != "" {
		tb.Fatalf("tree %s differs:\n%s", root, d)
	}
}

// rewriteInPlace overwrites the start of a file without truncating or
// renaming it, as Dovecot does with its index files.
func rewriteInPlace(tb testing.TB, p, data string) {
	tb.Helper()
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := f.WriteAt([]byte(data), 0); err != nil {
		tb.Fatal(err)
	}
	if err := f.Close(); err != nil {
		tb.Fatal(err)
	}
}

func appendTo(tb testing.TB, p, data string) {
	tb.Helper()
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := f.WriteString(data); err != nil {
		tb.Fatal(err)
	}
	if err := f.Close(); err != nil {
		tb.Fatal(err)
	}
}

// mutate changes a store in every way a rollback must undo.
func mutate(tb testing.TB, root, tag string) {
	tb.Helper()
	md := filepath.Join(root, "alice", "Maildir")
	rewriteInPlace(tb, filepath.Join(md, "dovecot.index"), "INDEX "+tag)
	appendTo(tb, filepath.Join(md, "dovecot-uidlist"), "4 "+tag+"\n")
	// A flag change renames the message file.
	cur := filepath.Join(md, "cur")
	entries, err := os.ReadDir(cur)
	if err != nil {
		tb.Fatal(err)
	}
	if len(entries) > 0 {
		old := filepath.Join(cur, entries[0].Name())
		if err := os.Rename(old, old+"T"); err != nil {
			tb.Fatal(err)
		}
	}
	// Expunge one, deliver one, create a folder, delete a folder.
	if len(entries) > 1 {
		if err := os.Remove(filepath.Join(cur, entries[1].Name())); err != nil {
			tb.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(md, "new", "1732184000.M"+tag+".host"), []byte("new mail "+tag), 0o600); err != nil {
		tb.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(root, "bob", "Maildir", ".Folder"+tag, "cur"), 0o700); err != nil {
		tb.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(root, "bob", "Maildir", ".Sent")); err != nil {
		tb.Fatal(err)
	}
}

func names(snaps []Snapshot) string {
	var n []string
	for _, s := range snaps {
		n = append(n, s.Name)
	}
	return strings.Join(n, ",")
}
