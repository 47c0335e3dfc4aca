// server_test.go holds the test harness (a real server on a real
// listener, and a WebSocket test client) and the tests of the HTTP and
// WebSocket layer: routes, the handshake, frames, and closing.
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"regexp"
	"strings"
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

func clientFrame(fin bool, opcode byte, payload []byte) []byte {
	b0 := opcode
	if fin {
		b0 |= 0x80
	}
	f := []byte{b0}
	switch n := len(payload); {
	case n <= 125:
		f = append(f, 0x80|byte(n))
	case n < 1<<16:
		f = append(f, 0x80|126)
		f = binary.BigEndian.AppendUint16(f, uint16(n))
	default:
		f = append(f, 0x80|127)
		f = binary.BigEndian.AppendUint64(f, uint64(n))
	}
	var mask [4]byte
	rand.Read(mask[:])
	f = append(f, mask[:]...)
	for i, b := range payload {
		f = append(f, b^mask[i%4])
	}
	return f
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

func TestRootBanner(t *testing.T) {
	ts := startServer(t, testConfig())
	for _, tc := range []struct {
		method, path string
		status       int
		body         string
	}{
		{"GET", "/", 200, "Wormhole Relay\n"},
		{"HEAD", "/", 200, ""},
		{"POST", "/", 405, ""},
		{"GET", "/v2", 404, ""},
		{"GET", "/foo", 404, ""},
		{"GET", "//", 404, ""},
		{"GET", "/v1x", 404, ""},
		{"GET", "/v1", 426, ""},
	} {
		req, _ := http.NewRequest(tc.method, ts.http.URL+tc.path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.status {
			t.Errorf("%s %s: status %d, want %d", tc.method, tc.path, resp.StatusCode, tc.status)
		}
		if tc.body != "" && string(body) != tc.body {
			t.Errorf("%s %s: body %q, want %q", tc.method, tc.path, body, tc.body)
		}
		if tc.status == 200 && resp.Header.Get("Content-Type") != "text/plain" {
			t.Errorf("%s %s: content type %q", tc.method, tc.path, resp.Header.Get("Content-Type"))
		}
		if !strings.Contains(resp.Header.Get("Server"), "Magic Wormhole") {
			t.Errorf("%s %s: Server header %q", tc.method, tc.path, resp.Header.Get("Server"))
		}
	}
}

// TestHandshake checks the upgrade: no Origin needed, no subprotocol and
// no extension chosen, the Server header set, and sub-paths of /v1 served.
func TestHandshake(t *testing.T) {
	ts := startServer(t, testConfig())
	for _, path := range []string{"/v1", "/v1/", "/v1/anything", "/v1?x=1", "/v1//"} {
		conn, err := net.Dial("tcp", strings.TrimPrefix(ts.http.URL, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(testTimeout))
		fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
			"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"+
			"Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n", path)
		br := bufio.NewReader(conn)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if resp.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("%s: status %d", path, resp.StatusCode)
		}
		if got := resp.Header.Get("Sec-WebSocket-Accept"); got != "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" {
			t.Errorf("%s: accept %q", path, got)
		}
		for _, h := range []string{"Sec-WebSocket-Protocol", "Sec-WebSocket-Extensions"} {
			if v := resp.Header.Get(h); v != "" {
				t.Errorf("%s: %s: %q, want none", path, h, v)
			}
		}
		if !strings.HasPrefix(resp.Header.Get("Server"), "Magic Wormhole Mailbox (Go) ") {
			t.Errorf("%s: Server header %q", path, resp.Header.Get("Server"))
		}
		op, payload := readFrame(t, br)
		if op != websocket.TextFrame || !strings.Contains(string(payload), `"type": "welcome"`) {
			t.Errorf("%s: first frame %d %q, want a welcome text frame", path, op, payload)
		}
	}
}

// TestWireFormat checks that messages are laid out as the reference
// writes them, byte for byte apart from the time stamps.
func TestWireFormat(t *testing.T) {
	ts := startServer(t, testConfig())
	c := dialRaw(t, ts.url, nil)
	var first []byte
	websocket.Message.Receive(c.ws, &first)
	port := c.raw.LocalAddr().(*net.TCPAddr).Port
	want := fmt.Sprintf(`^\{"welcome": \{"your-address": \{"port": %d, "ipv4": "127\.0\.0\.1"\}\}, "type": "welcome", "server_tx": \d+\.\d+\}$`, port)
	if !regexp.MustCompile(want).Match(first) {
		t.Errorf("welcome %s, want %s", first, want)
	}
	for _, tc := range []struct{ send, want string }{
		{`{"type":"ping","ping":"x","id":"0001"}`, `^\{"id": "0001", "type": "ack", "server_tx": \d+\.\d+\}$`},
		{``, `^\{"pong": "x", "type": "pong", "server_tx": \d+\.\d+\}$`},
		{`{"type":"list","id":5}`, `^\{"id": 5, "type": "ack", "server_tx": \d+\.\d+\}$`},
		{``, `^\{"error": "must bind first", "orig": \{"type": "list", "id": 5\}, "type": "error", "server_tx": \d+\.\d+\}$`},
		{`{"id":"x"}`, `^\{"error": "missing 'type'", "orig": \{"id": "x"\}, "type": "error", "server_tx": \d+\.\d+\}$`},
	} {
		if tc.send != "" {
			c.send(tc.send)
		}
		var got []byte
		if err := websocket.Message.Receive(c.ws, &got); err != nil {
			t.Fatal(err)
		}
		if !regexp.MustCompile(tc.want).Match(got) {
			t.Errorf("after %s: got %s, want %s", tc.send, got, tc.want)
		}
	}
}

// TestPyEcho checks that values a client sent are echoed as the
// reference's Python json writes them.
func TestPyEcho(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`"0004"`, `"0004"`},
		{`{"type":"list","id":5}`, `{"type": "list", "id": 5}`},
		{` [1,[2,{}],[]] `, `[1, [2, {}], []]`},
		{`{"type":"list","type":"list","x":1,"x":2}`, `{"type": "list", "x": 2}`},
		{`{"a":1,"\u0061":2}`, `{"a": 2}`},
		{`"\u00e9"`, `"\u00e9"`},
		{`"é"`, `"\u00e9"`},
		{`"a\/b"`, `"a/b"`},
		{`"\u0041\"\n"`, `"A\"\n"`},
		{`"a\ud800b"`, `"a\ud800b"`},
		{`"\ud83d\ude00"`, `"\ud83d\ude00"`},
		{`12345678901234567890`, `12345678901234567890`},
		{`-0`, `0`},
		{`-0.0`, `-0.0`},
		{`1e2`, `100.0`},
		{`1E+2`, `100.0`},
		{`1e-7`, `1e-07`},
		{`0.00001`, `1e-05`},
		{`1.5e300`, `1.5e+300`},
		{`100000000000000000000.0`, `1e+20`},
		{`3.141592653589793238`, `3.141592653589793`},
		{`1e400`, `1e400`}, // Python writes Infinity, which is not JSON (a deliberate difference)
		{`-1e400`, `-1e400`},
		{`[1e999999]`, `[1e999999]`},
		{`true`, `true`},
		{`null`, `null`},
	} {
		if got := string(appendPyJSON(nil, []byte(tc.in), 0)); got != tc.want {
			t.Errorf("appendPyJSON(%s) = %s, want %s", tc.in, got, tc.want)
		}
	}
}

func TestPyJSON(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"hello", `"hello"`},
		{"a\"b\\c\n\r\t\b\f", `"a\"b\\c\n\r\t\b\f"`},
		{"\x01\x7f", `"\u0001\u007f"`},
		{"<&>", `"<&>"`},
		{"é€", `"\u00e9\u20ac"`},
		{"😀", `"\ud83d\ude00"`},
	} {
		if got := string(appendPyString(nil, tc.in)); got != tc.want {
			t.Errorf("appendPyString(%q) = %s, want %s", tc.in, got, tc.want)
		}
	}
	for _, tc := range []struct {
		in   float64
		want string
	}{
		{1795715551.1482983, "1795715551.1482983"},
		{1795715551, "1795715551.0"},
		{0, "0.0"},
		{0.5, "0.5"},
		{1e16, "1e+16"},
		{1.5e-5, "1.5e-05"},
	} {
		if got := string(appendPyFloat(nil, tc.in)); got != tc.want {
			t.Errorf("appendPyFloat(%v) = %s, want %s", tc.in, got, tc.want)
		}
	}
}

// TestFrames checks the frames a client may send: binary as well as
// text, fragmented messages, and pings in between.
func TestFrames(t *testing.T) {
	ts := startServer(t, testConfig())
	c, _ := ts.dial(t)

	c.writeFrame(true, websocket.BinaryFrame, []byte(`{"type": "ping", "ping": 1}`))
	if got := c.sync(); len(got) != 2 || got[1].typ() != "pong" || got[1]["pong"] != 1.0 {
		t.Fatalf("binary frame: got %v, want ack and pong", got)
	}

	c.writeFrame(false, websocket.TextFrame, []byte(`{"type": "pi`))
	c.writeFrame(true, websocket.PingFrame, []byte("between"))
	c.writeFrame(false, websocket.ContinuationFrame, []byte(`ng", "pi`))
	c.writeFrame(true, websocket.ContinuationFrame, []byte(`ng": "whole"}`))
	br := bufio.NewReader(c.raw)
	op, payload := readFrame(t, br)
	if op != websocket.PongFrame || string(payload) != "between" {
		t.Fatalf("ping between fragments: got frame %d %q, want a pong", op, payload)
	}
	for _, want := range []string{`"type": "ack"`, `"pong": "whole"`} {
		if op, payload := readFrame(t, br); op != websocket.TextFrame || !strings.Contains(string(payload), want) {
			t.Fatalf("fragmented message: got %d %q, want %s", op, payload, want)
		}
	}
}

// TestBadInput checks that input that is not a JSON object in UTF-8, or
// frames that break the WebSocket rules, close that connection cleanly
// with the matching status, and leave the server serving others.
func TestBadInput(t *testing.T) {
	ts := startServer(t, testConfig())
	for _, tc := range []struct {
		name   string
		frames [][]byte
		status int
	}{
		{"not JSON", [][]byte{clientFrame(true, websocket.TextFrame, []byte("hello"))}, closeBadData},
		{"not an object", [][]byte{clientFrame(true, websocket.TextFrame, []byte("[1, 2]"))}, closeBadData},
		{"null", [][]byte{clientFrame(true, websocket.TextFrame, []byte("null"))}, closeBadData},
		{"bad UTF-8", [][]byte{clientFrame(true, websocket.TextFrame, []byte("{\"type\": \"\xff\"}"))}, closeBadData},
		{"too big", [][]byte{clientFrame(true, websocket.TextFrame, make([]byte, maxMessageBytes+1))}, closeTooBig},
		{"too big in fragments", [][]byte{
			clientFrame(false, websocket.TextFrame, make([]byte, maxMessageBytes/2+1)),
			clientFrame(true, websocket.ContinuationFrame, make([]byte, maxMessageBytes/2+1)),
		}, closeTooBig},
		{"continuation first", [][]byte{clientFrame(true, websocket.ContinuationFrame, []byte("{}"))}, closeProtocol},
		{"unmasked", [][]byte{{0x81, 0x02, '{', '}'}}, closeProtocol},
		{"fragmented ping", [][]byte{clientFrame(false, websocket.PingFrame, nil)}, closeProtocol},
		{"reserved opcode", [][]byte{clientFrame(true, 3, nil)}, closeProtocol},
		{"reserved control opcode", [][]byte{clientFrame(true, 0xb, nil)}, closeProtocol},
		{"close with a 1-byte payload", [][]byte{clientFrame(true, websocket.CloseFrame, []byte{3})}, closeProtocol},
		{"close with status 1005", [][]byte{clientFrame(true, websocket.CloseFrame, []byte{0x03, 0xed})}, closeProtocol},
		{"close with a bad reason", [][]byte{clientFrame(true, websocket.CloseFrame, []byte{0x0f, 0xa0, 0xff})}, closeBadData},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, _ := ts.dial(t)
			for _, f := range tc.frames {
				c.raw.Write(f)
			}
			c.expectClose(tc.status)
		})
	}
	c, _ := ts.dial(t)
	c.bind("app", "side")
}

// TestClientClose checks that a client's close frame is answered with a
// normal close after what the client is owed.
func TestClientClose(t *testing.T) {
	ts := startServer(t, testConfig())
	c, _ := ts.dial(t)
	c.send(`{"type": "ping", "ping": 1}`)
	c.writeFrame(true, websocket.CloseFrame, binary.BigEndian.AppendUint16(nil, closeNormal))
	c.expectClose(closeNormal)
}

// TestJournalStateSurvivesRestart checks that a restarted server carries
// on where the last one stopped.
func TestJournalStateSurvivesRestart(t *testing.T) {
	cfg := testConfig()
	cfg.channelDB = filepath.Join(t.TempDir(), "channel.jsonl")
	ts := startServer(t, cfg)
	a, _ := ts.dial(t)
	a.bind("app", "a")
	claimed := a.expect(`{"type": "claim", "nameplate": "4"}`, "claimed")[0].str("mailbox")
	a.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, claimed))
	a.expect(`{"type": "add", "phase": "pake", "body": "aabb", "id": "0001"}`, "message")
	ts.stop()

	ts2 := startServer(t, cfg)
	b, _ := ts2.dial(t)
	b.bind("app", "b")
	if got := b.expect(`{"type": "claim", "nameplate": "4"}`, "claimed")[0].str("mailbox"); got != claimed {
		t.Fatalf("after restart, nameplate 4 has mailbox %q, want %q", got, claimed)
	}
	got := b.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, claimed), "message")[0]
	if got.str("side") != "a" || got.str("phase") != "pake" || got.str("body") != "aabb" || got.str("id") != "0001" {
		t.Fatalf("after restart, replayed %v", got)
	}
}

// TestNothingHandledAfterServerClose checks that once the server has
// queued its close (here the going-away close of a shutdown), what the
// client still sends is not acted on: it could not be answered, so a
// client must not find an add stored that it never saw acknowledged.
func TestNothingHandledAfterServerClose(t *testing.T) {
	ts := startServer(t, testConfig())
	c, _ := ts.dial(t)
	c.bind("app", "a")
	c.expect(`{"type": "open", "mailbox": "mb"}`)
	ts.serverSide(t, c).end(closeGoingAway, errShutdown)
	c.send(`{"type": "add", "phase": "p", "body": "aa"}`)
	c.expectClose(closeGoingAway)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	ts.closeConnections(ctx) // returns once the server's side has read all it will
	ts.reg.mu.Lock()
	defer ts.reg.mu.Unlock()
	if mb := ts.reg.apps["app"].mailboxes["mb"]; len(mb.messages) != 0 {
		t.Fatalf("the mailbox holds %d messages, want none", len(mb.messages))
	}
}
