package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// ResolveTarget names the snapshot a cycle rewinds to. target is a
// snapshot's name, a log position (the newest snapshot at or before it),
// or a time, RFC 3339 or "2006-01-02 15:04" in local time (the newest
// snapshot taken at or before it).
func ResolveTarget(ctx context.Context, l *undolog.Log, target string) (name string, at int64, err error) {
	if target == "" {
		return "", 0, fmt.Errorf("a target is required: a snapshot name, a log position or a time")
	}
	logged, err := LoggedSnapshots(ctx, l)
	if err != nil {
		return "", 0, err
	}
	if at, ok := logged[target]; ok {
		return target, at, nil
	}
	var best string
	var bestAt int64 = -1
	if seq, perr := strconv.ParseInt(target, 10, 64); perr == nil {
		for n, a := range logged {
			if a <= seq && a > bestAt {
				best, bestAt = n, a
			}
		}
		if best == "" {
			return "", 0, fmt.Errorf("no snapshot at or before log position %d (undomail snapshots lists them)", seq)
		}
		return best, bestAt, nil
	}
	t, terr := parseTime(target)
	if terr != nil {
		return "", 0, fmt.Errorf("target %q is not a snapshot in the log, a log position or a time (RFC 3339 or 2006-01-02 15:04)", target)
	}
	// The log knows when each snapshot was taken: its record's time.
	recs, err := l.Records(ctx, undolog.Filter{Kinds: []string{verb.KindSnapshot}})
	if err != nil {
		return "", 0, err
	}
	for _, r := range recs {
		var a verb.SnapshotArgs
		if json.Unmarshal(r.Args, &a) != nil {
			continue
		}
		if pos, ok := logged[a.Name]; ok && !r.Time.After(t) && pos > bestAt {
			best, bestAt = a.Name, pos
		}
	}
	if best == "" {
		return "", 0, fmt.Errorf("no snapshot taken at or before %s (undomail snapshots lists them)", t.Format(time.RFC3339))
	}
	return best, bestAt, nil
}

func parseTime(s string) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	for _, layout := range []string{"2006-01-02 15:04:05", "2006-01-02 15:04", "2006-01-02T15:04", "2006-01-02"} {
		if t, err := time.ParseInLocation(layout, s, time.Local); err == nil {
			return t, nil
		}
	}
	return time.Time{}, fmt.Errorf("not a time: %q", s)
}

// CancelSelector chooses verbs to cancel by what they were rather than by
// number: every replayable change after the snapshot matching all the
// given fields.
type CancelSelector struct {
	User  string   `json:"user,omitempty"`
	Kinds []string `json:"kinds,omitempty"` // imap.expunge, imap.delete, ...
	Since string   `json:"since,omitempty"` // a time (see ResolveTarget)
	Until string   `json:"until,omitempty"`
	// Mailbox limits IMAP verbs to one mailbox.
	Mailbox string `json:"mailbox,omitempty"`
}

// Empty reports whether the selector selects nothing.
func (c CancelSelector) Empty() bool {
	return c.User == "" && len(c.Kinds) == 0 && c.Since == "" && c.Until == "" && c.Mailbox == ""
}

// SelectCancel returns the changes after log position at that sel
// matches. A selector matching nothing is an error: a repair that
// silently cancels nothing is worse than none.
func SelectCancel(ctx context.Context, l *undolog.Log, at int64, sel CancelSelector) ([]int64, error) {
	var since, until time.Time
	var err error
	if sel.Since != "" {
		if since, err = parseTime(sel.Since); err != nil {
			return nil, fmt.Errorf("cancel since: %w", err)
		}
	}
	if sel.Until != "" {
		if until, err = parseTime(sel.Until); err != nil {
			return nil, fmt.Errorf("cancel until: %w", err)
		}
	}
	for _, k := range sel.Kinds {
		if !replay.Replayable[k] && k != verb.KindSMTPSubmit {
			return nil, fmt.Errorf("cancel kind %q: not a change a replay makes (one of %s, or %s)", k, strings.Join(replayableKinds(), ", "), verb.KindSMTPSubmit)
		}
	}
	verbs, err := l.Verbs(ctx, undolog.Filter{AfterSeq: at, User: sel.User, Kinds: sel.Kinds})
	if err != nil {
		return nil, err
	}
	var out []int64
	for _, v := range verbs {
		// A submission is cancelled only when asked for by kind: it takes
		// the message back from every recipient (ExpandSubmissions).
		sub := submitted(v) && slices.Contains(sel.Kinds, verb.KindSMTPSubmit)
		if !sub && (!replay.Replayable[v.Kind] || !replay.HadEffect(v)) {
			continue
		}
		if (!since.IsZero() && v.Time.Before(since)) || (!until.IsZero() && v.Time.After(until)) {
			continue
		}
		if sel.Mailbox != "" {
			var a verb.IMAPArgs
			if json.Unmarshal(v.Args, &a) != nil || a.Mailbox != sel.Mailbox {
				continue
			}
		}
		out = append(out, v.Seq)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no change after log position %d matches the cancel selection", at)
	}
	return out, nil
}

func replayableKinds() []string {
	var ks []string
	for k := range replay.Replayable {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

// FilterHit is a delivery a retroactive filter would drop or file away.
type FilterHit struct {
	Seq     int64    `json:"seq"`
	UndoID  string   `json:"undo_id"`
	From    string   `json:"from"`
	Subject string   `json:"subject"`
	Rcpts   []string `json:"rcpts"`
	Filter  string   `json:"filter"`
	Action  string   `json:"action"`
	// SeenBy are the users who were shown the message before the cycle:
	// a paradox the cycle explains to them.
	SeenBy []string `json:"seen_by,omitempty"`
}

// PreviewFilters runs filters over the deliveries after log position at
// without changing anything: what a cycle with them would take away, and
// who had already seen it.
func PreviewFilters(ctx context.Context, l *undolog.Log, at int64, filters []*replay.Filter) ([]FilterHit, error) {
	if len(filters) == 0 {
		return nil, nil
	}
	verbs, err := l.Verbs(ctx, undolog.Filter{AfterSeq: at, Kinds: []string{verb.KindLMTPDeliver, verb.KindIMAPFetch}})
	if err != nil {
		return nil, err
	}
	var hits []FilterHit
	byID := map[string]int{}
	for _, v := range verbs {
		if v.Kind == verb.KindIMAPFetch {
			var a verb.IMAPFetchArgs
			if json.Unmarshal(v.Args, &a) != nil {
				continue
			}
			for _, id := range a.UndoIDs {
				if i, ok := byID[id]; ok && !slices.Contains(hits[i].SeenBy, v.User) {
					hits[i].SeenBy = append(hits[i].SeenBy, v.User)
				}
			}
			continue
		}
		if !replay.HadEffect(v) {
			continue
		}
		var a verb.DeliveryArgs
		if json.Unmarshal(v.Args, &a) != nil {
			continue
		}
		var msg []byte
		for _, f := range filters {
			if msg == nil {
				if msg, err = l.ReadBlob(v.Blob); err != nil {
					return nil, fmt.Errorf("preview filters: message of verb %d: %w", v.Seq, err)
				}
			}
			hit, err := f.Match(ctx, a, msg)
			if err != nil {
				return nil, fmt.Errorf("preview filters: %w", err)
			}
			if hit {
				byID[a.UndoID] = len(hits)
				hits = append(hits, FilterHit{Seq: v.Seq, UndoID: a.UndoID, From: a.Header.From, Subject: a.Header.Subject,
					Rcpts: a.Rcpts, Filter: f.Spec, Action: f.Action})
				break
			}
		}
	}
	return hits, nil
}
