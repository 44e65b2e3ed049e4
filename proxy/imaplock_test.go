package proxy

import (
	"testing"
	"time"
)

func TestUserLocks(t *testing.T) {
	var u userLocks
	if err := u.lock("alice", time.Second); err != nil {
		t.Fatal(err)
	}
	if err := u.lock("bob", time.Second); err != nil {
		t.Fatalf("bob waits for alice: %v", err)
	}
	if err := u.lock("alice", 50*time.Millisecond); err != errUserBusy {
		t.Fatalf("second lock of alice: %v, want errUserBusy", err)
	}
	got := make(chan error)
	go func() { got <- u.lock("alice", 5*time.Second) }()
	time.Sleep(20 * time.Millisecond)
	u.unlock("alice")
	if err := <-got; err != nil {
		t.Fatalf("a waiter did not get alice's lock when it was released: %v", err)
	}
	u.unlock("alice")
	u.unlock("alice") // not held: logged, never blocks
	u.unlock("bob")
}
