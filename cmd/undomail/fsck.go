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
	var asJSON, repair bool
	var from []string
	cmd := &cobra.Command{
		Use:   "fsck",
		Short: "Verify the undo log's hash chain and every message blob",
		Long: `fsck reads the whole undo log and blob store and reports what is wrong
and where: records whose checksum no longer matches (changed after they were
written), broken links in the hash chain, missing sequence numbers, a log
shorter than its HEAD file says (truncated), and blobs that are missing or
whose content no longer hashes to their name. It changes nothing. It is safe to
run while undomail serves.

With --repair it mends what it safely can: a damaged or missing message blob
is rewritten from a copy of the message found by its undo id in the
directories given with --from (the live mail store, snapshot directories),
but only if the copy hashes to the blob's name, so a wrong copy can never
be written. A damaged record has no second copy: it is reported, and cycles
and drills refuse to replay a range that contains it.

Exit status: 0 no errors (or all repaired), 1 errors found, 2 fsck itself failed.`,
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
			if repair && sum.Errors > 0 {
				if len(from) == 0 {
					return fmt.Errorf("fsck --repair: say where copies of the messages may be: --from /var/vmail (the mail store, snapshot directories)")
				}
				fixed, err := repairBlobs(cmd.Context(), dataDir, from, out)
				if err != nil {
					return fmt.Errorf("fsck --repair %s: %w", dataDir, err)
				}
				if fixed > 0 {
					fmt.Fprintf(out, "repaired %d blobs; checking again\n", fixed)
					sum, err = undolog.Check(context.Background(), dataDir, func(p undolog.Problem) {
						fmt.Fprintf(out, "%s: %s\n", p.Severity, p.What)
					})
					if err != nil {
						return fmt.Errorf("fsck %s: %w", dataDir, err)
					}
					fmt.Fprintf(out, "%s: %d records, %d blobs checked; %d errors, %d warnings\n",
						dataDir, sum.Records, sum.Blobs, sum.Errors, sum.Warnings)
				}
			}
			if sum.Errors > 0 {
				return &exitError{code: 1, msg: fmt.Sprintf("%d errors in the undo log at %s", sum.Errors, dataDir)}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&repair, "repair", false, "mend damaged message blobs from copies found under --from")
	cmd.Flags().StringArrayVar(&from, "from", nil, "a directory with copies of the messages (mail store, snapshots); repeatable")
	cmd.Flags().StringVar(&dataDir, "data-dir", "/var/lib/undomail", "undomail's data directory")
	cmd.Flags().BoolVar(&asJSON, "json", false, "one JSON object per problem, then the summary")
	return cmd
}
