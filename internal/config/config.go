// Package config reads undomail's configuration file. Unknown keys and
// impossible values are refused with a message naming the key: a typo in
// a mail proxy's config must not silently fall back to a default.
package config

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// Config is the whole configuration of `undomail serve`. Every field's doc
// comment is its entry in docs/configuration.md (reference_test.go keeps
// the two the same): write them for operators.
type Config struct {
	// DataDir holds the undo log (undo.db) and message blobs. It must not
	// live on the mail store's dataset: a rewind must never roll it back.
	DataDir string `yaml:"data_dir"`
	// Hostname is the name undomail gives in its SMTP, LMTP and IMAP
	// greetings.
	Hostname string `yaml:"hostname"`
	// LogLevel is debug, info, warn or error.
	LogLevel string `yaml:"log_level"`

	// Store is where snapshots of the mail store are kept:
	// "zfs:POOL/DATASET" (the dataset holding the mail store; per-user
	// child datasets allow per-user rewinds) or "copy:DIR" (copies of
	// mail_root under DIR, maildir files hard-linked). Empty: no
	// snapshots, so no rewinds.
	Store string `yaml:"store"`
	// MailRoot is the live mail store (the root of Dovecot's
	// mail_location), copied by store copy:DIR; with zfs it is checked
	// against the dataset's mountpoint.
	MailRoot  string    `yaml:"mail_root"`
	Snapshots Snapshots `yaml:"snapshots"`
	Dovecot   Dovecot   `yaml:"dovecot"`

	SMTP  SMTP  `yaml:"smtp"`
	LMTP  LMTP  `yaml:"lmtp"`
	IMAP  IMAP  `yaml:"imap"`
	Admin Admin `yaml:"admin"`

	Compensation Compensation `yaml:"compensation"`
	Drills       Drills       `yaml:"drills"`
}

// Dovecot says how a rewind makes Dovecot let go of the mail store and
// take it up again, and how replay acts as a user. Commands are argument
// lists, so a Docker deployment writes ["docker", "exec", "dovecot",
// "doveadm"].
type Dovecot struct {
	// Doveadm runs doveadm: kick sessions, read and raise mailbox
	// UIDNEXT/HIGHESTMODSEQ during a rewind.
	Doveadm []string `yaml:"doveadm"`
	// Quiesce are commands run before the rollback, after sessions were
	// kicked: e.g. stop Dovecot's LMTP and IMAP services.
	Quiesce [][]string `yaml:"quiesce"`
	// Resume are commands run after the rollback: e.g. start what
	// quiesce stopped.
	Resume [][]string `yaml:"resume"`
	// MasterUser is a Dovecot master user (a passdb with master = yes,
	// auth_master_user_separator = *) that replay logs in as to act as
	// each user. Set it with master_password, or neither.
	MasterUser string `yaml:"master_user"`
	// MasterPassword is master_user's password.
	MasterPassword string `yaml:"master_password"`
}

// Snapshots schedules snapshots and says how long they are kept.
type Snapshots struct {
	// Every takes a snapshot this often; 0 only on demand (undomail
	// snapshot). Needs store.
	Every Duration `yaml:"every"`
	// KeepHourly keeps the newest snapshot of each of the last N hours.
	// The newest snapshot is always kept.
	KeepHourly int `yaml:"keep_hourly"`
	// KeepDaily keeps the newest snapshot of each of the last N days.
	KeepDaily int `yaml:"keep_daily"`
	// PruneLog removes the undo log before the oldest snapshot kept,
	// after each scheduled snapshot's retention, archiving it to
	// log_archive first (undomail prune does it by hand).
	PruneLog bool `yaml:"prune_log"`
	// LogArchive is the directory pruned log goes to, one gzip'd
	// JSON-lines file per prune; required with prune_log.
	LogArchive string `yaml:"log_archive"`
}

// IMAP is the IMAP front end in front of Dovecot's IMAP.
type IMAP struct {
	// Listen is the address mail clients connect to; empty disables the
	// IMAP front end.
	Listen string `yaml:"listen"`
	// Upstream is Dovecot's IMAP listener, moved off port 143.
	Upstream string `yaml:"upstream"`
	// TLSCert is the PEM certificate chain for TLS toward clients
	// (STARTTLS, or implicit_tls); set with tls_key.
	TLSCert string `yaml:"tls_cert"`
	// TLSKey is the PEM private key for tls_cert.
	TLSKey string `yaml:"tls_key"`
	// ImplicitTLS speaks TLS from the first byte (port 993) instead of
	// offering STARTTLS. Needs tls_cert and tls_key.
	ImplicitTLS bool `yaml:"implicit_tls"`
	// AllowInsecureAuth accepts passwords on connections without TLS
	// (otherwise LOGINDISABLED is advertised).
	AllowInsecureAuth bool `yaml:"allow_insecure_auth"`
	// UpstreamTimeout bounds connecting and logging in to Dovecot.
	UpstreamTimeout Duration `yaml:"upstream_timeout"`
	// IdleTimeout ends silent client connections (RFC 9051 section 5.4:
	// at least 30 minutes).
	IdleTimeout Duration `yaml:"idle_timeout"`
	// LoginTimeout ends a connection that has not logged in this long
	// after connecting, busy or not, with "BYE Disconnected for
	// inactivity." as Dovecot's login process does after 3 minutes.
	LoginTimeout Duration `yaml:"login_timeout"`
	// MaxConnections caps the client connections open at once, logged
	// in or not; more are greeted with BYE [UNAVAILABLE] and closed. The
	// default is Dovecot's default process_limit for its imap service.
	// 0: no cap.
	MaxConnections int `yaml:"max_connections"`
	// MaxConnectionsPerAddress caps the connections open at once from
	// one client IP address; more are greeted with BYE [LIMIT] and
	// closed. Raise it when many users share an address (a NAT
	// gateway); Dovecot's own per-user cap, mail_max_userip_connections,
	// still applies after login. 0: no cap.
	MaxConnectionsPerAddress int `yaml:"max_connections_per_address"`
}

// SMTP is the front door: an SMTP listener in front of Postfix's smtpd.
type SMTP struct {
	// Listen is the address senders connect to; empty disables the front
	// door (delivery capture alone is enough for undo).
	Listen string `yaml:"listen"`
	// Upstream is Postfix's smtpd, moved off port 25.
	Upstream string `yaml:"upstream"`
	// XClient passes each client's address to Postfix with XCLIENT so
	// Postfix's relay policy judges the real client. Postfix must list
	// undomail's address in smtpd_authorized_xclient_hosts. Turn it off
	// only if the upstream does not trust undomail's address for relaying.
	XClient *bool `yaml:"xclient"`
	// AllowInsecureAuth offers AUTH (relayed to Postfix's SASL) on
	// connections without TLS.
	AllowInsecureAuth bool `yaml:"allow_insecure_auth"`
	// TLSCert is the PEM certificate chain for STARTTLS; set with tls_key.
	TLSCert string `yaml:"tls_cert"`
	// TLSKey is the PEM private key for tls_cert.
	TLSKey string `yaml:"tls_key"`
	// MaxMessageBytes limits message size; 0 takes the SIZE Postfix
	// advertises (message_size_limit).
	MaxMessageBytes int64 `yaml:"max_message_bytes"`
	// UpstreamTimeout bounds connecting and each command to Postfix.
	UpstreamTimeout Duration `yaml:"upstream_timeout"`
	// ClientTimeout bounds each read from and write to a client.
	ClientTimeout Duration `yaml:"client_timeout"`
	// ReplayUpstream is Postfix's replay service: a second smtpd in
	// master.cf, on a loopback port, whose content_filter is an lmtp
	// transport with lmtp_lhlo_name undomail-replay to lmtp.listen's
	// address. A replay hands the mail the front door
	// recorded to it again, so the repaired Postfix (aliases, virtual
	// maps, restrictions, header checks, milters) routes it anew, and
	// takes what it delivers at the capture (docs/operations.md, "Replay
	// through Postfix"). Needs lmtp.listen. Empty: deliveries replay as
	// they were recorded.
	ReplayUpstream string `yaml:"replay_upstream"`
	// OutboundDelay is the outbound delay window: mail Postfix would
	// relay to external hosts waits this long in Postfix's deferred
	// queue (defer_transports = smtp in main.cf), so a cycle inside the
	// window can still cancel it; undomail releases each message when its
	// time is up (docs/operations.md, "Outbound delay window"). Gmail's
	// undo send holds 5-30s. 0: off.
	OutboundDelay Duration `yaml:"outbound_delay"`
	// PostfixConfig is Postfix's configuration directory, passed as -c to
	// postqueue, postcat and postsuper, which manage the outbound delay
	// window's queue on the same machine. Empty: Postfix's default
	// (/etc/postfix).
	PostfixConfig string `yaml:"postfix_config"`
	// PostfixExec is a command the queue tools run through, for an
	// undomail that is not root: postsuper and postcat need root, e.g.
	// [sudo, -n] with a sudoers rule for postqueue, postcat, postsuper
	// and postconf. Empty: run them directly.
	PostfixExec []string `yaml:"postfix_exec"`
}

// LMTP is delivery capture: Postfix's virtual_transport points at Listen,
// undomail relays to Dovecot's LMTP at Upstream.
type LMTP struct {
	// Listen is the address Postfix delivers to (virtual_transport =
	// lmtp:inet:HOST:PORT); empty disables delivery capture.
	Listen string `yaml:"listen"`
	// Upstream is Dovecot's LMTP listener.
	Upstream string `yaml:"upstream"`
	// MaxMessageBytes limits message size; 0 takes the SIZE Dovecot
	// advertises.
	MaxMessageBytes int64 `yaml:"max_message_bytes"`
	// UpstreamTimeout bounds connecting and each command to Dovecot.
	UpstreamTimeout Duration `yaml:"upstream_timeout"`
	// ClientTimeout bounds each read from and write to Postfix.
	ClientTimeout Duration `yaml:"client_timeout"`
}

// Admin is the HTTP admin API and web timeline.
type Admin struct {
	// Listen is the admin HTTP address (JSON API, web timeline, /healthz,
	// /metrics); empty disables it. An address other hosts can reach needs
	// tls_cert and tls_key, or allow_insecure_remote.
	Listen string `yaml:"listen"`
	// Token authenticates API clients (Authorization: Bearer) and web
	// logins; at least 16 characters. Empty: a random token is generated
	// into admin.token in data_dir (mode 0600) on first start.
	Token string `yaml:"token"`
	// TLSCert is the admin's HTTPS certificate chain (PEM), with tls_key.
	TLSCert string `yaml:"tls_cert"`
	// TLSKey is the private key (PEM) of tls_cert.
	TLSKey string `yaml:"tls_key"`
	// AllowInsecureRemote serves plain HTTP on a non-loopback listen
	// address, sending the token in clear text; without it undomail
	// refuses to start.
	AllowInsecureRemote bool `yaml:"allow_insecure_remote"`
}

// Duration is a time.Duration written as "30s", "5m".
type Duration time.Duration

// UnmarshalYAML implements yaml.Unmarshaler.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		// A TypeError lets the decoder go on and report every bad value;
		// Load names the key from the line.
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: %q is not a duration (like 30s or 5m)", n.Line, n.Value)}}
	}
	*d = Duration(v)
	return nil
}

// String formats d like time.Duration, without zero units ("5m", "1h30m").
func (d Duration) String() string {
	s := time.Duration(d).String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
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
			UpstreamTimeout:          Duration(30 * time.Second),
			IdleTimeout:              Duration(30 * time.Minute),
			LoginTimeout:             Duration(3 * time.Minute),
			MaxConnections:           1024,
			MaxConnectionsPerAddress: 100,
		},
		Admin:     Admin{Listen: "127.0.0.1:8025"},
		Dovecot:   Dovecot{Doveadm: []string{"doveadm"}},
		Snapshots: Snapshots{KeepHourly: 48, KeepDaily: 14},
	}
}

// Load reads a YAML file over the defaults. Unknown keys and values of the
// wrong type are errors naming the key ("smtp.upstrem: unknown key").
func Load(path string) (Config, error) {
	cfg := Default()
	b, err := os.ReadFile(path)
	if err != nil {
		return cfg, fmt.Errorf("read config: %w", err)
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(b, &doc); err != nil {
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	if len(doc.Content) == 0 {
		return cfg, nil // an empty file means "all defaults"
	}
	// Unknown keys and badly typed values are reported together, each by
	// its key. checkKeys finds the unknown ones; the decoder, told to
	// ignore those, the types.
	keys := make(map[int]string)
	errs := checkKeys(doc.Content[0], reflect.TypeOf(cfg), "", keys)
	if err := doc.Decode(&cfg); err != nil {
		var te *yaml.TypeError
		if !errors.As(err, &te) {
			return cfg, fmt.Errorf("config %s: %w", path, err)
		}
		for _, e := range te.Errors {
			errs = append(errs, errors.New(nameKey(e, keys)))
		}
	}
	if len(errs) > 0 {
		return cfg, fmt.Errorf("config %s: %w", path, errors.Join(errs...))
	}
	return cfg, nil
}

// checkKeys walks the YAML mapping n along the struct type t and returns
// an error for every key t has no field for, named by its dotted path.
// It fills lines with the dotted key of every value's line, so decode
// errors (which yaml.v3 reports by line) can name the key too.
func checkKeys(n *yaml.Node, t reflect.Type, path string, lines map[int]string) []error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct || t == reflect.TypeOf(Duration(0)) || n.Kind != yaml.MappingNode {
		markLines(n, path, lines)
		return nil // a scalar or list: the decoder checks its type
	}
	var errs []error
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		key := k.Value
		if path != "" {
			key = path + "." + k.Value
		}
		f, ok := fieldByKey(t, k.Value)
		if !ok {
			errs = append(errs, fmt.Errorf("%s: unknown key (line %d); %s", key, k.Line, knownKeys(t, path)))
			continue
		}
		lines[k.Line] = key
		errs = append(errs, checkKeys(v, f.Type, key, lines)...)
	}
	return errs
}

func markLines(n *yaml.Node, key string, lines map[int]string) {
	lines[n.Line] = key
	for _, c := range n.Content {
		markLines(c, key, lines)
	}
}

// fieldByKey finds the field of struct t whose yaml tag is key.
func fieldByKey(t reflect.Type, key string) (reflect.StructField, bool) {
	for i := range t.NumField() {
		f := t.Field(i)
		if name, _, _ := strings.Cut(f.Tag.Get("yaml"), ","); name == key {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

func knownKeys(t reflect.Type, path string) string {
	var names []string
	for i := range t.NumField() {
		if name, _, _ := strings.Cut(t.Field(i).Tag.Get("yaml"), ","); name != "" {
			names = append(names, name)
		}
	}
	where := "at the top level"
	if path != "" {
		where = "under " + path
	}
	return "known keys " + where + ": " + strings.Join(names, ", ")
}

// nameKey rewrites a yaml.v3 type error "line N: ..." as "KEY: ... (line N)".
func nameKey(msg string, lines map[int]string) string {
	var line int
	if _, err := fmt.Sscanf(msg, "line %d:", &line); err != nil {
		return msg
	}
	key, ok := lines[line]
	if !ok {
		return msg
	}
	_, rest, _ := strings.Cut(msg, ": ")
	return fmt.Sprintf("%s: %s (line %d)", key, rest, line)
}

// XClientEnabled reports the effective smtp.xclient setting (default on).
func (s SMTP) XClientEnabled() bool { return s.XClient == nil || *s.XClient }

// Validate checks values that cannot work, naming the key.
func (c Config) Validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{key}, args...)...))
	}
	if c.DataDir == "" {
		bad("data_dir", "must be set")
	}
	if c.Hostname == "" || strings.ContainsAny(c.Hostname, " \t\r\n") {
		bad("hostname", "%q is not a host name", c.Hostname)
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		bad("log_level", "%q is not one of debug, info, warn, error", c.LogLevel)
	}
	listeners := make(map[string]string) // address -> key, to catch two listeners on one port
	checkAddr := func(key, v string, listen bool) {
		if v == "" {
			return
		}
		_, port, err := net.SplitHostPort(v)
		if err != nil {
			bad(key, "%q is not host:port: %v", v, err)
			return
		}
		if listen && port != "0" {
			if other, ok := listeners[v]; ok {
				bad(key, "%s is already %s's address", v, other)
			}
			listeners[v] = key
		}
	}
	checkAddr("smtp.listen", c.SMTP.Listen, true)
	checkAddr("lmtp.listen", c.LMTP.Listen, true)
	checkAddr("imap.listen", c.IMAP.Listen, true)
	checkAddr("admin.listen", c.Admin.Listen, true)
	checkAddr("smtp.upstream", c.SMTP.Upstream, false)
	checkAddr("lmtp.upstream", c.LMTP.Upstream, false)
	checkAddr("imap.upstream", c.IMAP.Upstream, false)
	checkAddr("smtp.replay_upstream", c.SMTP.ReplayUpstream, false)
	if c.SMTP.OutboundDelay < 0 {
		bad("smtp.outbound_delay", "must not be negative")
	}
	if c.SMTP.ReplayUpstream != "" && c.LMTP.Listen == "" {
		bad("smtp.replay_upstream", "needs lmtp.listen: Postfix delivers replayed mail to the capture")
	}
	if c.SMTP.Listen != "" && c.SMTP.Upstream == "" {
		bad("smtp.upstream", "must be set when smtp.listen is (Postfix's smtpd address)")
	}
	if c.LMTP.Listen != "" && c.LMTP.Upstream == "" {
		bad("lmtp.upstream", "must be set when lmtp.listen is (Dovecot's LMTP address)")
	}
	if c.IMAP.Listen != "" && c.IMAP.Upstream == "" {
		bad("imap.upstream", "must be set when imap.listen is (Dovecot's IMAP address)")
	}
	if c.SMTP.Listen == "" && c.LMTP.Listen == "" && c.IMAP.Listen == "" {
		bad("smtp.listen, lmtp.listen, imap.listen", "at least one listener must be set")
	}
	if (c.IMAP.TLSCert == "") != (c.IMAP.TLSKey == "") {
		bad("imap.tls_cert, imap.tls_key", "set both or neither")
	}
	if c.IMAP.ImplicitTLS && c.IMAP.TLSCert == "" {
		bad("imap.implicit_tls", "needs imap.tls_cert and imap.tls_key")
	}
	if (c.SMTP.TLSCert == "") != (c.SMTP.TLSKey == "") {
		bad("smtp.tls_cert, smtp.tls_key", "set both or neither")
	}
	if (c.Admin.TLSCert == "") != (c.Admin.TLSKey == "") {
		bad("admin.tls_cert, admin.tls_key", "set both or neither")
	}
	if c.Admin.Token != "" && len(c.Admin.Token) < 16 {
		bad("admin.token", "must be at least 16 characters")
	}
	kind, arg, _ := strings.Cut(c.Store, ":")
	switch {
	case c.Store == "":
	case kind != "zfs" && kind != "copy":
		bad("store", "%q is neither zfs:POOL/DATASET nor copy:DIR", c.Store)
	case kind == "zfs" && arg == "":
		bad("store", "%q names no dataset (zfs:POOL/DATASET)", c.Store)
	case kind == "copy" && arg == "":
		bad("store", "%q names no directory (copy:DIR)", c.Store)
	case kind == "copy" && c.MailRoot == "":
		bad("mail_root", "must be set for store copy:DIR (the live maildir tree)")
	case kind == "copy" && within(arg, c.MailRoot):
		bad("store", "%s lies inside mail_root %s: snapshots would copy themselves", arg, c.MailRoot)
	}
	// The log must survive a rewind of the store (docs/architecture.md,
	// "Binding rules": the undo log never lives on the dataset that is rolled back).
	if c.Store != "" && c.MailRoot != "" && c.DataDir != "" && within(c.DataDir, c.MailRoot) {
		bad("data_dir", "%s lies inside mail_root %s: a rewind would roll the undo log back with the mail", c.DataDir, c.MailRoot)
	}
	if c.Snapshots.Every != 0 && c.Store == "" {
		bad("snapshots.every", "needs store")
	}
	if c.Snapshots.Every < 0 {
		bad("snapshots.every", "must not be negative")
	}
	if c.Snapshots.KeepHourly < 0 {
		bad("snapshots.keep_hourly", "must not be negative")
	}
	if c.Snapshots.KeepDaily < 0 {
		bad("snapshots.keep_daily", "must not be negative")
	}
	if c.Store != "" && len(c.Dovecot.Doveadm) == 0 {
		bad("dovecot.doveadm", "must be set when store is (a rewind kicks sessions and raises UIDs with doveadm)")
	}
	for _, cmds := range []struct {
		key  string
		list [][]string
	}{{"dovecot.quiesce", c.Dovecot.Quiesce}, {"dovecot.resume", c.Dovecot.Resume}} {
		for i, cmd := range cmds.list {
			if len(cmd) == 0 || cmd[0] == "" {
				bad(fmt.Sprintf("%s[%d]", cmds.key, i), "empty command")
			}
		}
	}
	if (c.Dovecot.MasterUser == "") != (c.Dovecot.MasterPassword == "") {
		bad("dovecot.master_user, dovecot.master_password", "set both or neither")
	}
	if c.IMAP.MaxConnections < 0 {
		bad("imap.max_connections", "must not be negative (0: no cap)")
	}
	if c.IMAP.MaxConnectionsPerAddress < 0 {
		bad("imap.max_connections_per_address", "must not be negative (0: no cap)")
	}
	if c.SMTP.MaxMessageBytes < 0 {
		bad("smtp.max_message_bytes", "must not be negative")
	}
	if c.LMTP.MaxMessageBytes < 0 {
		bad("lmtp.max_message_bytes", "must not be negative")
	}
	for _, d := range []struct {
		key string
		v   Duration
	}{
		{"smtp.upstream_timeout", c.SMTP.UpstreamTimeout}, {"smtp.client_timeout", c.SMTP.ClientTimeout},
		{"lmtp.upstream_timeout", c.LMTP.UpstreamTimeout}, {"lmtp.client_timeout", c.LMTP.ClientTimeout},
		{"imap.upstream_timeout", c.IMAP.UpstreamTimeout}, {"imap.idle_timeout", c.IMAP.IdleTimeout},
		{"imap.login_timeout", c.IMAP.LoginTimeout},
	} {
		if d.v <= 0 {
			bad(d.key, "must be positive")
		}
	}
	if c.Snapshots.PruneLog && c.Snapshots.LogArchive == "" {
		bad("snapshots.log_archive", "must be set with snapshots.prune_log: the pruned log is archived there, never just dropped")
	}
	if c.Snapshots.PruneLog && c.Snapshots.Every == 0 {
		bad("snapshots.prune_log", "needs snapshots.every: it runs after the scheduled snapshots' retention")
	}
	c.Drills.validate(bad)
	return errors.Join(errs...)
}

// within reports whether path is dir or lies below it.
func within(path, dir string) bool {
	rel, err := filepath.Rel(filepath.Clean(dir), filepath.Clean(path))
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}
