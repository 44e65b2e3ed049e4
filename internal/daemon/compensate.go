package daemon

import "context"

// compensate finds the paradoxes the cycle cycleSeq created and explains
// them to the people affected (issue 6). It runs after the replay, while
// changes are still held, so users find the explanation when they return.
// Being written: until then a cycle reports no compensation.
func (d *Daemon) compensate(ctx context.Context, cycleSeq int64, v *CycleVerdict) error {
	return nil
}
