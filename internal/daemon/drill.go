package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// Drill runs a recovery drill (replay.Drill) between two snapshots (both
// empty: the newest pair with no rewind between them), logs its verdict
// and sends it as a positive acknowledgement to the configured mail
// address and webhook. Production is not touched: the drill replays
// against a clone with a private Dovecot.
func (d *Daemon) Drill(ctx context.Context, from, to string) (verb.DrillVerdict, error) {
	if d.Store == nil {
		return verb.DrillVerdict{}, fmt.Errorf("drill: no store configured")
	}
	d.drillMu.Lock()
	defer d.drillMu.Unlock()
	a, b, err := replay.PickDrill(ctx, d.Store, d.Log, from, to)
	if err != nil {
		return verb.DrillVerdict{}, err
	}
	args, _ := json.Marshal(verb.DrillArgs{From: a.Name, To: b.Name, FromSeq: a.Seq, ToSeq: b.Seq})
	intent := &undolog.Record{Kind: verb.KindDrill, Session: "drill", Args: args}
	if err := d.Log.Append(ctx, intent); err != nil {
		return verb.DrillVerdict{}, fmt.Errorf("drill: log intent: %w", err)
	}
	v := verb.DrillVerdict{DrillResult: replay.Drill(ctx, replay.DrillOptions{Store: d.Store, Log: d.Log, From: a.Name, To: b.Name,
		WorkDir: filepath.Join(d.dataDir, "drills"), Logger: d.logger})}
	d.acknowledge(ctx, &v)
	out, _ := json.Marshal(v)
	if err := d.Log.Append(ctx, &undolog.Record{Kind: undolog.KindOutcome, Session: "drill", Ref: intent.Seq, Outcome: out}); err != nil {
		d.logger.Error("log drill verdict", "err", err)
	}
	if !v.OK {
		d.logger.Error("recovery drill FAILED", "from", v.From, "to", v.To, "differences", len(v.Differences)+v.More, "err", v.Error)
		return v, fmt.Errorf("drill %s -> %s failed: %s", v.From, v.To, v.Summary())
	}
	return v, nil
}

// acknowledge sends the verdict to the operator's address and webhook.
func (d *Daemon) acknowledge(ctx context.Context, v *verb.DrillVerdict) {
	if hook := d.drills.Webhook; hook != "" {
		body, _ := json.Marshal(v.DrillResult)
		if err := postJSON(ctx, hook, body); err != nil {
			v.AckErrors = append(v.AckErrors, "webhook: "+err.Error())
		} else {
			v.Acknowledged = append(v.Acknowledged, "webhook "+hook)
		}
	}
	if to := d.drills.Notify; to != "" {
		if err := d.mailVerdict(ctx, to, v.DrillResult); err != nil {
			v.AckErrors = append(v.AckErrors, "mail: "+err.Error())
		} else {
			v.Acknowledged = append(v.Acknowledged, "mail "+to)
		}
	}
	for _, e := range v.AckErrors {
		d.logger.Error("drill verdict not acknowledged", "err", e)
	}
}

func postJSON(ctx context.Context, url string, body []byte) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s answered %s", url, resp.Status)
	}
	return nil
}

// mailVerdict mails a drill's verdict, through Postfix when undomail has
// a front door, else straight to Dovecot's LMTP (a local mailbox).
func (d *Daemon) mailVerdict(ctx context.Context, to string, r verb.DrillResult) error {
	state := "PASSED"
	if !r.OK {
		state = "FAILED"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "From: undomail <undomail@%s>\r\nTo: <%s>\r\n", d.hostname, to)
	fmt.Fprintf(&b, "Subject: undomail recovery drill %s: %s -> %s\r\n", state, r.From, r.To)
	fmt.Fprintf(&b, "Date: %s\r\nMessage-Id: <%s@%s>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n",
		time.Now().Format(time.RFC1123Z), undolog.NewID(), d.hostname)
	fmt.Fprintf(&b, "The recovery drill %s.\r\n\r\nIt replayed the undo log from snapshot %s to snapshot %s on a clone,\r\n", strings.ToLower(state), r.From, r.To)
	fmt.Fprintf(&b, "replaying %d changes, and compared %d messages with the later snapshot.\r\n", r.Replayed, r.Messages)
	if r.Error != "" {
		fmt.Fprintf(&b, "\r\nError: %s\r\n", r.Error)
	}
	for _, diff := range r.Differences {
		fmt.Fprintf(&b, "  - %s\r\n", diff)
	}
	if r.More > 0 {
		fmt.Fprintf(&b, "  ... and %d more\r\n", r.More)
	}
	fmt.Fprintf(&b, "\r\nA drill reports every time. If these reports stop, drills stopped running.\r\n")
	addr, lmtp := d.smtpUpstream, false
	if addr == "" {
		addr, lmtp = d.target.LMTPAddr, true
	}
	conn, err := (&net.Dialer{Timeout: 30 * time.Second}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	var c *smtp.Client
	if lmtp {
		c = smtp.NewClientLMTP(conn)
	} else {
		c = smtp.NewClient(conn)
	}
	defer c.Close()
	if err := c.Hello(d.hostname); err != nil {
		return err
	}
	if err := c.SendMail("undomail@"+d.hostname, []string{to}, strings.NewReader(b.String())); err != nil {
		return err
	}
	return c.Quit()
}

// scheduleDrills runs a drill every interval until ctx ends.
func (d *Daemon) scheduleDrills(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if _, err := d.Drill(ctx, "", ""); err != nil {
			d.logger.Error("scheduled drill", "err", err)
		}
	}
}
