package undolog

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"
)

// fillLog appends verbs from..to-1 (each with an outcome every other
// verb) by users u0..u9, of kinds k0..k4, one second apart from t0.
func fillLog(tb testing.TB, l *Log, from, to int, t0 time.Time) {
	tb.Helper()
	ctx := context.Background()
	const batch = 2000
	var recs []*Record
	flush := func() {
		if err := l.AppendNoSync(ctx, recs...); err != nil {
			tb.Fatalf("append: %v", err)
		}
		recs = recs[:0]
	}
	for i := from; i < to; i++ {
		recs = append(recs, &Record{
			Time: t0.Add(time.Duration(i) * time.Second), User: fmt.Sprintf("u%d", i%10), Session: "s",
			Kind: fmt.Sprintf("k%d", i%5), Users: []string{fmt.Sprintf("u%d", (i+1)%10)},
			Args: []byte(fmt.Sprintf(`{"header":{"subject":"message %d"}}`, i)),
		})
		if len(recs) == batch {
			flush()
		}
	}
	if len(recs) > 0 {
		flush()
	}
}

func TestPage(t *testing.T) {
	l, err := Open(t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	t0 := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	fillLog(t, l, 0, 200, t0)
	// An outcome for verb 1: it must be joined, and never be a verb.
	if err := l.Append(context.Background(), &Record{Kind: KindOutcome, Ref: 1, User: "u0", Outcome: []byte(`{"status":"OK"}`)}); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	seqs := func(p Page) []int64 {
		var s []int64
		for _, v := range p.Verbs {
			s = append(s, v.Seq)
		}
		return s
	}
	// Walk all of u3's k3 verbs page by page: u3 acts in verbs 3, 13, ...
	// (seq = i+1) and is affected by verbs 2, 12, ...; k3 is i%5 == 3.
	var want []int64
	for i := 0; i < 200; i++ {
		if (i%10 == 3 || (i+1)%10 == 3) && i%5 == 3 {
			want = append(want, int64(i+1))
		}
	}
	var got []int64
	q := PageQuery{User: "u3", Kinds: []string{"k3"}, Limit: 7}
	for pages := 0; ; pages++ {
		p, err := l.Page(ctx, q)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, seqs(p)...)
		if p.Next == 0 {
			break
		}
		q.AfterSeq = p.Next
		if pages > 100 {
			t.Fatal("paging does not end")
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("u3's k3 verbs: got %v, want %v", got, want)
	}
	// Two kinds, newest first, in a time range and a seq range.
	p, err := l.Page(ctx, PageQuery{Kinds: []string{"k1", "k2"}, Since: t0.Add(100 * time.Second), Until: t0.Add(120 * time.Second), Desc: true, Limit: 5})
	if err != nil {
		t.Fatal(err)
	}
	if g, w := fmt.Sprint(seqs(p)), "[118 117 113 112 108]"; g != w || p.Next != 108 {
		t.Fatalf("k1,k2 in [100s,120s) newest first: got %s next %d, want %s next 108", g, p.Next, w)
	}
	p, err = l.Page(ctx, PageQuery{AfterSeq: 10, BeforeSeq: 14})
	if err != nil {
		t.Fatal(err)
	}
	if g := fmt.Sprint(seqs(p)); g != "[11 12 13]" || p.Next != 0 {
		t.Fatalf("seq range (10,14): got %s next %d", g, p.Next)
	}
	p, err = l.Page(ctx, PageQuery{Text: "MESSAGE 17"})
	if err != nil {
		t.Fatal(err)
	}
	if g := fmt.Sprint(seqs(p)); g != "[18 171 172 173 174 175 176 177 178 179 180]" {
		t.Fatalf("text search: got %s", g)
	}
	v, ok, err := l.Verb(ctx, 1)
	if err != nil || !ok || v.Outcome == nil || string(v.Outcome.Outcome) != `{"status":"OK"}` {
		t.Fatalf("verb 1: %+v %v %v, want it with its outcome", v, ok, err)
	}
	if _, ok, _ := l.Verb(ctx, 201); ok {
		t.Fatal("the outcome record 201 was returned as a verb")
	}
}

// BenchmarkPage measures a filtered page (one user, one kind, a time
// range, 100 verbs) in logs of 10^4, 10^5 and 10^6 verbs. Keyset paging
// over indexes keeps it flat: compare ns/op across the sizes.
func BenchmarkPage(b *testing.B) {
	l, err := Open(b.TempDir(), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	have := 0
	for _, n := range []int{1e4, 1e5, 1e6} {
		fillLog(b, l, have, n, t0)
		have = n
		// The page sits in the middle of the log: the last week before
		// the midpoint, for one user and kind, newest first.
		mid := t0.Add(time.Duration(n/2) * time.Second)
		queries := map[string]PageQuery{
			"user+kind+time": {User: "u3", Kinds: []string{"k3"}, Since: mid.Add(-7 * 24 * time.Hour), Until: mid, Desc: true},
			"kind":           {Kinds: []string{"k2"}, AfterSeq: int64(n / 2)},
			"kinds+time":     {Kinds: []string{"k1", "k4"}, Since: mid},
		}
		for _, name := range []string{"user+kind+time", "kind", "kinds+time"} {
			q := queries[name]
			b.Run(fmt.Sprintf("%s/verbs=%d", name, n), func(b *testing.B) {
				for b.Loop() {
					p, err := l.Page(context.Background(), q)
					if err != nil {
						b.Fatal(err)
					}
					if len(p.Verbs) != DefaultPageLimit {
						b.Fatalf("got %d verbs, want a full page", len(p.Verbs))
					}
				}
			})
		}
	}
}

func TestPageUsers(t *testing.T) {
	l, err := Open(t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx := context.Background()
	recs := []*Record{
		{User: "alice", Kind: "imap.create"},                                 // 1
		{Kind: "lmtp.deliver", Users: []string{"alice@example.test"}},        // 2
		{User: "bob", Kind: "imap.create"},                                   // 3
		{Kind: "lmtp.deliver", Users: []string{"alice@other.test", "bob@x"}}, // 4
		{Kind: "lmtp.deliver", Users: []string{"alicexyz@example.test"}},     // 5
		{User: "alice", Kind: "imap.delete"},                                 // 6
	}
	if err := l.Append(ctx, recs...); err != nil {
		t.Fatal(err)
	}
	addrs, err := l.Addresses(ctx, "alice")
	if err != nil || fmt.Sprint(addrs) != "[alice@example.test alice@other.test]" {
		t.Fatalf("alice's addresses: %v %v", addrs, err)
	}
	var got []int64
	q := PageQuery{User: "alice", Users: addrs, Limit: 2}
	for {
		p, err := l.Page(ctx, q)
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range p.Verbs {
			got = append(got, v.Seq)
		}
		if p.Next == 0 {
			break
		}
		q.AfterSeq = p.Next
	}
	if fmt.Sprint(got) != "[1 2 4 6]" {
		t.Fatalf("alice under her login and addresses: %v, want [1 2 4 6]", got)
	}
	p, err := l.Page(ctx, PageQuery{User: "alice", Users: addrs, Kinds: []string{"lmtp.deliver"}, Desc: true})
	if err != nil || len(p.Verbs) != 2 || p.Verbs[0].Seq != 4 || p.Verbs[1].Seq != 2 {
		t.Fatalf("alice's deliveries newest first: %+v %v", p.Verbs, err)
	}
}

// TestPagePlans checks the query plan of every page shape: each is driven
// by an index in the order asked for, so SQLite stops after the page's
// rows, and none sorts its matches (a TEMP B-TREE would read them all).
// This is why a page costs the same in a log of any size; BenchmarkPage
// measures it.
func TestPagePlans(t *testing.T) {
	l, err := Open(t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	fillLog(t, l, 0, 2000, time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	since := time.Date(2026, 1, 1, 0, 10, 0, 0, time.UTC)
	for _, c := range []struct {
		name   string
		q      PageQuery
		lo, hi int64
		kinds  []string
		want   string // the driving index
	}{
		{"all", PageQuery{Limit: 100}, 0, 0, nil, "SCAN r"},
		{"all after", PageQuery{Limit: 100}, 500, 0, nil, "SEARCH r USING INTEGER PRIMARY KEY (rowid>?)"},
		{"time range newest first", PageQuery{Since: since, Until: since.Add(time.Hour), Desc: true, Limit: 100}, 599, 1200, nil, "SEARCH r USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)"},
		{"user", PageQuery{User: "u3", Limit: 100}, 0, 0, nil, "SEARCH u USING PRIMARY KEY (user=?)"},
		{"user kind range text", PageQuery{User: "u3", Text: "message", Desc: true, Limit: 100}, 10, 1500, []string{"k3"}, "SEARCH u USING PRIMARY KEY (user=? AND seq>? AND seq<?)"},
		{"user kinds", PageQuery{User: "u3", Limit: 100}, 0, 0, []string{"k3", "k4"}, "SEARCH u USING PRIMARY KEY (user=?)"},
		{"kind", PageQuery{Limit: 100}, 0, 0, []string{"k2"}, "SEARCH r USING INDEX records_kind (kind=?)"},
		{"kind range newest first", PageQuery{Desc: true, Limit: 100}, 100, 900, []string{"k2"}, "SEARCH r USING INDEX records_kind (kind=? AND rowid>? AND rowid<?)"},
	} {
		query, args := pageSQL(c.q, c.lo, c.hi, c.kinds)
		rows, err := l.db.Query("EXPLAIN QUERY PLAN "+query, args...)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		var plan []string
		for rows.Next() {
			var id, parent, unused int
			var detail string
			if err := rows.Scan(&id, &parent, &unused, &detail); err != nil {
				t.Fatal(err)
			}
			plan = append(plan, detail)
		}
		rows.Close()
		all := strings.Join(plan, "\n")
		if len(plan) == 0 || plan[0] != c.want || strings.Contains(all, "TEMP B-TREE") {
			t.Errorf("%s: plan\n%s\nwant it driven by %q, without a TEMP B-TREE", c.name, all, c.want)
		}
	}
}
