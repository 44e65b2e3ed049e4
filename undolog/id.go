package undolog

import (
	"crypto/rand"
	"encoding/binary"
	"time"
)

// crockford is Crockford's base32 alphabet (no I, L, O, U), as used by ULID.
const crockford = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

// NewID returns a new undo id: 26 characters of Crockford base32 encoding 48
// bits of Unix milliseconds followed by 80 random bits from crypto/rand (the
// ULID layout). Ids sort by creation time to the millisecond; ids made in the
// same millisecond are in random order. The proxy stamps it into the message
// identity header, so it must stay stable across replay.
func NewID() string {
	var b [16]byte
	ms := uint64(time.Now().UnixMilli())
	binary.BigEndian.PutUint64(b[0:8], ms<<16)
	// crypto/rand.Read never returns an error (Go 1.24+).
	rand.Read(b[6:])
	hi := binary.BigEndian.Uint64(b[0:8])
	lo := binary.BigEndian.Uint64(b[8:16])
	// 26 characters carry 130 bits; the first one holds only the top 3.
	var out [26]byte
	for i := range out {
		shift := uint(125 - 5*i)
		var v uint64
		switch {
		case shift >= 64:
			v = hi >> (shift - 64)
		case shift > 59:
			v = lo>>shift | hi<<(64-shift)
		default:
			v = lo >> shift
		}
		out[i] = crockford[v&31]
	}
	return string(out[:])
}
