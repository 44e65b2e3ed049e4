package imapwire

import (
	"fmt"
	"strconv"
	"strings"
)

// parser turns the non-literal bytes of one unit, plus its literals, into
// values. Literal headers in buf are recognised only at the positions the
// framer recorded, so the parser never disagrees with the framing.
type parser struct {
	buf      []byte
	pos      int
	end      int // where the unit's final line end starts
	lits     []litSpan
	li       int   // next literal in lits
	litBytes int64 // content bytes of the literals passed so far
	base     int64 // stream offset of buf[0]
	depth    int
	maxDepth int
	bracket  bool // "]" ends atoms: inside a response code
}

func (f *framer) parser() *parser {
	end := len(f.line)
	if n := len(f.lits); n == 0 || f.lits[n-1].end != end {
		// The unit ends in a line end rather than a refused literal.
		end = trimEOL(f.line)
	}
	return &parser{buf: f.line, end: end, lits: f.lits, base: f.start, maxDepth: f.opts.MaxDepth}
}

// trimEOL returns the length of line without its final CRLF or LF.
func trimEOL(line []byte) int {
	n := len(line)
	if n > 0 && line[n-1] == '\n' {
		n--
	}
	if n > 0 && line[n-1] == '\r' {
		n--
	}
	return n
}

func (p *parser) errorf(format string, args ...any) error {
	return &SyntaxError{Offset: p.base + int64(p.pos) + p.litBytes, Msg: fmt.Sprintf(format, args...)}
}

func (p *parser) atEnd() bool { return p.pos >= p.end }

func (p *parser) peek() byte {
	if p.pos >= p.end {
		return 0
	}
	return p.buf[p.pos]
}

// skipSP skips spaces and reports whether there were any. RFC 9051 wants
// exactly one SP between arguments; Dovecot accepts any number.
func (p *parser) skipSP() bool {
	start := p.pos
	for p.pos < p.end && p.buf[p.pos] == ' ' {
		p.pos++
	}
	return p.pos > start
}

// word reads up to the next SP or the end, for tags and command names.
func (p *parser) word() string {
	start := p.pos
	for p.pos < p.end && p.buf[p.pos] != ' ' {
		p.pos++
	}
	return string(p.buf[start:p.pos])
}

// rest returns the text up to the end of the unit, for human-readable text.
func (p *parser) rest() string {
	s := string(p.buf[p.pos:p.end])
	p.pos = p.end
	return s
}

// isAtomChar reports whether c may appear in an atom. RFC 9051 section 9
// excludes atom-specials; the list-wildcards "%" and "*" are allowed here
// because LIST patterns and sequence sets are read as atoms, "]" because an
// astring may contain it (resp-specials), and 8-bit bytes because IMAP4rev2
// and UTF8=ACCEPT carry UTF-8 mailbox names.
func (p *parser) isAtomChar(c byte) bool {
	switch {
	case c <= ' ' || c == 0x7f:
		return false
	case c == '(' || c == ')' || c == '{' || c == '"':
		return false
	case c == ']':
		return !p.bracket
	}
	return true
}

// args reads values separated by spaces until the end of the unit, or until
// "]" inside a response code.
func (p *parser) args() ([]Value, error) {
	var out []Value
	for {
		p.skipSP()
		if p.atEnd() || (p.bracket && p.peek() == ']') {
			return out, nil
		}
		v, err := p.value()
		if err != nil {
			return out, err
		}
		out = append(out, v)
		if c := p.peek(); !p.atEnd() && c != ' ' && !(p.bracket && c == ']') {
			return out, p.errorf("expected SP after %s, found %q", v.Kind, c)
		}
	}
}

func (p *parser) value() (Value, error) {
	if p.li < len(p.lits) && p.pos > p.lits[p.li].hdr {
		return Value{}, p.errorf("literal header inside another token")
	}
	if p.atEnd() {
		return Value{}, p.errorf("missing argument")
	}
	if p.li < len(p.lits) && p.pos == p.lits[p.li].hdr {
		return p.literal(), nil
	}
	switch c := p.buf[p.pos]; c {
	case '(':
		return p.list()
	case '"':
		return p.quoted()
	case '{':
		return Value{}, p.errorf("literal header not at the end of a line")
	default:
		return p.atom()
	}
}

func (p *parser) literal() Value {
	span := p.lits[p.li]
	p.li++
	p.pos = span.end
	p.litBytes += span.lit.Size
	v := Value{Kind: LiteralString, Literal: span.lit}
	if span.lit.Data != nil {
		v.Text = string(span.lit.Data)
	}
	return v
}

func (p *parser) list() (Value, error) {
	if p.depth >= p.maxDepth {
		return Value{}, p.errorf("lists nested deeper than %d", p.maxDepth)
	}
	p.depth++
	defer func() { p.depth-- }()
	p.pos++ // "("
	v := Value{Kind: List}
	for {
		p.skipSP()
		if p.atEnd() || (p.bracket && p.peek() == ']') {
			return v, p.errorf("missing ')'")
		}
		if p.peek() == ')' {
			p.pos++
			return v, nil
		}
		e, err := p.value()
		if err != nil {
			return v, err
		}
		v.List = append(v.List, e)
		if c := p.peek(); !p.atEnd() && c != ' ' && c != ')' {
			return v, p.errorf("expected SP or ')' after %s in list, found %q", e.Kind, c)
		}
	}
}

// quoted reads a quoted string (RFC 9051 section 4.3). Only "\"" and "\\"
// are valid escapes; like Dovecot, a backslash before any other character
// is dropped rather than rejected.
func (p *parser) quoted() (Value, error) {
	p.pos++ // opening quote
	var sb strings.Builder
	for start := p.pos; p.pos < p.end; p.pos++ {
		switch p.buf[p.pos] {
		case '"':
			sb.Write(p.buf[start:p.pos])
			p.pos++
			return Value{Kind: Quoted, Text: sb.String()}, nil
		case '\\':
			sb.Write(p.buf[start:p.pos])
			p.pos++
			start = p.pos
		case '\r', '\n':
			return Value{}, p.errorf("line end inside quoted string")
		}
	}
	return Value{}, p.errorf("missing closing '\"'")
}

// sectionAttrs are the FETCH attributes that take a bracketed section
// (RFC 9051 section 6.4.5, RFC 3516 section 4.1). For every other atom "["
// is an ordinary ATOM-CHAR, as in the mailbox name "[Gmail]/Sent".
var sectionAttrs = map[string]bool{
	"BODY": true, "BODY.PEEK": true, "BINARY": true, "BINARY.PEEK": true, "BINARY.SIZE": true,
}

func (p *parser) atom() (Value, error) {
	start := p.pos
	for p.pos < p.end && p.isAtomChar(p.buf[p.pos]) {
		if p.buf[p.pos] == '[' && p.pos-start <= len("BINARY.PEEK") && sectionAttrs[strings.ToUpper(string(p.buf[start:p.pos]))] {
			return p.sectionAtom(start)
		}
		p.pos++
	}
	if p.pos == start {
		return Value{}, p.errorf("unexpected %q", p.peek())
	}
	text := string(p.buf[start:p.pos])
	if strings.EqualFold(text, "NIL") {
		return Value{Kind: Nil, Text: text}, nil
	}
	if isDigits(text) && len(text) <= 20 {
		if n, err := strconv.ParseUint(text, 10, 64); err == nil {
			return Value{Kind: Number, Text: text, Num: n}, nil
		}
	}
	return Value{Kind: Atom, Text: text}, nil
}

// sectionAtom reads a FETCH attribute with a section, starting at the "["
// (RFC 9051 section 9: section, section-partial, header-list).
func (p *parser) sectionAtom(start int) (Value, error) {
	sec := &Section{Name: strings.ToUpper(string(p.buf[start:p.pos]))}
	p.pos++ // "["
	specStart := p.pos
	for c := p.peek(); !p.atEnd() && c != ']' && c != ' ' && c != '(' && c != ')' && p.isAtomChar(c); c = p.peek() {
		p.pos++
	}
	sec.Spec = strings.ToUpper(string(p.buf[specStart:p.pos]))
	if p.peek() == ' ' {
		p.pos++
		if p.peek() != '(' {
			return Value{}, p.errorf("expected header-list after %s[%s", sec.Name, sec.Spec)
		}
		saved := p.bracket
		p.bracket = true
		list, err := p.list()
		p.bracket = saved
		if err != nil {
			return Value{}, err
		}
		for _, f := range list.List {
			s, ok := f.AString()
			if !ok {
				return Value{}, p.errorf("header field name in %s[%s] is a %s", sec.Name, sec.Spec, f.Kind)
			}
			sec.Fields = append(sec.Fields, s)
		}
	}
	if p.peek() != ']' || p.atEnd() {
		return Value{}, p.errorf("missing ']' in %s section", sec.Name)
	}
	p.pos++
	if p.peek() == '<' && !p.atEnd() {
		p.pos++
		sec.Partial = true
		var ok bool
		if sec.Offset, ok = p.number(); !ok {
			return Value{}, p.errorf("bad partial offset in %s section", sec.Name)
		}
		if p.peek() == '.' && !p.atEnd() {
			p.pos++
			if sec.Length, ok = p.number(); !ok || sec.Length == 0 {
				return Value{}, p.errorf("bad partial length in %s section", sec.Name)
			}
		}
		if p.peek() != '>' || p.atEnd() {
			return Value{}, p.errorf("missing '>' in %s partial", sec.Name)
		}
		p.pos++
	}
	if c := p.peek(); !p.atEnd() && c != ' ' && c != ')' && !(p.bracket && c == ']') {
		return Value{}, p.errorf("unexpected %q after %s section", c, sec.Name)
	}
	return Value{Kind: Atom, Text: string(p.buf[start:p.pos]), Section: sec}, nil
}

// number reads 1*DIGIT that fits in 64 bits.
func (p *parser) number() (uint64, bool) {
	start := p.pos
	for p.pos < p.end && p.buf[p.pos] >= '0' && p.buf[p.pos] <= '9' {
		p.pos++
	}
	if p.pos == start {
		return 0, false
	}
	n, err := strconv.ParseUint(string(p.buf[start:p.pos]), 10, 64)
	return n, err == nil
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}
