package main

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/undomail/undomail/admin"
)

func pruneCmd() *cobra.Command {
	var dataDir, before, archive string
	cmd := &cobra.Command{
		Use:   "prune --before SNAPSHOT [--archive FILE]",
		Short: "Remove the undo log before a snapshot (and the older snapshots), archiving it first",
		Long: `prune asks the running daemon to remove the undo log up to the log position
of --before: cycles and drills can then reach back to that snapshot and no
further, so the older snapshots are destroyed with it. What is removed is
first written to --archive (gzip'd JSON lines: every record with its
checksums, and every message blob only those records named), so the history
of who did what is kept outside the log. The remaining log is checked from
the last removed record's checksum on: undomail fsck still verifies every
record that remains. A cycle that keeps a filter active for live mail is
never removed: remove the filter first (undomail filters --remove).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if before == "" {
				return fmt.Errorf("--before SNAPSHOT is required (undomail snapshots lists them)")
			}
			if archive != "" {
				abs, err := filepath.Abs(archive)
				if err != nil {
					return err
				}
				archive = abs // the daemon writes it
			}
			c, err := admin.Dial(dataDir)
			if err != nil {
				return err
			}
			rep, err := c.Prune(context.Background(), before, archive)
			if err != nil {
				return fmt.Errorf("prune: %w", err)
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "removed %d records and %d blobs; the log now starts after record %d\n", rep.Records, rep.Blobs, rep.Base)
			if rep.Archive != "" {
				fmt.Fprintf(out, "archived to %s\n", rep.Archive)
			}
			for _, s := range rep.Snapshots {
				fmt.Fprintf(out, "destroyed snapshot %s\n", s)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&dataDir, "data-dir", "/var/lib/undomail", "undomail's data directory")
	cmd.Flags().StringVar(&before, "before", "", "the oldest snapshot to keep: the log before its position goes")
	cmd.Flags().StringVar(&archive, "archive", "", "write what is removed to this new file (gzip'd JSON lines)")
	return cmd
}
