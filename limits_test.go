// limits_test.go tests the limits that keep any one client from hurting
// the server or another user: every cap's error through the protocol, the
// per-address limits and the proxy header that decides the address, slow
// and silent clients, and a flood of all of it at once.
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// expectRefused checks that after its welcome the server closes the
// client's connection with status 1008 (policy violation). The close
// frame may have come with the welcome, so it is read through the
// client's own reader.
func expectRefused(t testing.TB, c *testClient) {
	t.Helper()
	for {
		fr, err := c.ws.NewFrameReader()
		if err != nil {
			t.Fatalf("reading the close frame: %v", err)
		}
		payload, err := io.ReadAll(fr)
		if err != nil {
			t.Fatalf("reading the close frame: %v", err)
		}
		if fr.PayloadType() != websocket.CloseFrame {
			continue
		}
		if len(payload) < 2 || binary.BigEndian.Uint16(payload) != closePolicy {
			t.Fatalf("close frame %x, want status %d", payload, closePolicy)
		}
		break
	}
	if _, err := c.ws.NewFrameReader(); err != io.EOF {
		t.Fatalf("after the close frame: %v, want EOF", err)
	}
}

// yourAddress is the welcome's your-address, as "ip port".
func yourAddress(w msg) string {
	inner, _ := w["welcome"].(map[string]any)
	a, _ := inner["your-address"].(map[string]any)
	ip, _ := a["ipv4"].(string)
	if ip == "" {
		ip, _ = a["ipv6"].(string)
	}
	return fmt.Sprintf("%s %v", ip, a["port"])
}

func TestLengthLimits(t *testing.T) {
	ts := startServer(t, testConfig())
	x := func(n int) string { return strings.Repeat("x", n) }
	c, _ := ts.dial(t)
	c.expectError(fmt.Sprintf(`{"type": "bind", "appid": %q, "side": "s"}`, x(maxAppIDLen+1)), "'appid' is too long")
	c.expectError(fmt.Sprintf(`{"type": "bind", "appid": "a", "side": %q}`, x(maxTokenLen+1)), "'side' is too long")
	c.expectError(fmt.Sprintf(`{"type": "bind", "appid": "a", "side": "s", "client_version": [%q, "1"]}`, x(maxAppIDLen+1)), string(errBadClientVersion))
	c.expect(fmt.Sprintf(`{"type": "bind", "appid": %q, "side": %q}`, x(maxAppIDLen), x(maxTokenLen))) // at the limits
	c.expectError(fmt.Sprintf(`{"type": "claim", "nameplate": "%s"}`, strings.Repeat("1", maxNameplateLen+1)), string(errBadNameplate))
	c.expectError(fmt.Sprintf(`{"type": "release", "nameplate": "%s"}`, strings.Repeat("1", maxNameplateLen+1)), "'nameplate' is too long")
	c.expectError(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, x(maxTokenLen+1)), "'mailbox' is too long")
	c.expectError(fmt.Sprintf(`{"type": "close", "mailbox": %q}`, x(maxTokenLen+1)), "'mailbox' is too long")
	c.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, x(maxTokenLen)))
	c.expectError(fmt.Sprintf(`{"type": "add", "phase": %q, "body": ""}`, x(maxTokenLen+1)), "'phase' is too long")
	c.expect(fmt.Sprintf(`{"type": "add", "phase": %q, "body": ""}`, x(maxTokenLen)), "message")
	c.expectError(fmt.Sprintf(`{"type": "close", "mood": %q}`, x(maxTokenLen+1)), "'mood' is too long")
	c.expect(fmt.Sprintf(`{"type": "close", "mood": %q}`, x(maxTokenLen)), "closed")
}

// TestMessageSize checks what a stored message counts against the limits:
// the length of the frame that delivers it, whatever its characters.
func TestMessageSize(t *testing.T) {
	for _, s := range []string{"", "aabb", "\"\\\n\r\t\b\f", "\x00\x01\x1f\x7f", "<&>", "é€", "😀", "\u2028", strings.Repeat("\x01", 1000)} {
		if got, want := pyStringLen(s), len(appendPyString(nil, s)); got != want {
			t.Errorf("pyStringLen(%q) = %d, want %d", s, got, want)
		}
		quoted, _ := json.Marshal(s)
		for _, m := range []message{
			{side: s, phase: "p", body: "b", serverRx: 1795715551.1482983, id: jsonNull},
			{side: "s", phase: s, body: s, serverRx: 1795715551, id: json.RawMessage(`[1, "x"]`)},
			{side: "s", phase: "p", body: "b", serverRx: 1795715551, id: json.RawMessage(`[` + string(quoted) + `,1e5,{"k":0}]`)},
		} {
			if frame := messageFrame(m); len(frame) > m.size() || len(frame) < m.size()-2*pyTimeLen {
				t.Errorf("a message of %q counts %d bytes; its frame has %d", s, m.size(), len(frame))
			}
		}
	}
}

// TestMessageSizeFlag checks --max-message-size: a message of that size is
// read; a larger one gets an error saying so, and the connection is closed
// with 1009 (too big).
func TestMessageSizeFlag(t *testing.T) {
	cfg := testConfig()
	cfg.maxMessageBytes = 200
	ts := startServer(t, cfg)
	c, _ := ts.dial(t)
	ping := func(n int) []byte { // a ping of exactly n bytes
		return []byte(fmt.Sprintf(`{"type": "ping", "ping": "%s"}`, strings.Repeat("p", n-len(`{"type": "ping", "ping": ""}`))))
	}
	c.writeFrame(true, websocket.TextFrame, ping(200))
	if got := c.sync(); len(got) != 2 || got[1].typ() != "pong" {
		t.Fatalf("a message of the largest size: got %v, want ack and pong", got)
	}
	// A control frame between the fragments of a message is no part of it.
	whole := ping(200)
	c.writeFrame(false, websocket.TextFrame, whole[:195])
	c.writeFrame(true, websocket.PongFrame, []byte("0123456789"))
	c.writeFrame(true, websocket.ContinuationFrame, whole[195:])
	if got := c.sync(); len(got) != 2 || got[1].typ() != "pong" {
		t.Fatalf("a message of the largest size, with a pong between its fragments: got %v, want ack and pong", got)
	}
	c.writeFrame(true, websocket.TextFrame, ping(201))
	br := bufio.NewReader(c.raw)
	if op, payload := readFrame(t, br); op != websocket.TextFrame || !strings.Contains(string(payload), `"error": "message too large", "orig": null`) {
		t.Fatalf("after a message too large: got frame %d %q, want an error saying so", op, payload)
	}
	if op, payload := readFrame(t, br); op != websocket.CloseFrame || binary.BigEndian.Uint16(payload) != closeTooBig {
		t.Fatalf("after the error: got frame %d %q, want close %d", op, payload, closeTooBig)
	}
}

func TestMailboxLimits(t *testing.T) {
	// size is what a message counts: body n bytes of hex, sent by side "s".
	size := func(n int) int {
		return message{side: "s", phase: "p", body: strings.Repeat("a", n), id: jsonNull}.size()
	}
	add := func(n int) string {
		return fmt.Sprintf(`{"type": "add", "phase": "p", "body": %q}`, strings.Repeat("a", n))
	}
	open := func(ts *testServer, app, mailbox string) *testClient {
		c, _ := ts.dial(t)
		c.bind(app, "s")
		c.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mailbox))
		return c
	}

	t.Run("messages", func(t *testing.T) {
		cfg := testConfig()
		cfg.limits.MaxMessagesPerMailbox = 3
		ts := startServer(t, cfg)
		c := open(ts, "app", "mb")
		for range 3 {
			c.expect(add(2), "message")
		}
		c.expectError(add(2), "too many messages in this mailbox")
		open(ts, "app", "other").expect(add(2), "message") // other mailboxes are not affected
	})

	t.Run("mailbox bytes", func(t *testing.T) {
		cfg := testConfig()
		cfg.limits.MaxMailboxBytes = 2000
		ts := startServer(t, cfg)
		c := open(ts, "app", "mb")
		c.expect(add(100), "message")
		c.expectError(add(2000-size(100)-size(0)+1), "mailbox is full")
		c.expect(add(2000-size(100)-size(0)), "message") // exactly full
		c.expectError(add(0), "mailbox is full")
	})

	t.Run("stored bytes", func(t *testing.T) {
		cfg := testConfig()
		cfg.limits.MaxStoredBytes = 4000 // one app may store 2000
		ts := startServer(t, cfg)
		a := open(ts, "a", "mb1")
		a.expect(add(2000-size(0)), "message") // app a's whole share
		open(ts, "a", "mb2").expectError(add(0), "the server holds too many messages, try again later")
		b := open(ts, "b", "mb1")
		b.expect(add(1000-size(0)), "message")
		b.expect(add(1000-size(0)), "message") // all 4000 stored
		c := open(ts, "c", "mb1")
		c.expectError(add(0), "the server holds too many messages, try again later")
		a.expect(`{"type": "close"}`, "closed") // a's mailbox goes, and its bytes with it
		c.expect(add(0), "message")
	})
}

// TestChannelLimits checks the caps on nameplates and mailboxes, in all
// and per app (half of all).
func TestChannelLimits(t *testing.T) {
	cfg := testConfig()
	cfg.limits.MaxNameplates, cfg.limits.MaxMailboxes = 4, 6 // per app: 2 and 3
	ts := startServer(t, cfg)
	side := 0
	client := func(app string) *testClient {
		side++
		c, _ := ts.dial(t)
		c.bind(app, fmt.Sprint("side-", side))
		return c
	}
	client("a").expect(`{"type": "claim", "nameplate": "1"}`, "claimed")
	client("a").expect(`{"type": "allocate"}`, "allocated")
	client("a").expectError(`{"type": "claim", "nameplate": "33"}`, "too many nameplates") // a's share (and a name allocate never picks here)
	client("a").expectError(`{"type": "allocate"}`, "too many nameplates")
	client("a").expect(`{"type": "open", "mailbox": "x"}`)
	client("a").expectError(`{"type": "open", "mailbox": "y"}`, "too many mailboxes") // a's share
	b1 := client("b")
	b1.expect(`{"type": "claim", "nameplate": "1"}`, "claimed")
	client("b").expect(`{"type": "claim", "nameplate": "2"}`, "claimed")
	client("c").expectError(`{"type": "claim", "nameplate": "1"}`, "too many nameplates") // all 4 in use
	b3 := client("b")
	b3.expect(`{"type": "open", "mailbox": "x"}`)
	client("c").expectError(`{"type": "open", "mailbox": "x"}`, "too many mailboxes")    // all 6 in use
	b1.expect(`{"type": "release"}`, "released")                                         // b's nameplate 1 goes; its mailbox stays
	client("c").expectError(`{"type": "claim", "nameplate": "1"}`, "too many mailboxes") // a new nameplate needs a new mailbox
	b3.expect(`{"type": "close"}`, "closed")
	client("c").expect(`{"type": "claim", "nameplate": "1"}`, "claimed")
}

func TestConnectionLimits(t *testing.T) {
	t.Run("per address", func(t *testing.T) {
		cfg := testConfig()
		cfg.maxConnsPerAddr = 2
		ts := startServer(t, cfg)
		for range 2 {
			if _, w := mustDialFrom(t, ts.url, dialOptions{from: "127.0.0.1"}); welcomeError(w) != "" {
				t.Fatalf("connection within the limit: welcome %v", w)
			}
		}
		c, w := mustDialFrom(t, ts.url, dialOptions{from: "127.0.0.1"})
		if got := welcomeError(w); got != "too many connections from your address" {
			t.Fatalf("third connection: welcome error %q", got)
		}
		expectRefused(t, c)
		if _, w := mustDialFrom(t, ts.url, dialOptions{from: "127.0.0.2"}); welcomeError(w) != "" {
			t.Fatalf("another address: welcome %v", w)
		}
	})
	t.Run("in all", func(t *testing.T) {
		cfg := testConfig()
		cfg.maxConns = 2
		ts := startServer(t, cfg)
		mustDialFrom(t, ts.url, dialOptions{from: "127.0.0.1"})
		mustDialFrom(t, ts.url, dialOptions{from: "127.0.0.2"})
		c, w := mustDialFrom(t, ts.url, dialOptions{from: "127.0.0.3"})
		if got := welcomeError(w); got != "the server has too many connections, try again later" {
			t.Fatalf("third connection: welcome error %q", got)
		}
		expectRefused(t, c)
	})
}

// TestNewNameplateRateLimit checks the allowance of channels per
// address: allocating, claiming and opening take from it whether the
// nameplate or mailbox exists or not, so that a refusal tells nothing
// about which exist (only the claim of the nameplate a connection
// allocated, and the open of the mailbox its claim returned, are paid for
// already); other addresses have their own.
func TestNewNameplateRateLimit(t *testing.T) {
	cfg := testConfig()
	cfg.nameplatesPerMin = 2
	ts := startServer(t, cfg)
	client := func(from, side string) *testClient {
		c, _ := mustDialFrom(t, ts.url, dialOptions{from: from})
		c.bind("app", side)
		return c
	}
	a := client("127.0.0.1", "a")
	name := a.expect(`{"type": "allocate"}`, "allocated")[0].str("nameplate")
	mailbox := a.expect(fmt.Sprintf(`{"type": "claim", "nameplate": %q}`, name), "claimed")[0].str("mailbox")
	a.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mailbox))
	client("127.0.0.1", "b").expect(`{"type": "claim", "nameplate": "77"}`, "claimed")
	client("127.0.0.1", "c").expectError(`{"type": "allocate"}`, "too many new nameplates from your address, try again later")
	d := client("127.0.0.1", "d")
	d.expectError(`{"type": "claim", "nameplate": "78"}`, "too many new nameplates from your address, try again later")
	d.expectError(`{"type": "claim", "nameplate": "78"}`, "too many new nameplates from your address, try again later") // the refused claim was not used up
	d.expectError(fmt.Sprintf(`{"type": "claim", "nameplate": %q}`, name), "too many new nameplates from your address, try again later")
	e := client("127.0.0.1", "e")
	e.expectError(`{"type": "open", "mailbox": "new"}`, "too many new mailboxes from your address, try again later")
	e.expectError(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mailbox), "too many new mailboxes from your address, try again later")
	client("127.0.0.2", "f").expect(`{"type": "allocate"}`, "allocated")
	if got := ts.metrics.refusals.Get("new nameplates per address"); got == nil || got.String() != "6" {
		t.Errorf("refusals counted: %v, want 6", got)
	}
}

// TestTrustProxyHeader checks --trust-proxy-header: the header's address
// is the one welcome reports and the per-address limits count; without
// the flag the header is ignored.
func TestTrustProxyHeader(t *testing.T) {
	hdr := func(kv ...string) http.Header {
		h := http.Header{}
		for i := 0; i < len(kv); i += 2 {
			h.Set(kv[i], kv[i+1])
		}
		return h
	}
	t.Run("X-Real-IP", func(t *testing.T) {
		cfg := testConfig()
		cfg.trustProxyHeader = "X-Real-IP"
		cfg.maxConnsPerAddr, cfg.nameplatesPerMin = 1, 1
		ts := startServer(t, cfg)
		c, w := mustDialFrom(t, ts.url, dialOptions{header: hdr("X-Real-IP", "203.0.113.7", "X-Real-Port", "5555")})
		if got := yourAddress(w); got != "203.0.113.7 5555" {
			t.Errorf("your-address %s, want 203.0.113.7 5555", got)
		}
		c.bind("app", "a")
		c.expect(`{"type": "allocate"}`, "allocated")
		c2, w := mustDialFrom(t, ts.url, dialOptions{header: hdr("X-Real-IP", "203.0.113.7")})
		if welcomeError(w) != "too many connections from your address" {
			t.Errorf("second connection from 203.0.113.7: welcome %v", w)
		}
		expectRefused(t, c2)
		d, w := mustDialFrom(t, ts.url, dialOptions{header: hdr("X-Real-IP", "2001:db8::9")}) // the same TCP peer, another client
		if got := yourAddress(w); welcomeError(w) != "" || got != "2001:db8::9 0" {
			t.Errorf("connection from 2001:db8::9: welcome %v", w)
		}
		d.bind("app", "d")
		d.expect(`{"type": "allocate"}`, "allocated") // its own new-nameplate allowance
		bad := dialRawResponse(t, ts, hdr("X-Real-IP", "not an address"))
		if bad != http.StatusBadRequest {
			t.Errorf("unreadable X-Real-IP: status %d, want 400", bad)
		}
	})
	t.Run("X-Forwarded-For", func(t *testing.T) {
		cfg := testConfig()
		cfg.trustProxyHeader = "X-Forwarded-For"
		cfg.maxConnsPerAddr = 1
		ts := startServer(t, cfg)
		_, w := mustDialFrom(t, ts.url, dialOptions{header: hdr("X-Forwarded-For", "198.51.100.1, 203.0.113.9")})
		if got := yourAddress(w); got != "203.0.113.9 0" { // the nearest proxy's view is the last
			t.Errorf("your-address %s, want 203.0.113.9 0", got)
		}
		_, w = mustDialFrom(t, ts.url, dialOptions{header: hdr("X-Forwarded-For", "203.0.113.10")})
		if welcomeError(w) != "" {
			t.Errorf("another forwarded address: welcome %v", w)
		}
		c, w := mustDialFrom(t, ts.url, dialOptions{header: hdr("X-Forwarded-For", "10.0.0.1, 203.0.113.9")})
		if welcomeError(w) != "too many connections from your address" {
			t.Errorf("203.0.113.9 again: welcome %v", w)
		}
		expectRefused(t, c)
	})
	t.Run("not trusted", func(t *testing.T) {
		cfg := testConfig()
		cfg.maxConnsPerAddr = 1
		ts := startServer(t, cfg)
		c, w := mustDialFrom(t, ts.url, dialOptions{header: hdr("X-Real-IP", "203.0.113.7", "X-Forwarded-For", "203.0.113.8")})
		if got, port := yourAddress(w), c.raw.LocalAddr().(*net.TCPAddr).Port; got != fmt.Sprintf("127.0.0.1 %d", port) {
			t.Errorf("your-address %s, want the TCP peer's", got)
		}
		c2, w := mustDialFrom(t, ts.url, dialOptions{header: hdr("X-Real-IP", "203.0.113.99")})
		if welcomeError(w) != "too many connections from your address" {
			t.Errorf("without the flag, a different X-Real-IP escaped the limit: welcome %v", w)
		}
		expectRefused(t, c2)
	})
}

// dialRawResponse sends a WebSocket upgrade with header and returns the
// HTTP status.
func dialRawResponse(t *testing.T, ts *testServer, header http.Header) int {
	t.Helper()
	req, _ := http.NewRequest("GET", ts.http.URL+"/v1", nil)
	req.Header = header
	for k, v := range map[string]string{"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"} {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// TestLimiter checks the address limiter alone: IPv6 clients counted by
// their /64, connections given back, and the bounded table of addresses.
func TestLimiter(t *testing.T) {
	for _, tc := range []struct{ a, b string }{
		{"2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff"},
		{"2001:db8:1:2::1", "2001:db8:1:2::1%eth0"},
		{"192.0.2.1", "192.0.2.1"},
	} {
		if ka, kb := addrKey(netip.MustParseAddr(tc.a)), addrKey(netip.MustParseAddr(tc.b)); ka != kb {
			t.Errorf("addrKey(%s) = %v, addrKey(%s) = %v, want the same", tc.a, ka, tc.b, kb)
		}
	}
	for _, tc := range []struct{ a, b string }{
		{"2001:db8:1:2::1", "2001:db8:1:3::1"},
		{"192.0.2.1", "192.0.2.2"},
	} {
		if ka, kb := addrKey(netip.MustParseAddr(tc.a)), addrKey(netip.MustParseAddr(tc.b)); ka == kb {
			t.Errorf("addrKey(%s) = addrKey(%s) = %v, want different", tc.a, tc.b, ka)
		}
	}

	l := newLimiter(2, 2)
	a1, a2, b := netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("2001:db8::2"), netip.MustParseAddr("2001:db8:0:1::1")
	for i, tc := range []struct {
		ip   netip.Addr
		want string
	}{{a1, ""}, {a2, ""}, {a1, errTooManyConnsFromAddr}, {b, ""}} {
		if got := l.connect(tc.ip); got != tc.want {
			t.Errorf("connection %d from %v: %q, want %q", i, tc.ip, got, tc.want)
		}
	}
	l.disconnect(a1)
	if got := l.connect(a1); got != errTooManyConnsFromAddr {
		t.Errorf("after one left, a third from a /64 that had three: %q", got)
	}
	l.disconnect(a1)
	l.disconnect(a2)
	if got := l.connect(a2); got != "" {
		t.Errorf("after two left, a connection from the /64: %q", got)
	}
	if !l.allowNewNameplate(a1) || !l.allowNewNameplate(a2) || l.allowNewNameplate(a1) {
		t.Error("a /64 did not share its two new nameplates a minute")
	}
	if !l.allowNewNameplate(b) {
		t.Error("another /64 had no new nameplate")
	}

	// The table of addresses is bounded: when it is full of addresses
	// still refilling, a new address is refused; known ones go on.
	l = newLimiter(0, 1)
	for i := range maxTrackedAddrs {
		l.allowNewNameplate(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}))
	}
	known := netip.AddrFrom4([4]byte{10, 0, 0, 0})
	if l.allowNewNameplate(netip.MustParseAddr("192.0.2.1")) {
		t.Error("a full table of addresses took a new one")
	}
	if l.allowNewNameplate(known) {
		t.Error("a known address got a second new nameplate within a minute")
	}
	if len(l.nameplates.buckets) > maxTrackedAddrs {
		t.Errorf("the table holds %d addresses, over %d", len(l.nameplates.buckets), maxTrackedAddrs)
	}
}

// TestSilentClient checks keepalive: the server pings an idle client, and
// drops one that sends nothing, not even a pong, for the idle timeout.
func TestSilentClient(t *testing.T) {
	ts := startServerWith(t, testConfig(), testLogger(t), func(srv *server) {
		srv.pingInterval, srv.idleTimeout = 10*time.Millisecond, 200*time.Millisecond
	})
	c := dialRaw(t, ts.url, nil)
	br := bufio.NewReader(c.raw)
	pings := 0
	for {
		op, payload, err := tryReadFrame(br)
		if err != nil {
			if pings == 0 {
				t.Fatalf("connection ended (%v) before any ping", err)
			}
			if isTimeout(err) {
				t.Fatalf("the silent client was never dropped: %v", err)
			}
			return // dropped, after pings
		}
		if op == websocket.PingFrame {
			if string(payload) != "wormhole" {
				t.Errorf("ping payload %q", payload)
			}
			pings++
		}
	}
}

// TestSlowReader checks that a client that stops reading is disconnected
// once its outbox is full, while the client sending to it and another
// pair go on unhindered.
func TestSlowReader(t *testing.T) {
	cfg := testConfig()
	cfg.limits.MaxMailboxBytes, cfg.limits.MaxStoredBytes, cfg.limits.MaxMessagesPerMailbox = 256<<20, 256<<20, 100_000
	ts := startServerWith(t, cfg, testLogger(t), func(srv *server) { srv.maxOutboxBytes = 64 << 10 })
	w, _ := ts.dial(t)
	w.bind("app", "w")
	w.expect(`{"type": "open", "mailbox": "mb"}`)
	slow, _ := mustDialFrom(t, ts.url, dialOptions{small: true})
	slow.bind("app", "s")
	slow.expect(`{"type": "open", "mailbox": "mb"}`)
	slowConn := ts.stopReading(t, slow) // from here on, it reads nothing
	p, q := openPair(t, ts, "other")

	add := fmt.Sprintf(`{"type": "add", "phase": "p", "body": "%s"}`, strings.Repeat("ab", 8<<10))
	exchanged := false
	for i := 0; ; i++ {
		if i == 1000 { // 16 MiB
			t.Fatal("the slow reader was never disconnected")
		}
		w.expect(add, "message") // the sender's own echo comes back at once
		held, reason := slowConn.outboxState()
		if reason != nil {
			if !errors.Is(reason, errSlowClient) {
				t.Fatalf("slow reader ended with %v, want %v", reason, errSlowClient)
			}
			break
		}
		if held > 0 && !exchanged { // the slow reader is stuck: others are not
			exchange(t, p, q, 3)
			exchanged = true
		}
	}
	if !exchanged {
		t.Error("the slow reader was dropped before it was seen stuck")
	}
	exchange(t, p, q, 3)
	w.expect(add, "message")
	ts.stopAndCheckOutboxes(t)
	if ts.metrics.dropped.Get(errSlowClient.Error()) == nil {
		t.Errorf("no drop counted for %q", errSlowClient)
	}
}

// TestOutboxBudget checks the server-wide outbox budget: clients that stop
// reading are disconnected once all outboxes together are full, while
// clients that read, whose outboxes stay within their reserve, are not.
func TestOutboxBudget(t *testing.T) {
	cfg := testConfig()
	cfg.limits.MaxMailboxBytes, cfg.limits.MaxStoredBytes, cfg.limits.MaxMessagesPerMailbox = 256<<20, 256<<20, 100_000
	ts := startServerWith(t, cfg, testLogger(t), func(srv *server) {
		srv.maxOutboxBytes, srv.maxOutboxTotalBytes = 64<<20, 128<<10
	})
	w, _ := ts.dial(t)
	w.bind("app", "w")
	w.expect(`{"type": "open", "mailbox": "mb"}`)
	var slow []*connection
	for range 2 { // one side, two connections, neither reading
		s, _ := mustDialFrom(t, ts.url, dialOptions{small: true})
		s.bind("app", "s")
		s.expect(`{"type": "open", "mailbox": "mb"}`)
		slow = append(slow, ts.stopReading(t, s))
	}
	wConn := ts.serverSide(t, w)
	p, q := openPair(t, ts, "other")

	// Small messages: the sender's outbox holds one (or, for a moment
	// after a write, two) and stays within its reserve.
	add := fmt.Sprintf(`{"type": "add", "phase": "p", "body": "%s"}`, strings.Repeat("ab", 512))
	for i := 0; ; i++ {
		if i == 8000 { // 8 MiB
			t.Fatal("no slow reader was disconnected")
		}
		w.expect(add, "message")
		_, r0 := slow[0].outboxState()
		_, r1 := slow[1].outboxState()
		if r0 != nil && r1 != nil {
			if !errors.Is(r0, errOutboxesFull) || !errors.Is(r1, errOutboxesFull) {
				t.Fatalf("slow readers ended with %v and %v, want %v", r0, r1, errOutboxesFull)
			}
			break
		}
		if r0 != nil || r1 != nil { // one is gone, and the other goes on filling its outbox
			exchange(t, p, q, 1)
		}
	}
	exchange(t, p, q, 3)
	w.expect(add, "message")
	if _, reason := wConn.outboxState(); reason != nil {
		t.Fatalf("the reading sender was disconnected: %v", reason)
	}
	ts.stopAndCheckOutboxes(t)
}

// TestOutboxFairShare checks that when all outboxes together are full,
// the client holding the most is disconnected, not one that reads but
// briefly wants more than its reserve (the replay of a mailbox, here).
func TestOutboxFairShare(t *testing.T) {
	cfg := testConfig()
	cfg.limits.MaxMailboxBytes, cfg.limits.MaxStoredBytes, cfg.limits.MaxMessagesPerMailbox = 256<<20, 256<<20, 100_000
	ts := startServerWith(t, cfg, testLogger(t), func(srv *server) {
		srv.maxOutboxBytes, srv.maxOutboxTotalBytes = 64<<20, 128<<10
	})
	add := fmt.Sprintf(`{"type": "add", "phase": "p", "body": "%s"}`, strings.Repeat("ab", 2048))
	small, _ := ts.dial(t) // a mailbox whose replay is 20 KiB, more than a reserve
	small.bind("app", "small")
	small.expect(`{"type": "open", "mailbox": "small"}`)
	for range 5 {
		small.expect(add, "message")
	}
	w, _ := ts.dial(t)
	w.bind("app", "w")
	w.expect(`{"type": "open", "mailbox": "mb"}`)
	s, _ := mustDialFrom(t, ts.url, dialOptions{small: true})
	s.bind("app", "s")
	s.expect(`{"type": "open", "mailbox": "mb"}`)
	slow := ts.stopReading(t, s)
	for i := 0; ts.outboxBytes.Load() < ts.maxOutboxTotalBytes-8<<10; i++ { // fill the pool through the reader that stopped
		if i == 4000 {
			t.Fatal("the outboxes never filled")
		}
		w.expect(add, "message")
	}
	if _, reason := slow.outboxState(); reason != nil {
		t.Fatalf("the reader that stopped was disconnected before the pool filled: %v", reason)
	}
	r, _ := ts.dial(t)
	r.bind("app", "r")
	if got := r.expect(`{"type": "open", "mailbox": "small"}`, "message", "message", "message", "message", "message"); len(got) != 5 {
		t.Fatalf("replay: %v", got)
	}
	waitFor(t, "the reader that stopped to be disconnected", func() bool {
		_, reason := slow.outboxState()
		return reason != nil
	})
	if _, reason := slow.outboxState(); !errors.Is(reason, errOutboxesFull) {
		t.Fatalf("the reader that stopped ended with %v, want %v", reason, errOutboxesFull)
	}
	if _, reason := ts.serverSide(t, r).outboxState(); reason != nil {
		t.Fatalf("the reading client was disconnected: %v", reason)
	}
}

// tryReadFrame reads one raw frame from the server, as readFrame does,
// returning errors instead of failing.
func tryReadFrame(br *bufio.Reader) (opcode byte, payload []byte, err error) {
	h := make([]byte, 2)
	if _, err := io.ReadFull(br, h); err != nil {
		return 0, nil, err
	}
	n := int(h[1] & 0x7f)
	switch n {
	case 126:
		var l [2]byte
		if _, err := io.ReadFull(br, l[:]); err != nil {
			return 0, nil, err
		}
		n = int(binary.BigEndian.Uint16(l[:]))
	case 127:
		var l [8]byte
		if _, err := io.ReadFull(br, l[:]); err != nil {
			return 0, nil, err
		}
		n = int(binary.BigEndian.Uint64(l[:]))
	}
	payload = make([]byte, n)
	if _, err := io.ReadFull(br, payload); err != nil {
		return 0, nil, err
	}
	return h[0] & 0x0f, payload, nil
}

// TestFlood floods the server the way an attacker with a few addresses
// would: from one address more connections than it may have, and from
// six addresses connections that allocate and open as many channels as
// they can, fill them with messages of the largest size, send pings of
// the largest size without reading the answers, and send messages over
// the largest size. Meanwhile another client's transfer completes. Every
// cap's error arrives, and the server's memory stays bounded by its caps,
// not by what the attackers send.
func TestFlood(t *testing.T) {
	if testing.Short() {
		t.Skip("floods the server")
	}
	cfg := testConfig()
	cfg.maxConnsPerAddr, cfg.maxConns, cfg.nameplatesPerMin = 6, 500, 5
	cfg.maxMessageBytes = 32 << 10 // the flood's scale: 32 connections sending as fast as they can
	cfg.limits = limits{MaxNameplates: 24, MaxMailboxes: 24, MaxMessagesPerMailbox: 20, MaxMailboxBytes: 256 << 10, MaxStoredBytes: 1 << 20}
	ts := startServerWith(t, cfg, testLogger(t), func(srv *server) { srv.maxOutboxBytes = 1 << 20 })
	baseline := heapInUse()

	var (
		mu       sync.Mutex
		seen     = map[string]int{} // errors and close statuses the attackers got
		sent     int64              // bytes the attackers sent
		maxFrame = strings.Repeat("f", cfg.maxMessageBytes-len(`{"type": "add", "phase": "p", "body": ""}`))
		bigAdd   = []byte(fmt.Sprintf(`{"type": "add", "phase": "p", "body": "%s"}`, maxFrame))
		bigPing  = []byte(fmt.Sprintf(`{"type": "ping", "ping": "%s"}`, maxFrame[:len(maxFrame)-3]))
		smallAdd = []byte(`{"type": "add", "phase": "p", "body": "aa"}`)
	)
	note := func(what string) { mu.Lock(); seen[what]++; mu.Unlock() }
	send := func(c *testClient, b []byte) error {
		mu.Lock()
		sent += int64(len(b))
		mu.Unlock()
		c.raw.SetWriteDeadline(time.Now().Add(testTimeout))
		_, err := c.ws.Write(b)
		return err
	}
	// roundTrip sends messages as fast as it can while it reads what
	// comes back, until the answer to a ping after them, noting the
	// errors.
	roundTrip := func(c *testClient, msgs ...[]byte) (answers []msg, err error) {
		read := make(chan error, 1)
		go func() {
			for {
				m, err := c.tryNext()
				if err != nil {
					read <- err
					return
				}
				if m.typ() == "pong" && m["pong"] == "done" {
					read <- nil
					return
				}
				if m.typ() == "error" {
					note(m.str("error"))
				}
				answers = append(answers, m)
			}
		}()
		for _, m := range append(msgs, []byte(`{"type": "ping", "ping": "done"}`)) {
			if err := send(c, m); err != nil {
				c.raw.Close()
				<-read
				return nil, err
			}
		}
		return answers, <-read
	}
	closeStatus := func(c *testClient) string {
		for {
			fr, err := c.ws.NewFrameReader()
			if err != nil {
				return err.Error()
			}
			payload, _ := io.ReadAll(fr)
			if fr.PayloadType() == websocket.CloseFrame && len(payload) >= 2 {
				return fmt.Sprint("close ", binary.BigEndian.Uint16(payload))
			}
		}
	}

	// The attackers' roles. From 127.0.0.2, allocators: each allocates,
	// claims a new name and opens a new mailbox, three new nameplates for
	// an allowance of five a minute. From 127.0.0.3 to .7, on each
	// address, pingers, which send the largest pings and never read the
	// pongs; fillers, which claim a new name and add the largest messages
	// to its mailbox; and chatters, which do the same with small messages
	// in an app of their own.
	type role int
	const (
		allocator role = iota
		pinger
		filler
		chatter
	)
	measured := make(chan struct{})
	started := make(chan struct{}, 100)
	var ready, done sync.WaitGroup
	attack := func(from string, k int, r role) {
		defer done.Done()
		fail := func(what string, err error) {
			t.Errorf("attacker %s/%d: %s: %v", from, k, what, err)
			ready.Done()
		}
		o := dialOptions{from: from}
		if r == pinger {
			o.small = true
		}
		c, w, err := dialFrom(t, ts.url, o)
		if err != nil {
			fail("dial", err)
			return
		}
		started <- struct{}{}
		if e := welcomeError(w); e != "" {
			note(e)
			note(closeStatus(c))
			ready.Done()
			return
		}
		app := "flood"
		if r == chatter {
			app = "chatter"
		}
		if _, err := roundTrip(c, []byte(fmt.Sprintf(`{"type": "bind", "appid": %q, "side": "%s-%d"}`, app, from, k))); err != nil {
			fail("bind", err)
			return
		}
		if r == pinger {
			sc := ts.findServerSide(c)
			if sc == nil {
				fail("finding its server connection", nil)
				return
			}
			tcpConn(sc.netConn).SetWriteBuffer(4096)   // so that it fills with a few frames
			for i := 0; send(c, bigPing) == nil; i++ { // until disconnected
				if i == 1000 {
					t.Errorf("attacker %s/%d: never disconnected", from, k)
					break
				}
			}
			ready.Done()
			return
		}
		var msgs [][]byte
		if r == allocator {
			msgs = append(msgs, []byte(`{"type": "allocate"}`))
		}
		claim := fmt.Sprintf(`{"type": "claim", "nameplate": "9%d%d"}`, netip.MustParseAddr(from).As4()[3], k)
		answers, err := roundTrip(c, append(msgs, []byte(claim))...)
		if err != nil {
			fail("claim", err)
			return
		}
		open := fmt.Sprintf(`{"type": "open", "mailbox": "m-%s-%d"}`, from, k)
		for _, a := range answers {
			if a.typ() == "claimed" && r != allocator {
				open = fmt.Sprintf(`{"type": "open", "mailbox": %q}`, a.str("mailbox"))
			}
		}
		msgs = [][]byte{[]byte(open)}
		for range 20 { // a mailbox holds 7
			if r == chatter {
				msgs = append(msgs, smallAdd, smallAdd) // and a mailbox holds 20 of these
			} else {
				msgs = append(msgs, bigAdd)
			}
		}
		if _, err := roundTrip(c, msgs...); err != nil {
			fail("adding", err)
			return
		}
		ready.Done()
		<-measured
		over := make([]byte, cfg.maxMessageBytes+1)
		copy(over, bigAdd)
		send(c, over)
		note(closeStatus(c))
	}
	spawn := func(from string, roles ...role) {
		for k, r := range roles {
			ready.Add(1)
			done.Add(1)
			go attack(from, k, r)
		}
	}
	spawn("127.0.0.2", slices.Repeat([]role{allocator}, 10)...) // one address, over its limit of 6
	for i := 3; i <= 7; i++ {                                   // several addresses
		spawn(fmt.Sprintf("127.0.0.%d", i), pinger, filler, chatter, filler, chatter)
	}

	// Meanwhile, a transfer between two other clients.
	for range 20 {
		<-started
	}
	a, _ := ts.dial(t)
	b, _ := ts.dial(t)
	step := func() { // a deadline for each step's writes; reads set their own
		for _, c := range []*testClient{a, b} {
			c.raw.SetWriteDeadline(time.Now().Add(testTimeout))
		}
	}
	step()
	a.bind("legit", "a")
	name := a.expect(`{"type": "allocate"}`, "allocated")[0].str("nameplate")
	mailbox := a.expect(fmt.Sprintf(`{"type": "claim", "nameplate": %q}`, name), "claimed")[0].str("mailbox")
	a.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mailbox))
	step()
	b.bind("legit", "b")
	b.expect(fmt.Sprintf(`{"type": "claim", "nameplate": %q}`, name), "claimed")
	b.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mailbox))
	for _, phase := range []string{"pake", "version", "0"} {
		step()
		a.expect(fmt.Sprintf(`{"type": "add", "phase": %q, "body": "aa"}`, phase), "message")
		if got := b.sync(); len(got) != 1 || got[0].str("side") != "a" {
			t.Fatalf("b got %v, want a's %s", got, phase)
		}
		b.expect(fmt.Sprintf(`{"type": "add", "phase": %q, "body": "bb"}`, phase), "message")
		if got := a.sync(); len(got) != 1 || got[0].str("side") != "b" {
			t.Fatalf("a got %v, want b's %s", got, phase)
		}
	}
	step()
	a.expect(`{"type": "release"}`, "released")
	b.expect(`{"type": "release"}`, "released")
	a.expect(`{"type": "close", "mood": "happy"}`, "closed")
	b.expect(`{"type": "close", "mood": "happy"}`, "closed")

	// The flood at its height: every attacker has done its worst and
	// keeps its channels open.
	ready.Wait()
	growth := heapInUse() - baseline
	ts.reg.mu.Lock()
	if err := checkRegistry(ts.reg, nil, true); err != nil {
		t.Error(err)
	}
	stored := ts.reg.storedBytes
	ts.reg.mu.Unlock()
	ts.connsMu.Lock()
	conns := len(ts.conns)
	ts.connsMu.Unlock()
	// What the server may hold is its stored messages (counted as the
	// frames that deliver them, so at most twice that with Go's overhead),
	// and a little for each connection (buffers and state on both sides,
	// as the clients are in this process too), and a few MiB the runtime
	// keeps; not what the attackers sent.
	bound := 2*cfg.limits.MaxStoredBytes + int64(conns+2)*32<<10 + 2<<20
	t.Logf("attackers sent %d MiB; %d connections, %d KiB stored; heap grew %d KiB (bound %d KiB)",
		sent>>20, conns, stored>>10, growth>>10, bound>>10)
	if growth > bound {
		t.Errorf("heap grew by %d KiB, over the bound of %d KiB", growth>>10, bound>>10)
	}
	if sent < 2*bound {
		t.Errorf("attackers sent only %d KiB: not a flood", sent>>10)
	}
	close(measured)
	done.Wait()
	ts.stopAndCheckOutboxes(t)

	for _, want := range []string{
		"too many connections from your address", fmt.Sprint("close ", closePolicy),
		string(errRateLimited), string(errRateLimitedOpen), string(errTooManyMessages), fmt.Sprint("close ", closeTooBig),
	} {
		if seen[want] == 0 {
			t.Errorf("no attacker got %q; they got %v", want, seen)
		}
	}
	if seen["too many nameplates"]+seen["too many mailboxes"] == 0 {
		t.Errorf("no attacker met the cap on nameplates or mailboxes; they got %v", seen)
	}
	if seen[string(errMailboxFull)]+seen[string(errStoreFull)] == 0 {
		t.Errorf("no attacker met the caps on stored messages; they got %v", seen)
	}
	if ts.metrics.dropped.Get(errSlowClient.Error()) == nil && ts.metrics.dropped.Get(errOutboxesFull.Error()) == nil {
		t.Errorf("no client that stopped reading was disconnected: %v", ts.metrics.dropped.String())
	}
}

// TestHTTPLimits runs the whole program and checks the limits of its
// HTTP server: an opening request with more header bytes than
// maxHeaderBytes is refused before any WebSocket exists, and the server
// goes on serving.
func TestHTTPLimits(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	logs, logw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"--port=tcp:0:interface=127.0.0.1", "--channel-db=:memory:"}, io.Discard, logw)
		logw.Close()
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	lines := bufio.NewScanner(logs)
	var url string
	for url == "" && lines.Scan() {
		if m := regexp.MustCompile(`msg="websocket listening" url=(\S+)`).FindStringSubmatch(lines.Text()); m != nil {
			url = m[1]
		}
	}
	go io.Copy(io.Discard, logs) // the rest of the log
	if url == "" {
		t.Fatal("the server never said where it listens")
	}

	req, _ := http.NewRequest("GET", strings.Replace(url, "ws:", "http:", 1), nil)
	req.Header.Set("X-Padding", strings.Repeat("p", 2*maxHeaderBytes+4096)) // net/http allows 4 KiB over the limit
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("a request with %d header bytes: status %d, want 431", 2*maxHeaderBytes+4096, resp.StatusCode)
	}
	c := dialRaw(t, url, nil)
	if m := c.next(); m.typ() != "welcome" {
		t.Fatalf("after the refusal, a client got %v, want a welcome", m)
	}
	c.raw.Close()
}
