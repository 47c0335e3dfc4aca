// usage.go owns what the server reports about its own use: the usage log
// (--usage-db), a JSON-lines file with the reference's usage records
// (PROTOCOL.md §11), and the live counters served on the metrics
// address (--metrics-listen).
//
// Usage records are written by their own goroutine from a bounded queue,
// so a slow, full or failing disk never holds up a transfer: a record that
// does not fit in the queue, or cannot be written, is counted and dropped.
// The log grows at a bounded rate, so a flood cannot fill the disk it
// shares with the journal (see defaultUsageBytesPerSecond).
package main

import (
	"encoding/json"
	"errors"
	"expvar"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"runtime"
	"slices"
	"sync"
)

// usageQueueLen is how many usage records may wait for the disk. A
// transfer makes about five, so this absorbs bursts of hundreds of
// transfers while the disk stalls.
const usageQueueLen = 4096

// The usage log grows by at most defaultUsageBytesPerSecond
// (--max-usage-log-rate), after a burst of usageBurstBytes. As the
// reference does, every bind writes a client_version record, and a bind
// costs a client nothing else: a flood of binds from four addresses grew
// the log 7.6 MB/s. A busy server (ten transfers a second, each a few
// binds and retired channels) writes about 7 kB/s; past the rate, records
// are counted (refusals "usage log rate") and dropped. Channels' records
// come first: a client_version record is written only while more than
// half the burst is left, so binds never take the half that keeps the
// nameplate, mailbox and current records of transfers.
const (
	defaultUsageBytesPerSecond = 16 << 10
	usageBurstBytes            = 1 << 20
)

// usageBatchBytes is about the most the writer puts in one write: enough
// to take a burst in a few system calls, small enough to keep its buffer
// cheap.
const usageBatchBytes = 64 << 10

// Results of a retired nameplate or mailbox (PROTOCOL.md §11.2, §11.1). Where they
// compete, the later in this list wins: crowded > pruney > scary > errory >
// lonely > happy.
const (
	resultHappy   = "happy"
	resultLonely  = "lonely"
	resultErrory  = "errory"
	resultScary   = "scary"
	resultPruney  = "pruney"
	resultCrowded = "crowded"
	resultQuiet   = "quiet" // no side ever joined; cannot happen through the protocol
)

// Usage record types, one per table of the reference's usage database.
const (
	usageNameplate     = "nameplate"
	usageMailbox       = "mailbox"
	usageClientVersion = "client_version"
	usageCurrent       = "current"
)

// The usage records. Each is one line of the usage log; Type says which
// of the reference's tables (PROTOCOL.md §11) the line belongs to, and the other
// fields are that table's columns, in its order and with its names, so an
// existing analysis maps one to one. Every field is always present; null
// stands where the reference stores NULL. Times are Unix seconds with a
// fraction; start times are blurred (PROTOCOL.md §11.5), durations never are.

// nameplateUsage records a retired nameplate.
type nameplateUsage struct {
	Type        string   `json:"type"`         // "nameplate"
	AppID       string   `json:"app_id"`       // the clients' appid
	Started     float64  `json:"started"`      // first side's claim (blurred)
	TotalTime   float64  `json:"total_time"`   // from the first claim to the deletion
	WaitingTime *float64 `json:"waiting_time"` // from the first claim to the second; null if one side
	Result      string   `json:"result"`       // happy, lonely, pruney or crowded
}

// mailboxUsage records a retired mailbox: one per transfer.
type mailboxUsage struct {
	Type         string   `json:"type"`          // "mailbox"
	AppID        string   `json:"app_id"`        // the clients' appid
	ForNameplate bool     `json:"for_nameplate"` // created by a claim, not by a bare open
	Started      float64  `json:"started"`       // first side's open or claim (blurred)
	TotalTime    float64  `json:"total_time"`    // from the first side to the deletion
	WaitingTime  *float64 `json:"waiting_time"`  // from the first side to the second; null if one side
	Result       string   `json:"result"`        // happy, lonely, errory, scary, pruney or crowded
}

// clientVersionUsage records one bind.
type clientVersionUsage struct {
	Type           string  `json:"type"`           // "client_version"
	AppID          string  `json:"app_id"`         // the appid bound to
	Side           string  `json:"side"`           // the side bound as
	ConnectTime    float64 `json:"connect_time"`   // when (blurred)
	Implementation *string `json:"implementation"` // client_version[0], e.g. "python"; null if not sent
	Version        *string `json:"version"`        // client_version[1], e.g. "0.13.0"; null if not sent
}

// currentUsage records the server's state, as the reference's one-row
// "current" table does; the log keeps every one.
type currentUsage struct {
	Type                 string  `json:"type"`                  // "current"
	Rebooted             float64 `json:"rebooted"`              // when the server started
	Updated              float64 `json:"updated"`               // when this record was written
	BlurTime             *int    `json:"blur_time"`             // --blur-usage; null if not given
	ConnectionsWebsocket int     `json:"connections_websocket"` // connections subscribed to a mailbox
}

// errUsageClosed answers a request to a usage log already closed.
var errUsageClosed = errors.New("usage log closed")

// usageLog appends usage records to a file. A nil *usageLog records
// nothing (no --usage-db).
type usageLog struct {
	path string
	blur int // --blur-usage: round start times down to this many seconds if > 0; < 0 when not given
	log  *slog.Logger
	m    *metrics
	rate float64 // bytes per second the log may grow; 0: no bound

	mu       sync.Mutex // guards closed, so that nothing is queued after close, and the allowance
	closed   bool
	allowed  float64 // bytes that may be written now, at most usageBurstBytes
	allowAt  float64 // when allowed was last brought up to date (server clock)
	queue    chan []byte
	requests chan usageRequest
	done     chan struct{} // closed when the writer has finished
}

// usageRequest asks the writer to write everything queued so far and
// then, if reopen is set, to reopen the file.
type usageRequest struct {
	reopen bool
	reply  chan error
}

// openUsageLog opens (creating) the usage log and starts its writer. A
// negative blur means --blur-usage was not given; rate bounds the bytes
// written per second (0: no bound).
func openUsageLog(path string, blur int, rate int, log *slog.Logger, m *metrics) (*usageLog, error) {
	if err := notSQLite(path, "--usage-db"); err != nil {
		return nil, err
	}
	f, err := openAppend(path)
	if err != nil {
		return nil, startupError("usage log (--usage-db)", path, err)
	}
	u := &usageLog{path: path, blur: blur, log: log, m: m, rate: float64(rate), allowed: usageBurstBytes,
		queue: make(chan []byte, usageQueueLen), requests: make(chan usageRequest), done: make(chan struct{})}
	go u.run(f)
	return u, nil
}

func openAppend(path string) (*os.File, error) {
	return os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
}

// usageWriter is the writer goroutine's state: the open file and the
// batch of lines gathered for its next write.
type usageWriter struct {
	u       *usageLog
	f       io.WriteCloser
	batch   []byte
	ends    []int // where each record in batch ends
	torn    bool  // a failed write left part of a line in the file
	failing bool  // the last write failed (so a recovery is logged once)
}

// run writes queued records, a batch at a time, until the queue is closed.
func (u *usageLog) run(f *os.File) {
	defer close(u.done)
	w := &usageWriter{u: u, f: f}
	defer func() { w.f.Close() }()
	for {
		select {
		case line, ok := <-u.queue:
			if !ok {
				return
			}
			w.add(line)
			if !w.drain() {
				return
			}
		case req := <-u.requests:
			open := w.drain()
			var err error
			if req.reopen {
				err = w.reopen()
			}
			req.reply <- err
			if !open {
				return
			}
		}
	}
}

// add puts one line in the batch, first ending a line a failed write tore.
func (w *usageWriter) add(line []byte) {
	if w.torn && len(w.batch) == 0 {
		w.batch = append(w.batch, '\n')
		w.torn = false
	}
	w.batch = append(w.batch, line...)
	w.ends = append(w.ends, len(w.batch))
}

// drain writes the batch and every line queued now, in writes of about
// usageBatchBytes. It reports false if the queue has been closed.
func (w *usageWriter) drain() bool {
	for {
		select {
		case line, ok := <-w.u.queue:
			if !ok {
				w.write()
				return false
			}
			w.add(line)
			if len(w.batch) >= usageBatchBytes {
				w.write()
			}
		default:
			w.write()
			return true
		}
	}
}

// write writes the batch. Records it could not write whole are counted as
// lost; the first failure is logged, and so is the recovery.
func (w *usageWriter) write() {
	if len(w.ends) == 0 {
		return
	}
	u := w.u
	n, err := w.f.Write(w.batch)
	written := len(w.ends)
	if err != nil {
		written, _ = slices.BinarySearch(w.ends, n+1) // records ending at or before n
		u.m.usageErrors.Add(int64(len(w.ends) - written))
		w.torn = n > 0 && n < len(w.batch) && w.batch[n-1] != '\n'
		if !w.failing {
			u.log.Warn("usage log write failed; records lost until it works again", "file", u.path, "err", err)
		}
	} else if w.failing {
		u.log.Info("usage log written again", "file", u.path)
	}
	w.failing = err != nil
	u.m.usageRecords.Add(int64(written))
	w.batch, w.ends = w.batch[:0], w.ends[:0]
	if cap(w.batch) > 4*usageBatchBytes { // a burst's buffer goes back to the collector
		w.batch = nil
	}
}

// reopen replaces the file with a fresh open of the path. If that fails,
// the old file stays in use.
func (w *usageWriter) reopen() error {
	f, err := openAppend(w.u.path)
	if err != nil {
		return err
	}
	w.f.Close()
	w.f, w.torn = f, false
	return nil
}

// Reopen writes what is queued, then closes and reopens the file, so that
// a log rotated away (renamed) is followed by a fresh one at the same path.
// If the path cannot be opened, records keep going to the old file.
func (u *usageLog) Reopen() error {
	return u.request(true)
}

// flush returns once every record queued before the call has been written
// (or counted as lost).
func (u *usageLog) flush() error {
	return u.request(false)
}

func (u *usageLog) request(reopen bool) error {
	if u == nil {
		return nil
	}
	reply := make(chan error)
	select {
	case u.requests <- usageRequest{reopen: reopen, reply: reply}:
		return <-reply
	case <-u.done:
		return errUsageClosed
	}
}

// close writes what is queued and closes the file. Records written after
// it are counted as lost. It may be called more than once.
func (u *usageLog) close() {
	if u == nil {
		return
	}
	u.mu.Lock()
	if !u.closed {
		u.closed = true
		close(u.queue)
	}
	u.mu.Unlock()
	<-u.done
}

// write queues a record, or counts it as lost if the queue is full. now
// is the server's clock, for the rate; channel says the record is of a
// channel (not a client_version), and may use the whole burst.
func (u *usageLog) write(rec any, now float64, channel bool) {
	line, err := json.Marshal(rec)
	if err != nil { // a time that is not a number, from a corrupt journal
		u.m.usageErrors.Add(1)
		u.log.Warn("usage record not written", "err", err)
		return
	}
	line = append(line, '\n')
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		u.m.usageErrors.Add(1)
		return
	}
	if !u.allowLocked(len(line), now, channel) {
		u.m.refused("usage log rate")
		return
	}
	select {
	case u.queue <- line:
	default:
		u.m.usageErrors.Add(1)
	}
}

// allowLocked takes n bytes from the allowance, if it has them, at the
// server time now. A client_version record must leave half the burst.
func (u *usageLog) allowLocked(n int, now float64, channel bool) bool {
	if u.rate == 0 {
		return true
	}
	if now > u.allowAt {
		u.allowed = min(usageBurstBytes, u.allowed+(now-u.allowAt)*u.rate)
	}
	u.allowAt = now // a clock stepped back refills nothing until it passes the last time
	need := float64(n)
	if !channel {
		need += usageBurstBytes / 2
	}
	if u.allowed < need {
		return false
	}
	u.allowed -= float64(n)
	return true
}

// blurred rounds t down to a multiple of the blur interval (PROTOCOL.md §11.5).
func (u *usageLog) blurred(t float64) float64 {
	if u.blur > 0 {
		t = float64(u.blur) * math.Floor(t/float64(u.blur))
	}
	return t
}

// bound records a client's bind with its client_version, null when the
// client sent none (PROTOCOL.md §11.3).
func (u *usageLog) bound(appID, side string, now float64, impl, version *string) {
	if u == nil {
		return
	}
	u.write(&clientVersionUsage{Type: usageClientVersion, AppID: appID, Side: side,
		ConnectTime: u.blurred(now), Implementation: impl, Version: version}, now, false)
}

// nameplateRetired records a nameplate that was deleted (PROTOCOL.md §11.1): "lonely"
// unless exactly two sides used it ("happy"); "pruney" if it expired; and
// "crowded", above all, if more than two tried.
func (u *usageLog) nameplateRetired(appID string, np *nameplate, now float64, pruned bool) {
	if u == nil {
		return
	}
	times := make([]float64, len(np.sides))
	for i, s := range np.sides {
		times[i] = s.added
	}
	started, total, waiting := u.timing(times, now)
	result := resultLonely
	if len(times) == crowdedSides {
		result = resultHappy
	}
	if pruned {
		result = resultPruney
	}
	if len(times) > crowdedSides || np.crowded {
		result = resultCrowded
	}
	u.write(&nameplateUsage{Type: usageNameplate, AppID: appID,
		Started: started, TotalTime: total, WaitingTime: waiting, Result: result}, now, true)
}

// mailboxRetired records a mailbox that was deleted (PROTOCOL.md §11.2). The result is
// "lonely" for one side and "happy" for more, then overridden by the
// sides' moods and the server's view, each later rule winning: a "lonely"
// mood, an "errory" mood, a "scary" mood, expiry ("pruney"), and more than
// two sides ("crowded"). Other moods change nothing.
func (u *usageLog) mailboxRetired(mb *mailbox, now float64, pruned bool) {
	if u == nil {
		return
	}
	times := make([]float64, len(mb.sides))
	moods := make([]string, len(mb.sides))
	for i, s := range mb.sides {
		times[i], moods[i] = s.added, s.mood
	}
	started, total, waiting := u.timing(times, now)
	var result string
	switch {
	case len(times) > crowdedSides || mb.crowded: // more only in a journal of an older server
		result = resultCrowded
	case pruned:
		result = resultPruney
	case slices.Contains(moods, resultScary):
		result = resultScary
	case slices.Contains(moods, resultErrory):
		result = resultErrory
	case slices.Contains(moods, resultLonely) || len(times) == 1:
		result = resultLonely
	case len(times) == 0:
		result = resultQuiet
	default:
		result = resultHappy
	}
	u.write(&mailboxUsage{Type: usageMailbox, AppID: mb.app.id, ForNameplate: mb.forNameplate,
		Started: started, TotalTime: total, WaitingTime: waiting, Result: result}, now, true)
}

// timing computes what nameplate and mailbox records share from the times
// the sides came: when the first came (blurred), how long the whole thing
// lasted, and how long the first waited for the second (nil if no second).
func (u *usageLog) timing(times []float64, now float64) (started, total float64, waiting *float64) {
	if len(times) == 0 {
		return u.blurred(now), 0, nil
	}
	slices.Sort(times)
	if len(times) > 1 {
		w := times[1] - times[0]
		waiting = &w
	}
	return u.blurred(times[0]), now - times[0], waiting
}

// current records the server's state, as the reference does at start-up
// and every five minutes: when it started, now, the blur interval, and how
// many connections are subscribed to a mailbox.
func (u *usageLog) current(rebooted, now float64, connections int) {
	if u == nil {
		return
	}
	rec := &currentUsage{Type: usageCurrent, Rebooted: rebooted, Updated: now, ConnectionsWebsocket: connections}
	if u.blur >= 0 {
		rec.BlurTime = &u.blur
	}
	u.write(rec, now, true)
}

// metrics are the live counters, served as JSON on the metrics address
// in the format of the standard library's expvar.
type metrics struct {
	connections      expvar.Int // open WebSocket connections
	connectionsTotal expvar.Int // WebSocket connections accepted since start
	nameplates       expvar.Int // nameplates in the registry
	mailboxes        expvar.Int // mailboxes in the registry
	messages         expvar.Int // messages added since start
	delivered        expvar.Int // messages handed to subscribed connections (echoes and replays included)
	framesSent       expvar.Int // frames written to clients, of every type
	clientErrors     expvar.Map // error replies sent, by error string
	refusals         expvar.Map // requests refused by a limit, by limit
	dropped          expvar.Map // connections that ended other than by the client's close frame, by reason
	journalSyncs     expvar.Int // fsyncs of the channel journal
	journalFailures  expvar.Int // failed writes, fsyncs and retries of the channel journal
	journalBytes     expvar.Int // bytes appended to the channel journal
	compactions      expvar.Int // rewrites of the channel journal
	usageRecords     expvar.Int // usage records written
	usageErrors      expvar.Int // usage records lost to a full queue or a failed write
	vars             expvar.Map // all of the above, and the registry's gauges, by name
}

func newMetrics() *metrics {
	m := &metrics{}
	m.clientErrors.Init()
	m.refusals.Init()
	m.dropped.Init()
	m.vars.Init()
	for name, v := range map[string]expvar.Var{
		"connections": &m.connections, "connections_total": &m.connectionsTotal,
		"nameplates": &m.nameplates, "mailboxes": &m.mailboxes,
		"messages": &m.messages, "messages_delivered": &m.delivered, "frames_sent": &m.framesSent,
		"client_errors": &m.clientErrors, "refusals": &m.refusals, "dropped": &m.dropped,
		"journal_syncs": &m.journalSyncs, "journal_failures": &m.journalFailures, "journal_bytes": &m.journalBytes, "journal_compactions": &m.compactions,
		"usage_records": &m.usageRecords, "usage_errors": &m.usageErrors,
		"goroutines": expvar.Func(func() any { return runtime.NumGoroutine() }),
	} {
		m.vars.Set(name, v)
	}
	return m
}

// watch adds the gauges read from the registry itself, under its lock:
// the apps with anything in them, and the (connection, mailbox)
// subscriptions, the reference's "connections_websocket".
func (m *metrics) watch(reg *registry) {
	m.vars.Set("apps", expvar.Func(func() any {
		reg.mu.Lock()
		defer reg.mu.Unlock()
		return len(reg.apps)
	}))
	m.vars.Set("subscriptions", expvar.Func(func() any {
		reg.mu.Lock()
		defer reg.mu.Unlock()
		return reg.subscriptions
	}))
}

func (m *metrics) clientError(text string) { m.clientErrors.Add(text, 1) }

func (m *metrics) refused(limit string) { m.refusals.Add(limit, 1) }

// drop counts a connection that ended other than by the client's close
// frame, by reason. A network error is counted by what went wrong
// ("connection reset by peer", "i/o timeout") without the addresses it
// carries, which would make a counter for every client and put addresses
// where --blur-usage promises none.
func (m *metrics) drop(reason error) {
	var op *net.OpError
	if errors.As(reason, &op) {
		reason = op.Err
	}
	var sys *os.SyscallError
	if errors.As(reason, &sys) {
		reason = sys.Err
	}
	m.dropped.Add(reason.Error(), 1)
}

// handler serves the counters at /debug/vars, beside the process's memory
// statistics, and a health check at /healthz: 200 "ok", or 503 with the
// reason the server cannot work (shutting down, or the journal failed).
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
