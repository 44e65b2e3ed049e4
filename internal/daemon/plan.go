package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// PlanCycle says what a cycle to the snapshot `to` cancelling `cancel`
// would do, from the log alone: every replayable verb since the snapshot
// with its action, what the cancelled verbs had taken away (comes back)
// or added (goes), and who was shown a message that goes. It changes
// nothing. Cancelling a verb that is not a replayable change after the
// snapshot is an error.
func PlanCycle(ctx context.Context, l *undolog.Log, to string, cancel []int64) (*admin.Plan, error) {
	if to == "" {
		return nil, fmt.Errorf("plan: a snapshot to rewind to is required")
	}
	logged, err := LoggedSnapshots(ctx, l)
	if err != nil {
		return nil, err
	}
	at, ok := logged[to]
	if !ok {
		return nil, fmt.Errorf("plan: no snapshot %s in the undo log", to)
	}
	// Cancelling a submission cancels its deliveries too.
	cancel, err = ExpandSubmissions(ctx, l, at, cancel)
	if err != nil {
		return nil, err
	}
	c := cancelSet(cancel)
	verbs, err := l.Verbs(ctx, undolog.Filter{AfterSeq: at})
	if err != nil {
		return nil, err
	}
	p := &admin.Plan{To: to, AtSeq: at}
	gone := map[string]int64{} // undo ids of messages that go -> the verb that made them
	for _, v := range verbs {
		if c[v.Seq] && submitted(v) {
			p.Verbs = append(p.Verbs, submissionStep(v, admin.NewVerb(v).Summary))
			p.Counts.Cancel++
			delete(c, v.Seq)
			continue
		}
		switch left, undefined := LeftAlone(v); {
		case undefined:
			count(&p.Unreplayable, v.Kind)
		case left && !c[v.Seq]:
			count(&p.NotReplayed, v.Kind)
		}
		if !replay.Replayable[v.Kind] {
			if c[v.Seq] {
				return nil, fmt.Errorf("plan: cancel %d: a %s is not a change a replay makes", v.Seq, v.Kind)
			}
			continue
		}
		nv := admin.NewVerb(v)
		step := admin.PlanStep{Seq: v.Seq, Kind: v.Kind, User: v.User, What: nv.Summary, Action: "replay"}
		switch {
		case c[v.Seq]:
			step.Action = "cancel"
			p.Counts.Cancel++
			delete(c, v.Seq)
			if replay.HadEffect(v) {
				back, goes, ids := effect(v)
				step.Effect = back + goes
				if back != "" {
					p.ComesBack = append(p.ComesBack, back)
				}
				if goes != "" {
					p.Goes = append(p.Goes, goes)
				}
				for _, id := range ids {
					gone[id] = v.Seq
				}
			}
		case !replay.HadEffect(v):
			step.Action = "no effect"
			p.Counts.NoEffect++
		default:
			p.Counts.Replay++
		}
		p.Verbs = append(p.Verbs, step)
	}
	for s := range c {
		return nil, fmt.Errorf("plan: cancel %d: no such change after snapshot %s", s, to)
	}
	p.Compensations = witnesses(verbs, gone)
	if err := planOutbound(ctx, l, p, cancelSet(cancel)); err != nil {
		return nil, err
	}
	return p, nil
}

// LeftAlone says whether a replay leaves v alone (does not make it
// again, whatever the repair) and whether that is because no replay is
// defined for its kind (package verb does not know it). undomail's own
// records are not users' verbs: never left alone.
func LeftAlone(v undolog.Verb) (left, undefined bool) {
	k, ok := verb.Lookup(v.Kind)
	if !ok {
		return true, true
	}
	if k.System {
		return false, false
	}
	return !replay.HadEffect(v), false
}

func count(m *map[string]int, kind string) {
	if *m == nil {
		*m = map[string]int{}
	}
	(*m)[kind]++
}

// effect says what cancelling v undoes, and the undo ids of messages that
// then never existed.
func effect(v undolog.Verb) (comesBack, goes string, ids []string) {
	if v.Kind == verb.KindLMTPDeliver {
		var a verb.DeliveryArgs
		json.Unmarshal(v.Args, &a)
		return "", fmt.Sprintf("the message %q from %s to %v goes", a.Header.Subject, a.MailFrom, a.Rcpts), []string{a.UndoID}
	}
	var a verb.IMAPArgs
	json.Unmarshal(v.Args, &a)
	who := v.User
	switch v.Kind {
	case verb.KindIMAPDelete:
		return fmt.Sprintf("%s's folder %q comes back with its messages", who, a.Mailbox), "", nil
	case verb.KindIMAPExpunge:
		return fmt.Sprintf("the messages %s expunged in %q come back", who, a.Mailbox), "", nil
	case verb.KindIMAPMove:
		return fmt.Sprintf("the messages %s moved stay in %q", who, a.Mailbox), fmt.Sprintf("they leave %q", a.Dest), nil
	case verb.KindIMAPRename:
		return fmt.Sprintf("%s's folder %q keeps its name", who, a.Mailbox), fmt.Sprintf("%q goes", a.Dest), nil
	case verb.KindIMAPStore:
		return fmt.Sprintf("the flags %s changed in %q are as before", who, a.Mailbox), "", nil
	case verb.KindIMAPUnsubscribe:
		return fmt.Sprintf("%s's subscription to %q comes back", who, a.Mailbox), "", nil
	case verb.KindIMAPAppend:
		return "", fmt.Sprintf("the message %s appended to %q goes", who, a.Mailbox), []string{a.UndoID}
	case verb.KindIMAPCreate:
		return "", fmt.Sprintf("%s's folder %q goes", who, a.Mailbox), nil
	case verb.KindIMAPCopy:
		return "", fmt.Sprintf("the copies %s made in %q go", who, a.Dest), nil
	case verb.KindIMAPSubscribe:
		return "", fmt.Sprintf("%s's subscription to %q goes", who, a.Mailbox), nil
	case verb.KindIMAPSetMetadata:
		return fmt.Sprintf("the annotations %s set on %q are as before", who, a.Mailbox), "", nil
	}
	return "", "", nil
}

// witnesses finds the users who were sent a message that goes (a FETCH of
// its headers or body): the paradoxes the cycle will explain.
func witnesses(verbs []undolog.Verb, gone map[string]int64) []admin.PlanCompensation {
	if len(gone) == 0 {
		return nil
	}
	seen := map[string]admin.PlanCompensation{}
	for _, v := range verbs {
		if v.Kind != verb.KindIMAPFetch {
			continue
		}
		var a verb.IMAPFetchArgs
		if json.Unmarshal(v.Args, &a) != nil {
			continue
		}
		for _, id := range a.UndoIDs {
			if made, ok := gone[id]; ok && v.Seq > made {
				key := fmt.Sprint(v.User, made)
				if _, dup := seen[key]; !dup {
					seen[key] = admin.PlanCompensation{User: v.User, Seq: made,
						Why: fmt.Sprintf("was shown message %s in %q (verb %d), which the cycle removes", id, a.Mailbox, v.Seq)}
				}
			}
		}
	}
	out := make([]admin.PlanCompensation, 0, len(seen))
	for _, c := range seen {
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Seq != out[j].Seq {
			return out[i].Seq < out[j].Seq
		}
		return out[i].User < out[j].User
	})
	return out
}
