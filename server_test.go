// server_test.go holds the test harness (a real server on a real
// listener, and a WebSocket test client) and the tests of the HTTP and
// WebSocket layer: routes, the handshake, frames, and closing.
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

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
