package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

func logCmd() *cobra.Command {
	var dataDir, user, since, until string
	var kinds []string
	var asJSON, listBranches bool
	var limit int
	var after, branch int64
	cmd := &cobra.Command{
		Use:   "log",
		Short: "Print the verbs recorded in the undo log, with their outcomes",
		Long: `log prints recorded verbs (intents) in sequence order, each with the
outcome its client was given. A verb without an outcome was cut off by a crash
between logging and answering: its client got no acknowledgement.

--since and --until take RFC 3339 times ("2026-11-21T10:00:00Z"), dates
("2026-11-21") or durations back from now ("90m", "48h").

Every rewind abandons a branch of the timeline: the verbs between the
snapshot it went back to and the rewind. --branches lists them; --branch N
(a rewind's or a cycle's sequence number) prints one branch's verbs with
what the replay did with each: ok (made again), cancelled, filtered,
repaired (skipped: its messages were removed by the repair) or failed.

Records are told in words; --json prints them as logged. Unless --kind is
given, a cycle's replay records are told on the rows of the verbs they
replayed, and its rewind under the cycle.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if listBranches || branch != 0 {
				return printBranches(cmd.OutOrStdout(), dataDir, branch, asJSON)
			}
			f := undolog.Filter{User: user, Kinds: kinds, AfterSeq: after, Limit: limit}
			var err error
			if f.Since, err = parseTime(since); err != nil {
				return fmt.Errorf("--since: %w", err)
			}
			if f.Until, err = parseTime(until); err != nil {
				return fmt.Errorf("--until: %w", err)
			}
			l, err := undolog.OpenReadOnly(dataDir)
			if err != nil {
				return err
			}
			defer l.Close()
			verbs, err := l.Verbs(context.Background(), f)
			if err != nil {
				return err
			}
			if asJSON {
				return printVerbsJSON(cmd.OutOrStdout(), verbs)
			}
			printVerbs(cmd.OutOrStdout(), verbs, len(kinds) == 0)
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&dataDir, "data-dir", "/var/lib/undomail", "undomail's data directory")
	fl.StringVar(&user, "user", "", "only verbs by or affecting this user (login name or address)")
	fl.StringVar(&since, "since", "", "only verbs at or after this time")
	fl.StringVar(&until, "until", "", "only verbs before this time")
	fl.StringSliceVar(&kinds, "kind", nil, "only these verb kinds (smtp.submit, lmtp.deliver, ...)")
	fl.Int64Var(&after, "after", 0, "only verbs with a sequence number above this one")
	fl.IntVar(&limit, "limit", 0, "print at most this many verbs (0: all)")
	fl.BoolVar(&asJSON, "json", false, "one JSON object per line")
	fl.BoolVar(&listBranches, "branches", false, "list the branches rewinds abandoned")
	fl.Int64Var(&branch, "branch", 0, "print the verbs of the branch abandoned by this rewind or cycle")
	return cmd
}

func printBranches(w io.Writer, dataDir string, id int64, asJSON bool) error {
	l, err := undolog.OpenReadOnly(dataDir)
	if err != nil {
		return err
	}
	defer l.Close()
	ctx := context.Background()
	enc := json.NewEncoder(w)
	if id == 0 {
		bs, err := replay.Branches(ctx, l)
		if err != nil {
			return err
		}
		if asJSON {
			for _, b := range bs {
				if err := enc.Encode(b); err != nil {
					return err
				}
			}
			return nil
		}
		if len(bs) == 0 {
			fmt.Fprintln(w, "no branches: nothing was ever rewound")
			return nil
		}
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "BRANCH\tTIME\tCYCLE\tREWOUND TO\tVERBS\tFATES\tREASON")
		for _, b := range bs {
			cyc := "-"
			if b.Cycle != 0 {
				cyc = fmt.Sprint(b.Cycle)
			}
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s (%d)\t%d\t%s\t%s\n", b.ID, b.Time.Local().Format(time.DateTime), cyc,
				b.Snapshot, b.From, b.Verbs, fateText(b.Fates), b.Reason)
		}
		return tw.Flush()
	}
	b, verbs, err := replay.BranchVerbs(ctx, l, id)
	if err != nil {
		return err
	}
	if asJSON {
		for _, v := range verbs {
			if err := enc.Encode(v); err != nil {
				return err
			}
		}
		return nil
	}
	fmt.Fprintf(w, "branch %d: rewound to %s (log position %d) at %s; %d verbs: %s\n", b.ID, b.Snapshot, b.From,
		b.Time.Local().Format(time.DateTime), b.Verbs, fateText(b.Fates))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SEQ\tTIME\tKIND\tUSER\tWHAT\tFATE")
	for _, v := range verbs {
		what, _ := describe(v.Verb)
		fate := verb.ReplayOutcome{Status: v.Fate, Detail: v.Detail}.Line()
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\n", v.Seq, v.Time.Local().Format(time.DateTime), v.Kind, v.User, what, fate)
	}
	return tw.Flush()
}

// fateText counts a branch's fates in words ("3 made again, 2 cancelled").
func fateText(f map[verb.ReplayStatus]int) string {
	order := []verb.ReplayStatus{verb.ReplayOK, verb.ReplayCancelled, verb.ReplayFiltered, verb.ReplayRepaired, verb.ReplayFailed, verb.NotReplayed}
	var parts []string
	for _, k := range order {
		if f[k] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", f[k], k.Words()))
		}
	}
	for k, n := range f {
		if !slices.Contains(order, k) {
			parts = append(parts, fmt.Sprintf("%d %s", n, k.Words()))
		}
	}
	return strings.Join(parts, ", ")
}

// parseTime accepts RFC 3339, a date, or a duration back from now.
func parseTime(s string) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	if t, err := time.ParseInLocation(time.DateOnly, s, time.Local); err == nil {
		return t, nil
	}
	if t, err := time.ParseInLocation(time.DateTime, s, time.Local); err == nil {
		return t, nil
	}
	if d, err := time.ParseDuration(s); err == nil && d >= 0 {
		return time.Now().Add(-d), nil
	}
	return time.Time{}, fmt.Errorf("%q is not a time (2026-11-21T10:00:00Z, 2026-11-21, or a duration like 90m)", s)
}

// describe tells a record in words (package verb, the one place that
// describes each kind).
func describe(v undolog.Verb) (what, outcome string) {
	d := verb.Describe(v)
	return d.What, d.Outcome
}

// logRow is one line of `undomail log`, with what was folded into it.
type logRow struct {
	v             undolog.Verb
	what, outcome string
	more          []string // lines under it: a cycle's rewind
}

// printVerbs prints records in words. Unless kinds are asked for, a
// cycle's own records are folded as on the web timeline: a replay record
// is told on the row of the verb it replayed, a rewind under its cycle.
func printVerbs(w io.Writer, verbs []undolog.Verb, fold bool) {
	var rows []*logRow
	at := map[int64]*logRow{}
	var cycle *logRow // the newest cycle so far: replays and rewinds are its
	for _, v := range verbs {
		if fold && cycle != nil {
			if r, ok := at[v.Ref]; ok && v.Kind == verb.KindReplay {
				f := verb.DecodeReplayOutcome(v.Record.Outcome)
				r.outcome += fmt.Sprintf("; replayed by cycle #%d: %s", cycle.v.Seq, f.Line())
				continue
			}
			if v.Kind == verb.KindRewind {
				cycle.more = append(cycle.more, verb.Describe(v).Line())
				continue
			}
		}
		r := &logRow{v: v}
		r.what, r.outcome = describe(v)
		rows = append(rows, r)
		at[v.Seq] = r
		if v.Kind == verb.KindCycle {
			cycle = r
		}
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SEQ\tTIME\tKIND\tUSER\tWHAT\tOUTCOME")
	for _, r := range rows {
		user := r.v.User
		if user == "" {
			user = "-"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\n", r.v.Seq, r.v.Time.Local().Format("2006-01-02 15:04:05.000"),
			r.v.Kind, user, r.what, r.outcome)
		for _, m := range r.more {
			fmt.Fprintf(tw, "\t\t\t\t  %s\t\n", m)
		}
	}
	tw.Flush()
	if len(verbs) == 0 {
		fmt.Fprintln(w, "(no verbs match)")
	}
}

// verbJSON is the --json form of a verb: stable field names for scripts.
type verbJSON struct {
	Seq        int64           `json:"seq"`
	Time       time.Time       `json:"time"`
	User       string          `json:"user"`
	Session    string          `json:"session"`
	Kind       string          `json:"kind"`
	Users      []string        `json:"users,omitempty"`
	Blob       string          `json:"blob,omitempty"`
	Args       json.RawMessage `json:"args,omitempty"`
	OutcomeSeq int64           `json:"outcome_seq,omitempty"`
	Outcome    json.RawMessage `json:"outcome,omitempty"`
}

func printVerbsJSON(w io.Writer, verbs []undolog.Verb) error {
	enc := json.NewEncoder(w)
	for _, v := range verbs {
		j := verbJSON{Seq: v.Seq, Time: v.Time, User: v.User, Session: v.Session, Kind: v.Kind,
			Users: v.Users, Blob: v.Blob, Args: v.Args}
		if v.Outcome != nil {
			j.OutcomeSeq, j.Outcome = v.Outcome.Seq, v.Outcome.Outcome
		}
		if err := enc.Encode(j); err != nil {
			return err
		}
	}
	return nil
}
