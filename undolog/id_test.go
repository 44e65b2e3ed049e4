package undolog

import (
	"strings"
	"testing"
	"time"
)

func TestNewID(t *testing.T) {
	seen := make(map[string]bool)
	prev := NewID()
	for range 1000 {
		id := NewID()
		if len(id) != 26 {
			t.Fatalf("NewID() = %q: %d characters, want 26", id, len(id))
		}
		for _, c := range id {
			if !strings.ContainsRune(crockford, c) {
				t.Fatalf("NewID() = %q contains %q, not Crockford base32", id, c)
			}
		}
		if id[0] > '7' {
			t.Fatalf("NewID() = %q: first character carries only 3 bits", id)
		}
		if seen[id] {
			t.Fatalf("NewID() repeated %q", id)
		}
		seen[id] = true
		// The first 10 characters are the millisecond clock: never behind.
		if id[:10] < prev[:10] {
			t.Fatalf("NewID() went back in time: %q after %q", id, prev)
		}
		prev = id
	}
	a := NewID()
	time.Sleep(2 * time.Millisecond)
	if b := NewID(); b <= a {
		t.Fatalf("id %q made later sorts before %q", b, a)
	}
}

// TestNewIDTime decodes the time part: it must be now, so ids sort by time
// with other ULID implementations.
func TestNewIDTime(t *testing.T) {
	before := time.Now().UnixMilli()
	id := NewID()
	after := time.Now().UnixMilli()
	var ms int64
	for _, c := range id[:10] {
		ms = ms<<5 | int64(strings.IndexRune(crockford, c))
	}
	if ms < before || ms > after {
		t.Fatalf("NewID() = %q encodes %d ms, want between %d and %d", id, ms, before, after)
	}
}
