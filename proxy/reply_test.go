package proxy

import (
	"bufio"
	"bytes"
	"testing"

	"github.com/undomail/undomail/internal/smtpclient"
	"github.com/undomail/undomail/verb"
)

func TestReplyFromText(t *testing.T) {
	for _, tc := range []struct {
		code int
		msg  string
		want verb.Reply
	}{
		{250, "2.0.0 Ok: queued as 4F1", verb.Reply{Code: 250, Enhanced: "2.0.0", Text: "Ok: queued as 4F1"}},
		{250, "Ok", verb.Reply{Code: 250, Enhanced: "", Text: "Ok"}},
		{250, "2.0.0 first\n2.0.0 second", verb.Reply{Code: 250, Enhanced: "2.0.0", Text: "first\nsecond"}},
		{250, "5.0.0 class does not match the code", verb.Reply{Code: 250, Enhanced: "", Text: "5.0.0 class does not match the code"}},
		{250, "2.0 not enhanced", verb.Reply{Code: 250, Enhanced: "", Text: "2.0 not enhanced"}},
		{250, "", verb.Reply{Code: 250, Enhanced: "", Text: ""}},
	} {
		if got := replyFromText(tc.code, tc.msg); got != tc.want {
			t.Errorf("replyFromText(%d, %q) = %+v, want %+v", tc.code, tc.msg, got, tc.want)
		}
	}
}

func TestReplyWire(t *testing.T) {
	// A reply without an enhanced code is given without one, not with a
	// made-up X.0.0; a multi-line one repeats its code on every line.
	if got := string(replyWire(verb.Reply{Code: 554, Text: "no"})); got != "554 no\r\n" {
		t.Fatalf("wire = %q", got)
	}
	r := verb.Reply{Code: 550, Enhanced: "5.1.1", Text: "line1\nline2"}
	if got := string(replyWire(r)); got != "550-5.1.1 line1\r\n550 5.1.1 line2\r\n" {
		t.Fatalf("wire = %q", got)
	}
	code, lines, err := smtpclient.ReadReply(bufio.NewReader(bytes.NewReader(replyWire(r))))
	if err != nil || replyFromLines(code, lines) != r {
		t.Fatalf("round trip = %+v %v", replyFromLines(code, lines), err)
	}
}

func TestHeaderSniffer(t *testing.T) {
	var h headerSniffer
	msg := "Undomail-Id: 01OLD\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nFrom: a@b\r\nMessage-Id:  <x@y>\r\n\r\nbody\r\nSubject: not a header\r\n"
	for i := 0; i < len(msg); i += 7 { // arrives in pieces
		h.Write([]byte(msg[i:min(i+7, len(msg))]))
	}
	info := h.info()
	if info.Subject != "Grüße" || info.MessageID != "<x@y>" || info.From != "a@b" || len(info.PriorIDs) != 1 || info.PriorIDs[0] != "01OLD" {
		t.Fatalf("info = %+v", info)
	}
}

// FuzzHeaderSniffer feeds arbitrary client message bytes to the header
// summary: it must never panic whatever the client sends.
func FuzzHeaderSniffer(f *testing.F) {
	f.Add([]byte("Subject: x\r\n\r\nbody"))
	f.Add([]byte("=?utf-8?b?broken\r\n\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		var h headerSniffer
		h.Write(b)
		h.info()
	})
}

// TestWithoutTiming: Dovecot's timing leaves a completion text, nothing
// else does.
func TestWithoutTiming(t *testing.T) {
	for in, want := range map[string]string{
		"Store completed (0.002 + 0.000 + 0.001 secs).": "Store completed.",
		"Select completed (0.001 + 0.000 secs).":        "Select completed.",
		"Copy completed (0.010 secs).":                  "Copy completed.",
		"Move completed.":                               "Move completed.",
		"Mailbox doesn't exist: Folder (0.001 secs)":    "Mailbox doesn't exist: Folder (0.001 secs)",
		"took (1 + 2 secs).":                            "took (1 + 2 secs).",
		"":                                              "",
	} {
		if got := withoutTiming(in); got != want {
			t.Errorf("withoutTiming(%q) = %q, want %q", in, got, want)
		}
	}
}
