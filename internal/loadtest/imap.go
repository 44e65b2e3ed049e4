package loadtest

import (
	"context"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/internal/testbed"
)

// IMAPOptions describe the IMAP load: Clients concurrent sessions, each
// doing Cycles of a mail client's typical work.
type IMAPOptions struct {
	Clients int
	Cycles  int // per client per run
	Rounds  int // direct/proxy pairs
	// Stay keeps each client logged in for all its cycles of a run, as
	// a mail client (and imaptest) does: it logs in and out once per run
	// instead of once per cycle. The LOGIN, a Dovecot process per
	// session, then no longer makes up most of the load.
	Stay bool
}

// IMAPRun is one timed run.
type IMAPRun struct {
	Target   string
	Commands int
	Elapsed  time.Duration
	Rate     float64 // commands per second
	P50, P99 time.Duration
	// Steps are the latencies per step of the cycle (imapSteps).
	Steps [][]time.Duration
	// CPU and Own are the machine's busy CPU time and undomail's share,
	// per command (see Run).
	CPU, Own time.Duration
}

// IMAPResult is a whole IMAP measurement.
type IMAPResult struct {
	Options        IMAPOptions
	Runs           []IMAPRun
	Direct, Proxy  float64 // median commands/s
	Ratio          float64 // median of per-round ratios
	AddP50, AddP99 time.Duration
	// StepP50 are the median latencies per step of the cycle over all
	// rounds, [step][0] direct and [step][1] through undomail: which
	// commands the front end slows, and which dominate the cycle.
	StepP50 [][2]time.Duration
}

// MeasureIMAP runs the mixed workload against Dovecot directly and through
// undomail's IMAP front end, alternating.
func MeasureIMAP(ctx context.Context, tb *testbed.Testbed, o IMAPOptions, w io.Writer) (IMAPResult, error) {
	if o.Rounds <= 0 {
		o.Rounds = 1
	}
	res := IMAPResult{Options: o}
	if err := seedMailboxes(ctx, tb, 5); err != nil {
		return res, err
	}
	warm := o
	warm.Cycles = 1
	for _, addr := range []string{tb.Stack.IMAPAddr, tb.IMAPAddr()} {
		if _, err := imapRun(ctx, tb, warm, "warm-up", addr); err != nil {
			return res, err
		}
	}
	var dr, pr, ratios []float64
	for round := 0; round < o.Rounds; round++ {
		d, err := imapRun(ctx, tb, o, "direct", tb.Stack.IMAPAddr)
		if err != nil {
			return res, err
		}
		p, err := imapRun(ctx, tb, o, "undomail", tb.IMAPAddr())
		if err != nil {
			return res, err
		}
		res.Runs = append(res.Runs, d, p)
		dr, pr, ratios = append(dr, d.Rate), append(pr, p.Rate), append(ratios, p.Rate/d.Rate)
		fmt.Fprintf(w, "round %d: direct %.0f cmd/s (p50 %v, p99 %v), undomail %.0f cmd/s (p50 %v, p99 %v), ratio %.3f; "+
			"CPU per command: direct %v (undomail %v), undomail %v (undomail %v)\n",
			round+1, d.Rate, d.P50, d.P99, p.Rate, p.P50, p.P99, p.Rate/d.Rate,
			d.CPU.Round(time.Microsecond), d.Own.Round(time.Microsecond), p.CPU.Round(time.Microsecond), p.Own.Round(time.Microsecond))
	}
	res.Direct, res.Proxy, res.Ratio = median(dr), median(pr), median(ratios)
	// Added latency leaves connect + LOGIN out: a login is a tenth of
	// the commands and takes a hundred times longer, so it alone would
	// make the p99 of either side, more so with Stay.
	var rest [2][]time.Duration
	res.StepP50 = make([][2]time.Duration, len(imapSteps))
	for i := range imapSteps {
		var all [2][]time.Duration
		for j, r := range res.Runs {
			if i < len(r.Steps) {
				all[j%2] = append(all[j%2], r.Steps[i]...)
			}
		}
		res.StepP50[i] = [2]time.Duration{medianDur(all[0]), medianDur(all[1])}
		if i > 0 {
			rest[0], rest[1] = append(rest[0], all[0]...), append(rest[1], all[1]...)
		}
	}
	res.AddP50 = quantile(rest[1], 50) - quantile(rest[0], 50)
	res.AddP99 = quantile(rest[1], 99) - quantile(rest[0], 99)
	return res, nil
}

// seedMailboxes gives every user n messages, sent through the front door,
// so the workload has something to list, read and flag.
func seedMailboxes(ctx context.Context, tb *testbed.Testbed, n int) error {
	for _, u := range tb.Stack.Users {
		for i := 0; i < n; i++ {
			c, err := smtp.Dial(tb.SMTPAddr())
			if err != nil {
				return err
			}
			msg := fmt.Sprintf("From: seed@example.test\r\nSubject: seed %d\r\n\r\nSomething to read.\r\n", i)
			err = c.SendMail("seed@example.test", []string{tb.Stack.Address(u.Name)}, strings.NewReader(msg))
			c.Close()
			if err != nil {
				return fmt.Errorf("seed %s: %w", u.Name, err)
			}
		}
	}
	deadline := time.Now().Add(time.Minute)
	for _, u := range tb.Stack.Users {
		for countMail(tb, u.Name) < n {
			if time.Now().After(deadline) || ctx.Err() != nil {
				return fmt.Errorf("seed messages did not reach %s's mailbox", u.Name)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return nil
}

// imapRun runs every client's cycles once against addr.
func imapRun(ctx context.Context, tb *testbed.Testbed, o IMAPOptions, target, addr string) (IMAPRun, error) {
	var mu sync.Mutex
	var lat []time.Duration
	steps := make([][]time.Duration, len(imapSteps))
	var firstErr error
	var wg sync.WaitGroup
	cpu0 := readCPU()
	start := time.Now()
	for c := 0; c < o.Clients; c++ {
		user := tb.Stack.Users[c%len(tb.Stack.Users)]
		wg.Add(1)
		go func() {
			defer wg.Done()
			l, err := imapCycles(addr, user.Name, user.Password, o.Cycles, o.Stay)
			mu.Lock()
			defer mu.Unlock()
			for _, x := range l {
				lat = append(lat, x.d)
				steps[x.step] = append(steps[x.step], x.d)
			}
			if err != nil && firstErr == nil {
				firstErr = fmt.Errorf("%s run, user %s: %w", target, user.Name, err)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	cpu1 := readCPU()
	if firstErr != nil {
		return IMAPRun{}, firstErr
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	r := IMAPRun{Target: target, Commands: len(lat), Elapsed: elapsed, Rate: float64(len(lat)) / elapsed.Seconds(),
		P50: lat[len(lat)/2], P99: lat[len(lat)*99/100], Steps: steps}
	if cpu0.ok && cpu1.ok {
		r.CPU = (cpu1.machine - cpu0.machine) / time.Duration(len(lat))
		r.Own = (cpu1.own - cpu0.own) / time.Duration(len(lat))
	}
	return r, nil
}

const imapLoadMessage = "From: load@example.test\r\nSubject: imap load\r\n\r\n" + "A line of an ordinary message body.\r\n"

// imapSteps name the commands of a cycle, in order (imapCycles).
var imapSteps = []string{
	"connect + LOGIN", "SELECT INBOX", "FETCH 1:* (UID FLAGS ENVELOPE)", "FETCH n BODY.PEEK[]", "STORE n +FLAGS.SILENT (\\Seen)",
	"APPEND", "UID STORE u +FLAGS.SILENT (\\Deleted)", "UID EXPUNGE u", "LOGOUT",
}

// timing is one command's latency and its step of the cycle.
type timing struct {
	step int
	d    time.Duration
}

// imapCycles is one client: login, select, fetch the list, read a
// message, flag it, append one, delete and expunge it, logout; timed per
// command. With stay it logs in before the first cycle and out after the
// last only.
func imapCycles(addr, user, pass string, cycles int, stay bool) ([]timing, error) {
	var lat []timing
	timed := func(step int, f func() error) error {
		t0 := time.Now()
		err := f()
		lat = append(lat, timing{step, time.Since(t0)})
		return err
	}
	var c *imapclient.Client
	for i := 0; i < cycles; i++ {
		if c == nil { // with stay, logged in already after the first cycle
			if err := timed(0, func() (err error) {
				if c, err = imapclient.DialInsecure(addr, nil); err != nil {
					return err
				}
				return c.Login(user, pass).Wait()
			}); err != nil {
				return lat, err
			}
		}
		var sel *imap.SelectData
		err := timed(1, func() (err error) { sel, err = c.Select("INBOX", nil).Wait(); return err })
		if err == nil && sel.NumMessages > 0 {
			err = timed(2, func() error {
				var all imap.SeqSet
				all.AddRange(1, 0) // 1:*
				_, err := c.Fetch(all, &imap.FetchOptions{UID: true, Flags: true, Envelope: true}).Collect()
				return err
			})
		}
		if err == nil && sel.NumMessages > 0 {
			err = timed(3, func() error {
				_, err := c.Fetch(imap.SeqSetNum(sel.NumMessages), &imap.FetchOptions{BodySection: []*imap.FetchItemBodySection{{Peek: true}}}).Collect()
				return err
			})
		}
		if err == nil && sel.NumMessages > 0 {
			err = timed(4, func() error {
				return c.Store(imap.SeqSetNum(sel.NumMessages), &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagSeen}}, nil).Close()
			})
		}
		var appended imap.UID
		if err == nil {
			err = timed(5, func() error {
				ap := c.Append("INBOX", int64(len(imapLoadMessage)), nil)
				ap.Write([]byte(imapLoadMessage))
				ap.Close()
				d, err := ap.Wait()
				if d != nil {
					appended = d.UID
				}
				return err
			})
		}
		if err == nil && appended != 0 {
			err = timed(6, func() error {
				return c.Store(imap.UIDSetNum(appended), &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagDeleted}}, nil).Close()
			})
		}
		if err == nil && appended != 0 {
			err = timed(7, func() error { return c.UIDExpunge(imap.UIDSetNum(appended)).Close() })
		}
		if err == nil && (!stay || i == cycles-1) {
			err = timed(8, func() error { return c.Logout().Wait() })
		}
		if err != nil || !stay || i == cycles-1 {
			c.Close()
			c = nil
		}
		if err != nil && !strings.Contains(err.Error(), "closed") {
			return lat, err
		}
	}
	return lat, nil
}

// quantile is the q-th percentile of v (0 for none).
func quantile(v []time.Duration, q int) time.Duration {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[len(s)*q/100]
}

func medianDur(v []time.Duration) time.Duration { return quantile(v, 50) }

// Report prints the result for people.
func (r IMAPResult) Report(w io.Writer) {
	sessions := "a login per cycle"
	if r.Options.Stay {
		sessions = "one login per client and run"
	}
	fmt.Fprintf(w, "IMAP front end vs Dovecot: %d clients x %d cycles (login, select, fetch list, read, flag, append, delete+expunge, logout; %s), %d rounds\n",
		r.Options.Clients, r.Options.Cycles, sessions, r.Options.Rounds)
	fmt.Fprintf(w, "  direct    %8.1f commands/s (median)\n", r.Direct)
	fmt.Fprintf(w, "  undomail  %8.1f commands/s (median), every change durably logged\n", r.Proxy)
	fmt.Fprintf(w, "  ratio     %8.3f (undomail / direct, median of rounds)\n", r.Ratio)
	fmt.Fprintf(w, "  added latency per command but LOGIN: p50 %v, p99 %v\n", r.AddP50, r.AddP99)
	fmt.Fprintf(w, "  median latency per command of the cycle (direct, undomail):\n")
	for i, p := range r.StepP50 {
		fmt.Fprintf(w, "    %-40s %10v %10v\n", imapSteps[i], p[0].Round(time.Microsecond), p[1].Round(time.Microsecond))
	}
}
