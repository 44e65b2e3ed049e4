package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/undomail/undomail/proxy/imapwire"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// pendingCmd is a client command forwarded upstream and not yet completed.
type pendingCmd struct {
	// ready is closed once the command has been read whole and its fields
	// below are set; a relayed command is registered at its first byte.
	ready  chan struct{}
	name   string
	uid    bool
	intent *undolog.Record // the logged intent of a mutating command, nil for others
	verb   *imapVerb
	// Selection changes this command makes when it succeeds.
	selects     *mailboxState // SELECT/EXAMINE
	uidValidity uint32        // seen in its untagged OK [UIDVALIDITY]
	deselects   bool          // CLOSE/UNSELECT
	// What the responses told while it ran.
	copyUID string   // MOVE: the untagged OK [COPYUID ...]
	fetched []uint32 // FETCH: UIDs (or sequence numbers) whose body or header went to the client
	bySeq   bool     // fetched holds sequence numbers: the FETCH responses had no UID
	// seqUIDs receives the UIDs of a non-UID FETCH's sequence set,
	// looked up right behind it (see finish).
	seqUIDs chan string
	// seqSetUIDs: the UIDs of a non-UID FETCH's sequence set that sets
	// \Seen, resolved before it was forwarded, in ascending order (see
	// finish).
	seqSetUIDs []uint32
	// setsSeen: a FETCH of content without PEEK, which sets \Seen on what
	// it returns (RFC 9051 6.4.5) unless the mailbox is read-only.
	setsSeen bool
	// syntaxErr: the proxy's reader found the command malformed.
	syntaxErr bool
	// locksUser: it holds the user's mutation lock and the gate until its
	// record is written (a FETCH that sets \Seen in a writable mailbox).
	locksUser bool
	// holdsOK: its completion reaches the client only once its record
	// is durable (set with locksUser, under imapSession.mu).
	holdsOK bool
	// absentBefore: a CREATE whose mailbox could not be opened right
	// before it was forwarded, under the user's lock.
	absentBefore bool
	// expunges is the session's count of expunge responses when the
	// command was forwarded: those that come before its completion are
	// its own (under the user's lock no other session expunges).
	expunges int
}

// injectedCmd is a command of the proxy's own on the client's upstream
// connection, whose responses the client never sees.
type injectedCmd struct {
	uids string // ESEARCH result: the UID set, "" for none
	done chan error
	// expunges and exists are the session's counts of EXPUNGE/VANISHED
	// and EXISTS responses when the command was sent; shifted and grew are
	// set at its completion when more came meanwhile: sequence numbers
	// changed under it, or "*" came to mean another message.
	expunges, exists int
	shifted, grew    bool
}

// ClientWriteTimeout bounds each write to an IMAP client once the session
// is spliced. A client that stops reading would otherwise stop the relay of
// responses, and with it the outcomes of its logged commands: the gate and
// the user's lock would stay held, and snapshots and the user's other
// sessions would wait on it. Past the bound the session ends; commands in
// flight stay in the log without an outcome (unknown), as after a crash.
const ClientWriteTimeout = 20 * time.Second

// deadlineWriter sets a write deadline before each write.
type deadlineWriter struct {
	c net.Conn
	d time.Duration
}

func (w deadlineWriter) Write(b []byte) (int, error) {
	w.c.SetWriteDeadline(time.Now().Add(w.d))
	return w.c.Write(b)
}

// splice relays commands and responses until either side ends.
func (s *imapSession) splice() {
	s.cwMu.Lock()
	s.cw.Flush()
	s.cw = bufio.NewWriterSize(deadlineWriter{s.conn, ClientWriteTimeout}, 32<<10)
	s.cwMu.Unlock()
	done := make(chan struct{})
	go func() {
		defer close(done)
		err := s.relayResponses()
		s.mu.Lock()
		sent := s.byeSent
		s.byeSent = true
		// Nothing will answer the commands still waiting on the server.
		s.respDone = true
		for tag, ic := range s.injected {
			delete(s.injected, tag)
			ic.done <- errSessionOver
		}
		if s.contWait != nil {
			s.contWait <- false
			s.contWait = nil
		}
		// Commands that will never complete leave the gate now. Their
		// intents stay in the log without an outcome: the client was
		// never told OK. An APPEND the server may have completed before
		// it ended the session is looked for first, under the user's
		// lock still (settleCutOff).
		var cut []*pendingCmd
		for tag, pc := range s.pending {
			switch {
			case pc.intent != nil && pc.verb != nil && pc.verb.kind == verb.KindIMAPAppend:
				cut = append(cut, pc)
			case pc.intent != nil:
				s.p.leaveMutation(s.user)
			case pc.locksUser:
				cut = append(cut, pc)
			}
			delete(s.pending, tag)
		}
		state := s.state
		s.mu.Unlock()
		for _, pc := range cut {
			if pc.locksUser {
				// A FETCH that sets \Seen and was cut off may have set it
				// on what it sent before the end: logged as any, where
				// its UIDs are known without the connection that ended.
				if len(pc.fetched) > 0 && pc.holdsOK {
					s.logFetch(pc, state)
				}
			} else {
				s.settleCutOff(pc)
			}
			s.p.leaveMutation(s.user)
		}
		if !sent && !errors.Is(err, errSessionOver) && !errors.Is(err, net.ErrClosed) {
			// RFC 9051 7.1.5: BYE before closing; UNAVAILABLE says the
			// cause is temporary.
			s.logger.Warn("upstream connection lost", "err", err)
			s.say("* BYE [UNAVAILABLE] undomail: connection to the mail server lost\r\n")
		}
		s.conn.Close()
	}()
	err := s.relayCommands()
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, errSessionOver) && !errors.Is(err, net.ErrClosed) {
		s.logger.Info("client connection ended", "err", err)
	}
	// The client is gone: closing the upstream is expected, not a loss
	// to report with BYE.
	s.mu.Lock()
	s.byeSent = true
	s.mu.Unlock()
	s.up.close()
	<-done
	s.bg.Wait()
	s.p.releaseSide(s.user)
}

var errSessionOver = errors.New("session over")

// relayCommands reads client commands and forwards them, holding back
// mutating ones until their intent is durably logged.
func (s *imapSession) relayCommands() error {
	for {
		s.conn.SetReadDeadline(time.Now().Add(s.p.cfg.IdleTimeout))
		f := &cmdForwarder{s: s}
		cmd, err := s.cr.Next(f.forward)
		var tl *imapwire.LiteralTooLargeError
		if errors.As(err, &tl) && tl.InStep && (!f.started || f.mode == held || f.mode == refused) {
			// Nothing of the command reached the server and the client
			// waits for "+": refuse the literal (RFC 9051 7.5) and go
			// on. APPEND gets TOOBIG (RFC 7889).
			f.abort()
			code := "LIMIT"
			if cmd.Name == "APPEND" {
				code = "TOOBIG"
			}
			if err := s.say("%s NO [%s] undomail: literal of %d bytes is larger than the limit of %d\r\n", tagOr(cmd), code, tl.Size, tl.Max); err != nil {
				return err
			}
			continue
		}
		var se *imapwire.SyntaxError
		if err != nil && !errors.As(err, &se) {
			f.abort()
			s.byeForLimit(err)
			return err
		}
		if se != nil && se.Ambiguous && f.mode == relayed {
			// Dovecot may read the bytes of the command's {n+} literal
			// as further commands, which the proxy would not see: end
			// the session rather than lose track of what is executed.
			f.abort()
			s.say("* BYE undomail: command syntax the proxy cannot follow safely\r\n")
			return errSessionOver
		}
		if se != nil && f.pc != nil {
			// Dovecot rejects what its own reader cannot parse before the
			// command starts (see observe for SELECT).
			f.pc.syntaxErr = true
		}
		if se != nil && f.mode == held {
			// Nothing of it reached the server: a mutating command is
			// forwarded only as the proxy understood and logged it.
			f.mode, f.refusal = refused, "Error in IMAP command "+f.name+": "+se.Msg
			f.abort()
		}
		if err := f.finish(cmd); err != nil {
			return err
		}
	}
}

// cmdForwarder handles one client command as its parts arrive.
type cmdForwarder struct {
	s       *imapSession
	started bool
	mode    forwardMode
	refusal string      // refused: the BAD text the client gets instead
	pc      *pendingCmd // a relayed command, registered at its first byte
	tag     string
	name    string
	uid     bool
	raw     [][]byte       // held parts: raw lines, literal headers made non-synchronizing
	lits    []*heldLiteral // held literal contents, interleaved with raw by index
	order   []int          // sequence of parts: -1-i for raw[i], i for lits[i]
	// sent: part of a relayed command went upstream before its end (a
	// FETCH with a literal): nothing of the proxy's own may go before
	// its end any more.
	sent bool
}

// forwardMode is what the proxy does with a command, decided from its first
// line before any of it reaches the server.
type forwardMode int

const (
	// relayed: a command that changes no mail goes upstream as it arrives.
	relayed forwardMode = iota
	// held: a mutating command is kept whole until its intent is logged.
	held
	// refused: answered BAD by the proxy and never forwarded (a command it
	// cannot follow or record exactly; docs/imap-refusals.md lists them).
	refused
	// terminator: the line that ends IDLE (RFC 2177), whatever it says.
	terminator
)

// heldLiteral is the content of a literal of a held command.
type heldLiteral struct {
	data []byte              // small literals
	blob *undolog.BlobWriter // APPEND's message
	ref  undolog.BlobRef
	size int64
}

// appendSpoolMin is the literal size from which a held literal goes to a
// blob as it arrives rather than to memory: only APPEND's message is ever
// that large.
const appendSpoolMin = 64 << 10

func (f *cmdForwarder) forward(p imapwire.Part) error {
	s := f.s
	if !f.started {
		f.started = true
		if err := f.classify(p.Raw); err != nil {
			return err
		}
	}
	switch f.mode {
	case refused:
		if p.Literal != nil {
			if !p.Literal.NonSync {
				// The client waits for "+" before it sends a
				// synchronizing literal: it never comes (RFC 9051 7.5).
				return imapwire.ErrLiteralRefused
			}
			_, err := io.Copy(io.Discard, p.Literal.Body)
			return err
		}
		return nil
	case terminator:
		s.up.mu.Lock()
		_, err := s.up.w.Write(p.Raw)
		s.up.mu.Unlock()
		return err
	}
	if f.mode == held {
		if p.Literal == nil {
			b := append([]byte(nil), p.Raw...)
			f.order = append(f.order, -1-len(f.raw))
			f.raw = append(f.raw, nonSyncHeader(b))
			return nil
		}
		if !p.Literal.NonSync {
			if err := s.say("+ Ready for literal data\r\n"); err != nil {
				return err
			}
		}
		h := &heldLiteral{size: p.Literal.Size}
		if p.Literal.Size >= appendSpoolMin {
			w, err := s.p.log.NewBlob()
			if err != nil {
				io.Copy(io.Discard, p.Literal.Body)
				h.blob = nil
			} else {
				h.blob = w
				if _, err := io.Copy(w, p.Literal.Body); err != nil {
					w.Abort()
					h.blob = nil
				}
			}
		} else {
			b, err := io.ReadAll(p.Literal.Body)
			if err != nil {
				return err
			}
			h.data = b
		}
		f.order = append(f.order, len(f.lits))
		f.lits = append(f.lits, h)
		return nil
	}
	// Relayed as it comes; a FETCH waits for finish, which decides
	// whether it changes \Seen.
	if f.name == "FETCH" && p.Literal == nil && !endsWithLiteralHeader(p.Raw) {
		f.raw = append(f.raw, append([]byte(nil), p.Raw...))
		return nil
	}
	f.sent = true
	if err := f.flushRaw(); err != nil {
		return err
	}
	if p.Literal == nil {
		s.up.mu.Lock()
		_, err := s.up.w.Write(p.Raw)
		s.up.mu.Unlock()
		if err != nil {
			return err
		}
		if endsWithSyncLiteral(p.Raw) {
			return f.awaitContinuation()
		}
		return nil
	}
	s.up.mu.Lock()
	defer s.up.mu.Unlock()
	_, err := io.Copy(s.up.w, p.Literal.Body)
	return err
}

// flushRaw writes the lines of a relayed command kept back so far.
func (f *cmdForwarder) flushRaw() error {
	if len(f.raw) == 0 {
		return nil
	}
	s := f.s
	s.up.mu.Lock()
	defer s.up.mu.Unlock()
	for _, b := range f.raw {
		if _, err := s.up.w.Write(b); err != nil {
			return err
		}
	}
	f.raw = nil
	return nil
}

// awaitContinuation flushes a relayed command up to a synchronizing
// literal and waits for the upstream's "+" (relayed to the client by the
// other direction) or its refusal.
func (f *cmdForwarder) awaitContinuation() error {
	ok, err := f.goAhead()
	if err == nil && !ok {
		err = imapwire.ErrLiteralRefused
	}
	return err
}

// goAhead flushes what was relayed of the command and waits for the
// upstream's continuation request (true) or the command's completion
// (false).
func (f *cmdForwarder) goAhead() (bool, error) {
	s := f.s
	ch := make(chan bool, 1)
	s.mu.Lock()
	if s.respDone {
		s.mu.Unlock()
		return false, errSessionOver
	}
	s.contWait, s.contTag = ch, f.tag
	s.mu.Unlock()
	if err := s.up.write(nil); err != nil {
		return false, err
	}
	return <-ch, nil
}

// classify decides from a command's first line how it is forwarded. It
// reads the whole line (a tag may be as long as the line), and whatever it
// cannot place is refused, never forwarded.
func (f *cmdForwarder) classify(line []byte) error {
	s := f.s
	if s.idleNext {
		// RFC 2177: the line after IDLE's continuation request ends it;
		// Dovecot reads it as such whatever it says.
		s.idleNext = false
		if endsWithLiteralHeader(line) {
			// Dovecot would read the literal's bytes as new commands,
			// the tokenizer as a literal: the two would part ways.
			s.say("* BYE undomail: a literal after IDLE cannot be followed safely\r\n")
			return errSessionOver
		}
		f.mode = terminator
		return nil
	}
	h, err := imapwire.ParseHead(line)
	f.tag, f.name, f.uid = h.Tag, h.Name, h.UID
	if err != nil {
		f.mode, f.refusal = refused, "Error in IMAP command: "+err.Error()
		return nil
	}
	s.mu.Lock()
	_, dup := s.pending[h.Tag]
	s.mu.Unlock()
	why, refuse := refusedCommands[h.Name]
	switch {
	case dup:
		// Responses are matched to commands by tag (RFC 9051 2.2.1): with
		// two in flight, an outcome could be logged for the wrong one.
		f.mode, f.refusal = refused, "tag "+h.Tag+" is already used by a command in progress"
	case refuse:
		f.mode, f.refusal = refused, h.Name+" is not available through undomail: "+why
	case mutating(h.Name):
		f.mode = held
	case relayedCommands[h.Name]:
		f.mode = relayed
		// Registered before any of it can reach the server, so no
		// response can arrive for an unknown command.
		f.pc = &pendingCmd{ready: make(chan struct{}), name: f.name, uid: f.uid}
		s.register(f.tag, f.pc)
	default:
		f.mode, f.refusal = refused, "Unknown command "+h.Name
	}
	return nil
}

// relayedCommands are the commands the proxy forwards as they arrive: they
// change no mail (RFC 9051, and the extensions Dovecot offers after login).
// LOGIN, AUTHENTICATE and STARTTLS are Dovecot's to refuse after login.
var relayedCommands = map[string]bool{
	"CAPABILITY": true, "NOOP": true, "LOGOUT": true, "CHECK": true, "SELECT": true, "EXAMINE": true,
	"LIST": true, "LSUB": true, "STATUS": true, "FETCH": true, "SEARCH": true, "SORT": true,
	"THREAD": true, "ENABLE": true, "ID": true, "IDLE": true, "NAMESPACE": true, "NOTIFY": true,
	"UNSELECT": true, "GETMETADATA": true, "GETQUOTA": true, "GETQUOTAROOT": true, "X-CANCEL": true,
	"MYRIGHTS": true, "GETACL": true, "LISTRIGHTS": true, "LOGIN": true, "AUTHENTICATE": true,
	"STARTTLS": true,
}

// refusedCommands are commands Dovecot may run that the proxy cannot follow
// or record exactly, with the reason the client is told.
var refusedCommands = map[string]string{
	"COMPRESS":   "compression would hide later commands from the undo log",
	"SETACL":     "access rights changes are not recorded",
	"DELETEACL":  "access rights changes are not recorded",
	"SETQUOTA":   "quota changes are not recorded",
	"GENURLAUTH": "URLAUTH is not offered",
	"RESETKEY":   "URLAUTH is not offered",
	"URLFETCH":   "URLAUTH is not offered",
	"X-STATE":    "session state import would change the selection unseen",
	"REPLACE":    "not offered",
}

// abort discards held state after a broken command.
func (f *cmdForwarder) abort() {
	if f.pc != nil {
		close(f.pc.ready)
		f.pc = nil
	}
	for _, l := range f.lits {
		if l.blob != nil {
			l.blob.Abort()
		}
	}
}

// finish completes a command after it was read whole: a relayed one is
// flushed and registered; a held one is logged, then forwarded.
func (f *cmdForwarder) finish(cmd *imapwire.Command) error {
	s := f.s
	if cmd == nil {
		return nil
	}
	switch f.mode {
	case terminator:
		return s.up.write(nil)
	case refused:
		tag := f.tag
		if tag == "" {
			tag = "*"
		}
		return s.say("%s BAD undomail: %s\r\n", tag, f.refusal)
	case relayed:
		var resolve bool
		if f.pc != nil {
			s.track(cmd, f.pc)
			resolve = cmd.Name == "FETCH" && !cmd.UID && fetchesContent(cmd)
			f.pc.setsSeen = cmd.Name == "FETCH" && fetchSetsSeen(cmd)
			if f.pc.setsSeen {
				// Setting \Seen is a change: it takes its place among
				// the user's mutations, and its record is written
				// before the next one runs.
				s.waitSelection()
				s.mu.Lock()
				ro := s.state.readOnly
				s.mu.Unlock()
				if !ro {
					if err := s.p.lockUser(s.user, WedgeWait); err != nil {
						s.unregister(f.tag)
						close(f.pc.ready)
						return s.say("%s NO [INUSE] undomail: another change of yours is still in progress, nothing changed; try again.\r\n", f.tag)
					}
					// And through the gate, as any change: a snapshot
					// cuts before it or after its record.
					gctx, cancel := context.WithTimeout(context.Background(), WedgeWait)
					err := s.p.cfg.Gate.Enter(gctx)
					cancel()
					if err != nil {
						s.p.unlockUser(s.user)
						s.unregister(f.tag)
						close(f.pc.ready)
						return s.say("%s NO [UNAVAILABLE] undomail: paused for maintenance, nothing changed; try again later.\r\n", f.tag)
					}
					s.mu.Lock()
					f.pc.locksUser = true
					// The OK waits for the record unless the set's UIDs
					// can only be learnt behind the command (a FETCH by
					// sequence number with a literal, sent in part).
					f.pc.holdsOK = cmd.UID || !f.sent
					s.mu.Unlock()
				}
			}
			switch {
			case resolve && f.pc.locksUser && !f.sent:
				// Its record must be durable before the client has the
				// OK, so the OK is held until it is written, and the
				// UIDs of its sequence set are resolved before it
				// runs: a lookup behind it would be answered only after
				// the OK. Under the user's lock nothing renumbers the
				// view in between (resolveUIDs searches again if
				// something arrived meanwhile).
				resolve = false
				uids, err := s.resolveUIDs(cmd.Args[0].Text, true)
				if err == nil {
					f.pc.seqSetUIDs, _ = expandSet(uids, maxUIDsPerVerb)
					f.pc.seqSetUIDs = sortedUIDs(f.pc.seqSetUIDs)
				} else {
					s.p.leaveMutation(s.user)
					s.unregister(f.tag)
					close(f.pc.ready)
					return err
				}
			case resolve:
				f.pc.seqUIDs = make(chan string, 1)
			}
			close(f.pc.ready)
		}
		if err := f.flushRaw(); err != nil {
			return err
		}
		if f.name == "IDLE" {
			// Until the server answers, the next line may be IDLE's
			// end or a new command: wait, as for a literal.
			ok, err := f.goAhead()
			s.idleNext = ok
			return err
		}
		if err := s.up.write(nil); err != nil {
			return err
		}
		if resolve {
			// The FETCH names messages by sequence number and its
			// responses may not carry UIDs. Asking for the same set's
			// UIDs right behind it, before any other command of the
			// client, sees the same numbering: no EXPUNGE can be
			// reported in between (RFC 9051 7.5.1).
			uids, err := s.searchUIDs(cmd.Args[0].Text)
			if err != nil {
				return err
			}
			f.pc.seqUIDs <- uids
		}
		return nil
	}
	if cmd.Refused {
		f.abort()
		return nil
	}
	// Commands that name messages in the selected mailbox need the
	// selection as the server will see it: wait for SELECTs in flight.
	s.waitSelection()
	s.mu.Lock()
	mb := s.state
	s.mu.Unlock()
	iv, err := buildIMAPVerb(cmd, mb)
	if err != nil {
		f.abort()
		return s.say("%s BAD undomail: %s\r\n", cmd.Tag, err)
	}
	// COPY and MOVE into the selected mailbox are refused, by UID and by
	// sequence number (docs/imap-refusals.md). Dovecot 2.3's maildir
	// gives such a copy the file name of the message it was copied from
	// once that name is free; the name of an expunged message stays in
	// dovecot-uidlist for a while, so the same file is listed under its
	// old and its new UID; a later sync by another session drops the
	// message from every view or gives it a UID no command reported
	// ("Expunged message reappeared, giving a new UID"; probed, two UID
	// MOVEs of one message into its own mailbox suffice). The log could
	// not say what the server did. A MOVE into it on a stale view also
	// loses mail (NO [EXPUNGEISSUED] after expunging earlier messages
	// uncopied).
	if (iv.kind == verb.KindIMAPMove || iv.kind == verb.KindIMAPCopy) && iv.args.Dest == mb.name {
		name := cmd.Name
		if cmd.UID {
			name = "UID " + name
		}
		f.abort()
		return s.say("%s NO [CANNOT] undomail: %s into the selected mailbox is refused, nothing changed\r\n", cmd.Tag, name)
	}
	var blob *heldLiteral
	if iv.kind == verb.KindIMAPAppend {
		blob = f.lits[len(f.lits)-1]
		if err := blob.commit(s.p.log); err != nil {
			s.logger.Error("spool APPEND message failed; command refused", "err", err)
			f.abort()
			return s.refuse(cmd.Tag, err)
		}
		iv.args.Size = blob.size
		iv.args.UndoID = undolog.NewID()
	}
	// A read this session made before is logged before this change
	// (its record is written in the background, see observe).
	s.mu.Lock()
	read := s.readLogged
	s.mu.Unlock()
	if read != nil {
		<-read
	}
	// One mutating command of a user at a time, from its intent to its
	// completion, across all the user's sessions: the log's order is then
	// the order the server ran them in, and what a search finds right
	// before a command is what the command acts on (docs/architecture.md,
	// "Recording what the server did").
	if err := s.p.lockUser(s.user, WedgeWait); err != nil {
		f.abort()
		return s.say("%s NO [INUSE] undomail: another change of yours is still in progress, nothing changed; try again.\r\n", cmd.Tag)
	}
	gctx, cancel := context.WithTimeout(context.Background(), WedgeWait)
	err = s.p.cfg.Gate.Enter(gctx)
	cancel()
	if err != nil {
		s.p.unlockUser(s.user)
		f.abort()
		return s.say("%s NO [UNAVAILABLE] undomail: paused for maintenance, nothing changed; try again later.\r\n", cmd.Tag)
	}
	leave := func() { s.p.leaveMutation(s.user) }
	if iv.needsUIDs != "" {
		uids, err := s.resolveUIDs(iv.needsUIDs, iv.bySeq)
		if err != nil {
			leave()
			f.abort()
			return err
		}
		iv.args.UIDs = uids
		if list, ok := expandSet(uids, maxUIDsPerVerb); ok && len(list) > 0 {
			iv.args.UndoIDs = s.undoIDs(mb, list)
		}
	}
	if len(iv.uids) > 0 {
		iv.args.UndoIDs = s.undoIDs(mb, iv.uids)
	}
	if iv.kind == verb.KindIMAPDelete || iv.kind == verb.KindIMAPRename {
		iv.args.UIDValidity = s.uidValidityOf(iv.args.Mailbox)
	}
	var absentBefore bool
	if iv.kind == verb.KindIMAPCreate {
		// See logOutcome: a CREATE answered ALREADYEXISTS may still
		// have made the mailbox.
		exists, err := s.mailboxExists(iv.args.Mailbox)
		absentBefore = err == nil && !exists
	}
	argsJSON, _ := json.Marshal(iv.args)
	intent := &undolog.Record{User: s.user, Session: s.id, Kind: iv.kind, Users: []string{s.user}, Args: argsJSON}
	if blob != nil {
		intent.AttachBlob(blob.ref)
	}
	if err := s.p.log.Append(context.Background(), intent); err != nil {
		leave()
		s.logger.Error("log intent failed; command refused", "command", cmd.Name, "err", err)
		f.abort()
		return s.refuse(cmd.Tag, err)
	}
	// The gate and the user's lock are left when the command completes
	// (observe) or the session ends with it pending.
	pc := &pendingCmd{ready: make(chan struct{}), name: cmd.Name, uid: cmd.UID, intent: intent, verb: iv, absentBefore: absentBefore}
	s.track(cmd, pc)
	close(pc.ready)
	s.mu.Lock()
	if s.respDone {
		// The upstream direction is gone: this command will never
		// complete, and nothing else would leave the gate for it.
		s.mu.Unlock()
		leave()
		return errSessionOver
	}
	pc.expunges = s.expunges
	s.pending[cmd.Tag] = pc
	s.order = append(s.order, cmd.Tag)
	s.mu.Unlock()
	return f.release()
}

// byeForLimit tells the client why the session ends when a command broke
// a limit: the stream cannot be followed past it (RFC 9051 7.1.5 BYE).
func (s *imapSession) byeForLimit(err error) {
	var ll *imapwire.LineTooLongError
	var lt *imapwire.LiteralTooLargeError
	switch {
	case errors.As(err, &ll):
		s.say("* BYE [LIMIT] undomail: command line longer than %d bytes\r\n", ll.Max)
	case errors.As(err, &lt):
		s.say("* BYE [LIMIT] undomail: literal of %d bytes is larger than the limit of %d\r\n", lt.Size, lt.Max)
	default:
		return
	}
	s.mu.Lock()
	s.byeSent = true
	s.mu.Unlock()
}

// refuse answers a held command that could not be logged: nothing was
// forwarded, and the client may retry (RFC 5530 UNAVAILABLE).
func (s *imapSession) refuse(tag string, err error) error {
	what := "undo log unavailable"
	if errors.Is(err, undolog.ErrFull) {
		what = "undo log storage full"
	}
	return s.say("%s NO [UNAVAILABLE] undomail: %s, nothing changed; try again later.\r\n", tag, what)
}

// release writes a held command upstream, literals from memory or blob.
func (f *cmdForwarder) release() error {
	s := f.s
	s.up.mu.Lock()
	defer s.up.mu.Unlock()
	for _, i := range f.order {
		if i < 0 {
			if _, err := s.up.w.Write(f.raw[-1-i]); err != nil {
				return err
			}
			continue
		}
		l := f.lits[i]
		if l.blob == nil && l.data != nil {
			if _, err := s.up.w.Write(l.data); err != nil {
				return err
			}
			continue
		}
		rc, err := s.p.log.OpenRef(l.ref)
		if err != nil {
			return fmt.Errorf("reopen logged APPEND message: %w", err)
		}
		_, err = io.Copy(s.up.w, rc)
		rc.Close()
		if err != nil {
			return err
		}
	}
	return s.up.w.Flush()
}

// commit makes a held literal a blob of the log.
func (h *heldLiteral) commit(l *undolog.Log) error {
	if h.blob == nil {
		if h.data == nil {
			return errors.New("APPEND message could not be spooled")
		}
		w, err := l.NewBlob()
		if err != nil {
			return err
		}
		if _, err := w.Write(h.data); err != nil {
			w.Abort()
			return err
		}
		h.blob = w
	}
	ref, err := h.blob.Commit()
	if err != nil {
		return err
	}
	h.ref = ref
	return nil
}

// track notes what a forwarded command will do to the selection.
func (s *imapSession) track(cmd *imapwire.Command, pc *pendingCmd) {
	switch cmd.Name {
	case "SELECT", "EXAMINE":
		name, _ := firstAString(cmd.Args)
		pc.selects = &mailboxState{name: normalizeMailbox(name), readOnly: cmd.Name == "EXAMINE"}
	case "CLOSE", "UNSELECT":
		pc.deselects = true
	default:
		return
	}
	s.mu.Lock()
	if s.selBusy == 0 {
		s.selWait = make(chan struct{})
	}
	s.selBusy++
	s.mu.Unlock()
}

func (s *imapSession) register(tag string, pc *pendingCmd) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pending[tag] = pc
	s.order = append(s.order, tag)
}

// unregister forgets a registered command that was not forwarded after all.
func (s *imapSession) unregister(tag string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.pending, tag)
	s.order = slices.DeleteFunc(s.order, func(t string) bool { return t == tag })
}

// waitSelection blocks until no selection change is in flight.
func (s *imapSession) waitSelection() {
	s.mu.Lock()
	ch := s.selWait
	busy := s.selBusy
	s.mu.Unlock()
	if busy > 0 {
		<-ch
	}
}

// searchUIDs runs "UID SEARCH RETURN (ALL) <criteria>" on the client's
// upstream connection, in line with the client's commands, so sequence
// numbers resolve exactly as the server will resolve the command that
// follows (ESEARCH, RFC 4731; its TAG correlator keeps the result apart
// from any search of the client's).
func (s *imapSession) searchUIDs(criteria string) (string, error) {
	uids, _, err := s.search(criteria, false)
	return uids, err
}

// search is searchUIDs that also returns the completed search, which
// tells what was reported while it ran.
//
// With sync, a NOOP runs first, and the search only once it completed.
// Dovecot searches the session's view of the mailbox as of its last sync,
// which may miss what another session changed since (a \Deleted set a
// moment ago), and it runs a NOOP and a SEARCH sent together in parallel,
// syncing after both. A NOOP that completed has brought the view up to
// date, so the search then sees what the command that follows will act on.
// The NOOP's untagged updates go to the client as any NOOP's would (RFC
// 9051 6.1.2).
func (s *imapSession) search(criteria string, sync bool) (string, *injectedCmd, error) {
	if sync {
		if _, err := s.inject("NOOP"); err != nil {
			return "", nil, err
		}
	}
	ic, err := s.inject("UID SEARCH RETURN (ALL) " + criteria)
	if err != nil {
		return "", nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return ic.uids, ic, nil
}

// inject runs a command of the proxy's own on the client's upstream
// connection and waits for its completion.
func (s *imapSession) inject(command string) (*injectedCmd, error) {
	s.mu.Lock()
	if s.respDone {
		s.mu.Unlock()
		return nil, errSessionOver
	}
	s.nextTag++
	tag := fmt.Sprintf("%s%d", s.tagPrefix, s.nextTag)
	ic := &injectedCmd{done: make(chan error, 1), expunges: s.expunges, exists: s.exists}
	s.injected[tag] = ic
	s.mu.Unlock()
	if err := s.up.write([]byte(tag + " " + command + "\r\n")); err != nil {
		return nil, err
	}
	if err := <-ic.done; err != nil {
		return nil, err
	}
	return ic, nil
}

// resolveUIDs runs searchUIDs for a command's messages. A command that
// names messages by sequence number is resolved again when expunges or
// new messages were reported while the search ran: the search saw the
// session's view before them, the command sees it after, renumbered, with
// numbers past the old end naming the new messages (a "COPY 5" of a view
// of 4 found nothing, then copied the message that arrived). Under the
// user's lock no new expunge can come from another session, so the second
// search is exact. A UID set with "*" is resolved again when new messages
// were reported: "*" moved.
//
// Only a search by flag (EXPUNGE's DELETED) needs the view brought up to
// date first: numbering and UIDs are those of the session's view, which is
// also what the command that follows acts on; a message another session
// expunged meanwhile is then in the log and was left alone by the server,
// and replay finds it gone as well.
func (s *imapSession) resolveUIDs(criteria string, bySeq bool) (string, error) {
	star := strings.Contains(criteria, "*")
	sync := strings.Contains(criteria, "DELETED")
	for try := 0; ; try++ {
		uids, ic, err := s.search(criteria, sync)
		if err != nil || !(bySeq && (ic.shifted || ic.grew) || star && ic.grew) {
			return uids, err
		}
		if try == 4 {
			return "", fmt.Errorf("resolve sequence set %q: messages kept being expunged or arriving", criteria)
		}
	}
}

// vanishedEarlier reports a VANISHED (EARLIER) response, which tells of
// expunges before the session selected the mailbox and shifts nothing.
func vanishedEarlier(r *imapwire.Response) bool {
	return len(r.Args) > 0 && r.Args[0].Kind == imapwire.List && len(r.Args[0].List) > 0 && r.Args[0].List[0].Is("EARLIER")
}

// endsWithLiteralHeader reports whether a raw line ends in a literal
// header, synchronizing or not.
func endsWithLiteralHeader(b []byte) bool {
	b = bytes.TrimRight(b, "\r\n")
	return len(b) > 2 && b[len(b)-1] == '}' && bytes.LastIndexByte(b, '{') >= 0
}

// relayResponses forwards upstream responses to the client, holding back
// the completion of a logged command until its outcome is logged.
func (s *imapSession) relayResponses() error {
	for {
		rf := &respForwarder{s: s}
		resp, err := s.up.r.Next(rf.forward)
		if err != nil {
			rf.release()
			var se *imapwire.SyntaxError
			if errors.As(err, &se) {
				continue
			}
			return err
		}
		if err := s.observe(resp, rf); err != nil {
			rf.release()
			return err
		}
		if err := rf.release(); err != nil {
			return err
		}
		if resp.Kind == imapwire.Untagged && resp.Name == "BYE" {
			// The client has its BYE; the tagged OK of a LOGOUT still
			// follows, then the server closes (RFC 9051 6.1.3).
			s.mu.Lock()
			s.byeSent = true
			s.mu.Unlock()
		}
	}
}

// respForwarder relays one response: it keeps the client writer locked
// for the whole response, and holds back a response that must wait.
type respForwarder struct {
	s       *imapSession
	started bool
	locked  bool
	held    *bytes.Buffer // a response kept from the client (for now or for good)
	drop    bool          // the proxy's own: never relayed
}

func (rf *respForwarder) forward(p imapwire.Part) error {
	s := rf.s
	if !rf.started {
		rf.started = true
		tag := firstWord(p.Raw)
		s.mu.Lock()
		_, own := s.injected[tag]
		pc := s.pending[tag]
		// A FETCH that sets \Seen holds its OK until its record is
		// written; holdsOK is set (under s.mu) before its last line is
		// forwarded.
		holdsOK := pc != nil && pc.holdsOK
		s.mu.Unlock()
		switch {
		case own || (tag == "*" && s.isOwnESearch(p.Raw)):
			rf.drop = true
		case pc != nil && (pc.intent != nil || holdsOK):
			rf.held = &bytes.Buffer{}
		}
		if !rf.drop && rf.held == nil {
			s.cwMu.Lock()
			rf.locked = true
		}
	}
	switch {
	case rf.drop:
		if p.Literal != nil {
			io.Copy(io.Discard, p.Literal.Body)
		}
		return nil
	case rf.held != nil:
		if p.Literal != nil {
			_, err := io.Copy(rf.held, p.Literal.Body)
			return err
		}
		rf.held.Write(p.Raw)
		return nil
	}
	if p.Literal != nil {
		_, err := io.Copy(s.cw, p.Literal.Body)
		return err
	}
	_, err := s.cw.Write(p.Raw)
	return err
}

// release ends the response: flushes what was relayed and writes what was
// held (after observe logged the outcome).
func (rf *respForwarder) release() error {
	s := rf.s
	if rf.held != nil && !rf.drop {
		s.cwMu.Lock()
		rf.locked = true
		s.cw.Write(rf.held.Bytes())
	}
	if !rf.locked {
		return nil
	}
	err := s.cw.Flush()
	s.cwMu.Unlock()
	rf.locked = false
	return err
}

// observe updates the session from a response and logs outcomes.
func (s *imapSession) observe(r *imapwire.Response, rf *respForwarder) error {
	switch r.Kind {
	case imapwire.Continuation:
		s.mu.Lock()
		ch := s.contWait
		s.contWait = nil
		s.mu.Unlock()
		if ch != nil {
			ch <- true
		}
		return nil
	case imapwire.Untagged:
		s.observeUntagged(r)
		return nil
	}
	// Tagged.
	s.mu.Lock()
	if ch := s.contWait; ch != nil && s.contTag == r.Tag {
		s.contWait = nil
		ch <- false
	}
	if ic, ok := s.injected[r.Tag]; ok {
		delete(s.injected, r.Tag)
		ic.shifted, ic.grew = s.expunges != ic.expunges, s.exists != ic.exists
		s.mu.Unlock()
		if r.Name != "OK" {
			ic.done <- fmt.Errorf("upstream refused undomail's own command: %s %s", r.Name, r.Text)
		} else {
			ic.done <- nil
		}
		return nil
	}
	pc := s.pending[r.Tag]
	delete(s.pending, r.Tag)
	for i, t := range s.order {
		if t == r.Tag {
			s.order = append(s.order[:i], s.order[i+1:]...)
			break
		}
	}
	if pc != nil {
		s.mu.Unlock()
		<-pc.ready
		s.mu.Lock()
	}
	if pc != nil && (pc.selects != nil || pc.deselects) {
		switch {
		case pc.selects != nil && r.Name == "OK":
			st := *pc.selects
			st.uidValidity = pc.uidValidity
			if r.Code != nil && r.Code.Name == "READ-ONLY" {
				st.readOnly = true
			}
			s.state = st
		case pc.selects != nil && (r.Name == "NO" || r.Name == "BAD" && !pc.syntaxErr), pc.deselects && r.Name == "OK":
			// A failed SELECT leaves nothing selected (RFC 9051 6.3.2).
			// Dovecot closes the selected mailbox before it checks a
			// SELECT's arguments (its BAD to "SELECT" without a name
			// leaves nothing selected), but a line its reader cannot
			// parse (a missing closing quote) never starts the command:
			// what was selected stays selected. The proxy's reader
			// stands for Dovecot's there (both found by the
			// differential fuzzer).
			s.state = mailboxState{}
		}
		s.selBusy--
		if s.selBusy == 0 {
			close(s.selWait)
		}
	}
	state := s.state
	expunged := s.expunges
	s.mu.Unlock()
	if pc == nil {
		return nil
	}
	if pc.intent != nil {
		defer s.p.leaveMutation(s.user)
		return s.logOutcome(pc, r, expunged-pc.expunges)
	}
	if pc.holdsOK {
		// A FETCH that set \Seen: its OK waits for its record.
		defer s.p.leaveMutation(s.user)
		if len(pc.fetched) > 0 {
			s.logFetch(pc, state)
		}
		return nil
	}
	if pc.name == "FETCH" && len(pc.fetched) > 0 {
		// Looking up undo ids may take a round trip on the side
		// connection: not on the path of the client's responses.
		s.bg.Add(1)
		done := make(chan struct{})
		s.mu.Lock()
		s.readLogged = done
		s.mu.Unlock()
		go func() {
			defer s.bg.Done()
			defer close(done)
			s.logFetch(pc, state)
			if pc.locksUser {
				s.p.leaveMutation(s.user)
			}
		}()
	} else if pc.locksUser {
		s.p.leaveMutation(s.user)
	}
	return nil
}

// observeUntagged notes what untagged responses tell about the commands
// in flight: UIDVALIDITY of a SELECT, COPYUID of a MOVE, bodies fetched,
// and the proxy's own ESEARCH results.
func (s *imapSession) observeUntagged(r *imapwire.Response) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case r.Name == "EXPUNGE", r.Name == "VANISHED" && !vanishedEarlier(r):
		// Sequence numbers after it have shifted (RFC 9051 7.5.1,
		// RFC 7162 3.2.10).
		s.expunges++
	case r.Name == "EXISTS":
		s.exists++
	case r.Name == "ESEARCH":
		tag := esearchTag(r)
		if ic, ok := s.injected[tag]; ok {
			ic.uids = esearchAll(r)
		}
	case r.Name == "OK" && r.Code != nil && r.Code.Name == "UIDVALIDITY":
		if pc := s.oldest(func(pc *pendingCmd) bool { return pc.name == "SELECT" || pc.name == "EXAMINE" }); pc != nil {
			pc.uidValidity = parseUint32(r.Code.Text)
		}
	case r.Name == "OK" && r.Code != nil && r.Code.Name == "COPYUID":
		if pc := s.oldest(func(pc *pendingCmd) bool { return pc.name == "MOVE" }); pc != nil {
			pc.copyUID = r.Code.Text
		}
	case r.Name == "FETCH" && r.Fetch != nil && len(r.Fetch.Sections) > 0:
		if pc := s.oldest(func(pc *pendingCmd) bool { return pc.name == "FETCH" }); pc != nil {
			if r.Fetch.UID != 0 {
				pc.fetched = append(pc.fetched, r.Fetch.UID)
			} else {
				pc.fetched, pc.bySeq = append(pc.fetched, r.Number), true
			}
		}
	}
}

// oldest returns the earliest forwarded pending command matching ok. The
// server runs commands in order, so that is the one a response belongs to.
func (s *imapSession) oldest(ok func(*pendingCmd) bool) *pendingCmd {
	for _, t := range s.order {
		if pc := s.pending[t]; pc != nil && ok(pc) {
			return pc
		}
	}
	return nil
}

// fetchesContent reports whether a FETCH returns message content (a
// body section, BINARY, RFC822, RFC822.HEADER or RFC822.TEXT), which makes
// it an externalization.
func fetchesContent(cmd *imapwire.Command) bool {
	if len(cmd.Args) < 2 {
		return false
	}
	items := []imapwire.Value{cmd.Args[1]}
	if cmd.Args[1].Kind == imapwire.List {
		items = cmd.Args[1].List
	}
	for _, it := range items {
		if it.Section != nil {
			switch it.Section.Name {
			case "BODY", "BODY.PEEK", "BINARY", "BINARY.PEEK":
				return true
			}
		}
		if it.Is("RFC822") || it.Is("RFC822.HEADER") || it.Is("RFC822.TEXT") {
			return true
		}
	}
	return false
}

// fetchSetsSeen reports whether a FETCH asks for content without PEEK:
// BODY[...], BINARY[...], RFC822 or RFC822.TEXT (RFC 9051 6.4.5; RFC 3501
// 6.4.5 for RFC822*), which sets \Seen.
func fetchSetsSeen(cmd *imapwire.Command) bool {
	if len(cmd.Args) < 2 {
		return false
	}
	items := []imapwire.Value{cmd.Args[1]}
	if cmd.Args[1].Kind == imapwire.List {
		items = cmd.Args[1].List
	}
	for _, it := range items {
		if it.Section != nil && (it.Section.Name == "BODY" || it.Section.Name == "BINARY") {
			return true
		}
		if it.Is("RFC822") || it.Is("RFC822.TEXT") {
			return true
		}
	}
	return false
}

func firstWord(b []byte) string {
	if i := bytes.IndexAny(b, " \r\n"); i >= 0 {
		return string(b[:i])
	}
	return string(b)
}

// isOwnESearch recognises `* ESEARCH (TAG "<own prefix>` on a raw line.
func (s *imapSession) isOwnESearch(b []byte) bool {
	return bytes.HasPrefix(b, []byte(`* ESEARCH (TAG "`+s.tagPrefix))
}

// endsWithSyncLiteral reports whether a raw line ends in a synchronizing
// literal header "{n}".
func endsWithSyncLiteral(b []byte) bool {
	b = bytes.TrimRight(b, "\r\n")
	return len(b) > 2 && b[len(b)-1] == '}' && !bytes.HasSuffix(b, []byte("+}")) && bytes.LastIndexByte(b, '{') >= 0
}

// nonSyncHeader turns a trailing "{n}" into "{n+}" (RFC 7888): the proxy
// already invited the literal itself, so the upstream must not.
func nonSyncHeader(b []byte) []byte {
	if !endsWithSyncLiteral(b) {
		return b
	}
	end := len(bytes.TrimRight(b, "\r\n"))
	out := append([]byte(nil), b[:end-1]...)
	out = append(out, "+}"...)
	return append(out, b[end:]...)
}
