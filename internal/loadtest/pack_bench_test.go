package loadtest

import (
	"bytes"
	"compress/flate"
	"fmt"
	"math/rand/v2"
	"testing"
)

// BenchmarkPack measures DEFLATE's levels on a typical 4 KiB message, for
// the level undolog stores inline blobs with (undolog/pack.go): time per
// message and the share of bytes kept.
func BenchmarkPack(b *testing.B) {
	msg := []byte(TypicalMessage(rand.New(rand.NewPCG(1, 2)), "a@b", "c@d", "subj", 4096))
	for _, lvl := range []int{1, 2, 3, 4, 6, flate.HuffmanOnly} {
		w, _ := flate.NewWriter(nil, lvl)
		var buf bytes.Buffer
		b.Run(fmt.Sprintf("level%d", lvl), func(b *testing.B) {
			for b.Loop() {
				buf.Reset()
				w.Reset(&buf)
				w.Write(msg)
				w.Close()
			}
			b.ReportMetric(float64(buf.Len())/float64(len(msg)), "ratio")
		})
	}
}
