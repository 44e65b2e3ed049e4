package admin

import (
	"context"
	"encoding/json"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/undomail/undomail/undolog"
)

// metrics is the Prometheus collector behind /metrics. Everything is read
// at scrape time from the log and the daemon, so no code path that serves
// mail pays for it; verb counts are kept incrementally (only records
// appended since the last scrape are counted).
type metrics struct {
	s   *Server
	reg *prometheus.Registry

	mu      sync.Mutex
	counted int64 // records counted into perKind so far
	perKind map[string]int64

	appendWait   *prometheus.HistogramVec
	appendFailed prometheus.Counter

	logOK,
	verbs, records, size, snapshots, pause, gate, cycleOK, cycleRunning,
	progressDone, progressTotal, drillOK, drillTime, up, connect,
	outboundHeld, outboundOverdue *prometheus.Desc
}

func newMetrics(s *Server) *metrics {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("undomail_"+name, help, labels, nil)
	}
	m := &metrics{s: s, perKind: map[string]int64{},
		verbs:         d("verbs_logged_total", "Verbs in the undo log, by kind.", "kind"),
		records:       d("log_records", "Records in the undo log (the head's sequence number)."),
		logOK:         d("log_ok", "1 while the undo log accepts appends, 0 once it failed (clients get temporary failures)."),
		size:          d("log_size_bytes", "Size of the undo log's database and write-ahead log."),
		snapshots:     d("snapshots", "Snapshots the log records as existing."),
		pause:         d("snapshot_last_pause_seconds", "How long the newest snapshot held mutations back."),
		gate:          d("gate_held", "1 while a rewind or cycle holds changes back."),
		cycleOK:       d("cycle_last_ok", "1 if the newest cycle's verdict was verified, 0 if not (absent before the first cycle)."),
		cycleRunning:  d("cycle_running", "1 while a cycle runs."),
		progressDone:  d("replay_progress_done", "Verbs the running cycle has replayed so far.", "phase"),
		progressTotal: d("replay_progress_total", "Verbs the running cycle will replay.", "phase"),
		drillOK:       d("drill_last_ok", "1 if the newest recovery drill verified, 0 if it found differences (absent before the first drill)."),
		drillTime:     d("drill_last_timestamp_seconds", "When the newest recovery drill ended."),
		up:            d("upstream_up", "1 if the upstream accepts connections.", "upstream", "addr"),
		connect:       d("upstream_connect_seconds", "How long connecting to the upstream took.", "upstream", "addr"),
		outboundHeld:  d("outbound_held", "Messages the outbound delay window holds (absent when it is off)."),
		outboundOverdue: d("outbound_overdue_seconds",
			"How long past its time the longest-held message in the outbound delay window is; 0 when none is (absent when it is off)."),
	}
	m.appendWait = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "undomail_log_append_seconds",
		Help: "How long appends to the undo log waited for their commit (durable: and the fsync); a client waits this long before its command is relayed.",
		// 100 µs .. ~3.3 s
		Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
	}, []string{"durable"})
	m.appendFailed = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "undomail_log_append_failures_total",
		Help: "Appends to the undo log that failed; their clients got a temporary failure.",
	})
	m.reg = prometheus.NewRegistry()
	m.reg.MustRegister(m, m.appendWait, m.appendFailed)
	return m
}

// observeAppend is the undo log's AppendObserver.
func (m *metrics) observeAppend(_ []undolog.Record, wait time.Duration, durable bool, err error) {
	if err != nil {
		m.appendFailed.Inc()
		return
	}
	m.appendWait.WithLabelValues(strconv.FormatBool(durable)).Observe(wait.Seconds())
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

// Describe implements prometheus.Collector.
func (m *metrics) Describe(ch chan<- *prometheus.Desc) { prometheus.DescribeByCollect(m, ch) }

// Collect implements prometheus.Collector.
func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	b := func(ok bool) float64 {
		if ok {
			return 1
		}
		return 0
	}
	l := m.s.log
	head, _ := l.Last()
	m.mu.Lock()
	if head > m.counted {
		if n, err := l.CountKinds(ctx, m.counted, head); err == nil {
			for k, c := range n {
				m.perKind[k] += c
			}
			m.counted = head
		} else {
			ch <- prometheus.NewInvalidMetric(m.verbs, err)
		}
	}
	for k, c := range m.perKind {
		ch <- prometheus.MustNewConstMetric(m.verbs, prometheus.CounterValue, float64(c), k)
	}
	m.mu.Unlock()
	gauge(m.records, float64(head))
	gauge(m.logOK, b(l.Failed() == nil))
	gauge(m.size, float64(l.Size()))
	gauge(m.gate, b(m.s.b.Holding()))
	st, err := m.s.status(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(m.snapshots, err)
		return
	}
	gauge(m.snapshots, float64(st.Snapshots))
	if st.LastSnapshot != nil {
		gauge(m.pause, st.LastSnapshot.PauseMS/1000)
	}
	if c := st.LastCycle; c != nil && c.Verdict != nil {
		gauge(m.cycleOK, b(c.Verdict.OK))
	}
	gauge(m.cycleRunning, b(st.Progress != nil))
	if st.Progress != nil {
		var p struct {
			Phase       string
			Done, Total float64
		}
		if raw, err := json.Marshal(st.Progress); err == nil && json.Unmarshal(raw, &p) == nil {
			gauge(m.progressDone, p.Done, p.Phase)
			gauge(m.progressTotal, p.Total, p.Phase)
		}
	}
	if d := st.LastDrill; d != nil {
		gauge(m.drillOK, b(d.OK))
		gauge(m.drillTime, float64(d.Time.UnixNano())/1e9)
	}
	for _, u := range st.Upstreams {
		gauge(m.up, b(u.OK), u.Name, u.Addr)
		gauge(m.connect, u.ConnectMS/1000, u.Name, u.Addr)
	}
	if o := st.Outbound; o != nil {
		gauge(m.outboundHeld, float64(len(o.Held)))
		var late time.Duration
		for _, h := range o.Held {
			late = max(late, time.Since(h.ReleaseAt))
		}
		gauge(m.outboundOverdue, late.Seconds())
	}
}
