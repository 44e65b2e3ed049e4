package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/internal/daemon"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

func snapshotCmd() *cobra.Command {
	var dataDir, reason string
	cmd := &cobra.Command{
		Use:   "snapshot",
		Short: "Take a consistent snapshot of the mail store now (asks the running daemon)",
		Long: `snapshot asks the undomail serve running with --data-dir for a snapshot: the
proxies hold new changes back, the ones in flight finish, the undo log's
position is recorded in the log and with the snapshot, the store is
snapshotted (zfs or copy, as configured with store:), and the proxies go on.
It prints the snapshot, its log position and how long changes were held.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := admin.Dial(dataDir)
			if err != nil {
				return err
			}
			rep, err := c.Snapshot(context.Background(), reason)
			if err != nil {
				return fmt.Errorf("snapshot: %w", err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "snapshot %s at log position %d; changes held for %.1f ms\n", rep.Name, rep.AtSeq, rep.PauseMS)
			return nil
		},
	}
	cmd.Flags().StringVar(&dataDir, "data-dir", "/var/lib/undomail", "undomail's data directory")
	cmd.Flags().StringVar(&reason, "reason", "on demand", "why, recorded with the snapshot")
	return cmd
}

func snapshotsCmd() *cobra.Command {
	var df daemonFlags
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "snapshots",
		Short: "List the snapshots recorded in the undo log",
		Long: `snapshots lists the snapshots recorded in the undo log, failed ones
included. With --admin it asks a remote undomail's admin server instead, which
lists the snapshots that exist (taken and not pruned).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if df.adminURL != "" {
				return remoteSnapshots(cmd, &df, asJSON)
			}
			dataDir := df.dataDir
			l, err := undolog.OpenReadOnly(dataDir)
			if err != nil {
				return err
			}
			defer l.Close()
			verbs, err := l.Verbs(context.Background(), undolog.Filter{Kinds: []string{verb.KindSnapshot}})
			if err != nil {
				return err
			}
			type row struct {
				verb.SnapshotArgs
				Time    time.Time             `json:"time"`
				Outcome *verb.SnapshotOutcome `json:"outcome,omitempty"`
			}
			var rows []row
			for _, v := range verbs {
				var r row
				json.Unmarshal(v.Args, &r.SnapshotArgs)
				r.Time = v.Time
				if v.Outcome != nil {
					r.Outcome = &verb.SnapshotOutcome{}
					json.Unmarshal(v.Outcome.Outcome, r.Outcome)
				}
				rows = append(rows, r)
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				for _, r := range rows {
					enc.Encode(r)
				}
				return nil
			}
			tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tLOG POSITION\tTIME\tHELD\tSTATUS\tREASON")
			for _, r := range rows {
				status, held := "(no outcome: interrupted)", "-"
				if r.Outcome != nil {
					held = fmt.Sprintf("%.1f ms", r.Outcome.Pause)
					status = "ok"
					if !r.Outcome.OK {
						status = "failed: " + r.Outcome.Error
					}
				}
				fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\n", r.Name, r.AtSeq, r.Time.Local().Format(time.DateTime), held, status, r.Reason)
			}
			tw.Flush()
			if len(rows) == 0 {
				fmt.Fprintln(out, "(no snapshots recorded)")
			}
			return nil
		},
	}
	df.register(cmd)
	cmd.Flags().BoolVar(&asJSON, "json", false, "one JSON object per snapshot")
	return cmd
}

func rewindCmd() *cobra.Command {
	var dataDir, to string
	var yes, hold bool
	cmd := &cobra.Command{
		Use:   "rewind",
		Short: "Roll the mail store back to a snapshot (asks the running daemon)",
		Long: `rewind rolls the mail store back to a snapshot, the first step of a 3R cycle
done by hand: every change since the snapshot disappears from the store (it
stays in the undo log, to be replayed). The daemon holds all changes back
meanwhile, kicks IMAP sessions, waits until Dovecot has let go of the store,
rolls back, and raises every mailbox's UIDNEXT and HIGHESTMODSEQ to their
values before the rewind, so clients never see a UID reused.

With --hold, changes stay held after the rewind (the split form of a cycle):
repair the server by hand, then run undomail replay.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if to == "" {
				return fmt.Errorf("--to is required: a snapshot (undomail snapshots lists them), a log position or a time")
			}
			// The same targets as cycle run --to, resolved the same way.
			target := to
			name, at, err := resolveTarget(dataDir, to)
			if err != nil {
				return err
			}
			to = name
			if target != name {
				fmt.Fprintf(cmd.OutOrStdout(), "--to %s: snapshot %s (log position %d)\n", target, name, at)
			}
			if !yes {
				if !isTerminal(os.Stdin) {
					return fmt.Errorf("rewind removes every change since %s from the mail store until it is replayed; add --yes to go ahead", to)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "Roll the mail store back to %s? Changes since then leave the store until replayed. [y/N] ", to)
				answer, _ := bufio.NewReader(cmd.InOrStdin()).ReadString('\n')
				if !strings.HasPrefix(strings.ToLower(strings.TrimSpace(answer)), "y") {
					return fmt.Errorf("not rewound")
				}
			}
			c, err := admin.Dial(dataDir)
			if err != nil {
				return err
			}
			out, err := c.Rewind(context.Background(), to, hold)
			if err != nil {
				return fmt.Errorf("rewind: %w", err)
			}
			b, _ := json.Marshal(out)
			fmt.Fprintf(cmd.OutOrStdout(), "rewound to %s: %s\n", to, b)
			return nil
		},
	}
	cmd.Flags().StringVar(&dataDir, "data-dir", "/var/lib/undomail", "undomail's data directory")
	cmd.Flags().StringVar(&to, "to", "", "where to roll back to: a snapshot's name, a log position or a time (the newest snapshot at or before it)")
	cmd.Flags().BoolVarP(&yes, "yes", "y", false, "do not ask for confirmation")
	cmd.Flags().BoolVar(&hold, "hold", false, "keep changes held after the rewind until undomail replay (repair by hand in between)")
	return cmd
}

// resolveTarget names the snapshot a rewind target means, as cycle run --to
// does (daemon.ResolveTarget): a snapshot's name, a log position or a time.
func resolveTarget(dataDir, target string) (string, int64, error) {
	l, err := undolog.OpenReadOnly(dataDir)
	if err != nil {
		return "", 0, err
	}
	defer l.Close()
	name, at, err := daemon.ResolveTarget(context.Background(), l, target)
	if err != nil {
		return "", 0, fmt.Errorf("--to: %w", err)
	}
	return name, at, nil
}

func replayCmd() *cobra.Command {
	var dataDir, cancel string
	cmd := &cobra.Command{
		Use:   "replay",
		Short: "End a held rewind: replay every logged change since the snapshot, then let changes through",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cancelled, err := admin.ParseSeqs(cancel)
			if err != nil {
				return fmt.Errorf("--cancel: %w", err)
			}
			c, err := admin.Dial(dataDir)
			if err != nil {
				return err
			}
			res, err := c.Replay(context.Background(), cancelled)
			out, _ := json.Marshal(res)
			fmt.Fprintf(cmd.OutOrStdout(), "replay: %s\n", out)
			if err != nil {
				return &exitError{code: 1, msg: "replay failed: " + err.Error()}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&dataDir, "data-dir", "/var/lib/undomail", "undomail's data directory")
	cmd.Flags().StringVar(&cancel, "cancel", "", "verbs to leave out, by sequence number: 812,815")
	return cmd
}
