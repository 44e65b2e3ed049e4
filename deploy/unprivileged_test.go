package deploy

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/internal/mailstack"
	"github.com/undomail/undomail/internal/mailstack/mailstacktest"
)

// TestRewindUnprivileged runs undomail as docs/operations.md says to on
// bare metal with the copy backend, against real Dovecot and Postfix: as
// the mail user (not root), in the socket group of
// conf.d/90-undomail.conf, with no capabilities but CAP_SYS_PTRACE and
// CAP_DAC_READ_SEARCH (what the unit grants besides binding ports). A
// snapshot, a rewind and a replay all work: the rewind's doveadm calls go
// through Dovecot's sockets, the copy backend puts the mail files back as
// their owner, and replay logs in through the snippet's master user.
func TestRewindUnprivileged(t *testing.T) {
	bin := buildUndomail(t)
	mailUser, err := user.Lookup("mail")
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(mailUser.Uid)
	gid, _ := strconv.Atoi(mailUser.Gid)
	// The mail store and the snapshots: one filesystem, owned by the mail
	// user, like /srv/mail in the guide.
	root := filepath.Join(t.TempDir(), "srv")
	for _, d := range []string{root, filepath.Join(root, "vmail"), filepath.Join(root, "snapshots"), filepath.Join(root, "undomail")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(d, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(filepath.Dir(root), 0o755); err != nil {
		t.Fatal(err)
	}
	st := mailstacktest.Start(t, mailstack.Options{MailRoot: filepath.Join(root, "vmail")})
	sn := installSnippet(t, st)

	dataDir := filepath.Join(root, "undomail")
	lmtpAddr, imapAddr := freeAddr(t), freeAddr(t)
	cfg := fmt.Sprintf(`data_dir: %s
hostname: undomail.test
store: copy:%s
mail_root: %s
dovecot:
  doveadm: [doveadm, -c, %s]
  master_user: %s
  master_password: %s
lmtp:
  listen: %s
  upstream: %s
imap:
  listen: %s
  upstream: %s
  allow_insecure_auth: true
admin:
  listen: ""
`, dataDir, filepath.Join(root, "snapshots"), filepath.Join(root, "vmail"), sn.clientConf, sn.masterUser, sn.masterPassword,
		lmtpAddr, st.LMTPAddr, imapAddr, st.IMAPAddr)
	cfgPath := filepath.Join(root, "undomail.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(root, "serve.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	serve := exec.Command("setpriv", "--reuid=mail", "--regid=mail", "--groups=nogroup",
		"--inh-caps=-all,+sys_ptrace,+dac_read_search", "--ambient-caps=+sys_ptrace,+dac_read_search",
		"--bounding-set=-all,+sys_ptrace,+dac_read_search",
		bin, "serve", "--config", cfgPath)
	serve.Stdout, serve.Stderr = logf, logf
	if err := serve.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { serve.Process.Kill(); serve.Wait() })
	serveLog := func() string { b, _ := os.ReadFile(logPath); return string(b) }
	waitUntil(t, "undomail serve listening as the mail user", func() bool {
		for _, a := range []string{lmtpAddr, imapAddr} {
			c, err := net.DialTimeout("tcp", a, time.Second)
			if err != nil {
				return false
			}
			c.Close()
		}
		return true
	})
	if status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", serve.Process.Pid)); err != nil ||
		!strings.Contains(string(status), "\nUid:\t"+mailUser.Uid+"\t") || !strings.Contains(string(status), "CapEff:\t0000000000080004") {
		t.Fatalf("undomail serve is not running as the mail user with CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH only:\n%s", status)
	}
	if err := st.SetLMTPRelay(context.Background(), lmtpAddr); err != nil {
		t.Fatal(err)
	}
	ctl := func(args ...string) string {
		t.Helper()
		out, err := exec.Command(bin, append(args, "--data-dir", dataDir)...).CombinedOutput()
		if err != nil {
			t.Fatalf("undomail %s: %v\n%s\nserve's log:\n%s", strings.Join(args, " "), err, out, serveLog())
		}
		return string(out)
	}

	deliver(t, st, "before@deploy.test")
	snap := strings.Fields(ctl("snapshot"))[1]
	deliver(t, st, "after@deploy.test")
	// A client reads the later message and keeps its session open: the
	// rewind must kick it and wait for its process to let go of the store.
	c, err := imapclient.DialInsecure(imapAddr, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Login("alice", st.Password("alice")).Wait(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	uidNext := inbox(t, st)["UIDNEXT"]

	// That session's imap process runs as the mail user, yet the mail
	// user alone cannot see its open files: Dovecot's mail processes are
	// not dumpable, so /proc/PID/fd belongs to root (mode 0500) and each
	// link in it needs ptrace access. The two capabilities the guide
	// grants are exactly what the rewind's busy check needs; one is not
	// enough.
	// Another session's imap process (a direct check's, ending) can be
	// found and exit under the check: it is then made again with one that
	// lives on.
	for attempt := 0; ; attempt++ {
		pid := imapProcess(t, st, mailUser.Uid)
		fds := "/proc/" + strconv.Itoa(pid) + "/fd"
		var failure string
		for _, tc := range []struct {
			caps string
			ok   bool
		}{{"", false}, {"+sys_ptrace", false}, {"+dac_read_search", false}, {"+sys_ptrace,+dac_read_search", true}} {
			args := []string{"--reuid=mail", "--regid=mail", "--clear-groups"}
			if tc.caps != "" {
				args = append(args, "--inh-caps="+tc.caps, "--ambient-caps="+tc.caps)
			}
			// ls -l reads every link: it fails if the directory or a link is
			// denied.
			out, err := exec.Command("setpriv", append(args, "ls", "-l", fds)...).CombinedOutput()
			if (err == nil) != tc.ok && failure == "" {
				failure = fmt.Sprintf("the mail user with capabilities %q listing %s: %v (want success %v)\n%s", tc.caps, fds, err, tc.ok, out)
			}
		}
		if _, err := os.Stat(fds); err != nil && attempt < 5 {
			continue // the process ended meanwhile
		}
		if failure != "" {
			t.Fatal(failure)
		}
		break
	}

	ctl("rewind", "--to", snap, "--hold", "--yes")
	ids := inbox(t, st)
	if ids["before@deploy.test"] != 1 || ids["after@deploy.test"] != 0 {
		t.Fatalf("after the rewind as the mail user: %v\nserve's log:\n%s", ids, serveLog())
	}
	if ids["UIDNEXT"] < uidNext {
		t.Fatalf("UIDNEXT went back from %d to %d: the rewind's doveadm mailbox update did not run", uidNext, ids["UIDNEXT"])
	}
	ctl("replay")
	ids = inbox(t, st)
	if ids["before@deploy.test"] != 1 || ids["after@deploy.test"] != 1 {
		t.Fatalf("after the replay as the mail user: %v\nserve's log:\n%s", ids, serveLog())
	}
	// The files Dovecot sees all belong to the mail user.
	filepath.WalkDir(filepath.Join(root, "vmail"), func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if s, ok := fi.Sys().(*syscall.Stat_t); ok && int(s.Uid) != uid {
			t.Errorf("%s belongs to uid %d after the rewind, not the mail user", p, s.Uid)
		}
		return nil
	})
}

// imapProcess finds an imap process running as uid under st's Dovecot
// (other tests' stacks run theirs beside it).
func imapProcess(t *testing.T, st *mailstack.Stack, uid string) int {
	t.Helper()
	var pid int
	waitUntil(t, "an imap process of uid "+uid, func() bool {
		dirs, _ := filepath.Glob("/proc/[0-9]*")
		for _, d := range dirs {
			comm, _ := os.ReadFile(d + "/comm")
			status, _ := os.ReadFile(d + "/status")
			if strings.TrimSpace(string(comm)) == "imap" && strings.Contains(string(status), "\nUid:\t"+uid+"\t") &&
				ofStack(st, string(status)) {
				pid, _ = strconv.Atoi(filepath.Base(d))
				return true
			}
		}
		return false
	})
	return pid
}

// ofStack reports whether a process (its /proc status) is a child of
// st's Dovecot, whose command line names st's directory.
func ofStack(st *mailstack.Stack, status string) bool {
	for _, line := range strings.Split(status, "\n") {
		if ppid, ok := strings.CutPrefix(line, "PPid:\t"); ok {
			cmdline, _ := os.ReadFile("/proc/" + strings.TrimSpace(ppid) + "/cmdline")
			return strings.Contains(string(cmdline), st.Dir)
		}
	}
	return false
}

// deliver sends one message to alice through Postfix (and so through
// undomail's delivery capture) and waits until it is in her INBOX.
func deliver(t *testing.T, st *mailstack.Stack, msgID string) {
	t.Helper()
	c, err := smtp.Dial(st.SMTPAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msg := "From: sender@example.test\r\nTo: alice@example.test\r\nSubject: deploy\r\nMessage-Id: <" + msgID + ">\r\n\r\nhi\r\n"
	if err := c.SendMail("sender@example.test", []string{"alice@example.test"}, strings.NewReader(msg)); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, msgID+" in alice's INBOX", func() bool {
		st.Flush(context.Background())
		return inbox(t, st)[msgID] == 1
	})
}

// inbox returns the Message-Ids in alice's INBOX with their counts, and
// its UIDNEXT under the key "UIDNEXT", read from Dovecot directly.
func inbox(t *testing.T, st *mailstack.Stack) map[string]int {
	t.Helper()
	c, err := imapclient.DialInsecure(st.IMAPAddr, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Login("alice", st.Password("alice")).Wait(); err != nil {
		t.Fatal(err)
	}
	sel, err := c.Select("INBOX", nil).Wait()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int{"UIDNEXT": int(sel.UIDNext)}
	if sel.NumMessages == 0 {
		return out
	}
	msgs, err := c.Fetch(imap.SeqSet{{Start: 1, Stop: 0}}, &imap.FetchOptions{Envelope: true}).Collect()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range msgs {
		out[m.Envelope.MessageID]++
	}
	return out
}

// freeAddr is an address of its own for a server started later; binding
// 127.0.0.1:0 and closing it raced other test packages' servers.
func freeAddr(t *testing.T) string { return mailstacktest.Addr(t) }
