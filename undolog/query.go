package undolog

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Filter selects records. Zero fields do not filter.
type Filter struct {
	User     string    // records by this user or affecting them (Record.User or Record.Users)
	Since    time.Time // records with Time >= Since
	Until    time.Time // records with Time < Until
	Kinds    []string  // records of one of these kinds
	AfterSeq int64     // records with Seq > AfterSeq: pass the last Seq of a page to get the next
	Limit    int       // at most this many records (intents for Verbs)
	UndoID   string    // records whose Args carry this "undo_id" (a message's identity)
}

// undoIDExpr extracts a record's undo id from its JSON arguments. The same
// expression, character for character, indexes records_undo_id: SQLite uses
// an expression index only for the identical expression. Arguments that are
// not JSON yield NULL rather than an error, so they can never block an
// insert.
const undoIDExpr = `(CASE WHEN json_valid(CAST(args AS TEXT)) THEN json_extract(CAST(args AS TEXT), '$.undo_id') END)`

// Verb is an intent record with the outcome record that refers to it.
// Outcome is nil if none was logged, e.g. the process crashed in between or
// the verb is still in flight. Note that Verb.Outcome shadows the embedded
// Record.Outcome field (the JSON result carried by a record itself).
type Verb struct {
	Record
	Outcome *Record
}

// recordCols lists the columns scanRecord reads, for table alias r.
const recordCols = `r.seq, r.time, r.user, r.session, r.kind, r.ref, r.blob, r.users, r.args, r.outcome, r.prev_sum, r.sum`

// outcomeCols are the same columns of the LEFT JOINed outcome o, with NULLs
// (no outcome) mapped to zero values so one scan function serves both.
const outcomeCols = `COALESCE(o.seq, 0), COALESCE(o.time, 0), COALESCE(o.user, ''), COALESCE(o.session, ''),
	COALESCE(o.kind, ''), COALESCE(o.ref, 0), COALESCE(o.blob, ''), COALESCE(o.users, '[]'),
	COALESCE(o.args, x''), COALESCE(o.outcome, x''), COALESCE(o.prev_sum, x''), COALESCE(o.sum, x'')`

// firstByUndoIDQuery drives the look-up from the undo id index (see
// buildQuery for the CROSS JOIN).
const firstByUndoIDQuery = `SELECT r.seq, r.blob FROM (SELECT seq AS useq FROM records WHERE ` + undoIDExpr + ` = ?) ux
	CROSS JOIN records r ON r.seq = ux.useq WHERE r.kind = ? ORDER BY r.seq LIMIT 1`

// FirstByUndoID returns the seq and blob of the first record of kind
// whose arguments carry undoID; ok is false if there is none. It is
// Records(Filter{UndoID: undoID, Kinds: {kind}, Limit: 1}) without reading
// and decoding the whole record, for a look-up on the delivery path.
func (l *Log) FirstByUndoID(ctx context.Context, undoID, kind string) (seq int64, blob string, ok bool, err error) {
	err = l.db.QueryRowContext(ctx, firstByUndoIDQuery, undoID, kind).Scan(&seq, &blob)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return 0, "", false, nil
	case err != nil:
		return 0, "", false, fmt.Errorf("look up %s %s in undo log %s: %w", kind, undoID, l.dir, err)
	}
	return seq, blob, true, nil
}

// Records returns the records matching f in seq order.
func (l *Log) Records(ctx context.Context, f Filter) ([]Record, error) {
	sb, empty, err := l.timeBounds(ctx, f.Since, f.Until)
	if err != nil || empty {
		return nil, err
	}
	q, args := buildQuery(f, sb, recordCols, "", "")
	rows, err := l.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("query undo log %s: %w", l.dir, err)
	}
	defer rows.Close()
	var out []Record
	for rows.Next() {
		var r Record
		sc := scanInto(&r)
		if err := rows.Scan(sc.dest()...); err != nil {
			return nil, fmt.Errorf("query undo log %s: %w", l.dir, err)
		}
		if err := sc.finish(); err != nil {
			return nil, fmt.Errorf("query undo log %s: %w", l.dir, err)
		}
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("query undo log %s: %w", l.dir, err)
	}
	return out, nil
}

// Verbs returns the intent records (Kind != KindOutcome) matching f in seq
// order, each joined with its outcome record (the first one, should a verb
// have been given several). Filter applies to the intents only.
func (l *Log) Verbs(ctx context.Context, f Filter) ([]Verb, error) {
	sb, empty, err := l.timeBounds(ctx, f.Since, f.Until)
	if err != nil || empty {
		return nil, err
	}
	q, args := buildQuery(f, sb, recordCols+", "+outcomeCols,
		`LEFT JOIN records o ON o.seq = (SELECT min(x.seq) FROM records x WHERE x.kind = 'outcome' AND x.ref = r.seq)`,
		`r.kind != 'outcome'`)
	out, err := l.queryVerbs(ctx, q, args)
	if err != nil {
		return nil, fmt.Errorf("query verbs in undo log %s: %w", l.dir, err)
	}
	return out, nil
}

// queryVerbs runs a query selecting recordCols then outcomeCols and
// scans each row into a verb with its outcome (none when o.seq is 0).
func (l *Log) queryVerbs(ctx context.Context, q string, args []any) ([]Verb, error) {
	rows, err := l.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Verb
	for rows.Next() {
		var v Verb
		var o Record
		vs, oscan := scanInto(&v.Record), scanInto(&o)
		if err := rows.Scan(append(vs.dest(), oscan.dest()...)...); err != nil {
			return nil, err
		}
		if err := vs.finish(); err != nil {
			return nil, err
		}
		if o.Seq != 0 {
			if err := oscan.finish(); err != nil {
				return nil, err
			}
			v.Outcome = &o
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// buildQuery turns f into SQL over records r. A user filter drives the query
// from the record_users primary key (user, seq), so a user's timeline is an
// index range scan already in seq order; otherwise the rowid (seq) is the
// order and AfterSeq a range on it. Time bounds are seq bounds (sb, from
// Log.timeBounds); kind has its own index.
func buildQuery(f Filter, sb seqBounds, cols, join, cond string) (string, []any) {
	var b strings.Builder
	var where []string
	var args []any
	seqCol := "r.seq"
	switch {
	case f.UndoID != "":
		// An undo id names a handful of records: drive the query from its
		// index (CROSS JOIN fixes the loop order in SQLite), whatever the
		// other filters; left to itself the planner may prefer the kind
		// index and read every record of that kind.
		b.WriteString("SELECT " + cols + " FROM (SELECT seq AS useq FROM records WHERE " + undoIDExpr + " = ?) ux CROSS JOIN records r ON r.seq = ux.useq ")
		args = append(args, f.UndoID)
		if f.User != "" {
			where = append(where, "r.seq IN (SELECT seq FROM record_users WHERE user = ?)")
			args = append(args, f.User)
		}
	case f.User != "":
		seqCol = "u.seq"
		b.WriteString("SELECT " + cols + " FROM record_users u JOIN records r ON r.seq = u.seq ")
		where = append(where, "u.user = ?")
		args = append(args, f.User)
	default:
		b.WriteString("SELECT " + cols + " FROM records r ")
	}
	b.WriteString(join)
	if lo := max(f.AfterSeq, sb.lo); lo > 0 {
		where = append(where, seqCol+" > ?")
		args = append(args, lo)
	}
	if sb.hi > 0 {
		where = append(where, seqCol+" < ?")
		args = append(args, sb.hi)
	}
	if !f.Since.IsZero() {
		where = append(where, "r.time >= ?")
		args = append(args, f.Since.UnixNano())
	}
	if !f.Until.IsZero() {
		where = append(where, "r.time < ?")
		args = append(args, f.Until.UnixNano())
	}
	if len(f.Kinds) > 0 {
		where = append(where, "r.kind IN (?"+strings.Repeat(", ?", len(f.Kinds)-1)+")")
		for _, k := range f.Kinds {
			args = append(args, k)
		}
		if !slices.Contains(f.Kinds, KindOutcome) {
			// Lets SQLite use records_kind, which leaves outcomes out.
			where = append(where, "r.kind != 'outcome'")
		}
	}
	if cond != "" {
		where = append(where, cond)
	}
	if len(where) > 0 {
		b.WriteString(" WHERE " + strings.Join(where, " AND "))
	}
	b.WriteString(" ORDER BY " + seqCol)
	if f.Limit > 0 {
		b.WriteString(" LIMIT ?")
		args = append(args, f.Limit)
	}
	return b.String(), args
}

// recordScan scans one row of recordCols into a Record.
type recordScan struct {
	r       *Record
	nanos   int64
	users   string
	prevSum []byte
	sum     []byte
	// args and outcome are scanned as plain []byte: database/sql converts
	// a TEXT value (a row edited by hand) into []byte but not into
	// json.RawMessage, and such a row must reach the checksum comparison.
	args, outcome []byte
}

// scanInto prepares scanning into r; pass dest() to Scan, then call finish.
func scanInto(r *Record) *recordScan { return &recordScan{r: r} }

// dest returns Scan destinations in recordCols order.
func (s *recordScan) dest() []any {
	r := s.r
	return []any{&r.Seq, &s.nanos, &r.User, &r.Session, &r.Kind, &r.Ref, &r.Blob, &s.users, &s.args, &s.outcome, &s.prevSum, &s.sum}
}

// finish decodes the columns Scan could not fill in directly. Sums of the
// wrong length (a tampered row) are copied as far as they go, so the checksum
// comparison, not the scan, reports them.
func (s *recordScan) finish() error {
	r := s.r
	r.Time = time.Unix(0, s.nanos).UTC()
	copy(r.PrevSum[:], s.prevSum)
	r.prevImplicit = len(s.prevSum) == 0
	copy(r.Sum[:], s.sum)
	r.Args, r.Outcome = nil, nil
	if len(s.args) > 0 {
		r.Args = s.args
	}
	if len(s.outcome) > 0 {
		r.Outcome = s.outcome
	}
	users, err := decodeUsers(s.users)
	if err != nil {
		return fmt.Errorf("record %d: %w", r.Seq, err)
	}
	r.Users = users
	return nil
}

// lastRecord reads the record with the highest seq.
func lastRecord(ctx context.Context, db *sql.DB) (Record, bool, error) {
	var r Record
	sc := scanInto(&r)
	err := db.QueryRowContext(ctx, `SELECT `+recordCols+` FROM records r ORDER BY r.seq DESC LIMIT 1`).Scan(sc.dest()...)
	if errors.Is(err, sql.ErrNoRows) {
		return Record{}, false, nil
	}
	if err != nil {
		return Record{}, false, fmt.Errorf("read last record: %w", err)
	}
	if err := sc.finish(); err != nil {
		return Record{}, false, fmt.Errorf("read last record: %w", err)
	}
	return r, true, nil
}

// encodeUsers stores Users as a JSON array. Order is kept: it is hashed.
func encodeUsers(users []string) string {
	if len(users) == 0 {
		return "[]"
	}
	// Cannot fail, and round-trips exactly: validate rejects invalid UTF-8,
	// the one thing json.Marshal would silently rewrite.
	b, _ := json.Marshal(users)
	return string(b)
}

func decodeUsers(s string) ([]string, error) {
	var users []string
	if err := json.Unmarshal([]byte(s), &users); err != nil {
		return nil, fmt.Errorf("users column %q: %w", s, err)
	}
	if len(users) == 0 {
		return nil, nil
	}
	return users, nil
}
