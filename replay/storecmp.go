package replay

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/textproto"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"github.com/undomail/undomail/verb"
)

// This file reads a mail store straight from its files and compares two
// of them, message by message. Drills compare a replayed clone with a
// later snapshot; cycles compare the store after the replay with the
// snapshot of the present taken before the rewind (present.go).

// mailUsers lists the users with mail in either tree: the directories
// of the mail root (the layout MAIL_ROOT/<user>/Maildir).
func mailUsers(roots ...string) ([]string, error) {
	seen := map[string]bool{}
	for _, root := range roots {
		ents, err := os.ReadDir(root)
		if err != nil {
			return nil, fmt.Errorf("list users in %s: %w", root, err)
		}
		for _, e := range ents {
			if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
				seen[e.Name()] = true
			}
		}
	}
	var out []string
	for u := range seen {
		out = append(out, u)
	}
	sort.Strings(out)
	return out, nil
}

// storeState is every message of a mail store: by "user/folder", the
// flags of each message by its identity (its undo id, or a hash of its
// content), one entry per copy.
type storeState map[string]map[string][]string

// readMaildirs reads a store laid out as ROOT/<user>/Maildir (Maildir++:
// INBOX in Maildir, folder F in Maildir/.F), straight from the files:
// flags from the file names (and dovecot-keywords for keywords). users,
// if not nil, limits it to those users.
func readMaildirs(root string, only map[string]bool, kc *keyCache) (storeState, error) {
	users, err := mailUsers(root)
	if err != nil {
		return nil, err
	}
	st := storeState{}
	for _, u := range users {
		if only != nil && !only[u] {
			continue
		}
		md := filepath.Join(root, u, "Maildir")
		if _, err := os.Stat(md); errors.Is(err, os.ErrNotExist) {
			continue
		}
		folders := map[string]string{"INBOX": md}
		ents, err := os.ReadDir(md)
		if err != nil {
			return nil, err
		}
		for _, e := range ents {
			if e.IsDir() && strings.HasPrefix(e.Name(), ".") && e.Name() != "." && e.Name() != ".." {
				folders[strings.TrimPrefix(e.Name(), ".")] = filepath.Join(md, e.Name())
			}
		}
		for name, dir := range folders {
			msgs, err := readMaildir(dir, kc)
			if err != nil {
				return nil, err
			}
			st[u+"/"+name] = msgs
		}
	}
	return st, nil
}

// errRaced: a file was renamed while the folder was read.
var errRaced = errors.New("a message file was renamed while the folder was read")

// readMaildir reads one folder until two reads agree: Dovecot may rename
// a file meanwhile (new/ to cur/ when a client selects the folder: reads
// are not held back during a cycle), and a file moved from new/ to cur/
// between the two listings would be missed or counted twice.
func readMaildir(dir string, kc *keyCache) (map[string][]string, error) {
	var last map[string][]string
	keys := map[string]string{} // a file's unique name -> its message key: the bytes never change
	for try := 0; ; try++ {
		out, err := readMaildirOnce(dir, keys, kc)
		switch {
		case errors.Is(err, errRaced) && try < 8:
			continue
		case err != nil:
			return nil, err
		case last != nil && sameFolder(last, out):
			return out, nil
		case try >= 8:
			return out, nil
		}
		last = out
	}
}

func sameFolder(a, b map[string][]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if strings.Join(v, " ") != strings.Join(b[k], " ") {
			return false
		}
	}
	return true
}

func readMaildirOnce(dir string, keys map[string]string, kc *keyCache) (map[string][]string, error) {
	keywords := map[byte]string{}
	if b, err := os.ReadFile(filepath.Join(dir, "dovecot-keywords")); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			var n int
			var name string
			if _, err := fmt.Sscanf(line, "%d %s", &n, &name); err == nil && n < 26 {
				keywords['a'+byte(n)] = name
			}
		}
	}
	out := map[string][]string{}
	for _, sub := range []string{"cur", "new"} {
		ents, err := os.ReadDir(filepath.Join(dir, sub))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		for _, e := range ents {
			if !e.Type().IsRegular() {
				continue
			}
			unique, _, _ := strings.Cut(e.Name(), ":")
			key, ok := keys[unique]
			if !ok {
				var err error
				key, err = kc.key(filepath.Join(dir, sub, e.Name()), e)
				if errors.Is(err, os.ErrNotExist) {
					return nil, fmt.Errorf("%s: %w", filepath.Join(dir, sub, e.Name()), errRaced)
				}
				if err != nil {
					return nil, err
				}
				keys[unique] = key
			}
			out[key] = append(out[key], maildirFlags(e.Name(), keywords))
		}
	}
	for k := range out {
		sort.Strings(out[k])
	}
	return out, nil
}

// keyCache remembers message keys by file (device and inode): a
// snapshot of the copy backend and the store it was taken from share the
// files of the messages they both hold (hard links), read once.
type keyCache struct {
	byFile map[[2]uint64]string
}

func newKeyCache() *keyCache { return &keyCache{byFile: map[[2]uint64]string{}} }

// key reads the key of the message in file path (nil kc: no cache).
func (kc *keyCache) key(path string, e os.DirEntry) (string, error) {
	var id [2]uint64
	cached := false
	if kc != nil {
		if info, err := e.Info(); err != nil {
			return "", err
		} else if st, ok := info.Sys().(*syscall.Stat_t); ok {
			id, cached = [2]uint64{uint64(st.Dev), st.Ino}, true
			if k, ok := kc.byFile[id]; ok {
				return k, nil
			}
		}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	k := MessageKey(b)
	if cached {
		kc.byFile[id] = k
	}
	return k, nil
}

// MessageKey identifies a message: its topmost Undomail-Id, or a hash of
// its bytes with line ends as LF (Dovecot's maildir stores them so; a
// message logged with CRLF hashes the same).
func MessageKey(b []byte) string {
	tr := textproto.NewReader(bufio.NewReader(bytes.NewReader(b)))
	if h, err := tr.ReadMIMEHeader(); err == nil {
		if id := strings.TrimSpace(h.Get(verb.TraceHeader)); id != "" {
			return id
		}
	}
	sum := sha256.Sum256(bytes.ReplaceAll(b, []byte("\r\n"), []byte("\n")))
	return "sha256:" + hex.EncodeToString(sum[:8])
}

// maildirFlags renders a maildir file name's flags as IMAP flags.
func maildirFlags(name string, keywords map[byte]string) string {
	_, info, ok := strings.Cut(name, ":2,")
	if !ok {
		return "()"
	}
	std := map[byte]string{'D': `\Draft`, 'F': `\Flagged`, 'R': `\Answered`, 'S': `\Seen`, 'T': `\Deleted`}
	var fs []string
	for i := 0; i < len(info); i++ {
		if f, ok := std[info[i]]; ok {
			fs = append(fs, f)
		} else if k, ok := keywords[info[i]]; ok {
			fs = append(fs, k)
		}
	}
	sort.Strings(fs)
	return "(" + strings.Join(fs, " ") + ")"
}

// storeDiff is one way a store differs from another: a folder only one
// of them has (Key ""), or a message (by key) whose copies or flags in
// the folder differ. Got and Want are the flags of each copy.
type storeDiff struct {
	Folder    string // "user/folder"
	Key       string
	Got, Want []string
	// NoGot and NoWant mark a folder missing from got or from want.
	NoGot, NoWant bool
}

// user and mailbox split Folder.
func (d storeDiff) user() string    { u, _, _ := strings.Cut(d.Folder, "/"); return u }
func (d storeDiff) mailbox() string { _, m, _ := strings.Cut(d.Folder, "/"); return m }

// describe says what differs; gotName and wantName name the two sides
// ("after replay", "in the snapshot").
func (d storeDiff) describe(gotName, wantName string) string {
	switch {
	case d.Key == "" && d.NoGot:
		return fmt.Sprintf("%s: missing %s (%d messages %s)", d.Folder, gotName, len(d.Want), wantName)
	case d.Key == "" && d.NoWant:
		return fmt.Sprintf("%s: there %s, not %s (%d messages)", d.Folder, gotName, wantName, len(d.Got))
	case len(d.Got) == 0:
		return fmt.Sprintf("%s: message %s is %s %v but not %s", d.Folder, d.Key, wantName, d.Want, gotName)
	case len(d.Want) == 0:
		return fmt.Sprintf("%s: message %s is there %s %v but not %s", d.Folder, d.Key, gotName, d.Got, wantName)
	}
	return fmt.Sprintf("%s: message %s has flags %v %s, %v %s", d.Folder, d.Key, d.Got, gotName, d.Want, wantName)
}

// unionKeys returns the keys of a and b, sorted, each once.
func unionKeys[V any](a, b map[string]V) []string {
	keys := map[string]bool{}
	for k := range a {
		keys[k] = true
	}
	for k := range b {
		keys[k] = true
	}
	out := make([]string, 0, len(keys))
	for k := range keys {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// diffStores lists how got differs from want, folder by folder. A folder
// only one side has is one difference, followed by one per message in
// it (Got or Want empty).
func diffStores(got, want storeState) []storeDiff {
	var diffs []storeDiff
	for _, n := range unionKeys(got, want) {
		g, w := got[n], want[n]
		if strings.HasSuffix(n, "/INBOX") {
			// INBOX always exists (RFC 9051 5.1): a user whose maildir
			// Dovecot has not made yet has an empty one.
			if g == nil {
				g = map[string][]string{}
			}
			if w == nil {
				w = map[string][]string{}
			}
		}
		switch {
		case g == nil:
			diffs = append(diffs, storeDiff{Folder: n, NoGot: true, Want: keysOf(w)})
		case w == nil:
			diffs = append(diffs, storeDiff{Folder: n, NoWant: true, Got: keysOf(g)})
		}
		for _, k := range unionKeys(g, w) {
			gf, wf := g[k], w[k]
			if strings.Join(gf, " ") != strings.Join(wf, " ") {
				diffs = append(diffs, storeDiff{Folder: n, Key: k, Got: gf, Want: wf})
			}
		}
	}
	return diffs
}

func keysOf(m map[string][]string) []string {
	var out []string
	for k, copies := range m {
		for range copies {
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out
}

// compareStores lists how got differs from want for a drill, in words: a
// folder only one side has is one line.
func compareStores(got, want storeState) []string {
	var out []string
	for _, d := range diffStores(got, want) {
		if d.Key != "" && !strings.HasSuffix(d.Folder, "/INBOX") && (got[d.Folder] == nil || want[d.Folder] == nil) {
			continue // said by the folder's line
		}
		out = append(out, d.describe("after replay", "in the snapshot"))
	}
	return out
}
