package timetravel

import (
	"fmt"
	"testing"
	"time"
)

func TestRetain(t *testing.T) {
	now := time.Date(2026, 11, 21, 12, 30, 0, 0, time.UTC)
	var snaps []Snapshot
	// One every 20 minutes for 20 days.
	for i := 0; i < 20*24*3; i++ {
		snaps = append(snaps, Snapshot{Name: fmt.Sprint(i), Created: now.Add(-time.Duration(i) * 20 * time.Minute)})
	}
	keep := Retain(snaps, now, 48, 14)
	// 48 hourly buckets (the current hour included) plus the daily ones
	// older than those two days: the 14 days are Nov 8 to 21, and the
	// newest of Nov 19, 20 and 21 are already among the hourly ones, so
	// 11 more.
	hourly, daily := 0, 0
	for _, s := range snaps {
		if !keep[s.Name] {
			continue
		}
		if now.Sub(s.Created) < 48*time.Hour {
			hourly++
		} else {
			daily++
			if s.Created.Before(time.Date(2026, 11, 8, 0, 0, 0, 0, time.UTC)) {
				t.Errorf("kept %v, older than 14 days", s.Created)
			}
		}
	}
	if !keep["0"] || hourly != 48 || daily != 11 {
		t.Fatalf("kept newest %v, %d hourly, %d daily; want true, 48, 11", keep["0"], hourly, daily)
	}
	if len(Retain(snaps, now, 0, 0)) != 1 {
		t.Fatal("with no retention the newest snapshot must still be kept")
	}
}

// TestPrune prunes real snapshots on every backend: with no retention
// beyond the newest, the older ones go, a foreign snapshot stays.
func TestPrune(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			s := b.open(t)
			ctx := testCtx(t)
			for i, name := range []string{"undomail-a", "undomail-b", "undomail-c"} {
				if _, err := s.Snapshot(ctx, name, int64(10*(i+1)), nil); err != nil {
					t.Fatal(err)
				}
				time.Sleep(20 * time.Millisecond) // distinct creation times
			}
			pruned, err := Prune(ctx, s, time.Now(), 0, 0, testLogger(t))
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(pruned) != "[undomail-a undomail-b]" {
				t.Fatalf("pruned %v, want the two older ones", pruned)
			}
			left, _ := s.List(ctx)
			if len(left) != 1 || left[0].Name != "undomail-c" || left[0].Seq != 30 {
				t.Fatalf("left %+v", left)
			}
		})
	}
}
