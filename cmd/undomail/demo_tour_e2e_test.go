package main

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
)

// TestDemoTour runs `undomail demo --tour` as a person would, without a
// terminal (so it does not pause), and while the demo still runs checks
// over IMAP, through the IMAP front end it printed, that the tour's story
// happened: Projects is back with its two messages, bob's mail from after
// the accident is kept, and alice got the digest. Then it stops the demo
// and checks that nothing of its mail stack is left running.
func TestDemoTour(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "demo")
	cmd := exec.Command(binary, "demo", "--tour", "--dir", dir, "--smtp-listen", "127.0.0.1:0")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	// The tour's end, or the demo's exit; a demo hung anywhere is killed
	// after tourTimeout, which ends the output too.
	const tourTimeout = 3 * time.Minute
	var killed atomic.Bool
	hung := time.AfterFunc(tourTimeout, func() { killed.Store(true); cmd.Process.Kill() })
	var out strings.Builder
	sc := bufio.NewScanner(stdout)
	done := false
	for !done && sc.Scan() {
		out.WriteString(sc.Text() + "\n")
		done = sc.Text() == "The tour is over."
	}
	hung.Stop()
	if !done || killed.Load() {
		cmd.Wait()
		t.Fatalf("the tour did not finish (killed after %s: %v):\n%s\nstderr:\n%s", tourTimeout, killed.Load(), out.String(), stderr.String())
	}
	go func() {
		for sc.Scan() { // keep draining so the demo never blocks on stdout
		}
	}()
	text := out.String()
	for _, want := range []string{
		"took the first snapshot",
		"$ " + binary + " cycle plan --data-dir " + filepath.Join(dir, "undo"),
		"comes back: alice's folder \"Projects\" comes back with its messages",
		"verdict: OK",
		"paradoxes: 1 explained to users in 1 digests",
		"you deleted the folder\n  |     \"Projects\". The administrator undid this in the repair.",
		"Projects is back with its 2 messages, and bob's later mail is still in the INBOX.",
	} {
		if !strings.Contains(text, want) {
			t.Fatalf("tour output lacks %q:\n%s", want, text)
		}
	}
	m := regexp.MustCompile(`(?m)^\s+IMAP\s+(\S+)\s+\(undomail`).FindStringSubmatch(text)
	if m == nil {
		t.Fatalf("the demo did not print its IMAP address:\n%s", text)
	}
	got := demoMailIDs(t, m[1], "alice", "secret-alice")
	if p := got["Projects"]; !slices.Equal(p, []string{"budget@demo.undomail.test", "q3-plan@demo.undomail.test"}) {
		t.Errorf("alice's Projects after the tour: %v, want the two messages back", p)
	}
	if !slices.Contains(got["INBOX"], "lunch@demo.undomail.test") {
		t.Errorf("alice's INBOX after the tour: %v, want bob's later mail kept", got["INBOX"])
	}
	if !slices.ContainsFunc(got["INBOX"], func(s string) bool { return strings.HasPrefix(s, "Subject:Your mailbox was repaired") }) {
		t.Errorf("alice's INBOX after the tour: %v, want the digest", got["INBOX"])
	}

	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("demo after SIGTERM: %v\n%s", err, stderr.String())
	}
	// Nothing of the demo's stack outlives it: Stop waits for every
	// process, so none may be left now.
	conf := []byte(filepath.Join(dir, "stack"))
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(b), string(conf)) {
			t.Errorf("process %s (%q) of the demo's stack still runs after the demo exited", e.Name(), b)
		}
	}
	log, err := run(t, "log", "--data-dir", filepath.Join(dir, "undo"), "--branches")
	if err != nil || !strings.Contains(log, "cancelled") {
		t.Errorf("log --branches after the tour: %v\n%s\nwant the abandoned branch with the cancelled DELETE", err, log)
	}
}

// demoMailIDs lists user's mailboxes at addr with their sorted
// Message-Ids; a message without one is listed as Subject:<subject>.
func demoMailIDs(t *testing.T, addr, user, pass string) map[string][]string {
	t.Helper()
	c, err := imapclient.DialInsecure(addr, nil)
	if err != nil {
		t.Fatalf("connect to the demo's IMAP front end %s: %v", addr, err)
	}
	defer c.Close()
	if err := c.Login(user, pass).Wait(); err != nil {
		t.Fatalf("log in as %s at %s: %v", user, addr, err)
	}
	boxes, err := c.List("", "*", nil).Collect()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]string{}
	for _, b := range boxes {
		sel, err := c.Select(b.Mailbox, nil).Wait()
		if err != nil {
			t.Fatal(err)
		}
		out[b.Mailbox] = []string{}
		if sel.NumMessages == 0 {
			continue
		}
		msgs, err := c.Fetch(seqAll(), &imap.FetchOptions{Envelope: true}).Collect()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range msgs {
			id := m.Envelope.MessageID
			if id == "" || strings.Contains(m.Envelope.Subject, "repaired") {
				id = "Subject:" + m.Envelope.Subject
			}
			out[b.Mailbox] = append(out[b.Mailbox], id)
		}
		slices.Sort(out[b.Mailbox])
	}
	return out
}
