package daemon_test

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"sort"
	"strconv"
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
	"github.com/undomail/undomail/internal/daemon"
	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// The randomized concurrent-client generator (issue 13): several IMAP
// sessions per mailbox and several users work at once through undomail
// (STORE +/-/= FLAGS with system flags and keywords, COPY, MOVE, EXPUNGE,
// UID EXPUNGE, CLOSE, APPEND, CREATE/RENAME/DELETE, by sequence number
// and by UID) while mail is delivered through undomail's SMTP front door;
// then a cycle runs against the real Dovecot. A failure names its seed;
// -concurrent.seed reruns exactly that one.
var (
	concSeed  = flag.Int64("concurrent.seed", 0, "run the concurrent-client properties with this seed only (0: seeds 1..concurrent.seeds)")
	concSeeds = flag.Int("concurrent.seeds", 5, "seeds per session count for the concurrent-client properties")
	concOps   = flag.Int("concurrent.ops", 12, "commands per session and seed")
	// concFolders are the session counts per mailbox whose sessions also
	// create, rename and delete folders while others work in them. With
	// two or more sessions replay does not yet reproduce every such
	// history (issue #13's closing note: a clean-clone CI run once found
	// an empty folder a session re-created missing after the replay), so
	// CI runs them at 1 session per mailbox: two users, deliveries.
	concSameFolder = flag.Bool("concurrent.samefolder", false, "COPY and MOVE may go to the selected mailbox itself (undomail refuses them)")
	concFolders    = flag.String("concurrent.folders", "1,2,5,10", "session counts per mailbox whose sessions also create, rename and delete folders, comma-separated (\"\" for none)")
	// concSessions are the session counts per mailbox of the identity
	// property: two users, STORE, COPY and MOVE by sequence number, "1:*"
	// and UID, EXPUNGE, CLOSE and APPEND, with deliveries meanwhile.
	concSessions = flag.String("concurrent.sessions", "1,2,5,10", "session counts per mailbox for the identity property, comma-separated")
)

func concurrentSeeds() []int64 {
	if *concSeed != 0 {
		return []int64{*concSeed}
	}
	var out []int64
	for i := 1; i <= *concSeeds; i++ {
		out = append(out, int64(i))
	}
	return out
}

var (
	genUsers   = []string{"alice", "bob"}
	genFolders = []string{"INBOX", "F1", "F2", "F3", "F4"}
	genFlags   = []imap.Flag{imap.FlagSeen, imap.FlagFlagged, imap.FlagAnswered, imap.FlagDraft, imap.FlagDeleted, "kw1", "kw2", "$Label1"}
	genCounter atomic.Int64
)

// genMessage is a message of the generator, with a Message-Id of its own.
func genMessage(seed int64, what string) (id string, body []byte) {
	n := genCounter.Add(1)
	id = fmt.Sprintf("<%s-%d-%d@gen.test>", what, seed, n)
	return id, []byte(fmt.Sprintf("From: gen@gen.test\r\nSubject: %s %d\r\nMessage-Id: %s\r\n\r\nbody %d\r\n", what, n, id, n))
}

// genSession is one client session of the generator.
type genSession struct {
	t    *testing.T
	tb   *testbed.Testbed
	user string
	seed int64
	r    *rand.Rand
	c    *imapclient.Client
	sel  string
	uids []imap.UID // the selected mailbox's UIDs as last seen
	// own restricts the session to its own messages (property b): it
	// appends, and acts by UID only on what it appended.
	own bool
	// folders lets it create, rename and delete folders too.
	folders bool
	mine    map[string][]imap.UID // mailbox -> UIDs of its own messages
	ids     []string              // Message-Ids it appended
	first   *imap.AppendData      // its first APPEND's APPENDUID
	log     []string
}

func (g *genSession) connect() error {
	if g.c != nil {
		g.c.Close()
	}
	c, err := imapclient.DialInsecure(g.tb.IMAPAddr(), nil)
	if err != nil {
		return err
	}
	if err := c.Login(g.user, g.tb.Stack.Password(g.user)).Wait(); err != nil {
		c.Close()
		return err
	}
	g.c, g.sel, g.uids = c, "", nil
	return nil
}

// broken reports an error that ended the connection (not a NO or BAD).
func broken(err error) bool {
	var ie *imap.Error
	return err != nil && !errors.As(err, &ie)
}

func (g *genSession) note(format string, args ...any) {
	g.log = append(g.log, fmt.Sprintf(format, args...))
}

func (g *genSession) folder() string {
	if g.r.Intn(2) == 0 {
		return "INBOX" // sessions meet in INBOX
	}
	return genFolders[g.r.Intn(len(genFolders))]
}

// otherFolder picks a COPY or MOVE destination other than the selected
// mailbox: undomail refuses COPY and MOVE into the selected mailbox
// (NO [CANNOT], docs/imap-refusals.md: Dovecot's maildir can give such a
// copy a UID no command reported), so those would only be refused
// commands. -concurrent.samefolder sends them anyway.
func (g *genSession) otherFolder() string {
	if *concSameFolder {
		return g.folder()
	}
	for {
		if f := g.folder(); f != g.sel {
			return f
		}
	}
}

func (g *genSession) selectBox(name string) error {
	if _, err := g.c.Select(name, nil).Wait(); err != nil {
		g.sel = ""
		return err
	}
	g.sel = name
	return g.refresh()
}

// refresh learns the selected mailbox's UIDs (UID SEARCH also brings in
// the EXPUNGE and EXISTS the server has for the session).
func (g *genSession) refresh() error {
	d, err := g.c.UIDSearch(&imap.SearchCriteria{}, nil).Wait()
	if err != nil {
		return err
	}
	g.uids = d.AllUIDs()
	return nil
}

func (g *genSession) someFlags() []imap.Flag {
	var out []imap.Flag
	for _, i := range g.r.Perm(len(genFlags))[:1+g.r.Intn(3)] {
		out = append(out, genFlags[i])
	}
	return out
}

// target picks messages of the selected mailbox: by sequence number (a
// number, a range, or 1:*) or by UID.
func (g *genSession) target() (imap.NumSet, string) {
	n := uint32(len(g.uids))
	if g.r.Intn(2) == 0 {
		var s imap.SeqSet
		switch k := g.r.Intn(4); {
		case k == 0 || n == 0:
			s.AddRange(1, 0)
		case k == 1:
			a := 1 + uint32(g.r.Intn(int(n)))
			s.AddRange(a, min(n, a+uint32(g.r.Intn(3))))
		default:
			s.AddNum(1 + uint32(g.r.Intn(int(n)+1))) // may be one past the end
		}
		return s, "seq " + s.String()
	}
	var s imap.UIDSet
	if len(g.uids) == 0 || g.r.Intn(5) == 0 {
		s.AddRange(1, 0)
	} else {
		for range 1 + g.r.Intn(3) {
			s.AddNum(g.uids[g.r.Intn(len(g.uids))])
		}
	}
	return s, "uid " + s.String()
}

func (g *genSession) appendTo(box string, flags []imap.Flag, what string) (*imap.AppendData, error) {
	id, body := genMessage(g.seed, what)
	cmd := g.c.Append(box, int64(len(body)), &imap.AppendOptions{Flags: flags})
	cmd.Write(body)
	cmd.Close()
	d, err := cmd.Wait()
	if err == nil && g.own {
		g.ids = append(g.ids, id)
		if g.first == nil {
			g.first = d
		}
		g.mine[box] = append(g.mine[box], d.UID)
	}
	return d, err
}

// step runs one random command; errors from the server (NO, BAD) are
// part of the game, a broken connection is made again.
func (g *genSession) step() error {
	if g.sel == "" || g.r.Intn(8) == 0 {
		if err := g.selectBox(g.folder()); err != nil {
			g.note("select: %v", err)
			return err
		}
	} else if err := g.refresh(); err != nil {
		return err
	}
	if g.own {
		return g.ownStep()
	}
	var err error
	k := g.r.Intn(100)
	if !g.folders && k >= 80 && k < 94 {
		k = 94 // a NOOP instead of a folder operation
	}
	switch {
	case k < 32:
		set, what := g.target()
		op := []imap.StoreFlagsOp{imap.StoreFlagsAdd, imap.StoreFlagsDel, imap.StoreFlagsSet}[g.r.Intn(3)]
		flags := g.someFlags()
		err = g.c.Store(set, &imap.StoreFlags{Op: op, Silent: g.r.Intn(2) == 0, Flags: flags}, nil).Close()
		g.note("%s STORE %v %v %v: %v", g.sel, what, op, flags, err)
	case k < 40:
		set, what := g.target()
		dest := g.otherFolder()
		_, err = g.c.Copy(set, dest).Wait()
		g.note("%s COPY %s %s: %v", g.sel, what, dest, err)
	case k < 48:
		set, what := g.target()
		dest := g.otherFolder()
		_, err = g.c.Move(set, dest).Wait()
		g.note("%s MOVE %s %s: %v", g.sel, what, dest, err)
	case k < 56:
		err = g.c.Expunge().Close()
		g.note("%s EXPUNGE: %v", g.sel, err)
	case k < 62:
		var s imap.UIDSet
		if len(g.uids) > 0 {
			s.AddNum(g.uids[g.r.Intn(len(g.uids))], g.uids[g.r.Intn(len(g.uids))])
		} else {
			s.AddRange(1, 0)
		}
		err = g.c.UIDExpunge(s).Close()
		g.note("%s UID EXPUNGE %s: %v", g.sel, s, err)
	case k < 66:
		err = g.c.UnselectAndExpunge().Wait()
		g.note("%s CLOSE: %v", g.sel, err)
		g.sel = ""
	case k < 80:
		box := g.folder()
		var flags []imap.Flag
		if g.r.Intn(2) == 0 {
			flags = g.someFlags()
		}
		_, err = g.appendTo(box, flags, "append")
		g.note("APPEND %s %v: %v", box, flags, err)
	case k < 85:
		box := genFolders[1+g.r.Intn(len(genFolders)-1)]
		err = g.c.Create(box, nil).Wait()
		g.note("CREATE %s: %v", box, err)
	case k < 90:
		from, to := genFolders[1+g.r.Intn(len(genFolders)-1)], genFolders[1+g.r.Intn(len(genFolders)-1)]
		err = g.c.Rename(from, to, nil).Wait()
		g.note("RENAME %s %s: %v", from, to, err)
	case k < 94:
		box := genFolders[1+g.r.Intn(len(genFolders)-1)]
		err = g.c.Delete(box).Wait()
		g.note("DELETE %s: %v", box, err)
	default:
		err = g.c.Noop().Wait()
	}
	return err
}

// ownStep is a command of a session restricted to its own messages:
// APPEND, and by UID only on messages it appended: STORE, COPY, MOVE,
// \Deleted with UID EXPUNGE. Folders are never created, renamed or
// deleted by it.
func (g *genSession) ownStep() error {
	mine := g.mine[g.sel]
	present := map[imap.UID]bool{}
	for _, u := range g.uids {
		present[u] = true
	}
	var set imap.UIDSet
	var left []imap.UID
	for _, u := range mine {
		if present[u] {
			left = append(left, u)
		}
	}
	g.mine[g.sel] = left
	if len(left) > 0 {
		for range 1 + g.r.Intn(2) {
			set.AddNum(left[g.r.Intn(len(left))])
		}
	}
	k := g.r.Intn(100)
	if len(set) == 0 || k < 35 {
		box := "INBOX"
		if g.r.Intn(3) == 0 {
			box = g.sel
		}
		var flags []imap.Flag
		if g.r.Intn(2) == 0 {
			flags = g.someFlags()
		}
		_, err := g.appendTo(box, flags, "own")
		g.note("own APPEND %s: %v", box, err)
		return err
	}
	var err error
	switch {
	case k < 65:
		op := []imap.StoreFlagsOp{imap.StoreFlagsAdd, imap.StoreFlagsDel, imap.StoreFlagsSet}[g.r.Intn(3)]
		err = g.c.Store(set, &imap.StoreFlags{Op: op, Silent: true, Flags: g.someFlags()}, nil).Close()
		g.note("own %s UID STORE %s: %v", g.sel, set, err)
	case k < 80:
		dest := genFolders[g.r.Intn(3)]
		for dest == g.sel {
			dest = genFolders[g.r.Intn(3)]
		}
		move := g.r.Intn(2) == 0
		var dst imap.NumSet
		if move {
			var d *imapclient.MoveData
			if d, err = g.c.Move(set, dest).Wait(); err == nil {
				dst = d.DestUIDs
			}
		} else {
			var d *imap.CopyData
			if d, err = g.c.Copy(set, dest).Wait(); err == nil {
				dst = d.DestUIDs
			}
		}
		if err == nil {
			if du, ok := dst.(imap.UIDSet); ok {
				nums, _ := du.Nums()
				g.mine[dest] = append(g.mine[dest], nums...)
			}
		}
		g.note("own %s UID COPY/MOVE(%v) %s %s: %v", g.sel, move, set, dest, err)
	default:
		if err = g.c.Store(set, &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagDeleted}}, nil).Close(); err == nil {
			err = g.c.UIDExpunge(set).Close()
		}
		g.note("own %s UID EXPUNGE %s: %v", g.sel, set, err)
	}
	return err
}

func (g *genSession) run(ops int) {
	for i := 0; i < ops; i++ {
		if err := g.step(); broken(err) {
			g.note("connection lost (%v): again", err)
			if err := g.connect(); err != nil {
				g.note("reconnect: %v", err)
				return
			}
		}
	}
	g.c.Logout().Wait()
	g.c.Close()
}

// traffic is one seed's concurrent work: sessions per user on shared
// mailboxes, with deliveries arriving meanwhile. It returns once every
// delivery has been recorded by undomail.
type traffic struct {
	sessions []*genSession
	own      *genSession
}

func runTraffic(t *testing.T, tb *testbed.Testbed, seed int64, perMailbox int, own bool) *traffic {
	t.Helper()
	before := deliveries(t, tb)
	tr := &traffic{}
	for ui, u := range genUsers {
		for i := range perMailbox {
			g := &genSession{t: t, tb: tb, user: u, seed: seed, r: rand.New(rand.NewSource(seed*1000 + int64(ui*100+i))), mine: map[string][]imap.UID{},
				folders: slices.Contains(countList(t, "concurrent.folders", *concFolders), perMailbox)}
			if own && ui == 0 && i == 0 {
				g.own = true
				tr.own = g
			}
			if err := g.connect(); err != nil {
				t.Fatalf("seed %d: session of %s: %v", seed, u, err)
			}
			tr.sessions = append(tr.sessions, g)
		}
	}
	if tr.own != nil {
		// Its first command is an APPEND: the cycle finds its session by it.
		if err := tr.own.selectBox("INBOX"); err != nil {
			t.Fatal(err)
		}
		if _, err := tr.own.appendTo("INBOX", nil, "own"); err != nil {
			t.Fatalf("seed %d: first APPEND: %v", seed, err)
		}
	}
	var wg sync.WaitGroup
	for _, g := range tr.sessions {
		wg.Add(1)
		go func() { defer wg.Done(); g.run(*concOps) }()
	}
	sent := 0
	dr := rand.New(rand.NewSource(seed))
	for range 2 + perMailbox {
		_, body := genMessage(seed, "delivery")
		rcpt := genUsers[dr.Intn(len(genUsers))] + "@example.test"
		if err := deliver(tb, rcpt, body); err != nil {
			t.Fatalf("seed %d: deliver: %v", seed, err)
		}
		sent++
		time.Sleep(time.Duration(dr.Intn(50)) * time.Millisecond)
	}
	wg.Wait()
	deadline := time.Now().Add(60 * time.Second)
	for deliveries(t, tb) < before+sent {
		if time.Now().After(deadline) {
			t.Fatalf("seed %d: %d deliveries sent, %d recorded", seed, sent, deliveries(t, tb)-before)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return tr
}

// deliver sends a message through undomail's SMTP front door.
func deliver(tb *testbed.Testbed, rcpt string, body []byte) error {
	c, err := smtp.Dial(tb.SMTPAddr())
	if err != nil {
		return err
	}
	defer c.Close()
	return c.SendMail("gen@gen.test", []string{rcpt}, strings.NewReader(string(body)))
}

// deliveries counts the deliveries undomail recorded with their outcome.
func deliveries(t *testing.T, tb *testbed.Testbed) int {
	t.Helper()
	vs, err := tb.Daemon.Log.Verbs(context.Background(), undolog.Filter{Kinds: []string{verb.KindLMTPDeliver}})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, v := range vs {
		if v.Outcome != nil {
			n++
		}
	}
	return n
}

// genPrepare gives each user the folders and some mail to work on,
// through undomail, before the seed's snapshot. What earlier seeds left
// is removed first, straight in Dovecot: each seed starts from the same
// kind of state, whatever an earlier seed's cycle did.
func genPrepare(t *testing.T, tb *testbed.Testbed, seed int64) {
	t.Helper()
	for _, u := range genUsers {
		c := testbedtest.IMAP(t, tb.Stack.IMAPAddr, u, tb.Stack.Password(u))
		for _, f := range genFolders[1:] {
			c.Delete(f).Wait() // not there: fine
		}
		if _, err := c.Select("INBOX", nil).Wait(); err != nil {
			t.Fatal(err)
		}
		if err := c.Store(imap.SeqSet{imap.SeqRange{Start: 1, Stop: 0}}, &imap.StoreFlags{Op: imap.StoreFlagsAdd, Silent: true, Flags: []imap.Flag{imap.FlagDeleted}}, nil).Close(); err != nil {
			var ie *imap.Error
			if !errors.As(err, &ie) { // an empty INBOX answers NO or BAD
				t.Fatal(err)
			}
		}
		if err := c.Expunge().Close(); err != nil {
			t.Fatal(err)
		}
		c.Logout().Wait()
		c.Close()
	}
	for _, u := range genUsers {
		g := &genSession{t: t, tb: tb, user: u, seed: seed, r: rand.New(rand.NewSource(seed)), mine: map[string][]imap.UID{}}
		if err := g.connect(); err != nil {
			t.Fatal(err)
		}
		for _, f := range genFolders[1:3] {
			g.c.Create(f, nil).Wait() // there already: fine
		}
		for i := range 6 {
			box := "INBOX"
			if i >= 4 {
				box = "F1"
			}
			if _, err := g.appendTo(box, g.someFlags(), "seed"); err != nil {
				t.Fatalf("prepare %s: %v", u, err)
			}
		}
		g.c.Logout().Wait()
		g.c.Close()
	}
}

// storeListing is a user's mail as Dovecot itself lists it, read by the
// test over IMAP straight from Dovecot (not through undomail): by
// "user/mailbox", every message as "Message-Id (flags)", sorted.
type storeListing map[string][]string

func listStore(t *testing.T, tb *testbed.Testbed) storeListing {
	t.Helper()
	out := storeListing{}
	for _, u := range genUsers {
		c := testbedtest.IMAP(t, tb.Stack.IMAPAddr, u, tb.Stack.Password(u))
		boxes, err := c.List("", "*", nil).Collect()
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range boxes {
			if slices.Contains(b.Attrs, imap.MailboxAttrNoSelect) {
				continue
			}
			sel, err := c.Select(b.Mailbox, &imap.SelectOptions{ReadOnly: true}).Wait()
			if err != nil {
				t.Fatalf("examine %s/%s: %v", u, b.Mailbox, err)
			}
			key := u + "/" + b.Mailbox
			out[key] = []string{}
			if sel.NumMessages == 0 {
				continue
			}
			msgs, err := c.Fetch(imap.SeqSet{imap.SeqRange{Start: 1, Stop: 0}}, &imap.FetchOptions{Envelope: true, Flags: true}).Collect()
			if err != nil {
				t.Fatalf("fetch %s: %v", key, err)
			}
			for _, m := range msgs {
				var fs []string
				for _, f := range m.Flags {
					if f != imap.Flag(`\Recent`) {
						fs = append(fs, string(f))
					}
				}
				sort.Strings(fs)
				out[key] = append(out[key], fmt.Sprintf("<%s> (%s)", m.Envelope.MessageID, strings.Join(fs, " ")))
			}
			sort.Strings(out[key])
		}
		c.Logout().Wait()
		c.Close()
	}
	return out
}

// without is the listing without the messages with these Message-Ids
// (as appended, in angle brackets), wherever they were copied or moved.
func (l storeListing) without(ids []string) storeListing {
	drop := map[string]bool{}
	for _, id := range ids {
		drop[id] = true
	}
	out := storeListing{}
	for box, msgs := range l {
		out[box] = []string{}
		for _, m := range msgs {
			id, _, _ := strings.Cut(m, " ")
			if !drop[id] {
				out[box] = append(out[box], m)
			}
		}
	}
	return out
}

// onlyGenerated keeps the generator's own messages (explanations mailed
// by a cycle are not).
func (l storeListing) onlyGenerated() storeListing {
	out := storeListing{}
	for box, msgs := range l {
		out[box] = []string{}
		for _, m := range msgs {
			if strings.Contains(m, "@gen.test>") {
				out[box] = append(out[box], m)
			}
		}
	}
	return out
}

// diff says how got differs from want, message by message.
func (l storeListing) diff(want storeListing) []string {
	var out []string
	boxes := map[string]bool{}
	for b := range l {
		boxes[b] = true
	}
	for b := range want {
		boxes[b] = true
	}
	for _, b := range slices.Sorted(func(yield func(string) bool) {
		for k := range boxes {
			if !yield(k) {
				return
			}
		}
	}) {
		g, gok := l[b]
		w, wok := want[b]
		switch {
		case !gok:
			out = append(out, fmt.Sprintf("%s: missing (had %d messages)", b, len(w)))
			continue
		case !wok:
			out = append(out, fmt.Sprintf("%s: should not exist (has %v)", b, g))
			continue
		}
		count := map[string]int{}
		for _, m := range g {
			count[m]++
		}
		for _, m := range w {
			count[m]--
		}
		for _, m := range slices.Sorted(func(yield func(string) bool) {
			for k := range count {
				if !yield(k) {
					return
				}
			}
		}) {
			switch n := count[m]; {
			case n > 0:
				out = append(out, fmt.Sprintf("%s: %s is there %d times too many", b, m, n))
			case n < 0:
				out = append(out, fmt.Sprintf("%s: %s is missing (%d times)", b, m, -n))
			}
		}
	}
	return out
}

// cycleOrHang runs a cycle; one that has not ended after several minutes
// is hung (a replay session waiting forever holds every change back): the
// test stops there with the goroutines' stacks, and names the seed.
func cycleOrHang(t *testing.T, tb *testbed.Testbed, seed int64, req admin.CycleRequest) (daemon.CycleVerdict, error) {
	t.Helper()
	type result struct {
		v   daemon.CycleVerdict
		err error
	}
	done := make(chan result, 1)
	go func() {
		v, err := tb.Daemon.Cycle(context.Background(), req)
		done <- result{v, err}
	}()
	select {
	case r := <-done:
		return r.v, r.err
	case <-time.After(5 * time.Minute):
		pprof.Lookup("goroutine").WriteTo(os.Stderr, 1)
		t.Fatalf("seed %d (rerun with -concurrent.seed=%d): the cycle did not end in 5 minutes: hung (stacks above)", seed, seed)
		return daemon.CycleVerdict{}, nil
	}
}

func concurrentTestbed(t *testing.T) *testbed.Testbed {
	snapDir := filepath.Join(t.TempDir(), "snaps")
	return testbedtest.Start(t, func(c *config.Config) { c.Store = "copy:" + snapDir })
}

// TestConcurrentCycleIsIdentity, property (a): after concurrent traffic,
// a cycle back to the snapshot taken just before it, with no repair,
// changes nothing: the same messages in the same folders with the same
// flags and keywords as the test itself listed from Dovecot before the
// cycle, no explanation mailed, and a verdict OK that says the store is
// equal to the present with no change made by the repair.
func TestConcurrentCycleIsIdentity(t *testing.T) {
	for _, n := range sessionCounts(t) {
		t.Run(fmt.Sprintf("sessions=%d", n), func(t *testing.T) {
			tb := concurrentTestbed(t)
			ctx := context.Background()
			for _, seed := range concurrentSeeds() {
				genPrepare(t, tb, seed)
				snap, _, err := tb.Daemon.Snapshot(ctx, fmt.Sprintf("seed %d", seed))
				if err != nil {
					t.Fatal(err)
				}
				tr := runTraffic(t, tb, seed, n, false)
				before := listStore(t, tb)
				v, err := cycleOrHang(t, tb, seed, admin.CycleRequest{To: snap.Name, Reason: fmt.Sprintf("identity, seed %d", seed)})
				after := listStore(t, tb)
				var problems []string
				if err != nil || !v.OK || v.Failed != 0 {
					problems = append(problems, fmt.Sprintf("verdict not OK: err %v, failed %d", err, v.Failed))
				}
				if v.Compared == nil || !v.Compared.OK() || v.Compared.Changes != 0 {
					problems = append(problems, fmt.Sprintf("comparison with the present: %+v", v.Compared))
				}
				if c := v.Compensation; c != nil && (len(c.Digests) > 0 || c.Notice || len(c.Records) > 0) {
					problems = append(problems, fmt.Sprintf("explanations mailed by a cycle with no repair: %+v", c.Paradoxes))
				}
				problems = append(problems, after.diff(before)...)
				if len(problems) > 0 {
					var cmds []string
					for _, g := range tr.sessions {
						cmds = append(cmds, fmt.Sprintf("%s: %s", g.user, strings.Join(g.log, "; ")))
					}
					t.Errorf("seed %d, %d sessions per mailbox (rerun: -run 'TestConcurrentCycleIsIdentity/sessions=%d' -concurrent.seed=%d): a cycle with no repair is not an identity:\n  %s\ncommands:\n  %s",
						seed, n, n, seed, strings.Join(problems, "\n  "), strings.Join(cmds, "\n  "))
					dumpLog(t, tb, fmt.Sprintf("identity-%d-%d", n, seed))
				}
			}
		})
	}
}

// TestConcurrentCycleCancelsOneSession, property (b): a cycle that
// cancels every verb of one session gives exactly the state of a
// reference model written here, not the replay's. The model is exact for
// a restricted generator: the cancelled session only appends messages of
// its own and acts by UID on those alone (STORE, COPY, MOVE, UID
// EXPUNGE; no folder commands, no sequence numbers), so without it the
// others' recorded traffic has exactly the effect it had, and the state
// is what Dovecot held before the cycle minus every copy of the messages
// that session appended. The other sessions run the full generator.
func TestConcurrentCycleCancelsOneSession(t *testing.T) {
	tb := concurrentTestbed(t)
	ctx := context.Background()
	seeds := concurrentSeeds()
	if *concSeed == 0 && len(seeds) > 3 {
		seeds = seeds[:3]
	}
	for _, seed := range seeds {
		genPrepare(t, tb, seed)
		snap, _, err := tb.Daemon.Snapshot(ctx, fmt.Sprintf("seed %d", seed))
		if err != nil {
			t.Fatal(err)
		}
		tr := runTraffic(t, tb, seed, 3, true)
		before := listStore(t, tb)
		want := before.without(tr.own.ids).onlyGenerated()
		session := sessionOf(t, tb, snap.Seq, tr.own)
		var cancel []int64
		verbs, err := tb.Daemon.Log.Verbs(ctx, undolog.Filter{AfterSeq: snap.Seq})
		if err != nil {
			t.Fatal(err)
		}
		for _, vb := range verbs {
			if vb.Session == session && replay.Replayable[vb.Kind] {
				cancel = append(cancel, vb.Seq)
			}
		}
		v, err := cycleOrHang(t, tb, seed, admin.CycleRequest{To: snap.Name, Cancel: cancel, Reason: fmt.Sprintf("cancel one session, seed %d", seed)})
		got := listStore(t, tb).onlyGenerated()
		var problems []string
		if err != nil || !v.OK {
			problems = append(problems, fmt.Sprintf("verdict not OK: %v (%+v)", err, v.Compared))
		}
		problems = append(problems, got.diff(want)...)
		if len(problems) > 0 {
			t.Errorf("seed %d (rerun: -run TestConcurrentCycleCancelsOneSession -concurrent.seed=%d): cancelling session %s (%d verbs) does not give the model's state:\n  %s\nthe cancelled session: %s",
				seed, seed, session, len(cancel), strings.Join(problems, "\n  "), strings.Join(tr.own.log, "; "))
		}
	}
}

// sessionOf finds the proxy's session id of a generator session by its
// first APPEND's APPENDUID.
func sessionOf(t *testing.T, tb *testbed.Testbed, after int64, g *genSession) string {
	t.Helper()
	verbs, err := tb.Daemon.Log.Verbs(context.Background(), undolog.Filter{AfterSeq: after, Kinds: []string{verb.KindIMAPAppend}})
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("%d %d", g.first.UIDValidity, g.first.UID)
	for _, v := range verbs {
		var o verb.IMAPOutcome
		if v.User == g.user && v.Outcome != nil && json.Unmarshal(v.Outcome.Outcome, &o) == nil && o.AppendUID == want {
			return v.Session
		}
	}
	t.Fatalf("no APPEND of %s with APPENDUID %s in the log", g.user, want)
	return ""
}

// TestConcurrentCycleNoticesAFileRemoved, property (c): a message file
// (a delivery, with an undo id) removed from the store behind undomail's back after the replay, before
// the verification, makes the verdict NOT OK, naming that message, with
// the command that undoes the cycle.
func TestConcurrentCycleNoticesAFileRemoved(t *testing.T) {
	tb := concurrentTestbed(t)
	ctx := context.Background()
	seed := concurrentSeeds()[0]
	genPrepare(t, tb, seed)
	snap, _, err := tb.Daemon.Snapshot(ctx, "before")
	if err != nil {
		t.Fatal(err)
	}
	// Deliveries only: the replay is then exact today, and the one file
	// removed is the only difference.
	runTraffic(t, tb, seed, 0, false)
	n := deliveries(t, tb)
	_, body := genMessage(seed, "for-alice")
	if err := deliver(tb, "alice@example.test", body); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(60 * time.Second); deliveries(t, tb) == n; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the delivery to alice was not recorded")
		}
	}
	var removed, key string
	tb.Daemon.BeforeVerify = func() {
		// A delivered message (it carries an undo id) of alice's INBOX.
		for _, sub := range []string{"cur", "new"} {
			dir := filepath.Join(tb.Daemon.Store.Path(), "alice", "Maildir", sub)
			ents, _ := os.ReadDir(dir)
			for _, e := range ents {
				p := filepath.Join(dir, e.Name())
				b, err := os.ReadFile(p)
				if err != nil || strings.HasPrefix(replay.MessageKey(b), "sha256:") {
					continue
				}
				if err := os.Remove(p); err != nil {
					t.Errorf("remove %s: %v", p, err)
					return
				}
				removed, key = p, replay.MessageKey(b)
				return
			}
		}
	}
	v, err := tb.Daemon.Cycle(ctx, admin.CycleRequest{To: snap.Name})
	tb.Daemon.BeforeVerify = nil
	if removed == "" {
		t.Fatal("no delivered message in alice's INBOX to remove")
	}
	if err == nil || v.OK || v.Compared == nil || v.Compared.OK() {
		t.Fatalf("removed %s (message %s) behind undomail's back; verdict %+v (compared %+v), %v", removed, key, v, v.Compared, err)
	}
	named := false
	for _, p := range v.Compared.Problems {
		if strings.Contains(p, "alice/INBOX: message "+key+" is in the present") {
			named = true
		}
	}
	if !named || len(v.Compared.Problems) != 1 {
		t.Fatalf("the verdict's problems %q: want exactly the message %s missing from alice/INBOX", v.Compared.Problems, key)
	}
	if !strings.Contains(err.Error(), key) || !strings.Contains(err.Error(), "undomail cycle run --to "+v.Present) {
		t.Fatalf("the error %q names neither the message nor the command that undoes the cycle", err)
	}
}

func sessionCounts(t *testing.T) []int {
	t.Helper()
	return countList(t, "concurrent.sessions", *concSessions)
}

// countList parses a comma-separated list of session counts.
func countList(t *testing.T, flagName, list string) []int {
	t.Helper()
	var out []int
	for _, f := range strings.Split(list, ",") {
		if strings.TrimSpace(f) == "" {
			continue
		}
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			t.Fatalf("-%s %q: %q is not a session count", flagName, list, f)
		}
		out = append(out, n)
	}
	return out
}

// dumpLog writes every record of the log, in words and as JSON, to a
// file in $UNDOMAIL_TEST_DUMP (when set), for a failure to be read
// record by record.
func dumpLog(t *testing.T, tb *testbed.Testbed, name string) {
	dir := os.Getenv("UNDOMAIL_TEST_DUMP")
	if dir == "" {
		return
	}
	recs, err := tb.Daemon.Log.Records(context.Background(), undolog.Filter{})
	if err != nil {
		t.Logf("dump the log: %v", err)
		return
	}
	var b strings.Builder
	for _, r := range recs {
		msgID := ""
		if r.Blob != "" {
			if body, err := tb.Daemon.Log.ReadBlob(r.Blob); err == nil {
				if _, rest, ok := strings.Cut(string(body), "Message-Id: "); ok {
					msgID, _, _ = strings.Cut(rest, "\r\n")
				}
			}
		}
		fmt.Fprintf(&b, "%d %s %s %s ref=%d %s args=%s outcome=%s\n", r.Seq, r.User, r.Session, r.Kind, r.Ref, msgID, r.Args, r.Outcome)
	}
	path := filepath.Join(dir, name+".log")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Logf("dump the log: %v", err)
		return
	}
	t.Logf("the log is in %s", path)
}
