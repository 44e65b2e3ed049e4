package verb

import (
	"fmt"
	"strings"
)

// This file holds the SMTP front door's and the LMTP capture's record
// vocabulary: their kinds and argument and outcome types, as stored in
// the undo log.

// Verb kinds recorded by the SMTP-family listeners.
const (
	// KindSMTPSubmit is a transaction accepted at the front door (SMTP in
	// front of Postfix): what a sender handed over and what it was told.
	KindSMTPSubmit = "smtp.submit"
	// KindLMTPDeliver is a final local delivery captured on the LMTP path
	// (Postfix to Dovecot): the unit replay re-delivers.
	KindLMTPDeliver = "lmtp.deliver"
)

// TraceHeader carries a message's undo id. It is prepended like a
// Received: trace field (RFC 5321 section 4.4), so a DKIM signature, which
// never covers fields added above it, stays valid. The topmost one is the
// newest: a delivery captured on the LMTP path after the front door carries
// both ids.
const TraceHeader = "Undomail-Id"

// DeliveryArgs are the arguments of an smtp.submit or lmtp.deliver intent:
// the envelope and a summary of the message whose bytes, exactly as the
// client sent them, are the record's blob. The forwarded message is the
// blob with "Undomail-Id: <UndoID>" prepended, except for a delivery linked
// to its front-door submission, which already carries that id.
type DeliveryArgs struct {
	UndoID string `json:"undo_id"`
	// Submission is the seq of the smtp.submit verb this delivery came
	// from, when the LMTP capture recognised the front door's id (DESIGN:
	// "the LMTP listener recognises the undo id the front door stamped on
	// a message and links each delivery to that record").
	Submission int64       `json:"submission,omitempty"`
	Client     string      `json:"client,omitempty"`
	Helo       string      `json:"helo,omitempty"`
	AuthUser   string      `json:"auth_user,omitempty"`
	MailFrom   string      `json:"mail_from"`
	Body       string      `json:"body,omitempty"` // BODY= parameter (7BIT, 8BITMIME)
	SMTPUTF8   bool        `json:"smtputf8,omitempty"`
	Rcpts      []string    `json:"rcpts"`
	Rejected   []RcptReply `json:"rejected,omitempty"` // recipients the upstream refused at RCPT time
	Size       int64       `json:"size"`
	Header     HeaderInfo  `json:"header"`
}

// RcptReply is the reply for one recipient.
type RcptReply struct {
	Rcpt  string `json:"rcpt"`
	Reply Reply  `json:"reply"`
}

// HeaderInfo is what an operator needs to recognise a message in the log
// without opening its blob.
type HeaderInfo struct {
	MessageID string `json:"message_id,omitempty"`
	From      string `json:"from,omitempty"`
	Subject   string `json:"subject,omitempty"`
	Date      string `json:"date,omitempty"`
	// PriorIDs are the Undomail-Id fields the message arrived with, topmost
	// first: on the LMTP path, the front door's.
	PriorIDs []string `json:"prior_ids,omitempty"`
}

// DeliveryOutcome is the outcome of a delivery intent: the reply the client
// was given, for SMTP one reply, for LMTP one per recipient.
type DeliveryOutcome struct {
	Reply *Reply      `json:"reply,omitempty"`
	Rcpts []RcptReply `json:"rcpts,omitempty"`
	// Error says what went wrong on undomail's side when the reply is one
	// undomail made up (upstream lost, timeout) rather than the upstream's.
	Error string `json:"error,omitempty"`
	// Filtered names the live filter that dropped the message or filed it
	// elsewhere instead of forwarding it ("RULE -> ACTION").
	Filtered string `json:"filtered,omitempty"`
}

// Summary describes the delivery in one line for `undomail log`.
func (a DeliveryArgs) Summary() string {
	var b strings.Builder
	fmt.Fprintf(&b, "<%s> -> ", a.MailFrom)
	for i, r := range a.Rcpts {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "<%s>", r)
	}
	if a.Header.Subject != "" {
		fmt.Fprintf(&b, " %q", a.Header.Subject)
	}
	fmt.Fprintf(&b, " %d bytes id=%s", a.Size, a.UndoID)
	if len(a.Rejected) > 0 {
		fmt.Fprintf(&b, " (%d rcpt refused)", len(a.Rejected))
	}
	return b.String()
}

// Summary describes the outcome in one line for `undomail log`.
func (o DeliveryOutcome) Summary() string {
	if o.Reply != nil {
		return o.Reply.String()
	}
	parts := make([]string, len(o.Rcpts))
	for i, r := range o.Rcpts {
		parts[i] = "<" + r.Rcpt + "> " + r.Reply.String()
	}
	return strings.Join(parts, "; ")
}

// ReplayLHLO is the LHLO name of Postfix's lmtp transport for replayed
// mail (lmtp_lhlo_name in its master.cf entry).
const ReplayLHLO = "undomail-replay"

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
