package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/undomail/undomail/proxy/imapwire"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// Message identity (docs/architecture.md, "Message identity across replay"). IMAP names
// messages by UID, which a replay changes; the log names them by undo id
// as well. A message's undo id is, in order of preference:
//
//   - what the proxy learnt when the message was made: APPENDUID of a
//     logged APPEND, COPYUID of a logged COPY or MOVE (a copy keeps its
//     source's id; the mailbox tells the two apart);
//   - the topmost Undomail-Id header field, which every delivery through
//     undomail's LMTP capture or front door carries.
//
// Lookups go to an in-memory table per proxy and, for what it does not
// know, to a second upstream connection of the session that fetches the
// header field, so the client's own stream is never disturbed.

// msgKey names one message of one user.
type msgKey struct {
	user, mailbox string
	uidValidity   uint32
	uid           uint32
}

// maxKnownIDs bounds the identity table; when full it starts over (the
// header lookup still answers for delivered messages).
const maxKnownIDs = 1 << 20

// idTable maps messages to undo ids.
type idTable struct {
	mu sync.Mutex
	m  map[msgKey]string
	// loaded maps users whose history was read from the log to the
	// gate's count of Holds then: a repair since makes it stale.
	loaded map[string]uint64
}

func (t *idTable) get(k msgKey) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.m[k]
}

func (t *idTable) put(k msgKey, id string) {
	if id == "" {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.m == nil || len(t.m) >= maxKnownIDs {
		t.m = make(map[msgKey]string)
		t.loaded = nil // forgotten: read the log again when needed
	}
	t.m[k] = id
}

// rename moves what the table knows of a renamed mailbox and the
// mailboxes below it to their new names: RENAME keeps UIDs and
// UIDVALIDITY (RFC 9051 6.3.6), so the messages keep their ids. Renaming
// INBOX moves its messages to the new name and leaves INBOX empty, and
// the mailboxes below INBOX where they are.
func (t *idTable) rename(user, from, to string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for k, id := range t.m {
		if k.user != user {
			continue
		}
		var name string
		switch {
		case k.mailbox == from:
			name = to
		case !strings.EqualFold(from, "INBOX") && (strings.HasPrefix(k.mailbox, from+"/") || strings.HasPrefix(k.mailbox, from+".")):
			name = to + k.mailbox[len(from):]
		default:
			continue
		}
		delete(t.m, k)
		k.mailbox = name
		t.m[k] = id
	}
}

// loadUser fills the table with what the log says about the user's
// messages: where logged APPENDs put them and where logged COPYs and MOVEs
// copied them. A restart of undomail then still names messages that were
// appended over IMAP (they carry no Undomail-Id field) by their undo id.
//
// After a repair it reads the log again, replays included: a replay puts
// appended messages and their copies under new UIDs and records where
// ("placed" in its records), and the user's later verbs on them must name
// them by undo id as well.
func (p *IMAPProxy) loadUser(ctx context.Context, user string) error {
	holds := p.cfg.Gate.Holds()
	p.ids.mu.Lock()
	at, done := p.ids.loaded[user]
	p.ids.mu.Unlock()
	if done && at == holds {
		return nil
	}
	verbs, err := p.log.Verbs(ctx, undolog.Filter{User: user, Kinds: []string{verb.KindIMAPAppend, verb.KindIMAPCopy, verb.KindIMAPMove, verb.KindIMAPRename}})
	if err != nil {
		return fmt.Errorf("read %s's message history: %w", user, err)
	}
	replays, err := p.log.Records(ctx, undolog.Filter{User: user, Kinds: []string{verb.KindReplay}})
	if err != nil {
		return fmt.Errorf("read %s's replayed history: %w", user, err)
	}
	for _, r := range replays {
		var o verb.ReplayOutcome
		if json.Unmarshal(r.Outcome, &o) != nil {
			continue
		}
		for _, pl := range o.Placed {
			p.ids.put(msgKey{user, pl.Mailbox, pl.UIDValidity, pl.UID}, pl.UndoID)
		}
	}
	for _, v := range verbs {
		if v.User != user || v.Outcome == nil {
			continue
		}
		var a verb.IMAPArgs
		var o verb.IMAPOutcome
		if json.Unmarshal(v.Args, &a) != nil || json.Unmarshal(v.Outcome.Outcome, &o) != nil || o.Status != "OK" {
			continue
		}
		switch v.Kind {
		case verb.KindIMAPAppend:
			if f := strings.Fields(o.AppendUID); len(f) == 2 {
				p.ids.put(msgKey{user, a.Mailbox, parseUint32(f[0]), parseUint32(f[1])}, a.UndoID)
			}
		case verb.KindIMAPRename:
			p.ids.rename(user, a.Mailbox, a.Dest)
		default:
			p.learnCopies(user, a.Dest, o.CopyUID, a.UndoIDs)
		}
	}
	p.ids.mu.Lock()
	if p.ids.loaded == nil {
		p.ids.loaded = map[string]uint64{}
	}
	p.ids.loaded[user] = holds
	p.ids.mu.Unlock()
	return nil
}

// sideConn is a second upstream connection, logged in as the user, used
// only to read Undomail-Id fields and UIDVALIDITY. One serves all of a
// user's sessions: Dovecot limits connections per user and address
// (mail_max_userip_connections, 10 by default), and every session arrives
// from undomail's address.
type sideConn struct {
	mu       sync.Mutex
	user     string
	pass     string
	refs     int         // sessions using it; guarded by IMAPProxy.mu
	idle     *time.Timer // closes it a while after the last session; guarded by IMAPProxy.mu
	up       *imapUpstream
	examined mailboxState
	tag      int
}

// acquireSide returns the user's side connection (not yet dialled).
func (p *IMAPProxy) acquireSide(user, pass string) *sideConn {
	p.mu.Lock()
	defer p.mu.Unlock()
	sc := p.sides[user]
	if sc == nil {
		sc = &sideConn{user: user}
		p.sides[user] = sc
	}
	sc.refs++
	if sc.idle != nil {
		sc.idle.Stop()
		sc.idle = nil
	}
	sc.mu.Lock()
	sc.pass = pass // the latest login's: a changed password must not lock it out
	sc.mu.Unlock()
	return sc
}

// sideIdle is how long a side connection outlives its user's last
// session: clients that log in for each check (phones, cron jobs, the
// load benchmark) would otherwise pay a second login every time.
const sideIdle = time.Minute

// releaseSide closes the user's side connection sideIdle after its last
// session ended, unless a new session took it up.
func (p *IMAPProxy) releaseSide(user string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	sc := p.sides[user]
	if sc == nil {
		return
	}
	sc.refs--
	if sc.refs > 0 {
		return
	}
	sc.idle = time.AfterFunc(sideIdle, func() {
		p.mu.Lock()
		if sc.refs > 0 || p.sides[user] != sc {
			p.mu.Unlock()
			return
		}
		delete(p.sides, user)
		p.mu.Unlock()
		sc.close()
	})
}

func (sc *sideConn) close() {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.up != nil {
		sc.up.close()
		sc.up = nil
	}
}

// undoIDs returns the undo ids of the given UIDs of a mailbox, by UID.
// Messages without a known id are left out; an error of the side
// connection leaves them out as well (it is logged, never fatal: the
// client's command goes ahead with UIDs only).
func (s *imapSession) undoIDs(mb mailboxState, uids []uint32) map[string]string {
	if err := s.p.loadUser(context.Background(), s.user); err != nil {
		s.logger.Warn("undo ids from the log unavailable", "err", err)
	}
	out := map[string]string{}
	var missing []uint32
	for _, u := range uids {
		if id := s.p.ids.get(msgKey{s.user, mb.name, mb.uidValidity, u}); id != "" {
			out[strconv.FormatUint(uint64(u), 10)] = id
		} else {
			missing = append(missing, u)
		}
	}
	if len(missing) == 0 || mb.name == "" {
		return out
	}
	found, err := s.fetchUndoIDs(mb, missing)
	if err != nil {
		s.logger.Warn("undo id lookup failed; verb recorded with UIDs only", "mailbox", mb.name, "err", err)
		return out
	}
	for u, id := range found {
		s.p.ids.put(msgKey{s.user, mb.name, mb.uidValidity, u}, id)
		out[strconv.FormatUint(uint64(u), 10)] = id
	}
	return out
}

// fetchUndoIDs reads the Undomail-Id field of messages over the side
// connection.
// A side connection that the server dropped (a rewind kicks every
// session, an idle timeout) is dialled again once.
func (s *imapSession) fetchUndoIDs(mb mailboxState, uids []uint32) (found map[uint32]string, err error) {
	err = s.onSide(func() error {
		found, err = s.fetchUndoIDsLocked(mb, uids)
		return err
	})
	return found, err
}

// onSide runs f on the user's side connection, logged in, holding its
// lock. When f fails on a connection that had been idle and drops it, f
// runs once more on a new one: Dovecot ends a session whose selected
// mailbox another session deleted ("BYE IMAP session state is
// inconsistent"), which the side connection learns only at its next
// command.
func (s *imapSession) onSide(f func() error) error {
	sc := s.side
	sc.mu.Lock()
	defer sc.mu.Unlock()
	for try := 0; ; try++ {
		reused := sc.up != nil
		if !reused {
			sc.examined = mailboxState{}
		}
		if err := s.sideLogin(); err != nil {
			return err
		}
		err := f()
		if err == nil || !reused || sc.up != nil || try > 0 {
			return err
		}
	}
}

// fetchUndoIDsLocked is fetchUndoIDs on the side connection (onSide).
func (s *imapSession) fetchUndoIDsLocked(mb mailboxState, uids []uint32) (map[uint32]string, error) {
	sc := s.side
	next := sc.next
	if sc.examined.name != mb.name || sc.examined.uidValidity != mb.uidValidity {
		tag := next()
		var uv uint32
		r, err := sc.up.collect(tag+" EXAMINE "+astring(mb.name)+"\r\n", tag, func(r *imapwire.Response) {
			if r.Code != nil && r.Code.Name == "UIDVALIDITY" {
				uv = parseUint32(r.Code.Text)
			}
		})
		if err != nil {
			sc.up.close()
			sc.up = nil
			return nil, err
		}
		if r.Name != "OK" || uv != mb.uidValidity {
			// Renamed, deleted or recreated meanwhile: ids cannot be
			// matched to these UIDs.
			sc.examined = mailboxState{}
			return nil, fmt.Errorf("EXAMINE %s: %s %s (UIDVALIDITY %d, session has %d)", mb.name, r.Name, r.Text, uv, mb.uidValidity)
		}
		sc.examined = mb
	}
	found := map[uint32]string{}
	fetch := func(uids []uint32) error {
		tag := next()
		r, err := sc.up.collect(tag+" UID FETCH "+compactSet(uids)+" (UID BODY.PEEK[HEADER.FIELDS ("+verb.TraceHeader+")])\r\n", tag,
			func(r *imapwire.Response) {
				if r.Fetch == nil || r.Fetch.UID == 0 {
					return
				}
				for _, sec := range r.Fetch.Sections {
					if sec.Literal != nil {
						if id := firstTraceID(sec.Literal.Data); id != "" {
							found[r.Fetch.UID] = id
						}
					}
				}
			})
		if err == nil && r.Name != "OK" {
			// The connection lost its mailbox (a failed command, or
			// Dovecot's BYE when another session deleted it): begin again.
			err = fmt.Errorf("UID FETCH in %s: %s %s", mb.name, r.Name, r.Text)
		}
		if err != nil {
			sc.up.close()
			sc.up = nil
		}
		return err
	}
	if err := fetch(uids); err != nil {
		return nil, err
	}
	var missing []uint32
	for _, u := range uids {
		if found[u] == "" {
			missing = append(missing, u)
		}
	}
	if len(missing) > 0 {
		// Dovecot answers from this connection's view as of its last
		// sync: a message delivered since is not in it yet. A NOOP brings
		// the view up to date; then ask once more for what was missing.
		tag := next()
		if _, err := sc.up.collect(tag+" NOOP\r\n", tag, func(*imapwire.Response) {}); err != nil {
			sc.up.close()
			sc.up = nil
			return nil, err
		}
		if err := fetch(missing); err != nil {
			return nil, err
		}
	}
	return found, nil
}

// sideLogin opens the side connection if it is not open; s.side.mu must
// be held.
func (s *imapSession) sideLogin() error {
	sc := s.side
	if sc.up != nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.p.cfg.UpstreamTimeout)
	up, err := s.p.dialUpstream(ctx)
	cancel()
	if err != nil {
		return err
	}
	r, err := up.command("S0 LOGIN "+astring(sc.user)+" "+astring(sc.pass)+"\r\n", "S0")
	if err != nil || r.Name != "OK" {
		up.close()
		return fmt.Errorf("side connection login refused: %v", err)
	}
	sc.up = up
	return nil
}

func (sc *sideConn) next() string { sc.tag++; return "S" + strconv.Itoa(sc.tag) }

// uidValidityOf asks for a mailbox's UIDVALIDITY over the side connection
// (STATUS, RFC 9051 6.3.11), for verbs that name a mailbox they do not
// select: DELETE and RENAME record which incarnation of the name they
// acted on. 0 if it cannot be told.
func (s *imapSession) uidValidityOf(mailbox string) uint32 {
	var uv uint32
	err := s.onSide(func() (err error) {
		uv, err = s.uidValidityLocked(mailbox)
		return err
	})
	if err != nil {
		s.logger.Warn("UIDVALIDITY lookup failed", "mailbox", mailbox, "err", err)
	}
	return uv
}

// uidValidityLocked is uidValidityOf on the side connection (onSide).
func (s *imapSession) uidValidityLocked(mailbox string) (uint32, error) {
	sc := s.side
	tag := sc.next()
	var uv uint32
	_, err := sc.up.collect(tag+" STATUS "+astring(mailbox)+" (UIDVALIDITY)\r\n", tag, func(r *imapwire.Response) {
		if r.Name != "STATUS" || len(r.Args) < 2 || r.Args[1].Kind != imapwire.List {
			return
		}
		l := r.Args[1].List
		for i := 0; i+1 < len(l); i += 2 {
			if l[i].Is("UIDVALIDITY") {
				uv = uint32(l[i+1].Num)
			}
		}
	})
	if err != nil {
		sc.up.close()
		sc.up = nil
	}
	return uv, err
}

// mailboxExists tells, over the side connection, whether a mailbox can
// be opened now: its STATUS succeeds (true) or is refused (false). An
// error when it cannot tell.
func (s *imapSession) mailboxExists(mailbox string) (bool, error) {
	var ok bool
	err := s.onSide(func() error {
		sc := s.side
		tag := sc.next()
		r, err := sc.up.collect(tag+" STATUS "+astring(mailbox)+" (MESSAGES)\r\n", tag, func(*imapwire.Response) {})
		if err != nil {
			sc.up.close()
			sc.up = nil
			return err
		}
		switch r.Name {
		case "OK":
			ok = true
		case "NO":
		default:
			return fmt.Errorf("STATUS %s: %s %s", mailbox, r.Name, r.Text)
		}
		return nil
	})
	return ok, err
}

// firstTraceID returns the value of the first Undomail-Id field of a
// header section.
func firstTraceID(hdr []byte) string {
	sc := bufio.NewScanner(strings.NewReader(string(hdr)))
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.EqualFold(strings.TrimSpace(name), verb.TraceHeader) {
			return strings.TrimSpace(value)
		}
	}
	return ""
}

// collect sends a command and hands every response up to its tagged
// completion to each.
func (u *imapUpstream) collect(line, tag string, each func(*imapwire.Response)) (*imapwire.Response, error) {
	if err := u.write([]byte(line)); err != nil {
		return nil, err
	}
	for {
		r, err := u.r.Next(nil)
		if err != nil {
			return nil, err
		}
		if r.Kind == imapwire.Tagged && r.Tag == tag {
			return r, nil
		}
		each(r)
	}
}

// expandSet lists the numbers of a UID set without "*", at most limit of
// them (ok false beyond).
func expandSet(set string, limit int) (out []uint32, ok bool) {
	ranges, err := imapwire.ParseSeqSet(set)
	if err != nil {
		return nil, false
	}
	for _, r := range ranges {
		lo, hi := r.Start, r.Stop
		if lo == imapwire.Star || hi == imapwire.Star {
			return nil, false
		}
		if lo > hi {
			lo, hi = hi, lo
		}
		for n := lo; n <= hi; n++ {
			if len(out) >= limit {
				return nil, false
			}
			out = append(out, n)
			if n == hi {
				break
			}
		}
	}
	return out, true
}

// learnCopies records that the copies COPYUID names keep their sources'
// undo ids.
func (p *IMAPProxy) learnCopies(user, dest string, copyUID string, srcIDs map[string]string) {
	f := strings.Fields(copyUID)
	if len(f) != 3 {
		return
	}
	uv := parseUint32(f[0])
	from, ok1 := expandSet(f[1], maxUIDsPerVerb)
	to, ok2 := expandSet(f[2], maxUIDsPerVerb)
	if !ok1 || !ok2 || len(from) != len(to) {
		return
	}
	for i := range from {
		if id := srcIDs[strconv.FormatUint(uint64(from[i]), 10)]; id != "" {
			p.ids.put(msgKey{user, dest, uv, to[i]}, id)
		}
	}
}

// maxUIDsPerVerb bounds how many messages' undo ids one record lists.
const maxUIDsPerVerb = 100000

// settleCutOff records what became of an APPEND whose session ended
// before the server answered it. Dovecot ends a session whose selected
// mailbox another session deleted ("BYE IMAP session state is
// inconsistent") after completing the command in progress, and never
// sends its tagged OK: the message is in the store, yet the log would say
// the command was cut off and replay would leave it out. Still under the
// user's lock, the side connection looks for it: a message in the target
// mailbox whose id nobody knows, with the logged message's header section
// and size. Found, its outcome is recorded as OK with the UID it has, and
// a text that says the client was never told; otherwise the intent stays
// without an outcome.
func (s *imapSession) settleCutOff(pc *pendingCmd) {
	a := pc.verb.args
	body, err := s.p.log.ReadBlob(pc.intent.Blob)
	if err != nil {
		s.logger.Warn("cut-off APPEND not settled: its message cannot be read from the log", "seq", pc.intent.Seq, "err", err)
		return
	}
	uv, uid, err := s.findAppended(a.Mailbox, body)
	if err != nil {
		s.logger.Warn("cut-off APPEND not settled", "seq", pc.intent.Seq, "mailbox", a.Mailbox, "err", err)
		return
	}
	if uid == 0 {
		s.logger.Info("cut-off APPEND: the server did not store the message", "seq", pc.intent.Seq, "mailbox", a.Mailbox)
		return
	}
	au := fmt.Sprintf("%d %d", uv, uid)
	o := verb.IMAPOutcome{Status: "OK", Code: "APPENDUID " + au, AppendUID: au,
		Text: "undomail: the server ended the session before it answered; the message was found in the mailbox afterwards (the client was never told)"}
	out, _ := json.Marshal(o)
	rec := &undolog.Record{User: s.user, Session: s.id, Kind: undolog.KindOutcome, Ref: pc.intent.Seq, Outcome: out}
	if err := s.p.log.Append(context.Background(), rec); err != nil {
		s.logger.Error("cut-off APPEND found but its outcome not logged", "seq", pc.intent.Seq, "err", err)
		return
	}
	s.p.ids.put(msgKey{s.user, a.Mailbox, uv, uid}, a.UndoID)
	s.logger.Info("cut-off APPEND settled: the server had stored the message", "seq", pc.intent.Seq, "mailbox", a.Mailbox, "uid", uid)
}

// findAppended looks in a mailbox, over the side connection, for the one
// message without a known undo id whose header section and size are those
// of body. uid 0: none, or more than one (then nothing can be said).
func (s *imapSession) findAppended(mailbox string, body []byte) (uv, uid uint32, err error) {
	err = s.onSide(func() error {
		// Bounded: the user's changes wait for this.
		s.side.up.conn.SetDeadline(time.Now().Add(s.p.cfg.UpstreamTimeout))
		uv, uid, err = s.findAppendedLocked(mailbox, body)
		if s.side.up != nil {
			s.side.up.conn.SetDeadline(time.Time{})
		}
		return err
	})
	return uv, uid, err
}

func (s *imapSession) findAppendedLocked(mailbox string, body []byte) (uv, uid uint32, err error) {
	sc := s.side
	fail := func(err error) (uint32, uint32, error) {
		sc.up.close()
		sc.up = nil
		return 0, 0, err
	}
	header := body
	if i := bytes.Index(body, []byte("\r\n\r\n")); i >= 0 {
		header = body[:i+4]
	}
	// RFC822.SIZE counts lines ending in CRLF (RFC 9051 2.3.4).
	size := len(body) + bytes.Count(body, []byte("\n")) - bytes.Count(body, []byte("\r\n"))
	tag := sc.next()
	r, err := sc.up.collect(tag+" EXAMINE "+astring(mailbox)+"\r\n", tag, func(r *imapwire.Response) {
		if r.Code != nil && r.Code.Name == "UIDVALIDITY" {
			uv = parseUint32(r.Code.Text)
		}
	})
	if err != nil {
		return fail(err)
	}
	sc.examined = mailboxState{}
	if r.Name != "OK" {
		return 0, 0, fmt.Errorf("EXAMINE %s: %s %s", mailbox, r.Name, r.Text)
	}
	sc.examined = mailboxState{name: mailbox, uidValidity: uv}
	var candidates []uint32
	tag = sc.next()
	r, err = sc.up.collect(fmt.Sprintf("%s UID SEARCH LARGER %d SMALLER %d\r\n", tag, max(size-1, 0), size+1), tag, func(r *imapwire.Response) {
		if r.Name != "SEARCH" {
			return
		}
		for _, v := range r.Args {
			if v.Kind == imapwire.Number && s.p.ids.get(msgKey{s.user, mailbox, uv, uint32(v.Num)}) == "" {
				candidates = append(candidates, uint32(v.Num))
			}
		}
	})
	if err != nil {
		return fail(err)
	}
	if r.Name != "OK" || len(candidates) == 0 {
		return uv, 0, nil
	}
	var matches []uint32
	tag = sc.next()
	r, err = sc.up.collect(tag+" UID FETCH "+compactSet(candidates)+" (UID BODY.PEEK[HEADER])\r\n", tag, func(r *imapwire.Response) {
		if r.Fetch == nil || r.Fetch.UID == 0 {
			return
		}
		for _, sec := range r.Fetch.Sections {
			if sec.Literal != nil && bytes.Equal(sec.Literal.Data, header) {
				matches = append(matches, r.Fetch.UID)
			}
		}
	})
	if err != nil {
		return fail(err)
	}
	if r.Name != "OK" || len(matches) != 1 {
		return uv, 0, nil
	}
	return uv, matches[0], nil
}
