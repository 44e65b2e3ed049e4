package admin

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// TokenName is the file in the data directory holding the admin token
// when none is configured. It is created on first start, mode 0600: who
// can read it can act as the operator, like who can reach the control
// socket.
const TokenName = "admin.token"

// SessionCookie carries a web session; it is HttpOnly and SameSite=Strict.
const SessionCookie = "undomail_session"

// sessionLifetime bounds a web login.
const sessionLifetime = 12 * time.Hour

// EnsureToken returns the admin token stored in dataDir, creating a random
// one if there is none.
func EnsureToken(dataDir string) (string, error) {
	path := filepath.Join(dataDir, TokenName)
	tok, err := ReadToken(dataDir)
	if err == nil {
		return tok, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return "", err
	}
	tok = randomHex(32)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", fmt.Errorf("create admin token %s: %w", path, err)
	}
	if _, err := f.WriteString(tok + "\n"); err != nil {
		f.Close()
		return "", fmt.Errorf("write admin token %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return "", fmt.Errorf("write admin token %s: %w", path, err)
	}
	return tok, f.Close()
}

// ReadToken reads the admin token from dataDir. A token file readable by
// others is refused: it would hand the operator's powers to every local
// user.
func ReadToken(dataDir string) (string, error) {
	return ReadTokenFile(filepath.Join(dataDir, TokenName))
}

// ReadTokenFile reads an admin token from a file only its owner can read.
func ReadTokenFile(path string) (string, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("admin token %s: %w", path, err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return "", fmt.Errorf("admin token %s: mode %v lets others read it; chmod 600 it", path, fi.Mode().Perm())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("admin token %s: %w", path, err)
	}
	tok := strings.TrimSpace(string(b))
	if len(tok) < 16 {
		return "", fmt.Errorf("admin token %s: shorter than 16 characters", path)
	}
	return tok, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// CheckListen refuses an admin address other hosts can reach unless TLS
// is configured or the operator explicitly allowed plain HTTP: the token
// would cross the network in clear text.
func CheckListen(addr string, tls, allowInsecureRemote bool) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("admin.listen: %q is not host:port: %w", addr, err)
	}
	if tls || allowInsecureRemote || isLoopback(host) {
		return nil
	}
	return fmt.Errorf("admin.listen: %s is reachable from other hosts; configure admin.tls_cert and admin.tls_key, or set admin.allow_insecure_remote: true to send the admin token in clear text", addr)
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// session is a logged-in browser.
type session struct {
	csrf    string
	expires time.Time
}

// auth checks API tokens and web sessions.
type auth struct {
	token    string
	secure   bool // cookies only over TLS
	mu       sync.Mutex
	sessions map[string]*session
}

func (a *auth) validToken(tok string) bool {
	return subtle.ConstantTimeCompare([]byte(tok), []byte(a.token)) == 1
}

// bearer returns the token of an Authorization: Bearer header.
func bearer(r *http.Request) (string, bool) {
	h := r.Header.Get("Authorization")
	if len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
		return strings.TrimSpace(h[7:]), true
	}
	return "", false
}

// login starts a session and sets its cookie.
func (a *auth) login(w http.ResponseWriter) *session {
	id := randomHex(32)
	s := &session{csrf: randomHex(32), expires: time.Now().Add(sessionLifetime)}
	a.mu.Lock()
	now := time.Now()
	for k, old := range a.sessions {
		if now.After(old.expires) {
			delete(a.sessions, k)
		}
	}
	a.sessions[id] = s
	a.mu.Unlock()
	http.SetCookie(w, &http.Cookie{Name: SessionCookie, Value: id, Path: "/", HttpOnly: true, Secure: a.secure,
		SameSite: http.SameSiteStrictMode, Expires: s.expires})
	return s
}

func (a *auth) logout(w http.ResponseWriter, r *http.Request) {
	if c, err := r.Cookie(SessionCookie); err == nil {
		a.mu.Lock()
		delete(a.sessions, c.Value)
		a.mu.Unlock()
	}
	http.SetCookie(w, &http.Cookie{Name: SessionCookie, Value: "", Path: "/", HttpOnly: true, Secure: a.secure,
		SameSite: http.SameSiteStrictMode, MaxAge: -1})
}

// session returns the request's live session, if any.
func (a *auth) session(r *http.Request) *session {
	c, err := r.Cookie(SessionCookie)
	if err != nil {
		return nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	s := a.sessions[c.Value]
	if s == nil || time.Now().After(s.expires) {
		delete(a.sessions, c.Value)
		return nil
	}
	return s
}

// sameOrigin reports whether a browser's request comes from a page of this
// server: the Origin header (or, without one, the Referer) must name the
// host the request was sent to. Requests without either (curl, the CLI)
// pass; they cannot carry a browser's cookie against its will.
func sameOrigin(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		origin = r.Header.Get("Referer")
	}
	if origin == "" {
		return true
	}
	u, err := url.Parse(origin)
	return err == nil && u.Host == r.Host
}

// csrfOK checks a state-changing request made with a session cookie: the
// session's CSRF token in the form field csrf or the X-CSRF-Token header,
// and a same-origin Origin.
func csrfOK(r *http.Request, s *session) bool {
	if !sameOrigin(r) {
		return false
	}
	tok := r.Header.Get("X-CSRF-Token")
	if tok == "" {
		tok = r.PostFormValue("csrf")
	}
	return tok != "" && subtle.ConstantTimeCompare([]byte(tok), []byte(s.csrf)) == 1
}

// safeMethod: requests that change nothing need no CSRF check.
func safeMethod(m string) bool {
	return m == http.MethodGet || m == http.MethodHead || m == http.MethodOptions
}
