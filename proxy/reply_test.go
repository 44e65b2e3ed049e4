package proxy

import (
	"bufio"
	"net"
	"strings"
	"testing"

	"github.com/emersion/go-smtp"
)

func TestReplyFromText(t *testing.T) {
	for _, tc := range []struct {
		code int
		msg  string
		want Reply
	}{
		{250, "2.0.0 Ok: queued as 4F1", Reply{250, "2.0.0", "Ok: queued as 4F1"}},
		{250, "Ok", Reply{250, "", "Ok"}},
		{250, "2.0.0 first\n2.0.0 second", Reply{250, "2.0.0", "first\nsecond"}},
		{250, "5.0.0 class does not match the code", Reply{250, "", "5.0.0 class does not match the code"}},
		{250, "2.0 not enhanced", Reply{250, "", "2.0 not enhanced"}},
		{250, "", Reply{250, "", ""}},
	} {
		if got := replyFromText(tc.code, tc.msg); got != tc.want {
			t.Errorf("replyFromText(%d, %q) = %+v, want %+v", tc.code, tc.msg, got, tc.want)
		}
	}
}

func TestReplyRoundTrip(t *testing.T) {
	// A reply without an enhanced code is relayed without one, not with
	// go-smtp's made-up X.0.0.
	r := replyFromError(&smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCodeNotSet, Message: "no"})
	if r.Enhanced != "" || r.smtpError().EnhancedCode != smtp.NoEnhancedCode {
		t.Fatalf("reply without enhanced code became %+v / %+v", r, r.smtpError())
	}
	r = replyFromError(&smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "line1\nline2"})
	e := r.smtpError()
	if e.Code != 550 || e.EnhancedCode != (smtp.EnhancedCode{5, 1, 1}) || e.Message != "5.1.1 line1\nline2" {
		t.Fatalf("round trip = %+v", e)
	}
}

func TestXtext(t *testing.T) {
	if got := xtext("a+b=c d\x01é"); got != "a+2Bb+3Dc+20d+01+C3+A9" {
		t.Fatalf("xtext = %q", got)
	}
	args := xclientArgs(clientInfo{addr: &net.TCPAddr{IP: net.ParseIP("::1"), Port: 25}, helo: "h.example"})
	if args != "NAME=[UNAVAILABLE] ADDR=IPV6:::1 PORT=25 HELO=h.example PROTO=ESMTP" {
		t.Fatalf("xclientArgs = %q", args)
	}
}

func TestReadReply(t *testing.T) {
	code, lines, err := readReply(bufio.NewReader(strings.NewReader("250-mx\r\n250-XCLIENT ADDR\r\n250 SIZE 10\r\nrest")))
	if err != nil || code != 250 || len(lines) != 3 || lines[1] != "XCLIENT ADDR" {
		t.Fatalf("readReply = %d %q %v", code, lines, err)
	}
	for _, bad := range []string{"25\r\n", "abc ok\r\n", "250*x\r\n", "250-unterminated"} {
		if _, _, err := readReply(bufio.NewReader(strings.NewReader(bad))); err == nil {
			t.Errorf("readReply(%q) accepted a malformed reply", bad)
		}
	}
}

func TestLoginServer(t *testing.T) {
	var gotUser, gotPass string
	s := newLoginServer(func(u, p string) error { gotUser, gotPass = u, p; return nil })
	ch, done, err := s.Next(nil)
	if string(ch) != "Username:" || done || err != nil {
		t.Fatalf("step 1: %q %v %v", ch, done, err)
	}
	ch, done, _ = s.Next([]byte("alice"))
	if string(ch) != "Password:" || done {
		t.Fatalf("step 2: %q %v", ch, done)
	}
	if _, done, err = s.Next([]byte("pw")); !done || err != nil || gotUser != "alice" || gotPass != "pw" {
		t.Fatalf("step 3: %v %v %q %q", done, err, gotUser, gotPass)
	}
	// With an initial response the user name comes first.
	s = newLoginServer(func(u, p string) error { gotUser = u; return nil })
	if ch, _, _ := s.Next([]byte("bob")); string(ch) != "Password:" {
		t.Fatalf("with initial response: %q", ch)
	}
	s.Next([]byte("pw"))
	if gotUser != "bob" {
		t.Fatalf("user = %q", gotUser)
	}
}

func TestHeaderSniffer(t *testing.T) {
	var h headerSniffer
	msg := "Undomail-Id: 01OLD\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nFrom: a@b\r\nMessage-Id:  <x@y>\r\n\r\nbody\r\nSubject: not a header\r\n"
	for i := 0; i < len(msg); i += 7 { // arrives in pieces
		h.Write([]byte(msg[i:min(i+7, len(msg))]))
	}
	info := h.info()
	if info.Subject != "Grüße" || info.MessageID != "<x@y>" || info.From != "a@b" || len(info.PriorIDs) != 1 || info.PriorIDs[0] != "01OLD" {
		t.Fatalf("info = %+v", info)
	}
}

// FuzzReadReply feeds arbitrary upstream bytes to the reply reader used
// before XCLIENT: it must never panic and never return an out-of-range code.
func FuzzReadReply(f *testing.F) {
	f.Add("220 mx ESMTP\r\n")
	f.Add("250-a\r\n250 b\r\n")
	f.Fuzz(func(t *testing.T, s string) {
		code, lines, err := readReply(bufio.NewReader(strings.NewReader(s)))
		if err == nil && (code < 0 || code > 999 || len(lines) == 0) {
			t.Fatalf("readReply(%q) = %d %q", s, code, lines)
		}
	})
}

// FuzzHeaderSniffer feeds arbitrary client message bytes to the header
// summary: it must never panic whatever the client sends.
func FuzzHeaderSniffer(f *testing.F) {
	f.Add([]byte("Subject: x\r\n\r\nbody"))
	f.Add([]byte("=?utf-8?b?broken\r\n\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		var h headerSniffer
		h.Write(b)
		h.info()
	})
}
