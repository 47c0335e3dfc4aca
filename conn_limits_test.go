// conn_limits_test.go tests the connection layer against cheap resource
// attacks: frame headers announcing large messages that never come,
// fragments held open with pings, floods of TCP connections, a server
// full of a few addresses' connections, command floods, subscribers that
// never read, and log floods. Each runs against the real handler on a
// real listener, from several 127.0.0.x addresses, and checks its bound.
package main

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"expvar"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// writeFrameHeader writes a masked client frame header announcing n
// payload bytes. Its mask key is zero, so payload bytes go as they are.
func writeFrameHeader(c *testClient, fin bool, opcode byte, n int) error {
	b := []byte{opcode, 0x80}
	if fin {
		b[0] |= 0x80
	}
	switch {
	case n < 126:
		b[1] |= byte(n)
	case n < 1<<16:
		b[1] |= 126
		b = binary.BigEndian.AppendUint16(b, uint16(n))
	default:
		b[1] |= 127
		b = binary.BigEndian.AppendUint64(b, uint64(n))
	}
	b = append(b, 0, 0, 0, 0) // the mask key
	c.raw.SetWriteDeadline(time.Now().Add(testTimeout))
	_, err := c.raw.Write(b)
	return err
}

// TestAnnouncedLengthReservesNothing is the attack of frame headers that
// announce the largest message and send nothing more: the server holds
// what arrived, not what was announced.
func TestAnnouncedLengthReservesNothing(t *testing.T) {
	ts := startServer(t, testConfig())
	const conns = 256
	before := heapInUse()
	var clients []*testClient
	for i := range conns {
		c, _ := mustDialFrom(t, ts.url, dialOptions{from: fmt.Sprintf("127.0.0.%d", 2+i%8)})
		if err := writeFrameHeader(c, true, websocket.TextFrame, maxMessageBytes); err != nil {
			t.Fatal(err)
		}
		c.raw.Write([]byte("x")) // the first payload byte: the message has begun
		clients = append(clients, c)
	}
	waitFor(t, "every message begun", func() bool { return ts.partial.bytes() >= conns*readChunkBytes })
	growth := heapInUse() - before
	held := ts.partial.bytes()
	t.Logf("%d connections announcing %d KiB each: partial messages hold %d KiB, heap grew %d KiB",
		conns, maxMessageBytes>>10, held>>10, growth>>10)
	if held > conns*readChunkBytes {
		t.Errorf("partial messages hold %d bytes, over %d a connection", held, readChunkBytes)
	}
	if bound := int64(conns) * 64 << 10; growth > bound { // buffers and state of both ends, not 512 KiB each
		t.Errorf("heap grew by %d KiB, over %d KiB", growth>>10, bound>>10)
	}
	a, b := openPair(t, ts, "victim")
	exchange(t, a, b, 3)
	for _, c := range clients {
		c.raw.Close()
	}
	waitFor(t, "the partial messages given back", func() bool { return ts.partial.bytes() == 0 })
}

// TestPartialBudget checks the server-wide budget for partly received
// messages: when it is used up, the connection holding the most is
// closed with 1009 and told why, and the others go on.
func TestPartialBudget(t *testing.T) {
	ts := startServerWith(t, testConfig(), testLogger(t), func(srv *server) { srv.partial.max = 256 << 10 })
	var small []*testClient
	for i := range 8 { // 8 x 20 KiB
		c, _ := mustDialFrom(t, ts.url, dialOptions{from: fmt.Sprintf("127.0.0.%d", 2+i)})
		writeFrameHeader(c, true, websocket.TextFrame, 64<<10)
		c.raw.Write(make([]byte, 20<<10))
		small = append(small, c)
	}
	waitFor(t, "the small messages begun", func() bool { return ts.partial.bytes() >= 8*20<<10 })
	big, _ := mustDialFrom(t, ts.url, dialOptions{from: "127.0.0.20"})
	writeFrameHeader(big, true, websocket.TextFrame, maxMessageBytes)
	go big.raw.Write(make([]byte, 200<<10)) // grows past the budget: it holds the most
	status, errs, err := readClose(big)
	if err != nil {
		t.Fatal(err)
	}
	if status != closeTooBig || len(errs) != 1 || errs[0] != errPartialBudget.Error() {
		t.Errorf("the largest holder got close %d after errors %q, want %d after %q", status, errs, closeTooBig, errPartialBudget)
	}
	if n := ts.partial.bytes(); n > ts.partial.max {
		t.Errorf("partial messages hold %d bytes, over the budget of %d", n, ts.partial.max)
	}
	for _, c := range small { // the others complete their messages
		c.raw.Write([]byte(`{"type": "ping", "ping": 1}`))
		c.raw.Write(make([]byte, 64<<10-20<<10-len(`{"type": "ping", "ping": 1}`)))
	}
	if ts.metrics.refusals.Get("partly received messages") == nil {
		t.Error("no refusal counted")
	}
}

// TestMessageDeadline is the attack of a message begun and never
// finished, kept alive with pings: the message must be complete within
// messageTimeout, whatever else arrives.
func TestMessageDeadline(t *testing.T) {
	ts := startServerWith(t, testConfig(), testLogger(t), func(srv *server) { srv.messageTimeout = 200 * time.Millisecond })
	c, _ := mustDialFrom(t, ts.url, dialOptions{from: "127.0.0.2"})
	if err := writeFrameHeader(c, false, websocket.TextFrame, 16<<10); err != nil { // a non-final fragment
		t.Fatal(err)
	}
	c.raw.Write(make([]byte, 16<<10))
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() { // pings, as the attacker sends them, until the server closes
		defer wg.Done()
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				if writeFrameHeader(c, true, websocket.PingFrame, 0) != nil {
					return
				}
			}
		}
	}()
	status, _, err := readClose(c)
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatalf("the server never closed a message held open with pings: %v", err)
	}
	if status != closePolicy {
		t.Errorf("close %d, want %d", status, closePolicy)
	}
	waitFor(t, "the drop counted", func() bool { return ts.metrics.dropped.Get(errMessageTimeout.Error()) != nil })
}

// dialTCP opens a plain TCP connection to the server from the address from.
func dialTCP(t testing.TB, ts *testServer, from string) (net.Conn, error) {
	d := net.Dialer{Timeout: testTimeout, LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	c, err := d.Dial("tcp", ts.http.Listener.Addr().String())
	if err == nil {
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(testTimeout))
	}
	return c, err
}

// TestKeepAliveFlood is the attack of keep-alive HTTP connections to /,
// which no limit counted: every TCP connection now counts from accept,
// those over the per-address limit are told 503, those past the
// descriptors the gate keeps are closed at accept, and a WebSocket client
// from another address is still served.
func TestKeepAliveFlood(t *testing.T) {
	ts := startServerWith(t, testConfig(), testLogger(t), func(srv *server) {
		srv.gate.maxPerAddr, srv.gate.maxTotal, srv.gate.maxOpen = 8, 40, 90
	})
	status := map[string]int{}
	for i := range 4 * 32 { // keep-alive requests from 4 addresses, four times their limit each
		c, err := dialTCP(t, ts, fmt.Sprintf("127.0.0.%d", 2+i%4))
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		resp.Body.Close()
		status[resp.Status]++
	}
	for i := range 4 * 32 { // and connections that send nothing, address by address
		if _, err := dialTCP(t, ts, fmt.Sprintf("127.0.0.%d", 2+i/32)); err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
	}
	waitFor(t, "every connection accepted", func() bool {
		// Each connection over its address's limit is counted here once,
		// and again under why it was closed at accept, if it was.
		v, ok := ts.metrics.refusals.Get("connections per address").(*expvar.Int)
		return ok && v.Value() >= 4*32*2-4*8
	})
	admitted, open := ts.gate.counts()
	t.Logf("%d connections from 4 addresses: answers %v; the gate counts %d admitted, %d open; refusals %v",
		4*32*2, status, admitted, open, ts.metrics.refusals.String())
	if admitted != 4*8 || open > ts.gate.maxOpen {
		t.Errorf("the gate counts %d admitted and %d open, want %d and at most %d", admitted, open, 4*8, ts.gate.maxOpen)
	}
	if status["200 OK"] != 4*8 || status["503 Service Unavailable"] != 4*24 {
		t.Errorf("answers %v: want 32 served and 96 refused with 503", status)
	}
	for _, what := range []string{"connections at accept (refused too often)", "connections at accept (descriptors)"} {
		if ts.metrics.refusals.Get(what) == nil {
			t.Errorf("no refusal counted for %q", what)
		}
	}
	// A transfer from two other addresses, while the attackers' idle
	// connections are still open.
	var pair [2]*testClient
	for i := range pair {
		c, w := mustDialFrom(t, ts.url, dialOptions{from: fmt.Sprintf("127.0.0.%d", 20+i)})
		if e := welcomeError(w); e != "" {
			t.Fatalf("victim %d refused: %s", i, e)
		}
		c.bind("victim", fmt.Sprint("side-", i))
		c.expect(`{"type": "open", "mailbox": "pair"}`)
		pair[i] = c
	}
	exchange(t, pair[0], pair[1], 3)
}

// TestFairShare is the attack of a few addresses filling the total with
// WebSocket connections: a newcomer from another address is admitted by
// closing a connection of the address holding the most, which is told
// why; a newcomer from an address holding its share or more is refused.
func TestFairShare(t *testing.T) {
	if defaultMaxConnsPerAddr*64 >= defaultMaxConns {
		t.Errorf("64 addresses of %d connections fill the %d total", defaultMaxConnsPerAddr, defaultMaxConns)
	}
	ts := startServerWith(t, testConfig(), testLogger(t), func(srv *server) {
		srv.gate.maxPerAddr, srv.gate.maxTotal = 10, 24
	})
	var attackers []*testClient
	for i := range 24 { // 3 addresses of 8: full
		c, w := mustDialFrom(t, ts.url, dialOptions{from: fmt.Sprintf("127.0.0.%d", 2+i%3)})
		if welcomeError(w) != "" {
			t.Fatalf("attacker %d: %v", i, w)
		}
		attackers = append(attackers, c)
	}
	if _, w := mustDialFrom(t, ts.url, dialOptions{from: "127.0.0.2"}); welcomeError(w) != string(errTooManyConns) {
		t.Errorf("an attacker's address over its share: welcome %v", w)
	}
	a, w := mustDialFrom(t, ts.url, dialOptions{from: "127.0.0.30"})
	if welcomeError(w) != "" {
		t.Fatalf("a newcomer from another address: welcome %v", w)
	}
	b, w := mustDialFrom(t, ts.url, dialOptions{from: "127.0.0.31"})
	if welcomeError(w) != "" {
		t.Fatalf("a second newcomer: welcome %v", w)
	}
	waitFor(t, "two attackers' connections closed", func() bool { n, _ := ts.gate.counts(); return n == 24 })
	waitFor(t, "the closed ones untracked", func() bool {
		ts.connsMu.Lock()
		defer ts.connsMu.Unlock()
		return len(ts.conns) == 24
	})
	closed := 0
	for _, c := range attackers {
		if ts.findServerSide(c) != nil {
			continue
		}
		closed++
		status, errs, err := readClose(c)
		if err != nil || status != closePolicy || len(errs) != 1 || errs[0] != errFairShare.Error() {
			t.Errorf("a closed attacker got close %d (%v) after %q, want %d after %q", status, err, errs, closePolicy, errFairShare)
		}
	}
	if closed != 2 {
		t.Errorf("%d attackers' connections closed, want 2", closed)
	}
	a.bind("victim", "a")
	b.bind("victim", "b")
	a.expect(`{"type": "open", "mailbox": "pair"}`)
	b.expect(`{"type": "open", "mailbox": "pair"}`)
	exchange(t, a, b, 3)
	if got := ts.metrics.refusals.Get("connections closed for a fair share"); got == nil || got.String() != "2" {
		t.Errorf("fair-share closes counted: %v, want 2", got)
	}
}

// floodCommands sends n pings without waiting and counts the pongs that
// come back before the server's error and close.
func floodCommands(t testing.TB, c *testClient, n int) (pongs int, errs []string, status int) {
	t.Helper()
	go func() {
		for i := range n {
			c.raw.SetWriteDeadline(time.Now().Add(testTimeout))
			if _, err := c.ws.Write([]byte(fmt.Sprintf(`{"type": "ping", "ping": %d}`, i))); err != nil {
				return
			}
		}
	}()
	c.raw.SetReadDeadline(time.Now().Add(testTimeout))
	for {
		fr, err := c.ws.NewFrameReader()
		if err != nil {
			t.Fatalf("reading: %v", err)
		}
		payload, _ := io.ReadAll(fr)
		if fr.PayloadType() == websocket.CloseFrame {
			return pongs, errs, int(binary.BigEndian.Uint16(payload))
		}
		var m msg
		json.Unmarshal(payload, &m)
		switch m.typ() {
		case "pong":
			pongs++
		case "error":
			errs = append(errs, m.str("error"))
		}
	}
}

// TestCommandBudget is the attack of a connection sending commands as
// fast as it can: past its burst it is told why and closed, while a
// transfer on other connections goes on.
func TestCommandBudget(t *testing.T) {
	ts := startServerWith(t, testConfig(), testLogger(t), func(srv *server) { srv.commandsPerSecond = commandsPerSecond })
	a, b := openPair(t, ts, "victim")
	var flooders []*testClient
	for i := range 4 {
		c, _ := mustDialFrom(t, ts.url, dialOptions{from: fmt.Sprintf("127.0.0.%d", 2+i)})
		flooders = append(flooders, c)
	}
	for _, c := range flooders {
		pongs, errs, status := floodCommands(t, c, 10_000)
		t.Logf("a flood of 10,000 pings: %d answered, then %q and close %d", pongs, errs, status)
		if pongs > commandBurst+10 || status != closePolicy || len(errs) != 1 || errs[0] != errCommandRate.Error() {
			t.Errorf("%d pongs, errors %q, close %d: want at most about %d, then %q and %d", pongs, errs, status, commandBurst, errCommandRate, closePolicy)
		}
	}
	exchange(t, a, b, 3)
	if ts.metrics.refusals.Get("commands per connection") == nil {
		t.Error("no refusal counted")
	}
}

// TestCommandPrice checks that a command is priced by the work it
// causes: re-opening a full mailbox, whose messages are all sent again,
// takes much of the burst.
func TestCommandPrice(t *testing.T) {
	cfg := testConfig()
	ts := startServerWith(t, cfg, testLogger(t), func(srv *server) { srv.commandsPerSecond = commandsPerSecond })
	add := fmt.Sprintf(`{"type": "add", "phase": "p", "body": "%s"}`, strings.Repeat("ab", 16<<10))
	var w *testClient
	for i := range cfg.limits.MaxMailboxBytes / (33 << 10) { // a full mailbox, in 33 KiB messages, 8 a connection
		if i%8 == 0 {
			w, _ = ts.dial(t)
			w.bind("app", "w")
			w.send(`{"type": "open", "mailbox": "big"}`)
			w.sync() // the replay of what is there
		}
		w.expect(add, "message")
	}
	r, _ := mustDialFrom(t, ts.url, dialOptions{from: "127.0.0.2"})
	r.bind("app", "r")
	r.send(`{"type": "open", "mailbox": "big"}`)
	pongs, _, status := floodCommands(t, r, 1000)
	t.Logf("after re-opening a mailbox of %d KiB, %d pings answered", cfg.limits.MaxMailboxBytes>>10, pongs)
	if want := commandBurst - cfg.limits.MaxMailboxBytes/commandBytesPerToken/2; pongs > want || status != closePolicy {
		t.Errorf("%d pings answered after the re-open (close %d), want at most %d", pongs, status, want)
	}
}

// TestKernelBuffersCounted is the attack of subscribers that never read:
// what the kernel holds in their sockets' send buffers counts against the
// outbox bounds, so they are disconnected instead of pinning kernel
// memory, and a transfer elsewhere goes on.
func TestKernelBuffersCounted(t *testing.T) {
	cfg := testConfig()
	cfg.limits.MaxMailboxBytes, cfg.limits.MaxStoredBytes, cfg.limits.MaxMessagesPerMailbox = 64<<20, 64<<20, 100_000
	ts := startServerWith(t, cfg, testLogger(t), func(srv *server) { srv.maxOutboxTotalBytes = 256 << 10 })
	w, _ := ts.dial(t)
	w.bind("app", "w")
	w.expect(`{"type": "open", "mailbox": "mb"}`)
	var subs []*connection
	for i := range maxSubscribersPerSide { // one side on as many connections as it may
		s, _ := mustDialFrom(t, ts.url, dialOptions{from: fmt.Sprintf("127.0.0.%d", 2+i%4), small: true})
		s.bind("app", "s")
		s.expect(`{"type": "open", "mailbox": "mb"}`)
		subs = append(subs, ts.serverSide(t, s)) // from here on, it reads nothing
	}
	p, q := openPair(t, ts, "other")
	add := fmt.Sprintf(`{"type": "add", "phase": "p", "body": "%s"}`, strings.Repeat("ab", 2<<10))
	maxQueued := 0
	for i := 0; ; i++ {
		if i == 4000 {
			t.Fatal("the subscribers that never read were never disconnected")
		}
		w.expect(add, "message")
		gone := 0
		for _, sc := range subs {
			sc.outMu.Lock()
			maxQueued = max(maxQueued, sc.queued)
			sc.outMu.Unlock()
			if _, reason := sc.outboxState(); reason != nil {
				gone++
			}
		}
		if gone == len(subs) {
			break
		}
	}
	t.Logf("%d subscribers that never read: disconnected, the most a socket's send buffer held was %d KiB", len(subs), maxQueued>>10)
	if maxQueued == 0 {
		t.Error("no socket's send buffer was ever counted")
	}
	exchange(t, p, q, 3)
	ts.stopAndCheckOutboxes(t)
}

// TestConnectionLogBounded is the attack of connection churn filling the
// disk through the log: per-connection lines are bounded a second, and a
// later line says how many were held back.
func TestConnectionLogBounded(t *testing.T) {
	rec := newLogRecorder()
	ts := startServerWith(t, testConfig(), slog.New(slog.NewTextHandler(rec, nil)), nil)
	const conns = 3 * connLogsPerSecond
	start := time.Now()
	for i := range conns { // 2 lines each
		c, _ := mustDialFrom(t, ts.url, dialOptions{from: fmt.Sprintf("127.0.0.%d", 2+i%8)})
		c.raw.Close()
	}
	waitFor(t, "every connection closed", func() bool {
		ts.connsMu.Lock()
		defer ts.connsMu.Unlock()
		return len(ts.conns) == 0
	})
	windows := int(time.Since(start)/time.Second) + 2 // the seconds the churn touched
	lines := 0
	for _, l := range rec.snapshot() {
		if strings.Contains(l, "connection opened") || strings.Contains(l, "connection closed") {
			lines++
		}
	}
	if lines >= 2*conns {
		t.Errorf("%d per-connection lines for %d connections: none held back", lines, conns)
	}
	if lines > windows*connLogsPerSecond {
		t.Errorf("%d per-connection lines in %d seconds, over %d a second", lines, windows, connLogsPerSecond)
	}
	// A connection in a later second says what was held back.
	ts.connLogs.mu.Lock()
	ts.connLogs.second = time.Time{}
	ts.connLogs.mu.Unlock()
	mustDialFrom(t, ts.url, dialOptions{from: "127.0.0.2"})
	rec.waitFor(t, "connection log lines suppressed")
}

// TestHeaderLimit checks that the limit on request headers is the 16 KiB
// the README states, not net/http's limit plus its 4 KiB of slack.
func TestHeaderLimit(t *testing.T) {
	ts := startServer(t, testConfig())
	for _, tc := range []struct{ pad, want int }{{maxHeaderBytes - 1024, http.StatusOK}, {maxHeaderBytes + 512, http.StatusRequestHeaderFieldsTooLarge}} {
		req, _ := http.NewRequest("GET", ts.http.URL+"/", nil)
		req.Header.Set("X-Padding", strings.Repeat("p", tc.pad))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("a request with a %d-byte header: status %d, want %d", tc.pad, resp.StatusCode, tc.want)
		}
	}
}

// TestConnectionRate checks the per-address rate of new connections: a
// loop of connect, bind and close from one address finds its connections
// closed at accept once its burst is used, while a client from another
// address connects as usual.
func TestConnectionRate(t *testing.T) {
	ts := startServerWith(t, testConfig(), testLogger(t), func(srv *server) {
		srv.gate.maxPerAddr, srv.gate.newConns = 8, newRateTable(5)
	})
	refused := 0
	for range 10 {
		c, _, err := dialFrom(t, ts.url, dialOptions{from: "127.0.0.2"})
		if err != nil { // closed at accept: the handshake fails
			refused++
			continue
		}
		c.bind("app", "flood")
		c.leave()
	}
	if refused != 5 {
		t.Errorf("%d of 10 connections refused, want the 5 past the burst", refused)
	}
	if _, w := mustDialFrom(t, ts.url, dialOptions{from: "127.0.0.3"}); welcomeError(w) != "" {
		t.Errorf("a client from another address was refused: %q", welcomeError(w))
	}
	if v := ts.metrics.refusals.Get("new connections per address"); v == nil || v.String() != "5" {
		t.Errorf("refusals counted %v, want 5", v)
	}
}

// TestPartialBudgetSmallMessages checks that the small messages of real
// clients go through while the budget for partly received messages is
// used up: a message's first chunk is always taken.
func TestPartialBudgetSmallMessages(t *testing.T) {
	ts := startServerWith(t, testConfig(), testLogger(t), func(srv *server) { srv.partial.max = 64 << 10 })
	hog, _ := mustDialFrom(t, ts.url, dialOptions{from: "127.0.0.2"})
	writeFrameHeader(hog, true, websocket.TextFrame, 128<<10)
	hog.raw.Write(make([]byte, 62<<10))
	waitFor(t, "the budget used up", func() bool { return ts.partial.bytes() >= 62<<10 })
	a, b := openPair(t, ts, "victim")
	exchange(t, a, b, 3)
	if n := ts.partial.bytes(); n < 62<<10 {
		t.Errorf("partial messages hold %d bytes: the message that uses the budget was dropped for small ones", n)
	}
}
