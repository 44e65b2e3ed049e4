package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/undomail/undomail/compensate"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

func compensationsCmd() *cobra.Command {
	var dataDir, user string
	var cycle int64
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "compensations",
		Short: "List the explanations cycles delivered to users and the operator",
		Long: `compensations lists the compensating messages cycles delivered: the digest
each user got explaining what a cycle changed that they had already seen, and
the notices sent to the operator. Each is listed with the paradoxes it
explains. A compensation that was not delivered is marked so; the next cycle
over the same period, or undomail's compensation of that cycle, tries again.

It reads the undo log read-only and can run while undomail serves.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			l, err := undolog.OpenReadOnly(dataDir)
			if err != nil {
				return err
			}
			defer l.Close()
			cs, err := compensate.List(context.Background(), l, undolog.Filter{User: user})
			if err != nil {
				return err
			}
			var out []compensate.Compensation
			for _, c := range cs {
				if cycle == 0 || c.Args.Cycle == cycle {
					out = append(out, c)
				}
			}
			if asJSON {
				return printCompensationsJSON(cmd.OutOrStdout(), out)
			}
			printCompensations(cmd.OutOrStdout(), out)
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&dataDir, "data-dir", "/var/lib/undomail", "undomail's data directory")
	fl.StringVar(&user, "user", "", "only compensations for this user")
	fl.Int64Var(&cycle, "cycle", 0, "only compensations of the cycle with this sequence number")
	fl.BoolVar(&asJSON, "json", false, "one JSON object per line")
	return cmd
}

func printCompensations(w io.Writer, cs []compensate.Compensation) {
	if len(cs) == 0 {
		fmt.Fprintln(w, "(no compensations match)")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SEQ\tTIME\tCYCLE\tFOR\tTO\tDELIVERED\tPARADOXES")
	for _, c := range cs {
		who := c.Args.User
		if c.Args.Audience == compensate.AudienceOperator {
			who = "operator"
		}
		fmt.Fprintf(tw, "%d\t%s\t%d\t%s\t%s\t%s\t%s\n", c.Seq, c.Time.Local().Format("2006-01-02 15:04:05"), c.Args.Cycle,
			who, strings.Join(c.Args.Rcpts, ","), delivered(c), kindCounts(c.Args.Paradoxes))
	}
	tw.Flush()
	for _, c := range cs {
		fmt.Fprintf(w, "\n%d (cycle %d, %s):\n", c.Seq, c.Args.Cycle, c.Args.Header.Subject)
		for _, p := range c.Args.Paradoxes {
			fmt.Fprintf(w, "  %-16s %-8s verb %-6d %s\n", p.Kind, orDash(p.User), p.Verb, paradoxLine(p))
		}
	}
}

// delivered says whether Dovecot took the message, and what it said if not.
func delivered(c compensate.Compensation) string {
	switch {
	case c.Outcome == nil:
		return "unknown (no outcome logged)"
	case c.Delivered():
		return "yes"
	}
	return "no: " + verb.DeliveryOutcome(*c.Outcome).Summary()
}

// kindCounts summarises paradoxes by kind: "read_removed:3 action_failed:1".
func kindCounts(ps []compensate.Paradox) string {
	n := map[compensate.Kind]int{}
	for _, p := range ps {
		n[p.Kind]++
	}
	var parts []string
	for _, k := range compensate.Kinds {
		if n[k] > 0 {
			parts = append(parts, fmt.Sprintf("%s:%d", k, n[k]))
		}
	}
	return strings.Join(parts, " ")
}

// paradoxLine names what a paradox is about in one line.
func paradoxLine(p compensate.Paradox) string {
	var parts []string
	if m := p.Message; m != nil {
		parts = append(parts, fmt.Sprintf("%q from %s", m.Subject, orDash(m.From)))
	}
	if p.Rcpt != "" {
		parts = append(parts, "to "+p.Rcpt)
	}
	if p.Action != "" {
		parts = append(parts, p.Action)
	}
	parts = append(parts, "seen "+p.Seen.Local().Format("2006-01-02 15:04"), "now "+p.Now)
	return strings.Join(parts, "; ")
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// compensationJSON is the --json form: stable field names for scripts.
type compensationJSON struct {
	Seq       int64                 `json:"seq"`
	Time      time.Time             `json:"time"`
	Cycle     int64                 `json:"cycle"`
	Audience  string                `json:"audience"`
	User      string                `json:"user"`
	Rcpts     []string              `json:"rcpts"`
	UndoID    string                `json:"undo_id"`
	Subject   string                `json:"subject"`
	Delivered bool                  `json:"delivered"`
	Outcome   *verb.DeliveryOutcome `json:"outcome,omitempty"`
	Paradoxes []compensate.Paradox  `json:"paradoxes"`
}

func printCompensationsJSON(w io.Writer, cs []compensate.Compensation) error {
	enc := json.NewEncoder(w)
	for _, c := range cs {
		j := compensationJSON{Seq: c.Seq, Time: c.Time, Cycle: c.Args.Cycle, Audience: c.Args.Audience, User: c.Args.User,
			Rcpts: c.Args.Rcpts, UndoID: c.Args.UndoID, Subject: c.Args.Header.Subject, Delivered: c.Delivered(),
			Outcome: c.Outcome, Paradoxes: c.Args.Paradoxes}
		if err := enc.Encode(j); err != nil {
			return err
		}
	}
	return nil
}
