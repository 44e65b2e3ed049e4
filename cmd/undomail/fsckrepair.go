package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/textproto"
	"os"
	"path/filepath"
	"strings"

	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// repairBlobs mends the damaged blobs fsck found from copies of their
// messages under the given directories, found by undo id. It returns how
// many it mended; each one it could not is said on w.
func repairBlobs(ctx context.Context, dataDir string, from []string, w io.Writer) (int, error) {
	damaged := map[string]bool{}
	if _, err := undolog.Check(ctx, dataDir, func(p undolog.Problem) {
		if p.Blob != "" && p.Severity == undolog.Error {
			damaged[p.Blob] = true
		}
	}); err != nil {
		return 0, err
	}
	if len(damaged) == 0 {
		return 0, nil
	}
	l, err := undolog.OpenReadOnly(dataDir)
	if err != nil {
		return 0, err
	}
	recs, err := l.Records(ctx, undolog.Filter{})
	l.Close()
	if err != nil {
		return 0, err
	}
	ids := map[string][]string{} // blob -> undo ids of the records naming it
	for _, r := range recs {
		if !damaged[r.Blob] {
			continue
		}
		var a struct {
			UndoID string `json:"undo_id"`
		}
		if json.Unmarshal(r.Args, &a) == nil && a.UndoID != "" {
			ids[r.Blob] = append(ids[r.Blob], a.UndoID)
		}
	}
	index, err := indexCopies(from)
	if err != nil {
		return 0, err
	}
	fixed := 0
	for sha := range damaged {
		done := false
		for _, id := range ids[sha] {
			for _, path := range index[id] {
				b, err := os.ReadFile(path)
				if err != nil {
					continue
				}
				for _, c := range blobCandidates(b, id) {
					if undolog.RepairBlob(ctx, dataDir, sha, c) == nil {
						fmt.Fprintf(w, "repaired blob %s (message %s) from %s\n", sha, id, path)
						fixed++
						done = true
						break
					}
				}
				if done {
					break
				}
			}
			if done {
				break
			}
		}
		if !done {
			fmt.Fprintf(w, "cannot repair blob %s: no copy of message %v under %s hashes to it\n", sha, ids[sha], strings.Join(from, ", "))
		}
	}
	return fixed, nil
}

// indexCopies finds every maildir message file under the directories and
// indexes it by the undo ids in its header.
func indexCopies(dirs []string) (map[string][]string, error) {
	index := map[string][]string{}
	for _, dir := range dirs {
		err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return nil // unreadable parts are skipped, not fatal
			}
			parent := filepath.Base(filepath.Dir(path))
			if d.IsDir() || (parent != "cur" && parent != "new") {
				return nil
			}
			f, err := os.Open(path)
			if err != nil {
				return nil
			}
			defer f.Close()
			h, _ := textproto.NewReader(bufio.NewReader(io.LimitReader(f, 1<<20))).ReadMIMEHeader()
			for _, id := range h.Values(verb.TraceHeader) {
				index[strings.TrimSpace(id)] = append(index[strings.TrimSpace(id)], path)
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("index copies under %s: %w", dir, err)
		}
	}
	return index, nil
}

// blobCandidates are the ways a stored message can relate to the blob it
// was delivered from: Dovecot stores it with LF line ends and adds header
// lines on top (Return-Path, Delivered-To, Received), and undomail put an
// Undomail-Id line above what it logged. Only a candidate that hashes to
// the blob's name is ever written.
func blobCandidates(b []byte, undoID string) [][]byte {
	var out [][]byte
	add := func(x []byte) { out = append(out, x, crlf(x)) }
	add(b)
	rest := b
	for range 8 {
		i := headerLineEnd(rest)
		if i < 0 {
			break
		}
		line := string(rest[:i])
		rest = rest[i:]
		add(rest)
		if strings.HasPrefix(line, verb.TraceHeader+": "+undoID) {
			break
		}
	}
	return out
}

// headerLineEnd returns the length of the first header field of b,
// continuation lines included, or -1 at the end of the header.
func headerLineEnd(b []byte) int {
	if len(b) == 0 || b[0] == '\n' || bytes.HasPrefix(b, []byte("\r\n")) {
		return -1
	}
	i := 0
	for {
		j := bytes.IndexByte(b[i:], '\n')
		if j < 0 {
			return -1
		}
		i += j + 1
		if i >= len(b) || (b[i] != ' ' && b[i] != '\t') {
			return i
		}
	}
}

// crlf turns bare LF line ends into CRLF.
func crlf(b []byte) []byte {
	var out bytes.Buffer
	for i, c := range b {
		if c == '\n' && (i == 0 || b[i-1] != '\r') {
			out.WriteByte('\r')
		}
		out.WriteByte(c)
	}
	return out.Bytes()
}
