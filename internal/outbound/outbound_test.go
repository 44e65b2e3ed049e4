package outbound_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/internal/mailstack"
	"github.com/undomail/undomail/internal/mailstack/mailstacktest"
	"github.com/undomail/undomail/internal/outbound"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// realPostfix starts a stack whose Postfix relays mail for other domains
// to a sink and defers its smtp transport, and an undo log.
func realPostfix(t *testing.T) (*mailstacktest.Sink, *mailstack.Stack, *undolog.Log) {
	t.Helper()
	sink := mailstacktest.StartSink(t)
	st := mailstacktest.Start(t, mailstack.Options{Outside: sink.Addr, DeferTransports: "smtp"})
	dumpOnFailure(t, st)
	l, err := undolog.Open(t.TempDir(), undolog.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return sink, st, l
}

// TestWindowOnRealPostfix drives the window over a real Postfix whose
// smtp transport relays to a sink and is listed in defer_transports:
// three messages for outside wait in the deferred queue and are logged
// as held (the one the front door stamped linked to its submission);
// the operator cancels one (it never reaches the sink) and releases one
// (it arrives once); a restarted window reads the third back from the
// log and keeps it while its time is not up; the operator releases it,
// and it arrives once.
func TestWindowOnRealPostfix(t *testing.T) {
	ctx := context.Background()
	sink, st, l := realPostfix(t)
	// The front door's record of the first message.
	args, _ := json.Marshal(verb.DeliveryArgs{UndoID: "01OUTBOUNDTEST", MailFrom: "alice@" + st.Domain, Rcpts: []string{"dana@outside.test"}})
	sub := &undolog.Record{Kind: verb.KindSMTPSubmit, User: "alice", Args: args}
	if err := l.Append(ctx, sub); err != nil {
		t.Fatal(err)
	}
	ids := []string{"cancel-me@example.test", "release-me@example.test", "wait@example.test"}
	for i, id := range ids {
		msg := fmt.Sprintf("Subject: outward %d\r\nMessage-Id: <%s>\r\n\r\nx\r\n", i, id)
		if i == 0 {
			msg = verb.TraceHeader + ": 01OUTBOUNDTEST\r\n" + msg
		}
		send(t, st.SMTPAddr, "alice@"+st.Domain, []string{"dana@outside.test", "bob@" + st.Domain}, msg)
	}
	pf := outbound.Postfix{Config: st.PostfixConfigDir()}
	q, err := outbound.New(ctx, l, outbound.Options{Delay: time.Hour, Postfix: pf})
	if err != nil {
		t.Fatal(err)
	}
	held := waitHeld(t, q, 3)
	byMsgID := map[string]outbound.Message{}
	for _, m := range held {
		byMsgID[m.MessageID] = m
		if len(m.Rcpts) != 1 || m.Rcpts[0] != "dana@outside.test" || m.Sender != "alice@"+st.Domain {
			t.Errorf("held %+v: want only the outside recipient waiting, from alice", m)
		}
		if d := m.ReleaseAt.Sub(m.Arrived); d != time.Hour {
			t.Errorf("held %s until %s after its arrival, want the window's 1h", m.QueueID, d)
		}
	}
	first := byMsgID["<"+ids[0]+">"]
	if first.UndoID != "01OUTBOUNDTEST" || first.Submission != sub.Seq {
		t.Errorf("the stamped message is held as %+v; want undo id 01OUTBOUNDTEST and submission %d", first, sub.Seq)
	}
	if byMsgID["<"+ids[1]+">"].Submission != 0 {
		t.Errorf("a message without Undomail-Id is linked to submission %d", byMsgID["<"+ids[1]+">"].Submission)
	}
	if n := len(sink.Arrivals()); n != 0 {
		t.Fatalf("the sink got %d messages while they are held", n)
	}

	// A cycle that cancels another submission cancels nothing; one that
	// cancels the first's cancels it.
	if got, err := q.CancelSubmissions(ctx, 99, map[int64]bool{sub.Seq + 100: true}, "x"); err != nil || len(got) != 0 {
		t.Fatalf("cancel other submissions: %v %v", got, err)
	}
	got, err := q.CancelSubmissions(ctx, 99, map[int64]bool{sub.Seq: true}, "alice sent it by mistake")
	if err != nil || len(got) != 1 || got[0].QueueID != first.QueueID {
		t.Fatalf("cancel submission %d: %+v %v; want %s cancelled", sub.Seq, got, err, first.QueueID)
	}
	if err := q.Cancel(ctx, first.QueueID, ""); !errors.Is(err, outbound.ErrNotHeld) {
		t.Errorf("cancel a cancelled message again: %v, want ErrNotHeld", err)
	}
	if err := q.Release(ctx, byMsgID["<"+ids[1]+">"].QueueID, "checked by hand"); err != nil {
		t.Fatal(err)
	}
	waitArrivals(t, q, sink, ids[1], 1)

	// Restarted: the third is read back from the log.
	q2, err := outbound.New(ctx, l, outbound.Options{Delay: 0, Postfix: pf, Paused: func() bool { return true }})
	if err != nil {
		t.Fatal(err)
	}
	if ms := q2.List(); len(ms) != 1 || ms[0].MessageID != "<"+ids[2]+">" {
		t.Fatalf("the restarted window holds %+v; want the third message alone", ms)
	}
	// Its time (an hour, as logged) is not up, and a repair holds changes
	// back: nothing changes.
	if err := q2.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if len(q2.List()) != 1 {
		t.Fatalf("the window released a message before its time while paused: %+v", q2.List())
	}
	if err := q2.Release(ctx, byMsgID["<"+ids[2]+">"].QueueID, ""); err != nil {
		t.Fatal(err)
	}
	waitArrivals(t, q2, sink, ids[2], 1)
	// The cancelled message is gone from Postfix's queue for good.
	es, err := pf.Queue(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		if e.ID == first.QueueID {
			t.Errorf("the cancelled message %s is still in Postfix's queue: %+v", e.ID, e)
		}
	}
	if n := sink.Count(ids[0]); n != 0 {
		t.Errorf("the cancelled message reached the sink %d times", n)
	}
	// The log tells the story.
	recs, err := l.Records(ctx, undolog.Filter{Kinds: []string{verb.KindOutboundHeld, verb.KindOutboundReleased, verb.KindOutboundCancelled}})
	if err != nil {
		t.Fatal(err)
	}
	var story []string
	for _, r := range recs {
		story = append(story, r.Kind)
	}
	want := "outbound.held outbound.held outbound.held outbound.cancelled outbound.released outbound.released"
	if strings.Join(story, " ") != want {
		t.Errorf("the log holds %v, want %s", story, want)
	}
	if ms, err := outbound.Waiting(ctx, l); err != nil || len(ms) != 0 {
		t.Errorf("the log says %+v still wait (%v), want none", ms, err)
	}
}

// TestWindowReleasesWhenTimeIsUp: with a window of 0 a held message is
// released at the first reading of the queue after it was held, unless
// a repair holds changes back; it reaches the sink once.
func TestWindowReleasesWhenTimeIsUp(t *testing.T) {
	ctx := context.Background()
	sink, st, l := realPostfix(t)
	send(t, st.SMTPAddr, "alice@"+st.Domain, []string{"dana@outside.test"}, "Subject: soon\r\nMessage-Id: <soon@example.test>\r\n\r\nx\r\n")
	paused := true
	q, err := outbound.New(ctx, l, outbound.Options{Delay: 0, Postfix: outbound.Postfix{Config: st.PostfixConfigDir()}, Paused: func() bool { return paused }})
	if err != nil {
		t.Fatal(err)
	}
	waitHeld(t, q, 1)
	if err := q.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if len(q.List()) != 1 || sink.Count("soon@example.test") != 0 {
		t.Fatalf("released while paused: held %+v, sink %d", q.List(), sink.Count("soon@example.test"))
	}
	paused = false
	if err := q.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if len(q.List()) != 0 {
		t.Fatalf("still held after its time was up: %+v", q.List())
	}
	waitArrivals(t, q, sink, "soon@example.test", 1)
}

// TestHeldWhileQmgrParksItInIncoming reproduces what a loaded machine
// does now and then: when qmgr comes to try a deferred message again and
// its queue file is still locked by the delivery agent that deferred it
// (the agent reports before it closes the file), qmgr logs "skipped,
// still being delivered" and puts the message in the incoming queue for
// a minute. Here the test holds the lock. The window holds the message
// there, and a release from there delivers it, once; then Postfix says
// it is no longer queued.
func TestHeldWhileQmgrParksItInIncoming(t *testing.T) {
	ctx := context.Background()
	sink, st, l := realPostfix(t)
	pf := outbound.Postfix{Config: st.PostfixConfigDir()}
	send(t, st.SMTPAddr, "alice@"+st.Domain, []string{"dana@outside.test"}, "Subject: parked\r\nMessage-Id: <parked@example.test>\r\n\r\nx\r\n")
	queueIn := func() (id, queue string) {
		t.Helper()
		es, err := pf.Queue(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(es) != 1 {
			return "", ""
		}
		return es[0].ID, es[0].Queue
	}
	var id, queue string
	for deadline := time.Now().Add(60 * time.Second); queue != "deferred"; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the message never reached the deferred queue (%s %s)", id, queue)
		}
		id, queue = queueIn()
	}
	out, err := exec.Command("postconf", "-c", st.PostfixConfigDir(), "-h", "queue_directory").Output()
	if err != nil {
		t.Fatal(err)
	}
	dir := strings.TrimSpace(string(out))
	// The queue file moves between the deferred and the active queue
	// each time qmgr tries it again; the lock goes with the open file.
	var f *os.File
	for deadline := time.Now().Add(60 * time.Second); f == nil; {
		for _, pat := range []string{"deferred/*/" + id, "deferred/" + id, "active/" + id} {
			paths, _ := filepath.Glob(filepath.Join(dir, pat))
			for _, p := range paths {
				if f, err = os.Open(p); err == nil {
					break
				}
			}
			if f != nil {
				break
			}
		}
		if f == nil && time.Now().After(deadline) {
			t.Fatalf("queue file %s not found under %s", id, dir)
		}
		if f == nil {
			time.Sleep(10 * time.Millisecond)
		}
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_SH); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(60 * time.Second); queue != "incoming"; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("qmgr never put %s in the incoming queue (it is in %q)", id, queue)
		}
		_, queue = queueIn()
	}
	f.Close()
	// qmgr leaves it there for a minute. Sync between two listings that
	// both show it in the incoming queue must hold it.
	q, err := outbound.New(ctx, l, outbound.Options{Delay: time.Hour, Postfix: pf})
	if err != nil {
		t.Fatal(err)
	}
	if err := q.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if _, after := queueIn(); after != "incoming" {
		t.Fatalf("%s left the incoming queue (for %q) before the test could look: qmgr keeps it there a minute", id, after)
	}
	if ms := q.List(); len(ms) != 1 || ms[0].QueueID != id || ms[0].Subject != "parked" {
		t.Fatalf("the window holds %+v while Postfix keeps %s in its incoming queue; want it held", ms, id)
	}
	if in, err := pf.InQueue(ctx, id); !in || err != nil {
		t.Fatalf("InQueue(%s) while queued: %v %v", id, in, err)
	}
	if err := q.Release(ctx, id, "test"); err != nil {
		t.Fatal(err)
	}
	waitArrivals(t, q, sink, "parked@example.test", 1)
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		in, err := pf.InQueue(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if !in {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("InQueue(%s) still true a minute after it reached the sink", id)
		}
	}
}

// waitHeld syncs until the window holds n messages.
func waitHeld(t *testing.T, q *outbound.Queue, n int) []outbound.Message {
	t.Helper()
	for deadline := time.Now().Add(60 * time.Second); ; {
		if err := q.Sync(context.Background()); err != nil {
			t.Fatal(err)
		}
		if ms := q.List(); len(ms) >= n {
			if len(ms) != n {
				t.Fatalf("the window holds %d messages, want %d: %+v", len(ms), n, ms)
			}
			return ms
		}
		if time.Now().After(deadline) {
			t.Fatalf("the window holds %+v, want %d messages", q.List(), n)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitArrivals waits, reading Postfix's queue as the window's loop does
// (a release can find the message active and must be repeated), until
// the sink has the message n times, and checks it has no more.
func waitArrivals(t *testing.T, q *outbound.Queue, sink *mailstacktest.Sink, msgID string, n int) {
	t.Helper()
	for deadline := time.Now().Add(60 * time.Second); sink.Count(msgID) < n; {
		if time.Now().After(deadline) {
			t.Fatalf("%s reached the sink %d times, want %d", msgID, sink.Count(msgID), n)
		}
		time.Sleep(100 * time.Millisecond)
		if err := q.Sync(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if got := sink.Count(msgID); got != n {
		t.Fatalf("%s reached the sink %d times, want %d", msgID, got, n)
	}
}

func send(t *testing.T, addr, from string, to []string, msg string) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c := smtp.NewClient(conn)
	defer c.Close()
	if err := c.SendMail(from, to, strings.NewReader(msg)); err != nil {
		t.Fatalf("send to %v: %v", to, err)
	}
	c.Quit()
}

// dumpOnFailure shows Postfix's queue and log when the test fails.
func dumpOnFailure(t *testing.T, st *mailstack.Stack) {
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		q, err := exec.Command("postqueue", "-c", st.PostfixConfigDir(), "-j").CombinedOutput()
		t.Logf("postqueue -j: %v\n%s", err, q)
		b, _ := os.ReadFile(st.PostfixLog())
		lines := strings.Split(string(b), "\n")
		t.Logf("postfix log:\n%s", strings.Join(lines[max(0, len(lines)-80):], "\n"))
	})
}
