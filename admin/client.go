package admin

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/undomail/undomail/replay"
)

// do sends a request with the client's credentials; errors name where
// the daemon was asked.
func (c *Client) do(req *http.Request) (*http.Response, error) {
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if c.remote {
			return nil, fmt.Errorf("admin %s: %w", c.path, err)
		}
		return nil, fmt.Errorf("control socket %s: %w", c.path, err)
	}
	return resp, nil
}

// get reads a JSON answer of the admin API into v.
func (c *Client) get(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("%s %s: %w", c.path, path, err)
	}
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			return fmt.Errorf("%s %s: %s (%s)", c.path, path, e.Error, resp.Status)
		}
		return fmt.Errorf("%s %s: %s", c.path, path, resp.Status)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s %s: bad reply: %w", c.path, path, err)
	}
	return nil
}

// Status asks the daemon for its status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	return st, c.get(ctx, "/api/status", &st)
}

// VerbQuery are the filters of Verbs; zero fields do not filter.
type VerbQuery struct {
	User         string
	Kinds        []string
	Since, Until time.Time
	After        int64 // seq cursor (ascending)
	Before       int64 // seq cursor (with Desc)
	Desc         bool
	Limit        int
	Text         string
	Branch       int64 // a cycle's seq: its abandoned branch
}

func (q VerbQuery) values() url.Values {
	v := url.Values{}
	set := func(k, s string) {
		if s != "" {
			v.Set(k, s)
		}
	}
	num := func(k string, n int64) {
		if n != 0 {
			v.Set(k, strconv.FormatInt(n, 10))
		}
	}
	set("user", q.User)
	set("kind", strings.Join(q.Kinds, ","))
	if !q.Since.IsZero() {
		v.Set("since", q.Since.Format(time.RFC3339Nano))
	}
	if !q.Until.IsZero() {
		v.Set("until", q.Until.Format(time.RFC3339Nano))
	}
	num("after", q.After)
	num("before", q.Before)
	num("limit", int64(q.Limit))
	num("branch", q.Branch)
	set("q", q.Text)
	if q.Desc {
		v.Set("order", "desc")
	}
	return v
}

// Verbs asks for one page of verbs.
func (c *Client) Verbs(ctx context.Context, q VerbQuery) (VerbPage, error) {
	var p VerbPage
	return p, c.get(ctx, "/api/verbs?"+q.values().Encode(), &p)
}

// Snapshots lists the snapshots the log records, oldest first.
func (c *Client) Snapshots(ctx context.Context) ([]Snapshot, error) {
	var r struct {
		Snapshots []Snapshot `json:"snapshots"`
	}
	return r.Snapshots, c.get(ctx, "/api/snapshots", &r)
}

// Cycles lists the cycles in the log, oldest first.
func (c *Client) Cycles(ctx context.Context) ([]Cycle, error) {
	var r struct {
		Cycles []Cycle `json:"cycles"`
	}
	return r.Cycles, c.get(ctx, "/api/cycles", &r)
}

// Drills lists the drill verdicts, oldest first.
func (c *Client) Drills(ctx context.Context) ([]Drill, error) {
	var r struct {
		Drills []Drill `json:"drills"`
	}
	return r.Drills, c.get(ctx, "/api/drills", &r)
}

// Compensations asks for one page of compensations (Kinds is ignored).
func (c *Client) Compensations(ctx context.Context, q VerbQuery) (VerbPage, error) {
	var r struct {
		Compensations []Verb `json:"compensations"`
		Next          int64  `json:"next"`
	}
	err := c.get(ctx, "/api/compensations?"+q.values().Encode(), &r)
	return VerbPage{Verbs: r.Compensations, Next: r.Next}, err
}

// Plan asks what a cycle would do.
func (c *Client) Plan(ctx context.Context, to string, cancel []int64) (*Plan, error) {
	parts := make([]string, len(cancel))
	for i, n := range cancel {
		parts[i] = strconv.FormatInt(n, 10)
	}
	var p Plan
	err := c.get(ctx, "/api/cycles/plan?to="+url.QueryEscape(to)+"&cancel="+strings.Join(parts, ","), &p)
	return &p, err
}

// CycleProgress returns the running cycle's progress (nil when none
// runs).
func (c *Client) CycleProgress(ctx context.Context) (*replay.Progress, error) {
	var p *replay.Progress
	path := "/cycles/progress"
	if c.remote {
		path = "/api/cycles/progress"
	}
	return p, c.get(ctx, path, &p)
}
