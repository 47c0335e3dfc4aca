// transit_stats.go owns the transit relay's part of the "stats" command
// (stats.go): its sessions by mood, the bytes they relayed, and how long
// they waited and lasted, from the usage log's "transit" records.
package main

import (
	"fmt"
	"io"
)

// transitMoodOrder is the order the relay's moods are listed in.
var transitMoodOrder = []string{moodHappy, moodLonely, moodErrory, moodRedundant}

// transitStats summarises the transit records.
type transitStats struct {
	Sessions    resultCounts `json:"sessions"`     // records by mood
	Bytes       int64        `json:"bytes"`        // relayed, both directions, all sessions (blurred if the log is)
	PairedBytes percentiles  `json:"paired_bytes"` // per paired session
	WaitingTime percentiles  `json:"waiting_time"` // paired sessions: from the first side's connection to the second's
	TotalTime   percentiles  `json:"total_time"`   // all sessions

	waiting, total, bytes []float64
}

func (ts *transitStats) add(f *usageFields) {
	ts.Sessions.add(f.mood.b)
	ts.total = append(ts.total, f.totalTime.v)
	if f.totalBytes.ok {
		ts.Bytes += int64(f.totalBytes.v)
	}
	if f.waitingTime.ok {
		ts.waiting = append(ts.waiting, f.waitingTime.v)
		ts.bytes = append(ts.bytes, f.totalBytes.v)
	}
}

func (ts *transitStats) finish() {
	ts.Sessions.finish()
	ts.WaitingTime = newPercentiles(ts.waiting)
	ts.TotalTime = newPercentiles(ts.total)
	ts.PairedBytes = newPercentiles(ts.bytes)
	ts.waiting, ts.total, ts.bytes = nil, nil, nil
}

// writeText prints the transit summary's lines.
func (ts *transitStats) writeText(w io.Writer) {
	shown := map[string]bool{}
	for _, m := range append(transitMoodOrder, ts.Sessions.ordered()...) {
		if shown[m] {
			continue
		}
		shown[m] = true
		n := ts.Sessions.Results[m]
		fmt.Fprintf(w, "  %s\t%7d\t%6s\n", m, n, formatPercent(percent(n, ts.Sessions.Total)))
	}
	fmt.Fprintf(w, "  bytes relayed\t%s\t\n", formatBytes(float64(ts.Bytes)))
	if p := ts.PairedBytes; p.Count > 0 {
		fmt.Fprintf(w, "  bytes per pair\tp50 %s  p90 %s  p99 %s\t\n", formatBytes(*p.P50), formatBytes(*p.P90), formatBytes(*p.P99))
	}
	fmt.Fprintf(w, "  waiting for the other side\t%s\t(%d paired)\n", ts.WaitingTime.text(), ts.WaitingTime.Count)
	fmt.Fprintf(w, "  total time\t%s\t(%d)\n", ts.TotalTime.text(), ts.TotalTime.Count)
}

// formatBytes writes a byte count briefly, in decimal units.
func formatBytes(n float64) string {
	for _, u := range []struct {
		size float64
		name string
	}{{1e12, "TB"}, {1e9, "GB"}, {1e6, "MB"}, {1e3, "kB"}} {
		if n >= u.size {
			return fmt.Sprintf("%.1f %s", n/u.size, u.name)
		}
	}
	return fmt.Sprintf("%.0f B", n)
}
