package imapwire

import (
	"bytes"
	"errors"
	"io"
	"strings"
)

// Command is one client command (RFC 9051 section 2.2.1): a tagged line
// together with the lines and literals its literals split it into.
type Command struct {
	// Tag is the command tag; "" for an IDLE terminator.
	Tag string
	// Name is the upper-cased command name, without a UID prefix: "FETCH"
	// for "UID FETCH". "DONE" for the line that ends IDLE (RFC 2177).
	Name string
	// UID is set when the command was prefixed with UID (RFC 9051 6.4.9).
	UID bool
	// Args are the arguments after the name.
	Args []Value
	// Literals are the command's literals in order; the same values are
	// referenced from Args.
	Literals []*Literal
	// Refused is set when the forwarder refused a synchronizing literal
	// with ErrLiteralRefused: the command ends at that literal's header,
	// and the last literal has no content.
	Refused bool
	// BareLF is set when some line ended in LF without CR, which RFC 9051
	// section 2.2 does not allow but Dovecot accepts.
	BareLF bool
}

// CommandReader reads client-to-server traffic (RFC 9051 section 2.2.1,
// RFC 3501), one command at a time.
type CommandReader struct {
	f *framer
}

// NewCommandReader returns a reader of the commands in r.
func NewCommandReader(r io.Reader, opts Options) *CommandReader {
	return &CommandReader{f: newFramer(r, opts, "command")}
}

// Next reads one complete command, including all its literals, handing
// each part to fwd as soon as it is read (fwd may be nil to discard them),
// and returns it parsed. At the end of the stream it returns io.EOF.
//
// A *SyntaxError comes with the partly parsed command (its Tag when there
// was one); the command was forwarded whole and Next may be called again.
// So does a *LiteralTooLargeError with InStep set, with the command's Tag,
// Name and UID as far as they were read, and nothing of the line carrying
// the header forwarded. Any other error is final: the stream can no longer
// be followed.
func (r *CommandReader) Next(fwd Forward) (*Command, error) {
	refused, err := r.f.readUnit(fwd, commandLiteralOK)
	var tl *LiteralTooLargeError
	if errors.As(err, &tl) && tl.InStep {
		cmd := &Command{BareLF: r.f.bareLF}
		cmd.parseHead(&parser{buf: r.f.line, end: trimEOL(r.f.line), base: r.f.start, maxDepth: r.f.opts.MaxDepth})
		return cmd, err
	}
	if err != nil {
		return nil, err
	}
	cmd := &Command{Refused: refused, BareLF: r.f.bareLF}
	nonSync := false
	for _, s := range r.f.lits {
		cmd.Literals = append(cmd.Literals, s.lit)
		nonSync = nonSync || s.lit.NonSync
	}
	if err := cmd.parse(r.f.parser()); err != nil {
		if se, ok := err.(*SyntaxError); ok {
			se.Ambiguous = nonSync
		}
		return cmd, err
	}
	return cmd, nil
}

// commandLiteralOK accepts a literal header in a command's first line only
// after the tag and the command name (and the command after UID): Dovecot
// reads those as space-delimited words, so a "{n}" in their place is taken
// for the name, not for a literal.
func commandLiteralOK(line []byte, hdr int) bool {
	rest := line[:hdr]
	words := 2
	for i := 0; i < words; i++ {
		sp := bytes.IndexByte(rest, ' ')
		if sp <= 0 {
			// Dovecot reads an empty word here and rejects the line.
			return false
		}
		if i == 1 && strings.EqualFold(string(rest[:sp]), "UID") {
			words = 3
		}
		rest = rest[sp+1:]
	}
	return true
}

// noArgs are the commands that take no arguments (RFC 9051 section 6,
// RFC 2177, RFC 2342). Dovecot does not parse the rest of their line, so a
// literal there would not be read as one.
var noArgs = map[string]bool{
	"CAPABILITY": true, "NOOP": true, "LOGOUT": true, "STARTTLS": true,
	"CHECK": true, "CLOSE": true, "UNSELECT": true, "IDLE": true, "NAMESPACE": true,
}

// Offset returns the number of bytes read from the stream so far.
func (r *CommandReader) Offset() int64 { return r.f.off }

// SetOptions changes the reader's limits from the next command on, keeping
// what it has buffered: a server's limits change at login (Dovecot's
// login process allows far less than its imap process), and commands
// pipelined behind LOGIN are already in the buffer.
func (r *CommandReader) SetOptions(opts Options) { r.f.opts = opts.withDefaults() }

func (c *Command) parse(p *parser) error {
	// RFC 2177 section 3: IDLE ends with the untagged line "DONE".
	if len(p.lits) == 0 && strings.EqualFold(string(p.buf[:p.end]), "DONE") {
		c.Name = "DONE"
		return nil
	}
	if err := c.parseHead(p); err != nil {
		return err
	}
	var err error
	c.Args, err = p.args()
	if err == nil && len(c.Args) > 0 && (noArgs[c.Name] || (c.Name == "EXPUNGE" && !c.UID)) {
		return p.errorf("%s takes no arguments", c.Name)
	}
	return err
}

// parseHead reads the tag, the command name and a UID prefix.
func (c *Command) parseHead(p *parser) error {
	c.Tag = p.word()
	if c.Tag == "" {
		return p.errorf("missing tag")
	}
	if !validTag(c.Tag) {
		return p.errorf("invalid character in tag %q", c.Tag)
	}
	if !p.skipSP() || p.atEnd() {
		return p.errorf("missing command name after tag %q", c.Tag)
	}
	nameAt := p.pos
	c.Name = strings.ToUpper(p.word())
	if c.Name == "UID" {
		if !p.skipSP() || p.atEnd() {
			return p.errorf("missing command after UID")
		}
		nameAt = p.pos
		c.Name = strings.ToUpper(p.word())
		c.UID = true
	}
	for i := 0; i < len(c.Name); i++ {
		if !p.isAtomChar(c.Name[i]) || c.Name[i] == '[' || c.Name[i] == ']' {
			p.pos = nameAt
			return p.errorf("invalid command name %q", c.Name)
		}
	}
	return nil
}

// validTag checks RFC 9051 section 9: tag = 1*<any ASTRING-CHAR except "+">.
func validTag(tag string) bool {
	p := parser{}
	for i := 0; i < len(tag); i++ {
		if tag[i] == '+' || !p.isAtomChar(tag[i]) {
			return false
		}
	}
	return true
}
