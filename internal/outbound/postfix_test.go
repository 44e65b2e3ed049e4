package outbound

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"testing"
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
	out := `{"queue_name": "deferred", "queue_id": "C7BEED4DC1", "arrival_time": 1796300650, "message_size": 274, "forced_expire": false, "sender": "alice@example.test", "recipients": [{"address": "dana@outside.test", "delay_reason": "deferred transport"}, {"address": "eve@far.test", "delay_reason": "connect to far.test: Connection refused"}]}
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
	if h := es[0].Held(); !reflect.DeepEqual(h, []string{"dana@outside.test"}) {
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
