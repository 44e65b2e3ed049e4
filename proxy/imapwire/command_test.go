package imapwire

import (
	"bytes"
	"errors"
	"io"
	"math/rand"
	"strconv"
	"strings"
	"testing"
	"testing/iotest"
)

// rfcMessage is the APPEND example message of RFC 9051 section 6.3.12.
const rfcMessage = "Date: Mon, 7 Feb 1994 21:52:25 -0800 (PST)\r\n" +
	"From: Fred Foobar <foobar@Blurdybloop.example>\r\n" +
	"Subject: afternoon meeting\r\n" +
	"To: mooch@owatagu.siam.edu.example\r\n" +
	"Message-Id: <B27397-0100000@Blurdybloop.example>\r\n" +
	"MIME-Version: 1.0\r\n" +
	"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n" +
	"\r\n" +
	"Hello Joe, do you think we can meet at 3:30 tomorrow?\r\n"

var commandTests = []struct {
	name  string
	input string
	want  []string
}{
	{"login atoms", "a001 LOGIN SMITH SESAME\r\n",
		[]string{"a001 LOGIN: SMITH SESAME"}},
	{"login quoted with escapes", `a002 login "fred" "pa\"ss\\word"` + "\r\n",
		[]string{`a002 LOGIN: "fred" "pa\"ss\\word"`}},
	{"login literals", "a003 LOGIN {4}\r\nfred {6}\r\nsecret\r\n",
		[]string{`a003 LOGIN: {4}"fred" {6}"secret"`}},
	{"select", "A142 SELECT INBOX\r\n",
		[]string{"A142 SELECT: INBOX"}},
	{"select qresync", "A02 SELECT INBOX (QRESYNC (67890007 20050715194045000 41,43:211,214:541))\r\n",
		[]string{"A02 SELECT: INBOX (QRESYNC (#67890007 #20050715194045000 41,43:211,214:541))"}},
	{"uid fetch headers", "A999 UID FETCH 1:* (UID FLAGS BODY.PEEK[HEADER])\r\n",
		[]string{"A999 FETCH uid: 1:* (UID FLAGS BODY.PEEK[HEADER])"}},
	{"fetch header fields partial", "a4 FETCH 1 (BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)]<0.1024>)\r\n",
		[]string{"a4 FETCH: #1 (BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)]<0.1024>)"}},
	{"fetch changedsince", "s100 UID FETCH 300:500 (FLAGS) (CHANGEDSINCE 12345 VANISHED)\r\n",
		[]string{"s100 FETCH uid: 300:500 (FLAGS) (CHANGEDSINCE #12345 VANISHED)"}},
	{"store silent", `A003 STORE 2:4 +FLAGS.SILENT (\Seen)` + "\r\n",
		[]string{`A003 STORE: 2:4 +FLAGS.SILENT (\Seen)`}},
	{"uid store unchangedsince", `a5 UID STORE 1:3 (UNCHANGEDSINCE 320162338) +FLAGS (\Deleted $Junk)` + "\r\n",
		[]string{`a5 STORE uid: 1:3 (UNCHANGEDSINCE #320162338) +FLAGS (\Deleted $Junk)`}},
	{"copy", "A003 COPY 2:4 MEETING\r\n",
		[]string{"A003 COPY: 2:4 MEETING"}},
	{"uid move", "a UID MOVE 42:69 \"Other Folder\"\r\n",
		[]string{`a MOVE uid: 42:69 "Other Folder"`}},
	{"uid expunge", "A202 UID EXPUNGE 3000:3002\r\n",
		[]string{"A202 EXPUNGE uid: 3000:3002"}},
	{"append synchronizing", "A003 APPEND saved-messages (\\Seen) {" + strconv.Itoa(len(rfcMessage)) + "}\r\n" + rfcMessage + "\r\n",
		[]string{`A003 APPEND: saved-messages (\Seen) {` + strconv.Itoa(len(rfcMessage)) + `}"` + strings.ReplaceAll(strings.ReplaceAll(rfcMessage, "\r", `\r`), "\n", `\n`) + `"`}},
	{"append literal+", "A004 APPEND INBOX {5+}\r\nhello\r\n",
		[]string{`A004 APPEND: INBOX {5+}"hello"`}},
	{"append binary", "A005 APPEND INBOX ~{6}\r\nab\x00c\r\n\r\n",
		[]string{`A005 APPEND: INBOX ~{6}"ab\x00c\r\n"`}},
	{"multiappend", "A006 APPEND INBOX (\\Seen) {5+}\r\nfirst (\\Flagged) \"1-Jan-2024 00:00:00 +0000\" {6+}\r\nsecond\r\n",
		[]string{`A006 APPEND: INBOX (\Seen) {5+}"first" (\Flagged) "1-Jan-2024 00:00:00 +0000" {6+}"second"`}},
	{"catenate utf8", "A1 APPEND Drafts UTF8 (~{3+}\r\nabc)\r\n",
		[]string{`A1 APPEND: Drafts UTF8 (~{3+}"abc")`}},
	{"idle done", "a7 IDLE\r\nDONE\r\n",
		[]string{"a7 IDLE:", " DONE:"}},
	{"enable", "t1 ENABLE QRESYNC CONDSTORE\r\n",
		[]string{"t1 ENABLE: QRESYNC CONDSTORE"}},
	{"pipelined", "1 NOOP\r\n2 SELECT INBOX\r\n3 UID FETCH 5 (FLAGS)\r\n4 LOGOUT\r\n",
		[]string{"1 NOOP:", "2 SELECT: INBOX", "3 FETCH uid: #5 (FLAGS)", "4 LOGOUT:"}},
	{"empty literals", "a8 LOGIN {0}\r\n {0+}\r\n\r\n",
		[]string{`a8 LOGIN: {0}"" {0+}""`}},
	{"nil", "a9 SETMETADATA INBOX (/private/comment NIL)\r\n",
		[]string{"a9 SETMETADATA: INBOX (/private/comment NIL)"}},
	{"search literal", "A284 SEARCH CHARSET UTF-8 TEXT {6}\r\nXXXXXX\r\n",
		[]string{`A284 SEARCH: CHARSET UTF-8 TEXT {6}"XXXXXX"`}},
	{"gmail style names", "a LIST \"\" \"[Gmail]/%\"\r\nb SELECT [Gmail]/Sent\r\n",
		[]string{`a LIST: "" "[Gmail]/%"`, "b SELECT: [Gmail]/Sent"}},
	{"brace in quoted string is text", "a1 LOGIN \"x {3}\"\r\nb NOOP\r\n",
		[]string{`a1 LOGIN: "x {3}"`, "b NOOP:"}},
	{"bare LF", "a1 NOOP\nb1 SELECT {5+}\ninbox\n",
		[]string{"a1 NOOP barelf:", `b1 SELECT barelf: {5+}"inbox"`}},
	{"missing command", "a1\r\nb NOOP\r\n",
		[]string{"a1 :", "error: imapwire: syntax error at byte 2: missing command name after tag \"a1\"", "b NOOP:"}},
	{"literal as command name is not a literal", "a1 {3+}\r\nb1 NOOP\r\n",
		[]string{"a1 {3+}:", "error: imapwire: syntax error at byte 3: invalid command name \"{3+}\"", "b1 NOOP:"}},
	{"literal after an empty command name is not a literal", "a1  {3+}\r\nb1 NOOP\r\n",
		[]string{"a1 {3+}:", "error: imapwire: syntax error at byte 4: invalid command name \"{3+}\"", "b1 NOOP:"}},
	{"arguments to NOOP", "a1 NOOP {3+}\r\nabc\r\nb2 NOOP\r\n",
		[]string{`a1 NOOP: {3+}"abc"`, "error: imapwire: syntax error at byte 17: NOOP takes no arguments", "b2 NOOP:"}},
	{"unbalanced list", "a1 STORE 1 FLAGS (\\Seen\r\n",
		[]string{`a1 STORE: #1 FLAGS`, "error: imapwire: syntax error at byte 23: missing ')'"}},
}

func TestCommandReader(t *testing.T) {
	for _, tt := range commandTests {
		t.Run(tt.name, func(t *testing.T) {
			got, out, err := readCommands(strings.NewReader(tt.input), Options{})
			if !errors.Is(err, io.EOF) {
				t.Fatalf("final error = %v, want io.EOF", err)
			}
			got = got[:len(got)-1] // the io.EOF line
			if strings.Join(got, "\n") != strings.Join(tt.want, "\n") {
				t.Fatalf("got:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tt.want, "\n"))
			}
			if string(out) != tt.input {
				t.Fatalf("forwarded %q, want the input %q", out, tt.input)
			}
		})
	}
}

// TestCommandChunking feeds every table input one byte at a time and in
// random chunks; the parse and the forwarded bytes must not change.
func TestCommandChunking(t *testing.T) {
	for _, tt := range commandTests {
		want, wantOut, _ := readCommands(strings.NewReader(tt.input), Options{})
		readers := map[string]io.Reader{
			"one byte": iotest.OneByteReader(strings.NewReader(tt.input)),
			"random":   &chunkReader{data: []byte(tt.input), rnd: rand.New(rand.NewSource(1))},
		}
		for name, r := range readers {
			got, out, _ := readCommands(r, Options{})
			if strings.Join(got, "\n") != strings.Join(want, "\n") {
				t.Fatalf("%s, %s: got:\n%s\nwant:\n%s", tt.name, name, strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
			if !bytes.Equal(out, wantOut) {
				t.Fatalf("%s, %s: forwarded %q, want %q", tt.name, name, out, wantOut)
			}
		}
	}
}

func TestCommandFetchSection(t *testing.T) {
	cmd, err := NewCommandReader(strings.NewReader("a4 FETCH 1 (BODY.PEEK[HEADER.FIELDS (FROM \"Subject\")]<0.1024> BINARY[1.2] BODY[])\r\n"), Options{}).Next(nil)
	if err != nil {
		t.Fatal(err)
	}
	items := cmd.Args[1].List
	s := items[0].Section
	if s == nil || s.Name != "BODY.PEEK" || s.Spec != "HEADER.FIELDS" || strings.Join(s.Fields, ",") != "FROM,Subject" ||
		!s.Partial || s.Offset != 0 || s.Length != 1024 {
		t.Fatalf("section of %s = %+v", items[0].Text, s)
	}
	if s := items[1].Section; s == nil || s.Name != "BINARY" || s.Spec != "1.2" || s.Partial {
		t.Fatalf("section of %s = %+v", items[1].Text, s)
	}
	if s := items[2].Section; s == nil || s.Name != "BODY" || s.Spec != "" {
		t.Fatalf("section of %s = %+v", items[2].Text, s)
	}
}

// TestCommandRefusedLiteral: when the server answers a synchronizing
// literal with a tagged NO, the client does not send it and the next bytes
// are a new command (RFC 9051 section 7.5).
func TestCommandRefusedLiteral(t *testing.T) {
	input := "a1 APPEND INBOX {99999}\r\na2 NOOP\r\n"
	var out bytes.Buffer
	fwd := func(p Part) error {
		if p.Literal != nil {
			return ErrLiteralRefused
		}
		out.Write(p.Raw)
		return nil
	}
	r := NewCommandReader(strings.NewReader(input), Options{})
	cmd, err := r.Next(fwd)
	if err != nil {
		t.Fatal(err)
	}
	if !cmd.Refused || cmd.Name != "APPEND" || len(cmd.Args) != 2 || cmd.Args[1].Kind != LiteralString {
		t.Fatalf("refused command = %s", cmd.summary())
	}
	cmd, err = r.Next(fwd)
	if err != nil || cmd.Tag != "a2" || cmd.Name != "NOOP" {
		t.Fatalf("next command = %v, %v; want a2 NOOP", cmd, err)
	}
	if out.String() != input {
		t.Fatalf("forwarded %q, want %q", out.String(), input)
	}
}

// TestCommandNonSyncCannotBeRefused: the client sends a {n+} literal
// without waiting, so refusing it would lose track of the stream.
func TestCommandNonSyncCannotBeRefused(t *testing.T) {
	r := NewCommandReader(strings.NewReader("a1 APPEND INBOX {3+}\r\nabc\r\n"), Options{})
	_, err := r.Next(func(p Part) error {
		if p.Literal != nil {
			return ErrLiteralRefused
		}
		return nil
	})
	if !errors.Is(err, ErrLiteralRefused) {
		t.Fatalf("err = %v, want one wrapping ErrLiteralRefused", err)
	}
	if _, err2 := r.Next(nil); err2 != err {
		t.Fatalf("after a final error Next returned %v, want the same error", err2)
	}
}

func TestCommandAmbiguousSyntaxError(t *testing.T) {
	r := NewCommandReader(strings.NewReader("a1 NOOP {3+}\r\nabc\r\nb SELECT x {2}\r\nab)\r\n"), Options{})
	_, err := r.Next(nil)
	var se *SyntaxError
	if !errors.As(err, &se) || !se.Ambiguous {
		t.Fatalf("err = %#v, want an ambiguous *SyntaxError", err)
	}
	_, err = r.Next(nil)
	if !errors.As(err, &se) || se.Ambiguous {
		t.Fatalf("err = %#v, want an unambiguous *SyntaxError for a synchronizing literal", err)
	}
}

func TestCommandLimits(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		opts    Options
		check   func(error) bool
		forward string
	}{
		{"line too long", "a1 NOOP\r\na2 LOGIN " + strings.Repeat("x", 100) + "\r\n", Options{MaxLine: 64},
			func(err error) bool {
				var e *LineTooLongError
				return errors.As(err, &e) && e.Offset == 9 && e.Max == 64
			}, "a1 NOOP\r\n"},
		{"line too long across literals", "a1 LOGIN {40+}\r\n" + strings.Repeat("x", 40) + " " + strings.Repeat("y", 60) + "\r\n", Options{MaxLine: 64},
			func(err error) bool { var e *LineTooLongError; return errors.As(err, &e) && e.Offset == 0 },
			"a1 LOGIN {40+}\r\n" + strings.Repeat("x", 40)},
		{"literal too large", "a1 APPEND INBOX {1025}\r\n", Options{MaxLiteral: 1024},
			func(err error) bool {
				var e *LiteralTooLargeError
				return errors.As(err, &e) && e.Size == 1025 && e.Max == 1024 && e.Offset == 16
			}, ""},
		{"literal size overflow", "a1 APPEND INBOX {99999999999999999999}\r\n", Options{},
			func(err error) bool { var e *LiteralTooLargeError; return errors.As(err, &e) && e.Size == -1 }, ""},
		{"eof inside line", "a1 NOOP\r\na2 NO", Options{},
			func(err error) bool { return errors.Is(err, io.ErrUnexpectedEOF) }, "a1 NOOP\r\n"},
		{"eof inside literal", "a1 APPEND INBOX {10+}\r\nabc", Options{},
			func(err error) bool { return errors.Is(err, io.ErrUnexpectedEOF) }, "a1 APPEND INBOX {10+}\r\nabc"},
	}
	for _, tt := range tests {
		got, out, err := readCommands(strings.NewReader(tt.input), tt.opts)
		if !tt.check(err) {
			t.Fatalf("%s: final error %v (%#v) is not the one expected; transcript %q", tt.name, err, err, got)
		}
		if string(out) != tt.forward {
			t.Fatalf("%s: forwarded %q, want %q", tt.name, out, tt.forward)
		}
	}
}

func TestCommandCaptureBudget(t *testing.T) {
	input := "a APPEND INBOX {6+}\r\nfirst. {7+}\r\nsecond. {5+}\r\nthird\r\n"
	cmd, err := NewCommandReader(strings.NewReader(input), Options{MaxInlineLiteral: 12}).Next(nil)
	if err != nil {
		t.Fatal(err)
	}
	var captured []string
	for _, l := range cmd.Literals {
		if l.Data != nil {
			captured = append(captured, string(l.Data))
		}
	}
	if strings.Join(captured, "|") != "first.|third" {
		t.Fatalf("captured %q, want the literals that fit in 12 bytes: first. and third", captured)
	}
}

func TestCommandDepth(t *testing.T) {
	nested := "a1 X " + strings.Repeat("(", 10) + strings.Repeat(")", 10) + "\r\n"
	for _, tt := range []struct {
		max     int
		wantErr bool
	}{{9, true}, {10, false}} {
		_, err := NewCommandReader(strings.NewReader(nested), Options{MaxDepth: tt.max}).Next(nil)
		var se *SyntaxError
		if errors.As(err, &se) != tt.wantErr {
			t.Fatalf("MaxDepth %d: err = %v, want syntax error: %v", tt.max, err, tt.wantErr)
		}
	}
}
