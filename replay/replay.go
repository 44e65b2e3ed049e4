package replay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/proxy"
	"github.com/undomail/undomail/undolog"
)

// KindReplay records what replaying one logged verb did; Ref names the
// verb. Compensation (issue 6) compares it with the verb's first outcome.
const KindReplay = "replay"

// KindCompensation is a compensating message undomail delivered (issue 6):
// Args are proxy.DeliveryArgs, Outcome a proxy.DeliveryOutcome, Blob the
// message. A later replay re-delivers it like a captured delivery, so the
// explanation survives later cycles and is never made twice.
const KindCompensation = "compensation"

// ReplayOutcome is the result of replaying one verb.
type ReplayOutcome struct {
	Status string `json:"status"` // ok, failed, cancelled, filtered, repaired ("skipped" verbs are not recorded)
	Detail string `json:"detail,omitempty"`
}

// Target is the rewound mail server replay acts on, directly: replayed
// verbs are not new user actions and do not pass the proxies.
type Target struct {
	// LMTPAddr is Dovecot's LMTP, which deliveries are re-delivered to.
	// Mail is never re-sent to other hosts (DESIGN: "Replay, repair and
	// history").
	LMTPAddr string
	// IMAPAddr is Dovecot's IMAP; verbs are re-executed as their user
	// through a master user: login "<user><Separator><MasterUser>".
	IMAPAddr       string
	MasterUser     string
	MasterPassword string
	Separator      string // default "*"
	Logger         *slog.Logger
}

// Result counts what a replay did.
type Result struct {
	Replayed, Failed, Cancelled int
	// Filtered counts deliveries a filter dropped or filed elsewhere;
	// Repaired verbs that acted only on such messages.
	Filtered, Repaired int
	// Skipped counts verbs by kind that were left alone: kinds with no
	// effect of their own (submissions at the front door, fetches) and
	// kinds this replay cannot redo yet.
	Skipped map[string]int
}

// Replay re-executes the logged verbs with after < seq < before against
// the target, in log order, and records the result of each next to it.
// It redoes deliveries (re-delivered over LMTP) and the IMAP verbs APPEND,
// CREATE, DELETE, RENAME, SUBSCRIBE, UNSUBSCRIBE, STORE, COPY, MOVE and
// EXPUNGE, naming messages by undo id and translating to their UIDs now.
// Verbs whose client was not told OK, or whose delivery was refused, had
// no effect and are not replayed.
// Plan says which part of the log to replay and which verbs to leave out.
type Plan struct {
	// After and Before bound the verbs replayed: After < seq < Before
	// (Before 0: to the end of the log).
	After, Before int64
	// Cancel lists verbs not to replay: the repair of a mistaken DELETE,
	// a mass EXPUNGE, an operator's bad action. Each is recorded as
	// cancelled.
	Cancel map[int64]bool
	// Filters are retroactive filters on deliveries (see Filter). Verbs
	// on messages a filter dropped are skipped and recorded as such.
	Filters []*Filter
}

func Replay(ctx context.Context, l *undolog.Log, p Plan, t Target) (Result, error) {
	after, before := p.After, p.Before
	if t.Separator == "" {
		t.Separator = "*"
	}
	if t.Logger == nil {
		t.Logger = slog.Default()
	}
	res := Result{Skipped: map[string]int{}}
	verbs, err := l.Verbs(ctx, undolog.Filter{AfterSeq: after})
	if err != nil {
		return res, fmt.Errorf("replay: read the log: %w", err)
	}
	r := &replayer{t: t, log: l, filters: p.Filters, sessions: map[string]*imapclient.Client{}, selected: map[string]string{},
		moved: map[msgRef]imap.UID{}, removed: map[msgRef]bool{}}
	defer r.close()
	for _, v := range verbs {
		if before > 0 && v.Seq >= before {
			break
		}
		var out ReplayOutcome
		var err error
		if p.Cancel[v.Seq] {
			out = ReplayOutcome{Status: "cancelled", Detail: "left out by the repair"}
			res.Cancelled++
		} else {
			out, err = r.verb(ctx, v)
		}
		switch {
		case err != nil:
			out = ReplayOutcome{Status: "failed", Detail: err.Error()}
			res.Failed++
			t.Logger.Warn("replay failed", "seq", v.Seq, "kind", v.Kind, "err", err)
		case out.Status == "skipped":
			res.Skipped[v.Kind]++
			continue // nothing was done: nothing to record
		case out.Status == "ok":
			res.Replayed++
		case out.Status == "filtered":
			res.Filtered++
		case out.Status == "repaired":
			res.Repaired++
		}
		b, _ := json.Marshal(out)
		if err := l.Append(ctx, &undolog.Record{Kind: KindReplay, Session: "replay", User: v.User, Users: v.Users, Ref: v.Seq, Outcome: b}); err != nil {
			return res, fmt.Errorf("replay: record the replay of verb %d: %w", v.Seq, err)
		}
	}
	return res, nil
}

type replayer struct {
	t       Target
	log     *undolog.Log
	filters []*Filter
	// removed are messages a filter kept out of the mailbox verbs name
	// them in.
	removed  map[msgRef]bool
	sessions map[string]*imapclient.Client // by user
	selected map[string]string             // mailbox selected in each user's session
	// moved maps a message the replay made again (delivery, APPEND, COPY,
	// MOVE) to its new UID. A message not in it existed at the snapshot
	// and kept its UID through the rollback.
	moved map[msgRef]imap.UID
}

// msgRef names a message for the replay: user, mailbox and undo id.
type msgRef struct{ user, mailbox, undoID string }

func (r *replayer) close() {
	for _, c := range r.sessions {
		c.Logout().Wait()
		c.Close()
	}
}

var skipped = ReplayOutcome{Status: "skipped"}

// verb replays one verb.
func (r *replayer) verb(ctx context.Context, v undolog.Verb) (ReplayOutcome, error) {
	switch v.Kind {
	case proxy.KindLMTPDeliver, KindCompensation:
		return r.deliver(ctx, v)
	case proxy.KindIMAPFetch:
		// A read is no change, except the \Seen a FETCH without PEEK set.
		var a proxy.IMAPFetchArgs
		if json.Unmarshal(v.Args, &a) != nil || !a.Seen || len(a.UndoIDs) == 0 {
			return skipped, nil
		}
		c, err := r.session(v.User)
		if err != nil {
			return ReplayOutcome{}, err
		}
		return r.onMessages(c, v, proxy.IMAPArgs{Command: "FETCH", Mailbox: a.Mailbox, Op: "+", Flags: []string{`\Seen`}, UndoIDs: a.UndoIDs})
	case proxy.KindIMAPAppend, proxy.KindIMAPCreate, proxy.KindIMAPDelete, proxy.KindIMAPRename,
		proxy.KindIMAPSubscribe, proxy.KindIMAPUnsubscribe,
		proxy.KindIMAPStore, proxy.KindIMAPCopy, proxy.KindIMAPMove, proxy.KindIMAPExpunge:
		var o proxy.IMAPOutcome
		if v.Outcome == nil || json.Unmarshal(v.Outcome.Outcome, &o) != nil || o.Status != "OK" {
			return skipped, nil // the client was not told it happened
		}
		var a proxy.IMAPArgs
		if err := json.Unmarshal(v.Args, &a); err != nil {
			return skipped, nil
		}
		return r.imap(ctx, v, a)
	}
	return skipped, nil
}

// deliver re-delivers a captured delivery to the recipients that
// accepted it the first time, exactly as it was forwarded then.
func (r *replayer) deliver(ctx context.Context, v undolog.Verb) (ReplayOutcome, error) {
	var a proxy.DeliveryArgs
	var o proxy.DeliveryOutcome
	if json.Unmarshal(v.Args, &a) != nil || v.Outcome == nil || json.Unmarshal(v.Outcome.Outcome, &o) != nil {
		return skipped, nil
	}
	var rcpts []string
	for _, rr := range o.Rcpts {
		if rr.Reply.Positive() {
			rcpts = append(rcpts, rr.Rcpt)
		}
	}
	if len(rcpts) == 0 {
		return skipped, nil
	}
	if len(r.filters) > 0 {
		if out, done, err := r.filter(ctx, v, a, rcpts); done || err != nil {
			return out, err
		}
	}
	body, err := r.log.OpenBlob(v.Blob)
	if err != nil {
		return ReplayOutcome{}, fmt.Errorf("open message blob: %w", err)
	}
	defer body.Close()
	conn, err := (&net.Dialer{Timeout: 30 * time.Second}).DialContext(ctx, "tcp", r.t.LMTPAddr)
	if err != nil {
		return ReplayOutcome{}, err
	}
	c := smtp.NewClientLMTP(conn)
	defer c.Close()
	if err := c.Hello("undomail-replay"); err != nil {
		return ReplayOutcome{}, err
	}
	if err := c.Mail(a.MailFrom, nil); err != nil {
		return ReplayOutcome{}, err
	}
	for _, rc := range rcpts {
		if err := c.Rcpt(rc, nil); err != nil {
			return ReplayOutcome{}, fmt.Errorf("RCPT %s: %w", rc, err)
		}
	}
	w, err := c.Data()
	if err != nil {
		return ReplayOutcome{}, err
	}
	if a.Submission == 0 {
		fmt.Fprintf(w, "%s: %s\r\n", proxy.TraceHeader, a.UndoID)
	}
	if _, err := io.Copy(w, body); err != nil {
		return ReplayOutcome{}, fmt.Errorf("send message: %w", err)
	}
	if _, err := w.CloseWithLMTPResponse(); err != nil {
		return ReplayOutcome{}, err
	}
	c.Quit()
	for _, rc := range rcpts {
		if err := r.learnDelivered(rc, a.UndoID); err != nil {
			return ReplayOutcome{}, fmt.Errorf("find the re-delivered message for %s: %w", rc, err)
		}
	}
	return ReplayOutcome{Status: "ok", Detail: "re-delivered to " + strings.Join(rcpts, ", ")}, nil
}

// filter applies the repair's filters to a delivery. done reports that a
// filter dealt with it (dropped it, or filed it with APPEND).
func (r *replayer) filter(ctx context.Context, v undolog.Verb, a proxy.DeliveryArgs, rcpts []string) (ReplayOutcome, bool, error) {
	msg, err := r.log.ReadBlob(v.Blob)
	if err != nil {
		return ReplayOutcome{}, false, fmt.Errorf("read message blob: %w", err)
	}
	for _, f := range r.filters {
		hit, err := f.Match(ctx, a, msg)
		if err != nil {
			return ReplayOutcome{}, false, err
		}
		if !hit {
			continue
		}
		for _, rc := range rcpts {
			user, _, _ := strings.Cut(rc, "@")
			r.removed[msgRef{user, "INBOX", a.UndoID}] = true
		}
		folder, move := strings.CutPrefix(f.Action, "move:")
		if !move {
			return ReplayOutcome{Status: "filtered", Detail: "dropped by filter " + f.Spec}, true, nil
		}
		if a.Submission == 0 {
			msg = append([]byte(proxy.TraceHeader+": "+a.UndoID+"\r\n"), msg...)
		}
		for _, rc := range rcpts {
			user, _, _ := strings.Cut(rc, "@")
			c, err := r.session(user)
			if err != nil {
				return ReplayOutcome{}, false, err
			}
			c.Create(folder, nil).Wait() // an existing folder is fine
			cmd := c.Append(folder, int64(len(msg)), nil)
			cmd.Write(msg)
			cmd.Close()
			data, err := cmd.Wait()
			if err != nil {
				return ReplayOutcome{}, false, fmt.Errorf("file into %s for %s: %w", folder, user, err)
			}
			r.moved[msgRef{user, folder, a.UndoID}] = data.UID
		}
		return ReplayOutcome{Status: "filtered", Detail: "filed into " + folder + " by filter " + f.Spec}, true, nil
	}
	return ReplayOutcome{}, false, nil
}

// learnDelivered finds the UID a re-delivered message got in the
// recipient's INBOX by its Undomail-Id field (LMTP does not say).
func (r *replayer) learnDelivered(rcpt, undoID string) error {
	user, _, _ := strings.Cut(rcpt, "@")
	c, err := r.session(user)
	if err != nil {
		return err
	}
	if err := r.sel(c, user, "INBOX"); err != nil {
		return err
	}
	// The session may have had INBOX selected since before the delivery:
	// NOOP lets Dovecot show it the new message (RFC 9051 6.1.2).
	if err := c.Noop().Wait(); err != nil {
		return err
	}
	found, err := c.UIDSearch(&imap.SearchCriteria{Header: []imap.SearchCriteriaHeaderField{{Key: proxy.TraceHeader, Value: undoID}}}, nil).Wait()
	if err != nil {
		return err
	}
	uids := found.AllUIDs()
	if len(uids) == 0 {
		return errors.New("not found after delivery")
	}
	r.moved[msgRef{user, "INBOX", undoID}] = uids[len(uids)-1]
	return nil
}

// sel selects a mailbox in the user's session if it is not selected.
func (r *replayer) sel(c *imapclient.Client, user, mailbox string) error {
	if r.selected[user] == mailbox {
		return nil
	}
	if _, err := c.Select(mailbox, nil).Wait(); err != nil {
		r.selected[user] = ""
		return fmt.Errorf("select %s: %w", mailbox, err)
	}
	r.selected[user] = mailbox
	return nil
}

// translate turns the UIDs a verb named into the UIDs those messages have
// now: a message the replay made again has a new UID; one that existed at
// the snapshot kept its UID through the rollback. Messages the replay did
// not make again and whose UID is above the snapshot's do not exist now
// (their verb was not replayed) and are left out.
func (r *replayer) translate(user string, a proxy.IMAPArgs) (set imap.UIDSet, removed int) {
	for uidText, id := range a.UndoIDs {
		if r.removed[msgRef{user, a.Mailbox, id}] {
			removed++
			continue
		}
		if u, ok := r.moved[msgRef{user, a.Mailbox, id}]; ok {
			set.AddNum(u)
			continue
		}
		var n uint32
		fmt.Sscan(uidText, &n)
		if n > 0 {
			set.AddNum(imap.UID(n))
		}
	}
	return set, removed
}

// onMessages replays STORE, COPY, MOVE and EXPUNGE on the messages the
// verb named, translated to their UIDs now.
func (r *replayer) onMessages(c *imapclient.Client, v undolog.Verb, a proxy.IMAPArgs) (ReplayOutcome, error) {
	if v.Kind == proxy.KindIMAPCopy || v.Kind == proxy.KindIMAPMove {
		// A message the repair removed stays removed wherever the user
		// later copied or moved it.
		for _, id := range a.UndoIDs {
			if r.removed[msgRef{v.User, a.Mailbox, id}] {
				r.removed[msgRef{v.User, a.Dest, id}] = true
			}
		}
	}
	set, removed := r.translate(v.User, a)
	if len(set) == 0 {
		if removed > 0 {
			return ReplayOutcome{Status: "repaired", Detail: fmt.Sprintf("skipped: its %d messages were removed by the repair", removed)}, nil
		}
		return ReplayOutcome{Status: "ok", Detail: "no message left to act on"}, nil
	}
	if err := r.sel(c, v.User, a.Mailbox); err != nil {
		return ReplayOutcome{}, err
	}
	switch v.Kind {
	case proxy.KindIMAPStore, proxy.KindIMAPFetch:
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
		if err := c.Store(set, &imap.StoreFlags{Op: op, Silent: true, Flags: flags}, nil).Close(); err != nil {
			return ReplayOutcome{}, err
		}
	case proxy.KindIMAPExpunge:
		// Exactly the messages the original expunged: mark them, then
		// expunge only them (UIDPLUS), not whatever else is \Deleted now.
		if err := c.Store(set, &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagDeleted}}, nil).Close(); err != nil {
			return ReplayOutcome{}, err
		}
		if err := c.UIDExpunge(set).Close(); err != nil {
			return ReplayOutcome{}, err
		}
	case proxy.KindIMAPCopy, proxy.KindIMAPMove:
		var src, dst imap.NumSet
		if v.Kind == proxy.KindIMAPCopy {
			data, err := c.Copy(set, a.Dest).Wait()
			if err != nil {
				return ReplayOutcome{}, err
			}
			src, dst = data.SourceUIDs, data.DestUIDs
		} else {
			data, err := c.Move(set, a.Dest).Wait()
			if err != nil {
				return ReplayOutcome{}, err
			}
			src, dst = data.SourceUIDs, data.DestUIDs
		}
		r.learnCopies(v.User, a, src, dst)
	}
	return ReplayOutcome{Status: "ok", Detail: fmt.Sprintf("%s uid %s", a.Mailbox, set)}, nil
}

// learnCopies notes the UIDs COPYUID gave the copies, under their
// sources' undo ids (a copy keeps its source's id; the mailbox tells them
// apart).
func (r *replayer) learnCopies(user string, a proxy.IMAPArgs, srcSet, dstSet imap.NumSet) {
	s, ok1 := srcSet.(imap.UIDSet)
	d, ok2 := dstSet.(imap.UIDSet)
	if !ok1 || !ok2 {
		return
	}
	src, ok1 := s.Nums()
	dst, ok2 := d.Nums()
	if !ok1 || !ok2 || len(src) != len(dst) {
		return
	}
	now := map[imap.UID]string{} // current UID -> undo id
	for uidText, id := range a.UndoIDs {
		if u, ok := r.moved[msgRef{user, a.Mailbox, id}]; ok {
			now[u] = id
			continue
		}
		var n uint32
		fmt.Sscan(uidText, &n)
		now[imap.UID(n)] = id
	}
	for i := range src {
		if id := now[src[i]]; id != "" {
			r.moved[msgRef{user, a.Dest, id}] = dst[i]
		}
	}
}

// session returns an IMAP session logged in as user through the master
// user.
func (r *replayer) session(user string) (*imapclient.Client, error) {
	if c := r.sessions[user]; c != nil {
		return c, nil
	}
	c, err := imapclient.DialInsecure(r.t.IMAPAddr, nil)
	if err != nil {
		return nil, err
	}
	if err := c.Login(user+r.t.Separator+r.t.MasterUser, r.t.MasterPassword).Wait(); err != nil {
		c.Close()
		return nil, fmt.Errorf("log in as %s through the master user: %w", user, err)
	}
	r.sessions[user] = c
	return c, nil
}

func (r *replayer) imap(ctx context.Context, v undolog.Verb, a proxy.IMAPArgs) (ReplayOutcome, error) {
	c, err := r.session(v.User)
	if err != nil {
		return ReplayOutcome{}, err
	}
	switch v.Kind {
	case proxy.KindIMAPCreate:
		err = c.Create(a.Mailbox, nil).Wait()
	case proxy.KindIMAPDelete:
		err = c.Delete(a.Mailbox).Wait()
	case proxy.KindIMAPRename:
		err = c.Rename(a.Mailbox, a.Dest, nil).Wait()
	case proxy.KindIMAPSubscribe:
		err = c.Subscribe(a.Mailbox).Wait()
	case proxy.KindIMAPUnsubscribe:
		err = c.Unsubscribe(a.Mailbox).Wait()
	case proxy.KindIMAPAppend:
		return r.append(c, v, a)
	case proxy.KindIMAPStore, proxy.KindIMAPCopy, proxy.KindIMAPMove, proxy.KindIMAPExpunge:
		return r.onMessages(c, v, a)
	}
	if err != nil {
		return ReplayOutcome{}, err
	}
	return ReplayOutcome{Status: "ok"}, nil
}

// append re-appends a logged message with its flags and date.
func (r *replayer) append(c *imapclient.Client, v undolog.Verb, a proxy.IMAPArgs) (ReplayOutcome, error) {
	data, err := r.log.ReadBlob(v.Blob)
	if err != nil {
		return ReplayOutcome{}, fmt.Errorf("read appended message: %w", err)
	}
	opts := &imap.AppendOptions{}
	for _, f := range a.Flags {
		if !strings.EqualFold(f, `\Recent`) {
			opts.Flags = append(opts.Flags, imap.Flag(f))
		}
	}
	if a.Date != "" {
		if t, err := time.Parse("02-Jan-2006 15:04:05 -0700", strings.TrimSpace(a.Date)); err == nil {
			opts.Time = t
		}
	}
	cmd := c.Append(a.Mailbox, int64(len(data)), opts)
	if _, err := cmd.Write(data); err != nil {
		return ReplayOutcome{}, err
	}
	if err := cmd.Close(); err != nil {
		return ReplayOutcome{}, err
	}
	res, err := cmd.Wait()
	if err != nil {
		return ReplayOutcome{}, err
	}
	if res == nil || res.UID == 0 {
		return ReplayOutcome{}, errors.New("APPEND gave no APPENDUID")
	}
	r.moved[msgRef{v.User, a.Mailbox, a.UndoID}] = res.UID
	return ReplayOutcome{Status: "ok", Detail: fmt.Sprintf("appenduid %d %d", res.UIDValidity, res.UID)}, nil
}
