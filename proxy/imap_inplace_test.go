package proxy_test

import (
	"fmt"
	"net"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/emersion/go-imap/v2"

	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
)

var copyUIDRe = regexp.MustCompile(`\[COPYUID \d+ \d+ (\d+)\]`)

// command sends one tagged command and returns its responses, the tagged
// one last, on one line.
func command(t *testing.T, conn net.Conn, r *lineReader, tag, line string) string {
	t.Helper()
	fmt.Fprintf(conn, "%s %s\r\n", tag, line)
	return strings.Join(r.until(t, tag+" "), " / ")
}

// serverMessageIDs maps every UID in alice's INBOX, read from Dovecot
// directly, to its Message-Id.
func serverMessageIDs(t *testing.T, tb *testbed.Testbed) map[imap.UID]string {
	t.Helper()
	c := testbedtest.IMAP(t, tb.Stack.IMAPAddr, "alice", tb.Stack.Password("alice"))
	defer c.Close()
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	sec := &imap.FetchItemBodySection{Specifier: imap.PartSpecifierHeader, HeaderFields: []string{"Message-Id"}, Peek: true}
	var all imap.UIDSet
	all.AddRange(1, 0)
	msgs, err := c.Fetch(all, &imap.FetchOptions{UID: true, BodySection: []*imap.FetchItemBodySection{sec}}).Collect()
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[imap.UID]string)
	for _, m := range msgs {
		out[m.UID] = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(string(m.FindBodySection(sec))), "Message-Id:"))
	}
	return out
}

// TestIMAPCopyIntoSelectedMailboxKeepsUIDs: with Dovecot 2.3's maildir a
// message copied or moved twice into the mailbox it is in (the selected
// one) gets back the file name of the expunged original, which
// dovecot-uidlist still lists under the original's UID; the next session
// that syncs gives the message a UID no command reported ("Expunged
// message reappeared, giving a new UID"), and the undo log could not
// know. Through undomail every message must stay at a UID some APPENDUID
// or COPYUID told the client. The server itself is checked.
func TestIMAPCopyIntoSelectedMailboxKeepsUIDs(t *testing.T) {
	for _, how := range []string{"MOVE", "COPY"} {
		t.Run(how, func(t *testing.T) {
			tb := testbedtest.Start(t, nil)
			a, ra := rawSession(t, tb.IMAPAddr(), "alice", tb.Stack.Password("alice"))
			b, rb := rawSession(t, tb.IMAPAddr(), "alice", tb.Stack.Password("alice"))
			c, rc := rawSession(t, tb.IMAPAddr(), "alice", tb.Stack.Password("alice"))
			// Which UIDs each Message-Id is at, as the client was told.
			want := map[string][]imap.UID{}
			// Twelve messages: with very few, Dovecot rewrites
			// dovecot-uidlist whole at each change and drops the old
			// name before anyone sees it twice (probed).
			const n = 12
			for i := 1; i <= n; i++ {
				id := fmt.Sprintf("<inplace.%d@client.test>", i)
				msg := "Message-Id: " + id + "\r\nSubject: x\r\n\r\nhi\r\n"
				fmt.Fprintf(a, "a%d APPEND INBOX {%d+}\r\n%s\r\n", i, len(msg), msg)
				l := ra.until(t, fmt.Sprintf("a%d ", i))
				var v, u uint32
				if _, err := fmt.Sscanf(l[len(l)-1], fmt.Sprintf("a%d OK [APPENDUID %%d %%d]", i), &v, &u); err != nil {
					t.Fatalf("APPEND %d: %q: %v", i, l, err)
				}
				want[id] = []imap.UID{imap.UID(u)}
			}
			command(t, a, ra, "s", "SELECT INBOX")
			command(t, b, rb, "s", "SELECT INBOX")
			command(t, c, rc, "s", "SELECT INBOX")

			id := "<inplace.1@client.test>"
			// inPlace copies or moves the message at uid into INBOX and
			// notes where the client was told it went.
			inPlace := func(tag string, uid imap.UID) imap.UID {
				l := command(t, a, ra, tag, fmt.Sprintf("UID %s %d INBOX", how, uid))
				t.Logf("UID %s %d INBOX: %s", how, uid, l)
				m := copyUIDRe.FindStringSubmatch(l)
				if !strings.Contains(l, " / "+tag+" OK") && !strings.HasPrefix(l, tag+" OK") || m == nil {
					return uid
				}
				dst, _ := strconv.ParseUint(m[1], 10, 32)
				if how == "MOVE" {
					want[id] = []imap.UID{imap.UID(dst)}
				} else {
					want[id] = append(want[id], imap.UID(dst))
				}
				return imap.UID(dst)
			}
			first := want[id][0]
			u := inPlace("c1", first)
			if how == "COPY" && u != first {
				// Another session expunges the original: the copy alone
				// remains, as after the MOVE.
				command(t, b, rb, "d", fmt.Sprintf("UID STORE %d +FLAGS.SILENT (\\Deleted)", first))
				command(t, b, rb, "e", fmt.Sprintf("UID EXPUNGE %d", first))
				want[id] = want[id][1:]
			}
			command(t, a, ra, "n", "NOOP")
			inPlace("c2", u)
			// A third session of the user, selected since before, stores
			// a message: it reads dovecot-uidlist.
			msg := "Message-Id: <inplace.b@client.test>\r\nSubject: x\r\n\r\nhi\r\n"
			fmt.Fprintf(c, "b APPEND INBOX {%d+}\r\n%s\r\n", len(msg), msg)
			l := rc.until(t, "b ")
			var v, bu uint32
			if _, err := fmt.Sscanf(l[len(l)-1], "b OK [APPENDUID %d %d]", &v, &bu); err != nil {
				t.Fatalf("APPEND in session b: %q: %v", l, err)
			}
			want["<inplace.b@client.test>"] = []imap.UID{imap.UID(bu)}
			command(t, c, rc, "n", "NOOP")
			command(t, b, rb, "n", "NOOP")
			command(t, a, ra, "n2", "NOOP")

			got := map[string][]imap.UID{}
			for uid, mid := range serverMessageIDs(t, tb) {
				got[mid] = append(got[mid], uid)
			}
			for _, us := range got {
				sort.Slice(us, func(i, j int) bool { return us[i] < us[j] })
			}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				log, _ := os.ReadFile(tb.Stack.DovecotLog())
				var warn []string
				for _, l := range strings.Split(string(log), "\n") {
					if strings.Contains(l, "Warning:") || strings.Contains(l, "Error:") {
						warn = append(warn, l)
					}
				}
				t.Fatalf("Dovecot holds\n%v\nthe client was told\n%v\nDovecot's warnings:\n%s", got, want, strings.Join(warn, "\n"))
			}
		})
	}
}
