package imapwire

import (
	"bytes"
	"errors"
	"io"
	"math/rand"
	"strings"
	"testing"
	"testing/iotest"
)

const header42 = "From: a@example.com\r\nSubject: hi there\r\n\r\n"

var responseTests = []struct {
	name  string
	input string
	want  []string
}{
	{"dovecot greeting",
		"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n",
		[]string{`untagged  OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] "Dovecot ready.":`}},
	{"select",
		"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n" +
			"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags permitted.\r\n" +
			"* 172 EXISTS\r\n" +
			"* 1 RECENT\r\n" +
			"* OK [UNSEEN 12] First unseen.\r\n" +
			"* OK [UIDVALIDITY 3857529045] UIDs valid\r\n" +
			"* OK [UIDNEXT 4392] Predicted next UID\r\n" +
			"* OK [HIGHESTMODSEQ 715194045007] Highest\r\n" +
			"A142 OK [READ-WRITE] Select completed (0.001 + 0.000 secs).\r\n",
		[]string{
			`untagged  FLAGS: (\Answered \Flagged \Deleted \Seen \Draft)`,
			`untagged  OK [PERMANENTFLAGS (\Answered \Flagged \Deleted \Seen \Draft \*)] "Flags permitted.":`,
			"untagged  #172 EXISTS:",
			"untagged  #1 RECENT:",
			`untagged  OK [UNSEEN #12] "First unseen.":`,
			`untagged  OK [UIDVALIDITY #3857529045] "UIDs valid":`,
			`untagged  OK [UIDNEXT #4392] "Predicted next UID":`,
			`untagged  OK [HIGHESTMODSEQ #715194045007] "Highest":`,
			`tagged A142 OK [READ-WRITE] "Select completed (0.001 + 0.000 secs).":`,
		}},
	{"uid fetch headers",
		"* 12 FETCH (UID 4827 FLAGS (\\Seen $Forwarded) MODSEQ (65402) BODY[HEADER] {42}\r\n" + header42 + ")\r\n" +
			"* 13 FETCH (UID 4828 FLAGS () BODY[HEADER] \"\")\r\n" +
			"A999 OK Fetch completed (0.002 + 0.000 + 0.001 secs).\r\n",
		[]string{
			`untagged  #12 FETCH: (UID #4827 FLAGS (\Seen $Forwarded) MODSEQ (#65402) BODY[HEADER] {42}"From: a@example.com\r\nSubject: hi there\r\n\r\n") | uid=4827 modseq=65402 flags=[\Seen $Forwarded] BODY[HEADER]=42`,
			`untagged  #13 FETCH: (UID #4828 FLAGS () BODY[HEADER] "") | uid=4828 modseq=0 flags=[] BODY[HEADER]=0`,
			`tagged A999 OK "Fetch completed (0.002 + 0.000 + 0.001 secs).":`,
		}},
	{"fetch header fields and partial",
		"* 1 FETCH (BODY[HEADER.FIELDS (FROM SUBJECT)] {42}\r\n" + header42 + " BODY[]<0> {3}\r\nabc UID 7)\r\n",
		[]string{`untagged  #1 FETCH: (BODY[HEADER.FIELDS (FROM SUBJECT)] {42}"From: a@example.com\r\nSubject: hi there\r\n\r\n" BODY[]<0> {3}"abc" UID #7) | uid=7 modseq=0 BODY[HEADER.FIELDS (FROM SUBJECT)]=42 BODY[]<0>=3`}},
	{"fetch binary and nil",
		"* 2 FETCH (UID 10 BINARY[1] ~{4}\r\nab\x00d BODY[2] NIL RFC822.SIZE 44)\r\n",
		[]string{`untagged  #2 FETCH: (UID #10 BINARY[1] ~{4}"ab\x00d" BODY[2] NIL RFC822.SIZE #44) | uid=10 modseq=0 BINARY[1]=4 BODY[2]=0nil`}},
	{"fetch envelope with escapes",
		`* 3 FETCH (ENVELOPE ("Mon, 7 Feb 1994 21:52:25 -0800" "say \"hi\" \\o/" (("Fred" NIL "foobar" "example")) NIL NIL NIL NIL NIL NIL "<x@y>"))` + "\r\n",
		[]string{`untagged  #3 FETCH: (ENVELOPE ("Mon, 7 Feb 1994 21:52:25 -0800" "say \"hi\" \\o/" (("Fred" NIL "foobar" "example")) NIL NIL NIL NIL NIL NIL "<x@y>")) | uid=0 modseq=0`}},
	{"expunge and exists", "* 3 EXPUNGE\r\n* 0 EXISTS\r\n",
		[]string{"untagged  #3 EXPUNGE:", "untagged  #0 EXISTS:"}},
	{"vanished", "* VANISHED (EARLIER) 41,43:116\r\n",
		[]string{"untagged  VANISHED: (EARLIER) 41,43:116"}},
	{"esearch",
		"* ESEARCH (TAG \"A282\") MIN 2 COUNT 3\r\n* ESEARCH (TAG \"A283\") UID ALL 4:19,21,28\r\nA283 OK done\r\n",
		[]string{`untagged  ESEARCH: (TAG "A282") MIN #2 COUNT #3`, `untagged  ESEARCH: (TAG "A283") UID ALL 4:19,21,28`, `tagged A283 OK "done":`}},
	{"appenduid", "A003 OK [APPENDUID 38505 3955] APPEND completed\r\n",
		[]string{`tagged A003 OK [APPENDUID #38505 #3955] "APPEND completed":`}},
	{"copy with copyuid", "A004 OK [COPYUID 38505 304,319:320 3956:3958] Done\r\n",
		[]string{`tagged A004 OK [COPYUID #38505 304,319:320 3956:3958] "Done":`}},
	{"move",
		"* OK [COPYUID 432432 42:69 1202:1229]\r\n* 22 EXPUNGE\r\n* 22 EXPUNGE\r\na OK Move completed\r\n",
		[]string{`untagged  OK [COPYUID #432432 42:69 1202:1229]:`, "untagged  #22 EXPUNGE:", "untagged  #22 EXPUNGE:", `tagged a OK "Move completed":`}},
	{"continuations", "+ Ready for literal data\r\n+ idling\r\n+ OK\r\n+\r\n+ dGVzdA==\r\n",
		[]string{`continuation   "Ready for literal data":`, `continuation   "idling":`, `continuation   "OK":`, "continuation  :", `continuation   "dGVzdA==":`}},
	{"failures", "* BYE Logging out\r\na NO [UNAVAILABLE] Temporary failure\r\nb BAD Error in IMAP command: Unknown command\r\n",
		[]string{`untagged  BYE "Logging out":`, `tagged a NO [UNAVAILABLE] "Temporary failure":`, `tagged b BAD "Error in IMAP command: Unknown command":`}},
	{"enabled", "* ENABLED QRESYNC CONDSTORE\r\nt1 OK Enabled.\r\n",
		[]string{"untagged  ENABLED: QRESYNC CONDSTORE", `tagged t1 OK "Enabled.":`}},
	{"brace in status text is not a literal", "a1 NO Mailbox doesn't exist: x {3}\r\n* NO weird {3}\r\n+ go {3}\r\n* 1 EXISTS\r\n",
		[]string{`tagged a1 NO "Mailbox doesn't exist: x {3}":`, `untagged  NO "weird {3}":`, `continuation   "go {3}":`, "untagged  #1 EXISTS:"}},
	{"list with literal mailbox", "* LIST (\\HasNoChildren) \"/\" {3}\r\nfoo\r\n* STATUS blurdybloop (MESSAGES 231 UIDNEXT 44292)\r\n",
		[]string{`untagged  LIST: (\HasNoChildren) "/" {3}"foo"`, `untagged  STATUS: blurdybloop (MESSAGES #231 UIDNEXT #44292)`}},
	{"id and namespace", "* ID (\"name\" \"Dovecot\" \"version\" NIL)\r\n* NAMESPACE ((\"\" \"/\")) NIL NIL\r\n",
		[]string{`untagged  ID: ("name" "Dovecot" "version" NIL)`, `untagged  NAMESPACE: (("" "/")) NIL NIL`}},
	{"free text code", "* NO [BADCHARSET] x\r\n* OK [ALERT] System shutdown in 10 minutes\r\n* OK [XWEIRD a (b] text\r\n",
		[]string{`untagged  NO [BADCHARSET] "x":`, `untagged  OK [ALERT] "System shutdown in 10 minutes":`, `untagged  OK [XWEIRD text="a (b"] "text":`}},
	{"search", "* SEARCH 2 84 882\r\n* SEARCH\r\n",
		[]string{"untagged  SEARCH: #2 #84 #882", "untagged  SEARCH:"}},
	{"bad fetch", "* 1 FETCH UID 3\r\n* 2 EXISTS\r\n",
		[]string{"untagged  #1 FETCH: UID #3", "error: imapwire: syntax error at byte 15: FETCH response data is not one parenthesized list", "untagged  #2 EXISTS:"}},
}

func TestResponseReader(t *testing.T) {
	for _, tt := range responseTests {
		t.Run(tt.name, func(t *testing.T) {
			got, out, err := readResponses(strings.NewReader(tt.input), Options{})
			if !errors.Is(err, io.EOF) {
				t.Fatalf("final error = %v, want io.EOF", err)
			}
			got = got[:len(got)-1]
			if strings.Join(got, "\n") != strings.Join(tt.want, "\n") {
				t.Fatalf("got:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tt.want, "\n"))
			}
			if string(out) != tt.input {
				t.Fatalf("forwarded %q, want the input %q", out, tt.input)
			}
		})
	}
}

func TestResponseChunking(t *testing.T) {
	for _, tt := range responseTests {
		want, wantOut, _ := readResponses(strings.NewReader(tt.input), Options{})
		readers := map[string]io.Reader{
			"one byte": iotest.OneByteReader(strings.NewReader(tt.input)),
			"random":   &chunkReader{data: []byte(tt.input), rnd: rand.New(rand.NewSource(2))},
		}
		for name, r := range readers {
			got, out, _ := readResponses(r, Options{})
			if strings.Join(got, "\n") != strings.Join(want, "\n") {
				t.Fatalf("%s, %s: got:\n%s\nwant:\n%s", tt.name, name, strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
			if !bytes.Equal(out, wantOut) {
				t.Fatalf("%s, %s: forwarded %q, want %q", tt.name, name, out, wantOut)
			}
		}
	}
}

// TestResponseLargeBodyNotCaptured: a body section bigger than the capture
// limit is reported with its size but its content is only streamed.
func TestResponseLargeBodyNotCaptured(t *testing.T) {
	body := strings.Repeat("x", 100)
	input := "* 1 FETCH (UID 9 BODY[] {100}\r\n" + body + ")\r\n"
	var out bytes.Buffer
	resp, err := NewResponseReader(strings.NewReader(input), Options{MaxInlineLiteral: 99}).Next(copier(&out))
	if err != nil {
		t.Fatal(err)
	}
	s := resp.Fetch.Sections
	if len(s) != 1 || s[0].Name != "BODY[]" || s[0].Size != 100 || s[0].Literal.Data != nil {
		t.Fatalf("sections = %+v, want BODY[] of 100 bytes not captured", s)
	}
	if out.String() != input {
		t.Fatalf("forwarded %q, want %q", out.String(), input)
	}
}

func TestResponseIsStatus(t *testing.T) {
	for input, want := range map[string]bool{
		"* OK hi\r\n": true, "* PREAUTH hi\r\n": true, "a NO x\r\n": true,
		"* 1 EXISTS\r\n": false, "+ go\r\n": false, "* CAPABILITY IMAP4rev2\r\n": false,
	} {
		resp, err := NewResponseReader(strings.NewReader(input), Options{}).Next(nil)
		if err != nil {
			t.Fatalf("%q: %v", input, err)
		}
		if resp.IsStatus() != want {
			t.Fatalf("%q: IsStatus() = %v, want %v", input, resp.IsStatus(), want)
		}
	}
}
