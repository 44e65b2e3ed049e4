package replay

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/undomail/undomail/internal/privdovecot"
	"github.com/undomail/undomail/timetravel"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// DrillOptions configure a drill.
type DrillOptions struct {
	Store timetravel.Store
	Log   *undolog.Log
	// From and To name the snapshots; empty picks the newest pair of
	// consecutive snapshots with no rewind between them.
	From, To string
	// WorkDir holds the private Dovecot's configuration and logs.
	WorkDir string
	Logger  *slog.Logger
}

// PickDrill returns the snapshots a drill replays between: the given
// ones, or the newest consecutive pair with no rewind between them (a
// rewind's replay is a cycle's business, not a drill's).
func PickDrill(ctx context.Context, store timetravel.Store, l *undolog.Log, from, to string) (a, b timetravel.Snapshot, err error) {
	if from != "" || to != "" {
		if from == "" || to == "" {
			return a, b, errors.New("drill: name both snapshots, or neither")
		}
		if a, err = store.Get(ctx, from); err != nil {
			return a, b, fmt.Errorf("drill: %w", err)
		}
		if b, err = store.Get(ctx, to); err != nil {
			return a, b, fmt.Errorf("drill: %w", err)
		}
		if a.Seq == timetravel.NoSeq || b.Seq == timetravel.NoSeq || a.Seq >= b.Seq {
			return a, b, fmt.Errorf("drill: %s (log position %d) must come before %s (%d)", from, a.Seq, to, b.Seq)
		}
		if n, err := rewindsBetween(ctx, l, a.Seq, b.Seq); err != nil || n > 0 {
			return a, b, fmt.Errorf("drill: %d rewinds between %s and %s: the store did not get from one to the other by the log alone (%v)", n, from, to, err)
		}
		return a, b, nil
	}
	snaps, err := store.List(ctx)
	if err != nil {
		return a, b, fmt.Errorf("drill: %w", err)
	}
	var logged []timetravel.Snapshot
	for _, s := range snaps {
		if s.Seq != timetravel.NoSeq {
			logged = append(logged, s)
		}
	}
	sort.Slice(logged, func(i, j int) bool { return logged[i].Seq < logged[j].Seq })
	for i := len(logged) - 1; i > 0; i-- {
		a, b = logged[i-1], logged[i]
		if a.Seq == b.Seq {
			continue
		}
		n, err := rewindsBetween(ctx, l, a.Seq, b.Seq)
		if err != nil {
			return a, b, err
		}
		if n == 0 {
			return a, b, nil
		}
	}
	return timetravel.Snapshot{}, timetravel.Snapshot{}, errors.New("drill: no two snapshots without a rewind between them (undomail snapshot takes one)")
}

func rewindsBetween(ctx context.Context, l *undolog.Log, after, before int64) (int, error) {
	recs, err := l.Records(ctx, undolog.Filter{AfterSeq: after, Kinds: []string{verb.KindRewind}})
	if err != nil {
		return 0, err
	}
	n := 0
	for _, r := range recs {
		if r.Seq < before {
			n++
		}
	}
	return n, nil
}

// Drill proves, without touching production, that the machinery can
// recover (DESIGN: "Recovery drills"): it clones snapshot From, starts a
// private Dovecot on the clone, replays the log from From's position to
// To's against it, and compares the result with To, message by message
// (by undo id, or content for messages that have none), with flags and
// folders. The live store, the live Dovecot and the log are not touched.
func Drill(ctx context.Context, o DrillOptions) verb.DrillResult {
	start := time.Now()
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	res, err := drill(ctx, o)
	res.Seconds = time.Since(start).Seconds()
	if err != nil {
		res.OK = false
		res.Error = err.Error()
	}
	o.Logger.Info("drill done", "from", res.From, "to", res.To, "ok", res.OK, "replayed", res.Replayed,
		"messages", res.Messages, "differences", len(res.Differences)+res.More, "err", res.Error, "seconds", res.Seconds)
	return res
}

func drill(ctx context.Context, o DrillOptions) (verb.DrillResult, error) {
	var res verb.DrillResult
	a, b, err := PickDrill(ctx, o.Store, o.Log, o.From, o.To)
	res.From, res.To = a.Name, b.Name
	if err != nil {
		return res, err
	}
	probs, err := o.Log.VerifyRange(ctx, a.Seq, b.Seq+1)
	if err != nil {
		return res, err
	}
	for _, p := range probs {
		res.Differences = append(res.Differences, "undo log damaged, not replayed: "+p.What)
	}
	if len(probs) > 0 {
		return res, fmt.Errorf("the undo log between the snapshots is damaged (%d problems): nothing replayed", len(probs))
	}
	id := make([]byte, 4)
	rand.Read(id)
	tag := "drill-" + hex.EncodeToString(id)
	replayed, err := o.Store.Clone(ctx, a.Name, tag+"-a")
	if err != nil {
		return res, fmt.Errorf("clone %s: %w", a.Name, err)
	}
	defer destroyClone(o, tag+"-a")
	want, err := o.Store.Clone(ctx, b.Name, tag+"-b")
	if err != nil {
		return res, fmt.Errorf("clone %s: %w", b.Name, err)
	}
	defer destroyClone(o, tag+"-b")
	users, err := mailUsers(replayed, want)
	if err != nil {
		return res, err
	}
	st, err := privdovecot.Start(ctx, privdovecot.Options{Dir: filepath.Join(o.WorkDir, tag), MailRoot: replayed, Users: users, Logger: o.Logger})
	if err != nil {
		return res, fmt.Errorf("start the drill's Dovecot: %w", err)
	}
	defer os.RemoveAll(filepath.Join(o.WorkDir, tag))
	r, rerr := Replay(ctx, o.Log, Plan{After: a.Seq, Before: b.Seq + 1, NoRecord: true},
		Target{LMTPAddr: st.LMTPAddr, IMAPAddr: st.IMAPAddr, MasterUser: st.MasterUser, MasterPassword: st.MasterPassword, Logger: o.Logger})
	if err := st.Stop(); err != nil {
		o.Logger.Warn("stop the drill's Dovecot", "err", err)
	}
	res.Replayed = r.Replayed
	if rerr != nil {
		return res, fmt.Errorf("replay: %w", rerr)
	}
	var diffs []string
	if r.Failed > 0 {
		diffs = append(diffs, fmt.Sprintf("%d verbs failed to replay", r.Failed))
	}
	got, err := readMaildirs(replayed, nil, nil)
	if err != nil {
		return res, err
	}
	exp, err := readMaildirs(want, nil, nil)
	if err != nil {
		return res, err
	}
	diffs = append(diffs, compareStores(got, exp)...)
	for _, m := range exp {
		res.Messages += len(m)
	}
	if len(diffs) > maxProblems {
		res.More = len(diffs) - maxProblems
		diffs = diffs[:maxProblems]
	}
	res.Differences = diffs
	res.OK = len(diffs) == 0
	return res, nil
}

func destroyClone(o DrillOptions, name string) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := o.Store.DestroyClone(ctx, name); err != nil {
		o.Logger.Warn("drill: remove clone", "clone", name, "err", err)
	}
}
