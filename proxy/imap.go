package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/undomail/undomail/proxy/imapwire"
	"github.com/undomail/undomail/undolog"
)

// IMAPConfig configures the IMAP front end.
type IMAPConfig struct {
	// Upstream is Dovecot's IMAP listener.
	Upstream string
	// Hostname is named in the greeting.
	Hostname string
	// TLS, if set, offers STARTTLS, or with ImplicitTLS wraps every
	// connection in TLS from the first byte (port 993 style).
	TLS         *tls.Config
	ImplicitTLS bool
	// AllowInsecureAuth accepts LOGIN and AUTHENTICATE without TLS.
	// Without it the proxy advertises LOGINDISABLED on cleartext
	// connections (RFC 9051 section 6.2.3).
	AllowInsecureAuth bool
	// UpstreamTimeout bounds connecting and logging in upstream.
	UpstreamTimeout time.Duration
	// IdleTimeout ends a logged-in client connection silent for this
	// long. RFC 9051 section 5.4 asks for at least 30 minutes.
	IdleTimeout time.Duration
	// LoginTimeout ends a connection that has not logged in this long
	// after it was accepted, whatever it sends meanwhile, with the BYE
	// Dovecot's login process sends after its 3 minutes.
	LoginTimeout time.Duration
	// MaxConnections caps the client connections open at once; 0: no cap.
	// Connections over it are greeted with BYE [UNAVAILABLE] and closed.
	MaxConnections int
	// MaxConnectionsPerAddress caps the connections open at once from one
	// client IP address; 0: no cap. Connections over it are greeted with
	// BYE [LIMIT] (RFC 5530) and closed.
	MaxConnectionsPerAddress int
	// Gate, if set, is passed by every mutating command from its intent to
	// its completion, so a snapshot can cut between commands.
	Gate *Gate
}

// IMAPProxy is the IMAP front end: it logs clients in, logs in upstream as
// them, then relays bytes both ways unchanged through imapwire's tokenizer,
// recording every mutating command in the undo log before it is forwarded
// and every body or header fetch as an externalization.
type IMAPProxy struct {
	cfg    IMAPConfig
	log    *undolog.Log
	logger *slog.Logger
	// preCaps are the upstream's capabilities before login.
	preCaps []string
	// ids maps messages to undo ids (imapids.go).
	ids idTable
	// users serialises each user's mutating commands (imaplock.go).
	users userLocks

	mu       sync.Mutex
	closed   bool
	ln       net.Listener
	sessions map[*imapSession]struct{}
	sides    map[string]*sideConn // by user
	perAddr  map[string]int       // open connections by client IP address
	wg       sync.WaitGroup
}

// DefaultLoginTimeout is how long a connection may take to log in: the
// 3 minutes after which Dovecot's login process disconnects a client that
// has not logged in (docs/configuration.md, imap.login_timeout).
const DefaultLoginTimeout = 3 * time.Minute

// NewIMAP probes the upstream (retrying until ctx ends) for its pre-login
// capabilities.
func NewIMAP(ctx context.Context, cfg IMAPConfig, log *undolog.Log, logger *slog.Logger) (*IMAPProxy, error) {
	if cfg.Upstream == "" {
		return nil, errors.New("imap proxy: no upstream address")
	}
	if cfg.Hostname == "" {
		cfg.Hostname = "localhost"
	}
	if cfg.UpstreamTimeout == 0 {
		cfg.UpstreamTimeout = 30 * time.Second
	}
	if cfg.IdleTimeout == 0 {
		cfg.IdleTimeout = 30 * time.Minute
	}
	if cfg.LoginTimeout == 0 {
		cfg.LoginTimeout = DefaultLoginTimeout
	}
	p := &IMAPProxy{cfg: cfg, log: log, logger: logger.With("listener", "imap"), sessions: map[*imapSession]struct{}{}, sides: map[string]*sideConn{}, perAddr: map[string]int{}}
	err := probeUntil(ctx, p.logger, "imap", cfg.Upstream, func() error {
		up, err := p.dialUpstream(ctx)
		if err != nil {
			return err
		}
		p.preCaps = up.caps
		up.close()
		return nil
	})
	if err != nil {
		return nil, err
	}
	p.logger.Info("upstream probed", "upstream", cfg.Upstream, "capabilities", strings.Join(p.preCaps, " "))
	return p, nil
}

// Serve accepts connections on l until Close.
func (p *IMAPProxy) Serve(l net.Listener) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.ln = l
	p.mu.Unlock()
	p.logger.Info("listening", "addr", l.Addr().String(), "upstream", p.cfg.Upstream)
	for {
		c, err := l.Accept()
		if err != nil {
			p.mu.Lock()
			closed := p.closed
			p.mu.Unlock()
			if closed {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return err
		}
		addr := clientIP(c)
		if p.cfg.TLS != nil && p.cfg.ImplicitTLS {
			c = tls.Server(c, p.cfg.TLS)
		}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			c.Close()
			return nil
		}
		if bye := p.overLimit(addr); bye != "" {
			p.wg.Add(1)
			p.mu.Unlock()
			p.logger.Warn("connection refused", "client", c.RemoteAddr().String(), "reason", bye)
			go func() {
				defer p.wg.Done()
				turnAway(c, bye)
			}()
			continue
		}
		s := newIMAPSession(p, c)
		p.sessions[s] = struct{}{}
		p.perAddr[addr]++
		p.wg.Add(1)
		p.mu.Unlock()
		go func() {
			defer p.wg.Done()
			s.serve()
			p.mu.Lock()
			delete(p.sessions, s)
			if p.perAddr[addr]--; p.perAddr[addr] <= 0 {
				delete(p.perAddr, addr)
			}
			p.mu.Unlock()
		}()
	}
}

// clientIP is the IP address a connection comes from: the key of
// MaxConnectionsPerAddress.
func clientIP(c net.Conn) string {
	if h, _, err := net.SplitHostPort(c.RemoteAddr().String()); err == nil {
		return h
	}
	return c.RemoteAddr().String()
}

// overLimit returns the BYE text for a new connection from addr that would
// exceed a connection cap, or "". p.mu must be held.
func (p *IMAPProxy) overLimit(addr string) string {
	if max := p.cfg.MaxConnectionsPerAddress; max > 0 && p.perAddr[addr] >= max {
		return fmt.Sprintf("[LIMIT] Maximum number of connections from your address exceeded (imap.max_connections_per_address=%d)", max)
	}
	if max := p.cfg.MaxConnections; max > 0 && len(p.sessions) >= max {
		return fmt.Sprintf("[UNAVAILABLE] Maximum number of connections exceeded (imap.max_connections=%d); try again later", max)
	}
	return ""
}

// turnAway greets a connection the proxy will not serve with BYE instead
// of OK (RFC 9051 section 7.1.5: a server may refuse a connection with a
// BYE greeting) and closes it. The write is bounded: a client that does
// not read cannot keep it.
func turnAway(c net.Conn, bye string) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "* BYE %s\r\n", bye)
}

// Close stops accepting and ends every session with BYE [UNAVAILABLE]
// (RFC 9051 section 7.1.5), after the commands in flight have had until ctx
// ends to complete.
func (p *IMAPProxy) Close(ctx context.Context) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	if p.ln != nil {
		p.ln.Close()
	}
	for s := range p.sessions {
		s.shutdown("undomail is shutting down")
	}
	p.mu.Unlock()
	done := make(chan struct{})
	go func() { p.wg.Wait(); close(done) }()
	defer func() {
		p.mu.Lock()
		sides := p.sides
		p.sides = map[string]*sideConn{}
		p.mu.Unlock()
		for _, sc := range sides {
			if sc.idle != nil {
				sc.idle.Stop()
			}
			sc.close()
		}
	}()
	select {
	case <-done:
	case <-ctx.Done():
		p.mu.Lock()
		for s := range p.sessions {
			s.conn.Close()
		}
		p.mu.Unlock()
	}
	return nil
}

// imapUpstream is one connection to Dovecot.
type imapUpstream struct {
	conn net.Conn
	r    *imapwire.ResponseReader
	mu   sync.Mutex // serialises writes to w
	w    *bufio.Writer
	caps []string
}

func (u *imapUpstream) close() { u.conn.Close() }

// write sends bytes upstream and flushes.
func (u *imapUpstream) write(b []byte) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if _, err := u.w.Write(b); err != nil {
		return err
	}
	return u.w.Flush()
}

// dialUpstream connects and reads the greeting and the pre-login
// capabilities.
func (p *IMAPProxy) dialUpstream(ctx context.Context) (*imapUpstream, error) {
	d := net.Dialer{Timeout: p.cfg.UpstreamTimeout}
	conn, err := d.DialContext(ctx, "tcp", p.cfg.Upstream)
	if err != nil {
		return nil, fmt.Errorf("connect to upstream %s: %w", p.cfg.Upstream, err)
	}
	u := &imapUpstream{conn: conn, r: imapwire.NewResponseReader(conn, imapwire.Options{}), w: bufio.NewWriter(conn)}
	conn.SetDeadline(time.Now().Add(p.cfg.UpstreamTimeout))
	defer conn.SetDeadline(time.Time{})
	greet, err := u.r.Next(nil)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("read greeting of upstream %s: %w", p.cfg.Upstream, err)
	}
	if greet.Kind != imapwire.Untagged || greet.Name != "OK" {
		conn.Close()
		return nil, fmt.Errorf("upstream %s greeted with %s %s", p.cfg.Upstream, greet.Name, greet.Text)
	}
	if greet.Code != nil && greet.Code.Name == "CAPABILITY" {
		u.caps = strings.Fields(greet.Code.Text)
		return u, nil
	}
	if _, err := u.command("P0 CAPABILITY\r\n", "P0"); err != nil {
		conn.Close()
		return nil, err
	}
	return u, nil
}

// command sends a command of the proxy's own, before any client traffic
// flows, and reads responses up to its tagged completion. CAPABILITY
// responses on the way update u.caps.
func (u *imapUpstream) command(line, tag string) (*imapwire.Response, error) {
	if err := u.write([]byte(line)); err != nil {
		return nil, fmt.Errorf("send %s upstream: %w", strings.Fields(line)[1], err)
	}
	for {
		r, err := u.r.Next(nil)
		if err != nil {
			return nil, fmt.Errorf("read upstream reply to %s: %w", strings.Fields(line)[1], err)
		}
		if r.Kind == imapwire.Untagged && r.Name == "CAPABILITY" {
			u.caps = valuesText(r.Args)
		}
		if r.Kind == imapwire.Tagged && r.Tag == tag {
			if r.Code != nil && r.Code.Name == "CAPABILITY" {
				u.caps = strings.Fields(r.Code.Text)
			}
			return r, nil
		}
	}
}

func valuesText(vs []imapwire.Value) []string {
	out := make([]string, 0, len(vs))
	for _, v := range vs {
		out = append(out, v.Text)
	}
	return out
}

// preLoginCaps are the capabilities the proxy announces before login: the
// upstream's, with authentication limited to what the proxy can relay
// (it needs the password to log in upstream) and STARTTLS and
// LOGINDISABLED decided by the proxy's own TLS setup.
func (p *IMAPProxy) preLoginCaps(tlsActive bool) []string {
	var out []string
	for _, c := range p.preCaps {
		u := strings.ToUpper(c)
		switch {
		case u == "STARTTLS", u == "LOGINDISABLED", strings.HasPrefix(u, "AUTH="):
			continue
		}
		out = append(out, c)
	}
	if p.cfg.TLS != nil && !tlsActive {
		out = append(out, "STARTTLS")
	}
	if tlsActive || p.cfg.AllowInsecureAuth {
		out = append(out, "AUTH=PLAIN", "AUTH=LOGIN")
	} else {
		out = append(out, "LOGINDISABLED")
	}
	return out
}

// blindingCaps are post-login capabilities the proxy removes, and why.
var blindingCaps = map[string]string{
	// COMPRESS=DEFLATE (RFC 4978) would turn the stream into deflate
	// bytes the tokenizer cannot read: every later command would go
	// unrecorded.
	"COMPRESS=DEFLATE": "compression hides commands from the tokenizer",
	// STARTTLS after login is not allowed anyway (RFC 9051 6.2.1).
	"STARTTLS": "not valid after login",
	// CATENATE (RFC 4469) builds an APPENDed message on the server from
	// parts of other messages; the proxy logs the literal it sees, so it
	// could not record such a message's content.
	"CATENATE": "the appended message would be assembled where the proxy cannot log it",
	// URLAUTH (RFC 4467) exists for CATENATE and BURL submission.
	"URLAUTH": "only useful with CATENATE and BURL",
	// MULTIAPPEND (RFC 3502) puts several messages in one APPEND; the
	// proxy records one message per APPEND. Clients fall back to one
	// APPEND per message.
	"MULTIAPPEND": "the proxy records one message per APPEND",
}

// postLoginCaps filters the upstream's capabilities after login.
func postLoginCaps(caps []string) []string {
	var out []string
	for _, c := range caps {
		u := strings.ToUpper(c)
		if _, blind := blindingCaps[u]; blind || strings.HasPrefix(u, "AUTH=") || u == "SASL-IR" || u == "LOGINDISABLED" {
			continue
		}
		out = append(out, c)
	}
	return out
}
