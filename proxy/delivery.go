package proxy

import (
	"bufio"
	"bytes"
	"fmt"
	"mime"
	"strings"

	"github.com/emersion/go-message/textproto"
)

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
func (h *headerSniffer) info() HeaderInfo {
	hdr, _ := textproto.ReadHeader(bufio.NewReader(bytes.NewReader(h.buf.Bytes())))
	dec := mime.WordDecoder{}
	decode := func(s string) string {
		if d, err := dec.DecodeHeader(s); err == nil {
			return d
		}
		return s
	}
	info := HeaderInfo{
		MessageID: strings.TrimSpace(hdr.Get("Message-Id")),
		From:      decode(hdr.Get("From")),
		Subject:   decode(hdr.Get("Subject")),
		Date:      hdr.Get("Date"),
	}
	for _, v := range hdr.Values(TraceHeader) {
		info.PriorIDs = append(info.PriorIDs, strings.TrimSpace(v))
	}
	return info
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
