package imapwire

import (
	"crypto/sha256"
	"io"
	"runtime"
	"strings"
	"testing"
)

// patternReader produces n bytes of message-like text without holding them.
type patternReader struct{ n int64 }

func (p *patternReader) Read(b []byte) (int, error) {
	if p.n == 0 {
		return 0, io.EOF
	}
	if int64(len(b)) > p.n {
		b = b[:p.n]
	}
	for i := range b {
		b[i] = "abcdefghij\r\n"[(p.n-int64(i))%12]
	}
	p.n -= int64(len(b))
	return len(b), nil
}

// TestLargeLiteralStreams sends a 25 MB APPEND through the reader and
// checks that it never holds the message: the bytes allocated while
// reading it stay far below its size.
func TestLargeLiteralStreams(t *testing.T) {
	const size = 25 << 20
	in := io.MultiReader(
		strings.NewReader("A1 APPEND INBOX (\\Seen) {26214400}\r\n"),
		&patternReader{n: size},
		strings.NewReader("\r\n"),
		strings.NewReader("A2 NOOP\r\n"),
	)
	r := NewCommandReader(in, Options{})
	wantSum := sha256.New()
	if _, err := io.Copy(wantSum, &patternReader{n: size}); err != nil {
		t.Fatal(err)
	}
	gotSum := sha256.New()
	fwd := func(p Part) error {
		if p.Literal != nil {
			_, err := io.Copy(gotSum, p.Literal.Body)
			return err
		}
		return nil
	}

	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	cmd, err := r.Next(fwd)
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatal(err)
	}
	grew := after.TotalAlloc - before.TotalAlloc
	t.Logf("reading a %d-byte literal allocated %d bytes", size, grew)
	if grew > 2<<20 {
		t.Fatalf("reading a %d-byte literal allocated %d bytes; it must stream", size, grew)
	}
	if string(gotSum.Sum(nil)) != string(wantSum.Sum(nil)) {
		t.Fatalf("the literal content forwarded differs from what was sent")
	}
	if len(cmd.Literals) != 1 || cmd.Literals[0].Size != size || cmd.Literals[0].Data != nil {
		t.Fatalf("literals = %+v, want one uncaptured literal of %d bytes", cmd.Literals, size)
	}
	if cmd, err := r.Next(nil); err != nil || cmd.Name != "NOOP" {
		t.Fatalf("command after the literal = %v, %v; want NOOP", cmd, err)
	}
}

// TestUnreadLiteralIsSkipped: a forwarder that ignores a literal body must
// not derail the reader.
func TestUnreadLiteralIsSkipped(t *testing.T) {
	r := NewResponseReader(strings.NewReader("* 1 FETCH (BODY[] {5}\r\nhello UID 3)\r\n* 2 EXISTS\r\n"), Options{})
	resp, err := r.Next(func(Part) error { return nil })
	if err != nil || resp.Fetch.UID != 3 || string(resp.Literals[0].Data) != "hello" {
		t.Fatalf("response = %+v, %v", resp, err)
	}
	if resp, err := r.Next(nil); err != nil || resp.Name != "EXISTS" || r.Offset() != 49 {
		t.Fatalf("next = %+v, %v at offset %d", resp, err, r.Offset())
	}
}
