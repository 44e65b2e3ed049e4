// Package mailstacktest starts a mailstack.Stack for a test.
package mailstacktest

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/undomail/undomail/internal/mailstack"
)

// Start starts a stack in a fresh 0755 directory for the test and stops it
// in t.Cleanup. On failure it calls t.Fatal with the daemon logs' tails.
//
// Without root or with packages Missing it fails rather than skips: CI
// installs them, and a skip would hide a broken CI. If opts.Dir is empty a
// directory under t.TempDir() is used; if opts.Logger is nil the stack logs
// to the test's output.
func Start(t testing.TB, opts mailstack.Options) *mailstack.Stack {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatalf("mailstacktest: the mail stack needs root (Postfix cannot run unprivileged); run the tests as root")
	}
	if missing := mailstack.Missing(); len(missing) > 0 {
		t.Fatalf("mailstacktest: missing Debian packages %v; install them with: apt-get install --no-install-recommends %v",
			missing, strings.Join(missing, " "))
	}
	if opts.Logger == nil {
		// The stack's log lines belong to the test's output.
		opts.Logger = slog.New(slog.NewTextHandler(t.Output(), nil))
	}
	if opts.Dir == "" {
		opts.Dir = filepath.Join(t.TempDir(), "mailstack")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := mailstack.Start(ctx, opts)
	if err != nil {
		t.Fatalf("mailstacktest: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Stop(); err != nil {
			t.Errorf("mailstacktest: %v", err)
		}
	})
	return s
}

// Addr returns a loopback address, on an IP of its own held until the test
// ends, for a server the test starts later and must name first (an
// `undomail serve` process). Unlike binding 127.0.0.1:0 and closing it, no
// other server can take it in between (mailstack.ClaimHost).
func Addr(t testing.TB) string {
	t.Helper()
	addr, h, err := mailstack.ClaimAddr()
	if err != nil {
		t.Fatalf("mailstacktest: %v", err)
	}
	t.Cleanup(h.Release)
	return addr
}
