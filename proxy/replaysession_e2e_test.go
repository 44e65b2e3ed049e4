package proxy_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"

	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/proxy"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// TestReplaySessionStaysLocal: an LMTP session that greets with
// verb.ReplayLHLO is Postfix's replay transport. Every recipient is
// accepted by the capture itself (Dovecot would refuse nosuch@ at RCPT),
// the message goes to Collect linked to its front-door submission, the
// client gets Collect's replies, nothing is logged as a delivery and
// nothing reaches Dovecot; a message no replay waits for (Collect says
// nil) is refused with 550. A session with another LHLO name is live mail
// as before.
func TestReplaySessionStaysLocal(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	ctx := context.Background()
	// A front-door submission to link to.
	sc, err := smtp.Dial(tb.SMTPAddr())
	if err != nil {
		t.Fatal(err)
	}
	if err := sc.SendMail("sender@example.test", []string{"alice@example.test"}, strings.NewReader(message("front", "replay.0@client.test"))); err != nil {
		t.Fatal(err)
	}
	sc.Close()
	waitForMessage(t, tb, "alice", "replay.0@client.test")
	sub := verbsOf(t, tb.Daemon.Log, "replay.0@client.test")[verb.KindSMTPSubmit]
	var subArgs verb.DeliveryArgs
	if err := json.Unmarshal(sub.Args, &subArgs); err != nil || subArgs.UndoID == "" {
		t.Fatalf("front-door submission: %+v %v", sub, err)
	}

	var mu sync.Mutex
	var got []verb.DeliveryArgs
	collect := func(_ context.Context, a verb.DeliveryArgs, _ undolog.BlobRef) *verb.DeliveryOutcome {
		if a.UndoID != subArgs.UndoID {
			return nil
		}
		mu.Lock()
		got = append(got, a)
		mu.Unlock()
		out := &verb.DeliveryOutcome{}
		for _, rc := range a.Rcpts {
			out.Rcpts = append(out.Rcpts, verb.RcptReply{Rcpt: rc, Reply: verb.Reply{Code: 250, Enhanced: "2.0.0", Text: "taken"}})
		}
		return out
	}
	p, err := proxy.NewSMTP(ctx, proxy.SMTPConfig{Upstream: tb.Stack.LMTPAddr, LMTP: true, Hostname: "undomail.test", Collect: collect},
		tb.Daemon.Log, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go p.Serve(ln)
	t.Cleanup(func() { p.Close(ctx) })
	before, err := tb.Daemon.Log.Records(ctx, undolog.Filter{Kinds: []string{verb.KindLMTPDeliver}})
	if err != nil {
		t.Fatal(err)
	}

	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c := smtp.NewClientLMTP(conn)
	defer c.Close()
	if err := c.Hello(verb.ReplayLHLO); err != nil {
		t.Fatal(err)
	}
	send := func(id string) (map[string]*smtp.DataResponse, error) {
		if err := c.Mail("sender@example.test", nil); err != nil {
			t.Fatalf("MAIL: %v", err)
		}
		for _, rc := range []string{"nosuch@example.test", "bob@example.test"} {
			if err := c.Rcpt(rc, nil); err != nil {
				t.Fatalf("RCPT %s in a replay session: %v, want it accepted by the capture", rc, err)
			}
		}
		w, err := c.Data()
		if err != nil {
			t.Fatalf("DATA: %v", err)
		}
		w.Write([]byte(verb.TraceHeader + ": " + id + "\r\n" + message("replayed", "replay.1@client.test")))
		return w.CloseWithLMTPResponse()
	}
	resps, err := send(subArgs.UndoID)
	if err != nil || len(resps) != 2 || !strings.Contains(resps["nosuch@example.test"].StatusText, "taken") {
		t.Fatalf("replayed delivery: %v %+v, want Collect's 250 for both recipients", err, resps)
	}
	mu.Lock()
	if len(got) != 1 || got[0].Submission != sub.Seq || strings.Join(got[0].Rcpts, ",") != "nosuch@example.test,bob@example.test" {
		t.Fatalf("Collect got %+v, want one delivery linked to submission %d with both recipients", got, sub.Seq)
	}
	mu.Unlock()
	_, err = send("01NOTASUBMISSION")
	if se := smtpErr(err); se == nil || se.Code != 550 {
		if le, ok := err.(smtp.LMTPDataError); !ok || len(le) != 2 || le["bob@example.test"].Code != 550 {
			t.Fatalf("a message no replay waits for: %v, want 550 for each recipient", err)
		}
	}
	after, err := tb.Daemon.Log.Records(ctx, undolog.Filter{Kinds: []string{verb.KindLMTPDeliver}})
	if err != nil || len(after) != len(before) {
		t.Fatalf("replay session logged deliveries: %d before, %d after (%v)", len(before), len(after), err)
	}
	if hdr, err := fetchHeader(tb, "bob", "replay.1@client.test"); err != nil || hdr != "" {
		t.Fatalf("bob has the replayed message (%v); the capture must not forward it", err)
	}

	// Another LHLO name: live mail, Dovecot decides at RCPT.
	live := dialLMTP(t, ln.Addr().String())
	if err := live.Mail("sender@example.test", nil); err != nil {
		t.Fatal(err)
	}
	if se := smtpErr(live.Rcpt("nosuch@example.test", nil)); se == nil || se.Code != 550 {
		t.Fatalf("RCPT nosuch in a live session: %v, want Dovecot's 550", se)
	}
}
