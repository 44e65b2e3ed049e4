package proxy_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
)

// rawIMAP is a raw IMAP connection for comparing answers byte for byte.
type rawIMAP struct {
	t    *testing.T
	conn net.Conn
	br   *bufio.Reader
}

func dialRaw(t *testing.T, addr, from string) *rawIMAP {
	t.Helper()
	d := net.Dialer{}
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawIMAP{t: t, conn: c, br: bufio.NewReader(c)}
}

// line reads one line; "" with io.EOF once the server has closed.
func (r *rawIMAP) line() (string, error) {
	r.t.Helper()
	r.conn.SetReadDeadline(time.Now().Add(time.Minute))
	l, err := r.br.ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		r.t.Fatalf("read: %v (got %q)", err, l)
	}
	if l == "" {
		return "", io.EOF
	}
	return strings.TrimRight(l, "\r\n"), nil
}

func (r *rawIMAP) send(s string) {
	r.t.Helper()
	if _, err := io.WriteString(r.conn, s); err != nil {
		r.t.Fatalf("send %q: %v", s, err)
	}
}

// rest reads every line until the server closes the connection.
func (r *rawIMAP) rest() []string {
	r.t.Helper()
	var out []string
	for {
		l, err := r.line()
		if err != nil {
			return out
		}
		out = append(out, l)
	}
}

var secs = regexp.MustCompile(` \([0-9.]+ \+ [0-9.]+( \+ [0-9.]+)? secs\)`)

// TestIMAPPreLoginLiteralLimit: before login a literal that would take
// a command past 8192 bytes is refused at once, exactly as Dovecot's login
// process refuses it (never "+"), and the limit is Dovecot's to the byte;
// after login the limits are Dovecot's imap process's again, and a huge
// literal on a command Dovecot does not read it for (NOOP) is answered as
// Dovecot answers it, the session going on.
func TestIMAPPreLoginLiteralLimit(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	pass := tb.Stack.Password("alice")
	answers := func(t *testing.T, addr string, lines ...string) []string {
		r := dialRaw(t, addr, "")
		if g, _ := r.line(); !strings.HasPrefix(g, "* OK") {
			t.Fatalf("greeting %q", g)
		}
		var out []string
		for _, l := range lines {
			r.send(l)
			got, err := r.line()
			if err != nil {
				return append(out, "<closed>")
			}
			out = append(out, got)
			if strings.HasPrefix(got, "* BYE") {
				return append(out, r.rest()...)
			}
		}
		return out
	}
	for _, tc := range []struct {
		name  string
		lines []string
		want  string // the first line of the last answer, through undomail
	}{
		{"100 MiB", []string{"a LOGIN {104857600}\r\n"}, "* BYE Literal size too large"},
		{"100 MiB non-synchronizing", []string{"a LOGIN {104857600+}\r\n"}, "* BYE Literal size too large"},
		{"largest first literal", []string{"a LOGIN {8178}\r\n"}, "+"},
		{"one byte more", []string{"a LOGIN {8179}\r\n"}, "* BYE Literal size too large"},
		{"largest second literal", []string{"a LOGIN {4}\r\n", "abcd {8168}\r\n"}, "+"},
		{"second literal one byte more", []string{"a LOGIN {4}\r\n", "abcd {8169}\r\n"}, "* BYE Literal size too large"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			direct := answers(t, tb.Stack.IMAPAddr, tc.lines...)
			proxied := answers(t, tb.IMAPAddr(), tc.lines...)
			last := proxied[len(proxied)-1]
			if strings.HasPrefix(tc.want, "* BYE") {
				// The BYE must be the last word: the connection is closed.
				if len(proxied) < 1 || !strings.HasPrefix(proxied[len(proxied)-1], tc.want) {
					t.Fatalf("through undomail: %q, want %q and the connection closed", proxied, tc.want)
				}
			} else if !strings.HasPrefix(last, tc.want) {
				t.Fatalf("through undomail: %q, want %q", proxied, tc.want)
			}
			// Dovecot directly: the same refusal, or the same invitation.
			if strings.HasPrefix(direct[len(direct)-1], "+") != strings.HasPrefix(last, "+") ||
				strings.HasPrefix(direct[len(direct)-1], "* BYE") != strings.HasPrefix(last, "* BYE") {
				t.Fatalf("Dovecot answered %q, undomail %q", direct, proxied)
			}
			if strings.HasPrefix(last, "* BYE") && direct[len(direct)-1] != last {
				t.Fatalf("refused in other words: Dovecot %q, undomail %q", direct, proxied)
			}
		})
	}
	// A LOGIN with literals within the limit logs in.
	r := dialRaw(t, tb.IMAPAddr(), "")
	r.line()
	r.send("a LOGIN {5}\r\n")
	if l, _ := r.line(); !strings.HasPrefix(l, "+") {
		t.Fatalf("LOGIN {5}: %q", l)
	}
	r.send(fmt.Sprintf("alice {%d}\r\n", len(pass)))
	if l, _ := r.line(); !strings.HasPrefix(l, "+") {
		t.Fatalf("second literal: %q", l)
	}
	r.send(pass + "\r\n")
	if l, _ := r.line(); !strings.HasPrefix(l, "a OK") {
		t.Fatalf("LOGIN with literals: %q", l)
	}
	// Logged in, the limits are the imap process's: a literal larger than
	// the login limit is invited again.
	r.send("b SELECT {9000}\r\n")
	if l, _ := r.line(); !strings.HasPrefix(l, "+") {
		t.Fatalf("SELECT {9000} after login: %q, want an invitation", l)
	}
	r.send(strings.Repeat("x", 9000) + "\r\n")
	if l, _ := r.line(); !strings.HasPrefix(l, "b NO") {
		t.Fatalf("SELECT of a 9000-byte name: %q, want Dovecot's NO", l)
	}

	// NOOP takes no arguments: Dovecot answers at once without reading
	// the literal, and the client, told the command is done, goes on.
	noop := func(addr string) []string {
		r := dialRaw(t, addr, "")
		r.line()
		r.send("L LOGIN alice " + pass + "\r\n")
		for l, _ := r.line(); !strings.HasPrefix(l, "L "); l, _ = r.line() {
		}
		var out []string
		for _, c := range []string{"n NOOP {104857600}\r\n", "x NOOP\r\n"} {
			r.send(c)
			l, err := r.line()
			if err != nil {
				return append(out, "<closed>")
			}
			out = append(out, secs.ReplaceAllString(l, ""))
		}
		return out
	}
	direct, proxied := noop(tb.Stack.IMAPAddr), noop(tb.IMAPAddr())
	if strings.Join(direct, "\n") != strings.Join(proxied, "\n") || !strings.HasPrefix(proxied[len(proxied)-1], "x OK") {
		t.Fatalf("NOOP {104857600} then NOOP: Dovecot %q, undomail %q", direct, proxied)
	}
}

// TestIMAPLoginTimeout: a connection that has not logged in within
// imap.login_timeout is closed with Dovecot's BYE, however busy it keeps;
// a logged-in one is not.
func TestIMAPLoginTimeout(t *testing.T) {
	tb := testbedtest.Start(t, func(c *config.Config) { c.IMAP.LoginTimeout = config.Duration(5 * time.Second) })
	in := dialRaw(t, tb.IMAPAddr(), "")
	in.line()
	in.send("L LOGIN alice " + tb.Stack.Password("alice") + "\r\n")
	if l, _ := in.line(); !strings.HasPrefix(l, "L OK") {
		t.Fatalf("LOGIN: %q", l)
	}
	// Accepted after the logged-in one: it times out later than that
	// one's login deadline would have.
	out := dialRaw(t, tb.IMAPAddr(), "")
	out.line()
	var lines []string
	for i := 0; ; i++ {
		out.send(fmt.Sprintf("n%d NOOP\r\n", i))
		l, err := out.line()
		if err != nil {
			break
		}
		lines = append(lines, l)
		if strings.HasPrefix(l, "* BYE") {
			lines = append(lines, out.rest()...)
			break
		}
		if !strings.HasPrefix(l, fmt.Sprintf("n%d OK", i)) {
			t.Fatalf("NOOP before login: %q", l)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if len(lines) == 0 || lines[len(lines)-1] != "* BYE Disconnected for inactivity." {
		t.Fatalf("unauthenticated connection ended with %q, want Dovecot's \"* BYE Disconnected for inactivity.\"", lines)
	}
	in.send("x NOOP\r\n")
	if l, _ := in.line(); !strings.HasPrefix(l, "x OK") {
		t.Fatalf("the logged-in session after the login timeout: %q, want it alive", l)
	}
}

// TestIMAPConnectionCaps: connections over imap.max_connections_per_address
// from one address, or over imap.max_connections in all, are greeted with
// BYE and closed; others are served, and a closed connection frees its
// place.
func TestIMAPConnectionCaps(t *testing.T) {
	tb := testbedtest.Start(t, func(c *config.Config) {
		c.IMAP.MaxConnectionsPerAddress = 2
		c.IMAP.MaxConnections = 3
	})
	greet := func(from string) (*rawIMAP, []string) {
		r := dialRaw(t, tb.IMAPAddr(), from)
		l, err := r.line()
		if err != nil {
			return r, []string{"<closed>"}
		}
		if strings.HasPrefix(l, "* BYE") {
			return r, append([]string{l}, r.rest()...)
		}
		return r, []string{l}
	}
	a1, g := greet("127.0.0.1")
	if !strings.HasPrefix(g[0], "* OK") {
		t.Fatalf("first connection: %q", g)
	}
	if _, g := greet("127.0.0.1"); !strings.HasPrefix(g[0], "* OK") {
		t.Fatalf("second connection: %q", g)
	}
	if _, g := greet("127.0.0.1"); len(g) != 1 || g[0] != "* BYE [LIMIT] Maximum number of connections from your address exceeded (imap.max_connections_per_address=2)" {
		t.Fatalf("third connection from one address: %q, want BYE [LIMIT] and closed", g)
	}
	if _, g := greet("127.0.0.2"); !strings.HasPrefix(g[0], "* OK") {
		t.Fatalf("connection from another address: %q", g)
	}
	if _, g := greet("127.0.0.3"); len(g) != 1 || !strings.HasPrefix(g[0], "* BYE [UNAVAILABLE] Maximum number of connections exceeded (imap.max_connections=3)") {
		t.Fatalf("fourth connection in all: %q, want BYE [UNAVAILABLE] and closed", g)
	}
	// A connection that ends frees its place: the server notices the
	// close on its own time, so try until it has (or a minute passes).
	a1.send("z LOGOUT\r\n")
	a1.rest()
	for deadline := time.Now().Add(time.Minute); ; {
		r, g := greet("127.0.0.1")
		if strings.HasPrefix(g[0], "* OK") {
			r.send("c CAPABILITY\r\n")
			if l, _ := r.line(); !strings.HasPrefix(l, "* CAPABILITY") {
				t.Fatalf("CAPABILITY on the freed place: %q", l)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after one connection logged out, still refused: %q", g)
		}
		r.conn.Close()
		time.Sleep(50 * time.Millisecond)
	}
}
