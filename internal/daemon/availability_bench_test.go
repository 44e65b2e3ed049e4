package daemon_test

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

var availabilitySVG = flag.String("availability.svg", "", "BenchmarkAvailability: write the picture here (default: the test's temp dir, path logged)")

// BenchmarkAvailability is an availability benchmark in the style of the
// ROC project's: a steady SMTP and IMAP load runs throughout; at 5 s a
// misbehaving client mass-expunges a folder of 60 messages (the fault);
// at 10 s the operator runs a 3R cycle that cancels the expunge. Every
// second it records the operations that succeeded, the ones that failed
// (temporary failures while the cycle holds changes), and how many of the
// folder's messages exist; it draws the three over time as an SVG and
// reports how long service was degraded and when the mail was whole
// again. Run:
//
//	go test ./internal/daemon -run '^$' -bench Availability -benchtime 1x -availability.svg $PWD/docs/availability.svg
func BenchmarkAvailability(b *testing.B) {
	snapDir := filepath.Join(b.TempDir(), "snaps")
	tb := testbedtest.Start(b, func(c *config.Config) { c.Store = "copy:" + snapDir })
	ctx := context.Background()
	alice := tb.Stack.Password("alice")
	// The folder the fault hits.
	c, err := imapclient.DialInsecure(tb.IMAPAddr(), nil)
	if err != nil {
		b.Fatal(err)
	}
	c.Login("alice", alice).Wait()
	c.Create("Lists", nil).Wait()
	const folder = 60
	for i := range folder {
		msg := fmt.Sprintf("Subject: list %d\r\nMessage-Id: <list.%d@client.test>\r\n\r\nx\r\n", i, i)
		ap := c.Append("Lists", int64(len(msg)), nil)
		ap.Write([]byte(msg))
		ap.Close()
		if _, err := ap.Wait(); err != nil {
			b.Fatal(err)
		}
	}
	c.Logout().Wait()
	c.Close()
	snap, _, err := tb.Daemon.Snapshot(ctx, "before the benchmark")
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()

	const seconds = 30
	var ok, failed [seconds + 1]atomic.Int64
	var whole [seconds + 1]atomic.Int64
	start := time.Now()
	slot := func() int { return min(int(time.Since(start)/time.Second), seconds) }
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for g := range 2 {
		wg.Add(2)
		go func() { // SMTP senders through the front door
			defer wg.Done()
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				err := sendOne(tb, fmt.Sprintf("steady.%d.%d@client.test", g, n))
				if err == nil {
					ok[slot()].Add(1)
				} else {
					failed[slot()].Add(1)
					time.Sleep(50 * time.Millisecond)
				}
			}
		}()
		go func() { // IMAP clients: APPEND and flag their own messages
			defer wg.Done()
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				err := imapWork(tb, fmt.Sprintf("imap.%d.%d@client.test", g, n))
				if err == nil {
					ok[slot()].Add(1)
				} else {
					failed[slot()].Add(1)
					time.Sleep(50 * time.Millisecond)
				}
			}
		}()
	}
	wg.Add(1)
	go func() { // the integrity probe: how many of the folder's messages exist
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(250 * time.Millisecond):
			}
			if n := countMailbox(tb, "alice", "Lists"); n >= 0 {
				whole[slot()].Store(int64(n) + 1) // +1: 0 means not measured
			}
		}
	}()
	time.Sleep(5 * time.Second)
	faultAt := time.Since(start)
	if err := massExpunge(tb, "alice", alice, "Lists"); err != nil {
		b.Fatal(err)
	}
	time.Sleep(5 * time.Second)
	cycleAt := time.Since(start)
	expunges, _ := tb.Daemon.Log.Verbs(ctx, undolog.Filter{Kinds: []string{verb.KindIMAPExpunge, verb.KindIMAPStore}, User: "alice"})
	var cancel []int64
	for _, v := range expunges {
		var a verb.IMAPArgs
		if v.Outcome != nil && jsonArgs(v.Args, &a) && a.Mailbox == "Lists" {
			cancel = append(cancel, v.Seq)
		}
	}
	verdict, err := tb.Daemon.Cycle(ctx, admin.CycleRequest{To: snap.Name, Cancel: cancel, Reason: "a client expunged Lists"})
	cycleEnd := time.Since(start)
	if err != nil || !verdict.OK {
		b.Fatalf("cycle: %v (replayed %d, failed %d, problems %v)", err, verdict.Replayed, verdict.Failed, verdict.Verify.Problems)
	}
	time.Sleep(time.Until(start.Add(seconds * time.Second)))
	close(stop)
	wg.Wait()
	b.StopTimer()

	var okS, failS, wholeS []int64
	for i := range seconds {
		okS = append(okS, ok[i].Load())
		failS = append(failS, failed[i].Load())
		wholeS = append(wholeS, max(whole[i].Load()-1, -1))
	}
	degraded := 0
	for i := range seconds {
		if failS[i] > 0 {
			degraded++
		}
	}
	wholeAgain := -1
	for i := int(cycleAt / time.Second); i < seconds; i++ {
		if wholeS[i] == folder {
			wholeAgain = i
			break
		}
	}
	path := *availabilitySVG
	if path == "" {
		path = filepath.Join(b.TempDir(), "availability.svg")
	}
	svg := drawAvailability(okS, failS, wholeS, folder, faultAt, cycleAt, cycleEnd)
	if err := os.WriteFile(path, []byte(svg), 0o644); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(degraded), "degraded-s")
	b.ReportMetric(verdict.Held, "held-s")
	b.Logf("fault at %.1fs, cycle %.1fs-%.1fs (changes held %.2fs, %d verbs replayed); seconds with failed operations: %d; folder whole again at %ds; ops/s %v; failures/s %v; folder messages %v; picture: %s",
		faultAt.Seconds(), cycleAt.Seconds(), cycleEnd.Seconds(), verdict.Held, verdict.Replayed, degraded, wholeAgain, okS, failS, wholeS, path)
}

func jsonArgs(b []byte, v any) bool { return json.Unmarshal(b, v) == nil }

func sendOne(tb *testbed.Testbed, id string) error {
	c, err := smtp.Dial(tb.SMTPAddr())
	if err != nil {
		return err
	}
	defer c.Close()
	return c.SendMail("s@client.test", []string{"bob@example.test"}, strings.NewReader("Subject: steady\r\nMessage-Id: <"+id+">\r\n\r\nhi\r\n"))
}

func imapWork(tb *testbed.Testbed, id string) error {
	c, err := imapclient.DialInsecure(tb.IMAPAddr(), nil)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Login("carol", tb.Stack.Password("carol")).Wait(); err != nil {
		return err
	}
	msg := "Subject: draft\r\nMessage-Id: <" + id + ">\r\n\r\nx\r\n"
	ap := c.Append("INBOX", int64(len(msg)), nil)
	ap.Write([]byte(msg))
	ap.Close()
	data, err := ap.Wait()
	if err != nil {
		return err
	}
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		return err
	}
	return c.Store(imap.UIDSetNum(data.UID), &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagSeen}}, nil).Close()
}

func massExpunge(tb *testbed.Testbed, user, pass, mailbox string) error {
	c, err := imapclient.DialInsecure(tb.IMAPAddr(), nil)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Login(user, pass).Wait(); err != nil {
		return err
	}
	if _, err := c.Select(mailbox, nil).Wait(); err != nil {
		return err
	}
	var all imap.SeqSet
	all.AddRange(1, 0)
	if err := c.Store(all, &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagDeleted}}, nil).Close(); err != nil {
		return err
	}
	return c.Expunge().Close()
}

// countMailbox counts a mailbox's messages as a user sees them, through
// undomail; -1 if it cannot be read (logins wait while a cycle runs). It
// must not go to Dovecot directly: a session there keeps files open in
// the store, and a rollback waits until none are.
func countMailbox(tb *testbed.Testbed, user, mailbox string) int {
	c, err := imapclient.DialInsecure(tb.IMAPAddr(), nil)
	if err != nil {
		return -1
	}
	defer c.Close()
	if err := c.Login(user, tb.Stack.Password(user)).Wait(); err != nil {
		return -1
	}
	st, err := c.Status(mailbox, &imap.StatusOptions{NumMessages: true}).Wait()
	if err != nil || st.NumMessages == nil {
		return -1
	}
	return int(*st.NumMessages)
}

// drawAvailability draws operations/s, failures/s and the folder's size
// over time, with the fault and the cycle marked.
func drawAvailability(ok, failed, whole []int64, folder int, fault, cycle, cycleEnd time.Duration) string {
	const w, h, left, right, top, bottom = 860, 360, 60, 60, 30, 50
	pw, ph := float64(w-left-right), float64(h-top-bottom)
	n := len(ok)
	var ymax int64 = 1
	for i := range n {
		ymax = max(ymax, ok[i], failed[i])
	}
	x := func(s float64) float64 { return left + s/float64(n)*pw }
	y := func(v int64) float64 { return top + ph - float64(v)/float64(ymax)*ph }
	y2 := func(v int64) float64 { return top + ph - float64(v)/float64(folder)*ph }
	// line draws a series; a gap (a second with no measure) breaks it.
	line := func(vals []int64, f func(int64) float64, color, dash string) string {
		var out strings.Builder
		var pts []string
		draw := func() {
			if len(pts) > 0 {
				fmt.Fprintf(&out, `<polyline fill="none" stroke="%s" stroke-width="2" stroke-dasharray="%s" points="%s"/>`, color, dash, strings.Join(pts, " "))
			}
			pts = nil
		}
		for i, v := range vals {
			if v < 0 {
				draw()
				continue
			}
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", x(float64(i)+0.5), f(v)))
		}
		draw()
		return out.String()
	}
	var s strings.Builder
	fmt.Fprintf(&s, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`, w, h)
	fmt.Fprintf(&s, `<rect width="%d" height="%d" fill="white"/>`, w, h)
	fmt.Fprintf(&s, `<text x="%d" y="18" font-size="14">undomail availability: steady SMTP+IMAP load, a mass expunge, then a 3R cycle</text>`, left)
	fmt.Fprintf(&s, `<rect x="%.1f" y="%d" width="%.1f" height="%.1f" fill="#fde2e2"/>`, x(cycle.Seconds()), top, max(x(cycleEnd.Seconds())-x(cycle.Seconds()), 2), ph)
	fmt.Fprintf(&s, `<line x1="%.1f" x2="%.1f" y1="%d" y2="%.1f" stroke="#c00" stroke-dasharray="4 3"/>`, x(fault.Seconds()), x(fault.Seconds()), top, top+ph)
	fmt.Fprintf(&s, `<text x="%.1f" y="%d" fill="#c00">fault: mass expunge</text>`, x(fault.Seconds())+4, top+12)
	fmt.Fprintf(&s, `<text x="%.1f" y="%d" fill="#900">cycle</text>`, x(cycle.Seconds())+4, top+26)
	fmt.Fprintf(&s, `<line x1="%d" x2="%d" y1="%d" y2="%.1f" stroke="black"/><line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="black"/>`, left, left, top, top+ph, left, w-right, top+ph, top+ph)
	for i := 0; i <= n; i += 2 {
		fmt.Fprintf(&s, `<text x="%.1f" y="%.1f" text-anchor="middle">%d</text>`, x(float64(i)), top+ph+16, i)
	}
	fmt.Fprintf(&s, `<text x="%.1f" y="%d" text-anchor="middle">seconds</text>`, left+pw/2, h-8)
	fmt.Fprintf(&s, `<text x="8" y="%d">%d</text><text x="8" y="%.1f">0</text>`, top+4, ymax, top+ph)
	fmt.Fprintf(&s, `<text x="%d" y="%d">%d msgs</text>`, w-right+4, top+4, folder)
	s.WriteString(line(ok, y, "#1a7f37", ""))
	s.WriteString(line(failed, y, "#c00", ""))
	s.WriteString(line(whole, y2, "#0550ae", "6 3"))
	fmt.Fprintf(&s, `<text x="%d" y="%d" fill="#1a7f37">operations/s that succeeded</text>`, left+10, h-24)
	fmt.Fprintf(&s, `<text x="%d" y="%d" fill="#c00">failed (temporary)/s</text>`, left+230, h-24)
	fmt.Fprintf(&s, `<text x="%d" y="%d" fill="#0550ae">hit folder, messages (right axis)</text>`, left+420, h-24)
	s.WriteString(`</svg>`)
	return s.String()
}
