package main

import (
	"context"
	"encoding/json"
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/undomail/undomail/admin"
)

func filtersCmd() *cobra.Command {
	var dataDir string
	var remove int64
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "filters",
		Short: "List the filters cycles left active for live mail (cycle run --keep), or remove them",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := admin.Dial(dataDir)
			if err != nil {
				return err
			}
			ctx := context.Background()
			out := cmd.OutOrStdout()
			if remove != 0 {
				if err := c.RemoveFilters(ctx, remove); err != nil {
					return err
				}
				fmt.Fprintf(out, "the filters cycle %d kept no longer judge live mail\n", remove)
				return nil
			}
			fs, err := c.Filters(ctx)
			if err != nil {
				return err
			}
			if asJSON {
				b, _ := json.Marshal(fs)
				fmt.Fprintf(out, "%s\n", b)
				return nil
			}
			if len(fs) == 0 {
				fmt.Fprintln(out, "no filters are active for live mail")
				return nil
			}
			tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "CYCLE\tRULE\tACTION\tJUDGES DELIVERIES AFTER")
			for _, f := range fs {
				fmt.Fprintf(tw, "%d\t%s\t%s\t%d\n", f.Cycle, f.Spec.Rule, f.Spec.Action, f.Since)
			}
			return tw.Flush()
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&dataDir, "data-dir", "/var/lib/undomail", "undomail's data directory")
	fl.Int64Var(&remove, "remove", 0, "stop the filters this cycle kept (by the cycle's sequence number)")
	fl.BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
