package proxy_test

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"

	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/proxy"
	"github.com/undomail/undomail/verb"
)

// A parity session is a raw SMTP (or LMTP) conversation sent byte for byte
// to the upstream directly and through undomail. The replies to each step
// and the message that reaches the mailbox must be the same both ways
// (docs/smtp-parity.md lists what undomail answers itself).
type paritySession struct {
	name  string
	steps []parityStep
	// delivers: a message with Message-Id <{ID}> reaches alice's INBOX.
	delivers bool
	// differs, if set, names an accepted difference (docs/smtp-parity.md):
	// the replies are not compared, only logged.
	differs string
}

type parityStep struct {
	send string
	// replies to read after sending: 0 none, -1 until the server closes.
	replies int
	// dribble sends one byte at a time with this pause between bytes.
	dribble time.Duration
	// bdat: send is a BDAT chunk, sent with its command (LAST if last).
	bdat, last bool
}

// Placeholders in a session's text: {ID} is a Message-Id unique to the
// session and path, {AUTH} alice's AUTH PLAIN response, {USER64} and
// {PASS64} her LOGIN responses, {BAD} a PLAIN response with a wrong
// password.
func step(send string, replies int) parityStep { return parityStep{send: send, replies: replies} }

// msg is a message with the session's Message-Id and body, CRLF lines.
func msg(subject, body string) string {
	return "From: sender@example.test\r\nTo: alice@example.test\r\nSubject: " + subject +
		"\r\nMessage-Id: <{ID}>\r\nDate: Thu, 03 Dec 2026 10:00:00 +0000\r\n\r\n" + body
}

const ehlo = "EHLO client.test\r\n"

// tx is EHLO, MAIL, RCPT alice, DATA, one reply each.
func tx(mailArgs string) []parityStep {
	return []parityStep{step(ehlo, 1), step("MAIL FROM:<sender@example.test>"+mailArgs+"\r\n", 1),
		step("RCPT TO:<alice@example.test>\r\n", 1), step("DATA\r\n", 1)}
}

func with(steps []parityStep, more ...parityStep) []parityStep {
	return append(append([]parityStep(nil), steps...), more...)
}

func smtpCorpus() []paritySession {
	long := func(n int) string { return strings.Repeat("0123456789abcdef", n/16+1)[:n] }
	var manyRcpts strings.Builder
	for i := 0; i < 1003; i++ {
		fmt.Fprintf(&manyRcpts, "RCPT TO:<alice+%d@example.test>\r\n", i)
	}
	var junk strings.Builder
	for i := 0; i < 25; i++ {
		junk.WriteString("FROBNICATE\r\n")
	}
	return []paritySession{
		{name: "plain", delivers: true, steps: with(tx(""), step(msg("plain", "Hello.\r\n")+".\r\n", 1))},
		{name: "HELO not EHLO", delivers: true, steps: []parityStep{step("HELO client.test\r\n", 1),
			step("MAIL FROM:<sender@example.test>\r\n", 1), step("RCPT TO:<alice@example.test>\r\n", 1),
			step("DATA\r\n", 1), step(msg("helo", "x\r\n")+".\r\n", 1)}},
		{name: "no HELO at all", steps: []parityStep{step("MAIL FROM:<sender@example.test>\r\n", 1), step("RCPT TO:<alice@example.test>\r\n", 1)}},
		{name: "line of 5000 bytes", delivers: true, steps: with(tx(""), step(msg("long", long(5000)+"\r\n")+".\r\n", 1))},
		{name: "line of 60000 bytes", delivers: true, steps: with(tx(""), step(msg("very long", long(60000)+"\r\nend\r\n")+".\r\n", 1))},
		{name: "header line of 3000 bytes", delivers: true, steps: with(tx(""), step("X-Long: "+long(3000)+"\r\n"+msg("long header", "x\r\n")+".\r\n", 1))},
		{name: "8-bit body without BODY=", delivers: true, steps: with(tx(""), step(msg("8bit", "Gr\xfc\xdfe, caf\xc3\xa9 \xff\xfe\r\n")+".\r\n", 1))},
		{name: "8-bit body with BODY=8BITMIME", delivers: true, steps: with(tx(" BODY=8BITMIME"), step(msg("8bitmime", "Gr\xc3\xbc\xc3\x9fe\r\n")+".\r\n", 1))},
		{name: "bare LF throughout", delivers: true, steps: with(tx(""), step(strings.ReplaceAll(msg("bare lf", "one\r\ntwo\r\n"), "\r\n", "\n")+".\n", 1))},
		{name: "bare LF and CRLF mixed", delivers: true, steps: with(tx(""), step(msg("mixed", "one\ntwo\r\nthree\n")+".\r\n", 1))},
		{name: "bare CR in body", delivers: true, steps: with(tx(""), step(msg("bare cr", "one\rtwo\r\nthree\r\r\n")+".\r\n", 1))},
		{name: "NUL bytes", delivers: true, steps: with(tx(""), step(msg("nul", "a\x00b\r\n\x00\r\n")+".\r\n", 1))},
		{name: "dot-stuffed lines", delivers: true, steps: with(tx(""), step(msg("dots", "..\r\n...x\r\n.y\r\n. \r\n")+".\r\n", 1))},
		{name: "CR CR LF after dot is not the end", delivers: true, steps: with(tx(""), step(msg("crcrlf", "a\r\n.\r\r\nb\r\n")+".\r\n", 1))},
		{name: "smuggling: LF.LF ends the message for Postfix", delivers: true, steps: with(tx(""),
			step(msg("smuggle", "a\n.\nMAIL FROM:<evil@example.test>\r\nRCPT TO:<bob@example.test>\r\n"), 3), step(".\r\n", 1))},
		{name: "smuggling: CR.CR is not an end", delivers: true, steps: with(tx(""), step(msg("cr dot cr", "a\r.\rMAIL FROM:<x@example.test>\r\n")+".\r\n", 1))},
		{name: "empty message", steps: with(tx(""), step(".\r\n", 1))},
		{name: "BDAT one chunk", delivers: true, steps: []parityStep{step(ehlo, 1), step("MAIL FROM:<sender@example.test>\r\n", 1),
			step("RCPT TO:<alice@example.test>\r\n", 1), bdat(msg("bdat", "chunked\r\n"), true)}},
		{name: "BDAT three chunks, bare LF, no final newline", delivers: true, steps: []parityStep{step(ehlo, 1),
			step("MAIL FROM:<sender@example.test>\r\n", 1), step("RCPT TO:<alice@example.test>\r\n", 1),
			bdat(msg("bdat3", "one\n"), false), bdat(".two\r\n", false), bdat("three", true)}},
		{name: "BDAT 0 LAST after a chunk", delivers: true, steps: []parityStep{step(ehlo, 1),
			step("MAIL FROM:<sender@example.test>\r\n", 1), step("RCPT TO:<alice@example.test>\r\n", 1),
			bdat(msg("bdat0", "x\r\n"), false), bdat("", true)}},
		{name: "BDAT without MAIL", steps: []parityStep{step(ehlo, 1), bdat("hello\r\n", true), step("NOOP\r\n", 1)}},
		{name: "BDAT without valid recipient", steps: []parityStep{step(ehlo, 1), step("MAIL FROM:<sender@example.test>\r\n", 1),
			step("RCPT TO:<nobody@example.test>\r\n", 1), bdat("hello\r\n", true), step("NOOP\r\n", 1)}},
		{name: "BDAT malformed size", steps: []parityStep{step(ehlo, 1), step("MAIL FROM:<sender@example.test>\r\n", 1),
			step("BDAT x LAST\r\n", 1), step("NOOP\r\n", 1)}},
		{name: "BDAT 0 not last", steps: []parityStep{step(ehlo, 1), step("MAIL FROM:<sender@example.test>\r\n", 1),
			step("RCPT TO:<alice@example.test>\r\n", 1), bdat("", false), step("NOOP\r\n", 1)}},
		{name: "MAIL and RCPT after BDAT", steps: []parityStep{step(ehlo, 1), step("MAIL FROM:<sender@example.test>\r\n", 1),
			step("RCPT TO:<alice@example.test>\r\n", 1), bdat("Subject: x\r\n", false), step("MAIL FROM:<a@example.test>\r\n", 1),
			step("RCPT TO:<bob@example.test>\r\n", 1), step("RSET\r\n", 1)}},
		{name: "DATA after BDAT", steps: []parityStep{step(ehlo, 1), step("MAIL FROM:<sender@example.test>\r\n", 1),
			step("RCPT TO:<alice@example.test>\r\n", 1), bdat("Subject: x\r\n", false), step("DATA\r\n", 1), step("RSET\r\n", 1)}},
		{name: "pipelined envelope", delivers: true, steps: []parityStep{step(ehlo, 1),
			step("MAIL FROM:<sender@example.test>\r\nRCPT TO:<nobody@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n", 4),
			step(msg("pipelined", "x\r\n")+".\r\n", 1)}},
		{name: "everything in one write", delivers: true, steps: []parityStep{step(ehlo+"MAIL FROM:<sender@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"+
			msg("one write", "x\r\n")+".\r\nQUIT\r\n", -1)}},
		{name: "AUTH PLAIN wrong then right", steps: []parityStep{step(ehlo, 1), step("AUTH PLAIN {BAD}\r\n", 1),
			step("AUTH PLAIN {AUTH}\r\n", 1), step("MAIL FROM:<alice@example.test>\r\n", 1), step("RCPT TO:<someone@elsewhere.example>\r\n", 1)}},
		{name: "AUTH PLAIN with continuation", steps: []parityStep{step(ehlo, 1), step("AUTH PLAIN\r\n", 1), step("{AUTH}\r\n", 1),
			step("MAIL FROM:<alice@example.test>\r\n", 1), step("RCPT TO:<someone@elsewhere.example>\r\n", 1)}},
		{name: "AUTH LOGIN", steps: []parityStep{step(ehlo, 1), step("AUTH LOGIN\r\n", 1), step("{USER64}\r\n", 1), step("{PASS64}\r\n", 1),
			step("MAIL FROM:<alice@example.test>\r\n", 1), step("RCPT TO:<someone@elsewhere.example>\r\n", 1)}},
		{name: "AUTH cancelled, then right", steps: []parityStep{step(ehlo, 1), step("AUTH LOGIN\r\n", 1), step("*\r\n", 1),
			step("AUTH PLAIN {AUTH}\r\n", 1), step("AUTH PLAIN {AUTH}\r\n", 1)}},
		{name: "AUTH malformed and unknown mechanism", steps: []parityStep{step(ehlo, 1), step("AUTH PLAIN !!!notbase64\r\n", 1),
			step("AUTH CRAM-MD5\r\n", 1), step("AUTH\r\n", 1), step("NOOP\r\n", 1)}},
		{name: "quoted local part with space", delivers: true, steps: []parityStep{step(ehlo, 1), step("MAIL FROM:<\"a b\"@example.test>\r\n", 1),
			step("RCPT TO:<alice@example.test>\r\n", 1), step("DATA\r\n", 1), step(msg("quoted", "x\r\n")+".\r\n", 1)}},
		{name: "null sender and bare address", delivers: true, steps: []parityStep{step(ehlo, 1), step("MAIL FROM:<>\r\n", 1),
			step("RCPT TO:alice@example.test\r\n", 1), step("DATA\r\n", 1), step(msg("null sender", "x\r\n")+".\r\n", 1)}},
		{name: "MAIL without brackets and odd spacing", steps: []parityStep{step(ehlo, 1), step("MAIL FROM: sender@example.test\r\n", 1),
			step("RSET\r\n", 1), step("mail from:<Sender@Example.Test> \r\n", 1), step("rcpt to: <alice@example.test>\r\n", 1)}},
		{name: "SIZE over the limit declared", steps: []parityStep{step(ehlo, 1), step("MAIL FROM:<sender@example.test> SIZE=99999999\r\n", 1)}},
		{name: "unknown MAIL parameter", steps: []parityStep{step(ehlo, 1), step("MAIL FROM:<sender@example.test> FOO=BAR\r\n", 1)}},
		{name: "RCPT of 5000 bytes", steps: []parityStep{step(ehlo, 1), step("MAIL FROM:<sender@example.test>\r\n", 1),
			step("RCPT TO:<"+long(5000)+"@example.test>\r\n", 1), step("RCPT TO:<alice@example.test>\r\n", 1)}},
		{name: "unknown, relay denied, then known recipient", delivers: true, steps: []parityStep{step(ehlo, 1), step("MAIL FROM:<sender@example.test>\r\n", 1),
			step("RCPT TO:<nobody@example.test>\r\n", 1), step("RCPT TO:<someone@elsewhere.example>\r\n", 1),
			step("RCPT TO:<alice@example.test>\r\n", 1), step("DATA\r\n", 1), step(msg("some refused", "x\r\n")+".\r\n", 1)}},
		{name: "1003 recipients", steps: []parityStep{step(ehlo, 1), step("MAIL FROM:<sender@example.test>\r\n", 1),
			step(manyRcpts.String(), 1003), step("RSET\r\n", 1)}},
		{name: "EHLO of 300 bytes", steps: []parityStep{step("EHLO "+long(300)+"\r\n", 1), step("MAIL FROM:<sender@example.test>\r\n", 1)}},
		{name: "EHLO with bare CR", steps: []parityStep{step("EHLO client\rtest\r\n", 1), step("MAIL FROM:<sender@example.test>\r\n", 1)}},
		{name: "EHLO without argument", steps: []parityStep{step("EHLO\r\n", 1), step("HELO\r\n", 1), step(ehlo, 1)}},
		{name: "command line of 3000 bytes", steps: []parityStep{step(ehlo, 1), step("NOOP "+long(3000)+"\r\n", 1), step("X"+long(3000)+"\r\n", 1), step("NOOP\r\n", 1)}},
		{name: "lower case and unknown commands", steps: []parityStep{step("ehlo client.test\r\n", 1), step("frobnicate\r\n", 1),
			step("noop\r\n", 1), step("vrfy alice@example.test\r\n", 1), step("HELP\r\n", 1), step("ETRN example.test\r\n", 1)}},
		{name: "out of order commands", steps: []parityStep{step(ehlo, 1), step("RCPT TO:<alice@example.test>\r\n", 1), step("DATA\r\n", 1),
			step("MAIL FROM:<sender@example.test>\r\n", 1), step("MAIL FROM:<sender@example.test>\r\n", 1), step("DATA\r\n", 1), step("DATA x\r\n", 1)}},
		{name: "hard error limit", steps: []parityStep{step(ehlo, 1), step(junk.String(), -1)}},
		{name: "XCLIENT and XFORWARD from the client", steps: []parityStep{step(ehlo, 1), step("XCLIENT ADDR=10.0.0.1\r\n", 1),
			step("XFORWARD ADDR=10.0.0.1\r\n", 1), step("MAIL FROM:<sender@example.test>\r\n", 1)}},
		{name: "STARTTLS not offered", steps: []parityStep{step(ehlo, 1), step("STARTTLS\r\n", 1), step("NOOP\r\n", 1)}},
		{name: "message over the size limit", steps: with(tx(""), step(msg("too big", strings.Repeat(long(998)+"\r\n", 150))+".\r\n", 1), step("NOOP\r\n", 1))},
		{name: "message just under the size limit", delivers: true, steps: with(tx(""), step(msg("fits", strings.Repeat(long(998)+"\r\n", 90))+".\r\n", 1))},
		{name: "two transactions and RSET", delivers: true, steps: with(tx(""), step(msg("first", "x\r\n")+".\r\n", 1),
			step("MAIL FROM:<sender@example.test>\r\n", 1), step("RSET\r\n", 1), step("MAIL FROM:<sender@example.test>\r\n", 1),
			step("RCPT TO:<alice@example.test>\r\n", 1), step("DATA\r\n", 1), step(strings.Replace(msg("second", "y\r\n"), "<{ID}>", "<second@client.test>", 1)+".\r\n", 1))},
		{name: "QUIT inside a transaction", steps: []parityStep{step(ehlo, 1), step("MAIL FROM:<sender@example.test>\r\n", 1), step("QUIT\r\n", -1)}},
		// Postfix cannot hand an SMTPUTF8 envelope on to Dovecot 2.3's LMTP
		// (TestSMTPUTF8), so only the replies are compared.
		{name: "SMTPUTF8", steps: []parityStep{step(ehlo, 1), step("MAIL FROM:<j\xc3\xb6rg@example.test> SMTPUTF8\r\n", 1),
			step("RCPT TO:<alice@example.test>\r\n", 1), step("DATA\r\n", 1), step(msg("Gr\xc3\xbc\xc3\x9fe", "x\r\n")+".\r\n", 1)}},
		// 8 s for the line, longer than parityTimeout in all but never
		// between two bytes: both answer it, then both time out the
		// silent client.
		{name: "slow client, then silent", steps: []parityStep{{send: "HELO s\r\n", replies: 1, dribble: time.Second}, step("", -1)}},
	}
}

// bdat is one BDAT chunk with its data and one reply.
func bdat(data string, last bool) parityStep {
	return parityStep{send: data, replies: 1, bdat: true, last: last}
}

// parityTimeout is Postfix's smtpd_timeout and the front door's
// ClientTimeout in the parity test, short so the silent client's session
// ends within the test.
const parityTimeout = 6 * time.Second

// TestSMTPParity sends the corpus to Postfix directly and through a front
// door in front of the same Postfix, and compares the replies and the
// delivered messages.
func TestSMTPParity(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	// Postfix's defaults for what the corpus probes (the stack raises
	// the error limits for load tests), a small size limit, and a short
	// timeout; then a front door that learns them from its probe.
	postconf(t, tb, "smtpd_hard_error_limit=20", "smtpd_soft_error_limit=10", "smtpd_junk_command_limit=100",
		"message_size_limit=100000", fmt.Sprintf("smtpd_timeout=%ds", int(parityTimeout.Seconds())))
	// Like the testbed's own front door, with the parity timeout and
	// Postfix's host name in the replies undomail gives itself.
	_, front := startRelay(t, proxy.SMTPConfig{
		Upstream: tb.Stack.SMTPAddr, XClient: true, AllowInsecureAuth: true,
		Hostname: "mx." + tb.Stack.Domain, ClientTimeout: parityTimeout, UpstreamTimeout: time.Minute,
	})
	runParity(t, tb, smtpCorpus(), tb.Stack.SMTPAddr, front, "127.0.0.2")
}

// postconf changes the stack's Postfix configuration and reloads it.
func postconf(t *testing.T, tb *testbed.Testbed, settings ...string) {
	t.Helper()
	dir := tb.Stack.PostfixConfigDir()
	args := append([]string{"-c", dir, "-e"}, settings...)
	if out, err := exec.Command("postconf", args...).CombinedOutput(); err != nil {
		t.Fatalf("postconf %v: %v: %s", settings, err, out)
	}
	if out, err := exec.Command("postfix", "-c", dir, "reload").CombinedOutput(); err != nil {
		t.Fatalf("postfix reload: %v: %s", err, out)
	}
	// Reload replaces smtpd processes as they finish; a new connection
	// gets the new settings once the master has re-read main.cf, which it
	// has when a fresh smtpd greets with the new limits.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		c, err := net.DialTimeout("tcp", tb.Stack.SMTPAddr, 5*time.Second)
		if err == nil {
			r := bufio.NewReader(c)
			c.SetDeadline(time.Now().Add(10 * time.Second))
			readReplyLines(r)
			fmt.Fprintf(c, "EHLO probe\r\n")
			lines, _ := readReplyLines(r)
			c.Close()
			if strings.Contains(strings.Join(lines, "\n"), "SIZE 100000\r") {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("Postfix did not take the new settings %v", settings)
		}
	}
}

// readReplyLines reads one reply's raw lines (CRLF kept).
func readReplyLines(r *bufio.Reader) ([]string, error) {
	var lines []string
	for {
		l, err := r.ReadString('\n')
		if err != nil {
			return lines, err
		}
		lines = append(lines, l)
		if len(l) < 4 || l[3] != '-' {
			return lines, nil
		}
	}
}

// replyLog is what a client saw: each reply, normalised, in order.
type replyLog []string

// play runs a session against addr from the source address src and
// returns its replyLog; QUIT ends it unless the server did.
func play(t *testing.T, addr, src string, s paritySession, id string, subst map[string]string) replyLog {
	t.Helper()
	d := net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("%s: dial %s: %v", s.name, addr, err)
	}
	defer c.Close()
	r := bufio.NewReaderSize(c, 1<<20)
	var tr replyLog
	closed := false
	read := func(n int) {
		for i := 0; n < 0 || i < n; i++ {
			// A generous bound so a hung session fails the test instead
			// of stalling it; nothing is measured.
			c.SetReadDeadline(time.Now().Add(60 * time.Second))
			lines, err := readReplyLines(r)
			if err != nil {
				if len(lines) > 0 || err != io.EOF || n >= 0 {
					tr = append(tr, fmt.Sprintf("read error after %q: %v", lines, errKind(err)))
				}
				closed = true
				return
			}
			tr = append(tr, normalise(strings.Join(lines, ""), id))
		}
	}
	read(1) // the greeting
	for _, st := range s.steps {
		if closed {
			break
		}
		text := st.send
		for k, v := range subst {
			text = strings.ReplaceAll(text, k, v)
		}
		text = strings.ReplaceAll(text, "{ID}", id)
		if st.bdat {
			cmd := fmt.Sprintf("BDAT %d", len(text))
			if st.last {
				cmd += " LAST"
			}
			text = cmd + "\r\n" + text
		}
		if st.dribble > 0 {
			for i := 0; i < len(text); i++ {
				time.Sleep(st.dribble)
				c.Write([]byte{text[i]})
			}
		} else if text != "" {
			c.Write([]byte(text))
		}
		read(st.replies)
	}
	if !closed {
		c.Write([]byte("QUIT\r\n"))
		read(1)
	}
	return tr
}

func errKind(err error) string {
	// Postfix closes with unread input (a reset) where undomail closes
	// after reading it: the client sees a closed connection either way.
	if err == io.EOF || errors.Is(err, syscall.ECONNRESET) {
		return "closed"
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "timeout"
	}
	return err.Error()
}

var (
	queueID    = regexp.MustCompile(`queued as [0-9A-Za-z]+`)
	chunkBytes = regexp.MustCompile(`Ok: [0-9]+ bytes queued as`)
	xclientCap = regexp.MustCompile(`(?m)^250-(XCLIENT|XFORWARD)( [^\r\n]*)?\r\n`)
	dovecotSID = regexp.MustCompile(`[0-9A-Za-z+/]{22,}`)
)

// normalise masks what differs between any two deliveries: Postfix's
// queue id, Dovecot's session id, the session's Message-Id; and the byte
// count in Postfix's reply to BDAT LAST, which counts the whole message,
// undomail's trace header included (docs/smtp-parity.md).
//
// XCLIENT and XFORWARD are dropped from EHLO/LHLO replies: an upstream
// offers them to a client it trusts, as Dovecot's LMTP does to the test's
// local client, and undomail never passes them on.
func normalise(reply, id string) string {
	reply = xclientCap.ReplaceAllString(reply, "")
	reply = chunkBytes.ReplaceAllString(reply, "Ok: N bytes queued as")
	reply = queueID.ReplaceAllString(reply, "queued as QUEUEID")
	reply = dovecotSID.ReplaceAllString(reply, "SESSIONID")
	return strings.ReplaceAll(reply, id, "{ID}")
}

// runParity plays every session both ways and compares.
func runParity(t *testing.T, tb *testbed.Testbed, corpus []paritySession, direct, ours, src string) {
	pw := tb.Stack.Password("alice")
	subst := map[string]string{
		"{AUTH}":   base64.StdEncoding.EncodeToString([]byte("\x00alice\x00" + pw)),
		"{BAD}":    base64.StdEncoding.EncodeToString([]byte("\x00alice\x00wrong")),
		"{USER64}": base64.StdEncoding.EncodeToString([]byte("alice")),
		"{PASS64}": base64.StdEncoding.EncodeToString([]byte(pw)),
	}
	run := fmt.Sprintf("%d", time.Now().UnixNano())
	type pending struct{ name, directID, oursID string }
	var waits []pending
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i, s := range corpus {
		// Of equal length, so byte counts in replies compare.
		directID := fmt.Sprintf("parity.%d.dir.%s@client.test", i, run)
		oursID := fmt.Sprintf("parity.%d.via.%s@client.test", i, run)
		// Sessions run in parallel, each path in sequence: a session's
		// two plays see the same server state.
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := play(t, direct, src, s, directID, subst)
			o := play(t, ours, src, s, oursID, subst)
			if s.differs != "" {
				t.Logf("%s: accepted difference (%s):\n upstream: %s\n undomail: %s", s.name, s.differs, clip([]byte(fmt.Sprintf("%q", d))), clip([]byte(fmt.Sprintf("%q", o))))
			} else if diff := compareTranscripts(d, o); diff != "" {
				t.Errorf("%s: replies differ: %s\n upstream: %s\n undomail: %s", s.name, diff, clip([]byte(fmt.Sprintf("%q", d))), clip([]byte(fmt.Sprintf("%q", o))))
			}
			if s.delivers {
				mu.Lock()
				waits = append(waits, pending{s.name, directID, oursID})
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	for _, w := range waits {
		dm := waitForFull(t, tb, "alice", w.directID)
		om := waitForFull(t, tb, "alice", w.oursID)
		dn, on := normaliseMessage(dm, w.directID), normaliseMessage(om, w.oursID)
		if !bytes.Equal(dn, on) {
			t.Errorf("%s: delivered messages differ:\n upstream: %q\n undomail: %q", w.name, clip(dn), clip(on))
		}
	}
}

func clip(b []byte) string {
	if len(b) > 1500 {
		return string(b[:1500]) + fmt.Sprintf("... (%d bytes)", len(b))
	}
	return string(b)
}

func compareTranscripts(d, o replyLog) string {
	for i := 0; i < len(d) || i < len(o); i++ {
		var dl, ol string
		if i < len(d) {
			dl = d[i]
		}
		if i < len(o) {
			ol = o[i]
		}
		if dl != ol {
			return fmt.Sprintf("reply %d: %q vs %q", i, dl, ol)
		}
	}
	return ""
}

// normaliseMessage drops the trace fields that differ between two
// deliveries of the same message (Received, undomail's Undomail-Id) and
// masks the Message-Id.
func normaliseMessage(m []byte, id string) []byte {
	hdr, body, _ := bytes.Cut(m, []byte("\r\n\r\n"))
	var out bytes.Buffer
	skip := false
	for _, l := range bytes.SplitAfter(hdr, []byte("\r\n")) {
		if len(l) > 0 && (l[0] == ' ' || l[0] == '\t') {
			if !skip {
				out.Write(l)
			}
			continue
		}
		skip = bytes.HasPrefix(l, []byte("Received:")) || bytes.HasPrefix(l, []byte(verb.TraceHeader+":"))
		if !skip {
			out.Write(l)
		}
	}
	out.WriteString("\r\n\r\n")
	out.Write(body)
	return bytes.ReplaceAll(out.Bytes(), []byte(id), []byte("{ID}"))
}

// waitForFull polls user's INBOX for the message with the Message-Id and
// returns it whole.
func waitForFull(t *testing.T, tb *testbed.Testbed, user, msgID string) []byte {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		m, err := fetchFull(tb, user, msgID)
		if err == nil && m != nil {
			return m
		}
		if time.Now().After(deadline) {
			t.Fatalf("message %s not in %s's INBOX after 60s (last error %v)", msgID, user, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func fetchFull(tb *testbed.Testbed, user, msgID string) ([]byte, error) {
	c, err := imapclient.DialInsecure(tb.Stack.IMAPAddr, nil)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if err := c.Login(user, tb.Stack.Password(user)).Wait(); err != nil {
		return nil, err
	}
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		return nil, err
	}
	found, err := c.Search(&imap.SearchCriteria{Header: []imap.SearchCriteriaHeaderField{{Key: "Message-Id", Value: msgID}}}, nil).Wait()
	if err != nil || len(found.AllSeqNums()) == 0 {
		return nil, err
	}
	msgs, err := c.Fetch(imap.SeqSetNum(found.AllSeqNums()[0]), &imap.FetchOptions{
		BodySection: []*imap.FetchItemBodySection{{Peek: true}},
	}).Collect()
	if err != nil || len(msgs) == 0 {
		return nil, err
	}
	for _, b := range msgs[0].BodySection {
		return b.Bytes, nil
	}
	return nil, nil
}

const lhlo = "LHLO client.test\r\n"

// lmtpTx is LHLO, MAIL, RCPT alice, DATA, one reply each.
func lmtpTx(rcpts ...string) []parityStep {
	steps := []parityStep{step(lhlo, 1), step("MAIL FROM:<sender@example.test>\r\n", 1)}
	if len(rcpts) == 0 {
		rcpts = []string{"alice@example.test"}
	}
	for _, r := range rcpts {
		steps = append(steps, step("RCPT TO:<"+r+">\r\n", 1))
	}
	return append(steps, step("DATA\r\n", 1))
}

func lmtpCorpus() []paritySession {
	long := func(n int) string { return strings.Repeat("0123456789abcdef", n/16+1)[:n] }
	var many strings.Builder
	for i := 0; i < 60; i++ {
		fmt.Fprintf(&many, "RCPT TO:<alice+%d@example.test>\r\n", i)
	}
	return []paritySession{
		{name: "plain", delivers: true, steps: with(lmtpTx(), step(msg("plain", "Hello.\r\n")+".\r\n", 1))},
		{name: "two recipients, one reply each", delivers: true, steps: with(lmtpTx("alice@example.test", "bob@example.test"),
			step(msg("two", "x\r\n")+".\r\n", 2))},
		{name: "unknown recipient then alice", delivers: true, steps: with(lmtpTx("nosuch@example.test", "alice@example.test"),
			step(msg("one refused", "x\r\n")+".\r\n", 1))},
		{name: "line of 5000 bytes", delivers: true, steps: with(lmtpTx(), step(msg("long", long(5000)+"\r\n")+".\r\n", 1))},
		{name: "line of 60000 bytes", delivers: true, steps: with(lmtpTx(), step(msg("very long", long(60000)+"\r\n")+".\r\n", 1))},
		{name: "bare LF", delivers: true, steps: with(lmtpTx(), step(strings.ReplaceAll(msg("bare lf", "a\r\nb\r\n"), "\r\n", "\n")+".\r\n", 1))},
		{name: "LF.LF and CR CR LF as ends", delivers: true, steps: with(lmtpTx(),
			step(msg("lf end", "a\r\n.\r\r\nb\n.\nNOOP\r\n"), 2), step(".\r\n", 1))},
		{name: "NUL and 8-bit", delivers: true, steps: with(lmtpTx(), step(msg("nul", "a\x00b \xff\xfe caf\xc3\xa9\r\n")+".\r\n", 1))},
		{name: "dot-stuffing and CR CR LF", delivers: true, steps: with(lmtpTx(), step(msg("dots", "..\r\n.x\r\na\rb\r\n")+".\r\n", 1))},
		{name: "empty message", steps: with(lmtpTx(), step(".\r\n", 1))},
		{name: "BDAT one chunk", delivers: true, steps: []parityStep{step(lhlo, 1), step("MAIL FROM:<sender@example.test>\r\n", 1),
			step("RCPT TO:<alice@example.test>\r\n", 1), bdat(msg("bdat", "chunked\r\n"), true)}},
		{name: "BDAT two chunks", delivers: true, steps: []parityStep{step(lhlo, 1), step("MAIL FROM:<sender@example.test>\r\n", 1),
			step("RCPT TO:<alice@example.test>\r\n", 1), bdat(msg("bdat2", "one\r\n"), false), bdat("two\r\n", true)}},
		{name: "pipelined envelope", delivers: true, steps: []parityStep{step(lhlo, 1),
			step("MAIL FROM:<sender@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n", 3), step(msg("pipelined", "x\r\n")+".\r\n", 1)}},
		{name: "quoted local part and null sender", delivers: true, steps: []parityStep{step(lhlo, 1),
			step("MAIL FROM:<\"a b\"@example.test>\r\n", 1), step("RSET\r\n", 1), step("MAIL FROM:<>\r\n", 1),
			step("RCPT TO:<alice@example.test>\r\n", 1), step("DATA\r\n", 1), step(msg("quoted", "x\r\n")+".\r\n", 1)}},
		{name: "out of order commands", steps: []parityStep{step(lhlo, 1), step("RCPT TO:<alice@example.test>\r\n", 1), step("DATA\r\n", 1),
			step("MAIL FROM:<sender@example.test>\r\n", 1), step("DATA\r\n", 1), step("MAIL FROM:<sender@example.test>\r\n", 1)}},
		{name: "LHLO of 300 bytes, EHLO, unknown command", steps: []parityStep{step("LHLO "+long(300)+"\r\n", 1),
			step(ehlo, 1), step("FROBNICATE\r\n", 1), step("NOOP\r\n", 1)}},
		{name: "60 recipients", steps: []parityStep{step(lhlo, 1), step("MAIL FROM:<sender@example.test>\r\n", 1),
			step(many.String(), 60), step("DATA\r\n", 1), step(msg("sixty", "x\r\n")+".\r\n", 60)}},
	}
}

// TestLMTPParity sends the LMTP corpus to Dovecot's LMTP directly and
// through the testbed's LMTP capture.
func TestLMTPParity(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	runParity(t, tb, lmtpCorpus(), tb.Stack.LMTPAddr, tb.Daemon.LMTPAddr.String(), "127.0.0.1")
}
