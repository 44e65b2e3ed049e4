package compensate

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"strings"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-message/textproto"

	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// ContentChecker reads the message a user has now under an undo id, for
// the read_changed check. A message it cannot find returns nil, nil.
type ContentChecker interface {
	Current(ctx context.Context, user, undoID string) ([]byte, error)
	Close()
}

// IMAPChecker reads messages from the mail server as their user, through
// Dovecot's master user, like replay; mailboxes are only EXAMINEd, so no
// flag changes.
type IMAPChecker struct {
	Target   replay.Target
	sessions map[string]*imapclient.Client
	// where maps each user's messages, by undo id, to where they are.
	where    map[string]map[string]location
	selected map[string]string
}

// location is where a message is in a user's store.
type location struct {
	mailbox string
	uid     imap.UID
}

// Current implements ContentChecker.
func (k *IMAPChecker) Current(ctx context.Context, user, undoID string) ([]byte, error) {
	c, err := k.session(user)
	if err != nil {
		return nil, err
	}
	where, err := k.index(ctx, c, user)
	if err != nil {
		return nil, err
	}
	loc, ok := where[undoID]
	if !ok {
		return nil, nil
	}
	if err := k.examine(c, user, loc.mailbox); err != nil {
		return nil, err
	}
	msgs, err := c.Fetch(imap.UIDSetNum(loc.uid), &imap.FetchOptions{BodySection: []*imap.FetchItemBodySection{{Peek: true}}}).Collect()
	if err != nil {
		return nil, fmt.Errorf("fetch %s from %s/%s: %w", undoID, user, loc.mailbox, err)
	}
	for _, m := range msgs {
		for _, body := range m.BodySection {
			return body.Bytes, nil
		}
	}
	return nil, nil
}

// index reads the trace field of every message of the user once: one
// FETCH per mailbox rather than a search per message, because a client
// that syncs everything (mbsync, a phone) has read every message.
func (k *IMAPChecker) index(ctx context.Context, c *imapclient.Client, user string) (map[string]location, error) {
	if w, ok := k.where[user]; ok {
		return w, nil
	}
	boxes, err := c.List("", "*", nil).Collect()
	if err != nil {
		return nil, fmt.Errorf("list %s's mailboxes: %w", user, err)
	}
	where := map[string]location{}
	trace := &imap.FetchItemBodySection{Specifier: imap.PartSpecifierHeader, HeaderFields: []string{verb.TraceHeader}, Peek: true}
	for _, b := range boxes {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if hasAttr(b.Attrs, imap.MailboxAttrNoSelect) || hasAttr(b.Attrs, imap.MailboxAttrNonExistent) {
			continue
		}
		if err := k.examine(c, user, b.Mailbox); err != nil {
			return nil, err
		}
		if c.Mailbox() == nil || c.Mailbox().NumMessages == 0 {
			continue
		}
		var all imap.SeqSet
		all.AddRange(1, 0)
		msgs, err := c.Fetch(all, &imap.FetchOptions{UID: true, BodySection: []*imap.FetchItemBodySection{trace}}).Collect()
		if err != nil {
			return nil, fmt.Errorf("read the trace fields of %s/%s: %w", user, b.Mailbox, err)
		}
		for _, m := range msgs {
			for _, body := range m.BodySection {
				h, err := textproto.ReadHeader(bufio.NewReader(bytes.NewReader(body.Bytes)))
				if err != nil {
					continue
				}
				for _, id := range h.Values(verb.TraceHeader) {
					where[strings.TrimSpace(id)] = location{mailbox: b.Mailbox, uid: m.UID}
				}
			}
		}
	}
	if k.where == nil {
		k.where = map[string]map[string]location{}
	}
	k.where[user] = where
	return where, nil
}

func (k *IMAPChecker) examine(c *imapclient.Client, user, mailbox string) error {
	if k.selected[user] == mailbox {
		return nil
	}
	if _, err := c.Select(mailbox, &imap.SelectOptions{ReadOnly: true}).Wait(); err != nil {
		delete(k.selected, user)
		return fmt.Errorf("examine %s/%s: %w", user, mailbox, err)
	}
	if k.selected == nil {
		k.selected = map[string]string{}
	}
	k.selected[user] = mailbox
	return nil
}

func hasAttr(attrs []imap.MailboxAttr, a imap.MailboxAttr) bool {
	for _, x := range attrs {
		if strings.EqualFold(string(x), string(a)) {
			return true
		}
	}
	return false
}

func (k *IMAPChecker) session(user string) (*imapclient.Client, error) {
	if c := k.sessions[user]; c != nil {
		return c, nil
	}
	sep := k.Target.Separator
	if sep == "" {
		sep = "*"
	}
	c, err := imapclient.DialInsecure(k.Target.IMAPAddr, nil)
	if err != nil {
		return nil, fmt.Errorf("connect to IMAP %s: %w", k.Target.IMAPAddr, err)
	}
	if err := c.Login(user+sep+k.Target.MasterUser, k.Target.MasterPassword).Wait(); err != nil {
		c.Close()
		return nil, fmt.Errorf("log in as %s through the master user: %w", user, err)
	}
	if k.sessions == nil {
		k.sessions = map[string]*imapclient.Client{}
	}
	k.sessions[user] = c
	return c, nil
}

// Close logs out every session.
func (k *IMAPChecker) Close() {
	for _, c := range k.sessions {
		c.Logout().Wait()
		c.Close()
	}
	k.sessions, k.where, k.selected = nil, nil, nil
}

// checkContent compares each message a user read and the replay made
// again with the message as it is now: the header fields a reader sees
// and the body. Trace fields the delivery path adds (Return-Path,
// Delivered-To, Received, Undomail-Id) are not content.
func checkContent(ctx context.Context, l *undolog.Log, k ContentChecker, reads []ReadCheck) ([]Paradox, error) {
	var out []Paradox
	for _, r := range reads {
		orig, err := l.ReadBlob(r.Blob)
		if err != nil {
			return out, fmt.Errorf("compensate: read the message of verb %d (blob %s): %w", r.Verb, r.Blob, err)
		}
		now, err := k.Current(ctx, r.User, r.Message.UndoID)
		if err != nil {
			return out, fmt.Errorf("compensate: read %s's message %s now: %w", r.User, r.Message.UndoID, err)
		}
		if now == nil {
			continue // gone since, by the user's own later command
		}
		if diff := contentDiff(orig, now); diff != "" {
			msg := r.Message
			out = append(out, Paradox{Kind: ReadChanged, User: r.User, Verb: r.Verb, VerbKind: r.Kind, Message: &msg,
				Seen: r.Seen, Now: diff, Observed: true})
		}
	}
	return out, nil
}

// checkRestored finds the messages delivered digests told users had been
// removed that are in their store again: the repair that removed them was
// undone, by a cycle back to the snapshot taken before it. The digest
// itself is still in the mailbox (replay re-delivers it), so what it says
// needs correcting.
func checkRestored(ctx context.Context, k ContentChecker, earlier []Compensation) ([]Paradox, error) {
	var out []Paradox
	for _, c := range earlier {
		if c.Args.Audience != AudienceUser || !c.Delivered() {
			continue
		}
		for _, p := range c.Args.Paradoxes {
			if p.Kind != ReadRemoved || p.Message == nil {
				continue
			}
			now, err := k.Current(ctx, p.User, p.Message.UndoID)
			if err != nil {
				return out, fmt.Errorf("compensate: look for %s's message %s (explained by compensation %d): %w", p.User, p.Message.UndoID, c.Seq, err)
			}
			if now == nil {
				continue
			}
			msg := *p.Message
			out = append(out, Paradox{Kind: Restored, User: p.User, Verb: c.Seq, VerbKind: verb.KindCompensation, Message: &msg,
				Seen: c.Time, Now: "the repair that removed it was undone", Observed: true})
		}
	}
	return out, nil
}

// readerFields are the header fields a mail client shows.
var readerFields = []string{"From", "To", "Cc", "Subject", "Date", "Reply-To"}

// contentDiff says how now differs from orig as a reader would see it,
// "" if it does not.
func contentDiff(orig, now []byte) string {
	oh, ob := splitMessage(orig)
	nh, nb := splitMessage(now)
	for _, f := range readerFields {
		if strings.TrimSpace(oh.Get(f)) != strings.TrimSpace(nh.Get(f)) {
			return fmt.Sprintf("its %s is different now", f)
		}
	}
	if !bytes.Equal(normalizeBody(ob), normalizeBody(nb)) {
		return "its text is different now"
	}
	return ""
}

func splitMessage(b []byte) (textproto.Header, []byte) {
	br := bufio.NewReader(bytes.NewReader(b))
	h, err := textproto.ReadHeader(br)
	if err != nil {
		return textproto.Header{}, b
	}
	var rest bytes.Buffer
	rest.ReadFrom(br)
	return h, rest.Bytes()
}

// normalizeBody ignores line-ending and trailing-whitespace differences
// that transports introduce.
func normalizeBody(b []byte) []byte {
	lines := bytes.Split(bytes.ReplaceAll(b, []byte("\r\n"), []byte("\n")), []byte("\n"))
	for i, l := range lines {
		lines[i] = bytes.TrimRight(l, " \t")
	}
	return bytes.TrimRight(bytes.Join(lines, []byte("\n")), "\n")
}
