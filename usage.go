// usage.go owns what the server reports about its own use: the usage log
// (--usage-db), a JSON-lines file with the reference's usage records
// (../shared/protocol.md §8), and the live counters served on the metrics
// address (--metrics-listen).
//
// Usage records are written by their own goroutine from a bounded queue,
// so a slow, full or failing disk never holds up a transfer: a record that
// does not fit in the queue, or cannot be written, is counted and dropped.
package main

import (
	"bufio"
	"encoding/json"
	"expvar"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"os"
	"slices"
)

// usageQueueLen is how many usage records may wait for the disk. A
// transfer makes about five, so this absorbs bursts of hundreds of
// transfers while the disk stalls.
const usageQueueLen = 4096

// Results of a retired nameplate or mailbox, from least to most severe
// where they compete (§8.2, §8.3).
const (
	resultHappy   = "happy"
	resultLonely  = "lonely"
	resultErrory  = "errory"
	resultScary   = "scary"
	resultPruney  = "pruney"
	resultCrowded = "crowded"
	resultQuiet   = "quiet" // no side ever joined; cannot happen through the protocol
)

// usageRecord is one line of the usage log. Type says which of the
// reference's tables the line belongs to, and the other fields keep that
// table's column names, so an existing analysis maps one to one:
//
//	nameplate:      app_id, started, waiting_time, total_time, result
//	mailbox:        app_id, for_nameplate, started, waiting_time, total_time, result
//	client_version: app_id, side, connect_time, implementation, version
//	current:        rebooted, updated, blur_time, connections_websocket
//
// Times are Unix seconds; waiting_time is null when only one side came.
type usageRecord struct {
	Type                 string   `json:"type"`
	AppID                *string  `json:"app_id,omitempty"`
	ForNameplate         *bool    `json:"for_nameplate,omitempty"`
	Started              *float64 `json:"started,omitempty"`
	WaitingTime          *float64 `json:"waiting_time,omitempty"`
	TotalTime            *float64 `json:"total_time,omitempty"`
	Result               string   `json:"result,omitempty"`
	Side                 *string  `json:"side,omitempty"`
	ConnectTime          *float64 `json:"connect_time,omitempty"`
	Implementation       *string  `json:"implementation,omitempty"`
	Version              *string  `json:"version,omitempty"`
	Rebooted             *float64 `json:"rebooted,omitempty"`
	Updated              *float64 `json:"updated,omitempty"`
	BlurTime             *int     `json:"blur_time,omitempty"`
	ConnectionsWebsocket *int     `json:"connections_websocket,omitempty"`
}

// usageLog appends usage records to a file. A nil *usageLog records
// nothing (no --usage-db).
type usageLog struct {
	path string
	blur int // --blur-usage: round start times down to this many seconds; 0 keeps them
	log  *slog.Logger
	m    *metrics

	queue  chan []byte
	reopen chan chan error
	done   chan struct{}
}

// openUsageLog opens (creating) the usage log and starts its writer.
func openUsageLog(path string, blur int, log *slog.Logger, m *metrics) (*usageLog, error) {
	f, err := openAppend(path)
	if err != nil {
		return nil, err
	}
	u := &usageLog{path: path, blur: blur, log: log, m: m,
		queue: make(chan []byte, usageQueueLen), reopen: make(chan chan error), done: make(chan struct{})}
	go u.run(f)
	return u, nil
}

func openAppend(path string) (*os.File, error) {
	return os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
}

// run writes queued records until the queue is closed.
func (u *usageLog) run(f *os.File) {
	defer close(u.done)
	w := bufio.NewWriter(f)
	flush := func() {
		if err := w.Flush(); err != nil {
			u.m.usageErrors.Add(1)
			u.log.Warn("usage log write failed; records lost", "file", u.path, "err", err)
			w.Reset(f)
		}
	}
	for {
		select {
		case line, ok := <-u.queue:
			if !ok {
				flush()
				f.Close()
				return
			}
			w.Write(line)
			if len(u.queue) == 0 {
				flush()
			}
		case reply := <-u.reopen:
			flush()
			nf, err := openAppend(u.path)
			if err == nil {
				f.Close()
				f = nf
				w.Reset(f)
			}
			reply <- err
		}
	}
}

// Reopen closes and reopens the file, so that a log rotated away (renamed)
// is followed by a fresh one at the same path.
func (u *usageLog) Reopen() error {
	if u == nil {
		return nil
	}
	reply := make(chan error)
	u.reopen <- reply
	return <-reply
}

// close writes what is queued and closes the file.
func (u *usageLog) close() {
	if u == nil {
		return
	}
	close(u.queue)
	<-u.done
}

// write queues a record, or drops it if the queue is full.
func (u *usageLog) write(rec *usageRecord) {
	line, err := json.Marshal(rec)
	if err != nil {
		panic(err) // usage records hold only strings and numbers
	}
	select {
	case u.queue <- append(line, '\n'):
	default:
		u.m.usageErrors.Add(1)
	}
}

// blurred rounds t down to a multiple of the blur interval (§8.5).
func (u *usageLog) blurred(t float64) *float64 {
	if u.blur > 0 {
		t = float64(u.blur) * math.Floor(t/float64(u.blur))
	}
	return &t
}

// bound records a client's bind with its client_version.
func (u *usageLog) bound(appID, side string, now float64, impl, version *string) {
	if u == nil {
		return
	}
	u.write(&usageRecord{Type: "client_version", AppID: &appID, Side: &side,
		ConnectTime: u.blurred(now), Implementation: impl, Version: version})
}

// nameplateRetired records a nameplate that was deleted: "happy" when two
// sides used it, "lonely" when one did, "pruney" when it expired,
// "crowded" when more than two tried.
func (u *usageLog) nameplateRetired(appID string, np *nameplate, now float64, pruned bool) {
	if u == nil {
		return
	}
	times := make([]float64, len(np.sides))
	for i, s := range np.sides {
		times[i] = s.added
	}
	rec := u.timing("nameplate", appID, times, now)
	switch {
	case len(times) > crowdedSides:
		rec.Result = resultCrowded
	case pruned:
		rec.Result = resultPruney
	case len(times) == 2:
		rec.Result = resultHappy
	case len(times) == 1:
		rec.Result = resultLonely
	}
	u.write(rec)
}

// mailboxRetired records a mailbox that was deleted. The result is the
// most severe of: "happy" (two sides), "lonely" (one side, or a side that
// said so), "errory", "scary" (as the sides' moods said), "pruney"
// (expired), "crowded" (more than two sides).
func (u *usageLog) mailboxRetired(mb *mailbox, now float64, pruned bool) {
	if u == nil {
		return
	}
	times := make([]float64, len(mb.sides))
	moods := make([]string, len(mb.sides))
	for i, s := range mb.sides {
		times[i], moods[i] = s.added, s.mood
	}
	rec := u.timing("mailbox", mb.app.id, times, now)
	forNameplate := mb.forNameplate
	rec.ForNameplate = &forNameplate
	switch {
	case len(times) > crowdedSides:
		rec.Result = resultCrowded
	case pruned:
		rec.Result = resultPruney
	case slices.Contains(moods, resultScary):
		rec.Result = resultScary
	case slices.Contains(moods, resultErrory):
		rec.Result = resultErrory
	case slices.Contains(moods, resultLonely) || len(times) == 1:
		rec.Result = resultLonely
	case len(times) >= 2:
		rec.Result = resultHappy
	}
	u.write(rec)
}

// timing fills the fields nameplate and mailbox records share: when the
// first side came, how long the second kept it waiting, and how long the
// whole thing lasted. Durations are never blurred.
func (u *usageLog) timing(typ, appID string, times []float64, now float64) *usageRecord {
	rec := &usageRecord{Type: typ, AppID: &appID, Result: resultQuiet}
	if len(times) == 0 {
		rec.Started, rec.TotalTime = u.blurred(now), new(float64)
		return rec
	}
	slices.Sort(times)
	rec.Started = u.blurred(times[0])
	total := now - times[0]
	rec.TotalTime = &total
	if len(times) > 1 {
		waiting := times[1] - times[0]
		rec.WaitingTime = &waiting
	}
	return rec
}

// current records the server's state, as the reference does every five
// minutes: when it started, now, the blur interval, and how many
// connections are subscribed to a mailbox.
func (u *usageLog) current(rebooted, now float64, connections int) {
	if u == nil {
		return
	}
	rec := &usageRecord{Type: "current", Rebooted: &rebooted, Updated: &now, ConnectionsWebsocket: &connections}
	if u.blur > 0 {
		rec.BlurTime = &u.blur
	}
	u.write(rec)
}

// metrics are the live counters, served as JSON on the metrics address
// in the format of the standard library's expvar.
type metrics struct {
	connections      expvar.Int // open WebSocket connections
	connectionsTotal expvar.Int // WebSocket connections accepted since start
	nameplates       expvar.Int // nameplates in the registry
	mailboxes        expvar.Int // mailboxes in the registry
	messages         expvar.Int // messages added since start
	framesSent       expvar.Int // frames written to clients, messages relayed among them
	clientErrors     expvar.Map // error replies sent, by error string
	refusals         expvar.Map // requests refused by a limit, by limit
	dropped          expvar.Map // connections closed by the server, by reason
	journalSyncs     expvar.Int // fsyncs of the channel journal
	journalBytes     expvar.Int // bytes appended to the channel journal
	compactions      expvar.Int // rewrites of the channel journal
	usageErrors      expvar.Int // usage records lost to a full queue or a failed write
	vars             expvar.Map // all of the above, by name
}

func newMetrics() *metrics {
	m := &metrics{}
	m.clientErrors.Init()
	m.refusals.Init()
	m.dropped.Init()
	m.vars.Init()
	for name, v := range map[string]expvar.Var{
		"connections": &m.connections, "connections_total": &m.connectionsTotal,
		"nameplates": &m.nameplates, "mailboxes": &m.mailboxes, "messages": &m.messages,
		"frames_sent": &m.framesSent, "client_errors": &m.clientErrors, "refusals": &m.refusals,
		"dropped": &m.dropped, "journal_syncs": &m.journalSyncs, "journal_bytes": &m.journalBytes,
		"journal_compactions": &m.compactions, "usage_errors": &m.usageErrors,
	} {
		m.vars.Set(name, v)
	}
	return m
}

func (m *metrics) clientError(text string) { m.clientErrors.Add(text, 1) }

func (m *metrics) refused(limit string) { m.refusals.Add(limit, 1) }

func (m *metrics) drop(reason string) { m.dropped.Add(reason, 1) }

// handler serves the counters at /debug/vars, beside the process's memory
// statistics, and a health check at /healthz.
func (m *metrics) handler(healthy func() error) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /debug/vars", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		fmt.Fprintf(w, "{\n%q: %s,\n%q: %s\n}\n", "mailbox", m.vars.String(), "memstats", expvar.Get("memstats").String())
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		if err := healthy(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	return mux
}
