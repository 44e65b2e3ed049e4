package proxy

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// DialReinject opens an SMTP session with Postfix's replay service (see
// docs/operations.md, "Replay through Postfix") as the client a front-door
// submission came from: XCLIENT (https://www.postfix.org/XCLIENT_README.html)
// gives Postfix the client's address and HELO name as the front door
// recorded them, so its restrictions judge the original client again; the
// session then greets with that HELO name. client is verb.DeliveryArgs.Client
// ("ip:port"); one that does not parse is left out and Postfix sees
// undomail's own address.
func DialReinject(ctx context.Context, addr, client, helo, localName string, timeout time.Duration) (*smtp.Client, error) {
	conn, err := (&net.Dialer{Timeout: timeout}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", addr, err)
	}
	conn.SetDeadline(time.Now().Add(timeout))
	// Postfix sends nothing unasked after its greeting, so this reader
	// cannot take bytes meant for the SMTP client below.
	code, lines, err := readReplyRaw(bufio.NewReaderSize(conn, 1), new([]byte))
	if err != nil || code != 220 {
		conn.Close()
		return nil, fmt.Errorf("greeting from %s: %d %s %v", addr, code, strings.Join(lines, " "), err)
	}
	var ci clientInfo
	if ta, err := net.ResolveTCPAddr("tcp", client); err == nil && ta.IP != nil {
		ci.addr = ta
	}
	args := xclientArgs(ci)
	if helo != "" {
		args += " HELO=" + xtext(helo)
	}
	if _, err := fmt.Fprintf(conn, "XCLIENT %s PROTO=ESMTP\r\n", args); err != nil {
		conn.Close()
		return nil, fmt.Errorf("send XCLIENT to %s: %w", addr, err)
	}
	conn.SetDeadline(time.Time{})
	// XCLIENT's reply is a fresh 220 greeting: the client reads it as its
	// session's greeting (a refusal fails Hello).
	c := smtp.NewClient(conn)
	c.CommandTimeout, c.SubmissionTimeout = timeout, timeout
	name := helo
	if name == "" {
		name = localName
	}
	if err := c.Hello(name); err != nil {
		c.Close()
		return nil, fmt.Errorf("XCLIENT and EHLO at %s (is undomail's address in smtpd_authorized_xclient_hosts?): %w", addr, err)
	}
	return c, nil
}

// replay reports whether the session is Postfix's replay transport
// handing back replayed mail (SMTPConfig.Collect): its envelope stays
// here.
func (s *smtpSession) replay() bool {
	if !s.p.cfg.LMTP || s.p.cfg.Collect == nil {
		return false
	}
	f := strings.Fields(string(s.hello))
	return len(f) > 1 && strings.EqualFold(f[1], verb.ReplayLHLO)
}

// replayEnvelope answers MAIL, RCPT and RSET of a replay session itself;
// false for any other command.
func (s *smtpSession) replayEnvelope(cmd string, line []byte) bool {
	switch cmd {
	default:
		return false
	case "MAIL":
		s.tx.reset()
		s.tx.active = true
		s.tx.from, s.tx.body, s.tx.utf8 = parseMailFrom(line)
		s.reply(verb.Reply{Code: 250, Enhanced: "2.1.0", Text: "Ok"})
	case "RCPT":
		if !s.tx.active {
			s.reply(verb.Reply{Code: 503, Enhanced: "5.5.1", Text: "MAIL first"})
			return true
		}
		s.tx.rcpts = append(s.tx.rcpts, parseRcptTo(line))
		s.reply(verb.Reply{Code: 250, Enhanced: "2.1.5", Text: "Ok"})
	case "RSET":
		s.tx.reset()
		s.reply(verb.Reply{Code: 250, Enhanced: "2.0.0", Text: "Ok"})
	}
	return true
}

// collect hands a replay session's message to SMTPConfig.Collect and
// replies with its outcome, per recipient.
func (s *smtpSession) collect(ctx context.Context, args verb.DeliveryArgs, blob undolog.BlobRef) {
	var out *verb.DeliveryOutcome
	if args.Submission != 0 {
		out = s.p.cfg.Collect(ctx, args, blob)
	}
	if out == nil {
		s.logger.Warn("replayed delivery refused: no replay waits for it", "undo_id", args.UndoID)
		s.replyEach(verb.Reply{Code: 550, Enhanced: "5.7.0", Text: "no undomail replay waits for this message"})
		return
	}
	s.logger.Info("taken for replay", "undo_id", args.UndoID, "rcpts", len(args.Rcpts), "reply", out.Summary())
	for _, r := range out.Rcpts {
		s.reply(r.Reply)
	}
}
