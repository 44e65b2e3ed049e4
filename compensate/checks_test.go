package compensate

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// logBuilder appends a synthetic history to an undo log in a temp dir.
type logBuilder struct {
	t *testing.T
	l *undolog.Log
}

func (b *logBuilder) append(r *undolog.Record, outcome any) int64 {
	b.t.Helper()
	if err := b.l.Append(context.Background(), r); err != nil {
		b.t.Fatal(err)
	}
	if outcome != nil {
		o, _ := json.Marshal(outcome)
		if err := b.l.Append(context.Background(), &undolog.Record{Kind: undolog.KindOutcome, Ref: r.Seq, User: r.User, Outcome: o}); err != nil {
			b.t.Fatal(err)
		}
	}
	return r.Seq
}

func (b *logBuilder) blob(msg string) undolog.BlobRef {
	b.t.Helper()
	w, err := b.l.NewBlob()
	if err != nil {
		b.t.Fatal(err)
	}
	w.Write([]byte(msg))
	ref, err := w.Commit()
	if err != nil {
		b.t.Fatal(err)
	}
	return ref
}

// deliver logs a delivery captured on the LMTP path, accepted for every
// recipient.
func (b *logBuilder) deliver(id, msgID, subject string, submission int64, rcpts ...string) int64 {
	msg := fmt.Sprintf("From: Sender <s@spam.test>\r\nSubject: %s\r\nMessage-Id: %s\r\n\r\nbody\r\n", subject, msgID)
	a := verb.DeliveryArgs{UndoID: id, Submission: submission, MailFrom: "s@spam.test", Rcpts: rcpts,
		Header: verb.HeaderInfo{MessageID: msgID, Subject: subject, From: "Sender <s@spam.test>"}}
	var o verb.DeliveryOutcome
	for _, r := range rcpts {
		o.Rcpts = append(o.Rcpts, verb.RcptReply{Rcpt: r, Reply: verb.Reply{Code: 250, Text: "ok"}})
	}
	args, _ := json.Marshal(a)
	r := &undolog.Record{Kind: verb.KindLMTPDeliver, Users: rcpts, Args: args}
	r.AttachBlob(b.blob(msg))
	return b.append(r, o)
}

func (b *logBuilder) submit(user, subject, extra, rcpt, body string) int64 {
	if body == "" {
		body = "text\r\n"
	}
	rcpts := []string{rcpt}
	msg := "From: " + user + "@example.org\r\nSubject: " + subject + "\r\n" + extra + "\r\n" + body
	a := verb.DeliveryArgs{UndoID: "sub-" + subject, AuthUser: user, MailFrom: user + "@example.org", Rcpts: rcpts,
		Header: verb.HeaderInfo{Subject: subject}}
	args, _ := json.Marshal(a)
	r := &undolog.Record{Kind: verb.KindSMTPSubmit, User: user, Args: args}
	r.AttachBlob(b.blob(msg))
	return b.append(r, verb.DeliveryOutcome{Reply: &verb.Reply{Code: 250, Text: "queued"}})
}

func (b *logBuilder) imap(user, kind string, a verb.IMAPArgs) int64 {
	args, _ := json.Marshal(a)
	return b.append(&undolog.Record{Kind: kind, User: user, Users: []string{user}, Args: args}, verb.IMAPOutcome{Status: "OK"})
}

func (b *logBuilder) fetch(user string, ids map[string]string) {
	args, _ := json.Marshal(verb.IMAPFetchArgs{Mailbox: "INBOX", UIDValidity: 1, UndoIDs: ids})
	b.append(&undolog.Record{Kind: verb.KindIMAPFetch, User: user, Users: []string{user}, Args: args}, nil)
}

func (b *logBuilder) replayed(seq int64, user string, status verb.ReplayStatus, detail string) {
	o, _ := json.Marshal(verb.ReplayOutcome{Status: status, Detail: detail})
	b.append(&undolog.Record{Kind: verb.KindReplay, Session: "replay", User: user, Users: []string{user}, Ref: seq, Outcome: o}, nil)
}

// history logs a period and a cycle over it, and returns the cycle.
//
// alice reads spam d1 and ham d3, flags spam d2, copies d1 to Keep,
// replies to d2, forwards d1 as an attachment, renames a folder and sends
// carol a message; bob reads
// and expunges spam d5. The cycle filters the spam, cancels the delivery
// to carol and cannot redo the RENAME.
func history(t *testing.T) (*undolog.Log, Cycle) {
	l, err := undolog.Open(t.TempDir(), undolog.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	b := &logBuilder{t: t, l: l}
	d1 := b.deliver("D1", "<s1@spam.test>", "Lottery 1", 0, "alice@example.org")
	d2 := b.deliver("D2", "<s2@spam.test>", "Lottery 2", 0, "alice@example.org", "bob@example.org")
	d3 := b.deliver("D3", "<h3@example.org>", "minutes", 0, "alice@example.org")
	d5 := b.deliver("D5", "<s5@spam.test>", "Lottery 5", 0, "bob@example.org")
	b.fetch("alice", map[string]string{"1": "D1", "3": "D3"})
	b.fetch("bob", map[string]string{"5": "D5"})
	store := b.imap("alice", verb.KindIMAPStore, verb.IMAPArgs{Command: "UID STORE", Mailbox: "INBOX", Op: "+", Flags: []string{`\Flagged`}, UndoIDs: map[string]string{"2": "D2"}})
	cp := b.imap("alice", verb.KindIMAPCopy, verb.IMAPArgs{Command: "UID COPY", Mailbox: "INBOX", Dest: "Keep", UndoIDs: map[string]string{"1": "D1"}})
	exp := b.imap("bob", verb.KindIMAPExpunge, verb.IMAPArgs{Command: "EXPUNGE", Mailbox: "INBOX", UndoIDs: map[string]string{"5": "D5"}})
	b.submit("alice", "Re: Lottery 2", "In-Reply-To: <s2@spam.test>\r\nReferences: <x@y> <s2@spam.test>\r\n", "friend@elsewhere.test", "")
	b.submit("alice", "Fwd: Lottery 1", "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n",
		"friend@elsewhere.test", "--b\r\nContent-Type: text/plain\r\n\r\nlook\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n"+
			"Subject: Lottery 1\r\nMessage-Id: <s1@spam.test>\r\n\r\nwin\r\n--b--\r\n")
	s2 := b.submit("alice", "Numbers", "", "carol@example.org", "")
	d4 := b.deliver("D4", "<n@example.org>", "Numbers", s2, "carol@example.org")
	ren := b.imap("alice", verb.KindIMAPRename, verb.IMAPArgs{Command: "RENAME", Mailbox: "Drafts2", Dest: "Archive"})
	cycle := b.append(&undolog.Record{Kind: "cycle", Session: "cycle", Args: json.RawMessage(`{"to":"s1","present":"s2"}`)}, nil)
	drop := "dropped by filter header:Subject=~Lottery"
	b.replayed(d1, "alice", "filtered", drop)
	b.replayed(d2, "alice", "filtered", drop)
	b.replayed(d2, "bob", "filtered", drop)
	b.replayed(d3, "alice", "ok", "re-delivered")
	b.replayed(d5, "bob", "filtered", drop)
	b.replayed(store, "alice", "repaired", "skipped")
	b.replayed(cp, "alice", "repaired", "skipped")
	b.replayed(exp, "bob", "repaired", "skipped")
	b.replayed(d4, "carol", "cancelled", "left out by the repair")
	b.replayed(ren, "alice", "failed", "imap: NO [ALREADYEXISTS] Target mailbox already exists (0.001 + 0.000 secs).")
	return l, Cycle{Seq: cycle, After: 0, Reason: "spam wave"}
}

// describe lists paradoxes as "kind user verb-kind message observed".
func describe(ps []Paradox) []string {
	var out []string
	for _, p := range ps {
		id := "-"
		if p.Message != nil {
			id = p.Message.UndoID
		}
		out = append(out, fmt.Sprintf("%s %s %s %s %v", p.Kind, p.User, p.VerbKind, id, p.Observed))
	}
	slices.Sort(out)
	return out
}

// TestDetect: each verb kind's check finds its paradox, and whether
// someone observed it.
func TestDetect(t *testing.T) {
	l, c := history(t)
	f, err := Detect(context.Background(), l, c)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"action_failed alice imap.rename - true",
		"action_failed alice imap.store D2 true",
		"delivery_lost alice smtp.submit D4 true",  // told 250 at the front door
		"read_removed alice lmtp.deliver D1 true",  // read, then filtered
		"read_removed alice lmtp.deliver D2 false", // never read: silent
		"read_removed bob lmtp.deliver D2 false",
		"read_removed carol lmtp.deliver D4 false",
		"sent_onwards alice imap.copy D1 true",
		"sent_onwards alice smtp.submit D1 true", // forwarded as an attachment
		"sent_onwards alice smtp.submit D2 true", // the reply names it in In-Reply-To
		// D5: bob read it and expunged it himself; it is gone in both
		// timelines. The spammer's 250s: removed on purpose, from outside.
	}
	if got := describe(f.Paradoxes); !slices.Equal(got, want) {
		t.Errorf("paradoxes\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if len(f.Reads) != 1 || f.Reads[0].Message.UndoID != "D3" || f.Reads[0].User != "alice" {
		t.Errorf("reads to compare with the store: %+v; want alice's D3", f.Reads)
	}
	if f.Addresses["alice"] != "alice@example.org" {
		t.Errorf("alice's address %q", f.Addresses["alice"])
	}
}

// fakeLMTP is an LMTP server that keeps what it was given.
type fakeLMTP struct {
	mu   sync.Mutex
	msgs []fakeMsg
	addr string
}

type fakeMsg struct {
	from  string
	rcpts []string
	data  string
}

func startLMTP(t *testing.T) *fakeLMTP {
	f := &fakeLMTP{}
	s := smtp.NewServer(f)
	s.LMTP = true
	s.Domain = "fake.test"
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.addr = ln.Addr().String()
	go s.Serve(ln)
	t.Cleanup(func() { s.Close() })
	return f
}

func (f *fakeLMTP) NewSession(*smtp.Conn) (smtp.Session, error) { return &fakeSession{f: f}, nil }

type fakeSession struct {
	f   *fakeLMTP
	msg fakeMsg
}

func (s *fakeSession) Reset()        { s.msg = fakeMsg{} }
func (s *fakeSession) Logout() error { return nil }
func (s *fakeSession) Mail(from string, _ *smtp.MailOptions) error {
	s.msg.from = from
	return nil
}
func (s *fakeSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	s.msg.rcpts = append(s.msg.rcpts, to)
	return nil
}
func (s *fakeSession) Data(r io.Reader) error {
	b, err := io.ReadAll(r)
	s.msg.data = string(b)
	s.f.mu.Lock()
	s.f.msgs = append(s.f.msgs, s.msg)
	s.f.mu.Unlock()
	return err
}

func (f *fakeLMTP) received() []fakeMsg {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.msgs)
}

// TestRunOnceAndOnlyOnce: Run sends one digest per user with something
// to explain, the notice to the operator, logs both as compensation
// verbs, and a second Run over the same cycle finds every paradox taken
// care of.
func TestRunOnceAndOnlyOnce(t *testing.T) {
	l, c := history(t)
	lmtp := startLMTP(t)
	o := Options{Hostname: "undomail.test", LMTPAddr: lmtp.addr, Operator: "postmaster@example.org",
		Policies: map[Kind]Policy{SentOnwards: Notify}}
	rep, err := Run(context.Background(), l, c, o)
	if err != nil {
		t.Fatal(err)
	}
	want := map[Kind]Counts{
		ReadRemoved:  {Explained: 1, Silent: 3},
		DeliveryLost: {Explained: 1},
		ActionFailed: {Explained: 2},
		SentOnwards:  {Notified: 3},
	}
	if fmt.Sprint(rep.Kinds) != fmt.Sprint(want) || rep.Explained != 4 || rep.Silent != 3 || rep.Notified != 3 {
		t.Fatalf("report %+v\nwant kinds %v", rep, want)
	}
	got := lmtp.received()
	if len(got) != 2 || fmt.Sprint(got[0].rcpts) != "[alice@example.org]" || fmt.Sprint(got[1].rcpts) != "[postmaster@example.org]" {
		t.Fatalf("delivered %+v; want alice's digest, then the notice", got)
	}
	for _, m := range got {
		if m.from != "" || !strings.HasPrefix(m.data, verb.TraceHeader+": ") {
			t.Errorf("delivery from <%s> starting %.40q: want the null sender and the trace field first", m.from, m.data)
		}
	}
	cs, err := List(context.Background(), l, undolog.Filter{})
	if err != nil || len(cs) != 2 {
		t.Fatalf("compensations %+v, %v", cs, err)
	}
	if a := cs[0].Args; a.Audience != AudienceUser || a.User != "alice" || len(a.Paradoxes) != 4 || a.Cycle != c.Seq || !cs[0].Delivered() ||
		!strings.Contains(got[0].data, a.UndoID) {
		t.Errorf("alice's compensation verb %+v", cs[0])
	}
	if a := cs[1].Args; a.Audience != AudienceOperator || len(a.Paradoxes) != 7 {
		t.Errorf("the notice's verb %+v", cs[1])
	}

	again, err := Run(context.Background(), l, c, o)
	if err != nil {
		t.Fatal(err)
	}
	if again.Explained != 0 || again.Notified != 0 || again.Already != 7 || again.Silent != 3 || len(lmtp.received()) != 2 {
		t.Fatalf("second run %+v, %d messages delivered; want nothing new", again, len(lmtp.received()))
	}
}

// TestRunDeliveryFailure: a digest the LMTP server refuses is an error,
// logged with its outcome, and is tried again by the next run.
func TestRunDeliveryFailure(t *testing.T) {
	l, c := history(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	rep, err := Run(context.Background(), l, c, Options{Hostname: "undomail.test", LMTPAddr: dead})
	if err == nil || len(rep.Failed) != 1 || len(rep.Digests) != 0 {
		t.Fatalf("run against a closed port: %+v, %v", rep, err)
	}
	cs, _ := List(context.Background(), l, undolog.Filter{})
	if len(cs) != 1 || cs[0].Delivered() || cs[0].Outcome == nil || cs[0].Outcome.Rcpts[0].Reply.Code != 451 {
		t.Fatalf("logged compensation %+v", cs)
	}
	lmtp := startLMTP(t)
	rep, err = Run(context.Background(), l, c, Options{Hostname: "undomail.test", LMTPAddr: lmtp.addr})
	if err != nil || rep.Explained != 7 || len(lmtp.received()) != 1 {
		t.Fatalf("retry: %+v, %v", rep, err)
	}
}

// fakeStore answers ContentChecker from a map of undo id to message.
type fakeStore map[string]string

func (f fakeStore) Current(_ context.Context, _, id string) ([]byte, error) {
	m, ok := f[id]
	if !ok {
		return nil, nil
	}
	return []byte(m), nil
}

func (fakeStore) Close() {}

// TestReadChanged: a message the user read and the replay made again is
// compared with the store: trace fields the delivery path adds are no
// change, a different subject or text is.
func TestReadChanged(t *testing.T) {
	l, c := history(t)
	f, err := Detect(context.Background(), l, c)
	if err != nil {
		t.Fatal(err)
	}
	orig := "From: Sender <s@spam.test>\r\nSubject: minutes\r\nMessage-Id: <h3@example.org>\r\n\r\nbody\r\n"
	trace := verb.TraceHeader + ": D3\r\nReturn-Path: <s@spam.test>\r\nDelivered-To: alice@example.org\r\n"
	for store, want := range map[string]string{
		trace + orig: "",
		trace + strings.Replace(orig, "Subject: minutes", "Subject: [SPAM?] minutes", 1):              "its Subject is different now",
		trace + strings.Replace(orig, "body\r\n", "body\r\n-- \r\nscanned by a virus scanner\r\n", 1): "its text is different now",
	} {
		ps, err := checkContent(context.Background(), l, fakeStore{"D3": store}, f.Reads)
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case want == "" && len(ps) != 0:
			t.Errorf("unchanged message reported: %+v", ps)
		case want != "" && (len(ps) != 1 || ps[0].Kind != ReadChanged || ps[0].Now != want || ps[0].User != "alice" || !ps[0].Observed):
			t.Errorf("store %q: paradoxes %+v, want one read_changed %q", store, ps, want)
		}
	}
	if ps, err := checkContent(context.Background(), l, fakeStore{}, f.Reads); err != nil || len(ps) != 0 {
		t.Errorf("a message gone since (the user's own later command) is no read_changed: %+v, %v", ps, err)
	}
}

// TestRestored: when a message a delivered digest said was removed is in
// the user's store again (the repair was undone), the next run explains
// that, once.
func TestRestored(t *testing.T) {
	l, c := history(t)
	lmtp := startLMTP(t)
	o := Options{Hostname: "undomail.test", LMTPAddr: lmtp.addr, Checker: fakeStore{}}
	if rep, err := Run(context.Background(), l, c, o); err != nil || rep.Kinds[Restored] != (Counts{}) {
		t.Fatalf("first run: %+v, %v", rep, err)
	}
	o.Checker = fakeStore{"D1": "Subject: Lottery 1\r\n\r\nbody\r\n"}
	rep, err := Run(context.Background(), l, c, o)
	if err != nil || rep.Kinds[Restored] != (Counts{Explained: 1}) || rep.Explained != 1 || fmt.Sprint(rep.Digests) != "[alice]" {
		t.Fatalf("run with D1 back: %+v, %v", rep, err)
	}
	got := lmtp.received()
	if len(got) != 2 || !strings.Contains(got[1].data, "back in your mailbox") {
		t.Fatalf("deliveries %+v", got)
	}
	// Its policy follows read_removed's; ignored, the store is not even
	// asked.
	o.Policies = map[Kind]Policy{ReadRemoved: Ignore}
	if rep, err := Run(context.Background(), l, c, o); err != nil || rep.Kinds[Restored] != (Counts{}) || len(lmtp.received()) != 2 {
		t.Fatalf("restored follows read_removed's policy: %+v, %v", rep, err)
	}
	o.Policies = nil
	if rep, err := Run(context.Background(), l, c, o); err != nil || rep.Kinds[Restored] != (Counts{Already: 1}) {
		t.Fatalf("third run: %+v, %v", rep, err)
	}
}

// TestMisdelivered: the repaired MTA delivers two messages carol had to
// bob instead (replay status rerouted). The one she read is a
// misdelivered paradox she observed, the other a silent one; no sender is
// told of a lost delivery (the message was delivered, elsewhere); the
// operator notice lists the exposure with the message and when she read
// it.
func TestMisdelivered(t *testing.T) {
	l, err := undolog.Open(t.TempDir(), undolog.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	b := &logBuilder{t: t, l: l}
	s1 := b.submit("dana", "one", "", "bob@example.org", "")
	d1 := b.deliver("M1", "<m1@example.org>", "For bob 1", s1, "carol@example.org")
	s2 := b.submit("dana", "two", "", "bob@example.org", "")
	d2 := b.deliver("M2", "<m2@example.org>", "For bob 2", s2, "carol@example.org")
	b.fetch("carol", map[string]string{"2": "M2"})
	cycle := b.append(&undolog.Record{Kind: "cycle", Session: "cycle", Args: json.RawMessage(`{"to":"s1","present":"s2"}`)}, nil)
	now := "the repaired mail system delivered it to <bob@example.org> instead"
	b.replayed(d1, "carol", verb.ReplayRerouted, now)
	b.replayed(d2, "carol", verb.ReplayRerouted, now)
	f, err := Detect(context.Background(), l, Cycle{Seq: cycle, Reason: "a wrong virtual alias"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"misdelivered carol lmtp.deliver M1 false", "misdelivered carol lmtp.deliver M2 true"}
	if got := describe(f.Paradoxes); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("paradoxes:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	var seen Paradox
	for _, p := range f.Paradoxes {
		if p.Observed {
			seen = p
		}
	}
	if seen.Now != now || seen.Seen.IsZero() {
		t.Fatalf("observed paradox %+v: want now %q and the time she read it", seen, now)
	}
	notice, err := BuildNotice(Letter{From: "postmaster@example.org", To: "ops@example.org", Subject: "n", MessageID: "n@x",
		Cycle: Cycle{Seq: cycle}, Paradoxes: []Paradox{seen}})
	if err != nil {
		t.Fatal(err)
	}
	text := strings.Join(strings.Fields(qpSoftBreaks.Replace(string(notice))), " ")
	for _, w := range []string{"[misdelivered] exposure: carol read the message", "For bob 2", "<m2@example.org>", when(seen.Seen), "<bob@example.org>"} {
		if !strings.Contains(text, w) {
			t.Errorf("operator notice lacks %q:\n%s", w, text)
		}
	}
	digest, err := BuildDigest(Letter{From: "postmaster@example.org", To: "carol@example.org", Name: "carol", Subject: "d", MessageID: "d@x",
		Cycle: Cycle{Seq: cycle}, Paradoxes: []Paradox{seen}})
	if err != nil {
		t.Fatal(err)
	}
	if text := strings.Join(strings.Fields(qpSoftBreaks.Replace(string(digest))), " "); !strings.Contains(text, "not meant for you") {
		t.Errorf("carol's digest does not say it was not meant for her:\n%s", text)
	}
}

// qpSoftBreaks undoes quoted-printable soft line breaks (RFC 2045
// section 6.7) so a test can search the text.
var qpSoftBreaks = strings.NewReplacer("=\r\n", "")
