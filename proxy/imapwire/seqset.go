package imapwire

import (
	"fmt"
	"strconv"
	"strings"
)

// Star stands for "*" in a [SeqRange]: the largest number in use in the
// mailbox (RFC 9051 section 9, seq-number). Real numbers are never 0.
const Star uint32 = 0

// SeqRange is one element of a sequence set: the numbers from Start to Stop
// inclusive. A single number has Start == Stop. Either end may be [Star];
// ranges are stored with the smaller end first, Star counting as largest,
// since "2:4" and "4:2" are equivalent.
type SeqRange struct {
	Start, Stop uint32
}

// Contains reports whether n is in the range, given the largest number in
// use that "*" stands for.
func (r SeqRange) Contains(n, largest uint32) bool {
	start, stop := r.Start, r.Stop
	if start == Star {
		start = largest
	}
	if stop == Star {
		stop = largest
	}
	if start > stop {
		start, stop = stop, start
	}
	return start <= n && n <= stop
}

// String formats the range as in a sequence set.
func (r SeqRange) String() string {
	if r.Start == r.Stop {
		return seqNum(r.Start)
	}
	return seqNum(r.Start) + ":" + seqNum(r.Stop)
}

func seqNum(n uint32) string {
	if n == Star {
		return "*"
	}
	return strconv.FormatUint(uint64(n), 10)
}

// ParseSeqSet parses a sequence set such as "1:3,5,7:*" (RFC 9051 section 9,
// sequence-set), as found in an Atom argument, a COPYUID or APPENDUID code
// or a VANISHED response. The SEARCHRES marker "$" (RFC 5182) is not a
// sequence set and gives an error; callers check for it first.
func ParseSeqSet(s string) ([]SeqRange, error) {
	if s == "" {
		return nil, fmt.Errorf("imapwire: parse sequence set: empty")
	}
	var out []SeqRange
	for _, elem := range strings.Split(s, ",") {
		lo, hi, isRange := strings.Cut(elem, ":")
		a, err := parseSeqNum(lo)
		if err != nil {
			return nil, fmt.Errorf("imapwire: parse sequence set %q: %w", s, err)
		}
		b := a
		if isRange {
			if b, err = parseSeqNum(hi); err != nil {
				return nil, fmt.Errorf("imapwire: parse sequence set %q: %w", s, err)
			}
		}
		if a == Star || (b != Star && b < a) {
			a, b = b, a
		}
		out = append(out, SeqRange{Start: a, Stop: b})
	}
	return out, nil
}

// parseSeqNum parses seq-number = nz-number / "*".
func parseSeqNum(s string) (uint32, error) {
	if s == "*" {
		return Star, nil
	}
	if !isDigits(s) || s[0] == '0' {
		return 0, fmt.Errorf("%q is not a nonzero number or \"*\"", s)
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("%q does not fit in 32 bits", s)
	}
	return uint32(n), nil
}
