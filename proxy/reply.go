package proxy

import (
	"fmt"
	"strings"

	"github.com/emersion/go-smtp"
)

// Reply is an SMTP or LMTP reply as the upstream sent it: the basic code,
// the enhanced status code (RFC 3463) if the upstream gave one, and the text
// lines. It is what the undo log records as the outcome a client was given,
// and what the proxy relays to the client unchanged.
type Reply struct {
	Code     int    `json:"code"`
	Enhanced string `json:"enhanced,omitempty"`
	Text     string `json:"text"`
}

// String formats the reply as one line for logs and the CLI.
func (r Reply) String() string {
	s := fmt.Sprint(r.Code)
	if r.Enhanced != "" {
		s += " " + r.Enhanced
	}
	if r.Text != "" {
		s += " " + strings.ReplaceAll(r.Text, "\n", " / ")
	}
	return s
}

// Positive reports whether the reply accepted the command (2yz).
func (r Reply) Positive() bool { return r.Code >= 200 && r.Code < 300 }

// replyFromText builds a Reply from a code and the text go-smtp's client
// returns for a positive reply, where the enhanced code is still the first
// word of each line (RFC 2034 section 4: it is repeated on every line).
func replyFromText(code int, msg string) Reply {
	first, _, _ := strings.Cut(msg, " ")
	if ec, ok := parseEnhanced(first); ok && ec[0] == code/100 {
		enh := first
		lines := strings.Split(msg, "\n")
		for i, l := range lines {
			lines[i] = strings.TrimPrefix(strings.TrimPrefix(l, enh), " ")
		}
		return Reply{Code: code, Enhanced: enh, Text: strings.Join(lines, "\n")}
	}
	return Reply{Code: code, Text: msg}
}

// replyFromError converts an *smtp.SMTPError from the upstream into a Reply.
func replyFromError(e *smtp.SMTPError) Reply {
	r := Reply{Code: e.Code, Text: e.Message}
	if e.EnhancedCode != smtp.EnhancedCodeNotSet && e.EnhancedCode != smtp.NoEnhancedCode {
		r.Enhanced = fmt.Sprintf("%d.%d.%d", e.EnhancedCode[0], e.EnhancedCode[1], e.EnhancedCode[2])
	}
	return r
}

// smtpError turns the reply into the value go-smtp's server writes back to
// the client. go-smtp writes any *SMTPError verbatim, 2yz codes included,
// which is how a positive DATA reply keeps the upstream's own text (its queue
// id, for instance). A reply without an enhanced code is relayed without one
// rather than with a made-up X.0.0.
func (r Reply) smtpError() *smtp.SMTPError {
	ec := smtp.NoEnhancedCode
	text := r.Text
	if e, ok := parseEnhanced(r.Enhanced); ok {
		ec = e
		// go-smtp writes the enhanced code on the last line only; RFC 2034
		// section 4 wants it on every line, as the upstream sent it.
		if lines := strings.Split(text, "\n"); len(lines) > 1 {
			for i := range lines[:len(lines)-1] {
				lines[i] = r.Enhanced + " " + lines[i]
			}
			text = strings.Join(lines, "\n")
		}
	}
	return &smtp.SMTPError{Code: r.Code, EnhancedCode: ec, Message: text}
}

// parseEnhanced parses "class.subject.detail" (RFC 3463 section 2).
func parseEnhanced(s string) (smtp.EnhancedCode, bool) {
	parts := strings.Split(s, ".")
	if len(parts) != 3 {
		return smtp.EnhancedCode{}, false
	}
	var ec smtp.EnhancedCode
	for i, p := range parts {
		if p == "" || len(p) > 3 {
			return smtp.EnhancedCode{}, false
		}
		n := 0
		for _, c := range p {
			if c < '0' || c > '9' {
				return smtp.EnhancedCode{}, false
			}
			n = n*10 + int(c-'0')
		}
		ec[i] = n
	}
	if ec[0] != 2 && ec[0] != 4 && ec[0] != 5 {
		return smtp.EnhancedCode{}, false
	}
	return ec, true
}

// Replies the proxy itself gives. Their texts say what failed so an
// operator reading a client's bounce knows where to look.
var (
	// replyLogFull: the undo log's disk is full (RFC 3463 4.3.1 "mail
	// system full"); 452 asks the client to retry later.
	replyLogFull = Reply{Code: 452, Enhanced: "4.3.1", Text: "undomail: undo log storage full, message not accepted; try again later"}
	// replyLogUnavailable: the undo log cannot be written for another
	// reason (read-only, I/O error, corruption).
	replyLogUnavailable = Reply{Code: 451, Enhanced: "4.3.0", Text: "undomail: undo log unavailable, message not accepted; try again later"}
	// replyOutcomeUnlogged: the upstream answered but its outcome could not
	// be logged. The client must retry: a possible duplicate is better than
	// an acknowledgement the log cannot back (RFC 5321 section 6.1 prefers
	// duplicates to loss).
	replyOutcomeUnlogged = Reply{Code: 451, Enhanced: "4.3.0", Text: "undomail: could not record the delivery outcome; try again later"}
	// replyUpstreamDown: no connection to the upstream server.
	replyUpstreamDown = Reply{Code: 451, Enhanced: "4.4.1", Text: "undomail: upstream mail server unavailable; try again later"}
	// replyUpstreamLost: the upstream connection broke or timed out mid-command.
	replyUpstreamLost = Reply{Code: 451, Enhanced: "4.4.2", Text: "undomail: connection to upstream mail server lost; try again later"}
	// replyPaused: undomail holds mutations back for a snapshot or a
	// recovery (DESIGN: "During a cycle: new SMTP gets 451 4.3.2").
	replyPaused = Reply{Code: 451, Enhanced: "4.3.2", Text: "undomail: mail system paused for maintenance; try again later"}
	// replyReadError: the client's message could not be read completely.
	replyReadError = Reply{Code: 451, Enhanced: "4.3.0", Text: "undomail: error reading message data"}
)
