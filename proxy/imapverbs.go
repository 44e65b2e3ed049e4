package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/undomail/undomail/proxy/imapwire"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// mutatingCommands maps each mutating command to its verb kind.
var mutatingCommands = map[string]string{
	"APPEND": verb.KindIMAPAppend, "STORE": verb.KindIMAPStore, "COPY": verb.KindIMAPCopy, "MOVE": verb.KindIMAPMove,
	"EXPUNGE": verb.KindIMAPExpunge, "CLOSE": verb.KindIMAPExpunge, "CREATE": verb.KindIMAPCreate, "DELETE": verb.KindIMAPDelete,
	"RENAME": verb.KindIMAPRename, "SUBSCRIBE": verb.KindIMAPSubscribe, "UNSUBSCRIBE": verb.KindIMAPUnsubscribe,
	"SETMETADATA": verb.KindIMAPSetMetadata,
}

func mutating(name string) bool {
	_, ok := mutatingCommands[name]
	return ok
}

// imapVerb is an intent being built from a parsed command.
type imapVerb struct {
	kind string
	args verb.IMAPArgs
	// needsUIDs, when set, is the search that resolves the command's
	// messages to UIDs on the client's own connection before forwarding.
	needsUIDs string
	// bySeq: needsUIDs names messages by sequence number.
	bySeq bool
	// uids are the messages of a command that names them by plain UIDs.
	uids []uint32
}

// buildIMAPVerb turns a mutating command into an intent, given the
// selected mailbox.
func buildIMAPVerb(cmd *imapwire.Command, mb mailboxState) (*imapVerb, error) {
	v := &imapVerb{kind: mutatingCommands[cmd.Name], args: verb.IMAPArgs{Command: cmd.Name}}
	if cmd.UID {
		v.args.Command = "UID " + cmd.Name
	}
	a := cmd.Args
	needSelected := func() error {
		if mb.name == "" {
			return fmt.Errorf("%s needs a selected mailbox", cmd.Name)
		}
		v.args.Mailbox, v.args.UIDValidity = mb.name, mb.uidValidity
		return nil
	}
	messages := func(set string) {
		if cmd.UID {
			v.args.UIDs = set
			v.needsUIDs = "UID " + set
			// A set of plain UIDs names its messages already: UIDs do not
			// shift, and one that names no message (gone, or never
			// there) gets no undo id, so replay leaves it alone as the
			// server did. Only "*" and sets too large to list need the
			// server's answer; no round trip for the others.
			if list, ok := expandSet(set, maxUIDsPerVerb); ok && !strings.Contains(set, "*") {
				v.args.UIDs, v.needsUIDs, v.uids = compactSet(list), "", list
			}
		} else {
			v.args.Seqs = set
			v.needsUIDs = set
			v.bySeq = true
		}
	}
	switch cmd.Name {
	case "APPEND":
		name, ok := firstAString(a)
		if !ok || len(a) < 2 {
			return nil, errors.New("APPEND needs a mailbox and a message")
		}
		v.args.Mailbox = normalizeMailbox(name)
		// RFC 9051 6.3.12: mailbox [flag-list] [date-time] literal, one
		// message. The proxy logs that literal as the message, so a
		// MULTIAPPEND (RFC 3502) or CATENATE (RFC 4469) is refused
		// rather than logged as something else than what the server
		// stores.
		last := a[len(a)-1]
		if last.Kind != imapwire.LiteralString {
			if last.Kind == imapwire.List && len(a) >= 2 && a[len(a)-2].Is("CATENATE") {
				return nil, errors.New("APPEND with CATENATE is not available through undomail")
			}
			return nil, errors.New("APPEND needs the message as its last argument, a literal")
		}
		for i, x := range a[1 : len(a)-1] {
			switch {
			case x.Kind == imapwire.List && i == 0:
				v.args.Flags = valuesText(x.List)
			case x.Kind == imapwire.Quoted && v.args.Date == "":
				v.args.Date = x.Text
			case x.Kind == imapwire.LiteralString:
				return nil, errors.New("APPEND of several messages (MULTIAPPEND) is not available through undomail")
			default:
				return nil, fmt.Errorf("APPEND: unexpected argument %s", x.String())
			}
		}
	case "STORE":
		if err := needSelected(); err != nil {
			return nil, err
		}
		if len(a) < 3 {
			return nil, errors.New("STORE needs a set, an item and flags")
		}
		messages(a[0].Text)
		item := a[1]
		i := 1
		if item.Kind == imapwire.List { // (UNCHANGEDSINCE n)
			for j := 0; j+1 < len(item.List); j += 2 {
				if item.List[j].Is("UNCHANGEDSINCE") {
					v.args.UnchangedSince = item.List[j+1].Num
				}
			}
			i = 2
			if len(a) < 4 {
				return nil, errors.New("STORE needs flags")
			}
		}
		op := strings.ToUpper(a[i].Text)
		switch {
		case strings.HasPrefix(op, "+"):
			v.args.Op = "+"
		case strings.HasPrefix(op, "-"):
			v.args.Op = "-"
		}
		v.args.Silent = strings.HasSuffix(op, ".SILENT")
		for _, x := range a[i+1:] {
			if x.Kind == imapwire.List {
				v.args.Flags = append(v.args.Flags, valuesText(x.List)...)
			} else {
				v.args.Flags = append(v.args.Flags, x.Text)
			}
		}
	case "COPY", "MOVE":
		if err := needSelected(); err != nil {
			return nil, err
		}
		if len(a) != 2 {
			return nil, fmt.Errorf("%s needs a set and a mailbox", cmd.Name)
		}
		messages(a[0].Text)
		dest, _ := a[1].AString()
		v.args.Dest = normalizeMailbox(dest)
	case "EXPUNGE":
		if err := needSelected(); err != nil {
			return nil, err
		}
		// What EXPUNGE removes is decided by \Deleted flags at the moment
		// it runs; the search right before it asks the same question.
		v.needsUIDs = "DELETED"
		if cmd.UID && len(a) == 1 {
			v.args.UIDs = a[0].Text
			v.needsUIDs = "UID " + a[0].Text + " DELETED"
		}
	case "CLOSE":
		if mb.name == "" || mb.readOnly {
			// CLOSE of a read-only mailbox expunges nothing: it is
			// recorded only so the log shows the session's step; the
			// outcome will show it changed nothing.
			v.args.Mailbox = mb.name
			return v, nil
		}
		if err := needSelected(); err != nil {
			return nil, err
		}
		v.needsUIDs = "DELETED"
	case "CREATE", "DELETE", "SUBSCRIBE", "UNSUBSCRIBE":
		name, ok := firstAString(a)
		if !ok {
			return nil, fmt.Errorf("%s needs a mailbox name", cmd.Name)
		}
		v.args.Mailbox = normalizeMailbox(name)
	case "RENAME":
		if len(a) < 2 {
			return nil, errors.New("RENAME needs two mailbox names")
		}
		from, _ := a[0].AString()
		to, _ := a[1].AString()
		v.args.Mailbox, v.args.Dest = normalizeMailbox(from), normalizeMailbox(to)
	case "SETMETADATA":
		// RFC 5464 4.3: SETMETADATA mailbox (entry value ...), where the
		// mailbox "" is the server's and a value of NIL removes the entry.
		name, ok := firstAString(a)
		if !ok || len(a) != 2 || a[1].Kind != imapwire.List || len(a[1].List)%2 != 0 || len(a[1].List) == 0 {
			return nil, errors.New("SETMETADATA needs a mailbox and a list of entries and values")
		}
		v.args.Mailbox = normalizeMailbox(name)
		v.args.Metadata = map[string]*string{}
		for i := 0; i < len(a[1].List); i += 2 {
			entry, ok := a[1].List[i].AString()
			if !ok || a[1].List[i].Kind == imapwire.Nil {
				return nil, fmt.Errorf("SETMETADATA: entry %d is not a name", i/2+1)
			}
			val := a[1].List[i+1]
			if val.Kind == imapwire.Nil {
				v.args.Metadata[entry] = nil
				continue
			}
			text, ok := val.AString()
			if !ok {
				// A literal too large to keep in the record: the value
				// would not be logged exactly.
				return nil, fmt.Errorf("SETMETADATA: the value of %s cannot be logged", entry)
			}
			v.args.Metadata[entry] = &text
		}
	default:
		parts := make([]string, len(a))
		for i, x := range a {
			parts[i] = x.String()
		}
		v.args.Raw = strings.Join(parts, " ")
	}
	return v, nil
}

// logOutcome records the completion of a logged command. It is written
// before the completion reaches the client (see relayResponses) but not
// waited for on disk: the intent is what must be durable.
func (s *imapSession) logOutcome(pc *pendingCmd, r *imapwire.Response, expunged int) error {
	o := verb.IMAPOutcome{Status: r.Name, Text: withoutTiming(r.Text)}
	if pc.name == "EXPUNGE" || pc.name == "MOVE" {
		o.Expunged = &expunged
		if n := setSize(pc.verb.args.UIDs); r.Name == "OK" && n >= 0 && n != expunged {
			// Something the proxy does not see changed the mailbox
			// (a Sieve script, doveadm): the log names what the search
			// found, the server did otherwise.
			s.logger.Warn("expunge differs from what the log names", "seq", pc.intent.Seq,
				"logged", n, "server_expunged", expunged, "mailbox", pc.verb.args.Mailbox)
		}
	}
	if r.Code != nil {
		o.Code = strings.TrimSpace(r.Code.Name + " " + r.Code.Text)
		switch r.Code.Name {
		case "APPENDUID":
			o.AppendUID = r.Code.Text
		case "COPYUID":
			o.CopyUID = r.Code.Text
		case "MODIFIED":
			o.Modified = modifiedUIDs(pc.verb.args, r.Code.Text)
		}
	}
	if pc.copyUID != "" {
		o.CopyUID = pc.copyUID
	}
	if pc.verb.kind == verb.KindIMAPCreate && pc.absentBefore && r.Name == "NO" && r.Code != nil && r.Code.Name == "ALREADYEXISTS" {
		// Dovecot's maildir answers a CREATE that races with another
		// session's SELECT or STATUS of the same name with ALREADYEXISTS,
		// having made the mailbox all the same (probed: 4 of 40 such
		// races). It could not be opened before the command and no other
		// change of the user's ran meanwhile: if it can be opened now,
		// this CREATE made it, and the log says so.
		if exists, err := s.mailboxExists(pc.verb.args.Mailbox); err == nil && exists {
			o.Status, o.Code = "OK", ""
			o.Text = "undomail: the server answered " + strings.TrimSpace("NO ["+r.Code.Name+"] "+r.Text) +
				", yet the mailbox did not exist before the command and does now (the client was told NO)"
		}
	}
	if r.Name == "OK" {
		a := pc.verb.args
		switch pc.verb.kind {
		case verb.KindIMAPAppend:
			if f := strings.Fields(o.AppendUID); len(f) == 2 {
				s.p.ids.put(msgKey{s.user, a.Mailbox, parseUint32(f[0]), parseUint32(f[1])}, a.UndoID)
			}
		case verb.KindIMAPCopy, verb.KindIMAPMove:
			s.p.learnCopies(s.user, a.Dest, o.CopyUID, a.UndoIDs)
		case verb.KindIMAPRename:
			s.p.ids.rename(s.user, a.Mailbox, a.Dest)
		}
	}
	out, _ := json.Marshal(o)
	// Filed under the user as its actor; the intent names who else the
	// verb affected.
	rec := &undolog.Record{User: s.user, Session: s.id, Kind: undolog.KindOutcome, Ref: pc.intent.Seq, Outcome: out}
	if err := s.p.log.AppendNoSync(context.Background(), rec); err != nil {
		// The command already ran upstream; the client hears the truth,
		// and the log shows the verb without an outcome.
		s.logger.Error("log outcome failed", "seq", pc.intent.Seq, "err", err)
		return nil
	}
	s.logger.Info("recorded", "seq", pc.intent.Seq, "kind", pc.verb.kind, "mailbox", pc.verb.args.Mailbox,
		"uids", pc.verb.args.UIDs, "status", r.Name)
	return nil
}

// dovecotTiming is the time Dovecot appends to its completion texts
// ("Store completed (0.002 + 0.000 + 0.001 secs)."): how long, not what
// it did, and a twentieth of an outcome record's bytes.
var dovecotTiming = regexp.MustCompile(` \([0-9]+\.[0-9]+( \+ [0-9]+\.[0-9]+)* secs\)\.$`)

// withoutTiming returns a completion text without Dovecot's timing.
func withoutTiming(text string) string {
	if !strings.HasSuffix(text, " secs).") { // most texts: no regexp on the hot path
		return text
	}
	return dovecotTiming.ReplaceAllString(text, ".")
}

// logFetch records which messages' bodies or headers a FETCH sent to the
// user: one compact record per command.
func (s *imapSession) logFetch(pc *pendingCmd, mb mailboxState) {
	a := verb.IMAPFetchArgs{Mailbox: mb.name, UIDValidity: mb.uidValidity, Seen: pc.setsSeen && !mb.readOnly}
	set := compactSet(pc.fetched)
	uids := pc.fetched
	if pc.bySeq {
		a.Seqs = set
		uids = nil
		switch {
		case pc.seqSetUIDs != nil:
			uids = seqsToUIDs(pc.fetched, pc.seqSetUIDs)
			if uids == nil {
				s.logger.Warn("sequence numbers of a FETCH that set \\Seen do not match its resolved set; recorded as the whole set",
					"seqs", set, "uids", compactSet(pc.seqSetUIDs))
				uids = pc.seqSetUIDs
			}
		case pc.seqUIDs != nil:
			select {
			case u := <-pc.seqUIDs:
				uids, _ = expandSet(u, maxUIDsPerVerb)
			case <-time.After(s.p.cfg.UpstreamTimeout):
				s.logger.Warn("UIDs of a sequence-number FETCH not learnt; recorded by sequence number", "seqs", set)
			}
		}
	}
	if uids != nil {
		a.UIDs = compactSet(uids)
		a.UndoIDs = s.undoIDs(mb, uids)
	}
	b, _ := json.Marshal(a)
	rec := &undolog.Record{User: s.user, Session: s.id, Kind: verb.KindIMAPFetch, Users: []string{s.user}, Args: b}
	appendRec := s.p.log.AppendNoSync
	if a.Seen {
		// A change: durable before the client has the OK (the caller
		// holds it back until this returns).
		appendRec = s.p.log.Append
	}
	if err := appendRec(context.Background(), rec); err != nil {
		// The server already sent the messages and set \Seen; the
		// client hears the truth, the log misses a read.
		s.logger.Error("log fetch failed", "seen", a.Seen, "err", err)
	}
}

// seqsToUIDs maps the sequence numbers a FETCH answered for onto the
// UIDs its sequence set was resolved to before it ran, both ascending:
// the set's messages in the same order. With every number answered once,
// the i-th lowest number is the i-th lowest UID; nil when the counts
// differ (a number answered twice or not at all), which the caller
// cannot map exactly.
func seqsToUIDs(seqs, setUIDs []uint32) []uint32 {
	seqs = sortedUIDs(slices.Clone(seqs))
	seqs = slices.Compact(seqs)
	if len(seqs) != len(setUIDs) {
		return nil
	}
	return slices.Clone(setUIDs)
}

// modifiedUIDs turns a MODIFIED set into UIDs. A UID STORE reports UIDs;
// a STORE by sequence number reports sequence numbers, which map in order
// onto the UIDs its set was resolved to (every number of a STORE's set
// exists, or the server refuses the command whole).
func modifiedUIDs(a verb.IMAPArgs, set string) string {
	if a.Seqs == "" {
		return set
	}
	seqs, ok1 := expandSet(a.Seqs, maxUIDsPerVerb)
	uids, ok2 := expandSet(a.UIDs, maxUIDsPerVerb)
	mod, ok3 := expandSet(set, maxUIDsPerVerb)
	if !ok1 || !ok2 || !ok3 || len(seqs) != len(uids) {
		return ""
	}
	seqs, uids = sortedUIDs(seqs), sortedUIDs(uids)
	var out []uint32
	for _, m := range mod {
		if i, found := slices.BinarySearch(seqs, m); found {
			out = append(out, uids[i])
		}
	}
	return compactSet(out)
}

// setSize counts the numbers in a set of UIDs, -1 when it cannot tell.
func setSize(set string) int {
	if set == "" {
		return 0
	}
	l, ok := expandSet(set, maxUIDsPerVerb)
	if !ok {
		return -1
	}
	return len(l)
}

// compactSet writes numbers as an IMAP sequence set with ranges.
func compactSet(ns []uint32) string {
	if len(ns) == 0 {
		return ""
	}
	sorted := sortedUIDs(ns)
	var b strings.Builder
	for i := 0; i < len(sorted); {
		j := i
		for j+1 < len(sorted) && sorted[j+1] <= sorted[j]+1 {
			j++
		}
		if b.Len() > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.FormatUint(uint64(sorted[i]), 10))
		if sorted[j] != sorted[i] {
			b.WriteString(":" + strconv.FormatUint(uint64(sorted[j]), 10))
		}
		i = j + 1
	}
	return b.String()
}

func firstAString(a []imapwire.Value) (string, bool) {
	if len(a) == 0 {
		return "", false
	}
	return a[0].AString()
}

// normalizeMailbox spells INBOX in upper case: it is case-insensitive
// (RFC 9051 section 5.1), every other name is not.
func normalizeMailbox(name string) string {
	if strings.EqualFold(name, "INBOX") {
		return "INBOX"
	}
	return name
}

func parseUint32(s string) uint32 {
	n, _ := strconv.ParseUint(strings.Fields(s + " ")[0], 10, 32)
	return uint32(n)
}

// esearchTag returns the correlator of an ESEARCH response (RFC 4731).
func esearchTag(r *imapwire.Response) string {
	if len(r.Args) > 0 && r.Args[0].Kind == imapwire.List && len(r.Args[0].List) == 2 && r.Args[0].List[0].Is("TAG") {
		return r.Args[0].List[1].Text
	}
	return ""
}

// esearchAll returns the ALL result of an ESEARCH response, "" if none.
func esearchAll(r *imapwire.Response) string {
	for i := 0; i+1 < len(r.Args); i++ {
		if r.Args[i].Is("ALL") {
			return r.Args[i+1].Text
		}
	}
	return ""
}

// sortedUIDs returns a sorted copy.
func sortedUIDs(u []uint32) []uint32 {
	out := slices.Clone(u)
	slices.Sort(out)
	return out
}
