// Package testbedtest starts a testbed (mail stack with undomail in front)
// for a test and stops it when the test ends.
package testbedtest

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"

	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/mailstack"
	"github.com/undomail/undomail/internal/testbed"
)

// Start starts a testbed in a fresh directory. tweak, if not nil, may
// change undomail's configuration. Like mailstacktest it fails, never
// skips, without root or packages: CI provides both.
func Start(t testing.TB, tweak func(*config.Config)) *testbed.Testbed {
	return StartWith(t, testbed.Options{Tweak: tweak})
}

// StartWith is Start with more options; Dir and Logger are filled in.
func StartWith(t testing.TB, o testbed.Options) *testbed.Testbed {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatalf("testbedtest: the mail stack needs root (Postfix cannot run unprivileged); run the tests as root")
	}
	if missing := mailstack.Missing(); len(missing) > 0 {
		t.Fatalf("testbedtest: missing Debian packages; install them with: apt-get install --no-install-recommends %s",
			strings.Join(missing, " "))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	level := slog.LevelWarn
	if testing.Verbose() {
		level = slog.LevelInfo
	}
	tw := &testWriter{t: t}
	logger := slog.New(slog.NewTextHandler(tw, &slog.HandlerOptions{Level: level}))
	o.Dir, o.Logger = filepath.Join(t.TempDir(), "tb"), logger
	tb, err := testbed.Start(ctx, o)
	if err != nil {
		t.Fatalf("testbedtest: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			// What the mail stack said is often the cause: show it with
			// the failure, the directory goes with the test.
			for _, p := range []string{tb.Stack.PostfixLog(), tb.Stack.DovecotLog()} {
				t.Logf("testbedtest: tail of %s:\n%s", p, tail(p, 40))
			}
		}
		if err := tb.Stop(); err != nil {
			t.Errorf("testbedtest: stop: %v", err)
		}
		tw.close()
	})
	return tb
}

// tail returns the last n lines of a file, or why it cannot.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// testWriter sends log lines to t.Log, so they show with the failing test.
// Lines from goroutines that outlive the test are dropped: t.Log after a
// test ends panics.
type testWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (w *testWriter) close() {
	w.mu.Lock()
	w.done = true
	w.mu.Unlock()
}

// IMAP logs in at addr (undomail's front end, or Dovecot directly) as
// user; it fails the test if it cannot. The caller closes the client.
func IMAP(t testing.TB, addr, user, pass string) *imapclient.Client {
	t.Helper()
	c, err := imapclient.DialInsecure(addr, nil)
	if err != nil {
		t.Fatalf("testbedtest: connect to %s: %v", addr, err)
	}
	if err := c.Login(user, pass).Wait(); err != nil {
		c.Close()
		t.Fatalf("testbedtest: log in as %s at %s: %v", user, addr, err)
	}
	return c
}

// Mail lists a user's mailboxes and the sorted Message-Ids in each, read
// from Dovecot directly.
func Mail(t testing.TB, tb *testbed.Testbed, user string) map[string][]string {
	t.Helper()
	c := IMAP(t, tb.Stack.IMAPAddr, user, tb.Stack.Password(user))
	defer c.Close()
	boxes, err := c.List("", "*", nil).Collect()
	if err != nil {
		t.Fatalf("testbedtest: list %s's mailboxes: %v", user, err)
	}
	out := map[string][]string{}
	for _, b := range boxes {
		sel, err := c.Select(b.Mailbox, nil).Wait()
		if err != nil {
			t.Fatalf("testbedtest: select %s: %v", b.Mailbox, err)
		}
		out[b.Mailbox] = []string{}
		if sel.NumMessages == 0 {
			continue
		}
		msgs, err := c.Fetch(imap.SeqSet{imap.SeqRange{Start: 1, Stop: 0}}, &imap.FetchOptions{Envelope: true}).Collect()
		if err != nil {
			t.Fatalf("testbedtest: fetch %s: %v", b.Mailbox, err)
		}
		for _, m := range msgs {
			out[b.Mailbox] = append(out[b.Mailbox], m.Envelope.MessageID)
		}
		slices.Sort(out[b.Mailbox])
	}
	return out
}
