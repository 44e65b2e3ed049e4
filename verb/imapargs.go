package verb

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// This file holds the IMAP front end's record vocabulary: the kinds it
// logs and their argument and outcome types, as stored in the undo log.

// Verb kinds recorded by the IMAP front end. Every command Dovecot offers
// that changes a user's mail is one of them; everything else (SELECT,
// FETCH, SEARCH, STATUS, LIST, IDLE, NOOP, ENABLE, ...) is relayed without
// an intent. FETCH of bodies and headers is recorded afterwards as an
// externalization (KindIMAPFetch), never held back.
const (
	KindIMAPAppend      = "imap.append"      // APPEND: the message is the record's blob
	KindIMAPStore       = "imap.store"       // STORE / UID STORE: flags and keywords
	KindIMAPCopy        = "imap.copy"        // COPY / UID COPY
	KindIMAPMove        = "imap.move"        // MOVE / UID MOVE (RFC 6851)
	KindIMAPExpunge     = "imap.expunge"     // EXPUNGE, UID EXPUNGE (RFC 4315), CLOSE of a writable mailbox
	KindIMAPCreate      = "imap.create"      // CREATE
	KindIMAPDelete      = "imap.delete"      // DELETE
	KindIMAPRename      = "imap.rename"      // RENAME
	KindIMAPSubscribe   = "imap.subscribe"   // SUBSCRIBE
	KindIMAPUnsubscribe = "imap.unsubscribe" // UNSUBSCRIBE
	KindIMAPSetMetadata = "imap.setmetadata" // SETMETADATA (RFC 5464), when the server offers METADATA
	KindIMAPFetch       = "imap.fetch"       // externalization: bodies or headers a user was sent
)

// IMAPArgs are the arguments of an IMAP intent. Messages are named by
// mailbox, UIDVALIDITY and UIDs; a command given with sequence numbers is
// resolved to UIDs before it is forwarded, and both are kept.
type IMAPArgs struct {
	Command     string `json:"command"` // as the client sent it: "UID STORE", "APPEND", ...
	Mailbox     string `json:"mailbox,omitempty"`
	UIDValidity uint32 `json:"uidvalidity,omitempty"`
	UIDs        string `json:"uids,omitempty"` // UID set the command acts on (resolved)
	Seqs        string `json:"seqs,omitempty"` // sequence set as sent, for non-UID forms
	// UndoIDs maps each UID (decimal) to the message's undo id, for the
	// messages whose id is known (see imapids.go).
	UndoIDs map[string]string `json:"undo_ids,omitempty"`
	// STORE
	Op             string   `json:"op,omitempty"` // "+", "-" or "" (replace)
	Flags          []string `json:"flags,omitempty"`
	Silent         bool     `json:"silent,omitempty"`
	UnchangedSince uint64   `json:"unchangedsince,omitempty"` // CONDSTORE (RFC 7162)
	// COPY, MOVE, RENAME
	Dest string `json:"dest,omitempty"`
	// APPEND
	UndoID string `json:"undo_id,omitempty"`
	Date   string `json:"date,omitempty"`
	Size   int64  `json:"size,omitempty"`
	// Metadata holds what SETMETADATA (RFC 5464 4.3) set: entry name to
	// value, null for an entry it removed.
	Metadata map[string]*string `json:"metadata,omitempty"`
	// Raw holds the arguments of commands recorded without a structured
	// form.
	Raw string `json:"raw,omitempty"`
}

// IMAPOutcome is what the client was told when the command completed.
type IMAPOutcome struct {
	Status string `json:"status"` // OK, NO, BAD
	Code   string `json:"code,omitempty"`
	Text   string `json:"text,omitempty"`
	// From the response codes (RFC 4315): where APPEND put the message,
	// where COPY and MOVE put the copies.
	AppendUID string `json:"appenduid,omitempty"` // "uidvalidity uid"
	CopyUID   string `json:"copyuid,omitempty"`   // "uidvalidity source-uids dest-uids"
	// Modified holds the UIDs a conditional STORE (UNCHANGEDSINCE, RFC
	// 7162 3.1.3) left alone because they changed since: its MODIFIED
	// response code, as UIDs. The STORE acted on the other messages only.
	Modified string `json:"modified,omitempty"`
	// Expunged counts the messages the server reported expunged while an
	// EXPUNGE, UID EXPUNGE or MOVE ran (its untagged EXPUNGE or VANISHED
	// responses): what the server did, to hold against the UIDs the
	// intent names. CLOSE expunges silently and has no count.
	Expunged *int `json:"expunged,omitempty"`
}

// IMAPFetchArgs is an externalization record: the bodies or headers of
// these messages went to the user.
type IMAPFetchArgs struct {
	Mailbox     string `json:"mailbox"`
	UIDValidity uint32 `json:"uidvalidity"`
	UIDs        string `json:"uids,omitempty"`
	// Seqs holds the sequence numbers of a FETCH that did not ask for
	// UIDs; UIDs then come from a search run right behind it.
	Seqs    string            `json:"seqs,omitempty"`
	UndoIDs map[string]string `json:"undo_ids,omitempty"` // by UID, as in IMAPArgs
	// Seen is set when the FETCH set \Seen on these messages (no PEEK, a
	// writable mailbox): a change of its own, which replay redoes.
	Seen bool `json:"seen,omitempty"`
}

// Summary describes the verb in one line for `undomail log`.
func (a IMAPArgs) Summary() string {
	var b strings.Builder
	b.WriteString(a.Command)
	if a.Mailbox != "" {
		fmt.Fprintf(&b, " %q", a.Mailbox)
	}
	if a.Seqs != "" {
		fmt.Fprintf(&b, " seq %s", a.Seqs)
	}
	if a.UIDs != "" {
		fmt.Fprintf(&b, " uid %s", a.UIDs)
	}
	if a.Op != "" || len(a.Flags) > 0 && a.Command != "APPEND" {
		fmt.Fprintf(&b, " %sFLAGS (%s)", a.Op, strings.Join(a.Flags, " "))
	}
	if a.Dest != "" {
		fmt.Fprintf(&b, " -> %q", a.Dest)
	}
	if a.Size > 0 {
		fmt.Fprintf(&b, " %d bytes id=%s", a.Size, a.UndoID)
	}
	if n := len(a.UndoIDs); n > 0 {
		fmt.Fprintf(&b, " ids=%s", summarizeIDs(a.UndoIDs))
	}
	if len(a.Metadata) > 0 {
		set, removed := a.MetadataEntries()
		var parts []string
		if len(set) > 0 {
			parts = append(parts, "set "+strings.Join(set, ", "))
		}
		if len(removed) > 0 {
			parts = append(parts, "removed "+strings.Join(removed, ", "))
		}
		b.WriteString(" " + strings.Join(parts, ", "))
	}
	if a.Raw != "" {
		b.WriteString(" " + a.Raw)
	}
	return b.String()
}

// MetadataEntries lists, sorted, the entries a SETMETADATA set and those
// it removed.
func (a IMAPArgs) MetadataEntries() (set, removed []string) {
	for entry, v := range a.Metadata {
		if v == nil {
			removed = append(removed, entry)
		} else {
			set = append(set, entry)
		}
	}
	slices.Sort(set)
	slices.Sort(removed)
	return set, removed
}

// Summary describes the outcome in one line for `undomail log`.
func (o IMAPOutcome) Summary() string {
	s := o.Status
	if o.Code != "" {
		s += " [" + o.Code + "]"
	}
	if o.CopyUID != "" && !strings.HasPrefix(o.Code, "COPYUID") {
		s += " [COPYUID " + o.CopyUID + "]" // MOVE: from the untagged OK
	}
	if o.Text != "" {
		s += " " + o.Text
	}
	return s
}

// Summary describes the externalization in one line for `undomail log`.
func (a IMAPFetchArgs) Summary() string {
	set := "uid " + a.UIDs
	if a.Seqs != "" {
		set = "seq " + a.Seqs
	}
	s := fmt.Sprintf("seen %q %s", a.Mailbox, set)
	if len(a.UndoIDs) > 0 {
		s += " ids=" + summarizeIDs(a.UndoIDs)
	}
	return s
}

// summarizeIDs lists up to three "uid:undo-id" pairs and how many more.
func summarizeIDs(m map[string]string) string {
	uids := make([]uint32, 0, len(m))
	for k := range m {
		if n, err := strconv.ParseUint(k, 10, 32); err == nil {
			uids = append(uids, uint32(n))
		}
	}
	var parts []string
	for i, u := range sortedUIDs(uids) {
		if i == 3 {
			parts = append(parts, fmt.Sprintf("+%d more", len(uids)-3))
			break
		}
		parts = append(parts, fmt.Sprintf("%d:%s", u, m[strconv.FormatUint(uint64(u), 10)]))
	}
	return strings.Join(parts, ",")
}

// sortedUIDs returns a sorted copy.
func sortedUIDs(u []uint32) []uint32 {
	out := slices.Clone(u)
	slices.Sort(out)
	return out
}
