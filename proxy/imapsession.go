package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/undomail/undomail/proxy/imapwire"
)

// imapSession is one client connection: login, then the splice.
type imapSession struct {
	p      *IMAPProxy
	conn   net.Conn
	id     string
	logger *slog.Logger

	cr *imapwire.CommandReader
	// cwMu serialises writes to the client: a response relayed from the
	// upstream is written whole before anything the proxy says itself.
	cwMu sync.Mutex
	cw   *bufio.Writer

	user string
	up   *imapUpstream
	side *sideConn // shared by the user's sessions; see imapids.go
	// tagPrefix starts the tags of the proxy's own commands: random, so no
	// client tag can collide with them.
	tagPrefix string

	// State shared by the two splice directions.
	mu       sync.Mutex
	state    mailboxState            // the selected mailbox, as of the last completed command
	pending  map[string]*pendingCmd  // forwarded commands awaiting their tagged completion
	order    []string                // their tags, in forwarding order
	injected map[string]*injectedCmd // the proxy's own commands in flight
	contWait chan bool               // a relayed synchronizing literal awaits "+" (true) or refusal (false)
	contTag  string
	selWait  chan struct{} // closed when no SELECT/EXAMINE/CLOSE/UNSELECT is in flight
	selBusy  int
	nextTag  int
	byeSent  bool
	respDone bool // the upstream direction has ended
	expunges int  // EXPUNGE and VANISHED responses seen (imapsplice.go)
	exists   int  // EXISTS responses seen
	// idleNext: IDLE is running, and the client's next line ends it.
	// Only the command reader uses it.
	idleNext bool
	bg       sync.WaitGroup // background fetch records
	// readLogged is closed when the latest background fetch record is
	// written (nil: none yet); a mutating command waits for it, so the
	// log keeps a session's reads and changes in the order they ran.
	readLogged chan struct{}
}

// mailboxState is what the session has selected.
type mailboxState struct {
	name        string
	uidValidity uint32
	readOnly    bool
}

func newIMAPSession(p *IMAPProxy, c net.Conn) *imapSession {
	var idb [8]byte
	rand.Read(idb[:])
	s := &imapSession{
		p:        p,
		conn:     c,
		id:       hex.EncodeToString(idb[:]),
		cw:       bufio.NewWriter(c),
		pending:  map[string]*pendingCmd{},
		injected: map[string]*injectedCmd{},
	}
	s.logger = p.logger.With("session", s.id, "client", c.RemoteAddr().String())
	s.tagPrefix = "undo" + s.id[:8] + "."
	s.cr = imapwire.NewCommandReader(c, preLoginLimits)
	return s
}

// loginMaxCommand is the most a command may take before login, literals
// included: Dovecot's login process allows 8192 bytes, counted up to each
// literal's header plus the literal's size, and answers a larger literal
// with BYE instead of inviting it (measured against Dovecot 2.3; the
// boundary is checked by TestIMAPPreLoginLiteralLimit).
const loginMaxCommand = 8192

// preLoginLimits are the command reader's limits until login; after it,
// the defaults (Dovecot's imap_max_line_length) apply.
var preLoginLimits = imapwire.Options{MaxLine: loginMaxCommand, MaxCommand: loginMaxCommand, MaxLiteral: loginMaxCommand}

// say writes lines of the proxy's own to the client.
func (s *imapSession) say(format string, args ...any) error {
	s.cwMu.Lock()
	defer s.cwMu.Unlock()
	fmt.Fprintf(s.cw, format, args...)
	return s.cw.Flush()
}

// lastWord writes a final BYE before the session closes, with a short
// deadline of its own: the login deadline may be what ended the session.
func (s *imapSession) lastWord(bye string) {
	s.mu.Lock()
	s.byeSent = true
	s.mu.Unlock()
	s.conn.SetWriteDeadline(time.Now().Add(time.Second))
	s.say("%s", bye)
}

// shutdown ends the session with an untagged BYE; used by Close.
func (s *imapSession) shutdown(why string) {
	s.mu.Lock()
	sent := s.byeSent
	s.byeSent = true
	s.mu.Unlock()
	if !sent {
		s.conn.SetWriteDeadline(time.Now().Add(time.Second))
		s.say("* BYE [UNAVAILABLE] %s\r\n", why)
	}
	s.conn.Close()
	if s.up != nil {
		s.up.close()
	}
}

func (s *imapSession) serve() {
	defer s.conn.Close()
	// Until login, reads and writes share one deadline: the whole
	// not-authenticated state is bounded, as in Dovecot's login process,
	// and a client that sends commands but never reads the answers
	// cannot hold the proxy's writes either.
	s.conn.SetDeadline(time.Now().Add(s.p.cfg.LoginTimeout))
	_, isTLS := s.conn.(*tls.Conn)
	if err := s.say("* OK [CAPABILITY %s] %s undomail ready.\r\n", strings.Join(s.p.preLoginCaps(isTLS), " "), s.p.cfg.Hostname); err != nil {
		return
	}
	if !s.preLogin() {
		return
	}
	defer s.up.close()
	s.splice()
}

// preLogin runs the not-authenticated state (RFC 9051 section 3.1) until
// a successful login upstream. It returns false when the session ended.
func (s *imapSession) preLogin() bool {
	for {
		cmd, err := s.cr.Next(s.answerLiterals)
		var se *imapwire.SyntaxError
		var lt *imapwire.LiteralTooLargeError
		var ne net.Error
		switch {
		case errors.As(err, &se):
			s.say("%s BAD %s\r\n", tagOr(cmd), "syntax error")
			continue
		case errors.As(err, &lt):
			// Dovecot's login process refuses such a literal at once
			// with these words and closes, never inviting it.
			s.lastWord("* BYE Literal size too large\r\n")
			return false
		case errors.As(err, &ne) && ne.Timeout():
			s.logger.Info("not logged in within the login timeout", "timeout", s.p.cfg.LoginTimeout)
			s.lastWord("* BYE Disconnected for inactivity.\r\n")
			return false
		case err != nil:
			s.byeForLimit(err)
			return false
		}
		_, isTLS := s.conn.(*tls.Conn)
		authOK := isTLS || s.p.cfg.AllowInsecureAuth
		switch cmd.Name {
		case "CAPABILITY":
			s.say("* CAPABILITY %s\r\n%s OK Capability completed.\r\n", strings.Join(s.p.preLoginCaps(isTLS), " "), cmd.Tag)
		case "NOOP":
			s.say("%s OK NOOP completed.\r\n", cmd.Tag)
		case "ID":
			s.say("* ID (\"name\" \"undomail\")\r\n%s OK ID completed.\r\n", cmd.Tag)
		case "LOGOUT":
			s.say("* BYE Logging out\r\n%s OK Logout completed.\r\n", cmd.Tag)
			return false
		case "STARTTLS":
			if !s.startTLS(cmd) {
				return false
			}
		case "LOGIN":
			if !authOK {
				s.say("%s NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure connections.\r\n", cmd.Tag)
				continue
			}
			if len(cmd.Args) != 2 {
				s.say("%s BAD LOGIN needs a user name and a password.\r\n", cmd.Tag)
				continue
			}
			user, ok1 := cmd.Args[0].AString()
			pass, ok2 := cmd.Args[1].AString()
			if !ok1 || !ok2 {
				s.say("%s BAD LOGIN arguments are not strings.\r\n", cmd.Tag)
				continue
			}
			if s.login(cmd.Tag, user, pass) {
				return true
			}
		case "AUTHENTICATE":
			if !authOK {
				s.say("%s NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure connections.\r\n", cmd.Tag)
				continue
			}
			user, pass, ok := s.authenticate(cmd)
			if ok && s.login(cmd.Tag, user, pass) {
				return true
			}
		default:
			s.say("%s BAD Command %s is not valid before login.\r\n", cmd.Tag, cmd.Name)
		}
	}
}

func tagOr(cmd *imapwire.Command) string {
	if cmd != nil && cmd.Tag != "" {
		return cmd.Tag
	}
	return "*"
}

// answerLiterals is the pre-login forwarder: nothing goes upstream yet, so
// the proxy itself invites each synchronizing literal (RFC 9051 7.5).
func (s *imapSession) answerLiterals(p imapwire.Part) error {
	if p.Literal != nil && !p.Literal.NonSync {
		return s.say("+ Ready for literal data\r\n")
	}
	return nil
}

// startTLS upgrades the client connection (RFC 9051 section 6.2.1).
func (s *imapSession) startTLS(cmd *imapwire.Command) bool {
	if _, isTLS := s.conn.(*tls.Conn); isTLS || s.p.cfg.TLS == nil {
		s.say("%s BAD STARTTLS not available.\r\n", cmd.Tag)
		return true
	}
	if s.cr.Buffered() > 0 {
		// Bytes sent before the handshake would be read as if they came
		// through TLS: the command injection RFC 9051 6.2.1 warns about.
		s.say("%s BAD Commands pipelined after STARTTLS.\r\n", cmd.Tag)
		return false
	}
	s.say("%s OK Begin TLS negotiation now.\r\n", cmd.Tag)
	tc := tls.Server(s.conn, s.p.cfg.TLS)
	// The login deadline (set on the connection beneath) bounds the
	// handshake too.
	if err := tc.Handshake(); err != nil {
		s.logger.Info("TLS handshake failed", "err", err)
		return false
	}
	s.conn = tc
	s.cw = bufio.NewWriter(tc)
	s.cr = imapwire.NewCommandReader(tc, preLoginLimits)
	return true
}

// authenticate runs AUTHENTICATE PLAIN or LOGIN with the client (RFC 9051
// section 6.2.2, SASL-IR RFC 4959) and returns the credentials.
func (s *imapSession) authenticate(cmd *imapwire.Command) (user, pass string, ok bool) {
	if len(cmd.Args) < 1 {
		s.say("%s BAD AUTHENTICATE needs a mechanism.\r\n", cmd.Tag)
		return "", "", false
	}
	mech := strings.ToUpper(cmd.Args[0].Text)
	var ir []byte
	hasIR := false
	if len(cmd.Args) > 1 {
		hasIR = true
		if t := cmd.Args[1].Text; t != "=" {
			var err error
			if ir, err = base64.StdEncoding.DecodeString(t); err != nil {
				s.say("%s BAD Invalid base64 in initial response.\r\n", cmd.Tag)
				return "", "", false
			}
		}
	}
	step := func(challenge string) ([]byte, bool) {
		s.say("+ %s\r\n", base64.StdEncoding.EncodeToString([]byte(challenge)))
		line, err := s.cr.ReadLine()
		if err != nil {
			return nil, false
		}
		line = bytes.TrimRight(line, "\r\n")
		if string(line) == "*" {
			s.say("%s BAD Authentication aborted.\r\n", cmd.Tag)
			return nil, false
		}
		b, err := base64.StdEncoding.DecodeString(string(line))
		if err != nil {
			s.say("%s BAD Invalid base64 response.\r\n", cmd.Tag)
			return nil, false
		}
		return b, true
	}
	switch mech {
	case "PLAIN":
		if !hasIR {
			if ir, ok = step(""); !ok {
				return "", "", false
			}
		}
		// authzid NUL authcid NUL passwd (RFC 4616). A differing authzid
		// would be a proxy login, which the proxy does not relay.
		parts := strings.Split(string(ir), "\x00")
		if len(parts) != 3 || (parts[0] != "" && parts[0] != parts[1]) {
			s.say("%s NO [AUTHENTICATIONFAILED] Authentication failed.\r\n", cmd.Tag)
			return "", "", false
		}
		return parts[1], parts[2], true
	case "LOGIN":
		u := ir
		if !hasIR {
			if u, ok = step("Username:"); !ok {
				return "", "", false
			}
		}
		pw, ok := step("Password:")
		if !ok {
			return "", "", false
		}
		return string(u), string(pw), true
	}
	s.say("%s NO Unsupported authentication mechanism.\r\n", cmd.Tag)
	return "", "", false
}

// login logs in upstream as the user. On success the client gets OK with
// the filtered capabilities; a refusal is relayed with the upstream's
// response code and text.
func (s *imapSession) login(tag, user, pass string) bool {
	if s.p.cfg.Gate.Holding() {
		// A rewind or cycle is changing the store under Dovecot: a new
		// session would see it half done (docs/architecture.md, "Replay,
		// repair and history": logins get NO [UNAVAILABLE] until it is verified).
		s.say("%s NO [UNAVAILABLE] undomail: mail store under repair; try again in a few minutes.\r\n", tag)
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.p.cfg.UpstreamTimeout)
	defer cancel()
	up, err := s.p.dialUpstream(ctx)
	if err != nil {
		s.logger.Warn("upstream connection failed", "err", err)
		s.say("%s NO [UNAVAILABLE] undomail: mail server unavailable; try again later.\r\n", tag)
		return false
	}
	up.conn.SetDeadline(time.Now().Add(s.p.cfg.UpstreamTimeout))
	// Tell Dovecot who the client really is, as Dovecot's own proxy does:
	// it then logs, rate-limits and applies mail_max_userip_connections
	// per client address, not per undomail's. Dovecot honours this only
	// from login_trusted_networks and ignores it otherwise.
	if _, err := up.command("UI ID "+s.originatingID()+"\r\n", "UI"); err != nil {
		up.close()
		s.logger.Warn("upstream ID failed", "err", err)
		s.say("%s NO [UNAVAILABLE] undomail: mail server unavailable; try again later.\r\n", tag)
		return false
	}
	r, err := up.command("U0 LOGIN "+astring(user)+" "+astring(pass)+"\r\n", "U0")
	if err != nil {
		up.close()
		s.logger.Warn("upstream login failed", "err", err)
		s.say("%s NO [UNAVAILABLE] undomail: mail server unavailable; try again later.\r\n", tag)
		return false
	}
	if r.Name != "OK" {
		up.close()
		code := ""
		if r.Code != nil {
			code = "[" + r.Code.Name
			if r.Code.Text != "" {
				code += " " + r.Code.Text
			}
			code += "] "
		}
		s.say("%s %s %s%s\r\n", tag, r.Name, code, r.Text)
		s.logger.Info("login refused upstream", "user", user, "status", r.Name)
		return false
	}
	if r.Code == nil || r.Code.Name != "CAPABILITY" {
		if _, err := up.command("U1 CAPABILITY\r\n", "U1"); err != nil {
			up.close()
			s.say("%s NO [UNAVAILABLE] undomail: mail server unavailable; try again later.\r\n", tag)
			return false
		}
	}
	up.conn.SetDeadline(time.Time{})
	// Logged in: the login deadline and limits give way to the
	// authenticated state's idle timeout (set per command by the splice)
	// and Dovecot's post-login limits.
	s.conn.SetDeadline(time.Time{})
	s.cr.SetOptions(imapwire.Options{})
	s.up, s.user = up, user
	s.side = s.p.acquireSide(user, pass)
	s.logger = s.logger.With("user", user)
	s.logger.Info("logged in")
	return s.say("%s OK [CAPABILITY %s] Logged in\r\n", tag, strings.Join(postLoginCaps(up.caps), " ")) == nil
}

// originatingID is the ID parameter list (RFC 2971) naming the client's
// and undomail's addresses with the x-originating-*/x-connected-* keys
// Dovecot's login process understands.
func (s *imapSession) originatingID() string {
	var kv []string
	add := func(k, v string) {
		kv = append(kv, `"`+k+`" "`+strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(v)+`"`)
	}
	if h, p, err := net.SplitHostPort(s.conn.RemoteAddr().String()); err == nil {
		add("x-originating-ip", h)
		add("x-originating-port", p)
	}
	if h, p, err := net.SplitHostPort(s.conn.LocalAddr().String()); err == nil {
		add("x-connected-ip", h)
		add("x-connected-port", p)
	}
	add("x-session-ext-id", "undomail-"+s.id)
	return "(" + strings.Join(kv, " ") + ")"
}

// astring encodes s as an IMAP astring (RFC 9051 section 4.3): an atom
// where possible, a quoted string, or a non-synchronizing literal for
// bytes a quoted string cannot hold.
func astring(s string) string {
	atom := s != ""
	quotable := true
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte(`(){%*"\]`, c) >= 0 {
			atom = false
		}
		if c == '\r' || c == '\n' || c == 0 || c >= 0x80 {
			quotable = false
		}
	}
	switch {
	case atom:
		return s
	case quotable:
		return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(s) + `"`
	}
	return "{" + strconv.Itoa(len(s)) + "+}\r\n" + s
}
