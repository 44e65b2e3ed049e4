package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-smtp"
	"github.com/spf13/cobra"

	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/mailstack"
	"github.com/undomail/undomail/internal/testbed"
)

func demoCmd() *cobra.Command {
	var dir, smtpListen string
	var yes, once, verbose, tour bool
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Start a private Dovecot + Postfix with undomail in front and show mail flowing through it",
		Long: `demo starts a private Dovecot and Postfix on loopback ports, undomail in
front of them (SMTP front door before Postfix, LMTP capture between Postfix and
Dovecot, IMAP front end before Dovecot), with snapshots of the mail store
copied into the demo's directory. It sends a first message through it, gives
alice a folder Projects with two messages, takes a first snapshot, and prints
where to point a mail client and how to read the undo log. Ctrl-C stops
everything; the directory is kept so the log can still be read.

--tour then plays the README's "Undo your first mistake": alice deletes
Projects, mail keeps arriving, the plan, the cycle, Projects back with the
later mail kept, the verdict, alice's digest and the web timeline. On a
terminal it waits for Enter between steps (not with --yes).

It needs root (Postfix instances cannot run unprivileged) and Debian's
dovecot-imapd, dovecot-lmtpd, dovecot-sieve and postfix packages, and swaks
and curl for the commands it suggests; it offers to install missing ones with
apt-get (--yes installs without asking).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if os.Geteuid() != 0 {
				return errors.New("demo must run as root: Postfix cannot run a private instance unprivileged")
			}
			if err := ensurePackages(cmd.InOrStdin(), cmd.OutOrStdout(), yes); err != nil {
				return err
			}
			if dir == "" {
				var err error
				if dir, err = os.MkdirTemp("", "undomail-demo-"); err != nil {
					return err
				}
			}
			level := slog.LevelWarn
			if verbose {
				level = slog.LevelInfo
			}
			logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "starting Dovecot, Postfix and undomail in %s ...\n", dir)
			if smtpListen == "127.0.0.1:2525" && !portFree(smtpListen) {
				smtpListen = "127.0.0.1:0"
			}
			snapDir := filepath.Join(dir, "snapshots")
			tb, err := testbed.Start(ctx, testbed.Options{Dir: dir, SMTPListen: smtpListen, Logger: logger, ReplayThroughPostfix: true,
				OutboundDelay: demoOutboundDelay,
				Tweak: func(c *config.Config) {
					c.Store = "copy:" + snapDir
					// The tour's repair cancels a DELETE alice was told
					// succeeded; by default that is not explained to her,
					// here it is, so the tour can show a digest.
					c.Compensation.Policies.ActionCancelled = "explain"
					c.Compensation.Contact = "whoever runs this demo"
				}})
			if err != nil {
				return err
			}
			defer func() {
				fmt.Fprintln(out, "stopping ...")
				if err := tb.Stop(); err != nil {
					fmt.Fprintln(os.Stderr, "undomail: stop:", err)
				}
				fmt.Fprintf(out, "stopped. The undo log stays in %s: undomail log --data-dir %s\n", tb.Config.DataDir, tb.Config.DataDir)
			}()
			if err := sendWelcome(ctx, tb, out); err != nil {
				return err
			}
			snap, err := seedDemo(ctx, tb, out)
			if err != nil {
				return err
			}
			printDemoGuide(out, tb, snap)
			if tour {
				if err := runTour(ctx, tb, out, cmd.InOrStdin(), snap, !yes && isTerminal(os.Stdin)); err != nil {
					return err
				}
			}
			if once {
				return nil
			}
			fmt.Fprintln(out, "\nundomail demo keeps running; press Ctrl-C to stop.")
			<-ctx.Done()
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "dir", "", "directory for the mail stack and the undo log (default: a new temporary directory)")
	f.StringVar(&smtpListen, "smtp-listen", "127.0.0.1:2525", "address of undomail's SMTP front door (a random port if this one is taken)")
	f.BoolVarP(&yes, "yes", "y", false, "install missing Debian packages without asking")
	f.BoolVar(&once, "once", false, "stop after the first message has arrived, or after the tour (for scripts and tests)")
	f.BoolVar(&tour, "tour", false, "play a guided undo: a folder deleted by mistake comes back, later mail kept")
	f.BoolVarP(&verbose, "verbose", "v", false, "show undomail's and the stack's logs")
	return cmd
}

// ensurePackages installs what mailstack needs, asking first on a terminal.
func ensurePackages(in io.Reader, out io.Writer, yes bool) error {
	missing := append(mailstack.Missing(), missingTools()...)
	if len(missing) == 0 {
		return nil
	}
	args := append([]string{"install", "-y", "--no-install-recommends"}, missing...)
	fmt.Fprintf(out, "undomail demo needs these Debian packages: %s\n", strings.Join(missing, " "))
	if !yes {
		if !isTerminal(os.Stdin) {
			return fmt.Errorf("missing packages; install them with:\n  apt-get %s\nor run undomail demo --yes", strings.Join(args, " "))
		}
		fmt.Fprintf(out, "install them now with apt-get? [y/N] ")
		answer, _ := bufio.NewReader(in).ReadString('\n')
		if !strings.HasPrefix(strings.ToLower(strings.TrimSpace(answer)), "y") {
			return errors.New("missing packages not installed")
		}
	}
	// Preseed Postfix so its package does not ask questions or start a
	// system-wide instance; the demo runs its own private one.
	preseed := exec.Command("debconf-set-selections")
	preseed.Stdin = strings.NewReader("postfix postfix/main_mailer_type select No configuration\n")
	if b, err := preseed.CombinedOutput(); err != nil {
		return fmt.Errorf("preseed postfix: %v: %s", err, b)
	}
	for _, a := range [][]string{{"update", "-q"}, args} {
		c := exec.Command("apt-get", a...)
		c.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		c.Stdout, c.Stderr = out, os.Stderr
		if err := c.Run(); err != nil {
			return fmt.Errorf("apt-get %s: %w", strings.Join(a, " "), err)
		}
	}
	if m := append(mailstack.Missing(), missingTools()...); len(m) > 0 {
		return fmt.Errorf("still missing after apt-get: %v", m)
	}
	return nil
}

// demoTools are the programs the demo's guide tells a person to run, with
// the Debian package of each: whatever it suggests must work right away.
var demoTools = []struct{ name, pkg string }{
	{"swaks", "swaks"},
	{"curl", "curl"},
}

// missingTools returns the packages of demoTools that are not installed.
func missingTools() []string {
	var missing []string
	for _, t := range demoTools {
		if _, err := exec.LookPath(t.name); err != nil {
			missing = append(missing, t.pkg)
		}
	}
	return missing
}

func portFree(addr string) bool {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return false
	}
	l.Close()
	return true
}

// sendWelcome sends a message through the front door and waits until it
// is in alice's INBOX, so the demo proves the whole path before it says so.
func sendWelcome(ctx context.Context, tb *testbed.Testbed, out io.Writer) error {
	st := tb.Stack
	subject := fmt.Sprintf("Welcome to undomail (%s)", time.Now().Format(time.RFC3339))
	msg := "From: postmaster@" + st.Domain + "\r\n" +
		"To: " + st.Address("alice") + "\r\n" +
		"Subject: " + subject + "\r\n" +
		"Message-Id: <welcome." + fmt.Sprint(time.Now().UnixNano()) + "@undomail.test>\r\n" +
		"Date: " + time.Now().Format(time.RFC1123Z) + "\r\n\r\n" +
		"This message went through undomail's SMTP front door, Postfix,\r\n" +
		"undomail's LMTP capture and Dovecot. Both hops are in the undo log.\r\n"
	c, err := smtp.Dial(tb.SMTPAddr())
	if err != nil {
		return fmt.Errorf("connect to the front door: %w", err)
	}
	defer c.Close()
	if err := c.SendMail("postmaster@"+st.Domain, []string{st.Address("alice")}, strings.NewReader(msg)); err != nil {
		return fmt.Errorf("send the welcome message: %w", err)
	}
	fmt.Fprintf(out, "sent %q to %s through the front door; waiting for it in Dovecot ...\n", subject, st.Address("alice"))
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if n, err := countSubject(tb, "alice", subject); err == nil && n > 0 {
			fmt.Fprintln(out, "it arrived in alice's INBOX (checked over IMAP, through undomail's IMAP front end).")
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	return fmt.Errorf("the welcome message did not reach alice's INBOX within 30s; see %s and %s", st.PostfixLog(), st.DovecotLog())
}

func countSubject(tb *testbed.Testbed, user, subject string) (int, error) {
	c, err := imapclient.DialInsecure(tb.IMAPAddr(), nil)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	if err := c.Login(user, tb.Stack.Password(user)).Wait(); err != nil {
		return 0, err
	}
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		return 0, err
	}
	data, err := c.Search(&imap.SearchCriteria{Header: []imap.SearchCriteriaHeaderField{{Key: "Subject", Value: subject}}}, nil).Wait()
	if err != nil {
		return 0, err
	}
	return len(data.AllSeqNums()), nil
}

func printDemoGuide(out io.Writer, tb *testbed.Testbed, snapshot string) {
	st := tb.Stack
	self, _ := demoSelf()
	var users []string
	for _, u := range st.Users {
		users = append(users, u.Name+" / "+u.Password)
	}
	fmt.Fprintf(out, `
undomail demo is running.

  SMTP front door   %[1]s   (undomail, relays to Postfix at %[2]s)
  LMTP capture      %[3]s   (Postfix delivers here; undomail relays to Dovecot LMTP %[4]s)
  IMAP              %[14]s   (undomail, relays to Dovecot IMAP at %[5]s)
  users             %[6]s   (addresses <user>@%[7]s)

Send mail through it:
  swaks --server %[1]s --to bob@%[7]s --from you@%[7]s --header "Subject: hello"
Read it, and make a change (through undomail's IMAP front end):
  curl -s imap://%[8]s:%[9]s/INBOX -u bob:secret-bob -X 'FETCH 1:* (FLAGS ENVELOPE)'
  curl -s imap://%[8]s:%[9]s/ -u bob:secret-bob -X 'CREATE Undoable'
See the undo log and check it:
  %[10]s log --data-dir %[11]s
  %[10]s fsck --data-dir %[11]s
  %[10]s status --data-dir %[11]s
Snapshots (copied into %[17]s) and undo, starting from the first snapshot %[16]s:
  %[10]s snapshots --data-dir %[11]s
  %[10]s cycle plan --data-dir %[11]s --to %[16]s
  %[10]s demo --tour   (a guided undo in a demo of its own: the README's "Undo your first mistake")
Mail for other domains waits %[18]s in the outbound delay window, where a cycle
can still cancel it (the demo's Postfix delivers nothing outside: once
released, it bounces):
  swaks --server %[1]s --to dana@elsewhere.test --from alice@%[7]s --header "Subject: oops"
  %[10]s outbound list --data-dir %[11]s
  %[10]s outbound cancel --data-dir %[11]s QUEUE_ID
The web timeline: http://%[15]s/ (log in with the token in %[11]s/admin.token)

Stack logs: %[12]s, %[13]s
Press Ctrl-C to stop.
`, tb.SMTPAddr(), st.SMTPAddr, tb.Daemon.LMTPAddr, st.LMTPAddr, st.IMAPAddr, strings.Join(users, ", "), st.Domain,
		hostOf(tb.IMAPAddr()), portOf(tb.IMAPAddr()), self, tb.Config.DataDir, st.PostfixLog(), st.DovecotLog(), tb.IMAPAddr(),
		tb.Daemon.AdminAddr(), snapshot, strings.TrimPrefix(tb.Config.Store, "copy:"), demoOutboundDelay)
}

// demoOutboundDelay is the demo's outbound delay window: long enough to
// cancel a message by hand (Gmail's undo send holds 5-30 s).
const demoOutboundDelay = 30 * time.Second

func hostOf(addr string) string { h, _, _ := net.SplitHostPort(addr); return h }
func portOf(addr string) string { _, p, _ := net.SplitHostPort(addr); return p }
