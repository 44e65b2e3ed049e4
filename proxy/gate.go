package proxy

import (
	"context"
	"errors"
	"sync"
	"time"
)

// Gate is the consistent cut between the proxies and the mail store
// (DESIGN: "Time travel"). Every mutation a proxy relays passes it from
// before its intent is logged until the upstream has answered, so once
// Wedge returns no mutation is half done: the store matches the log up to
// its last record. A snapshot is taken then, and Resume lets the mutations
// that waited go on.
type Gate struct {
	mu      sync.Mutex
	active  int           // mutations between Enter and Leave
	wedged  chan struct{} // non-nil while wedged; closed by resume
	drained chan struct{} // closed when active reaches 0 while wedged
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
		w := g.wedged
		if w == nil {
			g.active++
			g.mu.Unlock()
			return nil
		}
		g.mu.Unlock()
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
// gate is resumed and the error returned.
func (g *Gate) Wedge(ctx context.Context) (resume func(), err error) {
	g.wedging.Lock()
	g.mu.Lock()
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
		g.wedged, g.drained = nil, nil
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
