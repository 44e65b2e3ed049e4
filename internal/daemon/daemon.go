// Package daemon assembles what `undomail serve` runs: the undo log and the
// listeners in front of the mail server. The demo and the end-to-end tests
// run the same assembly in-process.
package daemon

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/outbound"
	"github.com/undomail/undomail/proxy"
	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/timetravel"
	"github.com/undomail/undomail/undolog"
)

// ProbeTimeout bounds how long Start waits for an upstream to answer.
const ProbeTimeout = 30 * time.Second

// Daemon is a running undomail.
type Daemon struct {
	Log      *undolog.Log
	SMTP     *proxy.SMTPProxy // nil when the front door is disabled
	LMTP     *proxy.SMTPProxy // nil when delivery capture is disabled
	IMAP     *proxy.IMAPProxy // nil when the IMAP front end is disabled
	SMTPAddr net.Addr
	LMTPAddr net.Addr
	IMAPAddr net.Addr
	// Gate is passed by every mutation the proxies relay; Snapshot wedges
	// it for a consistent cut.
	Gate *proxy.Gate
	// Outbound is the outbound delay window (outbound.go); nil when
	// smtp.outbound_delay is off.
	Outbound *outbound.Queue
	// Store keeps snapshots of the mail store; nil without `store`.
	Store timetravel.Store
	// BeforeVerify, if set, runs after a cycle's replay and before the
	// store is compared with the present: fault injection for tests (a
	// file removed behind undomail's back must make the verdict NOT OK).
	BeforeVerify func()

	storeSpec string
	upstream  replay.Upstream // how a rewind quiesces Dovecot
	comp      compensation    // what cycles do about paradoxes (compensate.go)
	target    replay.Target   // where a replay re-executes verbs
	logger    *slog.Logger
	errc      chan error
	control   *admin.Control
	admin     *admin.Server  // nil until started (admin.go)
	repairMu  sync.Mutex     // one rewind, replay or cycle at a time
	pending   *pendingReplay // a split-form cycle waiting for its replay
	prog      progress       // how far the running cycle is
	// replayWorkers is how many users a replay re-executes at once.
	replayWorkers int
	live          liveFilters // filters kept active for live mail
	drillMu       sync.Mutex  // one drill at a time
	drills        config.Drills
	dataDir       string
	hostname      string
	smtpUpstream  string             // Postfix, for mail undomail sends itself (drill reports)
	stop          context.CancelFunc // ends the snapshot schedule
	scheduled     sync.WaitGroup
}

// Start opens the undo log, probes the upstreams and starts listening.
// It returns once every listener accepts connections.
func Start(ctx context.Context, cfg config.Config, logger *slog.Logger) (_ *Daemon, err error) {
	if err := errors.Join(cfg.Validate(), cfg.Compensation.Check()); err != nil {
		return nil, fmt.Errorf("invalid configuration:\n%w", err)
	}
	l, err := undolog.Open(cfg.DataDir, undolog.Options{Logger: logger})
	if err != nil {
		return nil, fmt.Errorf("open undo log: %w", err)
	}
	d := &Daemon{Log: l, logger: logger, errc: make(chan error, 3), Gate: &proxy.Gate{}, storeSpec: cfg.Store,
		drills: cfg.Drills, dataDir: cfg.DataDir, hostname: cfg.Hostname, smtpUpstream: cfg.SMTP.Upstream, comp: compensation{cfg.Compensation, cfg.Hostname},
		upstream: replay.Upstream{Doveadm: cfg.Dovecot.Doveadm, Quiesce: cfg.Dovecot.Quiesce, Resume: cfg.Dovecot.Resume, Logger: logger},
		target: replay.Target{LMTPAddr: cfg.LMTP.Upstream, IMAPAddr: cfg.IMAP.Upstream,
			MasterUser: cfg.Dovecot.MasterUser, MasterPassword: cfg.Dovecot.MasterPassword, Logger: logger,
			ReinjectAddr: cfg.SMTP.ReplayUpstream, Capture: &replay.Capture{}}}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()
	if cfg.Store != "" {
		if d.Store, err = timetravel.Open(ctx, cfg.Store, timetravel.Options{LivePath: cfg.MailRoot, Logger: logger}); err != nil {
			return nil, fmt.Errorf("store %s: %w", cfg.Store, err)
		}
	}
	if err := d.recoverRepair(ctx); err != nil {
		return nil, err
	}
	if err := d.loadFilters(ctx); err != nil {
		return nil, err
	}
	pctx, cancel := context.WithTimeout(ctx, ProbeTimeout)
	defer cancel()
	if cfg.LMTP.Listen != "" {
		d.LMTP, d.LMTPAddr, err = d.listen(pctx, cfg.LMTP.Listen, proxy.SMTPConfig{
			Upstream:        cfg.LMTP.Upstream,
			LMTP:            true,
			Hostname:        cfg.Hostname,
			MaxMessageBytes: cfg.LMTP.MaxMessageBytes,
			UpstreamTimeout: time.Duration(cfg.LMTP.UpstreamTimeout),
			ClientTimeout:   time.Duration(cfg.LMTP.ClientTimeout),
			Gate:            d.Gate,
			Divert:          d.divert,
			Collect:         d.target.Capture.Collect,
		})
		if err != nil {
			return nil, err
		}
	}
	if cfg.SMTP.Listen != "" {
		sc := proxy.SMTPConfig{
			Upstream:          cfg.SMTP.Upstream,
			Hostname:          cfg.Hostname,
			MaxMessageBytes:   cfg.SMTP.MaxMessageBytes,
			UpstreamTimeout:   time.Duration(cfg.SMTP.UpstreamTimeout),
			ClientTimeout:     time.Duration(cfg.SMTP.ClientTimeout),
			XClient:           cfg.SMTP.XClientEnabled(),
			AllowInsecureAuth: cfg.SMTP.AllowInsecureAuth,
			Gate:              d.Gate,
		}
		if cfg.SMTP.TLSCert != "" {
			cert, err := tls.LoadX509KeyPair(cfg.SMTP.TLSCert, cfg.SMTP.TLSKey)
			if err != nil {
				return nil, fmt.Errorf("smtp.tls_cert/smtp.tls_key: %w", err)
			}
			sc.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		}
		d.SMTP, d.SMTPAddr, err = d.listen(pctx, cfg.SMTP.Listen, sc)
		if err != nil {
			return nil, err
		}
	}
	if cfg.IMAP.Listen != "" {
		ic := proxy.IMAPConfig{
			Upstream:          cfg.IMAP.Upstream,
			Hostname:          cfg.Hostname,
			ImplicitTLS:       cfg.IMAP.ImplicitTLS,
			AllowInsecureAuth: cfg.IMAP.AllowInsecureAuth,
			UpstreamTimeout:   time.Duration(cfg.IMAP.UpstreamTimeout),
			IdleTimeout:       time.Duration(cfg.IMAP.IdleTimeout),
			LoginTimeout:      time.Duration(cfg.IMAP.LoginTimeout),
			MaxConnections:    cfg.IMAP.MaxConnections,
			Gate:              d.Gate,
		}
		ic.MaxConnectionsPerAddress = cfg.IMAP.MaxConnectionsPerAddress
		if cfg.IMAP.TLSCert != "" {
			cert, err := tls.LoadX509KeyPair(cfg.IMAP.TLSCert, cfg.IMAP.TLSKey)
			if err != nil {
				return nil, fmt.Errorf("imap.tls_cert/imap.tls_key: %w", err)
			}
			ic.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		}
		if d.IMAP, err = proxy.NewIMAP(pctx, ic, d.Log, d.logger); err != nil {
			return nil, err
		}
		ln, err := net.Listen("tcp", cfg.IMAP.Listen)
		if err != nil {
			return nil, fmt.Errorf("listen on %s: %w", cfg.IMAP.Listen, err)
		}
		d.IMAPAddr = ln.Addr()
		go func() { d.errc <- d.IMAP.Serve(ln) }()
	}
	if d.Store != nil {
		d.verifySnapshots(ctx)
	}
	if d.control, err = admin.ServeControl(cfg.DataDir, d, logger); err != nil {
		return nil, err
	}
	if err := d.startAdmin(cfg); err != nil {
		return nil, err
	}
	sctx, stop := context.WithCancel(context.Background())
	d.stop = stop
	if err := d.startOutbound(ctx, sctx, cfg); err != nil {
		return nil, err
	}
	if every := time.Duration(cfg.Snapshots.Every); every > 0 {
		d.scheduled.Add(1)
		go func() {
			defer d.scheduled.Done()
			archive := ""
			if cfg.Snapshots.PruneLog {
				archive = cfg.Snapshots.LogArchive
			}
			d.schedule(sctx, every, cfg.Snapshots.KeepHourly, cfg.Snapshots.KeepDaily, archive)
		}()
	}
	if every := time.Duration(cfg.Drills.Every); every > 0 && d.Store != nil {
		d.scheduled.Add(1)
		go func() {
			defer d.scheduled.Done()
			d.scheduleDrills(sctx, every)
		}()
	}
	return d, nil
}

func (d *Daemon) listen(ctx context.Context, addr string, sc proxy.SMTPConfig) (*proxy.SMTPProxy, net.Addr, error) {
	p, err := proxy.NewSMTP(ctx, sc, d.Log, d.logger)
	if err != nil {
		return nil, nil, err
	}
	// Listen ourselves: go-smtp's ListenAndServe in LMTP mode would create
	// a Unix socket named after the address.
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	go func() { d.errc <- p.Serve(ln) }()
	return p, ln.Addr(), nil
}

// Wait blocks until ctx ends or a listener fails.
func (d *Daemon) Wait(ctx context.Context) error {
	select {
	case <-ctx.Done():
		return nil
	case err := <-d.errc:
		if err == nil {
			return errors.New("listener stopped")
		}
		return fmt.Errorf("listener failed: %w", err)
	}
}

// StopSchedule stops taking scheduled snapshots; one in progress
// finishes first.
func (d *Daemon) StopSchedule() {
	if d.stop != nil {
		d.stop()
		d.scheduled.Wait()
	}
}

// ShutdownGrace is how long Close lets client connections finish.
const ShutdownGrace = 10 * time.Second

// Close stops the listeners (connections get ShutdownGrace to finish),
// then closes the log after its pending appends are committed.
func (d *Daemon) Close() error {
	d.closeAdmin()
	if d.control != nil {
		d.control.Close()
	}
	d.StopSchedule()
	ctx, cancel := context.WithTimeout(context.Background(), ShutdownGrace)
	defer cancel()
	var errs []error
	for _, p := range []*proxy.SMTPProxy{d.SMTP, d.LMTP} {
		if p != nil {
			errs = append(errs, p.Close(ctx))
		}
	}
	if d.IMAP != nil {
		errs = append(errs, d.IMAP.Close(ctx))
	}
	if d.Log != nil {
		errs = append(errs, d.Log.Close())
	}
	return errors.Join(errs...)
}
