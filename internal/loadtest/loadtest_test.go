package loadtest

import (
	"context"
	"os"
	"testing"

	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

func TestMain(m *testing.M) {
	RunSourceIfAsked() // Measure runs its load source as this binary
	os.Exit(m.Run())
}

// BenchmarkSMTP sends 1000 messages of 4 KiB over 8 sessions to Postfix
// directly and through undomail's front door, alternating, and reports
// both rates and the ratio. One iteration is one round.
func BenchmarkSMTP(b *testing.B) { benchmark(b, false) }

// BenchmarkLMTP does the same for the LMTP capture against Dovecot's LMTP.
func BenchmarkLMTP(b *testing.B) { benchmark(b, true) }

func benchmark(b *testing.B, lmtp bool) {
	tb := testbedtest.Start(b, nil)
	o := Options{Messages: 1000, Size: 4096, Sessions: 8, Rounds: b.N, LMTP: lmtp}
	b.ResetTimer()
	res, err := Measure(context.Background(), tb, o, os.Stdout)
	if err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	res.Report(os.Stdout)
	b.ReportMetric(res.Direct, "direct-msg/s")
	b.ReportMetric(res.Proxy, "undomail-msg/s")
	b.ReportMetric(res.Ratio, "ratio")
}

// TestMeasureSmall runs a tiny load through both paths so the load
// command's machinery is exercised on every test run.
func TestMeasureSmall(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	res, err := Measure(context.Background(), tb, Options{Messages: 20, Size: 1024, Sessions: 2, Rounds: 1}, testWriter{t})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Runs) != 2 || res.Direct <= 0 || res.Proxy <= 0 {
		t.Fatalf("result %+v", res)
	}
	n, err := tb.Daemon.Log.Verbs(context.Background(), verbsFilter())
	if err != nil || len(n) < 20 {
		t.Fatalf("undomail logged %d submissions for 20 messages sent through it (%v)", len(n), err)
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

func verbsFilter() undolog.Filter { return undolog.Filter{Kinds: []string{verb.KindSMTPSubmit}} }

// BenchmarkIMAP runs the mixed IMAP workload (8 clients) against Dovecot
// directly and through undomail's IMAP front end; one iteration is a round.
func BenchmarkIMAP(b *testing.B) {
	tb := testbedtest.Start(b, nil)
	b.ResetTimer()
	res, err := MeasureIMAP(context.Background(), tb, IMAPOptions{Clients: 8, Cycles: 20, Rounds: b.N}, os.Stdout)
	if err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	res.Report(os.Stdout)
	b.ReportMetric(res.Direct, "direct-cmd/s")
	b.ReportMetric(res.Proxy, "undomail-cmd/s")
	b.ReportMetric(res.Ratio, "ratio")
}

// TestMeasureIMAPSmall runs a tiny IMAP load through both paths.
func TestMeasureIMAPSmall(t *testing.T) {
	tb := testbedtest.Start(t, nil)
	res, err := MeasureIMAP(context.Background(), tb, IMAPOptions{Clients: 2, Cycles: 2, Rounds: 1}, testWriter{t})
	if err != nil {
		t.Fatal(err)
	}
	// 9 timed commands per cycle: login, select, fetch list, read, flag,
	// append, delete, expunge, logout.
	if len(res.Runs) != 2 || res.Runs[0].Commands != 2*2*9 || res.Runs[1].Commands != 2*2*9 {
		t.Fatalf("runs %+v", res.Runs)
	}
	// Each of the 9 steps was timed once per cycle on both paths.
	for i, r := range res.Runs {
		for step, lat := range r.Steps {
			if len(lat) != 2*2 {
				t.Errorf("run %d (%s): step %q timed %d times, want 4", i, r.Target, imapSteps[step], len(lat))
			}
		}
	}
	for step, p := range res.StepP50 {
		if p[0] <= 0 || p[1] <= 0 {
			t.Errorf("step %q: median latencies %v", imapSteps[step], p)
		}
	}
	// 2 clients x (2 cycles + 1 warm-up cycle) appended through undomail.
	appends, err := tb.Daemon.Log.Verbs(context.Background(), undolog.Filter{Kinds: []string{verb.KindIMAPAppend}})
	if err != nil || len(appends) != 6 {
		t.Fatalf("undomail logged %d APPENDs for the 6 sent through it (%v)", len(appends), err)
	}

	// Staying logged in: one LOGIN and one LOGOUT per client and run,
	// the 7 other commands every cycle.
	res, err = MeasureIMAP(context.Background(), tb, IMAPOptions{Clients: 2, Cycles: 3, Rounds: 1, Stay: true}, testWriter{t})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res.Runs {
		if r.Commands != 2*(3*7+2) || len(r.Steps[0]) != 2 || len(r.Steps[8]) != 2 || len(r.Steps[4]) != 2*3 {
			t.Fatalf("staying logged in, %s: %d commands, %d logins, %d logouts, %d STOREs", r.Target, r.Commands, len(r.Steps[0]), len(r.Steps[8]), len(r.Steps[4]))
		}
	}
}
