// Package clientcheck checks a cycle from a mail client's side: a client
// that cached UIDs before the cycle must not see a UID reused for another
// message under the same UIDVALIDITY (RFC 9051 2.3.1.1), and a real
// synchronising client (mbsync) must sync afterwards without errors or
// duplicates. Tests only.
package clientcheck

import (
	"bytes"
	"fmt"
	"net"
	"net/mail"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
)

// Mailbox is what a client saw of one mailbox.
type Mailbox struct {
	UIDValidity uint32
	UIDNext     imap.UID
	// Messages maps each UID to the message's Message-Id.
	Messages map[imap.UID]string
}

// View is what a client saw of a user's mailboxes, by name.
type View map[string]Mailbox

// Look logs in at addr and reads every mailbox: UIDVALIDITY, UIDNEXT and
// each message's UID and Message-Id.
func Look(t testing.TB, addr, user, pass string) View {
	t.Helper()
	c, err := imapclient.DialInsecure(addr, nil)
	if err != nil {
		t.Fatalf("clientcheck: connect to %s: %v", addr, err)
	}
	defer c.Close()
	if err := c.Login(user, pass).Wait(); err != nil {
		t.Fatalf("clientcheck: log in as %s: %v", user, err)
	}
	list, err := c.List("", "*", nil).Collect()
	if err != nil {
		t.Fatalf("clientcheck: list %s's mailboxes: %v", user, err)
	}
	v := View{}
	for _, l := range list {
		sel, err := c.Select(l.Mailbox, &imap.SelectOptions{ReadOnly: true}).Wait()
		if err != nil {
			t.Fatalf("clientcheck: examine %s: %v", l.Mailbox, err)
		}
		mb := Mailbox{UIDValidity: sel.UIDValidity, UIDNext: sel.UIDNext, Messages: map[imap.UID]string{}}
		if sel.NumMessages > 0 {
			msgs, err := c.Fetch(imap.UIDSet{imap.UIDRange{Start: 1, Stop: 0}}, &imap.FetchOptions{UID: true, Envelope: true}).Collect()
			if err != nil {
				t.Fatalf("clientcheck: fetch %s: %v", l.Mailbox, err)
			}
			for _, m := range msgs {
				mb.Messages[m.UID] = m.Envelope.MessageID
			}
		}
		v[l.Mailbox] = mb
	}
	c.Logout().Wait()
	return v
}

// NoUIDReuse fails the test if after shows a UID that before knew for a
// different message, or a UID below before's UIDNEXT that before did not
// have (a UID handed out again), under an unchanged UIDVALIDITY; and if
// UIDNEXT went backwards. It returns how many mailboxes kept their
// UIDVALIDITY, so a test can tell the check covered something.
func NoUIDReuse(t testing.TB, before, after View) int {
	t.Helper()
	kept := 0
	for name, b := range before {
		a, ok := after[name]
		if !ok || a.UIDValidity != b.UIDValidity {
			continue // gone, or renewed: a client starts over, nothing reused
		}
		kept++
		if a.UIDNext < b.UIDNext {
			t.Errorf("%s: UIDNEXT went back from %d to %d under UIDVALIDITY %d", name, b.UIDNext, a.UIDNext, a.UIDValidity)
		}
		for uid, id := range a.Messages {
			was, known := b.Messages[uid]
			switch {
			case known && was != id:
				t.Errorf("%s: UID %d was %s before the cycle and is %s now (UIDVALIDITY %d)", name, uid, was, id, a.UIDValidity)
			case !known && uid < b.UIDNext:
				t.Errorf("%s: UID %d (%s) is below the UIDNEXT %d a client saw before the cycle, but was not there then: reused", name, uid, id, b.UIDNext)
			}
		}
	}
	return kept
}

// Mbsync is a real mbsync (isync) keeping a local Maildir copy of one
// user's mailboxes, as a desktop client would.
type Mbsync struct {
	Dir    string // the local Maildir root
	config string
}

// NewMbsync configures mbsync for user at addr (plain IMAP on loopback),
// syncing every mailbox both ways, propagating expunges and removed
// folders, as a desktop client would.
func NewMbsync(t testing.TB, addr, user, pass string) *Mbsync {
	t.Helper()
	if _, err := exec.LookPath("mbsync"); err != nil {
		t.Fatalf("mbsync not installed (apt-get install isync): %v", err)
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	m := &Mbsync{Dir: filepath.Join(dir, "mail"), config: filepath.Join(dir, "mbsyncrc")}
	if err := os.MkdirAll(m.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`IMAPAccount acct
Host %s
Port %s
User %s
Pass %s
SSLType None
AuthMechs LOGIN

IMAPStore far
Account acct

MaildirStore near
Path %s/
Inbox %s/INBOX
SubFolders Verbatim

Channel ch
Far :far:
Near :near:
Patterns *
Create Near
Remove Both
Expunge Both
Sync All
SyncState *
`, host, port, user, pass, m.Dir, m.Dir)
	if err := os.WriteFile(m.config, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return m
}

// Sync runs mbsync once and fails the test on a non-zero exit or an error
// in its output.
func (m *Mbsync) Sync(t testing.TB) string {
	t.Helper()
	var out bytes.Buffer
	cmd := exec.Command("mbsync", "-c", m.config, "-a")
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("mbsync failed: %v\n%s", err, out.String())
	}
	if s := strings.ToLower(out.String()); strings.Contains(s, "error") {
		t.Fatalf("mbsync reported an error:\n%s", out.String())
	}
	return out.String()
}

// Local reads the local copy: each folder's Message-Ids, sorted.
func (m *Mbsync) Local(t testing.TB) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	err := filepath.WalkDir(m.Dir, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() || !(filepath.Base(filepath.Dir(path)) == "cur" || filepath.Base(filepath.Dir(path)) == "new") {
			return nil
		}
		folder, _ := filepath.Rel(m.Dir, filepath.Dir(filepath.Dir(path)))
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		msg, err := mail.ReadMessage(f)
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		out[folder] = append(out[folder], strings.Trim(msg.Header.Get("Message-Id"), "<>"))
		return nil
	})
	if err != nil {
		t.Fatalf("read mbsync's maildir: %v", err)
	}
	for k := range out {
		sort.Strings(out[k])
	}
	return out
}

// Matches fails the test unless the local copy of every server folder
// holds exactly the server's messages, each once (by Message-Id).
func (m *Mbsync) Matches(t testing.TB, server View) {
	t.Helper()
	local := m.Local(t)
	for name, mb := range server {
		var want []string
		for _, id := range mb.Messages {
			want = append(want, strings.Trim(id, "<>"))
		}
		sort.Strings(want)
		got := local[name]
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("mbsync's copy of %s holds %v, the server %v", name, got, want)
		}
		for i := 1; i < len(got); i++ {
			if got[i] == got[i-1] {
				t.Errorf("mbsync's copy of %s holds %s twice", name, got[i])
			}
		}
	}
	// A folder deleted on the server stays in the local copy while it
	// holds messages: mbsync removes only empty mailboxes (Remove), to
	// keep mail safe. That is mbsync's choice, not a difference.
}
