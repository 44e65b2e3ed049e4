package deploy

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"net/smtp"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	_ "github.com/mattn/go-sqlite3"

	"github.com/undomail/undomail/internal/loadtest"
	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/undolog"
)

// TestLogSizing measures what the undo log costs on disk, for the sizing
// table in docs/operations.md: bytes per delivered message (through the
// front door and delivery capture, and through capture alone) and bytes
// per IMAP verb, on the real stack. It prints the figures
// (go test ./deploy -run TestLogSizing -v) and fails if a delivered
// message's bytes are not in the log, are kept twice through front door and
// capture, or a verb left no record.
func TestLogSizing(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	logDir := tb.Config.DataDir
	const (
		small, large   = 4 << 10, 256 << 10 // a typical mail; one over the inline blob limit
		nSmall, nLarge = 100, 10
		nVerbs         = 100
	)
	size := func() int64 { return logBytes(t, logDir) }
	var rows []string
	report := func(what string, n int, before int64, recordsBefore int64) int64 {
		after := size()
		seq, _ := tb.Daemon.Log.Last()
		per := (after - before) / int64(n)
		rows = append(rows, fmt.Sprintf("| %s | %d | %d | %.1f |", what, n, per, float64(seq-recordsBefore)/float64(n)))
		return per
	}

	// Front door + delivery capture: smtp.submit and lmtp.deliver, each
	// with its outcome, and the message's bytes.
	for _, tc := range []struct {
		name  string
		bytes int
		n     int
		addr  string
	}{
		{"4 KiB message, front door + capture", small, nSmall, tb.SMTPAddr()},
		{"256 KiB message, front door + capture", large, nLarge, tb.SMTPAddr()},
		{"4 KiB message, capture only", small, nSmall, tb.Stack.SMTPAddr},
	} {
		before := size()
		plainBefore, deltasBefore := blobCounts(t, logDir)
		seqBefore, _ := tb.Daemon.Log.Last()
		inboxBefore := inboxCount(t, tb)
		sent := map[string]string{} // subject: message
		for i := range tc.n {
			subject := fmt.Sprintf("%s %d", tc.name, i)
			msg := message(subject, tc.bytes)
			sent[subject] = msg
			if err := smtp.SendMail(tc.addr, nil, "sender@example.test", []string{"alice@example.test"}, []byte(msg)); err != nil {
				t.Fatalf("%s: send %d: %v", tc.name, i, err)
			}
		}
		waitDelivered(t, tb, inboxBefore+tc.n)
		// Dovecot may show a message before undomail has logged the
		// outcome of its delivery: wait for every outcome.
		for deadline := time.Now().Add(time.Minute); ; {
			vs, err := tb.Daemon.Log.Verbs(context.Background(), undolog.Filter{Kinds: []string{"lmtp.deliver"}, AfterSeq: seqBefore})
			if err != nil {
				t.Fatal(err)
			}
			done := 0
			for _, v := range vs {
				if v.Outcome != nil {
					done++
				}
			}
			if done >= tc.n {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d of %d deliveries have a logged outcome", tc.name, done, tc.n)
			}
			time.Sleep(50 * time.Millisecond)
		}
		report(tc.name, tc.n, before, seqBefore)
		// Every message's bytes are in the log (stored compressed, so the
		// log may grow by less than a message): each delivery's blob,
		// read back and verified, ends with the message as sent.
		vs, err := tb.Daemon.Log.Verbs(context.Background(), undolog.Filter{Kinds: []string{"lmtp.deliver"}, AfterSeq: seqBefore})
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range vs {
			var a struct {
				Header struct{ Subject string } `json:"header"`
			}
			json.Unmarshal(v.Args, &a)
			msg, ok := sent[a.Header.Subject]
			if !ok {
				t.Fatalf("%s: delivery %d of a message not sent here (subject %q)", tc.name, v.Seq, a.Header.Subject)
			}
			delete(sent, a.Header.Subject)
			got, err := tb.Daemon.Log.ReadBlob(v.Blob)
			if err != nil || !bytes.HasSuffix(got, []byte(msg)) {
				t.Fatalf("%s: delivery %d: its blob (%d bytes, %v) does not end with the message sent (%d bytes)", tc.name, v.Seq, len(got), err, len(msg))
			}
		}
		if len(sent) > 0 {
			t.Fatalf("%s: %d messages sent have no logged delivery", tc.name, len(sent))
		}
		// Through both points the message's bytes are kept once: capture
		// stores what Postfix added and a reference to the front door's
		// copy (undolog's delta blobs).
		plain, deltas := blobCounts(t, logDir)
		if tc.addr == tb.SMTPAddr() && (plain-plainBefore != tc.n || deltas-deltasBefore != tc.n) {
			t.Errorf("%s: %d messages added %d whole blobs and %d deltas, want one of each per message: a message is kept twice",
				tc.name, tc.n, plain-plainBefore, deltas-deltasBefore)
		}
	}

	// IMAP verbs, each on one message, as a mail client sends them.
	c := testbedtest.IMAP(t, tb.IMAPAddr(), "alice", tb.Stack.Password("alice"))
	defer c.Close()
	if err := c.Create("Archive", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	verbs := []struct {
		name, kind string
		do         func(uid imap.UID) error
	}{
		{"STORE +FLAGS (\\Seen) (imap.store)", "imap.store", func(uid imap.UID) error {
			return c.Store(imap.UIDSetNum(uid), &imap.StoreFlags{Op: imap.StoreFlagsAdd, Flags: []imap.Flag{imap.FlagSeen}}, nil).Close()
		}},
		{"FETCH BODY[] of a 4 KiB message (imap.fetch, a read)", "imap.fetch", func(uid imap.UID) error {
			return c.Fetch(imap.UIDSetNum(uid), &imap.FetchOptions{BodySection: []*imap.FetchItemBodySection{{}}}).Close()
		}},
		{"COPY to another folder (imap.copy)", "imap.copy", func(uid imap.UID) error {
			_, err := c.Copy(imap.UIDSetNum(uid), "Archive").Wait()
			return err
		}},
		{"MOVE to another folder (imap.move)", "imap.move", func(uid imap.UID) error {
			_, err := c.Move(imap.UIDSetNum(uid), "Archive").Wait()
			return err
		}},
		{"CREATE a folder (imap.create)", "imap.create", func(uid imap.UID) error {
			return c.Create(fmt.Sprintf("Folder%d", uid), nil).Wait()
		}},
	}
	// The small messages captured without the front door are the last
	// nSmall in INBOX: UIDs nSmall+nLarge+1 ... 2*nSmall+nLarge.
	first := imap.UID(nSmall + nLarge + 1)
	for vi, v := range verbs {
		before := size()
		seqBefore, _ := tb.Daemon.Log.Last()
		for i := range nVerbs {
			uid := first + imap.UID(i)
			if vi == len(verbs)-1 {
				uid = imap.UID(1000 + i) // a folder name, not a message
			}
			if err := v.do(uid); err != nil {
				t.Fatalf("%s on UID %d: %v", v.name, uid, err)
			}
		}
		// A read is logged once the proxy has matched it to its UIDs,
		// after the client has its answer: wait for all of them.
		for deadline := time.Now().Add(time.Minute); ; {
			recs, err := tb.Daemon.Log.Records(context.Background(), undolog.Filter{Kinds: []string{v.kind}, AfterSeq: seqBefore})
			if err != nil {
				t.Fatal(err)
			}
			if len(recs) >= nVerbs {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d verbs left %d %s records", v.name, nVerbs, len(recs), v.kind)
			}
			time.Sleep(50 * time.Millisecond)
		}
		report(v.name, nVerbs, before, seqBefore)
	}
	t.Logf("undo log bytes on disk (undo.db + WAL + blobs/, after a checkpoint), measured on the real stack:\n"+
		"| what | count | bytes each | records each |\n| --- | --- | --- | --- |\n%s", strings.Join(rows, "\n"))
}

// message is an RFC 5322 message of about n bytes with a unique subject,
// made like typical mail for what compression does to it (loadtest.TypicalMessage).
func message(subject string, n int) string {
	return loadtest.TypicalMessage(rand.New(rand.NewPCG(uint64(len(subject)), uint64(n))), "sender@example.test", "alice@example.test", subject, n)
}

// logBytes checkpoints the log's WAL into undo.db and returns the bytes
// its files take: undo.db, the WAL and every blob file.
func logBytes(t *testing.T, dir string) int64 {
	t.Helper()
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(dir, "undo.db")+"?_busy_timeout=5000")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec("PRAGMA wal_checkpoint(TRUNCATE)"); err != nil {
		t.Fatalf("checkpoint %s: %v", dir, err)
	}
	db.Close()
	var total int64
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		if name := d.Name(); name == "undo.db" || name == "undo.db-wal" || strings.Contains(path, "/blobs/") {
			fi, err := d.Info()
			if err != nil {
				return err
			}
			total += fi.Size()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return total
}

// blobCounts returns how many blobs the log in dir keeps whole (in the
// database or as files) and as deltas of another.
func blobCounts(t *testing.T, dir string) (plain, deltas int) {
	t.Helper()
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(dir, "undo.db")+"?_busy_timeout=5000&mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.QueryRow(`SELECT (SELECT count(*) FROM inline_blobs), (SELECT count(*) FROM blob_deltas)`).Scan(&plain, &deltas); err != nil {
		t.Fatalf("count blobs in %s: %v", dir, err)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "blobs", "[0-9a-f][0-9a-f]", "*"))
	return plain + len(files), deltas
}

func inboxCount(t *testing.T, tb *testbed.Testbed) int {
	t.Helper()
	out, err := tb.Stack.Doveadm(context.Background(), "-f", "tab", "mailbox", "status", "-u", "alice", "messages", "INBOX")
	if err != nil {
		t.Fatalf("count alice's INBOX: %v %s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	f := strings.Split(lines[len(lines)-1], "\t")
	n, err := strconv.Atoi(f[len(f)-1])
	if err != nil {
		t.Fatalf("count alice's INBOX: %q", out)
	}
	return n
}

// waitDelivered waits until alice's INBOX holds n messages; the deadline
// is a hang guard.
func waitDelivered(t *testing.T, tb *testbed.Testbed, n int) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for inboxCount(t, tb) < n {
		if time.Now().After(deadline) {
			t.Fatalf("alice's INBOX has %d messages, want %d", inboxCount(t, tb), n)
		}
		tb.Stack.Flush(context.Background())
		time.Sleep(200 * time.Millisecond)
	}
}
