package imapwire

import (
	"io"
	"strings"
)

// ResponseKind says which of the three forms of server response
// (RFC 9051 section 2.2.2) a [Response] is.
type ResponseKind uint8

// The forms of server response.
const (
	// Untagged is a "*" response: server data or an untagged status.
	Untagged ResponseKind = iota
	// Tagged is the completion of the command with the same tag.
	Tagged
	// Continuation is a "+" command continuation request.
	Continuation
)

// String names the kind for messages.
func (k ResponseKind) String() string {
	switch k {
	case Untagged:
		return "untagged"
	case Tagged:
		return "tagged"
	case Continuation:
		return "continuation"
	}
	return "unknown"
}

// Response is one server response (RFC 9051 section 7), with its literals.
type Response struct {
	// Kind says whether the response is untagged, tagged or a continuation.
	Kind ResponseKind
	// Tag is the tag of a Tagged response.
	Tag string
	// Number is the number before the name in "* 23 EXISTS",
	// "* 5 EXPUNGE" or "* 12 FETCH (...)"; HasNumber says it was there.
	Number uint32
	// HasNumber is set when the response had a number before its name.
	HasNumber bool
	// Name is the upper-cased status (OK, NO, BAD, BYE, PREAUTH) of a status
	// response, or the name of untagged data (EXISTS, FETCH, CAPABILITY,
	// VANISHED, ESEARCH, ...). It is "" for a continuation request.
	Name string
	// Code is the bracketed response code of a status response or a
	// continuation request, if any.
	Code *Code
	// Text is the human-readable text of a status response or a
	// continuation request (for AUTHENTICATE, the base64 challenge).
	Text string
	// Args are the data of an untagged data response, after its name.
	Args []Value
	// Fetch is set for a FETCH response.
	Fetch *FetchData
	// Literals are the response's literals in order; the same values are
	// referenced from Args and Fetch.
	Literals []*Literal
	// BareLF is set when some line ended in LF without CR.
	BareLF bool
}

// IsStatus reports whether r is a status response: tagged, or an untagged
// OK, NO, BAD, BYE or PREAUTH (RFC 9051 section 7.1).
func (r *Response) IsStatus() bool {
	return r.Kind == Tagged || (r.Kind == Untagged && statusNames[r.Name])
}

// Code is a response code (RFC 9051 section 7.1), such as
// [APPENDUID 38505 3955] or [UIDVALIDITY 3857529045].
type Code struct {
	// Name is the upper-cased code name.
	Name string
	// Args are the code's arguments parsed as values, such as the numbers
	// and sequence sets of COPYUID. It is nil when there were none or when
	// they are free text that does not parse as values.
	Args []Value
	// Text is the code's arguments as written, after the name and one
	// space, up to the closing "]".
	Text string
}

var statusNames = map[string]bool{"OK": true, "NO": true, "BAD": true, "BYE": true, "PREAUTH": true}

// ResponseReader reads server-to-client traffic (RFC 9051 section 2.2.2),
// one response at a time.
type ResponseReader struct {
	f *framer
}

// NewResponseReader returns a reader of the responses in r.
func NewResponseReader(r io.Reader, opts Options) *ResponseReader {
	return &ResponseReader{f: newFramer(r, opts, "response")}
}

// Next reads one complete response, including all its literals, handing
// each part to fwd as soon as it is read (fwd may be nil to discard them),
// and returns it parsed. At the end of the stream it returns io.EOF.
//
// A *SyntaxError comes with the partly parsed response; the response was
// forwarded whole and Next may be called again. Any other error is final.
func (r *ResponseReader) Next(fwd Forward) (*Response, error) {
	if _, err := r.f.readUnit(fwd, responseLiteralOK); err != nil {
		return nil, err
	}
	resp := &Response{BareLF: r.f.bareLF}
	for _, s := range r.f.lits {
		resp.Literals = append(resp.Literals, s.lit)
	}
	return resp, resp.parse(r.f.parser())
}

// Offset returns the number of bytes read from the stream so far.
func (r *ResponseReader) Offset() int64 { return r.f.off }

// responseLiteralOK accepts literals only in untagged data responses.
// Continuation requests, tagged responses and untagged status responses end
// in resp-text (RFC 9051 section 9), where "{5}" is just text: a mailbox
// name echoed in an error must not make the reader swallow what follows.
func responseLiteralOK(line []byte, _ int) bool {
	if len(line) < 2 || line[0] != '*' || line[1] != ' ' {
		return false
	}
	word := line[2:]
	for i, c := range word {
		if c == ' ' || c == '\r' || c == '\n' {
			word = word[:i]
			break
		}
	}
	return !statusNames[strings.ToUpper(string(word))]
}

func (r *Response) parse(p *parser) error {
	if p.peek() == '+' && !p.atEnd() {
		r.Kind = Continuation
		p.pos++
		return r.respText(p)
	}
	tag := p.word()
	switch {
	case tag == "":
		return p.errorf("missing tag")
	case tag == "*":
		r.Kind = Untagged
	default:
		r.Kind = Tagged
		r.Tag = tag
		if !validTag(tag) {
			return p.errorf("invalid character in tag %q", tag)
		}
	}
	if !p.skipSP() || p.atEnd() {
		return p.errorf("missing response name")
	}
	name := p.word()
	if r.Kind == Untagged && isDigits(name) {
		n, ok := p.number32(name)
		if !ok {
			return p.errorf("message number %s does not fit in 32 bits", name)
		}
		r.Number, r.HasNumber = n, true
		if !p.skipSP() || p.atEnd() {
			return p.errorf("missing response name after %s", name)
		}
		name = p.word()
	}
	r.Name = strings.ToUpper(name)
	if r.Kind == Tagged && r.Name != "OK" && r.Name != "NO" && r.Name != "BAD" {
		return p.errorf("tagged response with status %q", name)
	}
	if statusNames[r.Name] && !r.HasNumber {
		return r.respText(p)
	}
	var err error
	r.Args, err = p.args()
	if err == nil && r.Name == "FETCH" {
		r.Fetch, err = parseFetch(p, r)
	}
	return err
}

func (p *parser) number32(s string) (uint32, bool) {
	var n uint64
	for i := 0; i < len(s); i++ {
		n = n*10 + uint64(s[i]-'0')
		if n > 1<<32-1 {
			return 0, false
		}
	}
	return uint32(n), true
}

// respText reads [SP] ["[" resp-text-code "]" [SP]] [text] (RFC 9051
// section 9; RFC 3501 required the space and the text).
func (r *Response) respText(p *parser) error {
	p.skipSP()
	if p.peek() == '[' && !p.atEnd() {
		p.pos++
		start := p.pos
		for c := p.peek(); !p.atEnd() && c != ' ' && c != ']'; c = p.peek() {
			p.pos++
		}
		if p.pos == start {
			return p.errorf("empty response code")
		}
		r.Code = &Code{Name: strings.ToUpper(string(p.buf[start:p.pos]))}
		if p.peek() == ' ' {
			p.pos++
			textStart := p.pos
			p.bracket = true
			args, err := p.args()
			p.bracket = false
			if err == nil && p.peek() == ']' && !p.atEnd() {
				r.Code.Args = args
			} else {
				// Free-text code arguments (RFC 9051 section 9:
				// atom [SP 1*<any TEXT-CHAR except "]">]).
				p.pos = textStart
				for !p.atEnd() && p.peek() != ']' {
					p.pos++
				}
			}
			r.Code.Text = string(p.buf[textStart:p.pos])
		}
		if p.atEnd() {
			return p.errorf("missing ']' after response code %s", r.Code.Name)
		}
		p.pos++
		p.skipSP()
	}
	r.Text = p.rest()
	return nil
}
