package imapwire

import (
	"bufio"
	"io"
)

// ReadLine reads one raw line, CRLF included, outside the command grammar:
// the client's answers during AUTHENTICATE (RFC 9051 section 6.2.2) are
// base64 lines, not commands. A line longer than Options.MaxLine fails with
// *LineTooLongError.
func (r *CommandReader) ReadLine() ([]byte, error) {
	f := r.f
	if f.err != nil {
		return nil, f.err
	}
	var line []byte
	for {
		chunk, err := f.br.ReadSlice('\n')
		line = append(line, chunk...)
		f.off += int64(len(chunk))
		if len(line) > f.opts.MaxLine {
			return nil, f.fail(&LineTooLongError{Offset: f.off - int64(len(line)), Max: f.opts.MaxLine})
		}
		switch {
		case err == nil:
			return line, nil
		case err == io.EOF && len(line) > 0:
			return nil, f.fail(io.ErrUnexpectedEOF)
		case err != bufio.ErrBufferFull:
			return nil, f.fail(err)
		}
	}
}

// Buffered returns how many bytes the reader holds that no command has
// consumed yet. After STARTTLS it must be zero: bytes the client sent
// before the handshake must not be read as if they came through TLS
// (RFC 9051 section 6.2.1).
func (r *CommandReader) Buffered() int { return r.f.br.Buffered() }
