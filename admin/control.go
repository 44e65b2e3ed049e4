// Package admin serves undomail's operator interface: the control socket
// (HTTP on a Unix socket in the data directory, readable and writable by
// the daemon's own user only, through which the CLI asks the running
// daemon to act), and the admin server (api.go: a JSON API, the web
// timeline, /healthz and /metrics over TCP, with a token). The socket
// serves the same JSON API under /api/, authenticated by its file mode.
package admin

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/timetravel"
	"github.com/undomail/undomail/verb"
)

// SocketName is the control socket's file name in the data directory.
const SocketName = "control.sock"

// Daemon is what the control socket drives.
type Daemon interface {
	// Snapshot takes a consistent snapshot.
	Snapshot(ctx context.Context, reason string) (timetravel.Snapshot, time.Duration, error)
	// Rewind rolls the mail store back to a snapshot.
	Rewind(ctx context.Context, snapshot string, hold bool) (verb.RewindOutcome, error)
	// Replay ends a held rewind.
	Replay(ctx context.Context, cancel []int64) (replay.Result, error)
	// Cycle runs a 3R cycle.
	Cycle(ctx context.Context, req CycleRequest) (CycleVerdict, error)
	// Drill runs a recovery drill between two snapshots (both empty:
	// the newest pair).
	Drill(ctx context.Context, from, to string) (verb.DrillVerdict, error)
	// Filters lists the filters cycles kept active for live mail;
	// RemoveFilters stops the ones a cycle kept.
	Filters() []replay.KeptFilter
	RemoveFilters(ctx context.Context, cycle int64) error
	// PruneLog removes the log before a snapshot (archive: a file the
	// daemon writes what it removes to, "" for none).
	PruneLog(ctx context.Context, before, archive string) (PruneReply, error)
}

// Control is a running control socket.
type Control struct {
	srv *http.Server
	ln  net.Listener
	mux *http.ServeMux
}

// Handle serves more of the daemon on the socket (the admin API).
func (c *Control) Handle(pattern string, h http.Handler) { c.mux.Handle(pattern, h) }

// ServeControl listens on DIR/control.sock. A stale socket of a daemon
// that died is replaced; a live one (another daemon on the same data
// directory) is an error.
func ServeControl(dataDir string, s Daemon, logger *slog.Logger) (*Control, error) {
	path := filepath.Join(dataDir, SocketName)
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("control socket %s: another undomail is serving this data directory", path)
	}
	os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /snapshots", func(w http.ResponseWriter, r *http.Request) {
		reason := r.URL.Query().Get("reason")
		if reason == "" {
			reason = "on demand"
		}
		snap, pause, err := s.Snapshot(r.Context(), reason)
		rep := SnapshotReply{Name: snap.Name, AtSeq: snap.Seq, Created: snap.Created, PauseMS: float64(pause.Microseconds()) / 1000}
		w.Header().Set("Content-Type", "application/json")
		if err != nil {
			rep.Error = err.Error()
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		json.NewEncoder(w).Encode(rep)
	})
	mux.HandleFunc("POST /rewind", func(w http.ResponseWriter, r *http.Request) {
		out, err := s.Rewind(r.Context(), r.URL.Query().Get("snapshot"), r.URL.Query().Get("hold") == "1")
		writeOutcome(w, out, err)
	})
	mux.HandleFunc("POST /replay", func(w http.ResponseWriter, r *http.Request) {
		var req CycleRequest
		if r.ContentLength > 0 {
			if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
				http.Error(w, "bad replay request: "+err.Error(), http.StatusBadRequest)
				return
			}
		}
		out, err := s.Replay(r.Context(), req.Cancel)
		writeOutcome(w, out, err)
	})
	mux.HandleFunc("POST /cycles", func(w http.ResponseWriter, r *http.Request) {
		var req CycleRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			http.Error(w, "bad cycle request: "+err.Error(), http.StatusBadRequest)
			return
		}
		out, err := s.Cycle(r.Context(), req)
		writeOutcome(w, out, err)
	})
	mux.HandleFunc("POST /drills", func(w http.ResponseWriter, r *http.Request) {
		out, err := s.Drill(r.Context(), r.URL.Query().Get("from"), r.URL.Query().Get("to"))
		writeOutcome(w, out, err)
	})
	mux.HandleFunc("POST /log/prune", func(w http.ResponseWriter, r *http.Request) {
		out, err := s.PruneLog(r.Context(), r.URL.Query().Get("before"), r.URL.Query().Get("archive"))
		writeOutcome(w, out, err)
	})
	mux.HandleFunc("GET /filters", func(w http.ResponseWriter, r *http.Request) {
		writeOutcome(w, s.Filters(), nil)
	})
	mux.HandleFunc("POST /filters/remove", func(w http.ResponseWriter, r *http.Request) {
		cycle, err := strconv.ParseInt(r.URL.Query().Get("cycle"), 10, 64)
		if err != nil {
			http.Error(w, "cycle: want the sequence number of the cycle that kept the filters", http.StatusBadRequest)
			return
		}
		writeOutcome(w, nil, s.RemoveFilters(r.Context(), cycle))
	})
	c := &Control{srv: &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}, ln: ln, mux: mux}
	go func() {
		if err := c.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			logger.Error("control socket stopped", "err", err)
		}
	}()
	return c, nil
}

// writeOutcome answers {"outcome": ...} or, with 503, {"error": ...,
// "outcome": ...}: a failed repair still reports how far it got.
func writeOutcome(w http.ResponseWriter, out any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		w.WriteHeader(http.StatusServiceUnavailable)
		json.NewEncoder(w).Encode(map[string]any{"error": err.Error(), "outcome": out})
		return
	}
	json.NewEncoder(w).Encode(map[string]any{"outcome": out})
}

// Close stops the control socket.
func (c *Control) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return c.srv.Shutdown(ctx)
}

// Client talks to a running daemon: through its control socket (Dial),
// or through the admin server with a token (DialRemote).
type Client struct {
	http   *http.Client
	path   string // the socket, or the admin URL
	base   string // URL prefix of requests
	token  string // admin token, remote only
	remote bool
}

// Dial returns a client for the daemon serving dataDir, or an error that
// says no daemon is running there.
func Dial(dataDir string) (*Client, error) {
	path := filepath.Join(dataDir, SocketName)
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return nil, fmt.Errorf("no undomail serve running with data directory %s (control socket %s: %v)", dataDir, path, err)
	}
	c.Close()
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}}
	return &Client{http: &http.Client{Transport: tr}, path: path, base: "http://undomail"}, nil
}

// DialRemote returns a client for the admin server at baseURL
// ("https://mail.example.org:8025") authenticating with token. Its
// certificate is verified against roots, or the system's roots if nil.
func DialRemote(baseURL, token string, roots *x509.CertPool) *Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	return &Client{http: &http.Client{Transport: tr}, path: baseURL, base: strings.TrimRight(baseURL, "/"), token: token, remote: true}
}

// Snapshot asks the daemon for a snapshot now.
func (c *Client) Snapshot(ctx context.Context, reason string) (SnapshotReply, error) {
	var rep SnapshotReply
	path := "/snapshots"
	if c.remote {
		path = "/api/snapshots"
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base+path+"?reason="+url.QueryEscape(reason), nil)
	if err != nil {
		return rep, err
	}
	resp, err := c.do(req)
	if err != nil {
		return rep, err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&rep); err != nil {
		return rep, fmt.Errorf("control socket %s: bad reply: %w", c.path, err)
	}
	if rep.Error != "" {
		return rep, errors.New(rep.Error)
	}
	return rep, nil
}

// Rewind asks the daemon to roll the mail store back to a snapshot and
// returns the rewind's outcome.
func (c *Client) Rewind(ctx context.Context, snapshot string, hold bool) (verb.RewindOutcome, error) {
	var out verb.RewindOutcome
	if c.remote {
		return out, errors.New("rewind: only on the daemon's machine (control socket)")
	}
	q := "/rewind?snapshot=" + url.QueryEscape(snapshot)
	if hold {
		q += "&hold=1"
	}
	return out, c.post(ctx, q, nil, &out)
}

// Replay ends a held rewind: the daemon replays the changes since the
// snapshot, all but cancel, and lets changes through again.
func (c *Client) Replay(ctx context.Context, cancel []int64) (replay.Result, error) {
	var res replay.Result
	if c.remote {
		return res, errors.New("replay: only on the daemon's machine (control socket)")
	}
	b, _ := json.Marshal(CycleRequest{Cancel: cancel})
	return res, c.post(ctx, "/replay", b, &res)
}

// Cycle asks the daemon to run a 3R cycle and returns its verdict; a
// cycle that is not OK returns its verdict with the error.
func (c *Client) Cycle(ctx context.Context, req CycleRequest) (CycleVerdict, error) {
	var v CycleVerdict
	b, _ := json.Marshal(req)
	path := "/cycles"
	if c.remote {
		path = "/api/cycles?wait=1"
	}
	return v, c.post(ctx, path, b, &v)
}

// Drill asks the daemon to run a recovery drill and returns its verdict.
func (c *Client) Drill(ctx context.Context, from, to string) (verb.DrillVerdict, error) {
	var v verb.DrillVerdict
	q := "?from=" + url.QueryEscape(from) + "&to=" + url.QueryEscape(to)
	path := "/drills" + q
	if c.remote {
		path = "/api/drills" + q
	}
	return v, c.post(ctx, path, nil, &v)
}

// Filters lists the filters kept active for live mail.
func (c *Client) Filters(ctx context.Context) ([]replay.KeptFilter, error) {
	if c.remote {
		return nil, errors.New("filters: only on the daemon's machine (control socket)")
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/filters", nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var rep struct {
		Outcome []replay.KeptFilter `json:"outcome"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&rep); err != nil {
		return nil, fmt.Errorf("control socket %s: bad reply (%s): %w", c.path, resp.Status, err)
	}
	return rep.Outcome, nil
}

// Prune asks the daemon to remove the log before a snapshot.
func (c *Client) Prune(ctx context.Context, before, archive string) (PruneReply, error) {
	var rep PruneReply
	if c.remote {
		return rep, errors.New("prune: only on the daemon's machine (control socket)")
	}
	return rep, c.post(ctx, "/log/prune?before="+url.QueryEscape(before)+"&archive="+url.QueryEscape(archive), nil, &rep)
}

// RemoveFilters stops the live filters a cycle kept.
func (c *Client) RemoveFilters(ctx context.Context, cycle int64) error {
	if c.remote {
		return errors.New("filters: only on the daemon's machine (control socket)")
	}
	return c.post(ctx, "/filters/remove?cycle="+strconv.FormatInt(cycle, 10), nil, nil)
}

// post sends a request whose reply is {"outcome": ..., "error": ...}
// and decodes the outcome into out (nil: it is not read). A failed
// action's outcome is decoded too: it says how far the action got.
func (c *Client) post(ctx context.Context, path string, body []byte, out any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var rep struct {
		Error   string          `json:"error"`
		Outcome json.RawMessage `json:"outcome"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&rep); err != nil {
		return fmt.Errorf("control socket %s: bad reply (%s): %w", c.path, resp.Status, err)
	}
	var derr error
	if out != nil && len(rep.Outcome) > 0 && string(rep.Outcome) != "null" {
		if err := json.Unmarshal(rep.Outcome, out); err != nil {
			derr = fmt.Errorf("control socket %s: bad outcome (%s): %w", c.path, resp.Status, err)
		}
	}
	if rep.Error != "" {
		return errors.Join(errors.New(rep.Error), derr)
	}
	return derr
}
