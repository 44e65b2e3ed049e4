// Package smtpclient is the client side of undomail's SMTP talk with
// Postfix: reading raw replies (RFC 5321 section 4.2.1), formatting
// XCLIENT attributes (https://www.postfix.org/XCLIENT_README.html) and
// opening a session in a recorded client's name. The SMTP front end
// (proxy) relays through it, and replay re-injects mail with it
// (docs/operations.md, "Replay through Postfix"); it knows nothing of
// the undo log.
package smtpclient

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/emersion/go-smtp"
)

// XCLIENTArgs formats the XCLIENT attributes for a client at addr (nil,
// or not a TCP address: its address is left out). NAME is [UNAVAILABLE]
// because undomail does no reverse lookups of its own; the upstream does
// its own if it is configured to.
func XCLIENTArgs(addr net.Addr) string {
	args := []string{"NAME=[UNAVAILABLE]"}
	if ta, ok := addr.(*net.TCPAddr); ok && ta != nil && ta.IP != nil {
		ip := ta.IP.String()
		if ta.IP.To4() == nil {
			ip = "IPV6:" + ip
		}
		args = append(args, "ADDR="+Xtext(ip), "PORT="+strconv.Itoa(ta.Port))
	}
	return strings.Join(args, " ")
}

// Xtext encodes a value as RFC 3461 section 4 xtext.
func Xtext(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 33 || c > 126 || c == '+' || c == '=' {
			fmt.Fprintf(&b, "+%02X", c)
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}

// ReadReply reads one possibly multi-line SMTP reply (RFC 5321 section
// 4.2.1) and returns its code and the text of each line.
func ReadReply(br *bufio.Reader) (int, []string, error) {
	return ReadReplyRaw(br, nil)
}

// maxReplyLine bounds one reply line from the upstream (RFC 5321 section
// 4.5.3.1.5 allows 512 octets; Postfix and Dovecot stay well below this).
const maxReplyLine = 64 << 10

// ReadReplyRaw is ReadReply that also appends the reply's bytes to raw
// (nil: they are not kept).
func ReadReplyRaw(br *bufio.Reader, raw *[]byte) (int, []string, error) {
	var lines []string
	code := 0
	for {
		b, err := br.ReadSlice('\n')
		if err == bufio.ErrBufferFull {
			long := append([]byte(nil), b...)
			for err == bufio.ErrBufferFull && len(long) < maxReplyLine {
				b, err = br.ReadSlice('\n')
				long = append(long, b...)
			}
			b = long
		}
		if err != nil {
			return 0, nil, err
		}
		if raw != nil {
			*raw = append(*raw, b...)
		}
		line := strings.TrimRight(string(b), "\r\n")
		if len(line) < 3 {
			return 0, nil, fmt.Errorf("malformed reply line %q", line)
		}
		c := 0
		for _, ch := range line[:3] {
			if ch < '0' || ch > '9' {
				return 0, nil, fmt.Errorf("malformed reply line %q", line)
			}
			c = c*10 + int(ch-'0')
		}
		if code != 0 && c != code {
			return 0, nil, fmt.Errorf("reply line %q changes the code %d", line, code)
		}
		code = c
		if len(line) > 3 {
			lines = append(lines, line[4:])
		} else {
			lines = append(lines, "")
		}
		if len(line) == 3 || line[3] == ' ' {
			return code, lines, nil
		}
		if line[3] != '-' {
			return 0, nil, fmt.Errorf("malformed reply line %q", line)
		}
	}
}

// DialAs opens an SMTP session with Postfix at addr as the client a
// front-door submission came from: XCLIENT gives Postfix the client's
// address and HELO name as the front door recorded them, so its
// restrictions judge the original client again; the session then greets
// with that HELO name (localName when none was recorded). client is
// "ip:port" (verb.DeliveryArgs.Client); one that does not parse is left
// out and Postfix sees undomail's own address.
func DialAs(ctx context.Context, addr, client, helo, localName string, timeout time.Duration) (*smtp.Client, error) {
	conn, err := (&net.Dialer{Timeout: timeout}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", addr, err)
	}
	conn.SetDeadline(time.Now().Add(timeout))
	// Postfix sends nothing unasked after its greeting, so this reader
	// cannot take bytes meant for the SMTP client below.
	code, lines, err := ReadReply(bufio.NewReaderSize(conn, 1))
	if err != nil || code != 220 {
		conn.Close()
		return nil, fmt.Errorf("greeting from %s: %d %s %v", addr, code, strings.Join(lines, " "), err)
	}
	var ca net.Addr
	if ta, err := net.ResolveTCPAddr("tcp", client); err == nil && ta.IP != nil {
		ca = ta
	}
	args := XCLIENTArgs(ca)
	if helo != "" {
		args += " HELO=" + Xtext(helo)
	}
	if _, err := fmt.Fprintf(conn, "XCLIENT %s PROTO=ESMTP\r\n", args); err != nil {
		conn.Close()
		return nil, fmt.Errorf("send XCLIENT to %s: %w", addr, err)
	}
	conn.SetDeadline(time.Time{})
	// XCLIENT's reply is a fresh 220 greeting: the client reads it as its
	// session's greeting (a refusal fails Hello).
	c := smtp.NewClient(conn)
	c.CommandTimeout, c.SubmissionTimeout = timeout, timeout
	name := helo
	if name == "" {
		name = localName
	}
	if err := c.Hello(name); err != nil {
		c.Close()
		return nil, fmt.Errorf("XCLIENT and EHLO at %s (is undomail's address in smtpd_authorized_xclient_hosts?): %w", addr, err)
	}
	return c, nil
}
