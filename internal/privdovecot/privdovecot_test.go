package privdovecot

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestStartDeliverLoginStop runs a private Dovecot on a mail root of its
// own, as a drill does: a message delivered over LMTP lands in the
// user's maildir, the master user logs in as that user over IMAP and
// sees it, and Stop leaves no process and no listener behind.
func TestStartDeliverLoginStop(t *testing.T) {
	if _, err := os.Stat(Bin); err != nil {
		t.Fatalf("dovecot is not installed (.ci/run installs it): %v", err)
	}
	dir := t.TempDir()
	root := filepath.Join(dir, "mail")
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s, err := Start(ctx, Options{Dir: filepath.Join(dir, "dovecot"), MailRoot: root, Users: []string{"alice", "bob"}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Stop()

	lmtp := dial(t, s.LMTPAddr)
	lmtp.expect("220")
	for _, step := range []struct{ send, want string }{
		{"LHLO drill.test", "250 "}, {"MAIL FROM:<sam@example.test>", "250"}, {"RCPT TO:<alice@example.test>", "250"},
		{"DATA", "354"}, {"Subject: drill\r\nMessage-Id: <d1@example.test>\r\n\r\nhello\r\n.", "250"}, {"QUIT", "221"},
	} {
		lmtp.send(step.send)
		lmtp.expect(step.want)
	}
	news, _ := filepath.Glob(filepath.Join(root, "alice", "Maildir", "new", "*"))
	if len(news) != 1 {
		t.Fatalf("alice's maildir has %d new messages, want 1 (%v)", len(news), news)
	}

	imap := dial(t, s.IMAPAddr)
	imap.expect("* OK")
	imap.send(fmt.Sprintf(`a LOGIN "alice*%s" "%s"`, s.MasterUser, s.MasterPassword))
	imap.expect("a OK")
	imap.send("b SELECT INBOX")
	if lines := imap.expect("b OK"); !strings.Contains(strings.Join(lines, "\n"), "* 1 EXISTS") {
		t.Fatalf("SELECT INBOX as alice: %q, want 1 message", lines)
	}
	imap.send("d LOGOUT")
	imap.expect("d OK")

	pgid := s.cmd.Process.Pid
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	if s.groupAlive(pgid) {
		t.Fatalf("processes of the private dovecot's group %d are left after Stop", pgid)
	}
	for _, addr := range []string{s.IMAPAddr, s.LMTPAddr} {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			t.Fatalf("%s still accepts connections after Stop", addr)
		}
	}
	if _, err := os.Stat(s.baseDir); !os.IsNotExist(err) {
		t.Fatalf("base_dir %s is left after Stop: %v", s.baseDir, err)
	}
}

type conn struct {
	t  *testing.T
	c  net.Conn
	br *bufio.Reader
}

func dial(t *testing.T, addr string) *conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(time.Minute))
	return &conn{t: t, c: c, br: bufio.NewReader(c)}
}

func (c *conn) send(line string) {
	c.t.Helper()
	if _, err := fmt.Fprintf(c.c, "%s\r\n", line); err != nil {
		c.t.Fatal(err)
	}
}

// expect reads lines until one starts with prefix (an SMTP/LMTP reply's
// last line, or a tagged IMAP response) and returns them; another final
// reply fails the test.
func (c *conn) expect(prefix string) []string {
	c.t.Helper()
	var lines []string
	for {
		l, err := c.br.ReadString('\n')
		if err != nil {
			c.t.Fatalf("waiting for %q after %q: %v", prefix, lines, err)
		}
		l = strings.TrimRight(l, "\r\n")
		lines = append(lines, l)
		if strings.HasPrefix(l, prefix) {
			return lines
		}
		if len(l) > 3 && l[3] == ' ' && l[0] >= '2' && l[0] <= '5' && !strings.HasPrefix(prefix, "*") && !strings.Contains(prefix, " OK") {
			c.t.Fatalf("got %q, want %q", l, prefix)
		}
	}
}
