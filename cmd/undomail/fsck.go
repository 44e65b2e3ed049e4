package main

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/undomail/undomail/undolog"
)

func fsckCmd() *cobra.Command {
	var dataDir string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "fsck",
		Short: "Verify the undo log's hash chain and every message blob",
		Long: `fsck reads the whole undo log and blob store and reports what is wrong
and where: records whose checksum no longer matches (changed after they were
written), broken links in the hash chain, missing sequence numbers, a log
shorter than its HEAD file says (truncated), and blobs that are missing or
whose content no longer hashes to their name. It changes nothing. It is safe to
run while undomail serves.

Exit status: 0 no errors, 1 errors found, 2 fsck itself failed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out := cmd.OutOrStdout()
			enc := json.NewEncoder(out)
			sum, err := undolog.Check(context.Background(), dataDir, func(p undolog.Problem) {
				if asJSON {
					enc.Encode(p)
					return
				}
				fmt.Fprintf(out, "%s: %s\n", p.Severity, p.What)
			})
			if err != nil {
				return fmt.Errorf("fsck %s: %w", dataDir, err)
			}
			if asJSON {
				enc.Encode(sum)
			} else {
				fmt.Fprintf(out, "%s: %d records, %d blobs checked; %d errors, %d warnings\n",
					dataDir, sum.Records, sum.Blobs, sum.Errors, sum.Warnings)
			}
			if sum.Errors > 0 {
				return &exitError{code: 1, msg: fmt.Sprintf("%d errors in the undo log at %s", sum.Errors, dataDir)}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&dataDir, "data-dir", "/var/lib/undomail", "undomail's data directory")
	cmd.Flags().BoolVar(&asJSON, "json", false, "one JSON object per problem, then the summary")
	return cmd
}
