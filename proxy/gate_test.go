package proxy

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"
)

func TestGateWedgeWaitsForInFlightAndHoldsNew(t *testing.T) {
	var g Gate
	if err := g.Enter(context.Background()); err != nil {
		t.Fatal(err)
	}
	wedged := make(chan func())
	go func() {
		resume, err := g.Wedge(context.Background())
		if err != nil {
			t.Error(err)
		}
		wedged <- resume
	}()
	select {
	case <-wedged:
		t.Fatal("Wedge returned with a mutation in flight")
	case <-time.After(50 * time.Millisecond):
	}
	var entered atomic.Bool
	go func() {
		if err := g.Enter(context.Background()); err == nil {
			entered.Store(true)
			g.Leave()
		}
	}()
	g.Leave()
	resume := <-wedged
	time.Sleep(20 * time.Millisecond)
	if entered.Load() {
		t.Fatal("a new mutation entered while wedged")
	}
	// A mutation that cannot wait gets ErrWedged.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if err := g.Enter(ctx); !errors.Is(err, ErrWedged) {
		t.Fatalf("Enter while wedged with a short deadline: %v", err)
	}
	resume()
	deadline := time.Now().Add(time.Second)
	for !entered.Load() {
		if time.Now().After(deadline) {
			t.Fatal("the waiting mutation did not enter after resume")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestGateWedgeGivesUp(t *testing.T) {
	var g Gate
	g.Enter(context.Background())
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := g.Wedge(ctx); err == nil {
		t.Fatal("Wedge succeeded with a mutation that never leaves")
	}
	// The gate is open again.
	if err := g.Enter(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestGateHoldRefusesAtOnce(t *testing.T) {
	var g Gate
	resume, err := g.Hold(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !g.Holding() {
		t.Fatal("Holding false during a Hold")
	}
	start := time.Now()
	if err := g.Enter(context.Background()); !errors.Is(err, ErrWedged) {
		t.Fatalf("Enter during a Hold: %v, want ErrWedged", err)
	}
	if time.Since(start) > time.Second {
		t.Fatal("Enter waited during a Hold instead of refusing")
	}
	resume()
	if g.Holding() {
		t.Fatal("still holding after resume")
	}
	if err := g.Enter(context.Background()); err != nil {
		t.Fatal(err)
	}
}
