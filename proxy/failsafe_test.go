package proxy_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/proxy"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// mountTmpfs mounts a tmpfs of size bytes at a new directory.
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "tmpfs")
	os.MkdirAll(dir, 0o755)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs (the test runs as root): %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	return dir
}

func sendOne(t *testing.T, addr, msgID string) error {
	t.Helper()
	c := dial(t, addr, "")
	defer c.Quit()
	return c.SendMail("sender@example.test", []string{"alice@example.test"}, strings.NewReader(message("failsafe", msgID)))
}

// TestLogFullRefusesAndForwardsNothing fills the undo log's disk: the
// client must get 452 4.3.1 and the message must not reach Postfix. Once
// space is back, mail flows again.
func TestLogFullRefusesAndForwardsNothing(t *testing.T) {
	fs := mountTmpfs(t, "8m")
	tb := testbedtest.Start(t, func(c *config.Config) { c.DataDir = filepath.Join(fs, "undo") })
	if err := sendOne(t, tb.SMTPAddr(), "before-full@client.test"); err != nil {
		t.Fatalf("send with space: %v", err)
	}
	waitForMessage(t, tb, "alice", "before-full@client.test")
	filler := filepath.Join(fs, "filler")
	// dd stops with ENOSPC once the tmpfs is full; that is the point.
	exec.Command("dd", "if=/dev/zero", "of="+filler, "bs=64k").Run()
	err := sendOne(t, tb.SMTPAddr(), "while-full@client.test")
	se := smtpErr(err)
	if se == nil || se.Code != 452 || se.EnhancedCode != (smtp.EnhancedCode{4, 3, 1}) {
		t.Fatalf("send with the log's disk full: %v, want 452 4.3.1", err)
	}
	os.Remove(filler)
	if err := sendOne(t, tb.SMTPAddr(), "after-full@client.test"); err != nil {
		t.Fatalf("send after space came back: %v", err)
	}
	// Postfix delivers in order of arrival; once the later message is in,
	// the refused one would be too, had it been forwarded.
	waitForMessage(t, tb, "alice", "after-full@client.test")
	if hdr, _ := fetchHeader(tb, "alice", "while-full@client.test"); hdr != "" {
		t.Fatalf("the refused message reached the mailbox:\n%s", hdr)
	}
	if _, err := undolog.Check(context.Background(), tb.Config.DataDir, func(p undolog.Problem) {
		if p.Severity == undolog.Error {
			t.Errorf("fsck after disk full: %s", p.What)
		}
	}); err != nil {
		t.Fatalf("fsck: %v", err)
	}
}

// mountExt4 mounts a fresh ext4 image on a loop device with
// errors=remount-ro, the default of most distributions, and returns the
// mount point and a function that makes the kernel remount it read-only as
// it does after a disk error (ext4's trigger_fs_error).
func mountExt4(t *testing.T) (dir string, fail func()) {
	t.Helper()
	base := t.TempDir()
	img, dir := filepath.Join(base, "fs.img"), filepath.Join(base, "mnt")
	os.MkdirAll(dir, 0o755)
	run := func(name string, args ...string) string {
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %v (the test runs as root): %v: %s", name, args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	run("truncate", "-s", "64M", img)
	run("mkfs.ext4", "-q", img)
	loop := run("losetup", "-f", "--show", img)
	t.Cleanup(func() {
		exec.Command("umount", "-l", dir).Run()
		exec.Command("losetup", "-d", loop).Run()
	})
	run("mount", "-o", "errors=remount-ro", loop, dir)
	return dir, func() {
		if err := os.WriteFile("/sys/fs/ext4/"+filepath.Base(loop)+"/trigger_fs_error", []byte("undomail test"), 0); err != nil {
			t.Fatalf("trigger ext4 error: %v", err)
		}
	}
}

// TestLogReadOnlyRefusesAndForwardsNothing lets the log's filesystem go
// read-only under a running undomail, as ext4 does after a disk error.
func TestLogReadOnlyRefusesAndForwardsNothing(t *testing.T) {
	fs, fail := mountExt4(t)
	tb := testbedtest.Start(t, func(c *config.Config) {
		c.DataDir = filepath.Join(fs, "undo")
		// Postfix delivers straight to Dovecot here, so that the witness
		// below does not depend on the broken log.
		c.LMTP.Listen = ""
	})
	if err := sendOne(t, tb.SMTPAddr(), "before-ro@client.test"); err != nil {
		t.Fatalf("send: %v", err)
	}
	fail()
	err := sendOne(t, tb.SMTPAddr(), "while-ro@client.test")
	if se := smtpErr(err); se == nil || se.Code != 451 || se.EnhancedCode != (smtp.EnhancedCode{4, 3, 0}) {
		t.Fatalf("send with the log read-only: %v, want 451 4.3.0", err)
	}
	// A message sent to Postfix directly is the ordering witness.
	c := dial(t, tb.Stack.SMTPAddr, "")
	if err := c.SendMail("sender@example.test", []string{"alice@example.test"}, strings.NewReader(message("witness", "witness-ro@client.test"))); err != nil {
		t.Fatalf("send directly: %v", err)
	}
	waitForMessage(t, tb, "alice", "witness-ro@client.test")
	if hdr, _ := fetchHeader(tb, "alice", "while-ro@client.test"); hdr != "" {
		t.Fatalf("the refused message reached the mailbox:\n%s", hdr)
	}
}

// TestUpstreamDown stops Postfix under a running undomail.
func TestUpstreamDown(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	if out, err := exec.Command("postfix", "-c", tb.Stack.PostfixConfigDir(), "stop").CombinedOutput(); err != nil {
		t.Fatalf("postfix stop: %v: %s", err, out)
	}
	conn, err := net.Dial("tcp", tb.SMTPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := smtp.NewClient(conn)
	err = c.Hello("client.test")
	if se := smtpErr(err); se == nil || se.Code != 451 || se.EnhancedCode != (smtp.EnhancedCode{4, 4, 1}) {
		t.Fatalf("EHLO with Postfix down: %v, want 451 4.4.1", err)
	}
}

// fakeUpstream is a scripted SMTP server for the timeout paths, which a
// real Postfix cannot be made to produce on demand. It answers like
// Postfix until the command named hang, which it never answers. At DATA
// it records what the undo log held, to check the write-ahead order.
type fakeUpstream struct {
	ln   net.Listener
	hang string
	log  *undolog.Log
	// finalReply, if set, replaces the 250 after the message (raw lines).
	finalReply string
	// refuseXClient answers XCLIENT as Postfix does for a client outside
	// smtpd_authorized_xclient_hosts.
	refuseXClient bool

	mu          sync.Mutex
	logAtData   []undolog.Record
	sawMessages int
}

func startFakeUpstream(t *testing.T, hang string) *fakeUpstream {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeUpstream{ln: ln, hang: hang}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go f.serve(c)
		}
	}()
	return f
}

func (f *fakeUpstream) serve(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	fmt.Fprintf(c, "220 fake ESMTP\r\n")
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return
		}
		verb := strings.ToUpper(strings.Fields(line + " x")[0])
		if verb == f.hang {
			io.Copy(io.Discard, br) // say nothing until the proxy gives up
			return
		}
		switch verb {
		case "EHLO":
			fmt.Fprintf(c, "250-fake\r\n250-XCLIENT ADDR HELO NAME PROTO PORT\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n")
		case "XCLIENT":
			f.mu.Lock()
			refuse := f.refuseXClient
			f.mu.Unlock()
			if refuse {
				fmt.Fprintf(c, "550 5.7.0 Error: insufficient authorization\r\n")
				continue
			}
			fmt.Fprintf(c, "220 fake ESMTP\r\n")
		case "DATA":
			f.mu.Lock()
			if f.log != nil {
				f.logAtData, _ = f.log.Records(context.Background(), undolog.Filter{})
			}
			f.mu.Unlock()
			fmt.Fprintf(c, "354 go ahead\r\n")
			for {
				l, err := br.ReadString('\n')
				if err != nil {
					return
				}
				if l == ".\r\n" {
					break
				}
			}
			f.mu.Lock()
			f.sawMessages++
			f.mu.Unlock()
			if f.hang == "." {
				io.Copy(io.Discard, br)
				return
			}
			if f.finalReply != "" {
				fmt.Fprint(c, f.finalReply)
			} else {
				fmt.Fprintf(c, "250 2.0.0 Ok: queued as FAKE1\r\n")
			}
		case "QUIT":
			fmt.Fprintf(c, "221 2.0.0 Bye\r\n")
			return
		default:
			fmt.Fprintf(c, "250 2.1.0 Ok\r\n")
		}
	}
}

func startProxy(t *testing.T, upstream string, timeout time.Duration) (*proxy.SMTPProxy, *undolog.Log, string) {
	t.Helper()
	l, err := undolog.Open(t.TempDir(), undolog.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	p, err := proxy.NewSMTP(context.Background(), proxy.SMTPConfig{Upstream: upstream, UpstreamTimeout: timeout, XClient: true},
		l, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatalf("start proxy: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go p.Serve(ln)
	t.Cleanup(func() { p.Close(context.Background()) })
	return p, l, ln.Addr().String()
}

func TestUpstreamTimeouts(t *testing.T) {
	for _, tc := range []struct {
		hang       string
		wantLogged bool // an intent (and outcome) is logged only once DATA began
	}{
		{"MAIL", false},
		{"RCPT", false},
		{"DATA", true},
		{".", true},
	} {
		t.Run(tc.hang, func(t *testing.T) {
			f := startFakeUpstream(t, tc.hang)
			_, l, addr := startProxy(t, f.ln.Addr().String(), time.Second)
			err := sendOne(t, addr, "timeout@client.test")
			if se := smtpErr(err); se == nil || se.Code != 451 || se.EnhancedCode != (smtp.EnhancedCode{4, 4, 2}) {
				t.Fatalf("upstream silent at %s: %v, want 451 4.4.2", tc.hang, err)
			}
			verbs, _ := l.Verbs(context.Background(), undolog.Filter{})
			if !tc.wantLogged {
				if len(verbs) != 0 {
					t.Fatalf("verbs logged for a transaction that never reached DATA: %+v", verbs)
				}
				return
			}
			if len(verbs) != 1 || verbs[0].Outcome == nil {
				t.Fatalf("want one verb with an outcome, got %+v", verbs)
			}
			var o verb.DeliveryOutcome
			json.Unmarshal(verbs[0].Outcome.Outcome, &o)
			if o.Reply == nil || o.Reply.Code != 451 || !strings.Contains(o.Error, "timeout") {
				t.Fatalf("logged outcome %+v, want the 451 the client got and the timeout", o)
			}
		})
	}
}

// TestIntentLoggedBeforeForwarding checks the write-ahead order: when the
// upstream hears DATA, the intent with its blob is already in the log, and
// its outcome is not.
func TestIntentLoggedBeforeForwarding(t *testing.T) {
	f := startFakeUpstream(t, "")
	_, l, addr := startProxy(t, f.ln.Addr().String(), 5*time.Second)
	f.mu.Lock()
	f.log = l
	f.mu.Unlock()
	if err := sendOne(t, addr, "wal@client.test"); err != nil {
		t.Fatalf("send: %v", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.logAtData) != 1 || f.logAtData[0].Kind != verb.KindSMTPSubmit || f.logAtData[0].Blob == "" {
		t.Fatalf("log when the upstream heard DATA: %+v, want exactly the smtp.submit intent", f.logAtData)
	}
	all, _ := l.Records(context.Background(), undolog.Filter{})
	if len(all) != 2 || all[1].Kind != undolog.KindOutcome || all[1].Ref != all[0].Seq {
		t.Fatalf("log after the reply: %+v, want intent then its outcome", all)
	}
}

// TestMultilineReplyRelayed checks that a multi-line refusal at the end of
// DATA reaches the client line for line, with its enhanced code, and is the
// logged outcome.
func TestMultilineReplyRelayed(t *testing.T) {
	f := startFakeUpstream(t, "")
	f.finalReply = "554-5.7.1 Message rejected: looks like spam\r\n554-5.7.1 see https://postmaster.example/why\r\n554 5.7.1 reference 4711\r\n"
	_, l, addr := startProxy(t, f.ln.Addr().String(), 5*time.Second)
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := newLineReader(conn)
	r.expect(t, "220")
	for _, step := range []struct{ send, want string }{
		{"EHLO client.test", "250"},
		{"MAIL FROM:<s@example.test>", "250"},
		{"RCPT TO:<alice@example.test>", "250"},
		{"DATA", "354"},
	} {
		fmt.Fprintf(conn, "%s\r\n", step.send)
		r.expect(t, step.want)
	}
	fmt.Fprintf(conn, "Subject: spam\r\n\r\nbuy now\r\n.\r\n")
	got := r.expect(t, "554")
	want := []string{
		"554-5.7.1 Message rejected: looks like spam",
		"554-5.7.1 see https://postmaster.example/why",
		"554 5.7.1 reference 4711",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("client got %q, want the upstream's lines %q", got, want)
	}
	verbs, _ := l.Verbs(context.Background(), undolog.Filter{})
	var o verb.DeliveryOutcome
	if len(verbs) != 1 || verbs[0].Outcome == nil || json.Unmarshal(verbs[0].Outcome.Outcome, &o) != nil {
		t.Fatalf("verbs = %+v", verbs)
	}
	if o.Reply == nil || o.Reply.Code != 554 || o.Reply.Enhanced != "5.7.1" ||
		o.Reply.Text != "Message rejected: looks like spam\nsee https://postmaster.example/why\nreference 4711" {
		t.Fatalf("logged outcome %+v", o.Reply)
	}
}

// TestXClientRefusedIsTemporary: an upstream that stops trusting
// undomail's XCLIENT is undomail's configuration problem; clients get a
// temporary 451, never the upstream's permanent 550.
func TestXClientRefusedIsTemporary(t *testing.T) {
	f := startFakeUpstream(t, "")
	_, _, addr := startProxy(t, f.ln.Addr().String(), 5*time.Second)
	f.mu.Lock()
	f.refuseXClient = true
	f.mu.Unlock()
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.Hello("client.test")
	if se := smtpErr(err); se == nil || se.Code != 451 {
		t.Fatalf("EHLO with XCLIENT refused upstream: %v, want 451", err)
	}
}
