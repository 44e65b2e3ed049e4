// Package testbed runs undomail the way it is deployed, in front of a
// private mail stack: Postfix's smtpd behind undomail's SMTP front door,
// Postfix's deliveries through undomail's LMTP capture into Dovecot, and
// Dovecot's IMAP behind undomail's IMAP front end.
// `undomail demo`, `undomail load` and the end-to-end tests share it.
package testbed

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/daemon"
	"github.com/undomail/undomail/internal/mailstack"
)

// UpstreamTimeout bounds undomail's wait on the stack's Postfix and Dovecot
// (connecting and each command), in place of the production defaults.
const UpstreamTimeout = 30 * time.Second

// Options configure Start.
type Options struct {
	// Dir holds the mail stack (Dir/stack) and the undo log (Dir/undo).
	Dir string
	// SMTPListen is the front door's address; default 127.0.0.1:0.
	SMTPListen string
	// Logger receives both undomail's and the stack's logs.
	Logger *slog.Logger
	// Tweak, if set, may change undomail's configuration before it starts.
	Tweak func(*config.Config)
	// MailRoot, if set, puts the maildirs there (see mailstack.Options).
	MailRoot string
	// Sieve enables a global Sieve script on deliveries (Stack.SetSieve).
	Sieve bool
	// Users are the mailboxes (default: mailstack.DefaultUsers).
	Users []mailstack.User
	// ReplayThroughPostfix sets smtp.replay_upstream to the stack's
	// replay service, so replays hand front-door mail to Postfix again.
	ReplayThroughPostfix bool
	// Outside, if set, is where Postfix relays mail for other domains
	// (mailstack.Options.Outside): an SMTP server standing in for the
	// outside world.
	Outside string
	// OutboundDelay, if set, turns the outbound delay window on: Postfix
	// defers the transports mail for other domains takes (smtp, and the
	// stack's offsite stand-in) and undomail releases each message when
	// this time is up.
	OutboundDelay time.Duration
}

// Testbed is a running stack with undomail in front of it.
type Testbed struct {
	Stack  *mailstack.Stack
	Daemon *daemon.Daemon
	Config config.Config
}

// Start starts Dovecot and Postfix, Postfix delivering to the address
// undomail's LMTP capture takes, then undomail (its capture needs
// Dovecot's LMTP to probe).
func Start(ctx context.Context, o Options) (_ *Testbed, err error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.SMTPListen == "" {
		o.SMTPListen = "127.0.0.1:0"
	}
	so := mailstack.Options{Dir: filepath.Join(o.Dir, "stack"), Logger: o.Logger, MailRoot: o.MailRoot, Sieve: o.Sieve, Users: o.Users, Outside: o.Outside,
		Capture: true}
	if o.OutboundDelay > 0 {
		// Mail for other domains takes smtp with Outside, the stack's
		// offsite stand-in without.
		so.DeferTransports = "smtp, offsite"
	}
	st, err := mailstack.Start(ctx, so)
	if err != nil {
		return nil, err
	}
	tb := &Testbed{Stack: st}
	defer func() {
		if err != nil {
			tb.Stop()
		}
	}()
	cfg := config.Default()
	cfg.DataDir = filepath.Join(o.Dir, "undo")
	cfg.MailRoot = st.MailRoot
	cfg.Dovecot.Doveadm = []string{"doveadm", "-c", st.DovecotConfig()}
	cfg.Dovecot.MasterUser, cfg.Dovecot.MasterPassword = st.MasterUser, st.MasterPassword
	cfg.Hostname = "undomail.test"
	cfg.SMTP.Listen = o.SMTPListen
	cfg.SMTP.Upstream = st.SMTPAddr
	cfg.SMTP.AllowInsecureAuth = true // loopback only
	if o.ReplayThroughPostfix {
		cfg.SMTP.ReplayUpstream = st.ReplaySMTPAddr
	}
	// Postfix delivers to the capture's address from its start
	// (mailstack.Options.Capture), not after a reload.
	cfg.LMTP.Listen = st.CaptureAddr
	cfg.LMTP.Upstream = st.LMTPAddr
	cfg.IMAP.Listen = "127.0.0.1:0"
	cfg.IMAP.Upstream = st.IMAPAddr
	cfg.IMAP.AllowInsecureAuth = true // loopback only
	cfg.Admin.Listen = "127.0.0.1:0"  // tests and demos run side by side
	// The upstreams are a private Postfix and Dovecot on this machine: one
	// that has not answered in UpstreamTimeout is hung, and a test (or the
	// demo) should hear so long before the production default of 5 minutes.
	cfg.SMTP.UpstreamTimeout = config.Duration(UpstreamTimeout)
	cfg.LMTP.UpstreamTimeout = config.Duration(UpstreamTimeout)
	cfg.IMAP.UpstreamTimeout = config.Duration(UpstreamTimeout)
	if o.OutboundDelay > 0 {
		cfg.SMTP.OutboundDelay = config.Duration(o.OutboundDelay)
		cfg.SMTP.PostfixConfig = st.PostfixConfigDir()
	}
	if o.Tweak != nil {
		o.Tweak(&cfg)
	}
	tb.Config = cfg
	if tb.Daemon, err = daemon.Start(ctx, cfg, o.Logger); err != nil {
		return nil, fmt.Errorf("start undomail: %w", err)
	}
	switch {
	case tb.Daemon.LMTPAddr == nil:
		// A tweak turned the capture off: Postfix delivers to Dovecot (a
		// reload).
		if err := st.SetLMTPRelay(ctx, ""); err != nil {
			return nil, fmt.Errorf("point Postfix at Dovecot's LMTP: %w", err)
		}
	case tb.Daemon.LMTPAddr.String() != st.CaptureAddr:
		// A tweak moved the capture: tell Postfix (a reload).
		if err := st.SetLMTPRelay(ctx, tb.Daemon.LMTPAddr.String()); err != nil {
			return nil, fmt.Errorf("point Postfix at undomail's LMTP capture: %w", err)
		}
	}
	return tb, nil
}

// SMTPAddr is the front door's address.
func (tb *Testbed) SMTPAddr() string { return tb.Daemon.SMTPAddr.String() }

// IMAPAddr is the IMAP front end's address.
func (tb *Testbed) IMAPAddr() string { return tb.Daemon.IMAPAddr.String() }

// Stop stops undomail, then the stack.
func (tb *Testbed) Stop() error {
	var errs []error
	if tb.Daemon != nil {
		errs = append(errs, tb.Daemon.Close())
	}
	if tb.Stack != nil {
		errs = append(errs, tb.Stack.Stop())
	}
	return errors.Join(errs...)
}
