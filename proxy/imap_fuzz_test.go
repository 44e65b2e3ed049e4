package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"

	"github.com/undomail/undomail/internal/mailstack"
	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/proxy/imapwire"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// FuzzIMAPDifferential sends the same IMAP session (the fuzz input, the
// bytes a client sends after login) to Dovecot directly as one user and
// through undomail as another, both reset to the same mail first, and
// holds undomail's answers and undo log against Dovecot's direct answers
// (issue #14, "What it must show"):
//
//  1. every command's tagged answer has the same status through undomail
//     as from Dovecot directly, except the proxy's own refusals ("BAD
//     undomail: ..."): of a command Dovecot ran, only for a reason
//     docs/imap-refusals.md lists; of one Dovecot rejected (NO or BAD),
//     for any reason, as nothing changed on either side;
//  2. every mutating command the client saw answered (not refused by the
//     proxy) has exactly one intent in the log, of its kind, in order,
//     with the status Dovecot gave it directly: a change Dovecot made has
//     an OK record, a command it rejected has no OK record; and each
//     record of a command on the selected mailbox names the mailbox
//     Dovecot had selected;
//  3. when nothing was refused on purpose, both users end with the same
//     mail: mailboxes, subscriptions, and per mailbox each message's UID,
//     body (hash) and flags, read from Dovecot directly.
//
// An input that leaves a literal open, or that makes either side hang or
// end the connection, is not comparable and checks nothing. As a regular
// test (`go test ./proxy -run FuzzIMAPDifferential`) it runs the seeds
// below and testdata/fuzz/FuzzIMAPDifferential: sessions as Thunderbird,
// mbsync and Python's imaplib send them, and the hostile shapes of issue
// #14. Fuzzing: go test ./proxy -run '^$' -fuzz FuzzIMAPDifferential
// -parallel 1 (each fuzz worker starts a mail stack of its own).
func FuzzIMAPDifferential(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add([]byte(s))
	}
	if flagSet("test.fuzz") && !flagSet("test.fuzzworker") {
		// The fuzzing engine's coordinator runs no input itself: only
		// its workers need a mail stack.
		f.Fuzz(func(t *testing.T, session []byte) { t.Fatal("the coordinator ran an input") })
		return
	}
	d := startDifferential(f)
	f.Fuzz(func(t *testing.T, session []byte) {
		began := time.Now()
		what := d.check(t, session)
		d.trace(began, what)
	})
}

// The users: Dovecot's answers to the direct one are the truth the
// proxied one is held against.
const (
	diffDirect  = "alice"
	diffProxied = "bob"
	// diffEndA and diffEndB follow every input: A may end an IDLE the
	// input left open, B's answer says the session was read whole.
	diffEndA = "zzfuzzA"
	diffEndB = "zzfuzzB"
	// diffMaxInput bounds an input: longer ones are not run.
	diffMaxInput = 16 << 10
)

type differential struct {
	tb   *testbed.Testbed
	logs *syncBuffer
	// wait bounds each session: short while fuzzing (an input that makes
	// a side hang only costs time), generous for the seed run, where
	// every input must come out comparable.
	wait    time.Duration
	fuzzing bool
}

// startDifferential starts one testbed for the whole fuzz target. It does
// what testbedtest.Start does, with a logger of its own: testing.F's Log
// may not be called while the fuzz function runs, and undomail logs from
// its own goroutines then.
func startDifferential(f *testing.F) *differential {
	f.Helper()
	if os.Geteuid() != 0 {
		f.Fatalf("the mail stack needs root (Postfix cannot run unprivileged); run the tests as root")
	}
	if missing := mailstack.Missing(); len(missing) > 0 {
		f.Fatalf("missing Debian packages; install them with: apt-get install --no-install-recommends %s", strings.Join(missing, " "))
	}
	logs := &syncBuffer{}
	logger := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	tb, err := testbed.Start(ctx, testbed.Options{Dir: filepath.Join(f.TempDir(), "tb"), Logger: logger})
	if err != nil {
		f.Fatalf("start testbed: %v\n%s", err, logs.tail(8<<10))
	}
	f.Cleanup(func() {
		if err := tb.Stop(); err != nil {
			f.Errorf("stop testbed: %v", err)
		}
	})
	d := &differential{tb: tb, logs: logs, wait: 60 * time.Second}
	if flagSet("test.fuzz") {
		d.fuzzing, d.wait = true, 5*time.Second
	}
	return d
}

// flagSet reports whether the testing flag name is set (not empty, not
// false).
func flagSet(name string) bool {
	fl := flag.Lookup(name)
	return fl != nil && fl.Value.String() != "" && fl.Value.String() != "false"
}

// syncBuffer collects undomail's log lines of the current input, for the
// failure message.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.buf.Len() > 1<<20 {
		b.buf.Reset()
	}
	return b.buf.Write(p)
}

func (b *syncBuffer) reset() {
	b.mu.Lock()
	b.buf.Reset()
	b.mu.Unlock()
}

func (b *syncBuffer) tail(n int) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.buf.String()
	if len(s) > n {
		s = "..." + s[len(s)-n:]
	}
	return s
}

// trace appends a line per input to the file FUZZ_IMAP_TRACE names, if
// set: how long each took and what came of it, to measure a fuzzing run.
func (d *differential) trace(began time.Time, what string) {
	name := os.Getenv("FUZZ_IMAP_TRACE")
	if name == "" {
		return
	}
	f, err := os.OpenFile(name, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return
	}
	fmt.Fprintf(f, "%s %d %.3fs %s\n", began.UTC().Format(time.RFC3339), os.Getpid(), time.Since(began).Seconds(), what)
	f.Close()
}

// check runs one input and says what came of it.
func (d *differential) check(t *testing.T, session []byte) string {
	if len(session) > diffMaxInput {
		return "too long"
	}
	input := append([]byte(nil), session...)
	if len(input) > 0 && input[len(input)-1] != '\n' {
		input = append(input, '\r', '\n')
	}
	input = append(input, diffEndA+" NOOP\r\n"+diffEndB+" NOOP\r\n"...)
	cmds, ok := parseSession(input)
	if !ok {
		// The end markers would be read as part of a literal or a
		// broken line: the input leaves a literal open.
		d.notComparable(t, "the input leaves a literal or a line open")
		return "not comparable: open literal"
	}
	// A hang anywhere (no read or write here is unbounded, but the
	// fuzzing engine has no timeout of its own): crash the worker with
	// every goroutine's stack, so the engine keeps the input.
	watchdog := time.AfterFunc(4*d.wait+time.Minute, func() {
		buf := make([]byte, 4<<20)
		buf = buf[:runtime.Stack(buf, true)]
		panic(fmt.Sprintf("FuzzIMAPDifferential: input %q hung:\n%s\nundomail's log:\n%s", session, buf, d.logs.tail(8<<10)))
	})
	defer watchdog.Stop()
	d.reset(t)
	d.logs.reset()
	start, _ := d.tb.Daemon.Log.Last()

	var direct, proxied sessionLog
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		direct = runSession(d.tb.Stack.IMAPAddr, diffDirect, d.tb.Stack.Password(diffDirect), input, d.wait)
	}()
	go func() {
		defer wg.Done()
		proxied = runSession(d.tb.IMAPAddr(), diffProxied, d.tb.Stack.Password(diffProxied), input, d.wait)
	}()
	wg.Wait()
	if direct.setup != nil || proxied.setup != nil {
		t.Fatalf("session setup failed: direct: %v; through undomail: %v\n%s", direct.setup, proxied.setup, d.logs.tail(4<<10))
	}
	closed := direct.closed && proxied.closed
	if !closed && (!direct.done || !proxied.done) {
		why := fmt.Sprintf("direct: %v; through undomail: %v", direct.end, proxied.end)
		d.notComparable(t, why)
		return "not comparable: " + why
	}
	records := d.records(t, start)
	r := compareSessions(input, cmds, &direct, &proxied, records)
	if closed {
		// What each server read before it closed depends on timing:
		// the proxy holds a mutating command back while it logs it.
		r.diverged = true
	}
	mail := "not compared (the sessions diverged)"
	if len(r.failures) == 0 && !r.diverged {
		r.failures = append(r.failures, d.compareMail(t)...)
		mail = "the same"
	}
	if len(r.failures) > 0 {
		t.Fatalf("input %q:\n%s\n\ncommands and answers (direct | through undomail):\n%s\nrecords:\n%s\nundomail's log:\n%s",
			session, strings.Join(r.failures, "\n"), r.trace, describeRecords(t, records), d.logs.tail(6<<10))
	}
	t.Logf("%d commands, %d records; mail %s", len(cmds), len(records), mail)
	if testing.Verbose() {
		t.Logf("commands and answers (direct | through undomail):\n%s\nrecords:\n%s", r.trace, describeRecords(t, records))
	}
	return fmt.Sprintf("compared: %d commands, %d records, mail %s", len(cmds), len(records), mail)
}

func (d *differential) notComparable(t *testing.T, why string) {
	if !d.fuzzing {
		// The seeds are chosen to be comparable: one that is not checks
		// nothing and must not pass as if it did.
		t.Fatalf("not comparable: %s\n%s", why, d.logs.tail(4<<10))
	}
}

// sessionCmd is one command of the input, as a client-side reader sees
// it: literals taken whole, whatever the server makes of them.
type sessionCmd struct {
	tag, name string
	uid       bool
	headErr   error // imapwire.ParseHead refused its first line
	literals  int
	mailbox   string // first argument as an astring (SELECT, ...)
}

// parseSession splits input into commands. It reports false unless the
// last two are the end markers, whole.
func parseSession(input []byte) ([]sessionCmd, bool) {
	cr := imapwire.NewCommandReader(bytes.NewReader(input), imapwire.Options{})
	var out []sessionCmd
	for {
		var first []byte
		cmd, err := cr.Next(func(p imapwire.Part) error {
			if first == nil && p.Raw != nil {
				first = append([]byte{}, p.Raw...)
			}
			return nil
		})
		var se *imapwire.SyntaxError
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil && !errors.As(err, &se) {
			return out, false
		}
		c := sessionCmd{literals: len(cmd.Literals)}
		h, herr := imapwire.ParseHead(first)
		c.tag, c.name, c.uid, c.headErr = h.Tag, h.Name, h.UID, herr
		if cmd.Name == "DONE" && cmd.Tag == "" {
			c.tag, c.name, c.headErr = "", "DONE", nil
		}
		if len(cmd.Args) > 0 {
			c.mailbox, _ = cmd.Args[0].AString()
		}
		out = append(out, c)
	}
	n := len(out)
	return out, n >= 2 && out[n-2].tag == diffEndA && out[n-2].name == "NOOP" &&
		out[n-1].tag == diffEndB && out[n-1].name == "NOOP" && out[n-1].literals == 0
}

// answer is a tagged response's status and text.
type answer struct{ status, text string }

func (a *answer) String() string {
	if a == nil {
		return "-"
	}
	s := a.status + " " + a.text
	if len(s) > 90 {
		s = s[:90] + "..."
	}
	return s
}

// refusal reports an answer of the proxy's own ("undomail:").
func (a *answer) refusal() bool {
	return a != nil && strings.Contains(a.text, "undomail:")
}

// dupRefusal reports the proxy's refusal of a tag in use.
func (a *answer) dupRefusal() bool {
	return a.refusal() && strings.Contains(a.text, "is already used by a command in progress")
}

// sessionLog is what a session's server answered.
type sessionLog struct {
	tagged   map[string][]answer
	untagged []string // "* BAD" and "* BYE" lines
	done     bool     // diffEndB was answered
	// closed: the server said BYE (not the proxy's own) and closed the
	// connection, as Dovecot does when another session renames or
	// deletes the selected mailbox.
	closed bool
	end    error // why the sessionLog ended otherwise
	setup  error // the greeting or the login failed
}

// answer returns the k-th tagged answer for tag, nil if none came.
func (tr *sessionLog) answer(tag string, k int) *answer {
	if as := tr.tagged[tag]; k < len(as) {
		return &as[k]
	}
	return nil
}

var literalAtEnd = regexp.MustCompile(`~?\{([0-9]+)\}\r?\n$`)

// runSession logs in as user at addr, sends input, and reads the answers
// until diffEndB's, the end of the connection or the deadline.
func runSession(addr, user, pass string, input []byte, wait time.Duration) sessionLog {
	tr := sessionLog{tagged: map[string][]answer{}}
	conn, err := net.DialTimeout("tcp", addr, wait)
	if err != nil {
		tr.setup = err
		return tr
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(wait))
	br := bufio.NewReader(conn)
	if l, err := readResponse(br); err != nil || !strings.HasPrefix(l, "* OK") {
		tr.setup = fmt.Errorf("greeting from %s: %q %v", addr, l, err)
		return tr
	}
	fmt.Fprintf(conn, "zzL LOGIN %s %s\r\n", user, pass)
	for {
		l, err := readResponse(br)
		if err != nil {
			tr.setup = fmt.Errorf("login at %s: %v", addr, err)
			return tr
		}
		if strings.HasPrefix(l, "zzL ") {
			if !strings.HasPrefix(l, "zzL OK") {
				tr.setup = fmt.Errorf("login at %s: %q", addr, l)
				return tr
			}
			break
		}
	}
	// The server may answer before it has read everything: write
	// beside reading, so neither side's buffers can stall the other.
	go conn.Write(input)
	for {
		l, err := readResponse(br)
		if err != nil {
			tr.end = err
			for _, u := range tr.untagged {
				if strings.HasPrefix(u, "* BYE") && !strings.Contains(u, "undomail:") && errors.Is(err, io.EOF) {
					tr.closed = true
				}
			}
			return tr
		}
		tag, rest, _ := strings.Cut(l, " ")
		switch tag {
		case "*":
			if strings.HasPrefix(rest, "BAD") || strings.HasPrefix(rest, "BYE") {
				tr.untagged = append(tr.untagged, l)
			}
			continue
		case "+", "":
			continue
		}
		status, text, _ := strings.Cut(rest, " ")
		status = strings.ToUpper(status)
		if status != "OK" && status != "NO" && status != "BAD" {
			continue
		}
		a := answer{status, text}
		if n := len(tr.tagged[tag]); n > 0 && tr.tagged[tag][n-1].dupRefusal() && !a.dupRefusal() {
			// The proxy refuses a reused tag at once, while the
			// command that holds it is still running: that one's
			// answer comes after the refusal of the later one.
			i := n
			for i > 0 && tr.tagged[tag][i-1].dupRefusal() {
				i--
			}
			tr.tagged[tag] = slices.Insert(tr.tagged[tag], i, a)
		} else {
			tr.tagged[tag] = append(tr.tagged[tag], a)
		}
		if tag == diffEndB {
			tr.done = true
			return tr
		}
	}
}

// readResponse reads one response: a line, and the literals it carries
// with the lines that continue it. It returns the first line without its
// line end.
func readResponse(br *bufio.Reader) (string, error) {
	first := ""
	for i := 0; ; i++ {
		l, err := br.ReadString('\n')
		if err != nil {
			return first, err
		}
		if i == 0 {
			first = strings.TrimRight(l, "\r\n")
		}
		m := literalAtEnd.FindStringSubmatch(l)
		if m == nil {
			return first, nil
		}
		n, err := strconv.ParseInt(m[1], 10, 64)
		if err != nil || n > 64<<20 {
			return first, fmt.Errorf("literal of %s bytes in a response", m[1])
		}
		if _, err := io.CopyN(io.Discard, br, n); err != nil {
			return first, err
		}
	}
}

// mutatingKinds maps the commands that change mail to the kind of record
// undomail logs for them (proxy/imapverbs.go, docs/architecture.md).
var mutatingKinds = map[string]string{
	"APPEND": verb.KindIMAPAppend, "STORE": verb.KindIMAPStore, "COPY": verb.KindIMAPCopy,
	"MOVE": verb.KindIMAPMove, "EXPUNGE": verb.KindIMAPExpunge, "CLOSE": verb.KindIMAPExpunge,
	"CREATE": verb.KindIMAPCreate, "DELETE": verb.KindIMAPDelete, "RENAME": verb.KindIMAPRename,
	"SUBSCRIBE": verb.KindIMAPSubscribe, "UNSUBSCRIBE": verb.KindIMAPUnsubscribe,
	"SETMETADATA": verb.KindIMAPSetMetadata,
}

// documentedRefusals are the texts of the refusals docs/imap-refusals.md
// lists: a command so refused may get another answer than from Dovecot.
var documentedRefusals = []string{
	"undomail: Error in IMAP command: ", // a tag or command name the proxy cannot read as Dovecot does
	// A mutating command the proxy's grammar rejects. The docs give
	// Dovecot's answer as BAD; Dovecot's reader is laxer and runs some
	// (`c CREATE "a"x`, a literal followed by other than SP).
	"undomail: Error in IMAP command ",
	"undomail: Unknown command ",                         // a name the proxy does not know
	"is already used by a command in progress",           // duplicate tag in flight
	"is not available through undomail",                  // COMPRESS, ACLs, quota, URLAUTH, X-STATE, REPLACE
	"undomail: APPEND of several messages (MULTIAPPEND)", // RFC 3502
	"undomail: APPEND with CATENATE",                     // RFC 4469
	"[INUSE] undomail:",                                  // another change of the user's in progress
	"[UNAVAILABLE] undomail:",                            // paused for a snapshot, or the log is unavailable
	"[TOOBIG] undomail:", "[LIMIT] undomail:",            // literal over the proxy's limit
}

// knownBugs lets a long fuzzing run go past proxy bugs already found
// and kept in testdata/fuzz/FuzzIMAPDifferential: FUZZ_IMAP_KNOWN lists
// them, comma-separated. Unset (as in CI) every difference fails.
//
//	select-bad: after a SELECT or EXAMINE that Dovecot answers BAD from
//	its tokenizer (`b SELECT "Archive` without the closing quote),
//	Dovecot keeps the mailbox selected before; the proxy believes
//	none is, and refuses STORE, COPY, MOVE and EXPUNGE that Dovecot
//	would run (testdata: select-bad-keeps-selection).
var knownBugs = func() map[string]bool {
	out := map[string]bool{}
	for _, k := range strings.Split(os.Getenv("FUZZ_IMAP_KNOWN"), ",") {
		if k != "" {
			out[k] = true
		}
	}
	return out
}()

func documented(a *answer) bool {
	for _, s := range documentedRefusals {
		if strings.Contains(a.text, s) {
			return true
		}
	}
	return false
}

// comparison is the outcome of compareSessions.
type comparison struct {
	failures []string
	// diverged: from some command on, the two users' mail may differ (a
	// command ran on one side only, or the two servers read different
	// bytes as commands), so only the proxy's own consistency is checked.
	diverged bool
	trace    string
}

// mailboxCommands are the commands whose record names the selected mailbox.
var mailboxCommands = map[string]bool{"STORE": true, "COPY": true, "MOVE": true, "EXPUNGE": true}

// compareSessions applies checks 1 and 2 (see FuzzIMAPDifferential).
func compareSessions(input []byte, cmds []sessionCmd, direct, proxied *sessionLog, records []undolog.Verb) comparison {
	var r comparison
	var trace strings.Builder
	fail := func(format string, args ...any) { r.failures = append(r.failures, fmt.Sprintf(format, args...)) }
	// Answers to tags beyond the input's commands: a server read bytes
	// as commands that the client-side reader took otherwise (after a
	// literal header Dovecot found broken, it may read the rest of an
	// APPEND line as a command; a refused literal's bytes are read as
	// commands). Then answers cannot be paired across the two sides.
	occAll := map[string]int{}
	for _, c := range cmds {
		occAll[c.tag]++
	}
	extra := func(tr *sessionLog) map[string][]answer {
		out := map[string][]answer{}
		for tag, as := range tr.tagged {
			if len(as) > occAll[tag] {
				out[tag] = as
			}
		}
		return out
	}
	directExtra, proxiedExtra := extra(direct), extra(proxied)
	// A tag used twice: the proxy answers its refusals at once, so
	// answers to a reused tag may come in another order than the
	// commands (a refusal of the second before the first's completion).
	dupTags := map[string]bool{}
	for tag, n := range occAll {
		if tag != "" && n > 1 {
			dupTags[tag] = true
		}
	}
	diverged := len(directExtra) > 0 || len(proxiedExtra) > 0 || len(dupTags) > 0
	// The mailbox Dovecot had selected, as its direct answers tell;
	// selKnown is false after a SELECT it answered BAD.
	selected, selKnown := "", true
	type expected struct {
		i     int
		kind  string
		d, p  *answer
		sel   string
		selOK bool
	}
	var want []expected
	occ := map[string]int{}
	for i, c := range cmds {
		k := occ[c.tag]
		occ[c.tag]++
		var d, p *answer
		if c.tag != "" {
			d, p = direct.answer(c.tag, k), proxied.answer(c.tag, k)
		}
		mark := ""
		if diverged {
			mark = " (diverged)"
		}
		fmt.Fprintf(&trace, "%3d %.60q %s%s | %s | %s\n", i, c.tag, c.name, mark, d, p)
		if c.headErr != nil {
			// The proxy refuses a line ParseHead cannot read with an
			// untagged BAD; Dovecot usually answers BAD too.
			if (d != nil && d.status != "BAD") || c.literals > 0 {
				diverged = true
			}
			continue
		}
		if p.refusal() {
			// A command Dovecot rejected too (NO or BAD) changed nothing
			// on either side, whatever the proxy's reason; one Dovecot
			// ran may only be refused for a reason the docs list.
			knownBug := !selKnown && strings.Contains(p.text, "needs a selected mailbox") && knownBugs["select-bad"]
			switch {
			case !diverged && d != nil && d.status == "OK" && !documented(p) && !knownBug:
				fail("%.40s %s: Dovecot answered %s, undomail refused it in a way docs/imap-refusals.md does not list: %s", c.tag, c.name, d, p)
			case d == nil || d.status == "OK" || c.literals > 0:
				diverged = true
			}
			continue
		}
		if !diverged {
			switch {
			case (d == nil) != (p == nil) && (direct.closed || proxied.closed):
				// Each server closed after a command of its own
				// choosing: the proxy holds mutating ones back.
				diverged = true
			case (d == nil) != (p == nil):
				fail("%.40s %s: answered directly %s, through undomail %s", c.tag, c.name, d, p)
				diverged = true
			case d != nil && d.status != p.status:
				fail("%.40s %s: Dovecot answered %s, through undomail %s", c.tag, c.name, d, p)
				diverged = true
			}
		}
		if kind, ok := mutatingKinds[c.name]; ok && (p != nil || proxied.closed) {
			// Unanswered in a closed session, it may have been logged
			// and forwarded before the server closed: then its record
			// has no outcome.
			want = append(want, expected{i: i, kind: kind, d: d, p: p, sel: selected, selOK: selKnown && !diverged})
		}
		if diverged || d == nil {
			continue
		}
		switch c.name {
		case "SELECT", "EXAMINE":
			switch d.status {
			case "OK":
				selected, selKnown = normalizeBox(c.mailbox), true
			case "NO":
				selected, selKnown = "", true
			default:
				selKnown = false
			}
		case "CLOSE", "UNSELECT":
			if d.status == "OK" {
				selected, selKnown = "", true
			}
		}
	}
	// Answers to tags the input's commands do not account for: the two
	// servers read some bytes differently than the client-side reader.
	for _, side := range []struct {
		name string
		log  *sessionLog
	}{{"direct", direct}, {"through undomail", proxied}} {
		for tag, as := range side.log.tagged {
			if len(as) > occ[tag] {
				fmt.Fprintf(&trace, "    answers %s to tag %.40q beyond the input's %d commands: %v\n", side.name, tag, occ[tag], as)
			}
		}
	}
	for tag, as := range direct.tagged {
		if len(as) > occ[tag] && len(proxied.tagged[tag]) != len(as) {
			diverged = true
		}
	}
	for _, u := range direct.untagged {
		fmt.Fprintf(&trace, "    direct: %.100s\n", u)
	}
	for _, u := range proxied.untagged {
		fmt.Fprintf(&trace, "    through undomail: %.100s\n", u)
	}
	r.trace, r.diverged = trace.String(), diverged

	// Check 2: one record per mutating command answered through undomail.
	if len(proxiedExtra) > 0 || len(dupTags) > 0 {
		// Answers cannot be paired with commands by tag: the proxied
		// session ran commands the client-side reader did not see as
		// such (found in the input by their tag at a line's start), or
		// a tag was reused. Hold the records against the kinds of all
		// mutating commands answered but not refused, in any order; of
		// a tag's commands, the first ones count as the answered ones
		// (the proxy refuses a reused tag's later commands).
		kinds := map[string]int{}
		for _, w := range want {
			tag := cmds[w.i].tag
			if w.p != nil && !dupTags[tag] && proxiedExtra[tag] == nil {
				kinds[w.kind]++
			}
		}
		for tag := range occAll {
			if !dupTags[tag] && proxiedExtra[tag] == nil {
				continue
			}
			var names []string
			if proxiedExtra[tag] != nil {
				answered := 0
				for _, a := range proxied.tagged[tag] {
					if !a.refusal() {
						answered++
					}
				}
				names = hiddenCommands(input, tag)
				names = names[:min(answered, len(names))]
			} else {
				for _, c := range cmds {
					if c.tag == tag && c.headErr == nil {
						names = append(names, c.name)
					}
				}
				names = unrefused(names, proxied.tagged[tag])
			}
			for _, name := range names {
				if kind, ok := mutatingKinds[name]; ok {
					kinds[kind]++
				}
			}
		}
		logged := map[string]int{}
		for _, v := range records {
			if v.Outcome != nil || !proxied.closed {
				logged[v.Kind]++
			}
		}
		for _, kind := range mutatingKinds {
			if kinds[kind] != logged[kind] {
				fail("%d records of %s, %d mutating commands of that kind answered through undomail", logged[kind], kind, kinds[kind])
			}
		}
		return r
	}
	var matched []expected
	var recs []undolog.Verb
	j := 0
	for _, w := range want {
		if w.p == nil {
			if j < len(records) && records[j].Kind == w.kind && records[j].Outcome == nil {
				j++
			}
			continue
		}
		if j < len(records) {
			matched = append(matched, w)
			recs = append(recs, records[j])
		}
		j++
	}
	if j != len(records) {
		var ws []string
		for _, w := range want {
			ws = append(ws, fmt.Sprintf("#%d %s (%s)", w.i, w.kind, w.p))
		}
		fail("%d mutating commands were answered through undomail, %d records logged; commands: %s", len(want), len(records), strings.Join(ws, ", "))
		return r
	}
	for k, w := range matched {
		v := recs[k]
		c := cmds[w.i]
		if v.Kind != w.kind {
			fail("record %d is %s, command #%d %s is %s", v.Seq, v.Kind, w.i, c.name, w.kind)
			continue
		}
		a, err := recordArgs(v)
		if err != nil {
			fail("record %d: %v", v.Seq, err)
			continue
		}
		if name := map[bool]string{true: "UID ", false: ""}[c.uid] + c.name; a.Command != name {
			fail("record %d names command %q, the client sent %q", v.Seq, a.Command, name)
		}
		o, err := recordOutcome(v)
		switch {
		case err != nil:
			fail("record %d (command #%d %s): %v", v.Seq, w.i, c.name, err)
			continue
		case o.Status != w.p.status:
			fail("record %d (command #%d %s) logged %s, the client was answered %s", v.Seq, w.i, c.name, o.Status, w.p)
		case w.d != nil && w.selOK && o.Status != w.d.status:
			fail("record %d (command #%d %s) logged %s, Dovecot answered it %s directly", v.Seq, w.i, c.name, o.Status, w.d)
		}
		if mailboxCommands[c.name] && w.selOK && w.sel != "" && a.Mailbox != w.sel {
			fail("record %d (command #%d %s) names mailbox %q, Dovecot had %q selected", v.Seq, w.i, c.name, a.Mailbox, w.sel)
		}
	}
	return r
}

// unrefused takes from names (the commands of one tag, in order) those
// the proxy refused, as its refusals among answers tell: by the command
// they name, or else (a reused tag, a change in progress) the last ones.
// Refusals of lines the proxy could not read (ParseHead) are not among
// names.
func unrefused(names []string, answers []answer) []string {
	names = slices.Clone(names)
	for _, a := range answers {
		if !a.refusal() || strings.Contains(a.text, "undomail: Error in IMAP command: ") {
			continue
		}
		_, rest, _ := strings.Cut(a.text, "undomail: ")
		name := ""
		for _, prefix := range []string{"Unknown command ", "Error in IMAP command ", ""} {
			if after, ok := strings.CutPrefix(rest, prefix); ok {
				name, _, _ = strings.Cut(after, " ")
				name = strings.TrimSuffix(name, ":")
				break
			}
		}
		if i := slices.Index(names, name); i >= 0 {
			names = slices.Delete(names, i, i+1)
		} else if len(names) > 0 {
			names = names[:len(names)-1]
		}
	}
	return names
}

// hiddenCommands returns the names of the commands that start with tag
// at the input's start or after a CR or LF, in order: where a server
// may read a command, the client-side reader's or not.
func hiddenCommands(input []byte, tag string) []string {
	var out []string
	for i := 0; i < len(input); i++ {
		if (i == 0 || input[i-1] == '\r' || input[i-1] == '\n') && bytes.HasPrefix(input[i:], []byte(tag+" ")) {
			line := input[i:]
			if j := bytes.IndexAny(line, "\r\n"); j >= 0 {
				line = line[:j]
			}
			if h, err := imapwire.ParseHead(line); err == nil {
				out = append(out, h.Name)
			}
		}
	}
	return out
}

func normalizeBox(name string) string {
	if strings.EqualFold(name, "INBOX") {
		return "INBOX"
	}
	return name
}

// records returns the proxied user's intents logged after seq, but for
// FETCH's externalization records.
func (d *differential) records(t *testing.T, after int64) []undolog.Verb {
	t.Helper()
	vs, err := d.tb.Daemon.Log.Verbs(context.Background(), undolog.Filter{User: diffProxied, AfterSeq: after})
	if err != nil {
		t.Fatalf("read the undo log: %v", err)
	}
	var out []undolog.Verb
	sessions := map[string]bool{}
	for _, v := range vs {
		if v.Kind == verb.KindIMAPFetch {
			continue
		}
		sessions[v.Session] = true
		out = append(out, v)
	}
	if len(sessions) > 1 {
		t.Fatalf("records of %d sessions after the reset, want those of one: %s", len(sessions), describeRecords(t, out))
	}
	return out
}

func recordArgs(v undolog.Verb) (verb.IMAPArgs, error) {
	var a verb.IMAPArgs
	err := json.Unmarshal(v.Args, &a)
	return a, err
}

func recordOutcome(v undolog.Verb) (verb.IMAPOutcome, error) {
	var o verb.IMAPOutcome
	if v.Outcome == nil {
		return o, errors.New("no outcome logged, though the client was answered")
	}
	err := json.Unmarshal(v.Outcome.Outcome, &o)
	return o, err
}

func describeRecords(t *testing.T, vs []undolog.Verb) string {
	var b strings.Builder
	for _, v := range vs {
		a, _ := recordArgs(v)
		st := "(no outcome)"
		if o, err := recordOutcome(v); err == nil {
			st = o.Summary()
		}
		fmt.Fprintf(&b, "  %d %s %s | %s\n", v.Seq, v.Kind, a.Summary(), st)
	}
	return b.String()
}

// diffMessages are what each user holds before a session: INBOX with
// three messages, Archive with three (UIDs 1 to 3: it is created afresh
// each time, while INBOX's UIDs only grow), Work empty.
var diffMessages = []struct {
	mailbox string
	flags   []imap.Flag
	subject string
}{
	{"INBOX", nil, "first"},
	{"INBOX", []imap.Flag{imap.FlagSeen}, "second"},
	{"INBOX", []imap.Flag{imap.FlagFlagged, "$Label1"}, "third"},
	{"Archive", nil, "archived one"},
	{"Archive", []imap.Flag{imap.FlagSeen}, "archived two"},
	{"Archive", []imap.Flag{imap.FlagDeleted, "Work"}, "archived three"},
}

var diffDate = time.Date(2026, 12, 1, 9, 30, 0, 0, time.UTC)

// reset gives both users the same mail, straight on Dovecot (nothing is
// logged): every mailbox but INBOX deleted, nothing subscribed, INBOX
// emptied with the same next UID, then diffMessages appended.
func (d *differential) reset(t *testing.T) {
	t.Helper()
	users := []string{diffDirect, diffProxied}
	next := map[string]uint32{}
	for _, u := range users {
		c := d.dial(t, u)
		boxes, err := c.List("", "*", nil).Collect()
		if err != nil {
			t.Fatalf("reset %s: list: %v", u, err)
		}
		// Children before parents.
		slices.SortFunc(boxes, func(a, b *imap.ListData) int { return len(b.Mailbox) - len(a.Mailbox) })
		for _, b := range boxes {
			if !strings.EqualFold(b.Mailbox, "INBOX") {
				c.Delete(b.Mailbox).Wait()
			}
		}
		subs, err := c.List("", "*", &imap.ListOptions{SelectSubscribed: true}).Collect()
		if err != nil {
			t.Fatalf("reset %s: list subscriptions: %v", u, err)
		}
		for _, b := range subs {
			c.Unsubscribe(b.Mailbox).Wait()
		}
		if left, err := c.List("", "*", nil).Collect(); err != nil || len(left) != 1 {
			for _, b := range left {
				if !strings.EqualFold(b.Mailbox, "INBOX") {
					d.tb.Stack.Doveadm(context.Background(), "mailbox", "delete", "-u", u, "-r", "-s", b.Mailbox)
				}
			}
			if left, err := c.List("", "*", nil).Collect(); err != nil || len(left) != 1 {
				t.Fatalf("reset %s: mailboxes left after deleting all: %v %v", u, names(left), err)
			}
		}
		if _, err := c.Select("INBOX", nil).Wait(); err != nil {
			t.Fatalf("reset %s: select INBOX: %v", u, err)
		}
		all := imap.SeqSet{imap.SeqRange{Start: 1, Stop: 0}}
		c.Store(all, &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagDeleted}}, nil).Close()
		if err := c.Expunge().Close(); err != nil {
			t.Fatalf("reset %s: expunge INBOX: %v", u, err)
		}
		if err := c.Unselect().Wait(); err != nil {
			t.Fatalf("reset %s: unselect: %v", u, err)
		}
		st, err := c.Status("INBOX", &imap.StatusOptions{UIDNext: true}).Wait()
		if err != nil {
			t.Fatalf("reset %s: status INBOX: %v", u, err)
		}
		next[u] = uint32(st.UIDNext)
		c.Close()
	}
	// The same UIDs on both sides, so a UID in the input names the same
	// message: raise the lower next UID (it only grows).
	if top := max(next[diffDirect], next[diffProxied]); next[diffDirect] != next[diffProxied] {
		for _, u := range users {
			if next[u] != top {
				if out, err := d.tb.Stack.Doveadm(context.Background(), "mailbox", "update", "-u", u, "--min-next-uid", strconv.FormatUint(uint64(top), 10), "INBOX"); err != nil {
					t.Fatalf("reset %s: raise INBOX's next UID to %d: %v %s", u, top, err, out)
				}
			}
		}
	}
	for _, u := range users {
		c := d.dial(t, u)
		for _, name := range []string{"Archive", "Work"} {
			if err := c.Create(name, nil).Wait(); err != nil {
				t.Fatalf("reset %s: create %s: %v", u, name, err)
			}
		}
		if err := c.Subscribe("Archive").Wait(); err != nil {
			t.Fatalf("reset %s: subscribe: %v", u, err)
		}
		for i, m := range diffMessages {
			body := fmt.Sprintf("From: sender@example.test\r\nTo: %s@example.test\r\nSubject: %s\r\nMessage-Id: <fuzz.%d@client.test>\r\nDate: Tue, 1 Dec 2026 09:30:00 +0000\r\n\r\nbody %d of the differential fuzzer\r\n", u, m.subject, i, i)
			// The same bytes for both users: the To header is not
			// the recipient's.
			body = strings.Replace(body, "To: "+u+"@", "To: someone@", 1)
			ac := c.Append(m.mailbox, int64(len(body)), &imap.AppendOptions{Flags: m.flags, Time: diffDate})
			if _, err := io.WriteString(ac, body); err != nil {
				t.Fatalf("reset %s: append: %v", u, err)
			}
			if err := ac.Close(); err != nil {
				t.Fatalf("reset %s: append: %v", u, err)
			}
			if _, err := ac.Wait(); err != nil {
				t.Fatalf("reset %s: append to %s: %v", u, m.mailbox, err)
			}
		}
		c.Close()
	}
}

func (d *differential) dial(t *testing.T, user string) *imapclient.Client {
	t.Helper()
	conn, err := net.DialTimeout("tcp", d.tb.Stack.IMAPAddr, d.wait)
	if err != nil {
		t.Fatalf("connect to Dovecot: %v", err)
	}
	// Every step of a reset or a read of the mail is bounded.
	conn.SetDeadline(time.Now().Add(d.wait))
	c := imapclient.New(conn, nil)
	if err := c.Login(user, d.tb.Stack.Password(user)).Wait(); err != nil {
		c.Close()
		t.Fatalf("log in to Dovecot as %s: %v", user, err)
	}
	return c
}

func names(ls []*imap.ListData) []string {
	var out []string
	for _, l := range ls {
		out = append(out, l.Mailbox)
	}
	return out
}

// mailOf describes a user's mail, read from Dovecot directly: one line
// per mailbox, subscription and message.
func (d *differential) mailOf(t *testing.T, user string) []string {
	t.Helper()
	c := d.dial(t, user)
	defer c.Close()
	boxes, err := c.List("", "*", nil).Collect()
	if err != nil {
		t.Fatalf("list %s's mailboxes: %v", user, err)
	}
	subs, err := c.List("", "*", &imap.ListOptions{SelectSubscribed: true}).Collect()
	if err != nil {
		t.Fatalf("list %s's subscriptions: %v", user, err)
	}
	var out []string
	for _, s := range subs {
		out = append(out, "subscribed "+s.Mailbox)
	}
	for _, b := range boxes {
		if slices.Contains(b.Attrs, imap.MailboxAttrNoSelect) || slices.Contains(b.Attrs, imap.MailboxAttrNonExistent) {
			out = append(out, "mailbox "+b.Mailbox+" \\Noselect")
			continue
		}
		sel, err := c.Select(b.Mailbox, &imap.SelectOptions{ReadOnly: true}).Wait()
		if err != nil {
			t.Fatalf("examine %s's %s: %v", user, b.Mailbox, err)
		}
		out = append(out, fmt.Sprintf("mailbox %s: %d messages", b.Mailbox, sel.NumMessages))
		if sel.NumMessages == 0 {
			continue
		}
		msgs, err := c.Fetch(imap.SeqSet{imap.SeqRange{Start: 1, Stop: 0}}, &imap.FetchOptions{
			UID: true, Flags: true, BodySection: []*imap.FetchItemBodySection{{Peek: true}},
		}).Collect()
		if err != nil {
			t.Fatalf("fetch %s's %s: %v", user, b.Mailbox, err)
		}
		for _, m := range msgs {
			var flags []string
			for _, f := range m.Flags {
				if !strings.EqualFold(string(f), `\Recent`) {
					flags = append(flags, strings.ToLower(string(f)))
				}
			}
			slices.Sort(flags)
			var body []byte
			if len(m.BodySection) > 0 {
				body = m.BodySection[0].Bytes
			}
			sum := sha256.Sum256(body)
			out = append(out, fmt.Sprintf("  %s uid %d %s (%s)", b.Mailbox, m.UID, hex.EncodeToString(sum[:6]), strings.Join(flags, " ")))
		}
	}
	slices.Sort(out)
	return out
}

// compareMail is check 3: both users' mail is the same.
func (d *differential) compareMail(t *testing.T) []string {
	direct, proxied := d.mailOf(t, diffDirect), d.mailOf(t, diffProxied)
	if slices.Equal(direct, proxied) {
		return nil
	}
	return []string{fmt.Sprintf("the mail differs after the session:\ndirect:\n%s\nthrough undomail:\n%s",
		strings.Join(direct, "\n"), strings.Join(proxied, "\n"))}
}

// fuzzSeeds are sessions as real clients send them after login, and the
// hostile shapes of issue #14.
func fuzzSeeds() []string {
	msg := func(subject string) string {
		return "From: me@example.test\r\nTo: you@example.test\r\nSubject: " + subject + "\r\nDate: Wed, 2 Dec 2026 10:00:00 +0000\r\nMessage-Id: <" + strings.ReplaceAll(subject, " ", ".") + "@client.test>\r\n\r\nHello.\r\n"
	}
	lit := func(s string) string { return fmt.Sprintf("{%d}\r\n%s", len(s), s) }
	litp := func(s string) string { return fmt.Sprintf("{%d+}\r\n%s", len(s), s) }
	lines := func(ls ...string) string { return strings.Join(ls, "\r\n") + "\r\n" }
	long := strings.Repeat("t", 200)
	return []string{
		// Thunderbird: lower-case commands, CONDSTORE, header fetches,
		// a draft saved with a synchronizing literal, IDLE.
		lines(
			`2 capability`,
			`3 ID ("name" "Thunderbird" "version" "115.5.0")`,
			`4 list (subscribed) "" "*" return (special-use)`,
			`5 select "INBOX" (CONDSTORE)`,
			`6 UID fetch 1:* (FLAGS)`,
			`7 select "Archive" (CONDSTORE)`,
			`8 UID fetch 1:3 (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS (From To Cc Bcc Subject Date Message-ID Priority X-Priority References Newsgroups In-verb.Reply-To Content-Type verb.Reply-To)])`,
			`9 UID fetch 1 (UID RFC822.SIZE BODY.PEEK[])`,
			`10 uid store 1 +Flags (\Seen)`,
			`11 uid store 2 +Flags (\Deleted)`,
			`12 expunge`,
			`13 create "Drafts"`,
			`14 append "Drafts" (\Seen \Draft) `+lit(msg("draft one")),
			`15 uid copy 1 "INBOX"`,
			`16 uid move 3 "Work"`,
			`17 IDLE`,
			`DONE`,
			`18 noop`,
		),
		// mbsync: LITERAL+, APPEND with a date, UID EXPUNGE, CLOSE.
		lines(
			`1 CAPABILITY`,
			`2 LIST "" "*"`,
			`3 SELECT "Archive"`,
			`4 UID FETCH 1:1000000000 (UID FLAGS)`,
			`5 APPEND "Archive" (\Seen) "02-Dec-2026 10:00:00 +0000" `+litp(msg("synced")),
			`6 UID STORE 1 +FLAGS.SILENT (\Deleted)`,
			`7 UID EXPUNGE 1`,
			`8 CLOSE`,
			`9 SELECT "INBOX"`,
			`10 UID FETCH 1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (X-TUID)])`,
			`11 STORE 3 -FLAGS.SILENT (\Flagged)`,
			`12 MOVE 2 "Work"`,
		),
		// Python imaplib: sequence numbers, RFC822 fetch (sets \Seen),
		// mailbox management.
		lines(
			`A001 CAPABILITY`,
			`A002 SELECT INBOX`,
			`A003 SEARCH ALL`,
			`A004 FETCH 1 (RFC822)`,
			`A005 STORE 1 +FLAGS (\Deleted)`,
			`A006 EXPUNGE`,
			`A007 CREATE Projects`,
			`A008 RENAME Projects Projects2`,
			`A009 SUBSCRIBE Projects2`,
			`A010 COPY 1:2 Projects2`,
			`A011 UNSUBSCRIBE Archive`,
			`A012 MOVE 1 Archive`,
			`A013 APPEND INBOX () `+lit(msg("imaplib")),
			`A014 STATUS INBOX (MESSAGES UIDNEXT)`,
			`A015 DELETE Projects2`,
		),
		// Errors Dovecot answers NO or BAD: the proxy passes them on
		// and logs them as such.
		lines(
			`e1 STORE 1 +FLAGS (\Seen)`,
			`e2 SELECT Nowhere`,
			`e3 EXPUNGE`,
			`e4 SELECT INBOX`,
			`e5 COPY 1 Nowhere`,
			`e6 CREATE INBOX`,
			`e7 DELETE Nowhere`,
			`e8 RENAME Nowhere Elsewhere`,
			`e9 UID STORE 99 +FLAGS (\Seen)`,
			`e10 APPEND Nowhere `+litp(msg("lost")),
			`e11 EXAMINE Archive`,
			`e12 STORE 1 +FLAGS (\Flagged)`,
			`e13 CLOSE`,
			`e14 CLOSE`,
		),
		// CONDSTORE and QRESYNC (RFC 7162).
		lines(
			`q1 ENABLE QRESYNC`,
			`q2 SELECT Archive (CONDSTORE)`,
			`q3 UID STORE 1:3 (UNCHANGEDSINCE 1) +FLAGS (\Answered)`,
			`q4 STORE 2 +FLAGS.SILENT (\Deleted)`,
			`q5 UID EXPUNGE 1:3`,
			`q6 UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)`,
		),
		// Literals {n} and {n+} in places of every kind.
		lines(
			`l1 SELECT `+lit("INBOX"),
			`l2 SEARCH SUBJECT `+litp("third"),
			`l3 CREATE `+lit("Lit1"),
			`l4 STATUS `+litp("Archive")+` (MESSAGES)`,
			`l5 STORE 3 +FLAGS (`+litp("$Lit")+`)`,
			`l5b STORE 2 +FLAGS `+litp("$Lit"),
			`l6 RENAME `+lit("Lit1")+` `+litp("Lit2"),
			`l7 APPEND `+litp("Lit2")+` `+lit(msg("literal")),
		),
		// 1. Long tags: tag and name longer than 128 bytes.
		lines(
			long+`C CREATE Other`,
			long+`A APPEND Other `+litp(msg("long tag")),
			long+`S SELECT Other`,
			`s1 UID STORE 1 +FLAGS (\Flagged)`,
			long+`U UID STORE 1 +FLAGS (\Deleted)`,
			long+`E UID EXPUNGE 1`,
			long+`X CLOSE`,
			long+`R RENAME Other Other2`,
			long+`D DELETE Other2`,
		),
		// 2. Duplicate tags, pipelined.
		lines(
			`t CREATE Dup1`,
			`t CREATE Dup2`,
			`u CREATE INBOX`,
			`u CREATE BrandNew`,
		),
		// 3. IDLE ended by a command instead of DONE.
		lines(
			`s SELECT INBOX`,
			`i IDLE`,
			`x CREATE GateHold`,
			`n1 NOOP`,
			`s2 STORE 2 +FLAGS (\Answered)`,
		),
		// 5. A TAB after the tag.
		lines(
			"x5\tCREATE V5",
			`x6 CREATE V6`,
		),
		// 4. MULTIAPPEND and CATENATE.
		lines(
			`m APPEND INBOX `+litp("Subject: a\r\n\r\nabc\r\n")+` `+litp("Subject: b\r\n\r\ndef\r\n"),
			`n APPEND INBOX CATENATE (URL "/INBOX/;UID=1" TEXT `+litp("Subject: c\r\n\r\nghi\r\n")+`)`,
			`o SELECT INBOX`,
		),
		// A SELECT Dovecot answers BAD leaves nothing selected, for
		// Dovecot and the proxy alike.
		lines(
			`s SELECT Archive`,
			`b SELECT`,
			`c STORE 1 +FLAGS (\Flagged)`,
		),
		// Renaming the selected mailbox: Dovecot ends the session with
		// BYE at the next command.
		lines(
			`s SELECT Archive`,
			`r RENAME Archive A2`,
			`c STORE 1 +FLAGS (\Flagged)`,
			`x EXPUNGE`,
		),
		// Dovecot's grammar is laxer than the proxy's: it runs this
		// CREATE, the proxy refuses it (the documented syntax refusal).
		lines(
			`c CREATE "LitU"x`,
			`d CREATE LitV`,
		),
		// A bare CR after a broken literal header in APPEND: Dovecot
		// reads what follows as a command of its own (b CREATE), the
		// proxy refuses the whole line and forwards none of it.
		"14 append \"Work\" (\\Seen) {}\rb CREATE Evil7\r\n",
		// Unknown and refused commands, then a normal change.
		lines(
			`y FROBNICATE`,
			`z COMPRESS DEFLATE`,
			`a1 SELECT INBOX`,
			`a2 STORE 1:* -FLAGS (\Seen)`,
		),
	}
}

// TestIMAPDifferentialChecksCanFail feeds compareSessions made-up answers
// and records: the checks of FuzzIMAPDifferential must catch an unlogged
// change, an OK logged for a rejected command, a record against another
// mailbox than Dovecot's selected one, an answer that differs, and a
// refusal the docs do not list.
func TestIMAPDifferentialChecksCanFail(t *testing.T) {
	input := []byte("s SELECT Archive\r\nc CREATE X\r\nu UID STORE 1 +FLAGS (\\Seen)\r\n" + diffEndA + " NOOP\r\n" + diffEndB + " NOOP\r\n")
	cmds, ok := parseSession(input)
	if !ok || len(cmds) != 5 {
		t.Fatalf("parseSession: %v %+v", ok, cmds)
	}
	ok3 := func(c, u string) *sessionLog {
		return &sessionLog{done: true, tagged: map[string][]answer{
			"s": {{"OK", "[READ-WRITE] Select completed"}}, "c": {{c, "create"}}, "u": {{u, "store"}},
			diffEndA: {{"OK", "NOOP"}}, diffEndB: {{"OK", "NOOP"}},
		}}
	}
	rec := func(seq int64, kind string, a verb.IMAPArgs, status string) undolog.Verb {
		args, _ := json.Marshal(a)
		out, _ := json.Marshal(verb.IMAPOutcome{Status: status})
		return undolog.Verb{Record: undolog.Record{Seq: seq, Kind: kind, Args: args}, Outcome: &undolog.Record{Outcome: out}}
	}
	create := rec(1, verb.KindIMAPCreate, verb.IMAPArgs{Command: "CREATE", Mailbox: "X"}, "OK")
	store := rec(2, verb.KindIMAPStore, verb.IMAPArgs{Command: "UID STORE", Mailbox: "Archive", UIDs: "1"}, "OK")
	for _, tc := range []struct {
		name            string
		direct, proxied *sessionLog
		records         []undolog.Verb
		want            string // in the failures; "" for none
	}{
		{"all well", ok3("OK", "OK"), ok3("OK", "OK"), []undolog.Verb{create, store}, ""},
		{"unlogged change", ok3("OK", "OK"), ok3("OK", "OK"), []undolog.Verb{create}, "2 mutating commands were answered through undomail, 1 records logged"},
		{"OK logged for a rejected command", ok3("NO", "OK"), ok3("NO", "OK"), []undolog.Verb{create, store}, "logged OK, the client was answered NO"},
		{"another mailbox", ok3("OK", "OK"), ok3("OK", "OK"),
			[]undolog.Verb{create, rec(2, verb.KindIMAPStore, verb.IMAPArgs{Command: "UID STORE", Mailbox: "INBOX"}, "OK")}, `names mailbox "INBOX", Dovecot had "Archive" selected`},
		{"another answer", ok3("OK", "OK"), ok3("NO", "OK"), []undolog.Verb{rec(1, verb.KindIMAPCreate, verb.IMAPArgs{Command: "CREATE"}, "NO"), store}, "Dovecot answered OK create, through undomail NO"},
		{"undocumented refusal", ok3("OK", "OK"), &sessionLog{done: true, tagged: map[string][]answer{
			"s": {{"OK", "select"}}, "c": {{"OK", "create"}}, "u": {{"BAD", "undomail: STORE needs a selected mailbox"}},
			diffEndA: {{"OK", "NOOP"}}, diffEndB: {{"OK", "NOOP"}},
		}}, []undolog.Verb{create}, "does not list"},
	} {
		r := compareSessions(input, cmds, tc.direct, tc.proxied, tc.records)
		got := strings.Join(r.failures, "\n")
		if (tc.want == "") != (got == "") || !strings.Contains(got, tc.want) {
			t.Errorf("%s: failures %q, want %q", tc.name, got, tc.want)
		}
	}
}
