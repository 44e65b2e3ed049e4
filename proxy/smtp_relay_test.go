package proxy_test

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/proxy"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// scriptedUpstream answers like Postfix would, records every line it
// reads, and drops the connection at the test-only command DROP: an
// upstream that goes away in the middle of a session.
type scriptedUpstream struct {
	ln    net.Listener
	mu    sync.Mutex
	lines []string
}

func startScriptedUpstream(t *testing.T) *scriptedUpstream {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &scriptedUpstream{ln: ln}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go u.serve(c)
		}
	}()
	return u
}

func (u *scriptedUpstream) seen() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]string(nil), u.lines...)
}

func (u *scriptedUpstream) serve(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	fmt.Fprintf(c, "220 fake ESMTP\r\n")
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return
		}
		line = strings.TrimRight(line, "\r\n")
		u.mu.Lock()
		u.lines = append(u.lines, line)
		u.mu.Unlock()
		switch verb, _, _ := strings.Cut(line, " "); strings.ToUpper(verb) {
		case "EHLO":
			fmt.Fprintf(c, "250-fake\r\n250-XCLIENT ADDR PORT NAME\r\n250-AUTH PLAIN\r\n250 SIZE 1000000\r\n")
		case "XCLIENT":
			fmt.Fprintf(c, "220 fake ESMTP\r\n")
		case "AUTH":
			fmt.Fprintf(c, "235 2.7.0 Authentication successful\r\n")
		case "DROP":
			return
		case "DATA":
			fmt.Fprintf(c, "354 go ahead\r\n")
			for {
				l, err := br.ReadString('\n')
				if err != nil {
					return
				}
				if l == ".\r\n" {
					break
				}
			}
			fmt.Fprintf(c, "250 2.0.0 Ok: queued as FAKE\r\n")
		case "QUIT":
			fmt.Fprintf(c, "221 2.0.0 Bye\r\n")
			return
		default:
			fmt.Fprintf(c, "250 2.1.0 Ok\r\n")
		}
	}
}

// startRelay starts a front door with cfg and a log of its own.
func startRelay(t *testing.T, cfg proxy.SMTPConfig) (*undolog.Log, string) {
	t.Helper()
	l, err := undolog.Open(t.TempDir(), undolog.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	p, err := proxy.NewSMTP(context.Background(), cfg, l, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatalf("start front door: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go p.Serve(ln)
	t.Cleanup(func() { p.Close(context.Background()) })
	return l, ln.Addr().String()
}

// TestUpstreamLostMidSession: when the upstream connection breaks, the
// client's command gets 451 4.4.2 and its session goes on: the next
// command runs on a new upstream connection that was greeted and
// authenticated again exactly as the client had done.
func TestUpstreamLostMidSession(t *testing.T) {
	up := startScriptedUpstream(t)
	l, addr := startRelay(t, proxy.SMTPConfig{Upstream: up.ln.Addr().String(), XClient: true, AllowInsecureAuth: true, UpstreamTimeout: 5 * time.Second})
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := newLineReader(conn)
	r.expect(t, "220 fake")
	auth := "AUTH PLAIN " + base64.StdEncoding.EncodeToString([]byte("\x00alice\x00secret"))
	for _, step := range []struct{ send, want string }{
		{"EHLO client.test", "250"},
		{auth, "235"},
		{"DROP", "451 4.4.2"},
		{"MAIL FROM:<alice@example.test>", "250"},
		{"RCPT TO:<bob@example.test>", "250"},
		{"DATA", "354"},
		{"Subject: after\r\n\r\nagain\r\n.", "250 2.0.0 Ok: queued as FAKE"},
	} {
		fmt.Fprintf(conn, "%s\r\n", step.send)
		r.expect(t, step.want)
	}
	var ehlo, auths int
	for _, line := range up.seen() {
		switch {
		case line == "EHLO client.test":
			ehlo++
		case line == auth:
			auths++
		}
	}
	if ehlo != 2 || auths != 2 {
		t.Fatalf("upstream saw EHLO %d times and the AUTH %d times, want each twice (once replayed): %q", ehlo, auths, up.seen())
	}
	verbs, err := l.Verbs(context.Background(), undolog.Filter{Kinds: []string{verb.KindSMTPSubmit}})
	if err != nil || len(verbs) != 1 {
		t.Fatalf("verbs = %+v, %v; want one submission", verbs, err)
	}
	var a verb.DeliveryArgs
	json.Unmarshal(verbs[0].Args, &a)
	if a.AuthUser != "alice" || a.MailFrom != "alice@example.test" || a.Helo != "client.test" || len(a.Rcpts) != 1 {
		t.Fatalf("logged args %+v, want alice's authenticated submission from client.test to bob", a)
	}
}

// TestLMTPLogFailureRepliesPerRecipient: when the log cannot take a
// delivery, the capture owes Postfix one reply per accepted recipient
// (RFC 2033 section 4.2), a temporary one, and the session stays usable.
func TestLMTPLogFailureRepliesPerRecipient(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	l, addr := startRelay(t, proxy.SMTPConfig{Upstream: tb.Stack.LMTPAddr, LMTP: true})
	l.Close()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := newLineReader(conn)
	r.expect(t, "220")
	for _, step := range []struct{ send, want string }{
		{"LHLO client.test", "250"},
		{"MAIL FROM:<sender@example.test>", "250"},
		{"RCPT TO:<alice@example.test>", "250"},
		{"RCPT TO:<bob@example.test>", "250"},
		{"DATA", "354"},
	} {
		fmt.Fprintf(conn, "%s\r\n", step.send)
		r.expect(t, step.want)
	}
	fmt.Fprintf(conn, "Subject: x\r\n\r\ny\r\n.\r\n")
	r.expect(t, "451 4.3.0")
	r.expect(t, "451 4.3.0")
	fmt.Fprintf(conn, "MAIL FROM:<sender@example.test>\r\n")
	r.expect(t, "250")
}
