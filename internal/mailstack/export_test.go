package mailstack

// InstancePIDs exposes the process lookup Stop relies on, so tests can check
// that a stopped stack leaves nothing behind.
func InstancePIDs(s *Stack) []int { return s.instancePIDs() }
