package undolog

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// buildLog writes 10 records; records 3 and 7 carry blobs. It returns the
// blob names by seq.
func buildLog(t *testing.T, dir string) map[int64]string {
	t.Helper()
	l := openTest(t, dir)
	blobs := make(map[int64]string)
	for i := int64(1); i <= 10; i++ {
		r := Record{User: "alice", Kind: "imap.store", Users: []string{"bob"}, Args: json.RawMessage(fmt.Sprintf(`{"uid":%d,"flags":["\\Seen"]}`, i))}
		if i == 3 || i == 7 {
			ref, err := storeBlob(l, []byte(fmt.Sprintf("message %d\r\n", i)))
			if err != nil {
				t.Fatalf("storeBlob: %v", err)
			}
			r.Kind, r.Blob = "lmtp.deliver", ref.SHA256
			blobs[i] = ref.SHA256
		}
		appendRec(t, l, r)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	return blobs
}

func TestCheckFindsDamage(t *testing.T) {
	blobPath := func(dir, sha string) string { return filepath.Join(dir, blobsName, sha[:2], sha) }
	tests := []struct {
		name     string
		damage   func(t *testing.T, dir string, blobs map[int64]string)
		wantSeq  int64
		wantBlob int64 // seq whose blob the problem must name, 0 for none
		wantWhat string
	}{
		{"args bit flipped", func(t *testing.T, dir string, _ map[int64]string) { flipArgs(t, dir, 5) },
			5, 0, "record 5: checksum mismatch"},
		{"middle record deleted", func(t *testing.T, dir string, _ map[int64]string) {
			tamper(t, dir, `DELETE FROM records WHERE seq = 5`)
		}, 5, 0, "record 5 missing: gap"},
		{"middle records deleted", func(t *testing.T, dir string, _ map[int64]string) {
			tamper(t, dir, `DELETE FROM records WHERE seq BETWEEN 4 AND 6`)
		}, 4, 0, "records 4-6 missing: gap"},
		{"tail deleted", func(t *testing.T, dir string, _ map[int64]string) {
			tamper(t, dir, `DELETE FROM records WHERE seq > 7`)
		}, 8, 0, "records 8-10 missing: log truncated (HEAD says 10, last record is 7)"},
		{"record replaced, chain broken", func(t *testing.T, dir string, _ map[int64]string) {
			// A forger who recomputes record 5's own sum still breaks the
			// link from record 6.
			forge(t, dir, 5)
		}, 6, 0, "record 6: checksum mismatch"},
		{"blob corrupted", func(t *testing.T, dir string, blobs map[int64]string) {
			corruptFile(t, blobPath(dir, blobs[7]))
		}, 7, 7, "blob corrupted (referenced by record 7)"},
		{"blob deleted", func(t *testing.T, dir string, blobs map[int64]string) {
			if err := os.Remove(blobPath(dir, blobs[3])); err != nil {
				t.Fatal(err)
			}
		}, 3, 3, "record 3: blob"},
		{"users index entry deleted", func(t *testing.T, dir string, _ map[int64]string) {
			tamper(t, dir, `DELETE FROM record_users WHERE seq = 2 AND user = 'bob'`)
		}, 2, 0, "record 2: users index"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			blobs := buildLog(t, dir)
			tt.damage(t, dir, blobs)
			var found []Problem
			sum, err := Check(context.Background(), dir, func(p Problem) {
				if p.Severity != Info {
					found = append(found, p)
				}
			})
			if err != nil {
				t.Fatalf("Check: %v", err)
			}
			var lines []string
			for _, p := range found {
				lines = append(lines, fmt.Sprintf("%s (seq %d, blob %.8s)", p, p.Seq, p.Blob))
			}
			t.Logf("%v\n%s", sum, strings.Join(lines, "\n"))
			if len(found) != 1 {
				t.Fatalf("Check reported %d problems, want exactly 1", len(found))
			}
			p := found[0]
			if p.Seq != tt.wantSeq || !strings.Contains(p.What, tt.wantWhat) {
				t.Fatalf("problem = %q at seq %d, want seq %d containing %q", p.What, p.Seq, tt.wantSeq, tt.wantWhat)
			}
			if tt.wantBlob != 0 && p.Blob != blobs[tt.wantBlob] {
				t.Fatalf("problem names blob %q, want %q", p.Blob, blobs[tt.wantBlob])
			}
			if p.Severity == Error && sum.OK() {
				t.Fatalf("Summary %v claims OK despite an error", sum)
			}
		})
	}
}

func TestCheckCleanLog(t *testing.T) {
	dir := t.TempDir()
	buildLog(t, dir)
	sum := checkClean(t, dir)
	if sum.Records != 10 || sum.Blobs != 2 || sum.Errors != 0 || sum.Warnings != 0 {
		t.Fatalf("Summary = %+v, want 10 records, 2 blobs, nothing wrong", sum)
	}
	t.Log(sum)
}

func TestCheckInformational(t *testing.T) {
	dir := t.TempDir()
	buildLog(t, dir)
	l := openTest(t, dir)
	orphan, err := storeBlob(l, []byte("stored, then the verb failed"))
	if err != nil {
		t.Fatalf("storeBlob: %v", err)
	}
	w, err := l.NewBlob()
	if err != nil {
		t.Fatalf("NewBlob: %v", err)
	}
	w.Write([]byte("in flight"))
	var infos []Problem
	sum, err := Check(context.Background(), dir, func(p Problem) {
		if p.Severity == Info {
			infos = append(infos, p)
		}
	})
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	if !sum.OK() || sum.Warnings != 0 || len(infos) != 2 {
		t.Fatalf("Check of a live log with an orphan blob and a temp file: %v, infos %v; want 2 infos only", sum, infos)
	}
	if infos[0].Blob != orphan.SHA256 && infos[1].Blob != orphan.SHA256 {
		t.Fatalf("no info names the unreferenced blob: %v", infos)
	}
	w.Abort()
}

func TestCheckMissingDir(t *testing.T) {
	if _, err := Check(context.Background(), filepath.Join(t.TempDir(), "nope"), nil); err == nil {
		t.Fatalf("Check of a missing dir returned no error")
	}
}
