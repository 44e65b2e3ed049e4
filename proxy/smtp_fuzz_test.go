package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"

	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// FuzzSMTPFrontDoor sends the fuzz input (the bytes an SMTP client sends
// after connecting, all at once, then the end of its stream) to undomail's
// front door in front of the real Postfix, and holds the undo log against
// the mailboxes, read from Dovecot directly (what the log says happened
// must be what the servers did; issue #16):
//
//  1. every message that reached a mailbox carries, topmost, the undo id
//     of a submission the log shows accepted (a 2xx outcome) for that
//     user, or of a delivery the capture logged as done for that user that
//     came from no submission (a bounce, possibly of an earlier input):
//     nothing reaches a mailbox past the log, and nothing a sender was
//     told failed is delivered;
//  2. every submission the log shows accepted reaches each local user it
//     names at least once, unless Postfix's own log shows it bounced for
//     that user (Postfix accepts an SMTPUTF8 envelope that Dovecot 2.3's
//     LMTP cannot take, and bounces it), and no more often than it names
//     that user;
//  3. every delivery the capture logged as done for a user is in that
//     user's mailbox;
//  4. the front door ends the session once the client's stream ended.
//
// Replies are not compared with Postfix's here: TestSMTPParity does that
// for the corpus (docs/smtp-parity.md), whose sessions are the seeds.
// Fuzzing: go test ./proxy -run '^$' -fuzz FuzzSMTPFrontDoor -parallel 1.
func FuzzSMTPFrontDoor(f *testing.F) {
	for i, s := range smtpCorpus() {
		f.Add(seedBytes(s, fmt.Sprintf("fuzz.%d@client.test", i)))
	}
	if flagSet("test.fuzz") && !flagSet("test.fuzzworker") {
		f.Fuzz(func(t *testing.T, session []byte) { t.Fatal("the coordinator ran an input") })
		return
	}
	d := startDifferential(f)
	f.Fuzz(func(t *testing.T, session []byte) {
		if len(session) > 64<<10 {
			return
		}
		d.checkSMTP(t, session)
	})
}

// seedBytes is a corpus session as one stream: every step's bytes in
// order, placeholders filled in with alice's credentials.
func seedBytes(s paritySession, id string) []byte {
	pw := "secret-alice" // mailstack.DefaultUsers
	subst := strings.NewReplacer(
		"{AUTH}", base64.StdEncoding.EncodeToString([]byte("\x00alice\x00"+pw)),
		"{BAD}", base64.StdEncoding.EncodeToString([]byte("\x00alice\x00wrong")),
		"{USER64}", base64.StdEncoding.EncodeToString([]byte("alice")),
		"{PASS64}", base64.StdEncoding.EncodeToString([]byte(pw)),
		"{ID}", id)
	var b bytes.Buffer
	for _, st := range s.steps {
		text := subst.Replace(st.send)
		if st.bdat {
			fmt.Fprintf(&b, "BDAT %d", len(text))
			if st.last {
				b.WriteString(" LAST")
			}
			b.WriteString("\r\n")
		}
		b.WriteString(text)
	}
	b.WriteString("QUIT\r\n")
	return b.Bytes()
}

// smtpUsers are the mailboxes the check reads.
var smtpUsers = []string{"alice", "bob", "carol"}

func (d *differential) checkSMTP(t *testing.T, session []byte) {
	d.logs.reset()
	start, _ := d.tb.Daemon.Log.Last()
	next := map[string]imap.UID{}
	for _, u := range smtpUsers {
		next[u] = d.uidNext(t, u)
	}

	// The client: everything at once, then the end of its stream.
	conn, err := net.DialTimeout("tcp", d.tb.SMTPAddr(), d.wait)
	if err != nil {
		t.Fatalf("connect to the front door: %v", err)
	}
	defer conn.Close()
	read := make(chan error, 1)
	var replies bytes.Buffer
	go func() {
		_, err := io.Copy(&replies, bufio.NewReader(conn))
		read <- err
	}()
	conn.SetWriteDeadline(time.Now().Add(d.wait))
	conn.Write(session) // the server may close before it read everything
	conn.(*net.TCPConn).CloseWrite()
	select {
	case <-read:
	case <-time.After(d.wait):
		conn.Close()
		<-read // replies is the reader's until it returns
		t.Fatalf("input %q: the front door kept the session open %v after the client's stream ended\nreplies: %q\n%s",
			session, d.wait, clip(replies.Bytes()), d.logs.tail(4<<10))
	}

	// What the log says, once every verb has its outcome and what it
	// accepted has been delivered; then the mailboxes.
	var fails []string
	var got map[string]map[string]int
	var subs, dels []undolog.Verb
	for deadline := time.Now().Add(d.wait); ; time.Sleep(100 * time.Millisecond) {
		subs = d.verbsAfter(t, start, verb.KindSMTPSubmit)
		dels = d.verbsAfter(t, start, verb.KindLMTPDeliver)
		got = map[string]map[string]int{}
		for _, u := range smtpUsers {
			got[u] = d.newMessages(t, u, next[u])
		}
		pf, _ := os.ReadFile(d.tb.Stack.PostfixLog())
		fails = checkDeliveries(subs, dels, got, d.tb.Stack.Domain, string(pf), func(id string) []undolog.Verb {
			vs, err := d.tb.Daemon.Log.Verbs(context.Background(), undolog.Filter{UndoID: id})
			if err != nil {
				t.Fatalf("read the undo log: %v", err)
			}
			return vs
		})
		if len(fails) == 0 || time.Now().After(deadline) {
			break
		}
	}
	if len(fails) > 0 {
		t.Fatalf("input %q:\n%s\n\nreplies: %q\nsubmissions:\n%s\ndeliveries:\n%s\nundomail's log:\n%s",
			session, strings.Join(fails, "\n"), clip(replies.Bytes()), describeDeliveries(subs), describeDeliveries(dels), d.logs.tail(6<<10))
	}
	t.Logf("%d submissions, %d deliveries logged; replies: %q", len(subs), len(dels), clip(replies.Bytes()))
}

// checkDeliveries holds the logged submissions and deliveries against the
// messages that reached each user (topmost undo id: count), given
// Postfix's log; byID looks up the verbs of an undo id arriving that
// subs and dels do not name (logged before them).
func checkDeliveries(subs, dels []undolog.Verb, got map[string]map[string]int, domain, postfixLog string, byID func(string) []undolog.Verb) []string {
	var fails []string
	allowed := map[string]map[string]bool{} // user: ids that may arrive
	allow := func(u, id string) {
		if allowed[u] == nil {
			allowed[u] = map[string]bool{}
		}
		allowed[u][id] = true
	}
	for _, v := range subs {
		a, o := decodeDelivery(v)
		if o == nil {
			fails = append(fails, fmt.Sprintf("submission %d (%s) has no outcome", v.Seq, a.UndoID))
			continue
		}
		if o.Reply == nil || o.Reply.Code/100 != 2 {
			continue
		}
		names := map[string]int{}
		for _, r := range a.Rcpts {
			if u := localUser(r, domain); u != "" {
				names[u]++
			}
		}
		for u, n := range names {
			allow(u, a.UndoID)
			switch c := got[u][a.UndoID]; {
			case c == 0 && bounced(postfixLog, o.Reply.Text, u):
			case c == 0:
				fails = append(fails, fmt.Sprintf("submission %d (%s) was accepted for %s and did not reach the mailbox", v.Seq, a.UndoID, u))
			case c > n:
				fails = append(fails, fmt.Sprintf("submission %d (%s) names %s %d times and reached the mailbox %d times", v.Seq, a.UndoID, u, n, c))
			}
		}
	}
	for _, v := range dels {
		a, o := decodeDelivery(v)
		if o == nil {
			fails = append(fails, fmt.Sprintf("delivery %d (%s) has no outcome", v.Seq, a.UndoID))
			continue
		}
		// A delivery from a submission carries the submission's id.
		id := a.UndoID
		if a.Submission != 0 && len(a.Header.PriorIDs) > 0 {
			id = a.Header.PriorIDs[0]
		}
		for _, r := range o.Rcpts {
			u := localUser(r.Rcpt, domain)
			if u == "" || r.Reply.Code/100 != 2 {
				continue
			}
			if a.Submission == 0 {
				allow(u, id)
			}
			if got[u][id] == 0 {
				fails = append(fails, fmt.Sprintf("delivery %d (%s) to %s was logged as done and is not in the mailbox", v.Seq, id, u))
			}
		}
	}
	for _, u := range smtpUsers {
		for id, n := range got[u] {
			if !allowed[u][id] && id != "" {
				for _, v := range byID(id) {
					if v.Kind == verb.KindLMTPDeliver && deliveredTo(v, u, domain) {
						allow(u, id)
					}
				}
			}
			if !allowed[u][id] {
				fails = append(fails, fmt.Sprintf("%d message(s) with undo id %q reached %s, which the log does not show accepted for %s", n, id, u, u))
			}
		}
	}
	slices.Sort(fails)
	return fails
}

// deliveredTo reports whether delivery v came from no submission and
// was logged as done for user.
func deliveredTo(v undolog.Verb, user, domain string) bool {
	a, o := decodeDelivery(v)
	if o == nil || a.Submission != 0 {
		return false
	}
	for _, r := range o.Rcpts {
		if localUser(r.Rcpt, domain) == user && r.Reply.Code/100 == 2 {
			return true
		}
	}
	return false
}

// decodeDelivery reads a delivery verb's arguments and outcome (nil when
// none was logged or it does not decode, which the checks then report).
func decodeDelivery(v undolog.Verb) (verb.DeliveryArgs, *verb.DeliveryOutcome) {
	var a verb.DeliveryArgs
	json.Unmarshal(v.Args, &a)
	if v.Outcome == nil {
		return a, nil
	}
	var o verb.DeliveryOutcome
	if json.Unmarshal(v.Outcome.Outcome, &o) != nil {
		return a, nil
	}
	return a, &o
}

// queuedAs finds Postfix's queue id in its reply to the end of a message.
var queuedAs = regexp.MustCompile(`queued as ([0-9A-F]+)`)

// bounced reports whether Postfix's log shows the message its reply
// queued bounced for user.
func bounced(postfixLog, reply, user string) bool {
	m := queuedAs.FindStringSubmatch(reply)
	if m == nil {
		return false
	}
	for _, l := range strings.Split(postfixLog, "\n") {
		if strings.Contains(l, " "+m[1]+": to=<"+user) && strings.Contains(l, "status=bounced") {
			return true
		}
	}
	return false
}

// localUser is the test user an address names ("Alice+x@EXAMPLE.test":
// alice), or "".
func localUser(addr, domain string) string {
	addr = strings.ToLower(strings.Trim(addr, "<>"))
	local, dom, ok := strings.Cut(addr, "@")
	if !ok || dom != domain {
		return ""
	}
	local, _, _ = strings.Cut(local, "+")
	if slices.Contains(smtpUsers, local) {
		return local
	}
	return ""
}

func (d *differential) verbsAfter(t *testing.T, after int64, kind string) []undolog.Verb {
	t.Helper()
	vs, err := d.tb.Daemon.Log.Verbs(context.Background(), undolog.Filter{Kinds: []string{kind}, AfterSeq: after})
	if err != nil {
		t.Fatalf("read the undo log: %v", err)
	}
	return vs
}

func describeDeliveries(vs []undolog.Verb) string {
	var b strings.Builder
	for _, v := range vs {
		a, o := decodeDelivery(v)
		out := "no outcome"
		if o != nil {
			out = o.Summary()
		}
		fmt.Fprintf(&b, "  %d %s submission=%d prior=%v: %s\n", v.Seq, a.Summary(), a.Submission, a.Header.PriorIDs, out)
	}
	return b.String()
}

// uidNext is the UID the next message in user's INBOX will get.
func (d *differential) uidNext(t *testing.T, user string) imap.UID {
	t.Helper()
	c := d.dial(t, user)
	defer c.Close()
	st, err := c.Status("INBOX", &imap.StatusOptions{UIDNext: true}).Wait()
	if err != nil {
		t.Fatalf("status of %s's INBOX: %v", user, err)
	}
	return st.UIDNext
}

// newMessages counts the messages in user's INBOX from UID from on by
// their topmost undo id ("" for none).
func (d *differential) newMessages(t *testing.T, user string, from imap.UID) map[string]int {
	t.Helper()
	c := d.dial(t, user)
	defer c.Close()
	if _, err := c.Select("INBOX", &imap.SelectOptions{ReadOnly: true}).Wait(); err != nil {
		t.Fatalf("select %s's INBOX: %v", user, err)
	}
	var set imap.UIDSet
	set.AddRange(from, 0)
	section := &imap.FetchItemBodySection{Specifier: imap.PartSpecifierHeader, HeaderFields: []string{verb.TraceHeader}, Peek: true}
	msgs, err := c.Fetch(set, &imap.FetchOptions{UID: true, BodySection: []*imap.FetchItemBodySection{section}}).Collect()
	if err != nil {
		t.Fatalf("fetch %s's new messages: %v", user, err)
	}
	out := map[string]int{}
	for _, m := range msgs {
		if m.UID < from { // "from:*" names the last message when none is new
			continue
		}
		out[topmostID(m.FindBodySection(section))]++
	}
	return out
}

// topmostID is the value of the first Undomail-Id field of a header.
func topmostID(hdr []byte) string {
	for _, l := range strings.Split(string(hdr), "\n") {
		name, value, ok := strings.Cut(l, ":")
		if ok && strings.EqualFold(strings.TrimSpace(name), verb.TraceHeader) {
			return strings.TrimSpace(value)
		}
	}
	return ""
}
