package imapwire

import (
	"strings"
	"testing"
)

func TestValueAString(t *testing.T) {
	cmd, err := NewCommandReader(strings.NewReader("a SETMETADATA {5}\r\nINBOX (/a nil \"q\" 12 (x) {3}\r\nabc)\r\n"),
		Options{MaxInlineLiteral: 5}).Next(nil)
	if err != nil {
		t.Fatal(err)
	}
	list := cmd.Args[1].List
	vals := append([]Value{cmd.Args[0]}, list...)
	want := []struct {
		s  string
		ok bool
	}{{"INBOX", true}, {"/a", true}, {"", true}, {"q", true}, {"12", true}, {"", false}, {"", false}}
	for i, w := range want {
		s, ok := vals[i].AString()
		if s != w.s || ok != w.ok || vals[i].String() != w.s {
			t.Fatalf("value %d (%s): AString() = %q, %v; want %q, %v", i, vals[i].Kind, s, ok, w.s, w.ok)
		}
	}
	if !list[1].Is("NIL") || list[1].Kind != Nil || list[0].Is("NIL") {
		t.Fatalf("Is(NIL) wrong for %+v and %+v", list[1], list[0])
	}
}
