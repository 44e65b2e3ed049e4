package verb

import "github.com/undomail/undomail/undolog"

// The kinds of the records undomail writes about itself, each spelled
// here once: the daemon, replay and compensation write them by these
// names and everything that reads the log reads them by these names
// (TestEveryWrittenKindRegistered fails for a kind spelled anywhere
// else).
const (
	// KindSnapshot is a snapshot of the mail store. Its args name it and
	// the log position it was taken at; its outcome says whether it was
	// taken.
	KindSnapshot = "snapshot"
	// KindSnapshotPruned records that retention destroyed a snapshot, so
	// the log no longer offers it as a target.
	KindSnapshotPruned = "snapshot.pruned"
	// KindCycle is a 3R cycle; its outcome is the verdict.
	KindCycle = "cycle"
	// KindReplay records what replaying one logged verb did (a
	// ReplayOutcome); Ref names the verb.
	KindReplay = "replay"
	// KindRewind is a rewind; its args hold the counters every mailbox
	// had before it, outside the store that is rolled back
	// (docs/architecture.md: UIDs are never reused).
	KindRewind = "rewind"
	// KindDrill is a recovery drill: args name the snapshots, the
	// outcome is its verdict.
	KindDrill = "drill"
	// KindCompensation is a compensating message undomail delivered:
	// args are DeliveryArgs, the outcome a DeliveryOutcome, the blob the
	// message. A later replay re-delivers it like a captured delivery,
	// so the explanation survives later cycles and is never made twice.
	KindCompensation = "compensation"
	// KindFilterRemoved ends a kept filter's life for live mail; args
	// name the cycle that kept it ({"cycle": SEQ}).
	KindFilterRemoved = "filter.removed"
	KindOutcome       = undolog.KindOutcome
	// KindNote is a free-form note of the first log format (undolog
	// testdata/v1): old logs still hold them.
	KindNote = "system.note"
)
