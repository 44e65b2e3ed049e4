package undolog

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
)

// BenchmarkAppend logs one verb with a small message blob per op from many
// concurrent sessions and reports how many records shared each commit
// (fsync): the group-commit factor.
func BenchmarkAppend(b *testing.B) {
	l, err := Open(b.TempDir(), Options{})
	if err != nil {
		b.Fatalf("Open: %v", err)
	}
	defer l.Close()
	var n atomic.Int64
	b.SetParallelism(32) // 32 sessions per CPU
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		msg := make([]byte, 2048)
		for pb.Next() {
			i := n.Add(1)
			copy(msg, fmt.Sprintf("Message-ID: <%d@bench>\r\n", i))
			ref, err := storeBlob(l, msg)
			if err != nil {
				b.Errorf("storeBlob: %v", err)
				return
			}
			r := Record{User: "bench", Kind: "lmtp.deliver", Users: []string{"rcpt"}}
			r.AttachBlob(ref)
			if err := l.Append(context.Background(), &r); err != nil {
				b.Errorf("Append: %v", err)
				return
			}
		}
	})
	b.StopTimer()
	st := l.Stats()
	if st.Commits > 0 {
		b.ReportMetric(float64(st.Records)/float64(st.Commits), "records/commit")
	}
}

// procWriteBytes is what this process has caused to be written to storage
// (Linux /proc/self/io); ok is false elsewhere.
func procWriteBytes() (int64, bool) {
	data, err := os.ReadFile("/proc/self/io")
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "write_bytes: "); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			return n, err == nil
		}
	}
	return 0, false
}

// BenchmarkDelivery logs what a relayed message costs: a durable intent
// with a 4 KiB message blob, then its outcome without waiting for the
// fsync, from 8 concurrent sessions (the load test's), and reports
// records per fsync and per transaction.
func BenchmarkDelivery(b *testing.B) {
	l, err := Open(b.TempDir(), Options{})
	if err != nil {
		b.Fatalf("Open: %v", err)
	}
	defer l.Close()
	var n atomic.Int64
	b.SetParallelism(max(1, 8/runtime.GOMAXPROCS(0)))
	io0, ioOK := procWriteBytes()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		// A message that compresses like a base64 attachment does (to
		// about three quarters): typical mail compresses further.
		raw := make([]byte, 3072)
		rand.Read(raw)
		msg := []byte(base64.StdEncoding.EncodeToString(raw))
		for pb.Next() {
			i := n.Add(1)
			copy(msg, fmt.Sprintf("Message-ID: <%d@bench>\r\n", i))
			ref, err := storeBlob(l, msg)
			if err != nil {
				b.Errorf("storeBlob: %v", err)
				return
			}
			r := Record{User: "bench", Kind: "lmtp.deliver", Users: []string{"rcpt"}, Args: []byte(fmt.Sprintf(`{"undo_id":"%d"}`, i))}
			r.AttachBlob(ref)
			if err := l.Append(context.Background(), &r); err != nil {
				b.Errorf("Append: %v", err)
				return
			}
			o := Record{User: "bench", Kind: KindOutcome, Ref: r.Seq, Users: []string{"rcpt"}, Outcome: []byte(`{"reply":{"code":250}}`)}
			if err := l.AppendNoSync(context.Background(), &o); err != nil {
				b.Errorf("AppendNoSync: %v", err)
				return
			}
		}
	})
	b.StopTimer()
	st := l.Stats()
	if st.Fsyncs > 0 && st.Commits > 0 {
		b.ReportMetric(float64(st.Records)/float64(st.Fsyncs), "records/fsync")
		b.ReportMetric(float64(st.Records)/float64(st.Commits), "records/commit")
	}
	if io1, ok := procWriteBytes(); ok && ioOK {
		// The disk writes per message: the WAL, checkpoints, HEAD. On a
		// shared machine a steadier measure of the cost than time.
		b.ReportMetric(float64(io1-io0)/float64(b.N), "disk-bytes/op")
	}
}
