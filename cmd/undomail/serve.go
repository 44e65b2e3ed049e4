package main

import (
	"context"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/daemon"
)

func serveCmd() *cobra.Command {
	var cfgPath string
	var o config.Config
	var xclient bool
	var snapEvery time.Duration
	var doveadm string
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the proxies in front of Postfix and Dovecot and record every action",
		Long: `serve runs undomail's listeners:

  the front door (--smtp-listen), an SMTP proxy in front of Postfix's smtpd
  (--smtp-upstream), which records what every sender handed over and was told;

  delivery capture (--lmtp-listen), an LMTP proxy between Postfix's
  virtual_transport and Dovecot's LMTP (--lmtp-upstream), which records every
  final local delivery: the unit a replay re-delivers;

  the IMAP front end (--imap-listen), in front of Dovecot's IMAP
  (--imap-upstream), which records every change a user makes to their mail
  and which messages each user was shown.

Every transaction is durably in the undo log (--data-dir) before it is
forwarded, and its outcome before the client hears it. Flags override the
config file (--config); see undomail.example.yaml.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg := config.Default()
			if cfgPath != "" {
				var err error
				if cfg, err = config.Load(cfgPath); err != nil {
					return err
				}
			}
			f := cmd.Flags()
			set := func(name string, dst *string, v string) {
				if f.Changed(name) {
					*dst = v
				}
			}
			set("data-dir", &cfg.DataDir, o.DataDir)
			set("hostname", &cfg.Hostname, o.Hostname)
			set("log-level", &cfg.LogLevel, o.LogLevel)
			set("smtp-listen", &cfg.SMTP.Listen, o.SMTP.Listen)
			set("smtp-upstream", &cfg.SMTP.Upstream, o.SMTP.Upstream)
			set("lmtp-listen", &cfg.LMTP.Listen, o.LMTP.Listen)
			set("lmtp-upstream", &cfg.LMTP.Upstream, o.LMTP.Upstream)
			set("imap-listen", &cfg.IMAP.Listen, o.IMAP.Listen)
			set("imap-upstream", &cfg.IMAP.Upstream, o.IMAP.Upstream)
			set("admin-listen", &cfg.Admin.Listen, o.Admin.Listen)
			set("store", &cfg.Store, o.Store)
			set("mail-root", &cfg.MailRoot, o.MailRoot)
			if f.Changed("doveadm") {
				cfg.Dovecot.Doveadm = strings.Fields(doveadm)
			}
			if f.Changed("snapshot-every") {
				cfg.Snapshots.Every = config.Duration(snapEvery)
			}
			if f.Changed("smtp-xclient") {
				cfg.SMTP.XClient = &xclient
			}
			if f.Changed("smtp-allow-insecure-auth") {
				cfg.SMTP.AllowInsecureAuth = o.SMTP.AllowInsecureAuth
			}
			if f.Changed("imap-allow-insecure-auth") {
				cfg.IMAP.AllowInsecureAuth = o.IMAP.AllowInsecureAuth
			}
			if err := cfg.Validate(); err != nil {
				return err
			}
			logger := newLogger(cfg.LogLevel)
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			d, err := daemon.Start(ctx, cfg, logger)
			if err != nil {
				return err
			}
			logger.Info("undomail serving", "data_dir", cfg.DataDir)
			werr := d.Wait(ctx)
			logger.Info("shutting down")
			if err := d.Close(); err != nil {
				logger.Error("shutdown", "err", err)
			}
			return werr
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfgPath, "config", "", "YAML config file (see undomail.example.yaml)")
	f.StringVar(&o.DataDir, "data-dir", "", "directory of the undo log and message blobs (not on the mail store's dataset)")
	f.StringVar(&o.Hostname, "hostname", "", "name used in SMTP/LMTP greetings")
	f.StringVar(&o.LogLevel, "log-level", "", "debug, info, warn or error")
	f.StringVar(&o.SMTP.Listen, "smtp-listen", "", "front door: SMTP listen address")
	f.StringVar(&o.SMTP.Upstream, "smtp-upstream", "", "front door: Postfix smtpd address")
	f.BoolVar(&xclient, "smtp-xclient", true, "pass client addresses to Postfix with XCLIENT (needs smtpd_authorized_xclient_hosts)")
	f.BoolVar(&o.SMTP.AllowInsecureAuth, "smtp-allow-insecure-auth", false, "offer AUTH without TLS")
	f.StringVar(&o.LMTP.Listen, "lmtp-listen", "", "delivery capture: LMTP listen address (Postfix's virtual_transport points here)")
	f.StringVar(&o.LMTP.Upstream, "lmtp-upstream", "", "delivery capture: Dovecot LMTP address")
	f.StringVar(&o.IMAP.Listen, "imap-listen", "", "IMAP front end: listen address for mail clients")
	f.StringVar(&o.IMAP.Upstream, "imap-upstream", "", "IMAP front end: Dovecot IMAP address")
	f.BoolVar(&o.IMAP.AllowInsecureAuth, "imap-allow-insecure-auth", false, "accept IMAP passwords without TLS")
	f.StringVar(&o.Store, "store", "", "snapshots of the mail store: zfs:POOL/DATASET or copy:DIR")
	f.StringVar(&o.MailRoot, "mail-root", "", "the live mail store (Dovecot's maildirs), for store copy:DIR")
	f.StringVar(&doveadm, "doveadm", "doveadm", `how to run doveadm for rewinds, e.g. "doveadm -c /etc/dovecot/dovecot.conf"`)
	f.DurationVar(&snapEvery, "snapshot-every", 0, "take a snapshot this often (0: only with undomail snapshot)")
	f.StringVar(&o.Admin.Listen, "admin-listen", "", "admin API and web timeline address (empty: none; non-loopback needs admin.tls_cert or admin.allow_insecure_remote)")
	return cmd
}
