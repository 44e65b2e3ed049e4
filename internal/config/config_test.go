package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func write(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "undomail.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestExampleConfigLoads keeps the documented example valid.
func TestExampleConfigLoads(t *testing.T) {
	cfg, err := Load("../../undomail.example.yaml")
	if err != nil {
		t.Fatalf("load example: %v", err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("example does not validate: %v", err)
	}
	if cfg.LMTP.Upstream != "127.0.0.1:24" || time.Duration(cfg.SMTP.UpstreamTimeout) != 5*time.Minute || !cfg.SMTP.XClientEnabled() {
		t.Fatalf("example read as %+v", cfg)
	}
}

// TestRefusedConfigs: a file with an unknown key or a value of the wrong
// type is refused by Load with the key's dotted path in the message.
func TestRefusedConfigs(t *testing.T) {
	for _, tc := range []struct{ name, body, want string }{
		{"unknown key", "data_dir: /x\nsmtp:\n  listen: 127.0.0.1:25\n  upstrem: 127.0.0.1:10025\n", "smtp.upstrem: unknown key (line 4); known keys under smtp: listen, upstream,"},
		{"unknown top-level key", "datadir: /x\n", "datadir: unknown key (line 1); known keys at the top level: data_dir,"},
		{"unknown nested key", "snapshots:\n  keep_weekly: 4\n", "snapshots.keep_weekly: unknown key"},
		{"every unknown key", "smtp:\n  lisen: a:1\nimap:\n  upstrem: b:2\n", "smtp.lisen: unknown key (line 2)"},
		{"bad duration", "smtp:\n  upstream_timeout: soon\n", `smtp.upstream_timeout: "soon" is not a duration (like 30s or 5m) (line 2)`},
		{"wrong type", "lmtp:\n  max_message_bytes: lots\n", "lmtp.max_message_bytes: cannot unmarshal !!str `lots` into int64 (line 2)"},
		{"wrong type in a list", "dovecot:\n  quiesce:\n    - [systemctl, stop]\n    - {a: b}\n", "dovecot.quiesce: cannot unmarshal"},
		{"section is a scalar", "imap: yes\n", "imap: cannot unmarshal"},
		{"not yaml", "smtp: [\n", "config"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(write(t, tc.body))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Load: %v, want an error containing %q", err, tc.want)
			}
		})
	}
	// Every problem is named at once, unknown keys and bad values alike.
	_, err := Load(write(t, "smtp:\n  lisen: a:1\nimap:\n  upstrem: b:2\n  idle_timeout: forever\n"))
	for _, want := range []string{"smtp.lisen: unknown key (line 2)", "imap.upstrem: unknown key (line 4)", `imap.idle_timeout: "forever" is not a duration`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("Load: %v, want every problem named, among them %q", err, want)
		}
	}
}

// TestEmptyConfigIsDefault: an empty file means all defaults.
func TestEmptyConfigIsDefault(t *testing.T) {
	cfg, err := Load(write(t, ""))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(cfg, Default()) {
		t.Fatalf("empty file read as %+v, want the defaults", cfg)
	}
}

func TestValidateNamesTheKey(t *testing.T) {
	for _, tc := range []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"no listener", func(c *Config) { c.SMTP.Listen = "" }, "at least one listener"},
		{"listen without upstream", func(c *Config) { c.SMTP.Upstream = "" }, "smtp.upstream: must be set"},
		{"bad address", func(c *Config) { c.LMTP.Listen = "localhost"; c.LMTP.Upstream = "127.0.0.1:24" }, "lmtp.listen:"},
		{"half TLS", func(c *Config) { c.SMTP.TLSCert = "/cert.pem" }, "smtp.tls_cert, smtp.tls_key"},
		{"log level", func(c *Config) { c.LogLevel = "loud" }, "log_level:"},
		{"negative size", func(c *Config) { c.SMTP.MaxMessageBytes = -1 }, "smtp.max_message_bytes"},
		{"zero timeout", func(c *Config) { c.SMTP.UpstreamTimeout = 0 }, "smtp.upstream_timeout: must be positive"},
		{"no hostname", func(c *Config) { c.Hostname = "" }, "hostname:"},
		{"two listeners on one port", func(c *Config) { c.IMAP.Listen, c.IMAP.Upstream = "127.0.0.1:25", "127.0.0.1:10143" }, "imap.listen: 127.0.0.1:25 is already smtp.listen's address"},
		{"admin on a proxy's port", func(c *Config) { c.Admin.Listen = "127.0.0.1:25" }, "admin.listen: 127.0.0.1:25 is already smtp.listen's address"},
		{"store kind", func(c *Config) { c.Store = "btrfs:/x" }, "store: \"btrfs:/x\" is neither"},
		{"zfs without dataset", func(c *Config) { c.Store = "zfs:" }, "store: \"zfs:\" names no dataset"},
		{"copy without mail_root", func(c *Config) { c.Store = "copy:/snap" }, "mail_root: must be set for store copy:DIR"},
		{"copy inside mail_root", func(c *Config) { c.Store, c.MailRoot = "copy:/var/vmail/.snap", "/var/vmail" }, "store: /var/vmail/.snap lies inside mail_root /var/vmail"},
		{"log inside mail_root", func(c *Config) { c.Store, c.MailRoot, c.DataDir = "zfs:tank/mail", "/tank/mail", "/tank/mail/undo" }, "data_dir: /tank/mail/undo lies inside mail_root /tank/mail"},
		{"snapshots without store", func(c *Config) { c.Snapshots.Every = Duration(time.Hour) }, "snapshots.every: needs store"},
		{"negative every", func(c *Config) { c.Store = "zfs:tank/mail"; c.Snapshots.Every = Duration(-time.Hour) }, "snapshots.every: must not be negative"},
		{"negative keep_daily", func(c *Config) { c.Snapshots.KeepDaily = -1 }, "snapshots.keep_daily: must not be negative"},
		{"no doveadm for rewinds", func(c *Config) { c.Store = "zfs:tank/mail"; c.Dovecot.Doveadm = nil }, "dovecot.doveadm: must be set when store is"},
		{"empty quiesce command", func(c *Config) { c.Dovecot.Quiesce = [][]string{{"systemctl", "stop", "dovecot"}, {}} }, "dovecot.quiesce[1]: empty command"},
		{"master user without password", func(c *Config) { c.Dovecot.MasterUser = "undomail" }, "dovecot.master_user, dovecot.master_password: set both or neither"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Default()
			c.SMTP.Listen, c.SMTP.Upstream = "127.0.0.1:25", "127.0.0.1:10025"
			if err := c.Validate(); err != nil {
				t.Fatalf("base config invalid: %v", err)
			}
			tc.mod(&c)
			err := c.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate: %v, want %q", err, tc.want)
			}
		})
	}
}
