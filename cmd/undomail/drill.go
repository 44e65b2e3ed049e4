package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

func drillCmd() *cobra.Command {
	var df daemonFlags
	var from, to string
	var asJSON, list bool
	cmd := &cobra.Command{
		Use:   "drill",
		Short: "Prove recovery works: replay the log between two snapshots on a clone and compare",
		Long: `drill asks the running daemon for a recovery drill: it clones the older
snapshot, starts a private Dovecot on the clone, replays the undo log up to the
newer snapshot's position against it and compares the result with the newer
snapshot, message by message (undo id, flags, folder). Production is not
touched. Without --from/--to it takes the newest two snapshots with no rewind
between them. The verdict is logged, sent to drills.notify and drills.webhook,
and printed; the exit status is 0 only for a pass.

--list prints the verdicts of past drills from the log.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out := cmd.OutOrStdout()
			if list {
				return listDrills(cmd, df.dataDir, asJSON)
			}
			c, err := df.client()
			if errors.Is(err, errNoDaemon) {
				return fmt.Errorf("drill: no undomail runs on %s (a drill runs in the daemon; or give --admin URL)", df.dataDir)
			}
			if err != nil {
				return err
			}
			v, err := c.Drill(context.Background(), from, to)
			switch {
			case asJSON:
				b, _ := json.Marshal(v)
				fmt.Fprintf(out, "%s\n", b)
			case err == nil || v.From != "":
				printDrill(out, v.DrillResult)
				for _, a := range v.Acknowledged {
					fmt.Fprintf(out, "  reported to %s\n", a)
				}
				for _, e := range v.AckErrors {
					fmt.Fprintf(out, "  NOT reported: %s\n", e)
				}
			}
			if err != nil {
				return &exitError{code: 1, msg: err.Error()}
			}
			return nil
		},
	}
	fl := cmd.Flags()
	df.register(cmd)
	fl.StringVar(&from, "from", "", "the older snapshot")
	fl.StringVar(&to, "to", "", "the newer snapshot")
	fl.BoolVar(&list, "list", false, "print past drills' verdicts")
	fl.BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func printDrill(w interface{ Write([]byte) (int, error) }, r verb.DrillResult) {
	state := "PASSED"
	if !r.OK {
		state = "FAILED"
	}
	fmt.Fprintf(w, "drill %s: %s -> %s, %d changes replayed, %d messages compared, %.1fs\n", state, r.From, r.To, r.Replayed, r.Messages, r.Seconds)
	if r.Error != "" {
		fmt.Fprintf(w, "  error: %s\n", r.Error)
	}
	for _, d := range r.Differences {
		fmt.Fprintf(w, "  %s\n", d)
	}
	if r.More > 0 {
		fmt.Fprintf(w, "  ... and %d more\n", r.More)
	}
}

func listDrills(cmd *cobra.Command, dataDir string, asJSON bool) error {
	l, err := undolog.OpenReadOnly(dataDir)
	if err != nil {
		return err
	}
	defer l.Close()
	verbs, err := l.Verbs(context.Background(), undolog.Filter{Kinds: []string{verb.KindDrill}})
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	if !asJSON {
		fmt.Fprintln(tw, "SEQ\tTIME\tVERDICT\tFROM\tTO\tREPLAYED\tDIFFERENCES")
	}
	for _, v := range verbs {
		var r verb.DrillResult
		verdict := "no verdict (cut off)"
		if v.Outcome != nil && json.Unmarshal(v.Outcome.Outcome, &r) == nil {
			verdict = "FAILED"
			if r.OK {
				verdict = "passed"
			}
		} else {
			var a verb.DrillArgs
			json.Unmarshal(v.Args, &a)
			r.From, r.To = a.From, a.To
		}
		if asJSON {
			json.NewEncoder(out).Encode(map[string]any{"seq": v.Seq, "time": v.Time, "verdict": verdict, "result": r})
			continue
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%d\t%d\n", v.Seq, v.Time.Local().Format(time.DateTime), verdict, r.From, r.To, r.Replayed, len(r.Differences)+r.More)
	}
	return tw.Flush()
}
