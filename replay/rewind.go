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
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/undomail/undomail/timetravel"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

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

// uidListing is every message's UID, by user and mailbox.
type uidListing map[string]map[string]map[uint32]bool

// uids lists the UID of every message of every user with doveadm.
func (up Upstream) uids(ctx context.Context, users []string) (uidListing, error) {
	out, err := up.perUser(ctx, users, func(who ...string) []string {
		return append(append([]string{"-f", "tab", "fetch"}, who...), "mailbox uid", "all")
	})
	if err != nil {
		return nil, err
	}
	lines := strings.Split(strings.TrimRight(string(out), "\n"), "\n")
	l := uidListing{}
	if len(lines) == 0 || lines[0] == "" {
		return l, nil
	}
	col := map[string]int{}
	for i, h := range strings.Split(lines[0], "\t") {
		col[strings.ToLower(h)] = i
	}
	for _, need := range []string{"username", "mailbox", "uid"} {
		if _, ok := col[need]; !ok {
			return nil, fmt.Errorf("doveadm fetch: no %s column in %q", need, lines[0])
		}
	}
	for _, line := range lines[1:] {
		f := strings.Split(line, "\t")
		if len(f) < len(col) {
			continue
		}
		uid, err := strconv.ParseUint(f[col["uid"]], 10, 32)
		if err != nil {
			continue
		}
		user, mailbox := f[col["username"]], f[col["mailbox"]]
		if l[user] == nil {
			l[user] = map[string]map[uint32]bool{}
		}
		if l[user][mailbox] == nil {
			l[user][mailbox] = map[uint32]bool{}
		}
		l[user][mailbox][uint32(uid)] = true
	}
	return l, nil
}

// returning finds the messages the rollback brought back under a UID the
// mailbox did not have just before it (same UIDVALIDITY, below the
// UIDNEXT clients had seen).
func returning(before, after []verb.MailboxCounters, present, rolled uidListing) map[string]map[string][]uint32 {
	now := map[string]verb.MailboxCounters{}
	for _, c := range after {
		now[c.User+"\x00"+c.Mailbox] = c
	}
	out := map[string]map[string][]uint32{}
	for _, b := range before {
		a, ok := now[b.User+"\x00"+b.Mailbox]
		if !ok || a.UIDValidity != b.UIDValidity {
			continue
		}
		for uid := range rolled[b.User][b.Mailbox] {
			if uid < b.UIDNext && !present[b.User][b.Mailbox][uid] {
				if out[b.User] == nil {
					out[b.User] = map[string][]uint32{}
				}
				out[b.User][b.Mailbox] = append(out[b.User][b.Mailbox], uid)
			}
		}
	}
	return out
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
func Rewind(ctx context.Context, log *undolog.Log, store timetravel.Store, up Upstream, snapshot string) (verb.RewindOutcome, error) {
	return RewindUsers(ctx, log, store, up, snapshot, nil)
}

// RewindUsers is Rewind for some users only: their mail goes back to the
// snapshot, everyone else's stays as it is (the store must roll back one
// user at a time: timetravel.UserRollbacker). No users: everyone.
func RewindUsers(ctx context.Context, log *undolog.Log, store timetravel.Store, up Upstream, snapshot string, users []string) (verb.RewindOutcome, error) {
	if len(users) > 0 {
		if _, ok := store.(timetravel.UserRollbacker); !ok {
			return verb.RewindOutcome{}, fmt.Errorf("rewind %v to %s: this store cannot roll back one user (ZFS needs a dataset per user)", users, snapshot)
		}
	}
	if up.Logger == nil {
		up.Logger = slog.Default()
	}
	if up.FreeWait == 0 {
		up.FreeWait = 30 * time.Second
	}
	snap, err := store.Get(ctx, snapshot)
	if err != nil {
		return verb.RewindOutcome{}, fmt.Errorf("rewind to %s: %w", snapshot, err)
	}
	before, err := up.counters(ctx, users)
	if err != nil {
		return verb.RewindOutcome{}, fmt.Errorf("rewind to %s: read mailbox counters: %w", snapshot, err)
	}
	// The gate is held: nothing changes the store until the rollback.
	present, err := up.uids(ctx, users)
	if err != nil {
		return verb.RewindOutcome{}, fmt.Errorf("rewind to %s: list messages: %w", snapshot, err)
	}
	args, _ := json.Marshal(verb.RewindArgs{Snapshot: snapshot, AtSeq: snap.Seq, Before: before, Users: users})
	intent := &undolog.Record{Kind: verb.KindRewind, Session: "rewind", Args: args}
	if err := log.Append(ctx, intent); err != nil {
		return verb.RewindOutcome{}, fmt.Errorf("rewind to %s: log intent: %w", snapshot, err)
	}
	out, rerr := up.rewind(ctx, store, snapshot, before, present, users)
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

func (up Upstream) rewind(ctx context.Context, store timetravel.Store, snapshot string, before []verb.MailboxCounters, present uidListing, users []string) (verb.RewindOutcome, error) {
	var out verb.RewindOutcome
	kick := []string{"*"}
	if len(users) > 0 {
		kick = users
	}
	for _, who := range kick {
		if _, err := up.doveadm(ctx, "kick", who); err != nil {
			// Exit status 68 (EX_NOUSER): nobody was logged in to kick.
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 68 {
				return out, fmt.Errorf("kick IMAP sessions: %w", err)
			}
		}
	}
	for _, c := range up.Quiesce {
		if _, err := up.run(ctx, c); err != nil {
			return out, fmt.Errorf("quiesce: %w", err)
		}
	}
	deadline := time.Now().Add(up.FreeWait)
	rollback := func() error { return store.Rollback(ctx, snapshot) }
	if len(users) > 0 {
		done := map[string]bool{}
		rollback = func() error {
			for _, u := range users {
				if done[u] {
					continue
				}
				if err := store.(timetravel.UserRollbacker).RollbackUser(ctx, snapshot, u); err != nil {
					return err
				}
				done[u] = true
			}
			return nil
		}
	}
	for {
		err := rollback()
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
	after, err := up.counters(ctx, users)
	if err != nil {
		return out, fmt.Errorf("read counters after the rollback: %w", err)
	}
	rolled, err := up.uids(ctx, users)
	if err != nil {
		return out, fmt.Errorf("list messages after the rollback: %w", err)
	}
	out.Returning = returning(before, after, present, rolled)
	if err := up.keepUIDValidityAhead(ctx, before); err != nil {
		return out, err
	}
	now := map[string]verb.MailboxCounters{}
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
			if !ok {
				out.Gone = append(out.Gone, b)
			}
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

// perUser runs a doveadm listing for all users (-A), or for each of users
// (-u USER), and joins the outputs under one header line.
func (up Upstream) perUser(ctx context.Context, users []string, args func(who ...string) []string) ([]byte, error) {
	if len(users) == 0 {
		return up.doveadm(ctx, args("-A")...)
	}
	var all []byte
	for _, u := range users {
		out, err := up.doveadm(ctx, args("-u", u)...)
		if err != nil {
			return nil, err
		}
		lines := strings.Split(strings.TrimRight(string(out), "\n"), "\n")
		if len(lines) == 0 || lines[0] == "" {
			continue
		}
		// One user's listing has no username column: add it, as -A has.
		if !slices.Contains(strings.Split(strings.ToLower(lines[0]), "\t"), "username") {
			lines[0] = "username\t" + lines[0]
			for j := 1; j < len(lines); j++ {
				lines[j] = u + "\t" + lines[j]
			}
		}
		if len(all) > 0 { // keep one header line
			lines = lines[1:]
		}
		for _, l := range lines {
			all = append(all, l+"\n"...)
		}
	}
	return all, nil
}

// Restore gives a mailbox made again after a rollback the UIDVALIDITY
// it had before, with UIDNEXT and HIGHESTMODSEQ above every value it had
// then, provided it is still empty (a UID already handed out under a
// new UIDVALIDITY cannot move). It reports whether it changed anything.
func (up Upstream) Restore(ctx context.Context, c verb.MailboxCounters) (bool, error) {
	out, err := up.doveadm(ctx, "-f", "tab", "mailbox", "status", "-u", c.User, "uidvalidity messages", c.Mailbox)
	if err != nil {
		return false, fmt.Errorf("status of %s/%s: %w", c.User, c.Mailbox, err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 2 {
		return false, fmt.Errorf("status of %s/%s: unexpected output %q", c.User, c.Mailbox, out)
	}
	col := map[string]string{}
	vals := strings.Split(lines[1], "\t")
	for i, h := range strings.Split(lines[0], "\t") {
		if i < len(vals) {
			col[strings.ToLower(h)] = vals[i]
		}
	}
	if col["messages"] != "0" || col["uidvalidity"] == strconv.FormatUint(uint64(c.UIDValidity), 10) {
		return false, nil
	}
	if _, err := up.doveadm(ctx, "mailbox", "update", "-u", c.User,
		"--uid-validity", strconv.FormatUint(uint64(c.UIDValidity), 10),
		"--min-next-uid", strconv.FormatUint(uint64(c.UIDNext), 10),
		"--min-highest-modseq", strconv.FormatUint(c.HighestModSeq, 10), c.Mailbox); err != nil {
		return false, fmt.Errorf("restore the counters of %s/%s: %w", c.User, c.Mailbox, err)
	}
	return true, nil
}

// counters reads every mailbox's counters with doveadm (tab format: a
// header line naming the columns, then one line per mailbox).
func (up Upstream) counters(ctx context.Context, users []string) ([]verb.MailboxCounters, error) {
	out, err := up.perUser(ctx, users, func(who ...string) []string {
		return append(append([]string{"-f", "tab", "mailbox", "status"}, who...), "uidvalidity uidnext highestmodseq", "*")
	})
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
	var cs []verb.MailboxCounters
	for _, l := range lines[1:] {
		f := strings.Split(l, "\t")
		if len(f) < len(col) {
			continue
		}
		uv, _ := strconv.ParseUint(f[col["uidvalidity"]], 10, 32)
		un, _ := strconv.ParseUint(f[col["uidnext"]], 10, 32)
		hm, _ := strconv.ParseUint(f[col["highestmodseq"]], 10, 64)
		cs = append(cs, verb.MailboxCounters{User: f[col["username"]], Mailbox: f[col["mailbox"]],
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
	timeout := up.CommandTimeout
	if timeout == 0 {
		timeout = time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
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

// keepUIDValidityAhead keeps each user's UIDVALIDITY counter ahead of
// every UIDVALIDITY handed out before the rollback. Dovecot gives a new
// mailbox the next value of a per-user counter kept in the mail store
// (dovecot-uidvalidity, and a marker file dovecot-uidvalidity.<hex>
// naming the current value), which the rollback took back: without this,
// a mailbox created again by the replay (or by the user, or a Sieve
// fileinto :create) would get the UIDVALIDITY its predecessor had, and
// clients that cached that mailbox's UIDs would see them reused.
func (up Upstream) keepUIDValidityAhead(ctx context.Context, before []verb.MailboxCounters) error {
	max := map[string]uint32{}
	for _, b := range before {
		if b.UIDValidity > max[b.User] {
			max[b.User] = b.UIDValidity
		}
	}
	for user, m := range max {
		out, err := up.doveadm(ctx, "mailbox", "path", "-u", user, "-t", "control", "INBOX")
		if err != nil {
			return fmt.Errorf("find %s's UIDVALIDITY counter: %w", user, err)
		}
		path := filepath.Join(strings.TrimSpace(string(out)), "dovecot-uidvalidity")
		if err := setUIDValidityCounter(path, m); err != nil {
			return fmt.Errorf("keep %s's UIDVALIDITY ahead: %w", user, err)
		}
	}
	return nil
}

// setUIDValidityCounter makes Dovecot's counter at path at least v, the
// way Dovecot itself keeps it (lib-storage/mailbox-uidvalidity.c): the
// file holds the current value as 8 hex digits, and exactly one marker
// path.<8 hex digits> names it.
func setUIDValidityCounter(path string, v uint32) error {
	st, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		// The user had no mailbox at the snapshot. Dovecot would fall
		// back to the clock, which can repeat a value handed out since
		// (several in one second): create the counter, and the
		// directories above it as their nearest existing parent's owner.
		if st, err = makeCounterFile(path); err != nil {
			return err
		}
	} else if err != nil {
		return err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	cur, err := strconv.ParseUint(strings.TrimSpace(string(b)), 16, 32)
	if err == nil && uint32(cur) >= v {
		return nil
	}
	markers, err := filepath.Glob(path + ".*")
	if err != nil {
		return err
	}
	for _, m := range markers {
		if err := os.Remove(m); err != nil {
			return err
		}
	}
	uid, gid := -1, -1
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		uid, gid = int(sys.Uid), int(sys.Gid)
	}
	marker := fmt.Sprintf("%s.%08x", path, v)
	if err := os.WriteFile(marker, nil, 0o444); err != nil {
		return err
	}
	if err := os.WriteFile(path, []byte(fmt.Sprintf("%08x", v)), st.Mode().Perm()); err != nil {
		return err
	}
	for _, p := range []string{marker, path} {
		if err := os.Chown(p, uid, gid); err != nil {
			return err
		}
	}
	return nil
}

// makeCounterFile creates an empty counter file at path, and its missing
// parent directories, owned like the nearest existing parent.
func makeCounterFile(path string) (os.FileInfo, error) {
	var missing []string
	dir := filepath.Dir(path)
	var parent os.FileInfo
	for {
		st, err := os.Stat(dir)
		if err == nil {
			parent = st
			break
		}
		if !errors.Is(err, os.ErrNotExist) || dir == filepath.Dir(dir) {
			return nil, err
		}
		missing = append(missing, dir)
		dir = filepath.Dir(dir)
	}
	uid, gid := -1, -1
	if sys, ok := parent.Sys().(*syscall.Stat_t); ok {
		uid, gid = int(sys.Uid), int(sys.Gid)
	}
	for i := len(missing) - 1; i >= 0; i-- {
		if err := os.Mkdir(missing[i], 0o700); err != nil {
			return nil, err
		}
		if err := os.Chown(missing[i], uid, gid); err != nil {
			return nil, err
		}
	}
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		return nil, err
	}
	if err := os.Chown(path, uid, gid); err != nil {
		return nil, err
	}
	return os.Stat(path)
}
