// Package mailstack runs a private, self-contained Dovecot and Postfix on a
// loopback address of their own (127.b.c.d, see ClaimHost) with fixed ports,
// for tests and the demo command. (A recovery drill's private Dovecot is
// internal/privdovecot's, a production package.)
//
// A Stack is one instance: Dovecot serves IMAP, LMTP and SASL auth from a
// passwd-file with a master user; Postfix accepts SMTP for one virtual domain
// and delivers it over LMTP, either to Dovecot or to a relay address (where
// undomail's LMTP capture listener sits). Every file of the instance lives in
// Options.Dir, except Dovecot's base_dir, which must be short because it holds
// unix sockets (108-byte limit) and therefore lives in /run/umdc-<id>.
//
// Nothing is shared between instances, so several stacks can run at once,
// in one process or in parallel test binaries: each holds its address, so
// no other server can take its ports. A watchdog stops an instance whose
// owning process dies without calling Stop, so none outlives it. Running
// one requires root: Postfix cannot run unprivileged, and Dovecot switches
// to the mail user.
//
// IMAP login names: a user logs in as the bare name ("alice") or as the full
// address ("alice@example.test"); both map to the same mailbox because Dovecot
// is configured with auth_username_format = %Ln. A master user logs in as
// "alice*" + MasterUser with MasterPassword.
package mailstack

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"time"
)

// User is a mailbox on the stack; its address is Name@Domain.
type User struct{ Name, Password string }

// Options configure Start. The zero value is usable except for Dir.
type Options struct {
	// Dir is the instance directory. It is created if missing, and it and
	// its parents are made traversable (0755): Dovecot's and Postfix's
	// unprivileged processes fail on a 0700 directory such as t.TempDir().
	Dir string
	// Domain is the virtual mailbox domain; default "example.test".
	Domain string
	// Users are the mailboxes; default alice, bob and carol, each with the
	// password "secret-<name>".
	Users []User
	// LMTPRelay, if set, makes Postfix deliver to lmtp:inet:<LMTPRelay>
	// instead of Dovecot's LMTP listener.
	LMTPRelay string
	// Capture makes Postfix deliver to CaptureAddr from the start (when
	// LMTPRelay is empty): where a proxy in front of Dovecot's LMTP, such
	// as undomail's capture, is to listen. Set at start, not by a reload
	// later: right after a reload Postfix now and then leaves a new SMTP
	// connection without a greeting for minutes.
	Capture bool
	// Logger receives the stack's own log lines; nil means slog.Default().
	Logger *slog.Logger
	// MailRoot, if set, is where the maildirs live instead of Dir/mail:
	// a ZFS dataset, to snapshot the mail store alone.
	MailRoot string
	// Sieve enables Dovecot's Sieve plugin on deliveries with a global
	// script (empty until SetSieve); needs the dovecot-sieve package.
	Sieve bool
	// Outside, if set (host:port), is where Postfix relays mail for other
	// domains through its smtp transport, as a production Postfix relays
	// to external hosts: an SMTP server standing in for the outside world
	// (mailstacktest.StartSink). Empty: the offsite error transport, and
	// nothing leaves.
	Outside string
	// DeferTransports is Postfix's defer_transports (postconf(5)): mail
	// for these transports waits in the deferred queue until someone
	// flushes it; "smtp" (with Outside; "offsite" without) is undomail's
	// outbound delay window (docs/operations.md, "Outbound delay window").
	DeferTransports string
}

// DefaultDomain is the virtual domain used when Options.Domain is empty.
const DefaultDomain = "example.test"

// DefaultUsers returns the users created when Options.Users is empty.
func DefaultUsers() []User {
	return []User{
		{Name: "alice", Password: "secret-alice"},
		{Name: "bob", Password: "secret-bob"},
		{Name: "carol", Password: "secret-carol"},
	}
}

// Stack is a running Dovecot + Postfix pair. Its fields are read-only.
type Stack struct {
	// Dir is the absolute instance directory.
	Dir string
	// Domain is the virtual mailbox domain.
	Domain string
	// Users are the mailboxes, as configured.
	Users []User
	// MasterUser and MasterPassword log in as any user over IMAP:
	// login name "alice*"+MasterUser, password MasterPassword.
	MasterUser, MasterPassword string
	// Host is the loopback address all the stack's listeners are on, a
	// 127.b.c.d of its own (see ClaimHost).
	Host string
	// IMAPAddr is Dovecot's IMAP listener, Host:port.
	IMAPAddr string
	// LMTPAddr is Dovecot's LMTP listener (TCP).
	LMTPAddr string
	// AuthAddr is Dovecot's auth listener that Postfix uses for SASL.
	AuthAddr string
	// SMTPAddr is Postfix's smtpd listener.
	SMTPAddr string
	// ReplaySMTPAddr is Postfix's replay service (postfix.go): undomail's
	// smtp.replay_upstream.
	ReplaySMTPAddr string
	// CaptureAddr is an address on Host nothing of the stack binds, three
	// ports above SMTPAddr: for a proxy in front of Dovecot's LMTP
	// (Options.Capture).
	CaptureAddr string
	// MailRoot holds the maildirs, at MailRoot/<user>/Maildir.
	MailRoot string

	id     string // random instance id: names base_dir, Dovecot's instance_name and Postfix's envMarker
	logger *slog.Logger

	dovecotConf    string // dovecot.conf path
	dovecotBaseDir string // /run/umdc-<id>
	postfixConf    string // Postfix config_directory
	postfixQueue   string // Postfix queue_directory
	logDir         string
	sieve          bool // Options.Sieve
	// Options.Outside and Options.DeferTransports, set in main.cf at
	// start: set there, not by a reload, because a message that arrives
	// while qmgr restarts can wait minutes in the incoming queue.
	outside, deferTransports string

	host *Host // claim on Host, released by Stop

	watchdog     *exec.Cmd // stops the instance if this process dies first
	watchdogPipe *os.File  // its stdin's write end, held only here

	mu      sync.Mutex
	stopped bool
}

// Layout of the instance directory. Postfix's queue lives beside, never
// inside, its config directory (postfix check rejects that).
const (
	dovecotSubdir      = "dovecot"
	dovecotStateSubdir = "dovecot-state"
	postfixSubdir      = "postfix"
	postfixDataSubdir  = "postfix-data"
	logSubdir          = "log"
	mailSubdir         = "mail"

	dovecotLogName = "dovecot.log"
	postfixLogName = "postfix.log"
	dovecotOutName = "dovecot.out" // stdio of the dovecot command
	postfixOutName = "postfix.out" // stdio of the postfix command
)

// envMarker is set, with the instance id as value, in the environment of
// every Postfix process (import_environment in main.cf), so Stop can find the
// processes of one instance in /proc.
const envMarker = "UNDOMAIL_MAILSTACK"

// startTimeout bounds Start when ctx has no deadline.
const startTimeout = 60 * time.Second

// readyTimeout bounds the wait for each daemon to serve once started; the
// error then names the daemon and its log.
const readyTimeout = 30 * time.Second

// Start claims a loopback address for the stack (ClaimHost), writes the
// configuration into opts.Dir, starts Dovecot and then Postfix, and returns
// once both are ready. On failure it stops whatever it
// started and returns an error that includes the tail of the relevant log.
func Start(ctx context.Context, opts Options) (*Stack, error) {
	if missing := Missing(); len(missing) > 0 {
		return nil, fmt.Errorf("start mail stack: missing Debian packages %v", missing)
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("start mail stack: must run as root (Postfix cannot run unprivileged)")
	}
	if opts.Dir == "" {
		return nil, errors.New("start mail stack: Options.Dir is empty")
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, startTimeout)
		defer cancel()
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("start mail stack: resolve dir %q: %w", opts.Dir, err)
	}
	if err := makeTraversable(dir); err != nil {
		return nil, fmt.Errorf("start mail stack in %s: %w", dir, err)
	}

	// The stack's ports are on a loopback address of its own (ClaimHost),
	// checked free just before; only a wildcard listener opened since can
	// take one. Retry on another address in that case only.
	const attempts = 3
	for attempt := 1; ; attempt++ {
		s, err := start(ctx, dir, opts)
		if err == nil {
			return s, nil
		}
		if attempt == attempts || !errors.Is(err, errPortInUse) || ctx.Err() != nil {
			return nil, err
		}
		s.logger.Warn("mail stack port taken, retrying on another address", "dir", dir, "attempt", attempt, "err", err)
	}
}

// start makes one attempt at Start. It always returns a non-nil Stack so the
// caller can log with it, already stopped on error.
func start(ctx context.Context, dir string, opts Options) (*Stack, error) {
	begin := time.Now()
	s := &Stack{
		Dir:        dir,
		Domain:     opts.Domain,
		Users:      append([]User(nil), opts.Users...),
		MasterUser: "master",
		logger:     opts.Logger,
	}
	if s.Domain == "" {
		s.Domain = DefaultDomain
	}
	if len(s.Users) == 0 {
		s.Users = DefaultUsers()
	}
	if s.logger == nil {
		s.logger = slog.Default()
	}
	var err error
	if s.id, err = randomHex(8); err != nil {
		return s, fmt.Errorf("start mail stack in %s: instance id: %w", dir, err)
	}
	if s.MasterPassword, err = randomHex(12); err != nil {
		return s, fmt.Errorf("start mail stack in %s: master password: %w", dir, err)
	}
	s.MailRoot = filepath.Join(dir, mailSubdir)
	s.sieve = opts.Sieve
	s.outside, s.deferTransports = opts.Outside, opts.DeferTransports
	if opts.MailRoot != "" {
		s.MailRoot = opts.MailRoot
		// Dovecot's mail processes run as the mail user: every directory
		// above the mail root must let them through (a drill's clone
		// lives in the snapshot directory).
		if err := makeTraversable(filepath.Dir(s.MailRoot)); err != nil {
			return s, fmt.Errorf("start mail stack in %s: mail root: %w", dir, err)
		}
	}
	s.logDir = filepath.Join(dir, logSubdir)
	s.dovecotConf = filepath.Join(dir, dovecotSubdir, "dovecot.conf")
	s.dovecotBaseDir = shortBaseDir(s.id)
	s.postfixConf = filepath.Join(dir, postfixSubdir)
	// Postfix's public and private sockets live in the queue directory,
	// as $queue_directory/public/postlog and the like: it must be short
	// (108-byte unix socket paths), like Dovecot's base_dir.
	s.postfixQueue = shortDir("umpq-", s.id)

	if err := s.claimHost(); err != nil {
		return s, fmt.Errorf("start mail stack in %s: %w", dir, err)
	}

	if err := s.startWatchdog(); err != nil {
		return s, fmt.Errorf("start mail stack in %s: %w", dir, err)
	}
	if err := s.writeDovecotConfig(); err != nil {
		return s, fmt.Errorf("start mail stack in %s: %w", dir, err)
	}
	relay := opts.LMTPRelay
	if smtpPort, err := strconv.Atoi(port(s.SMTPAddr)); err == nil {
		s.CaptureAddr = net.JoinHostPort(s.Host, strconv.Itoa(smtpPort+3))
	}
	if relay == "" && opts.Capture {
		relay = s.CaptureAddr
	}
	if relay == "" {
		relay = s.LMTPAddr
	}
	if err := s.writePostfixConfig(relay); err != nil {
		return s, fmt.Errorf("start mail stack in %s: %w", dir, err)
	}

	if err := s.startDovecot(ctx); err != nil {
		s.stopQuietly()
		return s, fmt.Errorf("start mail stack in %s: %w", dir, err)
	}
	if err := s.startPostfix(ctx); err != nil {
		s.stopQuietly()
		return s, fmt.Errorf("start mail stack in %s: %w", dir, err)
	}
	s.logger.Info("mail stack started", "dir", dir, "imap", s.IMAPAddr, "smtp", s.SMTPAddr,
		"lmtp", s.LMTPAddr, "auth", s.AuthAddr, "lmtp_relay", opts.LMTPRelay, "duration", time.Since(begin))
	return s, nil
}

// stopQuietly stops a half-started stack; the start error is what matters.
func (s *Stack) stopQuietly() {
	if err := s.Stop(); err != nil {
		s.logger.Warn("stop half-started mail stack", "dir", s.Dir, "err", err)
	}
}

// Address returns user's mail address, user@Domain.
func (s *Stack) Address(user string) string { return user + "@" + s.Domain }

// Password returns user's password, or "" if there is no such user.
func (s *Stack) Password(user string) string {
	for _, u := range s.Users {
		if u.Name == user {
			return u.Password
		}
	}
	return ""
}

// DovecotLog returns the path of Dovecot's log file.
func (s *Stack) DovecotLog() string { return filepath.Join(s.logDir, dovecotLogName) }

// PostfixLog returns the path of Postfix's log file (maillog_file).
func (s *Stack) PostfixLog() string { return filepath.Join(s.logDir, postfixLogName) }

// DovecotConfig returns the path of the dovecot.conf for `-c`.
func (s *Stack) DovecotConfig() string { return s.dovecotConf }

// PostfixConfigDir returns Postfix's config_directory for `-c`.
func (s *Stack) PostfixConfigDir() string { return s.postfixConf }

// Stop stops Postfix, then Dovecot, and waits until no process of this
// instance is left, killing stragglers after a bounded wait. It removes
// Dovecot's base_dir. Calling it again does nothing.
func (s *Stack) Stop() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return nil
	}
	s.stopped = true
	begin := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	var errs []error
	if err := s.stopPostfix(ctx); err != nil {
		errs = append(errs, err)
	}
	s.logger.Debug("mail stack postfix stopped", "dir", s.Dir, "elapsed", time.Since(begin))
	if err := s.stopDovecot(ctx); err != nil {
		errs = append(errs, err)
	}
	s.logger.Debug("mail stack dovecot stopped", "dir", s.Dir, "elapsed", time.Since(begin))
	if err := s.reapInstance(); err != nil {
		errs = append(errs, err)
	}
	if err := s.stopWatchdog(); err != nil {
		errs = append(errs, err)
	}
	// Only once nothing of the instance listens on it any more.
	if s.host != nil && len(s.instancePIDs()) == 0 {
		s.host.Release()
	}
	if err := os.RemoveAll(s.dovecotBaseDir); err != nil {
		errs = append(errs, fmt.Errorf("remove dovecot base_dir %s: %w", s.dovecotBaseDir, err))
	}
	if len(s.instancePIDs()) == 0 {
		if err := os.RemoveAll(s.postfixQueue); err != nil {
			errs = append(errs, fmt.Errorf("remove postfix queue_directory %s: %w", s.postfixQueue, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("stop mail stack in %s: %w", s.Dir, err)
	}
	s.logger.Info("mail stack stopped", "dir", s.Dir, "duration", time.Since(begin))
	return nil
}

func randomHex(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("read random bytes: %w", err)
	}
	return hex.EncodeToString(b), nil
}
