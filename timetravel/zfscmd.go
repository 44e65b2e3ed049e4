package timetravel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"strings"
	"time"

	gozfs "github.com/mistifyio/go-zfs/v3"
)

// CommandError is a failed zfs command.
type CommandError struct {
	Args   []string // the command line, "zfs" first
	Stderr string
	Err    error // the exec error, or context.DeadlineExceeded
	// Kind is the sentinel the failure maps to (ErrNotFound, ErrExists,
	// ErrInUse, ErrBusy, ErrTimeout), or nil.
	Kind error
}

// Error implements error.
func (e *CommandError) Error() string {
	msg := strings.TrimSpace(e.Stderr)
	if msg == "" {
		msg = e.Err.Error()
	}
	return fmt.Sprintf("%s: %s", strings.Join(e.Args, " "), msg)
}

// Unwrap makes errors.Is see both the sentinel and the underlying error.
func (e *CommandError) Unwrap() []error {
	if e.Kind == nil {
		return []error{e.Err}
	}
	return []error{e.Kind, e.Err}
}

// classify maps zfs's stderr to a sentinel. The messages are the same in
// zfs-fuse 0.7 and OpenZFS 2.x.
func classify(stderr string) error {
	switch {
	case strings.Contains(stderr, "does not exist"):
		return ErrNotFound
	case strings.Contains(stderr, "already exists"):
		return ErrExists
	case strings.Contains(stderr, "dependent clones"):
		return ErrInUse
	case strings.Contains(stderr, "is busy"), strings.Contains(stderr, "device busy"):
		return ErrBusy
	}
	return nil
}

// zfsRunner runs zfs commands, each bounded by a timeout and logged with its
// duration, like zrepl's zfs package.
type zfsRunner struct {
	log     *slog.Logger
	timeout time.Duration
}

// run runs "zfs args..." and returns its standard output split into lines
// (without the trailing empty one).
func (r *zfsRunner) run(ctx context.Context, args ...string) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	start := time.Now()
	cmd := exec.CommandContext(ctx, "zfs", args...)
	// The zfs CLI of a hung zfs-fuse daemon dies on SIGKILL; do not then
	// wait for anything that inherited its pipes.
	cmd.WaitDelay = 2 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	d := time.Since(start)
	full := append([]string{"zfs"}, args...)
	if err != nil {
		ce := &CommandError{Args: full, Stderr: stderr.String(), Err: err, Kind: classify(stderr.String())}
		if ctx.Err() != nil {
			ce.Err, ce.Kind = ctx.Err(), ErrTimeout
			if errors.Is(ctx.Err(), context.Canceled) {
				ce.Kind = nil
			}
		}
		level := slog.LevelWarn
		if ce.Kind == ErrNotFound {
			// An expected answer for idempotent operations.
			level = slog.LevelDebug
		}
		r.log.Log(ctx, level, "zfs command failed", "cmd", strings.Join(full, " "), "duration", d, "err", ce)
		return nil, ce
	}
	r.log.Debug("zfs command", "cmd", strings.Join(full, " "), "duration", d)
	out := strings.TrimRight(stdout.String(), "\n")
	if out == "" {
		return nil, nil
	}
	return strings.Split(out, "\n"), nil
}

// lib runs a go-zfs call bounded by the timeout. go-zfs/v3 takes no
// context, so a call that overruns cannot be killed: it is abandoned (its
// zfs child process and goroutine finish whenever zfs does, and that is
// logged) and the caller gets ErrTimeout. That is acceptable only because
// a hung zfs means the daemon is wedged anyway; operations that must be
// killable (rollback steps) use run instead.
func (r *zfsRunner) lib(ctx context.Context, what string, fn func() error) error {
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	start := time.Now()
	done := make(chan error, 1)
	go func() { done <- fn() }()
	select {
	case err := <-done:
		d := time.Since(start)
		if err == nil {
			r.log.Debug("zfs command", "cmd", what, "via", "go-zfs", "duration", d)
			return nil
		}
		ce := &CommandError{Args: strings.Fields("zfs " + what), Err: err}
		var ze *gozfs.Error
		if errors.As(err, &ze) {
			ce.Stderr = ze.Stderr
			ce.Kind = classify(ze.Stderr)
		}
		r.log.Warn("zfs command failed", "cmd", what, "via", "go-zfs", "duration", d, "err", ce)
		return ce
	case <-ctx.Done():
		r.log.Error("zfs command timed out; abandoned", "cmd", what, "via", "go-zfs", "duration", time.Since(start))
		go func() {
			err := <-done
			r.log.Warn("abandoned zfs command finished", "cmd", what, "duration", time.Since(start), "err", err)
		}()
		kind := ErrTimeout
		if errors.Is(ctx.Err(), context.Canceled) {
			kind = nil
		}
		return &CommandError{Args: strings.Fields("zfs " + what), Err: ctx.Err(), Kind: kind}
	}
}

// busyRetryFor is how long retryBusy keeps retrying.
const busyRetryFor = 15 * time.Second

// retryBusy calls fn until it does not fail with ErrBusy, for up to
// busyRetryFor. zfs-fuse unmounts asynchronously: a destroy or rename that
// unmounts a dataset (or remounts the clones of its snapshots) often fails
// once with "dataset is busy" and succeeds a moment later. Callers have
// already checked /proc for open files, so a dataset that stays busy is
// reported as ErrBusy rather than forced.
func (r *zfsRunner) retryBusy(ctx context.Context, what string, fn func() error) error {
	deadline := time.Now().Add(busyRetryFor)
	wait := 100 * time.Millisecond
	for {
		err := fn()
		if !errors.Is(err, ErrBusy) || time.Now().Add(wait).After(deadline) {
			return err
		}
		r.log.Info("zfs reports busy; retrying", "cmd", what, "wait", wait)
		select {
		case <-ctx.Done():
			return err
		case <-time.After(wait):
		}
		wait = min(2*wait, 2*time.Second)
	}
}

// runRetryBusy is run under retryBusy.
func (r *zfsRunner) runRetryBusy(ctx context.Context, args ...string) error {
	return r.retryBusy(ctx, strings.Join(args, " "), func() error {
		_, err := r.run(ctx, args...)
		return err
	})
}
