package daemon

import (
	"context"
	"encoding/json"
	"net"
	"net/http"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
)

// adminBackend is the daemon as the admin server sees it (admin.Backend).
type adminBackend struct {
	*Daemon
	upstreams []admin.Upstream
}

func (b adminBackend) UndoLog() *undolog.Log       { return b.Log }
func (b adminBackend) Upstreams() []admin.Upstream { return b.upstreams }
func (b adminBackend) Holding() bool               { return b.Gate.Holding() }
func (b adminBackend) PlanCycle(ctx context.Context, to string, cancel []int64) (*admin.Plan, error) {
	return PlanCycle(ctx, b.Log, to, cancel)
}

// CycleProgress is the running cycle's progress, nil when none runs.
func (b adminBackend) CycleProgress() *replay.Progress {
	p := b.progress()
	switch p.Phase {
	case "", "done", "failed":
		return nil
	}
	return &p
}

func (b adminBackend) progress() replay.Progress {
	if pr, ok := any(b.Daemon).(interface{ CycleProgress() replay.Progress }); ok {
		return pr.CycleProgress()
	}
	return replay.Progress{}
}

// startAdmin serves the admin API on the control socket (always) and,
// with admin.listen, the admin server over TCP.
func (d *Daemon) startAdmin(cfg config.Config) error {
	b := adminBackend{Daemon: d}
	for _, u := range []struct{ name, addr, listen string }{
		{"smtp", cfg.SMTP.Upstream, cfg.SMTP.Listen}, {"lmtp", cfg.LMTP.Upstream, cfg.LMTP.Listen}, {"imap", cfg.IMAP.Upstream, cfg.IMAP.Listen},
	} {
		if u.listen != "" {
			b.upstreams = append(b.upstreams, admin.Upstream{Name: u.name, Addr: u.addr})
		}
	}
	// The CLI's progress bar polls this while `undomail cycle run` waits.
	d.control.Handle("GET /cycles/progress", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(b.progress())
	}))
	o := admin.Options{Listen: cfg.Admin.Listen, DataDir: cfg.DataDir, Token: cfg.Admin.Token,
		TLSCert: cfg.Admin.TLSCert, TLSKey: cfg.Admin.TLSKey, AllowInsecureRemote: cfg.Admin.AllowInsecureRemote, Logger: d.logger}
	srv, err := admin.New(b, o)
	if err != nil {
		return err
	}
	d.control.Handle("/api/", srv.TrustedHandler())
	d.Log.Observe(srv.ObserveAppend)
	if cfg.Admin.Listen != "" {
		if err := srv.Listen(o); err != nil {
			return err
		}
	}
	d.admin = srv
	return nil
}

// AdminAddr is the admin server's address, nil when it is not served.
func (d *Daemon) AdminAddr() net.Addr {
	if d.admin == nil || d.admin.Addr() == nil {
		return nil
	}
	return d.admin.Addr()
}

func (d *Daemon) closeAdmin() {
	if d.admin != nil {
		d.Log.Observe(nil)
		d.admin.Close()
	}
}
