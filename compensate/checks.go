package compensate

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/emersion/go-message"
	"github.com/emersion/go-message/textproto"

	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// Cycle is what detection needs to know about a cycle.
type Cycle struct {
	// Seq is the cycle's record; After is the log position of the
	// snapshot it rewound to: the replay redid the verbs with
	// After < seq < Seq.
	Seq, After int64
	// Time is when the cycle ran.
	Time time.Time
	// Reason is the operator's reason for the repair, in their words;
	// Repair describes the repair itself (filters, cancelled verbs) for
	// when no reason was given.
	Reason, Repair string
}

// Findings are the paradoxes a cycle created, observed or not, and the
// reads whose content must be compared with the store (read_changed needs
// the mail server, see ContentChecker).
type Findings struct {
	Paradoxes []Paradox
	Reads     []ReadCheck
	// Addresses maps users (lower-case local part) to the address mail
	// for them was delivered to, learnt from the log.
	Addresses map[string]string
}

// ReadCheck is a message a user read that the replay made again: its
// content now must match what the user read.
type ReadCheck struct {
	User    string
	Verb    int64 // the delivery or APPEND that made it
	Kind    string
	Blob    string // the message as first delivered or appended
	Message Message
	Seen    time.Time
}

// replayed is one replay record of the cycle: what replaying a verb did,
// for one user.
type replayed struct {
	user string
	out  verb.ReplayOutcome
}

// removal is a message the repair kept out of a user's store.
type removal struct {
	verb  undolog.Verb // the delivery
	msg   Message
	now   string
	moved string // the folder a filter filed it into, "" if it is gone
	// misdelivered: the repaired MTA delivers it to someone else
	// (verb.ReplayRerouted).
	misdelivered bool
}

// detector holds the log as the checks need it.
type detector struct {
	verbs    map[int64]undolog.Verb // the replayed period, by seq
	order    []int64                // their seqs in log order
	replays  map[int64][]replayed   // by the seq of the verb replayed
	fetches  map[string]map[string]fetchSeen
	expunged map[string]map[string]bool
	removed  map[string]map[string]removal // user -> undo id
	made     map[string]map[string]undolog.Verb
	addrs    map[string]string
	out      []Paradox
	reads    []ReadCheck
	log      *undolog.Log
}

// fetchSeen is the first time a user was sent a message.
type fetchSeen struct {
	user string
	at   time.Time
}

// userKey is how users are matched across records: Dovecot's users here
// are the lower-case local part of an address (auth_username_format %Ln),
// the same convention replay uses for recipients.
func userKey(s string) string {
	local, _, _ := strings.Cut(s, "@")
	return strings.ToLower(local)
}

// Detect reads the log around cycle c and returns the paradoxes it
// created: every verb whose replayed result differs from the result first
// recorded, and whether someone observed the first one.
func Detect(ctx context.Context, l *undolog.Log, c Cycle) (Findings, error) {
	verbs, err := l.Verbs(ctx, undolog.Filter{AfterSeq: c.After})
	if err != nil {
		return Findings{}, fmt.Errorf("compensate: read the log after seq %d: %w", c.After, err)
	}
	d := &detector{log: l, verbs: map[int64]undolog.Verb{}, replays: map[int64][]replayed{},
		fetches: map[string]map[string]fetchSeen{}, expunged: map[string]map[string]bool{},
		removed: map[string]map[string]removal{}, made: map[string]map[string]undolog.Verb{}, addrs: map[string]string{}}
	verdict := int64(0)
	for _, v := range verbs {
		if v.Seq == c.Seq && v.Outcome != nil {
			verdict = v.Outcome.Seq
		}
	}
	for _, v := range verbs {
		switch {
		case v.Seq < c.Seq:
			d.verbs[v.Seq] = v
			d.order = append(d.order, v.Seq)
			d.learn(v)
		case v.Kind == verb.KindReplay && (verdict == 0 || v.Seq < verdict):
			var out verb.ReplayOutcome
			if err := json.Unmarshal(v.Record.Outcome, &out); err != nil {
				return Findings{}, fmt.Errorf("compensate: replay record %d: %w", v.Seq, err)
			}
			d.replays[v.Ref] = append(d.replays[v.Ref], replayed{user: v.User, out: out})
		}
		if v.Kind == verb.KindIMAPFetch {
			d.fetched(v)
		}
	}
	// Deliveries first: what the repair removed decides what the checks
	// of later commands on those messages find.
	for _, seq := range d.order {
		v := d.verbs[seq]
		if v.Kind == verb.KindLMTPDeliver || v.Kind == verb.KindIMAPAppend {
			d.checkCreation(ctx, v)
		}
	}
	for _, seq := range d.order {
		v := d.verbs[seq]
		switch {
		case v.Kind == verb.KindSMTPSubmit:
			d.checkRefused(v)
			if err := d.checkSubmission(v); err != nil {
				return Findings{}, err
			}
		case strings.HasPrefix(v.Kind, "imap.") && v.Kind != verb.KindIMAPFetch:
			d.checkCommand(v)
		}
	}
	d.checkReads()
	return Findings{Paradoxes: d.out, Reads: d.reads, Addresses: d.addrs}, nil
}

// learn notes what a verb tells about users: the address their mail is
// delivered to, and the messages they expunged themselves.
func (d *detector) learn(v undolog.Verb) {
	switch v.Kind {
	case verb.KindLMTPDeliver, verb.KindCompensation:
		var a verb.DeliveryArgs
		if json.Unmarshal(v.Args, &a) == nil {
			for _, r := range a.Rcpts {
				if _, ok := d.addrs[userKey(r)]; !ok && strings.Contains(r, "@") {
					d.addrs[userKey(r)] = r
				}
			}
		}
	case verb.KindSMTPSubmit:
		var a verb.DeliveryArgs
		if json.Unmarshal(v.Args, &a) == nil && a.AuthUser != "" && a.MailFrom != "" {
			if _, ok := d.addrs[userKey(a.AuthUser)]; !ok {
				d.addrs[userKey(a.AuthUser)] = a.MailFrom
			}
		}
	case verb.KindIMAPExpunge:
		var a verb.IMAPArgs
		if json.Unmarshal(v.Args, &a) == nil && imapOK(v) {
			u := userKey(v.User)
			for _, id := range a.UndoIDs {
				if d.expunged[u] == nil {
					d.expunged[u] = map[string]bool{}
				}
				d.expunged[u][id] = true
			}
		}
	}
}

// fetched notes which messages a user was sent, and when first.
func (d *detector) fetched(v undolog.Verb) {
	var a verb.IMAPFetchArgs
	if json.Unmarshal(v.Args, &a) != nil {
		return
	}
	u := userKey(v.User)
	for _, id := range a.UndoIDs {
		if d.fetches[u] == nil {
			d.fetches[u] = map[string]fetchSeen{}
		}
		if _, ok := d.fetches[u][id]; !ok {
			d.fetches[u][id] = fetchSeen{user: v.User, at: v.Time}
		}
	}
}

// imapOK reports whether an IMAP verb's client was told OK.
func imapOK(v undolog.Verb) bool {
	var o verb.IMAPOutcome
	return v.Outcome != nil && json.Unmarshal(v.Outcome.Outcome, &o) == nil && o.Status == "OK"
}

func messageOf(a verb.DeliveryArgs) Message {
	return Message{UndoID: a.UndoID, MessageID: a.Header.MessageID, Subject: a.Header.Subject, From: a.Header.From, Date: a.Header.Date}
}

// checkCreation compares a delivery's (or APPEND's) first result, the
// reply per recipient, with its replay: a message the repair kept out is
// removed for its recipients, and a sender told 250 observed the
// difference.
func (d *detector) checkCreation(ctx context.Context, v undolog.Verb) {
	reps := d.replays[v.Seq]
	if v.Kind == verb.KindIMAPAppend {
		var a verb.IMAPArgs
		if json.Unmarshal(v.Args, &a) != nil || !imapOK(v) || a.UndoID == "" {
			return
		}
		msg := Message{UndoID: a.UndoID}
		if hdr, err := d.blobHeader(v.Blob); err == nil {
			msg = headerMessage(a.UndoID, hdr)
		}
		for _, r := range reps {
			switch r.out.Status {
			case verb.ReplayOK:
				d.markMade(v.User, a.UndoID, v)
			case verb.ReplayCancelled, verb.ReplayFailed:
				d.markRemoved(v.User, removal{verb: v, msg: msg, now: removalText(r.out)})
			}
		}
		return
	}
	var a verb.DeliveryArgs
	var o verb.DeliveryOutcome
	if json.Unmarshal(v.Args, &a) != nil || v.Outcome == nil || json.Unmarshal(v.Outcome.Outcome, &o) != nil {
		return
	}
	var accepted []string
	for _, rr := range o.Rcpts {
		if rr.Reply.Positive() {
			accepted = append(accepted, rr.Rcpt)
		}
	}
	msg := messageOf(a)
	for _, r := range reps {
		rcpts := accepted
		if r.user != "" {
			// One replay record per recipient user: this one is about
			// r.user only.
			var mine []string
			for _, rc := range accepted {
				if userKey(rc) == userKey(r.user) {
					mine = append(mine, rc)
				}
			}
			if len(mine) > 0 {
				rcpts = mine
			}
		}
		folder, moved := movedTo(r.out)
		for _, rc := range rcpts {
			switch {
			case r.out.Status == verb.ReplayOK:
				d.markMade(userKey(rc), a.UndoID, v)
			case r.out.Status == verb.ReplayRerouted:
				d.markRemoved(userKey(rc), removal{verb: v, msg: msg, now: r.out.Detail, misdelivered: true})
			case r.out.Status == verb.ReplayRefused:
				d.markRemoved(userKey(rc), removal{verb: v, msg: msg, now: removalText(r.out)})
				d.checkSender(ctx, v, a, rc, r.out)
			case r.out.Status == verb.ReplayFiltered && moved:
				d.markRemoved(userKey(rc), removal{verb: v, msg: msg, now: "filed into the folder " + folder + " by the repair", moved: folder})
			case r.out.Status == verb.ReplayFiltered || r.out.Status == verb.ReplayCancelled || r.out.Status == verb.ReplayFailed:
				d.markRemoved(userKey(rc), removal{verb: v, msg: msg, now: removalText(r.out)})
				d.checkSender(ctx, v, a, rc, r.out)
			}
		}
	}
}

// checkSender: the sender of a delivery the repair removed was told it
// was delivered. A local sender (authenticated at the front door) is the
// observer; mail from outside that the repair removed on purpose (a
// filter, a cancel) is what the repair was for and nobody here saw it go;
// mail from outside that failed to be delivered again was promised to an
// outside host and is for the operator.
func (d *detector) checkSender(ctx context.Context, v undolog.Verb, a verb.DeliveryArgs, rcpt string, out verb.ReplayOutcome) {
	sender, at, seq, kind := "", v.Time, v.Seq, v.Kind
	if a.Submission != 0 {
		sub, ok := d.verbs[a.Submission]
		if !ok {
			recs, err := d.log.Verbs(ctx, undolog.Filter{AfterSeq: a.Submission - 1, Limit: 1})
			if err == nil && len(recs) == 1 && recs[0].Seq == a.Submission {
				sub, ok = recs[0], true
			}
		}
		if ok {
			sender, at, seq, kind = sub.User, sub.Time, sub.Seq, sub.Kind
		}
	}
	if sender == "" && out.Status != verb.ReplayFailed {
		return
	}
	msg := messageOf(a)
	d.out = append(d.out, Paradox{Kind: DeliveryLost, User: sender, Verb: seq, VerbKind: kind, Message: &msg,
		Rcpt: rcpt, Seen: at, Now: removalText(out), Observed: true})
}

// checkRefused finds, for a front-door submission, the destinations
// outside the machine the repaired Postfix delivers it to, which the
// replay held (held_outside, for the operator); and, for a message
// Postfix refused (5xx) the first time, its
// sender told so, that the repaired Postfix accepted on replay (replay
// records of the submission with status ok, one per recipient user): the
// recipient has mail they never knew of, and the sender was told
// something that is no longer true.
func (d *detector) checkRefused(v undolog.Verb) {
	var a verb.DeliveryArgs
	var o verb.DeliveryOutcome
	if json.Unmarshal(v.Args, &a) != nil || v.Outcome == nil || json.Unmarshal(v.Outcome.Outcome, &o) != nil || o.Reply == nil {
		return
	}
	msg := messageOf(a)
	for _, r := range d.replays[v.Seq] {
		if r.out.Status == verb.ReplayHeld {
			rcpt := ""
			if i := strings.Index(r.out.Detail, "<"); i >= 0 {
				if j := strings.Index(r.out.Detail[i:], ">"); j > 0 {
					rcpt = r.out.Detail[i+1 : i+j]
				}
			}
			d.out = append(d.out, Paradox{Kind: HeldOutside, Verb: v.Seq, VerbKind: v.Kind, Message: &msg, Rcpt: rcpt,
				Seen: v.Time, Now: r.out.Detail, Observed: true})
		}
	}
	if o.Reply.Positive() {
		return
	}
	for _, r := range d.replays[v.Seq] {
		rcpt, ok := strings.CutPrefix(r.out.Detail, "re-delivered to ")
		if r.out.Status != verb.ReplayOK || r.user == "" || !ok {
			continue
		}
		sender := a.MailFrom
		if sender == "" {
			sender = "the null sender (a bounce)"
		}
		d.out = append(d.out, Paradox{Kind: RefusedByMistake, User: r.user, Verb: v.Seq, VerbKind: v.Kind, Message: &msg,
			Rcpt: rcpt, Action: sender, Seen: v.Time, Observed: true,
			Now: fmt.Sprintf("its sender <%s> was told %q", a.MailFrom, o.Reply.String())})
	}
}

// movedTo parses the folder out of a filter's "filed into FOLDER by
// filter RULE".
func movedTo(o verb.ReplayOutcome) (string, bool) {
	rest, ok := strings.CutPrefix(o.Detail, "filed into ")
	if !ok {
		return "", false
	}
	folder, _, _ := strings.Cut(rest, " by filter ")
	return folder, true
}

// dovecotTiming is the timing Dovecot appends to its replies.
var dovecotTiming = regexp.MustCompile(`\s*\([0-9.]+( \+ [0-9.]+)* secs\)\.?$`)

// serverSaid turns a replay's error into what the mail server said, in
// quotes: "imap: NO [ALREADYEXISTS] Target mailbox already exists (0.001
// + 0.000 secs)." becomes "Target mailbox already exists".
func serverSaid(detail string) string {
	s := strings.TrimSpace(detail)
	s = strings.TrimPrefix(s, "imap: ")
	for _, st := range []string{"NO ", "BAD "} {
		s = strings.TrimPrefix(s, st)
	}
	if strings.HasPrefix(s, "[") {
		if i := strings.Index(s, "] "); i > 0 {
			s = s[i+2:]
		}
	}
	s = dovecotTiming.ReplaceAllString(s, "")
	return "\"" + strings.TrimSuffix(s, ".") + "\""
}

// removalText says in words why a message is gone.
func removalText(o verb.ReplayOutcome) string {
	switch o.Status {
	case verb.ReplayFiltered:
		if rule, ok := strings.CutPrefix(o.Detail, "dropped by filter "); ok {
			return "removed by the repair (a filter, " + rule + ")"
		}
		return "removed by the repair (" + o.Detail + ")"
	case verb.ReplayCancelled:
		return "cancelled by the administrator's repair"
	case verb.ReplayFailed:
		return "refused by the mail server when it was redone: " + serverSaid(o.Detail)
	case verb.ReplayRefused, verb.ReplayRerouted:
		return o.Detail
	}
	return string(o.Status) + " (" + o.Detail + ")"
}

func (d *detector) markRemoved(user string, r removal) {
	u := userKey(user)
	if d.removed[u] == nil {
		d.removed[u] = map[string]removal{}
	}
	d.removed[u][r.msg.UndoID] = r
}

func (d *detector) markMade(user, id string, v undolog.Verb) {
	u := userKey(user)
	if d.made[u] == nil {
		d.made[u] = map[string]undolog.Verb{}
	}
	d.made[u][id] = v
}

// checkReads turns every removed message into a read_removed (or
// read_moved) paradox, observed if the user was sent it before. A message
// the user expunged themselves is gone in both timelines: no paradox.
func (d *detector) checkReads() {
	for _, u := range sortedKeys(d.removed) {
		for _, id := range sortedKeys(d.removed[u]) {
			r := d.removed[u][id]
			if d.expunged[u][id] {
				continue
			}
			kind := ReadRemoved
			switch {
			case r.misdelivered:
				kind = Misdelivered
			case r.moved != "":
				kind = ReadMoved
			}
			msg := r.msg
			p := Paradox{Kind: kind, User: u, Verb: r.verb.Seq, VerbKind: r.verb.Kind, Message: &msg, Seen: r.verb.Time, Now: r.now}
			if f, ok := d.fetches[u][id]; ok {
				p.User, p.Seen, p.Observed = f.user, f.at, true
			}
			d.out = append(d.out, p)
		}
	}
	for _, u := range sortedKeys(d.made) {
		for _, id := range sortedKeys(d.made[u]) {
			f, ok := d.fetches[u][id]
			if !ok {
				continue
			}
			v := d.made[u][id]
			c := ReadCheck{User: f.user, Verb: v.Seq, Kind: v.Kind, Blob: v.Blob, Message: Message{UndoID: id}, Seen: f.at}
			var a verb.DeliveryArgs
			if v.Kind == verb.KindLMTPDeliver && json.Unmarshal(v.Args, &a) == nil {
				c.Message = messageOf(a)
			} else if hdr, err := d.blobHeader(v.Blob); err == nil {
				c.Message = headerMessage(id, hdr)
			}
			d.reads = append(d.reads, c)
		}
	}
}

// checkCommand compares an IMAP command's first result (OK) with its
// replay.
func (d *detector) checkCommand(v undolog.Verb) {
	reps := d.replays[v.Seq]
	if len(reps) == 0 || !imapOK(v) || v.Kind == verb.KindIMAPAppend {
		return
	}
	var a verb.IMAPArgs
	if json.Unmarshal(v.Args, &a) != nil {
		return
	}
	u := userKey(v.User)
	var gone []removal
	for _, id := range sortedValues(a.UndoIDs) {
		if r, ok := d.removed[u][id]; ok && r.moved == "" {
			gone = append(gone, r)
		}
	}
	for _, r := range reps {
		base := Paradox{User: v.User, Verb: v.Seq, VerbKind: v.Kind, Action: describeCommand(v.Kind, a), Seen: v.Time, Observed: true}
		switch {
		case (v.Kind == verb.KindIMAPCopy || v.Kind == verb.KindIMAPMove) && len(gone) > 0:
			// The copy went where the original went: the user filed
			// away something the repair took out.
			for _, g := range gone {
				p := base
				p.Kind, p.Message, p.Now = SentOnwards, &g.msg, "the message was "+g.now+", and with it the copy in "+a.Dest
				d.out = append(d.out, p)
			}
		case r.out.Status == verb.ReplayCancelled:
			p := base
			p.Kind, p.Now = ActionCancelled, "cancelled by the administrator's repair"
			d.out = append(d.out, p)
		case r.out.Status == verb.ReplayRepaired && v.Kind == verb.KindIMAPExpunge:
			// The user wanted those messages gone, and they are.
		case r.out.Status == verb.ReplayRepaired || r.out.Status == verb.ReplayFailed:
			p := base
			p.Kind = ActionFailed
			if len(gone) > 0 {
				p.Message = &gone[0].msg
				p.Now = "it could not be redone: the message was " + gone[0].now
				if len(gone) > 1 {
					p.Now = fmt.Sprintf("it could not be redone: its %d messages were removed by the repair", len(gone))
				}
			} else if r.out.Status == verb.ReplayRepaired {
				// Replay skipped it: its messages are not where the
				// command named them (a filter filed them elsewhere).
				p.Now = "it could not be redone: the repair moved or removed the messages it was about"
			} else {
				p.Now = "it could not be redone: the mail server said " + serverSaid(r.out.Detail)
			}
			d.out = append(d.out, p)
		}
	}
}

// describeCommand says what an IMAP command did, for the user who gave it.
func describeCommand(kind string, a verb.IMAPArgs) string {
	switch kind {
	case verb.KindIMAPStore:
		what := "set the flags " + strings.Join(a.Flags, " ")
		switch a.Op {
		case "+":
			what = "added the flags " + strings.Join(a.Flags, " ")
		case "-":
			what = "removed the flags " + strings.Join(a.Flags, " ")
		}
		return fmt.Sprintf("you %s on a message in %q", what, a.Mailbox)
	case verb.KindIMAPCopy:
		return fmt.Sprintf("you copied a message from %q to %q", a.Mailbox, a.Dest)
	case verb.KindIMAPMove:
		return fmt.Sprintf("you moved a message from %q to %q", a.Mailbox, a.Dest)
	case verb.KindIMAPExpunge:
		return fmt.Sprintf("you deleted messages in %q", a.Mailbox)
	case verb.KindIMAPCreate:
		return fmt.Sprintf("you created the folder %q", a.Mailbox)
	case verb.KindIMAPDelete:
		return fmt.Sprintf("you deleted the folder %q", a.Mailbox)
	case verb.KindIMAPRename:
		return fmt.Sprintf("you renamed the folder %q to %q", a.Mailbox, a.Dest)
	case verb.KindIMAPSubscribe:
		return fmt.Sprintf("you subscribed to the folder %q", a.Mailbox)
	case verb.KindIMAPUnsubscribe:
		return fmt.Sprintf("you unsubscribed from the folder %q", a.Mailbox)
	}
	return "you gave the command " + a.Summary()
}

// checkSubmission finds mail a user sent at the front door that replied
// to or forwarded a message the repair removed from their mailbox: its
// In-Reply-To or References name the removed message's Message-ID
// (RFC 5322 section 3.6.4), or it carries the message as an attachment
// (message/rfc822). That content has left and cannot be called back.
func (d *detector) checkSubmission(v undolog.Verb) error {
	var a verb.DeliveryArgs
	var o verb.DeliveryOutcome
	if json.Unmarshal(v.Args, &a) != nil || v.Outcome == nil || json.Unmarshal(v.Outcome.Outcome, &o) != nil ||
		o.Reply == nil || !o.Reply.Positive() {
		return nil
	}
	user := a.AuthUser
	if user == "" {
		user = a.MailFrom
	}
	removed := d.removed[userKey(user)]
	byMsgID := map[string]removal{}
	for _, r := range removed {
		if r.moved == "" && r.msg.MessageID != "" && r.verb.Seq < v.Seq {
			byMsgID[r.msg.MessageID] = r
		}
	}
	if len(byMsgID) == 0 {
		return nil
	}
	refs, err := d.submissionRefs(v.Blob)
	if err != nil {
		return fmt.Errorf("compensate: read submission %d (blob %s): %w", v.Seq, v.Blob, err)
	}
	for _, id := range refs {
		r, ok := byMsgID[id]
		if !ok {
			continue
		}
		delete(byMsgID, id)
		msg := r.msg
		subj := a.Header.Subject
		d.out = append(d.out, Paradox{Kind: SentOnwards, User: user, Verb: v.Seq, VerbKind: v.Kind, Message: &msg,
			Action: fmt.Sprintf("in your message %q to %s", subj, strings.Join(a.Rcpts, ", ")),
			Seen:   v.Time, Now: r.now, Observed: true})
	}
	return nil
}

// submissionRefs returns the Message-IDs a sent message refers to: its
// In-Reply-To and References fields and the Message-ID of each attached
// message.
func (d *detector) submissionRefs(blob string) ([]string, error) {
	rc, err := d.log.OpenBlob(blob)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	m, err := message.Read(rc)
	if err != nil && !message.IsUnknownCharset(err) && !message.IsUnknownEncoding(err) {
		return nil, err
	}
	refs := msgIDs(m.Header.Get("In-Reply-To") + " " + m.Header.Get("References"))
	err = m.Walk(func(_ []int, part *message.Entity, err error) error {
		if err != nil {
			return nil // a part go-message cannot read is not a reference
		}
		if mt, _, _ := part.Header.ContentType(); mt == "message/rfc822" {
			if hdr, err := textproto.ReadHeader(bufio.NewReader(part.Body)); err == nil {
				refs = append(refs, msgIDs(hdr.Get("Message-Id"))...)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return refs, nil
}

// msgIDs extracts the <...> message identifiers of a field.
func msgIDs(s string) []string {
	var out []string
	for {
		i := strings.IndexByte(s, '<')
		if i < 0 {
			return out
		}
		j := strings.IndexByte(s[i:], '>')
		if j < 0 {
			return out
		}
		out = append(out, s[i:i+j+1])
		s = s[i+j+1:]
	}
}

// blobHeader reads the header section of a logged message.
func (d *detector) blobHeader(blob string) (textproto.Header, error) {
	if blob == "" {
		return textproto.Header{}, io.EOF
	}
	rc, err := d.log.OpenBlob(blob)
	if err != nil {
		return textproto.Header{}, err
	}
	defer rc.Close()
	return textproto.ReadHeader(bufio.NewReader(rc))
}

// headerMessage summarises a message from its header, as the proxy does
// for deliveries.
func headerMessage(id string, hdr textproto.Header) Message {
	h := message.Header{Header: hdr}
	subj, _ := h.Text("Subject")
	from, _ := h.Text("From")
	return Message{UndoID: id, MessageID: strings.TrimSpace(hdr.Get("Message-Id")), Subject: subj, From: from, Date: hdr.Get("Date")}
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// sortedValues returns the distinct values of m, sorted.
func sortedValues(m map[string]string) []string {
	var out []string
	for _, v := range m {
		out = append(out, v)
	}
	slices.Sort(out)
	return slices.Compact(out)
}
