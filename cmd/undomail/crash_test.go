package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/undomail/undomail/internal/daemon"
	"github.com/undomail/undomail/internal/mailstack"
	"github.com/undomail/undomail/internal/mailstack/mailstacktest"
	"github.com/undomail/undomail/internal/testbed/clientcheck"
	"github.com/undomail/undomail/proxy"
	"github.com/undomail/undomail/undolog"
)

// TestKill9DuringACycle kills undomail with SIGKILL at several points of
// a cycle that cancels one delivery, and restarts it. Whatever the point,
// the restarted daemon gives every cycle a verdict: interrupted ones are
// rolled back to the present they started from (the cancelled message is
// still there), finished ones kept (it is gone); every other message is
// there exactly once, no UID a client cached is reused, and mail flows
// again. The proxies never come back half-rewound.
func TestKill9DuringACycle(t *testing.T) {
	st := mailstacktest.Start(t, mailstack.Options{})
	s := newServer(t, st)
	s.extra = []string{"--config", repairConfig(t, st)}
	s.start()
	if err := st.SetLMTPRelay(context.Background(), s.lmtpAdr); err != nil {
		t.Fatal(err)
	}
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
	ds, _ := l.Verbs(context.Background(), undolog.Filter{Kinds: []string{proxy.KindLMTPDeliver}})
	for _, d := range ds {
		var a proxy.DeliveryArgs
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
	vs, err := l.Verbs(context.Background(), undolog.Filter{Kinds: []string{daemon.KindCycle}})
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
