// helpers_test.go holds the test helpers the test files share: a real
// server on a real listener, WebSocket clients dialled from chosen
// 127.0.0.x addresses, and waiting on conditions rather than sleeping.
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// testTimeout bounds every wait for the server in tests, so a broken
// server fails a test instead of hanging it.
const testTimeout = 10 * time.Second

// testServer is a server on a real loopback listener.
type testServer struct {
	*server
	http *httptest.Server
	url  string // ws://127.0.0.1:PORT/v1
	cfg  config
}

// testConfig is the configuration tests start from: state in memory,
// default limits, no per-address limits (tests connect from one address).
func testConfig() config {
	l := defaultLimits
	l.MaxNameplatesPerAddr, l.MaxMailboxesPerAddr, l.MaxStoredBytesPerAddr = 0, 0, 0
	return config{channelDB: ":memory:", fsync: true, blurUsage: -1, allowList: true, limits: l,
		maxMessageBytes: maxMessageBytes, logFormat: "text", pruneInterval: pruneInterval, channelExpiry: channelExpiry}
}

// startServer starts a server with cfg, stopped when the test ends.
func startServer(t testing.TB, cfg config) *testServer {
	t.Helper()
	return startServerWith(t, cfg, testLogger(t), nil)
}

// startServerWith starts a server as startServer does, logging to log;
// adjust, if not nil, changes the server (its clock, say, or a limit)
// before it serves anyone.
func startServerWith(t testing.TB, cfg config, log *slog.Logger, adjust func(*server)) *testServer {
	t.Helper()
	srv, err := newServer(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	if adjust != nil {
		adjust(srv)
	}
	hs := httptest.NewUnstartedServer(nil) // the server's own HTTP settings, on its gated listener
	hs.Config = srv.httpServer(log)
	hs.Listener = gatedListener{hs.Listener, srv.gate}
	hs.Start()
	ts := &testServer{server: srv, http: hs, url: "ws" + strings.TrimPrefix(hs.URL, "http") + "/v1", cfg: cfg}
	t.Cleanup(ts.stop)
	return ts
}

func (ts *testServer) stop() {
	ts.http.Close()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	ts.closeConnections(ctx)
	ts.close()
}

// testLogger sends the server's log to the test's log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testLogWriter struct{ t testing.TB }

func (w testLogWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// msg is a decoded server message.
type msg map[string]any

func (m msg) typ() string { s, _ := m["type"].(string); return s }

func (m msg) str(key string) string { s, _ := m[key].(string); return s }

// testClient is a WebSocket client speaking to a test server.
type testClient struct {
	t     testing.TB
	ws    *websocket.Conn
	raw   net.Conn // under ws, for writing hand-made frames
	syncs int
}

// dial connects to the server and returns the client with its welcome
// message read.
func (ts *testServer) dial(t testing.TB) (*testClient, msg) {
	t.Helper()
	c := dialRaw(t, ts.url, nil)
	w := c.next()
	if w.typ() != "welcome" {
		t.Fatalf("first message is %v, want welcome", w)
	}
	return c, w
}

// dialRaw connects without reading anything; header adds request headers.
func dialRaw(t testing.TB, url string, header http.Header) *testClient {
	t.Helper()
	cfg, err := websocket.NewConfig(url, "http://localhost/")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Header = header
	raw, err := net.DialTimeout("tcp", cfg.Location.Host, testTimeout)
	if err != nil {
		t.Fatal(err)
	}
	raw.SetDeadline(time.Now().Add(testTimeout))
	ws, err := websocket.NewClient(cfg, raw)
	if err != nil {
		t.Fatal(err)
	}
	c := &testClient{t: t, ws: ws, raw: raw}
	t.Cleanup(func() { raw.Close() })
	return c
}

// send writes one text frame.
func (c *testClient) send(text string) {
	c.t.Helper()
	if _, err := c.ws.Write([]byte(text)); err != nil {
		c.t.Fatalf("send %s: %v", text, err)
	}
}

// next reads the next message.
func (c *testClient) next() msg {
	c.t.Helper()
	m, err := c.tryNext()
	if err != nil {
		c.t.Fatalf("reading: %v", err)
	}
	return m
}

func (c *testClient) tryNext() (msg, error) { return readMsg(c.ws, c.raw) }

// readMsg reads and decodes the next message on ws, whose connection is
// raw, waiting at most testTimeout.
func readMsg(ws *websocket.Conn, raw net.Conn) (msg, error) {
	raw.SetReadDeadline(time.Now().Add(testTimeout))
	var data []byte
	if err := websocket.Message.Receive(ws, &data); err != nil {
		return nil, err
	}
	var m msg
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("bad JSON %q: %v", data, err)
	}
	return m, nil
}

// sync returns every message the server sends before it answers a ping
// sent now; the ping's own ack and pong are not included. Because the
// server handles one connection's messages in order, everything it sends
// in response to earlier messages comes first.
func (c *testClient) sync() []msg {
	c.t.Helper()
	c.syncs++
	token := fmt.Sprintf("sync-%d", c.syncs)
	c.send(fmt.Sprintf(`{"type": "ping", "ping": %q}`, token))
	var got []msg
	for {
		m := c.next()
		if m.typ() == "pong" && m["pong"] == token {
			n := len(got)
			if n == 0 || got[n-1].typ() != "ack" || got[n-1]["id"] != nil {
				c.t.Fatalf("pong not preceded by its ack: %v", got)
			}
			return got[:n-1]
		}
		got = append(got, m)
	}
}

// do sends a message and returns what the server sent in response.
func (c *testClient) do(text string) []msg {
	c.t.Helper()
	c.send(text)
	return c.sync()
}

// expect sends a message and checks that the server answers with an ack
// carrying id and then messages of exactly the types want.
func (c *testClient) expect(text string, want ...string) []msg {
	c.t.Helper()
	got := c.do(text)
	if len(got) == 0 || got[0].typ() != "ack" {
		c.t.Fatalf("%s: got %v, want an ack first", text, got)
	}
	got = got[1:]
	if len(got) != len(want) {
		c.t.Fatalf("%s: got %v, want types %v", text, got, want)
	}
	for i, m := range got {
		if m.typ() != want[i] {
			c.t.Fatalf("%s: got %v, want types %v", text, got, want)
		}
	}
	return got
}

// expectError sends a message and checks it fails with this error text.
func (c *testClient) expectError(text, errText string) {
	c.t.Helper()
	got := c.expect(text, "error")
	if got[0].str("error") != errText {
		c.t.Fatalf("%s: error %q, want %q", text, got[0].str("error"), errText)
	}
}

// bind binds the client to an app and side.
func (c *testClient) bind(app, side string) {
	c.t.Helper()
	c.expect(fmt.Sprintf(`{"type": "bind", "appid": %q, "side": %q}`, app, side))
}

// exchange sends n messages each way between two clients subscribed to
// the same mailbox, and checks that each receives the other's.
func exchange(t testing.TB, p, q *testClient, n int) {
	t.Helper()
	for i := range n {
		p.expect(fmt.Sprintf(`{"type": "add", "phase": "%d", "body": "aa"}`, i), "message")
		if got := q.sync(); len(got) != 1 || got[0].str("body") != "aa" {
			t.Fatalf("q got %v, want p's message", got)
		}
		q.expect(fmt.Sprintf(`{"type": "add", "phase": "%d", "body": "bb"}`, i), "message")
		if got := p.sync(); len(got) != 1 || got[0].str("body") != "bb" {
			t.Fatalf("p got %v, want q's message", got)
		}
	}
}

// writeFrame writes a hand-made frame, masked as a client must.
func (c *testClient) writeFrame(fin bool, opcode byte, payload []byte) {
	c.t.Helper()
	if _, err := c.raw.Write(clientFrame(fin, opcode, payload)); err != nil {
		c.t.Fatal(err)
	}
}

// readFrame reads one raw frame from the server (which sends unmasked,
// unfragmented frames).
func readFrame(t testing.TB, br *bufio.Reader) (opcode byte, payload []byte) {
	t.Helper()
	h := make([]byte, 2)
	if _, err := io.ReadFull(br, h); err != nil {
		t.Fatalf("reading frame: %v", err)
	}
	n := int(h[1] & 0x7f)
	switch n {
	case 126:
		var l [2]byte
		io.ReadFull(br, l[:])
		n = int(binary.BigEndian.Uint16(l[:]))
	case 127:
		var l [8]byte
		io.ReadFull(br, l[:])
		n = int(binary.BigEndian.Uint64(l[:]))
	}
	payload = make([]byte, n)
	if _, err := io.ReadFull(br, payload); err != nil {
		t.Fatalf("reading frame payload: %v", err)
	}
	return h[0] & 0x0f, payload
}

// expectClose reads raw frames until a close frame, and checks its status
// and that the server then closes the TCP connection.
func (c *testClient) expectClose(status int) {
	c.t.Helper()
	br := bufio.NewReader(c.raw)
	for {
		op, payload := readFrame(c.t, br)
		if op != websocket.CloseFrame {
			continue
		}
		if got := int(binary.BigEndian.Uint16(payload)); got != status {
			c.t.Fatalf("close status %d, want %d", got, status)
		}
		if _, err := br.ReadByte(); err != io.EOF {
			c.t.Fatalf("after close: %v, want EOF", err)
		}
		return
	}
}

func newLogRecorder() *logRecorder { return &logRecorder{changed: make(chan struct{})} }

func (r *logRecorder) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for line := range strings.Lines(string(p)) {
		r.lines = append(r.lines, strings.TrimSuffix(line, "\n"))
	}
	close(r.changed)
	r.changed = make(chan struct{})
	return len(p), nil
}

// end records that run returned err.
func (r *logRecorder) end(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ended, r.err = true, err
	close(r.changed)
	r.changed = make(chan struct{})
}

// snapshot returns the lines logged so far.
func (r *logRecorder) snapshot() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.lines...)
}

// waitFor returns the first line that contains every one of parts,
// waiting for it to be logged.
func (r *logRecorder) waitFor(t testing.TB, parts ...string) string {
	t.Helper()
	timeout := time.After(testTimeout)
	for seen := 0; ; {
		r.mu.Lock()
		for _, line := range r.lines[seen:] {
			if containsAll(line, parts) {
				r.mu.Unlock()
				return line
			}
		}
		seen = len(r.lines)
		ended, err, changed := r.ended, r.err, r.changed
		r.mu.Unlock()
		if ended {
			t.Fatalf("server ended (%v) without logging %q", err, parts)
		}
		select {
		case <-changed:
		case <-timeout:
			t.Fatalf("no log line with %q", parts)
		}
	}
}

func containsAll(s string, parts []string) bool {
	for _, p := range parts {
		if !strings.Contains(s, p) {
			return false
		}
	}
	return true
}

// dialOptions say how dialFrom connects.
type dialOptions struct {
	from   string      // the source address, e.g. 127.0.0.2; "" for any
	header http.Header // extra request headers
	small  bool        // small socket buffers, for a client that will not read
}

// dialFrom connects as dialRaw does, with options, and reads the welcome.
func dialFrom(t testing.TB, url string, o dialOptions) (*testClient, msg, error) {
	cfg, err := websocket.NewConfig(url, "http://localhost/")
	if err != nil {
		return nil, nil, err
	}
	cfg.Header = o.header
	d := net.Dialer{Timeout: testTimeout}
	if o.from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(o.from)}
	}
	if o.small {
		d.Control = func(network, address string, rc syscall.RawConn) error {
			var err error
			rc.Control(func(fd uintptr) {
				err = errors.Join(syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096),
					syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, 4096))
			})
			return err
		}
	}
	raw, err := d.Dial("tcp", cfg.Location.Host)
	if err != nil {
		return nil, nil, err
	}
	t.Cleanup(func() { raw.Close() })
	raw.SetDeadline(time.Now().Add(testTimeout))
	ws, err := websocket.NewClient(cfg, raw)
	if err != nil {
		return nil, nil, err
	}
	c := &testClient{t: t, ws: ws, raw: raw}
	w, err := c.tryNext()
	if err != nil {
		return nil, nil, err
	}
	if w.typ() != "welcome" {
		return nil, nil, fmt.Errorf("first message is %v, want welcome", w)
	}
	return c, w, nil
}

// mustDialFrom is dialFrom for the test's goroutine. A client the server
// accepts has had a message answered when it returns, so the server has
// taken the connection over.
func mustDialFrom(t testing.TB, url string, o dialOptions) (*testClient, msg) {
	t.Helper()
	c, w, err := dialFrom(t, url, o)
	if err != nil {
		t.Fatal(err)
	}
	if welcomeError(w) == "" {
		c.sync()
	}
	return c, w
}

// welcomeError is the error a welcome message carries, if any.
func welcomeError(w msg) string {
	inner, _ := w["welcome"].(map[string]any)
	s, _ := inner["error"].(string)
	return s
}

// serverSide returns the server's connection for client c.
func (ts *testServer) serverSide(t testing.TB, c *testClient) *connection {
	t.Helper()
	c.sync() // the connection is tracked before it handles anything
	sc := ts.findServerSide(c)
	if sc == nil {
		t.Fatalf("no server connection for client %v", c.raw.LocalAddr())
	}
	return sc
}

// stopReading makes the server's side of c's connection buffer little,
// so that a client that stops reading fills it with a few frames instead
// of the megabytes the kernel would otherwise take.
func (ts *testServer) stopReading(t testing.TB, c *testClient) *connection {
	t.Helper()
	sc := ts.serverSide(t, c)
	if err := tcpConn(sc.netConn).SetWriteBuffer(4096); err != nil {
		t.Fatal(err)
	}
	return sc
}

// outboxState is what waits to be written to the connection, and why it ended, if it did.
func (c *connection) outboxState() (int, error) {
	c.outMu.Lock()
	defer c.outMu.Unlock()
	return c.outBytes + c.sending, c.endReason
}

// stopAndCheckOutboxes stops the server and checks that every byte
// counted against the server-wide outbox budget was given back.
func (ts *testServer) stopAndCheckOutboxes(t testing.TB) {
	t.Helper()
	ts.stop()
	if n := ts.outboxBytes.Load(); n != 0 {
		t.Errorf("after every connection ended, %d outbox bytes are still counted", n)
	}
}

// openPair connects two clients to one mailbox of app.
func openPair(t testing.TB, ts *testServer, app string) (*testClient, *testClient) {
	t.Helper()
	var pair [2]*testClient
	for i := range pair {
		pair[i], _ = ts.dial(t)
		pair[i].bind(app, fmt.Sprint("side-", i))
		pair[i].expect(`{"type": "open", "mailbox": "pair"}`)
	}
	return pair[0], pair[1]
}

// heapInUse is the heap in use after a garbage collection: what the
// process holds, not what it has yet to collect.
func heapInUse() int64 {
	runtime.GC()
	runtime.GC() // the second frees what pools kept through the first
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapInuse)
}

// findServerSide is serverSide for other goroutines: it reports failure
// instead of failing the test.
func (ts *testServer) findServerSide(c *testClient) *connection {
	local := c.raw.LocalAddr().(*net.TCPAddr)
	ts.connsMu.Lock()
	defer ts.connsMu.Unlock()
	for sc := range ts.conns {
		if int(sc.addr.port) == local.Port && sc.addr.ip == netip.MustParseAddr(local.IP.String()) {
			return sc
		}
	}
	return nil
}

// readClose reads frames until the server's close frame and returns its
// status and reason, and the error messages that came before it.
func readClose(c *testClient) (status int, errs []string, err error) {
	c.raw.SetReadDeadline(time.Now().Add(testTimeout))
	for {
		fr, err := c.ws.NewFrameReader()
		if err != nil {
			return 0, errs, err
		}
		payload, err := io.ReadAll(fr)
		if err != nil {
			return 0, errs, err
		}
		switch fr.PayloadType() {
		case websocket.CloseFrame:
			if len(payload) < 2 {
				return 0, errs, fmt.Errorf("close frame %x", payload)
			}
			return int(binary.BigEndian.Uint16(payload)), errs, nil
		case websocket.TextFrame:
			var m msg
			if json.Unmarshal(payload, &m) == nil && m.typ() == "error" {
				errs = append(errs, m.str("error"))
			}
		}
	}
}

// waitFor polls cond until it holds, failing the test after testTimeout.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// newServer is openServer with a replay that is never stopped.
func newServer(cfg config, log *slog.Logger) (*server, error) {
	return openServer(context.Background(), cfg, log)
}

// nameplateExistsLocked reports whether the app has a nameplate of this name.
func (r *registry) nameplateExistsLocked(appID, name string) bool {
	a := r.apps[appID]
	return a != nil && a.nameplates[name] != nil
}
