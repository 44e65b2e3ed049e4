package admin_test

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"
	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
)

var docsScreenshot = flag.Bool("docs-screenshot", false, "copy the timeline screenshot to docs/timeline.png")

// chromium is Debian's package; the browser test fails without it.
const chromium = "/usr/bin/chromium"

// binary builds the undomail command once, for the CLI side of the
// comparison; only the tests that run it pay for the build.
var binary = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "undomail-bin-")
	if err != nil {
		return "", err
	}
	path := filepath.Join(dir, "undomail")
	if out, err := exec.Command("go", "build", "-o", path, "../cmd/undomail").CombinedOutput(); err != nil {
		return "", fmt.Errorf("build undomail: %v\n%s", err, out)
	}
	return path, nil
})

// built is the binary's directory once built, removed by TestMain.
var built string

func undomail(t *testing.T) string {
	t.Helper()
	path, err := binary()
	if err != nil {
		t.Fatal(err)
	}
	built = filepath.Dir(path)
	return path
}

func TestMain(m *testing.M) {
	flag.Parse()
	code := m.Run()
	if built != "" {
		os.RemoveAll(built)
	}
	os.Exit(code)
}

// api talks to a testbed's admin server over TCP with its token.
type api struct {
	t     *testing.T
	url   string
	token string
}

func newAPI(t *testing.T, tb *testbed.Testbed) *api {
	t.Helper()
	tok, err := admin.ReadToken(tb.Config.DataDir)
	if err != nil {
		t.Fatal(err)
	}
	return &api{t: t, url: "http://" + tb.Daemon.AdminAddr().String(), token: tok}
}

func (a *api) call(method, path string, body any, out any) {
	a.t.Helper()
	var r io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		r = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, a.url+path, r)
	req.Header.Set("Authorization", "Bearer "+a.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		a.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		a.t.Fatalf("%s %s: %s %s", method, path, resp.Status, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			a.t.Fatalf("%s %s: %v in %s", method, path, err, b)
		}
	}
}

func send(t *testing.T, tb *testbed.Testbed, id, subject string) {
	t.Helper()
	c, err := smtp.Dial(tb.SMTPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msg := "From: Sam <s@example.test>\r\nSubject: " + subject + "\r\nMessage-Id: <" + id + ">\r\n\r\nbody\r\n"
	if err := c.SendMail("s@example.test", []string{"alice@example.test"}, strings.NewReader(msg)); err != nil {
		t.Fatal(err)
	}
}

// aliceMail lists alice's mailboxes and the sorted Message-Ids in each,
// read from Dovecot directly.
func aliceMail(t *testing.T, tb *testbed.Testbed) map[string][]string {
	t.Helper()
	return testbedtest.Mail(t, tb, "alice")
}

func waitFor(t *testing.T, tb *testbed.Testbed, mailbox, id string) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; {
		if slices.Contains(aliceMail(t, tb)[mailbox], id) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not in alice's %s", id, mailbox)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// deletedFolder sets up the accident: alice files two messages into
// Projects, a snapshot is taken through the admin API, alice deletes
// Projects by mistake and mail keeps arriving. It returns the snapshot
// and the DELETE's sequence number, found through the API.
func deletedFolder(t *testing.T, tb *testbed.Testbed, a *api) (snap string, del int64) {
	t.Helper()
	send(t, tb, "p1@client.test", "Budget 2027")
	send(t, tb, "p2@client.test", "Roadmap")
	waitFor(t, tb, "INBOX", "p1@client.test")
	waitFor(t, tb, "INBOX", "p2@client.test")
	c := testbedtest.IMAP(t, tb.IMAPAddr(), "alice", tb.Stack.Password("alice"))
	defer c.Close()
	if err := c.Create("Projects", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	var all imap.SeqSet
	all.AddRange(1, 0)
	if _, err := c.Move(all, "Projects").Wait(); err != nil {
		t.Fatal(err)
	}
	var rep admin.SnapshotReply
	a.call("POST", "/api/snapshots?reason=hourly", nil, &rep)
	if err := c.Delete("Projects").Wait(); err != nil {
		t.Fatal(err)
	}
	c.Logout().Wait()
	send(t, tb, "later@client.test", "Later")
	waitFor(t, tb, "INBOX", "later@client.test")
	if _, ok := aliceMail(t, tb)["Projects"]; ok {
		t.Fatal("the DELETE did not happen")
	}
	var p admin.VerbPage
	a.call("GET", "/api/verbs?user=alice&kind=imap.delete", nil, &p)
	if len(p.Verbs) != 1 || !strings.Contains(p.Verbs[0].Summary, "Projects") {
		t.Fatalf("alice's deletes: %+v", p.Verbs)
	}
	return rep.Name, p.Verbs[0].Seq
}

// verdictCounts is the part of a cycle's verdict that must be the same
// whichever way the cycle was started (wall times differ).
type verdictCounts struct {
	OK                                    bool
	Replayed, Cancelled, Filtered, Failed int
	Error                                 string
}

// lastVerdict is the newest cycle's verdict, from the admin API.
func lastVerdict(a *api) verdictCounts {
	var cs struct{ Cycles []admin.Cycle }
	a.call("GET", "/api/cycles", nil, &cs)
	if len(cs.Cycles) == 0 || cs.Cycles[len(cs.Cycles)-1].Verdict == nil {
		a.t.Fatalf("no cycle verdict in the log: %+v", cs.Cycles)
	}
	v := *cs.Cycles[len(cs.Cycles)-1].Verdict
	return verdictCounts{OK: v.OK, Replayed: v.Replayed, Cancelled: v.Cancelled, Filtered: v.Filtered, Failed: v.Failed, Error: v.Error}
}

func store(snapDir string) func(*config.Config) {
	return func(c *config.Config) { c.Store = "copy:" + snapDir }
}

// TestCycleThroughAPIMatchesCLI runs the same accident twice, on two
// fresh stacks: once the cycle is started through the admin API, once
// with `undomail cycle run`. Verdicts and the mail afterwards must agree,
// and the folder must be back.
func TestCycleThroughAPIMatchesCLI(t *testing.T) {
	type result struct {
		verdict verdictCounts
		mail    map[string][]string
	}
	var results []result
	for _, via := range []string{"api", "cli"} {
		tb := testbedtest.Start(t, store(filepath.Join(t.TempDir(), "snaps")))
		a := newAPI(t, tb)
		snap, del := deletedFolder(t, tb, a)
		switch via {
		case "api":
			var rep struct {
				Outcome json.RawMessage `json:"outcome"`
				Error   string          `json:"error"`
			}
			a.call("POST", "/api/cycles?wait=1", admin.CycleRequest{To: snap, Cancel: []int64{del}}, &rep)
			if rep.Error != "" {
				t.Fatalf("cycle through the API: %s", rep.Error)
			}
		case "cli":
			out, err := exec.Command(undomail(t), "cycle", "run", "--data-dir", tb.Config.DataDir, "--to", snap,
				"--cancel", fmt.Sprint(del), "--yes").CombinedOutput()
			if err != nil {
				t.Fatalf("undomail cycle run: %v\n%s", err, out)
			}
		}
		results = append(results, result{lastVerdict(a), aliceMail(t, tb)})
		checkStatus(t, tb, a)
		// The CLI's progress bar reads the daemon's progress from the
		// control socket; after the cycle it says the cycle is done.
		c, err := admin.Dial(tb.Config.DataDir)
		if err != nil {
			t.Fatal(err)
		}
		prog, err := c.CycleProgress(context.Background())
		if err != nil || prog == nil || prog.Phase != "done" {
			t.Fatalf("GET /cycles/progress after the cycle: %+v %v, want phase done", prog, err)
		}
		tb.Stop()
	}
	fromAPI, fromCLI := results[0], results[1]
	if !fromAPI.verdict.OK || fromAPI.verdict.Cancelled != 1 {
		t.Fatalf("verdict through the API: %+v, want verified with 1 cancelled", fromAPI.verdict)
	}
	if fromAPI.verdict != fromCLI.verdict {
		t.Fatalf("verdicts differ:\nAPI %+v\nCLI %+v", fromAPI.verdict, fromCLI.verdict)
	}
	if fmt.Sprint(fromAPI.mail) != fmt.Sprint(fromCLI.mail) {
		t.Fatalf("mail after the cycle differs:\nAPI %v\nCLI %v", fromAPI.mail, fromCLI.mail)
	}
	want := []string{"p1@client.test", "p2@client.test"}
	if !slices.Equal(fromAPI.mail["Projects"], want) || !slices.Contains(fromAPI.mail["INBOX"], "later@client.test") {
		t.Fatalf("after the cycle alice has %v, want Projects %v back and the later mail kept", fromAPI.mail, want)
	}
}

// checkStatus runs `undomail status` through the control socket and
// through the admin server with the token file: both see the daemon, its
// upstreams, the snapshots and the verified cycle.
func checkStatus(t *testing.T, tb *testbed.Testbed, a *api) {
	t.Helper()
	for _, args := range [][]string{
		{"status", "--json", "--data-dir", tb.Config.DataDir},
		{"status", "--json", "--admin", a.url, "--token-file", filepath.Join(tb.Config.DataDir, admin.TokenName)},
	} {
		out, err := exec.Command(undomail(t), args...).Output()
		if err != nil {
			t.Fatalf("undomail %v: %v\n%s", args, err, out)
		}
		var st struct {
			Running bool
			admin.Status
		}
		if err := json.Unmarshal(out, &st); err != nil {
			t.Fatalf("undomail %v: %v\n%s", args, err, out)
		}
		if !st.Running || st.Gate != "open" || len(st.Upstreams) != 3 || st.Snapshots != 2 ||
			st.LastCycle == nil || st.LastCycle.Verdict == nil || !st.LastCycle.Verdict.OK {
			t.Fatalf("undomail %v:\n%s", args, out)
		}
		for _, u := range st.Upstreams {
			if !u.OK {
				t.Fatalf("undomail %v: upstream %s down:\n%s", args, u.Name, out)
			}
		}
	}
	// undomail snapshots through the admin server: the hourly snapshot
	// and the present the cycle kept.
	out, err := exec.Command(undomail(t), "snapshots", "--json", "--admin", a.url, "--token-file", filepath.Join(tb.Config.DataDir, admin.TokenName)).Output()
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if err != nil || len(lines) != 2 || !strings.Contains(lines[0], `"reason":"hourly"`) {
		t.Fatalf("undomail snapshots --admin: %v\n%s", err, out)
	}
	// A wrong token is refused, with exit status 2 (an error, not a verdict).
	bad := filepath.Join(t.TempDir(), "token")
	os.WriteFile(bad, []byte("0123456789abcdef0123456789abcdef\n"), 0o600)
	err = exec.Command(undomail(t), "status", "--admin", a.url, "--token-file", bad).Run()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 {
		t.Fatalf("undomail status with a wrong token: %v, want exit status 2", err)
	}
}

// browser starts headless Chromium for a test.
func browser(t *testing.T) context.Context {
	t.Helper()
	if _, err := os.Stat(chromium); err != nil {
		t.Fatalf("browser tests need Debian's chromium package (apt-get install chromium): %v", err)
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium), chromedp.NoSandbox, chromedp.Headless, chromedp.DisableGPU,
		chromedp.WindowSize(1280, 900))
	actx, cancel := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(cancel)
	ctx, cancel2 := chromedp.NewContext(actx)
	t.Cleanup(cancel2)
	ctx, cancel3 := context.WithTimeout(ctx, 3*time.Minute)
	t.Cleanup(cancel3)
	return ctx
}

func screenshot(t *testing.T, ctx context.Context, name string) string {
	t.Helper()
	if html, err := chromedp.Run(ctx, chromedp.OuterHTML(chromedp.CSS("html"))); err == nil {
		os.WriteFile(filepath.Join(t.ArtifactDir(), strings.TrimSuffix(name, ".png")+".html"), []byte(html), 0o644)
	}
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot %s: %v", name, err)
	}
	path := filepath.Join(t.ArtifactDir(), name)
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot %s", path)
	return path
}

// clickAndLoad clicks an element that leads to another page and waits
// until that page has loaded: a query right after a plain click could
// still see the old page (the timeline before and after a search has the
// same links), and a screenshot taken mid-navigation can hang.
func clickAndLoad(sel string) chromedp.Action[chromedp.Void] {
	return func(ctx context.Context, t *chromedp.Target) (chromedp.Void, error) {
		_, err := chromedp.WaitEvent(page.LoadEventFired, nil, chromedp.Click(chromedp.CSS(sel)))(ctx, t)
		return chromedp.Void{}, err
	}
}

// text reads an element's text, failing the test if it is not there.
func text(t *testing.T, ctx context.Context, sel string) string {
	t.Helper()
	s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(sel)))
	if err != nil {
		t.Fatalf("read %s: %v", sel, err)
	}
	return s
}

func count(t *testing.T, ctx context.Context, sel string) int {
	t.Helper()
	n, err := chromedp.Run(ctx, chromedp.Evaluate[int](fmt.Sprintf("document.querySelectorAll(%q).length", sel)))
	if err != nil {
		t.Fatalf("count %s: %v", sel, err)
	}
	return n
}

// TestBrowserUndoesADeletedFolder: an operator logs in to the web admin,
// finds alice's deleted folder on the timeline, previews a cycle that
// cancels the DELETE, runs it after confirming, watches it complete, and
// the folder is back in Dovecot with its messages.
func TestBrowserUndoesADeletedFolder(t *testing.T) {
	tb := testbedtest.Start(t, store(filepath.Join(t.TempDir(), "snaps")))
	a := newAPI(t, tb)
	_, del := deletedFolder(t, tb, a)
	ctx := browser(t)
	base := a.url
	css := func(s string) chromedp.CSS { return chromedp.CSS(s) }

	// Log in: a wrong token is refused, the right one lands on the timeline.
	if err := chromedp.Do(ctx,
		chromedp.Navigate(base+"/"),
		chromedp.WaitVisible(css("#token")),
		chromedp.SendKeys(css("#token"), "not-the-token-at-all"),
		clickAndLoad("#login"),
		chromedp.WaitVisible(css("#error")),
	); err != nil {
		t.Fatalf("log in with a wrong token: %v", err)
	}
	if e := text(t, ctx, "#error"); !strings.Contains(e, "wrong admin token") {
		t.Fatalf("a wrong token showed %q", e)
	}
	if err := chromedp.Do(ctx,
		chromedp.SendKeys(css("#token"), a.token),
		clickAndLoad("#login"),
		chromedp.WaitVisible(css("#q")),
	); err != nil {
		t.Fatalf("log in: %v", err)
	}
	// Find the deleted folder: alice's verbs mentioning Projects.
	sel := fmt.Sprintf(`a.verb-link[data-seq="%d"]`, del)
	if err := chromedp.Do(ctx,
		chromedp.SendKeys(css("#user"), "alice"),
		chromedp.SendKeys(css("#q"), "Projects"),
		clickAndLoad("#search"),
		chromedp.WaitVisible(css(sel)),
	); err != nil {
		t.Fatalf("search the timeline: %v", err)
	}
	if n := count(t, ctx, "a.verb-link"); n < 3 {
		t.Fatalf("alice's verbs on Projects: %d rows, want the create, the move into it and the delete", n)
	}
	if n := count(t, ctx, "circle.dot.destroy"); n != 1 {
		t.Fatalf("the time axis marks %d destructive verbs, want the DELETE", n)
	}
	screenshot(t, ctx, "timeline-search.png")
	// The DELETE's record, then the plan that cancels it.
	if err := chromedp.Do(ctx, clickAndLoad(sel), chromedp.WaitVisible(css("#preview"))); err != nil {
		t.Fatalf("open verb %d: %v", del, err)
	}
	if s := text(t, ctx, "#summary"); !strings.Contains(s, "DELETE") || !strings.Contains(s, "Projects") {
		t.Fatalf("verb %d shows %q, want alice's DELETE of Projects", del, s)
	}
	if err := chromedp.Do(ctx, clickAndLoad("#preview"), chromedp.WaitVisible(css("#run"))); err != nil {
		t.Fatalf("preview the cycle: %v", err)
	}
	comesBack, goes := text(t, ctx, "#comes-back"), text(t, ctx, "#goes")
	if !strings.Contains(comesBack, `"Projects" comes back`) || !strings.Contains(goes, "nothing") {
		t.Fatalf("plan: comes back %q, goes %q", comesBack, goes)
	}
	screenshot(t, ctx, "plan.png")
	// Without ticking the confirmation the form is not sent.
	if err := chromedp.Do(ctx, chromedp.Click(css("#run"))); err != nil {
		t.Fatal(err)
	}
	if loc, _ := chromedp.Run(ctx, chromedp.Location()); !strings.Contains(loc, "/plan") {
		t.Fatalf("the cycle form was sent without the confirmation: at %s", loc)
	}
	if err := chromedp.Do(ctx, chromedp.Click(css("#confirm")), clickAndLoad("#run")); err != nil {
		t.Fatalf("run the cycle: %v", err)
	}
	// Watch it: the page refreshes itself until the verdict is there.
	var verdict string
	for deadline := time.Now().Add(2 * time.Minute); verdict == ""; {
		if n, err := chromedp.Run(ctx, chromedp.Evaluate[int](`document.querySelectorAll("#verdict").length`)); err == nil && n == 1 {
			verdict, _ = chromedp.Run(ctx, chromedp.Text(css("#verdict")))
		}
		if time.Now().After(deadline) {
			body, _ := chromedp.Run(ctx, chromedp.Text(css("body")))
			t.Fatalf("no verdict on the page after 2 minutes:\n%s", body)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !strings.HasPrefix(verdict, "verified") || !strings.Contains(verdict, "1 cancelled") {
		t.Fatalf("verdict on the page: %q", verdict)
	}
	screenshot(t, ctx, "cycle-done.png")
	// The folder is back, checked in Dovecot itself; later mail is kept.
	mail := aliceMail(t, tb)
	if got := mail["Projects"]; !slices.Equal(got, []string{"p1@client.test", "p2@client.test"}) || !slices.Contains(mail["INBOX"], "later@client.test") {
		t.Fatalf("after the cycle alice has %v, want Projects with p1 and p2, and the later mail in INBOX", mail)
	}
	// The timeline now shows the cycle and its abandoned branch.
	if err := chromedp.Do(ctx, chromedp.Navigate(base+"/"), chromedp.WaitVisible(css("#q"))); err != nil {
		t.Fatal(err)
	}
	if n := count(t, ctx, "rect.branch"); n != 1 {
		t.Fatalf("the timeline shows %d abandoned branches, want the cycle's one", n)
	}
	shot := screenshot(t, ctx, "timeline.png")
	if *docsScreenshot {
		b, _ := os.ReadFile(shot)
		if err := os.WriteFile("../docs/timeline.png", b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// A delivery's page shows the message's headers; search finds it by
	// subject.
	var p admin.VerbPage
	a.call("GET", "/api/verbs?kind=lmtp.deliver&q=budget", nil, &p)
	if len(p.Verbs) != 1 {
		t.Fatalf("deliveries with subject Budget: %+v", p.Verbs)
	}
	if err := chromedp.Do(ctx, chromedp.Navigate(fmt.Sprintf("%s/verb/%d", base, p.Verbs[0].Seq)), chromedp.WaitVisible(css("#headers"))); err != nil {
		t.Fatal(err)
	}
	if h := text(t, ctx, "#headers"); !strings.Contains(h, "Budget 2027") || !strings.Contains(h, "Sam <s@example.test>") || !strings.Contains(h, "<p1@client.test>") {
		t.Fatalf("the delivery's headers: %q", h)
	}
	screenshot(t, ctx, "delivery.png")
	// On a phone the page fits the screen; the axis scrolls on its own.
	if err := chromedp.Do(ctx,
		chromedp.EmulateViewport(390, 844, chromedp.EmulateMobile),
		chromedp.Navigate(base+"/?user=alice"),
		chromedp.WaitVisible(css("#q")),
	); err != nil {
		t.Fatal(err)
	}
	screenshot(t, ctx, "timeline-phone.png")
	overflow, err := chromedp.Run(ctx, chromedp.Evaluate[bool](`document.documentElement.scrollWidth > window.innerWidth`))
	if err != nil || overflow {
		t.Fatalf("on a 390px wide phone the timeline page is wider than the screen (%v)", err)
	}
}
