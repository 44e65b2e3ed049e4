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
	"github.com/undomail/undomail/verb"
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
	Divert func(ctx context.Context, args verb.DeliveryArgs, blob undolog.BlobRef) *verb.DeliveryOutcome
	// Collect, if set, takes the deliveries of LMTP sessions whose LHLO
	// name is verb.ReplayLHLO: Postfix's replay service handing back what it
	// decided for mail a replay gave it again (docs/operations.md,
	// "Replay through Postfix"). In such a session MAIL, RCPT and RSET
	// never reach the upstream and every recipient is accepted; the
	// message is neither gated nor logged as a new delivery. Collect's
	// outcome is the reply; nil refuses the message (no replay waits for
	// it).
	Collect func(ctx context.Context, args verb.DeliveryArgs, blob undolog.BlobRef) *verb.DeliveryOutcome
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
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("accept on %s: %w", l.Addr(), err)
			}
			// Out of file descriptors and the like: wait and go on, as
			// net/http's server does, rather than stop taking mail.
			p.logger.Warn("accept failed; retrying", "addr", l.Addr().String(), "err", err)
			time.Sleep(100 * time.Millisecond)
			continue
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
// has a reply for the same situation, the proxy uses Postfix's words, so a
// client cannot tell the difference (docs/smtp-parity.md; the parity tests
// compare them with Postfix's own).
var (
	replyGoAheadSMTP  = verb.Reply{Code: 354, Text: "End data with <CR><LF>.<CR><LF>"}
	replyGoAheadLMTP  = verb.Reply{Code: 354, Text: "OK"} // Dovecot's LMTP
	replyTooBig       = verb.Reply{Code: 552, Enhanced: "5.3.4", Text: "Error: message file too big"}
	replyDataInBDAT   = verb.Reply{Code: 503, Enhanced: "5.5.1", Text: "Error: DATA after BDAT"}
	replyNoXClient    = verb.Reply{Code: 550, Enhanced: "5.7.0", Text: "Error: insufficient authorization"}
	replyNoTLS        = verb.Reply{Code: 502, Enhanced: "5.5.1", Text: "Error: command not implemented"}
	replyTLSActive    = verb.Reply{Code: 554, Enhanced: "5.5.1", Text: "Error: TLS already active"}
	replyTLSSyntax    = verb.Reply{Code: 501, Enhanced: "5.5.4", Text: "Syntax: STARTTLS"}
	replyTLSInTx      = verb.Reply{Code: 503, Enhanced: "5.5.1", Text: "Error: MAIL transaction in progress"}
	replyTLSReady     = verb.Reply{Code: 220, Enhanced: "2.0.0", Text: "Ready to start TLS"}
	replyAuthDisabled = verb.Reply{Code: 503, Enhanced: "5.5.1", Text: "Error: authentication not enabled"}
	replyClosing      = verb.Reply{Code: 221, Enhanced: "2.0.0", Text: "Bye"}
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
	rejected []verb.RcptReply
	chunks   *chunkSpool // BDAT chunks so far
	undoID   string      // minted before the message is complete (BDAT at the front door)
	upOpen   bool        // the upstream is inside DATA already (it gave its own go-ahead)
	linked   bool        // submission looked up for linkID (LMTP)
	linkID   string      // the undo id looked up
	subSeq   int64       // the front door's smtp.submit with that id, 0 if none
	subBlob  string      // and its blob
}

// chunkSpool collects the chunks of one BDAT transaction (RFC 3030).
type chunkSpool struct {
	w     *undolog.BlobWriter
	sniff headerSniffer
	size  int64
	fail  *verb.Reply // the reply every further chunk gets once one failed
}

func (p *SMTPProxy) newSession(c net.Conn) *smtpSession {
	var idb [8]byte
	rand.Read(idb[:])
	s := &smtpSession{p: p, id: hex.EncodeToString(idb[:]), client: clientInfo{addr: c.RemoteAddr()}, raw: c}
	s.conn = &timedConn{Conn: c, timeout: p.cfg.ClientTimeout, stop: &p.stop}
	s.br = bufio.NewReaderSize(s.conn, 16<<10)
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
		s.reply(verb.Reply{Code: 421, Enhanced: "4.4.2", Text: s.p.cfg.Hostname + " Error: timeout exceeded"})
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
	fail := func(what string, rep verb.Reply, err error) error {
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

func (s *smtpSession) reply(r verb.Reply) { s.bw.Write(replyWire(r)) }

// replyEach gives r once in SMTP and once per accepted recipient in LMTP
// (RFC 2033 section 4.2), the replies due after a message.
func (s *smtpSession) replyEach(r verb.Reply) {
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
	if s.replay() {
		// Postfix's replay transport: its envelope stays here (reinject.go).
		line, err := s.restOfLine(head, done)
		if err != nil {
			return err
		}
		if s.replayEnvelope(verbOf(line), line) {
			return nil
		}
		head, done = line, true
	}
	cmdVerb := verbOf(head)
	if s.up == nil {
		if err := s.reconnect(); err != nil {
			s.logger.Warn("upstream connection failed", "upstream", s.p.cfg.Upstream, "err", err)
			if _, err := s.restOfLine(head, done); err != nil {
				return err
			}
			if cmdVerb == "QUIT" {
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
	cmdVerb = verbOf(line)
	raw, rep, err := s.up.reply()
	if err != nil {
		s.upstreamLost(cmdVerb, err)
		s.reply(replyUpstreamLost)
		return nil
	}
	switch cmdVerb {
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
			if cmdVerb != "HELO" {
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
				s.tx.rejected = append(s.tx.rejected, verb.RcptReply{Rcpt: to, Reply: rep})
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
func (s *smtpSession) authExchange(cmd, raw []byte, rep verb.Reply) ([]byte, verb.Reply, error) {
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
			return replyWire(replyUpstreamLost), replyUpstreamLost, nil
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
