package proxy

import (
	"bytes"
	"fmt"
	"strings"

	"github.com/undomail/undomail/verb"
)

// replyFromText builds a verb.Reply from a code and the text of its lines
// joined by newlines.
func replyFromText(code int, msg string) verb.Reply {
	return replyFromLines(code, strings.Split(msg, "\n"))
}

// replyFromLines builds a verb.Reply from a code and the text of each line,
// where an enhanced code is the first word of each line (RFC 2034 section
// 4: it is repeated on every line).
func replyFromLines(code int, lines []string) verb.Reply {
	first, _, _ := strings.Cut(lines[0], " ")
	if ec, ok := parseEnhanced(first); ok && ec[0] == code/100 {
		out := make([]string, len(lines))
		for i, l := range lines {
			out[i] = strings.TrimPrefix(strings.TrimPrefix(l, first), " ")
		}
		return verb.Reply{Code: code, Enhanced: first, Text: strings.Join(out, "\n")}
	}
	return verb.Reply{Code: code, Text: strings.Join(lines, "\n")}
}

// wire formats the reply as the lines a client reads, the enhanced code
// on every line (RFC 2034 section 4).
func replyWire(r verb.Reply) []byte {
	var b bytes.Buffer
	lines := strings.Split(r.Text, "\n")
	for i, l := range lines {
		sep := byte('-')
		if i == len(lines)-1 {
			sep = ' '
		}
		fmt.Fprintf(&b, "%03d%c", r.Code, sep)
		if r.Enhanced != "" {
			b.WriteString(r.Enhanced)
			if l != "" {
				b.WriteByte(' ')
			}
		}
		b.WriteString(l)
		b.WriteString("\r\n")
	}
	return b.Bytes()
}

// parseEnhanced parses "class.subject.detail" (RFC 3463 section 2).
func parseEnhanced(s string) ([3]int, bool) {
	parts := strings.Split(s, ".")
	if len(parts) != 3 {
		return [3]int{}, false
	}
	var ec [3]int
	for i, p := range parts {
		if p == "" || len(p) > 3 {
			return [3]int{}, false
		}
		n := 0
		for _, c := range p {
			if c < '0' || c > '9' {
				return [3]int{}, false
			}
			n = n*10 + int(c-'0')
		}
		ec[i] = n
	}
	if ec[0] != 2 && ec[0] != 4 && ec[0] != 5 {
		return [3]int{}, false
	}
	return ec, true
}

// Replies the proxy itself gives. Their texts say what failed so an
// operator reading a client's bounce knows where to look.
var (
	// replyLogFull: the undo log's disk is full (RFC 3463 4.3.1 "mail
	// system full"); 452 asks the client to retry later.
	replyLogFull = verb.Reply{Code: 452, Enhanced: "4.3.1", Text: "undomail: undo log storage full, message not accepted; try again later"}
	// replyLogUnavailable: the undo log cannot be written for another
	// reason (read-only, I/O error, corruption).
	replyLogUnavailable = verb.Reply{Code: 451, Enhanced: "4.3.0", Text: "undomail: undo log unavailable, message not accepted; try again later"}
	// replyOutcomeUnlogged: the upstream answered but its outcome could not
	// be logged. The client must retry: a possible duplicate is better than
	// an acknowledgement the log cannot back (RFC 5321 section 6.1 prefers
	// duplicates to loss).
	replyOutcomeUnlogged = verb.Reply{Code: 451, Enhanced: "4.3.0", Text: "undomail: could not record the delivery outcome; try again later"}
	// replyUpstreamDown: no connection to the upstream server.
	replyUpstreamDown = verb.Reply{Code: 451, Enhanced: "4.4.1", Text: "undomail: upstream mail server unavailable; try again later"}
	// replyUpstreamLost: the upstream connection broke or timed out mid-command.
	replyUpstreamLost = verb.Reply{Code: 451, Enhanced: "4.4.2", Text: "undomail: connection to upstream mail server lost; try again later"}
	// replyPaused: undomail holds mutations back for a snapshot or a
	// recovery (DESIGN: "During a cycle: new SMTP gets 451 4.3.2").
	replyPaused = verb.Reply{Code: 451, Enhanced: "4.3.2", Text: "undomail: mail system paused for maintenance; try again later"}
)
