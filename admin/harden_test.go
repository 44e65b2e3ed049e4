package admin

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/undomail/undomail/undolog"
)

// TestLoginRedirectStaysLocal: whatever next= a login form carries, the
// browser is sent to a path on the admin itself, never to another site.
func TestLoginRedirectStaysLocal(t *testing.T) {
	ts := newTestServer(t)
	c := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	base, _ := url.Parse(ts.URL)
	login := func(t *testing.T, body string) string {
		t.Helper()
		req, _ := http.NewRequest("POST", ts.URL+"/login", strings.NewReader(body))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusSeeOther {
			t.Fatalf("login: %s, want 303", resp.Status)
		}
		return resp.Header.Get("Location")
	}
	tok := url.QueryEscape(ts.token)
	for _, next := range []string{
		`/\evil.example`, `//evil.example`, `/\/evil.example`, `\/evil.example`, `\\evil.example`,
		`https://evil.example`, `http:evil.example`, `javascript:alert(1)`, "/\t/evil.example",
		"/\n/evil.example", "/\r\n/evil.example", " //evil.example", `/@evil.example`, "",
	} {
		for _, body := range []string{
			"token=" + tok + "&next=" + url.QueryEscape(next),
			// Percent-encoded once more: the form value is then the
			// still-encoded text, which must not pass either.
			"token=" + tok + "&next=" + url.QueryEscape(url.QueryEscape(next)),
			// Every byte encoded.
			"token=" + tok + "&next=" + encodeAll(next),
		} {
			loc := login(t, body)
			u, err := base.Parse(loc)
			if err != nil || u.Host != base.Host || strings.ContainsAny(loc, "\\\t\r\n") || strings.HasPrefix(loc, "//") {
				t.Errorf("next=%q (form %q) redirected to %q, off the admin", next, body, loc)
			}
		}
	}
	// A real local target is kept.
	if loc := login(t, "token="+tok+"&next="+url.QueryEscape("/verb/3?x=1")); loc != "/verb/3?x=1" {
		t.Errorf("next=/verb/3?x=1 redirected to %q", loc)
	}
}

func encodeAll(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		fmt.Fprintf(&b, "%%%02X", s[i])
	}
	return b.String()
}

// TestVerbNotFound: positions that name no verb (zero, negative, not a
// number, past the end) are 404, in the API and the web page alike.
func TestVerbNotFound(t *testing.T) {
	ts := newTestServer(t)
	seq := imapVerb(t, ts.f.l, "alice", "imap.create", "Projects")
	if resp, body := ts.do(t, "GET", fmt.Sprintf("/api/verbs/%d", seq), ts.token, nil); resp.StatusCode != http.StatusOK || !strings.Contains(body, "Projects") {
		t.Fatalf("GET /api/verbs/%d: %s %s", seq, resp.Status, body)
	}
	bad := []string{"-1", "-3", "0", "x", "1e3", "%2D1", "99999"}
	for _, s := range bad {
		resp, body := ts.do(t, "GET", "/api/verbs/"+s, ts.token, nil)
		if resp.StatusCode != http.StatusNotFound || strings.Contains(body, "Projects") {
			t.Errorf("GET /api/verbs/%s: %s %s, want 404", s, resp.Status, body)
		}
	}
	c, _ := ts.browser(t)
	get := func(path string) (int, string) {
		resp, err := c.Get(ts.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get(fmt.Sprintf("/verb/%d", seq)); code != http.StatusOK || !strings.Contains(body, "Projects") {
		t.Fatalf("GET /verb/%d: %d", seq, code)
	}
	for _, s := range bad {
		if code, body := get("/verb/" + s); code != http.StatusNotFound || strings.Contains(body, "Projects") {
			t.Errorf("GET /verb/%s: %d, want 404", s, code)
		}
	}
}

// TestNoSniff: every answer, JSON above all, tells browsers not to guess
// its type.
func TestNoSniff(t *testing.T) {
	ts := newTestServer(t)
	imapVerb(t, ts.f.l, "alice", "imap.create", "<script>alert(1)</script>")
	for _, tc := range []struct{ method, path, token string }{
		{"GET", "/api/verbs", ts.token},
		{"GET", "/api/verbs/1", ts.token},
		{"GET", "/api/verbs/0", ts.token},
		{"GET", "/api/status", ts.token},
		{"GET", "/api/status", ""},
		{"GET", "/api/status", "wrong-token-wrong-token"},
		{"GET", "/api/cycles/progress", ts.token},
		{"GET", "/metrics", ts.token},
		{"GET", "/healthz", ""},
		{"GET", "/login", ""},
		{"GET", "/nowhere", ""},
	} {
		resp, _ := ts.do(t, tc.method, tc.path, tc.token, nil)
		if got := resp.Header.Get("X-Content-Type-Options"); got != "nosniff" {
			t.Errorf("%s %s (%s): X-Content-Type-Options %q, want nosniff", tc.method, tc.path, resp.Status, got)
		}
	}
}

// listening starts an admin on a real listener with short timeouts, so
// the server's connection handling is what is tested.
func listening(t *testing.T, to serverTimeouts, delay time.Duration) (addr, token string, f *fakeDaemon) {
	t.Helper()
	dir := t.TempDir()
	l, err := undolog.Open(filepath.Join(dir, "undo"), undolog.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	f = &fakeDaemon{l: l, delay: delay}
	s, err := New(f, Options{DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	s.timeouts = to
	if err := s.Listen(Options{Listen: "127.0.0.1:0"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	tok, err := ReadToken(dir)
	if err != nil {
		t.Fatal(err)
	}
	return s.Addr().String(), tok, f
}

// closedByServer reads from c until the server closes it and returns what
// it sent; the test fails if the connection is still open after a
// minute, far beyond any timeout under test.
func closedByServer(t *testing.T, c net.Conn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(time.Minute))
	b, err := io.ReadAll(c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the server kept the connection open; got %q", b)
	}
	return string(b)
}

// TestSlowClientsAreTimedOut: a request body sent too slowly and an idle
// keep-alive connection are both closed by the server.
func TestSlowClientsAreTimedOut(t *testing.T) {
	short := serverTimeouts{header: 200 * time.Millisecond, read: 300 * time.Millisecond, write: 300 * time.Millisecond, idle: 300 * time.Millisecond}
	addr, tok, f := listening(t, short, 0)

	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST /api/cycles HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"to\":", addr, tok)
	got := closedByServer(t, c)
	if strings.Contains(got, " 202 ") || len(f.cycles) != 0 {
		t.Fatalf("a request whose body never finished started a cycle: %q", got)
	}

	k, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	fmt.Fprintf(k, "GET /healthz HTTP/1.1\r\nHost: %s\r\n\r\n", addr)
	br := bufio.NewReader(k)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Close {
		t.Fatalf("GET /healthz: %s close=%v, want 200 on a kept-alive connection", resp.Status, resp.Close)
	}
	k.SetReadDeadline(time.Now().Add(time.Minute))
	if _, err := br.ReadByte(); !errors.Is(err, io.EOF) {
		t.Fatalf("idle keep-alive connection: %v, want closed by the server", err)
	}
}

// TestLongRunningOutlastTimeouts: a drill, a snapshot and a cycle waited
// for take longer than the server's read and write timeouts, and their
// answers still arrive, with the work not cancelled half way.
func TestLongRunningOutlastTimeouts(t *testing.T) {
	short := serverTimeouts{header: 200 * time.Millisecond, read: 200 * time.Millisecond, write: 200 * time.Millisecond, idle: 200 * time.Millisecond}
	addr, tok, _ := listening(t, short, time.Second)
	do := func(method, path, body string) (int, string) {
		req, _ := http.NewRequest(method, "http://"+addr+path, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+tok)
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := do("POST", "/api/drills?from=a&to=b", ""); code != http.StatusOK || !strings.Contains(body, `"ok": true`) {
		t.Fatalf("POST /api/drills: %d %s", code, body)
	}
	if code, body := do("POST", "/api/cycles?wait=1", `{"to":"snap-1"}`); code != http.StatusOK || !strings.Contains(body, `"replayed": 3`) {
		t.Fatalf("POST /api/cycles?wait=1: %d %s", code, body)
	}
}
