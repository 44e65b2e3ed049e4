package imapwire

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"strconv"
	"strings"
)

// copier returns a Forward that writes every part to out, the way a proxy
// relays them.
func copier(out *bytes.Buffer) Forward {
	return func(p Part) error {
		if p.Literal != nil {
			_, err := io.Copy(out, p.Literal.Body)
			return err
		}
		out.Write(p.Raw)
		return nil
	}
}

// chunkReader returns its input in pieces of random length.
type chunkReader struct {
	data []byte
	rnd  *rand.Rand
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := 1 + c.rnd.Intn(17)
	if n > len(p) {
		n = len(p)
	}
	if n > len(c.data) {
		n = len(c.data)
	}
	copy(p, c.data[:n])
	c.data = c.data[n:]
	return n, nil
}

// typedErr reports whether err is one of the errors the readers promise.
func typedErr(err error) bool {
	var se *SyntaxError
	var le *LineTooLongError
	var te *LiteralTooLargeError
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.As(err, &se) || errors.As(err, &le) || errors.As(err, &te)
}

// fatal reports whether the reader stops after err.
func fatal(err error) bool {
	var se *SyntaxError
	return err != nil && !errors.As(err, &se)
}

// readCommands reads r to its end or first fatal error and returns a
// transcript of what was parsed, the forwarded bytes and the final error.
func readCommands(r io.Reader, opts Options) (transcript []string, out []byte, err error) {
	var buf bytes.Buffer
	cr := NewCommandReader(r, opts)
	for {
		cmd, err := cr.Next(copier(&buf))
		if cmd != nil {
			transcript = append(transcript, cmd.summary())
		}
		if err != nil {
			transcript = append(transcript, "error: "+err.Error())
		}
		if fatal(err) {
			return transcript, buf.Bytes(), err
		}
	}
}

// readResponses is readCommands for server responses.
func readResponses(r io.Reader, opts Options) (transcript []string, out []byte, err error) {
	var buf bytes.Buffer
	rr := NewResponseReader(r, opts)
	for {
		resp, err := rr.Next(copier(&buf))
		if resp != nil {
			transcript = append(transcript, resp.summary())
		}
		if err != nil {
			transcript = append(transcript, "error: "+err.Error())
		}
		if fatal(err) {
			return transcript, buf.Bytes(), err
		}
	}
}

// summary renders a command compactly for comparisons.
func (c *Command) summary() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "%s %s", c.Tag, c.Name)
	if c.UID {
		sb.WriteString(" uid")
	}
	if c.Refused {
		sb.WriteString(" refused")
	}
	if c.BareLF {
		sb.WriteString(" barelf")
	}
	sb.WriteString(":")
	renderValues(&sb, c.Args)
	return sb.String()
}

// summary renders a response compactly for comparisons.
func (r *Response) summary() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "%s %s", r.Kind, r.Tag)
	if r.HasNumber {
		fmt.Fprintf(&sb, " #%d", r.Number)
	}
	fmt.Fprintf(&sb, " %s", r.Name)
	if r.Code != nil {
		fmt.Fprintf(&sb, " [%s", r.Code.Name)
		if r.Code.Args != nil {
			renderValues(&sb, r.Code.Args)
		} else if r.Code.Text != "" {
			fmt.Fprintf(&sb, " text=%q", r.Code.Text)
		}
		sb.WriteString("]")
	}
	if r.Text != "" {
		fmt.Fprintf(&sb, " %q", r.Text)
	}
	if r.BareLF {
		sb.WriteString(" barelf")
	}
	sb.WriteString(":")
	renderValues(&sb, r.Args)
	if f := r.Fetch; f != nil {
		fmt.Fprintf(&sb, " | uid=%d modseq=%d", f.UID, f.ModSeq)
		if f.HasFlags {
			fmt.Fprintf(&sb, " flags=%v", f.Flags)
		}
		for _, s := range f.Sections {
			fmt.Fprintf(&sb, " %s=%d", s.Name, s.Size)
			if s.Nil {
				sb.WriteString("nil")
			}
		}
	}
	return sb.String()
}

func renderValues(sb *strings.Builder, vs []Value) {
	for _, v := range vs {
		sb.WriteByte(' ')
		renderValue(sb, v)
	}
}

func renderValue(sb *strings.Builder, v Value) {
	switch v.Kind {
	case Quoted:
		sb.WriteString(strconv.Quote(v.Text))
	case Number:
		sb.WriteString("#" + v.Text)
	case LiteralString:
		l := v.Literal
		if l.Binary {
			sb.WriteByte('~')
		}
		fmt.Fprintf(sb, "{%d", l.Size)
		if l.NonSync {
			sb.WriteByte('+')
		}
		sb.WriteByte('}')
		if l.Data != nil {
			sb.WriteString(strconv.Quote(v.Text))
		}
	case List:
		sb.WriteByte('(')
		for i, e := range v.List {
			if i > 0 {
				sb.WriteByte(' ')
			}
			renderValue(sb, e)
		}
		sb.WriteByte(')')
	default:
		sb.WriteString(v.Text)
	}
}
