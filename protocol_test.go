// protocol_test.go tests the mailbox protocol over real WebSocket
// connections: every message, every error, the orders of checks, the
// reconnection sequences clients rely on, and the deliberate differences
// from the reference server.
package main

import (
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"testing"
)

func TestWelcome(t *testing.T) {
	cfg := testConfig()
	cfg.welcome = welcomeInfo{motd: "hello\nworld", currentCLIVersion: "9.9", signalError: "go away"}
	ts := startServer(t, cfg)
	_, w := ts.dial(t)
	got := w["welcome"].(map[string]any)
	if got["motd"] != "hello\nworld" || got["current_cli_version"] != "9.9" || got["error"] != "go away" {
		t.Errorf("welcome %v", got)
	}
	addr := got["your-address"].(map[string]any)
	if addr["ipv4"] != "127.0.0.1" || addr["port"].(float64) == 0 {
		t.Errorf("your-address %v", addr)
	}
	if _, ok := w["server_tx"].(float64); !ok {
		t.Errorf("welcome has no float server_tx: %v", w)
	}
}

// TestAck checks that every message with a type is acknowledged first,
// echoing its id (of any JSON type, null when absent), and that one
// without a type gets only an error.
func TestAck(t *testing.T) {
	ts := startServer(t, testConfig())
	c, _ := ts.dial(t)
	for _, tc := range []struct {
		send string
		id   any
	}{
		{`{"type": "ping", "ping": 0, "id": "abcd"}`, "abcd"},
		{`{"type": "ping", "ping": 0, "id": 17}`, 17.0},
		{`{"type": "ping", "ping": 0, "id": [1, "x"]}`, []any{1.0, "x"}},
		{`{"type": "ping", "ping": 0}`, nil},
		{`{"type": "nonsense", "id": "e1"}`, "e1"},
		{`{"type": 7, "id": "e2"}`, "e2"},
	} {
		got := c.do(tc.send)
		if len(got) == 0 || got[0].typ() != "ack" || fmt.Sprint(got[0]["id"]) != fmt.Sprint(tc.id) {
			t.Errorf("%s: got %v, want ack with id %v first", tc.send, got, tc.id)
		}
	}
	got := c.do(`{"id": "x"}`)
	if len(got) != 1 || got[0].typ() != "error" || got[0].str("error") != "missing 'type'" {
		t.Errorf("message without type: got %v, want only an error", got)
	}
	if orig := got[0]["orig"].(map[string]any); orig["id"] != "x" {
		t.Errorf("orig %v", orig)
	}
}

func TestPing(t *testing.T) {
	ts := startServer(t, testConfig())
	c, _ := ts.dial(t)
	if got := c.expect(`{"type": "ping", "ping": {"a": [1, 2]}}`, "pong"); fmt.Sprint(got[0]["pong"]) != "map[a:[1 2]]" {
		t.Errorf("pong %v", got[0])
	}
	c.expectError(`{"type": "ping"}`, "ping requires 'ping'")
}

func TestBind(t *testing.T) {
	ts := startServer(t, testConfig())
	c, _ := ts.dial(t)
	c.expectError(`{"type": "list"}`, "must bind first")
	c.expectError(`{"type": "nonsense"}`, "must bind first")
	c.expectError(`{"type": "bind"}`, "bind requires 'appid'")
	c.expectError(`{"type": "bind", "side": "s"}`, "bind requires 'appid'")
	c.expectError(`{"type": "bind", "appid": "a"}`, "bind requires 'side'")
	c.expectError(`{"type": "bind", "appid": 5, "side": "s"}`, "'appid' must be a string")
	c.expectError(`{"type": "bind", "appid": null, "side": "s"}`, "'appid' must be a string")
	c.expectError(`{"type": "bind", "appid": "a", "side": ["s"]}`, "'side' must be a string")
	c.expectError(`{"type": "bind", "appid": "a", "side": "s", "client_version": null}`, string(errBadClientVersion))
	c.expectError(`{"type": "bind", "appid": "a", "side": "s", "client_version": ["python"]}`, string(errBadClientVersion))
	c.expectError(`{"type": "bind", "appid": "a", "side": "s", "client_version": [1, 2]}`, string(errBadClientVersion))
	c.expectError(`{"type": "bind", "appid": "a", "side": "a\ud800"}`, "'side' must be a string") // half a surrogate pair
	c.expect(`{"type": "bind", "appid": "a", "side": "s", "client_version": ["python", "0.12.0", {"extra": 1}]}`)
	c.expectError(`{"type": "bind", "appid": "a", "side": "s"}`, "already bound")
	c.expectError(`{"type": "nonsense"}`, "unknown type")
	c.expectError(`{"type": 7}`, "unknown type")

	d, _ := ts.dial(t)
	d.expect(`{"type": "bind", "appid": "", "side": ""}`) // empty strings are accepted, as the reference
}

func TestList(t *testing.T) {
	ts := startServer(t, testConfig())
	c, _ := ts.dial(t)
	c.bind("app", "s1")
	if got := c.expect(`{"type": "list"}`, "nameplates")[0]["nameplates"].([]any); len(got) != 0 {
		t.Fatalf("empty app lists %v", got)
	}
	for _, name := range []string{"2", "10", "1"} {
		d, _ := ts.dial(t)
		d.bind("app", "s-"+name)
		d.expect(fmt.Sprintf(`{"type": "claim", "nameplate": %q}`, name), "claimed")
	}
	other, _ := ts.dial(t)
	other.bind("other-app", "x")
	other.expect(`{"type": "claim", "nameplate": "99"}`, "claimed")

	got := c.expect(`{"type": "list"}`, "nameplates")[0]["nameplates"].([]any)
	if fmt.Sprint(got) != "[map[id:1] map[id:10] map[id:2]]" {
		t.Fatalf("list = %v, want nameplates 1, 10, 2 sorted as strings, and only this app's", got)
	}

	cfg := testConfig()
	cfg.allowList = false
	ts2 := startServer(t, cfg)
	e, _ := ts2.dial(t)
	e.bind("app", "s")
	e.expect(`{"type": "claim", "nameplate": "5"}`, "claimed")
	if got := e.expect(`{"type": "list"}`, "nameplates")[0]["nameplates"].([]any); len(got) != 0 {
		t.Fatalf("with --disallow-list, list = %v", got)
	}
}

func TestAllocate(t *testing.T) {
	ts := startServer(t, testConfig())
	c, _ := ts.dial(t)
	c.expectError(`{"type": "allocate"}`, "must bind first")
	c.bind("app", "s1")
	name := c.expect(`{"type": "allocate"}`, "allocated")[0].str("nameplate")
	if n, err := strconv.Atoi(name); err != nil || n < 1 || n > 9 {
		t.Fatalf("first nameplate %q, want 1-9", name)
	}
	c.expectError(`{"type": "allocate"}`, "you already allocated one, don't be greedy")
	if got := c.expect(`{"type": "list"}`, "nameplates")[0]["nameplates"].([]any); fmt.Sprint(got) != fmt.Sprintf("[map[id:%s]]", name) {
		t.Fatalf("list after allocate = %v", got)
	}
	mbox := c.expect(fmt.Sprintf(`{"type": "claim", "nameplate": %q}`, name), "claimed")[0].str("mailbox")
	if !regexp.MustCompile(`^[a-z2-7]{13}$`).MatchString(mbox) {
		t.Fatalf("mailbox id %q, want 13 lowercase base32 characters", mbox)
	}
	d, _ := ts.dial(t)
	d.bind("app", "s2")
	if got := d.expect(fmt.Sprintf(`{"type": "claim", "nameplate": %q}`, name), "claimed")[0].str("mailbox"); got != mbox {
		t.Fatalf("second side got mailbox %q, want %q", got, mbox)
	}
}

// TestAllocationOrder checks the reference's allocation: all of 1-9
// before any two-digit name, all of 10-99 before three digits, and so on.
func TestAllocationOrder(t *testing.T) {
	reg := newRegistry(defaultLimits, true, nil, nil, newMetrics())
	reg.mu.Lock()
	defer reg.mu.Unlock()
	for i := range 1000 {
		name, err := reg.allocateLocked("app", fmt.Sprintf("side%d", i), netip.Addr{}, 1)
		if err != nil {
			t.Fatal(err)
		}
		n, _ := strconv.Atoi(name)
		switch {
		case i < 9 && (n < 1 || n > 9),
			i >= 9 && i < 99 && (n < 10 || n > 99),
			i >= 99 && i < 999 && (n < 100 || n > 999),
			i == 999 && (n < 1000 || n > 999999):
			t.Fatalf("allocation %d gave %d", i, n)
		}
	}
	if len(reg.apps["app"].nameplates) != 1000 {
		t.Fatalf("%d nameplates, want 1000 distinct", len(reg.apps["app"].nameplates))
	}
}

func TestClaim(t *testing.T) {
	ts := startServer(t, testConfig())
	a, _ := ts.dial(t)
	a.bind("app", "a")
	a.expectError(`{"type": "claim"}`, "claim requires 'nameplate'")
	mbox := a.expect(`{"type": "claim", "nameplate": "12"}`, "claimed")[0].str("mailbox")
	a.expectError(`{"type": "claim"}`, "claim requires 'nameplate'") // checked before the once-only rule
	a.expectError(`{"type": "claim", "nameplate": "12"}`, "only one claim per connection")

	// The same side on a new connection gets the same mailbox.
	a2, _ := ts.dial(t)
	a2.bind("app", "a")
	if got := a2.expect(`{"type": "claim", "nameplate": "12"}`, "claimed")[0].str("mailbox"); got != mbox {
		t.Fatalf("re-claim got %q, want %q", got, mbox)
	}
	b, _ := ts.dial(t)
	b.bind("app", "b")
	b.expect(`{"type": "claim", "nameplate": "12"}`, "claimed")
	c, _ := ts.dial(t)
	c.bind("app", "c")
	c.expectError(`{"type": "claim", "nameplate": "12"}`, "crowded")
	c.expectError(`{"type": "claim", "nameplate": "12"}`, "only one claim per connection") // a crowded claim uses up the claim

	// After releasing, the side may not claim the nameplate again.
	a2.expect(`{"type": "release"}`, "released")
	a3, _ := ts.dial(t)
	a3.bind("app", "a")
	a3.expectError(`{"type": "claim", "nameplate": "12"}`, "reclaimed")
}

// TestBadNameplate checks a deliberate difference: the reference (since
// 0.7.0) drops the connection for a nameplate that is not 1-40 digits;
// this server answers with an error and keeps the claim unused.
func TestBadNameplate(t *testing.T) {
	ts := startServer(t, testConfig())
	c, _ := ts.dial(t)
	c.bind("app", "a")
	for _, name := range []string{`""`, `"abc"`, `" 6"`, `"6\n"`, `"١٢"`, `"12345678901234567890123456789012345678901"`, `5`, `null`} {
		c.expectError(fmt.Sprintf(`{"type": "claim", "nameplate": %s}`, name), "'nameplate' must be 1 to 40 digits")
	}
	c.expect(`{"type": "claim", "nameplate": "0000000000000000000000000000000000000012"}`, "claimed")
}

func TestRelease(t *testing.T) {
	ts := startServer(t, testConfig())
	a, _ := ts.dial(t)
	a.bind("app", "a")
	a.expectError(`{"type": "release"}`, "release without nameplate must follow claim")
	a.expect(`{"type": "claim", "nameplate": "3"}`, "claimed")
	a.expectError(`{"type": "release", "nameplate": "4"}`, "release and claim must use same nameplate")
	a.expectError(`{"type": "release", "nameplate": 3}`, "release and claim must use same nameplate") // the reference's order
	a.expect(`{"type": "release", "nameplate": "3"}`, "released")
	a.expectError(`{"type": "release", "nameplate": "3"}`, "only one release per connection")

	// A release of a nameplate never claimed is answered all the same.
	b, _ := ts.dial(t)
	b.bind("app", "b")
	b.expectError(`{"type": "release", "nameplate": 777}`, "'nameplate' must be a string")
	b.expect(`{"type": "release", "nameplate": "777"}`, "released")

	// The last release deletes the nameplate.
	if got := b.expect(`{"type": "list"}`, "nameplates")[0]["nameplates"].([]any); len(got) != 0 {
		t.Fatalf("after release, list = %v", got)
	}
}

func TestOpenAndAdd(t *testing.T) {
	ts := startServer(t, testConfig())
	a, _ := ts.dial(t)
	a.bind("app", "a")
	a.expectError(`{"type": "add", "phase": "pake", "body": ""}`, "must open mailbox before adding")
	a.expectError(`{"type": "open"}`, "open requires 'mailbox'")
	a.expect(`{"type": "open", "mailbox": "mb1"}`) // nothing stored yet: only the ack
	a.expectError(`{"type": "open", "mailbox": "mb1"}`, "only one open per connection")
	a.expectError(`{"type": "add", "body": ""}`, "missing 'phase'")
	a.expectError(`{"type": "add", "phase": "pake"}`, "missing 'body'")
	a.expectError(`{"type": "add", "phase": 5, "body": ""}`, "'phase' must be a string")
	a.expectError(`{"type": "add", "phase": "pake", "body": {}}`, "'body' must be a string")
	echo := a.expect(`{"type": "add", "phase": "pake", "body": "aa", "id": "0001"}`, "message")[0]
	if echo.str("side") != "a" || echo.str("phase") != "pake" || echo.str("body") != "aa" || echo.str("id") != "0001" {
		t.Fatalf("echo %v", echo)
	}
	if _, ok := echo["server_rx"].(float64); !ok {
		t.Fatalf("echo without server_rx: %v", echo)
	}
	a.expect(`{"type": "add", "phase": "0", "body": "bb"}`, "message")

	// A second side's open replays what is stored, in order.
	b, _ := ts.dial(t)
	b.bind("app", "b")
	replay := b.expect(`{"type": "open", "mailbox": "mb1"}`, "message", "message")
	if replay[0].str("phase") != "pake" || replay[0]["server_rx"] != echo["server_rx"] || replay[1].str("phase") != "0" || replay[1]["id"] != nil {
		t.Fatalf("replay %v", replay)
	}
	// B's add reaches both, with B's numeric id unchanged.
	b.expect(`{"type": "add", "phase": "pake", "body": "cc", "id": 17}`, "message")
	if got := a.sync(); len(got) != 1 || got[0].str("side") != "b" || got[0]["id"] != 17.0 {
		t.Fatalf("A got %v, want B's message", got)
	}
	// A third side is refused.
	c, _ := ts.dial(t)
	c.bind("app", "c")
	c.expectError(`{"type": "open", "mailbox": "mb1"}`, "crowded")
	c.expectError(`{"type": "add", "phase": "x", "body": ""}`, "must open mailbox before adding")
}

func TestClose(t *testing.T) {
	ts := startServer(t, testConfig())
	a, _ := ts.dial(t)
	a.bind("app", "a")
	a.expectError(`{"type": "close"}`, "close without mailbox must follow open")
	a.expect(`{"type": "open", "mailbox": "mb"}`)
	a.expect(`{"type": "add", "phase": "p", "body": "aa"}`, "message")
	a.expectError(`{"type": "close", "mailbox": "other"}`, "open and close must use same mailbox")
	a.expectError(`{"type": "close", "mood": 5}`, "'mood' must be a string")
	a.expectError(`{"type": "close", "mailbox": null}`, "open and close must use same mailbox") // the reference's order
	a.expect(`{"type": "close", "mood": "happy"}`, "closed")
	a.expectError(`{"type": "close"}`, "only one close per connection")
	a.expectError(`{"type": "add", "phase": "p", "body": "aa"}`, "must open mailbox before adding")
	// Re-opening after close is accepted, as the reference does; the
	// mailbox went when its only side closed it, so it starts empty.
	a.expect(`{"type": "open", "mailbox": "mb"}`)

	// Closing a mailbox never seen is answered, and creates nothing.
	b, _ := ts.dial(t)
	b.bind("app", "b")
	b.expect(`{"type": "close", "mailbox": "never", "mood": "lonely"}`, "closed")
	ts.reg.mu.Lock()
	_, exists := ts.reg.apps["app"].mailboxes["never"]
	ts.reg.mu.Unlock()
	if exists {
		t.Fatal("closing an unknown mailbox created it")
	}

	// A third side's close is refused, since closing opens first.
	b2, _ := ts.dial(t)
	b2.bind("app", "b")
	b2.expect(`{"type": "open", "mailbox": "mb"}`)
	c, _ := ts.dial(t)
	c.bind("app", "c")
	c.expectError(`{"type": "close", "mailbox": "mb"}`, "crowded")
}

// TestCloseDeletes checks that a mailbox goes when every side has closed
// it, and that the last close works even while a nameplate still points
// at the mailbox, where the reference crashes (its issue #28).
func TestCloseDeletes(t *testing.T) {
	ts := startServer(t, testConfig())
	a, _ := ts.dial(t)
	a.bind("app", "a")
	mbox := a.expect(`{"type": "allocate"}`, "allocated")[0].str("nameplate")
	mb := a.expect(fmt.Sprintf(`{"type": "claim", "nameplate": %q}`, mbox), "claimed")[0].str("mailbox")
	a.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb))
	a.expect(`{"type": "add", "phase": "pake", "body": "aa"}`, "message")
	a.expect(`{"type": "close", "mood": "lonely"}`, "closed") // the nameplate is still claimed
	ts.reg.mu.Lock()
	apps := len(ts.reg.apps)
	ts.reg.mu.Unlock()
	if apps != 0 {
		t.Fatalf("after the only side closed, %d apps remain", apps)
	}
	// The name is free again: claiming it makes a new mailbox.
	b, _ := ts.dial(t)
	b.bind("app", "b")
	if got := b.expect(fmt.Sprintf(`{"type": "claim", "nameplate": %q}`, mbox), "claimed")[0].str("mailbox"); got == mb {
		t.Fatal("a deleted nameplate kept its mailbox")
	}
}

// TestReconnect follows what the Python client does after its connection
// drops: it binds again with the same side, repeats its claim and open
// (getting the same mailbox and a replay of everything, its own messages
// included), and sends release and close on a new connection.
func TestReconnect(t *testing.T) {
	ts := startServer(t, testConfig())
	a, _ := ts.dial(t)
	a.bind("app", "a")
	mb := a.expect(`{"type": "claim", "nameplate": "8"}`, "claimed")[0].str("mailbox")
	a.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb))
	a.expect(`{"type": "add", "phase": "pake", "body": "aa"}`, "message")
	a.raw.Close()

	b, _ := ts.dial(t)
	b.bind("app", "b")
	b.expect(`{"type": "claim", "nameplate": "8"}`, "claimed")
	b.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb), "message")
	b.expect(`{"type": "add", "phase": "pake", "body": "bb"}`, "message")

	a2, _ := ts.dial(t)
	a2.bind("app", "a")
	if got := a2.expect(`{"type": "claim", "nameplate": "8"}`, "claimed")[0].str("mailbox"); got != mb {
		t.Fatalf("re-claim after reconnect: %q, want %q", got, mb)
	}
	replay := a2.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb), "message", "message")
	if replay[0].str("side") != "a" || replay[1].str("side") != "b" {
		t.Fatalf("replay %v", replay)
	}
	a2.expect(`{"type": "release", "nameplate": "8"}`, "released")
	b.expect(`{"type": "release", "nameplate": "8"}`, "released")
	b.expect(fmt.Sprintf(`{"type": "close", "mailbox": %q, "mood": "happy"}`, mb), "closed")

	a3, _ := ts.dial(t)
	a3.bind("app", "a")
	a3.expect(`{"type": "release", "nameplate": "8"}`, "released")
	a3.expect(fmt.Sprintf(`{"type": "close", "mailbox": %q, "mood": "happy"}`, mb), "closed")
	a4, _ := ts.dial(t)
	a4.bind("app", "a")
	a4.expect(fmt.Sprintf(`{"type": "close", "mailbox": %q, "mood": "happy"}`, mb), "closed") // again: still answered
	ts.reg.mu.Lock()
	apps := len(ts.reg.apps)
	ts.reg.mu.Unlock()
	if apps != 0 {
		t.Fatalf("after both sides closed, %d apps remain", apps)
	}
}

// TestApps checks that apps are separate namespaces: the same nameplate
// and mailbox names in two apps are different channels.
func TestApps(t *testing.T) {
	ts := startServer(t, testConfig())
	mailboxes := map[string]string{}
	for _, app := range []string{"app1", "app2"} {
		c, _ := ts.dial(t)
		c.bind(app, "side")
		mailboxes[app] = c.expect(`{"type": "claim", "nameplate": "1"}`, "claimed")[0].str("mailbox")
		c.expect(`{"type": "open", "mailbox": "shared"}`)
		c.expect(fmt.Sprintf(`{"type": "add", "phase": "p", "body": %q}`, app), "message")
	}
	if mailboxes["app1"] == mailboxes["app2"] {
		t.Fatal("two apps share a nameplate's mailbox")
	}
	c, _ := ts.dial(t)
	c.bind("app2", "other")
	if got := c.expect(`{"type": "open", "mailbox": "shared"}`, "message"); got[0].str("body") != "app2" {
		t.Fatalf("app2's mailbox holds %v", got)
	}
}

// TestManyPairs runs many transfers at once and checks that every
// subscriber sees every message of its mailbox exactly once, in the same
// order as the other subscriber.
func TestManyPairs(t *testing.T) {
	ts := startServer(t, testConfig())
	const pairs, messages = 20, 20
	clients := make([][2]*testClient, pairs)
	for p := range clients {
		for i := range clients[p] {
			c, _ := ts.dial(t)
			c.bind("app", fmt.Sprintf("side-%d", i))
			c.expect(fmt.Sprintf(`{"type": "open", "mailbox": "mailbox-%d"}`, p))
			clients[p][i] = c
		}
	}
	orders := make([][2][]string, pairs)
	var wg sync.WaitGroup
	for p := range clients {
		for i, c := range clients[p] {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for n := range messages {
					if _, err := c.ws.Write([]byte(fmt.Sprintf(`{"type": "add", "phase": "%d", "body": "%d-%d"}`, n, i, n))); err != nil {
						t.Error(err)
						return
					}
				}
				for len(orders[p][i]) < 2*messages {
					m, err := c.tryNext()
					if err != nil {
						t.Error(err)
						return
					}
					if m.typ() == "message" {
						orders[p][i] = append(orders[p][i], m.str("body"))
					}
				}
			}()
		}
	}
	wg.Wait()
	for p, order := range orders {
		if !slices.Equal(order[0], order[1]) {
			t.Errorf("mailbox %d: sides saw different orders:\n%v\n%v", p, order[0], order[1])
		}
		seen := map[string]bool{}
		for _, body := range order[0] {
			if seen[body] {
				t.Errorf("mailbox %d: %s delivered twice", p, body)
			}
			seen[body] = true
		}
		if len(seen) != 2*messages {
			t.Errorf("mailbox %d: %d distinct messages, want %d", p, len(seen), 2*messages)
		}
	}
}

// TestMailboxDeletedUnderSubscriber checks a deliberate difference: when
// the sides close a mailbox from other connections, a connection still
// subscribed to it is detached, so its adds are refused rather than
// stored in a mailbox that no longer exists (the reference stores them,
// and replays them to whoever opens that id next).
func TestMailboxDeletedUnderSubscriber(t *testing.T) {
	ts := startServer(t, testConfig())
	x, _ := ts.dial(t)
	x.bind("app", "a")
	x.expect(`{"type": "open", "mailbox": "mb"}`)
	b, _ := ts.dial(t)
	b.bind("app", "b")
	b.expect(`{"type": "open", "mailbox": "mb"}`)
	y, _ := ts.dial(t)
	y.bind("app", "a") // side a again, on another connection
	y.expect(`{"type": "close", "mailbox": "mb", "mood": "happy"}`, "closed")
	b.expect(`{"type": "close", "mood": "happy"}`, "closed") // the last side: the mailbox goes
	x.expectError(`{"type": "add", "phase": "p", "body": "aa"}`, "must open mailbox before adding")
	z, _ := ts.dial(t)
	z.bind("app", "c")
	z.expect(`{"type": "open", "mailbox": "mb"}`) // a new, empty mailbox: nothing replayed
	x.expect(`{"type": "open", "mailbox": "mb"}`) // and x may open it again
}
