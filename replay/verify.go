package replay

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"

	"github.com/emersion/go-imap/v2"
)

// Verification is what the store holds after a replay compared with what
// the log predicts: every mailbox the replay touched is read back, and
// must hold exactly the messages (by UID and undo id) with exactly the
// flags the model built from the snapshot's state and the replayed verbs
// says, and no message the repair removed.
type Verification struct {
	Users     int      `json:"users"`
	Mailboxes int      `json:"mailboxes"`
	Messages  int      `json:"messages"`
	Problems  []string `json:"problems,omitempty"`
	// More counts problems left out of Problems (it holds the first 100).
	More int `json:"more,omitempty"`
}

// OK reports whether the store is what the log predicts.
func (v Verification) OK() bool { return len(v.Problems) == 0 }

const maxProblems = 100

func (v *Verification) problem(format string, args ...any) {
	if len(v.Problems) >= maxProblems {
		v.More++
		return
	}
	v.Problems = append(v.Problems, fmt.Sprintf(format, args...))
}

func verify(ctx context.Context, rs []*userReplayer, progress func(int)) Verification {
	var mu sync.Mutex
	var total Verification
	work := make(chan *userReplayer)
	var wg sync.WaitGroup
	done := 0
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range work {
				v := r.verify(ctx)
				mu.Lock()
				total.Users++
				total.Mailboxes += v.Mailboxes
				total.Messages += v.Messages
				for _, p := range v.Problems {
					total.problem("%s", p)
				}
				total.More += v.More
				done++
				progress(done)
				mu.Unlock()
			}
		}()
	}
	for _, r := range rs {
		if r != nil {
			work <- r
		}
	}
	close(work)
	wg.Wait()
	sort.Strings(total.Problems)
	return total
}

// verify reads back every mailbox this user's replay touched.
func (r *userReplayer) verify(ctx context.Context) Verification {
	var v Verification
	if r.c == nil && len(r.boxes) == 0 {
		return v // only cancelled or dropped verbs: nothing was touched
	}
	if err := r.session(); err != nil {
		v.problem("%s: cannot verify: %v", r.user, err)
		return v
	}
	names := make([]string, 0, len(r.boxes))
	for name := range r.boxes {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if ctx.Err() != nil {
			v.problem("%s: verification cut short: %v", r.user, ctx.Err())
			return v
		}
		want := r.boxes[name]
		r.selected = "" // read afresh
		got, err := r.read(name)
		if err != nil {
			v.problem("%s: %s: cannot read back: %v", r.user, name, err)
			continue
		}
		v.Mailboxes++
		v.Messages += len(got.msgs)
		compare(&v, r.user, name, want, got, r.removed)
	}
	return v
}

// compare reports how a mailbox differs from its model.
func compare(v *Verification, user, name string, want, got *mbox, removed map[string]bool) {
	// A duplicate (a message delivered twice) shows as a UID the model
	// does not have; the user's own copies into one mailbox are in it.
	for _, u := range sortedUIDs(got.msgs) {
		g := got.msgs[u]
		if g.id != "" && removed[g.id] {
			v.problem("%s: %s: uid %d is message %s, which the repair removed", user, name, u, g.id)
		}
		w := want.msgs[u]
		if w == nil {
			v.problem("%s: %s: unexpected uid %d (message %s)", user, name, u, orUnknown(g.id))
			continue
		}
		if g.id != "" && w.id != "" && g.id != w.id {
			v.problem("%s: %s: uid %d is message %s, expected %s", user, name, u, g.id, w.id)
		}
		if !sameFlags(w.flags, g.flags) {
			v.problem("%s: %s: uid %d (message %s) has flags %s, expected %s", user, name, u, orUnknown(w.id), flagText(g.flags), flagText(w.flags))
		}
	}
	for _, u := range sortedUIDs(want.msgs) {
		if got.msgs[u] == nil {
			v.problem("%s: %s: uid %d (message %s) is missing", user, name, u, orUnknown(want.msgs[u].id))
		}
	}
}

func orUnknown(id string) string {
	if id == "" {
		return "without undo id"
	}
	return id
}

func sortedUIDs(m map[imap.UID]*msgState) []imap.UID {
	out := make([]imap.UID, 0, len(m))
	for u := range m {
		out = append(out, u)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

func sameFlags(a, b map[imap.Flag]bool) bool {
	if len(a) != len(b) {
		return false
	}
	for f := range a {
		if !b[f] {
			return false
		}
	}
	return true
}

func flagText(m map[imap.Flag]bool) string {
	var fs []string
	for f := range m {
		fs = append(fs, string(f))
	}
	sort.Strings(fs)
	return "(" + strings.Join(fs, " ") + ")"
}
