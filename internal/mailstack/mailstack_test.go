package mailstack_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/textproto"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/internal/mailstack"
	"github.com/undomail/undomail/internal/mailstack/mailstacktest"
)

// dialSMTP opens an SMTP session to addr from the local address from (for
// example 127.0.0.2 to act as an outside client) and says EHLO.
func dialSMTP(t *testing.T, addr, from string) *smtp.Client {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial smtp %s from %s: %v", addr, from, err)
	}
	c := smtp.NewClient(conn)
	t.Cleanup(func() { c.Close() })
	if err := c.Hello("client.test"); err != nil {
		t.Fatalf("EHLO: %v", err)
	}
	return c
}

// sendMail delivers one message through Postfix from 127.0.0.1.
func sendMail(t *testing.T, s *mailstack.Stack, to, body string) {
	t.Helper()
	c := dialSMTP(t, s.SMTPAddr, "127.0.0.1")
	msg := "From: sender@client.test\r\nTo: " + to + "\r\nSubject: test\r\n\r\n" + body + "\r\n"
	if err := c.SendMail("sender@client.test", []string{to}, strings.NewReader(msg)); err != nil {
		t.Fatalf("send mail to %s: %v", to, err)
	}
	if err := c.Quit(); err != nil {
		t.Fatalf("QUIT: %v", err)
	}
}

// loginIMAP logs in to the stack's Dovecot.
func loginIMAP(t *testing.T, s *mailstack.Stack, user, password string) *imapclient.Client {
	t.Helper()
	c, err := imapclient.DialInsecure(s.IMAPAddr, nil)
	if err != nil {
		t.Fatalf("dial imap %s: %v", s.IMAPAddr, err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.Login(user, password).Wait(); err != nil {
		t.Fatalf("IMAP LOGIN %s: %v", user, err)
	}
	return c
}

// waitForBody polls user's INBOX until a message containing want arrives.
func waitForBody(t *testing.T, s *mailstack.Stack, login, password, want string) {
	t.Helper()
	c := loginIMAP(t, s, login, password)
	// Generous: a deferred message waits for Postfix's backoff, and the
	// machine may be busy with other test packages.
	deadline := time.Now().Add(60 * time.Second)
	lastFlush := time.Now()
	section := &imap.FetchItemBodySection{}
	for {
		sel, err := c.Select("INBOX", nil).Wait()
		if err != nil {
			t.Fatalf("SELECT INBOX: %v", err)
		}
		if sel.NumMessages > 0 {
			msgs, err := c.Fetch(imap.SeqSetNum(1, sel.NumMessages), &imap.FetchOptions{
				BodySection: []*imap.FetchItemBodySection{section},
			}).Collect()
			if err != nil {
				t.Fatalf("FETCH: %v", err)
			}
			for _, m := range msgs {
				if strings.Contains(string(m.FindBodySection(section)), want) {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no message containing %q in INBOX of %s after 60s; postfix log:%s", want, login, tail(s.PostfixLog()))
		}
		// Deferred mail (a relay that was down) waits for the queue
		// manager's backoff; on a busy machine ask Postfix to retry now.
		if time.Since(lastFlush) > 2*time.Second {
			s.Flush(context.Background())
			lastFlush = time.Now()
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 20 {
		lines = lines[len(lines)-20:]
	}
	return "\n" + strings.Join(lines, "\n")
}

func TestDeliveryReachesIMAP(t *testing.T) {
	s := mailstacktest.Start(t, mailstack.Options{})
	sendMail(t, s, s.Address("alice"), "hello alice via postfix")
	waitForBody(t, s, "alice", s.Password("alice"), "hello alice via postfix")

	// The full address is an accepted login name for the same mailbox.
	sendMail(t, s, s.Address("alice"), "second message")
	waitForBody(t, s, s.Address("alice"), s.Password("alice"), "second message")

	// An address extension is delivered to the INBOX too.
	sendMail(t, s, "alice+tag@example.test", "with a tag")
	waitForBody(t, s, "alice", s.Password("alice"), "with a tag")

	// Maildirs live where MailRoot says.
	if _, err := os.Stat(filepath.Join(s.MailRoot, "alice", "Maildir")); err != nil {
		t.Fatalf("alice's maildir: %v", err)
	}
}

func TestWrongPasswordRejected(t *testing.T) {
	s := mailstacktest.Start(t, mailstack.Options{})
	c, err := imapclient.DialInsecure(s.IMAPAddr, nil)
	if err != nil {
		t.Fatalf("dial imap: %v", err)
	}
	defer c.Close()
	if err := c.Login("alice", "wrong").Wait(); err == nil {
		t.Fatalf("IMAP LOGIN alice with a wrong password succeeded")
	}
}

func TestUnknownRecipientRejected(t *testing.T) {
	s := mailstacktest.Start(t, mailstack.Options{})
	c := dialSMTP(t, s.SMTPAddr, "127.0.0.1")
	if err := c.Mail("sender@client.test", nil); err != nil {
		t.Fatalf("MAIL FROM: %v", err)
	}
	err := c.Rcpt("nobody@example.test", nil)
	want := "<nobody@example.test>: Recipient address rejected: User unknown in virtual mailbox table"
	smtpErr, ok := err.(*smtp.SMTPError)
	if !ok || smtpErr.Code != 550 || smtpErr.EnhancedCode != (smtp.EnhancedCode{5, 1, 1}) || smtpErr.Message != want {
		t.Fatalf("RCPT TO unknown user: got %#v, want 550 5.1.1 %s", err, want)
	}
}

func TestRelayPolicy(t *testing.T) {
	s := mailstacktest.Start(t, mailstack.Options{})

	c := dialSMTP(t, s.SMTPAddr, "127.0.0.2")
	if err := c.Mail("sender@client.test", nil); err != nil {
		t.Fatalf("MAIL FROM: %v", err)
	}
	err := c.Rcpt("someone@elsewhere.test", nil)
	smtpErr, ok := err.(*smtp.SMTPError)
	if !ok || smtpErr.Code != 554 || smtpErr.EnhancedCode != (smtp.EnhancedCode{5, 7, 1}) || !strings.HasSuffix(smtpErr.Message, "Relay access denied") {
		t.Fatalf("relay from 127.0.0.2 without auth: got %v, want 554 5.7.1 Relay access denied", err)
	}

	c = dialSMTP(t, s.SMTPAddr, "127.0.0.2")
	if err := c.Auth(sasl.NewPlainClient("", "alice", s.Password("alice"))); err != nil {
		t.Fatalf("AUTH PLAIN alice: %v", err)
	}
	if err := c.Mail(s.Address("alice"), nil); err != nil {
		t.Fatalf("MAIL FROM after AUTH: %v", err)
	}
	if err := c.Rcpt("someone@elsewhere.test", nil); err != nil {
		t.Fatalf("relay from 127.0.0.2 after AUTH: %v", err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatalf("DATA: %v", err)
	}
	fmt.Fprintf(w, "Subject: outbound\r\n\r\nthis must not leave\r\n")
	if err := w.Close(); err != nil {
		t.Fatalf("end of DATA: %v", err)
	}
	// Nothing leaves the machine: the message bounces back to alice.
	waitForBody(t, s, "alice", s.Password("alice"), "mail stack delivers nothing outside example.test")

	c = dialSMTP(t, s.SMTPAddr, "127.0.0.2")
	if err := c.Auth(sasl.NewPlainClient("", "alice", "wrong")); err == nil {
		t.Fatalf("AUTH PLAIN alice with a wrong password succeeded")
	}
}

// TestXCLIENT checks that the proxy's address, 127.0.0.1, may pass the real
// client address with XCLIENT, and that Postfix then applies its relay
// policy to that address; other clients are not offered XCLIENT.
func TestXCLIENT(t *testing.T) {
	s := mailstacktest.Start(t, mailstack.Options{})

	outside := dialSMTP(t, s.SMTPAddr, "127.0.0.2")
	if ok, _ := outside.Extension("XCLIENT"); ok {
		t.Fatalf("Postfix offers XCLIENT to 127.0.0.2")
	}

	conn, err := net.DialTimeout("tcp", s.SMTPAddr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial smtp: %v", err)
	}
	defer conn.Close()
	tp := textproto.NewConn(conn)
	expect := func(code int, format string, args ...any) string {
		t.Helper()
		if format != "" {
			if err := tp.PrintfLine(format, args...); err != nil {
				t.Fatalf("send %q: %v", fmt.Sprintf(format, args...), err)
			}
		}
		_, msg, err := tp.ReadResponse(code)
		if err != nil {
			t.Fatalf("after %q: %v", fmt.Sprintf(format, args...), err)
		}
		return msg
	}
	expect(220, "")
	if ehlo := expect(250, "EHLO proxy.test"); !strings.Contains(ehlo, "XCLIENT") {
		t.Fatalf("Postfix does not offer XCLIENT to 127.0.0.1; EHLO said %q", ehlo)
	}
	expect(220, "XCLIENT ADDR=127.0.0.2 NAME=[UNAVAILABLE]")
	expect(250, "EHLO client.test")
	expect(250, "MAIL FROM:<sender@client.test>")
	if msg := expect(554, "RCPT TO:<someone@elsewhere.test>"); !strings.Contains(msg, "Relay access denied") {
		t.Fatalf("relay after XCLIENT ADDR=127.0.0.2: got %q, want Relay access denied", msg)
	}
	expect(250, "RCPT TO:<%s>", s.Address("alice"))
}

func TestMasterUserLogin(t *testing.T) {
	s := mailstacktest.Start(t, mailstack.Options{})
	sendMail(t, s, s.Address("bob"), "for bob")
	waitForBody(t, s, "bob*"+s.MasterUser, s.MasterPassword, "for bob")

	c, err := imapclient.DialInsecure(s.IMAPAddr, nil)
	if err != nil {
		t.Fatalf("dial imap: %v", err)
	}
	defer c.Close()
	if err := c.Login("bob*"+s.MasterUser, "wrong").Wait(); err == nil {
		t.Fatalf("master login with a wrong password succeeded")
	}
}

func TestDoveadm(t *testing.T) {
	s := mailstacktest.Start(t, mailstack.Options{Users: []mailstack.User{{Name: "dave", Password: "pw"}}})
	out, err := s.Doveadm(context.Background(), "user", "dave")
	if err != nil {
		t.Fatalf("doveadm user dave: %v", err)
	}
	if want := filepath.Join(s.MailRoot, "dave", "Maildir"); !strings.Contains(string(out), want) {
		t.Fatalf("doveadm user dave = %q, want mail location containing %s", out, want)
	}
	if _, err := s.Doveadm(context.Background(), "user", "alice"); err == nil {
		t.Fatalf("doveadm user alice succeeded on a stack without alice")
	}
}

func TestTwoStacksAndStop(t *testing.T) {
	a := mailstacktest.Start(t, mailstack.Options{})
	b := mailstacktest.Start(t, mailstack.Options{Domain: "other.test"})
	sendMail(t, a, a.Address("carol"), "carol on a")
	sendMail(t, b, b.Address("carol"), "carol on b")
	waitForBody(t, a, "carol", a.Password("carol"), "carol on a")
	waitForBody(t, b, "carol", b.Password("carol"), "carol on b")

	// An open IMAP session must not keep a process alive past Stop.
	loginIMAP(t, a, "alice", a.Password("alice"))
	aPIDs := mailstack.InstancePIDs(a)
	if len(aPIDs) < 3 {
		t.Fatalf("running stack a has processes %v, want at least both masters and imap", aPIDs)
	}
	start := time.Now()
	if err := a.Stop(); err != nil {
		t.Fatalf("stop a: %v", err)
	}
	t.Logf("stop with an open IMAP session took %v", time.Since(start))
	if left := mailstack.InstancePIDs(a); len(left) > 0 {
		t.Fatalf("processes %v of stack a left after Stop", left)
	}
	for _, pid := range aPIDs {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d/environ", pid)); err == nil {
			if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); len(b) > 0 {
				t.Fatalf("process %d (%q) of stack a still running after Stop", pid, b)
			}
		}
	}
	if err := a.Stop(); err != nil {
		t.Fatalf("second stop of a: %v", err)
	}

	// b is unaffected.
	sendMail(t, b, b.Address("alice"), "b still works")
	waitForBody(t, b, "alice", b.Password("alice"), "b still works")
}

// lmtpSpy is a minimal LMTP server that answers LHLO and records that
// Postfix connected, then rejects the transaction temporarily.
func lmtpSpy(t *testing.T) (addr string, connected <-chan struct{}) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	t.Cleanup(func() { l.Close() })
	ch := make(chan struct{}, 1)
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			select {
			case ch <- struct{}{}:
			default:
			}
			go func() {
				defer conn.Close()
				fmt.Fprintf(conn, "220 spy LMTP\r\n")
				r := bufio.NewReader(conn)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					switch cmd := strings.ToUpper(strings.TrimSpace(line)); {
					case strings.HasPrefix(cmd, "LHLO"):
						fmt.Fprintf(conn, "250 spy\r\n")
					case cmd == "QUIT":
						fmt.Fprintf(conn, "221 bye\r\n")
						return
					default:
						fmt.Fprintf(conn, "451 4.3.0 spy defers\r\n")
					}
				}
			}()
		}
	}()
	return l.Addr().String(), ch
}

func TestSetLMTPRelay(t *testing.T) {
	s := mailstacktest.Start(t, mailstack.Options{})
	ctx := context.Background()
	spy, connected := lmtpSpy(t)
	if err := s.SetLMTPRelay(ctx, spy); err != nil {
		t.Fatalf("SetLMTPRelay(%s): %v", spy, err)
	}
	sendMail(t, s, s.Address("alice"), "through the relay")
	select {
	case <-connected:
	case <-time.After(60 * time.Second):
		t.Fatalf("postfix did not connect to the LMTP relay %s; postfix log:%s", spy, tail(s.PostfixLog()))
	}

	// Back to Dovecot: the deferred message is delivered after all.
	if err := s.SetLMTPRelay(ctx, ""); err != nil {
		t.Fatalf("SetLMTPRelay(\"\"): %v", err)
	}
	if err := s.Flush(ctx); err != nil {
		t.Fatalf("flush: %v", err)
	}
	waitForBody(t, s, "alice", s.Password("alice"), "through the relay")
}

func TestStartWithRelay(t *testing.T) {
	spy, connected := lmtpSpy(t)
	s := mailstacktest.Start(t, mailstack.Options{LMTPRelay: spy})
	sendMail(t, s, s.Address("bob"), "relay from the start")
	select {
	case <-connected:
	case <-time.After(60 * time.Second):
		t.Fatalf("postfix did not connect to the LMTP relay %s; postfix log:%s", spy, tail(s.PostfixLog()))
	}
}

// TestConcurrentLoad checks that Postfix's own load generator, with several
// concurrent sessions from 127.0.0.1, gets every message delivered without
// throttling or rejections.
func TestConcurrentLoad(t *testing.T) {
	s := mailstacktest.Start(t, mailstack.Options{})
	const sessions, perSession = 8, 50
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/usr/sbin/smtp-source", "-s", fmt.Sprint(sessions), "-m", fmt.Sprint(sessions*perSession),
		"-l", "4096", "-f", "load@client.test", "-t", s.Address("carol"), s.SMTPAddr)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("smtp-source: %v: %s", err, out)
	}
	want := fmt.Sprint(sessions * perSession)
	deadline := time.Now().Add(time.Minute)
	for {
		out, err := s.Doveadm(ctx, "-f", "flow", "mailbox", "status", "-u", "carol", "messages", "INBOX")
		if err != nil {
			t.Fatalf("doveadm mailbox status: %v", err)
		}
		var got string
		for _, f := range strings.Fields(string(out)) {
			if v, ok := strings.CutPrefix(f, "messages="); ok {
				got = v
			}
		}
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("carol's INBOX has %s messages, want %s; postfix log:%s", got, want, tail(s.PostfixLog()))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestMissingIsEmptyHere(t *testing.T) {
	// The test machine has the packages installed (mailstacktest fails
	// otherwise); Missing must agree.
	if m := mailstack.Missing(); len(m) != 0 {
		t.Fatalf("Missing() = %v on a machine with the packages installed", m)
	}
}
