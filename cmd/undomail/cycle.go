package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/internal/daemon"
	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

func cycleCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cycle",
		Short: "Plan and run a 3R cycle: rewind to a snapshot, repair, replay",
	}
	var dataDir, to, cancel, filterAction, reason string
	var filters []string
	var sel daemon.CancelSelector
	var users []string
	var remote daemonFlags
	var asJSON, yes, keep bool
	flags := func(c *cobra.Command) {
		c.Flags().StringVar(&dataDir, "data-dir", "/var/lib/undomail", "undomail's data directory")
		c.Flags().StringVar(&to, "to", "", "where to rewind to: a snapshot's name, a log position or a time (the newest snapshot at or before it)")
		c.Flags().StringVar(&cancel, "cancel", "", "verbs to leave out of the replay, by sequence number: 812,815")
		c.Flags().StringVar(&sel.User, "cancel-user", "", "cancel the changes of this user (with the other --cancel-* flags: those matching all)")
		c.Flags().StringSliceVar(&sel.Kinds, "cancel-kind", nil, "cancel changes of these kinds: imap.expunge, imap.delete, lmtp.deliver, ...")
		c.Flags().StringVar(&sel.Mailbox, "cancel-mailbox", "", "cancel IMAP changes in this mailbox")
		c.Flags().StringVar(&sel.Since, "cancel-since", "", "cancel changes made at or after this time")
		c.Flags().StringVar(&sel.Until, "cancel-until", "", "cancel changes made at or before this time")
		c.Flags().StringSliceVar(&users, "user", nil, "rewind and replay only these users' mail; everyone else's stays as it is (the store must roll back one user: copy, or ZFS with a dataset per user)")
		c.Flags().StringVar(&reason, "reason", "", "why the cycle runs, in plain words: logged and told to the people whose mail changes")
		c.Flags().StringArrayVar(&filters, "filter", nil, `retroactive filter on deliveries: 'header:Subject=~(?i)lottery', 'from=~...', 'rcpt=~...', 'body=~...', 'attachment=~\.exe$', or 'cmd:spamc -c'`)
		c.Flags().StringVar(&filterAction, "filter-action", "drop", "what --filter does with a match: drop, or move:FOLDER")
	}
	plan := &cobra.Command{
		Use:   "plan",
		Short: "Show what a cycle would rewind, replay and leave out; changes nothing",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			p, err := planFromFlags(dataDir, to, cancel, sel, filters, filterAction, users)
			if err != nil {
				return err
			}
			if asJSON {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(p)
			}
			p.print(cmd.OutOrStdout())
			return nil
		},
	}
	flags(plan)
	plan.Flags().BoolVar(&asJSON, "json", false, "the plan as JSON")
	run := &cobra.Command{
		Use:   "run",
		Short: "Run a cycle (asks the running daemon); prints its verdict",
		Long: `run snapshots the present (so the cycle can itself be undone), holds every
change back, rewinds the mail store to --to, replays every logged verb since
except those given with --cancel, lets changes through again and prints the
verdict. The exit status is 0 only for a verified cycle.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			remote.dataDir = dataDir
			var p *cyclePlan
			var c *admin.Client
			var err error
			if remote.adminURL == "" {
				if p, err = planFromFlags(dataDir, to, cancel, sel, filters, filterAction, users); err != nil {
					return err
				}
				if c, err = admin.Dial(dataDir); err != nil {
					return err
				}
			} else {
				// A remote daemon: its admin API plans; targets are snapshot
				// names and cancellations sequence numbers.
				if !sel.Empty() {
					return fmt.Errorf("--cancel-* selections need the log: run on the daemon's machine, or list the sequence numbers with --cancel")
				}
				if c, err = remote.client(); err != nil {
					return err
				}
				cancelled, err := admin.ParseSeqs(cancel)
				if err != nil {
					return fmt.Errorf("--cancel: %w", err)
				}
				plan, err := c.Plan(context.Background(), to, cancelled)
				if err != nil {
					return fmt.Errorf("plan the cycle on %s: %w", remote.adminURL, err)
				}
				p = &cyclePlan{Plan: plan, cancel: cancelled, Users: users}
			}
			out := cmd.OutOrStdout()
			p.print(out)
			if !yes {
				if !isTerminal(os.Stdin) {
					return fmt.Errorf("a cycle rewinds the mail store; add --yes to go ahead")
				}
				fmt.Fprint(out, "Run this cycle? [y/N] ")
				answer, _ := bufio.NewReader(cmd.InOrStdin()).ReadString('\n')
				if !strings.HasPrefix(strings.ToLower(strings.TrimSpace(answer)), "y") {
					return fmt.Errorf("cycle not run")
				}
			}
			req := admin.CycleRequest{To: p.To, Cancel: p.cancel, Reason: reason, Keep: keep, Users: users}
			for _, f := range filters {
				if _, err := replay.ParseFilter(f, filterAction); err != nil {
					return err
				}
				req.Filters = append(req.Filters, admin.FilterRequest{Rule: f, Action: filterAction})
			}
			stop := showProgress(c, os.Stderr)
			cv, err := c.Cycle(context.Background(), req)
			stop()
			if err == nil || cv.Cycle > 0 { // a cycle that failed to start has no verdict
				printVerdict(out, cv)
			}
			if remote.adminURL == "" && len(p.Reinject) > 0 && cv.Cycle > 0 {
				if l, lerr := undolog.OpenReadOnly(dataDir); lerr == nil {
					routes, rerr := replay.Routes(context.Background(), l, p.AtSeq, cv.Cycle, cancelSet(p.cancel))
					l.Close()
					if rerr == nil {
						printRoutes(out, routes, true)
					}
				}
			}
			if err != nil {
				return &exitError{code: 1, msg: "cycle failed: " + err.Error()}
			}
			if !cv.OK {
				return &exitError{code: 1, msg: "cycle NOT OK: see its verdict"}
			}
			return nil
		},
	}
	flags(run)
	run.Flags().BoolVarP(&yes, "yes", "y", false, "do not ask for confirmation")
	run.Flags().StringVar(&remote.adminURL, "admin", "", "run the cycle on the undomail behind this admin URL (https://host:8025) instead of the local one")
	run.Flags().StringVar(&remote.caFile, "admin-ca", "", "PEM file of the certificate authority of --admin's HTTPS")
	run.Flags().StringVar(&remote.tokenFile, "token-file", "", "file with the admin token for --admin (default: admin.token in --data-dir; or $UNDOMAIL_ADMIN_TOKEN)")
	run.Flags().BoolVar(&keep, "keep", false, "keep the --filter rules active for live mail after the cycle (undomail filters lists them)")
	cmd.AddCommand(plan, run)
	return cmd
}

// cyclePlan is what a cycle would do: daemon.PlanCycle's plan, and what
// the filters take away.
type cyclePlan struct {
	*admin.Plan
	// Filtered are the deliveries the filters take away.
	Filtered []daemon.FilterHit `json:"filtered,omitempty"`
	// Users, if set, are the only users the cycle rewinds.
	Users []string `json:"users,omitempty"`
	// Differs is what the store will differ in from the present after
	// the cycle, and why: the cycle's verdict lets exactly these
	// differences through (replay.ExplainRepair).
	Differs []replay.RepairEntry `json:"differs_from_present"`
	// Reinject are the front-door messages a replay through Postfix
	// (smtp.replay_upstream) hands to it again, with where each went the
	// first time.
	Reinject []replay.Route `json:"reinject,omitempty"`
	cancel   []int64
}

// planFromFlags resolves the cycle's flags against the log and plans it.
func planFromFlags(dataDir, target, cancel string, sel daemon.CancelSelector, filters []string, filterAction string, users []string) (*cyclePlan, error) {
	if target == "" {
		return nil, fmt.Errorf("--to is required: a snapshot (undomail snapshots lists them), a log position or a time")
	}
	cancelled, err := admin.ParseSeqs(cancel)
	if err != nil {
		return nil, fmt.Errorf("--cancel: %w", err)
	}
	var fs []*replay.Filter
	for _, f := range filters {
		pf, err := replay.ParseFilter(f, filterAction)
		if err != nil {
			return nil, fmt.Errorf("--filter: %w", err)
		}
		fs = append(fs, pf)
	}
	l, err := undolog.OpenReadOnly(dataDir)
	if err != nil {
		return nil, err
	}
	defer l.Close()
	ctx := context.Background()
	to, at, err := daemon.ResolveTarget(ctx, l, target)
	if err != nil {
		return nil, fmt.Errorf("--to: %w", err)
	}
	if !sel.Empty() {
		more, err := daemon.SelectCancel(ctx, l, at, sel)
		if err != nil {
			return nil, err
		}
		for _, s := range more {
			if !slices.Contains(cancelled, s) {
				cancelled = append(cancelled, s)
			}
		}
	}
	// Cancelling a submission cancels its deliveries: the differences
	// below count them.
	if cancelled, err = daemon.ExpandSubmissions(ctx, l, at, cancelled); err != nil {
		return nil, err
	}
	plan, err := daemon.PlanCycle(ctx, l, to, cancelled)
	if err != nil {
		return nil, err
	}
	p := &cyclePlan{Plan: plan, cancel: cancelled}
	if len(users) > 0 {
		if err := p.onlyUsers(ctx, l, users); err != nil {
			return nil, err
		}
	}
	if p.Filtered, err = daemon.PreviewFilters(ctx, l, at, fs); err != nil {
		return nil, err
	}
	if p.Differs, err = differs(ctx, l, at, cancelled, p.Filtered, users); err != nil {
		return nil, err
	}
	if len(users) == 0 { // a cycle for some users replays recorded deliveries
		if p.Reinject, err = replay.Routes(ctx, l, at, 0, cancelSet(cancelled)); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// differs says what a cycle will change compared with the present.
func differs(ctx context.Context, l *undolog.Log, at int64, cancel []int64, hits []daemon.FilterHit, users []string) ([]replay.RepairEntry, error) {
	c := cancelSet(cancel)
	filtered := map[string]replay.FilteredDelivery{}
	for _, h := range hits {
		if folder, ok := strings.CutPrefix(h.Action, "move:"); ok {
			filtered[h.UndoID] = replay.FilteredDelivery{Why: "filed into " + folder + " by filter " + h.Filter}
		} else {
			filtered[h.UndoID] = replay.FilteredDelivery{Why: "dropped by filter " + h.Filter, Dropped: true}
		}
	}
	var only map[string]bool
	if len(users) > 0 {
		only = map[string]bool{}
		for _, u := range users {
			only[u] = true
		}
	}
	rs, err := replay.ExplainRepair(ctx, l, at, 0, c, filtered, only)
	if err != nil {
		return nil, err
	}
	return rs.Entries(), nil
}

func cancelSet(seqs []int64) map[int64]bool {
	m := map[int64]bool{}
	for _, s := range seqs {
		m[s] = true
	}
	return m
}

// printRoutes lists re-injected mail: where each message went the first
// time and, after the cycle, where it went this time.
func printRoutes(w io.Writer, routes []replay.Route, after bool) {
	if len(routes) == 0 {
		return
	}
	if after {
		fmt.Fprintln(w, "front-door mail handed to Postfix again, where it went this time:")
	} else {
		fmt.Fprintf(w, "%d front-door messages go through Postfix again (if smtp.replay_upstream is set); where each went the first time:\n", len(routes))
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	if after {
		fmt.Fprintln(tw, "SEQ\tMESSAGE\tFIRST\tNOW")
	} else {
		fmt.Fprintln(tw, "SEQ\tMESSAGE\tADDRESSED TO\tFIRST")
	}
	for _, r := range routes {
		msg := r.MessageID
		if r.Subject != "" {
			msg += fmt.Sprintf(" %q", r.Subject)
		}
		first := strings.Join(r.First, ", ")
		switch {
		case r.Refused != "":
			first = "refused: " + r.Refused
		case r.Relayed:
			first = "relayed off the machine"
		}
		if !after {
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", r.Submission, msg, strings.Join(r.AddressedTo, ", "), first)
			continue
		}
		now := strings.Join(r.Now, ", ")
		switch r.NowStatus {
		case "":
			now = "not re-injected: its recorded deliveries were replayed"
		case verb.ReplayFailed, verb.ReplayRefused:
			now = string(r.NowStatus) + ": " + r.Failed
		}
		if len(r.Held) > 0 {
			now = strings.TrimPrefix(now+"; held: "+strings.Join(r.Held, ", "), "; ")
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", r.Submission, msg, first, now)
	}
	tw.Flush()
}

// onlyUsers keeps the steps of a cycle limited to some users: the verbs
// that change their mail.
func (p *cyclePlan) onlyUsers(ctx context.Context, l *undolog.Log, users []string) error {
	verbs, err := l.Verbs(ctx, undolog.Filter{AfterSeq: p.AtSeq})
	if err != nil {
		return err
	}
	theirs := map[int64]bool{}
	p.NotReplayed, p.Unreplayable = nil, nil
	for _, v := range verbs {
		for _, u := range replay.VerbUsers(v) {
			if slices.Contains(users, u) {
				theirs[v.Seq] = true
			}
		}
		if !theirs[v.Seq] {
			continue
		}
		switch left, undefined := daemon.LeftAlone(v); {
		case undefined:
			p.Unreplayable = addKind(p.Unreplayable, v.Kind)
		case left && !slices.Contains(p.cancel, v.Seq):
			p.NotReplayed = addKind(p.NotReplayed, v.Kind)
		}
	}
	keep := p.Verbs[:0]
	p.Counts.Replay, p.Counts.Cancel, p.Counts.NoEffect = 0, 0, 0
	for _, st := range p.Verbs {
		if !theirs[st.Seq] {
			if st.Action == "cancel" {
				return fmt.Errorf("--cancel %d: a change to the mail of someone not in --user %s", st.Seq, strings.Join(users, ","))
			}
			continue
		}
		switch st.Action {
		case "replay":
			p.Counts.Replay++
		case "cancel":
			p.Counts.Cancel++
		default:
			p.Counts.NoEffect++
		}
		keep = append(keep, st)
	}
	p.Verbs = keep
	p.Users = users
	return nil
}

func addKind(m map[string]int, kind string) map[string]int {
	if m == nil {
		m = map[string]int{}
	}
	m[kind]++
	return m
}

func (p *cyclePlan) print(w interface{ Write([]byte) (int, error) }) {
	who := "everyone's mail"
	if len(p.Users) > 0 {
		who = "the mail of " + strings.Join(p.Users, ", ") + " (everyone else's stays as it is)"
	}
	fmt.Fprintf(w, "rewind %s to %s (log position %d), then:\n", who, p.To, p.AtSeq)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SEQ\tACTION\tKIND\tUSER\tWHAT")
	for _, s := range p.Verbs {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\n", s.Seq, s.Action, s.Kind, s.User, s.What)
	}
	tw.Flush()
	fmt.Fprintf(w, "%d to replay, %d cancelled, %d without effect (their clients were not told they happened)\n",
		p.Counts.Replay, p.Counts.Cancel, p.Counts.NoEffect)
	if lines := p.LeftAlone(); len(lines) > 0 {
		fmt.Fprintln(w, "not replayed:")
		for _, l := range lines {
			fmt.Fprintf(w, "  %s\n", l)
		}
	}
	if len(p.Unreplayable) > 0 {
		fmt.Fprintln(w, "the cycle's verdict will be NOT OK: it cannot replay verbs of a kind this undomail does not know")
	}
	printRoutes(w, p.Reinject, false)
	for _, c := range p.ComesBack {
		fmt.Fprintf(w, "comes back: %s\n", c)
	}
	for _, g := range p.Goes {
		fmt.Fprintf(w, "goes: %s\n", g)
	}
	for _, c := range p.Compensations {
		fmt.Fprintf(w, "explained to %s: %s\n", c.User, c.Why)
	}
	printOutboundPlan(w, p.Outbound)
	if len(p.Differs) == 0 {
		fmt.Fprintln(w, "afterwards the store equals the present: the repair changes nothing in it")
	} else {
		fmt.Fprintf(w, "afterwards the store differs from the present in these %d places, and nowhere else (the verdict checks it):\n", len(p.Differs))
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "USER\tMAILBOX\tMESSAGE\tWHY")
		for _, d := range p.Differs {
			msg := d.Message
			if d.Removed {
				msg += " (removed)"
			}
			box := d.Mailbox
			if box == "" {
				box = "(wherever it is)"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", d.User, box, msg, d.Why)
		}
		tw.Flush()
	}
	if len(p.Filtered) > 0 {
		seen := 0
		fmt.Fprintf(w, "the filters take away %d deliveries:\n", len(p.Filtered))
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "SEQ\tACTION\tFROM\tSUBJECT\tSEEN BY")
		for _, h := range p.Filtered {
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\n", h.Seq, h.Action, h.From, h.Subject, strings.Join(h.SeenBy, ","))
			if len(h.SeenBy) > 0 {
				seen++
			}
		}
		tw.Flush()
		fmt.Fprintf(w, "%d of them were already seen: their readers get an explanation; %d were never seen\n", seen, len(p.Filtered)-seen)
	}
}

// showProgress draws the running cycle's progress on a terminal until
// stop is called; elsewhere (a pipe, a log) it draws nothing.
func showProgress(c *admin.Client, w *os.File) (stop func()) {
	if !isTerminal(w) {
		return func() {}
	}
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-done:
				fmt.Fprint(w, "\r\033[K")
				return
			case <-tick.C:
			}
			p, err := c.CycleProgress(context.Background())
			if err != nil || p == nil || p.Phase == "" {
				continue
			}
			fmt.Fprintf(w, "\r\033[K%s", progressLine(*p, 30))
		}
	}()
	return func() { close(done); <-finished }
}

// progressLine renders progress as a bar of width characters.
func progressLine(p replay.Progress, width int) string {
	if p.Total <= 0 {
		return p.Phase + "..."
	}
	n := min(width, p.Done*width/p.Total)
	bar := strings.Repeat("#", n) + strings.Repeat(".", width-n)
	line := fmt.Sprintf("%-10s [%s] %d/%d", p.Phase, bar, p.Done, p.Total)
	if p.Phase == "replay" {
		line += fmt.Sprintf(" verbs, %d users", p.Users)
	}
	if p.Failed > 0 {
		line += fmt.Sprintf(", %d failed", p.Failed)
	}
	return line
}

// printVerdict renders a cycle's verdict for people.
func printVerdict(w interface{ Write([]byte) (int, error) }, v admin.CycleVerdict) {
	state := "OK"
	if !v.OK {
		state = "NOT OK"
	}
	fmt.Fprintf(w, "verdict: %s (cycle %d; the present before it is snapshot %s)\n", state, v.Cycle, v.Present)
	fmt.Fprintf(w, "  replayed %d verbs for %d users (%d messages made again) in %.1fs; changes held back %.1fs\n",
		v.Replayed, v.Users, v.Messages, v.ReplayS, v.Held)
	fmt.Fprintf(w, "  cancelled %d, filtered %d, skipped as repaired %d, failed %d\n", v.Cancelled, v.Filtered, v.Repaired, v.Failed)
	for _, l := range verb.LeftAlone(v.Unreplayable) {
		fmt.Fprintf(w, "  NOT replayed: %s\n", l)
	}
	for _, l := range verb.LeftAlone(v.Skipped) {
		fmt.Fprintf(w, "  not replayed: %s\n", l)
	}
	if c := v.Compared; c != nil {
		fmt.Fprintf(w, "  %s (%.1fs)\n", c.Summary(), v.VerifyS)
		for _, p := range c.Problems {
			fmt.Fprintf(w, "    NOT explained by the repair: %s\n", p)
		}
		if c.More > 0 {
			fmt.Fprintf(w, "    ... and %d more\n", c.More)
		}
	}
	if v.Verify.Mailboxes > 0 || !v.Verify.OK() {
		fmt.Fprintf(w, "  verified %d mailboxes, %d messages against the replay's model: ", v.Verify.Mailboxes, v.Verify.Messages)
		if v.Verify.OK() {
			fmt.Fprintln(w, "the store holds what the log says")
		} else {
			fmt.Fprintf(w, "%d differences\n", len(v.Verify.Problems)+v.Verify.More)
			for _, p := range v.Verify.Problems {
				fmt.Fprintf(w, "    %s\n", p)
			}
		}
	}
	for _, o := range v.Outbound {
		fmt.Fprintf(w, "  cancelled in the outbound delay window, never sent: %s\n", o)
	}
	if v.OutboundErr != "" {
		fmt.Fprintf(w, "  outbound delay window: %s\n", v.OutboundErr)
	}
	if c := v.Compensation; c != nil {
		fmt.Fprintf(w, "  paradoxes: %d explained to users in %d digests, %d for the operator, %d nobody saw, %d ignored, %d explained before (undomail compensations --cycle %d)\n",
			c.Explained, len(c.Digests), c.Notified, c.Silent, c.Ignored, c.Already, v.Cycle)
		for _, f := range c.Failed {
			fmt.Fprintf(w, "    not delivered: %s\n", f)
		}
	}
	if v.Error != "" {
		fmt.Fprintf(w, "  error: %s\n", v.Error)
	}
	fmt.Fprintf(w, "  undo this cycle: %s\n", v.UndoCommand())
}
