package replay

import (
	"slices"
	"strings"
	"testing"

	"github.com/emersion/go-imap/v2"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// TestTranslateCopiesAndTakenMessages checks how replay finds the
// messages a verb named, by their first-run UIDs, in a model where two
// copies share an undo id (a COPY into the same mailbox): the verb acts on
// the copy it named, never on the other; a message a replayed verb took
// away is no effect, not a loss; a UID named without an undo id is found
// through the UID map; a delivery (no first-run UID known) is found by its
// id once and mapped from then on.
func TestTranslateCopiesAndTakenMessages(t *testing.T) {
	r := newUserReplayer("alice", Target{}, nil, nil)
	// Read before anything was replayed: uid 5 (id A) and 6 (id B) kept
	// their UIDs. The first run copied 5 to 7 in the same mailbox; this
	// replay's copy got 20. A delivery (id D) got 21 here.
	b := &mbox{
		msgs: map[imap.UID]*msgState{
			5:  {id: "A", flags: map[imap.Flag]bool{}},
			6:  {id: "B", flags: map[imap.Flag]bool{}},
			20: {id: "A", flags: map[imap.Flag]bool{}},
			21: {id: "D", flags: map[imap.Flag]bool{}},
		},
		orig: map[imap.UID]imap.UID{5: 5, 6: 6, 7: 20},
	}
	pick := func(named map[string]string) ([]imap.UID, int, int) {
		_, now, removed, gone := r.translate(b, named)
		slices.Sort(now)
		return now, removed, gone
	}

	if now, _, _ := pick(map[string]string{"7": "A"}); !slices.Equal(now, []imap.UID{20}) {
		t.Errorf("the copy the first run knew as 7: got %v, want [20]", now)
	}
	if now, _, _ := pick(map[string]string{"5": "A"}); !slices.Equal(now, []imap.UID{5}) {
		t.Errorf("the original at 5: got %v, want [5]", now)
	}

	// A replayed MOVE took the copy away; a later verb on it, as the
	// first run saw it, changed nothing: neither the original nor "gone".
	r.take(b, 20)
	if now, removed, gone := pick(map[string]string{"7": "A"}); len(now) != 0 || removed != 0 || gone != 0 {
		t.Errorf("the copy a replayed verb took: got %v (removed %d, gone %d), want no message and no loss", now, removed, gone)
	}

	// Named by UID alone: the map says which message.
	if now, _, _ := pick(map[string]string{"6": ""}); !slices.Equal(now, []imap.UID{6}) {
		t.Errorf("uid 6 without an id: got %v, want [6]", now)
	}
	// A UID the first run never had is nobody.
	if now, removed, gone := pick(map[string]string{"99": ""}); len(now) != 0 || removed != 0 || gone != 0 {
		t.Errorf("unknown uid 99: got %v (removed %d, gone %d), want nothing", now, removed, gone)
	}

	// The delivery: the first run knew it as 8; found by id, then mapped.
	if now, _, _ := pick(map[string]string{"8": "D"}); !slices.Equal(now, []imap.UID{21}) {
		t.Errorf("the delivery named as 8: got %v, want [21]", now)
	}
	if b.orig[8] != 21 {
		t.Errorf("the delivery's first-run UID 8 is not mapped to 21: %v", b.orig)
	}

	// A message the repair kept out counts as removed.
	r.removed["B"] = true
	if now, removed, _ := pick(map[string]string{"6": "B"}); len(now) != 0 || removed != 1 {
		t.Errorf("a message the repair removed: got %v, removed %d; want none, 1", now, removed)
	}
}

// TestVerbOnADeletedMailboxHasNoEffect: a session whose selected mailbox
// another session deleted still sends commands on its stale view, and
// Dovecot answers OK having changed nothing (seen by the concurrent
// generator at 10 sessions). The verb names the deleted mailbox's
// UIDVALIDITY: replay gives it no effect, even though a mailbox of that
// name exists again, and no paradox. A verb naming the new mailbox's
// UIDVALIDITY is not affected.
func TestVerbOnADeletedMailboxHasNoEffect(t *testing.T) {
	r := newUserReplayer("alice", Target{}, nil, nil)
	del := undolog.Verb{Record: undolog.Record{Seq: 10, Kind: verb.KindIMAPDelete, Args: []byte(`{"command":"DELETE","mailbox":"F4","uidvalidity":465}`)},
		Outcome: &undolog.Record{Outcome: []byte(`{"status":"OK"}`)}}
	r.noteDeleted(del)
	store := undolog.Verb{Record: undolog.Record{Seq: 12, Kind: verb.KindIMAPStore}}
	out, err := r.onMessages(store, verb.IMAPArgs{Command: "UID STORE", Mailbox: "F4", UIDValidity: 465, UIDs: "13", UndoIDs: map[string]string{"13": "X"}, Op: "-", Flags: []string{"kw1"}})
	if err != nil || out.Status != verb.ReplayOK || !strings.Contains(out.Detail, "no effect") {
		t.Fatalf("STORE on the deleted F4: %+v %v; want OK with no effect", out, err)
	}
	// A failed DELETE deleted nothing.
	r2 := newUserReplayer("alice", Target{}, nil, nil)
	del.Outcome = &undolog.Record{Outcome: []byte(`{"status":"NO"}`)}
	r2.noteDeleted(del)
	if r2.deletedBefore["F4"][465] {
		t.Fatal("a DELETE answered NO marked F4 deleted")
	}
}
