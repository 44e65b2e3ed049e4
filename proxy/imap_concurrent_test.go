package proxy_test

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"

	"github.com/undomail/undomail/admin"
	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

var concurrentSeed = flag.Int64("concurrent.seed", 0, "seed of TestIMAPConcurrentSessionsLogIsTheTruth (0: a few fixed seeds)")

// TestIMAPConcurrentSessionsLogIsTheTruth runs several sessions of one
// user on one mailbox at once through undomail (STORE +/-/= by UID and by
// sequence number, \Deleted and EXPUNGE, UID EXPUNGE), then replays the
// log in a reference model written for this test, from the mailbox as
// Dovecot listed it before, and compares the result with what Dovecot
// holds after: the same messages with the same flags. The log is the truth
// only if it names exactly the messages each command acted on, in the
// order the server ran them.
func TestIMAPConcurrentSessionsLogIsTheTruth(t *testing.T) {
	seeds := []int64{1, 2, 3}
	if *concurrentSeed != 0 {
		seeds = []int64{*concurrentSeed}
	}
	tb := testbedtest.Start(t, nil)
	deliver(t, tb, "alice", "concurrent", "conc.%d@client.test", 40)
	for _, seed := range seeds {
		for _, sessions := range []int{2, 5, 10} {
			t.Run(fmt.Sprintf("seed%d/sessions%d", seed, sessions), func(t *testing.T) {
				checkConcurrent(t, tb, seed, sessions)
			})
		}
	}
}

type modelMsg map[string]bool // flags

func serverState(t *testing.T, tb *testbed.Testbed) map[uint32]modelMsg {
	t.Helper()
	c := testbedtest.IMAP(t, tb.Stack.IMAPAddr, "alice", tb.Stack.Password("alice"))
	defer c.Close()
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	msgs, err := c.Fetch(imap.UIDSet{imap.UIDRange{Start: 1, Stop: 0}}, &imap.FetchOptions{UID: true, Flags: true}).Collect()
	if err != nil {
		t.Fatal(err)
	}
	out := map[uint32]modelMsg{}
	for _, m := range msgs {
		f := modelMsg{}
		for _, fl := range m.Flags {
			if fl != `\Recent` {
				f[strings.ToLower(string(fl))] = true
			}
		}
		out[uint32(m.UID)] = f
	}
	return out
}

func checkConcurrent(t *testing.T, tb *testbed.Testbed, seed int64, sessions int) {
	before := serverState(t, tb)
	if len(before) < 10 {
		// Earlier rounds expunged most of the mailbox: refill it.
		deliver(t, tb, "alice", "refill", fmt.Sprintf("refill.%d.%d.%%d@client.test", seed, sessions), 30)
		before = serverState(t, tb)
	}
	startSeq := lastSeq(t, tb)
	runSessions(t, tb, seed, sessions, before, false)

	model := map[uint32]modelMsg{}
	for u, f := range before {
		model[u] = modelMsg{}
		for k := range f {
			model[u][k] = true
		}
	}
	verbs, err := tb.Daemon.Log.Verbs(t.Context(), undologFilterFrom(startSeq))
	if err != nil {
		t.Fatal(err)
	}
	applied := 0
	for _, v := range verbs {
		if v.Outcome == nil || imapOutcome(t, v).Status != "OK" {
			continue
		}
		a := argsOf(t, v)
		uids := uidList(t, a.UIDs)
		switch v.Kind {
		case verb.KindIMAPStore:
			applied++
			for _, u := range uids {
				m, ok := model[u]
				if !ok {
					continue
				}
				if a.Op == "" {
					for k := range m {
						delete(m, k)
					}
				}
				for _, f := range a.Flags {
					f = strings.ToLower(f)
					if a.Op == "-" {
						delete(m, f)
					} else if f != `\recent` {
						m[f] = true
					}
				}
			}
		case verb.KindIMAPExpunge:
			applied++
			for _, u := range uids {
				delete(model, u)
			}
		}
	}
	after := serverState(t, tb)
	if applied == 0 {
		t.Fatal("no verb was logged")
	}
	var diffs []string
	for u, m := range model {
		s, ok := after[u]
		switch {
		case !ok:
			diffs = append(diffs, fmt.Sprintf("uid %d: the log keeps it (flags %v), the server expunged it", u, keys(m)))
		case !equalFlags(s, m):
			diffs = append(diffs, fmt.Sprintf("uid %d: the log gives flags %v, the server has %v", u, keys(m), keys(s)))
		}
	}
	for u := range after {
		if _, ok := model[u]; !ok {
			diffs = append(diffs, fmt.Sprintf("uid %d: on the server, expunged by the log", u))
		}
	}
	if len(diffs) > 0 {
		for _, v := range verbs {
			st := "-"
			if v.Outcome != nil {
				st = imapOutcome(t, v).Summary()
			}
			t.Logf("%d %s %s | %s", v.Seq, v.Session[:4], argsOf(t, v).Summary(), st)
		}
		sort.Strings(diffs)
		t.Fatalf("seed %d, %d sessions: the log disagrees with Dovecot on %d messages (rerun: -concurrent.seed %d):\n%s",
			seed, sessions, len(diffs), seed, strings.Join(diffs, "\n"))
	}
	t.Logf("seed %d, %d sessions: %d verbs; the log gives exactly Dovecot's %d messages and their flags", seed, sessions, applied, len(after))
}

// runSessions runs the random workload: sessions of alice at once on her
// INBOX through undomail, each 25 commands (STORE +/-/= by UID and by
// sequence number, silent or not, EXPUNGE, UID EXPUNGE), UIDs picked
// from before.
//
// With rich, sessions also COPY and MOVE to Archive (by UID and by sequence
// number), APPEND to INBOX, and CLOSE and select INBOX again.
func runSessions(t *testing.T, tb *testbed.Testbed, seed int64, sessions int, before map[uint32]modelMsg, rich bool) {
	t.Helper()
	flags := []imap.Flag{imap.FlagSeen, imap.FlagFlagged, imap.FlagDeleted, imap.FlagAnswered, "$Label1", "Work"}
	var wg sync.WaitGroup
	errs := make(chan error, sessions)
	for s := 0; s < sessions; s++ {
		rng := rand.New(rand.NewSource(seed*100 + int64(s)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := imapclient.DialInsecure(tb.IMAPAddr(), nil)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			if err := c.Login("alice", tb.Stack.Password("alice")).Wait(); err != nil {
				errs <- err
				return
			}
			if _, err := c.Select("INBOX", nil).Wait(); err != nil {
				errs <- err
				return
			}
			for i := 0; i < 25; i++ {
				pick := []imap.Flag{flags[rng.Intn(len(flags))]}
				if rng.Intn(3) == 0 {
					pick = append(pick, flags[rng.Intn(len(flags))])
				}
				op := []imap.StoreFlagsOp{imap.StoreFlagsAdd, imap.StoreFlagsDel, imap.StoreFlagsSet}[rng.Intn(3)]
				store := &imap.StoreFlags{Op: op, Flags: pick, Silent: rng.Intn(2) == 0}
				kinds := 10
				if rich {
					kinds = 16
				}
				switch k := rng.Intn(kinds); {
				case k == 10 || k == 11: // COPY or MOVE by UID
					var set imap.UIDSet
					set.AddNum(uidOf(before, rng))
					if k == 10 {
						_, err = c.Copy(set, "Archive").Wait()
					} else {
						_, err = c.Move(set, "Archive").Wait()
					}
				case k == 12: // MOVE by sequence number
					if mb := c.Mailbox(); mb != nil && mb.NumMessages > 0 {
						n := mb.NumMessages
						var set imap.SeqSet
						set.AddNum(1 + uint32(rng.Intn(int(n))))
						_, err = c.Move(set, "Archive").Wait()
					}
				case k == 13:
					msg := fmt.Sprintf("Subject: appended\r\nMessage-Id: <app.%d.%d.%d@client.test>\r\n\r\nhi\r\n", seed, rng.Int63(), i)
					cmd := c.Append("INBOX", int64(len(msg)), &imap.AppendOptions{Flags: pick})
					cmd.Write([]byte(msg))
					cmd.Close()
					_, err = cmd.Wait()
				case k == 14:
					if err = c.Unselect().Wait(); err == nil {
						_, err = c.Select("INBOX", nil).Wait()
					}
				case k == 15: // CLOSE expunges what is \Deleted
					if err = c.UnselectAndExpunge().Wait(); err == nil {
						_, err = c.Select("INBOX", nil).Wait()
					}
				case k < 4: // by UID
					var set imap.UIDSet
					for j := 0; j < 1+rng.Intn(3); j++ {
						set.AddNum(uidOf(before, rng))
					}
					err = c.Store(set, store, nil).Close()
				case k < 7: // by sequence number, as this session numbers them
					mb := c.Mailbox()
					if mb == nil || mb.NumMessages == 0 {
						continue
					}
					n := mb.NumMessages
					var set imap.SeqSet
					a := 1 + uint32(rng.Intn(int(n)))
					set.AddRange(a, min(n, a+uint32(rng.Intn(3))))
					err = c.Store(set, store, nil).Close()
				case k < 9:
					err = c.Expunge().Close()
				default:
					var set imap.UIDSet
					set.AddNum(uidOf(before, rng))
					err = c.UIDExpunge(set).Close()
				}
				if err != nil && !isNoResponse(err) {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("session: %v", err)
	}

}

func isNoResponse(err error) bool {
	var ie *imap.Error
	return asIMAPError(err, &ie) && (ie.Type == imap.StatusResponseTypeNo || ie.Type == imap.StatusResponseTypeBad)
}

func uidOf(m map[uint32]modelMsg, rng *rand.Rand) imap.UID {
	uids := make([]uint32, 0, len(m))
	for u := range m {
		uids = append(uids, u)
	}
	slices.Sort(uids)
	return imap.UID(uids[rng.Intn(len(uids))])
}

func uidList(t *testing.T, set string) []uint32 {
	t.Helper()
	var out []uint32
	for _, part := range strings.Split(set, ",") {
		if part == "" {
			continue
		}
		a, b, ok := strings.Cut(part, ":")
		lo, err1 := strconv.ParseUint(a, 10, 32)
		hi := lo
		var err2 error
		if ok {
			hi, err2 = strconv.ParseUint(b, 10, 32)
		}
		if err1 != nil || err2 != nil {
			t.Fatalf("logged UID set %q is not a list of UIDs", set)
		}
		for u := min(lo, hi); u <= max(lo, hi); u++ {
			out = append(out, uint32(u))
		}
	}
	return out
}

func keys(m modelMsg) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func equalFlags(a, b modelMsg) bool {
	return slices.Equal(keys(a), keys(b))
}

func lastSeq(t *testing.T, tb *testbed.Testbed) int64 {
	t.Helper()
	seq, _ := tb.Daemon.Log.Last()
	return seq
}

func undologFilterFrom(after int64) undolog.Filter {
	return undolog.Filter{AfterSeq: after, Kinds: []string{verb.KindIMAPStore, verb.KindIMAPExpunge}}
}

func asIMAPError(err error, target **imap.Error) bool { return errors.As(err, target) }

// TestIMAPConcurrentSessionsCycleIsIdentity: after several sessions of one
// user worked on one mailbox at once (flags, expunges, CLOSE, COPY and MOVE
// to a second mailbox, APPEND), a cycle back to a snapshot taken just
// before, with no repair, gives back exactly the present (every message by
// mailbox and Message-Id with its flags, as Dovecot lists them before and
// after; the test's own reading, not undomail's), mails no explanation, and
// says OK.
func TestIMAPConcurrentSessionsCycleIsIdentity(t *testing.T) {
	ctx := context.Background()
	for _, sessions := range []int{1, 2, 5, 10} {
		t.Run(fmt.Sprintf("sessions%d", sessions), func(t *testing.T) {
			snapDir := filepath.Join(t.TempDir(), "snaps")
			tb := testbedtest.Start(t, func(c *config.Config) { c.Store = "copy:" + snapDir })
			c := testbedtest.IMAP(t, tb.IMAPAddr(), "alice", tb.Stack.Password("alice"))
			if err := c.Create("Archive", nil).Wait(); err != nil {
				t.Fatal(err)
			}
			c.Close()
			deliver(t, tb, "alice", "identity", fmt.Sprintf("id%d.%%d@client.test", sessions), 20)
			snap, _, err := tb.Daemon.Snapshot(ctx, "hourly")
			if err != nil {
				t.Fatal(err)
			}
			clear(uidOwners)
			from := lastSeq(t, tb)
			checkUIDsNeverReused(t, tb)
			runSessions(t, tb, int64(sessions), sessions, serverState(t, tb), true)
			if bad := mislabels(t, tb, from); len(bad) > 0 {
				t.Fatalf("%d sessions: the log names messages wrongly:\n%s", sessions, strings.Join(bad, "\n"))
			}
			present := stateByMessageID(t, tb)
			v, err := tb.Daemon.Cycle(ctx, admin.CycleRequest{To: snap.Name, Reason: "identity check"})
			if err != nil {
				t.Fatalf("cycle: %v", err)
			}
			after := stateByMessageID(t, tb)
			var diffs []string
			for id, f := range present {
				if g, ok := after[id]; !ok {
					diffs = append(diffs, fmt.Sprintf("%s %v: gone after the cycle", id, f))
				} else if g != f {
					diffs = append(diffs, fmt.Sprintf("%s: flags %v before, %v after", id, f, g))
				}
			}
			for id, g := range after {
				if _, ok := present[id]; !ok {
					diffs = append(diffs, fmt.Sprintf("%s %v: back after the cycle", id, g))
				}
			}
			if len(diffs) > 0 {
				sort.Strings(diffs)
				t.Fatalf("%d sessions: a cycle with no repair changed %d messages:\n%s", sessions, len(diffs), strings.Join(diffs, "\n"))
			}
			if !v.OK || v.Failed > 0 || v.Repaired > 0 {
				t.Fatalf("verdict %+v: want OK, nothing failed or repaired", v)
			}
			if v.Compensation != nil && len(v.Compensation.Digests) > 0 {
				t.Fatalf("a cycle with no repair mailed explanations to %v: %+v", v.Compensation.Digests, v.Compensation.Paradoxes)
			}
			t.Logf("%d sessions: %d verbs replayed, %d messages identical", sessions, v.Replayed, len(after))
		})
	}
}

// stateByMessageID lists alice's INBOX and Archive straight from Dovecot:
// "mailbox message-id" to the sorted list of the flags (without \Recent)
// of each message with that id there.
func stateByMessageID(t *testing.T, tb *testbed.Testbed) map[string]string {
	t.Helper()
	checkUIDsNeverReused(t, tb)
	c := testbedtest.IMAP(t, tb.Stack.IMAPAddr, "alice", tb.Stack.Password("alice"))
	defer c.Close()
	out := map[string]string{}
	for _, mb := range []string{"INBOX", "Archive"} {
		if _, err := c.Select(mb, nil).Wait(); err != nil {
			var ie *imap.Error
			if errors.As(err, &ie) && ie.Type == imap.StatusResponseTypeNo {
				continue
			}
			t.Fatal(err)
		}
		msgs, err := c.Fetch(imap.UIDSet{imap.UIDRange{Start: 1, Stop: 0}}, &imap.FetchOptions{Flags: true, Envelope: true}).Collect()
		if err != nil {
			t.Fatal(err)
		}
		each := map[string][]string{}
		for _, m := range msgs {
			f := modelMsg{}
			for _, fl := range m.Flags {
				if fl != `\Recent` {
					f[strings.ToLower(string(fl))] = true
				}
			}
			k := mb + " " + m.Envelope.MessageID
			each[k] = append(each[k], "("+strings.Join(keys(f), " ")+")")
		}
		for k, l := range each {
			sort.Strings(l)
			out[k] = strings.Join(l, " ")
		}
	}
	return out
}

// mislabels lists the verbs since after whose undo ids disagree with the
// Undomail-Id field of the message now at that UID (delivered messages).
func mislabels(t *testing.T, tb *testbed.Testbed, after int64) []string {
	t.Helper()
	c := testbedtest.IMAP(t, tb.Stack.IMAPAddr, "alice", tb.Stack.Password("alice"))
	defer c.Close()
	truth := map[string]map[uint32]string{}
	for _, mb := range []string{"INBOX", "Archive"} {
		sel, err := c.Select(mb, nil).Wait()
		if err != nil {
			t.Fatal(err)
		}
		sec := &imap.FetchItemBodySection{Specifier: imap.PartSpecifierHeader, HeaderFields: []string{verb.TraceHeader}, Peek: true}
		msgs, err := c.Fetch(imap.UIDSet{imap.UIDRange{Start: 1, Stop: 0}}, &imap.FetchOptions{UID: true, BodySection: []*imap.FetchItemBodySection{sec}}).Collect()
		if err != nil {
			t.Fatal(err)
		}
		truth[fmt.Sprintf("%s/%d", mb, sel.UIDValidity)] = map[uint32]string{}
		for _, m := range msgs {
			h := string(m.FindBodySection(sec))
			if i := strings.Index(h, ":"); i >= 0 {
				truth[fmt.Sprintf("%s/%d", mb, sel.UIDValidity)][uint32(m.UID)] = strings.TrimSpace(h[i+1:])
			}
		}
	}
	vs, err := tb.Daemon.Log.Verbs(context.Background(), undolog.Filter{AfterSeq: after})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, v := range vs {
		if !strings.HasPrefix(v.Kind, "imap.") {
			continue
		}
		a := argsOf(t, v)
		for u, id := range a.UndoIDs {
			n, _ := strconv.ParseUint(u, 10, 32)
			if got, ok := truth[fmt.Sprintf("%s/%d", a.Mailbox, a.UIDValidity)][uint32(n)]; ok && got != id {
				out = append(out, fmt.Sprintf("verb %d (%s) names %s uid %s as %s, the message there is %s", v.Seq, a.Summary(), a.Mailbox, u, id, got))
			}
		}
	}
	return out
}

// uidOwners remembers which message every UID named, test-wide.
var uidOwners = map[string]string{}

// checkUIDsNeverReused reads alice's INBOX and Archive straight from
// Dovecot and fails if a UID (under the same UIDVALIDITY) now names another
// message than it named when this test saw it before (RFC 9051 2.3.1.1).
func checkUIDsNeverReused(t *testing.T, tb *testbed.Testbed) {
	t.Helper()
	c := testbedtest.IMAP(t, tb.Stack.IMAPAddr, "alice", tb.Stack.Password("alice"))
	defer c.Close()
	for _, mb := range []string{"INBOX", "Archive"} {
		sel, err := c.Select(mb, nil).Wait()
		if err != nil {
			var ie *imap.Error
			if errors.As(err, &ie) && ie.Type == imap.StatusResponseTypeNo {
				continue
			}
			t.Fatal(err)
		}
		msgs, err := c.Fetch(imap.UIDSet{imap.UIDRange{Start: 1, Stop: 0}}, &imap.FetchOptions{UID: true, Envelope: true}).Collect()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range msgs {
			k := fmt.Sprintf("%s/%d/%d", mb, sel.UIDValidity, m.UID)
			if was, ok := uidOwners[k]; ok && was != m.Envelope.MessageID {
				t.Fatalf("UID reused: %s named %s, now %s", k, was, m.Envelope.MessageID)
			}
			uidOwners[k] = m.Envelope.MessageID
		}
	}
}
