package admin

import (
	"bytes"
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// The web admin is rendered on the server from html/template; its one
// stylesheet is embedded in the binary. No script and no CDN: it works
// offline, on a phone, and under a strict Content-Security-Policy.
//
//go:embed templates/*.html static/*
var webFS embed.FS

type web struct {
	s     *Server
	pages map[string]*template.Template
}

// spans are the zoom levels of the timeline, widest first.
var spans = []struct {
	Name string
	D    time.Duration
}{
	{"4w", 28 * 24 * time.Hour}, {"1w", 7 * 24 * time.Hour}, {"1d", 24 * time.Hour}, {"6h", 6 * time.Hour},
	{"1h", time.Hour}, {"10m", 10 * time.Minute}, {"1m", time.Minute}, {"10s", 10 * time.Second},
}

func newWeb(s *Server) (*web, error) {
	funcs := template.FuncMap{
		"time": func(t time.Time) string { return t.Local().Format("2006-01-02 15:04:05.000") },
		"json": func(raw json.RawMessage) string {
			var b bytes.Buffer
			if json.Indent(&b, raw, "", "  ") != nil {
				return string(raw)
			}
			// Go's encoder escapes <, > and & for HTML; the template
			// escapes the output itself, so show the characters.
			return strings.NewReplacer(`\u003c`, "<", `\u003e`, ">", `\u0026`, "&").Replace(b.String())
		},
		"verbclass": verbClass,
		"words":     verb.Words,
		"short": func(s string) string {
			if r := []rune(s); len(r) > 160 {
				return string(r[:160]) + "…"
			}
			return s
		},
		"seqs": func(s []int64) string {
			parts := make([]string, len(s))
			for i, n := range s {
				parts[i] = strconv.FormatInt(n, 10)
			}
			return strings.Join(parts, ",")
		},
	}
	w := &web{s: s, pages: map[string]*template.Template{}}
	names, err := fs.Glob(webFS, "templates/*.html")
	if err != nil {
		return nil, err
	}
	for _, n := range names {
		if n == "templates/layout.html" {
			continue
		}
		t, err := template.New("layout.html").Funcs(funcs).ParseFS(webFS, "templates/layout.html", n)
		if err != nil {
			return nil, fmt.Errorf("admin templates: %w", err)
		}
		w.pages[strings.TrimSuffix(strings.TrimPrefix(n, "templates/"), ".html")] = t
	}
	return w, nil
}

func (w *web) routes(m *http.ServeMux) {
	static, _ := fs.Sub(webFS, "static")
	m.Handle("GET /static/", http.StripPrefix("/static/", http.FileServerFS(static)))
	m.HandleFunc("GET /login", w.loginPage)
	m.HandleFunc("POST /login", w.login)
	m.Handle("POST /logout", w.page(func(rw http.ResponseWriter, r *http.Request, p *pageData) error {
		w.s.auth.logout(rw, r)
		http.Redirect(rw, r, "/login", http.StatusSeeOther)
		return nil
	}))
	m.Handle("GET /{$}", w.page(w.timeline))
	m.Handle("GET /verb/{seq}", w.page(w.verb))
	m.Handle("GET /plan", w.page(w.plan))
	m.Handle("POST /cycles/run", w.page(w.runCycle))
	m.Handle("GET /cycles/current", w.page(w.current))
	m.Handle("GET /cycles", w.page(w.cycles))
	m.Handle("GET /snapshots", w.page(w.snapshots))
	m.Handle("POST /snapshots/take", longRunning(w.page(w.takeSnapshot)))
	m.Handle("GET /drills", w.page(w.drills))
	m.Handle("POST /drills/run", longRunning(w.page(w.runDrill)))
	m.Handle("GET /compensations", w.page(w.compensations))
}

// errNotFound marks a page error that is answered 404 Not Found.
var errNotFound = errors.New("not found")

// pageData is what every page template gets; Data is the page's own.
type pageData struct {
	Title   string
	CSRF    string
	Refresh int // seconds; 0: none
	Error   string
	Data    any
}

// page wraps a web handler: it needs a session (else to /login), checks
// CSRF on POSTs, and renders the template named by the handler's title.
func (w *web) page(h func(http.ResponseWriter, *http.Request, *pageData) error) http.Handler {
	return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		sess := w.s.auth.session(r)
		if sess == nil {
			http.Redirect(rw, r, "/login?next="+url.QueryEscape(r.URL.RequestURI()), http.StatusSeeOther)
			return
		}
		if !safeMethod(r.Method) && !csrfOK(r, sess) {
			http.Error(rw, "CSRF check failed: reload the page and try again", http.StatusForbidden)
			return
		}
		p := &pageData{CSRF: sess.csrf}
		status := http.StatusOK
		if err := h(rw, r, p); err != nil {
			p.Error, status = err.Error(), http.StatusBadRequest
			if errors.Is(err, errNotFound) {
				status = http.StatusNotFound
			}
			if p.Title == "" {
				p.Title = "error"
			}
		}
		if p.Title != "" { // else the handler answered (a redirect)
			w.render(rw, p, status)
		}
	})
}

func (w *web) render(rw http.ResponseWriter, p *pageData, status int) {
	t := w.pages[p.Title]
	if t == nil {
		t = w.pages["error"]
	}
	var b bytes.Buffer
	if err := t.Execute(&b, p); err != nil {
		w.s.logger.Error("render admin page", "page", p.Title, "err", err)
		http.Error(rw, "render page: "+err.Error(), http.StatusInternalServerError)
		return
	}
	rw.Header().Set("Content-Type", "text/html; charset=utf-8")
	rw.Header().Set("Cache-Control", "no-store")
	rw.Header().Set("Content-Security-Policy", "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'")
	rw.Header().Set("X-Frame-Options", "DENY")
	rw.WriteHeader(status)
	rw.Write(b.Bytes())
}

func (w *web) loginPage(rw http.ResponseWriter, r *http.Request) {
	w.render(rw, &pageData{Title: "login", Data: r.URL.Query().Get("next")}, http.StatusOK)
}

// localPath returns next if it is a path on this server, else "/". A
// login form's next= must never send the browser elsewhere: browsers read
// "//host", "/\host" and "/<TAB>/host" (tabs and newlines are dropped) as
// another site (WHATWG URL standard: backslash is a path separator in
// special URLs), so only a single "/" followed by no backslash or control
// character passes.
func localPath(next string) string {
	if len(next) == 0 || next[0] != '/' || (len(next) > 1 && next[1] == '/') {
		return "/"
	}
	for i := 0; i < len(next); i++ {
		if c := next[i]; c == '\\' || c < 0x20 || c == 0x7f {
			return "/"
		}
	}
	u, err := url.Parse(next)
	if err != nil || u.Scheme != "" || u.Host != "" || u.Opaque != "" || u.User != nil {
		return "/"
	}
	return next
}

// login checks the admin token typed into the form and starts a session.
func (w *web) login(rw http.ResponseWriter, r *http.Request) {
	next := localPath(r.PostFormValue("next"))
	if !sameOrigin(r) {
		http.Error(rw, "cross-origin login refused", http.StatusForbidden)
		return
	}
	if !w.s.auth.validToken(strings.TrimSpace(r.PostFormValue("token"))) {
		w.render(rw, &pageData{Title: "login", Error: "wrong admin token", Data: next}, http.StatusUnauthorized)
		return
	}
	w.s.auth.login(rw)
	http.Redirect(rw, r, next, http.StatusSeeOther)
}

// timelineView is the timeline page's data.
type timelineView struct {
	User, Q, Kind, Span string
	Start, End          time.Time
	Spans               []string
	Earlier, Later, Now string // links
	Fit                 string
	Zoom                map[string]string
	Lanes               []lane
	Marks               []mark
	Branches            []branchBand
	Ticks               []tick
	Height              int
	Rows                []row  // the table: cycles' own records folded in (fold.go)
	More                string // link to older verbs of the window
	Snapshots           []Snapshot
	Branch              *Cycle
}

type lane struct {
	Name string
	Y    int
	Dots []dot
}

type dot struct {
	X, Y    float64
	Paradox bool // a cycle changed its result after someone saw it
	Seq     int64
	Class   string
	Title   string
}

type mark struct { // a snapshot or a cycle on the axis
	X, Y  float64 // Y: of the label, staggered so neighbours do not overlap
	Label string
	Title string
	Href  string
	Class string
}

type branchBand struct {
	X1, W float64
	Label string
	Href  string
	OK    bool
}

type tick struct {
	X     float64
	Label string
}

const (
	axisLeft  = 140.0 // lane labels
	axisWidth = 840.0
	laneH     = 30
	laneTop   = 60
)

// verbClass colours a verb by what it does: deliveries, changes,
// destructive changes, reads, the system's own records, compensations.
func verbClass(v Verb) string {
	switch {
	case v.Kind == verb.KindCompensation:
		return "comp"
	case v.Kind == verb.KindIMAPDelete || v.Kind == verb.KindIMAPExpunge:
		return "destroy"
	case v.Kind == verb.KindSMTPSubmit || v.Kind == verb.KindLMTPDeliver:
		return "deliver"
	case v.Kind == verb.KindIMAPFetch:
		return "read"
	case strings.HasPrefix(v.Kind, "imap."):
		return "change"
	}
	return "system"
}

// laneOf is the person a verb belongs to on the timeline.
func laneOf(v Verb) string {
	if v.User != "" {
		return v.User
	}
	if len(v.Users) > 0 {
		return v.Users[0]
	}
	return "undomail"
}

// parseSpan reads a zoom level: a name from spans or a Go duration;
// "" is 0 (fit the axis to the verbs).
func parseSpan(s string) (time.Duration, error) {
	if s == "" {
		return 0, nil
	}
	for _, sp := range spans {
		if sp.Name == s {
			return sp.D, nil
		}
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("span=%q is not a zoom level (%s, or a duration like 90s)", s, "4w, 1w, 1d, 6h, 1h, 10m, 1m, 10s")
	}
	return d, nil
}

// spanName is the zoom level's name, or its duration.
func spanName(d time.Duration) string {
	for _, sp := range spans {
		if sp.D == d {
			return sp.Name
		}
	}
	return d.Round(time.Millisecond).String()
}

func (w *web) timeline(rw http.ResponseWriter, r *http.Request, p *pageData) error {
	p.Title = "timeline"
	qv := r.URL.Query()
	v := &timelineView{User: qv.Get("user"), Q: qv.Get("q"), Kind: qv.Get("kind"), Span: qv.Get("span"), Zoom: map[string]string{}}
	p.Data = v
	for _, s := range spans {
		v.Spans = append(v.Spans, s.Name)
	}
	span, err := parseSpan(v.Span)
	if err != nil {
		return err
	}
	fit := span == 0 // no zoom chosen: fit the axis to the verbs shown
	v.End = time.Now().UTC()
	if e := qv.Get("end"); e != "" {
		t, err := time.Parse(time.RFC3339Nano, e)
		if err != nil {
			return fmt.Errorf("end=%q is not an RFC 3339 time", e)
		}
		v.End, fit = t, false
		if span == 0 {
			span = 24 * time.Hour
		}
	}
	ctx := r.Context()
	q := undolog.PageQuery{User: v.User, Text: v.Q, Desc: true, Limit: 300}
	if q.Users, err = w.s.log.Addresses(ctx, v.User); err != nil {
		return err
	}
	if v.Kind != "" {
		q.Kinds = strings.Split(v.Kind, ",")
	}
	if b := qv.Get("before"); b != "" {
		q.BeforeSeq, _ = strconv.ParseInt(b, 10, 64)
	}
	snaps, err := Snapshots(ctx, w.s.log)
	if err != nil {
		return err
	}
	v.Snapshots = snaps
	snapTime := map[string]time.Time{}
	for _, s := range snaps {
		snapTime[s.Name] = s.Time
	}
	if b := qv.Get("branch"); b != "" {
		seq, _ := strconv.ParseInt(b, 10, 64)
		c, err := w.s.cycle(ctx, seq)
		if err != nil {
			return err
		}
		v.Branch = &c
		q.AfterSeq, q.BeforeSeq = max(c.AtSeq, c.SnapshotSeq), c.Seq
	}
	if !fit {
		v.Start = v.End.Add(-span)
		q.Since, q.Until = v.Start, v.End
	}
	cycles, err := Cycles(ctx, w.s.log, snaps)
	if err != nil {
		return err
	}
	verbs, next, err := w.s.timelinePage(ctx, q, cycles)
	if err != nil {
		return err
	}
	if v.Rows, err = w.s.fold(ctx, verbs, cycles); err != nil {
		return err
	}
	if fit {
		// The newest page of verbs, with a margin on both sides.
		v.Span, span = "", 24*time.Hour
		if n := len(v.Rows); n > 0 {
			newest, oldest := v.Rows[0].Time, v.Rows[n-1].Time
			span = max(newest.Sub(oldest)*12/10, 2*time.Second)
			v.End = newest.Add(span / 12)
		}
		v.Start = v.End.Add(-span)
	}
	link := func(end time.Time, span time.Duration) string {
		u := url.Values{}
		for _, k := range []string{"user", "q", "kind", "branch"} {
			if qv.Get(k) != "" {
				u.Set(k, qv.Get(k))
			}
		}
		u.Set("span", spanName(span))
		u.Set("end", end.UTC().Format(time.RFC3339Nano))
		return "/?" + u.Encode()
	}
	v.Earlier, v.Later = link(v.End.Add(-span/2), span), link(v.End.Add(span/2), span)
	v.Now = link(time.Now().UTC(), span)
	fitURL := url.Values{}
	for _, k := range []string{"user", "q", "kind", "branch"} {
		if qv.Get(k) != "" {
			fitURL.Set(k, qv.Get(k))
		}
	}
	v.Fit = "/?" + fitURL.Encode()
	mid := v.End.Add(-span / 2)
	for _, s := range spans {
		v.Zoom[s.Name] = link(mid.Add(s.D/2), s.D)
	}
	if next != 0 {
		u, _ := url.Parse(link(v.End, span))
		vals := u.Query()
		vals.Set("before", strconv.FormatInt(next, 10))
		v.More = "/?" + vals.Encode()
	}
	x := func(t time.Time) float64 {
		f := float64(t.Sub(v.Start)) / float64(span)
		return axisLeft + axisWidth*min(max(f, 0), 1)
	}
	paradoxes, err := w.paradoxes(ctx)
	if err != nil {
		return err
	}
	lanes := map[string]*lane{}
	var order []string
	for _, r := range v.Rows {
		vb := r.Verb
		name := laneOf(vb)
		l := lanes[name]
		if l == nil {
			l = &lane{Name: name}
			lanes[name] = l
			order = append(order, name)
		}
		d := dot{X: x(vb.Time), Seq: vb.Seq, Class: verbClass(vb),
			Title: fmt.Sprintf("#%d %s %s", vb.Seq, vb.Time.Local().Format("15:04:05.000"), vb.Description)}
		if why, ok := paradoxes[vb.Seq]; ok {
			d.Paradox, d.Title = true, d.Title+" — paradox: "+why
		}
		l.Dots = append(l.Dots, d)
	}
	// A login's addresses share its lane: mail delivered to
	// alice@example.org is alice's.
	for _, name := range order {
		local, _, ok := strings.Cut(name, "@")
		if to := lanes[local]; ok && to != nil {
			to.Dots = append(to.Dots, lanes[name].Dots...)
			delete(lanes, name)
		}
	}
	order = slices.DeleteFunc(order, func(n string) bool { return lanes[n] == nil })
	slices.Sort(order)
	for i, name := range order {
		l := lanes[name]
		l.Y = laneTop + i*laneH
		for j := range l.Dots {
			l.Dots[j].Y = float64(l.Y)
		}
		v.Lanes = append(v.Lanes, *l)
	}
	v.Height = laneTop + max(len(order), 1)*laneH + 40
	for _, s := range snaps {
		if s.Time.Before(v.Start) || s.Time.After(v.End) || s.Pruned {
			continue
		}
		v.Marks = append(v.Marks, mark{X: x(s.Time), Label: "snapshot " + s.Time.Local().Format("15:04:05"), Title: s.Name + ": plan a cycle back to it",
			Href: "/plan?to=" + url.QueryEscape(s.Name), Class: "snap"})
	}
	for _, c := range cycles {
		from, ok := snapTime[c.To]
		if !ok || c.Time.Before(v.Start) || from.After(v.End) {
			continue
		}
		b := branchBand{X1: x(from), W: max(x(c.Time)-x(from), 2), Href: fmt.Sprintf("/?branch=%d&span=%s", c.Seq, v.Span),
			Label: fmt.Sprintf("cycle #%d rewound to %s", c.Seq, c.To), OK: c.Verdict != nil && c.Verdict.OK}
		v.Branches = append(v.Branches, b)
		v.Marks = append(v.Marks, mark{X: x(c.Time), Label: fmt.Sprintf("cycle #%d", c.Seq), Title: b.Label, Href: b.Href, Class: "cycle"})
	}
	slices.SortFunc(v.Marks, func(a, b mark) int { return int(a.X - b.X) })
	for i := range v.Marks {
		v.Marks[i].Y = float64(v.Height - 4 - (i%3)*11)
	}
	for i := 0; i <= 4; i++ {
		t := v.Start.Add(span * time.Duration(i) / 4)
		format := "01-02 15:04"
		switch {
		case span <= 20*time.Second:
			format = "15:04:05.000"
		case span <= 10*time.Minute:
			format = "15:04:05"
		}
		v.Ticks = append(v.Ticks, tick{X: x(t), Label: t.Local().Format(format)})
	}
	return nil
}

// paradoxes maps the verbs whose result a cycle changed after someone
// saw it to the paradox's kind, from the newest compensations (the kind
// index: a bounded read however long the log).
func (w *web) paradoxes(ctx context.Context) (map[int64]string, error) {
	p, err := w.s.log.Page(ctx, undolog.PageQuery{Kinds: []string{verb.KindCompensation}, Desc: true, Limit: 500})
	if err != nil {
		return nil, err
	}
	out := map[int64]string{}
	for _, v := range p.Verbs {
		for _, pd := range NewVerb(v).Paradoxes {
			out[pd.Verb] = pd.Kind
		}
	}
	return out, nil
}

// verbView is the verb page's data.
type verbView struct {
	Verb     Verb
	Blob     string // the message's header section, when logged
	Snapshot *Snapshot
	Undoable bool // a change a cycle replays, so it can cancel it
}

func (w *web) verb(rw http.ResponseWriter, r *http.Request, p *pageData) error {
	p.Title = "verb"
	seq, ok := parseSeq(r.PathValue("seq"))
	if !ok {
		return fmt.Errorf("%w: no verb %q in the undo log (sequence numbers start at 1)", errNotFound, r.PathValue("seq"))
	}
	lv, ok, err := w.s.log.Verb(r.Context(), seq)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%w: no verb %d in the undo log", errNotFound, seq)
	}
	vv := &verbView{Verb: NewVerb(lv), Undoable: replay.Replayable[lv.Kind]}
	p.Data = vv
	if lv.Blob != "" {
		if b, err := w.s.log.ReadBlob(lv.Blob); err == nil {
			if i := bytes.Index(b, []byte("\r\n\r\n")); i >= 0 {
				b = b[:i]
			} else if i := bytes.Index(b, []byte("\n\n")); i >= 0 {
				b = b[:i]
			}
			vv.Blob = string(b)
		}
	}
	snaps, err := Snapshots(r.Context(), w.s.log)
	if err != nil {
		return err
	}
	for i := len(snaps) - 1; i >= 0; i-- {
		if snaps[i].AtSeq < seq && !snaps[i].Pruned {
			vv.Snapshot = &snaps[i]
			break
		}
	}
	return nil
}

// planView is the plan page's data.
type planView struct {
	Plan      *Plan
	Cancel    string
	Snapshots []Snapshot
}

func (w *web) plan(rw http.ResponseWriter, r *http.Request, p *pageData) error {
	p.Title = "plan"
	qv := r.URL.Query()
	cancel, err := ParseSeqs(strings.Join(qv["cancel"], ","))
	if err != nil {
		return err
	}
	pv := &planView{}
	p.Data = pv
	if pv.Snapshots, err = Snapshots(r.Context(), w.s.log); err != nil {
		return err
	}
	parts := make([]string, len(cancel))
	for i, c := range cancel {
		parts[i] = strconv.FormatInt(c, 10)
	}
	pv.Cancel = strings.Join(parts, ",")
	if qv.Get("to") == "" {
		return nil // the form alone: choose a snapshot
	}
	pv.Plan, err = w.s.b.PlanCycle(r.Context(), qv.Get("to"), cancel)
	return err
}

// runCycle starts the cycle of a previewed plan, after the explicit
// confirmation checkbox.
func (w *web) runCycle(rw http.ResponseWriter, r *http.Request, p *pageData) error {
	cancel, err := ParseSeqs(r.PostFormValue("cancel"))
	if err != nil {
		return err
	}
	to := r.PostFormValue("to")
	if r.PostFormValue("confirm") != "yes" {
		http.Redirect(rw, r, "/plan?to="+url.QueryEscape(to)+"&cancel="+url.QueryEscape(r.PostFormValue("cancel"))+"&unconfirmed=1", http.StatusSeeOther)
		return nil
	}
	if _, err := w.s.b.PlanCycle(r.Context(), to, cancel); err != nil {
		return err
	}
	if _, err := w.s.startCycle(CycleRequest{To: to, Cancel: cancel}); err != nil {
		return err
	}
	http.Redirect(rw, r, "/cycles/current", http.StatusSeeOther)
	return nil
}

// currentView is the running (or last) admin cycle.
type currentView struct {
	State    RunState
	Verdict  *CycleVerdict
	Progress string // phase and counts
	Percent  int
}

func (w *web) current(rw http.ResponseWriter, r *http.Request, p *pageData) error {
	p.Title = "current"
	cv := &currentView{State: w.s.runState()}
	p.Data = cv
	if cv.State.Running {
		p.Refresh = 1
		if pr := cv.State.Progress; pr != nil {
			cv.Progress = pr.Phase
			if pr.Total > 0 {
				cv.Progress = fmt.Sprintf("%s: %d of %d verbs, %d failed", pr.Phase, pr.Done, pr.Total, pr.Failed)
				cv.Percent = 100 * pr.Done / pr.Total
			}
		}
	}
	cv.Verdict = cv.State.Verdict
	return nil
}

func (w *web) cycles(rw http.ResponseWriter, r *http.Request, p *pageData) error {
	p.Title = "cycles"
	snaps, err := Snapshots(r.Context(), w.s.log)
	if err != nil {
		return err
	}
	cs, err := Cycles(r.Context(), w.s.log, snaps)
	slices.Reverse(cs)
	p.Data = cs
	return err
}

func (w *web) snapshots(rw http.ResponseWriter, r *http.Request, p *pageData) error {
	p.Title = "snapshots"
	snaps, err := Snapshots(r.Context(), w.s.log)
	slices.Reverse(snaps)
	p.Data = snaps
	return err
}

// drillsView is the drills page's data.
type drillsView struct {
	Drills    []Drill
	Snapshots []Snapshot
}

// takeSnapshot takes a snapshot now and shows the list.
func (w *web) takeSnapshot(rw http.ResponseWriter, r *http.Request, p *pageData) error {
	reason := strings.TrimSpace(r.PostFormValue("reason"))
	if reason == "" {
		reason = "on demand (web admin)"
	}
	if _, _, err := w.s.b.Snapshot(r.Context(), reason); err != nil {
		if lerr := w.snapshots(rw, r, p); lerr != nil {
			return lerr
		}
		return fmt.Errorf("snapshot: %w", err)
	}
	http.Redirect(rw, r, "/snapshots", http.StatusSeeOther)
	return nil
}

func (w *web) drills(rw http.ResponseWriter, r *http.Request, p *pageData) error {
	p.Title = "drills"
	ds, err := Drills(r.Context(), w.s.log)
	if err != nil {
		return err
	}
	slices.Reverse(ds)
	snaps, err := Snapshots(r.Context(), w.s.log)
	p.Data = drillsView{Drills: ds, Snapshots: snaps}
	return err
}

// runDrill runs a drill and shows the drills page with its verdict first.
func (w *web) runDrill(rw http.ResponseWriter, r *http.Request, p *pageData) error {
	if _, err := w.s.runDrill(r.Context(), r.PostFormValue("from"), r.PostFormValue("to")); err != nil {
		if derr := w.drills(rw, r, p); derr != nil {
			return derr
		}
		return fmt.Errorf("drill: %w", err)
	}
	http.Redirect(rw, r, "/drills", http.StatusSeeOther)
	return nil
}

func (w *web) compensations(rw http.ResponseWriter, r *http.Request, p *pageData) error {
	p.Title = "compensations"
	page, err := w.s.verbs(r.Context(), undolog.PageQuery{Kinds: []string{verb.KindCompensation}, Desc: true, Limit: 500})
	p.Data = page.Verbs
	return err
}
