package replay

import "github.com/undomail/undomail/verb"

// ReplayOutcome is the result of replaying one verb, as recorded (its
// one definition is in package verb, with its statuses).
type ReplayOutcome = verb.ReplayOutcome

// Placed is one message a replay put in a mailbox (verb.Placed).
type Placed = verb.Placed

// KindCompensation names verb.KindCompensation for the replayer's
// code, which is being changed elsewhere (issue #18); new code uses
// verb.KindCompensation.
const KindCompensation = verb.KindCompensation

// MailboxCounters are a mailbox's counters before a rewind
// (verb.MailboxCounters), named here for the replayer's code.
type MailboxCounters = verb.MailboxCounters

// CycleRecord and FilterSpec are a cycle record's arguments and a
// retroactive filter as given (verb.CycleArgs, verb.FilterSpec), named
// here for the replay code being changed elsewhere.
type (
	CycleRecord = verb.CycleArgs
	FilterSpec  = verb.FilterSpec
)
