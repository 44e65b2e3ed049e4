package proxy

import (
	"context"
	"errors"
	"sync"
	"time"
)

// Gate is the consistent cut between the proxies and the mail store
// (docs/architecture.md, "Time travel"). Every mutation a proxy relays passes it from
// before its intent is logged until the upstream has answered, so once
// Wedge returns no mutation is half done: the store matches the log up to
// its last record. A snapshot is taken then, and Resume lets the mutations
// that waited go on.
type Gate struct {
	mu      sync.Mutex
	active  int           // mutations between Enter and Leave
	wedged  chan struct{} // non-nil while wedged; closed by resume
	drained chan struct{} // closed when active reaches 0 while wedged
	holding bool          // wedged for a long repair: refuse at once
	holds   uint64        // Holds that ended: the store may have been rewound
	wedging sync.Mutex    // one Wedge at a time
}

// WedgeWait is how long a mutation waits at a wedged gate before its
// client gets a temporary failure. A snapshot wedges for well under a
// second; a recovery cycle for longer, and clients should retry later then.
const WedgeWait = 10 * time.Second

// ErrWedged is returned by Enter when the gate stayed wedged until ctx
// ended; the proxy answers with a temporary failure.
var ErrWedged = errors.New("undomail is paused for a snapshot or recovery")

// Enter admits one mutation, waiting while the gate is wedged until ctx
// ends. Every nil return must be paired with Leave.
func (g *Gate) Enter(ctx context.Context) error {
	if g == nil {
		return nil
	}
	for {
		g.mu.Lock()
		w, holding := g.wedged, g.holding
		if w == nil {
			g.active++
			g.mu.Unlock()
			return nil
		}
		g.mu.Unlock()
		if holding {
			return ErrWedged
		}
		select {
		case <-w:
		case <-ctx.Done():
			return ErrWedged
		}
	}
}

// Leave ends a mutation admitted by Enter.
func (g *Gate) Leave() {
	if g == nil {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.active--
	if g.active == 0 && g.drained != nil {
		close(g.drained)
		g.drained = nil
	}
}

// Wedge holds new mutations back and waits until those in flight have
// left. It returns the function that resumes them; if ctx ends first the
// gate is resumed and the error returned. New mutations wait (a snapshot
// is short).
func (g *Gate) Wedge(ctx context.Context) (resume func(), err error) {
	return g.wedge(ctx, false)
}

// Hold is Wedge for a repair that takes a while (a rewind, a cycle): new
// mutations are refused at once, so clients get their temporary failure
// (SMTP 451 4.3.2, IMAP NO [UNAVAILABLE]) and retry later instead of
// hanging, and Holding tells the IMAP front end to refuse logins.
func (g *Gate) Hold(ctx context.Context) (resume func(), err error) {
	return g.wedge(ctx, true)
}

// Holds counts the Holds that have ended. A repair (rewind, replay) runs
// under a Hold: a new count tells that messages may have moved under the
// proxies, and what they learnt about the store may be stale.
func (g *Gate) Holds() uint64 {
	if g == nil {
		return 0
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.holds
}

// Holding reports whether a Hold is in force.
func (g *Gate) Holding() bool {
	if g == nil {
		return false
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.holding
}

func (g *Gate) wedge(ctx context.Context, hold bool) (resume func(), err error) {
	g.wedging.Lock()
	g.mu.Lock()
	g.holding = hold
	w := make(chan struct{})
	g.wedged = w
	var drained chan struct{}
	if g.active > 0 {
		drained = make(chan struct{})
		g.drained = drained
	}
	g.mu.Unlock()
	resume = func() {
		g.mu.Lock()
		if g.holding {
			g.holds++
		}
		g.wedged, g.drained, g.holding = nil, nil, false
		g.mu.Unlock()
		close(w)
		g.wedging.Unlock()
	}
	if drained != nil {
		select {
		case <-drained:
		case <-ctx.Done():
			resume()
			return nil, ctx.Err()
		}
	}
	return resume, nil
}
