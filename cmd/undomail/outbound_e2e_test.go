package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/internal/mailstack"
	"github.com/undomail/undomail/internal/mailstack/mailstacktest"
)

// outboundServer starts a stack whose Postfix relays mail for other
// domains to a sink (the outside world) and defers its smtp transport
// (defer_transports = smtp), and undomail serve in front of it with the
// outbound delay window set to delay; it takes a snapshot.
func outboundServer(t *testing.T, delay string) (*mailstack.Stack, *server, *mailstacktest.Sink, string) {
	t.Helper()
	ctx := context.Background()
	sink := mailstacktest.StartSink(t)
	st := mailstacktest.Start(t, mailstack.Options{Outside: sink.Addr, DeferTransports: "smtp"})
	s := newServer(t, st)
	s.extra = []string{"--config", outboundConfig(t, st, delay)}
	s.start()
	if err := st.SetLMTPRelay(ctx, s.lmtpAdr); err != nil {
		t.Fatal(err)
	}
	out, err := run(t, "snapshot", "--data-dir", s.dataDir)
	if err != nil {
		t.Fatalf("snapshot: %v %s", err, out)
	}
	return st, s, sink, strings.Fields(out)[1]
}

// outboundConfig is repairConfig with the replay service, the operator
// notice to alice and the outbound delay window.
func outboundConfig(t *testing.T, st *mailstack.Stack, delay string) string {
	t.Helper()
	cfg := repairConfig(t, st)
	f, err := os.OpenFile(cfg, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fmt.Fprintf(f, "smtp:\n  replay_upstream: %s\n  outbound_delay: %s\n  postfix_config: %s\ncompensation:\n  operator: alice@%s\n",
		st.ReplaySMTPAddr, delay, st.PostfixConfigDir(), st.Domain)
	return cfg
}

// TestOutboundDelayWindow is issue 15's delay window, through the
// binary on real Postfix with a sink for the outside world. A first
// message leaves when its time in the window is up (a window of 1ns: at
// once) and reaches the sink once. With a window of an hour, alice sends
// three more to dana outside, the first also to bob here; all wait,
// `undomail outbound list` shows them, and the operator cancels the third
// with `undomail outbound cancel`. A cycle whose repair cancels the
// first's submission plans to cancel it in the window, and runs: it
// never reaches the sink, and bob's copy goes too. The second, not
// cancelled, leaves when the operator releases it, once. Nothing the
// cycle replayed reached the sink again.
func TestOutboundDelayWindow(t *testing.T) {
	st, s, sink, snap := outboundServer(t, "1ns")
	alice, bob, dana := "alice@"+st.Domain, "bob@"+st.Domain, "dana@outside.test"
	mail := func(id, subject string, to ...string) {
		t.Helper()
		msg := fmt.Sprintf("From: Alice <%s>\r\nSubject: %s\r\nMessage-Id: <%s>\r\n\r\nhello\r\n", alice, subject, id)
		if err := sendMany(s.smtpAddr, alice, to, msg); err != nil {
			t.Fatalf("send %s to %v: %v", id, to, err)
		}
	}
	mail("early@example.test", "Early", dana)
	waitSink(t, sink, "early@example.test")

	// An hour's window from now on: what is held stays held.
	s.stop()
	cfg := s.extra[1]
	b, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfg, []byte(strings.Replace(string(b), "outbound_delay: 1ns", "outbound_delay: 1h", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	s.start()
	c, err := admin.Dial(s.dataDir)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	mail("oops@example.test", "Oops", dana, bob)
	mail("fine@example.test", "Fine", dana)
	mail("drop@example.test", "Drop", dana)
	waitMessages(t, st, "bob", []string{"oops@example.test"})
	var held admin.OutboundList
	for deadline := time.Now().Add(60 * time.Second); ; {
		if held, err = c.Outbound(ctx); err != nil {
			t.Fatal(err)
		}
		if len(held.Held) == 3 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !held.On || len(held.Held) != 3 {
		q, qerr := exec0("postqueue", "-c", st.PostfixConfigDir(), "-j")
		b, _ := os.ReadFile(s.logPath)
		pl, _ := os.ReadFile(st.PostfixLog())
		t.Fatalf("the window holds %+v; want the three messages for outside\npostqueue -j (%v):\n%s\nundomail serve:\n%s\nPostfix:\n%s",
			held, qerr, q, tail(string(b), 40), tail(string(pl), 60))
	}
	byID := map[string]int{}
	for i, m := range held.Held {
		byID[m.MessageID] = i
		if m.Submission == 0 || len(m.Rcpts) != 1 || m.Rcpts[0] != dana {
			t.Errorf("held %+v: want it linked to its submission, waiting for %s alone", m, dana)
		}
	}
	oops, fine, drop := held.Held[byID["<oops@example.test>"]], held.Held[byID["<fine@example.test>"]], held.Held[byID["<drop@example.test>"]]
	list, err := run(t, "outbound", "list", "--data-dir", s.dataDir)
	if err != nil || !strings.Contains(list, oops.QueueID) || !strings.Contains(list, fine.QueueID) || !strings.Contains(list, `"Oops"`) {
		t.Fatalf("outbound list: %v\n%s", err, list)
	}
	if status, err := run(t, "status", "--data-dir", s.dataDir); !strings.Contains(status, "3 held") {
		t.Errorf("undomail status (%v) does not show the three held messages:\n%s", err, status)
	}
	// The operator cancels one by hand.
	if out, err := run(t, "outbound", "cancel", "--data-dir", s.dataDir, drop.QueueID, "--reason", "wrong attachment"); err != nil || !strings.Contains(out, "never leaves") {
		t.Fatalf("outbound cancel %s: %v %s", drop.QueueID, err, out)
	}
	if out, err := run(t, "outbound", "cancel", "--data-dir", s.dataDir, drop.QueueID); err == nil || !strings.Contains(out, "no such message") {
		t.Fatalf("outbound cancel %s twice: %v %s; want an error", drop.QueueID, err, out)
	}

	// The plan says what the cycle cancels in the window.
	cancel := fmt.Sprint(oops.Submission)
	plan, err := run(t, "cycle", "plan", "--data-dir", s.dataDir, "--to", snap, "--cancel", cancel)
	if err != nil {
		t.Fatalf("cycle plan: %v\n%s", err, plan)
	}
	var cancelLine, leaveLine bool
	for _, line := range strings.Split(plan, "\n") {
		cancelLine = cancelLine || strings.HasPrefix(line, oops.QueueID) && strings.Contains(line, "cancel: it never leaves")
		leaveLine = leaveLine || strings.HasPrefix(line, fine.QueueID) && strings.Contains(line, "leaves when its time is up")
	}
	if !cancelLine || !leaveLine {
		t.Fatalf("cycle plan does not list %s as cancelled and %s as leaving:\n%s", oops.QueueID, fine.QueueID, plan)
	}

	out, err := run(t, "cycle", "run", "--data-dir", s.dataDir, "--to", snap, "--cancel", cancel, "--reason", "alice sent it to the wrong people", "--yes")
	t.Logf("undomail cycle run:\n%s", out)
	if err != nil || !strings.Contains(out, "verdict: OK") || !strings.Contains(out, "cancelled in the outbound delay window, never sent") {
		b, _ := os.ReadFile(s.logPath)
		t.Fatalf("cycle run: %v\n%s\n%s", err, out, tail(string(b), 40))
	}
	if has, err := inboxMessageIDs(st, "bob"); err != nil || has["oops@example.test"] != 0 {
		t.Errorf("bob's INBOX after the cycle: %v %v; want the cancelled message gone", has, err)
	}
	if held, err = c.Outbound(ctx); err != nil || len(held.Held) != 1 || held.Held[0].QueueID != fine.QueueID {
		t.Fatalf("the window after the cycle holds %+v (%v); want %s alone", held, err, fine.QueueID)
	}
	if rel, err := run(t, "outbound", "release", "--data-dir", s.dataDir, fine.QueueID, "--reason", "checked"); err != nil {
		t.Fatalf("outbound release: %v %s", err, rel)
	}
	waitSink(t, sink, "fine@example.test")
	// The cancelled message is out of Postfix's queue: nothing can send
	// it any more. Whatever the replay handed to Postfix is delivered or
	// refused by now; a flush sends anything still deferred.
	q, err := exec0("postqueue", "-c", st.PostfixConfigDir(), "-j")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(q, oops.QueueID) {
		t.Errorf("the cancelled message is still in Postfix's queue:\n%s", q)
	}
	flushQueue(t, st, "the flush")
	for id, want := range map[string]int{"early@example.test": 1, "oops@example.test": 0, "fine@example.test": 1, "drop@example.test": 0} {
		if n := sink.Count(id); n != want {
			t.Errorf("%s reached the outside %d times, want %d", id, n, want)
		}
	}
	s.stop()
}

// flushQueue flushes Postfix's queue (postqueue -f, which also sends
// what defer_transports holds) and waits until it is empty; after names
// the moment for the failure message.
func flushQueue(t *testing.T, st *mailstack.Stack, after string) {
	t.Helper()
	if err := st.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(20 * time.Second); ; {
		q, err := exec0("postqueue", "-c", st.PostfixConfigDir(), "-j")
		if err != nil {
			t.Fatal(err)
		}
		if strings.TrimSpace(q) == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("Postfix's queue is not empty after %s:\n%s", after, q)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitSink waits until a message reached the sink.
func waitSink(t *testing.T, sink *mailstacktest.Sink, msgID string) {
	t.Helper()
	for deadline := time.Now().Add(60 * time.Second); sink.Count(msgID) == 0; {
		if time.Now().After(deadline) {
			t.Fatalf("%s never reached the sink", msgID)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// sendMany sends one message to several recipients in one transaction.
func sendMany(addr, from string, to []string, msg string) error {
	c, err := smtp.Dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.SendMail(from, to, strings.NewReader(msg)); err != nil {
		return err
	}
	return c.Quit()
}

// exec0 runs a command and returns its output.
func exec0(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %v: %w: %s", name, args, err, out)
	}
	return string(out), nil
}

// TestAliasOutsideCyclesSendNothingAgain: for a while bob's alias points
// outside, and Postfix relays his two messages to the sink (no window).
// A cycle over that period with the alias unchanged, then another after
// the operator removed it, send nothing to the sink again: each message
// arrived there once, and after the second cycle bob has both.
func TestAliasOutsideCyclesSendNothingAgain(t *testing.T) {
	ctx := context.Background()
	sink := mailstacktest.StartSink(t)
	st := mailstacktest.Start(t, mailstack.Options{Outside: sink.Addr})
	s := newServer(t, st)
	cfg := repairConfig(t, st)
	f, err := os.OpenFile(cfg, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(f, "smtp:\n  replay_upstream: %s\ncompensation:\n  operator: alice@%s\n", st.ReplaySMTPAddr, st.Domain)
	f.Close()
	s.extra = []string{"--config", cfg}
	s.start()
	if err := st.SetLMTPRelay(ctx, s.lmtpAdr); err != nil {
		t.Fatal(err)
	}
	out, err := run(t, "snapshot", "--data-dir", s.dataDir)
	if err != nil {
		t.Fatalf("snapshot: %v %s", err, out)
	}
	snap := strings.Fields(out)[1]
	bob, outside := "bob@"+st.Domain, "robert@elsewhere.test"
	if err := st.SetVirtualAliases(ctx, map[string]string{bob: outside}); err != nil {
		t.Fatal(err)
	}
	ids := []string{"away1@client.test", "away2@client.test"}
	for i, id := range ids {
		msg := fmt.Sprintf("From: Dana <dana@client.test>\r\nSubject: Away %d\r\nMessage-Id: <%s>\r\n\r\nx\r\n", i+1, id)
		if err := sendTo(s.smtpAddr, "dana@client.test", bob, msg); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range ids {
		waitSink(t, sink, id)
	}
	cycle := func(reason string) {
		t.Helper()
		out, err := run(t, "cycle", "run", "--data-dir", s.dataDir, "--to", snap, "--reason", reason, "--yes")
		t.Logf("undomail cycle run:\n%s", out)
		if err != nil || !strings.Contains(out, "verdict: OK") {
			b, _ := os.ReadFile(s.logPath)
			t.Fatalf("cycle run: %v\n%s\n%s", err, out, tail(string(b), 40))
		}
		// Whatever the replay handed to Postfix has been delivered or
		// refused by now; a flush sends anything still deferred.
		flushQueue(t, st, "the cycle and a flush")
		for _, id := range ids {
			if n := sink.Count(id); n != 1 {
				t.Errorf("after the cycle (%s) %s reached the outside %d times, want once (the first run)", reason, id, n)
			}
		}
	}
	cycle("a cycle over the period, the alias unchanged")
	if err := st.SetVirtualAliases(ctx, nil); err != nil {
		t.Fatal(err)
	}
	cycle("bob's alias pointed outside by mistake")
	if has, err := inboxMessageIDs(st, "bob"); err != nil || has[ids[0]] != 1 || has[ids[1]] != 1 {
		t.Errorf("bob's INBOX after the repair: %v %v; want both messages once", has, err)
	}
	s.stop()
}

// TestOutboundSplitFormReplayCancels: the split form (rewind --hold,
// then replay --cancel) cancels a held message whose submission it
// cancels, as a cycle does: it never reaches the sink, and the log says
// so.
func TestOutboundSplitFormReplayCancels(t *testing.T) {
	st, s, sink, snap := outboundServer(t, "1h")
	ctx := context.Background()
	msg := "From: Alice <alice@" + st.Domain + ">\r\nSubject: Split\r\nMessage-Id: <split@example.test>\r\n\r\nx\r\n"
	if err := sendTo(s.smtpAddr, "alice@"+st.Domain, "dana@outside.test", msg); err != nil {
		t.Fatal(err)
	}
	c, err := admin.Dial(s.dataDir)
	if err != nil {
		t.Fatal(err)
	}
	var held admin.OutboundList
	for deadline := time.Now().Add(60 * time.Second); len(held.Held) == 0; {
		if time.Now().After(deadline) {
			t.Fatal("the message is never held")
		}
		time.Sleep(100 * time.Millisecond)
		if held, err = c.Outbound(ctx); err != nil {
			t.Fatal(err)
		}
	}
	m := held.Held[0]
	if out, err := run(t, "rewind", "--data-dir", s.dataDir, "--to", snap, "--hold", "--yes"); err != nil {
		t.Fatalf("rewind --hold: %v %s", err, out)
	}
	if out, err := run(t, "replay", "--data-dir", s.dataDir, "--cancel", fmt.Sprint(m.Submission)); err != nil {
		b, _ := os.ReadFile(s.logPath)
		t.Fatalf("replay --cancel %d: %v\n%s\n%s", m.Submission, err, out, tail(string(b), 30))
	}
	if held, err = c.Outbound(ctx); err != nil || len(held.Held) != 0 {
		t.Fatalf("the window after the replay holds %+v (%v); want nothing", held, err)
	}
	log, err := run(t, "log", "--data-dir", s.dataDir, "--kind", "outbound.cancelled")
	if err != nil || !strings.Contains(log, m.QueueID) || !strings.Contains(log, "cancelled by cycle") {
		t.Fatalf("undomail log --kind outbound.cancelled: %v\n%s", err, log)
	}
	flushQueue(t, st, "a flush")
	if n := sink.Count("split@example.test"); n != 0 {
		t.Errorf("the cancelled message reached the outside %d times", n)
	}
	s.stop()
}

// TestOutboundWindowAliasRepaired: bob's alias points outside by mistake
// and his mail waits in the window (an hour). The operator removes the
// alias and runs a cycle that cancels nothing: the repaired Postfix
// delivers the message to bob now, so the cycle cancels the copy in the
// window, which never reaches the outside. A message sent to an outside
// address directly, waiting beside it, is left alone and leaves once
// when released.
func TestOutboundWindowAliasRepaired(t *testing.T) {
	st, s, sink, snap := outboundServer(t, "1h")
	ctx := context.Background()
	bob, outside := "bob@"+st.Domain, "robert@elsewhere.test"
	if err := st.SetVirtualAliases(ctx, map[string]string{bob: outside}); err != nil {
		t.Fatal(err)
	}
	if err := sendTo(s.smtpAddr, "dana@client.test", bob, "From: Dana <dana@client.test>\r\nSubject: For bob\r\nMessage-Id: <forbob@client.test>\r\n\r\nx\r\n"); err != nil {
		t.Fatal(err)
	}
	if err := sendTo(s.smtpAddr, "alice@"+st.Domain, "dana@outside.test", "From: Alice <alice@"+st.Domain+">\r\nSubject: Direct\r\nMessage-Id: <direct@example.test>\r\n\r\nx\r\n"); err != nil {
		t.Fatal(err)
	}
	c, err := admin.Dial(s.dataDir)
	if err != nil {
		t.Fatal(err)
	}
	var held admin.OutboundList
	for deadline := time.Now().Add(60 * time.Second); len(held.Held) < 2; {
		if time.Now().After(deadline) {
			t.Fatalf("the window holds %+v, want both messages", held)
		}
		time.Sleep(100 * time.Millisecond)
		if held, err = c.Outbound(ctx); err != nil {
			t.Fatal(err)
		}
	}
	ids := map[string]string{}
	for _, m := range held.Held {
		ids[m.MessageID] = m.QueueID
	}
	if err := st.SetVirtualAliases(ctx, nil); err != nil {
		t.Fatal(err)
	}
	out, err := run(t, "cycle", "run", "--data-dir", s.dataDir, "--to", snap, "--reason", "bob's alias pointed outside", "--yes")
	t.Logf("undomail cycle run:\n%s", out)
	if err != nil || !strings.Contains(out, "verdict: OK") || !strings.Contains(out, "no longer sends it outside") {
		b, _ := os.ReadFile(s.logPath)
		t.Fatalf("cycle run: %v\n%s\n%s", err, out, tail(string(b), 40))
	}
	if has, err := inboxMessageIDs(st, "bob"); err != nil || has["forbob@client.test"] != 1 {
		t.Errorf("bob's INBOX after the repair: %v %v; want the message once", has, err)
	}
	if held, err = c.Outbound(ctx); err != nil || len(held.Held) != 1 || held.Held[0].QueueID != ids["<direct@example.test>"] {
		t.Fatalf("the window after the cycle holds %+v (%v); want the direct message alone", held, err)
	}
	if out, err := run(t, "outbound", "release", "--data-dir", s.dataDir, ids["<direct@example.test>"]); err != nil {
		t.Fatalf("outbound release: %v %s", err, out)
	}
	waitSink(t, sink, "direct@example.test")
	flushQueue(t, st, "a flush")
	if n, m := sink.Count("forbob@client.test"), sink.Count("direct@example.test"); n != 0 || m != 1 {
		t.Errorf("the outside got bob's message %d times and the direct one %d times; want 0 and 1", n, m)
	}
	s.stop()
}
