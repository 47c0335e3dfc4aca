// usage_test.go tests the usage log and the live counters: every result
// rule driven through the protocol and checked in the written records,
// blurring, rotation, a failing or stalled disk, and the metrics address.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// t0 is when the fake clock starts, a whole second so that times stay
// exact through the server's nanosecond clock.
const t0 = 1_700_000_000.0

// startUsageServer starts a server writing its usage log to a temporary
// file (unless cfg names one), on a fake clock set to t0. The clock is in
// place before the first connection.
func startUsageServer(t *testing.T, cfg config) (*testServer, *fakeClock) {
	t.Helper()
	if cfg.usageDB == "" {
		cfg.usageDB = filepath.Join(t.TempDir(), "usage.jsonl")
	}
	srv, err := newServer(cfg, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	clock := newFakeClock()
	clock.set(t0)
	srv.clock = clock.now
	hs := httptest.NewServer(srv.handler())
	ts := &testServer{server: srv, http: hs, url: "ws" + strings.TrimPrefix(hs.URL, "http") + "/v1", cfg: cfg}
	t.Cleanup(ts.stop)
	return ts, clock
}

// usageLines flushes the server's usage log and returns its records of
// type typ, in order, decoded.
func (ts *testServer) usageLines(t *testing.T, typ string) []map[string]any {
	t.Helper()
	if err := ts.reg.usage.flush(); err != nil {
		t.Fatal(err)
	}
	return readUsage(t, ts.cfg.usageDB, typ)
}

// readUsage returns the records of type typ in a usage log file.
func readUsage(t *testing.T, path, typ string) []map[string]any {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var recs []map[string]any
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var rec map[string]any
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			t.Fatalf("usage line %q: %v", sc.Text(), err)
		}
		if rec["type"] == typ {
			recs = append(recs, rec)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return recs
}

// checkRecord compares a usage record with the fields want, all of which
// it must have exactly, and no others.
func checkRecord(t *testing.T, what string, got, want map[string]any) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Errorf("%s record\n got  %v\n want %v", what, got, want)
	}
}

// join binds a new connection as side and claims nameplate; open also
// subscribes it to the mailbox. It returns the client and the mailbox id.
func join(t *testing.T, ts *testServer, app, side, nameplate string, open bool) (*testClient, string) {
	t.Helper()
	c, _ := ts.dial(t)
	c.bind(app, side)
	id := c.expect(fmt.Sprintf(`{"type": "claim", "nameplate": %q}`, nameplate), "claimed")[0].str("mailbox")
	if open {
		c.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, id))
	}
	return c, id
}

// closeWith sends close with a mood; "-" sends no mood at all.
func closeWith(c *testClient, mood string) {
	if mood == "-" {
		c.expect(`{"type": "close"}`, "closed")
		return
	}
	c.expect(fmt.Sprintf(`{"type": "close", "mood": %q}`, mood), "closed")
}

// TestUsageResults drives transfers through the protocol and checks the
// records written when their nameplate and mailbox are retired: the
// result rules of PROTOCOL.md §11.2 and §11.1, and the times.
func TestUsageResults(t *testing.T) {
	for _, tc := range []struct {
		name      string
		moods     []string // one per side, in joining order
		nameplate string   // the nameplate record's result
		mailbox   string   // the mailbox record's result
	}{
		{"two sides happy", []string{"happy", "happy"}, "happy", "happy"},
		{"two sides, no moods", []string{"-", "-"}, "happy", "happy"},
		{"unknown moods change nothing", []string{"unwelcome", "whatever"}, "happy", "happy"},
		{"one side lonely", []string{"lonely"}, "lonely", "lonely"},
		{"one side is lonely whatever it says", []string{"happy"}, "lonely", "lonely"},
		{"a lonely mood", []string{"happy", "lonely"}, "happy", "lonely"},
		{"errory", []string{"errory", "happy"}, "happy", "errory"},
		{"errory beats lonely", []string{"lonely", "errory"}, "happy", "errory"},
		{"scary", []string{"happy", "scary"}, "happy", "scary"},
		{"scary beats errory", []string{"scary", "errory"}, "happy", "scary"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts, clock := startUsageServer(t, testConfig())
			var clients []*testClient
			for i := range tc.moods {
				clock.set(t0 + 2.5*float64(i)) // the second side comes 2.5 s after the first
				c, _ := join(t, ts, "app", fmt.Sprintf("side%d", i), "4", true)
				clients = append(clients, c)
			}
			clock.set(t0 + 10)
			for _, c := range clients {
				c.expect(`{"type": "release"}`, "released")
			}
			clock.set(t0 + 20.5)
			for i, c := range clients {
				closeWith(c, tc.moods[i])
			}

			var waiting any // null for one side
			if len(tc.moods) > 1 {
				waiting = 2.5
			}
			nps := ts.usageLines(t, "nameplate")
			mbs := ts.usageLines(t, "mailbox")
			if len(nps) != 1 || len(mbs) != 1 {
				t.Fatalf("%d nameplate and %d mailbox records, want one each", len(nps), len(mbs))
			}
			checkRecord(t, "nameplate", nps[0], map[string]any{"type": "nameplate", "app_id": "app",
				"started": t0, "total_time": 10.0, "waiting_time": waiting, "result": tc.nameplate})
			checkRecord(t, "mailbox", mbs[0], map[string]any{"type": "mailbox", "app_id": "app", "for_nameplate": true,
				"started": t0, "total_time": 20.5, "waiting_time": waiting, "result": tc.mailbox})
		})
	}
}

// TestUsageCrowded checks that a third side makes both records "crowded",
// over "pruney": the crowded side can never close (its close reopens the
// mailbox and is refused), so the channel ends by pruning.
func TestUsageCrowded(t *testing.T) {
	ts, clock := startUsageServer(t, testConfig())
	a, id := join(t, ts, "app", "a", "7", true)
	clock.set(t0 + 1)
	join(t, ts, "app", "b", "7", false)
	clock.set(t0 + 3)
	c, _ := ts.dial(t)
	c.bind("app", "c")
	c.expectError(`{"type": "claim", "nameplate": "7"}`, "crowded")
	c.expectError(fmt.Sprintf(`{"type": "close", "mailbox": %q, "mood": "happy"}`, id), "crowded")
	closeWith(a, "scary")

	clock.set(t0 + 3600)
	ts.prune(channelExpiry)
	nps, mbs := ts.usageLines(t, "nameplate"), ts.usageLines(t, "mailbox")
	if len(nps) != 1 || len(mbs) != 1 {
		t.Fatalf("%d nameplate and %d mailbox records, want one each", len(nps), len(mbs))
	}
	checkRecord(t, "nameplate", nps[0], map[string]any{"type": "nameplate", "app_id": "app",
		"started": t0, "total_time": 3600.0, "waiting_time": 1.0, "result": "crowded"})
	checkRecord(t, "mailbox", mbs[0], map[string]any{"type": "mailbox", "app_id": "app", "for_nameplate": true,
		"started": t0, "total_time": 3600.0, "waiting_time": 1.0, "result": "crowded"})
}

// TestUsagePruney checks that channels deleted by pruning are "pruney",
// whatever the moods, that a channel with a subscribed connection is kept,
// and the "current" record written by each prune.
func TestUsagePruney(t *testing.T) {
	ts, clock := startUsageServer(t, testConfig())
	a, _ := join(t, ts, "app", "a", "8", true)
	clock.set(t0 + 5)
	join(t, ts, "app", "b", "8", false) // claims, but never subscribes
	closeWith(a, "scary")               // b never closes

	join(t, ts, "other", "x", "1", true) // stays subscribed, so stays

	clock.set(t0 + 5 + channelExpiry.Seconds() - 1)
	ts.prune(channelExpiry)
	if got := ts.usageLines(t, "mailbox"); len(got) != 0 {
		t.Fatalf("pruned before expiry: %v", got)
	}
	clock.set(t0 + 5 + channelExpiry.Seconds())
	ts.prune(channelExpiry)

	nps, mbs := ts.usageLines(t, "nameplate"), ts.usageLines(t, "mailbox")
	if len(nps) != 1 || len(mbs) != 1 {
		t.Fatalf("%d nameplate and %d mailbox records, want one each (the subscribed channel stays)", len(nps), len(mbs))
	}
	total := 5 + channelExpiry.Seconds()
	checkRecord(t, "nameplate", nps[0], map[string]any{"type": "nameplate", "app_id": "app",
		"started": t0, "total_time": total, "waiting_time": 5.0, "result": "pruney"})
	checkRecord(t, "mailbox", mbs[0], map[string]any{"type": "mailbox", "app_id": "app", "for_nameplate": true,
		"started": t0, "total_time": total, "waiting_time": 5.0, "result": "pruney"})

	cur := ts.usageLines(t, "current")
	if len(cur) != 3 { // at start-up, and two prunes
		t.Fatalf("%d current records, want 3: %v", len(cur), cur)
	}
	checkRecord(t, "current", cur[2], map[string]any{"type": "current", "rebooted": ts.rebooted,
		"updated": t0 + total, "blur_time": nil, "connections_websocket": 1.0})
}

// TestUsageClientVersion checks the record of each bind, with and without
// client_version.
func TestUsageClientVersion(t *testing.T) {
	ts, clock := startUsageServer(t, testConfig())
	c, _ := ts.dial(t)
	c.expect(`{"type": "bind", "appid": "app", "side": "s1", "client_version": ["python", "0.13.0"]}`)
	clock.set(t0 + 1.5)
	d, _ := ts.dial(t)
	d.expect(`{"type": "bind", "appid": "app", "side": "s2"}`)
	e, _ := ts.dial(t)
	e.expect(`{"type": "bind", "appid": "app2", "side": "s3", "client_version": [null, "1.0", "more"]}`)
	f, _ := ts.dial(t)
	f.expectError(`{"type": "bind", "appid": "app", "side": "s4", "client_version": "python"}`, string(errBadClientVersion))

	got := ts.usageLines(t, "client_version")
	want := []map[string]any{
		{"type": "client_version", "app_id": "app", "side": "s1", "connect_time": t0, "implementation": "python", "version": "0.13.0"},
		{"type": "client_version", "app_id": "app", "side": "s2", "connect_time": t0 + 1.5, "implementation": nil, "version": nil},
		{"type": "client_version", "app_id": "app2", "side": "s3", "connect_time": t0 + 1.5, "implementation": nil, "version": "1.0"},
	}
	if len(got) != len(want) {
		t.Fatalf("%d client_version records, want %d (a refused bind records nothing): %v", len(got), len(want), got)
	}
	for i := range want {
		checkRecord(t, "client_version", got[i], want[i])
	}
}

// TestUsageBlur checks --blur-usage: start times rounded down to its
// multiple, durations kept, and the interval in "current"; 0 keeps the
// times but still says 0, as the reference.
func TestUsageBlur(t *testing.T) {
	for _, tc := range []struct {
		blur    int
		started float64
	}{{100, t0 + 400}, {3600, t0 - 1_700_000_000%3600}, {0, t0 + 451.5}} {
		t.Run(fmt.Sprint(tc.blur), func(t *testing.T) {
			cfg := testConfig()
			cfg.blurUsage = tc.blur
			ts, clock := startUsageServer(t, cfg)
			clock.set(t0 + 451.5)
			a, _ := join(t, ts, "app", "a", "3", true)
			clock.set(t0 + 453)
			b, _ := join(t, ts, "app", "b", "3", true)
			clock.set(t0 + 460)
			closeWith(a, "happy")
			closeWith(b, "happy")
			ts.prune(channelExpiry)

			checkRecord(t, "mailbox", ts.usageLines(t, "mailbox")[0], map[string]any{"type": "mailbox", "app_id": "app",
				"for_nameplate": true, "started": tc.started, "total_time": 8.5, "waiting_time": 1.5, "result": "happy"})
			// The last close deletes the still-claimed nameplate too.
			checkRecord(t, "nameplate", ts.usageLines(t, "nameplate")[0], map[string]any{"type": "nameplate", "app_id": "app",
				"started": tc.started, "total_time": 8.5, "waiting_time": 1.5, "result": "happy"})
			if got := ts.usageLines(t, "client_version")[0]["connect_time"]; got != tc.started {
				t.Errorf("connect_time %v, want %v", got, tc.started)
			}
			cur := ts.usageLines(t, "current")
			if got := cur[len(cur)-1]["blur_time"]; got != float64(tc.blur) {
				t.Errorf("blur_time %v, want %d", got, tc.blur)
			}
		})
	}
}

// TestUsageReopen checks rotation: after the file is renamed and the log
// reopened (what SIGHUP does), new records go to a new file at the path,
// and none is lost or doubled.
func TestUsageReopen(t *testing.T) {
	ts, _ := startUsageServer(t, testConfig())
	path := ts.cfg.usageDB
	c, _ := ts.dial(t)
	c.bind("app", "before")
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	d, _ := ts.dial(t)
	d.bind("app", "between") // written to the renamed file, still open
	ts.reopen(nil)
	e, _ := ts.dial(t)
	e.bind("app", "after")
	ts.reg.usage.flush()

	sides := func(path string) (s []any) {
		for _, rec := range readUsage(t, path, "client_version") {
			s = append(s, rec["side"])
		}
		return s
	}
	if got := sides(path + ".1"); fmt.Sprint(got) != "[before between]" {
		t.Errorf("rotated file has binds %v, want [before between]", got)
	}
	if got := sides(path); fmt.Sprint(got) != "[after]" {
		t.Errorf("new file has binds %v, want [after]", got)
	}
}

// TestUsageReopenFails checks that when the path cannot be reopened the
// old file is kept, and records still reach it.
func TestUsageReopenFails(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "logs")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig()
	cfg.usageDB = filepath.Join(dir, "usage.jsonl")
	ts, _ := startUsageServer(t, cfg)
	if err := os.Rename(dir, dir+".moved"); err != nil {
		t.Fatal(err)
	}
	if err := ts.reg.usage.Reopen(); err == nil {
		t.Fatal("reopening in a directory that is gone succeeded")
	}
	c, _ := ts.dial(t)
	c.bind("app", "s")
	ts.reg.usage.flush()
	if got := readUsage(t, filepath.Join(dir+".moved", "usage.jsonl"), "client_version"); len(got) != 1 {
		t.Errorf("old file has %d client_version records, want 1", len(got))
	}
}

// transferOver runs a whole transfer between two new connections: claim,
// open, a message each way, release, close.
func transferOver(t *testing.T, ts *testServer, nameplate string) {
	t.Helper()
	a, _ := join(t, ts, "app", "a", nameplate, true)
	b, _ := join(t, ts, "app", "b", nameplate, true)
	exchange(t, a, b, 1)
	for _, c := range []*testClient{a, b} {
		c.expect(`{"type": "release"}`, "released")
		closeWith(c, "happy")
	}
}

// TestUsageFullDisk checks that a usage log that cannot be written (a full
// disk) stops no transfer, and that every lost record is counted.
func TestUsageFullDisk(t *testing.T) {
	if _, err := os.Stat("/dev/full"); err != nil {
		t.Skip("no /dev/full:", err)
	}
	cfg := testConfig()
	cfg.usageDB = "/dev/full"
	ts, _ := startUsageServer(t, cfg)
	transferOver(t, ts, "5")
	transferOver(t, ts, "6")
	ts.reg.usage.flush()
	// A current record at start-up, then per transfer two binds, a
	// nameplate and a mailbox.
	if got := ts.metrics.usageErrors.Value(); got != 9 {
		t.Errorf("usage_errors %d, want 9", got)
	}
	if got := ts.metrics.usageRecords.Value(); got != 0 {
		t.Errorf("usage_records %d, want 0", got)
	}
}

// TestUsageStalledDisk checks that a usage log that does not take writes
// at all (a pipe nobody reads) never blocks the protocol: records beyond
// the queue are dropped and counted, and transfers go on.
func TestUsageStalledDisk(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "usage.fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Skip("no fifo:", err)
	}
	reader, err := os.OpenFile(fifo, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig()
	cfg.usageDB = fifo
	ts, _ := startUsageServer(t, cfg)
	t.Cleanup(func() { reader.Close() }) // before the server stops: its blocked write then fails
	for range 2 * usageQueueLen {
		ts.reg.usage.current(t0, t0, 0) // far more than the pipe and the queue hold
	}
	transferOver(t, ts, "9")
	if ts.metrics.usageErrors.Value() == 0 {
		t.Error("no record counted as lost")
	}
}

// TestUsageAfterClose checks that a record written after the log is
// closed is counted, not written to a closed queue.
func TestUsageAfterClose(t *testing.T) {
	ts, _ := startUsageServer(t, testConfig())
	ts.reg.usage.close()
	ts.reg.usage.current(t0, t0, 0)
	if got := ts.metrics.usageErrors.Value(); got != 1 {
		t.Errorf("usage_errors %d, want 1", got)
	}
	if err := ts.reg.usage.flush(); err != errUsageClosed {
		t.Errorf("flush after close: %v", err)
	}
}

// TestMetrics checks the counters served on the metrics address during
// and after a transfer, and the health check.
func TestMetrics(t *testing.T) {
	cfg := testConfig()
	cfg.channelDB = filepath.Join(t.TempDir(), "relay.jsonl")
	ts, _ := startUsageServer(t, cfg)
	ms := httptest.NewServer(ts.metrics.handler(ts.healthy))
	defer ms.Close()
	vars := func() map[string]any {
		t.Helper()
		resp, err := http.Get(ms.URL + "/debug/vars")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var all map[string]map[string]any
		if err := json.NewDecoder(resp.Body).Decode(&all); err != nil {
			t.Fatal(err)
		}
		if all["memstats"] == nil {
			t.Error("no memstats")
		}
		return all["mailbox"]
	}
	check := func(when string, got map[string]any, want map[string]any) {
		t.Helper()
		for k, v := range want {
			if fmt.Sprint(got[k]) != fmt.Sprint(v) {
				t.Errorf("%s: %s = %v, want %v", when, k, got[k], v)
			}
		}
	}

	a, _ := join(t, ts, "app", "a", "4", true)
	b, _ := join(t, ts, "app", "b", "4", true)
	exchange(t, a, b, 1)
	b.expectError(`{"type": "nonsense"}`, "unknown type")
	check("mid-transfer", vars(), map[string]any{
		"connections": 2, "connections_total": 2, "apps": 1, "nameplates": 1, "mailboxes": 1,
		"subscriptions": 2, "messages": 2, "messages_delivered": 4,
		"client_errors": map[string]any{"unknown type": 1}, "usage_errors": 0,
	})

	for _, c := range []*testClient{a, b} {
		c.expect(`{"type": "release"}`, "released")
		closeWith(c, "happy")
	}
	ts.reg.usage.flush()
	got := vars()
	check("after", got, map[string]any{
		"apps": 0, "nameplates": 0, "mailboxes": 0, "subscriptions": 0,
		"usage_records": 5, // current, two binds, nameplate, mailbox
	})
	for _, k := range []string{"journal_syncs", "journal_bytes", "frames_sent", "goroutines"} {
		if n, _ := got[k].(float64); n <= 0 {
			t.Errorf("%s = %v, want more than 0", k, got[k])
		}
	}

	resp, err := http.Get(ms.URL + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(body) != "ok\n" {
		t.Errorf("/healthz: %d %q, want 200 ok", resp.StatusCode, body)
	}
	ts.stop()
	resp, err = http.Get(ms.URL + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("/healthz after shutdown: %d, want 503", resp.StatusCode)
	}
}

// shortWriter takes limit bytes, then fails like a full disk.
type shortWriter struct {
	strings.Builder
	limit int
}

func (w *shortWriter) Write(b []byte) (int, error) {
	n := min(len(b), w.limit-w.Len())
	w.Builder.Write(b[:n])
	if n < len(b) {
		return n, syscall.ENOSPC
	}
	return n, nil
}

func (w *shortWriter) Close() error { return nil }

// TestUsageTornWrite checks a write that fails part-way through a batch:
// the records written whole are counted as written, the rest as lost, and
// the line torn in the middle is ended before the next record, so it
// spoils no other line.
func TestUsageTornWrite(t *testing.T) {
	m := newMetrics()
	sw := &shortWriter{limit: 15}
	w := &usageWriter{u: &usageLog{log: testLogger(t), m: m}, f: sw}
	for _, line := range []string{"{\"n\": 1}\n", "{\"n\": 2}\n", "{\"n\": 3}\n"} {
		w.add([]byte(line))
	}
	w.write()
	if m.usageRecords.Value() != 1 || m.usageErrors.Value() != 2 {
		t.Errorf("after a torn write: %d written, %d lost; want 1 and 2", m.usageRecords.Value(), m.usageErrors.Value())
	}
	sw.limit = 100
	w.add([]byte("{\"n\": 4}\n"))
	w.write()
	if got, want := sw.String(), "{\"n\": 1}\n{\"n\": \n{\"n\": 4}\n"; got != want {
		t.Errorf("file holds %q, want %q", got, want)
	}
	if m.usageRecords.Value() != 2 || m.usageErrors.Value() != 2 {
		t.Errorf("after recovery: %d written, %d lost; want 2 and 2", m.usageRecords.Value(), m.usageErrors.Value())
	}
}

// TestMetricsDropReasons checks that connections ended by network errors
// are counted by the error, without the addresses in its text.
func TestMetricsDropReasons(t *testing.T) {
	m := newMetrics()
	addr := &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 4000}
	m.drop(&net.OpError{Op: "read", Net: "tcp", Source: addr, Addr: addr, Err: &os.SyscallError{Syscall: "read", Err: syscall.ECONNRESET}})
	m.drop(&net.OpError{Op: "write", Net: "tcp", Source: addr, Addr: addr, Err: os.ErrDeadlineExceeded})
	m.drop(errSlowClient)
	m.drop(io.EOF)
	want := `{"EOF": 1, "client not reading": 1, "connection reset by peer": 1, "i/o timeout": 1}`
	if got := m.dropped.String(); got != want {
		t.Errorf("dropped = %s, want %s", got, want)
	}
}

// TestCurrentRecordAtShutdown checks that a server writes a "current"
// record as it stops, besides the one at start-up, so that the log's last
// record on the server says how long it ran (stats shows it as "up").
func TestCurrentRecordAtShutdown(t *testing.T) {
	ts, clock := startUsageServer(t, testConfig())
	started := ts.usageLines(t, usageCurrent)
	if len(started) != 1 {
		t.Fatalf("%d current records at start-up, want 1", len(started))
	}
	clock.set(t0 + 3600)
	ts.server.close()
	got := readUsage(t, ts.cfg.usageDB, usageCurrent)
	if len(got) != 2 || got[1]["updated"] != t0+3600 {
		t.Fatalf("current records %v, want a second one written at shutdown, at the clock's time then", got)
	}
}

// TestUsageFlood floods the server with binds from four addresses, each
// a new connection with the longest appid, side and client_version
// allowed, on a clock that stands still: the usage log takes half the
// burst of them and no more, the rest are counted, and a transfer during
// the flood still has its nameplate and mailbox records. Once the clock
// moves on, binds are recorded again.
func TestUsageFlood(t *testing.T) {
	cfg := testConfig()
	cfg.usageRate = defaultUsageBytesPerSecond
	ts, clock := startUsageServer(t, cfg)
	long := strings.Repeat("v", maxAppIDLen)
	bind := fmt.Sprintf(`{"type": "bind", "appid": %q, "side": %q, "client_version": [%q, %q]}`,
		long, strings.Repeat("s", maxTokenLen), long, long)
	recordBytes := len(mustJSON(t, &clientVersionUsage{Type: usageClientVersion, AppID: long,
		Side: strings.Repeat("s", maxTokenLen), ConnectTime: t0, Implementation: &long, Version: &long})) + 1
	binds := 2 * usageBurstBytes / 2 / recordBytes // twice what fits
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range binds / 4 {
				c, _, err := dialFrom(t, ts.url, dialOptions{from: fmt.Sprintf("127.0.0.%d", i+2)})
				if err != nil {
					t.Error(err)
					return
				}
				c.send(bind)
				c.sync()
				c.raw.Close()
			}
		}()
	}
	transferOver(t, ts, "5")
	wg.Wait()

	versions := ts.usageLines(t, usageClientVersion)
	fit := usageBurstBytes/2/recordBytes + 2 // and the transfer's two
	if len(versions) > fit || len(versions) < fit-2-4 {
		t.Errorf("%d client_version records written, want about %d (half the burst)", len(versions), fit)
	}
	if got := len(ts.usageLines(t, usageMailbox)) + len(ts.usageLines(t, usageNameplate)); got != 2 {
		t.Errorf("the transfer during the flood left %d channel records, want 2", got)
	}
	dropped := ts.metrics.refusals.Get("usage log rate")
	if dropped == nil || dropped.String() == "0" {
		t.Fatal("no dropped record counted")
	}
	fi, _ := os.Stat(ts.cfg.usageDB)
	t.Logf("%d binds: %d recorded, %s dropped; log %d bytes", binds, len(versions), dropped, fi.Size())
	if fi.Size() > usageBurstBytes {
		t.Errorf("the usage log grew %d bytes on a stopped clock, more than the burst", fi.Size())
	}

	clock.advance(time.Duration(2*recordBytes*int(time.Second)) / defaultUsageBytesPerSecond)
	c, _, err := dialFrom(t, ts.url, dialOptions{from: "127.0.0.2"})
	if err != nil {
		t.Fatal(err)
	}
	c.send(bind)
	c.sync()
	if got := len(ts.usageLines(t, usageClientVersion)); got != len(versions)+1 {
		t.Errorf("after the clock moved on, %d client_version records, want %d", got, len(versions)+1)
	}
}

func mustJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
