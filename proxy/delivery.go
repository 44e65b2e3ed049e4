package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"strconv"
	"strings"

	"github.com/emersion/go-message/textproto"

	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// headerSniffer keeps the header section of a message as it streams past,
// up to a bound, so the log can summarise it without a second read.
type headerSniffer struct {
	buf  bytes.Buffer
	done bool
}

const maxSniffedHeader = 64 << 10

func (h *headerSniffer) Write(p []byte) (int, error) {
	if h.done {
		return len(p), nil
	}
	h.buf.Write(p)
	b := h.buf.Bytes()
	if i := bytes.Index(b, []byte("\r\n\r\n")); i >= 0 {
		h.buf.Truncate(i + 4)
		h.done = true
	} else if i := bytes.Index(b, []byte("\n\n")); i >= 0 {
		h.buf.Truncate(i + 2)
		h.done = true
	} else if h.buf.Len() > maxSniffedHeader {
		h.buf.Truncate(maxSniffedHeader)
		h.done = true
	}
	return len(p), nil
}

// info parses what was kept. A malformed header section yields what could
// be read; the message itself is relayed unchanged either way.
func (h *headerSniffer) info() verb.HeaderInfo {
	hdr, _ := textproto.ReadHeader(bufio.NewReader(bytes.NewReader(h.buf.Bytes())))
	dec := mime.WordDecoder{}
	decode := func(s string) string {
		if d, err := dec.DecodeHeader(s); err == nil {
			return d
		}
		return s
	}
	info := verb.HeaderInfo{
		MessageID: strings.TrimSpace(hdr.Get("Message-Id")),
		From:      decode(hdr.Get("From")),
		Subject:   decode(hdr.Get("Subject")),
		Date:      hdr.Get("Date"),
	}
	for _, v := range hdr.Values(verb.TraceHeader) {
		info.PriorIDs = append(info.PriorIDs, strings.TrimSpace(v))
	}
	return info
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
		return s.receive(replyWire(goAhead), false)
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
	s.tx.upOpen = upOpen
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
	var fail *verb.Reply
	var ref undolog.BlobRef
	hdr := sniff.info()
	switch {
	case w == nil:
		fail = logFailure(err)
	case over:
		w.Abort()
		fail = &replyTooBig
	default:
		if ref, err = s.commitBlob(w, hdr); err != nil {
			s.logger.Error("commit blob failed", "err", err)
			fail = logFailure(err)
		}
	}
	if fail != nil {
		s.abortUpstream()
		s.replyEach(*fail)
		s.tx.reset()
		return nil
	}
	s.deliver(ref, hdr, func(u *upstreamConn, trace []byte, src io.Reader) error {
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
	rep verb.Reply
}

func (e *errRefused) Error() string { return e.rep.String() }

// commitBlob commits a spooled message. The LMTP capture stores a message
// that came through the front door as the lines Postfix added before the
// front door's logged copy and a reference to it (undolog's
// BlobWriter.CommitDelta): one copy of a message's bytes in the log across
// both hops. A message Postfix changed otherwise is stored whole.
func (s *smtpSession) commitBlob(w *undolog.BlobWriter, hdr verb.HeaderInfo) (undolog.BlobRef, error) {
	if !s.p.cfg.LMTP || len(hdr.PriorIDs) == 0 {
		return w.Commit()
	}
	seq, blob, err := s.submission(context.Background(), hdr.PriorIDs[0])
	if err != nil || seq == 0 || blob == "" {
		// A failed look-up fails the delivery in linkSubmission.
		return w.Commit()
	}
	return w.CommitDelta(blob)
}

// submission returns the seq and blob of the front door's smtp.submit
// record with undo id id, 0 if there is none; looked up once per
// transaction.
func (s *smtpSession) submission(ctx context.Context, id string) (int64, string, error) {
	if s.tx.linked && s.tx.linkID == id {
		return s.tx.subSeq, s.tx.subBlob, nil
	}
	seq, blob, _, err := s.p.log.FirstByUndoID(ctx, id, verb.KindSMTPSubmit)
	if err != nil {
		return 0, "", err
	}
	s.tx.linked, s.tx.linkID, s.tx.subSeq, s.tx.subBlob = true, id, seq, blob
	return seq, blob, nil
}

// logFailure is the reply when the log cannot take a message.
func logFailure(err error) *verb.Reply {
	if errors.Is(err, undolog.ErrFull) {
		return &replyLogFull
	}
	return &replyLogUnavailable
}

// abortUpstream brings the upstream out of a transaction the client's
// message will not complete: RSET, or, inside DATA, a new connection.
func (s *smtpSession) abortUpstream() {
	if s.up == nil {
		return
	}
	if s.tx.upOpen {
		s.dropUpstream()
		return
	}
	if _, _, err := s.up.command([]byte("RSET\r\n")); err != nil {
		// The caller still owes the client its replies for the
		// transaction, so only the connection goes.
		s.logger.Warn("upstream connection lost", "op", "RSET", "err", err)
		s.dropUpstream()
	}
}

// readData reads a message up to its end-of-data line and writes it,
// unstuffed, to dst. The end follows the upstream's own rules exactly
// (endOfData), so that the proxy and the upstream never disagree on where
// a message ends, which would let a client smuggle commands past the log
// (RFC 5321 section 4.5.2 for CRLF; both upstreams also take a bare LF).
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
			if whole && s.endOfData(b) {
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

// endOfData reports whether a line (LF included) that starts with "."
// ends the message. Postfix drops every CR before the LF, so
// ".\r\r\n" ends a message for Postfix; Dovecot's LMTP takes "." followed
// by at most one CR. Both take a bare LF (docs/smtp-parity.md).
func (s *smtpSession) endOfData(line []byte) bool {
	if s.p.cfg.LMTP {
		return len(line) == 2 || (len(line) == 3 && line[1] == '\r')
	}
	return len(bytes.TrimRight(line[1:len(line)-1], "\r")) == 0
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
			trace := verb.TraceHeader + ": " + s.tx.undoID + "\r\n"
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
			return s.relayUpstreamReply("BDAT")
		default:
			// Dovecot's LMTP words it so (only the capture holds chunks).
			s.reply(verb.Reply{Code: 250, Enhanced: "2.0.0", Text: fmt.Sprintf("Added %d octets", size)})
		}
		return nil
	}
	var ref undolog.BlobRef
	var err error
	hdr := c.sniff.info()
	if c.fail == nil {
		if ref, err = s.commitBlob(c.w, hdr); err != nil {
			s.logger.Error("commit blob failed", "err", err)
			c.fail = logFailure(err)
		}
	}
	if c.fail != nil {
		s.abortUpstream()
		s.replyEach(*c.fail)
		s.tx.reset()
		return nil
	}
	c.w = nil
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
func sessionEnds(rep verb.Reply) bool {
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
	return s.relayUpstreamReply("BDAT")
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
func (s *smtpSession) deliver(blob undolog.BlobRef, hdr verb.HeaderInfo, send func(u *upstreamConn, trace []byte, src io.Reader) error) {
	ctx := context.Background()
	defer s.tx.reset()
	helo := ""
	if f := strings.Fields(string(s.hello)); len(f) > 1 {
		helo = f[1]
	}
	args := verb.DeliveryArgs{
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
	kind := verb.KindSMTPSubmit
	if s.p.cfg.LMTP {
		kind = verb.KindLMTPDeliver
		if err := s.linkSubmission(ctx, &args); err != nil {
			s.logger.Error("look up front-door submission failed; transaction refused", "err", err)
			s.abortUpstream()
			s.replyEach(replyLogUnavailable)
			return
		}
		if s.replay() {
			s.collect(ctx, args, blob) // reinject.go
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
		s.abortUpstream()
		s.replyEach(replyPaused)
		return
	}
	defer s.p.cfg.Gate.Leave()
	intent := &undolog.Record{User: s.authUser, Session: s.id, Kind: kind, Users: users, Args: argsJSON}
	intent.AttachBlob(blob)
	if err := s.p.log.Append(ctx, intent); err != nil {
		s.logger.Error("log intent failed; transaction refused", "undo_id", args.UndoID, "err", err)
		s.abortUpstream()
		s.replyEach(*logFailure(err))
		return
	}
	seq := intent.Seq
	var out *verb.DeliveryOutcome
	var raw []byte
	if s.p.cfg.LMTP && s.p.cfg.Divert != nil {
		if out = s.p.cfg.Divert(ctx, args, blob); out != nil {
			s.abortUpstream()
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
	// loses nothing: the write is in the kernel. The outcome is filed
	// under its actor only: the intent names the recipients, and a verb's
	// outcome is found through its intent.
	if err := s.p.log.AppendNoSync(ctx, &undolog.Record{
		User: s.authUser, Session: s.id, Kind: undolog.KindOutcome, Ref: seq, Outcome: outJSON,
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
func (s *smtpSession) linkSubmission(ctx context.Context, args *verb.DeliveryArgs) error {
	if len(args.Header.PriorIDs) == 0 {
		return nil
	}
	id := args.Header.PriorIDs[0]
	seq, _, err := s.submission(ctx, id)
	if err != nil {
		return err
	}
	if seq != 0 {
		args.UndoID, args.Submission = id, seq
	}
	return nil
}

// forward sends the logged message upstream with the trace header and
// reads the reply: one in SMTP, one per recipient in LMTP. It never
// returns without an outcome: failures become the 4xx reply the client
// will get. raw is the upstream's reply as sent, to relay unchanged, when
// there is one.
func (s *smtpSession) forward(args verb.DeliveryArgs, blob undolog.BlobRef, send func(*upstreamConn, []byte, io.Reader) error) (*verb.DeliveryOutcome, []byte) {
	fail := func(op string, err error) *verb.DeliveryOutcome {
		s.logger.Warn("upstream failed", "op", op, "err", err)
		s.dropUpstream()
		out := &verb.DeliveryOutcome{Error: fmt.Sprintf("%s: %v", op, err)}
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
		trace = []byte(verb.TraceHeader + ": " + args.UndoID + "\r\n")
	}
	if err := send(s.up, trace, src); err != nil {
		var ref *errRefused
		if errors.As(err, &ref) {
			out := &verb.DeliveryOutcome{}
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
		return &verb.DeliveryOutcome{Reply: &rep}, raw
	}
	out := &verb.DeliveryOutcome{}
	var all []byte
	for _, rc := range args.Rcpts {
		raw, rep, err := s.up.reply()
		if err != nil {
			// The recipients answered so far keep their replies.
			o := fail("end of data", err)
			for i := len(out.Rcpts); i < len(args.Rcpts); i++ {
				out.Rcpts = append(out.Rcpts, verb.RcptReply{Rcpt: args.Rcpts[i], Reply: o.Rcpts[i].Reply})
			}
			out.Error = o.Error
			return out, nil
		}
		all = append(all, raw...)
		out.Rcpts = append(out.Rcpts, verb.RcptReply{Rcpt: rc, Reply: rep})
	}
	return out, all
}

// outcomeFor sets rep as the outcome: the reply in SMTP, every
// recipient's in LMTP.
func (s *smtpSession) outcomeFor(out *verb.DeliveryOutcome, rep verb.Reply) {
	if !s.p.cfg.LMTP {
		out.Reply = &rep
		return
	}
	out.Rcpts = nil
	for _, rc := range s.tx.rcpts {
		out.Rcpts = append(out.Rcpts, verb.RcptReply{Rcpt: rc, Reply: rep})
	}
}

// relayUpstreamReply relays the upstream's reply to cmd as it came; a lost
// upstream is the client's temporary failure.
func (s *smtpSession) relayUpstreamReply(cmd string) error {
	raw, rep, err := s.up.reply()
	if err != nil {
		s.upstreamLost(cmd, err)
		s.reply(replyUpstreamLost)
		return nil
	}
	s.write(raw)
	if sessionEnds(rep) {
		return errSMTPOver
	}
	return nil
}
