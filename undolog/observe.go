package undolog

import "time"

// AppendObserver is told about every Append and AppendNoSync that
// completed (committed or failed): its records, how long the caller
// waited (queueing, the commit and, when durable, the fsync), and the
// error. It runs on the appending goroutine after the records are
// committed, so it delays only its own caller; it must be quick and must
// not keep or change recs. The admin server's metrics use it for the log
// write latency.
type AppendObserver func(recs []Record, wait time.Duration, durable bool, err error)

// Observe installs f as the log's append observer; nil removes it.
func (l *Log) Observe(f AppendObserver) {
	if f == nil {
		l.observer.Store(nil)
		return
	}
	l.observer.Store(&f)
}

func (l *Log) observe(req *appendReq, start time.Time) {
	if f := l.observer.Load(); f != nil {
		(*f)(req.recs, time.Since(start), !req.noSync, req.err)
	}
}

// Failed returns why the log refuses appends (a commit that failed, the
// disk full, a read-only open), nil while it accepts them. Once failed a
// log stays failed until it is opened again.
func (l *Log) Failed() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.failed
}
