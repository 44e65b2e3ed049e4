package outbound

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/undomail/undomail/undolog"
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

// fakePostfix is a queue of one deferred message for Sync.
type fakePostfix struct {
	entries string
	calls   []string
}

func (f *fakePostfix) run(_ context.Context, name string, args ...string) ([]byte, []byte, error) {
	f.calls = append(f.calls, name+" "+strings.Join(args, " "))
	switch name {
	case "postqueue":
		if args[0] == "-j" {
			return []byte(f.entries), nil, nil
		}
		return nil, nil, nil
	case "postcat":
		return []byte("Subject: hi\n"), nil, nil
	case "postsuper":
		return nil, []byte("postsuper: Deleted: 1 message\n"), nil
	}
	return nil, nil, nil
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
