package proxy

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/undomail/undomail/internal/smtpclient"
	"github.com/undomail/undomail/verb"
)

// upstreamCaps is what the upstream's EHLO/LHLO advertised to undomail.
type upstreamCaps struct {
	size     int64
	smtpUTF8 bool
	dsn      bool
	chunking bool
	auth     []string
	xclient  bool
}

// clientInfo is what the proxy knows about the client it relays for.
type clientInfo struct {
	addr net.Addr
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
	// localName is sent in the probe's EHLO/LHLO.
	localName string
}

// upstreamConn is one raw connection to the upstream. Commands go out as
// the client sent them; replies come back as raw lines to relay unchanged.
type upstreamConn struct {
	conn net.Conn
	br   *bufio.Reader
	bw   *bufio.Writer
	// greeting is the upstream's 220 reply, raw: after XCLIENT the second
	// one, which names the real client's session.
	greeting  []byte
	greetCode int
}

// dial connects to the upstream and reads its greeting. With XCLIENT it
// sends the client's address first, so the greeting returned is the one
// for the client's session. Network failures and a refused XCLIENT are
// errors; a greeting that refuses service (554, 421) is returned for the
// caller to relay.
func (d *dialer) dial(ctx context.Context, ci clientInfo, xclient bool) (*upstreamConn, error) {
	nd := net.Dialer{Timeout: d.timeout}
	conn, err := nd.DialContext(ctx, "tcp", d.addr)
	if err != nil {
		return nil, fmt.Errorf("connect to upstream %s: %w", d.addr, err)
	}
	tc := &timedConn{Conn: conn, timeout: d.timeout}
	u := &upstreamConn{conn: tc, br: bufio.NewReaderSize(tc, 4096), bw: bufio.NewWriterSize(tc, 16<<10)}
	raw, rep, err := u.reply()
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("read greeting from upstream %s: %w", d.addr, err)
	}
	if xclient && rep.Code == 220 {
		// XCLIENT_README: "the server responds with a 220 greeting" that
		// starts the client's session afresh. HELO and PROTO are left to
		// the client's own EHLO, which the upstream sees next.
		raw, rep, err = u.command([]byte("XCLIENT " + smtpclient.XCLIENTArgs(ci.addr) + "\r\n"))
		if err != nil {
			conn.Close()
			return nil, fmt.Errorf("send XCLIENT to upstream %s: %w", d.addr, err)
		}
		if rep.Code != 220 {
			conn.Close()
			// undomail's configuration problem, not the client's: it must
			// not reach the client as a permanent error.
			return nil, fmt.Errorf("upstream %s refused XCLIENT (is undomail's address in smtpd_authorized_xclient_hosts?): %s", d.addr, rep)
		}
	}
	u.greeting, u.greetCode = raw, rep.Code
	return u, nil
}

// command sends one raw command line and reads the reply.
func (u *upstreamConn) command(line []byte) ([]byte, verb.Reply, error) {
	if _, err := u.bw.Write(line); err != nil {
		return nil, verb.Reply{}, err
	}
	if err := u.bw.Flush(); err != nil {
		return nil, verb.Reply{}, err
	}
	return u.reply()
}

// reply reads one reply: its raw bytes, to relay unchanged, and parsed.
func (u *upstreamConn) reply() ([]byte, verb.Reply, error) {
	if err := u.bw.Flush(); err != nil {
		return nil, verb.Reply{}, err
	}
	var raw []byte
	code, lines, err := smtpclient.ReadReplyRaw(u.br, &raw)
	if err != nil {
		return nil, verb.Reply{}, err
	}
	return raw, replyFromLines(code, lines), nil
}

func (u *upstreamConn) close() { u.conn.Close() }

// probe connects once and reads the upstream's capabilities: SIZE bounds
// what undomail spools, and XCLIENT must be offered when it is used.
func (d *dialer) probe(ctx context.Context) (upstreamCaps, error) {
	var caps upstreamCaps
	u, err := d.dial(ctx, clientInfo{}, false)
	if err != nil {
		return caps, err
	}
	defer u.close()
	verb := "EHLO "
	if d.lmtp {
		verb = "LHLO "
	}
	_, rep, err := u.command([]byte(verb + d.localName + "\r\n"))
	if err != nil {
		return caps, fmt.Errorf("greet upstream %s: %w", d.addr, err)
	}
	if !rep.Positive() {
		return caps, fmt.Errorf("greet upstream %s: %s", d.addr, rep)
	}
	for _, l := range strings.Split(rep.Text, "\n")[1:] {
		kw, arg, _ := strings.Cut(l, " ")
		switch strings.ToUpper(kw) {
		case "SIZE":
			caps.size, _ = strconv.ParseInt(strings.TrimSpace(arg), 10, 64)
		case "SMTPUTF8":
			caps.smtpUTF8 = true
		case "DSN":
			caps.dsn = true
		case "CHUNKING":
			caps.chunking = true
		case "XCLIENT":
			caps.xclient = true
		case "AUTH":
			caps.auth = strings.Fields(strings.ToUpper(arg))
		}
	}
	u.command([]byte("QUIT\r\n"))
	if d.xclient && !d.lmtp && !caps.xclient {
		return caps, fmt.Errorf("upstream %s does not offer XCLIENT to undomail: "+
			"add undomail's address to Postfix's smtpd_authorized_xclient_hosts, "+
			"or set smtp.xclient to false if the upstream's relay policy does not trust undomail's address", d.addr)
	}
	return caps, nil
}

// timedConn bounds each single read and write by timeout, as Postfix's
// smtpd_timeout bounds each read from and write to a client
// (docs/smtp-parity.md): a slow but steady peer is never cut off, a
// silent one is. stop, when set, makes the next read return at once (a
// graceful shutdown of idle sessions).
type timedConn struct {
	net.Conn
	timeout time.Duration
	stop    *atomic.Bool
}

func (c *timedConn) Read(p []byte) (int, error) {
	d := time.Now().Add(c.timeout)
	if c.stop != nil && c.stop.Load() {
		d = time.Now()
	}
	if err := c.Conn.SetReadDeadline(d); err != nil {
		return 0, err
	}
	return c.Conn.Read(p)
}

func (c *timedConn) Write(p []byte) (int, error) {
	if err := c.Conn.SetWriteDeadline(time.Now().Add(c.timeout)); err != nil {
		return 0, err
	}
	return c.Conn.Write(p)
}

// capLines splits an EHLO/LHLO reply into its lines of text.
func capLines(raw []byte) [][]byte {
	var out [][]byte
	for _, l := range bytes.SplitAfter(raw, []byte("\n")) {
		if len(l) >= 4 {
			out = append(out, bytes.TrimRight(l[4:], "\r\n"))
		}
	}
	return out
}
