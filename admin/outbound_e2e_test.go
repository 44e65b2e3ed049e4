package admin_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/internal/mailstack/mailstacktest"
	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
)

// TestBrowserOutboundWindow: with the outbound delay window on (an
// hour), two messages alice sends outside wait in it. An operator opens
// the web admin's outbound page in headless Chromium, sees both, cancels
// one (it leaves Postfix's queue and never reaches the outside, even
// after Postfix's whole queue is flushed) and releases the other (it
// reaches the outside once); the page says how each wait ended, in words.
func TestBrowserOutboundWindow(t *testing.T) {
	sink := mailstacktest.StartSink(t)
	tb := testbedtest.StartWith(t, testbed.Options{Outside: sink.Addr, OutboundDelay: time.Hour})
	a := newAPI(t, tb)
	for _, id := range []string{"stop@example.test", "go@example.test"} {
		c, err := smtp.Dial(tb.SMTPAddr())
		if err != nil {
			t.Fatal(err)
		}
		msg := "From: Alice <alice@example.test>\r\nSubject: To Dana " + id + "\r\nMessage-Id: <" + id + ">\r\n\r\nhello\r\n"
		if err := c.SendMail("alice@example.test", []string{"dana@outside.test"}, strings.NewReader(msg)); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	var held admin.OutboundList
	for deadline := time.Now().Add(60 * time.Second); len(held.Held) < 2; {
		if time.Now().After(deadline) {
			t.Fatalf("the window holds %+v, want both messages", held)
		}
		time.Sleep(100 * time.Millisecond)
		a.call("GET", "/api/outbound", nil, &held)
	}
	// Prometheus sees the window too.
	req, _ := http.NewRequest("GET", a.url+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+a.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(metrics), "undomail_outbound_held 2") || !strings.Contains(string(metrics), "undomail_outbound_overdue_seconds 0") {
		t.Errorf("/metrics does not show the window holding two messages, none overdue:\n%s", metrics)
	}
	queueID := map[string]string{}
	for _, m := range held.Held {
		queueID[m.MessageID] = m.QueueID
	}
	stop, goID := queueID["<stop@example.test>"], queueID["<go@example.test>"]
	if stop == "" || goID == "" {
		t.Fatalf("the window holds %+v", held)
	}

	ctx := browser(t)
	css := func(s string) chromedp.CSS { return chromedp.CSS(s) }
	if err := chromedp.Do(ctx,
		chromedp.Navigate(a.url+"/outbound"),
		chromedp.WaitVisible(css("#token")),
		chromedp.SendKeys(css("#token"), a.token),
		clickAndLoad("#login"),
		chromedp.WaitVisible(css("#outbound-held")),
	); err != nil {
		t.Fatalf("log in to the outbound page: %v", err)
	}
	screenshot(t, ctx, "outbound-held.png")
	for _, id := range []string{stop, goID} {
		if row := text(t, ctx, "#held-"+id); !strings.Contains(row, "dana@outside.test") || !strings.Contains(row, "To Dana") {
			t.Errorf("the row of %s says %q; want the recipient outside and the subject", id, row)
		}
	}
	if err := chromedp.Do(ctx, clickAndLoad("#cancel-"+stop), chromedp.WaitVisible(css("#outbound-done"))); err != nil {
		t.Fatalf("cancel %s: %v", stop, err)
	}
	if count(t, ctx, "#held-"+stop) != 0 || count(t, ctx, "#held-"+goID) != 1 {
		t.Fatalf("after cancelling %s the page holds:\n%s", stop, text(t, ctx, "#outbound-held"))
	}
	if err := chromedp.Do(ctx, clickAndLoad("#release-"+goID), chromedp.WaitVisible(css("#outbound-done"))); err != nil {
		t.Fatalf("release %s: %v", goID, err)
	}
	screenshot(t, ctx, "outbound-after.png")
	ended := text(t, ctx, "#outbound-ended")
	for _, want := range []string{fmt.Sprintf("(Postfix queue id %s) cancelled by the operator", stop), fmt.Sprintf("(Postfix queue id %s) released by the operator", goID)} {
		if !strings.Contains(ended, want) {
			t.Errorf("the page's latest ends lack %q:\n%s", want, ended)
		}
	}
	body, err := chromedp.Run(ctx, chromedp.Evaluate[string](`document.body.innerText`))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(body, `{"`) || !strings.Contains(body, "Nothing is held.") {
		t.Errorf("the outbound page after both, want it empty and in words:\n%s", body)
	}
	for deadline := time.Now().Add(60 * time.Second); sink.Count("go@example.test") == 0; {
		if time.Now().After(deadline) {
			t.Fatal("the released message never reached the outside")
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Flushing Postfix's whole queue sends whatever is still in it: the
	// cancelled message is not.
	if err := tb.Stack.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(60 * time.Second); ; {
		q, err := exec.Command("postqueue", "-c", tb.Stack.PostfixConfigDir(), "-j").Output()
		if err != nil {
			t.Fatal(err)
		}
		if len(strings.TrimSpace(string(q))) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Postfix's queue is not empty after a flush:\n%s", q)
		}
		time.Sleep(100 * time.Millisecond)
	}
	a.call("GET", "/api/outbound", nil, &held)
	if len(held.Held) != 0 {
		t.Errorf("the window still holds %+v", held.Held)
	}
	if n, m := sink.Count("stop@example.test"), sink.Count("go@example.test"); n != 0 || m != 1 {
		t.Errorf("the outside got the cancelled message %d times and the released one %d times; want 0 and 1", n, m)
	}
}
