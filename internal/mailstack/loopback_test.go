package mailstack

import (
	"net"
	"strconv"
	"strings"
	"testing"
)

// TestClaimHostExclusive checks that claimed addresses are distinct, outside
// 127.0.x.x, and that nobody can claim one while it is held: the property
// that keeps parallel test stacks apart.
func TestClaimHostExclusive(t *testing.T) {
	seen := map[string]bool{}
	var hosts []*Host
	for range 40 {
		h, err := ClaimHost(10143)
		if err != nil {
			t.Fatal(err)
		}
		hosts = append(hosts, h)
		if seen[h.IP] {
			t.Fatalf("address %s handed out twice", h.IP)
		}
		seen[h.IP] = true
		if !strings.HasPrefix(h.IP, "127.") || strings.HasPrefix(h.IP, "127.0.") {
			t.Fatalf("address %s is not a 127.b.c.d with b > 0", h.IP)
		}
	}
	// A claim elsewhere (another process) binds the claim port: it fails
	// while the address is held and succeeds once it is released.
	h := hosts[0]
	if l, err := net.Listen("tcp", net.JoinHostPort(h.IP, strconv.Itoa(claimPort))); err == nil {
		l.Close()
		t.Fatalf("claim port of held address %s could be bound again", h.IP)
	}
	for _, h := range hosts {
		h.Release()
		h.Release() // twice is harmless
	}
	l, err := net.Listen("tcp", net.JoinHostPort(h.IP, strconv.Itoa(claimPort)))
	if err != nil {
		t.Fatalf("claim port of released address %s: %v", h.IP, err)
	}
	l.Close()
}

// TestPortsFree checks that an address where one of the
// wanted ports is already bound (a daemon left by a killed test) is seen as
// taken, so ClaimHost does not hand it out.
func TestPortsFree(t *testing.T) {
	ip := hostIP(0, 1) // not a candidate of this process: pid 0 is never ours
	l, err := net.Listen("tcp", net.JoinHostPort(ip, "10143"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := portsFree(ip, []int{10024, 10143}); err == nil {
		t.Fatalf("portsFree(%s) says 10143 is free while it is bound", ip)
	}
	if err := portsFree(ip, []int{10024}); err != nil {
		t.Fatalf("portsFree(%s, 10024): %v", ip, err)
	}
}
