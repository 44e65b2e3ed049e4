package daemon_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/internal/loadtest"
	"github.com/undomail/undomail/internal/testbed"
	"github.com/undomail/undomail/internal/testbed/testbedtest"
	"github.com/undomail/undomail/timetravel/zfstest"
)

func TestMain(m *testing.M) { os.Exit(zfstest.Main(m)) }

// BenchmarkSnapshotPause measures how long a snapshot holds mutations
// back while SMTP and IMAP load runs through undomail, for each backend.
// One iteration is one snapshot; p50 and p99 of the pause are reported.
func BenchmarkSnapshotPause(b *testing.B) {
	b.Run("copy", func(b *testing.B) {
		snapDir := filepath.Join(b.TempDir(), "snaps")
		pauseBench(b, "copy", testbedtest.Start(b, func(c *config.Config) { c.Store = "copy:" + snapDir }))
	})
	b.Run("zfs", func(b *testing.B) {
		// The mail store is a dataset of a fresh file-backed pool.
		p := zfstest.NewPool(b)
		p.ZFS(b, "create", p.Name+"/mail")
		tb := testbedtest.StartWith(b, testbed.Options{
			MailRoot: filepath.Join(p.Mountpoint, "mail"),
			Tweak:    func(c *config.Config) { c.Store = "zfs:" + p.Name + "/mail" },
		})
		pauseBench(b, "zfs", tb)
	})
}

func pauseBench(b *testing.B, backend string, tb *testbed.Testbed) {
	stop := runLoad(b, tb)
	defer stop()
	pauses := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		time.Sleep(100 * time.Millisecond)
		_, pause, err := tb.Daemon.Snapshot(context.Background(), "benchmark")
		if err != nil {
			b.Fatal(err)
		}
		pauses = append(pauses, pause)
	}
	b.StopTimer()
	sort.Slice(pauses, func(i, j int) bool { return pauses[i] < pauses[j] })
	p50, p99 := pauses[len(pauses)/2], pauses[(len(pauses)*99)/100]
	fmt.Fprintf(os.Stdout, "snapshot pause under SMTP+IMAP load (%s backend, %d snapshots): p50 %v, p99 %v\n", backend, len(pauses), p50, p99)
	b.ReportMetric(float64(p50.Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(p99.Microseconds())/1000, "p99-ms")
}

// runLoad keeps SMTP (smtp-source) and IMAP (mixed client) load going
// through undomail until the returned function is called.
func runLoad(b testing.TB, tb *testbed.Testbed) func() {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for ctx.Err() == nil {
			exec.CommandContext(ctx, "smtp-source", "-s", "4", "-m", "200", "-l", "2048", "-f", "load@example.test",
				"-t", tb.Stack.Address("bob"), tb.SMTPAddr()).Run()
		}
	}()
	go func() {
		defer wg.Done()
		for ctx.Err() == nil {
			loadtest.MeasureIMAP(ctx, tb, loadtest.IMAPOptions{Clients: 4, Cycles: 5, Rounds: 1}, nopWriter{})
		}
	}()
	return func() { cancel(); wg.Wait() }
}

type nopWriter struct{}

func (nopWriter) Write(p []byte) (int, error) { return len(p), nil }
