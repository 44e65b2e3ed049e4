package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-message/mail"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/compensate"
	"github.com/undomail/undomail/internal/mailstack"
	"github.com/undomail/undomail/internal/mailstack/mailstacktest"
)

// TestMisrouteRepairedThroughPostfix is issue 15's first scenario, as an
// operator runs it: a virtual alias sends bob's mail to carol for a
// while; carol reads two of the five messages through undomail. The
// operator rewinds with --hold, removes the alias, reloads Postfix and
// replays: the replay hands the front door's mail to Postfix's replay
// service again, so bob has every message once and carol none; carol's
// digest explains exactly the two she read, and the operator notice lists
// them as exposure. The replay's verdict is OK.
func TestMisrouteRepairedThroughPostfix(t *testing.T) {
	ctx := context.Background()
	st, s, snap := mtaServer(t)

	// The mistake: bob's mail goes to carol.
	bob, carol := "bob@"+st.Domain, "carol@"+st.Domain
	if err := st.SetVirtualAliases(ctx, map[string]string{bob: carol}); err != nil {
		t.Fatal(err)
	}
	var ids []string
	for i := 1; i <= 5; i++ {
		id := fmt.Sprintf("m%d@client.test", i)
		ids = append(ids, id)
		msg := fmt.Sprintf("From: Dana <dana@client.test>\r\nTo: <%s>\r\nSubject: For bob %d\r\nMessage-Id: <%s>\r\n\r\nfor bob only\r\n", bob, i, id)
		if err := sendTo(s.smtpAddr, "dana@client.test", bob, msg); err != nil {
			t.Fatalf("send %s: %v", id, err)
		}
	}
	waitMessages(t, st, "carol", ids)
	if got, err := inboxMessageIDs(st, "bob"); err != nil || len(got) != 0 {
		t.Fatalf("bob's INBOX while the alias is there: %v, %v; want empty", got, err)
	}
	// carol reads two of them through undomail.
	read := []string{ids[1], ids[3]}
	c, err := imapclient.DialInsecure(s.imapAddr, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Login("carol", st.Password("carol")).Wait(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	for _, id := range read {
		found, err := c.UIDSearch(&imap.SearchCriteria{Header: []imap.SearchCriteriaHeaderField{{Key: "Message-Id", Value: id}}}, nil).Wait()
		if err != nil || len(found.AllUIDs()) != 1 {
			t.Fatalf("find %s in carol's INBOX: %v %v", id, found, err)
		}
		if _, err := c.Fetch(imap.UIDSetNum(found.AllUIDs()[0]), &imap.FetchOptions{BodySection: []*imap.FetchItemBodySection{{}}}).Collect(); err != nil {
			t.Fatal(err)
		}
	}
	c.Logout().Wait()
	c.Close()

	// The plan says where each message went the first time.
	plan, err := run(t, "cycle", "plan", "--data-dir", s.dataDir, "--to", snap)
	if err != nil || !strings.Contains(plan, "5 front-door messages go through Postfix again") || strings.Count(plan, bob+"  "+carol) != 5 {
		t.Fatalf("cycle plan: %v\n%s", err, plan)
	}

	// The repair: rewind and hold, remove the alias, replay.
	if out, err := run(t, "rewind", "--data-dir", s.dataDir, "--to", snap, "--hold", "--yes"); err != nil {
		t.Fatalf("rewind --hold: %v %s", err, out)
	}
	if err := st.SetVirtualAliases(ctx, nil); err != nil {
		t.Fatal(err)
	}
	out, err := run(t, "replay", "--data-dir", s.dataDir)
	if err != nil || !strings.Contains(out, `"Reinjected":5`) || !strings.Contains(out, `"Failed":0`) {
		b, _ := os.ReadFile(s.logPath)
		t.Fatalf("replay (the verdict must be OK): %v\n%s\n%s", err, out, tail(string(b), 40))
	}

	bobHas, err := inboxMessageIDs(st, "bob")
	if err != nil {
		t.Fatal(err)
	}
	carolHas, err := inboxMessageIDs(st, "carol")
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		if bobHas[id] != 1 || carolHas[id] != 0 {
			t.Errorf("%s: bob has it %d times, carol %d; want 1 and 0", id, bobHas[id], carolHas[id])
		}
	}
	if len(bobHas) != 5 {
		t.Errorf("bob's INBOX after the replay: %v; want exactly the five messages", bobHas)
	}

	// carol is told about exactly the two she read.
	js, err := run(t, "compensations", "--data-dir", s.dataDir, "--json")
	if err != nil {
		t.Fatalf("compensations --json: %v\n%s", err, js)
	}
	var toCarol, toOperator *compensationJSON
	for _, line := range strings.Split(strings.TrimSpace(js), "\n") {
		var cj compensationJSON
		if err := json.Unmarshal([]byte(line), &cj); err != nil {
			t.Fatalf("compensations --json line %q: %v", line, err)
		}
		switch {
		case cj.Audience == compensate.AudienceUser && cj.User == "carol":
			toCarol = &cj
		case cj.Audience == compensate.AudienceOperator:
			toOperator = &cj
		default:
			t.Errorf("unexpected compensation: %s", line)
		}
	}
	if toCarol == nil || toOperator == nil || !toCarol.Delivered || !toOperator.Delivered {
		t.Fatalf("want a delivered digest for carol and a delivered operator notice:\n%s", js)
	}
	var told []string
	for _, p := range toCarol.Paradoxes {
		if p.Kind != compensate.Misdelivered || p.Message == nil {
			t.Errorf("carol's paradox %+v: want kind misdelivered with its message", p)
			continue
		}
		told = append(told, p.Message.MessageID)
	}
	if fmt.Sprint(told) != fmt.Sprint([]string{"<" + read[0] + ">", "<" + read[1] + ">"}) {
		t.Errorf("carol was told about %v; want exactly the two she read, %v", told, read)
	}
	digest := messageText(t, st, "carol", compensate.DefaultSubject)
	for i, id := range ids {
		subj := fmt.Sprintf("For bob %d", i+1)
		wantIn := id == read[0] || id == read[1]
		if strings.Contains(digest, subj) != wantIn {
			t.Errorf("carol's digest mentions %q: %v, want %v:\n%s", subj, !wantIn, wantIn, digest)
		}
	}
	if !strings.Contains(digest, "not meant for you") {
		t.Errorf("carol's digest does not say the mail was not meant for her:\n%s", digest)
	}
	notice := messageText(t, st, "alice", "undomail: cycle")
	for _, id := range read {
		if !strings.Contains(notice, "exposure: carol read") || !strings.Contains(notice, "<"+id+">") {
			t.Errorf("the operator notice does not list carol's exposure to %s:\n%s", id, notice)
		}
	}
	for _, id := range []string{ids[0], ids[2], ids[4]} {
		if strings.Contains(notice, "<"+id+">") {
			t.Errorf("the operator notice lists %s, which nobody read:\n%s", id, notice)
		}
	}
	s.stop()
}

// mtaServer starts a private stack and undomail serve in front of it,
// set up for cycles through Postfix's replay service, with the operator
// notice going to alice, and takes a snapshot.
func mtaServer(t *testing.T) (st *mailstack.Stack, s *server, snap string) {
	t.Helper()
	st = mailstacktest.Start(t, mailstack.Options{})
	s = newServer(t, st)
	cfg := repairConfig(t, st)
	f, err := os.OpenFile(cfg, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(f, "smtp:\n  replay_upstream: %s\ncompensation:\n  operator: alice@%s\n", st.ReplaySMTPAddr, st.Domain)
	f.Close()
	s.extra = []string{"--config", cfg}
	s.start()
	if err := st.SetLMTPRelay(context.Background(), s.lmtpAdr); err != nil {
		t.Fatal(err)
	}
	out, err := run(t, "snapshot", "--data-dir", s.dataDir)
	if err != nil {
		t.Fatalf("snapshot: %v %s", err, out)
	}
	return st, s, strings.Fields(out)[1]
}

// TestRefusedByMistakeDeliveredByACycle is issue 15's reject-rule
// scenario: a header check refuses bob's invoices for a while (the sender
// is told 550); the operator removes it and runs a cycle. The two
// messages are delivered once, bob's digest tells him of them, and the
// operator notice lists the sender who was told 5xx.
func TestRefusedByMistakeDeliveredByACycle(t *testing.T) {
	ctx := context.Background()
	st, s, snap := mtaServer(t)
	if err := st.SetHeaderChecks(ctx, "/^Subject: .*[Ii]nvoice/ REJECT 5.7.1 looks like spam\n"); err != nil {
		t.Fatal(err)
	}
	bob := "bob@" + st.Domain
	ids := []string{"inv1@client.test", "inv2@client.test", "note@client.test"}
	subjects := []string{"Invoice 1", "Invoice 2", "A note"}
	for i, id := range ids {
		msg := fmt.Sprintf("From: Dana <dana@client.test>\r\nTo: <%s>\r\nSubject: %s\r\nMessage-Id: <%s>\r\n\r\nplease pay\r\n", bob, subjects[i], id)
		err := sendTo(s.smtpAddr, "dana@client.test", bob, msg)
		var se *smtp.SMTPError
		switch {
		case i < 2 && (!errors.As(err, &se) || se.Code != 550):
			t.Fatalf("send %s with the reject rule: %v, want 550", id, err)
		case i == 2 && err != nil:
			t.Fatalf("send %s: %v", id, err)
		}
	}
	waitMessages(t, st, "bob", ids[2:])
	if err := st.SetHeaderChecks(ctx, ""); err != nil {
		t.Fatal(err)
	}
	out, err := run(t, "cycle", "run", "--data-dir", s.dataDir, "--to", snap, "--reason", "A header check refused invoices.", "--yes")
	if err != nil || !strings.Contains(out, "verdict: OK") {
		b, _ := os.ReadFile(s.logPath)
		t.Fatalf("cycle run: %v\n%s\n%s", err, out, tail(string(b), 40))
	}
	// The plan showed where each went the first time, the verdict where
	// it went this time.
	for _, id := range ids[:2] {
		var plan, now bool
		for _, line := range strings.Split(out, "\n") {
			plan = plan || strings.Contains(line, "<"+id+">") && strings.Contains(line, "refused: 550")
			now = now || strings.Contains(line, "<"+id+">") && strings.HasSuffix(strings.TrimSpace(line), bob)
		}
		if !plan || !now {
			t.Errorf("cycle run output: %s first refused listed %v, delivered to %s now listed %v:\n%s", id, plan, bob, now, out)
		}
	}
	has, err := inboxMessageIDs(st, "bob")
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		if has[id] != 1 {
			t.Errorf("bob has %s %d times after the cycle, want once: %v", id, has[id], has)
		}
	}
	js, err := run(t, "compensations", "--data-dir", s.dataDir, "--json")
	if err != nil {
		t.Fatalf("compensations --json: %v\n%s", err, js)
	}
	var told []string
	notices := 0
	for _, line := range strings.Split(strings.TrimSpace(js), "\n") {
		var cj compensationJSON
		if err := json.Unmarshal([]byte(line), &cj); err != nil {
			t.Fatalf("compensations --json line %q: %v", line, err)
		}
		switch {
		case cj.Audience == compensate.AudienceUser && cj.User == "bob" && cj.Delivered:
			for _, p := range cj.Paradoxes {
				if p.Kind == compensate.RefusedByMistake && p.Message != nil {
					told = append(told, p.Message.MessageID)
				}
			}
		case cj.Audience == compensate.AudienceOperator && cj.Delivered:
			notices++
		default:
			t.Errorf("unexpected compensation: %s", line)
		}
	}
	if fmt.Sprint(told) != fmt.Sprint([]string{"<" + ids[0] + ">", "<" + ids[1] + ">"}) || notices != 1 {
		t.Fatalf("bob was told about %v (want the two invoices), %d operator notices (want 1):\n%s", told, notices, js)
	}
	digest := messageText(t, st, "bob", compensate.DefaultSubject)
	for _, subj := range subjects[:2] {
		if !strings.Contains(digest, subj) || !strings.Contains(digest, "refused by mistake") {
			t.Errorf("bob's digest does not tell him %q was refused by mistake:\n%s", subj, digest)
		}
	}
	notice := messageText(t, st, "alice", "undomail: cycle")
	if strings.Count(notice, "sender dana@client.test was refused") != 2 || !strings.Contains(notice, "550") {
		t.Errorf("the operator notice does not list the sender told 550 for both messages:\n%s", notice)
	}
	s.stop()
}

// sendTo sends one message without TLS from one sender to one recipient.
func sendTo(addr, from, to, msg string) error {
	c, err := smtp.Dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.SendMail(from, []string{to}, strings.NewReader(msg)); err != nil {
		return err
	}
	c.Quit()
	return nil
}

// waitMessages waits until user's INBOX holds each Message-Id once.
func waitMessages(t *testing.T, st *mailstack.Stack, user string, msgIDs []string) {
	t.Helper()
	for deadline := time.Now().Add(60 * time.Second); ; {
		got, _ := inboxMessageIDs(st, user)
		n := 0
		for _, id := range msgIDs {
			if got[id] == 1 {
				n++
			}
		}
		if n == len(msgIDs) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s's INBOX holds %v; want %v", user, got, msgIDs)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// messageText returns the text of the one message in user's INBOX whose
// subject starts with prefix (its text/plain part, decoded).
func messageText(t *testing.T, st *mailstack.Stack, user, prefix string) string {
	t.Helper()
	c, err := imapclient.DialInsecure(st.IMAPAddr, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Login(user, st.Password(user)).Wait(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	msgs, err := c.Fetch(seqAll(), &imap.FetchOptions{Envelope: true, BodySection: []*imap.FetchItemBodySection{{Peek: true}}}).Collect()
	if err != nil {
		t.Fatal(err)
	}
	var texts []string
	for _, m := range msgs {
		if m.Envelope == nil || !strings.HasPrefix(m.Envelope.Subject, prefix) {
			continue
		}
		var raw []byte
		for _, b := range m.BodySection {
			raw = b.Bytes
		}
		r, err := mail.CreateReader(strings.NewReader(string(raw)))
		if err != nil {
			t.Fatalf("read %s's message %q: %v", user, m.Envelope.Subject, err)
		}
		for {
			p, err := r.NextPart()
			if err != nil {
				break
			}
			if h, ok := p.Header.(*mail.InlineHeader); ok {
				if ct, _, _ := h.ContentType(); ct == "text/plain" {
					b, _ := io.ReadAll(p.Body)
					texts = append(texts, string(b))
				}
			}
		}
	}
	if len(texts) != 1 {
		t.Fatalf("%s's INBOX holds %d messages with a subject starting %q; want 1", user, len(texts), prefix)
	}
	return strings.Join(strings.Fields(texts[0]), " ") // unwrapped
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// TestRepairPointingOutsideIsHeld: issue 15's "nothing leaves the machine
// twice". bob's mail went to carol by mistake; the operator's repair
// points bob's alias at an address outside. The replay through Postfix
// takes carol's copies away, but sends nothing out: the two deliveries to
// the outside address are held, the operator notice lists them, and
// Postfix's log shows them only as taken by undomail's capture.
func TestRepairPointingOutsideIsHeld(t *testing.T) {
	ctx := context.Background()
	st, s, snap := mtaServer(t)
	bob, carol, outside := "bob@"+st.Domain, "carol@"+st.Domain, "robert@elsewhere.test"
	if err := st.SetVirtualAliases(ctx, map[string]string{bob: carol}); err != nil {
		t.Fatal(err)
	}
	ids := []string{"o1@client.test", "o2@client.test"}
	for i, id := range ids {
		msg := fmt.Sprintf("From: Dana <dana@client.test>\r\nSubject: Outward %d\r\nMessage-Id: <%s>\r\n\r\nx\r\n", i+1, id)
		if err := sendTo(s.smtpAddr, "dana@client.test", bob, msg); err != nil {
			t.Fatal(err)
		}
	}
	waitMessages(t, st, "carol", ids)
	if out, err := run(t, "rewind", "--data-dir", s.dataDir, "--to", snap, "--hold", "--yes"); err != nil {
		t.Fatalf("rewind --hold: %v %s", err, out)
	}
	if err := st.SetVirtualAliases(ctx, map[string]string{bob: outside}); err != nil {
		t.Fatal(err)
	}
	out, err := run(t, "replay", "--data-dir", s.dataDir)
	if err != nil || !strings.Contains(out, `"Held":2`) || !strings.Contains(out, `"Failed":0`) {
		b, _ := os.ReadFile(s.logPath)
		pf, _ := os.ReadFile(st.PostfixLog())
		t.Fatalf("replay (the verdict must be OK): %v\n%s\n%s\npostfix:\n%s", err, out, tail(string(b), 40), tail(string(pf), 30))
	}
	for _, u := range []string{"bob", "carol"} {
		if has, err := inboxMessageIDs(st, u); err != nil || has[ids[0]]+has[ids[1]] != 0 {
			t.Errorf("%s's INBOX after the replay: %v %v; want neither message", u, has, err)
		}
	}
	notice := messageText(t, st, "alice", "undomail: cycle")
	if strings.Count(notice, "[held_outside]") != 2 || !strings.Contains(notice, "<"+outside+">") || !strings.Contains(notice, "not sent") {
		t.Errorf("the operator notice does not list the two held messages:\n%s", notice)
	}
	// Postfix handed both to the capture and to nothing else.
	var lines []string
	for deadline := time.Now().Add(20 * time.Second); ; {
		b, _ := os.ReadFile(st.PostfixLog())
		lines = lines[:0]
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, "to=<"+outside+">") {
				lines = append(lines, l)
			}
		}
		if len(lines) >= 2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(lines) != 2 {
		t.Fatalf("Postfix logged %d deliveries to %s, want the 2 to the capture:\n%s", len(lines), outside, strings.Join(lines, "\n"))
	}
	for _, l := range lines {
		if !strings.Contains(l, "status=sent") || !strings.Contains(l, "taken by undomail") {
			t.Errorf("Postfix delivered to %s other than to undomail's capture: %s", outside, l)
		}
	}
	s.stop()
}

// TestMisrouteOutsideRepaired: for a while bob's alias pointed outside, so
// his mail left the machine (here Postfix's offsite transport, which
// stands in for the outside and logs each attempt). After the alias is
// removed and the replay runs through Postfix, bob has both messages once,
// and nothing went out a second time: Postfix logged no new attempt to the
// outside address.
func TestMisrouteOutsideRepaired(t *testing.T) {
	ctx := context.Background()
	st, s, snap := mtaServer(t)
	bob, outside := "bob@"+st.Domain, "robert@elsewhere.test"
	if err := st.SetVirtualAliases(ctx, map[string]string{bob: outside}); err != nil {
		t.Fatal(err)
	}
	ids := []string{"x1@client.test", "x2@client.test"}
	for i, id := range ids {
		msg := fmt.Sprintf("From: Dana <dana@client.test>\r\nSubject: Away %d\r\nMessage-Id: <%s>\r\n\r\nx\r\n", i+1, id)
		if err := sendTo(s.smtpAddr, "dana@client.test", bob, msg); err != nil {
			t.Fatal(err)
		}
	}
	attempts := func() int {
		b, _ := os.ReadFile(st.PostfixLog())
		n := 0
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, "to=<"+outside+">") && strings.Contains(l, "postfix/error") {
				n++
			}
		}
		return n
	}
	for deadline := time.Now().Add(30 * time.Second); attempts() < 2; {
		if time.Now().After(deadline) {
			t.Fatalf("Postfix did not send both messages to %s (the first run)", outside)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if out, err := run(t, "rewind", "--data-dir", s.dataDir, "--to", snap, "--hold", "--yes"); err != nil {
		t.Fatalf("rewind --hold: %v %s", err, out)
	}
	if err := st.SetVirtualAliases(ctx, nil); err != nil {
		t.Fatal(err)
	}
	out, err := run(t, "replay", "--data-dir", s.dataDir)
	if err != nil || !strings.Contains(out, `"Reinjected":2`) || !strings.Contains(out, `"Failed":0`) {
		b, _ := os.ReadFile(s.logPath)
		t.Fatalf("replay (the verdict must be OK): %v\n%s\n%s", err, out, tail(string(b), 40))
	}
	has, err := inboxMessageIDs(st, "bob")
	if err != nil || has[ids[0]] != 1 || has[ids[1]] != 1 {
		t.Fatalf("bob's INBOX after the replay: %v %v; want both messages once", has, err)
	}
	// Anything Postfix did for the replay is logged by now: the deliveries
	// to bob went through the capture.
	if n := attempts(); n != 2 {
		t.Errorf("Postfix tried to send to %s %d times; want the 2 of the first run only", outside, n)
	}
	s.stop()
}
