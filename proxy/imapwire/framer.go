package imapwire

import (
	"bufio"
	"errors"
	"fmt"
	"io"
)

// framer splits a stream into units (one command or one response): lines,
// and the literals announced at the end of lines. It forwards each piece as
// soon as it has it and keeps the non-literal bytes of the current unit for
// the parser.
type framer struct {
	br   *bufio.Reader
	opts Options
	side string // "command" or "response", for error messages

	off int64 // stream offset of the next unread byte
	err error // sticky error: the stream can no longer be followed

	// The current unit.
	start  int64     // stream offset of its first byte
	line   []byte    // its bytes outside literal content
	lits   []litSpan // its literals, in order
	bareLF bool      // some line ended in LF without CR
	budget int64     // literal bytes it may still capture
}

// litSpan places a literal in framer.line: the header starts at hdr and the
// content would sit at end, right after the header's line end.
type litSpan struct {
	hdr, end int
	lit      *Literal
}

func newFramer(r io.Reader, opts Options, side string) *framer {
	return &framer{
		br:   bufio.NewReaderSize(r, 32<<10),
		opts: opts.withDefaults(),
		side: side,
	}
}

// readUnit reads and forwards one unit. literalOK decides whether a literal
// header ending the unit's first line, starting at hdr, counts as one: in a
// server status response it would be part of the human text, and in place
// of a command name Dovecot reads it as the name. refused reports that fwd
// refused a synchronizing literal, which ends the unit at its header.
func (f *framer) readUnit(fwd Forward, literalOK func(first []byte, hdr int) bool) (refused bool, err error) {
	if f.err != nil {
		return false, f.err
	}
	f.start = f.off
	f.line = f.line[:0]
	f.lits = nil
	f.bareLF = false
	f.budget = f.opts.MaxInlineLiteral
	for first := true; ; first = false {
		segStart := len(f.line)
		if err := f.readLine(); err != nil {
			if errors.Is(err, io.EOF) && len(f.line) == 0 {
				return false, io.EOF
			}
			return false, f.fail(err)
		}
		seg := f.line[segStart:]
		check := literalOK
		if !first {
			check = nil
		}
		lit, err := f.literalHeader(segStart, check)
		if err != nil {
			var tl *LiteralTooLargeError
			if errors.As(err, &tl) && tl.InStep {
				return false, err
			}
			return false, f.fail(err)
		}
		if fwd != nil {
			if err := fwd(Part{Raw: seg}); err != nil {
				if lit != nil && !lit.NonSync && errors.Is(err, ErrLiteralRefused) {
					// Refused at its header: the server answered before
					// the forwarder handed on the literal itself.
					lit.Data = nil
					return true, nil
				}
				return false, f.fail(fmt.Errorf("imapwire: forward %s line at byte %d: %w", f.side, f.off-int64(len(seg)), err))
			}
		}
		if lit == nil {
			return false, nil
		}
		refused, err := f.literal(lit, fwd)
		if err != nil || refused {
			return refused, err
		}
	}
}

func (f *framer) fail(err error) error {
	f.err = err
	return err
}

// readLine appends one line, up to and including LF, to f.line.
func (f *framer) readLine() error {
	for {
		chunk, err := f.br.ReadSlice('\n')
		if len(f.line)+len(chunk) > f.opts.MaxLine {
			return &LineTooLongError{Offset: f.start, Max: f.opts.MaxLine}
		}
		f.line = append(f.line, chunk...)
		f.off += int64(len(chunk))
		switch {
		case err == nil:
			// RFC 9051 section 2.2 requires CRLF; Dovecot accepts a bare LF,
			// so the tokenizer must end the line there too to stay in step.
			if n := len(f.line); n < 2 || f.line[n-2] != '\r' {
				f.bareLF = true
			}
			return nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF):
			if len(f.line) == 0 {
				return io.EOF
			}
			return fmt.Errorf("imapwire: %s at byte %d ends in the middle of a line: %w", f.side, f.start, io.ErrUnexpectedEOF)
		default:
			return fmt.Errorf("imapwire: read %s at byte %d: %w", f.side, f.off, err)
		}
	}
}

// literalHeader looks for a literal header ending the line that starts at
// f.line[segStart:], and records it. RFC 9051 section 4.3: a literal is
// "{" size "}" CRLF (RFC 7888 adds "+" before "}", RFC 3516 a "~" prefix),
// and the content follows the CRLF. The header must start an argument, after
// SP or "(", and must not sit inside a quoted string; anywhere else Dovecot
// rejects the line without reading a literal, and so must we.
func (f *framer) literalHeader(segStart int, check func([]byte, int) bool) (*Literal, error) {
	seg := f.line[segStart:]
	body := seg[:len(seg)-1] // drop LF
	if n := len(body); n > 0 && body[n-1] == '\r' {
		body = body[:n-1]
	}
	n := len(body)
	if n < 3 || body[n-1] != '}' {
		return nil, nil
	}
	i := n - 2
	nonSync := false
	if body[i] == '+' {
		nonSync = true
		i--
	}
	digitsEnd := i + 1
	for i >= 0 && body[i] >= '0' && body[i] <= '9' {
		i--
	}
	if i < 0 || i+1 == digitsEnd || body[i] != '{' {
		return nil, nil
	}
	digits := body[i+1 : digitsEnd]
	hdr := i
	binary := false
	if hdr > 0 && body[hdr-1] == '~' {
		binary = true
		hdr--
	}
	if hdr == 0 || (body[hdr-1] != ' ' && body[hdr-1] != '(') {
		return nil, nil
	}
	if inQuoted(body[:hdr]) || (check != nil && !check(seg, hdr)) {
		return nil, nil
	}
	hdrOff := f.off - int64(len(seg)) + int64(hdr)
	// A client waits for "+" before sending a synchronizing literal's
	// content (RFC 9051 section 7.5): refused, it sends none, and the
	// stream goes on with its next command.
	inStep := !nonSync && f.side == "command"
	var size int64
	for _, d := range digits {
		if size > (1<<63-1-9)/10 {
			return nil, &LiteralTooLargeError{Offset: hdrOff, Size: -1, Max: f.opts.MaxLiteral, InStep: inStep}
		}
		size = size*10 + int64(d-'0')
	}
	if size > f.opts.MaxLiteral {
		return nil, &LiteralTooLargeError{Offset: hdrOff, Size: size, Max: f.opts.MaxLiteral, InStep: inStep}
	}
	if limit := f.opts.MaxCommand; limit > 0 {
		// The unit's bytes so far, earlier literals' content included,
		// up to this header's "}", as Dovecot counts them.
		used := f.off - int64(len(seg)) + int64(n) - f.start
		if size > limit-used {
			return nil, &LiteralTooLargeError{Offset: hdrOff, Size: size, Max: max(limit-used, 0), InStep: inStep}
		}
	}
	lit := &Literal{Size: size, Binary: binary, NonSync: nonSync, Offset: f.off}
	if f.budget >= 0 && size <= f.budget {
		f.budget -= size
		lit.Data = make([]byte, 0, size)
	}
	f.lits = append(f.lits, litSpan{hdr: segStart + hdr, end: len(f.line), lit: lit})
	return lit, nil
}

// inQuoted reports whether a line prefix ends inside a quoted string
// (RFC 9051 section 4.3: quoted-specials are escaped with a backslash).
func inQuoted(b []byte) bool {
	in := false
	for i := 0; i < len(b); i++ {
		switch {
		case !in && b[i] == '"':
			in = true
		case in && b[i] == '\\':
			i++
		case in && b[i] == '"':
			in = false
		}
	}
	return in
}

// literal hands lit to fwd and then reads whatever content fwd left.
func (f *framer) literal(lit *Literal, fwd Forward) (refused bool, err error) {
	body := &literalBody{f: f, lit: lit, remaining: lit.Size}
	lit.Body = body
	if fwd != nil {
		err = fwd(Part{Literal: lit})
	}
	lit.Body = nil
	if errors.Is(err, ErrLiteralRefused) && !lit.NonSync && body.remaining == lit.Size {
		lit.Data = nil
		return true, nil
	}
	if err != nil {
		return false, f.fail(fmt.Errorf("imapwire: forward %s literal at byte %d: %w", f.side, lit.Offset, err))
	}
	if _, err := io.Copy(io.Discard, body); err != nil {
		return false, f.fail(err)
	}
	return false, nil
}

// literalBody reads one literal's content from the framer's stream.
type literalBody struct {
	f         *framer
	lit       *Literal
	remaining int64
	err       error
}

func (b *literalBody) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	if b.remaining == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > b.remaining {
		p = p[:b.remaining]
	}
	n, err := b.f.br.Read(p)
	b.remaining -= int64(n)
	b.f.off += int64(n)
	if b.lit.Data != nil {
		b.lit.Data = append(b.lit.Data, p[:n]...)
	}
	switch {
	case err == nil:
	case errors.Is(err, io.EOF):
		if b.remaining > 0 {
			b.err = fmt.Errorf("imapwire: %s literal at byte %d ends after %d of %d bytes: %w",
				b.f.side, b.lit.Offset, b.lit.Size-b.remaining, b.lit.Size, io.ErrUnexpectedEOF)
		}
	default:
		b.err = fmt.Errorf("imapwire: read %s literal at byte %d: %w", b.f.side, b.lit.Offset, err)
	}
	if b.err != nil {
		b.f.err = b.err
		if n > 0 {
			return n, nil
		}
		return 0, b.err
	}
	return n, nil
}
