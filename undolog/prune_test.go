package undolog

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestPrune: records before a point and the blobs only they name go,
// written to the archive first; the remaining log checks (fsck and
// VerifyRange from the base), reopens, and takes appends; a range
// reaching before the base is refused.
func TestPrune(t *testing.T) {
	dir := t.TempDir()
	opts := testOptions(t)
	opts.InlineBlobMax = 64 // small blobs inline, big ones as files
	l, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	shared, _ := storeBlob(l, []byte(strings.Repeat("shared\r\n", 40)))
	for i := range 10 {
		r := &Record{Kind: "test", Args: []byte(fmt.Sprintf(`{"n":%d}`, i))}
		switch {
		case i == 2 || i == 8: // named before and after the prune point
			r.AttachBlob(shared)
		case i%3 == 0:
			b, _ := storeBlob(l, []byte(fmt.Sprintf("message %d %s", i, strings.Repeat("x", 100*(i%2)))))
			r.AttachBlob(b)
		}
		if err := l.Append(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	var archive bytes.Buffer
	st, err := l.Prune(ctx, 6, &archive)
	if err != nil || st.Base != 5 || st.Records != 5 {
		t.Fatalf("prune: %+v %v", st, err)
	}
	// The archive holds records 1-5 and the blobs only they named.
	zr, err := gzip.NewReader(&archive)
	if err != nil {
		t.Fatal(err)
	}
	var recs, blobs int
	var prev [32]byte // record 1 links to all zeros
	sc := bufio.NewScanner(zr)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var line archiveLine
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			t.Fatal(err)
		}
		if r := line.Record; r != nil {
			recs++
			// Each archived record carries its link to the one before.
			if r.PrevSum != prev {
				t.Errorf("archived record %d does not verify: prev_sum %x, want %x", r.Seq, r.PrevSum[:4], prev[:4])
			}
			prev = r.Sum
		}
		if line.Blob != "" {
			blobs++
			if line.Blob == shared.SHA256 {
				t.Errorf("archived and removed the blob record 9 still names")
			}
		}
	}
	if recs != 5 || blobs != 2 {
		t.Fatalf("archive: %d records, %d blobs; want 5 and 2 (records 1 and 4 named blobs of their own)", recs, blobs)
	}
	if _, err := l.ReadBlob(shared.SHA256); err != nil {
		t.Fatalf("the blob a remaining record names: %v", err)
	}
	if probs, err := l.VerifyRange(ctx, 5, 0); err != nil || len(probs) != 0 {
		t.Fatalf("VerifyRange from the base: %v %v", probs, err)
	}
	if probs, _ := l.VerifyRange(ctx, 2, 0); len(probs) == 0 || !strings.Contains(probs[0].What, "pruned") {
		t.Fatalf("VerifyRange reaching before the base: %v", probs)
	}
	l.Close()
	sum, err := Check(ctx, dir, func(p Problem) {
		if p.Severity != Info {
			t.Errorf("fsck after a prune: %s", p)
		}
	})
	if err != nil || sum.Errors != 0 || sum.Warnings != 0 {
		t.Fatalf("fsck after a prune: %+v %v", sum, err)
	}
	if entries, _ := os.ReadDir(filepath.Join(dir, blobsName)); len(entries) == 0 {
		t.Fatal("no blob directory left")
	}
	l = openTest(t, dir)
	if err := l.Append(ctx, &Record{Kind: "test", Args: []byte(`{"after":1}`)}); err != nil {
		t.Fatalf("append after a prune: %v", err)
	}
	if last, _ := l.Last(); last != 11 {
		t.Fatalf("after a prune the log goes on at %d, want 11", last)
	}
	// Prune everything but the last record, then reopen: the chain still
	// links to the base.
	if _, err := l.Prune(ctx, 11, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Prune(ctx, 12, nil); err == nil {
		t.Fatal("pruned the last record")
	}
	l.Close()
	l = openTest(t, dir)
	if err := l.Append(ctx, &Record{Kind: "test", Args: []byte(`{"after":2}`)}); err != nil {
		t.Fatal(err)
	}
	if probs, err := l.VerifyRange(ctx, 10, 0); err != nil || len(probs) != 0 {
		t.Fatalf("VerifyRange after the second prune: %v %v", probs, err)
	}
}
