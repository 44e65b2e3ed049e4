package imapwire

import (
	"fmt"
	"testing"
)

func TestParseSeqSet(t *testing.T) {
	tests := []struct {
		in   string
		want string
	}{
		{"1", "[1]"},
		{"1:3,5,7:*", "[1:3 5 7:*]"},
		{"4:2", "[2:4]"},
		{"*:4", "[4:*]"},
		{"*", "[*]"},
		{"304,319:320", "[304 319:320]"},
		{"4294967295", "[4294967295]"},
	}
	for _, tt := range tests {
		got, err := ParseSeqSet(tt.in)
		if err != nil {
			t.Fatalf("ParseSeqSet(%q): %v", tt.in, err)
		}
		if s := fmt.Sprint(got); s != tt.want {
			t.Fatalf("ParseSeqSet(%q) = %s, want %s", tt.in, s, tt.want)
		}
	}
	for _, bad := range []string{"", "0", "1:", ":2", "1,,2", "$", "4294967296", "1:3:5", "a", "01"} {
		if got, err := ParseSeqSet(bad); err == nil {
			t.Fatalf("ParseSeqSet(%q) = %v, want an error", bad, got)
		}
	}
}

func TestSeqRangeContains(t *testing.T) {
	set, err := ParseSeqSet("2:4,10:*")
	if err != nil {
		t.Fatal(err)
	}
	in := func(n, largest uint32) bool {
		for _, r := range set {
			if r.Contains(n, largest) {
				return true
			}
		}
		return false
	}
	for _, tt := range []struct {
		n, largest uint32
		want       bool
	}{{1, 20, false}, {2, 20, true}, {4, 20, true}, {5, 20, false}, {10, 20, true}, {20, 20, true},
		// "10:*" with 7 messages is "7:10" (RFC 9051 section 9, seq-range).
		{7, 7, true}, {6, 7, false}} {
		if got := in(tt.n, tt.largest); got != tt.want {
			t.Fatalf("%d in 2:4,10:* with * = %d: %v, want %v", tt.n, tt.largest, got, tt.want)
		}
	}
}
