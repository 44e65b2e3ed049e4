package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/undolog"
)

// daemonFlags say how an operator command reaches the daemon: its control
// socket in --data-dir, or the admin server at --admin with the token.
type daemonFlags struct {
	dataDir, adminURL, tokenFile, caFile string
}

func (f *daemonFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.dataDir, "data-dir", "/var/lib/undomail", "undomail's data directory")
	cmd.Flags().StringVar(&f.adminURL, "admin", "", "ask the admin server at this URL (https://host:8025) instead of the local daemon")
	cmd.Flags().StringVar(&f.caFile, "admin-ca", "", "PEM file of the certificate authority (or the self-signed certificate) of --admin's HTTPS")
	cmd.Flags().StringVar(&f.tokenFile, "token-file", "", "file with the admin token for --admin (default: admin.token in --data-dir; or $UNDOMAIL_ADMIN_TOKEN)")
}

// errNoDaemon: no daemon runs on --data-dir; the command reads the log.
var errNoDaemon = errors.New("no daemon")

// client connects to the daemon, or returns errNoDaemon when none serves
// --data-dir and no --admin was given.
func (f *daemonFlags) client() (*admin.Client, error) {
	if f.adminURL == "" {
		c, err := admin.Dial(f.dataDir)
		if err != nil {
			return nil, errNoDaemon
		}
		return c, nil
	}
	tok := os.Getenv("UNDOMAIL_ADMIN_TOKEN")
	if f.tokenFile != "" || tok == "" {
		path := f.tokenFile
		if path == "" {
			path = filepath.Join(f.dataDir, admin.TokenName)
		}
		var err error
		if tok, err = admin.ReadTokenFile(path); err != nil {
			return nil, fmt.Errorf("the admin token for --admin: %w", err)
		}
	}
	var roots *x509.CertPool
	if f.caFile != "" {
		pem, err := os.ReadFile(f.caFile)
		if err != nil {
			return nil, fmt.Errorf("--admin-ca: %w", err)
		}
		roots = x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--admin-ca %s: no PEM certificate in it", f.caFile)
		}
	}
	return admin.DialRemote(f.adminURL, tok, roots), nil
}

func statusCmd() *cobra.Command {
	var df daemonFlags
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Is undomail well: upstreams, undo log, snapshots, gate, last cycle and drill",
		Long: `status asks the running daemon (its control socket in --data-dir, or the
admin server given with --admin) how it is: whether each upstream accepts
connections, the undo log's size and head, the snapshots, whether changes are
held back, how far a running cycle is, and the verdicts of the last cycle and
the last recovery drill. Without a running daemon it reads the log.

The exit status is 0 when all is well, 1 when something needs the operator (an
upstream down, the last cycle or drill not verified, no daemon running), 2 on
errors.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := context.Background()
			var st admin.Status
			running := true
			c, err := df.client()
			switch {
			case errors.Is(err, errNoDaemon):
				running = false
				l, err := undolog.OpenReadOnly(df.dataDir)
				if err != nil {
					return err
				}
				defer l.Close()
				if st, err = admin.LogState(ctx, l); err != nil {
					return err
				}
			case err != nil:
				return err
			default:
				if st, err = c.Status(ctx); err != nil {
					return err
				}
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				if err := enc.Encode(struct {
					Running bool `json:"running"`
					admin.Status
				}{running, st}); err != nil {
					return err
				}
			} else {
				printStatus(out, st, running)
			}
			if problems := statusProblems(st, running); len(problems) > 0 {
				return &exitError{code: 1, msg: strings.Join(problems, "; ")}
			}
			return nil
		},
	}
	df.register(cmd)
	cmd.Flags().BoolVar(&asJSON, "json", false, "the status as JSON")
	return cmd
}

// statusProblems lists what needs the operator.
func statusProblems(st admin.Status, running bool) []string {
	var p []string
	if !running {
		p = append(p, "undomail serve is not running")
	}
	if st.Log.Error != "" {
		p = append(p, "the undo log refuses appends: "+st.Log.Error)
	}
	for _, u := range st.Upstreams {
		if !u.OK {
			p = append(p, fmt.Sprintf("upstream %s %s is down", u.Name, u.Addr))
		}
	}
	if o := st.Outbound; o != nil && st.Gate == "open" {
		// Released within a second of its time when all is well: one
		// still held a minute later is not being released.
		for _, m := range o.Held {
			if time.Since(m.ReleaseAt) > time.Minute {
				p = append(p, fmt.Sprintf("outbound message %s should have left at %s (can undomail run postqueue? see its log)", m.QueueID, m.ReleaseAt.Local().Format("15:04:05")))
			}
		}
	}
	if c := st.LastCycle; c != nil && c.Verdict != nil && !c.Verdict.OK {
		p = append(p, fmt.Sprintf("the last cycle (#%d) was not verified", c.Seq))
	}
	if d := st.LastDrill; d != nil && !d.OK {
		p = append(p, fmt.Sprintf("the last drill (#%d) found differences", d.Seq))
	}
	return p
}

func printStatus(w io.Writer, st admin.Status, running bool) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	if running {
		fmt.Fprintf(tw, "daemon\trunning\n")
		fmt.Fprintf(tw, "gate\t%s\n", st.Gate)
	} else {
		fmt.Fprintf(tw, "daemon\tNOT RUNNING (read from the log)\n")
	}
	for _, u := range st.Upstreams {
		state := fmt.Sprintf("ok (%.1f ms)", u.ConnectMS)
		if !u.OK {
			state = "DOWN: " + u.Error
		}
		fmt.Fprintf(tw, "upstream %s\t%s %s\n", u.Name, u.Addr, state)
	}
	head := st.Log.Head
	if len(head) > 12 {
		head = head[:12]
	}
	fmt.Fprintf(tw, "undo log\t%s: %d records, %.1f MiB, head %s\n", st.Log.Dir, st.Log.Records, float64(st.Log.SizeBytes)/(1<<20), head)
	if st.Log.Error != "" {
		fmt.Fprintf(tw, "undo log\tREFUSES APPENDS: %s\n", st.Log.Error)
	}
	if s := st.LastSnapshot; s != nil {
		fmt.Fprintf(tw, "snapshots\t%d; newest %s at log position %d (%s, changes held %.1f ms)\n", st.Snapshots, s.Name, s.AtSeq, s.Time.Local().Format("2006-01-02 15:04:05"), s.PauseMS)
	} else {
		fmt.Fprintf(tw, "snapshots\tnone\n")
	}
	if o := st.Outbound; o != nil {
		fmt.Fprintf(tw, "outbound window	%d held (undomail outbound list)\n", len(o.Held))
	}
	if st.Progress != nil {
		b, _ := json.Marshal(st.Progress)
		fmt.Fprintf(tw, "cycle\trunning: %s\n", b)
	}
	if c := st.LastCycle; c != nil {
		verdict := "no verdict (running or cut off)"
		if v := c.Verdict; v != nil {
			verdict = fmt.Sprintf("%s: %d replayed, %d cancelled, %d failed", okWord(v.OK), v.Replayed, v.Cancelled, v.Failed)
			if v.Error != "" {
				verdict += ": " + v.Error
			}
		}
		fmt.Fprintf(tw, "last cycle\t#%d %s, rewound to %s: %s\n", c.Seq, c.Time.Local().Format("2006-01-02 15:04:05"), c.To, verdict)
	} else {
		fmt.Fprintf(tw, "last cycle\tnone\n")
	}
	if d := st.LastDrill; d != nil {
		fmt.Fprintf(tw, "last drill\t#%d %s, %s to %s: %s (%d differences)\n", d.Seq, d.Time.Local().Format("2006-01-02 15:04:05"), d.From, d.To, okWord(d.OK), len(d.Differences))
	} else {
		fmt.Fprintf(tw, "last drill\tnone\n")
	}
	tw.Flush()
}

func okWord(ok bool) string {
	if ok {
		return "verified"
	}
	return "NOT VERIFIED"
}

// remoteSnapshots lists the snapshots of the daemon behind --admin.
func remoteSnapshots(cmd *cobra.Command, df *daemonFlags, asJSON bool) error {
	c, err := df.client()
	if err != nil {
		return err
	}
	snaps, err := c.Snapshots(context.Background())
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	if asJSON {
		enc := json.NewEncoder(out)
		for _, s := range snaps {
			if err := enc.Encode(s); err != nil {
				return err
			}
		}
		return nil
	}
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tLOG POSITION\tTIME\tHELD\tSTATUS\tREASON")
	for _, s := range snaps {
		status := "ok"
		if s.Pruned {
			status = "pruned"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%.1f ms\t%s\t%s\n", s.Name, s.AtSeq, s.Time.Local().Format(time.DateTime), s.PauseMS, status, s.Reason)
	}
	tw.Flush()
	if len(snaps) == 0 {
		fmt.Fprintln(out, "(no snapshots recorded)")
	}
	return nil
}
