package undolog

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"
	"unicode/utf8"
)

// KindOutcome is the Kind of the record that logs a verb's result. Its Ref is
// the Seq of the intent record. Outcomes are separate records rather than an
// update of the intent because records are immutable: the hash chain stays
// append-only, and a crash between intent and outcome just leaves an intent
// without an outcome instead of a half-updated record.
const KindOutcome = "outcome"

// Record is one immutable entry of the undo log.
//
// Callers fill in Time (optional, defaults to now), User, Session, Kind, Ref,
// Blob, Users, Args and Outcome; Append assigns Seq, PrevSum and Sum.
type Record struct {
	Seq     int64           // 1, 2, 3, ... without gaps
	Time    time.Time       // when the verb happened; stored with nanosecond precision, UTC
	User    string          // user who acted ("" for system records)
	Session string          // proxy session id, to group a connection's verbs
	Kind    string          // verb kind, e.g. "smtp.submit", "imap.store", or KindOutcome
	Ref     int64           // Seq of an earlier record this one refers to, 0 if none
	Blob    string          // sha256 hex of a blob in the store, "" if none
	Users   []string        // users affected (recipients, mailbox owners); indexed for Filter.User
	Args    json.RawMessage // the verb's arguments, JSON; may be empty
	Outcome json.RawMessage // result as JSON, usually on a KindOutcome record; may be empty
	// PrevSum is the Sum of record Seq-1 (all zero for record 1). Append
	// fills it in; a record read back carries it only if it was stored
	// (logs before schema version 5): since then the column is left
	// empty, the predecessor's sum being in the predecessor, and the
	// verifiers (Check, VerifyRange, Open) take it from there.
	PrevSum [32]byte
	Sum     [32]byte // SHA-256 over PrevSum and every other field, see sum()

	// prevImplicit: read back with an empty prev_sum, which stands for
	// the Sum of record Seq-1 (see PrevSum).
	prevImplicit bool

	inline []byte     // content of an inline blob to store with the record (AttachBlob)
	packed []byte     // inline compressed, stored instead where set (pack.go)
	delta  *blobDelta // a delta blob to store with the record (AttachBlob)
}

// sumDomain starts every record hash so a v1 record sum can never be confused
// with a sum over some other encoding (a later schema version changes it).
const sumDomain = "undomail undolog record v1\x00"

// computeSum returns the SHA-256 over r.PrevSum and an unambiguous encoding of
// every other field, Seq included. Each variable-length field is length
// prefixed, so moving bytes from one field to the next changes the sum.
func (r *Record) computeSum() [32]byte {
	h := sha256.New()
	var buf [8]byte
	u64 := func(v uint64) {
		binary.BigEndian.PutUint64(buf[:], v)
		h.Write(buf[:])
	}
	bytes := func(b []byte) {
		u64(uint64(len(b)))
		h.Write(b)
	}
	str := func(s string) {
		u64(uint64(len(s)))
		h.Write([]byte(s))
	}
	h.Write([]byte(sumDomain))
	h.Write(r.PrevSum[:])
	u64(uint64(r.Seq))
	u64(uint64(r.Time.UnixNano()))
	str(r.User)
	str(r.Session)
	str(r.Kind)
	u64(uint64(r.Ref))
	str(r.Blob)
	u64(uint64(len(r.Users)))
	for _, u := range r.Users {
		str(u)
	}
	bytes(r.Args)
	bytes(r.Outcome)
	var sum [32]byte
	h.Sum(sum[:0])
	return sum
}

// validate checks what a caller can get wrong before a record is queued.
func (r *Record) validate() error {
	switch {
	case r.Kind == "":
		return fmt.Errorf("record has no kind")
	case r.Ref < 0:
		return fmt.Errorf("record kind %q: negative ref %d", r.Kind, r.Ref)
	case r.Kind == KindOutcome && r.Ref == 0:
		return fmt.Errorf("outcome record without ref to its intent")
	case len(r.Args) > 0 && !json.Valid(r.Args):
		return fmt.Errorf("record kind %q: args are not valid JSON", r.Kind)
	case len(r.Outcome) > 0 && !json.Valid(r.Outcome):
		return fmt.Errorf("record kind %q: outcome is not valid JSON", r.Kind)
	case !validUsers(r.Users):
		return fmt.Errorf("record kind %q: users must be valid UTF-8", r.Kind)
	case r.Blob != "" && !validBlobName(r.Blob):
		return fmt.Errorf("record kind %q: blob %q is not a sha256 hex name", r.Kind, r.Blob)
	}
	return nil
}

// validUsers rejects invalid UTF-8, which the JSON users column could not
// store unchanged (and the stored sum would then not recompute).
func validUsers(users []string) bool {
	for _, u := range users {
		if !utf8.ValidString(u) {
			return false
		}
	}
	return true
}

// shortHex abbreviates a sum for messages, like git does.
func shortHex(sum []byte) string {
	s := hex.EncodeToString(sum)
	if len(s) > 12 {
		return s[:12] + "..."
	}
	return s
}

// usersKey returns the set of users a record is filed under in the
// record_users index: its actor plus everyone it affected, deduplicated.
func (r *Record) usersKey() []string {
	seen := make(map[string]bool, len(r.Users)+1)
	var out []string
	for _, u := range append([]string{r.User}, r.Users...) {
		if u == "" || seen[u] {
			continue
		}
		seen[u] = true
		out = append(out, u)
	}
	return out
}
