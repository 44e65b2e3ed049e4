package mailstack_test

import (
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/undomail/undomail/internal/mailstack"
	"github.com/undomail/undomail/internal/mailstack/mailstacktest"
)

// TestOutsideAndDeferTransports: with Options.Outside, mail for another
// domain goes to the sink; with DeferTransports "smtp" it waits in Postfix's
// deferred queue (local mail still arrives) until postqueue -i releases
// that one message, which then arrives once.
func TestOutsideAndDeferTransports(t *testing.T) {
	sink := mailstacktest.StartSink(t)
	st := mailstacktest.Start(t, mailstack.Options{Outside: sink.Addr, DeferTransports: "smtp"})
	msg := "From: alice@" + st.Domain + "\r\nSubject: out\r\nMessage-Id: <out1@example.test>\r\n\r\nhello\r\n"
	c := dialSMTP(t, st.SMTPAddr, "127.0.0.1")
	if err := c.SendMail("alice@"+st.Domain, []string{"dana@outside.test", "bob@" + st.Domain}, strings.NewReader(msg)); err != nil {
		t.Fatal(err)
	}
	c.Quit()
	waitForBody(t, st, "bob", st.Password("bob"), "hello")
	var out []byte
	for deadline := time.Now().Add(30 * time.Second); ; {
		var err error
		out, err = exec.Command("postqueue", "-c", st.PostfixConfigDir(), "-j").Output()
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(out), "deferred transport") || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if n := sink.Count("out1@example.test"); n != 0 {
		t.Fatalf("the sink got the message %d times while smtp is deferred", n)
	}
	id := strings.Split(strings.SplitN(string(out), `"queue_id": "`, 2)[1], `"`)[0]
	// postqueue -i does nothing while the message is in the active queue
	// (qmgr retrying it, and deferring it for its transport again): ask
	// until it has left.
	for deadline := time.Now().Add(30 * time.Second); sink.Count("out1@example.test") == 0; {
		if b, err := exec.Command("postqueue", "-c", st.PostfixConfigDir(), "-i", id).CombinedOutput(); err != nil {
			t.Fatalf("postqueue -i %s: %v %s", id, err, b)
		}
		if time.Now().After(deadline) {
			t.Fatalf("postqueue -i did not release the message")
		}
		time.Sleep(500 * time.Millisecond)
	}
	if a := sink.Arrivals(); len(a) != 1 || len(a[0].Rcpts) != 1 || a[0].Rcpts[0] != "dana@outside.test" {
		t.Fatalf("the sink got %+v; want the message for dana@outside.test alone", a)
	}
}
