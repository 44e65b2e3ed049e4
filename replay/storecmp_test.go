package replay

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func writeMsg(t *testing.T, root, user, folder, sub, name, body string) {
	t.Helper()
	dir := filepath.Join(root, user, "Maildir")
	if folder != "INBOX" {
		dir = filepath.Join(dir, "."+folder)
	}
	if err := os.MkdirAll(filepath.Join(dir, sub), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, sub, name), []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestReadMaildirs reads flags from file names, keywords through
// dovecot-keywords, identities from Undomail-Id or the content (CRLF and
// LF alike), and limits the read to some users.
func TestReadMaildirs(t *testing.T) {
	root := t.TempDir()
	writeMsg(t, root, "alice", "INBOX", "cur", "1.a:2,FSb", "Undomail-Id: ID1\r\nSubject: x\r\n\r\nbody\r\n")
	writeMsg(t, root, "alice", "INBOX", "new", "2.a", "Subject: y\n\nbody\n")
	writeMsg(t, root, "alice", "Lists", "cur", "3.a:2,T", "Subject: y\n\nbody\n")
	writeMsg(t, root, "bob", "INBOX", "cur", "4.a:2,", "Subject: z\n\nbody\n")
	if err := os.WriteFile(filepath.Join(root, "alice", "Maildir", "dovecot-keywords"), []byte("0 kw0\n1 $Label1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	st, err := readMaildirs(root, map[string]bool{"alice": true}, newKeyCache())
	if err != nil {
		t.Fatal(err)
	}
	y := MessageKey([]byte("Subject: y\r\n\r\nbody\r\n"))
	want := storeState{
		"alice/INBOX": {"ID1": {`($Label1 \Flagged \Seen)`}, y: {"()"}},
		"alice/Lists": {y: {`(\Deleted)`}},
	}
	if !reflect.DeepEqual(st, want) {
		t.Fatalf("read %v, want %v", st, want)
	}
}

// TestDiffStoresAndRepair: differences are found message by message, a
// missing INBOX is an empty one, and the repair explains exactly what it
// names: messages by user and key, folders and what is below them, and
// messages without undo id where a cancelled verb named them by UID.
func TestDiffStoresAndRepair(t *testing.T) {
	got := storeState{
		"alice/INBOX":   {"A": {"()"}, "B": {`(\Seen)`}, "sha256:1": {"()"}},
		"alice/Work":    {"C": {"()"}},
		"alice/Work.Q3": {"D": {"()"}},
		"bob/INBOX":     {},
	}
	want := storeState{
		"alice/INBOX": {"A": {"()"}, "B": {"()"}, "E": {"()"}, "sha256:2": {"()"}},
	}
	var texts []string
	diffs := diffStores(got, want)
	for _, d := range diffs {
		texts = append(texts, d.describe("after", "before"))
	}
	wantTexts := []string{
		`alice/INBOX: message B has flags [(\Seen)] after, [()] before`,
		`alice/INBOX: message E is before [()] but not after`,
		`alice/INBOX: message sha256:1 is there after [()] but not before`,
		`alice/INBOX: message sha256:2 is before [()] but not after`,
		`alice/Work: there after, not before (1 messages)`,
		`alice/Work: message C is there after [()] but not before`,
		`alice/Work.Q3: there after, not before (1 messages)`,
		`alice/Work.Q3: message D is there after [()] but not before`,
	}
	if strings.Join(texts, "\n") != strings.Join(wantTexts, "\n") {
		t.Fatalf("differences:\n%s\nwant:\n%s", strings.Join(texts, "\n"), strings.Join(wantTexts, "\n"))
	}
	rs := newRepairSet()
	rs.msg("alice", "B", "store 5 is cancelled")
	rs.folder("alice", "Work", "delete 7 is cancelled")
	rs.anon["alice/INBOX"] = "expunge 9 is cancelled"
	rs.msg("bob", "E", "not alice's")
	var unexplained []string
	for _, d := range diffs {
		if _, ok := rs.explains(d); !ok {
			unexplained = append(unexplained, d.describe("after", "before"))
		}
	}
	if len(unexplained) != 1 || unexplained[0] != `alice/INBOX: message E is before [()] but not after` {
		t.Fatalf("unexplained %q, want only message E (its explanation is bob's)", unexplained)
	}
}

func TestCountUIDs(t *testing.T) {
	for set, n := range map[string]int{"1": 1, "1:3,7": 4, "5:2": 4, "": 0} {
		if got := countUIDs(set); got != n {
			t.Errorf("countUIDs(%q) = %d, want %d", set, got, n)
		}
	}
}
