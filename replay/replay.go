package replay

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-imap/v2"

	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// Target is the rewound mail server replay acts on, directly: replayed
// verbs are not new user actions and do not pass the proxies.
type Target struct {
	// LMTPAddr is Dovecot's LMTP, which deliveries are re-delivered to.
	// Mail is never re-sent to other hosts (DESIGN: "Replay, repair and
	// history").
	LMTPAddr string
	// IMAPAddr is Dovecot's IMAP; verbs are re-executed as their user
	// through a master user: login "<user><Separator><MasterUser>".
	IMAPAddr       string
	MasterUser     string
	MasterPassword string
	Separator      string // default "*"
	Logger         *slog.Logger
	// ReinjectAddr is Postfix's replay service (docs/operations.md,
	// "Replay through Postfix"): mail the front door recorded is handed
	// to it again, so the repaired Postfix routes it anew, and Capture
	// takes what it delivers. Empty: deliveries replay as recorded.
	ReinjectAddr string
	Capture      *Capture
	// ReinjectTimeout bounds the wait for one re-injected message
	// (default DefaultReinjectTimeout).
	ReinjectTimeout time.Duration
}

// Plan says which part of the log to replay and which verbs to leave out.
type Plan struct {
	// After and Before bound the verbs replayed: After < seq < Before
	// (Before 0: to the end of the log).
	After, Before int64
	// Cancel lists verbs not to replay: the repair of a mistaken DELETE,
	// a mass EXPUNGE, an operator's bad action. Each is recorded as
	// cancelled.
	Cancel map[int64]bool
	// Filters are retroactive filters on deliveries (see Filter). Verbs
	// on messages a filter dropped are skipped and recorded as such.
	Filters []*Filter
	// Workers is how many users replay at once (default 4). One user's
	// verbs always replay in log order, in one session.
	Workers int
	// Progress, if set, is told how far the replay is after every verb.
	// Calls are serialised.
	Progress func(Progress)
	// Gone are the mailboxes the rewind took away (verb.RewindOutcome.Gone);
	// Restore, if set, gives one the replay makes again its old
	// UIDVALIDITY and counters (Upstream.Restore).
	Gone    []verb.MailboxCounters
	Restore func(context.Context, verb.MailboxCounters) (bool, error)
	// Users, if set, limits the replay to these users' verbs (a cycle
	// that rewound only them); a delivery is replayed for them only.
	Users map[string]bool
	// NoRecord leaves the log as it is: a recovery drill replays against
	// a clone, and its replay is not part of the timeline.
	NoRecord bool
	// Returning are the messages the rollback brought back under UIDs
	// clients saw disappear (verb.RewindOutcome.Returning): those still there
	// at the end get a new UID.
	Returning map[string]map[string][]uint32
	// NoModelCheck leaves out reading back the mailboxes to compare them
	// with the replay's own model: a cycle compares the store with the
	// present instead (ComparePresent), an independent truth.
	NoModelCheck bool
}

// Progress is how far a cycle is.
type Progress struct {
	Phase  string `json:"phase"` // snapshot, hold, rewind, replay, verify, compensate, done
	Done   int    `json:"done"`  // verbs replayed (or users verified)
	Total  int    `json:"total"`
	Users  int    `json:"users"`
	Failed int    `json:"failed"`
}

// Result counts what a replay did.
type Result struct {
	Replayed, Failed, Cancelled int
	// Filtered counts deliveries a filter dropped or filed elsewhere;
	// Repaired verbs that acted only on such messages.
	Filtered, Repaired int
	// Skipped counts verbs by kind that were left alone: kinds with no
	// effect of their own (submissions at the front door, fetches without
	// \Seen) and changes whose client was not told they happened.
	Skipped map[string]int
	// Users is how many users had verbs replayed; Messages how many
	// messages the replay made again (deliveries per recipient, APPENDs).
	Users, Messages int
	// Restored counts mailboxes made again with their old UIDVALIDITY;
	// Renumbered messages that came back under a UID clients had seen
	// expunged and were given a new one.
	Restored, Renumbered int
	// Reinjected counts front-door messages handed to Postfix again
	// (reinject.go); a re-injection that failed counts in Failed. Held
	// counts deliveries the repaired Postfix made to a destination that
	// is no mailbox here: held for the operator, not sent.
	Reinjected, Held int
	// Verify compares the store after the replay with what the log
	// predicts (not done with Plan.NoModelCheck).
	Verify Verification
	// Filtered are the deliveries filters dropped or filed elsewhere, by
	// undo id.
	FilteredIDs map[string]FilteredDelivery `json:"filtered_ids,omitempty"`
}

// maxDeliveryRun bounds how many re-deliveries are found in the store at
// once.
const maxDeliveryRun = 64

// task is one unit of a user's replay: a verb, or for a delivery the part
// of it addressed to one recipient.
type task struct {
	v      undolog.Verb
	rcpt   string // deliveries: the recipient
	cancel string // why the verb is left out; "" replays it
	// fixed is the outcome of a delivery a re-injection replaced that is
	// not made again (reinject.go).
	fixed *verb.ReplayOutcome
	// outside: a destination only the repaired Postfix delivers to; if
	// Dovecot has no such mailbox, it is held, not failed (reinject.go).
	outside bool
}

// Replay re-executes the logged verbs with After < seq < Before against
// the target and records the result of each next to it. It redoes
// deliveries (re-delivered over LMTP) and the IMAP verbs APPEND, CREATE,
// DELETE, RENAME, SUBSCRIBE, UNSUBSCRIBE, STORE, COPY, MOVE, EXPUNGE and
// the \Seen a FETCH set, naming messages by undo id and translating to
// their UIDs now. Verbs whose client was not told OK, or whose delivery
// was refused, had no effect and are not replayed.
//
// Users replay in parallel, each user's verbs in log order. Afterwards
// every mailbox the replay touched is read back and compared with what
// the log predicts (Result.Verify).
func Replay(ctx context.Context, l *undolog.Log, p Plan, t Target) (Result, error) {
	if t.Separator == "" {
		t.Separator = "*"
	}
	if t.Logger == nil {
		t.Logger = slog.Default()
	}
	if p.Workers <= 0 {
		p.Workers = 4
	}
	run := &replayRun{ctx: ctx, l: l, p: p, t: t, res: Result{Skipped: map[string]int{}}}
	verbs, err := verbsInRange(ctx, l, p)
	if err != nil {
		return run.res, err
	}
	earlier, err := earlierDecisions(ctx, l, p.After, p.Before, verbs)
	if err != nil {
		return run.res, err
	}
	rj, err := reinjectAll(ctx, l, p, t, verbs, earlier)
	if err != nil {
		return run.res, err
	}
	run.res.Reinjected, run.res.Failed = rj.count, len(rj.failed)
	queues := run.queue(verbs, earlier, rj)
	run.fs = &filterSet{filters: append(append([]*Filter(nil), p.Filters...), earlier.filters...), verdicts: map[int64]filterVerdict{}}
	replayers := run.replayUsers(queues)
	run.collect(replayers)
	if run.first != nil {
		closeAll(replayers)
		return run.res, run.first
	}
	if err := ctx.Err(); err != nil {
		closeAll(replayers)
		return run.res, fmt.Errorf("replay: %w", err)
	}
	if !p.NoModelCheck {
		run.report("verify", 0, len(replayers))
		run.res.Verify = verify(ctx, replayers, func(n int) { run.report("verify", n, len(replayers)) })
	}
	closeAll(replayers)
	return run.res, nil
}

// verbsInRange reads the verbs of the plan's range, in log order.
func verbsInRange(ctx context.Context, l *undolog.Log, p Plan) ([]undolog.Verb, error) {
	verbs, err := l.Verbs(ctx, undolog.Filter{AfterSeq: p.After})
	if err != nil {
		return nil, fmt.Errorf("replay: read the log: %w", err)
	}
	if p.Before > 0 {
		n := sort.Search(len(verbs), func(i int) bool { return verbs[i].Seq >= p.Before })
		verbs = verbs[:n]
	}
	return verbs, nil
}

// replayRun is one replay: what every user's replay shares and adds to.
type replayRun struct {
	ctx context.Context
	l   *undolog.Log
	p   Plan
	t   Target
	fs  *filterSet

	mu    sync.Mutex // guards the fields below
	res   Result
	first error // the first failure to log a replay record: the run stops
	done  int   // tasks recorded
	total int   // tasks queued
	users int
}

// queue splits the verbs into tasks, one queue per user in log order,
// each marked with why the repair leaves it out, if it does.
func (run *replayRun) queue(verbs []undolog.Verb, earlier decisions, rj reinjection) map[string][]task {
	p := run.p
	queues := map[string][]task{}
	for _, v := range verbs {
		why := ""
		switch {
		case p.Cancel[v.Seq]:
			why = "left out by the repair"
		case earlier.cancelled[v.Seq] != 0:
			why = fmt.Sprintf("left out by an earlier repair (record %d)", earlier.cancelled[v.Seq])
		}
		ts, skip := split(v)
		if r, ok := rj.replace[v.Seq]; ok {
			ts, skip = r, len(r) == 0
		}
		if skip {
			run.res.Skipped[v.Kind]++
			continue
		}
		for _, tk := range ts {
			tk.cancel = why
			user := tk.user()
			if len(p.Users) > 0 && !p.Users[user] {
				continue // not rewound: their mail already has this verb
			}
			queues[user] = append(queues[user], tk)
			run.total++
		}
	}
	run.res.Users = len(queues)
	for u := range p.Returning {
		if _, ok := queues[u]; !ok {
			queues[u] = nil // nothing to replay, but messages to renumber
		}
	}
	return queues
}

// report tells the plan's Progress callback how far the run is.
func (run *replayRun) report(phase string, n, of int) {
	if run.p.Progress != nil {
		run.p.Progress(Progress{Phase: phase, Done: n, Total: of, Users: run.users, Failed: run.res.Failed})
	}
}

// replayUsers replays each user's queue, p.Workers users at a time, and
// returns the users' replayers in name order.
func (run *replayRun) replayUsers(queues map[string][]task) []*userReplayer {
	users := make([]string, 0, len(queues))
	for u := range queues {
		users = append(users, u)
	}
	sort.Strings(users)
	run.users = len(users)
	run.report("replay", 0, run.total)
	replayers := make([]*userReplayer, len(users))
	work := make(chan int)
	var wg sync.WaitGroup
	for range min(run.p.Workers, len(users)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				replayers[i] = run.newReplayer(users[i])
				run.replayUser(replayers[i], queues[users[i]])
			}
		}()
	}
	for i := range users {
		run.mu.Lock()
		stop := run.first != nil
		run.mu.Unlock()
		if stop || run.ctx.Err() != nil {
			break
		}
		work <- i
	}
	close(work)
	wg.Wait()
	return replayers
}

// newReplayer prepares a user's replayer with what the rewind told about
// the user's mailboxes.
func (run *replayRun) newReplayer(user string) *userReplayer {
	r := newUserReplayer(user, run.t, run.l, run.fs)
	r.restore = run.p.Restore
	for _, g := range run.p.Gone {
		if g.User == user {
			r.gone[g.Mailbox] = g
		}
	}
	for mailbox, uids := range run.p.Returning[user] {
		r.vanished[mailbox] = map[imap.UID]bool{}
		for _, u := range uids {
			r.vanished[mailbox][imap.UID(u)] = true
		}
	}
	return r
}

// replayUser runs one user's tasks in order, then gives messages that
// came back a new UID and removes what was made in advance for nothing
// (finish).
func (run *replayRun) replayUser(r *userReplayer, tasks []task) {
	settle := func() bool {
		for _, st := range r.flush() {
			if !run.record(r.user, st.tk, st.out, st.err) {
				return false
			}
		}
		return true
	}
	for _, tk := range tasks {
		if tk.rcpt != "" && tk.cancel == "" && tk.fixed == nil && run.ctx.Err() == nil {
			// A run of deliveries is sent in one LMTP session and found
			// in the store at once (flush).
			var out verb.ReplayOutcome
			var deferred bool
			var err error
			if tk.outside {
				out, err = heldOutside(run.ctx, run.t, tk)
			}
			if out.Status == "" && err == nil {
				out, deferred, err = r.queueDelivery(run.ctx, tk)
			}
			if !deferred && !run.record(r.user, tk, out, err) {
				r.close()
				return
			}
			if len(r.pending) >= maxDeliveryRun && !settle() {
				r.close()
				return
			}
			continue
		}
		if !settle() {
			r.close()
			return
		}
		out, err := r.run(run.ctx, tk)
		if !run.record(r.user, tk, out, err) {
			r.close()
			return
		}
	}
	if !settle() {
		r.close()
		return
	}
	if r.c != nil || len(r.vanished) > 0 {
		err := r.session()
		if err == nil {
			err = r.finish()
		}
		if err != nil {
			run.mu.Lock()
			run.res.Failed++
			run.mu.Unlock()
			run.t.Logger.Warn("replay: remove mailboxes made in advance", "user", r.user, "err", err)
		}
	}
}

// record accounts for a task's outcome and logs it next to the verb;
// false stops the user's replay (the log failed).
func (run *replayRun) record(user string, tk task, out verb.ReplayOutcome, err error) bool {
	run.mu.Lock()
	res := &run.res
	switch {
	case err != nil:
		out = verb.ReplayOutcome{Status: verb.ReplayFailed, Detail: err.Error()}
		res.Failed++
		run.t.Logger.Warn("replay failed", "seq", tk.v.Seq, "kind", tk.v.Kind, "user", user, "err", err)
	case out.Status == verb.ReplaySkipped:
		res.Skipped[tk.v.Kind]++
	case out.Status == verb.ReplayOK:
		res.Replayed++
	case out.Status == verb.ReplayFiltered:
		res.Filtered++
	case out.Status == verb.ReplayRepaired:
		res.Repaired++
	case out.Status == verb.ReplayCancelled:
		res.Cancelled++
	case out.Status == verb.ReplayHeld:
		res.Held++
	}
	run.mu.Unlock()
	if out.Status != verb.ReplaySkipped && !run.p.NoRecord {
		b, _ := json.Marshal(out)
		rec := &undolog.Record{Kind: verb.KindReplay, Session: "replay", User: user, Users: []string{user}, Ref: tk.v.Seq, Outcome: b}
		// Not fsynced one by one: the repair's verdict is, and takes
		// these with it; a crash before it rolls the whole repair back
		// (daemon.recoverRepair).
		if err := run.l.AppendNoSync(run.ctx, rec); err != nil {
			run.mu.Lock()
			if run.first == nil {
				run.first = fmt.Errorf("replay: record the replay of verb %d: %w", tk.v.Seq, err)
			}
			run.mu.Unlock()
			return false
		}
	}
	run.mu.Lock()
	run.done++
	run.report("replay", run.done, run.total)
	run.mu.Unlock()
	return true
}

// collect adds up what the users' replayers made.
func (run *replayRun) collect(replayers []*userReplayer) {
	res := &run.res
	for _, r := range replayers {
		if r == nil {
			continue
		}
		res.Messages += r.made
		res.Restored += r.restored
		res.Renumbered += r.renumbered
		for id, f := range r.filtered {
			if res.FilteredIDs == nil {
				res.FilteredIDs = map[string]FilteredDelivery{}
			}
			res.FilteredIDs[id] = f
		}
	}
}

func closeAll(rs []*userReplayer) {
	for _, r := range rs {
		if r != nil {
			r.close()
		}
	}
}

// user is the user whose session replays the task.
func (tk task) user() string {
	if tk.rcpt != "" {
		return UserOf(tk.rcpt)
	}
	return tk.v.User
}

// UserOf is the Dovecot user a recipient address delivers to: its local
// part, as Dovecot's default user_query and the test stack use.
func UserOf(rcpt string) string {
	u, _, _ := strings.Cut(rcpt, "@")
	return u
}

// split turns a verb into its tasks; skip means it made no change of its
// own (a submission at the front door, a read, a refused command).
func split(v undolog.Verb) (ts []task, skip bool) {
	switch v.Kind {
	case verb.KindLMTPDeliver, verb.KindCompensation:
		var o verb.DeliveryOutcome
		if v.Outcome == nil || json.Unmarshal(v.Outcome.Outcome, &o) != nil {
			return nil, true
		}
		for _, rr := range o.Rcpts {
			if rr.Reply.Positive() {
				ts = append(ts, task{v: v, rcpt: rr.Rcpt})
			}
		}
		return ts, len(ts) == 0
	case verb.KindIMAPFetch:
		var a verb.IMAPFetchArgs
		if json.Unmarshal(v.Args, &a) != nil || !a.Seen || len(a.UndoIDs) == 0 || v.User == "" {
			return nil, true
		}
		return []task{{v: v}}, false
	case verb.KindIMAPAppend, verb.KindIMAPCreate, verb.KindIMAPDelete, verb.KindIMAPRename,
		verb.KindIMAPSubscribe, verb.KindIMAPUnsubscribe, verb.KindIMAPSetMetadata,
		verb.KindIMAPStore, verb.KindIMAPCopy, verb.KindIMAPMove, verb.KindIMAPExpunge:
		var o verb.IMAPOutcome
		if v.User == "" || v.Outcome == nil || json.Unmarshal(v.Outcome.Outcome, &o) != nil || o.Status != "OK" {
			return nil, true // the client was not told it happened
		}
		return []task{{v: v}}, false
	}
	return nil, true
}

// decisions are the repairs of earlier cycles that covered part of this
// replay's range: a verb an earlier cycle cancelled stays cancelled, a
// filter an earlier cycle applied keeps applying to the deliveries it
// judged (DESIGN: "the repair stays").
type decisions struct {
	cancelled map[int64]int64 // verb -> the cycle that cancelled it
	filters   []*Filter
}

// KeptFilter is a filter a cycle left active for live mail.
type KeptFilter struct {
	Cycle   int64           `json:"cycle"`
	Spec    verb.FilterSpec `json:"filter"`
	Since   int64           `json:"since"`             // the log position the cycle rewound to: it judges deliveries after it
	Removed int64           `json:"removed,omitempty"` // when it stopped judging live mail; 0 while active
	Filter  *Filter         `json:"-"`
}

// KeptFilters returns every filter a successful cycle kept active, in
// the order they were kept, including those removed since.
func KeptFilters(ctx context.Context, l *undolog.Log) ([]KeptFilter, error) {
	verbs, err := l.Verbs(ctx, undolog.Filter{Kinds: []string{verb.KindCycle, verb.KindFilterRemoved}})
	if err != nil {
		return nil, fmt.Errorf("read kept filters: %w", err)
	}
	var out []KeptFilter
	for _, v := range verbs {
		if v.Kind == verb.KindFilterRemoved {
			var a struct {
				Cycle int64 `json:"cycle"`
			}
			if json.Unmarshal(v.Args, &a) == nil {
				for i := range out {
					if out[i].Cycle == a.Cycle && out[i].Removed == 0 {
						out[i].Removed = v.Seq
					}
				}
			}
			continue
		}
		var c verb.CycleArgs
		var verdict struct {
			OK bool `json:"ok"`
		}
		if json.Unmarshal(v.Args, &c) != nil || !c.Keep || v.Outcome == nil ||
			json.Unmarshal(v.Outcome.Outcome, &verdict) != nil || !verdict.OK {
			continue
		}
		for _, fs := range c.Filters {
			f, err := ParseFilter(fs.Rule, fs.Action)
			if err != nil {
				return nil, fmt.Errorf("filter kept by cycle %d: %w", v.Seq, err)
			}
			f.after = c.At
			out = append(out, KeptFilter{Cycle: v.Seq, Spec: fs, Since: c.At, Filter: f})
		}
	}
	return out, nil
}

// earlierDecisions reads the repairs of earlier cycles that apply to the
// verbs in this replay's range.
func earlierDecisions(ctx context.Context, l *undolog.Log, after, before int64, verbs []undolog.Verb) (decisions, error) {
	// Only decisions taken before the end of the range count: a drill
	// replays the log as it stood then, not with repairs made since.
	past := func(seq int64) bool { return before <= 0 || seq < before }
	d := decisions{cancelled: map[int64]int64{}}
	kept, err := KeptFilters(ctx, l)
	if err != nil {
		return d, fmt.Errorf("replay: %w", err)
	}
	// A verb an earlier replay cancelled (a cycle's --cancel, or the
	// cancel given to undomail replay) stays cancelled.
	recs, err := l.Records(ctx, undolog.Filter{AfterSeq: after, Kinds: []string{verb.KindReplay}})
	if err != nil {
		return d, fmt.Errorf("replay: read earlier replays: %w", err)
	}
	// Replay records of a repair that a crash interrupted were rolled
	// back with it: they decide nothing.
	repairs, err := l.Verbs(ctx, undolog.Filter{Kinds: []string{verb.KindCycle}})
	if err != nil {
		return d, fmt.Errorf("replay: read earlier repairs: %w", err)
	}
	interrupted := func(seq int64) bool {
		var in bool
		for _, c := range repairs {
			if c.Seq > seq {
				break
			}
			var v struct {
				Error string `json:"error"`
			}
			in = c.Outcome != nil && json.Unmarshal(c.Outcome.Outcome, &v) == nil && strings.HasPrefix(v.Error, "interrupted")
		}
		return in
	}
	for _, r := range recs {
		var o verb.ReplayOutcome
		if r.Ref > after && past(r.Seq) && json.Unmarshal(r.Outcome, &o) == nil && o.Status == verb.ReplayCancelled && !interrupted(r.Seq) {
			d.cancelled[r.Ref] = r.Seq
		}
	}
	keptBy := map[int64]bool{}
	for _, k := range kept {
		if !past(k.Cycle) {
			continue
		}
		if k.Removed != 0 && !past(k.Removed) {
			k.Removed = 0 // removed only later
		}
		k.Filter.before = k.Removed
		d.filters = append(d.filters, k.Filter)
		keptBy[k.Cycle] = true
	}
	for _, v := range verbs {
		if v.Kind != verb.KindCycle {
			continue
		}
		var c verb.CycleArgs
		if err := json.Unmarshal(v.Args, &c); err != nil {
			return d, fmt.Errorf("replay: cycle record %d: %w", v.Seq, err)
		}
		for _, s := range c.Cancel {
			if s > after {
				d.cancelled[s] = v.Seq
			}
		}
		if keptBy[v.Seq] {
			continue
		}
		for _, f := range c.Filters {
			pf, err := ParseFilter(f.Rule, f.Action)
			if err != nil {
				return d, fmt.Errorf("replay: filter of cycle %d: %w", v.Seq, err)
			}
			// It judged only the deliveries that cycle replayed.
			pf.after, pf.before = c.At, v.Seq
			d.filters = append(d.filters, pf)
		}
	}
	return d, nil
}

// Replayable are the verb kinds a replay re-executes.
var Replayable = map[string]bool{
	verb.KindLMTPDeliver: true, verb.KindCompensation: true,
	verb.KindIMAPAppend: true, verb.KindIMAPStore: true, verb.KindIMAPCopy: true, verb.KindIMAPMove: true,
	verb.KindIMAPExpunge: true, verb.KindIMAPCreate: true, verb.KindIMAPDelete: true, verb.KindIMAPRename: true,
	verb.KindIMAPSubscribe: true, verb.KindIMAPUnsubscribe: true, verb.KindIMAPSetMetadata: true,
}

// HadEffect reports whether a verb changed the store the first time, so
// a replay makes it again: its client was told OK, its delivery was
// accepted for some recipient, or its FETCH set \Seen.
func HadEffect(v undolog.Verb) bool {
	ts, skip := split(v)
	return !skip && len(ts) > 0
}

// VerbUsers are the users whose mail a verb changes: its IMAP user, or a
// delivery's recipients (as Dovecot users).
func VerbUsers(v undolog.Verb) []string {
	ts, _ := split(v)
	var out []string
	for _, tk := range ts {
		out = append(out, tk.user())
	}
	if len(out) == 0 && v.User != "" {
		out = append(out, v.User)
	}
	return out
}
