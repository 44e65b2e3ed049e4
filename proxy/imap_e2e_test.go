package proxy_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/proxy"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

func imapLogin(t *testing.T, addr, user, pass string) *imapclient.Client {
	t.Helper()
	c, err := imapclient.DialInsecure(addr, nil)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.Login(user, pass).Wait(); err != nil {
		t.Fatalf("login %s at %s: %v", user, addr, err)
	}
	return c
}

// imapVerbs returns the logged IMAP verbs of kind in order.
func imapVerbs(t *testing.T, l *undolog.Log, kind string) []undolog.Verb {
	t.Helper()
	vs, err := l.Verbs(context.Background(), undolog.Filter{Kinds: []string{kind}})
	if err != nil {
		t.Fatal(err)
	}
	return vs
}

func argsOf(t *testing.T, v undolog.Verb) verb.IMAPArgs {
	t.Helper()
	var a verb.IMAPArgs
	if err := json.Unmarshal(v.Args, &a); err != nil {
		t.Fatalf("args of %d: %v", v.Seq, err)
	}
	return a
}

func imapOutcome(t *testing.T, v undolog.Verb) verb.IMAPOutcome {
	t.Helper()
	if v.Outcome == nil {
		t.Fatalf("verb %d (%s) has no outcome", v.Seq, v.Kind)
	}
	var o verb.IMAPOutcome
	if err := json.Unmarshal(v.Outcome.Outcome, &o); err != nil {
		t.Fatalf("outcome of %d: %v", v.Seq, err)
	}
	return o
}

// TestIMAPLoginAndCapabilities logs in through the proxy with LOGIN and
// with AUTHENTICATE PLAIN, and checks what it advertises.
func TestIMAPLoginAndCapabilities(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	c := imapLogin(t, tb.IMAPAddr(), "alice", tb.Stack.Password("alice"))
	caps := c.Caps()
	for _, want := range []imap.Cap{imap.CapIMAP4rev1, imap.CapIdle, imap.CapMove, imap.CapUIDPlus, imap.CapCondStore, imap.CapESearch} {
		if !caps.Has(want) {
			t.Errorf("post-login capabilities lack %s: %v", want, caps)
		}
	}
	for _, gone := range []imap.Cap{"COMPRESS=DEFLATE", imap.CapCatenate, imap.CapMultiAppend} {
		if caps.Has(gone) {
			t.Errorf("post-login capabilities offer %s, which the proxy cannot record", gone)
		}
	}
	// AUTHENTICATE PLAIN with SASL-IR.
	c2, err := imapclient.DialInsecure(tb.IMAPAddr(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if err := c2.Authenticate(plainAuth("bob", tb.Stack.Password("bob"))); err != nil {
		t.Fatalf("AUTHENTICATE PLAIN: %v", err)
	}
	if _, err := c2.Select("INBOX", nil).Wait(); err != nil {
		t.Fatalf("SELECT after AUTHENTICATE: %v", err)
	}
	// A wrong password gets Dovecot's own refusal.
	c3, err := imapclient.DialInsecure(tb.IMAPAddr(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c3.Close()
	err = c3.Login("alice", "wrong").Wait()
	var ie *imap.Error
	if !errors.As(err, &ie) || ie.Type != imap.StatusResponseTypeNo || ie.Code != imap.ResponseCodeAuthenticationFailed {
		t.Fatalf("wrong password: %v, want NO [AUTHENTICATIONFAILED]", err)
	}
}

// TestIMAPVerbsRecorded runs the mutating commands a mail client uses and
// checks each is in the log with its mailbox, UIDs and outcome, and that
// Dovecot really did them.
func TestIMAPVerbsRecorded(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	l := tb.Daemon.Log
	c := imapLogin(t, tb.IMAPAddr(), "alice", tb.Stack.Password("alice"))

	if err := c.Create("Projects", nil).Wait(); err != nil {
		t.Fatalf("CREATE: %v", err)
	}
	if err := c.Subscribe("Projects").Wait(); err != nil {
		t.Fatalf("SUBSCRIBE: %v", err)
	}
	msg := "From: alice@example.test\r\nSubject: appended\r\nMessage-Id: <append.1@client.test>\r\n\r\nHello.\r\n"
	for i := 0; i < 3; i++ {
		ap := c.Append("INBOX", int64(len(msg)), &imap.AppendOptions{Flags: []imap.Flag{imap.FlagDraft}})
		ap.Write([]byte(msg))
		ap.Close()
		if _, err := ap.Wait(); err != nil {
			t.Fatalf("APPEND: %v", err)
		}
	}
	sel, err := c.Select("INBOX", nil).Wait()
	if err != nil {
		t.Fatal(err)
	}
	// Sequence-number STORE: the proxy resolves 2 to its UID.
	if err := c.Store(imap.SeqSetNum(2), &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagFlagged}}, nil).Close(); err != nil {
		t.Fatalf("STORE: %v", err)
	}
	if _, err := c.Copy(imap.UIDSetNum(1), "Projects").Wait(); err != nil {
		t.Fatalf("UID COPY: %v", err)
	}
	if _, err := c.Move(imap.UIDSetNum(3), "Projects").Wait(); err != nil {
		t.Fatalf("UID MOVE: %v", err)
	}
	if err := c.Store(imap.UIDSetNum(1), &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagDeleted}}, nil).Close(); err != nil {
		t.Fatalf("UID STORE: %v", err)
	}
	if err := c.Expunge().Close(); err != nil {
		t.Fatalf("EXPUNGE: %v", err)
	}
	if err := c.Rename("Projects", "Archive", nil).Wait(); err != nil {
		t.Fatalf("RENAME: %v", err)
	}

	uv := sel.UIDValidity
	creates := imapVerbs(t, l, verb.KindIMAPCreate)
	if len(creates) != 1 || argsOf(t, creates[0]).Mailbox != "Projects" || imapOutcome(t, creates[0]).Status != "OK" {
		t.Fatalf("CREATE verbs: %+v", creates)
	}
	if subs := imapVerbs(t, l, verb.KindIMAPSubscribe); len(subs) != 1 {
		t.Fatalf("SUBSCRIBE verbs: %d", len(subs))
	}
	appends := imapVerbs(t, l, verb.KindIMAPAppend)
	if len(appends) != 3 {
		t.Fatalf("APPEND verbs: %d, want 3", len(appends))
	}
	for i, v := range appends {
		a, o := argsOf(t, v), imapOutcome(t, v)
		if a.Mailbox != "INBOX" || a.Size != int64(len(msg)) || a.UndoID == "" || len(a.Flags) != 1 {
			t.Fatalf("APPEND %d args %+v", i, a)
		}
		if want := fmt.Sprintf("%d %d", uv, i+1); o.AppendUID != want {
			t.Fatalf("APPEND %d APPENDUID %q, want %q", i, o.AppendUID, want)
		}
		b, err := l.ReadBlob(v.Blob)
		if err != nil || string(b) != msg {
			t.Fatalf("APPEND %d blob = %q, %v", i, b, err)
		}
	}
	stores := imapVerbs(t, l, verb.KindIMAPStore)
	if len(stores) != 2 {
		t.Fatalf("STORE verbs: %d", len(stores))
	}
	if a := argsOf(t, stores[0]); a.Command != "STORE" || a.Seqs != "2" || a.UIDs != "2" || a.Op != "+" ||
		a.Flags[0] != `\Flagged` || a.Mailbox != "INBOX" || a.UIDValidity != uv {
		t.Fatalf("seq STORE args %+v", a)
	}
	copies := imapVerbs(t, l, verb.KindIMAPCopy)
	if len(copies) != 1 || argsOf(t, copies[0]).UIDs != "1" || argsOf(t, copies[0]).Dest != "Projects" ||
		!strings.HasSuffix(imapOutcome(t, copies[0]).CopyUID, " 1 1") {
		t.Fatalf("COPY verb %+v outcome %+v", argsOf(t, copies[0]), imapOutcome(t, copies[0]))
	}
	moves := imapVerbs(t, l, verb.KindIMAPMove)
	if len(moves) != 1 || argsOf(t, moves[0]).UIDs != "3" || !strings.HasSuffix(imapOutcome(t, moves[0]).CopyUID, " 3 2") {
		t.Fatalf("MOVE verb %+v outcome %+v", argsOf(t, moves[0]), imapOutcome(t, moves[0]))
	}
	expunges := imapVerbs(t, l, verb.KindIMAPExpunge)
	if len(expunges) != 1 || argsOf(t, expunges[0]).UIDs != "1" {
		t.Fatalf("EXPUNGE verbs %+v", expunges)
	}
	// Every verb names its messages by undo id too: the ids of the
	// APPENDs that made them.
	ids := make([]string, 3)
	for i, v := range appends {
		ids[i] = argsOf(t, v).UndoID
	}
	for _, c := range []struct {
		v    undolog.Verb
		want map[string]string
	}{
		{stores[0], map[string]string{"2": ids[1]}},
		{copies[0], map[string]string{"1": ids[0]}},
		{moves[0], map[string]string{"3": ids[2]}},
		{expunges[0], map[string]string{"1": ids[0]}},
	} {
		got := argsOf(t, c.v).UndoIDs
		if fmt.Sprint(got) != fmt.Sprint(c.want) {
			t.Errorf("%s verb %d undo ids %v, want %v", c.v.Kind, c.v.Seq, got, c.want)
		}
	}
	renames := imapVerbs(t, l, verb.KindIMAPRename)
	if len(renames) != 1 || argsOf(t, renames[0]).Mailbox != "Projects" || argsOf(t, renames[0]).Dest != "Archive" {
		t.Fatalf("RENAME verbs %+v", renames)
	}
	// Dovecot did all of it: INBOX keeps UID 2 only, Archive has two.
	direct := imapLogin(t, tb.Stack.IMAPAddr, "alice", tb.Stack.Password("alice"))
	st, err := direct.Status("Archive", &imap.StatusOptions{NumMessages: true}).Wait()
	if err != nil || *st.NumMessages != 2 {
		t.Fatalf("Archive status %+v, %v", st, err)
	}
	st, err = direct.Status("INBOX", &imap.StatusOptions{NumMessages: true}).Wait()
	if err != nil || *st.NumMessages != 1 {
		t.Fatalf("INBOX status %+v, %v", st, err)
	}
}

// TestIMAPFetchRecordedAsSeen checks the externalization record: bodies a
// user fetched are logged by UID, one record per FETCH command.
func TestIMAPFetchRecordedAsSeen(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	deliver(t, tb, "bob", "fetch me", "fetch.%d@client.test", 3)
	c := imapLogin(t, tb.IMAPAddr(), "bob", tb.Stack.Password("bob"))
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	// Flags and envelopes only: nothing seen.
	envs, err := c.Fetch(imap.UIDSetNum(1, 2, 3), &imap.FetchOptions{Flags: true, UID: true, Envelope: true}).Collect()
	if err != nil {
		t.Fatal(err)
	}
	msgIDOf := map[string]string{}
	for _, m := range envs {
		msgIDOf[fmt.Sprint(m.UID)] = m.Envelope.MessageID
	}
	msgs, err := c.Fetch(imap.UIDSetNum(1, 3), &imap.FetchOptions{UID: true, BodySection: []*imap.FetchItemBodySection{{}}}).Collect()
	if err != nil || len(msgs) != 2 {
		t.Fatalf("UID FETCH BODY[]: %d messages, %v", len(msgs), err)
	}
	for _, m := range msgs {
		for _, b := range m.BodySection {
			if !bytes.Contains(b.Bytes, []byte("Subject: fetch me")) {
				t.Fatalf("body relayed wrong: %q", b.Bytes)
			}
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		vs := imapVerbs(t, tb.Daemon.Log, verb.KindIMAPFetch)
		if len(vs) == 1 {
			var a verb.IMAPFetchArgs
			json.Unmarshal(vs[0].Args, &a)
			if a.Mailbox != "INBOX" || a.UIDs != "1,3" || a.UIDValidity == 0 || vs[0].User != "bob" {
				t.Fatalf("fetch record %+v by %s", a, vs[0].User)
			}
			// The ids are those the deliveries were logged with.
			for _, uid := range []string{"1", "3"} {
				msgID := msgIDOf[uid]
				var da verb.DeliveryArgs
				json.Unmarshal(verbsOf(t, tb.Daemon.Log, msgID)[verb.KindLMTPDeliver].Args, &da)
				if a.UndoIDs[uid] == "" || a.UndoIDs[uid] != da.UndoID {
					t.Fatalf("fetch record names UID %s as %q, its delivery was %q", uid, a.UndoIDs[uid], da.UndoID)
				}
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("fetch records: %d, want 1", len(vs))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestIMAPFetchSeenLoggedBeforeOK: a FETCH that sets \Seen is a change,
// so its record is in the log, with the UIDs and undo ids of what it
// marked, before the client has its OK. The FETCH names messages by
// sequence number (with "*"), which its responses do not turn into UIDs:
// the proxy resolves the set before it runs. The log is read at once,
// without waiting: a record written after the OK makes this fail.
func TestIMAPFetchSeenLoggedBeforeOK(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	deliver(t, tb, "bob", "read me", "seen.%d@client.test", 4)
	c := imapLogin(t, tb.IMAPAddr(), "bob", tb.Stack.Password("bob"))
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	for i, set := range []imap.SeqSet{imap.SeqSetNum(2), func() imap.SeqSet { var s imap.SeqSet; s.AddRange(3, 0); return s }()} {
		msgs, err := c.Fetch(set, &imap.FetchOptions{BodySection: []*imap.FetchItemBodySection{{}}}).Collect()
		if err != nil || len(msgs) == 0 {
			t.Fatalf("FETCH %s BODY[]: %d messages, %v", set, len(msgs), err)
		}
		vs := imapVerbs(t, tb.Daemon.Log, verb.KindIMAPFetch)
		if len(vs) != i+1 {
			t.Fatalf("after FETCH %s BODY[] answered OK, the log holds %d fetch records, want %d", set, len(vs), i+1)
		}
		var a verb.IMAPFetchArgs
		json.Unmarshal(vs[i].Args, &a)
		want := []string{"2", "3:4"}[i]
		if !a.Seen || a.UIDs != want || len(a.UndoIDs) != len(msgs) {
			t.Fatalf("FETCH %s BODY[] logged as %+v; want \\Seen set on UIDs %s with their undo ids", set, a, want)
		}
	}
	// A FETCH by sequence number with a literal goes upstream in part
	// before its end, so nothing of the proxy's own may go before it: its
	// UIDs are learnt behind it and its record follows the OK. It must
	// neither hang nor lose the record.
	conn, r := rawSession(t, tb.IMAPAddr(), "bob", tb.Stack.Password("bob"))
	fmt.Fprintf(conn, "S SELECT INBOX\r\n")
	r.until(t, "S OK")
	fmt.Fprintf(conn, "F FETCH 1 (BODY[HEADER.FIELDS ({7}\r\n")
	r.until(t, "+")
	fmt.Fprintf(conn, "Subject)])\r\n")
	if l := r.tagged(t, "F", 1)[0]; !strings.HasPrefix(l, "F OK") {
		t.Fatalf("FETCH with a literal: %s", l)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		vs := imapVerbs(t, tb.Daemon.Log, verb.KindIMAPFetch)
		var a verb.IMAPFetchArgs
		json.Unmarshal(vs[len(vs)-1].Args, &a)
		if len(vs) == 3 && a.Seen && a.UIDs == "1" && len(a.UndoIDs) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("FETCH 1 with a literal logged as %+v (%d records); want \\Seen set on UID 1", a, len(vs))
		}
	}
	// Dovecot set \Seen on exactly those.
	direct := imapLogin(t, tb.Stack.IMAPAddr, "bob", tb.Stack.Password("bob"))
	if _, err := direct.Select("INBOX", &imap.SelectOptions{ReadOnly: true}).Wait(); err != nil {
		t.Fatal(err)
	}
	seen, err := direct.UIDSearch(&imap.SearchCriteria{Flag: []imap.Flag{imap.FlagSeen}}, nil).Wait()
	if err != nil || fmt.Sprint(seen.AllUIDs()) != "[1 2 3 4]" {
		t.Fatalf("\\Seen in Dovecot: %v %v, want UIDs 1 to 4", seen.AllUIDs(), err)
	}
}

// deliver sends n messages to user through the front door (Message-Id
// from idFormat and the message's index) and waits until they are stored:
// until the INBOX holds n more than before (a refill of a mailbox that is
// not empty must not return while some are still on their way).
func deliver(t *testing.T, tb *testbed.Testbed, user, subject, idFormat string, n int) {
	t.Helper()
	c := imapLogin(t, tb.Stack.IMAPAddr, user, tb.Stack.Password(user))
	st, err := c.Status("INBOX", &imap.StatusOptions{NumMessages: true}).Wait()
	c.Close()
	if err != nil {
		t.Fatal(err)
	}
	have := *st.NumMessages
	for i := 0; i < n; i++ {
		c := dial(t, tb.SMTPAddr(), "")
		if err := c.SendMail("sender@example.test", []string{tb.Stack.Address(user)}, strings.NewReader(message(subject, fmt.Sprintf(idFormat, i)))); err != nil {
			t.Fatalf("deliver to %s: %v", user, err)
		}
	}
	waitForCount(t, tb, user, have+uint32(n))
}

func waitForCount(t *testing.T, tb *testbed.Testbed, user string, n uint32) {
	t.Helper()
	c := imapLogin(t, tb.Stack.IMAPAddr, user, tb.Stack.Password(user))
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, err := c.Status("INBOX", &imap.StatusOptions{NumMessages: true}).Wait()
		if err == nil && *st.NumMessages >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s's INBOX did not reach %d messages", user, n)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestIMAPLogUnwritable: with the log's disk full, a mutating command gets
// NO [UNAVAILABLE] and does not reach Dovecot; reads keep working.
func TestIMAPLogUnwritable(t *testing.T) {
	fs := mountTmpfs(t, "8m")
	tb := testbedtest.Start(t, func(c *config.Config) { c.DataDir = fs + "/undo" })
	c := imapLogin(t, tb.IMAPAddr(), "carol", tb.Stack.Password("carol"))
	fill(t, fs)
	err := c.Create("Never", nil).Wait()
	var ie *imap.Error
	if !errors.As(err, &ie) || ie.Type != imap.StatusResponseTypeNo || ie.Code != imap.ResponseCodeUnavailable {
		t.Fatalf("CREATE with the log full: %v, want NO [UNAVAILABLE]", err)
	}
	if _, err := c.List("", "*", nil).Collect(); err != nil {
		t.Fatalf("LIST with the log full: %v", err)
	}
	direct := imapLogin(t, tb.Stack.IMAPAddr, "carol", tb.Stack.Password("carol"))
	boxes, err := direct.List("", "Never", nil).Collect()
	if err != nil || len(boxes) != 0 {
		t.Fatalf("the refused CREATE reached Dovecot: %v %v", boxes, err)
	}
}

// TestIMAPPipelinedAndIdle pipelines commands raw and uses IDLE: a
// delivery shows up as EXISTS through the proxy.
func TestIMAPPipelinedAndIdle(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	conn, err := net.Dial("tcp", tb.IMAPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := newLineReader(conn)
	r.until(t, "* OK")
	fmt.Fprintf(conn, "a1 LOGIN dave x\r\na2 LOGIN alice %s\r\n", tb.Stack.Password("alice"))
	if l := r.until(t, "a1 "); !strings.HasPrefix(l[len(l)-1], "a1 NO") {
		t.Fatalf("unknown user: %q", l)
	}
	if l := r.until(t, "a2 "); !strings.HasPrefix(l[len(l)-1], "a2 OK") {
		t.Fatalf("login: %q", l)
	}
	// Pipelined: CREATE (held for the log) between two relayed commands.
	fmt.Fprintf(conn, "b1 SELECT INBOX\r\nb2 CREATE Pipe\r\nb3 LIST \"\" Pipe\r\n")
	joined := strings.Join(r.until(t, "b3 "), "\n")
	i1, i2, i3 := strings.Index(joined, "b1 OK"), strings.Index(joined, "b2 OK"), strings.Index(joined, "b3 OK")
	if i1 < 0 || i2 < i1 || i3 < i2 || !strings.Contains(joined, "Pipe") {
		t.Fatalf("pipelined replies out of order or missing:\n%s", joined)
	}
	fmt.Fprintf(conn, "c1 IDLE\r\n")
	r.until(t, "+")
	sc := dial(t, tb.SMTPAddr(), "")
	if err := sc.SendMail("sender@example.test", []string{"alice@example.test"}, strings.NewReader(message("idle", "idle.1@client.test"))); err != nil {
		t.Fatal(err)
	}
	for !strings.HasSuffix(r.line(t), "EXISTS") {
	}
	fmt.Fprintf(conn, "DONE\r\n")
	if l := r.until(t, "c1 "); !strings.HasPrefix(l[len(l)-1], "c1 OK") {
		t.Fatalf("IDLE end: %q", l)
	}
}

func plainAuth(user, pass string) sasl.Client { return sasl.NewPlainClient("", user, pass) }

// fill fills a tmpfs; dd stops with ENOSPC, which is the point.
func fill(t *testing.T, dir string) {
	t.Helper()
	exec.Command("dd", "if=/dev/zero", "of="+dir+"/filler", "bs=64k").Run()
}

// TestMbsyncBothWays syncs alice's mailbox to a local maildir with mbsync
// through the proxy, changes it locally (a flag, a new message) and syncs
// back: Dovecot gets the changes and the log records them.
func TestMbsyncBothWays(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	deliver(t, tb, "alice", "to sync", "sync.%d@client.test", 2)
	dir := t.TempDir()
	local := filepath.Join(dir, "mail") + "/"
	os.MkdirAll(local, 0o700)
	host, port, _ := net.SplitHostPort(tb.IMAPAddr())
	rc := fmt.Sprintf(`IMAPAccount undo
Host %s
Port %s
User alice
Pass %s
SSLType None
AuthMechs LOGIN

IMAPStore far
Account undo

MaildirStore near
Path %s
Inbox %sINBOX
SubFolders Verbatim

Channel sync
Far :far:
Near :near:
Patterns INBOX
Create Both
Expunge Both
SyncState *
`, host, port, tb.Stack.Password("alice"), local, local)
	rcPath := filepath.Join(dir, "mbsyncrc")
	os.WriteFile(rcPath, []byte(rc), 0o600)
	mbsync := func() {
		t.Helper()
		if out, err := exec.Command("mbsync", "-c", rcPath, "-a").CombinedOutput(); err != nil {
			t.Fatalf("mbsync: %v\n%s", err, out)
		}
	}
	mbsync()
	cur, _ := filepath.Glob(local + "INBOX/*/*")
	if len(cur) != 2 {
		t.Fatalf("after the first sync the local INBOX has %v", cur)
	}
	// Locally: flag one message, add one.
	if err := os.Rename(cur[0], cur[0]+"F"); err != nil { // mbsync names end in ":2,<flags>"
		t.Fatal(err)
	}
	newMsg := "From: alice@example.test\r\nSubject: written offline\r\nMessage-Id: <offline.1@client.test>\r\n\r\nhi\r\n"
	os.WriteFile(filepath.Join(local, "INBOX", "new", "1700000000.offline.host"), []byte(newMsg), 0o600)
	mbsync()
	direct := imapLogin(t, tb.Stack.IMAPAddr, "alice", tb.Stack.Password("alice"))
	if _, err := direct.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	flagged, err := direct.Search(&imap.SearchCriteria{Flag: []imap.Flag{imap.FlagFlagged}}, nil).Wait()
	if err != nil || len(flagged.AllSeqNums()) != 1 {
		t.Fatalf("flagged on the server: %v, %v; want 1", flagged, err)
	}
	if hdr, _ := fetchHeader(tb, "alice", "offline.1@client.test"); hdr == "" {
		t.Fatal("the offline message did not reach the server")
	}
	appends := imapVerbs(t, tb.Daemon.Log, verb.KindIMAPAppend)
	stores := imapVerbs(t, tb.Daemon.Log, verb.KindIMAPStore)
	if len(appends) != 1 || argsOf(t, appends[0]).Mailbox != "INBOX" || imapOutcome(t, appends[0]).AppendUID == "" {
		t.Fatalf("APPEND verbs %+v", appends)
	}
	var flaggedStore bool
	for _, v := range stores {
		a := argsOf(t, v)
		flaggedStore = flaggedStore || (a.Op == "+" && slices.Contains(a.Flags, `\Flagged`) && len(a.UndoIDs) == 1)
	}
	if !flaggedStore {
		t.Fatalf("no +FLAGS (\\Flagged) store with an undo id among %d STORE verbs", len(stores))
	}
}

// transcript runs a raw IMAP session and returns every line the server
// sent after login, with Dovecot's timing text and \Recent removed.
func transcript(t *testing.T, addr, user, pass string, cmds []string) []string {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := newLineReader(conn)
	r.until(t, "* OK")
	fmt.Fprintf(conn, "L LOGIN %s %s\r\n", user, pass)
	r.until(t, "L OK")
	var out []string
	for _, c := range cmds {
		tag := strings.Fields(c)[0]
		fmt.Fprintf(conn, "%s\r\n", c)
		for _, l := range r.until(t, tag+" ") {
			// \Recent goes to whichever session selects first (RFC 3501
			// 2.3.2): the one difference two sessions must show.
			if strings.HasSuffix(l, " RECENT") {
				continue
			}
			l = strings.ReplaceAll(timing.ReplaceAllString(l, ""), `\Recent`, "")
			out = append(out, l)
		}
	}
	return out
}

var timing = regexp.MustCompile(` \([0-9.]+ \+ [0-9.]+( \+ [0-9.]+)? secs\)\.`)

// TestIMAPTransparency sends the same session to Dovecot directly and
// through the proxy and compares every response line: CONDSTORE and
// QRESYNC selects, MODSEQ fetches, ESEARCH, LIST-STATUS. Transparency is
// measured, not assumed.
func TestIMAPTransparency(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	deliver(t, tb, "carol", "transparent", "tr.%d@client.test", 3)
	session := []string{
		`a ENABLE QRESYNC`,
		`b SELECT INBOX (CONDSTORE)`,
		`c UID FETCH 1:* (UID FLAGS MODSEQ RFC822.SIZE BODY.PEEK[HEADER.FIELDS (SUBJECT MESSAGE-ID)]) (CHANGEDSINCE 1)`,
		`d UID SEARCH RETURN (MIN MAX COUNT) ALL`,
		`e STATUS INBOX (MESSAGES UIDNEXT UIDVALIDITY HIGHESTMODSEQ)`,
		`f LIST "" "*" RETURN (STATUS (MESSAGES UNSEEN))`,
		`g FETCH 1:* (BODYSTRUCTURE ENVELOPE INTERNALDATE)`,
		`h UID FETCH 2 (BINARY.PEEK[1] BINARY.SIZE[1])`,
		`i NOOP`,
	}
	pass := tb.Stack.Password("carol")
	direct := transcript(t, tb.Stack.IMAPAddr, "carol", pass, session)
	proxied := transcript(t, tb.IMAPAddr(), "carol", pass, session)
	if strings.Join(direct, "\n") != strings.Join(proxied, "\n") {
		t.Fatalf("responses differ.\ndirect:\n%s\n\nthrough undomail:\n%s", strings.Join(direct, "\n"), strings.Join(proxied, "\n"))
	}
	if len(direct) < 20 || !strings.Contains(strings.Join(direct, "\n"), "HIGHESTMODSEQ") {
		t.Fatalf("the session did too little to compare:\n%s", strings.Join(direct, "\n"))
	}
}

// bigMessage generates an n-byte message without holding it.
type bigMessage struct{ n, off int }

func (m *bigMessage) Read(p []byte) (int, error) {
	const hdr = "From: big@example.test\r\nSubject: 25 MB\r\nMessage-Id: <big.1@client.test>\r\n\r\n"
	if m.off >= m.n {
		return 0, io.EOF
	}
	k := 0
	for k < len(p) && m.off < m.n {
		switch {
		case m.off < len(hdr):
			p[k] = hdr[m.off]
		case (m.off-len(hdr))%78 == 76:
			p[k] = '\r'
		case (m.off-len(hdr))%78 == 77:
			p[k] = '\n'
		default:
			p[k] = 'a' + byte(m.off%26)
		}
		k++
		m.off++
	}
	return k, nil
}

// TestIMAPLargeAppendAndFetchStream appends and fetches a 25 MB message
// through the proxy and checks that the proxy never held it in memory.
func TestIMAPLargeAppendAndFetchStream(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	const size = 25 << 20
	want := sha256.New()
	io.Copy(want, &bigMessage{n: size})

	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapAlloc
	var peak atomic.Uint64
	stop := make(chan struct{})
	go func() {
		var m runtime.MemStats
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			runtime.ReadMemStats(&m)
			if m.HeapAlloc > peak.Load() {
				peak.Store(m.HeapAlloc)
			}
		}
	}()

	c := imapLogin(t, tb.IMAPAddr(), "alice", tb.Stack.Password("alice"))
	ap := c.Append("INBOX", size, nil)
	if _, err := io.Copy(ap, &bigMessage{n: size}); err != nil {
		t.Fatalf("APPEND write: %v", err)
	}
	ap.Close()
	if _, err := ap.Wait(); err != nil {
		t.Fatalf("APPEND: %v", err)
	}
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	cmd := c.Fetch(imap.UIDSetNum(1), &imap.FetchOptions{UID: true, BodySection: []*imap.FetchItemBodySection{{Peek: true}}})
	got := sha256.New()
	var n int64
	for m := cmd.Next(); m != nil; m = cmd.Next() {
		for item := m.Next(); item != nil; item = m.Next() {
			if b, ok := item.(imapclient.FetchItemDataBodySection); ok {
				k, err := io.Copy(got, b.Literal)
				if err != nil {
					t.Fatalf("read FETCH body: %v", err)
				}
				n += k
			}
		}
	}
	if err := cmd.Close(); err != nil {
		t.Fatalf("FETCH: %v", err)
	}
	close(stop)
	if n != size || !bytes.Equal(got.Sum(nil), want.Sum(nil)) {
		t.Fatalf("fetched %d bytes, sha256 match %v", n, bytes.Equal(got.Sum(nil), want.Sum(nil)))
	}
	grew := int64(peak.Load()) - int64(base)
	t.Logf("heap grew by at most %.1f MB while 2 x 25 MB went through", float64(grew)/(1<<20))
	if grew > 12<<20 {
		t.Fatalf("heap grew by %d bytes: the message was held in memory", grew)
	}
	v := imapVerbs(t, tb.Daemon.Log, verb.KindIMAPAppend)
	if len(v) != 1 || argsOf(t, v[0]).Size != size {
		t.Fatalf("APPEND verbs %+v", v)
	}
	rc, err := tb.Daemon.Log.OpenBlob(v[0].Blob)
	if err != nil {
		t.Fatal(err)
	}
	logged := sha256.New()
	if _, err := io.Copy(logged, rc); err != nil {
		t.Fatalf("logged blob: %v", err)
	}
	rc.Close()
	if !bytes.Equal(logged.Sum(nil), want.Sum(nil)) {
		t.Fatal("the logged blob is not the appended message")
	}
}

// TestIMAPRobustness: garbage gets Dovecot's own BAD and the session goes
// on; an over-long line and an over-large literal end the session with a
// clear BYE; the upstream dying ends it with BYE [UNAVAILABLE].
func TestIMAPRobustness(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	login := func() (net.Conn, *lineReader) {
		conn, err := net.Dial("tcp", tb.IMAPAddr())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		r := newLineReader(conn)
		r.until(t, "* OK")
		fmt.Fprintf(conn, "L LOGIN alice %s\r\n", tb.Stack.Password("alice"))
		r.until(t, "L OK")
		return conn, r
	}
	conn, r := login()
	for _, garbage := range []string{"x FROBNICATE now", "y SELECT", "z FETCH (((", "\x01\x02 \xff", "w UID"} {
		fmt.Fprintf(conn, "%s\r\n", garbage)
		l := r.line(t)
		if !strings.Contains(l, " BAD ") {
			t.Fatalf("%q got %q, want Dovecot's BAD", garbage, l)
		}
	}
	fmt.Fprintf(conn, "n NOOP\r\n")
	if l := r.until(t, "n "); !strings.HasPrefix(l[len(l)-1], "n OK") {
		t.Fatalf("session did not survive garbage: %q", l)
	}

	conn, r = login()
	fmt.Fprintf(conn, "long NOOP %s\r\n", strings.Repeat("x", 70<<10))
	if l := r.line(t); !strings.HasPrefix(l, "* BYE [LIMIT]") {
		t.Fatalf("over-long line got %q, want BYE [LIMIT]", l)
	}

	conn, r = login()
	fmt.Fprintf(conn, "big APPEND INBOX {2147483648}\r\n")
	if l := r.line(t); !strings.HasPrefix(l, "big NO [TOOBIG]") {
		t.Fatalf("2 GiB literal got %q, want NO [TOOBIG] before the client sends it", l)
	}
	fmt.Fprintf(conn, "sel SELECT {2147483648}\r\n")
	if l := r.line(t); !strings.HasPrefix(l, "sel NO [LIMIT]") {
		t.Fatalf("2 GiB literal in SELECT got %q, want NO [LIMIT]", l)
	}
	fmt.Fprintf(conn, "after NOOP\r\n")
	if l := r.until(t, "after "); !strings.HasPrefix(l[len(l)-1], "after OK") {
		t.Fatalf("session did not go on after refused literals: %q", l)
	}

	conn, r = login()
	fmt.Fprintf(conn, "s SELECT INBOX\r\n")
	r.until(t, "s OK")
	out, err := tb.Stack.Doveadm(context.Background(), "who", "-1", "alice")
	if err != nil {
		t.Fatalf("doveadm who: %v", err)
	}
	killed := 0
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[0] == "alice" && f[1] == "imap" {
			exec.Command("kill", "-9", strings.Trim(f[2], "()")).Run()
			killed++
		}
	}
	if killed == 0 {
		t.Fatalf("no imap process of alice in doveadm who:\n%s", out)
	}
	if l := r.until(t, "* BYE"); !strings.HasPrefix(l[len(l)-1], "* BYE [UNAVAILABLE]") {
		t.Fatalf("upstream death got %q, want BYE [UNAVAILABLE]", l)
	}
}

// selfSigned returns a TLS server config and a client config trusting it.
func selfSigned(t *testing.T) (*tls.Config, *tls.Config) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "undomail.test"},
		DNSNames:     []string{"undomail.test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}},
		&tls.Config{RootCAs: pool, ServerName: "undomail.test"}
}

// TestIMAPTLS: STARTTLS and implicit TLS toward the client; without TLS
// the proxy refuses passwords (LOGINDISABLED, RFC 9051 6.2.3).
func TestIMAPTLS(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	srv, cli := selfSigned(t)
	start := func(implicit bool) string {
		p, err := proxy.NewIMAP(context.Background(), proxy.IMAPConfig{Upstream: tb.Stack.IMAPAddr, TLS: srv, ImplicitTLS: implicit},
			tb.Daemon.Log, slog.New(slog.NewTextHandler(io.Discard, nil)))
		if err != nil {
			t.Fatal(err)
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		go p.Serve(ln)
		t.Cleanup(func() { p.Close(context.Background()) })
		return ln.Addr().String()
	}
	addr := start(false)
	plain, err := imapclient.DialInsecure(addr, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	caps, err := plain.Capability().Wait()
	if err != nil || !caps.Has(imap.CapLoginDisabled) || !caps.Has(imap.CapStartTLS) {
		t.Fatalf("cleartext capabilities %v, %v; want LOGINDISABLED and STARTTLS", caps, err)
	}
	err = plain.Login("alice", tb.Stack.Password("alice")).Wait()
	var ie *imap.Error
	if !errors.As(err, &ie) || ie.Code != imap.ResponseCodePrivacyRequired {
		t.Fatalf("LOGIN in cleartext: %v, want NO [PRIVACYREQUIRED]", err)
	}
	st, err := imapclient.DialStartTLS(addr, &imapclient.Options{TLSConfig: cli})
	if err != nil {
		t.Fatalf("STARTTLS: %v", err)
	}
	defer st.Close()
	if err := st.Login("alice", tb.Stack.Password("alice")).Wait(); err != nil {
		t.Fatalf("LOGIN after STARTTLS: %v", err)
	}
	if err := st.Create("OverTLS", nil).Wait(); err != nil {
		t.Fatalf("CREATE over STARTTLS: %v", err)
	}
	it, err := imapclient.DialTLS(start(true), &imapclient.Options{TLSConfig: cli})
	if err != nil {
		t.Fatalf("implicit TLS: %v", err)
	}
	defer it.Close()
	if err := it.Login("alice", tb.Stack.Password("alice")).Wait(); err != nil {
		t.Fatalf("LOGIN over implicit TLS: %v", err)
	}
	if _, err := it.Select("OverTLS", nil).Wait(); err != nil {
		t.Fatalf("SELECT over implicit TLS: %v", err)
	}
}

// TestIMAPClientAddressReachesDovecot: Dovecot sees the client's own
// address (via ID x-originating-ip), not undomail's, so its per-address
// limits and logs stay meaningful.
func TestIMAPClientAddressReachesDovecot(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}}
	conn, err := d.Dial("tcp", tb.IMAPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := newLineReader(conn)
	r.until(t, "* OK")
	fmt.Fprintf(conn, "L LOGIN bob %s\r\n", tb.Stack.Password("bob"))
	r.until(t, "L OK")
	out, err := tb.Stack.Doveadm(context.Background(), "who", "-1", "bob")
	if err != nil {
		t.Fatalf("doveadm who: %v", err)
	}
	if !strings.Contains(string(out), "127.0.0.2") {
		t.Fatalf("Dovecot does not see the client's address 127.0.0.2:\n%s", out)
	}
}

// TestIMAPAuthenticateForms: AUTHENTICATE PLAIN without an initial
// response and AUTHENTICATE LOGIN, both with continuations, and an aborted
// exchange.
func TestIMAPAuthenticateForms(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	b64 := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
	pass := tb.Stack.Password("carol")
	for _, tc := range []struct {
		name   string
		steps  []string // lines to send after each "+" challenge
		first  string
		result string
	}{
		{"PLAIN with continuation", []string{b64("\x00carol\x00" + pass)}, "a AUTHENTICATE PLAIN", "a OK"},
		{"LOGIN", []string{b64("carol"), b64(pass)}, "a AUTHENTICATE LOGIN", "a OK"},
		{"LOGIN wrong password", []string{b64("carol"), b64("nope")}, "a AUTHENTICATE LOGIN", "a NO"},
		{"aborted", []string{"*"}, "a AUTHENTICATE PLAIN", "a BAD"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn, err := net.Dial("tcp", tb.IMAPAddr())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			r := newLineReader(conn)
			r.until(t, "* OK")
			fmt.Fprintf(conn, "%s\r\n", tc.first)
			for _, step := range tc.steps {
				if l := r.line(t); !strings.HasPrefix(l, "+") {
					t.Fatalf("want a continuation, got %q", l)
				}
				fmt.Fprintf(conn, "%s\r\n", step)
			}
			if l := r.until(t, "a "); !strings.HasPrefix(l[len(l)-1], tc.result) {
				t.Fatalf("got %q, want %s", l, tc.result)
			}
		})
	}
}

// TestIMAPLoginRefusedDuringRepair: while a rewind or cycle holds the
// gate, logins get NO [UNAVAILABLE] and SMTP gets 451 4.3.2 at once.
func TestIMAPLoginRefusedDuringRepair(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	resume, err := tb.Daemon.Gate.Hold(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	c, err := imapclient.DialInsecure(tb.IMAPAddr(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.Login("alice", tb.Stack.Password("alice")).Wait()
	var ie *imap.Error
	if !errors.As(err, &ie) || ie.Code != imap.ResponseCodeUnavailable {
		t.Fatalf("login during a repair: %v, want NO [UNAVAILABLE]", err)
	}
	err = sendOne(t, tb.SMTPAddr(), "held@client.test")
	if se := smtpErr(err); se == nil || se.Code != 451 || se.EnhancedCode != (smtp.EnhancedCode{4, 3, 2}) {
		t.Fatalf("SMTP during a repair: %v, want 451 4.3.2", err)
	}
	resume()
	if err := imapLogin(t, tb.IMAPAddr(), "alice", tb.Stack.Password("alice")).Noop().Wait(); err != nil {
		t.Fatalf("after the repair: %v", err)
	}
}
