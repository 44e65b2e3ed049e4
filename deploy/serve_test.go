package deploy

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// buildUndomail builds the undomail command for tests that run it as an
// operator would.
func buildUndomail(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "undomail")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/undomail").CombinedOutput(); err != nil {
		t.Fatalf("build undomail: %v\n%s", err, out)
	}
	return bin
}

// TestServeRefusesBadConfig: undomail serve given a config with an unknown
// key or an impossible value exits at once with a message that names the
// key, before it opens a log or a listener.
func TestServeRefusesBadConfig(t *testing.T) {
	bin := buildUndomail(t)
	for _, tc := range []struct {
		name, body string
		want       []string
	}{
		{"unknown key", "smtp:\n  listen: 127.0.0.1:0\n  upstrem: 127.0.0.1:10025\n",
			[]string{"smtp.upstrem: unknown key (line 3)", "known keys under smtp: listen, upstream"}},
		{"misspelt section", "snapshot:\n  every: 1h\n", []string{"snapshot: unknown key (line 1)"}},
		{"not a duration", "imap:\n  listen: 127.0.0.1:0\n  upstream: 127.0.0.1:10143\n  idle_timeout: forever\n",
			[]string{`imap.idle_timeout: "forever" is not a duration`}},
		{"impossible value", "lmtp:\n  listen: 127.0.0.1:0\n  upstream: 127.0.0.1:24\n  upstream_timeout: -5s\n",
			[]string{"lmtp.upstream_timeout: must be positive"}},
		{"log on the mail store", "store: copy:/srv/snap\nmail_root: /srv/mail\ndata_dir: /srv/mail/undo\nlmtp:\n  listen: 127.0.0.1:0\n  upstream: 127.0.0.1:24\n",
			[]string{"data_dir: /srv/mail/undo lies inside mail_root /srv/mail"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			cfg := filepath.Join(dir, "undomail.yaml")
			dataDir := filepath.Join(dir, "data")
			if err := os.WriteFile(cfg, []byte(tc.body), 0o600); err != nil {
				t.Fatal(err)
			}
			// The timeout only guards against a serve that started anyway.
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			args := []string{"serve", "--config", cfg}
			if !strings.Contains(tc.body, "data_dir") {
				args = append(args, "--data-dir", dataDir)
			}
			out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ctx.Err() != nil {
				t.Fatalf("serve with a bad config: %v (want a non-zero exit)\n%s", err, out)
			}
			for _, w := range tc.want {
				if !strings.Contains(string(out), w) {
					t.Errorf("serve's message lacks %q:\n%s", w, out)
				}
			}
			if _, err := os.Stat(dataDir); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("serve created %s before refusing the config", dataDir)
			}
		})
	}
}
