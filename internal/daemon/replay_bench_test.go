package daemon_test

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-smtp"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/mailstack"
	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
)

var (
	benchUsers = flag.Int("replay.users", 100, "BenchmarkCycleReplay: users in the generated history")
	benchVerbs = flag.Int("replay.verbs", 20000, "BenchmarkCycleReplay: replayable verbs in the generated history (about)")
)

// BenchmarkCycleReplay generates a history of deliveries and IMAP changes
// for many users through undomail, then runs a cycle back over all of it
// (no repair: everything is replayed and verified) and reports the replay
// rate and the ratio of replay time to the wall-clock span the history
// took to make. Run:
//
//	go test ./internal/daemon -run '^$' -bench CycleReplay -benchtime 1x
//
// The history is made as fast as the proxies take it, so the span is far
// shorter than real users would take; the ratio is therefore an upper
// bound on replay time per unit of real history.
func BenchmarkCycleReplay(b *testing.B) {
	users := make([]mailstack.User, *benchUsers)
	for i := range users {
		users[i] = mailstack.User{Name: fmt.Sprintf("u%03d", i), Password: fmt.Sprintf("pw-%03d", i)}
	}
	snapDir := filepath.Join(b.TempDir(), "snaps")
	tb := testbedtest.StartWith(b, testbed.Options{Users: users, Tweak: func(c *config.Config) { c.Store = "copy:" + snapDir }})
	ctx := context.Background()
	snap, _, err := tb.Daemon.Snapshot(ctx, "before the history")
	if err != nil {
		b.Fatal(err)
	}
	perUser := *benchVerbs / len(users)
	deliveries := perUser * 2 / 5
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, len(users))
	sem := make(chan struct{}, 8)
	for _, u := range users {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			if err := userHistory(tb, u, deliveries, perUser-deliveries); err != nil {
				errs <- fmt.Errorf("%s: %w", u.Name, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	span := time.Since(start)
	verbs, err := tb.Daemon.Log.Verbs(ctx, undolog.Filter{AfterSeq: 0})
	if err != nil {
		b.Fatal(err)
	}
	replayable := 0
	for _, v := range verbs {
		if replay.Replayable[v.Kind] && replay.HadEffect(v) {
			replayable++
		}
	}
	b.ResetTimer()
	var v struct {
		replayS float64
		heldS   float64
		verifyS float64
		msgs    int
		n       int
	}
	for range b.N {
		verdict, err := tb.Daemon.Cycle(ctx, admin.CycleRequest{To: snap.Name, Reason: "benchmark"})
		if err != nil || !verdict.OK {
			b.Fatalf("cycle: %v (verdict: replayed %d, failed %d, problems %v)", err, verdict.Replayed, verdict.Failed, verdict.Verify.Problems)
		}
		v.replayS, v.heldS, v.verifyS, v.msgs, v.n = verdict.ReplayS, verdict.Held, verdict.VerifyS, verdict.Messages, verdict.Replayed
		// The next round replays from the same snapshot: the history
		// and this cycle's replay (which the next cycle skips).
	}
	b.StopTimer()
	b.ReportMetric(float64(v.n)/v.replayS, "verbs/s")
	b.ReportMetric(float64(v.msgs)/v.replayS, "msgs/s")
	b.ReportMetric(v.replayS/span.Seconds(), "replay/span")
	// Held is the whole cycle with changes held back: snapshot, rewind,
	// replay, verification and compensation.
	b.ReportMetric(v.heldS, "held_s")
	b.ReportMetric(v.verifyS, "verify_s")
	b.Logf("history: %d users, %d replayable verbs (%d deliveries) made in %.1fs; replay of %d verbs (%d messages) took %.1fs: %.0f verbs/s, %.0f messages/s, %.2f × the history's span",
		len(users), replayable, deliveries*len(users), span.Seconds(), v.n, v.msgs, v.replayS,
		float64(v.n)/v.replayS, float64(v.msgs)/v.replayS, v.replayS/span.Seconds())
}

// userHistory makes one user's history through undomail: deliveries over
// the LMTP capture, then IMAP changes through the front end: a folder,
// flags, copies, moves and expunges.
func userHistory(tb *testbed.Testbed, u mailstack.User, deliveries, imapVerbs int) error {
	rcpt := u.Name + "@example.test"
	conn, err := net.Dial("tcp", tb.Daemon.LMTPAddr.String())
	if err != nil {
		return err
	}
	lc := smtp.NewClientLMTP(conn)
	defer lc.Close()
	if err := lc.Hello("bench"); err != nil {
		return err
	}
	for i := range deliveries {
		msg := fmt.Sprintf("From: s%d@client.test\r\nSubject: message %d\r\nMessage-Id: <%s.%d@bench.test>\r\n\r\n%s\r\n",
			i, i, u.Name, i, strings.Repeat("line of text\r\n", 20))
		if err := lc.SendMail(fmt.Sprintf("s%d@client.test", i), []string{rcpt}, strings.NewReader(msg)); err != nil {
			return fmt.Errorf("delivery %d: %w", i, err)
		}
	}
	lc.Quit()
	c, err := imapclient.DialInsecure(tb.IMAPAddr(), nil)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Login(u.Name, u.Password).Wait(); err != nil {
		return err
	}
	if err := c.Create("Archive", nil).Wait(); err != nil {
		return err
	}
	sel, err := c.Select("INBOX", nil).Wait()
	if err != nil {
		return err
	}
	rng := rand.New(rand.NewPCG(uint64(len(u.Name)), uint64(u.Name[len(u.Name)-1])))
	uids := make([]imap.UID, 0, sel.NumMessages)
	for i := range sel.NumMessages {
		uids = append(uids, imap.UID(i+1))
	}
	flags := []imap.Flag{imap.FlagSeen, imap.FlagFlagged, imap.FlagAnswered, "$Label1"}
	for i := 1; i < imapVerbs && len(uids) > 2; i++ {
		pick := uids[rng.IntN(len(uids))]
		switch r := rng.IntN(10); {
		case r < 6:
			err = c.Store(imap.UIDSetNum(pick), &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{flags[rng.IntN(len(flags))]}}, nil).Close()
		case r < 7:
			_, err = c.Copy(imap.UIDSetNum(pick), "Archive").Wait()
		case r < 9:
			_, err = c.Move(imap.UIDSetNum(pick), "Archive").Wait()
			uids = remove(uids, pick)
		default:
			if err = c.Store(imap.UIDSetNum(pick), &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagDeleted}}, nil).Close(); err == nil {
				err = c.UIDExpunge(imap.UIDSetNum(pick)).Close()
				i++ // a STORE and an EXPUNGE
			}
			uids = remove(uids, pick)
		}
		if err != nil {
			return fmt.Errorf("IMAP verb %d: %w", i, err)
		}
	}
	return c.Logout().Wait()
}

func remove(s []imap.UID, u imap.UID) []imap.UID {
	for i, x := range s {
		if x == u {
			return append(s[:i], s[i+1:]...)
		}
	}
	return s
}
