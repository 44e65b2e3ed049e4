package mailstack

import (
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
)

// Loopback hosts. Every stack (and every test listener that must be known
// before its server binds it) gets an IPv4 loopback address of its own in
// 127.0.0.0/8, which RFC 1122 section 3.2.1.3 reserves for loopback and
// Linux routes entirely to lo, so no interface needs configuring. On its own
// address a stack can use fixed ports: nothing else binds that address, so
// choosing a port and the daemon binding it later cannot race another
// server, as picking a port by binding 127.0.0.1:0 and closing it did.
//
// The ports are below Linux's default ephemeral range (32768-60999), so a
// wildcard listener on port 0 elsewhere cannot take one either; a
// wildcard listener on one of these fixed ports is detected before the
// address is handed out, and the next address is tried with other ports.
//
// Clients connecting to such an address from the machine still come from
// 127.0.0.1 (the kernel's source for the local route), so the stack's
// trust settings for 127.0.0.1/32 keep working.
const (
	// claimPort is where the holder of an address keeps a listener for as
	// long as it uses the address: a second claim of the address fails to
	// bind it. The kernel drops the claim when its process dies.
	claimPort = 10000
	// addrPort is the port Addr hands out on its own address.
	addrPort = 10100
)

// Stack ports on the stack's own address, by attempt: an attempt that finds
// one of them taken by a wildcard listener moves on to the next set.
var stackPortSets = [][4]int{ // IMAP, LMTP, auth, SMTP
	{10143, 10024, 10026, 10025},
	{11143, 11024, 11026, 11025},
	{12143, 12024, 12026, 12025},
}

// hostCounter numbers the addresses this process tries; with the pid it
// picks the candidate, so parallel test binaries start far apart.
var hostCounter atomic.Uint32

// hostAttempts bounds the candidates ClaimHost tries.
const hostAttempts = 64

// Host is a loopback address held by this process: while it is held, no
// other ClaimHost, in this process or another, returns the same IP.
type Host struct {
	// IP is the address, 127.b.c.d with b in 1..254 (127.0.x.x is left to
	// 127.0.0.1, 127.0.0.2 that tests use as an outside client, and
	// Debian's 127.0.1.1).
	IP string

	once  sync.Once
	claim net.Listener
}

// ClaimHost claims a loopback address on which every port in ports is free.
// The caller releases it with Release once its servers have stopped.
func ClaimHost(ports ...int) (*Host, error) {
	var errs []error
	for range hostAttempts {
		ip := hostIP(os.Getpid(), hostCounter.Add(1))
		claim, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(claimPort)))
		if err != nil {
			errs = append(errs, fmt.Errorf("claim %s: %w", ip, err))
			continue
		}
		if err := portsFree(ip, ports); err != nil {
			claim.Close()
			errs = append(errs, err)
			continue
		}
		return &Host{IP: ip, claim: claim}, nil
	}
	return nil, fmt.Errorf("claim a loopback address: %d candidates taken: %w", hostAttempts, errors.Join(lastN(errs, 3)...))
}

// Addr returns IP:port joined.
func (h *Host) Addr(port int) string { return net.JoinHostPort(h.IP, strconv.Itoa(port)) }

// Release gives the address back. Calling it again does nothing.
func (h *Host) Release() {
	h.once.Do(func() { h.claim.Close() })
}

// ClaimAddr claims an address of its own and returns a free port on it, for
// a server that is started later (a separate process) and must be told its
// address first. Release the host when the server has stopped.
func ClaimAddr() (string, *Host, error) {
	h, err := ClaimHost(addrPort)
	if err != nil {
		return "", nil, err
	}
	return h.Addr(addrPort), h, nil
}

// hostIP derives a candidate address from the pid and a counter.
func hostIP(pid int, n uint32) string {
	f := fnv.New32a()
	fmt.Fprintf(f, "%d/%d", pid, n)
	v := f.Sum32()
	b := 1 + v%254
	v /= 254
	c := v % 256
	v /= 256
	d := 1 + v%254
	return fmt.Sprintf("127.%d.%d.%d", b, c, d)
}

// portsFree checks that each port can be bound on ip now. Only a wildcard
// listener, or a daemon left behind by a killed process, can hold one.
func portsFree(ip string, ports []int) error {
	for _, p := range ports {
		l, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(p)))
		if err != nil {
			return fmt.Errorf("port %d on %s: %w", p, ip, err)
		}
		l.Close()
	}
	return nil
}

func lastN(errs []error, n int) []error {
	if len(errs) > n {
		return errs[len(errs)-n:]
	}
	return errs
}
