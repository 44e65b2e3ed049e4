package replay_test

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// silentMTA is an SMTP server that accepts XCLIENT and every message and
// delivers nothing: a replay service whose content_filter does not lead
// to the capture. It counts the messages it took.
func silentMTA(t *testing.T) (addr string, took chan string) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	took = make(chan string, 16)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				defer c.Close()
				r := bufio.NewReader(c)
				say := func(s string) { c.Write([]byte(s + "\r\n")) }
				say("220 silent ESMTP")
				var msg strings.Builder
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					cmd := strings.ToUpper(strings.TrimSpace(line))
					switch {
					case strings.HasPrefix(cmd, "XCLIENT"):
						say("220 silent ESMTP")
					case strings.HasPrefix(cmd, "EHLO"):
						say("250-silent\r\n250 8BITMIME")
					case cmd == "DATA":
						say("354 go ahead")
						msg.Reset()
						for {
							l, err := r.ReadString('\n')
							if err != nil {
								return
							}
							if l == ".\r\n" {
								break
							}
							msg.WriteString(l)
						}
						took <- msg.String()
						say("250 2.0.0 queued")
					case cmd == "QUIT":
						say("221 bye")
						return
					default:
						say("250 ok")
					}
				}
			}(c)
		}
	}()
	return l.Addr().String(), took
}

// TestReinjectFallsBackWhenNothingArrives: Postfix's replay service takes
// the front door's messages but nothing reaches the capture within the
// wait. The replay names each message in a failure, delivers the recorded
// deliveries instead (nothing is lost), and a delivery Postfix makes of
// one afterwards is taken and dropped, not delivered a second time.
func TestReinjectFallsBackWhenNothingArrives(t *testing.T) {
	snapDir := filepath.Join(t.TempDir(), "snaps")
	tb := testbedtest.Start(t, func(c *config.Config) { c.Store = "copy:" + snapDir })
	ctx := context.Background()
	snap, _, err := tb.Daemon.Snapshot(ctx, "test")
	if err != nil {
		t.Fatal(err)
	}
	deliver(t, tb, 2, 0)
	waitCount(t, tb, 2)
	if out, err := tb.Daemon.Rewind(ctx, snap.Name, false); err != nil || !out.OK {
		t.Fatalf("rewind: %+v %v", out, err)
	}
	rewinds, _ := tb.Daemon.Log.Verbs(ctx, undolog.Filter{Kinds: []string{verb.KindRewind}})
	addr, took := silentMTA(t)
	capture := &replay.Capture{}
	res, err := replay.Replay(ctx, tb.Daemon.Log, replay.Plan{After: snap.Seq, Before: rewinds[0].Seq}, replay.Target{
		LMTPAddr: tb.Stack.LMTPAddr, IMAPAddr: tb.Stack.IMAPAddr,
		MasterUser: tb.Stack.MasterUser, MasterPassword: tb.Stack.MasterPassword,
		ReinjectAddr: addr, Capture: capture, ReinjectTimeout: 2 * time.Second,
	})
	if err != nil {
		t.Fatalf("replay: %v", err)
	}
	if res.Failed != 2 || res.Replayed != 2 || res.Reinjected != 0 {
		t.Fatalf("replay result %+v: want 2 failed re-injections and the 2 recorded deliveries replayed", res)
	}
	for range 2 {
		if m := <-took; !strings.HasPrefix(m, verb.TraceHeader+": ") {
			t.Fatalf("re-injected message does not start with the front door's id:\n%s", m)
		}
	}
	if n := inbox(t, tb).NumMessages; n != 2 {
		t.Fatalf("INBOX holds %d messages after the replay, want the 2 recorded deliveries", n)
	}
	recs, err := tb.Daemon.Log.Records(ctx, undolog.Filter{Kinds: []string{verb.KindReplay}})
	if err != nil {
		t.Fatal(err)
	}
	named := 0
	for _, r := range recs {
		var o verb.ReplayOutcome
		if json.Unmarshal(r.Outcome, &o) == nil && o.Status == "failed" && strings.Contains(o.Detail, "re-inject front-door message") &&
			strings.Contains(o.Detail, "@client.test>") && strings.Contains(o.Detail, "nothing delivered to the capture") {
			named++
		}
	}
	if named != 2 {
		t.Fatalf("%d failure records name the message and the cause, want 2: %+v", named, recs)
	}
	// Postfix delivers one of them late: the capture takes it and drops it.
	subs, err := tb.Daemon.Log.Records(ctx, undolog.Filter{Kinds: []string{verb.KindSMTPSubmit}})
	if err != nil || len(subs) == 0 {
		t.Fatalf("submissions: %v %v", subs, err)
	}
	var a verb.DeliveryArgs
	if err := json.Unmarshal(subs[0].Args, &a); err != nil {
		t.Fatal(err)
	}
	a.Submission = subs[0].Seq
	out := capture.Collect(ctx, a, undolog.BlobRef{})
	if out == nil || len(out.Rcpts) != 1 || !out.Rcpts[0].Reply.Positive() || !strings.Contains(out.Rcpts[0].Reply.Text, "dropped") {
		t.Fatalf("a late delivery of a message replayed as recorded: %+v, want taken and dropped", out)
	}
	a.UndoID = "some-other-id"
	if out := capture.Collect(ctx, a, undolog.BlobRef{}); out != nil {
		t.Fatalf("a delivery no replay waits for was taken: %+v", out)
	}
}
