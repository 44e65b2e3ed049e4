package replay

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/textproto"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/proxy/imapwire"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// userReplayer replays one user's verbs, in order, in one IMAP session.
// It keeps a model of every mailbox it touches: the messages (by UID,
// with their undo id and flags) as they were when it first looked, with
// every replayed change applied. The model translates the undo ids verbs
// name into the UIDs messages have now, and after the replay it is what
// the store must hold (verify).
type userReplayer struct {
	user string
	t    Target
	log  *undolog.Log
	fs   *filterSet

	c        *imapclient.Client
	lmtp     *smtp.Client // re-deliveries, one session for the user's run
	pending  []pendingDelivery
	selected string
	boxes    map[string]*mbox
	// removed are the undo ids of messages the repair kept out of this
	// user's store; they stay out wherever the user later copied or moved
	// them.
	removed map[string]bool
	// taken are undo ids this replay expunged or moved away by replaying
	// a verb. The log holds each user's verbs in the order the server ran
	// them, so a later verb that names such a message in the mailbox it
	// left found it gone the first time too: it had no effect then, and
	// has none now, which is no paradox.
	taken map[string]bool
	// picked maps the UIDs translate picked last to the first-run UIDs
	// the verb named them by.
	picked map[imap.UID]imap.UID
	// redelivered are the undo ids of messages this replay re-delivered:
	// the server's own filing (Sieve) placed them, perhaps elsewhere than
	// the first time, and the user's later verbs on them follow them.
	redelivered map[string]bool
	made        int // messages made again: deliveries and APPENDs
	// filtered are the deliveries a filter dropped or filed elsewhere,
	// by undo id: the cycle's verification lets them differ from the
	// present (present.go).
	filtered map[string]FilteredDelivery
	// gone are this user's mailboxes the rewind took away, by name; when
	// the replay makes one again, restore gives it its old UIDVALIDITY.
	gone       map[string]verb.MailboxCounters
	restore    func(context.Context, verb.MailboxCounters) (bool, error)
	restored   int
	renumbered int
	// precreated are gone mailboxes made again, empty, before anything
	// else, so whatever fills them (a replayed CREATE, the server's own
	// filing) finds them with their old UIDVALIDITY; finish removes the
	// ones nothing claimed.
	precreated map[string]bool
	// vanished are the messages the rollback brought back under UIDs
	// clients saw disappear (RewindOutcome.Returning), by mailbox and
	// UID. One of them still present at the end (its EXPUNGE cancelled,
	// say) gets a new UID: a client that synced its disappearance must
	// see it as new mail, and never takes an old UID back.
	vanished map[string]map[imap.UID]bool
	// deletedBefore are the mailboxes the first run deleted so far, by
	// name and the UIDVALIDITY they had then. A session that had one
	// selected can still send commands on its stale view after another
	// session deleted it, and Dovecot answers OK having changed nothing:
	// such a verb names the deleted mailbox's UIDVALIDITY and has no
	// effect in the replay either, even where a mailbox of that name
	// exists again.
	deletedBefore map[string]map[uint32]bool
}

// mbox is the model of one mailbox.
type mbox struct {
	msgs map[imap.UID]*msgState
	// orig maps the UIDs the first run knew messages by to the UIDs they
	// have in this replay: the messages read before anything was replayed
	// kept theirs, APPENDUID and COPYUID map the ones the replay made
	// again. Copies of one message share its undo id, and a verb that
	// names one of them by its first-run UID must act on that one; a
	// first-run UID mapped to a message no longer there names one a
	// replayed verb took away (resolve).
	orig map[imap.UID]imap.UID
}

type msgState struct {
	id    string // undo id ("" unknown: appended before undomail knew it)
	flags map[imap.Flag]bool
}

func newUserReplayer(user string, t Target, l *undolog.Log, fs *filterSet) *userReplayer {
	return &userReplayer{user: user, t: t, log: l, fs: fs, boxes: map[string]*mbox{}, removed: map[string]bool{}, taken: map[string]bool{}, redelivered: map[string]bool{}, filtered: map[string]FilteredDelivery{}, gone: map[string]verb.MailboxCounters{}, precreated: map[string]bool{},
		vanished: map[string]map[imap.UID]bool{}, deletedBefore: map[string]map[uint32]bool{}}
}

func (r *userReplayer) close() {
	if r.lmtp != nil {
		r.lmtp.Quit()
		r.lmtp.Close()
		r.lmtp = nil
	}
	if r.c != nil {
		r.c.Logout().Wait()
		r.c.Close()
		r.c = nil
	}
}

var skipped = verb.ReplayOutcome{Status: verb.ReplaySkipped}

// run replays one task.
func (r *userReplayer) run(ctx context.Context, tk task) (verb.ReplayOutcome, error) {
	if err := ctx.Err(); err != nil {
		return verb.ReplayOutcome{}, err
	}
	r.noteDeleted(tk.v)
	if tk.fixed != nil {
		// A re-injection took the message away from this recipient: later
		// verbs on it here are skipped as repaired.
		var a verb.DeliveryArgs
		if json.Unmarshal(tk.v.Args, &a) == nil {
			r.removed[a.UndoID] = true
		}
		return *tk.fixed, nil
	}
	if tk.cancel != "" {
		if tk.rcpt == "" && (tk.v.Kind == verb.KindIMAPAppend) {
			// The message the cancelled APPEND made is not in the store:
			// later verbs on it are skipped as repaired.
			var a verb.IMAPArgs
			if json.Unmarshal(tk.v.Args, &a) == nil && a.UndoID != "" {
				r.removed[a.UndoID] = true
			}
		}
		if tk.rcpt != "" {
			var a verb.DeliveryArgs
			if json.Unmarshal(tk.v.Args, &a) == nil {
				r.removed[a.UndoID] = true
			}
		}
		return verb.ReplayOutcome{Status: verb.ReplayCancelled, Detail: tk.cancel}, nil
	}
	if tk.rcpt != "" {
		out, deferred, err := r.queueDelivery(ctx, tk)
		if deferred {
			res := r.flush()
			return res[len(res)-1].out, res[len(res)-1].err
		}
		return out, err
	}
	if err := r.session(); err != nil {
		return verb.ReplayOutcome{}, err
	}
	v := tk.v
	if v.Kind == verb.KindIMAPFetch {
		var a verb.IMAPFetchArgs
		if err := json.Unmarshal(v.Args, &a); err != nil {
			return skipped, nil
		}
		return r.onMessages(v, verb.IMAPArgs{Command: "FETCH", Mailbox: a.Mailbox, UIDValidity: a.UIDValidity, UIDs: a.UIDs, Op: "+", Flags: []string{`\Seen`}, UndoIDs: a.UndoIDs})
	}
	var a verb.IMAPArgs
	if err := json.Unmarshal(v.Args, &a); err != nil {
		return skipped, nil
	}
	var err error
	switch v.Kind {
	case verb.KindIMAPCreate:
		if r.precreated[a.Mailbox] {
			delete(r.precreated, a.Mailbox)
			return verb.ReplayOutcome{Status: verb.ReplayOK, Detail: "made again with its old UIDVALIDITY"}, nil
		}
		if err = r.c.Create(a.Mailbox, nil).Wait(); err == nil {
			r.boxes[a.Mailbox] = &mbox{msgs: map[imap.UID]*msgState{}}
			err = r.remade(ctx, a.Mailbox)
		}
	case verb.KindIMAPDelete:
		if err := r.leave(a.Mailbox); err != nil {
			return verb.ReplayOutcome{}, err
		}
		if err = r.c.Delete(a.Mailbox).Wait(); err == nil {
			delete(r.boxes, a.Mailbox)
			delete(r.precreated, a.Mailbox) // gone again: nothing left to remove
			if r.selected == a.Mailbox {
				r.selected = ""
			}
		}
	case verb.KindIMAPRename:
		if r.precreated[a.Dest] {
			// The name the user renamed to was made again in advance;
			// the renamed mailbox takes it, as it did the first time.
			if err := r.unprecreate(a.Dest); err != nil {
				return verb.ReplayOutcome{}, err
			}
		}
		if err := r.leave(a.Mailbox); err != nil {
			return verb.ReplayOutcome{}, err
		}
		if err = r.c.Rename(a.Mailbox, a.Dest, nil).Wait(); err == nil {
			r.renamed(a.Mailbox, a.Dest)
			if r.precreated[a.Mailbox] {
				// Made in advance and renamed as the first run renamed it:
				// the name is free again, the new one is claimed.
				delete(r.precreated, a.Mailbox)
			}
		}
	case verb.KindIMAPSetMetadata:
		entries := map[string]*[]byte{}
		for k, val := range a.Metadata {
			if val == nil {
				entries[k] = nil
				continue
			}
			b := []byte(*val)
			entries[k] = &b
		}
		err = r.c.SetMetadata(a.Mailbox, entries).Wait()
	case verb.KindIMAPSubscribe:
		err = r.c.Subscribe(a.Mailbox).Wait()
	case verb.KindIMAPUnsubscribe:
		err = r.c.Unsubscribe(a.Mailbox).Wait()
	case verb.KindIMAPAppend:
		return r.append(v, a)
	case verb.KindIMAPStore, verb.KindIMAPCopy, verb.KindIMAPMove, verb.KindIMAPExpunge:
		return r.onMessages(v, a)
	default:
		return skipped, nil
	}
	if err != nil {
		return verb.ReplayOutcome{}, err
	}
	return verb.ReplayOutcome{Status: verb.ReplayOK}, nil
}

// noteDeleted records a mailbox the first run deleted (an OK DELETE
// with its UIDVALIDITY), whether the replay repeats the DELETE or the
// repair cancelled it: later verbs naming that UIDVALIDITY had no effect
// the first time.
func (r *userReplayer) noteDeleted(v undolog.Verb) {
	if v.Kind != verb.KindIMAPDelete || v.Outcome == nil {
		return
	}
	var a verb.IMAPArgs
	var o verb.IMAPOutcome
	if json.Unmarshal(v.Args, &a) != nil || json.Unmarshal(v.Outcome.Outcome, &o) != nil || o.Status != "OK" || a.UIDValidity == 0 {
		return
	}
	if r.deletedBefore[a.Mailbox] == nil {
		r.deletedBefore[a.Mailbox] = map[uint32]bool{}
	}
	r.deletedBefore[a.Mailbox][a.UIDValidity] = true
}

// leave unselects the mailbox the session has selected if it is name or
// below it, before a DELETE or RENAME of name: Dovecot ends a session
// whose selected mailbox went away under it (BYE), and the rest of the
// user's replay would fail with it.
func (r *userReplayer) leave(name string) error {
	if r.selected == "" || r.selected != name && !isChild(r.selected, name) {
		return nil
	}
	if err := r.c.Unselect().Wait(); err != nil {
		return fmt.Errorf("unselect %s before it is renamed or deleted: %w", r.selected, err)
	}
	r.selected = ""
	return nil
}

// remade gives a mailbox the replay made again the UIDVALIDITY it had
// before the rewind took it away, while it is empty and not selected.
func (r *userReplayer) remade(ctx context.Context, mailbox string) error {
	g, ok := r.gone[mailbox]
	if !ok || r.restore == nil {
		return nil
	}
	delete(r.gone, mailbox)
	if r.selected == mailbox {
		if err := r.c.Unselect().Wait(); err != nil {
			return err
		}
		r.selected = ""
	}
	changed, err := r.restore(ctx, g)
	if err != nil {
		return err
	}
	if changed {
		r.restored++
	}
	return nil
}

// renamed moves the model of a renamed mailbox and its children. Renaming
// INBOX moves its messages and leaves an empty INBOX (RFC 9051 6.3.6).
func (r *userReplayer) renamed(from, to string) {
	if r.selected != "" && (r.selected == from || isChild(r.selected, from)) {
		r.selected = ""
	}
	if strings.EqualFold(from, "INBOX") {
		if b := r.boxes["INBOX"]; b != nil {
			r.boxes[to] = b
			r.boxes["INBOX"] = &mbox{msgs: map[imap.UID]*msgState{}}
		}
		return
	}
	for name, b := range r.boxes {
		switch {
		case name == from:
			delete(r.boxes, name)
			r.boxes[to] = b
		case isChild(name, from):
			delete(r.boxes, name)
			r.boxes[to+name[len(from):]] = b
		}
	}
}

// isChild reports whether name is below parent, for either usual
// hierarchy separator.
func isChild(name, parent string) bool {
	return strings.HasPrefix(name, parent+"/") || strings.HasPrefix(name, parent+".")
}

// prepare makes every mailbox of the user the rewind took away again,
// empty, with its old UIDVALIDITY and counters: a replayed delivery that
// the server files into one (Sieve's fileinto :create) or a replayed
// CREATE then finds it as clients knew it.
func (r *userReplayer) prepare(ctx context.Context) error {
	if r.restore == nil {
		return nil
	}
	names := make([]string, 0, len(r.gone))
	for name := range r.gone {
		names = append(names, name)
	}
	sort.Strings(names) // parents first
	for _, name := range names {
		if strings.EqualFold(name, "INBOX") {
			continue // always there; restored before its first delivery
		}
		if err := r.c.Create(name, nil).Wait(); err != nil {
			return fmt.Errorf("make %s again: %w", name, err)
		}
		r.precreated[name] = true
		r.boxes[name] = &mbox{msgs: map[imap.UID]*msgState{}}
		if err := r.remade(ctx, name); err != nil {
			return err
		}
	}
	return nil
}

// unprecreate deletes a mailbox prepare made that nothing claimed.
func (r *userReplayer) unprecreate(name string) error {
	if r.selected == name {
		if err := r.c.Unselect().Wait(); err != nil {
			return err
		}
		r.selected = ""
	}
	if err := r.c.Delete(name).Wait(); err != nil {
		return fmt.Errorf("remove %s, made again in advance: %w", name, err)
	}
	delete(r.precreated, name)
	delete(r.boxes, name)
	return nil
}

// renumber gives the messages that came back under a UID clients saw
// expunged a new UID: a copy into the same mailbox (flags travel with
// it), then the old one expunged.
func (r *userReplayer) renumber() (int, error) {
	n := 0
	for name, uids := range r.vanished {
		b, err := r.load(name)
		var ie *imap.Error
		if errors.As(err, &ie) && ie.Code == imap.ResponseCodeNonExistent {
			continue // the mailbox is gone: nothing came back
		}
		if err != nil {
			return n, err
		}
		var set imap.UIDSet
		for u := range uids {
			if b.msgs[u] != nil {
				set.AddNum(u)
			}
		}
		if len(set) == 0 {
			continue
		}
		if err := r.sel(name); err != nil {
			return n, err
		}
		data, err := r.c.Copy(set, name).Wait()
		if err != nil {
			return n, fmt.Errorf("renumber %s uid %s: %w", name, set, err)
		}
		if err := learnCopies(b, b, data.SourceUIDs, data.DestUIDs); err != nil {
			return n, fmt.Errorf("renumber %s: %w", name, err)
		}
		if err := r.c.Store(set, &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagDeleted}}, nil).Close(); err != nil {
			return n, err
		}
		if err := r.c.UIDExpunge(set).Close(); err != nil {
			return n, err
		}
		olds, _ := set.Nums()
		for _, u := range olds {
			delete(b.msgs, u)
		}
		n += len(olds)
	}
	return n, nil
}

// finish gives messages that came back a new UID (renumber), and removes
// the mailboxes prepare made that stayed empty and that no replayed verb
// made: they do not exist in the new timeline.
func (r *userReplayer) finish() error {
	n, err := r.renumber()
	r.renumbered += n
	if err != nil {
		return err
	}
	for name := range r.precreated {
		b, err := r.read(name)
		if err != nil {
			return err
		}
		if len(b.msgs) > 0 {
			continue // the server filed mail into it: it exists now
		}
		if err := r.unprecreate(name); err != nil {
			return err
		}
	}
	return nil
}

// session logs in as the user through the master user, once, and
// prepares the mailboxes the rewind took away.
func (r *userReplayer) session() error {
	if r.c != nil {
		return nil
	}
	c, err := imapclient.DialInsecure(r.t.IMAPAddr, nil)
	if err != nil {
		return fmt.Errorf("connect to %s: %w", r.t.IMAPAddr, err)
	}
	if err := c.Login(r.user+r.t.Separator+r.t.MasterUser, r.t.MasterPassword).Wait(); err != nil {
		c.Close()
		return fmt.Errorf("log in as %s through the master user: %w", r.user, err)
	}
	r.c = c
	if err := r.prepare(context.Background()); err != nil {
		return fmt.Errorf("prepare %s's mailboxes: %w", r.user, err)
	}
	return nil
}

// sel selects a mailbox if it is not selected.
func (r *userReplayer) sel(mailbox string) error {
	if r.selected == mailbox {
		return nil
	}
	if _, err := r.c.Select(mailbox, nil).Wait(); err != nil {
		r.selected = ""
		return fmt.Errorf("select %s: %w", mailbox, err)
	}
	r.selected = mailbox
	return nil
}

// idSection fetches a message's Undomail-Id fields.
var idSection = &imap.FetchItemBodySection{Specifier: imap.PartSpecifierHeader, HeaderFields: []string{verb.TraceHeader}, Peek: true}

// read fetches what a mailbox holds now: UIDs, flags and undo ids. It
// selects the mailbox.
func (r *userReplayer) read(mailbox string) (*mbox, error) {
	if err := r.sel(mailbox); err != nil {
		return nil, err
	}
	// A NOOP first, so the session sees deliveries made since it selected.
	if err := r.c.Noop().Wait(); err != nil {
		return nil, err
	}
	all := imap.UIDSet{imap.UIDRange{Start: 1, Stop: 0}}
	msgs, err := r.c.Fetch(all, &imap.FetchOptions{UID: true, Flags: true, BodySection: []*imap.FetchItemBodySection{idSection}}).Collect()
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", mailbox, err)
	}
	b := &mbox{msgs: map[imap.UID]*msgState{}, orig: map[imap.UID]imap.UID{}}
	for _, m := range msgs {
		b.msgs[m.UID] = &msgState{id: topmostID(m.FindBodySection(idSection)), flags: flagSet(m.Flags)}
		// Read before the replay placed anything here (every verb that
		// places messages reads its mailbox first), a message has the UID
		// the first run knew it by.
		b.orig[m.UID] = m.UID
	}
	return b, nil
}

// load returns the model of a mailbox, reading it on first use.
func (r *userReplayer) load(mailbox string) (*mbox, error) {
	if b := r.boxes[mailbox]; b != nil {
		return b, nil
	}
	b, err := r.read(mailbox)
	if err != nil {
		return nil, err
	}
	r.boxes[mailbox] = b
	return b, nil
}

// topmostID is the newest Undomail-Id in a header block.
func topmostID(h []byte) string {
	tr := textproto.NewReader(bufio.NewReader(bytes.NewReader(h)))
	hdr, _ := tr.ReadMIMEHeader()
	return strings.TrimSpace(hdr.Get(verb.TraceHeader))
}

func flagSet(fs []imap.Flag) map[imap.Flag]bool {
	m := map[imap.Flag]bool{}
	for _, f := range fs {
		if f != imap.Flag(`\Recent`) {
			m[f] = true
		}
	}
	return m
}

// pendingDelivery is a delivery sent over LMTP whose message the
// replayer has not found in the store yet (flush does, for a run of them
// at once).
type pendingDelivery struct {
	tk     task
	undoID string
}

// settled is the result of a task whose outcome was deferred.
type settled struct {
	tk  task
	out verb.ReplayOutcome
	err error
}

// queueDelivery re-delivers a captured delivery to one recipient that
// accepted it the first time, exactly as it was forwarded then, unless
// the repair's filters drop it or file it elsewhere. A delivery sent is
// deferred: flush finds it in the store with the rest of its run, one
// search for many messages instead of one each.
func (r *userReplayer) queueDelivery(ctx context.Context, tk task) (out verb.ReplayOutcome, deferred bool, err error) {
	v, rcpt := tk.v, tk.rcpt
	var a verb.DeliveryArgs
	if json.Unmarshal(v.Args, &a) != nil {
		return skipped, false, nil
	}
	if err := r.session(); err != nil {
		return verb.ReplayOutcome{}, false, err
	}
	// Read INBOX as it is before the delivery, so the model can tell the
	// new message from the ones already there. An INBOX the rewind took
	// away gets its old counters back before anything is delivered.
	if r.boxes["INBOX"] == nil {
		if err := r.remade(ctx, "INBOX"); err != nil {
			return verb.ReplayOutcome{}, false, err
		}
		if _, err := r.load("INBOX"); err != nil {
			return verb.ReplayOutcome{}, false, err
		}
	}
	if v.Kind != verb.KindCompensation { // an explanation is never filtered away
		f, err := r.fs.judge(ctx, v.Seq, a, func() ([]byte, error) { return r.log.ReadBlob(v.Blob) })
		if err != nil {
			return verb.ReplayOutcome{}, false, err
		}
		if f != nil {
			out, err := r.filed(ctx, v, a, f)
			return out, false, err
		}
	}
	body, err := r.log.OpenBlob(v.Blob)
	if err != nil {
		return verb.ReplayOutcome{}, false, fmt.Errorf("open message blob: %w", err)
	}
	defer body.Close()
	if err := r.lmtpSend(ctx, a, rcpt, body); err != nil {
		return verb.ReplayOutcome{}, false, err
	}
	r.pending = append(r.pending, pendingDelivery{tk: tk, undoID: a.UndoID})
	return verb.ReplayOutcome{}, true, nil
}

// flush finds the messages of the deliveries sent since the last flush:
// the new messages in INBOX, read in one FETCH, and any the server's own
// filing (Sieve) put elsewhere, searched for one by one.
func (r *userReplayer) flush() []settled {
	if len(r.pending) == 0 {
		return nil
	}
	pending := r.pending
	r.pending = nil
	out := make([]settled, 0, len(pending))
	fail := func(err error) []settled {
		for _, p := range pending {
			out = append(out, settled{tk: p.tk, err: fmt.Errorf("find the re-delivered message for %s: %w", p.tk.rcpt, err)})
		}
		return out
	}
	b := r.boxes["INBOX"]
	if err := r.sel("INBOX"); err != nil {
		return fail(err)
	}
	if err := r.c.Noop().Wait(); err != nil {
		return fail(err)
	}
	var top imap.UID
	for u := range b.msgs {
		top = max(top, u)
	}
	msgs, err := r.c.Fetch(imap.UIDSet{imap.UIDRange{Start: top + 1, Stop: 0}},
		&imap.FetchOptions{UID: true, Flags: true, BodySection: []*imap.FetchItemBodySection{idSection}}).Collect()
	if err != nil {
		return fail(err)
	}
	found := map[string]int{}
	for _, m := range msgs {
		if m.UID <= top { // n:* names the last message even when it is below n
			continue
		}
		id := topmostID(m.FindBodySection(idSection))
		b.msgs[m.UID] = &msgState{id: id, flags: flagSet(m.Flags)}
		found[id]++
	}
	for _, p := range pending {
		var err error
		if found[p.undoID] > 0 {
			found[p.undoID]--
		} else {
			err = r.learnDelivered(p.undoID)
		}
		if err != nil {
			out = append(out, settled{tk: p.tk, err: fmt.Errorf("find the re-delivered message for %s: %w", p.tk.rcpt, err)})
			continue
		}
		r.made++
		r.redelivered[p.undoID] = true
		out = append(out, settled{tk: p.tk, out: verb.ReplayOutcome{Status: verb.ReplayOK, Detail: "re-delivered to " + p.tk.rcpt}})
	}
	return out
}

// lmtpSend delivers one message to one recipient over the replayer's LMTP
// session, opening it if needed; a failed session is dropped.
func (r *userReplayer) lmtpSend(ctx context.Context, a verb.DeliveryArgs, rcpt string, body io.Reader) error {
	if r.lmtp == nil {
		conn, err := (&net.Dialer{Timeout: 30 * time.Second}).DialContext(ctx, "tcp", r.t.LMTPAddr)
		if err != nil {
			return err
		}
		c := smtp.NewClientLMTP(conn)
		if err := c.Hello("undomail-replay"); err != nil {
			c.Close()
			return err
		}
		r.lmtp = c
	}
	if err := lmtpTransaction(r.lmtp, a, rcpt, body); err != nil {
		r.lmtp.Close()
		r.lmtp = nil
		return err
	}
	return nil
}

// lmtpTransaction is one LMTP transaction for one recipient.
func lmtpTransaction(c *smtp.Client, a verb.DeliveryArgs, rcpt string, body io.Reader) error {
	if err := c.Mail(a.MailFrom, nil); err != nil {
		return err
	}
	if err := c.Rcpt(rcpt, nil); err != nil {
		return fmt.Errorf("RCPT %s: %w", rcpt, err)
	}
	w, err := c.Data()
	if err != nil {
		return err
	}
	if a.Submission == 0 {
		fmt.Fprintf(w, "%s: %s\r\n", verb.TraceHeader, a.UndoID)
	}
	if _, err := io.Copy(w, body); err != nil {
		return fmt.Errorf("send message: %w", err)
	}
	_, err = w.CloseWithLMTPResponse()
	return err
}

// filed carries out a filter's verdict on a delivery: drop it, or file it
// into a folder with APPEND.
func (r *userReplayer) filed(ctx context.Context, v undolog.Verb, a verb.DeliveryArgs, f *Filter) (verb.ReplayOutcome, error) {
	folder, move := strings.CutPrefix(f.Action, "move:")
	if !move {
		r.removed[a.UndoID] = true
		r.filtered[a.UndoID] = FilteredDelivery{Why: "dropped by filter " + f.Spec, Dropped: true}
		return verb.ReplayOutcome{Status: verb.ReplayFiltered, Detail: "dropped by filter " + f.Spec}, nil
	}
	msg, err := r.log.ReadBlob(v.Blob)
	if err != nil {
		return verb.ReplayOutcome{}, fmt.Errorf("read message blob: %w", err)
	}
	if a.Submission == 0 {
		msg = append([]byte(verb.TraceHeader+": "+a.UndoID+"\r\n"), msg...)
	}
	if r.boxes[folder] == nil {
		if err := r.c.Create(folder, nil).Wait(); err == nil {
			r.boxes[folder] = &mbox{msgs: map[imap.UID]*msgState{}}
			if err := r.remade(ctx, folder); err != nil {
				return verb.ReplayOutcome{}, err
			}
		} // else it exists already
	}
	b, err := r.load(folder)
	if err != nil {
		return verb.ReplayOutcome{}, err
	}
	cmd := r.c.Append(folder, int64(len(msg)), nil)
	cmd.Write(msg)
	cmd.Close()
	data, err := cmd.Wait()
	if err != nil {
		return verb.ReplayOutcome{}, fmt.Errorf("file into %s: %w", folder, err)
	}
	if data == nil || data.UID == 0 {
		return verb.ReplayOutcome{}, errors.New("APPEND gave no APPENDUID")
	}
	b.msgs[data.UID] = &msgState{id: a.UndoID, flags: map[imap.Flag]bool{}}
	r.made++
	r.filtered[a.UndoID] = FilteredDelivery{Why: "filed into " + folder + " by filter " + f.Spec}
	return verb.ReplayOutcome{Status: verb.ReplayFiltered, Detail: "filed into " + folder + " by filter " + f.Spec}, nil
}

// learnDelivered finds the message a re-delivery made by its Undomail-Id
// field (LMTP does not say where it went): in INBOX, or wherever the
// server's own filters (Sieve) filed it.
func (r *userReplayer) learnDelivered(undoID string) error {
	if ok, err := r.findNew("INBOX", undoID); ok || err != nil {
		return err
	}
	list, err := r.c.List("", "*", nil).Collect()
	if err != nil {
		return fmt.Errorf("list mailboxes: %w", err)
	}
	for _, m := range list {
		if m.Mailbox == "INBOX" || hasAttr(m.Attrs, imap.MailboxAttrNoSelect) {
			continue
		}
		if r.boxes[m.Mailbox] == nil {
			// Reading the mailbox now takes in the new message with the
			// rest.
			b, err := r.load(m.Mailbox)
			if err != nil {
				return err
			}
			found := false
			for u, msg := range b.msgs {
				if msg.id == undoID {
					delete(b.orig, u) // placed by this replay: no first-run UID known
					found = true
				}
			}
			if found {
				return nil
			}
			continue
		}
		if ok, err := r.findNew(m.Mailbox, undoID); ok || err != nil {
			return err
		}
	}
	return errors.New("not found in any mailbox after delivery")
}

func hasAttr(attrs []imap.MailboxAttr, a imap.MailboxAttr) bool {
	for _, x := range attrs {
		if x == a {
			return true
		}
	}
	return false
}

// findNew looks for a message with undoID in a loaded mailbox that the
// model does not know yet, and adds it.
func (r *userReplayer) findNew(mailbox, undoID string) (bool, error) {
	b := r.boxes[mailbox]
	if err := r.sel(mailbox); err != nil {
		return false, err
	}
	// The session may have had the mailbox selected since before the
	// delivery: NOOP lets Dovecot show it the new message (RFC 9051 6.1.2).
	if err := r.c.Noop().Wait(); err != nil {
		return false, err
	}
	found, err := r.c.UIDSearch(&imap.SearchCriteria{Header: []imap.SearchCriteriaHeaderField{{Key: verb.TraceHeader, Value: undoID}}}, nil).Wait()
	if err != nil {
		return false, err
	}
	var fresh imap.UIDSet
	for _, u := range found.AllUIDs() {
		if b.msgs[u] == nil {
			fresh.AddNum(u)
		}
	}
	if len(fresh) == 0 {
		return false, nil
	}
	msgs, err := r.c.Fetch(fresh, &imap.FetchOptions{UID: true, Flags: true, BodySection: []*imap.FetchItemBodySection{idSection}}).Collect()
	if err != nil {
		return false, err
	}
	added := false
	for _, m := range msgs {
		// The search matches the id anywhere in the field; the model
		// takes only a message whose topmost id it is.
		if id := topmostID(m.FindBodySection(idSection)); id == undoID {
			b.msgs[m.UID] = &msgState{id: id, flags: flagSet(m.Flags)}
			added = true
		}
	}
	return added, nil
}

// translate turns the messages a verb named (UID then -> undo id) into
// the UIDs they have now. removed counts messages the repair took out,
// gone messages that do not exist now for another reason (the verb that
// made them was not replayed). A message this replay already expunged or
// moved away, as the first run had when the verb ran, is neither: the
// verb had no effect on it then and has none now.
func (r *userReplayer) translate(b *mbox, undoIDs map[string]string) (set imap.UIDSet, now []imap.UID, removed, gone int) {
	r.picked = map[imap.UID]imap.UID{}
	uidTexts := make([]string, 0, len(undoIDs))
	for uidText := range undoIDs {
		uidTexts = append(uidTexts, uidText)
	}
	slices.Sort(uidTexts) // a stable order for picking among copies
	ix := r.indexOf(b)
	for _, uidText := range uidTexts {
		id := undoIDs[uidText]
		var n uint32
		fmt.Sscan(uidText, &n)
		if r.removed[id] {
			removed++
			continue
		}
		pick, how := r.resolve(b, ix, imap.UID(n), id)
		switch how {
		case resolvedGone:
			gone++
			continue
		case resolvedTaken, resolvedUnknown:
			continue
		}
		set.AddNum(pick)
		now = append(now, pick)
		r.picked[pick] = imap.UID(n)
	}
	return set, now, removed, gone
}

// How resolve found the message a verb named.
const (
	resolvedHere  = iota // it is in the mailbox now, at the UID returned
	resolvedTaken        // this replay expunged or moved it away before
	resolvedGone         // it is not in the store after the repair
	// resolvedUnknown: a UID the verb named without an undo id that no
	// message this replay knows had the first time (a UID STORE of a UID
	// that did not exist, say).
	resolvedUnknown
)

// resolve finds the message the first run knew as UID n in this mailbox,
// with undo id id. The model maps first-run UIDs to the UIDs this replay
// gave the same messages (mbox.orig): the messages that were there before
// anything was replayed kept theirs; APPENDUID and COPYUID tell the rest.
// Copies of one message share its undo id, so only that map tells them
// apart; a message it cannot place (a delivery: LMTP tells no UID) is
// found by its undo id among the messages no first-run UID maps to yet,
// and is mapped from then on.
func (r *userReplayer) resolve(b *mbox, ix *mboxIndex, n imap.UID, id string) (imap.UID, int) {
	if u, ok := b.orig[n]; ok {
		m := b.msgs[u]
		switch {
		case m == nil:
			// Mapped, and no longer there: a replayed verb took it.
			return 0, resolvedTaken
		case id == "":
			// Named by UID alone (the proxy could not tell its id): the
			// UID is what the server acted on.
			return u, resolvedHere
		case m.id == id || m.id == "":
			m.id = id // an appended message without an Undomail-Id field
			return u, resolvedHere
		}
		// Another message holds that UID (a drill replays without
		// raising UIDNEXT, so UIDs can meet): find it by id below.
	}
	if id == "" {
		return 0, resolvedUnknown
	}
	var pick imap.UID
	for _, u := range ix.byID[id] {
		if ix.mapped[u] || b.msgs[u] == nil {
			continue
		}
		if pick == 0 || u == n {
			pick = u
		}
	}
	if pick != 0 {
		b.orig[n] = pick
		ix.mapped[pick] = true
		return pick, resolvedHere
	}
	if r.taken[id] {
		return 0, resolvedTaken
	}
	return 0, resolvedGone
}

// mboxIndex is what resolve looks messages up by, built once per verb:
// the UIDs of each undo id, ascending, and the UIDs a first-run UID maps
// to.
type mboxIndex struct {
	byID   map[string][]imap.UID
	mapped map[imap.UID]bool
}

func (r *userReplayer) indexOf(b *mbox) *mboxIndex {
	if b.orig == nil {
		b.orig = map[imap.UID]imap.UID{}
	}
	ix := &mboxIndex{byID: map[string][]imap.UID{}, mapped: make(map[imap.UID]bool, len(b.orig))}
	for u, m := range b.msgs {
		if m.id != "" {
			ix.byID[m.id] = append(ix.byID[m.id], u)
		}
	}
	for _, uids := range ix.byID {
		slices.Sort(uids)
	}
	for _, u := range b.orig {
		ix.mapped[u] = true
	}
	return ix
}

// learnOrig records, for the copies a replayed COPY or MOVE made, the
// UIDs the first run gave them (its outcome's COPYUID), by way of the
// first-run UIDs of the sources translate picked.
func (r *userReplayer) learnOrig(v undolog.Verb, dst *mbox, srcSet, dstSet imap.NumSet) {
	var o verb.IMAPOutcome
	if v.Outcome == nil || json.Unmarshal(v.Outcome.Outcome, &o) != nil {
		return
	}
	f := strings.Fields(o.CopyUID)
	s, ok1 := srcSet.(imap.UIDSet)
	d, ok2 := dstSet.(imap.UIDSet)
	if len(f) != 3 || !ok1 || !ok2 {
		return
	}
	origSrc, err1 := expandUIDs(f[1])
	origDst, err2 := expandUIDs(f[2])
	su, ok1 := s.Nums()
	du, ok2 := d.Nums()
	if err1 != nil || err2 != nil || !ok1 || !ok2 || len(origSrc) != len(origDst) || len(su) != len(du) {
		return
	}
	firstDst := map[imap.UID]imap.UID{}
	for i := range origSrc {
		firstDst[origSrc[i]] = origDst[i]
	}
	if dst.orig == nil {
		dst.orig = map[imap.UID]imap.UID{}
	}
	for i := range su {
		if n, ok := r.picked[su[i]]; ok {
			if od, ok := firstDst[n]; ok {
				dst.orig[od] = du[i]
			}
		}
	}
}

// expandUIDs lists the UIDs of a set written without "*".
func expandUIDs(set string) ([]imap.UID, error) {
	ranges, err := imapwire.ParseSeqSet(set)
	if err != nil {
		return nil, err
	}
	var out []imap.UID
	for _, rg := range ranges {
		if rg.Start == imapwire.Star || rg.Stop == imapwire.Star || rg.Stop-rg.Start > 1<<16 {
			return nil, fmt.Errorf("UID set %q cannot be listed", set)
		}
		for u := rg.Start; u <= rg.Stop; u++ {
			out = append(out, imap.UID(u))
		}
	}
	return out, nil
}

// onMessages replays STORE, COPY, MOVE, EXPUNGE and a FETCH's \Seen on
// the messages the verb named, translated to their UIDs now.
func (r *userReplayer) onMessages(v undolog.Verb, a verb.IMAPArgs) (verb.ReplayOutcome, error) {
	if a.UIDValidity != 0 && r.deletedBefore[a.Mailbox][a.UIDValidity] {
		return verb.ReplayOutcome{Status: verb.ReplayOK, Detail: fmt.Sprintf("no effect: %q (UIDVALIDITY %d) had been deleted when it ran", a.Mailbox, a.UIDValidity)}, nil
	}
	named := withoutModified(v, namedMessages(a))
	b, err := r.load(a.Mailbox)
	var ie *imap.Error
	switch {
	case errors.As(err, &ie) && ie.Code == imap.ResponseCodeNonExistent:
		// The mailbox is not there in the new timeline (the server's
		// filing created it the first time): its messages may be
		// elsewhere.
		b = &mbox{msgs: map[imap.UID]*msgState{}}
	case err != nil:
		return verb.ReplayOutcome{}, err
	}
	set, uids, removed, gone := r.translate(b, named)
	if gone > 0 {
		// A re-delivered message the server filed elsewhere this time:
		// the user's verb follows it there.
		if out, ok, err := r.follow(v, a, b); ok || err != nil {
			if err != nil || len(uids) == 0 {
				return out, err
			}
			gone = 0
		}
	}
	if len(uids) == 0 {
		if removed+gone > 0 {
			return verb.ReplayOutcome{Status: verb.ReplayRepaired, Detail: fmt.Sprintf("skipped: its %d messages are not in the store after the repair", removed+gone)}, nil
		}
		return verb.ReplayOutcome{Status: verb.ReplayOK, Detail: "no message to act on"}, nil
	}
	if err := r.sel(a.Mailbox); err != nil {
		return verb.ReplayOutcome{}, err
	}
	var placed []verb.Placed
	switch v.Kind {
	case verb.KindIMAPStore, verb.KindIMAPFetch:
		op := imap.StoreFlagsSet
		switch a.Op {
		case "+":
			op = imap.StoreFlagsAdd
		case "-":
			op = imap.StoreFlagsDel
		}
		var flags []imap.Flag
		for _, f := range a.Flags {
			flags = append(flags, imap.Flag(f))
		}
		if err := r.c.Store(set, &imap.StoreFlags{Op: op, Silent: true, Flags: flags}, nil).Close(); err != nil {
			return verb.ReplayOutcome{}, err
		}
		for _, u := range uids {
			m := b.msgs[u]
			if op == imap.StoreFlagsSet {
				m.flags = map[imap.Flag]bool{}
			}
			for _, f := range flags {
				if f == imap.Flag(`\Recent`) {
					continue
				}
				if op == imap.StoreFlagsDel {
					delete(m.flags, f)
				} else {
					m.flags[f] = true
				}
			}
		}
	case verb.KindIMAPExpunge:
		// Exactly the messages the original expunged: mark them, then
		// expunge only them (UIDPLUS), not whatever else is \Deleted now.
		if err := r.c.Store(set, &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagDeleted}}, nil).Close(); err != nil {
			return verb.ReplayOutcome{}, err
		}
		if err := r.c.UIDExpunge(set).Close(); err != nil {
			return verb.ReplayOutcome{}, err
		}
		for _, u := range uids {
			r.take(b, u)
		}
	case verb.KindIMAPCopy, verb.KindIMAPMove:
		dst, err := r.load(a.Dest)
		if err != nil {
			return verb.ReplayOutcome{}, err
		}
		if err := r.sel(a.Mailbox); err != nil {
			return verb.ReplayOutcome{}, err
		}
		var srcSet, dstSet imap.NumSet
		var validity uint32
		if v.Kind == verb.KindIMAPCopy {
			data, err := r.c.Copy(set, a.Dest).Wait()
			if err != nil {
				return verb.ReplayOutcome{}, err
			}
			srcSet, dstSet, validity = data.SourceUIDs, data.DestUIDs, data.UIDValidity
		} else {
			data, err := r.c.Move(set, a.Dest).Wait()
			if err != nil {
				return verb.ReplayOutcome{}, err
			}
			srcSet, dstSet, validity = data.SourceUIDs, data.DestUIDs, data.UIDValidity
		}
		if err := learnCopies(b, dst, srcSet, dstSet); err != nil {
			// Without COPYUID the model cannot follow the copies: read the
			// destination again.
			delete(r.boxes, a.Dest)
		} else {
			r.learnOrig(v, dst, srcSet, dstSet)
			placed = copiesPlaced(dst, a.Dest, validity, dstSet)
		}
		if v.Kind == verb.KindIMAPMove {
			for _, u := range uids {
				r.take(b, u)
			}
		}
	}
	return verb.ReplayOutcome{Status: verb.ReplayOK, Detail: fmt.Sprintf("%s uid %s", a.Mailbox, set), Placed: placed}, nil
}

// copiesPlaced lists where COPY or MOVE put messages that have an undo id.
func copiesPlaced(dst *mbox, mailbox string, validity uint32, dstSet imap.NumSet) []verb.Placed {
	d, ok := dstSet.(imap.UIDSet)
	if !ok {
		return nil
	}
	uids, ok := d.Nums()
	if !ok {
		return nil
	}
	var out []verb.Placed
	for _, u := range uids {
		if m := dst.msgs[u]; m != nil && m.id != "" {
			out = append(out, verb.Placed{Mailbox: mailbox, UIDValidity: validity, UID: uint32(u), UndoID: m.id})
		}
	}
	return out
}

// namedMessages lists the messages a verb named: each UID (decimal) with
// its undo id, "" where the proxy could not tell it.
func namedMessages(a verb.IMAPArgs) map[string]string {
	out := make(map[string]string, len(a.UndoIDs))
	if a.UIDs != "" {
		if uids, err := expandUIDs(a.UIDs); err == nil {
			for _, u := range uids {
				out[strconv.FormatUint(uint64(u), 10)] = ""
			}
		}
	}
	for uid, id := range a.UndoIDs {
		out[uid] = id
	}
	return out
}

// withoutModified drops from a conditional STORE's messages those the
// server left alone the first time (its MODIFIED response code).
func withoutModified(v undolog.Verb, ids map[string]string) map[string]string {
	if v.Kind != verb.KindIMAPStore || v.Outcome == nil {
		return ids
	}
	var o verb.IMAPOutcome
	if json.Unmarshal(v.Outcome.Outcome, &o) != nil || o.Modified == "" {
		return ids
	}
	mod, err := imapwire.ParseSeqSet(o.Modified)
	if err != nil {
		return ids
	}
	out := map[string]string{}
	for uid, id := range ids {
		var n uint32
		fmt.Sscan(uid, &n)
		if !slices.ContainsFunc(mod, func(r imapwire.SeqRange) bool { return r.Contains(n, 0) }) {
			out[uid] = id
		}
	}
	return out
}

// take removes a message the replay expunged or moved from the model of
// its mailbox.
func (r *userReplayer) take(b *mbox, u imap.UID) {
	if m := b.msgs[u]; m != nil && m.id != "" {
		r.taken[m.id] = true
	}
	delete(b.msgs, u)
}

// follow replays a verb on the re-delivered messages it named that are
// not in its mailbox now but in exactly one other: ok reports that there
// were such messages.
func (r *userReplayer) follow(v undolog.Verb, a verb.IMAPArgs, b *mbox) (out verb.ReplayOutcome, ok bool, err error) {
	present := map[string]bool{}
	for _, m := range b.msgs {
		present[m.id] = true
	}
	moved := map[string]map[string]string{} // mailbox now -> uid text -> id
	for uidText, id := range a.UndoIDs {
		if present[id] || !r.redelivered[id] {
			continue
		}
		var at []string
		for name, box := range r.boxes {
			if name == a.Mailbox {
				continue
			}
			for _, m := range box.msgs {
				if m.id == id {
					at = append(at, name)
					break
				}
			}
		}
		if len(at) != 1 {
			continue
		}
		if moved[at[0]] == nil {
			moved[at[0]] = map[string]string{}
		}
		moved[at[0]][uidText] = id
	}
	var details []string
	for mailbox, ids := range moved {
		if a.Dest == mailbox && v.Kind != verb.KindIMAPStore {
			continue // already where the user put it
		}
		fa := a
		fa.Mailbox, fa.UIDs, fa.UndoIDs = mailbox, "", ids // the first run's UIDs name nothing there
		o, err := r.onMessages(v, fa)
		if err != nil {
			return o, true, err
		}
		details = append(details, fmt.Sprintf("followed %d re-delivered messages to %s: %s", len(ids), mailbox, o.Detail))
	}
	if len(moved) == 0 {
		return verb.ReplayOutcome{}, false, nil
	}
	return verb.ReplayOutcome{Status: verb.ReplayOK, Detail: strings.Join(details, "; ")}, true, nil
}

// learnCopies adds the copies COPYUID reported to the destination's
// model, with their sources' undo ids and flags.
func learnCopies(src, dst *mbox, srcSet, dstSet imap.NumSet) error {
	s, ok1 := srcSet.(imap.UIDSet)
	d, ok2 := dstSet.(imap.UIDSet)
	if !ok1 || !ok2 {
		return errors.New("no COPYUID")
	}
	su, ok1 := s.Nums()
	du, ok2 := d.Nums()
	if !ok1 || !ok2 || len(su) != len(du) {
		return errors.New("unusable COPYUID")
	}
	for i := range su {
		m := src.msgs[su[i]]
		if m == nil {
			return fmt.Errorf("COPYUID names uid %d the model does not know", su[i])
		}
		flags := map[imap.Flag]bool{}
		for f := range m.flags {
			flags[f] = true
		}
		dst.msgs[du[i]] = &msgState{id: m.id, flags: flags}
	}
	return nil
}

// append re-appends a logged message with its flags and date.
func (r *userReplayer) append(v undolog.Verb, a verb.IMAPArgs) (verb.ReplayOutcome, error) {
	data, err := r.log.ReadBlob(v.Blob)
	if err != nil {
		return verb.ReplayOutcome{}, fmt.Errorf("read appended message: %w", err)
	}
	b, err := r.load(a.Mailbox)
	if err != nil {
		return verb.ReplayOutcome{}, err
	}
	opts := &imap.AppendOptions{}
	flags := map[imap.Flag]bool{}
	for _, f := range a.Flags {
		if !strings.EqualFold(f, `\Recent`) {
			opts.Flags = append(opts.Flags, imap.Flag(f))
			flags[imap.Flag(f)] = true
		}
	}
	if a.Date != "" {
		if t, err := time.Parse("02-Jan-2006 15:04:05 -0700", strings.TrimSpace(a.Date)); err == nil {
			opts.Time = t
		}
	}
	cmd := r.c.Append(a.Mailbox, int64(len(data)), opts)
	if _, err := cmd.Write(data); err != nil {
		// The command must be closed even so, or the session's next
		// command waits forever for it (the server refused the literal:
		// its answer says why).
		cmd.Close()
		if _, werr := cmd.Wait(); werr != nil {
			err = werr
		}
		return verb.ReplayOutcome{}, err
	}
	if err := cmd.Close(); err != nil {
		return verb.ReplayOutcome{}, err
	}
	res, err := cmd.Wait()
	if err != nil {
		return verb.ReplayOutcome{}, err
	}
	if res == nil || res.UID == 0 {
		return verb.ReplayOutcome{}, errors.New("APPEND gave no APPENDUID")
	}
	b.msgs[res.UID] = &msgState{id: a.UndoID, flags: flags}
	var o verb.IMAPOutcome
	if v.Outcome != nil && json.Unmarshal(v.Outcome.Outcome, &o) == nil {
		if f := strings.Fields(o.AppendUID); len(f) == 2 {
			var first uint32
			fmt.Sscan(f[1], &first)
			if b.orig == nil {
				b.orig = map[imap.UID]imap.UID{}
			}
			b.orig[imap.UID(first)] = res.UID
		}
	}
	r.made++
	return verb.ReplayOutcome{Status: verb.ReplayOK, Detail: fmt.Sprintf("appenduid %d %d", res.UIDValidity, res.UID),
		Placed: []verb.Placed{{Mailbox: a.Mailbox, UIDValidity: res.UIDValidity, UID: uint32(res.UID), UndoID: a.UndoID}}}, nil
}

// FileInto appends a message to a user's folder through the master user,
// creating the folder if needed, and returns its UID: a live filter
// filing a delivery elsewhere than the INBOX.
func FileInto(t Target, user, folder string, msg []byte) (imap.UID, error) {
	if t.Separator == "" {
		t.Separator = "*"
	}
	r := newUserReplayer(user, t, nil, nil)
	defer r.close()
	if err := r.session(); err != nil {
		return 0, err
	}
	r.c.Create(folder, nil).Wait() // an existing folder is fine
	cmd := r.c.Append(folder, int64(len(msg)), nil)
	cmd.Write(msg)
	cmd.Close()
	data, err := cmd.Wait()
	if err != nil {
		return 0, fmt.Errorf("file into %s for %s: %w", folder, user, err)
	}
	return data.UID, nil
}
