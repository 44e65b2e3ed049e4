package main

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/loadtest"
	"github.com/undomail/undomail/internal/testbed"
)

func loadCmd() *cobra.Command {
	o := loadtest.Options{Messages: 1000, Size: 4096, Sessions: 8, Rounds: 3}
	var dir, dataDir string
	var imapLoad bool
	var cpuProfile string
	imapOpts := loadtest.IMAPOptions{Clients: 8, Cycles: 20}
	cmd := &cobra.Command{
		Use:   "load",
		Short: "Measure undomail's throughput against the upstream driven directly, in one run",
		Long: `load starts a private Dovecot + Postfix with undomail in front (as demo does)
and sends the same load to the upstream directly and through undomail,
alternating, then prints messages/s for both, the ratio, and the machine's
CPU time per message with undomail's share. The load is distinct typical
mail (a text part and a base64 attachment) from a load source in a process
of its own; --smtp-source sends Postfix's smtp-source load instead.
With --lmtp it compares undomail's LMTP capture with Dovecot's LMTP instead of
the SMTP front door with Postfix's smtpd; with --imap, the IMAP front end with
Dovecot's IMAP under a mixed mail-client workload (commands/s and added
latency). Needs root (it starts a private Postfix and Dovecot).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if os.Geteuid() != 0 {
				return errors.New("load must run as root: it starts a private Postfix")
			}
			if dir == "" {
				var err error
				if dir, err = os.MkdirTemp("", "undomail-load-"); err != nil {
					return err
				}
				defer os.RemoveAll(dir)
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
			opts := testbed.Options{Dir: dir, Logger: logger}
			if dataDir != "" {
				opts.Tweak = func(c *config.Config) { c.DataDir = dataDir }
			}
			tb, err := testbed.Start(ctx, opts)
			if err != nil {
				return err
			}
			defer tb.Stop()
			if cpuProfile != "" {
				// The proxies and the log run in this process: the
				// profile shows where undomail's share of the time goes.
				f, err := os.Create(cpuProfile)
				if err != nil {
					return err
				}
				defer f.Close()
				if err := pprof.StartCPUProfile(f); err != nil {
					return err
				}
				defer pprof.StopCPUProfile()
			}
			if imapLoad {
				imapOpts.Rounds = o.Rounds
				res, err := loadtest.MeasureIMAP(ctx, tb, imapOpts, cmd.OutOrStdout())
				if err != nil {
					return err
				}
				res.Report(cmd.OutOrStdout())
				return nil
			}
			res, err := loadtest.Measure(ctx, tb, o, cmd.OutOrStdout())
			if err != nil {
				return err
			}
			res.Report(cmd.OutOrStdout())
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.Messages, "messages", o.Messages, "messages per run")
	f.IntVar(&o.Size, "size", o.Size, "message size in bytes")
	f.IntVar(&o.Sessions, "sessions", o.Sessions, "concurrent sessions")
	f.IntVar(&o.Rounds, "rounds", o.Rounds, "direct/undomail pairs of runs")
	f.BoolVar(&o.Reuse, "reuse", false, "send each session's messages over one connection (smtp-source -d)")
	f.BoolVar(&o.LMTP, "lmtp", false, "measure the LMTP capture against Dovecot's LMTP")
	f.BoolVar(&o.SMTPSource, "smtp-source", false, "send Postfix's smtp-source load (the same lines of X in every message) instead of distinct typical mail")
	f.BoolVar(&imapLoad, "imap", false, "measure the IMAP front end against Dovecot's IMAP (mixed client workload)")
	f.IntVar(&imapOpts.Clients, "clients", imapOpts.Clients, "IMAP: concurrent clients")
	f.IntVar(&imapOpts.Cycles, "cycles", imapOpts.Cycles, "IMAP: work cycles per client per run")
	f.BoolVar(&imapOpts.Stay, "stay", false, "IMAP: each client stays logged in for all its cycles of a run (as a mail client does), instead of a login per cycle")
	f.StringVar(&cpuProfile, "cpuprofile", "", "write a CPU profile of undomail (proxies and log) over the measurement to this file")
	f.StringVar(&dir, "dir", "", "directory for the stack and log (default: a temporary one, removed afterwards)")
	f.StringVar(&dataDir, "data-dir", "", "put the undo log here instead (e.g. on its own filesystem, as in production)")
	return cmd
}
