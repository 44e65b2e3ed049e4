package mailstacktest

import (
	"bytes"
	"io"
	"net"
	"net/mail"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// Sink is an SMTP server standing in for the outside world: Postfix
// relays mail for other domains to it (mailstack.Options.Outside), and it counts
// what arrives. It accepts every message.
type Sink struct {
	// Addr is where it listens, on a loopback address of its own.
	Addr string

	mu  sync.Mutex
	got []Arrival
}

// Arrival is one message that reached the sink.
type Arrival struct {
	From      string
	Rcpts     []string
	MessageID string // the Message-Id header, without angle brackets
	Data      []byte
}

// StartSink starts a sink for the test; it stops at the test's end.
func StartSink(t testing.TB) *Sink {
	t.Helper()
	s := &Sink{Addr: Addr(t)}
	ln, err := net.Listen("tcp", s.Addr)
	if err != nil {
		t.Fatalf("mailstacktest: sink: %v", err)
	}
	srv := smtp.NewServer(sinkBackend{s})
	srv.Domain = "outside.test"
	srv.ReadTimeout, srv.WriteTimeout = time.Minute, time.Minute
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return s
}

// Arrivals returns what has arrived so far, in order.
func (s *Sink) Arrivals() []Arrival {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Arrival(nil), s.got...)
}

// Count is how many times a message with this Message-Id (without angle
// brackets) arrived.
func (s *Sink) Count(messageID string) int {
	n := 0
	for _, a := range s.Arrivals() {
		if a.MessageID == messageID {
			n++
		}
	}
	return n
}

type sinkBackend struct{ s *Sink }

func (b sinkBackend) NewSession(*smtp.Conn) (smtp.Session, error) {
	return &sinkSession{s: b.s}, nil
}

type sinkSession struct {
	s *Sink
	a Arrival
}

func (x *sinkSession) AuthPlain(string, string) error { return smtp.ErrAuthUnsupported }
func (x *sinkSession) Mail(from string, _ *smtp.MailOptions) error {
	x.a = Arrival{From: from}
	return nil
}
func (x *sinkSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	x.a.Rcpts = append(x.a.Rcpts, to)
	return nil
}
func (x *sinkSession) Data(r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	x.a.Data = b
	if m, err := mail.ReadMessage(bytes.NewReader(b)); err == nil {
		id := m.Header.Get("Message-Id")
		if len(id) > 1 && id[0] == '<' && id[len(id)-1] == '>' {
			id = id[1 : len(id)-1]
		}
		x.a.MessageID = id
	}
	x.s.mu.Lock()
	x.s.got = append(x.s.got, x.a)
	x.s.mu.Unlock()
	return nil
}
func (x *sinkSession) Reset()        { x.a = Arrival{} }
func (x *sinkSession) Logout() error { return nil }
