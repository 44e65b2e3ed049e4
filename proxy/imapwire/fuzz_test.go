package imapwire

import (
	"bytes"
	"errors"
	"io"
	"math/rand"
	"strings"
	"testing"
)

// fuzzOptions are small limits, so that the fuzzer reaches them.
var fuzzOptions = Options{MaxLine: 512, MaxLiteral: 4096, MaxInlineLiteral: 64, MaxDepth: 8}

// fuzzCheck runs one direction's reader over data whole and in random
// chunks and checks the promises every proxy relies on.
func fuzzCheck(t *testing.T, data []byte, read func(io.Reader, Options) ([]string, []byte, error)) {
	got, out, err := read(bytes.NewReader(data), fuzzOptions)
	if !typedErr(err) {
		t.Fatalf("untyped error %#v", err)
	}
	if !bytes.HasPrefix(data, out) {
		t.Fatalf("forwarded %q, which is not a prefix of the input %q", out, data)
	}
	if errors.Is(err, io.EOF) && !bytes.Equal(out, data) {
		t.Fatalf("read to the end but forwarded %q of %q", out, data)
	}
	chunked, chunkedOut, _ := read(&chunkReader{data: data, rnd: rand.New(rand.NewSource(int64(len(data))))}, fuzzOptions)
	if strings.Join(got, "\n") != strings.Join(chunked, "\n") || !bytes.Equal(out, chunkedOut) {
		t.Fatalf("chunked input parsed differently:\n%s\nvs whole:\n%s", strings.Join(chunked, "\n"), strings.Join(got, "\n"))
	}
}

func FuzzCommandReader(f *testing.F) {
	for _, tt := range commandTests {
		f.Add([]byte(tt.input))
	}
	f.Add([]byte("a1 APPEND INBOX {99999}\r\n"))
	f.Add([]byte("a1 X " + strings.Repeat("(", 12) + "\r\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzCheck(t, data, readCommands)
		// Every literal that was captured holds exactly its content.
		r := NewCommandReader(bytes.NewReader(data), fuzzOptions)
		for {
			cmd, err := r.Next(nil)
			if cmd != nil {
				for _, l := range cmd.Literals {
					if l.Data != nil && int64(len(l.Data)) != l.Size {
						t.Fatalf("literal of %d bytes captured %d", l.Size, len(l.Data))
					}
				}
			}
			if fatal(err) {
				return
			}
		}
	})
}

func FuzzResponseReader(f *testing.F) {
	for _, tt := range responseTests {
		f.Add([]byte(tt.input))
	}
	f.Add([]byte("* 1 FETCH (BODY[HEADER.FIELDS (A B)]<0> {3}\r\nabc MODSEQ (1))\r\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzCheck(t, data, readResponses)
		r := NewResponseReader(bytes.NewReader(data), fuzzOptions)
		for {
			resp, err := r.Next(nil)
			if resp != nil && resp.Fetch != nil {
				for _, s := range resp.Fetch.Sections {
					if s.Literal != nil && s.Size != s.Literal.Size {
						t.Fatalf("section %s reports %d bytes for a literal of %d", s.Name, s.Size, s.Literal.Size)
					}
				}
			}
			if fatal(err) {
				return
			}
		}
	})
}
