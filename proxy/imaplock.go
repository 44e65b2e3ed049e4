package proxy

import (
	"errors"
	"log/slog"
	"sync"
	"time"
)

// userLocks serialises a user's mutating IMAP commands across all of that
// user's sessions, from the logging of the intent to the command's tagged
// completion. Two sessions on one mailbox (a phone and a laptop) then never
// have mutations in flight at once, so the undo log lists them in the order
// the server ran them, and a search sent right before a command sees the
// state the command acts on (docs/architecture.md, "Recording what the
// server did"). Commands that change nothing are never held by it.
type userLocks struct {
	mu    sync.Mutex
	locks map[string]chan struct{}
}

// errUserBusy is returned when a user's earlier mutation did not complete
// within the wait.
var errUserBusy = errors.New("another mutation of this user is in progress")

func (u *userLocks) ch(user string) chan struct{} {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.locks == nil {
		u.locks = map[string]chan struct{}{}
	}
	c, ok := u.locks[user]
	if !ok {
		c = make(chan struct{}, 1)
		u.locks[user] = c
	}
	return c
}

// lock takes the user's lock, waiting at most wait.
func (u *userLocks) lock(user string, wait time.Duration) error {
	c := u.ch(user)
	select {
	case c <- struct{}{}:
		return nil
	default:
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case c <- struct{}{}:
		return nil
	case <-t.C:
		return errUserBusy
	}
}

// unlock releases the user's lock taken by lock. Releasing a lock that is
// not held is a bug; it must not block the session that does it.
func (u *userLocks) unlock(user string) {
	select {
	case <-u.ch(user):
	default:
		slog.Error("IMAP front end: unlock of a user's mutation lock that is not held", "user", user)
	}
}

func (p *IMAPProxy) lockUser(user string, wait time.Duration) error {
	return p.users.lock(user, wait)
}

func (p *IMAPProxy) unlockUser(user string) { p.users.unlock(user) }

// leaveMutation ends a logged command's passage: the gate (a snapshot may
// cut now) and the user's lock (the user's next mutation may go).
func (p *IMAPProxy) leaveMutation(user string) {
	p.cfg.Gate.Leave()
	p.unlockUser(user)
}
