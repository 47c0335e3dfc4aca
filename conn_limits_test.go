// conn_limits_test.go tests the connection layer against cheap resource
// attacks: frame headers announcing large messages that never come,
// fragments held open with pings, floods of TCP connections, a server
// full of a few addresses' connections, command floods, subscribers that
// never read, and log floods. Each runs against the real handler on a
// real listener, from several 127.0.0.x addresses, and checks its bound.
package main

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
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
