package smtpclient

import (
	"bufio"
	"context"
	"net"
	"strings"
	"testing"
	"time"
)

func TestXtext(t *testing.T) {
	if got := Xtext("a+b=c d\x01é"); got != "a+2Bb+3Dc+20d+01+C3+A9" {
		t.Fatalf("Xtext = %q", got)
	}
	if args := XCLIENTArgs(&net.TCPAddr{IP: net.ParseIP("::1"), Port: 25}); args != "NAME=[UNAVAILABLE] ADDR=IPV6:::1 PORT=25" {
		t.Fatalf("XCLIENTArgs = %q", args)
	}
	if args := XCLIENTArgs(&net.TCPAddr{IP: net.ParseIP("192.0.2.7"), Port: 4711}); args != "NAME=[UNAVAILABLE] ADDR=192.0.2.7 PORT=4711" {
		t.Fatalf("XCLIENTArgs = %q", args)
	}
	if args := XCLIENTArgs(nil); args != "NAME=[UNAVAILABLE]" {
		t.Fatalf("XCLIENTArgs(nil) = %q", args)
	}
}

func TestReadReply(t *testing.T) {
	code, lines, err := ReadReply(bufio.NewReader(strings.NewReader("250-mx\r\n250-XCLIENT ADDR\r\n250 SIZE 10\r\nrest")))
	if err != nil || code != 250 || len(lines) != 3 || lines[1] != "XCLIENT ADDR" {
		t.Fatalf("ReadReply = %d %q %v", code, lines, err)
	}
	for _, bad := range []string{"25\r\n", "abc ok\r\n", "250*x\r\n", "250-unterminated", "250-a\r\n251 b\r\n"} {
		if _, _, err := ReadReply(bufio.NewReader(strings.NewReader(bad))); err == nil {
			t.Errorf("ReadReply(%q) accepted a malformed reply", bad)
		}
	}
	var raw []byte
	if _, _, err := ReadReplyRaw(bufio.NewReader(strings.NewReader("220-a\r\n220 b\r\nnext")), &raw); err != nil || string(raw) != "220-a\r\n220 b\r\n" {
		t.Fatalf("ReadReplyRaw kept %q, %v", raw, err)
	}
}

// FuzzReadReply feeds arbitrary upstream bytes to the reply reader used
// before XCLIENT: it must never panic and never return an out-of-range code.
func FuzzReadReply(f *testing.F) {
	f.Add("220 mx ESMTP\r\n")
	f.Add("250-a\r\n250 b\r\n")
	f.Fuzz(func(t *testing.T, s string) {
		code, lines, err := ReadReply(bufio.NewReader(strings.NewReader(s)))
		if err == nil && (code < 0 || code > 999 || len(lines) == 0) {
			t.Fatalf("ReadReply(%q) = %d %q", s, code, lines)
		}
	})
}

// TestDialAs checks the dialogue DialAs holds with a server speaking
// Postfix's XCLIENT (https://www.postfix.org/XCLIENT_README.html): the
// recorded client's address and HELO name go in XCLIENT, the session
// greets with that HELO name, and a refused XCLIENT is an error. The
// real Postfix is exercised by replay's re-injection tests.
func TestDialAs(t *testing.T) {
	for _, tc := range []struct {
		name, client, helo string
		xclientReply       string
		wantXCLIENT        string
		wantEHLO           string
		wantErr            bool
	}{
		{name: "recorded client", client: "192.0.2.7:4711", helo: "laptop.example", xclientReply: "220 mx ESMTP",
			wantXCLIENT: "XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.7 PORT=4711 HELO=laptop.example PROTO=ESMTP", wantEHLO: "EHLO laptop.example"},
		{name: "unknown client", client: "not an address", xclientReply: "220 mx ESMTP",
			wantXCLIENT: "XCLIENT NAME=[UNAVAILABLE] PROTO=ESMTP", wantEHLO: "EHLO undomail-test"},
		{name: "refused", client: "192.0.2.7:1", xclientReply: "550 5.7.0 not authorized",
			wantXCLIENT: "XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.7 PORT=1 PROTO=ESMTP", wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			got := make(chan []string, 1)
			go func() {
				var said []string
				defer func() { got <- said }()
				c, err := ln.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				br := bufio.NewReader(c)
				c.Write([]byte("220 mx ESMTP\r\n"))
				line, err := br.ReadString('\n')
				if err != nil {
					return
				}
				said = append(said, strings.TrimRight(line, "\r\n"))
				c.Write([]byte(tc.xclientReply + "\r\n"))
				if !strings.HasPrefix(tc.xclientReply, "220") {
					return
				}
				if line, err = br.ReadString('\n'); err != nil {
					return
				}
				said = append(said, strings.TrimRight(line, "\r\n"))
				c.Write([]byte("250 mx\r\n"))
				br.ReadString('\n') // QUIT or the connection closing
			}()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			c, err := DialAs(ctx, ln.Addr().String(), tc.client, tc.helo, "undomail-test", time.Minute)
			if tc.wantErr != (err != nil) {
				t.Fatalf("DialAs: error %v, want an error: %v", err, tc.wantErr)
			}
			if c != nil {
				c.Close()
			}
			said := <-got
			if len(said) == 0 || said[0] != tc.wantXCLIENT {
				t.Fatalf("the server was sent %q, want first %q", said, tc.wantXCLIENT)
			}
			if !tc.wantErr && (len(said) < 2 || said[1] != tc.wantEHLO) {
				t.Fatalf("the server was sent %q, want then %q", said, tc.wantEHLO)
			}
		})
	}
}
