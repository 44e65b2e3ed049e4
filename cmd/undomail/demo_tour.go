package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"mime/quotedprintable"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/internal/testbed"
)

// The demo's mail: alice keeps two messages in a folder, which the tour
// then has her delete by mistake. The README's "Undo your first mistake"
// follows the same story.
const (
	tourFolder = "Projects"
	tourReason = "alice deleted Projects by mistake"
)

var tourProjects = []struct{ id, subject string }{
	{"q3-plan@demo.undomail.test", "Q3 plan"},
	{"budget@demo.undomail.test", "Budget draft"},
}

const tourLater = "lunch@demo.undomail.test" // arrives after the accident

// demoSelf is how the demo names the undomail command in what it prints
// (a person copies these lines) and the program it runs for each step.
func demoSelf() (shown, path string) {
	path, err := os.Executable()
	if err != nil {
		path = os.Args[0]
	}
	shown = path
	if strings.Contains(path, "go-build") {
		shown = "go run ./cmd/undomail"
	} else if p, err := exec.LookPath("undomail"); err == nil && p == path {
		shown = "undomail"
	}
	return shown, path
}

// seedDemo gives alice her Projects folder, through undomail's IMAP front
// end so the log has it, and takes the demo's first snapshot.
func seedDemo(ctx context.Context, tb *testbed.Testbed, out io.Writer) (string, error) {
	c, err := demoIMAP(tb, "alice")
	if err != nil {
		return "", err
	}
	defer c.Close()
	if err := c.Create(tourFolder, nil).Wait(); err != nil {
		return "", fmt.Errorf("create alice's %s: %w", tourFolder, err)
	}
	for _, m := range tourProjects {
		msg := "From: bob@" + tb.Stack.Domain + "\r\nTo: alice@" + tb.Stack.Domain + "\r\nSubject: " + m.subject +
			"\r\nMessage-Id: <" + m.id + ">\r\nDate: " + time.Now().Format(time.RFC1123Z) + "\r\n\r\n" + m.subject + ", attached in spirit.\r\n"
		cmd := c.Append(tourFolder, int64(len(msg)), nil)
		if _, err := io.WriteString(cmd, msg); err != nil {
			return "", fmt.Errorf("append to %s: %w", tourFolder, err)
		}
		if err := cmd.Close(); err != nil {
			return "", fmt.Errorf("append to %s: %w", tourFolder, err)
		}
		if _, err := cmd.Wait(); err != nil {
			return "", fmt.Errorf("append to %s: %w", tourFolder, err)
		}
	}
	c.Logout().Wait()
	snap, _, err := tb.Daemon.Snapshot(ctx, "the demo's first snapshot")
	if err != nil {
		return "", err
	}
	fmt.Fprintf(out, "alice has a folder %s with %d messages; took the first snapshot, %s.\n", tourFolder, len(tourProjects), snap.Name)
	return snap.Name, nil
}

// runTour plays the README's "Undo your first mistake": the accident, mail
// arriving after it, the plan, the cycle, the result, the digest and the
// web timeline. Between steps it waits for Enter on a terminal (unless
// asked not to); elsewhere it runs straight through.
func runTour(ctx context.Context, tb *testbed.Testbed, out io.Writer, in io.Reader, snapshot string, pause bool) error {
	shown, self := demoSelf()
	data := tb.Config.DataDir
	next := bufio.NewReader(in)
	step := func(title string) error {
		if pause {
			fmt.Fprint(out, "\n[Enter] ")
			if _, err := next.ReadString('\n'); err != nil {
				return fmt.Errorf("tour: %w", err)
			}
		}
		fmt.Fprintf(out, "\n== %s\n", title)
		return ctx.Err()
	}
	// run runs one undomail command as a person would type it.
	run := func(sub []string, rest ...string) error {
		args := append(append(sub, "--data-dir", data), rest...)
		fmt.Fprintf(out, "$ %s %s\n", shown, shellJoin(args))
		cmd := exec.CommandContext(ctx, self, args...)
		cmd.Stdout, cmd.Stderr = out, os.Stderr
		if f, ok := out.(*os.File); ok {
			cmd.Stdout = f // a terminal stays one: the cycle's progress bar
		}
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("%s %s: %w", shown, shellJoin(args), err)
		}
		return nil
	}

	fmt.Fprintf(out, "\nThe tour: alice deletes her %s folder by mistake, mail keeps arriving, and a\n3R cycle brings the folder back without losing the mail that came after.\n", tourFolder)
	if err := step("1. The snapshots so far"); err != nil {
		return err
	}
	if err := run([]string{"snapshots"}); err != nil {
		return err
	}

	if err := step("2. The accident: alice deletes " + tourFolder + " (her mail client, through undomail)"); err != nil {
		return err
	}
	c, err := demoIMAP(tb, "alice")
	if err != nil {
		return err
	}
	if err := c.Delete(tourFolder).Wait(); err != nil {
		c.Close()
		return fmt.Errorf("delete alice's %s: %w", tourFolder, err)
	}
	c.Logout().Wait()
	c.Close()
	boxes, err := demoMailboxes(tb, "alice")
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "alice's folders now: %s\n", strings.Join(boxes, ", "))

	if err := step("3. Mail keeps arriving: bob writes to alice"); err != nil {
		return err
	}
	if err := sendDemo(ctx, tb, "bob", "alice", "Lunch on Friday?", tourLater); err != nil {
		return err
	}
	fmt.Fprintf(out, "bob's \"Lunch on Friday?\" is in alice's INBOX. (From a shell: swaks --server %s --to alice@%s)\n", tb.SMTPAddr(), tb.Stack.Domain)

	if err := step("4. Find the mistake in the log"); err != nil {
		return err
	}
	if err := run([]string{"log"}, "--user", "alice", "--kind", "imap.delete"); err != nil {
		return err
	}

	repair := []string{"--to", snapshot, "--cancel-user", "alice", "--cancel-kind", "imap.delete"}
	if err := step("5. The plan: rewind to the first snapshot, replay everything since but alice's DELETE"); err != nil {
		return err
	}
	if err := run([]string{"cycle", "plan"}, repair...); err != nil {
		return err
	}

	if err := step("6. The cycle"); err != nil {
		return err
	}
	if err := run([]string{"cycle", "run"}, append(repair, "--reason", tourReason, "--yes")...); err != nil {
		return err
	}

	if err := step("7. The result, read over IMAP"); err != nil {
		return err
	}
	mail, err := demoMail(tb, "alice")
	if err != nil {
		return err
	}
	var names []string
	for b := range mail {
		names = append(names, b)
	}
	sort.Strings(names)
	for _, b := range names {
		fmt.Fprintf(out, "  %-10s %s\n", b, strings.Join(mail[b], "; "))
	}
	back := len(mail[tourFolder]) == len(tourProjects)
	later := false
	for _, s := range mail["INBOX"] {
		later = later || s == "Lunch on Friday?"
	}
	if !back || !later {
		return fmt.Errorf("tour: after the cycle %s is back: %v, bob's later mail kept: %v", tourFolder, back, later)
	}
	fmt.Fprintf(out, "%s is back with its %d messages, and bob's later mail is still in the INBOX.\n", tourFolder, len(tourProjects))

	if err := step("8. What alice is told: the digest"); err != nil {
		return err
	}
	if err := run([]string{"compensations"}, "--user", "alice"); err != nil {
		return err
	}
	digest, err := demoDigest(tb, "alice")
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "The digest in alice's INBOX:\n\n%s\n", indent(digest, "  | "))

	if err := step("9. The web timeline"); err != nil {
		return err
	}
	fmt.Fprintf(out, "http://%s/ shows the delete, the cycle and the abandoned branch; log in with the token in %s.\n",
		tb.Daemon.AdminAddr(), filepath.Join(data, "admin.token"))
	fmt.Fprintln(out, "\nThe tour is over.")
	return nil
}

// shellJoin quotes args for a POSIX shell where needed.
func shellJoin(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, " \t'\"$`\\|&;<>()*?[]#~") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		q[i] = a
	}
	return strings.Join(q, " ")
}

// demoIMAP logs user in at undomail's IMAP front end.
func demoIMAP(tb *testbed.Testbed, user string) (*imapclient.Client, error) {
	c, err := imapclient.DialInsecure(tb.IMAPAddr(), nil)
	if err != nil {
		return nil, fmt.Errorf("connect to undomail's IMAP front end %s: %w", tb.IMAPAddr(), err)
	}
	if err := c.Login(user, tb.Stack.Password(user)).Wait(); err != nil {
		c.Close()
		return nil, fmt.Errorf("log in as %s at %s: %w", user, tb.IMAPAddr(), err)
	}
	return c, nil
}

// demoMailboxes lists user's mailboxes.
func demoMailboxes(tb *testbed.Testbed, user string) ([]string, error) {
	c, err := demoIMAP(tb, user)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	list, err := c.List("", "*", nil).Collect()
	if err != nil {
		return nil, fmt.Errorf("list %s's mailboxes: %w", user, err)
	}
	var names []string
	for _, b := range list {
		names = append(names, b.Mailbox)
	}
	sort.Strings(names)
	return names, nil
}

// demoMail returns the subjects in each of user's mailboxes.
func demoMail(tb *testbed.Testbed, user string) (map[string][]string, error) {
	names, err := demoMailboxes(tb, user)
	if err != nil {
		return nil, err
	}
	c, err := demoIMAP(tb, user)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	out := map[string][]string{}
	for _, b := range names {
		sel, err := c.Select(b, nil).Wait()
		if err != nil {
			return nil, fmt.Errorf("select %s's %s: %w", user, b, err)
		}
		out[b] = nil
		if sel.NumMessages == 0 {
			continue
		}
		msgs, err := c.Fetch(imap.SeqSet{imap.SeqRange{Start: 1, Stop: 0}}, &imap.FetchOptions{Envelope: true}).Collect()
		if err != nil {
			return nil, fmt.Errorf("fetch %s's %s: %w", user, b, err)
		}
		for _, m := range msgs {
			out[b] = append(out[b], m.Envelope.Subject)
		}
		sort.Strings(out[b])
	}
	return out, nil
}

// sendDemo sends a message through the front door and waits until it is in
// the recipient's INBOX.
func sendDemo(ctx context.Context, tb *testbed.Testbed, from, to, subject, msgID string) error {
	st := tb.Stack
	msg := "From: " + st.Address(from) + "\r\nTo: " + st.Address(to) + "\r\nSubject: " + subject +
		"\r\nMessage-Id: <" + msgID + ">\r\nDate: " + time.Now().Format(time.RFC1123Z) + "\r\n\r\nSee you there.\r\n"
	c, err := smtp.Dial(tb.SMTPAddr())
	if err != nil {
		return fmt.Errorf("connect to the front door %s: %w", tb.SMTPAddr(), err)
	}
	defer c.Close()
	if err := c.SendMail(st.Address(from), []string{st.Address(to)}, strings.NewReader(msg)); err != nil {
		return fmt.Errorf("send %q: %w", subject, err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if n, err := countSubject(tb, to, subject); err == nil && n > 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	return fmt.Errorf("%q did not reach %s's INBOX within 30s; see %s and %s", subject, to, st.PostfixLog(), st.DovecotLog())
}

// demoDigest returns the text of the newest compensation digest in user's
// INBOX: the message's first part, which is for people (compensate/).
func demoDigest(tb *testbed.Testbed, user string) (string, error) {
	c, err := demoIMAP(tb, user)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		return "", fmt.Errorf("select %s's INBOX: %w", user, err)
	}
	found, err := c.UIDSearch(&imap.SearchCriteria{Header: []imap.SearchCriteriaHeaderField{{Key: "Subject", Value: "repaired"}}}, nil).Wait()
	if err != nil {
		return "", fmt.Errorf("search %s's INBOX for the digest: %w", user, err)
	}
	uids := found.AllUIDs()
	if len(uids) == 0 {
		return "", fmt.Errorf("no digest in %s's INBOX", user)
	}
	part := &imap.FetchItemBodySection{Part: []int{1}}
	mime := &imap.FetchItemBodySection{Part: []int{1}, Specifier: imap.PartSpecifierMIME}
	hdr := &imap.FetchItemBodySection{Specifier: imap.PartSpecifierHeader, HeaderFields: []string{"From", "Subject"}}
	msgs, err := c.Fetch(imap.UIDSetNum(uids[len(uids)-1]), &imap.FetchOptions{BodySection: []*imap.FetchItemBodySection{hdr, mime, part}}).Collect()
	if err != nil || len(msgs) == 0 {
		return "", fmt.Errorf("fetch %s's digest: %v", user, err)
	}
	text := msgs[0].FindBodySection(part)
	// RFC 2045 section 6.7: the part's own header names its encoding.
	if strings.Contains(strings.ToLower(string(msgs[0].FindBodySection(mime))), "quoted-printable") {
		if b, err := io.ReadAll(quotedprintable.NewReader(bytes.NewReader(text))); err == nil {
			text = b
		}
	}
	return strings.TrimSpace(string(msgs[0].FindBodySection(hdr))) + "\n\n" + strings.TrimSpace(string(text)), nil
}

// indent prefixes every line of s.
func indent(s, prefix string) string {
	lines := strings.Split(strings.ReplaceAll(s, "\r\n", "\n"), "\n")
	for i, l := range lines {
		lines[i] = prefix + l
	}
	return strings.Join(lines, "\n")
}
