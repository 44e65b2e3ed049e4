package imapwire

import (
	"bytes"
	"fmt"
	"io"
	"strings"
	"testing"
)

// fetchStream is what Dovecot sends for "UID FETCH 1:* (UID FLAGS MODSEQ
// BODY.PEEK[HEADER])" on a mailbox of n messages, followed by a few whole
// message bodies, as a mail client's initial sync does.
func fetchStream(n int) []byte {
	var b bytes.Buffer
	hdr := "Return-Path: <alice@example.org>\r\nDelivered-To: bob@example.com\r\n" +
		"Received: from mx.example.org (mx.example.org [192.0.2.1])\r\n\tby mail.example.com with LMTP id abc\r\n\t; Mon, 1 Jan 2024 10:00:00 +0000\r\n" +
		"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.com>\r\nSubject: Quarterly numbers\r\n" +
		"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <1234@example.org>\r\nMIME-Version: 1.0\r\n" +
		"Content-Type: text/plain; charset=utf-8\r\n" + strings.Repeat("X-Spam-Report: filler text for a realistic header size\r\n", 12) + "\r\n"
	for i := 1; i <= n; i++ {
		fmt.Fprintf(&b, "* %d FETCH (UID %d FLAGS (\\Seen $NotJunk) MODSEQ (%d) BODY[HEADER] {%d}\r\n%s)\r\n", i, 1000+i, 5000+i, len(hdr), hdr)
	}
	body := strings.Repeat("Lorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n", 500)
	for i := 1; i <= n/20; i++ {
		fmt.Fprintf(&b, "* %d FETCH (UID %d BODY[] {%d}\r\n%s%s)\r\n", i, 1000+i, len(hdr)+len(body), hdr, body)
	}
	b.WriteString("A5 OK Fetch completed (0.050 + 0.000 + 0.049 secs).\r\n")
	return b.Bytes()
}

// BenchmarkResponseReaderFetch measures tokenizing throughput on a FETCH
// stream forwarded to io.Discard; compare with BenchmarkCopyBaseline.
func BenchmarkResponseReaderFetch(b *testing.B) {
	data := fetchStream(1000)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	fwd := func(p Part) error {
		if p.Literal != nil {
			_, err := io.Copy(io.Discard, p.Literal.Body)
			return err
		}
		_, err := io.Discard.Write(p.Raw)
		return err
	}
	for b.Loop() {
		r := NewResponseReader(bytes.NewReader(data), Options{})
		for {
			if _, err := r.Next(fwd); err != nil {
				if err != io.EOF {
					b.Fatal(err)
				}
				break
			}
		}
	}
}

// BenchmarkCopyBaseline is the cost of splicing the same stream without a
// tokenizer, through a 32 KiB buffer as io.Copy between two sockets does.
func BenchmarkCopyBaseline(b *testing.B) {
	data := fetchStream(1000)
	b.SetBytes(int64(len(data)))
	buf := make([]byte, 32<<10)
	for b.Loop() {
		src := struct{ io.Reader }{bytes.NewReader(data)}
		dst := struct{ io.Writer }{io.Discard}
		if _, err := io.CopyBuffer(dst, src, buf); err != nil {
			b.Fatal(err)
		}
	}
}
