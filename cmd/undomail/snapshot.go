package main

import (
	"context"
	"encoding/json"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/internal/daemon"
	"github.com/undomail/undomail/undolog"
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
	var dataDir string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "snapshots",
		Short: "List the snapshots recorded in the undo log",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			l, err := undolog.OpenReadOnly(dataDir)
			if err != nil {
				return err
			}
			defer l.Close()
			verbs, err := l.Verbs(context.Background(), undolog.Filter{Kinds: []string{daemon.KindSnapshot}})
			if err != nil {
				return err
			}
			type row struct {
				daemon.SnapshotArgs
				Time    time.Time               `json:"time"`
				Outcome *daemon.SnapshotOutcome `json:"outcome,omitempty"`
			}
			var rows []row
			for _, v := range verbs {
				var r row
				json.Unmarshal(v.Args, &r.SnapshotArgs)
				r.Time = v.Time
				if v.Outcome != nil {
					r.Outcome = &daemon.SnapshotOutcome{}
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
	cmd.Flags().StringVar(&dataDir, "data-dir", "/var/lib/undomail", "undomail's data directory")
	cmd.Flags().BoolVar(&asJSON, "json", false, "one JSON object per snapshot")
	return cmd
}
