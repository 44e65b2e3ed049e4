// Package config reads undomail's configuration file. Unknown keys and
// impossible values are refused with a message naming the key: a typo in
// a mail proxy's config must not silently fall back to a default.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// Config is the whole configuration of `undomail serve`.
type Config struct {
	// DataDir holds the undo log (undo.db) and message blobs. It must not
	// live on the mail store's dataset: a rewind must never roll it back.
	DataDir string `yaml:"data_dir"`
	// Hostname is used in SMTP/LMTP greetings.
	Hostname string `yaml:"hostname"`
	// LogLevel is debug, info, warn or error.
	LogLevel string `yaml:"log_level"`

	// Store is where snapshots of the mail store are kept:
	// "zfs:POOL/DATASET" (the dataset holding the mail store) or
	// "copy:DIR" (copies of MailRoot under DIR). Empty: no snapshots.
	Store string `yaml:"store"`
	// MailRoot is the live mail store (Dovecot's maildirs), for the copy
	// backend; with zfs it is checked against the dataset's mountpoint.
	MailRoot  string    `yaml:"mail_root"`
	Snapshots Snapshots `yaml:"snapshots"`
	// Dovecot says how undomail makes Dovecot let go of the mail store
	// for a rewind and take it up again.
	Dovecot Dovecot `yaml:"dovecot"`

	SMTP  SMTP  `yaml:"smtp"`
	LMTP  LMTP  `yaml:"lmtp"`
	IMAP  IMAP  `yaml:"imap"`
	Admin Admin `yaml:"admin"`
}

// Dovecot holds the commands a rewind runs. Each is an argument list, so a
// Docker deployment writes ["docker", "exec", "dovecot", "doveadm"].
type Dovecot struct {
	// Doveadm runs doveadm (kick, mailbox status, mailbox update).
	Doveadm []string `yaml:"doveadm"`
	// Quiesce and Resume run before and after the rollback, after
	// sessions were kicked: e.g. stop and start Dovecot's LMTP service.
	Quiesce [][]string `yaml:"quiesce"`
	Resume  [][]string `yaml:"resume"`
	// MasterUser and MasterPassword log in as any user for replay
	// (Dovecot's master user passdb, auth_master_user_separator "*").
	MasterUser     string `yaml:"master_user"`
	MasterPassword string `yaml:"master_password"`
}

// Snapshots schedules snapshots and says how long they are kept.
type Snapshots struct {
	// Every takes a snapshot this often; 0 only on demand.
	Every Duration `yaml:"every"`
	// KeepHourly keeps the newest snapshot of each of the last N hours,
	// KeepDaily of each of the last N days. The newest snapshot is always
	// kept.
	KeepHourly int `yaml:"keep_hourly"`
	KeepDaily  int `yaml:"keep_daily"`
}

// IMAP is the IMAP front end in front of Dovecot's IMAP.
type IMAP struct {
	// Listen is the address mail clients connect to; empty disables it.
	Listen string `yaml:"listen"`
	// Upstream is Dovecot's IMAP listener.
	Upstream string `yaml:"upstream"`
	// TLSCert and TLSKey enable TLS toward clients (PEM files): STARTTLS,
	// or TLS from the first byte with ImplicitTLS (port 993).
	TLSCert     string `yaml:"tls_cert"`
	TLSKey      string `yaml:"tls_key"`
	ImplicitTLS bool   `yaml:"implicit_tls"`
	// AllowInsecureAuth accepts passwords on connections without TLS.
	AllowInsecureAuth bool `yaml:"allow_insecure_auth"`
	// UpstreamTimeout bounds connecting and logging in to Dovecot.
	UpstreamTimeout Duration `yaml:"upstream_timeout"`
	// IdleTimeout ends silent client connections (RFC 9051: at least 30m).
	IdleTimeout Duration `yaml:"idle_timeout"`
}

// SMTP is the front door: an SMTP listener in front of Postfix's smtpd.
type SMTP struct {
	// Listen is the address clients connect to; empty disables the front door.
	Listen string `yaml:"listen"`
	// Upstream is Postfix's smtpd.
	Upstream string `yaml:"upstream"`
	// XClient passes each client's address to Postfix with XCLIENT so
	// Postfix's relay policy judges the real client. Postfix must list
	// undomail's address in smtpd_authorized_xclient_hosts. Turn it off
	// only if the upstream does not trust undomail's address for relaying.
	XClient *bool `yaml:"xclient"`
	// AllowInsecureAuth offers AUTH on connections without TLS.
	AllowInsecureAuth bool `yaml:"allow_insecure_auth"`
	// TLSCert and TLSKey enable STARTTLS (PEM files).
	TLSCert string `yaml:"tls_cert"`
	TLSKey  string `yaml:"tls_key"`
	// MaxMessageBytes limits message size; 0 takes the upstream's SIZE.
	MaxMessageBytes int64 `yaml:"max_message_bytes"`
	// UpstreamTimeout bounds connecting and each command to the upstream.
	UpstreamTimeout Duration `yaml:"upstream_timeout"`
	// ClientTimeout bounds each read from and write to a client.
	ClientTimeout Duration `yaml:"client_timeout"`
}

// LMTP is delivery capture: Postfix's virtual_transport points at Listen,
// undomail relays to Dovecot's LMTP at Upstream.
type LMTP struct {
	Listen          string   `yaml:"listen"`
	Upstream        string   `yaml:"upstream"`
	MaxMessageBytes int64    `yaml:"max_message_bytes"`
	UpstreamTimeout Duration `yaml:"upstream_timeout"`
	ClientTimeout   Duration `yaml:"client_timeout"`
}

// Admin is the HTTP admin API (issue 7); the address is reserved now.
type Admin struct {
	Listen string `yaml:"listen"`
}

// Duration is a time.Duration written as "30s", "5m".
type Duration time.Duration

// UnmarshalYAML implements yaml.Unmarshaler.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %q is not a duration (like 30s or 5m)", n.Line, n.Value)
	}
	*d = Duration(v)
	return nil
}

// Default returns the configuration used when no file is given.
func Default() Config {
	return Config{
		DataDir:  "/var/lib/undomail",
		Hostname: "localhost",
		LogLevel: "info",
		SMTP: SMTP{
			UpstreamTimeout: Duration(5 * time.Minute),
			ClientTimeout:   Duration(5 * time.Minute),
		},
		LMTP: LMTP{
			UpstreamTimeout: Duration(5 * time.Minute),
			ClientTimeout:   Duration(5 * time.Minute),
		},
		IMAP: IMAP{
			UpstreamTimeout: Duration(30 * time.Second),
			IdleTimeout:     Duration(30 * time.Minute),
		},
		Admin:     Admin{Listen: "127.0.0.1:8025"},
		Dovecot:   Dovecot{Doveadm: []string{"doveadm"}},
		Snapshots: Snapshots{KeepHourly: 48, KeepDaily: 14},
	}
}

// Load reads a YAML file over the defaults. Unknown keys are errors.
func Load(path string) (Config, error) {
	cfg := Default()
	b, err := os.ReadFile(path)
	if err != nil {
		return cfg, fmt.Errorf("read config: %w", err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	// An empty file decodes to io.EOF: it means "all defaults".
	if err := dec.Decode(&cfg); err != nil && !errors.Is(err, io.EOF) {
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// XClientEnabled reports the effective smtp.xclient setting (default on).
func (s SMTP) XClientEnabled() bool { return s.XClient == nil || *s.XClient }

// Validate checks values that cannot work, naming the key.
func (c Config) Validate() error {
	var errs []error
	if c.DataDir == "" {
		errs = append(errs, errors.New("data_dir: must be set"))
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("log_level: %q is not one of debug, info, warn, error", c.LogLevel))
	}
	checkAddr := func(key, v string) {
		if v == "" {
			return
		}
		if _, _, err := net.SplitHostPort(v); err != nil {
			errs = append(errs, fmt.Errorf("%s: %q is not host:port: %v", key, v, err))
		}
	}
	checkAddr("smtp.listen", c.SMTP.Listen)
	checkAddr("smtp.upstream", c.SMTP.Upstream)
	checkAddr("lmtp.listen", c.LMTP.Listen)
	checkAddr("lmtp.upstream", c.LMTP.Upstream)
	checkAddr("imap.listen", c.IMAP.Listen)
	checkAddr("imap.upstream", c.IMAP.Upstream)
	checkAddr("admin.listen", c.Admin.Listen)
	if c.SMTP.Listen != "" && c.SMTP.Upstream == "" {
		errs = append(errs, errors.New("smtp.upstream: must be set when smtp.listen is (Postfix's smtpd address)"))
	}
	if c.LMTP.Listen != "" && c.LMTP.Upstream == "" {
		errs = append(errs, errors.New("lmtp.upstream: must be set when lmtp.listen is (Dovecot's LMTP address)"))
	}
	if c.IMAP.Listen != "" && c.IMAP.Upstream == "" {
		errs = append(errs, errors.New("imap.upstream: must be set when imap.listen is (Dovecot's IMAP address)"))
	}
	if c.SMTP.Listen == "" && c.LMTP.Listen == "" && c.IMAP.Listen == "" {
		errs = append(errs, errors.New("smtp.listen, lmtp.listen, imap.listen: at least one listener must be set"))
	}
	if (c.IMAP.TLSCert == "") != (c.IMAP.TLSKey == "") {
		errs = append(errs, errors.New("imap.tls_cert, imap.tls_key: set both or neither"))
	}
	if c.IMAP.ImplicitTLS && c.IMAP.TLSCert == "" {
		errs = append(errs, errors.New("imap.implicit_tls: needs imap.tls_cert and imap.tls_key"))
	}
	if (c.SMTP.TLSCert == "") != (c.SMTP.TLSKey == "") {
		errs = append(errs, errors.New("smtp.tls_cert, smtp.tls_key: set both or neither"))
	}
	if c.Store != "" && !strings.HasPrefix(c.Store, "zfs:") && !strings.HasPrefix(c.Store, "copy:") {
		errs = append(errs, fmt.Errorf("store: %q is neither zfs:POOL/DATASET nor copy:DIR", c.Store))
	}
	if strings.HasPrefix(c.Store, "copy:") && c.MailRoot == "" {
		errs = append(errs, errors.New("mail_root: must be set for store copy:DIR (the live maildir tree)"))
	}
	if c.Snapshots.Every != 0 && c.Store == "" {
		errs = append(errs, errors.New("snapshots.every: needs store"))
	}
	if c.Snapshots.Every < 0 || c.Snapshots.KeepHourly < 0 || c.Snapshots.KeepDaily < 0 {
		errs = append(errs, errors.New("snapshots: every, keep_hourly and keep_daily must not be negative"))
	}
	if c.SMTP.MaxMessageBytes < 0 {
		errs = append(errs, errors.New("smtp.max_message_bytes: must not be negative"))
	}
	if c.LMTP.MaxMessageBytes < 0 {
		errs = append(errs, errors.New("lmtp.max_message_bytes: must not be negative"))
	}
	for _, d := range []struct {
		key string
		v   Duration
	}{
		{"smtp.upstream_timeout", c.SMTP.UpstreamTimeout}, {"smtp.client_timeout", c.SMTP.ClientTimeout},
		{"lmtp.upstream_timeout", c.LMTP.UpstreamTimeout}, {"lmtp.client_timeout", c.LMTP.ClientTimeout},
		{"imap.upstream_timeout", c.IMAP.UpstreamTimeout}, {"imap.idle_timeout", c.IMAP.IdleTimeout},
	} {
		if d.v <= 0 {
			errs = append(errs, fmt.Errorf("%s: must be positive", d.key))
		}
	}
	return errors.Join(errs...)
}
