package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/undomail/undomail/admin"
)

// outboundCmd is `undomail outbound`: the outbound delay window
// (smtp.outbound_delay; docs/operations.md, "Outbound delay window").
func outboundCmd() *cobra.Command {
	var f daemonFlags
	var asJSON bool
	var reason string
	cmd := &cobra.Command{
		Use:   "outbound",
		Short: "The outbound delay window: list the mail held before it leaves, release or cancel a message",
	}
	dial := func() (*admin.Client, error) {
		c, err := f.client()
		if errors.Is(err, errNoDaemon) {
			return nil, fmt.Errorf("no undomail serve running with data directory %s: the window lives in the daemon", f.dataDir)
		}
		return c, err
	}
	list := &cobra.Command{
		Use:   "list",
		Short: "List the messages the window holds",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := dial()
			if err != nil {
				return err
			}
			l, err := c.Outbound(context.Background())
			if err != nil {
				return err
			}
			if asJSON {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(l)
			}
			printOutbound(cmd.OutOrStdout(), l)
			return nil
		},
	}
	list.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	act := func(name, short, done string) *cobra.Command {
		return &cobra.Command{
			Use:   name + " QUEUE_ID...",
			Short: short,
			Args:  cobra.MinimumNArgs(1),
			RunE: func(cmd *cobra.Command, ids []string) error {
				c, err := dial()
				if err != nil {
					return err
				}
				var errs []error
				for _, id := range ids {
					if _, err := c.OutboundAct(context.Background(), name, id, reason); err != nil {
						errs = append(errs, fmt.Errorf("%s %s: %w", name, id, err))
						continue
					}
					fmt.Fprintf(cmd.OutOrStdout(), "%s: %s\n", id, done)
				}
				return errors.Join(errs...)
			},
		}
	}
	release := act("release", "Let held messages leave now", "released: Postfix delivers it now")
	cancel := act("cancel", "Remove held messages from Postfix's queue: they never leave", "cancelled: it never leaves")
	for _, c := range []*cobra.Command{list, release, cancel} {
		f.register(c)
	}
	for _, c := range []*cobra.Command{release, cancel} {
		c.Flags().StringVar(&reason, "reason", "", "why, in plain words: logged with the decision")
	}
	cmd.AddCommand(list, release, cancel)
	return cmd
}

// printOutbound prints the window's held messages as a table.
func printOutbound(w io.Writer, l admin.OutboundList) {
	if !l.On {
		fmt.Fprintln(w, "the outbound delay window is off (smtp.outbound_delay): mail for other hosts leaves at once")
		return
	}
	if len(l.Held) == 0 {
		fmt.Fprintln(w, "the outbound delay window holds nothing")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "QUEUE ID\tSEQ\tSENT BY\tFROM\tTO\tSUBJECT\tLEAVES IN")
	for _, m := range l.Held {
		sub := "-"
		if m.Submission != 0 {
			sub = fmt.Sprint(m.Submission)
		}
		left := time.Until(m.ReleaseAt).Round(time.Second)
		when := left.String()
		if left <= 0 {
			when = "now (its time is up)"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%q\t%s\n", m.QueueID, m.Seq, sub, m.Sender, strings.Join(m.Rcpts, ", "), m.Subject, when)
	}
	tw.Flush()
}

// printOutboundPlan lists in a cycle's plan what the window holds and
// what the cycle does with each.
func printOutboundPlan(w io.Writer, out []admin.PlanOutbound) {
	if len(out) == 0 {
		return
	}
	fmt.Fprintf(w, "the outbound delay window holds %d messages:\n", len(out))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "QUEUE ID\tACTION\tWHAT")
	for _, o := range out {
		action := o.Action
		if action == "cancel" {
			action = "cancel: it never leaves"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", o.QueueID, action, o.What)
	}
	tw.Flush()
}
