package main

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	_ "github.com/mattn/go-sqlite3"

	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// TestFlippedBits flips one bit in random message blobs (inline in the
// database and files) and then in random records of the undo log. Every
// flip is detected by fsck, a cycle over the damaged range is refused
// before anything is touched, fsck --repair mends every blob from the
// message's copy in the mail store (and only from a copy that hashes
// right), after which the cycle runs; a damaged record has no copy: it
// stays reported and the cycle stays refused.
func TestFlippedBits(t *testing.T) {
	st, s := repairServer(t)
	out, err := run(t, "snapshot", "--data-dir", s.dataDir)
	if err != nil {
		t.Fatalf("snapshot: %v %s", err, out)
	}
	snap := strings.Fields(out)[1]
	const n = 12
	for i := range n {
		body := "hi\r\n"
		if i%4 == 0 { // larger than the inline limit: a blob file
			body = strings.Repeat("a line of a long message\r\n", 8000)
		}
		if err := sendPlain(s.smtpAddr, fmt.Sprintf("Subject: m%d\r\nMessage-Id: <m%d@client.test>\r\n\r\n%s", i, i, body)); err != nil {
			t.Fatal(err)
		}
	}
	for i := range n {
		waitInbox(t, st, fmt.Sprintf("m%d@client.test", i))
	}
	s.stop()

	rng := rand.New(rand.NewPCG(1, 2))
	db, err := sql.Open("sqlite3", filepath.Join(s.dataDir, "undo.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	// The blobs of the LMTP deliveries (the ones replay re-delivers).
	rows, err := db.Query(`SELECT DISTINCT blob FROM records WHERE kind = ? AND blob != ''`, verb.KindLMTPDeliver)
	if err != nil {
		t.Fatal(err)
	}
	var blobs []string
	for rows.Next() {
		var b string
		rows.Scan(&b)
		blobs = append(blobs, b)
	}
	rows.Close()
	if len(blobs) != n {
		t.Fatalf("%d delivery blobs, want %d", len(blobs), n)
	}
	rng.Shuffle(len(blobs), func(i, j int) { blobs[i], blobs[j] = blobs[j], blobs[i] })
	flipped := map[string]bool{}
	inline, files := 0, 0
	for _, sha := range blobs {
		var data []byte
		err := db.QueryRow(`SELECT data FROM inline_blobs WHERE sha = ?`, sha).Scan(&data)
		switch {
		case err == nil && inline < 3:
			flip(rng, data)
			if _, err := db.Exec(`UPDATE inline_blobs SET data = ? WHERE sha = ?`, data, sha); err != nil {
				t.Fatal(err)
			}
			inline++
		case err != nil && files < 2:
			path := filepath.Join(s.dataDir, "blobs", sha[:2], sha)
			b, rerr := os.ReadFile(path)
			if rerr != nil {
				t.Fatal(rerr)
			}
			flip(rng, b)
			os.Chmod(path, 0o600)
			if err := os.WriteFile(path, b, 0o600); err != nil {
				t.Fatal(err)
			}
			files++
		default:
			continue
		}
		flipped[sha] = true
	}
	if inline != 3 || files != 2 {
		t.Fatalf("flipped %d inline and %d file blobs, want 3 and 2", inline, files)
	}
	out, err = run(t, "fsck", "--data-dir", s.dataDir)
	if err == nil {
		t.Fatalf("fsck found nothing after 5 blobs were damaged:\n%s", out)
	}
	for sha := range flipped {
		if !strings.Contains(out, sha[:12]) {
			t.Errorf("fsck missed damaged blob %s:\n%s", sha, out)
		}
	}
	before, _ := inboxMessageIDs(st, "alice")
	s.start()
	out, err = run(t, "cycle", "run", "--data-dir", s.dataDir, "--to", snap, "--yes")
	if err == nil || !strings.Contains(out, "damaged") {
		t.Fatalf("a cycle over damaged blobs was not refused: %v\n%s", err, out)
	}
	if now, _ := inboxMessageIDs(st, "alice"); fmt.Sprint(now) != fmt.Sprint(before) {
		t.Fatalf("the refused cycle changed the mailbox: %v, was %v", now, before)
	}
	s.stop()

	out, err = run(t, "fsck", "--data-dir", s.dataDir, "--repair", "--from", st.MailRoot)
	if err != nil || strings.Count(out, "repaired blob") != 5 {
		t.Fatalf("fsck --repair: %v\n%s", err, out)
	}
	s.start()
	out, err = run(t, "cycle", "run", "--data-dir", s.dataDir, "--to", snap, "--yes")
	if err != nil || !strings.Contains(out, "verdict: OK") {
		t.Fatalf("cycle after the repair: %v\n%s", err, out)
	}
	s.stop()

	// Records: no second copy.
	var last int64
	db.QueryRow(`SELECT max(seq) FROM records`).Scan(&last)
	var damagedRecs []int64
	for len(damagedRecs) < 3 {
		seq := 2 + rng.Int64N(last-10) // not the tail: a damaged tail keeps the log from opening
		var args []byte
		if db.QueryRow(`SELECT args FROM records WHERE seq = ?`, seq).Scan(&args) != nil || len(args) == 0 {
			continue
		}
		flip(rng, args)
		if _, err := db.Exec(`UPDATE records SET args = ? WHERE seq = ?`, args, seq); err != nil {
			t.Fatal(err)
		}
		damagedRecs = append(damagedRecs, seq)
	}
	out, err = run(t, "fsck", "--data-dir", s.dataDir, "--repair", "--from", st.MailRoot)
	if err == nil {
		t.Fatalf("fsck found nothing after records were damaged:\n%s", out)
	}
	for _, seq := range damagedRecs {
		if !strings.Contains(out, fmt.Sprintf("record %d: checksum mismatch", seq)) {
			t.Errorf("fsck missed damaged record %d:\n%s", seq, out)
		}
	}
	s.start()
	l, err := undolog.OpenReadOnly(s.dataDir)
	if err != nil {
		t.Fatal(err)
	}
	probs, err := l.VerifyRange(context.Background(), 0, 0)
	l.Close()
	if err != nil || len(probs) < len(damagedRecs) {
		t.Fatalf("VerifyRange found %v, %v", probs, err)
	}
	snaps, _ := run(t, "snapshots", "--data-dir", s.dataDir)
	out, err = run(t, "cycle", "run", "--data-dir", s.dataDir, "--to", snap, "--yes")
	if err == nil || !strings.Contains(out, "checksum mismatch") {
		t.Fatalf("a cycle over damaged records was not refused: %v\n%s\n%s", err, out, snaps)
	}
	s.stop()
}

// flip flips one random bit of b.
func flip(rng *rand.Rand, b []byte) {
	i := rng.IntN(len(b))
	b[i] ^= 1 << rng.IntN(8)
}

// TestPrune removes the log before a snapshot through the binary: the
// removed records are in the archive, the older snapshot is destroyed,
// fsck still checks the rest, and a cycle to the kept snapshot works
// while one to before it is refused.
func TestPrune(t *testing.T) {
	st, s := repairServer(t)
	snapOut, err := run(t, "snapshot", "--data-dir", s.dataDir)
	if err != nil {
		t.Fatalf("snapshot: %v %s", err, snapOut)
	}
	old := strings.Fields(snapOut)[1]
	for i := range 3 {
		if err := sendPlain(s.smtpAddr, fmt.Sprintf("Subject: p\r\nMessage-Id: <p%d@client.test>\r\n\r\nhi\r\n", i)); err != nil {
			t.Fatal(err)
		}
		waitInbox(t, st, fmt.Sprintf("p%d@client.test", i))
	}
	out, err := run(t, "snapshot", "--data-dir", s.dataDir)
	if err != nil {
		t.Fatal(err)
	}
	keep := strings.Fields(out)[1]
	if err := sendPlain(s.smtpAddr, "Subject: p\r\nMessage-Id: <after@client.test>\r\n\r\nhi\r\n"); err != nil {
		t.Fatal(err)
	}
	waitInbox(t, st, "after@client.test")
	archive := filepath.Join(t.TempDir(), "undo-archive.jsonl.gz")
	out, err = run(t, "prune", "--data-dir", s.dataDir, "--before", keep, "--archive", archive)
	if err != nil || !strings.Contains(out, "destroyed snapshot "+old) {
		t.Fatalf("prune: %v\n%s", err, out)
	}
	if fi, err := os.Stat(archive); err != nil || fi.Size() == 0 {
		t.Fatalf("archive: %v", err)
	}
	if out, err := run(t, "fsck", "--data-dir", s.dataDir); err != nil || !strings.Contains(out, "pruned") {
		t.Fatalf("fsck after a prune: %v\n%s", err, out)
	}
	if out, err := run(t, "cycle", "run", "--data-dir", s.dataDir, "--to", keep, "--yes"); err != nil || !strings.Contains(out, "verdict: OK") {
		t.Fatalf("cycle to the kept snapshot: %v\n%s", err, out)
	}
	if out, err := run(t, "cycle", "run", "--data-dir", s.dataDir, "--to", old, "--yes"); err == nil {
		t.Fatalf("a cycle to a pruned snapshot ran:\n%s", out)
	}
	s.stop()
	s.start() // the pruned log opens
	s.stop()
}
