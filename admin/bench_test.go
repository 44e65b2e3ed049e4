package admin

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// BenchmarkTimeline renders the web timeline (one user, one day, 300
// verbs) and an API page (one user's verbs of one kind before a time,
// 100) over HTTP in logs of 10^4, 10^5 and 10^6 verbs. Compare ns/op
// across the sizes: it must not grow with the log. (A filter that
// matches rarely costs what it takes to find a page of matches: a user
// and a kind they never used read the user's whole history in the
// range; bound it with since/until.)
func BenchmarkTimeline(b *testing.B) {
	dir := b.TempDir()
	l, err := undolog.Open(filepath.Join(dir, "undo"), undolog.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	s, err := New(&fakeDaemon{l: l}, Options{DataDir: dir})
	if err != nil {
		b.Fatal(err)
	}
	ts := httptest.NewServer(s.Handler())
	defer ts.Close()
	// A browser session, as the web timeline needs.
	rec := httptest.NewRecorder()
	s.auth.login(rec)
	cookie := rec.Result().Cookies()[0]
	get := func(path string) {
		req, _ := http.NewRequest("GET", ts.URL+path, nil)
		req.AddCookie(cookie)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		n, _ := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || n == 0 {
			b.Fatalf("GET %s: %s", path, resp.Status)
		}
	}
	ctx := context.Background()
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	kinds := []string{verb.KindIMAPStore, verb.KindIMAPCopy, verb.KindIMAPMove, verb.KindIMAPExpunge, verb.KindIMAPCreate}
	have := 0
	for _, n := range []int{1e4, 1e5, 1e6} {
		var recs []*undolog.Record
		for i := have; i < n; i++ {
			user := fmt.Sprintf("u%d", i%10)
			args, _ := json.Marshal(verb.IMAPArgs{Command: strings.ToUpper(strings.TrimPrefix(kinds[i%5], "imap.")), Mailbox: fmt.Sprintf("Folder %d", i%7)})
			recs = append(recs, &undolog.Record{Time: t0.Add(time.Duration(i) * time.Second), User: user, Session: "s",
				Kind: kinds[i%5], Users: []string{user}, Args: args})
			if len(recs) == 2000 || i == n-1 {
				if err := l.AppendNoSync(ctx, recs...); err != nil {
					b.Fatal(err)
				}
				recs = recs[:0]
			}
		}
		have = n
		end := t0.Add(time.Duration(n/2) * time.Second).Format(time.RFC3339)
		b.Run(fmt.Sprintf("web/verbs=%d", n), func(b *testing.B) {
			for b.Loop() {
				get("/?user=u3&span=1d&end=" + url.QueryEscape(end))
			}
		})
		b.Run(fmt.Sprintf("api/verbs=%d", n), func(b *testing.B) {
			for b.Loop() {
				get("/api/verbs?user=u3&kind=imap.expunge&order=desc&limit=100&until=" + url.QueryEscape(end))
			}
		})
	}
}
