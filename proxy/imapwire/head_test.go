package imapwire

import (
	"strings"
	"testing"
)

func TestParseHead(t *testing.T) {
	long := strings.Repeat("t", 300)
	for _, c := range []struct {
		line string
		want Head
		bad  bool
	}{
		{line: "a1 NOOP\r\n", want: Head{Tag: "a1", Name: "NOOP"}},
		{line: "a1 uid store 1 +FLAGS (\\Seen)\r\n", want: Head{Tag: "a1", Name: "STORE", UID: true}},
		{line: long + " CREATE Other\r\n", want: Head{Tag: long, Name: "CREATE"}},
		{line: "x APPEND INBOX {5}\r\n", want: Head{Tag: "x", Name: "APPEND"}},
		{line: "x X-CANCEL\n", want: Head{Tag: "x", Name: "X-CANCEL"}},
		{line: "x5\tCREATE V5\r\n", bad: true},
		{line: "x  CREATE V5\r\n", bad: true},
		{line: "x+ CREATE V5\r\n", bad: true},
		{line: "a/b CREATE V5\r\n", bad: true},
		{line: "a] CREATE V5\r\n", bad: true},
		{line: "\xffa CREATE V5\r\n", bad: true},
		{line: "a\x7f CREATE V5\r\n", bad: true},
		{line: "DONE\r\n", bad: true},
		{line: "a UID\r\n", bad: true},
		{line: "a {5}\r\n", bad: true},
		{line: "a CRE\"ATE x\r\n", bad: true},
	} {
		h, err := ParseHead([]byte(c.line))
		if (err != nil) != c.bad {
			t.Errorf("ParseHead(%.40q): error %v, want bad=%v", c.line, err, c.bad)
			continue
		}
		if !c.bad && h != c.want {
			t.Errorf("ParseHead(%.40q) = %+v, want %+v", c.line, h, c.want)
		}
	}
}

// FuzzParseHead: ParseHead never panics, and whatever it accepts has a
// tag and a command name made only of the characters it allows.
func FuzzParseHead(f *testing.F) {
	for _, s := range []string{"a NOOP\r\n", "a UID FETCH 1 (FLAGS)\r\n", "x5\tCREATE V5\r\n", strings.Repeat("t", 200) + " STORE 1 +FLAGS (\\Seen)\r\n"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		h, err := ParseHead(line)
		if err != nil {
			return
		}
		if !strictTag([]byte(h.Tag)) || h.Name == "" || strings.ContainsAny(h.Name, " \t\r\n{}()\"") {
			t.Fatalf("accepted %q as %+v", line, h)
		}
	})
}
