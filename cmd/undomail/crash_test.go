package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/internal/daemon"
	"github.com/undomail/undomail/internal/mailstack"
	"github.com/undomail/undomail/internal/mailstack/mailstacktest"
	"github.com/undomail/undomail/internal/testbed/clientcheck"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// TestKill9DuringACycle kills undomail with SIGKILL at several points of
// a cycle that cancels one delivery, and restarts it. Whatever the point,
// the restarted daemon gives every cycle a verdict: interrupted ones are
// rolled back to the present they started from (the cancelled message is
// still there), finished ones kept (it is gone); every other message is
// there exactly once, no UID a client cached is reused, and mail flows
// again. The proxies never come back half-rewound.
func TestKill9DuringACycle(t *testing.T) {
	st, s := repairServer(t)
	out, err := run(t, "snapshot", "--data-dir", s.dataDir)
	if err != nil {
		t.Fatalf("snapshot: %v %s", err, out)
	}
	snap := strings.Fields(out)[1]
	const n = 40
	for i := range n {
		if err := sendPlain(s.smtpAddr, fmt.Sprintf("Subject: m%d\r\nMessage-Id: <m%d@client.test>\r\n\r\nhi\r\n", i, i)); err != nil {
			t.Fatal(err)
		}
	}
	for i := range n {
		waitInbox(t, st, fmt.Sprintf("m%d@client.test", i))
	}
	// The repair: leave out the delivery of m7.
	l, err := undolog.OpenReadOnly(s.dataDir)
	if err != nil {
		t.Fatal(err)
	}
	var victim int64
	ds, _ := l.Verbs(context.Background(), undolog.Filter{Kinds: []string{verb.KindLMTPDeliver}})
	for _, d := range ds {
		var a verb.DeliveryArgs
		json.Unmarshal(d.Args, &a)
		if a.Header.MessageID == "<m7@client.test>" {
			victim = d.Seq
		}
	}
	l.Close()
	if victim == 0 {
		t.Fatal("no delivery of m7 in the log")
	}
	before := clientcheck.Look(t, s.imapAddr, "alice", st.Password("alice"))
	cycles, finished := 0, false
	for i, delay := range []time.Duration{20 * time.Millisecond, 150 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond, 5 * time.Second} {
		cycle := exec.Command(binary, "cycle", "run", "--data-dir", s.dataDir, "--to", snap, "--cancel", fmt.Sprint(victim), "--yes")
		if err := cycle.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(delay)
		s.kill9()
		cycle.Wait()
		s.start()
		verdicts := cycleVerdicts(t, s.dataDir)
		ids, err := inboxMessageIDs(st, "alice")
		if err != nil {
			t.Fatal(err)
		}
		var last daemon.CycleVerdict
		if len(verdicts) == cycles {
			// Killed before the daemon began the cycle: nothing changed.
			last = daemon.CycleVerdict{OK: finished, Error: "interrupted before it began"}
			if finished {
				last.Error = ""
			}
		} else {
			last = verdicts[len(verdicts)-1]
			finished = finished || last.OK
		}
		cycles = len(verdicts)
		t.Logf("kill %d after %v: cycle %d ok=%v %s", i+1, delay, last.Cycle, last.OK, last.Error)
		switch {
		case last.OK && ids["m7@client.test"] != 0:
			t.Fatalf("kill %d: the cycle finished but the cancelled m7 is there: %v", i+1, ids)
		case !last.OK && !strings.Contains(last.Error, "interrupted"):
			t.Fatalf("kill %d: cycle verdict %+v", i+1, last)
		case !last.OK && ids["m7@client.test"] != 1:
			t.Fatalf("kill %d: the cycle was rolled back but m7 is there %d times: %v", i+1, ids["m7@client.test"], ids)
		}
		for j := range n {
			if id := fmt.Sprintf("m%d@client.test", j); j != 7 && ids[id] != 1 {
				t.Fatalf("kill %d: %s is there %d times after the restart: %v", i+1, id, ids[id], ids)
			}
		}
		after := clientcheck.Look(t, s.imapAddr, "alice", st.Password("alice"))
		clientcheck.NoUIDReuse(t, before, after)
		before = after
		// Mail flows again.
		msg := fmt.Sprintf("after-kill-%d@client.test", i)
		if err := sendPlain(s.smtpAddr, "Subject: after\r\nMessage-Id: <"+msg+">\r\n\r\nhi\r\n"); err != nil {
			t.Fatalf("kill %d: the restarted daemon refuses mail: %v", i+1, err)
		}
		waitInbox(t, st, msg)
	}
	s.stop()
	if b, _ := os.ReadFile(s.logPath); !strings.Contains(string(b), "interrupted repair rolled back") {
		t.Errorf("no kill hit a cycle in the middle: the test proved nothing about recovery")
	}
}

// cycleVerdicts reads every cycle's verdict from the log, failing the
// test if a cycle has none.
func cycleVerdicts(t *testing.T, dataDir string) []daemon.CycleVerdict {
	t.Helper()
	l, err := undolog.OpenReadOnly(dataDir)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	vs, err := l.Verbs(context.Background(), undolog.Filter{Kinds: []string{verb.KindCycle}})
	if err != nil {
		t.Fatal(err)
	}
	var out []daemon.CycleVerdict
	for _, v := range vs {
		if v.Outcome == nil {
			t.Fatalf("cycle %d has no verdict after the restart", v.Seq)
		}
		var cv daemon.CycleVerdict
		json.Unmarshal(v.Outcome.Outcome, &cv)
		cv.Cycle = v.Seq
		out = append(out, cv)
	}
	return out
}

// TestUpstreamsKilledMidTransaction kills Dovecot, then Postfix, with
// SIGKILL while clients send mail through the front door and APPEND over
// IMAP through undomail. Clients get temporary failures (4xx, NO, a
// dropped connection), never a false OK; after the upstream is back,
// every message a client was told was accepted is in the mailbox.
func TestUpstreamsKilledMidTransaction(t *testing.T) {
	st := mailstacktest.Start(t, mailstack.Options{})
	s := newServer(t, st)
	s.start()
	ctx := context.Background()
	if err := st.SetLMTPRelay(ctx, s.lmtpAdr); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	sent, appended := map[string]bool{}, map[string]bool{}
	failures := map[string]int{}
	load := func(round string, stop chan struct{}, wg *sync.WaitGroup) {
		for g := range 3 {
			wg.Add(2)
			go func() { // SMTP through the front door
				defer wg.Done()
				for n := 0; ; n++ {
					select {
					case <-stop:
						return
					default:
					}
					id := fmt.Sprintf("%s.smtp.%d.%d@client.test", round, g, n)
					err := sendPlain(s.smtpAddr, "Subject: x\r\nMessage-Id: <"+id+">\r\n\r\nhi\r\n")
					mu.Lock()
					if err == nil {
						sent[id] = true
					} else {
						failures["smtp: "+smtpClass(err)]++
					}
					mu.Unlock()
					if err != nil {
						time.Sleep(20 * time.Millisecond)
					}
				}
			}()
			go func() { // IMAP APPEND through the front end
				defer wg.Done()
				for n := 0; ; n++ {
					select {
					case <-stop:
						return
					default:
					}
					id := fmt.Sprintf("%s.imap.%d.%d@client.test", round, g, n)
					err := imapAppend(s.imapAddr, "bob", st.Password("bob"), id)
					mu.Lock()
					if err == nil {
						appended[id] = true
					} else {
						failures["imap: "+imapClass(err)]++
					}
					mu.Unlock()
					if err != nil {
						time.Sleep(20 * time.Millisecond)
					}
				}
			}()
		}
	}
	for _, victim := range []string{"dovecot", "postfix"} {
		stop := make(chan struct{})
		var wg sync.WaitGroup
		load(victim, stop, &wg)
		time.Sleep(700 * time.Millisecond)
		if victim == "dovecot" {
			st.KillDovecot()
		} else {
			st.KillPostfix()
		}
		time.Sleep(700 * time.Millisecond) // clients hit the dead upstream
		var err error
		if victim == "dovecot" {
			err = st.StartDovecot(ctx)
		} else {
			err = st.StartPostfix(ctx)
		}
		if err != nil {
			t.Fatalf("restart %s: %v", victim, err)
		}
		time.Sleep(500 * time.Millisecond)
		close(stop)
		wg.Wait()
	}
	t.Logf("acknowledged: %d messages sent, %d appended; temporary failures: %v", len(sent), len(appended), failures)
	if len(failures) == 0 {
		t.Fatal("no client saw a failure: the kills missed the load")
	}
	for k := range failures {
		if strings.Contains(k, "permanent") {
			t.Errorf("a client got a permanent failure from a crashed upstream: %v", failures)
		}
	}
	deadline := time.Now().Add(90 * time.Second)
	for {
		ids, err := inboxMessageIDs(st, "alice")
		bobs, err2 := inboxMessageIDs(st, "bob")
		var missing []string
		for id := range sent {
			if err != nil || ids[id] == 0 {
				missing = append(missing, id)
			}
		}
		for id := range appended {
			if err2 != nil || bobs[id] == 0 {
				missing = append(missing, id)
			}
		}
		if len(missing) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d acknowledged messages lost, e.g. %v", len(missing), missing[:min(5, len(missing))])
		}
		st.Flush(ctx)
		time.Sleep(500 * time.Millisecond)
	}
	s.stop()
}

func smtpClass(err error) string {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		if se.Code >= 500 {
			return fmt.Sprintf("permanent %d", se.Code)
		}
		return fmt.Sprintf("%d %d.%d.%d", se.Code, se.EnhancedCode[0], se.EnhancedCode[1], se.EnhancedCode[2])
	}
	return "connection"
}

func imapClass(err error) string {
	var ie *imap.Error
	if errors.As(err, &ie) {
		return string(ie.Type) + " " + string(ie.Code)
	}
	return "connection"
}

// imapAppend appends a message to user's INBOX through addr.
func imapAppend(addr, user, pass, id string) error {
	c, err := imapclient.DialInsecure(addr, nil)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Login(user, pass).Wait(); err != nil {
		return err
	}
	msg := "Subject: appended\r\nMessage-Id: <" + id + ">\r\n\r\nhi\r\n"
	ap := c.Append("INBOX", int64(len(msg)), nil)
	ap.Write([]byte(msg))
	ap.Close()
	_, err = ap.Wait()
	return err
}

// TestRemoteCycleAndDrill runs a cycle and a drill through the admin API
// (--admin URL, the token from the data dir), as an operator would from
// another machine.
func TestRemoteCycleAndDrill(t *testing.T) {
	st, s := repairServer(t)
	out, err := run(t, "snapshot", "--data-dir", s.dataDir)
	if err != nil {
		t.Fatalf("snapshot: %v %s", err, out)
	}
	snap := strings.Fields(out)[1]
	if err := sendPlain(s.smtpAddr, "Subject: r\r\nMessage-Id: <remote@client.test>\r\n\r\nhi\r\n"); err != nil {
		t.Fatal(err)
	}
	waitInbox(t, st, "remote@client.test")
	url := "http://" + s.adminAddr
	out, err = run(t, "cycle", "run", "--data-dir", s.dataDir, "--admin", url, "--to", snap, "--yes")
	if err != nil || !strings.Contains(out, "verdict: OK") || !strings.Contains(out, "replayed 1 verbs") {
		t.Fatalf("cycle run --admin: %v\n%s", err, out)
	}
	if _, err := run(t, "snapshot", "--data-dir", s.dataDir); err != nil {
		t.Fatal(err)
	}
	out, err = run(t, "drill", "--data-dir", s.dataDir, "--admin", url)
	if err != nil || !strings.Contains(out, "drill PASSED") {
		t.Fatalf("drill --admin: %v\n%s", err, out)
	}
	// A wrong token is refused.
	bad := t.TempDir() + "/token"
	os.WriteFile(bad, []byte("not-the-token\n"), 0o600)
	if out, err := run(t, "drill", "--data-dir", s.dataDir, "--admin", url, "--token-file", bad); err == nil {
		t.Fatalf("drill with a wrong token ran:\n%s", out)
	}
	s.stop()
}
