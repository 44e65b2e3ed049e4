// Package imapwire tokenizes IMAP traffic as it passes through the proxy.
//
// The proxy splices bytes between a client and Dovecot unchanged. A
// [CommandReader] watches the client-to-server direction and a
// [ResponseReader] the server-to-client direction. Each hands every byte it
// reads to a [Forward] function, in wire order and before it reads further,
// so the proxy can relay a command line before the server's continuation
// request arrives, and so a 25 MB APPEND literal streams through in chunks
// instead of being held in memory. Once a whole command or response has gone
// by, the reader returns it parsed: tag, name, arguments, response code, and
// for FETCH responses the UID, FLAGS, MODSEQ and body sections.
//
// The grammar is RFC 9051 (IMAP4rev2) section 9, which is a superset of what
// RFC 3501 clients send, plus LITERAL+ (RFC 7888), literal8 for BINARY
// (RFC 3516), CONDSTORE/QRESYNC (RFC 7162) and ESEARCH (RFC 4731) responses.
// The readers are liberal where Dovecot is liberal (bare LF line ends, any
// number of spaces between arguments, any character after a backslash in a
// quoted string), and they place literals exactly where Dovecot does, so
// that the tokenizer frames the stream as the server does.
package imapwire

import (
	"errors"
	"fmt"
	"io"
)

// Defaults used when the corresponding [Options] field is zero.
const (
	// DefaultMaxLine bounds the non-literal bytes of one command or response.
	// It matches Dovecot's imap_max_line_length default of 64 KiB.
	DefaultMaxLine = 64 << 10
	// DefaultMaxLiteral bounds the declared size of one literal.
	DefaultMaxLiteral = 1 << 30
	// DefaultMaxInlineLiteral bounds the literal content captured into
	// argument values per command or response.
	DefaultMaxInlineLiteral = 64 << 10
	// DefaultMaxDepth bounds the nesting of parenthesized lists. Dovecot
	// stops parsing MIME nesting at 100 levels, and a BODYSTRUCTURE adds a
	// few list levels on top of that.
	DefaultMaxDepth = 128
)

// Options sets the limits of a reader. The zero value uses the defaults.
type Options struct {
	// MaxLine is the largest number of bytes outside literal content that
	// one command or response may have, line ends and literal headers
	// included. Longer input fails with *LineTooLongError.
	MaxLine int
	// MaxLiteral is the largest literal size accepted. A larger literal
	// header fails with *LiteralTooLargeError.
	MaxLiteral int64
	// MaxCommand, if positive, bounds one command or response whole:
	// a literal fails with *LiteralTooLargeError when its size added to
	// the bytes before it (lines, earlier literals' content, its own
	// header up to "}") exceeds it. This is how Dovecot applies its line
	// length limit to literals, and so its pre-login limit on LOGIN's.
	MaxCommand int64
	// MaxInlineLiteral is how many bytes of literal content one command or
	// response may capture into [Literal.Data] and its argument values.
	// Literals that do not fit are only streamed. Negative captures nothing.
	MaxInlineLiteral int64
	// MaxDepth is the deepest nesting of parenthesized lists parsed. Deeper
	// input fails with *SyntaxError after it has been forwarded.
	MaxDepth int
}

func (o Options) withDefaults() Options {
	if o.MaxLine <= 0 {
		o.MaxLine = DefaultMaxLine
	}
	if o.MaxLiteral <= 0 {
		o.MaxLiteral = DefaultMaxLiteral
	}
	if o.MaxInlineLiteral == 0 {
		o.MaxInlineLiteral = DefaultMaxInlineLiteral
	}
	if o.MaxDepth <= 0 {
		o.MaxDepth = DefaultMaxDepth
	}
	return o
}

// Part is one piece of a command or response as it appears on the wire.
// Exactly one of Raw and Literal is set. Writing every Raw and copying every
// Literal.Body, in the order the parts arrive, reproduces the input exactly.
type Part struct {
	// Raw holds bytes outside literal content: a line, or the part of a line
	// up to and including a literal header and its CRLF. It is only valid
	// until the Forward call returns.
	Raw []byte
	// Literal is set for literal content.
	Literal *Literal
}

// Literal is one literal string, {n}, {n+} or ~{n} (RFC 9051 section 4.3,
// RFC 7888, RFC 3516 section 4.2).
type Literal struct {
	// Size is the declared size in bytes.
	Size int64
	// Binary is set for literal8 (~{n}), which may contain NUL bytes.
	Binary bool
	// NonSync is set for a non-synchronizing literal ({n+}, RFC 7888): the
	// client sends the content without waiting for a continuation request.
	NonSync bool
	// Offset is where the content starts in the stream, counting from the
	// first byte the reader read.
	Offset int64
	// Body reads the content, Size bytes. It is only valid during the
	// Forward call that received this literal; whatever the call leaves
	// unread is read and discarded by the reader afterwards.
	Body io.Reader
	// Data holds the content when it fit in Options.MaxInlineLiteral; it is
	// non-nil (possibly empty) exactly when the content was captured, and
	// complete once the Forward call has returned.
	Data []byte
}

// Forward receives each part of a command or response in wire order, as
// soon as the reader has it. A proxy writes Raw to the other side and copies
// Literal.Body there. An error other than [ErrLiteralRefused] stops the
// reader for good and is returned from Next.
type Forward func(Part) error

// ErrLiteralRefused is returned by a [Forward] function for a synchronizing
// literal that the server refused: it sent a tagged response instead of a
// continuation request, so the client will not send the content and the
// command ends at the literal header (RFC 9051 section 7.5). The reader then
// returns the command with Refused set and reads the next command. The
// refusal may come from the call with the Raw part that ends in the
// literal's header (a forwarder that waits there for the server's answer)
// or from the call with the Literal, before reading any of its content.
var ErrLiteralRefused = errors.New("imapwire: synchronizing literal refused by server")

// SyntaxError reports input that was framed and forwarded completely but
// does not follow the grammar. The reader stays in step with the stream and
// Next may be called again: the server will answer BAD, and the proxy can
// relay that, unless Ambiguous is set.
type SyntaxError struct {
	// Offset is the stream offset where the problem was found.
	Offset int64
	// Msg says what was wrong.
	Msg string
	// Ambiguous is set when the command also carried a non-synchronizing
	// literal. Dovecot stops at the first error and skips to the end of
	// that line, so it may take the literal's content for the next command
	// where the reader took it for a literal; a proxy that must see every
	// command should close the connection.
	Ambiguous bool
}

// Error describes the problem and where it is.
func (e *SyntaxError) Error() string {
	return fmt.Sprintf("imapwire: syntax error at byte %d: %s", e.Offset, e.Msg)
}

// LineTooLongError reports a command or response whose bytes outside literal
// content exceed Options.MaxLine. Nothing of the offending line was
// forwarded and the reader cannot continue.
type LineTooLongError struct {
	// Offset is where the command or response starts in the stream.
	Offset int64
	// Max is the limit that was exceeded.
	Max int
}

// Error describes which line was too long.
func (e *LineTooLongError) Error() string {
	return fmt.Sprintf("imapwire: line starting at byte %d is longer than %d bytes", e.Offset, e.Max)
}

// LiteralTooLargeError reports a literal header whose size exceeds
// Options.MaxLiteral, or what Options.MaxCommand leaves for it, or does not
// fit in 63 bits. The line carrying the header was not forwarded. The
// reader cannot continue, unless InStep is set.
type LiteralTooLargeError struct {
	// Offset is where the literal header starts in the stream.
	Offset int64
	// Size is the declared size, or -1 if it overflowed.
	Size int64
	// Max is the limit that was exceeded: Options.MaxLiteral, or the
	// room Options.MaxCommand left for this literal.
	Max int64
	// InStep is set for a command's synchronizing literal: the client
	// sends its content only after a continuation request, so the reader
	// is still in step with the stream and Next may be called again for
	// the next command. The command ends at the header, unanswered: the
	// proxy must answer it itself (a tagged NO instead of "+", RFC 9051
	// section 7.5), which it can do cleanly only if nothing of the
	// command reached the server.
	InStep bool
}

// Error describes which literal was too large.
func (e *LiteralTooLargeError) Error() string {
	if e.Size < 0 {
		return fmt.Sprintf("imapwire: literal at byte %d: size does not fit in 63 bits", e.Offset)
	}
	return fmt.Sprintf("imapwire: literal at byte %d: size %d exceeds limit %d", e.Offset, e.Size, e.Max)
}
