// Package proxy holds undomail's front ends: protocol proxies that pass a
// client's traffic to the real mail server unchanged and record every
// mutating action as an intent in the undo log before it is forwarded.
package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/undomail/undomail/undolog"
)

// SMTPConfig configures one SMTP-family listener.
type SMTPConfig struct {
	// Upstream is the server mail is relayed to: Postfix's smtpd for the
	// front door, Dovecot's LMTP for delivery capture.
	Upstream string
	// LMTP makes the listener speak LMTP to its clients and to Upstream.
	LMTP bool
	// Hostname names undomail in the replies it gives itself (the
	// greeting while the upstream is down, a timeout). Every other reply,
	// the greeting included, is the upstream's.
	Hostname string
	// MaxMessageBytes limits what undomail spools of one message. 0 takes
	// the upstream's advertised SIZE, and no limit if it has none (the
	// upstream's own limit then applies). A limit below the upstream's
	// replaces SIZE in the EHLO reply.
	MaxMessageBytes int64
	// UpstreamTimeout bounds connecting and each read and write upstream.
	UpstreamTimeout time.Duration
	// ClientTimeout bounds each single read from and write to the client,
	// like Postfix's smtpd_timeout: a client that sends slowly but
	// steadily is never cut off.
	ClientTimeout time.Duration
	// XClient passes the client's address to the upstream with Postfix's
	// XCLIENT, so the upstream's relay policy sees the real client.
	// Ignored for LMTP.
	XClient bool
	// AllowInsecureAuth offers AUTH without TLS (loopback test setups).
	AllowInsecureAuth bool
	// TLS, if set, enables STARTTLS toward clients.
	TLS *tls.Config
	// Gate, if set, is passed by every transaction from its intent to its
	// outcome, so a snapshot can cut between transactions.
	Gate *Gate
	// Divert, if set, sees every logged LMTP delivery before it is
	// forwarded: filters a cycle left active for live mail. An outcome it
	// returns replaces forwarding (the message was dropped or filed
	// elsewhere); nil forwards as usual.
	Divert func(ctx context.Context, args DeliveryArgs, blob undolog.BlobRef) *DeliveryOutcome
}

// SMTPProxy is a write-ahead SMTP or LMTP relay. Commands and replies pass
// through as raw lines, so every decision about the protocol (syntax,
// limits, error counts, policy) and every reply text is the upstream's:
// whatever Postfix (Dovecot's LMTP) accepts, the proxy accepts, and a
// client gets Postfix's reply to whatever Postfix refuses. The proxy steps
// in only where it must (docs/smtp-parity.md): it takes the message itself
// at DATA or BDAT, logs the envelope and message durably, forwards them,
// logs the upstream's reply and only then relays that reply; it keeps
// XCLIENT and XFORWARD for itself and terminates TLS.
type SMTPProxy struct {
	cfg     SMTPConfig
	log     *undolog.Log
	logger  *slog.Logger
	dialer  dialer
	caps    upstreamCaps
	maxSize int64 // 0: no limit of undomail's own

	stop     atomic.Bool // set by Close: sessions end at their next command
	mu       sync.Mutex
	closed   bool
	lns      []net.Listener
	sessions map[*smtpSession]struct{}
	wg       sync.WaitGroup
}

// NewSMTP probes the upstream (retrying until ctx ends) and returns a proxy
// in front of it.
func NewSMTP(ctx context.Context, cfg SMTPConfig, log *undolog.Log, logger *slog.Logger) (*SMTPProxy, error) {
	if cfg.Upstream == "" {
		return nil, errors.New("smtp proxy: no upstream address")
	}
	if cfg.Hostname == "" {
		cfg.Hostname = "localhost"
	}
	if cfg.UpstreamTimeout == 0 {
		cfg.UpstreamTimeout = 5 * time.Minute
	}
	if cfg.ClientTimeout == 0 {
		cfg.ClientTimeout = 5 * time.Minute // Postfix's smtpd_timeout
	}
	proto := "smtp"
	if cfg.LMTP {
		proto = "lmtp"
	}
	p := &SMTPProxy{
		cfg:      cfg,
		log:      log,
		logger:   logger.With("listener", proto),
		dialer:   dialer{addr: cfg.Upstream, lmtp: cfg.LMTP, timeout: cfg.UpstreamTimeout, xclient: cfg.XClient, localName: cfg.Hostname},
		sessions: map[*smtpSession]struct{}{},
	}
	err := probeUntil(ctx, p.logger, proto, cfg.Upstream, func() (err error) {
		pctx, cancel := context.WithTimeout(ctx, cfg.UpstreamTimeout)
		defer cancel()
		p.caps, err = p.dialer.probe(pctx)
		return err
	})
	if err != nil {
		return nil, err
	}
	p.maxSize = p.caps.size
	if cfg.MaxMessageBytes > 0 && (p.maxSize == 0 || cfg.MaxMessageBytes < p.maxSize) {
		p.maxSize = cfg.MaxMessageBytes
	}
	p.logger.Info("upstream probed", "upstream", cfg.Upstream, "size", p.maxSize, "chunking", p.caps.chunking,
		"smtputf8", p.caps.smtpUTF8, "dsn", p.caps.dsn, "auth", p.caps.auth, "xclient", cfg.XClient && !cfg.LMTP)
	return p, nil
}

// Serve accepts connections on l until Close.
func (p *SMTPProxy) Serve(l net.Listener) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		l.Close()
		return nil
	}
	p.lns = append(p.lns, l)
	p.mu.Unlock()
	p.logger.Info("listening", "addr", l.Addr().String(), "upstream", p.cfg.Upstream)
	for {
		c, err := l.Accept()
		if err != nil {
			if p.stop.Load() {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return fmt.Errorf("accept on %s: %w", l.Addr(), err)
		}
		s := p.newSession(c)
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			c.Close()
			continue
		}
		p.sessions[s] = struct{}{}
		p.wg.Add(1)
		p.mu.Unlock()
		go func() {
			defer p.wg.Done()
			s.run()
			p.mu.Lock()
			delete(p.sessions, s)
			p.mu.Unlock()
		}()
	}
}

// Close stops accepting, lets connections finish their current command
// until ctx ends, then closes the rest. A transaction cut off between its
// intent and its outcome stays in the log without an outcome; its client
// got no acknowledgement and will retry.
func (p *SMTPProxy) Close(ctx context.Context) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.stop.Store(true)
	for _, l := range p.lns {
		l.Close()
	}
	for s := range p.sessions {
		if s.idle.Load() {
			s.raw.SetReadDeadline(time.Now())
		}
	}
	p.mu.Unlock()
	done := make(chan struct{})
	go func() { p.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	p.mu.Lock()
	for s := range p.sessions {
		s.raw.Close()
	}
	p.mu.Unlock()
	<-done
	return nil
}

// probeUntil retries probe every second until it succeeds or ctx ends: an
// upstream that starts after undomail (a container started in parallel)
// is waited for, within the caller's limit.
func probeUntil(ctx context.Context, logger *slog.Logger, proto, upstream string, probe func() error) error {
	for {
		err := probe()
		if err == nil {
			return nil
		}
		logger.Warn("upstream probe failed; retrying", "upstream", upstream, "err", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s proxy: probe upstream %s: %w", proto, upstream, err)
		case <-time.After(time.Second):
		}
	}
}

// Replies the proxy gives for commands it answers itself. Where Postfix
// (postfix/src/smtpd/smtpd.c) has a reply for the same situation, the
// proxy uses Postfix's words, so a client cannot tell the difference.
var (
	replyGoAheadSMTP  = Reply{Code: 354, Text: "End data with <CR><LF>.<CR><LF>"}
	replyGoAheadLMTP  = Reply{Code: 354, Text: "OK"} // Dovecot's LMTP
	replyTooBig       = Reply{Code: 552, Enhanced: "5.3.4", Text: "Error: message file too big"}
	replyDataInBDAT   = Reply{Code: 503, Enhanced: "5.5.1", Text: "Error: DATA after BDAT"}
	replyNoXClient    = Reply{Code: 550, Enhanced: "5.7.0", Text: "Error: insufficient authorization"}
	replyNoTLS        = Reply{Code: 502, Enhanced: "5.5.1", Text: "Error: command not implemented"}
	replyTLSActive    = Reply{Code: 554, Enhanced: "5.5.1", Text: "Error: TLS already active"}
	replyTLSSyntax    = Reply{Code: 501, Enhanced: "5.5.4", Text: "Syntax: STARTTLS"}
	replyTLSInTx      = Reply{Code: 503, Enhanced: "5.5.1", Text: "Error: MAIL transaction in progress"}
	replyTLSReady     = Reply{Code: 220, Enhanced: "2.0.0", Text: "Ready to start TLS"}
	replyAuthDisabled = Reply{Code: 503, Enhanced: "5.5.1", Text: "Error: authentication not enabled"}
	replyClosing      = Reply{Code: 221, Enhanced: "2.0.0", Text: "Bye"}
)

// errSMTPOver ends a session normally (QUIT, a 421, the client gone).
var errSMTPOver = errors.New("session over")

const (
	// maxVerb is how much of a line is read before it is classified; a
	// command the proxy handles itself is shorter.
	maxVerb = 16
	// maxKeptLine is how much of a command line the proxy keeps to parse
	// (addresses, HELO name) and to replay on a new upstream connection;
	// Postfix reads at most line_length_limit (2048) of a command.
	maxKeptLine = 4096
)

// smtpSession relays one client connection. One goroutine runs it: a
// command is read (and streamed upstream as it arrives), its reply read and
// relayed, then the next; pipelined commands wait in the client's buffer
// and their replies are flushed together (RFC 2920 section 3.1).
type smtpSession struct {
	p      *SMTPProxy
	id     string
	client clientInfo
	logger *slog.Logger
	raw    net.Conn // the client's connection as accepted
	conn   net.Conn // raw or its TLS layer, each read and write timed
	br     *bufio.Reader
	bw     *bufio.Writer
	tls    bool
	idle   atomic.Bool // waiting for the first byte of a command

	up       *upstreamConn // nil while there is no upstream connection
	hello    []byte        // the accepted HELO/EHLO/LHLO line, replayed on a new upstream connection
	auth     [][]byte      // the client's lines of its accepted AUTH exchange, likewise
	authUser string

	tx transaction
}

// transaction is the mail transaction in progress (RFC 5321 section 3.3).
type transaction struct {
	active   bool
	from     string
	body     string
	utf8     bool
	rcpts    []string
	rejected []RcptReply
	chunks   *chunkSpool // BDAT chunks so far
	undoID   string      // minted before the message is complete (BDAT at the front door)
}

// chunkSpool collects the chunks of one BDAT transaction (RFC 3030).
type chunkSpool struct {
	w     *undolog.BlobWriter
	sniff headerSniffer
	size  int64
	fail  *Reply // the reply every further chunk gets once one failed
}

func (p *SMTPProxy) newSession(c net.Conn) *smtpSession {
	var idb [8]byte
	rand.Read(idb[:])
	s := &smtpSession{p: p, id: hex.EncodeToString(idb[:]), client: clientInfo{addr: c.RemoteAddr()}, raw: c}
	s.conn = &timedConn{Conn: c, timeout: p.cfg.ClientTimeout, stop: &p.stop}
	s.br = bufio.NewReaderSize(s.conn, 64<<10)
	s.bw = bufio.NewWriterSize(s.conn, 4096)
	s.logger = p.logger.With("session", s.id, "client", s.client.addr.String())
	return s
}

// run greets the client with the upstream's greeting and relays commands
// until either side ends the session.
func (s *smtpSession) run() {
	defer func() {
		if s.up != nil {
			s.up.close()
		}
		s.raw.Close()
	}()
	if err := s.connect(); err != nil {
		// The client still gets a session: each command is answered 451
		// 4.4.1 until the upstream is back, so that clients retry.
		s.logger.Warn("upstream connection failed", "upstream", s.p.cfg.Upstream, "err", err)
		s.write([]byte("220 " + s.p.cfg.Hostname + " ESMTP\r\n"))
	} else {
		s.write(s.up.greeting)
		if s.up.greetCode == 421 {
			s.bw.Flush()
			return
		}
	}
	for {
		if s.p.stop.Load() {
			s.bw.Flush()
			return
		}
		err := s.command()
		if err == nil {
			continue
		}
		if !errors.Is(err, errSMTPOver) {
			s.readFailed(err)
		}
		s.bw.Flush()
		return
	}
}

// readFailed ends a session whose client read failed: a client silent for
// ClientTimeout gets Postfix's timeout reply.
func (s *smtpSession) readFailed(err error) {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() && !s.p.stop.Load() {
		s.reply(Reply{Code: 421, Enhanced: "4.4.2", Text: s.p.cfg.Hostname + " Error: timeout exceeded"})
		s.logger.Info("client timed out")
		return
	}
	if !errors.Is(err, io.EOF) && !s.p.stop.Load() {
		s.logger.Info("client connection ended", "err", err)
	}
}

// connect opens a new upstream connection (with XCLIENT at the front door).
func (s *smtpSession) connect() error {
	ctx, cancel := context.WithTimeout(context.Background(), s.p.cfg.UpstreamTimeout)
	defer cancel()
	u, err := s.p.dialer.dial(ctx, s.client, s.p.cfg.XClient && !s.p.cfg.LMTP)
	if err != nil {
		return err
	}
	s.up = u
	return nil
}

// reconnect replaces a lost upstream connection, greeting and
// authenticating again as the client had.
func (s *smtpSession) reconnect() error {
	if err := s.connect(); err != nil {
		return err
	}
	fail := func(what string, rep Reply, err error) error {
		s.dropUpstream()
		if err != nil {
			return fmt.Errorf("%s on the new upstream connection: %w", what, err)
		}
		return fmt.Errorf("%s on the new upstream connection: %s", what, rep)
	}
	if s.up.greetCode != 220 {
		return fail("greeting", replyFromText(s.up.greetCode, ""), nil)
	}
	if s.hello != nil {
		if _, rep, err := s.up.command(s.hello); err != nil || !rep.Positive() {
			return fail("greet again", rep, err)
		}
	}
	for i, l := range s.auth {
		_, rep, err := s.up.command(l)
		want := 334
		if i == len(s.auth)-1 {
			want = 235
		}
		if err != nil || rep.Code != want {
			return fail("authenticate again", rep, err)
		}
	}
	return nil
}

// dropUpstream closes the upstream connection, which abandons its
// transaction; the next command opens a new one.
func (s *smtpSession) dropUpstream() {
	if s.up != nil {
		s.up.close()
		s.up = nil
	}
}

// upstreamLost handles a broken upstream connection mid-command: the
// transaction is gone with it and the client is told to retry.
func (s *smtpSession) upstreamLost(op string, err error) {
	s.logger.Warn("upstream connection lost", "op", op, "err", err)
	s.dropUpstream()
	s.tx.reset()
}

func (t *transaction) reset() {
	if t.chunks != nil && t.chunks.w != nil {
		t.chunks.w.Abort()
	}
	*t = transaction{}
}

// write queues bytes for the client; they are flushed before the session
// waits for the client.
func (s *smtpSession) write(b []byte) { s.bw.Write(b) }

func (s *smtpSession) reply(r Reply) { s.bw.Write(r.wire()) }

// replyEach gives r once in SMTP and once per accepted recipient in LMTP
// (RFC 2033 section 4.2), the replies due after a message.
func (s *smtpSession) replyEach(r Reply) {
	if !s.p.cfg.LMTP {
		s.reply(r)
		return
	}
	for range s.tx.rcpts {
		s.reply(r)
	}
}

// fill waits until the client has sent something, flushing queued
// replies first.
func (s *smtpSession) fill() error {
	if s.br.Buffered() > 0 {
		return nil
	}
	if err := s.bw.Flush(); err != nil {
		return err
	}
	_, err := s.br.Peek(1)
	return err
}

// heldVerbs are the commands the proxy handles itself or must see whole
// before it forwards them.
var heldVerbs = []string{"DATA", "BDAT", "STARTTLS", "XCLIENT", "XFORWARD", "AUTH"}

// command reads one command and handles it. Bytes are forwarded as soon as
// the line cannot be one of heldVerbs, so the upstream sees a slow client
// as slow as it is.
func (s *smtpSession) command() error {
	var head []byte
	verbDone := false
	for {
		if s.br.Buffered() == 0 {
			if err := s.bw.Flush(); err != nil {
				return err
			}
			s.idle.Store(len(head) == 0)
			_, err := s.br.Peek(1)
			s.idle.Store(false)
			if err != nil {
				return err
			}
		}
		b, _ := s.br.ReadByte()
		head = append(head, b)
		if b == ' ' || b == '\t' || b == '\r' || b == '\n' || len(head) >= maxVerb {
			verbDone = true
			break
		}
		if !mayBeHeld(head) {
			break
		}
	}
	done := head[len(head)-1] == '\n'
	if !verbDone {
		return s.relay(head, done)
	}
	switch strings.ToUpper(strings.TrimRight(string(head), " \t\r\n")) {
	case "DATA":
		line, err := s.restOfLine(head, done)
		if err != nil {
			return err
		}
		return s.data(line)
	case "BDAT":
		if s.p.caps.chunking {
			line, err := s.restOfLine(head, done)
			if err != nil {
				return err
			}
			return s.bdat(line)
		}
	case "STARTTLS":
		line, err := s.restOfLine(head, done)
		if err != nil {
			return err
		}
		return s.starttls(line)
	case "XCLIENT", "XFORWARD":
		// Only undomail speaks for the client's identity upstream.
		if _, err := s.restOfLine(head, done); err != nil {
			return err
		}
		s.reply(replyNoXClient)
		return nil
	case "AUTH":
		if !s.authAllowed() {
			if _, err := s.restOfLine(head, done); err != nil {
				return err
			}
			s.reply(replyAuthDisabled)
			return nil
		}
	}
	return s.relay(head, done)
}

func mayBeHeld(head []byte) bool {
	h := strings.ToUpper(string(head))
	for _, v := range heldVerbs {
		if strings.HasPrefix(v, h) {
			return true
		}
	}
	return false
}

// verbOf is a command line's verb, upper case.
func verbOf(line []byte) string {
	f := bytes.FieldsFunc(line, func(r rune) bool { return r == ' ' || r == '\t' || r == '\r' || r == '\n' })
	if len(f) == 0 {
		return ""
	}
	return strings.ToUpper(string(f[0]))
}

// restOfLine reads the rest of a command line the proxy handles itself,
// keeping at most maxKeptLine bytes of it.
func (s *smtpSession) restOfLine(head []byte, done bool) ([]byte, error) {
	line := head
	for !done {
		if err := s.fill(); err != nil {
			return nil, err
		}
		buf, _ := s.br.Peek(s.br.Buffered())
		n := len(buf)
		if i := bytes.IndexByte(buf, '\n'); i >= 0 {
			n, done = i+1, true
		}
		if room := maxKeptLine - len(line); room > 0 {
			line = append(line, buf[:min(n, room)]...)
		}
		s.br.Discard(n)
	}
	return line, nil
}

// forwardLine streams the rest of a line to the upstream as it arrives (a
// client sending slowly is seen as slow by the upstream too, whose own
// timeouts then apply) and returns the line as far as it is kept.
func (s *smtpSession) forwardLine(head []byte, done bool) ([]byte, error) {
	line := append([]byte(nil), head...)
	s.up.bw.Write(head)
	for !done {
		if s.br.Buffered() == 0 {
			if err := s.up.bw.Flush(); err != nil {
				return nil, err
			}
		}
		if err := s.fill(); err != nil {
			return nil, err
		}
		buf, _ := s.br.Peek(s.br.Buffered())
		n := len(buf)
		if i := bytes.IndexByte(buf, '\n'); i >= 0 {
			n, done = i+1, true
		}
		s.up.bw.Write(buf[:n])
		if room := maxKeptLine - len(line); room > 0 {
			line = append(line, buf[:min(n, room)]...)
		}
		s.br.Discard(n)
	}
	return line, nil
}

// relay passes a command to the upstream and its reply to the client,
// noting what the session needs to know (the envelope, the greeting, the
// authentication) on the way.
func (s *smtpSession) relay(head []byte, done bool) error {
	verb := verbOf(head)
	if s.up == nil {
		if err := s.reconnect(); err != nil {
			s.logger.Warn("upstream connection failed", "upstream", s.p.cfg.Upstream, "err", err)
			if _, err := s.restOfLine(head, done); err != nil {
				return err
			}
			if verb == "QUIT" {
				s.reply(replyClosing)
				return errSMTPOver
			}
			s.reply(replyUpstreamDown)
			return nil
		}
	}
	line, err := s.forwardLine(head, done)
	if err != nil {
		return err // the client is gone; so is the upstream session with it
	}
	verb = verbOf(line)
	raw, rep, err := s.up.reply()
	if err != nil {
		s.upstreamLost(verb, err)
		s.reply(replyUpstreamLost)
		return nil
	}
	switch verb {
	case "DATA":
		if rep.Code == 354 {
			return s.receive(raw, true)
		}
	case "AUTH":
		if raw, rep, err = s.authExchange(line, raw, rep); err != nil {
			return err
		}
	case "EHLO", "HELO", "LHLO":
		if rep.Positive() {
			s.hello = line
			s.tx.reset()
			if verb != "HELO" {
				raw = s.filterExtensions(raw)
			}
		}
	case "MAIL":
		if rep.Positive() {
			s.tx.reset()
			s.tx.active = true
			s.tx.from, s.tx.body, s.tx.utf8 = parseMailFrom(line)
		}
	case "RCPT":
		if s.tx.active {
			to := parseRcptTo(line)
			if rep.Positive() {
				s.tx.rcpts = append(s.tx.rcpts, to)
			} else {
				s.tx.rejected = append(s.tx.rejected, RcptReply{Rcpt: to, Reply: rep})
			}
		}
	case "RSET":
		if rep.Positive() {
			s.tx.reset()
		}
	case "QUIT":
		s.write(raw)
		return errSMTPOver
	}
	s.write(raw)
	if sessionEnds(rep) {
		return errSMTPOver
	}
	return nil
}

// authExchange relays the rest of an AUTH exchange (RFC 4954 section 4):
// each 334 challenge to the client, each response line (a "*" that cancels
// included) to the upstream, which decides. The client's lines of an
// exchange that succeeds are kept to authenticate a new upstream
// connection the same way.
func (s *smtpSession) authExchange(cmd, raw []byte, rep Reply) ([]byte, Reply, error) {
	lines := [][]byte{cmd}
	for rep.Code == 334 {
		s.write(raw)
		if err := s.fill(); err != nil {
			return nil, rep, err
		}
		line, err := s.forwardLine(nil, false)
		if err != nil {
			return nil, rep, err
		}
		lines = append(lines, line)
		if raw, rep, err = s.up.reply(); err != nil {
			s.upstreamLost("AUTH", err)
			return replyUpstreamLost.wire(), replyUpstreamLost, nil
		}
	}
	if rep.Code == 235 {
		s.auth, s.authUser = lines, saslUser(lines)
		s.logger.Info("authenticated upstream", "user", s.authUser)
	}
	return raw, rep, nil
}

// saslUser finds the user name in a PLAIN (RFC 4616) or LOGIN exchange,
// for the log; "" for other mechanisms.
func saslUser(lines [][]byte) string {
	f := strings.Fields(string(lines[0]))
	if len(f) < 2 {
		return ""
	}
	resp := ""
	if len(f) > 2 {
		resp = f[2]
	} else if len(lines) > 1 {
		resp = strings.TrimSpace(string(lines[1]))
	}
	b, err := base64.StdEncoding.DecodeString(resp)
	if err != nil {
		return ""
	}
	switch strings.ToUpper(f[1]) {
	case "PLAIN":
		if parts := strings.Split(string(b), "\x00"); len(parts) == 3 {
			return parts[1]
		}
	case "LOGIN":
		return string(b)
	}
	return ""
}

func (s *smtpSession) authAllowed() bool { return s.tls || s.p.cfg.AllowInsecureAuth }

// filterExtensions edits the upstream's EHLO/LHLO reply: XCLIENT and
// XFORWARD are undomail's own, STARTTLS is undomail's to offer (it
// terminates TLS), AUTH is withheld without TLS unless allowed, and SIZE
// names undomail's own limit when that is lower.
func (s *smtpSession) filterExtensions(raw []byte) []byte {
	lines := capLines(raw)
	if len(lines) == 0 {
		return raw
	}
	out := [][]byte{lines[0]}
	for _, l := range lines[1:] {
		kw, _, _ := strings.Cut(strings.ToUpper(string(l)), " ")
		switch {
		case kw == "XCLIENT", kw == "XFORWARD", kw == "STARTTLS":
			continue
		case kw == "AUTH" || strings.HasPrefix(kw, "AUTH="):
			if !s.authAllowed() {
				continue
			}
		case kw == "SIZE" && s.p.maxSize > 0 && s.p.maxSize != s.p.caps.size:
			l = []byte("SIZE " + strconv.FormatInt(s.p.maxSize, 10))
		}
		out = append(out, l)
	}
	if s.p.cfg.TLS != nil && !s.tls {
		out = append(out, []byte("STARTTLS"))
	}
	var b bytes.Buffer
	for i, l := range out {
		sep := "-"
		if i == len(out)-1 {
			sep = " "
		}
		b.WriteString(string(raw[:3]) + sep)
		b.Write(l)
		b.WriteString("\r\n")
	}
	return b.Bytes()
}

// starttls terminates TLS for the client (RFC 3207). The session starts
// over afterwards (section 4.2), upstream too: a new upstream connection,
// so a client that skips EHLO after TLS gets the upstream's answer to that.
func (s *smtpSession) starttls(line []byte) error {
	switch {
	case s.p.cfg.TLS == nil:
		s.reply(replyNoTLS)
		return nil
	case len(bytes.Fields(line)) != 1:
		s.reply(replyTLSSyntax)
		return nil
	case s.tx.active:
		s.reply(replyTLSInTx)
		return nil
	case s.tls:
		s.reply(replyTLSActive)
		return nil
	}
	s.reply(replyTLSReady)
	if err := s.bw.Flush(); err != nil {
		return err
	}
	// Anything sent in the clear after STARTTLS is dropped, never taken
	// as a command of the protected session (CVE-2011-0411).
	s.br.Discard(s.br.Buffered())
	tc := tls.Server(s.raw, s.p.cfg.TLS)
	s.raw.SetDeadline(time.Now().Add(s.p.cfg.ClientTimeout))
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	s.raw.SetDeadline(time.Time{})
	s.conn = &timedConn{Conn: tc, timeout: s.p.cfg.ClientTimeout, stop: &s.p.stop}
	s.br.Reset(s.conn)
	s.bw.Reset(s.conn)
	s.tls = true
	s.dropUpstream()
	s.hello, s.auth, s.authUser = nil, nil, ""
	s.tx.reset()
	if err := s.connect(); err != nil {
		s.logger.Warn("upstream connection failed", "upstream", s.p.cfg.Upstream, "err", err)
	}
	return nil
}

// parseMailFrom extracts the reverse-path and the BODY and SMTPUTF8
// parameters from a MAIL command the upstream accepted. It is lenient: the
// upstream already judged the syntax; this is only what the log records.
func parseMailFrom(line []byte) (from, body string, utf8 bool) {
	from, params := parsePath(line, "FROM:")
	for _, p := range strings.Fields(params) {
		k, v, _ := strings.Cut(p, "=")
		switch strings.ToUpper(k) {
		case "BODY":
			body = strings.ToUpper(v)
		case "SMTPUTF8":
			utf8 = true
		}
	}
	return from, body, utf8
}

func parseRcptTo(line []byte) string {
	to, _ := parsePath(line, "TO:")
	return to
}

// parsePath returns the address after key ("FROM:", "TO:") and the
// parameters after it. Inside angle brackets a quoted local part (RFC 5321
// section 4.1.2) may hold spaces and '>'.
func parsePath(line []byte, key string) (addr, params string) {
	s := strings.TrimRight(string(line), "\r\n")
	i := strings.Index(strings.ToUpper(s), key)
	if i < 0 {
		return "", ""
	}
	s = strings.TrimLeft(s[i+len(key):], " \t")
	if !strings.HasPrefix(s, "<") {
		addr, params, _ = strings.Cut(s, " ")
		return addr, params
	}
	quoted := false
	for j := 1; j < len(s); j++ {
		switch s[j] {
		case '\\':
			j++
		case '"':
			quoted = !quoted
		case '>':
			if !quoted {
				return s[1:j], s[j+1:]
			}
		}
	}
	return s[1:], ""
}

// data takes a message sent with DATA. When the transaction has accepted
// recipients the proxy gives the go-ahead itself, spools and logs the
// message, and only then opens DATA upstream; otherwise the upstream
// answers the command (and words the refusal).
func (s *smtpSession) data(line []byte) error {
	if s.p.cfg.LMTP && s.tx.chunks != nil {
		// The upstream has not seen the chunks (bdat).
		s.reply(replyDataInBDAT)
		return nil
	}
	bare := bytes.EqualFold(bytes.TrimRight(line, "\r\n"), []byte("DATA"))
	if bare && len(s.tx.rcpts) > 0 && s.tx.chunks == nil {
		goAhead := replyGoAheadSMTP
		if s.p.cfg.LMTP {
			goAhead = replyGoAheadLMTP
		}
		return s.receive(goAhead.wire(), false)
	}
	if s.up == nil {
		if err := s.reconnect(); err != nil {
			s.logger.Warn("upstream connection failed", "upstream", s.p.cfg.Upstream, "err", err)
			s.reply(replyUpstreamDown)
			return nil
		}
	}
	raw, rep, err := s.up.command(line)
	if err != nil {
		s.upstreamLost("DATA", err)
		s.reply(replyUpstreamLost)
		return nil
	}
	if rep.Code != 354 {
		s.write(raw)
		if sessionEnds(rep) {
			return errSMTPOver
		}
		return nil
	}
	return s.receive(raw, true)
}

// receive gives the go-ahead, spools the message the client sends and
// delivers it. upOpen says the upstream already gave its own go-ahead.
func (s *smtpSession) receive(goAhead []byte, upOpen bool) error {
	s.write(goAhead)
	w, err := s.p.log.NewBlob()
	if err != nil {
		s.logger.Error("create blob failed", "err", err)
	}
	var sniff headerSniffer
	var dst io.Writer = io.Discard
	if w != nil {
		dst = io.MultiWriter(w, &sniff)
	}
	over, rerr := s.readData(dst)
	if rerr != nil {
		if w != nil {
			w.Abort()
		}
		return rerr // the client is gone or timed out; the session ends
	}
	var fail *Reply
	var ref undolog.BlobRef
	switch {
	case w == nil:
		fail = logFailure(err)
	case over:
		w.Abort()
		fail = &replyTooBig
	default:
		if ref, err = w.Commit(); err != nil {
			s.logger.Error("commit blob failed", "err", err)
			fail = logFailure(err)
		}
	}
	if fail != nil {
		s.abortUpstream(upOpen)
		s.replyEach(*fail)
		s.tx.reset()
		return nil
	}
	s.deliver(ref, sniff.info(), func(u *upstreamConn, trace []byte, src io.Reader) error {
		if !upOpen {
			raw, rep, err := u.command([]byte("DATA\r\n"))
			if err != nil {
				return err
			}
			if rep.Code != 354 {
				// The upstream refused DATA itself (its
				// smtpd_data_restrictions): that is the outcome.
				return &errRefused{raw: raw, rep: rep}
			}
		}
		dw := &dotWriter{w: u.bw, start: true}
		dw.Write(trace)
		if _, err := io.Copy(dw, src); err != nil {
			return err
		}
		dw.close()
		return nil
	})
	return nil
}

// errRefused carries an upstream's refusal of DATA to deliver.
type errRefused struct {
	raw []byte
	rep Reply
}

func (e *errRefused) Error() string { return e.rep.String() }

// logFailure is the reply when the log cannot take a message.
func logFailure(err error) *Reply {
	if errors.Is(err, undolog.ErrFull) {
		return &replyLogFull
	}
	return &replyLogUnavailable
}

// abortUpstream brings the upstream out of a transaction the client's
// message will not complete: RSET, or, inside DATA, a new connection.
func (s *smtpSession) abortUpstream(upOpen bool) {
	if s.up == nil {
		return
	}
	if upOpen {
		s.dropUpstream()
		return
	}
	if _, _, err := s.up.command([]byte("RSET\r\n")); err != nil {
		s.upstreamLost("RSET", err)
	}
}

// readData reads a message up to its end-of-data line and writes it,
// unstuffed, to dst. The end and the dot-unstuffing follow Postfix's smtpd
// exactly, so that the proxy and Postfix never disagree on where a message
// ends (which would let a client smuggle commands): a line is ended by LF,
// any CRs before the LF are not part of it (Postfix's smtp_get), and a
// line that is "." alone ends the message (RFC 5321 section 4.5.2 for CRLF; Postfix also takes a bare LF).
// over reports that the message exceeds the proxy's size limit: it is read
// to its end and no further byte is written.
func (s *smtpSession) readData(dst io.Writer) (over bool, err error) {
	atStart := true
	var n int64
	for {
		if err := s.fill(); err != nil {
			return over, err
		}
		b, err := s.br.ReadSlice('\n')
		if err != nil && err != bufio.ErrBufferFull {
			return over, err
		}
		whole := err == nil
		if atStart && len(b) > 0 && b[0] == '.' {
			if whole && len(bytes.TrimRight(b[1:len(b)-1], "\r")) == 0 {
				return over, nil
			}
			b = b[1:]
		}
		atStart = whole
		n += int64(len(b))
		if s.p.maxSize > 0 && n > s.p.maxSize {
			over = true
		}
		if !over {
			dst.Write(b)
		}
	}
}

// bdat takes a chunk of a message sent with BDAT (RFC 3030). At the front
// door each chunk but the last goes upstream as it arrives, after a first
// chunk of undomail's own with the trace header, and the upstream answers
// it: Postfix cannot accept a message before its last chunk, which goes
// upstream only once the whole message is logged. The LMTP capture must
// see the message's header before it knows whether to add a trace header
// (linkSubmission), so it acknowledges chunks itself and sends the logged
// message upstream as one chunk. Without accepted recipients the upstream
// answers (and words the refusal).
func (s *smtpSession) bdat(line []byte) error {
	f := strings.Fields(string(line))
	var size int64 = -1
	if len(f) == 2 || len(f) == 3 {
		size, _ = strconv.ParseInt(f[1], 10, 64)
	}
	last := len(f) == 3 && strings.EqualFold(f[2], "LAST")
	if size < 0 || (len(f) == 3 && !last) || (len(s.tx.rcpts) == 0 && s.tx.chunks == nil) {
		return s.passChunk(line, size)
	}
	if err := s.bw.Flush(); err != nil {
		return err
	}
	relay := !s.p.cfg.LMTP
	c := s.tx.chunks
	if c == nil {
		c = &chunkSpool{}
		w, err := s.p.log.NewBlob()
		if err != nil {
			s.logger.Error("create blob failed", "err", err)
			c.fail = logFailure(err)
		} else {
			c.w = w
		}
		s.tx.chunks = c
		if relay && c.fail == nil {
			s.tx.undoID = undolog.NewID()
			trace := TraceHeader + ": " + s.tx.undoID + "\r\n"
			raw, rep, err := s.up.command([]byte(fmt.Sprintf("BDAT %d\r\n%s", len(trace), trace)))
			if err != nil || !rep.Positive() {
				if _, err := io.CopyN(io.Discard, s.br, size); err != nil {
					return err
				}
				if err != nil {
					s.upstreamLost("BDAT", err)
					s.reply(replyUpstreamLost)
					return nil
				}
				s.tx.reset()
				s.write(raw)
				return nil
			}
		}
	}
	var dst io.Writer = io.Discard
	if c.fail == nil {
		c.size += size
		if s.p.maxSize > 0 && c.size > s.p.maxSize {
			c.fail = &replyTooBig
		} else {
			dst = io.MultiWriter(c.w, &c.sniff)
		}
	}
	if relay && !last && c.fail == nil {
		fmt.Fprintf(s.up.bw, "BDAT %d\r\n", size)
		dst = io.MultiWriter(dst, s.up.bw)
	}
	if _, err := io.CopyN(dst, s.br, size); err != nil {
		var ne net.Error
		if errors.Is(err, io.EOF) || errors.As(err, &ne) {
			return err
		}
		s.logger.Error("write blob failed", "err", err)
		c.fail = logFailure(err)
	}
	if !last {
		switch {
		case c.fail != nil:
			s.reply(*c.fail)
		case relay:
			raw, rep, err := s.up.reply()
			if err != nil {
				s.upstreamLost("BDAT", err)
				s.reply(replyUpstreamLost)
				return nil
			}
			s.write(raw)
			if sessionEnds(rep) {
				return errSMTPOver
			}
		default:
			// Dovecot's LMTP words it so (only the capture holds chunks).
			s.reply(Reply{Code: 250, Enhanced: "2.0.0", Text: fmt.Sprintf("Added %d octets", size)})
		}
		return nil
	}
	var ref undolog.BlobRef
	var err error
	if c.fail == nil {
		if ref, err = c.w.Commit(); err != nil {
			s.logger.Error("commit blob failed", "err", err)
			c.fail = logFailure(err)
		}
	}
	if c.fail != nil {
		s.abortUpstream(false)
		s.replyEach(*c.fail)
		s.tx.reset()
		return nil
	}
	c.w = nil
	hdr := c.sniff.info()
	s.deliver(ref, hdr, func(u *upstreamConn, trace []byte, src io.Reader) error {
		if relay {
			// The trace header and the chunks before this one are
			// upstream already; the last chunk is the blob's tail.
			if _, err := io.CopyN(io.Discard, src, ref.Size-size); err != nil {
				return err
			}
			trace = nil
		} else {
			size = int64(len(trace)) + ref.Size
		}
		fmt.Fprintf(u.bw, "BDAT %d LAST\r\n", size)
		u.bw.Write(trace)
		_, err := io.Copy(u.bw, src)
		return err
	})
	return nil
}

// sessionEnds reports whether the upstream closes the session after this
// reply: 421 (RFC 5321 section 3.8), 521 and 221 (Postfix ends a session
// with them after a malformed BDAT or a non-SMTP command).
func sessionEnds(rep Reply) bool {
	return rep.Code == 421 || rep.Code == 521 || rep.Code == 221
}

// passChunk relays a BDAT command the upstream is to answer, with its
// chunk (which the upstream reads and discards after a refusal, RFC 3030
// section 3). size < 0: the command is malformed and has no chunk.
func (s *smtpSession) passChunk(line []byte, size int64) error {
	if s.up == nil {
		if err := s.reconnect(); err != nil {
			if size > 0 {
				if _, err := io.CopyN(io.Discard, s.br, size); err != nil {
					return err
				}
			}
			s.reply(replyUpstreamDown)
			return nil
		}
	}
	if err := s.bw.Flush(); err != nil {
		return err
	}
	s.up.bw.Write(line)
	if size > 0 {
		if _, err := io.CopyN(s.up.bw, s.br, size); err != nil {
			return err
		}
	}
	raw, rep, err := s.up.reply()
	if err != nil {
		s.upstreamLost("BDAT", err)
		s.reply(replyUpstreamLost)
		return nil
	}
	s.write(raw)
	if sessionEnds(rep) {
		return errSMTPOver
	}
	return nil
}

// dotWriter writes a message as DATA content (RFC 5321 section 4.5.2):
// lines end in CRLF (a bare LF, which Postfix takes as a line end too,
// gets its CR) and a line starting with "." gets another.
type dotWriter struct {
	w     *bufio.Writer
	start bool // at the start of a line
	cr    bool // the last byte written was CR
}

func (d *dotWriter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		if d.start && p[0] == '.' {
			d.w.WriteByte('.')
		}
		d.start = false
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			d.w.Write(p)
			d.cr = p[len(p)-1] == '\r'
			break
		}
		d.w.Write(p[:i])
		if !(i > 0 && p[i-1] == '\r' || i == 0 && d.cr) {
			d.w.WriteByte('\r')
		}
		d.w.WriteByte('\n')
		d.start, d.cr = true, false
		p = p[i+1:]
	}
	return n, nil
}

func (d *dotWriter) close() {
	if !d.start {
		d.w.WriteString("\r\n")
	}
	d.w.WriteString(".\r\n")
}

// deliver is the write-ahead transaction for a spooled message: log the
// intent durably, send the message upstream with send, log the outcome,
// and relay it. send writes the message (and the trace header before it);
// An *errRefused means the upstream refused to take it.
func (s *smtpSession) deliver(blob undolog.BlobRef, hdr HeaderInfo, send func(u *upstreamConn, trace []byte, src io.Reader) error) {
	ctx := context.Background()
	defer s.tx.reset()
	helo := ""
	if f := strings.Fields(string(s.hello)); len(f) > 1 {
		helo = f[1]
	}
	args := DeliveryArgs{
		Client:   s.client.addr.String(),
		Helo:     helo,
		AuthUser: s.authUser,
		MailFrom: s.tx.from,
		Body:     s.tx.body,
		SMTPUTF8: s.tx.utf8,
		Rcpts:    s.tx.rcpts,
		Rejected: s.tx.rejected,
		Size:     blob.Size,
		Header:   hdr,
	}
	kind := KindSMTPSubmit
	if s.p.cfg.LMTP {
		kind = KindLMTPDeliver
		if err := s.linkSubmission(ctx, &args); err != nil {
			s.logger.Error("look up front-door submission failed; transaction refused", "err", err)
			s.abortUpstream(false)
			s.replyEach(replyLogUnavailable)
			return
		}
	}
	if args.UndoID == "" {
		args.UndoID = s.tx.undoID
	}
	if args.UndoID == "" {
		args.UndoID = undolog.NewID()
	}
	users := append([]string(nil), s.tx.rcpts...)
	if s.authUser != "" {
		users = append(users, s.authUser)
	}
	argsJSON, _ := json.Marshal(args)
	gctx, cancel := context.WithTimeout(ctx, WedgeWait)
	err := s.p.cfg.Gate.Enter(gctx)
	cancel()
	if err != nil {
		s.logger.Warn("transaction refused: paused", "undo_id", args.UndoID)
		s.abortUpstream(false)
		s.replyEach(replyPaused)
		return
	}
	defer s.p.cfg.Gate.Leave()
	intent := &undolog.Record{User: s.authUser, Session: s.id, Kind: kind, Users: users, Args: argsJSON}
	intent.AttachBlob(blob)
	if err := s.p.log.Append(ctx, intent); err != nil {
		s.logger.Error("log intent failed; transaction refused", "undo_id", args.UndoID, "err", err)
		s.abortUpstream(false)
		s.replyEach(*logFailure(err))
		return
	}
	seq := intent.Seq
	var out *DeliveryOutcome
	var raw []byte
	if s.p.cfg.LMTP && s.p.cfg.Divert != nil {
		if out = s.p.cfg.Divert(ctx, args, blob); out != nil {
			s.abortUpstream(false)
		}
	}
	if out == nil {
		out, raw = s.forward(args, blob, send)
	}
	outJSON, _ := json.Marshal(out)
	// The outcome is written before the client hears it, but not fsynced
	// first: the intent already holds everything the sender handed over,
	// so a power failure within undolog.SyncLag can only leave the verb's
	// outcome unknown, never lose the message. A crash of undomail itself
	// loses nothing: the write is in the kernel.
	if err := s.p.log.AppendNoSync(ctx, &undolog.Record{
		User: s.authUser, Session: s.id, Kind: undolog.KindOutcome, Ref: seq, Users: users, Outcome: outJSON,
	}); err != nil {
		s.logger.Error("log outcome failed; client told to retry", "seq", seq, "undo_id", args.UndoID, "err", err)
		s.replyEach(replyOutcomeUnlogged)
		return
	}
	s.logger.Info("relayed", "seq", seq, "undo_id", args.UndoID, "from", args.MailFrom, "rcpts", len(args.Rcpts),
		"size", args.Size, "reply", out.Summary())
	if raw != nil {
		s.write(raw)
		return
	}
	if out.Reply != nil {
		s.reply(*out.Reply)
		return
	}
	for _, r := range out.Rcpts {
		s.reply(r.Reply)
	}
}

// linkSubmission recognises a delivery of a message that came in through
// the front door: its topmost Undomail-Id (Postfix adds only a Received
// field above it) names an smtp.submit verb in the log. The delivery then
// shares that id instead of minting a second one. An id the log does not
// know as a submission, e.g. one a sender wrote into its own message, is
// ignored: only ids undomail minted can link.
func (s *smtpSession) linkSubmission(ctx context.Context, args *DeliveryArgs) error {
	if len(args.Header.PriorIDs) == 0 {
		return nil
	}
	id := args.Header.PriorIDs[0]
	recs, err := s.p.log.Records(ctx, undolog.Filter{UndoID: id, Kinds: []string{KindSMTPSubmit}, Limit: 1})
	if err != nil {
		return err
	}
	if len(recs) == 1 {
		args.UndoID, args.Submission = id, recs[0].Seq
	}
	return nil
}

// forward sends the logged message upstream with the trace header and
// reads the reply: one in SMTP, one per recipient in LMTP. It never
// returns without an outcome: failures become the 4xx reply the client
// will get. raw is the upstream's reply as sent, to relay unchanged, when
// there is one.
func (s *smtpSession) forward(args DeliveryArgs, blob undolog.BlobRef, send func(*upstreamConn, []byte, io.Reader) error) (*DeliveryOutcome, []byte) {
	fail := func(op string, err error) *DeliveryOutcome {
		s.logger.Warn("upstream failed", "op", op, "err", err)
		s.dropUpstream()
		out := &DeliveryOutcome{Error: fmt.Sprintf("%s: %v", op, err)}
		s.outcomeFor(out, replyUpstreamLost)
		return out
	}
	if s.up == nil {
		return fail("connect", errors.New("no upstream connection")), nil
	}
	src, err := s.p.log.OpenRef(blob)
	if err != nil {
		return fail("open blob", err), nil
	}
	defer src.Close()
	var trace []byte
	if args.Submission == 0 {
		trace = []byte(TraceHeader + ": " + args.UndoID + "\r\n")
	}
	if err := send(s.up, trace, src); err != nil {
		var ref *errRefused
		if errors.As(err, &ref) {
			out := &DeliveryOutcome{}
			s.outcomeFor(out, ref.rep)
			if s.p.cfg.LMTP {
				return out, nil
			}
			return out, ref.raw
		}
		// A read error here is a blob that failed verification; never
		// complete a message whose content is not what was logged.
		return fail("send message", err), nil
	}
	if !s.p.cfg.LMTP {
		raw, rep, err := s.up.reply()
		if err != nil {
			return fail("end of data", err), nil
		}
		return &DeliveryOutcome{Reply: &rep}, raw
	}
	out := &DeliveryOutcome{}
	var all []byte
	for _, rc := range args.Rcpts {
		raw, rep, err := s.up.reply()
		if err != nil {
			// The recipients answered so far keep their replies.
			o := fail("end of data", err)
			for i := len(out.Rcpts); i < len(args.Rcpts); i++ {
				out.Rcpts = append(out.Rcpts, RcptReply{Rcpt: args.Rcpts[i], Reply: o.Rcpts[i].Reply})
			}
			out.Error = o.Error
			return out, nil
		}
		all = append(all, raw...)
		out.Rcpts = append(out.Rcpts, RcptReply{Rcpt: rc, Reply: rep})
	}
	return out, all
}

// outcomeFor sets rep as the outcome: the reply in SMTP, every
// recipient's in LMTP.
func (s *smtpSession) outcomeFor(out *DeliveryOutcome, rep Reply) {
	if !s.p.cfg.LMTP {
		out.Reply = &rep
		return
	}
	out.Rcpts = nil
	for _, rc := range s.tx.rcpts {
		out.Rcpts = append(out.Rcpts, RcptReply{Rcpt: rc, Reply: rep})
	}
}
