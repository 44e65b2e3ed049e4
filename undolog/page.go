package undolog

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// PageQuery selects one page of verbs (intents with their outcomes) for
// the admin timeline. Zero fields do not filter.
//
// Every page is an index range scan that stops after Limit matches
// (keyset paging: the cursor is a seq, never an OFFSET), so a page costs
// the same in a log of ten thousand verbs as in one of ten million:
// a user's verbs come from record_users (user, seq), one kind's from
// records_kind (kind, seq), everything else from the rowid, and a time
// range is turned into a seq range through records_time.
type PageQuery struct {
	User string // verbs by or affecting this user
	// Users widens User to several names of one person (a login and its
	// addresses): verbs filed under any of them.
	Users     []string
	Kinds     []string  // verbs of one of these kinds
	Since     time.Time // verbs with Time >= Since
	Until     time.Time // verbs with Time < Until
	AfterSeq  int64     // verbs with Seq > AfterSeq
	BeforeSeq int64     // verbs with Seq < BeforeSeq; 0: no upper bound
	// Desc returns the newest verbs first; the next page's cursor is
	// then BeforeSeq instead of AfterSeq.
	Desc bool
	// Text keeps verbs whose arguments contain it, case-insensitively:
	// a sender, a recipient, a subject or a Message-Id of a delivery, a
	// mailbox name of an IMAP verb. Its cost grows with how rare a match
	// is, not with the log.
	Text  string
	Limit int // at most this many verbs; 0 means DefaultPageLimit
}

// DefaultPageLimit and MaxPageLimit bound PageQuery.Limit.
const (
	DefaultPageLimit = 100
	MaxPageLimit     = 5000
)

// Page is one page of verbs in the order asked for.
type Page struct {
	Verbs []Verb
	// Next is the cursor of the following page (AfterSeq, or BeforeSeq
	// with Desc); 0 when this page was the last.
	Next int64
}

// Page returns one page of verbs matching q.
func (l *Log) Page(ctx context.Context, q PageQuery) (Page, error) {
	if q.Limit <= 0 {
		q.Limit = DefaultPageLimit
	}
	q.Limit = min(q.Limit, MaxPageLimit)
	lo, hi, empty, err := l.seqRange(ctx, q)
	if err != nil {
		return Page{}, fmt.Errorf("page of undo log %s: %w", l.dir, err)
	}
	if empty {
		return Page{}, nil
	}
	var verbs []Verb
	users := q.Users
	if q.User != "" {
		users = append([]string{q.User}, users...)
	}
	if len(users) > 1 || len(users) == 0 && len(q.Kinds) > 1 {
		// One index scan per user or per kind, merged: an IN over an
		// index would make SQLite sort every match before the LIMIT.
		var parts []PageQuery
		for _, u := range users {
			part := q
			part.User = u
			parts = append(parts, part)
		}
		if len(users) == 0 {
			for _, k := range q.Kinds {
				part := q
				part.Kinds = []string{k}
				parts = append(parts, part)
			}
		}
		for _, part := range parts {
			vs, err := l.pageQuery(ctx, part, lo, hi, part.Kinds)
			if err != nil {
				return Page{}, err
			}
			verbs = append(verbs, vs...)
		}
		slices.SortFunc(verbs, func(a, b Verb) int {
			if q.Desc {
				return cmp.Compare(b.Seq, a.Seq)
			}
			return cmp.Compare(a.Seq, b.Seq)
		})
		verbs = slices.CompactFunc(verbs, func(a, b Verb) bool { return a.Seq == b.Seq })
		if len(verbs) > q.Limit {
			verbs = verbs[:q.Limit]
		}
	} else {
		if len(users) == 1 {
			q.User = users[0]
		}
		if verbs, err = l.pageQuery(ctx, q, lo, hi, q.Kinds); err != nil {
			return Page{}, err
		}
	}
	p := Page{Verbs: verbs}
	if len(verbs) == q.Limit {
		p.Next = verbs[len(verbs)-1].Seq
	}
	return p, nil
}

// seqRange narrows q to lo < seq < hi (hi 0: unbounded), turning the
// time bounds into seq bounds (timeBounds); the time conditions stay in
// the query as well, so a record whose clock stepped back (logs before
// schema version 5) is never shown outside the range.
func (l *Log) seqRange(ctx context.Context, q PageQuery) (lo, hi int64, empty bool, err error) {
	sb, empty, err := l.timeBounds(ctx, q.Since, q.Until)
	if err != nil || empty {
		return 0, 0, empty, err
	}
	lo, hi = max(q.AfterSeq, sb.lo), q.BeforeSeq
	if sb.hi != 0 && (hi == 0 || sb.hi < hi) {
		hi = sb.hi
	}
	if hi != 0 && hi <= lo+1 {
		return 0, 0, true, nil
	}
	return lo, hi, false, nil
}

// seqBounds are lo < seq < hi (0: unbounded).
type seqBounds struct{ lo, hi int64 }

// timeBounds turns a time range (zero times: unbounded) into the seqs
// that hold it. Records are appended in time order, so the first record
// at or after a time bounds the seqs; callers keep the time conditions
// in their query as well. empty: no record can be in the range.
func (l *Log) timeBounds(ctx context.Context, since, until time.Time) (sb seqBounds, empty bool, err error) {
	if !since.IsZero() {
		seq, ok, err := l.firstAt(ctx, since)
		if err != nil {
			return sb, false, err
		}
		if !ok {
			return sb, true, nil
		}
		sb.lo = seq - 1
	}
	if !until.IsZero() {
		seq, ok, err := l.firstAt(ctx, until)
		if err != nil {
			return sb, false, err
		}
		if ok {
			sb.hi = seq
		}
	}
	return sb, sb.hi != 0 && sb.hi <= sb.lo+1, nil
}

// firstAt returns the first record whose time is t or later, bisecting
// the seqs: record times do not go backwards (the committer sees to it;
// in logs written before schema version 5 they could by microseconds,
// and the time conditions kept in the query cover that).
func (l *Log) firstAt(ctx context.Context, t time.Time) (int64, bool, error) {
	var lo, hi sql.NullInt64
	if err := l.db.QueryRowContext(ctx, `SELECT min(seq), max(seq) FROM records`).Scan(&lo, &hi); err != nil {
		return 0, false, err
	}
	if !lo.Valid {
		return 0, false, nil
	}
	at := func(seq int64) (int64, error) {
		// The first record at or after seq: seqs have no gaps, except
		// in a damaged log.
		var nanos int64
		err := l.db.QueryRowContext(ctx, `SELECT time FROM records WHERE seq >= ? ORDER BY seq LIMIT 1`, seq).Scan(&nanos)
		return nanos, err
	}
	want := t.UnixNano()
	if last, err := at(hi.Int64); err != nil || last < want {
		return 0, false, err
	}
	// Invariant: time(hi) >= want; every seq below lo is earlier.
	a, b := lo.Int64, hi.Int64
	for a < b {
		m := a + (b-a)/2
		nanos, err := at(m)
		if err != nil {
			return 0, false, err
		}
		if nanos >= want {
			b = m
		} else {
			a = m + 1
		}
	}
	return a, true, nil
}

// pageQuery runs one index range scan for q restricted to kinds (at
// most one kind unless a user drives the scan).
func (l *Log) pageQuery(ctx context.Context, q PageQuery, lo, hi int64, kinds []string) ([]Verb, error) {
	query, args := pageSQL(q, lo, hi, kinds)
	out, err := l.queryVerbs(ctx, query, args)
	if err != nil {
		return nil, fmt.Errorf("page of undo log %s: %w", l.dir, err)
	}
	return out, nil
}

// pageSQL is the query of pageQuery.
func pageSQL(q PageQuery, lo, hi int64, kinds []string) (string, []any) {
	var b strings.Builder
	var where []string
	var args []any
	seqCol := "r.seq"
	b.WriteString("SELECT " + recordCols + ", " + outcomeCols + " FROM ")
	switch {
	case q.User != "":
		seqCol = "u.seq"
		b.WriteString("record_users u JOIN records r ON r.seq = u.seq ")
		where = append(where, "u.user = ?")
		args = append(args, q.User)
	case len(kinds) == 1:
		// INDEXED BY: the kind index holds (kind, seq), so this is a
		// range scan in seq order however common the kind is.
		b.WriteString("records r INDEXED BY records_kind ")
	default:
		b.WriteString("records r ")
	}
	b.WriteString(`LEFT JOIN records o ON o.seq = (SELECT min(x.seq) FROM records x WHERE x.kind = 'outcome' AND x.ref = r.seq)`)
	if lo > 0 {
		where = append(where, seqCol+" > ?")
		args = append(args, lo)
	}
	if hi > 0 {
		where = append(where, seqCol+" < ?")
		args = append(args, hi)
	}
	if !q.Since.IsZero() {
		where = append(where, "r.time >= ?")
		args = append(args, q.Since.UnixNano())
	}
	if !q.Until.IsZero() {
		where = append(where, "r.time < ?")
		args = append(args, q.Until.UnixNano())
	}
	switch len(kinds) {
	case 0:
		where = append(where, "r.kind != 'outcome'")
	case 1:
		// A page lists verbs: kind != 'outcome' holds, and lets SQLite use
		// records_kind, which leaves outcomes out (migrate.go).
		where = append(where, "r.kind = ?", "r.kind != 'outcome'")
		args = append(args, kinds[0])
	default:
		where = append(where, "r.kind IN (?"+strings.Repeat(", ?", len(kinds)-1)+")", "r.kind != 'outcome'")
		for _, k := range kinds {
			args = append(args, k)
		}
	}
	if q.Text != "" {
		where = append(where, "instr(lower(CAST(r.args AS TEXT)), ?) > 0")
		args = append(args, strings.ToLower(q.Text))
	}
	b.WriteString(" WHERE " + strings.Join(where, " AND "))
	b.WriteString(" ORDER BY " + seqCol)
	if q.Desc {
		b.WriteString(" DESC")
	}
	b.WriteString(" LIMIT ?")
	args = append(args, q.Limit)
	return b.String(), args
}

// Addresses returns the names verbs are filed under that are login's
// addresses (login@domain), so a search for a login finds the mail
// delivered to it. Each name costs one index seek.
func (l *Log) Addresses(ctx context.Context, login string) ([]string, error) {
	if login == "" || strings.Contains(login, "@") {
		return nil, nil
	}
	var out []string
	from := login + "@"
	for len(out) < 100 {
		var u string
		err := l.db.QueryRowContext(ctx, `SELECT user FROM record_users WHERE user > ? AND user < ? ORDER BY user LIMIT 1`,
			from, login+"A").Scan(&u) // "A" sorts right after "@"
		if errors.Is(err, sql.ErrNoRows) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("addresses of %s in undo log %s: %w", login, l.dir, err)
		}
		out = append(out, u)
		from = u // user > u skips every record of u: the next name
	}
	return out, nil
}

// Verb returns the verb with this seq and its outcome; ok is false if
// there is none (or seq is an outcome record).
func (l *Log) Verb(ctx context.Context, seq int64) (v Verb, ok bool, err error) {
	p, err := l.Page(ctx, PageQuery{AfterSeq: seq - 1, BeforeSeq: seq + 1, Limit: 1})
	if err != nil || len(p.Verbs) == 0 {
		return Verb{}, false, err
	}
	return p.Verbs[0], true, nil
}

// Size is the bytes the log's database takes on disk, write-ahead log
// included (message blobs in files are not counted).
func (l *Log) Size() int64 {
	var n int64
	for _, suffix := range []string{"", "-wal"} {
		if fi, err := os.Stat(filepath.Join(l.dir, dbName+suffix)); err == nil {
			n += fi.Size()
		}
	}
	return n
}

// CountKinds counts the verbs (not outcomes) of each kind with
// afterSeq < seq <= upTo, for counters kept up to date incrementally.
func (l *Log) CountKinds(ctx context.Context, afterSeq, upTo int64) (map[string]int64, error) {
	rows, err := l.db.QueryContext(ctx, `SELECT kind, count(*) FROM records WHERE seq > ? AND seq <= ? AND kind != 'outcome' GROUP BY kind`, afterSeq, upTo)
	if err != nil {
		return nil, fmt.Errorf("count verbs in undo log %s: %w", l.dir, err)
	}
	defer rows.Close()
	out := map[string]int64{}
	for rows.Next() {
		var k string
		var n int64
		if err := rows.Scan(&k, &n); err != nil {
			return nil, fmt.Errorf("count verbs in undo log %s: %w", l.dir, err)
		}
		out[k] = n
	}
	return out, rows.Err()
}
