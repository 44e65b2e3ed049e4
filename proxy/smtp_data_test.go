package proxy

import (
	"bufio"
	"bytes"
	"io"
	"testing"
)

// FuzzDataRoundTrip checks that whatever bytes a logged message holds,
// the DATA stream the proxy sends upstream ends exactly where the proxy
// ends it, by Postfix's rule and by Dovecot's, and carries the message's
// lines unchanged: no message can end early upstream and have its rest
// taken as commands.
func FuzzDataRoundTrip(f *testing.F) {
	for _, seed := range []string{
		"", "a", "a\r\n", ".\r\n", "..\r\n", ".\n", "a\n.\nMAIL FROM:<x>\r\n", ".\r\r\n", "a\r.\r\n",
		"\r\n.\r\n", "x\r", "\r", ".", "line\rcr\r\n.\r\r\r\n\x00\n",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, m []byte) {
		var enc bytes.Buffer
		bw := bufio.NewWriter(&enc)
		dw := &dotWriter{w: bw, start: true}
		dw.Write(m)
		dw.close()
		bw.Flush()
		for _, lmtp := range []bool{false, true} {
			s := &smtpSession{
				p:  &SMTPProxy{cfg: SMTPConfig{LMTP: lmtp}},
				br: bufio.NewReader(io.MultiReader(bytes.NewReader(enc.Bytes()), bytes.NewReader([]byte("NEXT\r\n")))),
				bw: bufio.NewWriter(io.Discard),
			}
			var got bytes.Buffer
			if _, err := s.readData(&got); err != nil {
				t.Fatalf("lmtp=%v: read %q: %v", lmtp, enc.Bytes(), err)
			}
			rest, _ := io.ReadAll(s.br)
			if string(rest) != "NEXT\r\n" {
				t.Fatalf("lmtp=%v: message %q ended early upstream; left %q", lmtp, m, rest)
			}
			if want := crlfLines(m); !bytes.Equal(got.Bytes(), want) {
				t.Fatalf("lmtp=%v: message %q arrived as %q, want %q", lmtp, m, got.Bytes(), want)
			}
		}
	})
}

// crlfLines is m with a CR before each bare LF and a final CRLF if m does
// not end with LF: the lines an upstream stores for m either way.
func crlfLines(m []byte) []byte {
	var out []byte
	for i, c := range m {
		if c == '\n' && (i == 0 || m[i-1] != '\r') {
			out = append(out, '\r')
		}
		out = append(out, c)
	}
	if len(m) > 0 && m[len(m)-1] != '\n' {
		out = append(out, '\r', '\n')
	}
	return out
}
