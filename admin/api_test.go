package admin

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/timetravel"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// fakeDaemon is a Backend over a real undo log: the admin reads the log
// as it would in production; the daemon's actions are recorded.
type fakeDaemon struct {
	l        *undolog.Log
	ups      []Upstream
	cycles   []CycleRequest
	snapshot int
	// delay makes cycles and drills take this long, as real ones do.
	delay time.Duration
}

// work takes f.delay, or fails when ctx ends first.
func (f *fakeDaemon) work(ctx context.Context) error {
	select {
	case <-time.After(f.delay):
		return nil
	case <-ctx.Done():
		return fmt.Errorf("fake daemon: cancelled after starting: %w", ctx.Err())
	}
}

func (f *fakeDaemon) Snapshot(ctx context.Context, reason string) (timetravel.Snapshot, time.Duration, error) {
	f.snapshot++
	name := fmt.Sprintf("snap-%d", f.snapshot)
	at, _ := f.l.Last()
	if err := logSnapshot(ctx, f.l, name, at); err != nil {
		return timetravel.Snapshot{}, 0, err
	}
	return timetravel.Snapshot{Name: name, Seq: at}, time.Millisecond, nil
}
func (f *fakeDaemon) Rewind(context.Context, string, bool) (verb.RewindOutcome, error) {
	return verb.RewindOutcome{}, nil
}
func (f *fakeDaemon) Replay(context.Context, []int64) (replay.Result, error) {
	return replay.Result{}, nil
}
func (f *fakeDaemon) Cycle(ctx context.Context, req CycleRequest) (CycleVerdict, error) {
	f.cycles = append(f.cycles, req)
	if err := f.work(ctx); err != nil {
		return CycleVerdict{}, err
	}
	return CycleVerdict{OK: true, Replayed: 3, Cancelled: 1}, nil
}
func (f *fakeDaemon) Drill(ctx context.Context, from, to string) (verb.DrillVerdict, error) {
	if err := f.work(ctx); err != nil {
		return verb.DrillVerdict{}, err
	}
	v := verb.DrillVerdict{DrillResult: verb.DrillResult{OK: true, From: from, To: to}}
	out, _ := json.Marshal(v)
	return v, f.l.Append(ctx, &undolog.Record{Kind: verb.KindDrill, Session: "drill", Outcome: out})
}
func (f *fakeDaemon) Filters() []replay.KeptFilter                     { return nil }
func (f *fakeDaemon) RemoveFilters(ctx context.Context, c int64) error { return nil }
func (f *fakeDaemon) PruneLog(ctx context.Context, before, archive string) (PruneReply, error) {
	return PruneReply{}, errors.New("the fake daemon does not prune")
}
func (f *fakeDaemon) UndoLog() *undolog.Log { return f.l }
func (f *fakeDaemon) Upstreams() []Upstream { return f.ups }
func (f *fakeDaemon) Holding() bool         { return false }
func (f *fakeDaemon) PlanCycle(ctx context.Context, to string, cancel []int64) (*Plan, error) {
	if to == "" {
		return nil, fmt.Errorf("no snapshot given")
	}
	return &Plan{To: to}, nil
}
func (f *fakeDaemon) CycleProgress() *replay.Progress { return nil }

func logSnapshot(ctx context.Context, l *undolog.Log, name string, at int64) error {
	args, _ := json.Marshal(verb.SnapshotArgs{Name: name, AtSeq: at, Reason: "test"})
	r := &undolog.Record{Kind: verb.KindSnapshot, Session: "daemon", Args: args}
	if err := l.Append(ctx, r); err != nil {
		return err
	}
	return l.Append(ctx, &undolog.Record{Kind: undolog.KindOutcome, Session: "daemon", Ref: r.Seq, Outcome: []byte(`{"ok":true,"pause_ms":1.5}`)})
}

// imapVerb logs an IMAP verb by user with an OK outcome.
func imapVerb(t *testing.T, l *undolog.Log, user, kind, mailbox string) int64 {
	t.Helper()
	args, _ := json.Marshal(verb.IMAPArgs{Command: strings.ToUpper(strings.TrimPrefix(kind, "imap.")), Mailbox: mailbox})
	r := &undolog.Record{Kind: kind, User: user, Session: "s-" + user, Users: []string{user}, Args: args}
	ctx := context.Background()
	if err := l.Append(ctx, r); err != nil {
		t.Fatal(err)
	}
	if err := l.Append(ctx, &undolog.Record{Kind: undolog.KindOutcome, User: user, Session: "s-" + user, Ref: r.Seq, Outcome: []byte(`{"status":"OK"}`)}); err != nil {
		t.Fatal(err)
	}
	return r.Seq
}

type testServer struct {
	*httptest.Server
	f     *fakeDaemon
	token string
	dir   string
}

func newTestServer(t *testing.T) *testServer {
	t.Helper()
	dir := t.TempDir()
	l, err := undolog.Open(filepath.Join(dir, "undo"), undolog.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	f := &fakeDaemon{l: l}
	s, err := New(f, Options{DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	l.Observe(s.ObserveAppend)
	tok, err := ReadToken(dir)
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.Handler())
	t.Cleanup(ts.Close)
	return &testServer{Server: ts, f: f, token: tok, dir: dir}
}

// do sends a request with the given bearer token ("" for none).
func (ts *testServer) do(t *testing.T, method, path, token string, body io.Reader) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest(method, ts.URL+path, body)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

func TestTokenFile(t *testing.T) {
	ts := newTestServer(t)
	fi, err := os.Stat(filepath.Join(ts.dir, TokenName))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("%s has mode %v, want 0600", TokenName, fi.Mode().Perm())
	}
	again, err := EnsureToken(ts.dir)
	if err != nil || again != ts.token {
		t.Fatalf("second start got token %q (%v), want the first one kept", again, err)
	}
	os.Chmod(filepath.Join(ts.dir, TokenName), 0o644)
	if _, err := ReadToken(ts.dir); err == nil {
		t.Fatal("a world-readable token file was accepted")
	}
}

func TestAuthRequired(t *testing.T) {
	ts := newTestServer(t)
	for _, path := range []string{"/api/status", "/api/verbs", "/api/verbs/1", "/api/snapshots", "/api/cycles", "/api/drills", "/api/compensations", "/api/cycles/progress", "/metrics"} {
		if resp, body := ts.do(t, "GET", path, "", nil); resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("GET %s without a token: %s %s, want 401", path, resp.Status, body)
		}
		if resp, body := ts.do(t, "GET", path, "not-"+ts.token, nil); resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("GET %s with a wrong token: %s %s, want 401", path, resp.Status, body)
		}
	}
	if resp, _ := ts.do(t, "POST", "/api/cycles", "", strings.NewReader(`{"to":"x"}`)); resp.StatusCode != http.StatusUnauthorized || len(ts.f.cycles) != 0 {
		t.Fatalf("POST /api/cycles without a token: %s, %d cycles run", resp.Status, len(ts.f.cycles))
	}
	if resp, body := ts.do(t, "GET", "/api/status", ts.token, nil); resp.StatusCode != http.StatusOK || !strings.Contains(body, `"gate": "open"`) {
		t.Fatalf("GET /api/status with the token: %s %s", resp.Status, body)
	}
	if resp, _ := ts.do(t, "GET", "/healthz", "", nil); resp.StatusCode != http.StatusOK {
		t.Fatalf("/healthz without a token: %s, want 200", resp.Status)
	}
	// An upstream that refuses connections makes /healthz say so.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts.f.ups = []Upstream{{Name: "imap", Addr: ln.Addr().String()}}
	if resp, body := ts.do(t, "GET", "/healthz", "", nil); resp.StatusCode != http.StatusOK {
		t.Fatalf("/healthz with the upstream up: %s %s", resp.Status, body)
	}
	ln.Close()
	if resp, body := ts.do(t, "GET", "/healthz", "", nil); resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(body, "upstream imap") {
		t.Fatalf("/healthz with the upstream down: %s %s, want 503 naming it", resp.Status, body)
	}
	ts.f.ups = nil
	// The web pages send a browser without a session to the login form.
	c := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := c.Get(ts.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if loc := resp.Header.Get("Location"); resp.StatusCode != http.StatusSeeOther || !strings.HasPrefix(loc, "/login") {
		t.Fatalf("GET / without a session: %s to %q, want a redirect to /login", resp.Status, loc)
	}
}

// browser logs in through the form and returns a client with the session
// cookie and the session's CSRF token (from a page's hidden field).
func (ts *testServer) browser(t *testing.T) (*http.Client, string) {
	t.Helper()
	jar, _ := cookiejar.New(nil)
	c := &http.Client{Jar: jar}
	req, _ := http.NewRequest("POST", ts.URL+"/login", strings.NewReader(url.Values{"token": {"wrong-token-wrong-token"}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("login with a wrong token: %s, want 401", resp.Status)
	}
	req, _ = http.NewRequest("POST", ts.URL+"/login", strings.NewReader(url.Values{"token": {ts.token}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Origin", ts.URL)
	resp, err = c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("login: %s", resp.Status)
	}
	var cookie *http.Cookie
	u, _ := url.Parse(ts.URL)
	for _, ck := range resp.Request.Response.Cookies() {
		if ck.Name == SessionCookie {
			cookie = ck
		}
	}
	if cookie == nil || !cookie.HttpOnly || cookie.SameSite != http.SameSiteStrictMode || len(jar.Cookies(u)) != 1 {
		t.Fatalf("session cookie %+v: want HttpOnly, SameSite=Strict", cookie)
	}
	m := regexp.MustCompile(`name="csrf" value="([0-9a-f]+)"`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("no CSRF token in the timeline page:\n%s", b)
	}
	return c, string(m[1])
}

func TestCSRF(t *testing.T) {
	ts := newTestServer(t)
	c, csrf := ts.browser(t)
	post := func(path, csrfHeader, origin, body, ctype string) int {
		req, _ := http.NewRequest("POST", ts.URL+path, strings.NewReader(body))
		if csrfHeader != "" {
			req.Header.Set("X-CSRF-Token", csrfHeader)
		}
		if origin != "" {
			req.Header.Set("Origin", origin)
		}
		req.Header.Set("Content-Type", ctype)
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	const js = "application/json"
	const form = "application/x-www-form-urlencoded"
	if code := post("/api/snapshots", "", ts.URL, "", js); code != http.StatusForbidden {
		t.Errorf("POST /api/snapshots with the cookie but no CSRF token: %d, want 403", code)
	}
	wrong := "0" + csrf[1:]
	if wrong == csrf {
		wrong = "1" + csrf[1:]
	}
	if code := post("/api/snapshots", wrong, ts.URL, "", js); code != http.StatusForbidden {
		t.Errorf("POST /api/snapshots with a wrong CSRF token: %d, want 403", code)
	}
	if code := post("/api/snapshots", csrf, "https://evil.example", "", js); code != http.StatusForbidden {
		t.Errorf("POST /api/snapshots from another origin: %d, want 403", code)
	}
	if code := post("/cycles/run", "", ts.URL, url.Values{"to": {"snap-1"}, "confirm": {"yes"}}.Encode(), form); code != http.StatusForbidden {
		t.Errorf("form POST /cycles/run without the csrf field: %d, want 403", code)
	}
	if ts.f.snapshot != 0 || len(ts.f.cycles) != 0 {
		t.Fatalf("refused requests acted: %d snapshots, %d cycles", ts.f.snapshot, len(ts.f.cycles))
	}
	if code := post("/api/snapshots", csrf, ts.URL, "", js); code != http.StatusOK || ts.f.snapshot != 1 {
		t.Fatalf("POST /api/snapshots with the CSRF token: %d, %d snapshots", code, ts.f.snapshot)
	}
	if code := post("/snapshots/take", "", ts.URL, url.Values{"reason": {"before the upgrade"}}.Encode(), form); code != http.StatusForbidden || ts.f.snapshot != 1 {
		t.Fatalf("snapshot form without the csrf field: %d, %d snapshots", code, ts.f.snapshot)
	}
	if code := post("/snapshots/take", "", ts.URL, url.Values{"reason": {"before the upgrade"}, "csrf": {csrf}}.Encode(), form); code != http.StatusOK || ts.f.snapshot != 2 {
		t.Fatalf("snapshot form: %d, %d snapshots", code, ts.f.snapshot)
	}
	// A form without the confirmation box runs nothing; with it, it does.
	if code := post("/cycles/run", "", ts.URL, url.Values{"to": {"snap-1"}, "csrf": {csrf}}.Encode(), form); code != http.StatusOK || len(ts.f.cycles) != 0 {
		t.Fatalf("unconfirmed cycle: %d, %d cycles run", code, len(ts.f.cycles))
	}
	if code := post("/cycles/run", "", ts.URL, url.Values{"to": {"snap-1"}, "cancel": {"3"}, "csrf": {csrf}, "confirm": {"yes"}}.Encode(), form); code != http.StatusOK {
		t.Fatalf("confirmed cycle: %d", code)
	}
	for deadline := time.Now().Add(10 * time.Second); ; {
		if resp, body := ts.do(t, "GET", "/api/cycles/current", ts.token, nil); resp.StatusCode == 200 && strings.Contains(body, `"replayed": 3`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the confirmed cycle did not finish")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(ts.f.cycles) != 1 || ts.f.cycles[0].To != "snap-1" || fmt.Sprint(ts.f.cycles[0].Cancel) != "[3]" {
		t.Fatalf("cycles run: %v", ts.f.cycles)
	}
}

func TestVerbsPagingAndFilters(t *testing.T) {
	ts := newTestServer(t)
	l := ts.f.l
	ctx := context.Background()
	var alice []int64
	for i := 0; i < 5; i++ {
		alice = append(alice, imapVerb(t, l, "alice", "imap.create", fmt.Sprintf("F%d", i)))
		imapVerb(t, l, "bob", "imap.create", fmt.Sprintf("G%d", i))
	}
	at, _ := l.Last()
	if err := logSnapshot(ctx, l, "before", at); err != nil {
		t.Fatal(err)
	}
	del := imapVerb(t, l, "alice", "imap.delete", "Projects")
	bobDel := imapVerb(t, l, "bob", "imap.delete", "Old")
	args, _ := json.Marshal(verb.CycleArgs{To: "before", Cancel: []int64{del}})
	cyc := &undolog.Record{Kind: verb.KindCycle, Session: "cycle", Args: args}
	if err := l.Append(ctx, cyc); err != nil {
		t.Fatal(err)
	}
	imapVerb(t, l, "alice", "imap.create", "After")

	get := func(q string) VerbPage {
		t.Helper()
		resp, body := ts.do(t, "GET", "/api/verbs?"+q, ts.token, nil)
		if resp.StatusCode != 200 {
			t.Fatalf("GET /api/verbs?%s: %s %s", q, resp.Status, body)
		}
		var p VerbPage
		if err := json.Unmarshal([]byte(body), &p); err != nil {
			t.Fatal(err)
		}
		return p
	}
	seqs := func(vs []Verb) (out []int64) {
		for _, v := range vs {
			out = append(out, v.Seq)
		}
		return out
	}
	// alice's creations, two per page, following the cursor.
	var got []int64
	q := "user=alice&kind=imap.create&limit=2"
	for p := get(q); ; p = get(fmt.Sprintf("%s&after=%d", q, p.Next)) {
		for _, v := range p.Verbs {
			if v.User != "alice" || v.Kind != "imap.create" || v.Result != "OK" {
				t.Fatalf("verb %+v does not match user=alice kind=imap.create, or lacks its outcome", v)
			}
		}
		got = append(got, seqs(p.Verbs)...)
		if p.Next == 0 {
			break
		}
	}
	want := append(alice, got[len(got)-1])
	if fmt.Sprint(got) != fmt.Sprint(want) || len(got) != 6 {
		t.Fatalf("alice's creations page by page: %v, want %v", got, want)
	}
	// The cycle's abandoned branch: the two deletes, nothing else.
	if p := get(fmt.Sprintf("branch=%d", cyc.Seq)); fmt.Sprint(seqs(p.Verbs)) != fmt.Sprint([]int64{del, bobDel}) {
		t.Fatalf("branch of cycle %d: %v, want %v", cyc.Seq, seqs(p.Verbs), []int64{del, bobDel})
	}
	if p := get("q=projects"); len(p.Verbs) != 1 || p.Verbs[0].Seq != del || !strings.Contains(p.Verbs[0].Summary, `"Projects"`) {
		t.Fatalf("search for projects: %+v", p.Verbs)
	}
	if p := get("order=desc&limit=1&kind=imap.delete"); len(p.Verbs) != 1 || p.Verbs[0].Seq != bobDel || p.Next != bobDel {
		t.Fatalf("newest delete: %+v next %d", p.Verbs, p.Next)
	}
	since := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	if p := get("since=" + since); len(p.Verbs) != 0 {
		t.Fatalf("verbs since an hour from now: %v", seqs(p.Verbs))
	}
	if resp, _ := ts.do(t, "GET", "/api/verbs?after=x", ts.token, nil); resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("after=x: %s, want 400", resp.Status)
	}
	if resp, _ := ts.do(t, "GET", fmt.Sprintf("/api/verbs?branch=%d", del), ts.token, nil); resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("branch= a delete: %s, want 400", resp.Status)
	}
	// A login finds the mail delivered to its addresses, unless exact=1.
	dlv := &undolog.Record{Kind: verb.KindLMTPDeliver, Session: "lmtp", Users: []string{"alice@example.test"}, Args: []byte(`{"undo_id":"D1","rcpts":["alice@example.test"]}`)}
	if err := l.Append(ctx, dlv); err != nil {
		t.Fatal(err)
	}
	if p := get("user=alice&kind=lmtp.deliver"); len(p.Verbs) != 1 || p.Verbs[0].Seq != dlv.Seq {
		t.Fatalf("deliveries to alice: %v, want %d", seqs(p.Verbs), dlv.Seq)
	}
	if p := get("user=alice&kind=lmtp.deliver&exact=1"); len(p.Verbs) != 0 {
		t.Fatalf("deliveries filed under the login alice alone: %v, want none", seqs(p.Verbs))
	}
	// Every verb the API returns is described in words beside its JSON.
	for _, v := range get("limit=100").Verbs {
		if v.Description == "" || strings.ContainsAny(v.Description, "{}") || !strings.HasPrefix(v.Description, v.Summary) {
			t.Errorf("verb %d (%s): description %q, want its summary and outcome in words", v.Seq, v.Kind, v.Description)
		}
	}
	if p := get(fmt.Sprintf("kind=imap.delete&before=%d", bobDel)); len(p.Verbs) != 1 {
		t.Fatalf("deletes before bob's: %v, want alice's", seqs(p.Verbs))
	} else if d := p.Verbs[0]; d.Description != `DELETE "Projects" — OK` || d.ForUser != `you deleted the folder "Projects" with its messages` {
		t.Errorf("alice's DELETE described as %q, for her %q", d.Description, d.ForUser)
	}
	// One verb, and the metrics count the kinds.
	if resp, body := ts.do(t, "GET", fmt.Sprintf("/api/verbs/%d", del), ts.token, nil); resp.StatusCode != 200 || !strings.Contains(body, `"kind": "imap.delete"`) {
		t.Fatalf("GET /api/verbs/%d: %s %s", del, resp.Status, body)
	}
	_, body := ts.do(t, "GET", "/metrics", ts.token, nil)
	// 30 appends above: 13 verbs with their outcomes, a snapshot with its
	// outcome, a cycle, a delivery.
	for _, want := range []string{`undomail_verbs_logged_total{kind="imap.create"} 11`, `undomail_verbs_logged_total{kind="imap.delete"} 2`,
		"undomail_snapshots 1", "undomail_gate_held 0", `undomail_log_append_seconds_count{durable="true"} 30`} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s:\n%s", want, body)
		}
	}
}

func TestCheckListen(t *testing.T) {
	for _, c := range []struct {
		addr        string
		tls, allow  bool
		wantRefused bool
	}{
		{"127.0.0.1:8025", false, false, false},
		{"[::1]:8025", false, false, false},
		{"localhost:8025", false, false, false},
		{"0.0.0.0:8025", false, false, true},
		{":8025", false, false, true},
		{"192.0.2.1:8025", false, false, true},
		{"0.0.0.0:8025", true, false, false},
		{"0.0.0.0:8025", false, true, false},
	} {
		err := CheckListen(c.addr, c.tls, c.allow)
		if (err != nil) != c.wantRefused {
			t.Errorf("CheckListen(%q, tls=%v, allow=%v) = %v, want refused=%v", c.addr, c.tls, c.allow, err, c.wantRefused)
		}
	}
}

// selfSigned writes a certificate for 127.0.0.1 and its key.
func selfSigned(t *testing.T) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "undomail admin test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(key)
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
	cert, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

// TestListen: a reachable address without TLS is refused before anything
// listens; with TLS the API answers over HTTPS, with a Secure cookie.
func TestListen(t *testing.T) {
	dir := t.TempDir()
	l, err := undolog.Open(filepath.Join(dir, "undo"), undolog.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	s, err := New(&fakeDaemon{l: l}, Options{DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Listen(Options{Listen: "0.0.0.0:0"}); err == nil || !strings.Contains(err.Error(), "admin.tls_cert") {
		s.Close()
		t.Fatalf("plain HTTP on 0.0.0.0: %v, want refused naming admin.tls_cert", err)
	}
	certFile, keyFile, pool := selfSigned(t)
	tlsOpts := Options{Listen: "127.0.0.1:0", TLSCert: certFile, TLSKey: keyFile}
	s, err = New(&fakeDaemon{l: l}, Options{DataDir: dir, TLSCert: certFile, TLSKey: keyFile})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Listen(tlsOpts); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	tok, _ := ReadToken(dir)
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	base := "https://" + s.Addr().String()
	req, _ := http.NewRequest("GET", base+"/api/status", nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET /api/status over HTTPS: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /api/status over HTTPS: %s", resp.Status)
	}
	// The CLI's client, trusting the self-signed certificate; and not
	// trusting it without.
	if st, err := DialRemote(base, tok, pool).Status(context.Background()); err != nil || st.Gate != "open" {
		t.Fatalf("DialRemote with the certificate: %+v %v", st, err)
	}
	if _, err := DialRemote(base, tok, nil).Status(context.Background()); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("DialRemote without trusting the certificate: %v, want a certificate error", err)
	}
	c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	resp, err = c.PostForm(base+"/login", url.Values{"token": {tok}})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if ck := resp.Cookies(); len(ck) != 1 || !ck[0].Secure || !ck[0].HttpOnly {
		t.Fatalf("session cookie over HTTPS: %+v, want Secure and HttpOnly", ck)
	}
	if resp, err := http.Get("http://" + s.Addr().String() + "/healthz"); err == nil {
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Fatal("the TLS listener served plain HTTP")
		}
	}
}

// TestCompensationsAndDrills: the records other parts of undomail write
// (compensation messages, drill verdicts) are listed with what an operator
// needs, and the last drill's verdict reaches the status and the metrics.
func TestCompensationsAndDrills(t *testing.T) {
	ts := newTestServer(t)
	ctx := context.Background()
	read := imapVerb(t, ts.f.l, "alice", "imap.fetch", "INBOX")
	comp := &undolog.Record{Kind: verb.KindCompensation, Session: "cycle", Users: []string{"alice"},
		Args: []byte(`{"undo_id":"U1","mail_from":"postmaster@example.test","rcpts":["alice@example.test"],"size":900,
			"header":{"subject":"What changed in your mailbox","from":"Mail administrator <postmaster@example.test>"},
			"cycle":7,"audience":"user","user":"alice","paradoxes":[{"kind":"read_removed","user":"alice","verb":` + fmt.Sprint(read) + `,"verb_kind":"imap.fetch"}]}`)}
	drillOK := &undolog.Record{Kind: verb.KindDrill, Session: "drill", Outcome: []byte(`{"ok":true,"from":"s1","to":"s2"}`)}
	drillBad := &undolog.Record{Kind: verb.KindDrill, Session: "drill", Outcome: []byte(`{"ok":false,"from":"s2","to":"s3","differences":[{"user":"bob","mailbox":"INBOX"}]}`)}
	if err := ts.f.l.Append(ctx, comp, drillOK, drillBad); err != nil {
		t.Fatal(err)
	}
	var cs struct {
		Compensations []Verb `json:"compensations"`
	}
	_, body := ts.do(t, "GET", "/api/compensations?user=alice", ts.token, nil)
	json.Unmarshal([]byte(body), &cs)
	if len(cs.Compensations) != 1 || cs.Compensations[0].Header == nil || cs.Compensations[0].Header.Subject != "What changed in your mailbox" ||
		len(cs.Compensations[0].Paradoxes) != 1 || cs.Compensations[0].Paradoxes[0].Verb != read {
		t.Fatalf("alice's compensations: %s", body)
	}
	var ds struct{ Drills []Drill }
	_, body = ts.do(t, "GET", "/api/drills", ts.token, nil)
	json.Unmarshal([]byte(body), &ds)
	if len(ds.Drills) != 2 || !ds.Drills[0].OK || ds.Drills[1].OK || ds.Drills[1].To != "s3" || len(ds.Drills[1].Differences) != 1 {
		t.Fatalf("drills: %s", body)
	}
	var st Status
	_, body = ts.do(t, "GET", "/api/status", ts.token, nil)
	json.Unmarshal([]byte(body), &st)
	if st.LastDrill == nil || st.LastDrill.Seq != drillBad.Seq || st.LastDrill.OK {
		t.Fatalf("status: last drill %+v, want #%d not verified", st.LastDrill, drillBad.Seq)
	}
	if _, body := ts.do(t, "GET", "/metrics", ts.token, nil); !strings.Contains(body, "undomail_drill_last_ok 0") {
		t.Fatalf("/metrics lacks undomail_drill_last_ok 0:\n%s", body)
	}
	// Drills run through the API and from the drills page (with its CSRF
	// token only).
	if resp, body := ts.do(t, "POST", "/api/drills?from=s3&to=s4", ts.token, nil); resp.StatusCode != 200 || !strings.Contains(body, `"to": "s4"`) {
		t.Fatalf("POST /api/drills: %s %s", resp.Status, body)
	}
	c, csrf := ts.browser(t)
	form := func(vals url.Values) int {
		resp, err := c.PostForm(ts.URL+"/drills/run", vals)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := form(url.Values{"from": {"s4"}, "to": {"s5"}}); code != http.StatusForbidden {
		t.Fatalf("drill form without the CSRF token: %d, want 403", code)
	}
	if code := form(url.Values{"from": {"s4"}, "to": {"s5"}, "csrf": {csrf}}); code != http.StatusOK {
		t.Fatalf("drill form: %d", code)
	}
	_, body = ts.do(t, "GET", "/api/drills", ts.token, nil)
	ds.Drills = nil
	json.Unmarshal([]byte(body), &ds)
	if len(ds.Drills) != 4 || ds.Drills[2].To != "s4" || ds.Drills[3].To != "s5" {
		t.Fatalf("drills after running two: %s", body)
	}
	// The timeline rings the verb whose result the cycle changed.
	resp, err := c.Get(ts.URL + "/?user=alice")
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if n := strings.Count(string(page), `<circle class="paradox"`); n != 1 {
		t.Fatalf("the timeline marks %d paradoxes, want verb %d's:\n%s", n, read, page)
	}
}
