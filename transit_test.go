// transit_test.go checks the transit relay (transit.go) over real
// loopback listeners: every handshake outcome, over TCP and WebSocket and
// between the two, large transfers byte for byte, the limits, usage
// records, shutdown, and abuse (floods of waiting connections from
// several addresses, a receiver that never reads, a sender that never
// stops) that must leave other pairs relaying and memory bounded.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// testTransit is a relay on loopback listeners.
type testTransit struct {
	*transitRelay
	tcpAddr   string // 127.0.0.1:PORT
	wsURL     string // ws://127.0.0.1:PORT/
	usagePath string // the usage log's path

	mu      sync.Mutex
	counts  map[string]int // events so far, by kind (see transitRelay.notify)
	seen    map[string]int // events the test has waited for
	changed chan struct{}  // closed and replaced at every event
}

// startTransit starts a relay with cfg's limits (its listeners are always
// on 127.0.0.1), stopped when the test ends.
func startTransit(t *testing.T, cfg transitConfig) *testTransit {
	t.Helper()
	cfg.port, cfg.websocket = "tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"
	path := filepath.Join(t.TempDir(), "usage.jsonl")
	log := testLogger(t)
	m := newMetrics()
	usage, err := openUsageLog(path, -1, 0, log, m)
	if err != nil {
		t.Fatal(err)
	}
	r := newTransitRelay(cfg, log, m, usage, false, &logSampler{}, (&server{}).clientAddr)
	tt := &testTransit{transitRelay: r, usagePath: path,
		counts: map[string]int{}, seen: map[string]int{}, changed: make(chan struct{})}
	r.notify = func(e string) {
		tt.mu.Lock()
		tt.counts[e]++
		close(tt.changed)
		tt.changed = make(chan struct{})
		tt.mu.Unlock()
	}
	if err := r.start(listen); err != nil {
		t.Fatal(err)
	}
	tt.tcpAddr = r.listeners[0].Addr().String()
	tt.wsURL = "ws://" + r.listeners[1].Addr().String() + "/"
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
		defer cancel()
		r.shutdown(ctx)
		usage.close()
	})
	return tt
}

// testTransitConfig is the default configuration with a shutdown that
// does not wait.
func testTransitConfig() transitConfig {
	c := defaultTransitConfig()
	c.shutdownGrace = 0
	return c
}

// waitEvents waits for n more events of the kind given than it has
// waited for before.
func (tt *testTransit) waitEvents(t *testing.T, kind string, n int) {
	t.Helper()
	timeout := time.After(testTimeout)
	tt.mu.Lock()
	defer tt.mu.Unlock()
	target := tt.seen[kind] + n
	tt.seen[kind] = target
	for tt.counts[kind] < target {
		changed := tt.changed
		tt.mu.Unlock()
		select {
		case <-changed:
		case <-timeout:
			tt.mu.Lock()
			t.Fatalf("%d %q events, want %d", tt.counts[kind], kind, target)
		}
		tt.mu.Lock()
	}
}

// records reads the usage log once everything queued is written.
func (tt *testTransit) records(t *testing.T) []transitUsage {
	t.Helper()
	if err := tt.usage.flush(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(tt.usagePath)
	if err != nil {
		t.Fatal(err)
	}
	var recs []transitUsage
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if line == "" {
			continue
		}
		var rec transitUsage
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatal(err)
		}
		recs = append(recs, rec)
	}
	return recs
}

// moods counts the usage records by mood.
func moods(recs []transitUsage) map[string]int {
	m := map[string]int{}
	for _, r := range recs {
		m[r.Mood]++
	}
	return m
}

// transitClient is one end, TCP or WebSocket, as a client sees it.
type transitClient struct {
	t    *testing.T
	conn net.Conn        // the TCP connection
	ws   *websocket.Conn // set for a WebSocket client
}

// dialTransit connects to the TCP relay from the given loopback address
// ("" for any).
func (tt *testTransit) dial(t *testing.T, from string) *transitClient {
	t.Helper()
	d := net.Dialer{Timeout: testTimeout}
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	c, err := d.Dial("tcp", tt.tcpAddr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(testTimeout))
	return &transitClient{t: t, conn: c}
}

// dialWS connects to the WebSocket relay at url.
func dialTransitWS(t *testing.T, url string) *transitClient {
	t.Helper()
	cfg, err := websocket.NewConfig(url, "http://127.0.0.1/")
	if err != nil {
		t.Fatal(err)
	}
	ws, err := websocket.DialConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.Close() })
	ws.PayloadType = websocket.BinaryFrame
	ws.SetDeadline(time.Now().Add(testTimeout))
	return &transitClient{t: t, ws: ws}
}

func (c *transitClient) send(b []byte) {
	c.t.Helper()
	var err error
	if c.ws != nil {
		_, err = c.ws.Write(b)
	} else {
		_, err = c.conn.Write(b)
	}
	if err != nil {
		c.t.Fatalf("send: %v", err)
	}
}

func (c *transitClient) sendString(s string) { c.send([]byte(s)) }

// Read reads bytes: the payloads of binary messages, for WebSocket.
func (c *transitClient) Read(p []byte) (int, error) {
	if c.ws != nil {
		return c.ws.Read(p)
	}
	return c.conn.Read(p)
}

// expect reads exactly want.
func (c *transitClient) expect(want string) {
	c.t.Helper()
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != want {
		c.t.Fatalf("read %q (%v), want %q", got, err, want)
	}
}

// expectEnd reads what is left until the relay closes, checks it, and
// closes the connection, as a client does.
func (c *transitClient) expectEnd(want string) {
	c.t.Helper()
	got, err := io.ReadAll(c)
	if c.ws != nil {
		c.ws.Close()
	} else {
		c.conn.Close()
	}
	if err != nil && !errors.Is(err, io.EOF) && !isNetClose(err) && !strings.Contains(err.Error(), "connection reset") {
		c.t.Fatalf("reading to the end: %v (after %q)", err, got)
	}
	if string(got) != want {
		c.t.Fatalf("got %d bytes (%q) before the close, want %q", len(got), got[:min(len(got), 40)], want)
	}
}

// closeWrite ends what the client sends (for WebSocket: a close frame).
func (c *transitClient) closeWrite() {
	if c.ws != nil {
		c.ws.WriteClose(closeNormal)
		return
	}
	c.conn.(*net.TCPConn).CloseWrite()
}

func testToken() string { return fmt.Sprintf("%x", sha256.Sum256([]byte(rand.Text()))) }

func oldHandshake(token string) string { return "please relay " + token + "\n" }

func newHandshake(token, side string) string {
	return "please relay " + token + " for side " + side + "\n"
}

const (
	side1 = "0000000000000001"
	side2 = "0000000000000002"
)

// TestTransitHandshakeVerdicts checks the handshake decisions that need
// no network: when the relay decides, and what. They match the Debian
// reference's, observed side by side with the same bytes.
func TestTransitHandshakeVerdicts(t *testing.T) {
	tok := testToken()
	for _, tc := range []struct {
		name  string
		in    string
		want  handshakeVerdict
		extra bool
	}{
		{"old", oldHandshake(tok), handshakeMatched, false},
		{"new", newHandshake(tok, side1), handshakeMatched, false},
		{"old partial", oldHandshake(tok)[:40], handshakeWaiting, false},
		{"old without newline", oldHandshake(tok)[:77], handshakeWaiting, false},
		{"new without newline", newHandshake(tok, side1)[:103], handshakeWaiting, false},
		{"short line", "hello\n", handshakeRefused, false},
		{"binary", "\x00\x01\xe0\x0f\n\xff", handshakeRefused, false},
		{"103 bytes no newline", strings.Repeat("x", 103), handshakeWaiting, false},
		{"104 bytes no newline", strings.Repeat("x", 104), handshakeRefused, false},
		{"token of 63, 77 bytes", "please relay " + tok[:63] + "\n", handshakeWaiting, false}, // a line one short waits, as 0.2.1
		{"side of 15, 103 bytes", "please relay " + tok + " for side " + side1[:15] + "\n", handshakeWaiting, false},
		{"crlf", strings.TrimSuffix(oldHandshake(tok), "\n") + "\r\n", handshakeRefused, false},
		{"uppercase", oldHandshake(strings.ToUpper(tok)), handshakeMatched, false},
		{"word characters", oldHandshake(strings.Repeat("_z", 32)), handshakeMatched, false},
		{"impatient old", oldHandshake(tok) + "NOW", handshakeMatched, true},
		{"impatient new", newHandshake(tok, side1) + "NOW", handshakeMatched, true},
		{"on a later line", "x\n" + oldHandshake(tok), handshakeMatched, true},
		{"garbage line first", "x\n", handshakeRefused, false},
	} {
		v, token, _, extra := parseTransitHandshake([]byte(tc.in))
		if v != tc.want || extra != tc.extra {
			t.Errorf("%s: verdict %d extra %v, want %d %v", tc.name, v, extra, tc.want, tc.extra)
		}
		if v == handshakeMatched && len(token) != transitTokenLen {
			t.Errorf("%s: token %q", tc.name, token)
		}
	}
}

// TestTransitRefusals checks the replies to handshakes that fail, and
// the usage records they leave.
func TestTransitRefusals(t *testing.T) {
	tt := startTransit(t, testTransitConfig())
	tok := testToken()
	for _, tc := range []struct {
		name, send, reply string
	}{
		{"bad line", "hello\n", transitBad},
		{"104 bytes", strings.Repeat("x", 104), transitBad},
		{"binary", "\x00\x01\xe0\x0f\n\xff", transitBad},
		{"impatient in the same write", newHandshake(tok, side1) + "NOW", transitImpatient},
		{"impatient old form", oldHandshake(testToken()) + "NOW", transitImpatient},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := tt.dial(t, "")
			c.sendString(tc.send)
			c.expectEnd(tc.reply)
		})
	}
	t.Run("103 bytes, then one more", func(t *testing.T) {
		c := tt.dial(t, "")
		c.sendString(strings.Repeat("x", 103))
		c.sendString("y")
		c.expectEnd(transitBad)
	})
	t.Run("impatient after waiting", func(t *testing.T) {
		c := tt.dial(t, "")
		c.sendString(newHandshake(testToken(), side1))
		tt.waitEvents(t, "waiting", 1)
		c.sendString("NOW")
		c.expectEnd(transitImpatient)
	})
	t.Run("closed before a whole handshake", func(t *testing.T) {
		c := tt.dial(t, "")
		c.sendString("please")
		c.closeWrite()
		c.expectEnd("")
	})
	t.Run("lonely", func(t *testing.T) {
		c := tt.dial(t, "")
		c.sendString(newHandshake(testToken(), side1))
		tt.waitEvents(t, "waiting", 1)
		c.closeWrite()
		c.expectEnd("")
	})
	tt.waitEvents(t, "ended", 8)
	got := moods(tt.records(t))
	if want := map[string]int{moodErrory: 7, moodLonely: 1}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("usage moods %v, want %v (no record for a connection closed before its handshake)", got, want)
	}
}

// TestTransitPairing checks the pairing rules: both handshake forms with
// each other, data both ways, no pairing of a side with itself, redundant
// connections, and a token used again after its pair formed.
func TestTransitPairing(t *testing.T) {
	tt := startTransit(t, testTransitConfig())
	for _, tc := range []struct{ name, a, b string }{
		{"old and old", "", ""},
		{"new and new", side1, side2},
		{"new and old", side1, ""},
		{"old and new", "", side2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tok := testToken()
			hs := func(side string) string {
				if side == "" {
					return oldHandshake(tok)
				}
				return newHandshake(tok, side)
			}
			a := tt.dial(t, "")
			a.sendString(hs(tc.a))
			tt.waitEvents(t, "waiting", 1)
			b := tt.dial(t, "")
			b.sendString(hs(tc.b))
			a.expect(transitOK)
			b.expect(transitOK)
			a.sendString("hello")
			b.expect("hello")
			b.sendString("world")
			a.expect("world")
			b.sendString("last words")
			b.closeWrite()
			a.expectEnd("last words") // everything b sent, then the close
			a.closeWrite()
			b.expectEnd("")
		})
	}

	t.Run("same side, then redundant", func(t *testing.T) {
		tok := testToken()
		a1, a2 := tt.dial(t, ""), tt.dial(t, "")
		a1.sendString(newHandshake(tok, side1))
		tt.waitEvents(t, "waiting", 1)
		a2.sendString(newHandshake(tok, side1))
		tt.waitEvents(t, "waiting", 1) // a side does not pair with itself
		b := tt.dial(t, "")
		b.sendString(newHandshake(tok, side2))
		b.expect(transitOK)
		// The one that waited longest is paired; the other gets nothing
		// and a close (the reference picks either).
		a1.expect(transitOK)
		a2.expectEnd("")
		a1.sendString("x")
		b.expect("x")
	})

	t.Run("token used again", func(t *testing.T) {
		tok := testToken()
		var clients []*transitClient
		for range 2 {
			a := tt.dial(t, "")
			a.sendString(newHandshake(tok, side1))
			tt.waitEvents(t, "waiting", 1)
			b := tt.dial(t, "")
			b.sendString(newHandshake(tok, side2))
			a.expect(transitOK)
			b.expect(transitOK)
			clients = append(clients, a, b)
		}
		clients[0].sendString("first")
		clients[1].expect("first")
		clients[2].sendString("second")
		clients[3].expect("second")
	})
}

// TestTransitWebSocket checks the WebSocket relay: with itself, with TCP
// clients both ways, the handshake without its newline, and refusals.
func TestTransitWebSocket(t *testing.T) {
	tt := startTransit(t, testTransitConfig())
	for _, tc := range []struct {
		name   string
		aWS    bool
		bWS    bool
		noLine bool
	}{
		{"ws and ws", true, true, false},
		{"ws and tcp", true, false, false},
		{"tcp and ws", false, true, false},
		{"ws without newline", true, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tok := testToken()
			dial := func(ws bool) *transitClient {
				if ws {
					return dialTransitWS(t, tt.wsURL)
				}
				return tt.dial(t, "")
			}
			hs := func(c *transitClient, side string) {
				h := newHandshake(tok, side)
				if tc.noLine && c.ws != nil {
					h = strings.TrimSuffix(h, "\n")
				}
				c.sendString(h)
			}
			a := dial(tc.aWS)
			hs(a, side1)
			tt.waitEvents(t, "waiting", 1)
			b := dial(tc.bWS)
			hs(b, side2)
			a.expect(transitOK)
			b.expect(transitOK)
			a.sendString("from a")
			b.expect("from a")
			b.sendString("from b")
			a.expect("from b")
			a.sendString("bye")
			a.closeWrite()
			b.expectEnd("bye")
		})
	}
	t.Run("bad handshake", func(t *testing.T) {
		c := dialTransitWS(t, tt.wsURL)
		c.sendString("please relay nothing\n")
		c.expectEnd(transitBad)
	})
	t.Run("impatient", func(t *testing.T) {
		c := dialTransitWS(t, tt.wsURL)
		c.sendString(newHandshake(testToken(), side1))
		tt.waitEvents(t, "waiting", 1)
		c.sendString("early")
		c.expectEnd(transitImpatient)
	})
	t.Run("text frame", func(t *testing.T) {
		c := dialTransitWS(t, tt.wsURL)
		c.ws.PayloadType = websocket.TextFrame
		c.sendString(newHandshake(testToken(), side1))
		c.expectEnd("")
	})
	t.Run("mailbox listener", func(t *testing.T) {
		// With --transit-on-mailbox-port the relay answers on the
		// mailbox's listener at /transit and for upgrades at /.
		cfg := testConfig()
		cfg.transit = testTransitConfig()
		cfg.transit.onMailbox = true
		ts := startServer(t, cfg)
		t.Cleanup(func() { ts.transit.shutdown(context.Background()) })
		base := strings.TrimSuffix(ts.url, "/v1")
		tok := testToken()
		a := dialTransitWS(t, base+"/transit")
		a.sendString(newHandshake(tok, side1))
		b := dialTransitWS(t, base+"/")
		b.sendString(newHandshake(tok, side2))
		a.expect(transitOK)
		b.expect(transitOK)
		a.sendString("through the mailbox port")
		b.expect("through the mailbox port")
		resp, err := ts.http.Client().Get(ts.http.URL + "/")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(body) != "Wormhole Relay\n" {
			t.Errorf("GET / without an upgrade answered %q, want the banner", body)
		}
	})
}

// TestTransitLargeTransfers sends megabytes each way at once, checked
// byte for byte, between TCP clients (spliced) and with a WebSocket end.
func TestTransitLargeTransfers(t *testing.T) {
	tt := startTransit(t, testTransitConfig())
	for _, tc := range []struct {
		name     string
		aWS, bWS bool
		size     int
	}{
		{"tcp", false, false, 32 << 20},
		{"ws and tcp", true, false, 8 << 20},
		{"ws and ws", true, true, 4 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tok := testToken()
			dial := func(ws bool) *transitClient {
				if ws {
					return dialTransitWS(t, tt.wsURL)
				}
				return tt.dial(t, "")
			}
			a := dial(tc.aWS)
			a.sendString(newHandshake(tok, side1))
			tt.waitEvents(t, "waiting", 1)
			b := dial(tc.bWS)
			b.sendString(newHandshake(tok, side2))
			a.expect(transitOK)
			b.expect(transitOK)
			da, db := make([]byte, tc.size), make([]byte, tc.size)
			rand.Read(da)
			rand.Read(db)
			var wg sync.WaitGroup
			got := make([][]byte, 2)
			for i, c := range []*transitClient{a, b} {
				data := [][]byte{da, db}[i]
				wg.Add(2)
				go func() {
					defer wg.Done()
					for off := 0; off < len(data); off += 1 << 20 { // in messages of 1 MiB for WebSocket
						if _, err := writeTo(c, data[off:min(off+1<<20, len(data))]); err != nil {
							t.Errorf("write: %v", err)
							return
						}
					}
				}()
				go func() {
					defer wg.Done()
					buf := make([]byte, tc.size)
					if _, err := io.ReadFull(c, buf); err != nil {
						t.Errorf("read: %v", err)
					}
					got[1-i] = buf
				}()
			}
			wg.Wait()
			if !bytes.Equal(got[0], da) || !bytes.Equal(got[1], db) {
				t.Fatal("the bytes delivered differ from those sent")
			}
		})
	}
	if got := tt.m.bytes.Value(); got < int64(2*(32+8+4))<<20 {
		t.Errorf("bytes relayed counter %d", got)
	}
}

// writeTo writes p as one message (WebSocket) or to the socket (TCP).
func writeTo(c *transitClient, p []byte) (int, error) {
	if c.ws != nil {
		return c.ws.Write(p)
	}
	return c.conn.Write(p)
}

// TestTransitLimits checks each limit the reference lacks.
func TestTransitLimits(t *testing.T) {
	pair := func(t *testing.T, tt *testTransit) (a, b *transitClient) {
		tok := testToken()
		a = tt.dial(t, "")
		a.sendString(newHandshake(tok, side1))
		tt.waitEvents(t, "waiting", 1)
		b = tt.dial(t, "")
		b.sendString(newHandshake(tok, side2))
		a.expect(transitOK)
		b.expect(transitOK)
		return a, b
	}
	t.Run("max wait", func(t *testing.T) {
		cfg := testTransitConfig()
		cfg.maxWait = 100 * time.Millisecond
		tt := startTransit(t, cfg)
		c := tt.dial(t, "")
		c.sendString(newHandshake(testToken(), side1))
		c.expectEnd("")
		tt.waitEvents(t, "ended", 1)
		if got := moods(tt.records(t)); got[moodLonely] != 1 {
			t.Errorf("moods %v, want one lonely", got)
		}
	})
	t.Run("max idle", func(t *testing.T) {
		cfg := testTransitConfig()
		cfg.maxIdle = 200 * time.Millisecond
		tt := startTransit(t, cfg)
		a, b := pair(t, tt)
		a.expectEnd("")
		b.expectEnd("")
		tt.waitEvents(t, "ended", 2)
		if got := tt.m.cuts.Get(errTransitIdle.Error()); got == nil || got.String() != "1" {
			t.Errorf("idle cuts %v, want 1", got)
		}
	})
	t.Run("session bytes", func(t *testing.T) {
		cfg := testTransitConfig()
		cfg.sessionBytes = 1 << 20
		tt := startTransit(t, cfg)
		a, b := pair(t, tt)
		go writeTo(a, make([]byte, 3<<20))
		got, _ := io.ReadAll(b)
		if len(got) != 1<<20 {
			t.Errorf("relayed %d bytes under a limit of %d", len(got), 1<<20)
		}
	})
	t.Run("session time", func(t *testing.T) {
		cfg := testTransitConfig()
		cfg.sessionTime = 100 * time.Millisecond
		tt := startTransit(t, cfg)
		a, b := pair(t, tt)
		a.sendString("x")
		b.expect("x")
		b.expectEnd("")
		a.expectEnd("")
	})
	t.Run("connections per address", func(t *testing.T) {
		cfg := testTransitConfig()
		cfg.connsPerAddr = 2
		tt := startTransit(t, cfg)
		for range 2 {
			tt.dial(t, "127.0.0.2").sendString(newHandshake(testToken(), side1))
		}
		tt.waitEvents(t, "waiting", 2)
		tt.dial(t, "127.0.0.2").expectEnd("") // refused: closed at once
		a := tt.dial(t, "127.0.0.3")          // another address is not
		a.sendString(newHandshake(testToken(), side1))
		tt.waitEvents(t, "waiting", 1)
	})
	t.Run("fair share", func(t *testing.T) {
		cfg := testTransitConfig()
		cfg.conns, cfg.connsPerAddr, cfg.waitingPerAddr = 4, 0, 0
		tt := startTransit(t, cfg)
		var hog []*transitClient
		for range 4 {
			c := tt.dial(t, "127.0.0.2")
			c.sendString(newHandshake(testToken(), side1))
			hog = append(hog, c)
		}
		tt.waitEvents(t, "waiting", 4)
		// The relay is full; a newcomer from another address takes the
		// place of the hog's oldest connection.
		tok := testToken()
		a := tt.dial(t, "127.0.0.3")
		a.sendString(newHandshake(tok, side1))
		hog[0].expectEnd("")
		tt.waitEvents(t, "waiting", 1)
		// With 127.0.0.3 at 1 and 127.0.0.2 at 3 of 4, both at or past
		// their share, a third from the hog is refused.
		tt.dial(t, "127.0.0.2").expectEnd("")
		b := tt.dial(t, "127.0.0.4")
		b.sendString(newHandshake(tok, side2))
		a.expect(transitOK)
		b.expect(transitOK)
	})
	t.Run("rate", func(t *testing.T) {
		cfg := testTransitConfig()
		cfg.ratePerAddr = 4 << 20 // bytes a second
		tt := startTransit(t, cfg)
		a, b := pair(t, tt)
		start := time.Now()
		go writeTo(a, make([]byte, 2<<20))
		buf := make([]byte, 2<<20)
		if _, err := io.ReadFull(b, buf); err != nil {
			t.Fatal(err)
		}
		// 2 MiB at 4 MiB/s, less the burst of a tenth of a second.
		if d := time.Since(start); d < 350*time.Millisecond {
			t.Errorf("2 MiB took %v under a limit of 4 MiB/s", d)
		}
	})
}

// TestTransitAbuse floods the relay with waiting connections from several
// addresses, pairs a receiver that never reads with a sender that never
// stops, and checks that another pair still relays and the relay's
// memory stays bounded.
func TestTransitAbuse(t *testing.T) {
	cfg := testTransitConfig()
	cfg.waitingPerAddr, cfg.waiting, cfg.connsPerAddr, cfg.conns = 20, 60, 40, 100
	cfg.maxIdle = 2 * time.Second
	tt := startTransit(t, cfg)
	data, got := make([]byte, 8<<20), make([]byte, 8<<20)
	rand.Read(data)
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)

	// Four addresses each open 30 waiting connections: each is held to
	// 20, and the total to 60.
	opened := 0
	for i := 2; i <= 5; i++ {
		for range 30 {
			c := tt.dial(t, fmt.Sprintf("127.0.0.%d", i))
			c.conn.Write([]byte(newHandshake(testToken(), side1)))
			opened++
		}
	}
	// A sender that never stops, to a receiver that never reads.
	tok := testToken()
	stuckA := tt.dial(t, "127.0.0.6")
	stuckA.sendString(newHandshake(tok, side1))
	stuckB := tt.dial(t, "127.0.0.7")
	stuckB.sendString(newHandshake(tok, side2))
	stuckA.expect(transitOK)
	stuckB.expect(transitOK)
	stop := make(chan struct{})
	senderDone := make(chan int64)
	go func() {
		chunk := make([]byte, 64<<10)
		var sent int64
		defer func() { senderDone <- sent }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			stuckA.conn.SetWriteDeadline(time.Now().Add(testTimeout))
			n, err := stuckA.conn.Write(chunk)
			sent += int64(n)
			if err != nil {
				return
			}
		}
	}()

	// A pair from another address still relays, 8 MiB byte for byte.
	tok = testToken()
	a := tt.dial(t, "127.0.0.8")
	a.sendString(newHandshake(tok, side1))
	b := tt.dial(t, "127.0.0.9")
	b.sendString(newHandshake(tok, side2))
	a.expect(transitOK)
	b.expect(transitOK)
	go writeTo(a, data)
	if _, err := io.ReadFull(b, got); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("a pair beside the flood: %v, intact %v", err, bytes.Equal(got, data))
	}

	tt.transitRelay.mu.Lock()
	unpaired, conns := tt.unpaired, tt.conns
	tt.transitRelay.mu.Unlock()
	if unpaired > cfg.waiting || conns > cfg.conns {
		t.Errorf("%d unpaired and %d connections, over the limits of %d and %d", unpaired, conns, cfg.waiting, cfg.conns)
	}
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	if grown := int64(after.HeapInuse) - int64(before.HeapInuse); grown > 16<<20 {
		t.Errorf("the heap grew by %d MiB with %d connections opened", grown>>20, opened)
	}

	// The receiver never reads: the sender is held back (the kernel's
	// buffers fill, nothing grows here), and the idle limit ends the pair,
	// which the sender sees as a failed write.
	sent := <-senderDone
	close(stop)
	if sent > 64<<20 {
		t.Errorf("the sender could send %d MiB to a receiver that never reads", sent>>20)
	}
}

// TestTransitUsageRecords checks a happy pair's record: one per pair,
// both directions' bytes, the waiting time, and blurring.
func TestTransitUsageRecords(t *testing.T) {
	tt := startTransit(t, testTransitConfig())
	tok := testToken()
	a := tt.dial(t, "")
	a.sendString(newHandshake(tok, side1))
	tt.waitEvents(t, "waiting", 1)
	b := tt.dial(t, "")
	b.sendString(newHandshake(tok, side2))
	a.expect(transitOK)
	b.expect(transitOK)
	a.sendString("12345")
	b.expect("12345")
	b.sendString("678")
	a.expect("678")
	a.closeWrite()
	b.expectEnd("")
	tt.waitEvents(t, "ended", 2)
	recs := tt.records(t)
	if len(recs) != 1 {
		t.Fatalf("records %+v, want one", recs)
	}
	r := recs[0]
	if r.Type != usageTransit || r.Mood != moodHappy || r.TotalBytes != 8 || r.WaitingTime == nil || *r.WaitingTime < 0 || r.TotalTime < *r.WaitingTime {
		t.Errorf("record %+v", r)
	}
	for _, c := range []struct{ in, want int64 }{
		{0, 0}, {1, 10e3}, {10e3, 10e3}, {10e3 + 1, 20e3}, {1e6, 1e6}, {1e6 + 1, 2e6},
		{900e6, 900e6}, {1000e6, 1000e6}, {1050e6, 1100e6}, {1150e6, 1200e6},
	} {
		if got := blurSize(c.in); got != c.want {
			t.Errorf("blurSize(%d) = %d, want %d", c.in, got, c.want)
		}
	}
}

// TestTransitShutdown checks that a shutdown closes waiting connections
// at once and lets a pair finish within the grace period, then cuts it.
func TestTransitShutdown(t *testing.T) {
	cfg := testTransitConfig()
	cfg.shutdownGrace = 300 * time.Millisecond
	tt := startTransit(t, cfg)
	w := tt.dial(t, "")
	w.sendString(newHandshake(testToken(), side1))
	tt.waitEvents(t, "waiting", 1)
	tok := testToken()
	a := tt.dial(t, "")
	a.sendString(newHandshake(tok, side1))
	tt.waitEvents(t, "waiting", 1)
	b := tt.dial(t, "")
	b.sendString(newHandshake(tok, side2))
	a.expect(transitOK)
	b.expect(transitOK)
	done := make(chan struct{})
	go func() { tt.shutdown(context.Background()); close(done) }()
	w.expectEnd("") // at once
	a.sendString("still relaying")
	b.expect("still relaying") // within the grace period
	b.expectEnd("")            // then cut
	<-done
	if _, err := net.Dial("tcp", tt.tcpAddr); err == nil {
		t.Error("the relay still accepts connections after shutdown")
	}
}

// TestTransitFlags checks the transit flags through run: the listeners
// are logged with their addresses, and the relay serves; a session's end,
// and a connection's that never paired, are logged with the clients'
// addresses.
func TestTransitFlags(t *testing.T) {
	rs := startRun(t, "--transit-port=tcp:0:interface=127.0.0.1", "--transit-websocket=tcp:0:interface=127.0.0.1",
		"--transit-on-mailbox-port")
	line := rs.log.waitFor(t, "transit relay listening")
	addr := line[strings.Index(line, "endpoint=tcp:")+len("endpoint=tcp:"):]
	addr = strings.Fields(addr)[0]
	rs.log.waitFor(t, "transit websocket listening", "/transit")
	tok := testToken()
	conns := make([]net.Conn, 2)
	for i, side := range []string{side1, side2} {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(testTimeout))
		io.WriteString(c, newHandshake(tok, side))
		conns[i] = c
	}
	readers := make([]*bufio.Reader, 2)
	for i, c := range conns {
		readers[i] = bufio.NewReader(c)
		line, err := readers[i].ReadString('\n')
		if line != transitOK {
			t.Fatalf("got %q, %v", line, err)
		}
	}
	io.WriteString(conns[0], "x")
	if b, err := readers[1].ReadByte(); b != 'x' {
		t.Fatalf("relayed %q, %v", b, err)
	}
	for _, c := range conns {
		c.Close()
	}
	rs.log.waitFor(t, "transit session ended", `clients="127.0.0.1:`, "mood=happy", "bytes=1 ")
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "please relay\n")
	rs.log.waitFor(t, "transit connection ended unpaired", "client=127.0.0.1:", "mood=errory")
	for _, args := range [][]string{{"--transit-max-wait=0"}, {"--transit-rate=-1"}} {
		if _, err := parseFlags(args, io.Discard, io.Discard); err == nil {
			t.Errorf("%v accepted", args)
		}
	}
}

// TestTransitStats checks the stats command's summary of transit records
// beside the mailbox's.
func TestTransitStats(t *testing.T) {
	log := strings.Join([]string{
		`{"type":"transit","started":1700000000,"total_time":12.5,"waiting_time":0.5,"total_bytes":5000000,"mood":"happy"}`,
		`{"type":"transit","started":1700000100,"total_time":30,"waiting_time":1.5,"total_bytes":1000000000,"mood":"happy"}`,
		`{"type":"transit","started":1700000200,"total_time":180,"waiting_time":null,"total_bytes":0,"mood":"lonely"}`,
		`{"type":"transit","started":1700000300,"total_time":0.1,"waiting_time":null,"total_bytes":0,"mood":"errory"}`,
		`{"type":"transit","started":1700000300,"total_time":0.1,"waiting_time":null,"total_bytes":0}`, // no mood: malformed
		`{"type":"mailbox","app_id":"a","for_nameplate":true,"started":1700000000,"total_time":40,"waiting_time":2,"result":"happy"}`,
	}, "\n") + "\n"
	sum, err := summarise(strings.NewReader(log), nil)
	if err != nil {
		t.Fatal(err)
	}
	ts := sum.Transit
	if ts.Sessions.Total != 4 || ts.Sessions.Results[moodHappy] != 2 || ts.Bytes != 1_005_000_000 ||
		ts.WaitingTime.Count != 2 || ts.TotalTime.Count != 4 || sum.Malformed != 1 || sum.Transfers.Total != 1 {
		t.Errorf("summary %+v, malformed %d, transfers %d", ts, sum.Malformed, sum.Transfers.Total)
	}
	var out bytes.Buffer
	if err := sum.writeText(&out); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Transit relay: 4 sessions", "bytes relayed", "1.0 GB", "redundant"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("the summary lacks %q:\n%s", want, out.String())
		}
	}
}
