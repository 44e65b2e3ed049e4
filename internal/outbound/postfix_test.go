package outbound

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// TestPostfixExecPrefix: with Exec, the tools run through the prefix (as
// with [sudo, -n]); here env, which runs the real postconf.
func TestPostfixExecPrefix(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "main.cf"), []byte("defer_transports = smtp, relay\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "master.cf"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, exec := range [][]string{nil, {"env"}, {"env", "LANG=C"}} {
		got, err := Postfix{Config: dir, Exec: exec}.DeferTransports(context.Background())
		if err != nil || got != "smtp, relay" {
			t.Errorf("defer_transports through %v: %q %v; want \"smtp, relay\"", exec, got, err)
		}
	}
	if _, err := (Postfix{Config: dir, Exec: []string{"false"}}).DeferTransports(context.Background()); err == nil {
		t.Errorf("a prefix that fails: no error")
	}
}

// TestQueueListing reads postqueue -j lines: only deferred recipients
// whose transport is deferred are held.
func TestQueueListing(t *testing.T) {
	out := `{"queue_name": "deferred", "queue_id": "C7BEED4DC1", "arrival_time": 1796300650, "message_size": 274, "forced_expire": false, "sender": "alice@example.test", "recipients": [{"address": "dana@outside.test", "delay_reason": "deferred transport"}, {"address": "eve@far.test", "delay_reason": "connect to far.test: Connection refused"}, {"address": "fay@outside.test", "delay_reason": "delivery temporarily suspended: deferred transport"}]}
{"queue_name": "active", "queue_id": "D1", "arrival_time": 1796300651, "sender": "", "recipients": [{"address": "x@outside.test"}]}
`
	var calls [][]string
	pf := Postfix{Config: "/etc/pf", Run: func(_ context.Context, name string, args ...string) ([]byte, []byte, error) {
		calls = append(calls, append([]string{name}, args...))
		return []byte(out), nil, nil
	}}
	es, err := pf.Queue(context.Background())
	if err != nil || len(es) != 2 {
		t.Fatalf("queue: %+v %v", es, err)
	}
	if !reflect.DeepEqual(calls[0], []string{"postqueue", "-c", "/etc/pf", "-j"}) {
		t.Errorf("ran %v", calls[0])
	}
	if h := es[0].Held(); !reflect.DeepEqual(h, []string{"dana@outside.test", "fay@outside.test"}) {
		t.Errorf("held recipients of %s: %v", es[0].ID, h)
	}
	if h := es[1].Held(); h != nil {
		t.Errorf("an active message is held: %v", h)
	}
}

// TestHeaderParsing takes the topmost Undomail-Id and the first Subject
// and Message-Id from postcat -h.
func TestHeaderParsing(t *testing.T) {
	out := "*** HEADER EXTRACTED test ***\nReceived: from x\n\tby y\nUndomail-Id: 01NEW\nundomail-id: 01OLD\nSubject: Hello there\nMessage-Id: <m@x>\n"
	pf := Postfix{Run: func(context.Context, string, ...string) ([]byte, []byte, error) { return []byte(out), nil, nil }}
	h, err := pf.Header(context.Background(), "ABC")
	if err != nil || h != (Header{UndoID: "01NEW", Subject: "Hello there", MessageID: "<m@x>"}) {
		t.Fatalf("header: %+v %v", h, err)
	}
}

// fakePostfix is a queue for Sync: postqueue -j lists entries; postcat
// finds every message, or with gone set those not in it; postsuper
// deletes, after missing the first deleteMisses times.
type fakePostfix struct {
	entries      string
	gone         map[string]bool
	deleteMisses int
	calls        []string
}

func (f *fakePostfix) run(_ context.Context, name string, args ...string) ([]byte, []byte, error) {
	f.calls = append(f.calls, name+" "+strings.Join(args, " "))
	id := args[len(args)-1]
	switch name {
	case "postqueue":
		if args[0] == "-j" {
			return []byte(f.entries), nil, nil
		}
		return nil, nil, nil
	case "postcat":
		if f.gone[id] {
			return nil, []byte("postcat: fatal: open queue file " + id + ": No such file or directory\n"), errors.New("exit status 1")
		}
		return []byte("Subject: hi\n"), nil, nil
	case "postsuper":
		if f.deleteMisses > 0 || f.gone[id] {
			f.deleteMisses--
			return nil, nil, nil
		}
		if f.gone == nil {
			f.gone = map[string]bool{}
		}
		f.gone[id] = true
		return nil, []byte("postsuper: " + id + ": removed\npostsuper: Deleted: 1 message\n"), nil
	}
	return nil, nil, nil
}

// count is how many times the fake ran a command line.
func (f *fakePostfix) count(cmd string) int {
	n := 0
	for _, c := range f.calls {
		if c == cmd {
			n++
		}
	}
	return n
}

// deferredEntry is a postqueue -j line: a message in queue whose
// recipient waits with reason, arrived now.
func deferredEntry(queue, id, reason string) string {
	return fmt.Sprintf(`{"queue_name": %q, "queue_id": %q, "arrival_time": %d, "sender": "a@example.test", "recipients": [{"address": "d@outside.test", "delay_reason": %q}]}`+"\n",
		queue, id, time.Now().Unix(), reason)
}

// kinds returns the kinds of the window's records in the log, in order.
func kinds(t *testing.T, l *undolog.Log) []string {
	t.Helper()
	recs, err := l.Records(context.Background(), undolog.Filter{Kinds: []string{verb.KindOutboundHeld, verb.KindOutboundReleased, verb.KindOutboundCancelled}})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, r := range recs {
		out = append(out, r.Kind)
	}
	return out
}

// TestParkedInIncomingIsHeld: a message qmgr put back in the incoming
// queue because its queue file was still locked by the delivery agent
// that deferred it ("skipped, still being delivered") keeps its delay
// reason and is held there; a message just arrived in the incoming
// queue (no delay reason yet) and one in the active queue are not.
func TestParkedInIncomingIsHeld(t *testing.T) {
	ctx := context.Background()
	l, err := undolog.Open(t.TempDir(), undolog.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	f := &fakePostfix{entries: deferredEntry("incoming", "P1", "deferred transport") + deferredEntry("incoming", "N1", "") +
		deferredEntry("active", "A1", "deferred transport")}
	q, err := New(ctx, l, Options{Delay: time.Hour, Postfix: Postfix{Run: f.run}})
	if err != nil {
		t.Fatal(err)
	}
	if err := q.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if ms := q.List(); len(ms) != 1 || ms[0].QueueID != "P1" || !reflect.DeepEqual(ms[0].Rcpts, []string{"d@outside.test"}) {
		t.Fatalf("the window holds %+v; want P1 alone, for d@outside.test", ms)
	}
	// Released when its time is up, from the incoming queue too.
	q.o.Delay = 0
	q.held["P1"].ReleaseAt = time.Now().Add(-time.Second)
	if err := q.Sync(ctx); err != nil || len(q.List()) != 0 || f.count("postqueue -i P1") != 1 {
		t.Fatalf("after its time: %v, held %+v, %d releases", err, q.List(), f.count("postqueue -i P1"))
	}
}

// TestMissingButQueuedStaysHeld: a held message that two listings in a
// row do not show (qmgr moved it between two queue directories while
// showq read them, each time) but that postcat still finds in Postfix's
// queue stays held, with nothing logged; once postcat does not find it
// either, it is logged as released by Postfix.
func TestMissingButQueuedStaysHeld(t *testing.T) {
	ctx := context.Background()
	l, err := undolog.Open(t.TempDir(), undolog.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	listed := deferredEntry("deferred", "M1", "deferred transport")
	f := &fakePostfix{entries: listed}
	q, err := New(ctx, l, Options{Delay: time.Hour, Postfix: Postfix{Run: f.run}})
	if err != nil {
		t.Fatal(err)
	}
	if err := q.Sync(ctx); err != nil || len(q.List()) != 1 {
		t.Fatalf("first sync: %v, held %+v", err, q.List())
	}
	f.entries = ""
	for i := 0; i < 4; i++ {
		if err := q.Sync(ctx); err != nil || len(q.List()) != 1 {
			t.Fatalf("listing %d without M1, still queued: %v, held %+v; want it held", i+1, err, q.List())
		}
	}
	if got := kinds(t, l); !reflect.DeepEqual(got, []string{verb.KindOutboundHeld}) {
		t.Fatalf("log: %v; want the held record alone", got)
	}
	if f.count("postcat -h -q M1") < 2 {
		t.Fatalf("Postfix was not asked whether M1 is queued: %v", f.calls)
	}
	// Listed again: held as before, not held anew.
	f.entries = listed
	if err := q.Sync(ctx); err != nil || len(q.List()) != 1 || len(kinds(t, l)) != 1 {
		t.Fatalf("listed again: %v, held %+v, log %v", err, q.List(), kinds(t, l))
	}
	// It left.
	f.entries, f.gone = "", map[string]bool{"M1": true}
	for i := 0; i < 2; i++ {
		if err := q.Sync(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if got := kinds(t, l); len(q.List()) != 0 || !reflect.DeepEqual(got, []string{verb.KindOutboundHeld, verb.KindOutboundReleased}) {
		t.Fatalf("after M1 left: held %+v, log %v; want it released by Postfix", q.List(), got)
	}
	// An error of postcat is no answer: the message stays held.
	f.entries, f.gone = deferredEntry("deferred", "M2", "deferred transport"), nil
	if err := q.Sync(ctx); err != nil || len(q.List()) != 1 {
		t.Fatalf("M2: %v %+v", err, q.List())
	}
	bad := Postfix{Run: func(ctx context.Context, name string, args ...string) ([]byte, []byte, error) {
		if name == "postcat" {
			return nil, []byte("postcat: fatal: chdir /var/spool/postfix: Permission denied\n"), errors.New("exit status 1")
		}
		return f.run(ctx, name, args...)
	}}
	q.o.Postfix, f.entries = bad, ""
	for i := 0; i < 2; i++ {
		q.Sync(ctx)
	}
	if err := q.Sync(ctx); err == nil || len(q.List()) != 1 {
		t.Fatalf("postcat failing: %v, held %+v; want an error and M2 held", err, q.List())
	}
}

// TestCancelRetriesAMissedDelete: postsuper -d can miss a message qmgr
// moves between queue directories meanwhile; when Postfix still has it,
// cancel asks again and logs it cancelled, not released. One postsuper
// keeps missing is an error, and the message stays held; one that has
// left is ErrGone, logged as released by Postfix.
func TestCancelRetriesAMissedDelete(t *testing.T) {
	ctx := context.Background()
	l, err := undolog.Open(t.TempDir(), undolog.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	f := &fakePostfix{entries: deferredEntry("deferred", "C1", "deferred transport") + deferredEntry("deferred", "C2", "deferred transport") +
		deferredEntry("deferred", "C3", "deferred transport")}
	q, err := New(ctx, l, Options{Delay: time.Hour, Postfix: Postfix{Run: f.run}})
	if err != nil {
		t.Fatal(err)
	}
	if err := q.Sync(ctx); err != nil || len(q.List()) != 3 {
		t.Fatalf("sync: %v, held %+v", err, q.List())
	}
	f.deleteMisses = 1
	if err := q.Cancel(ctx, "C1", "test"); err != nil {
		t.Fatalf("cancel C1, missed once: %v", err)
	}
	if f.count("postsuper -d C1") != 2 {
		t.Fatalf("postsuper ran %d times for C1, want 2", f.count("postsuper -d C1"))
	}
	f.deleteMisses = deleteTries
	if err := q.Cancel(ctx, "C2", "test"); err == nil || errors.Is(err, ErrGone) {
		t.Fatalf("cancel C2, missed every time while queued: %v; want an error other than ErrGone", err)
	}
	f.deleteMisses = 0
	f.gone = map[string]bool{"C3": true}
	if err := q.Cancel(ctx, "C3", "test"); !errors.Is(err, ErrGone) {
		t.Fatalf("cancel C3, gone: %v; want ErrGone", err)
	}
	if ms := q.List(); len(ms) != 1 || ms[0].QueueID != "C2" {
		t.Fatalf("the window holds %+v; want C2 alone", ms)
	}
	want := []string{verb.KindOutboundHeld, verb.KindOutboundHeld, verb.KindOutboundHeld, verb.KindOutboundCancelled, verb.KindOutboundReleased}
	if got := kinds(t, l); !reflect.DeepEqual(got, want) {
		t.Fatalf("log: %v; want %v", got, want)
	}
}

// TestReleasedDeferredAgainIsReleasedAgain: a released message that is
// deferred by defer_transports again (Postfix retried it after a failed
// attempt, or the release found it active, where postqueue -i does
// nothing) is released again at the next reading, also by a restarted
// window that knows it only from the log; a held message is not.
func TestReleasedDeferredAgainIsReleasedAgain(t *testing.T) {
	ctx := context.Background()
	l, err := undolog.Open(t.TempDir(), undolog.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	// Arrived now: its hour in the window has just begun.
	f := &fakePostfix{entries: fmt.Sprintf(`{"queue_name": "deferred", "queue_id": "R1", "arrival_time": %d, "sender": "a@example.test", "recipients": [{"address": "d@outside.test", "delay_reason": "deferred transport"}]}`+"\n", time.Now().Unix())}
	q, err := New(ctx, l, Options{Delay: time.Hour, Postfix: Postfix{Run: f.run}})
	if err != nil {
		t.Fatal(err)
	}
	releases := func() int {
		n := 0
		for _, c := range f.calls {
			if c == "postqueue -i R1" {
				n++
			}
		}
		return n
	}
	if err := q.Sync(ctx); err != nil || len(q.List()) != 1 || releases() != 0 {
		t.Fatalf("first sync: %v, held %+v, %d releases; want R1 held, not released", err, q.List(), releases())
	}
	if err := q.Sync(ctx); err != nil || releases() != 0 {
		t.Fatalf("a held message was released before its time: %v %d", err, releases())
	}
	if err := q.Release(ctx, "R1", ""); err != nil || releases() != 1 {
		t.Fatalf("release: %v, %d releases", err, releases())
	}
	if err := q.Sync(ctx); err != nil || releases() != 2 || len(q.List()) != 0 {
		t.Fatalf("sync after the release, R1 deferred again: %v, %d releases, held %+v; want it released again", err, releases(), q.List())
	}
	q2, err := New(ctx, l, Options{Delay: time.Hour, Postfix: Postfix{Run: f.run}})
	if err != nil {
		t.Fatal(err)
	}
	if err := q2.Sync(ctx); err != nil || releases() != 3 || len(q2.List()) != 0 {
		t.Fatalf("restarted: %v, %d releases, held %+v; want R1 released again, not held anew", err, releases(), q2.List())
	}
	// Gone from the queue: nothing more.
	f.entries = ""
	if err := q2.Sync(ctx); err != nil || releases() != 3 {
		t.Fatalf("after R1 left: %v, %d releases", err, releases())
	}
}
