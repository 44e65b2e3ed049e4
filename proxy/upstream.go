package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/emersion/go-smtp"
)

// upstreamCaps is what the upstream's EHLO/LHLO advertised.
type upstreamCaps struct {
	size     int64
	smtpUTF8 bool
	dsn      bool
	auth     []string
	xclient  bool
}

// clientInfo is what the proxy knows about the client it relays for.
type clientInfo struct {
	addr net.Addr
	helo string
}

// dialer opens upstream connections for one listener.
type dialer struct {
	addr    string
	lmtp    bool
	timeout time.Duration
	// xclient makes every connection start with Postfix's XCLIENT command
	// (https://www.postfix.org/XCLIENT_README.html) so the upstream applies
	// its relay and access policy to the real client's address, not to
	// undomail's. Without it the upstream would see every client as
	// undomail's own loopback address, which is usually in mynetworks: an
	// open relay.
	xclient bool
	// localName is sent in LHLO (LMTP) and in the EHLO before XCLIENT.
	localName string
}

// dial connects to the upstream and returns a client that has greeted it.
// Network failures are returned as errors; a refusal by the upstream as an
// *smtp.SMTPError.
func (d *dialer) dial(ctx context.Context, ci clientInfo) (*smtp.Client, error) {
	nd := net.Dialer{Timeout: d.timeout}
	conn, err := nd.DialContext(ctx, "tcp", d.addr)
	if err != nil {
		return nil, fmt.Errorf("connect to upstream %s: %w", d.addr, err)
	}
	if d.xclient && !d.lmtp {
		if err := d.sendXClient(conn, ci); err != nil {
			conn.Close()
			return nil, err
		}
	}
	var c *smtp.Client
	if d.lmtp {
		c = smtp.NewClientLMTP(conn)
	} else {
		c = smtp.NewClient(conn)
	}
	c.CommandTimeout = d.timeout
	c.SubmissionTimeout = d.timeout
	name := d.localName
	if d.xclient && !d.lmtp && ci.helo != "" {
		// After XCLIENT the upstream logs and checks the client's own
		// HELO name; greeting with it again keeps them consistent.
		name = ci.helo
	}
	if err := c.Hello(name); err != nil {
		c.Close()
		var se *smtp.SMTPError
		if d.xclient && !d.lmtp && errors.As(err, &se) {
			// The "greeting" was the reply to XCLIENT: a refusal is
			// undomail's configuration problem, not the client's, and
			// must not reach it as a permanent error.
			return nil, fmt.Errorf("upstream %s refused XCLIENT (is undomail's address in smtpd_authorized_xclient_hosts?): %v", d.addr, se)
		}
		return nil, fmt.Errorf("greet upstream %s: %w", d.addr, err)
	}
	return c, nil
}

// sendXClient reads the greeting and sends XCLIENT. Its reply is a fresh
// 220 greeting (XCLIENT_README: "the server responds with a 220
// greeting"), left unread for go-smtp's client to consume as the session's
// greeting. No EHLO goes first: whether the upstream offers XCLIENT to
// undomail was checked once by probe, and Postfix accepts XCLIENT in any
// state outside a mail transaction, so each connection saves a round trip
// and an EHLO's worth of work in smtpd.
func (d *dialer) sendXClient(conn net.Conn, ci clientInfo) error {
	if err := conn.SetDeadline(time.Now().Add(d.timeout)); err != nil {
		return err
	}
	defer conn.SetDeadline(time.Time{})
	// The upstream sends nothing unasked after its greeting, so this
	// reader cannot consume bytes meant for go-smtp.
	br := bufio.NewReader(conn)
	if _, _, err := readReply(br); err != nil {
		return fmt.Errorf("read greeting from upstream %s: %w", d.addr, err)
	}
	if _, err := fmt.Fprintf(conn, "XCLIENT %s\r\n", xclientArgs(ci)); err != nil {
		return fmt.Errorf("send XCLIENT to upstream %s: %w", d.addr, err)
	}
	return nil
}

// xclientArgs formats the XCLIENT attributes for a client. NAME is
// [UNAVAILABLE] because undomail does no reverse lookups of its own; the
// upstream does its own if it is configured to.
func xclientArgs(ci clientInfo) string {
	args := []string{"NAME=[UNAVAILABLE]"}
	if ta, ok := ci.addr.(*net.TCPAddr); ok {
		ip := ta.IP.String()
		if ta.IP.To4() == nil {
			ip = "IPV6:" + ip
		}
		args = append(args, "ADDR="+xtext(ip), "PORT="+strconv.Itoa(ta.Port))
	}
	if ci.helo != "" {
		args = append(args, "HELO="+xtext(ci.helo))
	}
	args = append(args, "PROTO=ESMTP")
	return strings.Join(args, " ")
}

// xtext encodes a value as RFC 3461 section 4 xtext.
func xtext(s string) string {
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

// readReply reads one possibly multi-line SMTP reply (RFC 5321 section
// 4.2.1) and returns its code and the text of each line.
func readReply(br *bufio.Reader) (int, []string, error) {
	var lines []string
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return 0, nil, err
		}
		line = strings.TrimRight(line, "\r\n")
		if len(line) < 3 {
			return 0, nil, fmt.Errorf("malformed reply line %q", line)
		}
		code := 0
		for _, c := range line[:3] {
			if c < '0' || c > '9' {
				return 0, nil, fmt.Errorf("malformed reply line %q", line)
			}
			code = code*10 + int(c-'0')
		}
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

// probe connects once and reads the upstream's capabilities, so the proxy
// advertises only what the upstream offers (SIZE, SMTPUTF8, DSN, AUTH).
func (d *dialer) probe(ctx context.Context) (upstreamCaps, error) {
	var caps upstreamCaps
	pd := *d
	pd.xclient = false // XCLIENT's presence is checked by every real dial
	c, err := pd.dial(ctx, clientInfo{})
	if err != nil {
		return caps, err
	}
	defer c.Close()
	if ok, v := c.Extension("SIZE"); ok {
		caps.size, _ = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
	}
	caps.smtpUTF8, _ = c.Extension("SMTPUTF8")
	caps.dsn, _ = c.Extension("DSN")
	caps.xclient, _ = c.Extension("XCLIENT")
	if ok, v := c.Extension("AUTH"); ok {
		for _, m := range strings.Fields(strings.ToUpper(v)) {
			if m == "PLAIN" || m == "LOGIN" {
				caps.auth = append(caps.auth, m)
			}
		}
	}
	c.Quit()
	if d.xclient && !d.lmtp && !caps.xclient {
		return caps, fmt.Errorf("upstream %s does not offer XCLIENT to undomail: "+
			"add undomail's address to Postfix's smtpd_authorized_xclient_hosts, "+
			"or set smtp.xclient to false if the upstream's relay policy does not trust undomail's address", d.addr)
	}
	return caps, nil
}
