package main

import (
	"testing"

	"github.com/undomail/undomail/replay"
)

func TestProgressLine(t *testing.T) {
	for _, c := range []struct {
		p    replay.Progress
		want string
	}{
		{replay.Progress{Phase: "rewind"}, "rewind..."},
		{replay.Progress{Phase: "replay", Done: 5, Total: 10, Users: 3}, "replay     [#####.....] 5/10 verbs, 3 users"},
		{replay.Progress{Phase: "verify", Done: 3, Total: 3, Failed: 1}, "verify     [##########] 3/3, 1 failed"},
	} {
		if got := progressLine(c.p, 10); got != c.want {
			t.Errorf("progressLine(%+v) = %q, want %q", c.p, got, c.want)
		}
	}
}
