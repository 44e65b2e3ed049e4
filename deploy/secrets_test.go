package deploy

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/undomail/undomail/internal/config"
)

// TestSecretsInit runs deploy/secrets/init as an operator would before
// docker compose up: it writes every secret the compose file names, an
// undomail.yaml that loads and validates with the master password filled
// in, Dovecot password hashes that Dovecot accepts for the passwords it
// generated, and it keeps what exists when run again.
func TestSecretsInit(t *testing.T) {
	root := t.TempDir()
	for _, d := range []string{"deploy/secrets", "deploy/undomail"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"secrets/init", "undomail/undomail.yaml"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, "deploy", f), b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	initScript := filepath.Join(root, "deploy/secrets/init")
	out, err := exec.Command("sh", initScript, "example.org").CombinedOutput()
	if err != nil {
		t.Fatalf("deploy/secrets/init: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`postmaster@example.org's IMAP password: (\S+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("init does not print the first user's password:\n%s", out)
	}
	dir := filepath.Join(root, "deploy/secrets")
	p := loadCompose(t)
	for _, s := range p.Secrets {
		if _, err := os.Stat(filepath.Join(dir, filepath.Base(s.File))); err != nil {
			t.Errorf("compose secret %s: init did not write it: %v", s.Name, err)
		}
	}

	cfg, err := config.Load(filepath.Join(dir, "undomail.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if cfg.Dovecot.MasterPassword == "" || cfg.Dovecot.MasterPassword == "MASTER_PASSWORD" {
		t.Fatalf("undomail.yaml's master password was not filled in: %q", cfg.Dovecot.MasterPassword)
	}
	// Dovecot accepts the generated passwords against the hashes.
	check := func(file, user, password string) {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(dir, file))
		if err != nil {
			t.Fatal(err)
		}
		fields := strings.Split(strings.TrimSpace(string(b)), ":")
		if len(fields) < 2 || fields[0] != user {
			t.Fatalf("%s: %q, want a passwd-file line for %s", file, b, user)
		}
		if out, err := exec.Command("doveadm", "pw", "-t", fields[1], "-p", password).CombinedOutput(); err != nil {
			t.Fatalf("%s: Dovecot does not accept the password for %s: %v %s", file, user, err, out)
		}
	}
	check("dovecot-master-users", cfg.Dovecot.MasterUser, cfg.Dovecot.MasterPassword)
	check("dovecot-users", "postmaster@example.org", string(m[1]))

	before, _ := os.ReadFile(filepath.Join(dir, "doveadm_password"))
	if out, err := exec.Command("sh", initScript).CombinedOutput(); err != nil {
		t.Fatalf("init, again: %v\n%s", err, out)
	}
	after, _ := os.ReadFile(filepath.Join(dir, "doveadm_password"))
	if len(before) == 0 || string(before) != string(after) {
		t.Fatal("running init again replaced an existing secret")
	}
}
