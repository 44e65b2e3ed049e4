package proxy

import (
	"context"
	"strings"

	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

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
