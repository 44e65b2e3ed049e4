package undolog

import (
	"context"
	"fmt"
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
