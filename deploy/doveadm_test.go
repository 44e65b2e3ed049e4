package deploy

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/internal/mailstack"
	"github.com/undomail/undomail/internal/mailstack/mailstacktest"
)

// TestDovecotSnippetUnprivileged proves the privilege model the systemd
// unit and the compose file rely on, against real Dovecot: with
// conf.d/90-undomail.conf included, a process that is not root and only
// in the snippet's group runs every doveadm command a rewind runs, with
// undomail's own doveadm.conf, and logs in as a user through the master
// passdb. The test uses nobody/nogroup for the undomail user and group.
func TestDovecotSnippetUnprivileged(t *testing.T) {
	st := mailstacktest.Start(t, mailstack.Options{})
	clientConf := installSnippet(t, st).clientConf

	if out, err := st.Doveadm(context.Background(), "mailbox", "create", "-u", "alice", "Archive"); err != nil {
		t.Fatalf("create a mailbox as root: %v %s", err, out)
	}
	// Deliveries still work with the changed socket permissions.
	conn, err := net.Dial("tcp", st.LMTPAddr)
	if err != nil {
		t.Fatal(err)
	}
	lc := smtp.NewClientLMTP(conn)
	defer lc.Close()
	if err := lc.SendMail("bob@example.test", []string{st.Address("alice")}, strings.NewReader("Subject: after the snippet\r\n\r\nhi\r\n")); err != nil {
		t.Fatalf("LMTP delivery with the snippet included: %v", err)
	}
	asUndomail := func(args ...string) (string, error) {
		cmd := exec.Command("setpriv", append([]string{"--reuid=nobody", "--regid=nogroup", "--clear-groups",
			"doveadm", "-c", clientConf}, args...)...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := asUndomail("-f", "tab", "mailbox", "status", "-A", "uidvalidity uidnext highestmodseq", "*")
	if err != nil || !regexp.MustCompile(`(?m)^alice\tArchive\t`).MatchString(out) {
		t.Fatalf("mailbox status -A as an unprivileged user: %v\n%s", err, out)
	}
	if out, err := asUndomail("mailbox", "update", "-u", "alice", "--min-next-uid", "500", "--min-highest-modseq", "900", "Archive"); err != nil {
		t.Fatalf("mailbox update as an unprivileged user: %v\n%s", err, out)
	}
	out, err = asUndomail("-f", "tab", "mailbox", "status", "-u", "alice", "uidnext highestmodseq", "Archive")
	if err != nil || !strings.Contains(out, "500\t900") {
		t.Fatalf("UIDNEXT/HIGHESTMODSEQ after the update: %v\n%s", err, out)
	}
	out, err = asUndomail("-f", "tab", "mailbox", "status", "-u", "alice", "messages", "INBOX")
	if err != nil || !regexp.MustCompile(`(?m)^INBOX\t1$`).MatchString(out) {
		t.Fatalf("alice's INBOX after one LMTP delivery: %v\n%s", err, out)
	}
	// Nobody is logged in: doveadm kick reached anvil and says so (68).
	out, err = asUndomail("kick", "*")
	var ee *exec.ExitError
	if err != nil && (!errors.As(err, &ee) || ee.ExitCode() != 68) {
		t.Fatalf("kick as an unprivileged user: %v\n%s", err, out)
	}
	if strings.Contains(out, "Permission denied") {
		t.Fatalf("doveadm as the undomail user hit a permission error:\n%s", out)
	}
	// Replay logs in as alice through the snippet's master passdb.
	ic, err := imapclient.DialInsecure(st.IMAPAddr, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ic.Close()
	if err := ic.Login("alice*undomail", "s3cret-master").Wait(); err != nil {
		t.Fatalf("IMAP login as alice through the master user: %v\n%s", err, tail(st.DovecotLog()))
	}
	if sel, err := ic.Select("INBOX", nil).Wait(); err != nil || sel.NumMessages != 1 {
		t.Fatalf("alice's INBOX through the master user: %v %+v", err, sel)
	}

	// And without the group, the same command is refused: the group is
	// what grants it.
	cmd := exec.Command("setpriv", "--reuid=nobody", "--regid=daemon", "--clear-groups", "doveadm", "-c", clientConf, "kick", "*")
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "ermission denied") {
		t.Fatalf("kick without the group: %v\n%s; want a permission error", err, out)
	}
}

// snippet is Dovecot's side of the privilege model installed on a test
// stack: conf.d/90-undomail.conf included with this test's paths and group
// nogroup, and undomail's doveadm.conf written for the stack.
type snippet struct {
	clientConf     string // undomail's doveadm.conf for this stack
	masterUser     string
	masterPassword string
}

// installSnippet includes the shipped snippet in st's Dovecot and restarts
// it; undomail's side then works as any user in group nogroup.
func installSnippet(t *testing.T, st *mailstack.Stack) snippet {
	t.Helper()
	conf, err := os.ReadFile(st.DovecotConfig())
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^base_dir = (.*)$`).FindStringSubmatch(string(conf))
	if m == nil {
		t.Fatalf("no base_dir in %s", st.DovecotConfig())
	}
	base := m[1]
	dir := filepath.Join(st.Dir, "undomail-etc")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile := func(name, body string, mode os.FileMode, gid int) string {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(p, 0, gid); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	const nogroup = 65534
	password := writeFile("doveadm-password", "s3cret-doveadm\n", 0o640, nogroup)
	dg, err := user.LookupGroup("dovecot")
	if err != nil {
		t.Fatalf("Dovecot's group: %v", err)
	}
	dovecotGID, _ := strconv.Atoi(dg.Gid)
	// Read by Dovecot's auth process (user dovecot), not by undomail.
	masterUsers := writeFile("master-users", "undomail:{PLAIN}s3cret-master::::::\n", 0o640, dovecotGID)

	// The shipped snippet, with this test's paths and group.
	shipped, err := os.ReadFile("dovecot/conf.d/90-undomail.conf")
	if err != nil {
		t.Fatal(err)
	}
	s := strings.NewReplacer("/etc/dovecot/doveadm-password", password, "/etc/dovecot/master-users", masterUsers,
		"group = undomail", "group = nogroup").Replace(string(shipped))
	if s == string(shipped) {
		t.Fatal("the snippet's paths changed; update this test's replacements")
	}
	snippetPath := writeFile("90-undomail.conf", s, 0o644, 0)
	f, err := os.OpenFile(st.DovecotConfig(), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString("\n!include " + snippetPath + "\n"); err != nil {
		t.Fatal(err)
	}
	f.Close()
	restartDovecot(t, st, base)

	// undomail's doveadm.conf, with this instance's base_dir.
	client, err := os.ReadFile("undomail/doveadm.conf")
	if err != nil {
		t.Fatal(err)
	}
	c := strings.NewReplacer("/run/dovecot", base, "/etc/undomail/doveadm-password", password).Replace(string(client))
	clientConf := writeFile("doveadm.conf", c, 0o644, 0)

	return snippet{clientConf: clientConf, masterUser: "undomail", masterPassword: "s3cret-master"}
}

// restartDovecot stops the stack's Dovecot and starts it again with its
// (changed) configuration: anvil keeps its socket across a reload.
func restartDovecot(t *testing.T, st *mailstack.Stack, base string) {
	t.Helper()
	if out, err := exec.Command("doveadm", "-c", st.DovecotConfig(), "stop").CombinedOutput(); err != nil {
		t.Fatalf("stop dovecot: %v %s", err, out)
	}
	waitUntil(t, "dovecot stopped", func() bool {
		_, err := os.Stat(filepath.Join(base, "master.pid"))
		return errors.Is(err, os.ErrNotExist)
	})
	// A daemonised Dovecot keeps its stdio open: a pipe would never end.
	logf, err := os.Create(filepath.Join(st.Dir, "dovecot-restart.out"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command("dovecot", "-c", st.DovecotConfig())
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Run(); err != nil {
		b, _ := os.ReadFile(logf.Name())
		t.Fatalf("start dovecot with the snippet: %v %s\n%s", err, b, tail(st.DovecotLog()))
	}
	waitUntil(t, "dovecot answering doveadm", func() bool {
		return exec.Command("doveadm", "-c", st.DovecotConfig(), "who").Run() == nil
	})
}

// waitUntil polls cond; the minute is a hang guard, not a performance
// threshold.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}
