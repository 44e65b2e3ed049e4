// Package proxy holds undomail's front ends: protocol proxies that pass a
// client's traffic to the real mail server unchanged and record every
// mutating action as an intent in the undo log before it is forwarded.
package proxy

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/undolog"
)

// SMTPConfig configures one SMTP-family listener.
type SMTPConfig struct {
	// Upstream is the server mail is relayed to: Postfix's smtpd for the
	// front door, Dovecot's LMTP for delivery capture.
	Upstream string
	// LMTP makes the listener speak LMTP to its clients and to Upstream.
	LMTP bool
	// Hostname is the name in the greeting and in EHLO/LHLO upstream.
	Hostname string
	// MaxMessageBytes limits a message's size. 0 takes the upstream's
	// advertised SIZE, or 10240000 (Postfix's default) if it has none.
	MaxMessageBytes int64
	// MaxRecipients limits recipients per transaction (0: 1000).
	MaxRecipients int
	// UpstreamTimeout bounds connecting and each command upstream.
	UpstreamTimeout time.Duration
	// ClientTimeout bounds each read from and write to the client.
	ClientTimeout time.Duration
	// XClient passes the client's address and HELO name to the upstream
	// with Postfix's XCLIENT, so the upstream's relay policy sees the real
	// client. Ignored for LMTP.
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
	// Collect, if set, takes the deliveries of LMTP sessions whose LHLO
	// name is ReplayLHLO: Postfix's replay service handing back what it
	// decided for mail a replay gave it again (docs/operations.md,
	// "Replay through Postfix"). Such a session never reaches the
	// upstream, is neither gated nor logged as new deliveries, and every
	// recipient is accepted; Collect's outcome is the reply, nil refuses
	// the message (no replay waits for it).
	Collect func(ctx context.Context, args DeliveryArgs, blob undolog.BlobRef) *DeliveryOutcome
}

// ReplayLHLO is the LHLO name of Postfix's lmtp transport for replayed
// mail (lmtp_lhlo_name in its master.cf entry).
const ReplayLHLO = "undomail-replay"

// SMTPProxy is a write-ahead SMTP or LMTP relay: for each transaction it
// logs the envelope and message durably, forwards them, logs the
// upstream's reply and only then relays that reply to the client.
type SMTPProxy struct {
	cfg    SMTPConfig
	log    *undolog.Log
	logger *slog.Logger
	dialer dialer
	caps   upstreamCaps
	server *smtp.Server

	mu     sync.Mutex
	closed bool
	conns  sync.Map // *smtp.Conn of every session, for Close
}

// NewSMTP probes the upstream (retrying until ctx ends) and returns a proxy
// that advertises what the upstream offers.
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
		cfg.ClientTimeout = 5 * time.Minute
	}
	if cfg.MaxRecipients == 0 {
		cfg.MaxRecipients = 1000
	}
	proto := "smtp"
	if cfg.LMTP {
		proto = "lmtp"
	}
	p := &SMTPProxy{
		cfg:    cfg,
		log:    log,
		logger: logger.With("listener", proto),
		dialer: dialer{addr: cfg.Upstream, lmtp: cfg.LMTP, timeout: cfg.UpstreamTimeout, xclient: cfg.XClient, localName: cfg.Hostname},
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
	s := smtp.NewServer(p)
	s.Domain = cfg.Hostname
	s.LMTP = cfg.LMTP
	s.ReadTimeout = cfg.ClientTimeout
	s.WriteTimeout = cfg.ClientTimeout
	s.MaxRecipients = cfg.MaxRecipients
	s.MaxMessageBytes = cfg.MaxMessageBytes
	if s.MaxMessageBytes == 0 {
		s.MaxMessageBytes = p.caps.size
	}
	if s.MaxMessageBytes == 0 {
		s.MaxMessageBytes = 10240000
	}
	s.EnableSMTPUTF8 = p.caps.smtpUTF8
	s.EnableDSN = p.caps.dsn
	s.AllowInsecureAuth = cfg.AllowInsecureAuth
	s.TLSConfig = cfg.TLS
	s.ErrorLog = slogErrorLog{p.logger}
	p.server = s
	p.logger.Info("upstream probed", "upstream", cfg.Upstream, "size", s.MaxMessageBytes,
		"smtputf8", p.caps.smtpUTF8, "dsn", p.caps.dsn, "auth", p.caps.auth, "xclient", cfg.XClient && !cfg.LMTP)
	return p, nil
}

// Serve accepts connections on l until Close.
func (p *SMTPProxy) Serve(l net.Listener) error {
	p.logger.Info("listening", "addr", l.Addr().String(), "upstream", p.cfg.Upstream)
	err := p.server.Serve(l)
	if errors.Is(err, smtp.ErrServerClosed) {
		return nil
	}
	return err
}

// Close stops accepting, lets connections finish their current command
// until ctx ends, then closes the rest. A transaction cut off between its
// intent and its outcome stays in the log without an outcome; its client
// got no acknowledgement and will retry.
func (p *SMTPProxy) Close(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	p.closed = true
	err := p.server.Shutdown(ctx)
	if err == nil {
		return nil
	}
	// go-smtp's Close is a no-op once Shutdown has begun, so close the
	// connections still open ourselves.
	p.conns.Range(func(c, _ any) bool {
		c.(*smtp.Conn).Close()
		return true
	})
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

type slogErrorLog struct{ l *slog.Logger }

func (e slogErrorLog) Printf(format string, v ...any) { e.l.Error(fmt.Sprintf(format, v...)) }
func (e slogErrorLog) Println(v ...any)               { e.l.Error(fmt.Sprint(v...)) }

// NewSession implements smtp.Backend. go-smtp calls it at the client's
// first EHLO/HELO/LHLO; the upstream connection is opened then so its
// refusal reaches the client as a reply to that greeting.
func (p *SMTPProxy) NewSession(c *smtp.Conn) (smtp.Session, error) {
	var idb [8]byte
	rand.Read(idb[:])
	s := &smtpSession{
		p:      p,
		id:     hex.EncodeToString(idb[:]),
		client: clientInfo{addr: c.Conn().RemoteAddr(), helo: c.Hostname()},
	}
	s.logger = p.logger.With("session", s.id, "client", s.client.addr.String())
	if err := s.connect(); err != nil {
		return nil, err
	}
	s.conn = c
	p.conns.Store(c, struct{}{})
	return s, nil
}

// smtpSession relays one client connection. go-smtp calls its methods one
// at a time.
type smtpSession struct {
	p      *SMTPProxy
	conn   *smtp.Conn
	id     string
	client clientInfo
	logger *slog.Logger

	up *smtp.Client // nil after the upstream connection failed

	authUser, authIdentity, authPassword, authMech string

	inTx     bool
	from     string
	mailOpts *smtp.MailOptions
	rcpts    []string
	rejected []RcptReply
}

var (
	_ smtp.Session     = (*smtpSession)(nil)
	_ smtp.AuthSession = (*smtpSession)(nil)
	_ smtp.LMTPSession = (*smtpSession)(nil)
)

// connect (re)opens the upstream connection, authenticating again if the
// client had authenticated.
func (s *smtpSession) connect() error {
	ctx, cancel := context.WithTimeout(context.Background(), s.p.cfg.UpstreamTimeout)
	defer cancel()
	up, err := s.p.dialer.dial(ctx, s.client)
	if err != nil {
		s.logger.Warn("upstream connection failed", "upstream", s.p.cfg.Upstream, "err", err)
		var se *smtp.SMTPError
		if errors.As(err, &se) {
			return replyFromError(se).smtpError()
		}
		return replyUpstreamDown.smtpError()
	}
	if s.authUser != "" {
		if err := up.Auth(s.saslClient()); err != nil {
			up.Close()
			s.logger.Warn("re-authentication upstream failed", "err", err)
			return replyUpstreamDown.smtpError()
		}
	}
	s.up = up
	return nil
}

// upstreamError converts an error from the upstream client into what the
// client is told. A reply from the upstream is relayed as is; a broken
// connection is dropped (the next MAIL reconnects) and reported as 451.
func (s *smtpSession) upstreamError(op string, err error) error {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return replyFromError(se).smtpError()
	}
	s.logger.Warn("upstream connection lost", "op", op, "err", err)
	s.dropUpstream()
	return replyUpstreamLost.smtpError()
}

func (s *smtpSession) dropUpstream() {
	if s.up != nil {
		s.up.Close()
		s.up = nil
	}
	s.inTx = false
}

// AuthMechanisms implements smtp.AuthSession: the upstream's mechanisms
// that can be relayed (PLAIN, LOGIN: the password is needed upstream).
func (s *smtpSession) AuthMechanisms() []string { return s.p.caps.auth }

// Auth implements smtp.AuthSession. The credentials are checked by the
// upstream, whose reply (235, or 535 and its text) the client gets.
func (s *smtpSession) Auth(mech string) (sasl.Server, error) {
	check := func(identity, user, pass string) error {
		if s.up == nil {
			if err := s.connect(); err != nil {
				return err
			}
		}
		s.authMech, s.authIdentity, s.authUser, s.authPassword = mech, identity, user, pass
		if err := s.up.Auth(s.saslClient()); err != nil {
			s.authUser, s.authIdentity, s.authPassword = "", "", ""
			return s.upstreamError("AUTH", err)
		}
		s.logger.Info("authenticated upstream", "user", user)
		return nil
	}
	switch mech {
	case sasl.Plain:
		return sasl.NewPlainServer(check), nil
	case sasl.Login:
		return newLoginServer(func(user, pass string) error { return check("", user, pass) }), nil
	}
	return nil, smtp.ErrAuthUnknownMechanism
}

func (s *smtpSession) saslClient() sasl.Client {
	if s.authMech == sasl.Login {
		return sasl.NewLoginClient(s.authUser, s.authPassword)
	}
	return sasl.NewPlainClient(s.authIdentity, s.authUser, s.authPassword)
}

// replay reports whether the session is Postfix's replay transport
// handing back replayed mail (SMTPConfig.Collect): it stays local.
func (s *smtpSession) replay() bool {
	return s.p.cfg.LMTP && s.p.cfg.Collect != nil && s.client.helo == ReplayLHLO
}

// Mail implements smtp.Session.
func (s *smtpSession) Mail(from string, opts *smtp.MailOptions) error {
	if s.replay() {
		s.inTx, s.from, s.mailOpts = false, from, opts
		return nil
	}
	if s.up == nil {
		if err := s.connect(); err != nil {
			return err
		}
	}
	if err := s.up.Mail(from, opts); err != nil {
		return s.upstreamError("MAIL", err)
	}
	s.inTx = true
	s.from, s.mailOpts = from, opts
	return nil
}

// Rcpt implements smtp.Session. The upstream decides: undomail is never
// an open relay because it has no relay policy of its own.
func (s *smtpSession) Rcpt(to string, opts *smtp.RcptOptions) error {
	if s.replay() {
		s.rcpts = append(s.rcpts, to)
		return nil
	}
	if s.up == nil {
		return replyUpstreamLost.smtpError()
	}
	if err := s.up.Rcpt(to, opts); err != nil {
		var se *smtp.SMTPError
		if errors.As(err, &se) {
			s.rejected = append(s.rejected, RcptReply{Rcpt: to, Reply: replyFromError(se)})
		}
		return s.upstreamError("RCPT", err)
	}
	s.rcpts = append(s.rcpts, to)
	return nil
}

// Reset implements smtp.Session.
func (s *smtpSession) Reset() {
	if s.inTx && s.up != nil {
		if err := s.up.Reset(); err != nil {
			s.logger.Warn("upstream RSET failed", "err", err)
			s.dropUpstream()
		}
	}
	s.inTx = false
	s.from, s.mailOpts, s.rcpts, s.rejected = "", nil, nil, nil
}

// Logout implements smtp.Session.
func (s *smtpSession) Logout() error {
	s.p.conns.Delete(s.conn)
	if s.up != nil {
		s.up.Quit()
		s.up.Close()
		s.up = nil
	}
	return nil
}

// Data implements smtp.Session for SMTP.
func (s *smtpSession) Data(r io.Reader) error {
	out, err := s.relay(r)
	if err != nil {
		return err
	}
	return out.Reply.smtpError()
}

// LMTPData implements smtp.LMTPSession: one reply per recipient.
func (s *smtpSession) LMTPData(r io.Reader, status smtp.StatusCollector) error {
	out, err := s.relay(r)
	if err != nil {
		return err // go-smtp gives every recipient this reply
	}
	for _, rr := range out.Rcpts {
		status.SetStatus(rr.Rcpt, rr.Reply.smtpError())
	}
	return nil
}

// relay is the write-ahead transaction: spool the message to a blob and
// log the intent durably, forward, log the outcome durably, and return it
// for the client. An error return is the reply for the whole transaction.
func (s *smtpSession) relay(r io.Reader) (*DeliveryOutcome, error) {
	ctx := context.Background()
	if s.up == nil && !s.replay() {
		return nil, replyUpstreamLost.smtpError()
	}
	blob, hdr, err := s.spool(r)
	if err != nil {
		s.Reset()
		return nil, err
	}
	args := DeliveryArgs{
		Client:   s.client.addr.String(),
		Helo:     s.client.helo,
		AuthUser: s.authUser,
		MailFrom: s.from,
		Rcpts:    s.rcpts,
		Rejected: s.rejected,
		Size:     blob.Size,
		Header:   hdr,
	}
	if s.mailOpts != nil {
		args.Body = string(s.mailOpts.Body)
		args.SMTPUTF8 = s.mailOpts.UTF8
	}
	kind := KindSMTPSubmit
	if s.p.cfg.LMTP {
		kind = KindLMTPDeliver
		if err := s.linkSubmission(ctx, &args); err != nil {
			s.logger.Error("look up front-door submission failed; transaction refused", "err", err)
			s.Reset()
			return nil, replyLogUnavailable.smtpError()
		}
		if s.replay() {
			out := s.p.cfg.Collect(ctx, args, blob)
			s.Reset()
			if args.Submission == 0 || out == nil {
				s.logger.Warn("replayed delivery refused: no replay waits for it", "undo_id", args.UndoID)
				return nil, &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 0}, Message: "no undomail replay waits for this message"}
			}
			s.logger.Info("taken for replay", "undo_id", args.UndoID, "rcpts", len(args.Rcpts), "reply", out.Summary())
			return out, nil
		}
	}
	if args.UndoID == "" {
		args.UndoID = undolog.NewID()
	}
	users := append([]string(nil), s.rcpts...)
	if s.authUser != "" {
		users = append(users, s.authUser)
	}
	argsJSON, _ := json.Marshal(args)
	gctx, cancel := context.WithTimeout(ctx, WedgeWait)
	err = s.p.cfg.Gate.Enter(gctx)
	cancel()
	if err != nil {
		s.logger.Warn("transaction refused: paused", "undo_id", args.UndoID)
		s.Reset()
		return nil, replyPaused.smtpError()
	}
	defer s.p.cfg.Gate.Leave()
	intent := &undolog.Record{User: s.authUser, Session: s.id, Kind: kind, Users: users, Args: argsJSON}
	intent.AttachBlob(blob)
	if err := s.p.log.Append(ctx, intent); err != nil {
		s.logger.Error("log intent failed; transaction refused", "undo_id", args.UndoID, "err", err)
		s.Reset()
		if errors.Is(err, undolog.ErrFull) {
			return nil, replyLogFull.smtpError()
		}
		return nil, replyLogUnavailable.smtpError()
	}
	seq := intent.Seq
	var out *DeliveryOutcome
	if s.p.cfg.LMTP && s.p.cfg.Divert != nil {
		out = s.p.cfg.Divert(ctx, args, blob)
	}
	if out == nil {
		out = s.forward(args, blob)
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
		return nil, replyOutcomeUnlogged.smtpError()
	}
	s.logger.Info("relayed", "seq", seq, "undo_id", args.UndoID, "from", args.MailFrom, "rcpts", len(args.Rcpts),
		"size", args.Size, "reply", out.Summary())
	return out, nil
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

// spool streams the client's message into a new blob, keeping the header
// section for the log summary.
func (s *smtpSession) spool(r io.Reader) (undolog.BlobRef, HeaderInfo, error) {
	w, err := s.p.log.NewBlob()
	if err != nil {
		s.logger.Error("create blob failed", "err", err)
		if errors.Is(err, undolog.ErrFull) {
			return undolog.BlobRef{}, HeaderInfo{}, replyLogFull.smtpError()
		}
		return undolog.BlobRef{}, HeaderInfo{}, replyLogUnavailable.smtpError()
	}
	var sniff headerSniffer
	if _, err := io.Copy(io.MultiWriter(w, &sniff), r); err != nil {
		w.Abort()
		if errors.Is(err, smtp.ErrDataTooLarge) {
			return undolog.BlobRef{}, HeaderInfo{}, smtp.ErrDataTooLarge
		}
		if errors.Is(err, undolog.ErrFull) {
			s.logger.Error("write blob failed", "err", err)
			return undolog.BlobRef{}, HeaderInfo{}, replyLogFull.smtpError()
		}
		var opErr *net.OpError
		if errors.As(err, &opErr) || errors.Is(err, io.ErrUnexpectedEOF) {
			return undolog.BlobRef{}, HeaderInfo{}, replyReadError.smtpError()
		}
		s.logger.Error("write blob failed", "err", err)
		return undolog.BlobRef{}, HeaderInfo{}, replyLogUnavailable.smtpError()
	}
	ref, err := w.Commit()
	if err != nil {
		s.logger.Error("commit blob failed", "err", err)
		if errors.Is(err, undolog.ErrFull) {
			return undolog.BlobRef{}, HeaderInfo{}, replyLogFull.smtpError()
		}
		return undolog.BlobRef{}, HeaderInfo{}, replyLogUnavailable.smtpError()
	}
	return ref, sniff.info(), nil
}

// forward sends the logged message upstream with the trace header and
// collects the reply. It never returns without an outcome: failures become
// the 4xx reply the client will get.
func (s *smtpSession) forward(args DeliveryArgs, blob undolog.BlobRef) *DeliveryOutcome {
	fail := func(op string, err error) *DeliveryOutcome {
		var se *smtp.SMTPError
		out := &DeliveryOutcome{}
		var rep Reply
		if errors.As(err, &se) {
			rep = replyFromError(se)
		} else {
			rep = replyUpstreamLost
			out.Error = fmt.Sprintf("%s: %v", op, err)
			s.logger.Warn("upstream failed", "op", op, "err", err)
			s.dropUpstream()
		}
		if s.p.cfg.LMTP {
			for _, rc := range args.Rcpts {
				out.Rcpts = append(out.Rcpts, RcptReply{Rcpt: rc, Reply: rep})
			}
		} else {
			out.Reply = &rep
		}
		return out
	}
	s.inTx = false // DATA ends the upstream transaction whatever happens
	wc, err := s.up.Data()
	if err != nil {
		return fail("DATA", err)
	}
	src, err := s.p.log.OpenRef(blob)
	if err != nil {
		s.dropUpstream() // abandon the half-sent DATA: the upstream discards it
		return fail("open blob", err)
	}
	defer src.Close()
	if args.Submission == 0 {
		if _, err := fmt.Fprintf(wc, "%s: %s\r\n", TraceHeader, args.UndoID); err != nil {
			return fail("send message", err)
		}
	}
	if _, err := io.Copy(wc, src); err != nil {
		// A read error here is a blob that failed verification; never
		// complete a DATA whose content is not what was logged.
		s.dropUpstream()
		return fail("send message", err)
	}
	if !s.p.cfg.LMTP {
		resp, err := wc.CloseWithResponse()
		if err != nil {
			return fail("end of data", err)
		}
		rep := replyFromText(250, resp.StatusText)
		return &DeliveryOutcome{Reply: &rep}
	}
	resps, err := wc.CloseWithLMTPResponse()
	var lerr smtp.LMTPDataError
	if err != nil && !errors.As(err, &lerr) {
		return fail("end of data", err)
	}
	out := &DeliveryOutcome{}
	for _, rc := range args.Rcpts {
		var rep Reply
		if e, ok := lerr[rc]; ok {
			rep = replyFromError(e)
		} else if r, ok := resps[rc]; ok {
			rep = replyFromText(250, r.StatusText)
		} else {
			rep = replyUpstreamLost
		}
		// go-smtp's LMTP server writes "<rcpt> " before each recipient's
		// text; Dovecot already starts its text with it.
		rep.Text = strings.TrimPrefix(rep.Text, "<"+rc+"> ")
		out.Rcpts = append(out.Rcpts, RcptReply{Rcpt: rc, Reply: rep})
	}
	return out
}
