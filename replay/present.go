package replay

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/undomail/undomail/timetravel"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// A cycle is verified against an independent truth (DESIGN: "Positive
// acknowledgement"; issue 13): the snapshot of the present it took before
// it rewound. After the replay the store must equal that present, mailbox
// by mailbox and message by message (undo id, or content hash where there
// is none; folder; flags and keywords), except where the repair explains
// the difference: a cancelled verb, a filtered delivery, and what followed
// from them. The replay's own model is not the truth: a wrong replay
// builds a wrong model that agrees with itself.

// FilteredDelivery is what a filter did to a delivery in a replay.
type FilteredDelivery struct {
	Why     string `json:"why"`
	Dropped bool   `json:"dropped,omitempty"` // not in the store at all (else filed elsewhere)
}

// RepairSet is what a repair changes compared with the present, and why:
// messages (by user and key), folders (by user and mailbox, with what is
// below them), and messages that must not be in the store afterwards.
type RepairSet struct {
	msgs    map[string]string // user \x00 key -> why
	folders map[string]string // user/mailbox -> why
	// anon: messages without an undo id in these folders (user/mailbox)
	// were named by a cancelled verb by UID only.
	anon    map[string]string
	removed map[string]string // user \x00 key -> why
}

// RepairEntry is one thing the repair changes, for the plan.
type RepairEntry struct {
	User    string `json:"user"`
	Mailbox string `json:"mailbox,omitempty"`
	Message string `json:"message,omitempty"` // undo id or content hash
	Removed bool   `json:"removed,omitempty"` // the message is not in the store afterwards
	Why     string `json:"why"`
}

func newRepairSet() *RepairSet {
	return &RepairSet{msgs: map[string]string{}, folders: map[string]string{}, anon: map[string]string{}, removed: map[string]string{}}
}

// msg notes why a message differs; every reason is kept (the first
// few), so the plan names each verb that changes it.
func (s *RepairSet) msg(user, key, why string) {
	if key == "" {
		return
	}
	k := user + "\x00" + key
	old, ok := s.msgs[k]
	switch {
	case !ok:
		s.msgs[k] = why
	case strings.Contains(old, why) || strings.Count(old, "; ") >= 4:
	default:
		s.msgs[k] = old + "; " + why
	}
}

func (s *RepairSet) folder(user, mailbox, why string) {
	if _, ok := s.folders[user+"/"+mailbox]; !ok && mailbox != "" {
		s.folders[user+"/"+mailbox] = why
	}
}

// inFolder says why a mailbox (or one above it) is changed by the repair.
func (s *RepairSet) inFolder(user, mailbox string) (string, bool) {
	for name, why := range s.folders {
		u, m, _ := strings.Cut(name, "/")
		if u == user && (strings.EqualFold(m, mailbox) || isChild(mailbox, m)) {
			return why, true
		}
	}
	return "", false
}

// explains says why the repair accounts for a difference.
func (s *RepairSet) explains(d storeDiff) (string, bool) {
	u, m := d.user(), d.mailbox()
	if why, ok := s.inFolder(u, m); ok {
		return why, true
	}
	if d.Key == "" {
		return "", false
	}
	if why, ok := s.msgs[u+"\x00"+d.Key]; ok {
		return why, true
	}
	if why, ok := s.anon[u+"/"+m]; ok && strings.HasPrefix(d.Key, "sha256:") {
		return why, true
	}
	return "", false
}

// Entries lists what the repair changes, sorted by user, mailbox,
// message.
func (s *RepairSet) Entries() []RepairEntry {
	var out []RepairEntry
	for k, why := range s.folders {
		u, m, _ := strings.Cut(k, "/")
		out = append(out, RepairEntry{User: u, Mailbox: m, Why: why})
	}
	for k, why := range s.anon {
		u, m, _ := strings.Cut(k, "/")
		out = append(out, RepairEntry{User: u, Mailbox: m, Message: "messages without undo id", Why: why})
	}
	for k, why := range s.msgs {
		u, id, _ := strings.Cut(k, "\x00")
		_, gone := s.removed[k]
		out = append(out, RepairEntry{User: u, Message: id, Removed: gone, Why: why})
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.User != b.User {
			return a.User < b.User
		}
		if a.Mailbox != b.Mailbox {
			return a.Mailbox < b.Mailbox
		}
		return a.Message < b.Message
	})
	return out
}

// ExplainRepair works out, from the log, what a repair changes compared
// with the present: the verbs with after < seq < before, of users (nil:
// everyone), with cancel left out and filtered the deliveries the filters
// dropped or filed elsewhere. Cancellations of earlier cycles whose
// verbs are in the range are in the present already and change nothing;
// those of verbs before the range (a cycle back to before an earlier
// cycle's snapshot: undoing it) are undone, and what they changed comes
// back.
func ExplainRepair(ctx context.Context, l *undolog.Log, after, before int64, cancel map[int64]bool,
	filtered map[string]FilteredDelivery, users map[string]bool) (*RepairSet, error) {
	s := newRepairSet()
	if err := s.undone(ctx, l, after, before, users); err != nil {
		return nil, err
	}
	verbs, err := l.Verbs(ctx, undolog.Filter{AfterSeq: after})
	if err != nil {
		return nil, fmt.Errorf("explain the repair: read the log: %w", err)
	}
	for _, v := range verbs {
		if before > 0 && v.Seq >= before {
			break
		}
		ts, skip := split(v)
		if skip {
			continue
		}
		for _, tk := range ts {
			u := tk.user()
			if users != nil && !users[u] {
				continue
			}
			why := ""
			if cancel[v.Seq] {
				why = fmt.Sprintf("%s %d is cancelled", strings.TrimPrefix(v.Kind, "imap."), v.Seq)
			}
			if err := s.add(l, tk, u, why, why != "", filtered); err != nil {
				return nil, err
			}
		}
	}
	if before > 0 {
		// Mail the repaired Postfix routed anew (reinject.go): where it
		// went the first time and where it went now differ because of
		// the repair, for every user on either side.
		routes, err := Routes(ctx, l, after, before, cancel)
		if err != nil {
			return nil, fmt.Errorf("explain the repair: %w", err)
		}
		for _, r := range routes {
			if r.NowStatus == "" || r.UndoID == "" || sameRoute(r) {
				continue
			}
			why := fmt.Sprintf("routed anew by the repaired Postfix (first %s, now %s)", routeWords(r.First, r.Refused, r.Relayed), routeWords(r.Now, "", false))
			for _, addrs := range [][]string{r.First, r.Now, r.Held} {
				for _, a := range addrs {
					if u := UserOf(a); users == nil || users[u] {
						s.msg(u, r.UndoID, why)
					}
				}
			}
		}
	}
	if err := s.appendedKeys(ctx, l); err != nil {
		return nil, err
	}
	return s, nil
}

// sameRoute reports that the repaired Postfix delivered a message where
// the first run did: nothing about it is the repair's doing.
func sameRoute(r Route) bool {
	if r.Refused != "" || r.Relayed || len(r.Held) > 0 || len(r.First) != len(r.Now) {
		return false
	}
	first := slices.Clone(r.First)
	now := slices.Clone(r.Now)
	slices.Sort(first)
	slices.Sort(now)
	return slices.Equal(first, now)
}

// routeWords says where a message went, for a repair's explanation.
func routeWords(to []string, refused string, relayed bool) string {
	switch {
	case refused != "":
		return "refused"
	case relayed:
		return "relayed off the machine"
	case len(to) == 0:
		return "nowhere here"
	}
	return strings.Join(to, ", ")
}

// appendedKeys adds, for each message explained by its undo id that an
// APPEND made (before the range, too), the key its file has: APPEND does
// not write the undo id into the message, so the store knows it by its
// content.
func (s *RepairSet) appendedKeys(ctx context.Context, l *undolog.Log) error {
	keyOf := map[string]string{} // undo id -> content key ("" none)
	for _, m := range []map[string]string{s.msgs, s.removed} {
		for k, why := range m {
			u, id, _ := strings.Cut(k, "\x00")
			if strings.HasPrefix(id, "sha256:") {
				continue
			}
			key, seen := keyOf[id]
			if !seen {
				recs, err := l.Records(ctx, undolog.Filter{UndoID: id, Kinds: []string{verb.KindIMAPAppend}})
				if err != nil {
					return fmt.Errorf("explain the repair: find the APPEND of message %s: %w", id, err)
				}
				for _, r := range recs {
					if b, err := l.ReadBlob(r.Blob); err == nil {
						key = MessageKey(b)
						break
					}
				}
				keyOf[id] = key
			}
			if key != "" && key != id {
				if _, ok := m[u+"\x00"+key]; !ok {
					m[u+"\x00"+key] = why
				}
			}
		}
	}
	return nil
}

// undone adds the repairs of earlier cycles that this one undoes: their
// replay, recorded in the range, cancelled or filtered a verb from before
// it.
func (s *RepairSet) undone(ctx context.Context, l *undolog.Log, after, before int64, users map[string]bool) error {
	recs, err := l.Records(ctx, undolog.Filter{AfterSeq: after, Kinds: []string{verb.KindReplay}})
	if err != nil {
		return fmt.Errorf("explain the repair: read earlier replays: %w", err)
	}
	type undo struct {
		rec    int64
		user   string
		status verb.ReplayStatus
	}
	refs := map[int64][]undo{}
	first := int64(-1)
	for _, r := range recs {
		if before > 0 && r.Seq >= before {
			break
		}
		var o verb.ReplayOutcome
		if r.Ref > after || json.Unmarshal(r.Outcome, &o) != nil || (o.Status != verb.ReplayCancelled && o.Status != verb.ReplayFiltered) {
			continue
		}
		if users != nil && !users[r.User] {
			continue
		}
		refs[r.Ref] = append(refs[r.Ref], undo{r.Seq, r.User, o.Status})
		if first < 0 || r.Ref < first {
			first = r.Ref
		}
	}
	if len(refs) == 0 {
		return nil
	}
	verbs, err := l.Verbs(ctx, undolog.Filter{AfterSeq: first - 1})
	if err != nil {
		return fmt.Errorf("explain the repair: read the verbs earlier repairs left out: %w", err)
	}
	for _, v := range verbs {
		if v.Seq > after {
			break
		}
		for _, un := range refs[v.Seq] {
			ts, _ := split(v)
			for _, tk := range ts {
				if tk.user() != un.user {
					continue
				}
				why := fmt.Sprintf("%s %d, which an earlier repair %s (record %d), is made again: this cycle rewinds to before that repair",
					strings.TrimPrefix(v.Kind, "imap."), v.Seq, un.status, un.rec)
				if err := s.add(l, tk, un.user, why, false, nil); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// add accounts for one task of the replay: left out (why, and removes
// when the message it made is then not in the store), filtered, or
// acting in a folder the repair changed.
func (s *RepairSet) add(l *undolog.Log, tk task, u, left string, removes bool, filtered map[string]FilteredDelivery) error {
	v := tk.v
	if tk.rcpt != "" {
		var a verb.DeliveryArgs
		if json.Unmarshal(v.Args, &a) != nil || a.UndoID == "" {
			return nil
		}
		switch f, hit := filtered[a.UndoID]; {
		case left != "":
			s.msg(u, a.UndoID, left)
			if removes {
				s.removed[u+"\x00"+a.UndoID] = left
			}
		case hit && f.Dropped:
			s.msg(u, a.UndoID, f.Why)
			s.removed[u+"\x00"+a.UndoID] = f.Why
		case hit:
			s.msg(u, a.UndoID, f.Why)
		}
		return nil
	}
	if v.Kind == verb.KindIMAPFetch {
		var a verb.IMAPFetchArgs
		if json.Unmarshal(v.Args, &a) != nil {
			return nil
		}
		why, ok := s.reason(v, u, left, a.Mailbox, "")
		if ok {
			for _, id := range a.UndoIDs {
				s.msg(u, id, why)
			}
		}
		return nil
	}
	var a verb.IMAPArgs
	if json.Unmarshal(v.Args, &a) != nil {
		return nil
	}
	why, ok := s.reason(v, u, left, a.Mailbox, a.Dest)
	if !ok {
		return nil
	}
	switch v.Kind {
	case verb.KindIMAPAppend:
		b, err := l.ReadBlob(v.Blob)
		if err != nil {
			return fmt.Errorf("explain the repair: message of APPEND %d: %w", v.Seq, err)
		}
		key := MessageKey(b)
		s.msg(u, key, why)
		if removes && !strings.HasPrefix(key, "sha256:") {
			// A hash may be shared by another copy of the same bytes; an
			// undo id is not.
			s.removed[u+"\x00"+key] = why
		}
	case verb.KindIMAPCreate, verb.KindIMAPDelete:
		s.folder(u, a.Mailbox, why)
	case verb.KindIMAPRename:
		s.folder(u, a.Mailbox, why)
		s.folder(u, a.Dest, why)
	case verb.KindIMAPStore, verb.KindIMAPCopy, verb.KindIMAPMove, verb.KindIMAPExpunge:
		for _, id := range a.UndoIDs {
			s.msg(u, id, why)
		}
		if left != "" && a.UIDs != "" && countUIDs(a.UIDs) > len(a.UndoIDs) {
			// Some of its messages have no undo id: they are known by
			// content only, in the folders the verb acted on.
			s.anon[u+"/"+a.Mailbox] = why
			if a.Dest != "" {
				s.anon[u+"/"+a.Dest] = why
			}
		}
	}
	return nil
}

// reason says why a verb's messages differ from the present: it is left
// out (left), or it acted in a folder the repair changed.
func (s *RepairSet) reason(v undolog.Verb, u, left, mailbox, dest string) (string, bool) {
	if left != "" {
		return left, true
	}
	for _, m := range []string{mailbox, dest} {
		if m == "" {
			continue
		}
		if why, ok := s.inFolder(u, m); ok {
			return fmt.Sprintf("%s %d acted in %s, which the repair changes (%s)", strings.TrimPrefix(v.Kind, "imap."), v.Seq, m, why), true
		}
	}
	return "", false
}

// countUIDs counts the UIDs of a set written as "1:3,7".
func countUIDs(set string) int {
	n := 0
	for _, r := range strings.Split(set, ",") {
		var a, b uint32
		if k, _ := fmt.Sscanf(r, "%d:%d", &a, &b); k == 2 {
			if b < a {
				a, b = b, a
			}
			n += int(b-a) + 1
		} else if r != "" {
			n++
		}
	}
	return n
}

// PresentCheck is a cycle's verification: the store after the replay
// compared with the snapshot of the present taken before the rewind.
type PresentCheck struct {
	// Snapshot is the present's snapshot the store was compared with.
	Snapshot  string `json:"snapshot"`
	Users     int    `json:"users"`
	Mailboxes int    `json:"mailboxes"`
	Messages  int    `json:"messages"`
	// Changes counts the differences the repair explains; Explained
	// lists the first 100 of them with their reason.
	Changes   int      `json:"changes"`
	Explained []string `json:"explained,omitempty"`
	// Problems are the differences the repair does not explain (the
	// first 100; More counts the rest): each names the message and what
	// differs. Any makes the cycle NOT OK.
	Problems []string `json:"problems,omitempty"`
	More     int      `json:"more,omitempty"`
	// Done is false when no comparison was made (Error says why).
	Done  bool   `json:"done"`
	Error string `json:"error,omitempty"`
}

// OK reports whether the store is the present except for the repair.
func (c PresentCheck) OK() bool { return c.Done && len(c.Problems) == 0 && c.More == 0 }

// Summary is the verdict's line for the comparison.
func (c PresentCheck) Summary() string {
	if !c.Done {
		return fmt.Sprintf("not compared with the present (snapshot %s): %s", c.Snapshot, c.Error)
	}
	s := fmt.Sprintf("compared %d mailboxes, %d messages of %d users with the present (snapshot %s): ", c.Mailboxes, c.Messages, c.Users, c.Snapshot)
	if c.OK() {
		return s + fmt.Sprintf("equal to the present except %d changes made by the repair", c.Changes)
	}
	return s + fmt.Sprintf("%d differences the repair does not explain (and %d changes made by the repair)", len(c.Problems)+c.More, c.Changes)
}

func (c *PresentCheck) problem(format string, args ...any) {
	if len(c.Problems) >= maxProblems {
		c.More++
		return
	}
	c.Problems = append(c.Problems, fmt.Sprintf(format, args...))
}

// ComparePresent reads the store (store.Path()) and the snapshot present
// straight from their files and compares them for users (nil: everyone),
// letting through only what rs explains.
func ComparePresent(ctx context.Context, store timetravel.Store, present string, users map[string]bool, rs *RepairSet) PresentCheck {
	c := PresentCheck{Snapshot: present}
	if err := c.compare(ctx, store, present, users, rs); err != nil {
		c.Error = err.Error()
		return c
	}
	c.Done = true
	return c
}

func (c *PresentCheck) compare(ctx context.Context, store timetravel.Store, present string, users map[string]bool, rs *RepairSet) error {
	tree, release, err := SnapshotTree(ctx, store, present)
	if err != nil {
		return err
	}
	defer release()
	kc := newKeyCache()
	want, err := readMaildirs(tree, users, kc)
	if err != nil {
		return fmt.Errorf("read the present (snapshot %s): %w", present, err)
	}
	got, err := readMaildirs(store.Path(), users, kc)
	if err != nil {
		return fmt.Errorf("read the store after the replay: %w", err)
	}
	seen := map[string]bool{}
	for name, msgs := range got {
		c.Mailboxes++
		for _, copies := range msgs {
			c.Messages += len(copies)
		}
		seen[strings.SplitN(name, "/", 2)[0]] = true
	}
	for name := range want {
		seen[strings.SplitN(name, "/", 2)[0]] = true
	}
	c.Users = len(seen)
	for _, d := range diffStores(got, want) {
		text := d.describe("after the replay", "in the present")
		if why, ok := rs.explains(d); ok {
			c.Changes++
			if len(c.Explained) < maxProblems {
				c.Explained = append(c.Explained, text+": "+why)
			}
			continue
		}
		c.problem("%s", text)
	}
	// What the repair removed must be gone, wherever it was copied to.
	names := make([]string, 0, len(got))
	for name := range got {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		u, _, _ := strings.Cut(name, "/")
		for key := range got[name] {
			if why, ok := rs.removed[u+"\x00"+key]; ok {
				c.problem("%s: message %s is there after the replay, but the repair removed it (%s)", name, key, why)
			}
		}
	}
	return nil
}

// timetravelWait bounds the removal of a clone made to read a snapshot.
const timetravelWait = time.Minute

// SnapshotTree gives a directory holding snapshot name's files, laid out
// as the live store, and a function that releases it: the copy backend's
// own tree of the snapshot, read only, or a clone (ZFS).
func SnapshotTree(ctx context.Context, store timetravel.Store, name string) (string, func(), error) {
	if cs, ok := store.(*timetravel.CopyStore); ok {
		if _, err := cs.Get(ctx, name); err != nil {
			return "", nil, err
		}
		p := filepath.Join(cs.Dir(), name)
		if _, err := os.Stat(p); err != nil {
			return "", nil, fmt.Errorf("snapshot %s: %w", name, err)
		}
		return p, func() {}, nil
	}
	id := make([]byte, 4)
	rand.Read(id)
	clone := "verify-" + hex.EncodeToString(id)
	p, err := store.Clone(ctx, name, clone)
	if err != nil {
		return "", nil, fmt.Errorf("clone snapshot %s to read it: %w", name, err)
	}
	return p, func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), timetravelWait)
		defer cancel()
		// A clone just read may be busy a moment longer (its unmount).
		for try := 0; ; try++ {
			err := store.DestroyClone(dctx, clone)
			if err == nil || errors.Is(err, timetravel.ErrNotFound) {
				return
			}
			if try == 4 || dctx.Err() != nil {
				slog.Warn("remove the clone made to read a snapshot", "clone", clone, "snapshot", name, "err", err)
				return
			}
			time.Sleep(time.Second)
		}
	}, nil
}
