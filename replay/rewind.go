// Package replay is the 3R engine: rewind the mail store to a snapshot,
// repair, replay the logged intents since. This file is the rewind: a
// rollback that Dovecot and its clients survive.
package replay

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/undomail/undomail/timetravel"
	"github.com/undomail/undomail/undolog"
)

// KindRewind is the verb of a rewind; its args hold the counters every
// mailbox had before it, outside the store that is rolled back (DESIGN:
// "Record the pre-rewind values outside the rewound dataset (the log),
// because Dovecot's own counters roll back with it").
const KindRewind = "rewind"

// Upstream says how to make the mail server let go of the store before a
// rollback and take it up again after. Commands are argument lists, so a
// Docker deployment can use {"docker", "exec", "dovecot", "doveadm"}.
type Upstream struct {
	// Doveadm runs doveadm: {"doveadm"}, {"doveadm", "-c", CONF}, ...
	Doveadm []string
	// Quiesce and Resume are run before the rollback (after sessions are
	// kicked) and after it (before counters are raised), in order.
	Quiesce, Resume [][]string
	// FreeWait bounds the wait until no process holds a file in the store
	// (IMAP processes linger after a kick). Zero means 30 seconds.
	FreeWait time.Duration
	// CommandTimeout bounds each command. Zero means one minute.
	CommandTimeout time.Duration
	Logger         *slog.Logger
}

// MailboxCounters are a mailbox's UID and MODSEQ counters.
type MailboxCounters struct {
	User          string `json:"user"`
	Mailbox       string `json:"mailbox"`
	UIDValidity   uint32 `json:"uidvalidity"`
	UIDNext       uint32 `json:"uidnext"`
	HighestModSeq uint64 `json:"highestmodseq"`
}

// RewindArgs are the arguments of a rewind verb.
type RewindArgs struct {
	Snapshot string            `json:"snapshot"`
	AtSeq    int64             `json:"at_seq"` // the snapshot's log position
	Before   []MailboxCounters `json:"before"`
}

// RewindOutcome is how the rewind went.
type RewindOutcome struct {
	OK bool `json:"ok"`
	// Raised lists the mailboxes whose UIDNEXT/HIGHESTMODSEQ were raised
	// to their pre-rewind values; Renewed those that could not keep their
	// UIDVALIDITY (gone, or recreated since the snapshot).
	Raised  int      `json:"raised"`
	Renewed []string `json:"renewed,omitempty"`
	Error   string   `json:"error,omitempty"`
}

// Rewind rolls the store back to a snapshot so that Dovecot serves exactly
// the snapshot's mail and no client is confused: UIDs are never reused
// under the same UIDVALIDITY and MODSEQs never go backwards (DESIGN:
// "UID-monotonic rewind", verified on Dovecot 2.3; RFC 9051 2.3.1.1).
//
// The caller holds the proxies' gate wedged. Steps: read every mailbox's
// counters and log them with the intent; kick IMAP sessions and wait until
// no process holds a file in the store (a rollback under open files
// corrupts Dovecot's indexes); roll back; raise each surviving mailbox's
// UIDNEXT and HIGHESTMODSEQ to at least the logged values.
func Rewind(ctx context.Context, log *undolog.Log, store timetravel.Store, up Upstream, snapshot string) (RewindOutcome, error) {
	if up.Logger == nil {
		up.Logger = slog.Default()
	}
	if up.FreeWait == 0 {
		up.FreeWait = 30 * time.Second
	}
	if up.CommandTimeout == 0 {
		up.CommandTimeout = time.Minute
	}
	snap, err := store.Get(ctx, snapshot)
	if err != nil {
		return RewindOutcome{}, fmt.Errorf("rewind to %s: %w", snapshot, err)
	}
	before, err := up.counters(ctx)
	if err != nil {
		return RewindOutcome{}, fmt.Errorf("rewind to %s: read mailbox counters: %w", snapshot, err)
	}
	args, _ := json.Marshal(RewindArgs{Snapshot: snapshot, AtSeq: snap.Seq, Before: before})
	intent := &undolog.Record{Kind: KindRewind, Session: "rewind", Args: args}
	if err := log.Append(ctx, intent); err != nil {
		return RewindOutcome{}, fmt.Errorf("rewind to %s: log intent: %w", snapshot, err)
	}
	out, rerr := up.rewind(ctx, store, snapshot, before)
	if rerr != nil {
		out.Error = rerr.Error()
	}
	b, _ := json.Marshal(out)
	if err := log.Append(ctx, &undolog.Record{Kind: undolog.KindOutcome, Session: "rewind", Ref: intent.Seq, Outcome: b}); err != nil {
		up.Logger.Error("log rewind outcome", "err", err)
	}
	if rerr != nil {
		return out, fmt.Errorf("rewind to %s: %w", snapshot, rerr)
	}
	return out, nil
}

func (up Upstream) rewind(ctx context.Context, store timetravel.Store, snapshot string, before []MailboxCounters) (RewindOutcome, error) {
	var out RewindOutcome
	if _, err := up.doveadm(ctx, "kick", "*"); err != nil {
		// Exit status 68 (EX_NOUSER): nobody was logged in to kick.
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 68 {
			return out, fmt.Errorf("kick IMAP sessions: %w", err)
		}
	}
	for _, c := range up.Quiesce {
		if _, err := up.run(ctx, c); err != nil {
			return out, fmt.Errorf("quiesce: %w", err)
		}
	}
	deadline := time.Now().Add(up.FreeWait)
	for {
		err := store.Rollback(ctx, snapshot)
		if err == nil {
			break
		}
		if !errors.Is(err, timetravel.ErrBusy) || time.Now().After(deadline) {
			return out, fmt.Errorf("roll back: %w", err)
		}
		select {
		case <-ctx.Done():
			return out, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	for _, c := range up.Resume {
		if _, err := up.run(ctx, c); err != nil {
			return out, fmt.Errorf("resume: %w", err)
		}
	}
	after, err := up.counters(ctx)
	if err != nil {
		return out, fmt.Errorf("read counters after the rollback: %w", err)
	}
	now := map[string]MailboxCounters{}
	for _, c := range after {
		now[c.User+"\x00"+c.Mailbox] = c
	}
	for _, b := range before {
		a, ok := now[b.User+"\x00"+b.Mailbox]
		if !ok || a.UIDValidity != b.UIDValidity {
			// Created after the snapshot, or recreated: its UIDs were
			// never shown under the snapshot's UIDVALIDITY, or the
			// replay recreates it with a new one.
			out.Renewed = append(out.Renewed, b.User+"/"+b.Mailbox)
			continue
		}
		if a.UIDNext >= b.UIDNext && a.HighestModSeq >= b.HighestModSeq {
			continue
		}
		if _, err := up.doveadm(ctx, "mailbox", "update", "-u", b.User,
			"--min-next-uid", strconv.FormatUint(uint64(b.UIDNext), 10),
			"--min-highest-modseq", strconv.FormatUint(b.HighestModSeq, 10), b.Mailbox); err != nil {
			return out, fmt.Errorf("raise UIDNEXT/HIGHESTMODSEQ of %s/%s: %w", b.User, b.Mailbox, err)
		}
		out.Raised++
	}
	out.OK = true
	up.Logger.Info("rewound", "snapshot", snapshot, "raised", out.Raised, "renewed", len(out.Renewed))
	return out, nil
}

// counters reads every mailbox's counters with doveadm (tab format: a
// header line naming the columns, then one line per mailbox).
func (up Upstream) counters(ctx context.Context) ([]MailboxCounters, error) {
	out, err := up.doveadm(ctx, "-f", "tab", "mailbox", "status", "-A", "uidvalidity uidnext highestmodseq", "*")
	if err != nil {
		return nil, err
	}
	lines := strings.Split(strings.TrimRight(string(out), "\n"), "\n")
	if len(lines) == 0 || lines[0] == "" {
		return nil, nil
	}
	col := map[string]int{}
	for i, h := range strings.Split(lines[0], "\t") {
		col[strings.ToLower(h)] = i
	}
	for _, need := range []string{"username", "mailbox", "uidvalidity", "uidnext", "highestmodseq"} {
		if _, ok := col[need]; !ok {
			return nil, fmt.Errorf("doveadm mailbox status: no %s column in %q", need, lines[0])
		}
	}
	var cs []MailboxCounters
	for _, l := range lines[1:] {
		f := strings.Split(l, "\t")
		if len(f) < len(col) {
			continue
		}
		uv, _ := strconv.ParseUint(f[col["uidvalidity"]], 10, 32)
		un, _ := strconv.ParseUint(f[col["uidnext"]], 10, 32)
		hm, _ := strconv.ParseUint(f[col["highestmodseq"]], 10, 64)
		cs = append(cs, MailboxCounters{User: f[col["username"]], Mailbox: f[col["mailbox"]],
			UIDValidity: uint32(uv), UIDNext: uint32(un), HighestModSeq: hm})
	}
	return cs, nil
}

func (up Upstream) doveadm(ctx context.Context, args ...string) ([]byte, error) {
	if len(up.Doveadm) == 0 {
		return nil, errors.New("no doveadm command configured")
	}
	return up.run(ctx, append(append([]string(nil), up.Doveadm...), args...))
}

// run runs one command with a timeout and logs it with its duration.
func (up Upstream) run(ctx context.Context, argv []string) ([]byte, error) {
	if len(argv) == 0 {
		return nil, errors.New("empty command")
	}
	ctx, cancel := context.WithTimeout(ctx, up.CommandTimeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	up.Logger.Debug("upstream command", "argv", argv, "duration", time.Since(start), "err", err)
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}
