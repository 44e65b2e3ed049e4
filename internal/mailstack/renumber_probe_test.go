package mailstack_test

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"

	"github.com/undomail/undomail/internal/mailstack"
	"github.com/undomail/undomail/internal/mailstack/mailstacktest"
)

// probeMsg is a message the probe appends, told apart by its Message-Id.
func probeMsg(n int) string {
	return fmt.Sprintf("From: a@example.test\r\nTo: alice@example.test\r\nSubject: probe %d\r\nMessage-Id: <probe-%d@example.test>\r\n\r\nbody %d\r\n", n, n, n)
}

func probeAppend(t *testing.T, c *imapclient.Client, n int) imap.UID {
	t.Helper()
	msg := probeMsg(n)
	cmd := c.Append("INBOX", int64(len(msg)), nil)
	if _, err := cmd.Write([]byte(msg)); err != nil {
		t.Fatalf("APPEND write: %v", err)
	}
	if err := cmd.Close(); err != nil {
		t.Fatalf("APPEND close: %v", err)
	}
	d, err := cmd.Wait()
	if err != nil {
		t.Fatalf("APPEND: %v", err)
	}
	return d.UID
}

// probeList maps every UID in the INBOX to its Message-Id, read by c (which
// has INBOX selected) after a NOOP.
func probeList(c *imapclient.Client) (map[imap.UID]string, error) {
	if err := c.Noop().Wait(); err != nil {
		return nil, fmt.Errorf("NOOP: %w", err)
	}
	sec := &imap.FetchItemBodySection{Specifier: imap.PartSpecifierHeader, HeaderFields: []string{"Message-Id"}, Peek: true}
	var all imap.UIDSet
	all.AddRange(1, 0)
	res, err := c.Fetch(all, &imap.FetchOptions{UID: true, BodySection: []*imap.FetchItemBodySection{sec}}).Collect()
	if err != nil {
		return nil, fmt.Errorf("UID FETCH 1:*: %w", err)
	}
	out := make(map[imap.UID]string)
	for _, m := range res {
		h := strings.TrimSpace(string(m.FindBodySection(sec)))
		out[m.UID] = h
	}
	return out, nil
}

// TestRenumberProbe runs sessions of one user doing in-place MOVE and COPY,
// stale STOREs and failing MOVE/COPY into a missing mailbox against the real
// Dovecot, with a parallel reader, and logs every UID that no APPENDUID or
// COPYUID gave out, with Dovecot's log lines about it. It logs, it does not
// assert: it is a probe of Dovecot's maildir behaviour (issue 13).
func TestRenumberProbe(t *testing.T) {
	if os.Getenv("UNDOMAIL_RENUMBER_PROBE") == "" {
		t.Skip("probe: set UNDOMAIL_RENUMBER_PROBE=1 to run it")
	}
	s := mailstacktest.Start(t, mailstack.Options{})
	pw := s.Password("alice")
	seed := uint64(1)
	if v := os.Getenv("UNDOMAIL_RENUMBER_SEED"); v != "" {
		fmt.Sscan(v, &seed)
	}
	rng := rand.New(rand.NewPCG(seed, 0))
	const nsess = 4
	sess := make([]*imapclient.Client, nsess)
	for i := range sess {
		sess[i] = loginIMAP(t, s, "alice", pw)
	}
	known := map[imap.UID]bool{}
	next := 0
	for range 12 {
		next++
		known[probeAppend(t, sess[0], next)] = true
	}
	for _, c := range sess {
		if _, err := c.Select("INBOX", nil).Wait(); err != nil {
			t.Fatalf("SELECT: %v", err)
		}
	}
	checker := loginIMAP(t, s, "alice", pw)
	if _, err := checker.Select("INBOX", nil).Wait(); err != nil {
		t.Fatalf("SELECT: %v", err)
	}

	// Parallel readers: one with INBOX selected doing UID FETCH of a header
	// field, one doing STATUS without selecting (as undomail's side
	// connection does).
	var stop atomic.Bool
	var wg sync.WaitGroup
	if os.Getenv("UNDOMAIL_RENUMBER_NOREADER") == "" {
		r1 := loginIMAP(t, s, "alice", pw)
		r2 := loginIMAP(t, s, "alice", pw)
		if _, err := r1.Select("INBOX", nil).Wait(); err != nil {
			t.Fatalf("SELECT: %v", err)
		}
		wg.Add(2)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				if _, err := probeList(r1); err != nil {
					t.Logf("reader 1: %v", err)
					return
				}
			}
		}()
		go func() {
			defer wg.Done()
			for !stop.Load() {
				if _, err := r2.Status("INBOX", &imap.StatusOptions{NumMessages: true, UIDNext: true}).Wait(); err != nil {
					t.Logf("reader 2: %v", err)
					return
				}
			}
		}()
	}
	defer func() { stop.Store(true); wg.Wait() }()

	ops := strings.Split(os.Getenv("UNDOMAIL_RENUMBER_OPS"), ",")
	if ops[0] == "" {
		ops = []string{"move", "copy", "store", "missing", "expunge", "append", "noop"}
	}
	iters := 300
	if v := os.Getenv("UNDOMAIL_RENUMBER_ITERS"); v != "" {
		fmt.Sscan(v, &iters)
	}
	flagsets := [][]imap.Flag{{imap.FlagFlagged, "kw1"}, {imap.FlagSeen}, {"kw2"}, {imap.FlagDeleted}, {imap.FlagFlagged}, {"kw1", "kw3"}}
	storeOps := []imap.StoreFlagsOp{imap.StoreFlagsSet, imap.StoreFlagsAdd, imap.StoreFlagsDel}
	reported := map[imap.UID]bool{}
	logOffset := int64(0)
	for i := 0; i < iters; i++ {
		si := rng.IntN(nsess)
		c := sess[si]
		n := c.Mailbox().NumMessages
		op := ops[rng.IntN(len(ops))]
		if n == 0 && op != "append" && op != "noop" {
			op = "append"
		}
		// a random sequence or UID set within the session's view
		var set imap.NumSet
		var desc string
		byUID := rng.IntN(2) == 0
		lo := uint32(rng.IntN(int(max(n, 1)))) + 1
		hi := min(lo+uint32(rng.IntN(4)), n)
		if rng.IntN(5) == 0 {
			lo, hi = 1, 0
		}
		if byUID {
			// UIDs from this session's view: fetch them by sequence number
			// (does not sync expunges, RFC 3501 7.4.1).
			var ss imap.SeqSet
			if hi == 0 {
				ss.AddRange(lo, 0)
			} else {
				ss.AddRange(lo, hi)
			}
			ms, err := c.Fetch(ss, &imap.FetchOptions{UID: true}).Collect()
			if err != nil || len(ms) == 0 {
				byUID = false
			} else {
				var us imap.UIDSet
				for _, m := range ms {
					us.AddNum(m.UID)
				}
				set = us
				desc = "UID " + us.String()
			}
		}
		if !byUID {
			var ss imap.SeqSet
			if hi == 0 {
				ss.AddRange(lo, 0)
			} else {
				ss.AddRange(lo, hi)
			}
			set = ss
			desc = "SEQ " + ss.String()
		}
		var res string
		switch op {
		case "move":
			d, err := c.Move(set, "INBOX").Wait()
			if err != nil {
				res = "ERR " + err.Error()
			} else {
				if du, ok := d.DestUIDs.(imap.UIDSet); ok {
					for _, r := range du {
						for u := r.Start; u <= r.Stop && r.Stop != 0; u++ {
							known[u] = true
						}
					}
				}
				res = fmt.Sprintf("COPYUID %v -> %v", d.SourceUIDs, d.DestUIDs)
			}
		case "copy":
			d, err := c.Copy(set, "INBOX").Wait()
			if err != nil {
				res = "ERR " + err.Error()
			} else {
				for _, r := range d.DestUIDs {
					for u := r.Start; u <= r.Stop && r.Stop != 0; u++ {
						known[u] = true
					}
				}
				res = fmt.Sprintf("COPYUID %v -> %v", d.SourceUIDs, d.DestUIDs)
			}
		case "store":
			fl := flagsets[rng.IntN(len(flagsets))]
			sop := storeOps[rng.IntN(len(storeOps))]
			desc += fmt.Sprintf(" op=%v %v", sop, fl)
			_, err := c.Store(set, &imap.StoreFlags{Op: sop, Flags: fl}, nil).Collect()
			res = fmt.Sprint(err)
		case "missing":
			if rng.IntN(2) == 0 {
				_, err := c.Move(set, "F4").Wait()
				desc = "MOVE F4 " + desc
				res = fmt.Sprint(err)
			} else {
				_, err := c.Copy(set, "F4").Wait()
				desc = "COPY F4 " + desc
				res = fmt.Sprint(err)
			}
		case "expunge":
			_, err := c.Expunge().Collect()
			res = fmt.Sprint(err)
			desc = ""
		case "append":
			next++
			u := probeAppend(t, c, next)
			known[u] = true
			res = fmt.Sprintf("APPENDUID %d", u)
			desc = ""
		case "noop":
			res = fmt.Sprint(c.Noop().Wait())
			desc = ""
		}
		t.Logf("%d: s%d (view %d) %s %s: %s", i, si, n, op, desc, res)
		list, err := probeList(checker)
		if err != nil {
			t.Fatalf("checker: %v", err)
		}
		for u, id := range list {
			if !known[u] && !reported[u] {
				reported[u] = true
				t.Logf("RENUMBERED after step %d: UID %d (%s) was given by no APPENDUID/COPYUID", i, u, id)
			}
		}
		b, _ := os.ReadFile(s.DovecotLog())
		if int64(len(b)) > logOffset {
			for _, l := range strings.Split(string(b[logOffset:]), "\n") {
				if strings.Contains(l, "Warning") || strings.Contains(l, "Error") || strings.Contains(l, "reappeared") {
					t.Logf("DOVECOT: %s", l)
				}
			}
			logOffset = int64(len(b))
		}
	}
	t.Logf("renumbered UIDs: %d", len(reported))
}
