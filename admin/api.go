package admin

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// Backend is the running daemon as the admin API sees it.
type Backend interface {
	Daemon
	// UndoLog is the daemon's open undo log, for queries.
	UndoLog() *undolog.Log
	// Upstreams lists the servers undomail relays to, for health checks.
	Upstreams() []Upstream
	// Holding reports whether a rewind or cycle holds changes back.
	Holding() bool
	// PlanCycle says what a cycle would do; it changes nothing.
	PlanCycle(ctx context.Context, to string, cancel []int64) (*Plan, error)
	// CycleProgress is the running cycle's progress, or nil when none
	// runs.
	CycleProgress() *replay.Progress
}

// Upstream is a server undomail relays to.
type Upstream struct {
	Name string `json:"name"` // smtp, lmtp, imap
	Addr string `json:"addr"`
}

// Options configure the admin server.
type Options struct {
	// Listen is the TCP address; see CheckListen for what is refused.
	Listen string
	// DataDir holds the generated token (TokenName) when Token is empty.
	DataDir string
	// Token is the configured admin token; empty: generated.
	Token string
	// TLSCert and TLSKey serve HTTPS (PEM files).
	TLSCert, TLSKey string
	// AllowInsecureRemote allows plain HTTP on a non-loopback address.
	AllowInsecureRemote bool
	Logger              *slog.Logger
}

// Server is the admin HTTP server: the JSON API under /api/, the web
// timeline, /healthz and /metrics.
//
// The JSON API (Authorization: Bearer TOKEN, or a web session with its
// X-CSRF-Token on POSTs; on the control socket, no token):
//
//	GET  /api/status               upstreams, log, snapshots, gate, last cycle and drill, progress
//	GET  /api/verbs                one page: user kind since until after before order=desc limit q branch
//	GET  /api/verbs/{seq}          one verb with its outcome and message headers
//	GET  /api/snapshots            snapshots the log records
//	POST /api/snapshots?reason=    take one now
//	GET  /api/cycles               cycles with their verdicts and branches
//	GET  /api/cycles/plan?to=&cancel=1,2   what a cycle would do
//	POST /api/cycles[?wait=1]      run one ({"to","cancel","filters"}); 202, or the verdict
//	GET  /api/cycles/current       the cycle started here: request, progress, verdict
//	GET  /api/cycles/progress      the daemon's cycle progress (null when none runs)
//	GET  /api/drills               recovery drill verdicts
//	POST /api/drills?from=&to=     run a drill (default: the newest two snapshots); its verdict
//	GET  /api/compensations        one page of compensation messages (verb filters)
//	GET  /api/outbound             the outbound delay window (outbound.go); POST .../{id}/release, .../{id}/cancel
//
// /healthz needs no token; /metrics needs one (Prometheus:
// authorization.credentials_file pointing at admin.token).
type Server struct {
	b       Backend
	log     *undolog.Log
	logger  *slog.Logger
	auth    *auth
	mux     *http.ServeMux
	srv     *http.Server
	ln      net.Listener
	metrics *metrics
	web     *web
	run     cycleRun
	// timeouts are the HTTP server's (defaultTimeouts; tests shorten them).
	timeouts serverTimeouts
}

// trustedKey marks requests from the control socket: the socket's file
// mode already restricts it to the daemon's own user.
type trustedKey struct{}

// New prepares the admin server; Listen starts serving it.
func New(b Backend, o Options) (*Server, error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	tok := o.Token
	if tok == "" {
		var err error
		if tok, err = EnsureToken(o.DataDir); err != nil {
			return nil, err
		}
	} else if len(tok) < 16 {
		return nil, errors.New("admin.token: shorter than 16 characters")
	}
	s := &Server{b: b, log: b.UndoLog(), logger: o.Logger, timeouts: defaultTimeouts,
		auth: &auth{token: tok, secure: o.TLSCert != "", sessions: map[string]*session{}}, mux: http.NewServeMux()}
	s.metrics = newMetrics(s)
	var err error
	if s.web, err = newWeb(s); err != nil {
		return nil, err
	}
	s.routes()
	return s, nil
}

// Listen starts serving on o.Listen and returns once it accepts
// connections.
func (s *Server) Listen(o Options) error {
	if err := CheckListen(o.Listen, o.TLSCert != "", o.AllowInsecureRemote); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", o.Listen)
	if err != nil {
		return fmt.Errorf("admin.listen %s: %w", o.Listen, err)
	}
	if o.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(o.TLSCert, o.TLSKey)
		if err != nil {
			ln.Close()
			return fmt.Errorf("admin.tls_cert/admin.tls_key: %w", err)
		}
		ln = tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
	}
	s.ln = ln
	s.srv = &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: s.timeouts.header,
		ReadTimeout:       s.timeouts.read,
		WriteTimeout:      s.timeouts.write,
		IdleTimeout:       s.timeouts.idle,
	}
	go func() {
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.logger.Error("admin server stopped", "err", err)
		}
	}()
	scheme := "http"
	if o.TLSCert != "" {
		scheme = "https"
	}
	s.logger.Info("admin serving", "url", scheme+"://"+ln.Addr().String()+"/")
	return nil
}

// ObserveAppend feeds the log write latency metric; install it with
// (*undolog.Log).Observe.
func (s *Server) ObserveAppend(recs []undolog.Record, wait time.Duration, durable bool, err error) {
	s.metrics.observeAppend(recs, wait, durable, err)
}

// Addr is the address the server listens on (nil before Listen).
func (s *Server) Addr() net.Addr {
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// Handler is the whole admin server, with authentication.
func (s *Server) Handler() http.Handler { return noSniff(s.mux) }

// noSniff tells browsers to take every response as the Content-Type it
// declares: a JSON answer that quotes user data (a mailbox name, a
// subject) must never be rendered as HTML.
func noSniff(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Content-Type-Options", "nosniff")
		h.ServeHTTP(w, r)
	})
}

// serverTimeouts bound a client's use of a connection: its headers, its
// whole request (a body trickled in byte by byte), writing the answer,
// and an idle keep-alive. Handlers that run for long (a snapshot, a
// drill, a cycle waited for) lift the last two with longRunning.
type serverTimeouts struct {
	header, read, write, idle time.Duration
}

var defaultTimeouts = serverTimeouts{header: 10 * time.Second, read: 30 * time.Second, write: time.Minute, idle: 2 * time.Minute}

// longRunning lifts the connection's read and write deadlines for a
// handler that may take longer than the server's timeouts (a snapshot
// waits for commands in flight, a drill or a waited-for cycle runs for
// minutes). The request body is read first, under the read deadline:
// a slow client still cannot hold the connection, only the work can.
// Without lifting the read deadline, its expiry would also cancel the
// request's context mid-run.
func longRunning(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Body != nil && r.Body != http.NoBody {
			body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 1<<20))
			if err != nil {
				code := http.StatusBadRequest
				if mbe := (*http.MaxBytesError)(nil); errors.As(err, &mbe) {
					code = http.StatusRequestEntityTooLarge
				}
				writeError(w, code, fmt.Errorf("read request body: %w", err))
				return
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
		}
		rc := http.NewResponseController(w)
		// Errors only mean the connection has no deadlines to lift
		// (httptest recorders, the control socket's own server).
		rc.SetReadDeadline(time.Time{})
		rc.SetWriteDeadline(time.Time{})
		h.ServeHTTP(w, r)
	})
}

// TrustedHandler serves the API without authentication, for the control
// socket, whose file mode admits only the daemon's user.
func (s *Server) TrustedHandler() http.Handler {
	return noSniff(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mux.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), trustedKey{}, true)))
	}))
}

// Close stops serving; a cycle started through the API runs on.
func (s *Server) Close() error {
	if s.srv == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return s.srv.Shutdown(ctx)
}

func (s *Server) routes() {
	m := s.mux
	m.HandleFunc("GET /healthz", s.handleHealth)
	m.Handle("GET /metrics", s.api(s.metrics.handler()))
	m.Handle("GET /api/status", s.api(http.HandlerFunc(s.handleStatus)))
	m.Handle("GET /api/verbs", s.api(http.HandlerFunc(s.handleVerbs)))
	m.Handle("GET /api/verbs/{seq}", s.api(http.HandlerFunc(s.handleVerb)))
	m.Handle("GET /api/snapshots", s.api(http.HandlerFunc(s.handleSnapshots)))
	m.Handle("POST /api/snapshots", s.api(longRunning(http.HandlerFunc(s.handleSnapshot))))
	m.Handle("GET /api/cycles", s.api(http.HandlerFunc(s.handleCycles)))
	m.Handle("GET /api/cycles/plan", s.api(http.HandlerFunc(s.handlePlan)))
	m.Handle("POST /api/cycles", s.api(longRunning(http.HandlerFunc(s.handleRunCycle))))
	m.Handle("GET /api/cycles/current", s.api(http.HandlerFunc(s.handleCurrent)))
	m.Handle("GET /api/cycles/progress", s.api(http.HandlerFunc(s.handleProgress)))
	m.Handle("GET /api/drills", s.api(http.HandlerFunc(s.handleDrills)))
	m.Handle("POST /api/drills", s.api(longRunning(http.HandlerFunc(s.handleRunDrill))))
	m.Handle("GET /api/compensations", s.api(http.HandlerFunc(s.handleCompensations)))
	s.web.routes(m)
	s.outboundRoutes(m) // outbound.go
}

// api requires the admin token (Authorization: Bearer) or a web session;
// with a session, state-changing requests need the session's CSRF token
// and a same-origin Origin.
func (s *Server) api(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Context().Value(trustedKey{}) != nil {
			h.ServeHTTP(w, r)
			return
		}
		if tok, ok := bearer(r); ok {
			if !s.auth.validToken(tok) {
				writeError(w, http.StatusUnauthorized, errors.New("wrong admin token"))
				return
			}
			if !safeMethod(r.Method) && !sameOrigin(r) {
				writeError(w, http.StatusForbidden, errors.New("cross-origin request refused"))
				return
			}
			h.ServeHTTP(w, r)
			return
		}
		sess := s.auth.session(r)
		if sess == nil {
			w.Header().Set("WWW-Authenticate", `Bearer realm="undomail"`)
			writeError(w, http.StatusUnauthorized, errors.New("admin token required (Authorization: Bearer, see "+TokenName+" in the data directory)"))
			return
		}
		if !safeMethod(r.Method) && !csrfOK(r, sess) {
			writeError(w, http.StatusForbidden, errors.New("CSRF check failed: missing or wrong X-CSRF-Token, or cross-origin request"))
			return
		}
		h.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func writeError(w http.ResponseWriter, code int, err error) {
	writeJSON(w, code, map[string]string{"error": err.Error()})
}

// Status is the answer to GET /api/status.
type Status struct {
	Time      time.Time        `json:"time"`
	Upstreams []UpstreamHealth `json:"upstreams"`
	Log       LogStatus        `json:"log"`
	Snapshots int              `json:"snapshots"`
	// LastSnapshot is the newest snapshot, nil if none.
	LastSnapshot *Snapshot `json:"last_snapshot,omitempty"`
	// Gate is "open", or "held" while a rewind or cycle holds changes back.
	Gate      string `json:"gate,omitempty"`
	LastCycle *Cycle `json:"last_cycle,omitempty"`
	LastDrill *Drill `json:"last_drill,omitempty"`
	// Progress is the running cycle's progress, if one runs.
	Progress *replay.Progress `json:"progress,omitempty"`
	// Outbound is the outbound delay window, when it is on (outbound.go).
	Outbound *OutboundList `json:"outbound,omitempty"`
}

// UpstreamHealth says whether an upstream accepts connections.
type UpstreamHealth struct {
	Upstream
	OK        bool    `json:"ok"`
	Error     string  `json:"error,omitempty"`
	ConnectMS float64 `json:"connect_ms"`
}

// LogStatus describes the undo log.
type LogStatus struct {
	Dir       string `json:"dir"`
	Records   int64  `json:"records"` // = the head's seq: records have no gaps
	Head      string `json:"head"`    // the head record's sum, hex
	SizeBytes int64  `json:"size_bytes"`
	// Error is why the log refuses appends (clients get temporary
	// failures until it is repaired); empty while it accepts them.
	Error string `json:"error,omitempty"`
}

// probeTimeout bounds an upstream health check.
const probeTimeout = 3 * time.Second

// probe connects to every upstream at once.
func probe(ctx context.Context, ups []Upstream) []UpstreamHealth {
	out := make([]UpstreamHealth, len(ups))
	var wg sync.WaitGroup
	for i, u := range ups {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h := UpstreamHealth{Upstream: u}
			start := time.Now()
			var d net.Dialer
			dctx, cancel := context.WithTimeout(ctx, probeTimeout)
			defer cancel()
			c, err := d.DialContext(dctx, "tcp", u.Addr)
			h.ConnectMS = float64(time.Since(start).Microseconds()) / 1000
			if err != nil {
				h.Error = err.Error()
			} else {
				h.OK = true
				c.Close()
			}
			out[i] = h
		}()
	}
	wg.Wait()
	return out
}

// status gathers the status; it reads only indexed ranges of the log.
func (s *Server) status(ctx context.Context) (Status, error) {
	st, err := LogState(ctx, s.log)
	st.Progress = s.b.CycleProgress()
	st.Gate = "open"
	if s.b.Holding() {
		st.Gate = "held"
	}
	st.Upstreams = probe(ctx, s.b.Upstreams())
	if ol := s.outboundList(); ol.On {
		st.Outbound = &ol
	}
	if ferr := s.log.Failed(); ferr != nil {
		st.Log.Error = ferr.Error()
	}
	return st, err
}

// LogState is the part of the status the undo log alone tells: what
// `undomail status` shows when no daemon runs. Gate and Upstreams are
// left empty.
func LogState(ctx context.Context, l *undolog.Log) (Status, error) {
	st := Status{Time: time.Now().UTC()}
	seq, sum := l.Last()
	st.Log = LogStatus{Dir: l.Dir(), Records: seq, Head: fmt.Sprintf("%x", sum), SizeBytes: l.Size()}
	snaps, err := Snapshots(ctx, l)
	if err != nil {
		return st, err
	}
	at := snapshotIndex(snaps)
	for _, sn := range snaps {
		if !sn.Pruned {
			st.Snapshots++
			sn := sn
			st.LastSnapshot = &sn
		}
	}
	if p, err := l.Page(ctx, undolog.PageQuery{Kinds: []string{verb.KindCycle}, Desc: true, Limit: 1}); err != nil {
		return st, err
	} else if len(p.Verbs) == 1 {
		c := cycleOf(p.Verbs[0], at)
		st.LastCycle = &c
	}
	if p, err := l.Page(ctx, undolog.PageQuery{Kinds: []string{verb.KindDrill}, Desc: true, Limit: 1}); err != nil {
		return st, err
	} else if len(p.Verbs) == 1 {
		ds, _ := drillsOf(p.Verbs)
		st.LastDrill = &ds[0]
	}
	return st, nil
}

// handleHealth answers 200 {"ok": true} while the undo log accepts
// appends and every upstream accepts connections, else 503 with what is
// wrong: a load balancer or monitor needs no token to ask. It says
// nothing about the mail itself.
func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	var problems []string
	if err := s.log.Failed(); err != nil {
		problems = append(problems, "undo log: "+err.Error())
	}
	for _, u := range probe(r.Context(), s.b.Upstreams()) {
		if !u.OK {
			problems = append(problems, fmt.Sprintf("upstream %s %s: %s", u.Name, u.Addr, u.Error))
		}
	}
	if len(problems) > 0 {
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{"ok": false, "problems": problems})
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"ok": true})
}

func (s *Server) handleStatus(w http.ResponseWriter, r *http.Request) {
	st, err := s.status(r.Context())
	if err != nil {
		writeError(w, http.StatusInternalServerError, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

// VerbPage is the answer to GET /api/verbs.
type VerbPage struct {
	Verbs []Verb `json:"verbs"`
	// Next is the cursor for the following page: pass it as after= (or
	// before= with order=desc); 0 when there is no more.
	Next int64 `json:"next,omitempty"`
}

// pageQuery reads the verb filters of a request:
//
//	user=alice kind=imap.delete,imap.expunge since=RFC3339 until=RFC3339
//	after=SEQ before=SEQ order=desc limit=N q=TEXT branch=CYCLE-SEQ
//
// A user given as a login also matches the addresses verbs were filed
// under with that login as local part (mail delivered to
// alice@example.org is alice's); exact=1 turns that off. branch selects
// a cycle's abandoned branch: the verbs between the snapshot it rewound
// to and the cycle itself.
func (s *Server) pageQuery(r *http.Request) (undolog.PageQuery, error) {
	v := r.URL.Query()
	q := undolog.PageQuery{User: v.Get("user"), Text: v.Get("q"), Desc: v.Get("order") == "desc"}
	if v.Get("exact") != "1" {
		addrs, err := s.log.Addresses(r.Context(), q.User)
		if err != nil {
			return q, err
		}
		q.Users = addrs
	}
	for _, k := range strings.Split(v.Get("kind"), ",") {
		if k = strings.TrimSpace(k); k != "" {
			q.Kinds = append(q.Kinds, k)
		}
	}
	var err error
	num := func(name string) int64 {
		if err != nil || v.Get(name) == "" {
			return 0
		}
		n, perr := strconv.ParseInt(v.Get(name), 10, 64)
		if perr != nil || n < 0 {
			err = fmt.Errorf("%s=%q is not a non-negative number", name, v.Get(name))
		}
		return n
	}
	q.AfterSeq, q.BeforeSeq, q.Limit = num("after"), num("before"), int(num("limit"))
	branch := num("branch")
	tm := func(name string) time.Time {
		if err != nil || v.Get(name) == "" {
			return time.Time{}
		}
		t, perr := time.Parse(time.RFC3339Nano, v.Get(name))
		if perr != nil {
			err = fmt.Errorf("%s=%q is not an RFC 3339 time", name, v.Get(name))
		}
		return t
	}
	q.Since, q.Until = tm("since"), tm("until")
	if err != nil {
		return q, err
	}
	if branch > 0 {
		c, err := s.cycle(r.Context(), branch)
		if err != nil {
			return q, err
		}
		q.AfterSeq = max(q.AfterSeq, c.AtSeq, c.SnapshotSeq)
		if q.BeforeSeq == 0 || q.BeforeSeq > c.Seq {
			q.BeforeSeq = c.Seq
		}
	}
	return q, nil
}

// cycle returns the cycle logged as record seq.
func (s *Server) cycle(ctx context.Context, seq int64) (Cycle, error) {
	v, ok, err := s.log.Verb(ctx, seq)
	if err != nil {
		return Cycle{}, err
	}
	if !ok || v.Kind != verb.KindCycle {
		return Cycle{}, fmt.Errorf("branch=%d: record %d is not a cycle", seq, seq)
	}
	snaps, err := Snapshots(ctx, s.log)
	if err != nil {
		return Cycle{}, err
	}
	return cycleOf(v, snapshotIndex(snaps)), nil
}

func (s *Server) verbs(ctx context.Context, q undolog.PageQuery) (VerbPage, error) {
	p, err := s.log.Page(ctx, q)
	if err != nil {
		return VerbPage{}, err
	}
	out := VerbPage{Verbs: make([]Verb, 0, len(p.Verbs)), Next: p.Next}
	for _, v := range p.Verbs {
		out.Verbs = append(out.Verbs, NewVerb(v))
	}
	return out, nil
}

func (s *Server) handleVerbs(w http.ResponseWriter, r *http.Request) {
	q, err := s.pageQuery(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	p, err := s.verbs(r.Context(), q)
	if err != nil {
		writeError(w, http.StatusInternalServerError, err)
		return
	}
	writeJSON(w, http.StatusOK, p)
}

func (s *Server) handleVerb(w http.ResponseWriter, r *http.Request) {
	seq, ok := parseSeq(r.PathValue("seq"))
	if !ok {
		writeError(w, http.StatusNotFound, fmt.Errorf("no verb %q in the undo log: sequence numbers start at 1", r.PathValue("seq")))
		return
	}
	v, ok, err := s.log.Verb(r.Context(), seq)
	if err != nil {
		writeError(w, http.StatusInternalServerError, err)
		return
	}
	if !ok {
		writeError(w, http.StatusNotFound, fmt.Errorf("no verb %d in the undo log", seq))
		return
	}
	writeJSON(w, http.StatusOK, NewVerb(v))
}

func (s *Server) handleSnapshots(w http.ResponseWriter, r *http.Request) {
	snaps, err := Snapshots(r.Context(), s.log)
	if err != nil {
		writeError(w, http.StatusInternalServerError, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"snapshots": nonNilSlice(snaps)})
}

func (s *Server) handleSnapshot(w http.ResponseWriter, r *http.Request) {
	reason := r.URL.Query().Get("reason")
	if reason == "" {
		reason = "on demand (admin)"
	}
	snap, pause, err := s.b.Snapshot(r.Context(), reason)
	rep := SnapshotReply{Name: snap.Name, AtSeq: snap.Seq, Created: snap.Created, PauseMS: float64(pause.Microseconds()) / 1000}
	if err != nil {
		rep.Error = err.Error()
		writeJSON(w, http.StatusServiceUnavailable, rep)
		return
	}
	writeJSON(w, http.StatusOK, rep)
}

func (s *Server) handleCycles(w http.ResponseWriter, r *http.Request) {
	snaps, err := Snapshots(r.Context(), s.log)
	if err != nil {
		writeError(w, http.StatusInternalServerError, err)
		return
	}
	cs, err := Cycles(r.Context(), s.log, snaps)
	if err != nil {
		writeError(w, http.StatusInternalServerError, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"cycles": nonNilSlice(cs)})
}

// parseSeq reads one log position from a URL path. The log numbers its
// records from 1; zero, negative and non-numeric positions name nothing.
func parseSeq(s string) (int64, bool) {
	n, err := strconv.ParseInt(s, 10, 64)
	return n, err == nil && n > 0
}

// ParseSeqs reads a list of log positions, "812,815".
func ParseSeqs(s string) ([]int64, error) {
	var out []int64
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.ParseInt(f, 10, 64)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("%q is not a sequence number", f)
		}
		out = append(out, n)
	}
	return out, nil
}

func (s *Server) handlePlan(w http.ResponseWriter, r *http.Request) {
	cancel, err := ParseSeqs(r.URL.Query().Get("cancel"))
	if err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	p, err := s.b.PlanCycle(r.Context(), r.URL.Query().Get("to"), cancel)
	if err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	writeJSON(w, http.StatusOK, p)
}

// cycleRun is the cycle started through the admin, if any.
type cycleRun struct {
	mu      sync.Mutex
	running bool
	state   RunState
	done    chan struct{}
}

// RunState is the answer to GET /api/cycles/current.
type RunState struct {
	Running  bool             `json:"running"`
	Started  time.Time        `json:"started,omitzero"`
	Finished time.Time        `json:"finished,omitzero"`
	Request  CycleRequest     `json:"request"`
	Verdict  *CycleVerdict    `json:"verdict,omitempty"`
	Error    string           `json:"error,omitempty"`
	Progress *replay.Progress `json:"progress,omitempty"`
}

// startCycle runs a cycle in the background; it outlives the request.
func (s *Server) startCycle(req CycleRequest) (chan struct{}, error) {
	s.run.mu.Lock()
	defer s.run.mu.Unlock()
	if s.run.running {
		return nil, errors.New("a cycle started through the admin is still running")
	}
	done := make(chan struct{})
	s.run.running, s.run.done = true, done
	s.run.state = RunState{Running: true, Started: time.Now().UTC(), Request: req}
	s.logger.Warn("cycle started through the admin", "to", req.To, "cancel", req.Cancel)
	go func() {
		out, err := s.b.Cycle(context.Background(), req)
		s.run.mu.Lock()
		s.run.running = false
		s.run.state.Running, s.run.state.Finished, s.run.state.Verdict = false, time.Now().UTC(), &out
		if err != nil {
			s.run.state.Error = err.Error()
		}
		s.run.mu.Unlock()
		close(done)
	}()
	return done, nil
}

func (s *Server) runState() RunState {
	s.run.mu.Lock()
	st := s.run.state
	s.run.mu.Unlock()
	if st.Running {
		st.Progress = s.b.CycleProgress()
	}
	return st
}

// handleRunCycle starts a cycle: 202 with the run's state, or with wait=1
// the verdict once it ends, as on the control socket ({"outcome": ...,
// "error": ...}).
func (s *Server) handleRunCycle(w http.ResponseWriter, r *http.Request) {
	var req CycleRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, fmt.Errorf("bad cycle request: %w", err))
		return
	}
	if _, err := s.b.PlanCycle(r.Context(), req.To, req.Cancel); err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	done, err := s.startCycle(req)
	if err != nil {
		writeError(w, http.StatusConflict, err)
		return
	}
	if r.URL.Query().Get("wait") != "1" {
		writeJSON(w, http.StatusAccepted, s.runState())
		return
	}
	select {
	case <-done:
	case <-r.Context().Done():
		return
	}
	st := s.runState()
	if st.Error != "" {
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{"error": st.Error, "outcome": st.Verdict})
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"outcome": st.Verdict})
}

func (s *Server) handleCurrent(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.runState())
}

func (s *Server) handleProgress(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.b.CycleProgress())
}

func (s *Server) handleDrills(w http.ResponseWriter, r *http.Request) {
	ds, err := Drills(r.Context(), s.log)
	if err != nil {
		writeError(w, http.StatusInternalServerError, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"drills": nonNilSlice(ds)})
}

// runDrill runs a drill between two snapshots (both empty: the newest
// pair) and returns its verdict.
func (s *Server) runDrill(ctx context.Context, from, to string) (verb.DrillVerdict, error) {
	s.logger.Info("drill started through the admin", "from", from, "to", to)
	return s.b.Drill(ctx, from, to)
}

// handleRunDrill runs a drill (from=, to=) and answers its verdict as
// the control socket does ({"outcome": ..., "error": ...}).
func (s *Server) handleRunDrill(w http.ResponseWriter, r *http.Request) {
	out, err := s.runDrill(r.Context(), r.URL.Query().Get("from"), r.URL.Query().Get("to"))
	if err != nil {
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{"error": err.Error(), "outcome": out})
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"outcome": out})
}

// handleCompensations pages through the compensations, with the verb
// filters (user, since, until, after, before, order, limit, q).
func (s *Server) handleCompensations(w http.ResponseWriter, r *http.Request) {
	q, err := s.pageQuery(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	q.Kinds = []string{verb.KindCompensation}
	p, err := s.verbs(r.Context(), q)
	if err != nil {
		writeError(w, http.StatusInternalServerError, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"compensations": p.Verbs, "next": p.Next})
}

func nonNilSlice[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}
