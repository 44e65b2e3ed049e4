package admin_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/chromedp/chromedp"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
)

// TestBrowserTimelineAfterCycle runs a cycle on a real stack after a
// spam wave (it cancels alice's DELETE, filters the wave out and replays
// the rest) and reads the timeline page in headless Chromium as an
// operator would: every record is in words (no raw JSON anywhere on the
// page), the cycle is one row with its verdict and its rewind folded in,
// the replay records are not rows of their own, and each verb the cycle
// replayed says on its own row what the replay did.
func TestBrowserTimelineAfterCycle(t *testing.T) {
	tb := testbedtest.Start(t, store(filepath.Join(t.TempDir(), "snaps")))
	a := newAPI(t, tb)
	snap, del := deletedFolder(t, tb, a)
	// A spam wave after the snapshot, which the cycle filters out.
	const wave = 8
	for i := range wave {
		id := fmt.Sprintf("wave%d@client.test", i)
		send(t, tb, id, fmt.Sprintf("Offer %d", i))
		waitFor(t, tb, "INBOX", id)
	}
	var rep struct {
		Error string `json:"error"`
	}
	a.call("POST", "/api/cycles?wait=1", admin.CycleRequest{To: snap, Cancel: []int64{del}, Reason: "alice deleted Projects by mistake",
		Filters: []admin.FilterRequest{{Rule: "header:Subject=~^Offer", Action: "drop"}}}, &rep)
	if rep.Error != "" {
		t.Fatalf("cycle: %s", rep.Error)
	}
	v := lastVerdict(a)
	if !v.OK || v.Replayed != 1 || v.Filtered != wave || v.Cancelled != 1 {
		t.Fatalf("verdict %+v, want verified with the later delivery replayed, the wave filtered, the DELETE cancelled", v)
	}
	var cs struct{ Cycles []admin.Cycle }
	a.call("GET", "/api/cycles", nil, &cs)
	cycle := cs.Cycles[len(cs.Cycles)-1]
	// The deliveries the cycle made again, from the API.
	var p admin.VerbPage
	a.call("GET", fmt.Sprintf("/api/verbs?kind=lmtp.deliver&after=%d&before=%d", cycle.SnapshotSeq, cycle.Seq), nil, &p)
	if len(p.Verbs) != 1+wave {
		t.Fatalf("deliveries between the snapshot and the cycle: %d, want %d (later and the wave)", len(p.Verbs), 1+wave)
	}
	// The API keeps the JSON and adds the words.
	for _, vb := range p.Verbs {
		if len(vb.Args) == 0 || vb.Description == "" || strings.Contains(vb.Description, "{") {
			t.Fatalf("API verb %d: args %s, description %q: want both, the description in words", vb.Seq, vb.Args, vb.Description)
		}
	}

	ctx := browser(t)
	if err := chromedp.Do(ctx,
		chromedp.Navigate(a.url+"/"),
		chromedp.WaitVisible(chromedp.CSS("#token")),
		chromedp.SendKeys(chromedp.CSS("#token"), a.token),
		clickAndLoad("#login"),
		chromedp.WaitVisible(chromedp.CSS("#q")),
	); err != nil {
		t.Fatalf("log in: %v", err)
	}
	shot := screenshot(t, ctx, "timeline-after-cycle.png")
	table := text(t, ctx, "table")
	t.Logf("timeline table after the cycle:\n%s", table)
	if os.Getenv("UNDOMAIL_TIMELINE_TEXT") != "" {
		os.WriteFile(os.Getenv("UNDOMAIL_TIMELINE_TEXT"), []byte(table), 0o644)
		os.WriteFile(os.Getenv("UNDOMAIL_TIMELINE_TEXT")+".png", must(os.ReadFile(shot)), 0o644)
	}
	body, err := chromedp.Run(ctx, chromedp.Evaluate[string](`document.body.innerText`))
	if err != nil {
		t.Fatal(err)
	}
	if i := strings.Index(body, `{"`); i >= 0 {
		t.Errorf("raw JSON on the timeline page: %q", body[max(i-80, 0):min(i+120, len(body))])
	}
	if n := count(t, ctx, "tr.cycle-row"); n != len(cs.Cycles) {
		t.Errorf("the timeline has %d cycle rows, want one per cycle (%d)", n, len(cs.Cycles))
	}
	sel := fmt.Sprintf(`tr.cycle-row[data-seq="%d"]`, cycle.Seq)
	if count(t, ctx, sel) != 1 {
		t.Fatalf("no row for cycle %d", cycle.Seq)
	}
	row := text(t, ctx, sel)
	for _, want := range []string{"verified", "rewound", snap, "1 replayed, 1 cancelled, 8 filtered", `filter "header:Subject=~^Offer": drop`} {
		if !strings.Contains(row, want) {
			t.Errorf("the cycle's row lacks %q: %q", want, row)
		}
	}
	for _, kind := range []string{"replay", "rewind"} {
		if n := count(t, ctx, fmt.Sprintf(`a.verb-link[data-kind=%q]`, kind)); n != 0 {
			t.Errorf("%d %s records have rows of their own, want them folded under their cycle", n, kind)
		}
	}
	fate := func(seq int64) string {
		t.Helper()
		sel := fmt.Sprintf(`tr[data-seq="%d"] .replayed`, seq)
		if count(t, ctx, sel) != 1 {
			t.Errorf("verb %d's row does not say what the replay did with it", seq)
			return ""
		}
		return text(t, ctx, sel)
	}
	for _, vb := range p.Verbs {
		want := fmt.Sprintf("replayed by cycle #%d: made again", cycle.Seq)
		if strings.Contains(vb.Summary, "Offer") {
			want = fmt.Sprintf("cycle #%d: removed by a filter", cycle.Seq)
		}
		if got := fate(vb.Seq); !strings.Contains(got, want) {
			t.Errorf("delivery %d (%s) says %q, want %q", vb.Seq, vb.Summary, got, want)
		}
	}
	if got := fate(del); !strings.Contains(got, fmt.Sprintf("cycle #%d: cancelled", cycle.Seq)) {
		t.Errorf("the cancelled DELETE's row says %q, want it cancelled by cycle #%d", got, cycle.Seq)
	}
	// The cycle's own page tells it in words too; the record as logged is
	// there, folded away, for whoever wants the JSON.
	if err := chromedp.Do(ctx, chromedp.Navigate(fmt.Sprintf("%s/verb/%d", a.url, cycle.Seq)), chromedp.WaitVisible(chromedp.CSS("#summary"))); err != nil {
		t.Fatal(err)
	}
	page, err := chromedp.Run(ctx, chromedp.Evaluate[string](`document.body.innerText`))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(page, `{"`) || !strings.Contains(page, "verified") || count(t, ctx, "details#record pre") == 0 {
		t.Errorf("the cycle's page, want it in words with the record folded away:\n%s", page)
	}
	// The other pages an operator reads after a cycle are in words too.
	for _, path := range []string{"/cycles", "/snapshots", "/drills", "/compensations", "/plan?to=" + snap, "/?user=alice&kind=replay"} {
		if err := chromedp.Do(ctx, chromedp.Navigate(a.url+path), chromedp.WaitVisible(chromedp.CSS("main"))); err != nil {
			t.Fatalf("open %s: %v", path, err)
		}
		body, err := chromedp.Run(ctx, chromedp.Evaluate[string](`document.body.innerText`))
		if err != nil {
			t.Fatal(err)
		}
		if i := strings.Index(body, `{"`); i >= 0 {
			t.Errorf("raw JSON on %s: %q", path, body[max(i-80, 0):min(i+120, len(body))])
		}
	}
	// The abandoned branch: the same verbs, each with what became of it.
	if err := chromedp.Do(ctx, chromedp.Navigate(fmt.Sprintf("%s/?branch=%d", a.url, cycle.Seq)), chromedp.WaitVisible(chromedp.CSS("#q"))); err != nil {
		t.Fatal(err)
	}
	screenshot(t, ctx, "branch-after-cycle.png")
	branch, err := chromedp.Run(ctx, chromedp.Evaluate[string](`document.body.innerText`))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(branch, `{"`) {
		t.Errorf("raw JSON on the branch page:\n%s", branch)
	}
	if n := count(t, ctx, ".replayed"); n != 2+wave {
		t.Errorf("the branch shows %d verbs with their fate, want the DELETE and the %d deliveries", n, 1+wave)
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
