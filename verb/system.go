package verb

import "github.com/undomail/undomail/undolog"

// The kinds of the records undomail writes about itself. They are
// defined where they are written (internal/daemon, replay, compensate);
// this package reads them by these names, and its tests check the two
// agree.
const (
	KindSnapshot       = "snapshot"
	KindSnapshotPruned = "snapshot.pruned"
	KindCycle          = "cycle"
	KindReplay         = "replay"
	KindRewind         = "rewind"
	KindDrill          = "drill"
	KindCompensation   = "compensation"
	KindFilterRemoved  = "filter.removed"
	KindOutcome        = undolog.KindOutcome
	// KindNote is a free-form note of the first log format (undolog
	// testdata/v1): old logs still hold them.
	KindNote = "system.note"
)
