package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/internal/mailstack"
	"github.com/undomail/undomail/internal/mailstack/mailstacktest"
	"github.com/undomail/undomail/internal/testbed/clientcheck"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// binary is the undomail command built once for the tests that run it as
// an operator would: as a separate process.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "undomail-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	binary = filepath.Join(dir, "undomail")
	if out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build undomail: %v\n%s", err, out)
		os.Exit(2)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// freeAddr is an address of its own for a server started later; binding
// 127.0.0.1:0 and closing it raced other test packages' servers.
func freeAddr(t *testing.T) string { return mailstacktest.Addr(t) }

// server is an `undomail serve` process in front of a mail stack.
type server struct {
	t                 *testing.T
	st                *mailstack.Stack
	dataDir           string
	smtpAddr, lmtpAdr string
	imapAddr          string
	adminAddr         string   // the admin server; not the default port: tests run side by side
	extra             []string // more serve flags
	cmd               *exec.Cmd
	logPath           string
}

func newServer(t *testing.T, st *mailstack.Stack) *server {
	s := &server{t: t, st: st, dataDir: filepath.Join(t.TempDir(), "undo"),
		smtpAddr: freeAddr(t), lmtpAdr: freeAddr(t), imapAddr: freeAddr(t), adminAddr: freeAddr(t)}
	s.logPath = s.dataDir + ".log"
	t.Cleanup(func() {
		if s.cmd != nil {
			s.cmd.Process.Kill()
			s.cmd.Wait()
		}
	})
	return s
}

// start runs undomail serve and waits until its listeners and its
// control socket answer: serve opens the control socket after the
// listeners (and checks its snapshots in between), so a command right
// after start could otherwise find no undomail serve running.
func (s *server) start() {
	t := s.t
	t.Helper()
	logf, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	s.cmd = exec.Command(binary, "serve", "--data-dir", s.dataDir,
		"--smtp-listen", s.smtpAddr, "--smtp-upstream", s.st.SMTPAddr, "--smtp-allow-insecure-auth",
		"--lmtp-listen", s.lmtpAdr, "--lmtp-upstream", s.st.LMTPAddr, "--hostname", "undomail.test",
		"--imap-listen", s.imapAddr, "--imap-upstream", s.st.IMAPAddr, "--imap-allow-insecure-auth",
		"--admin-listen", s.adminAddr)
	s.cmd.Args = append(s.cmd.Args, s.extra...)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("start undomail serve: %v", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, addr := range []string{s.smtpAddr, s.lmtpAdr, s.imapAddr} {
		for {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				c.Close()
				break
			}
			if time.Now().After(deadline) {
				b, _ := os.ReadFile(s.logPath)
				t.Fatalf("undomail serve does not listen on %s after 30s:\n%s", addr, b)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	sock := filepath.Join(s.dataDir, admin.SocketName)
	for {
		c, err := net.DialTimeout("unix", sock, time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(s.logPath)
			t.Fatalf("undomail serve has no control socket %s after 30s: %v\n%s", sock, err, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (s *server) kill9() {
	s.cmd.Process.Signal(syscall.SIGKILL)
	s.cmd.Wait()
	s.cmd = nil
}

func (s *server) stop() {
	s.cmd.Process.Signal(syscall.SIGTERM)
	if err := s.cmd.Wait(); err != nil {
		b, _ := os.ReadFile(s.logPath)
		s.t.Errorf("undomail serve exited with %v after SIGTERM:\n%s", err, b)
	}
	s.cmd = nil
}

func run(t *testing.T, args ...string) (string, error) {
	t.Helper()
	out, err := exec.Command(binary, args...).CombinedOutput()
	return string(out), err
}

// inboxMessageIDs returns the Message-Ids in user's INBOX with their count.
func inboxMessageIDs(st *mailstack.Stack, user string) (map[string]int, error) {
	c, err := imapclient.DialInsecure(st.IMAPAddr, nil)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if err := c.Login(user, st.Password(user)).Wait(); err != nil {
		return nil, err
	}
	sel, err := c.Select("INBOX", nil).Wait()
	if err != nil {
		return nil, err
	}
	ids := map[string]int{}
	if sel.NumMessages == 0 {
		return ids, nil
	}
	all, err := c.Fetch(seqAll(), &imap.FetchOptions{Envelope: true}).Collect()
	if err != nil {
		return nil, err
	}
	for _, m := range all {
		if m.Envelope != nil {
			ids[m.Envelope.MessageID]++
		}
	}
	return ids, nil
}

func seqAll() imap.SeqSet {
	var s imap.SeqSet
	s.AddRange(1, 0)
	return s
}

// TestSwaksThroughUndomail is the foundation's end-to-end check with a
// real client: swaks sends through `undomail serve`, the message lands in
// Dovecot with its undo id, and `undomail log` shows both hops with their
// outcomes while the daemon runs.
func TestSwaksThroughUndomail(t *testing.T) {
	st := mailstacktest.Start(t, mailstack.Options{})
	s := newServer(t, st)
	s.start()
	if err := st.SetLMTPRelay(context.Background(), s.lmtpAdr); err != nil {
		t.Fatal(err)
	}
	host, port, _ := net.SplitHostPort(s.smtpAddr)
	out, err := exec.Command("swaks", "--server", host, "--port", port, "--from", "sender@example.test",
		"--to", "alice@example.test", "--header", "Subject: swaks through undomail",
		"--header", "Message-Id: <swaks.1@client.test>").CombinedOutput()
	if err != nil {
		t.Fatalf("swaks: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "<-  250 2.0.0 Ok: queued as ") {
		t.Fatalf("swaks did not get Postfix's own 250 reply through undomail:\n%s", out)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		ids, _ := inboxMessageIDs(st, "alice")
		if ids["swaks.1@client.test"] == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("message not in alice's INBOX after 20s: %v", ids)
		}
		time.Sleep(100 * time.Millisecond)
	}
	text, err := run(t, "log", "--data-dir", s.dataDir)
	if err != nil {
		t.Fatalf("undomail log: %v\n%s", err, text)
	}
	for _, want := range []string{"smtp.submit", "lmtp.deliver", `"swaks through undomail"`, "250 2.0.0 Ok: queued as", "<alice@example.test> 250 2.0.0"} {
		if !strings.Contains(text, want) {
			t.Errorf("undomail log lacks %q:\n%s", want, text)
		}
	}
	js, err := run(t, "log", "--data-dir", s.dataDir, "--json", "--kind", "lmtp.deliver", "--user", "alice@example.test", "--since", "1h")
	if err != nil {
		t.Fatalf("undomail log --json: %v\n%s", err, js)
	}
	lines := strings.Split(strings.TrimSpace(js), "\n")
	if len(lines) != 1 {
		t.Fatalf("want one lmtp.deliver verb for alice in the last hour, got:\n%s", js)
	}
	var v struct {
		Kind    string
		Args    verb.DeliveryArgs
		Outcome verb.DeliveryOutcome
	}
	if err := json.Unmarshal([]byte(lines[0]), &v); err != nil {
		t.Fatalf("decode %s: %v", lines[0], err)
	}
	if v.Args.Header.Subject != "swaks through undomail" || len(v.Outcome.Rcpts) != 1 || v.Outcome.Rcpts[0].Reply.Code != 250 {
		t.Fatalf("json verb = %+v", v)
	}
	if text, _ := run(t, "log", "--data-dir", s.dataDir, "--user", "nobody@example.test"); !strings.Contains(text, "(no verbs match)") {
		t.Fatalf("log --user nobody: %s", text)
	}
	if text, err := run(t, "fsck", "--data-dir", s.dataDir); err != nil || !strings.Contains(text, "0 errors") {
		t.Fatalf("fsck while serving: %v\n%s", err, text)
	}
	s.stop()
}

// TestKill9LosesNothingAcknowledged kills undomail with SIGKILL at random
// moments under concurrent SMTP load, restarts it, and checks that every
// message a client got a 250 for reached the mailbox and is in the log
// with its blob and outcome.
func TestKill9LosesNothingAcknowledged(t *testing.T) {
	st := mailstacktest.Start(t, mailstack.Options{})
	s := newServer(t, st)
	s.start()
	if err := st.SetLMTPRelay(context.Background(), s.lmtpAdr); err != nil {
		t.Fatal(err)
	}
	const kills, senders = 20, 4
	var mu sync.Mutex
	acked := map[string]bool{}
	ackedBoxes := map[string]bool{}
	refused := 0
	for k := 0; k < kills; k++ {
		stopSending := make(chan struct{})
		var wg sync.WaitGroup
		for g := 0; g < senders; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for n := 0; ; n++ {
					select {
					case <-stopSending:
						return
					default:
					}
					id := fmt.Sprintf("kill%d.%d.%d@client.test", k, g, n)
					msg := "Subject: kill test\r\nMessage-Id: <" + id + ">\r\n\r\nbody " + id + "\r\n"
					err := sendPlain(s.smtpAddr, msg)
					mu.Lock()
					if err == nil {
						acked[id] = true
					} else {
						refused++
					}
					mu.Unlock()
					if err != nil {
						time.Sleep(20 * time.Millisecond)
					}
				}
			}()
		}
		// An IMAP client changes bob's mail at the same time: every
		// mailbox whose CREATE got OK must survive, in Dovecot and the log.
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; ; n++ {
				select {
				case <-stopSending:
					return
				default:
				}
				name := fmt.Sprintf("K%d-%d", k, n)
				if imapCreate(s.imapAddr, st.Password("bob"), name) == nil {
					mu.Lock()
					ackedBoxes[name] = true
					mu.Unlock()
				} else {
					time.Sleep(20 * time.Millisecond)
				}
			}
		}()
		time.Sleep(time.Duration(200+rand.IntN(800)) * time.Millisecond)
		s.kill9()
		time.Sleep(200 * time.Millisecond)
		close(stopSending)
		wg.Wait()
		s.start()
	}
	// Deliveries Postfix deferred while the capture was down: retry now.
	if err := st.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d kills: %d messages acknowledged, %d refused or cut off", kills, len(acked), refused)
	if len(acked) < kills*senders {
		t.Fatalf("only %d messages acknowledged; the load did not run", len(acked))
	}
	var missing []string
	deadline := time.Now().Add(90 * time.Second)
	for {
		ids, err := inboxMessageIDs(st, "alice")
		missing = missing[:0]
		for id := range acked {
			if err != nil || ids[id] == 0 { // go-imap gives Message-Ids without <>
				missing = append(missing, id)
			}
		}
		if len(missing) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d acknowledged messages lost (not in the mailbox), e.g. %v", len(missing), missing[:min(10, len(missing))])
		}
		// Postfix backs off from a destination that failed (undomail
		// was down); ask it to retry now rather than wait for its queue
		// manager, which on a busy machine can take longer than this test.
		st.Flush(context.Background())
		time.Sleep(500 * time.Millisecond)
	}
	s.stop()
	l, err := undolog.Open(s.dataDir, undolog.Options{})
	if err != nil {
		t.Fatalf("reopen the log after the kills: %v", err)
	}
	defer l.Close()
	verbs, err := l.Verbs(context.Background(), undolog.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	submitted, delivered := map[string]bool{}, map[string]bool{}
	cutOff := 0
	for _, v := range verbs {
		var a verb.DeliveryArgs
		json.Unmarshal(v.Args, &a)
		id := strings.Trim(a.Header.MessageID, "<>")
		if v.Outcome == nil {
			cutOff++
			continue
		}
		var o verb.DeliveryOutcome
		json.Unmarshal(v.Outcome.Outcome, &o)
		switch v.Kind {
		case verb.KindSMTPSubmit:
			if o.Reply != nil && o.Reply.Code == 250 {
				if _, err := l.ReadBlob(v.Blob); err != nil {
					t.Errorf("blob of verb %d (%s): %v", v.Seq, id, err)
				}
				submitted[id] = true
			}
		case verb.KindLMTPDeliver:
			if len(o.Rcpts) == 1 && o.Rcpts[0].Reply.Code == 250 {
				delivered[id] = true
			}
		}
	}
	lostInLog := 0
	for id := range acked {
		if !submitted[id] || !delivered[id] {
			lostInLog++
			t.Errorf("acknowledged message %s: logged submission %v, logged delivery %v", id, submitted[id], delivered[id])
		}
	}
	t.Logf("log: %d verbs, %d cut off before their outcome (clients got no 250), %d acknowledged messages missing from the log",
		len(verbs), cutOff, lostInLog)
	// IMAP: every acknowledged CREATE is logged with its OK and exists.
	creates := map[string]bool{}
	for _, v := range verbs {
		var a verb.IMAPArgs
		var o verb.IMAPOutcome
		if v.Kind == verb.KindIMAPCreate && v.Outcome != nil && json.Unmarshal(v.Args, &a) == nil &&
			json.Unmarshal(v.Outcome.Outcome, &o) == nil && o.Status == "OK" {
			creates[a.Mailbox] = true
		}
	}
	c, err := imapclient.DialInsecure(st.IMAPAddr, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Login("bob", st.Password("bob")).Wait(); err != nil {
		t.Fatal(err)
	}
	boxes, err := c.List("", "K*", nil).Collect()
	if err != nil {
		t.Fatal(err)
	}
	exists := map[string]bool{}
	for _, b := range boxes {
		exists[b.Mailbox] = true
	}
	if len(ackedBoxes) < kills {
		t.Fatalf("only %d CREATEs acknowledged; the IMAP load did not run", len(ackedBoxes))
	}
	lostBoxes := 0
	for name := range ackedBoxes {
		if !creates[name] || !exists[name] {
			lostBoxes++
			t.Errorf("acknowledged CREATE %s: logged %v, in Dovecot %v", name, creates[name], exists[name])
		}
	}
	t.Logf("IMAP: %d CREATEs acknowledged, %d lost", len(ackedBoxes), lostBoxes)
	text, err := run(t, "fsck", "--data-dir", s.dataDir)
	if err != nil {
		t.Fatalf("fsck after %d kills: %v\n%s", kills, err, text)
	}
}

// sendPlain sends one message without TLS (go-smtp's SendMail insists on
// STARTTLS). A nil error means the client got a 250 for the DATA.
func sendPlain(addr, msg string) error {
	c, err := smtp.Dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.SendMail("sender@example.test", []string{"alice@example.test"}, strings.NewReader(msg)); err != nil {
		return err
	}
	c.Quit()
	return nil
}

// imapCreate logs in as bob through undomail and creates one mailbox. A
// nil error means the client got OK for the CREATE.
func imapCreate(addr, pass, name string) error {
	c, err := imapclient.DialInsecure(addr, nil)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Login("bob", pass).Wait(); err != nil {
		return err
	}
	return c.Create(name, nil).Wait()
}

// TestDemoOnce runs the README's demo command end to end.
func TestDemoOnce(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "demo")
	cmd := exec.Command(binary, "demo", "--once", "--dir", dir, "--smtp-listen", "127.0.0.1:0")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("undomail demo --once: %v\n%s", err, out)
	}
	for _, want := range []string{"it arrived in alice's INBOX (checked over IMAP, through undomail's IMAP front end)", "undomail demo is running", "log --data-dir " + filepath.Join(dir, "undo")} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("demo output lacks %q:\n%s", want, out)
		}
	}
	text, err := run(t, "log", "--data-dir", filepath.Join(dir, "undo"))
	if err != nil || strings.Count(text, "Welcome to undomail") != 2 {
		t.Fatalf("the demo's log should show the welcome message's two hops: %v\n%s", err, text)
	}
}

// TestCorruptLogRefusedLoudly damages the last record of a log: serve
// refuses to start (clients then get connection refused, a temporary
// failure, rather than a proxy writing to a log it cannot trust) and fsck
// names the record.
func TestCorruptLogRefusedLoudly(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "undo")
	l, err := undolog.Open(dir, undolog.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := l.Append(context.Background(), &undolog.Record{Kind: verb.KindSMTPSubmit, User: "alice", Args: []byte(`{"undo_id":"x"}`)}); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
	if out, err := exec.Command("sqlite3", filepath.Join(dir, "undo.db"), `UPDATE records SET args = '{"undo_id":"y"}' WHERE seq = 3`).CombinedOutput(); err != nil {
		t.Fatalf("tamper: %v %s", err, out)
	}
	out, err := run(t, "serve", "--data-dir", dir, "--smtp-listen", freeAddr(t), "--smtp-upstream", "127.0.0.1:1")
	if err == nil || !strings.Contains(out, "record 3") || !strings.Contains(out, "checksum mismatch") {
		t.Fatalf("serve on a corrupt log: %v\n%s\nwant a refusal naming record 3", err, out)
	}
	out, err = run(t, "fsck", "--data-dir", dir)
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(out, "record 3: checksum mismatch") {
		t.Fatalf("fsck on a corrupt log: %v\n%s", err, out)
	}
}

// imaplibScript exercises every command the IMAP front end records, with
// Python's imaplib as the client. MOVE and UID EXPUNGE are not in Python
// 3.11's command table, so they are added to it.
const imaplibScript = `
import imaplib, sys
host, port, user, pw = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
imaplib.Commands["MOVE"] = ("SELECTED",)
imaplib.Commands["EXPUNGE"] = ("SELECTED",)
M = imaplib.IMAP4(host, port)
def ok(r):
    typ, data = r
    if typ != "OK":
        sys.exit("command failed: %r %r" % (typ, data))
    return data
ok(M.login(user, pw))
ok(M.create("Work"))
ok(M.subscribe("Work"))
ok(M.unsubscribe("Work"))
msg = b"From: py@example.test\r\nSubject: from imaplib\r\nMessage-Id: <py.1@client.test>\r\n\r\nHi.\r\n"
for i in range(4):
    ok(M.append("INBOX", "(\\Seen)", None, msg))
ok(M.select("INBOX"))
ok(M.store("1", "+FLAGS", "(\\Flagged)"))
ok(M.uid("STORE", "2", "-FLAGS.SILENT", "(\\Seen)"))
ok(M.copy("1", "Work"))
ok(M.uid("COPY", "2", "Work"))
ok(M._simple_command("MOVE", "3", "Work"))
ok(M.uid("MOVE", "4", "Work"))
ok(M.fetch("1", "(BODY.PEEK[])"))
ok(M.store("1", "+FLAGS", "(\\Deleted)"))
ok(M.expunge())
ok(M.select("Work"))
ok(M.uid("STORE", "1:2", "+FLAGS", "(\\Deleted)"))
ok(M.uid("EXPUNGE", "1"))
ok(M.close())
ok(M.rename("Work", "Play"))
ok(M.delete("Play"))
M.logout()
`

// TestIMAPLibThroughUndomail runs imaplib against `undomail serve` and
// checks that `undomail log` shows every recorded command, with UIDs and
// undo ids.
func TestIMAPLibThroughUndomail(t *testing.T) {
	st := mailstacktest.Start(t, mailstack.Options{})
	s := newServer(t, st)
	s.start()
	script := filepath.Join(t.TempDir(), "session.py")
	os.WriteFile(script, []byte(imaplibScript), 0o644)
	host, port, _ := net.SplitHostPort(s.imapAddr)
	if out, err := exec.Command("python3", script, host, port, "alice", st.Password("alice")).CombinedOutput(); err != nil {
		t.Fatalf("imaplib session: %v\n%s", err, out)
	}
	js, err := run(t, "log", "--data-dir", s.dataDir, "--json", "--user", "alice")
	if err != nil {
		t.Fatalf("undomail log: %v\n%s", err, js)
	}
	type logged struct {
		Kind    string
		Args    verb.IMAPArgs
		Outcome *verb.IMAPOutcome
	}
	var got []logged
	for _, line := range strings.Split(strings.TrimSpace(js), "\n") {
		var v logged
		if err := json.Unmarshal([]byte(line), &v); err != nil {
			t.Fatalf("decode %s: %v", line, err)
		}
		got = append(got, v)
	}
	var kinds []string
	for _, v := range got {
		kinds = append(kinds, v.Kind+" "+v.Args.Command)
		if v.Kind != verb.KindIMAPFetch && (v.Outcome == nil || v.Outcome.Status != "OK") {
			t.Errorf("%s %s: outcome %+v, want OK", v.Kind, v.Args.Command, v.Outcome)
		}
	}
	want := []string{
		"imap.create CREATE", "imap.subscribe SUBSCRIBE", "imap.unsubscribe UNSUBSCRIBE",
		"imap.append APPEND", "imap.append APPEND", "imap.append APPEND", "imap.append APPEND",
		"imap.store STORE", "imap.store UID STORE", "imap.copy COPY", "imap.copy UID COPY",
		"imap.move MOVE", "imap.move UID MOVE", "imap.fetch ", "imap.store STORE", "imap.expunge EXPUNGE",
		"imap.store UID STORE", "imap.expunge UID EXPUNGE", "imap.expunge CLOSE", "imap.rename RENAME", "imap.delete DELETE",
	}
	if strings.Join(kinds, "\n") != strings.Join(want, "\n") {
		t.Fatalf("logged verbs:\n%s\nwant:\n%s", strings.Join(kinds, "\n"), strings.Join(want, "\n"))
	}
	// Spot checks: resolved UIDs and undo ids.
	appendID := got[3].Args.UndoID
	if s := got[7].Args; s.Seqs != "1" || s.UIDs != "1" || s.UndoIDs["1"] != appendID {
		t.Errorf("STORE 1 recorded as %+v, want UID 1 = %s", s, appendID)
	}
	if m := got[12].Args; m.UIDs != "4" || m.UndoIDs["4"] != got[6].Args.UndoID || !strings.HasSuffix(got[12].Outcome.CopyUID, " 4 4") {
		t.Errorf("UID MOVE recorded as %+v, outcome %+v", m, got[12].Outcome)
	}
	var seen struct {
		Args verb.IMAPFetchArgs
	}
	json.Unmarshal([]byte(strings.Split(strings.TrimSpace(js), "\n")[13]), &seen)
	if f := seen.Args; f.Seqs != "1" || f.UIDs != "1" || f.UndoIDs["1"] != appendID {
		t.Errorf("sequence-number FETCH recorded as %+v, want UID 1 = %s", f, appendID)
	}
	if e := got[15].Args; e.UIDs != "1" || e.UndoIDs["1"] != appendID {
		t.Errorf("EXPUNGE recorded as %+v, want UID 1 = %s", e, appendID)
	}
	if e := got[17].Args; e.Mailbox != "Work" || e.UIDs != "1" {
		t.Errorf("UID EXPUNGE recorded as %+v", e)
	}
	if c := got[18].Args; c.UIDs != "2" {
		t.Errorf("CLOSE recorded as %+v, want it to expunge UID 2", c)
	}
	if r, d := got[19].Args, got[20].Args; r.UIDValidity == 0 || d.UIDValidity != r.UIDValidity {
		t.Errorf("RENAME/DELETE name the mailbox's incarnation: %+v, %+v", r, d)
	}
	text, err := run(t, "log", "--data-dir", s.dataDir, "--kind", "imap.move")
	if err != nil || !strings.Contains(text, `UID MOVE "INBOX" uid 4 -> "Work"`) || !strings.Contains(text, "OK [COPYUID") {
		t.Fatalf("undomail log --kind imap.move:\n%s", text)
	}
	// After a restart, a message appended over IMAP (it carries no
	// Undomail-Id field) is still named by its APPEND's undo id.
	s.stop()
	s.start()
	again := `
import imaplib, sys
M = imaplib.IMAP4(sys.argv[1], int(sys.argv[2]))
M.login(sys.argv[3], sys.argv[4])
M.select("INBOX")
typ, data = M.uid("STORE", "2", "+FLAGS", "(\\Answered)")
if typ != "OK":
    sys.exit("UID STORE: %r %r" % (typ, data))
M.logout()
`
	os.WriteFile(script, []byte(again), 0o644)
	if out, err := exec.Command("python3", script, host, port, "alice", st.Password("alice")).CombinedOutput(); err != nil {
		t.Fatalf("imaplib after restart: %v\n%s", err, out)
	}
	js, err = run(t, "log", "--data-dir", s.dataDir, "--json", "--kind", "imap.store", "--after", "0")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(js), "\n")
	var last logged
	json.Unmarshal([]byte(lines[len(lines)-1]), &last)
	if last.Args.UIDs != "2" || last.Args.UndoIDs["2"] != got[4].Args.UndoID {
		t.Fatalf("STORE after restart recorded as %+v, want UID 2 = %s", last.Args, got[4].Args.UndoID)
	}
	s.stop()
}

// TestSnapshotCommands: undomail snapshot asks the running daemon for a
// consistent snapshot; undomail snapshots lists it from the log.
func TestSnapshotCommands(t *testing.T) {
	st := mailstacktest.Start(t, mailstack.Options{})
	s := newServer(t, st)
	snapDir := filepath.Join(t.TempDir(), "snaps")
	s.extra = []string{"--store", "copy:" + snapDir, "--mail-root", st.MailRoot, "--doveadm", "doveadm -c " + st.DovecotConfig()}
	if out, err := run(t, "snapshot", "--data-dir", s.dataDir); err == nil || !strings.Contains(out, "no undomail serve running") {
		t.Fatalf("snapshot without a daemon: %v %s", err, out)
	}
	s.start()
	if err := st.SetLMTPRelay(context.Background(), s.lmtpAdr); err != nil {
		t.Fatal(err)
	}
	if err := sendPlain(s.smtpAddr, "Subject: before the snapshot\r\nMessage-Id: <snap.1@client.test>\r\n\r\nhi\r\n"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		ids, _ := inboxMessageIDs(st, "alice")
		if ids["snap.1@client.test"] == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("message not delivered")
		}
		time.Sleep(100 * time.Millisecond)
	}
	out, err := run(t, "snapshot", "--data-dir", s.dataDir, "--reason", "before the upgrade")
	if err != nil || !strings.Contains(out, "at log position") {
		t.Fatalf("undomail snapshot: %v\n%s", err, out)
	}
	name := strings.Fields(out)[1]
	files, _ := filepath.Glob(filepath.Join(snapDir, name, "alice", "Maildir", "*", "*"))
	if len(files) != 1 {
		t.Fatalf("snapshot %s holds %v, want alice's one message", name, files)
	}
	list, err := run(t, "snapshots", "--data-dir", s.dataDir)
	if err != nil || !strings.Contains(list, name) || !strings.Contains(list, "before the upgrade") || !strings.Contains(list, " ok ") {
		t.Fatalf("undomail snapshots: %v\n%s", err, list)
	}
	// A second message after the snapshot, then rewind past it.
	if err := sendPlain(s.smtpAddr, "Subject: after the snapshot\r\nMessage-Id: <snap.2@client.test>\r\n\r\nhi\r\n"); err != nil {
		t.Fatal(err)
	}
	waitInbox(t, st, "snap.2@client.test")
	if out, err := run(t, "rewind", "--data-dir", s.dataDir, "--to", name); err == nil || !strings.Contains(out, "--yes") {
		t.Fatalf("rewind without --yes and no terminal: %v %s", err, out)
	}
	out, err = run(t, "rewind", "--data-dir", s.dataDir, "--to", name, "--yes")
	if err != nil || !strings.Contains(out, `"ok":true`) {
		t.Fatalf("undomail rewind: %v\n%s", err, out)
	}
	ids, err := inboxMessageIDs(st, "alice")
	if err != nil || len(ids) != 1 || ids["snap.1@client.test"] != 1 {
		t.Fatalf("after the rewind alice's INBOX holds %v (%v), want only the message from before the snapshot", ids, err)
	}
	s.stop()
}

// TestSplitCycle: rewind --hold, a repair by hand, replay. Changes are
// refused meanwhile; the replay brings back what came after the snapshot.
func TestSplitCycle(t *testing.T) {
	st, s := repairServer(t)
	out, err := run(t, "snapshot", "--data-dir", s.dataDir)
	if err != nil {
		t.Fatalf("snapshot: %v %s", err, out)
	}
	snap := strings.Fields(out)[1]
	if err := sendPlain(s.smtpAddr, "Subject: after\r\nMessage-Id: <after@client.test>\r\n\r\nhi\r\n"); err != nil {
		t.Fatal(err)
	}
	waitInbox(t, st, "after@client.test")
	if out, err := run(t, "rewind", "--data-dir", s.dataDir, "--to", snap, "--hold", "--yes"); err != nil {
		t.Fatalf("rewind --hold: %v %s", err, out)
	}
	if ids, _ := inboxMessageIDs(st, "alice"); len(ids) != 0 {
		t.Fatalf("after the rewind: %v", ids)
	}
	// Held: new mail is refused for now (the sender retries).
	err = sendPlain(s.smtpAddr, "Subject: during\r\nMessage-Id: <during@client.test>\r\n\r\nhi\r\n")
	var se *smtp.SMTPError
	if !errors.As(err, &se) || se.Code != 451 {
		t.Fatalf("mail during the repair: %v, want 451", err)
	}
	if out, err := run(t, "replay", "--data-dir", s.dataDir); err != nil || !strings.Contains(out, `"Replayed":1`) {
		t.Fatalf("replay: %v %s", err, out)
	}
	if ids, _ := inboxMessageIDs(st, "alice"); ids["after@client.test"] != 1 {
		t.Fatalf("after the replay: %v", ids)
	}
	if out, err := run(t, "replay", "--data-dir", s.dataDir); err == nil || !strings.Contains(out, "no rewind is waiting") {
		t.Fatalf("a second replay: %v %s", err, out)
	}
	s.stop()
}

// TestServeFromExampleConfig boots undomail serve from the documented
// example config, with flags moving its addresses onto the test stack,
// and passes a smoke test: mail in through the front door and delivery
// capture, read back over IMAP through undomail byte for byte, a change
// made, each of them logged as a verb for the right user, and the admin
// answering.
func TestServeFromExampleConfig(t *testing.T) {
	st := mailstacktest.Start(t, mailstack.Options{})
	dataDir := filepath.Join(t.TempDir(), "undo")
	smtpAddr, lmtpAddr, imapAddr, adminAddr := freeAddr(t), freeAddr(t), freeAddr(t), freeAddr(t)
	logPath := dataDir + ".log"
	logf, _ := os.Create(logPath)
	cmd := exec.Command(binary, "serve", "--config", "../../undomail.example.yaml", "--data-dir", dataDir,
		"--smtp-listen", smtpAddr, "--smtp-upstream", st.SMTPAddr, "--smtp-allow-insecure-auth",
		"--lmtp-listen", lmtpAddr, "--lmtp-upstream", st.LMTPAddr,
		"--imap-listen", imapAddr, "--imap-upstream", st.IMAPAddr, "--imap-allow-insecure-auth",
		"--mail-root", st.MailRoot, "--admin-listen", adminAddr)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait(); logf.Close() })
	for _, addr := range []string{smtpAddr, lmtpAddr, imapAddr, adminAddr} {
		deadline := time.Now().Add(30 * time.Second)
		for {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				c.Close()
				break
			}
			if time.Now().After(deadline) {
				b, _ := os.ReadFile(logPath)
				t.Fatalf("serve from the example config does not listen on %s:\n%s", addr, b)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	if err := st.SetLMTPRelay(context.Background(), lmtpAddr); err != nil {
		t.Fatal(err)
	}
	body := "Subject: smoke\r\nMessage-Id: <smoke.1@client.test>\r\n\r\nhi from the smoke test\r\n"
	if err := sendPlain(smtpAddr, body); err != nil {
		t.Fatal(err)
	}
	c, err := imapclient.DialInsecure(imapAddr, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Login("alice", st.Password("alice")).Wait(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		sel, err := c.Select("INBOX", nil).Wait()
		if err == nil && sel.NumMessages == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the message did not arrive")
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Read it through undomail: the body arrives as sent, with the undo id
	// the front door stamped on it.
	msgs, err := c.Fetch(imap.SeqSetNum(1), &imap.FetchOptions{BodySection: []*imap.FetchItemBodySection{{}}}).Collect()
	if err != nil || len(msgs) != 1 || len(msgs[0].BodySection) != 1 {
		t.Fatalf("FETCH BODY[] through undomail: %v %+v", err, msgs)
	}
	got := string(msgs[0].BodySection[0].Bytes)
	if !strings.Contains(got, "Undomail-Id:") || !strings.HasSuffix(got, "\r\n\r\nhi from the smoke test\r\n") {
		t.Fatalf("the message read through undomail:\n%s", got)
	}
	if err := c.Create("Smoke", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	// Every step is a verb in the log; the read names the message by the
	// undo id it carries (the read is recorded once the proxy has matched
	// the FETCH to its UIDs, so wait for it).
	undoID := ""
	for _, line := range strings.Split(got, "\r\n") {
		if v, ok := strings.CutPrefix(line, "Undomail-Id: "); ok {
			undoID = strings.Trim(strings.TrimSpace(v), "<>")
		}
	}
	if undoID == "" {
		t.Fatalf("no Undomail-Id in the message read:\n%s", got)
	}
	for deadline := time.Now().Add(20 * time.Second); ; {
		js, err := run(t, "log", "--data-dir", dataDir, "--json", "--user", "alice", "--kind", "imap.fetch")
		if err == nil && strings.Contains(js, undoID) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("alice's read of %s is not in the log (%v):\n%s", undoID, err, js)
		}
		time.Sleep(100 * time.Millisecond)
	}
	text, err := run(t, "log", "--data-dir", dataDir)
	for _, want := range []string{"smtp.submit", "lmtp.deliver", "imap.fetch", "imap.create"} {
		if err != nil || !strings.Contains(text, want) {
			t.Fatalf("undomail log lacks %s (%v):\n%s", want, err, text)
		}
	}
	resp, err := http.Get("http://" + adminAddr + "/healthz")
	if err != nil {
		t.Fatalf("admin from the example config: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("admin /healthz: %s", resp.Status)
	}
}

// TestCycleUndoesAMassExpunge: a misbehaving client flags and expunges a
// whole folder; undomail cycle plan shows it, undomail cycle run with
// those verbs cancelled brings the messages back, and mail that arrived
// afterwards stays.
func TestCycleUndoesAMassExpunge(t *testing.T) {
	st, s := repairServer(t)
	c, err := imapclient.DialInsecure(s.imapAddr, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Login("alice", st.Password("alice")).Wait(); err != nil {
		t.Fatal(err)
	}
	if err := c.Create("Lists", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		msg := fmt.Sprintf("Subject: list %d\r\nMessage-Id: <list.%d@client.test>\r\n\r\nx\r\n", i, i)
		ap := c.Append("Lists", int64(len(msg)), nil)
		ap.Write([]byte(msg))
		ap.Close()
		if _, err := ap.Wait(); err != nil {
			t.Fatal(err)
		}
	}
	out, err := run(t, "snapshot", "--data-dir", s.dataDir)
	if err != nil {
		t.Fatalf("snapshot: %v %s", err, out)
	}
	snap := strings.Fields(out)[1]
	// The misbehaving client.
	if _, err := c.Select("Lists", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	var all imap.SeqSet
	all.AddRange(1, 0)
	if err := c.Store(all, &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagDeleted}}, nil).Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Expunge().Close(); err != nil {
		t.Fatal(err)
	}
	c.Logout().Wait()
	if err := sendPlain(s.smtpAddr, "Subject: later\r\nMessage-Id: <later@client.test>\r\n\r\nhi\r\n"); err != nil {
		t.Fatal(err)
	}
	waitInbox(t, st, "later@client.test")
	js, err := run(t, "cycle", "plan", "--data-dir", s.dataDir, "--to", snap, "--json")
	if err != nil {
		t.Fatalf("cycle plan: %v %s", err, js)
	}
	var plan struct {
		Verbs []struct {
			Seq    int64
			Kind   string
			Action string
		}
	}
	json.Unmarshal([]byte(js), &plan)
	var cancel []string
	for _, v := range plan.Verbs {
		if v.Kind == "imap.store" || v.Kind == "imap.expunge" {
			cancel = append(cancel, fmt.Sprint(v.Seq))
		}
	}
	if len(cancel) != 2 {
		t.Fatalf("plan: %s", js)
	}
	// The plan says what will differ from the present, and why.
	text, err := run(t, "cycle", "plan", "--data-dir", s.dataDir, "--to", snap, "--cancel", strings.Join(cancel, ","))
	if err != nil || !strings.Contains(text, "afterwards the store differs from the present in these") {
		t.Fatalf("cycle plan --cancel: %v %s", err, text)
	}
	for _, v := range plan.Verbs {
		if v.Kind == "imap.expunge" && !strings.Contains(text, fmt.Sprintf("expunge %d is cancelled", v.Seq)) {
			t.Fatalf("the plan does not say the cancelled EXPUNGE %d brings messages back:\n%s", v.Seq, text)
		}
	}
	// alice's mail client cached her UIDs, and mbsync keeps a copy.
	before := clientcheck.Look(t, s.imapAddr, "alice", st.Password("alice"))
	mb := clientcheck.NewMbsync(t, s.imapAddr, "alice", st.Password("alice"))
	mb.Sync(t)
	out, err = run(t, "cycle", "run", "--data-dir", s.dataDir, "--to", snap, "--cancel", strings.Join(cancel, ","), "--yes")
	if err != nil || !strings.Contains(out, "verdict: OK") || !strings.Contains(out, "cancelled 2,") ||
		!strings.Contains(out, "equal to the present except 3 changes made by the repair") {
		t.Fatalf("cycle run: %v\n%s", err, out)
	}
	after := clientcheck.Look(t, s.imapAddr, "alice", st.Password("alice"))
	if clientcheck.NoUIDReuse(t, before, after) == 0 {
		t.Errorf("no mailbox kept its UIDVALIDITY through the cycle")
	}
	mb.Sync(t)
	mb.Matches(t, after)
	d, err := imapclient.DialInsecure(st.IMAPAddr, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	d.Login("alice", st.Password("alice")).Wait()
	lists, err := d.Select("Lists", nil).Wait()
	if err != nil || lists.NumMessages != 3 {
		t.Fatalf("Lists after the cycle: %+v %v, want its 3 messages back", lists, err)
	}
	if ids, _ := inboxMessageIDs(st, "alice"); ids["later@client.test"] != 1 {
		t.Fatalf("later mail lost in the cycle: %v", ids)
	}
	// The timeline keeps the abandoned branch, with each verb's fate.
	out, err = run(t, "log", "--data-dir", s.dataDir, "--branches")
	if err != nil || !strings.Contains(out, "2 cancelled") || !strings.Contains(out, snap) {
		t.Fatalf("log --branches: %v\n%s", err, out)
	}
	out, err = run(t, "log", "--data-dir", s.dataDir, "--branch", strings.Fields(strings.Split(out, "\n")[1])[0])
	if err != nil || strings.Count(out, "cancelled: left out by the repair") != 2 || !strings.Contains(out, "imap.expunge") {
		t.Fatalf("log --branch: %v\n%s", err, out)
	}
	// A drill from the command line over the cycle's own snapshot and a new
	// one: it passes and is listed.
	if out, err := run(t, "snapshot", "--data-dir", s.dataDir); err != nil {
		t.Fatalf("snapshot: %v %s", err, out)
	}
	out, err = run(t, "drill", "--data-dir", s.dataDir)
	if err != nil || !strings.Contains(out, "drill PASSED") {
		t.Fatalf("drill: %v\n%s", err, out)
	}
	out, err = run(t, "drill", "--data-dir", s.dataDir, "--list")
	if err != nil || !strings.Contains(out, "passed") {
		t.Fatalf("drill --list: %v\n%s", err, out)
	}
	out, err = run(t, "filters", "--data-dir", s.dataDir)
	if err != nil || !strings.Contains(out, "no filters are active") {
		t.Fatalf("filters: %v\n%s", err, out)
	}
	s.stop()
}

// waitInbox waits until a message with the Message-Id is in alice's INBOX.
func waitInbox(t *testing.T, st *mailstack.Stack, msgID string) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); ; {
		if ids, _ := inboxMessageIDs(st, "alice"); ids[msgID] == 1 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not delivered to alice", msgID)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// repairServer starts a private stack and undomail serve in front of it,
// configured for rewinds and cycles (repairConfig), with Postfix's
// deliveries going through undomail's LMTP capture.
func repairServer(t *testing.T) (*mailstack.Stack, *server) {
	t.Helper()
	st := mailstacktest.Start(t, mailstack.Options{})
	s := newServer(t, st)
	s.extra = []string{"--config", repairConfig(t, st)}
	s.start()
	if err := st.SetLMTPRelay(context.Background(), s.lmtpAdr); err != nil {
		t.Fatal(err)
	}
	return st, s
}

// repairConfig writes a config file for undomail serve with what rewinds
// and cycles need on the stack: a copy store of its mail root, doveadm for
// its Dovecot, and its master user.
func repairConfig(t *testing.T, st *mailstack.Stack) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "undomail.yaml")
	cfg := fmt.Sprintf("store: copy:%s\nmail_root: %s\ndovecot:\n  doveadm: [doveadm, -c, %s]\n  master_user: %s\n  master_password: %s\n",
		filepath.Join(t.TempDir(), "snaps"), st.MailRoot, st.DovecotConfig(), st.MasterUser, st.MasterPassword)
	if err := os.WriteFile(p, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
