package proxy_test

import (
	"net"
	"strings"
	"testing"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/proxy"
)

// TestSTARTTLSIsUndomails: the front door terminates TLS (Postfix in the
// stack has none), offers AUTH only inside it, and relays the session
// that follows to Postfix as usual.
func TestSTARTTLSIsUndomails(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	serverTLS, clientTLS := selfSigned(t)
	_, addr := startRelay(t, proxy.SMTPConfig{Upstream: tb.Stack.SMTPAddr, XClient: true, TLS: serverTLS})
	c := dial(t, addr, "127.0.0.2")
	if ok, _ := c.Extension("STARTTLS"); !ok {
		t.Fatal("STARTTLS not offered")
	}
	if ok, _ := c.Extension("AUTH"); ok {
		t.Fatal("AUTH offered without TLS")
	}
	err := c.Auth(sasl.NewPlainClient("", "alice", tb.Stack.Password("alice")))
	if se := smtpErr(err); se == nil || se.Code != 503 {
		t.Fatalf("AUTH without TLS: %v, want 503", err)
	}
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c, err = smtp.NewClientStartTLS(conn, clientTLS)
	if err != nil {
		t.Fatalf("STARTTLS: %v", err)
	}
	defer c.Close()
	if ok, _ := c.Extension("STARTTLS"); ok {
		t.Fatal("STARTTLS offered again inside TLS")
	}
	if ok, mechs := c.Extension("AUTH"); !ok || !strings.Contains(mechs, "PLAIN") {
		t.Fatalf("AUTH inside TLS: %v %q, want Postfix's mechanisms", ok, mechs)
	}
	if err := c.Auth(sasl.NewPlainClient("", "alice", tb.Stack.Password("alice"))); err != nil {
		t.Fatalf("AUTH inside TLS: %v", err)
	}
	// Relaying needs the authentication Postfix saw: 127.0.0.2 is outside.
	if err := c.SendMail("alice@example.test", []string{"bob@example.test", "someone@elsewhere.example"},
		strings.NewReader(message("over tls", "tls.1@client.test"))); err != nil {
		t.Fatalf("send inside TLS: %v", err)
	}
	waitForMessage(t, tb, "bob", "tls.1@client.test")
	if err := c.Quit(); err != nil {
		t.Fatalf("QUIT: %v", err)
	}
}
