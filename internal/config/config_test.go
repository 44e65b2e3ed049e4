package config

import (
	"os"
	"path/filepath"
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

func TestRefusedConfigs(t *testing.T) {
	for _, tc := range []struct{ name, body, want string }{
		{"unknown key", "data_dir: /x\nsmtp:\n  listen: 127.0.0.1:25\n  upstrem: 127.0.0.1:10025\n", "field upstrem not found"},
		{"bad duration", "smtp:\n  upstream_timeout: soon\n", `"soon" is not a duration`},
		{"not yaml", "smtp: [\n", "config"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(write(t, tc.body))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Load: %v, want an error containing %q", err, tc.want)
			}
		})
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
