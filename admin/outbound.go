package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/undomail/undomail/internal/outbound"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// OutboundWindow is the outbound delay window (smtp.outbound_delay), as
// a Backend that has one offers it (found by type assertion).
type OutboundWindow interface {
	// OutboundHeld lists the messages the window holds; on is false
	// when the window is off.
	OutboundHeld() (ms []outbound.Message, on bool)
	// ReleaseOutbound lets a held message leave now.
	ReleaseOutbound(ctx context.Context, queueID, reason string) error
	// CancelOutbound removes a held message: it never leaves.
	CancelOutbound(ctx context.Context, queueID, reason string) error
}

// OutboundList is the answer to GET /api/outbound.
type OutboundList struct {
	// On says the window is on (smtp.outbound_delay is set).
	On   bool               `json:"on"`
	Held []outbound.Message `json:"held"`
}

// outboundRoutes serves the window on the API and the web admin:
//
//	GET  /api/outbound                      the held messages
//	POST /api/outbound/{id}/release?reason= let one leave now
//	POST /api/outbound/{id}/cancel?reason=  remove it: it never leaves
func (s *Server) outboundRoutes(m *http.ServeMux) {
	m.Handle("GET /api/outbound", s.api(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.outboundList())
	})))
	for _, act := range []string{"release", "cancel"} {
		m.Handle("POST /api/outbound/{id}/"+act, s.api(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if err := s.outboundAct(r.Context(), act, r.PathValue("id"), r.URL.Query().Get("reason")); err != nil {
				code := http.StatusConflict
				if errors.Is(err, outbound.ErrNotHeld) {
					code = http.StatusNotFound
				}
				writeError(w, code, err)
				return
			}
			writeJSON(w, http.StatusOK, s.outboundList())
		})))
		m.Handle("POST /outbound/"+act, s.web.page(func(rw http.ResponseWriter, r *http.Request, p *pageData) error {
			reason := strings.TrimSpace(r.PostFormValue("reason"))
			if reason == "" {
				reason = "web admin"
			}
			if err := s.outboundAct(r.Context(), act, r.PostFormValue("queue_id"), reason); err != nil {
				if lerr := s.web.outbound(rw, r, p); lerr != nil {
					return lerr
				}
				return err
			}
			http.Redirect(rw, r, "/outbound?done="+url.QueryEscape(act), http.StatusSeeOther)
			return nil
		}))
	}
	m.Handle("GET /outbound", s.web.page(s.web.outbound))
}

func (s *Server) outboundList() OutboundList {
	ow, ok := s.b.(OutboundWindow)
	if !ok {
		return OutboundList{Held: []outbound.Message{}}
	}
	ms, on := ow.OutboundHeld()
	if ms == nil {
		ms = []outbound.Message{}
	}
	return OutboundList{On: on, Held: ms}
}

func (s *Server) outboundAct(ctx context.Context, act, queueID, reason string) error {
	ow, ok := s.b.(OutboundWindow)
	if !ok {
		return errors.New("the outbound delay window is off (smtp.outbound_delay)")
	}
	if act == "release" {
		return ow.ReleaseOutbound(ctx, queueID, reason)
	}
	return ow.CancelOutbound(ctx, queueID, reason)
}

// outboundView is the outbound page's data: what the window holds, and
// how the latest waits ended.
type outboundView struct {
	OutboundList
	Done  string
	Ended []outboundEnd
}

type outboundEnd struct {
	Seq  int64
	What string
}

// recentEnds is how many ended waits the page shows.
const recentEnds = 20

func (w *web) outbound(rw http.ResponseWriter, r *http.Request, p *pageData) error {
	p.Title = "outbound"
	v := outboundView{OutboundList: w.s.outboundList(), Done: r.URL.Query().Get("done")}
	p.Data = &v
	page, err := w.s.log.Page(r.Context(), undolog.PageQuery{Kinds: []string{verb.KindOutboundReleased, verb.KindOutboundCancelled}, Desc: true, Limit: recentEnds})
	if err != nil {
		return err
	}
	for _, rec := range page.Verbs {
		v.Ended = append(v.Ended, outboundEnd{Seq: rec.Seq, What: verb.Describe(rec).Line()})
	}
	return nil
}

// Outbound lists the outbound delay window.
func (c *Client) Outbound(ctx context.Context) (OutboundList, error) {
	var l OutboundList
	return l, c.get(ctx, "/api/outbound", &l)
}

// OutboundAct releases a held message (act "release": it leaves now)
// or cancels it ("cancel": it never leaves), and returns the window.
func (c *Client) OutboundAct(ctx context.Context, act, queueID, reason string) (OutboundList, error) {
	var l OutboundList
	req, err := http.NewRequestWithContext(ctx, http.MethodPost,
		c.base+"/api/outbound/"+url.PathEscape(queueID)+"/"+act+"?reason="+url.QueryEscape(reason), nil)
	if err != nil {
		return l, err
	}
	resp, err := c.do(req)
	if err != nil {
		return l, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return l, fmt.Errorf("%s: %s %s: %w", c.path, act, queueID, err)
	}
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			return l, errors.New(e.Error)
		}
		return l, fmt.Errorf("%s: %s %s: %s", c.path, act, queueID, resp.Status)
	}
	return l, json.Unmarshal(b, &l)
}
