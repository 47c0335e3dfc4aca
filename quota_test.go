// quota_test.go tests what one client address may hold at once
// (quota.go), the order of the checks that admit a claim or an open, and
// the registry rules that came with them: owners of a crowded channel
// keep it, mailboxes bounded by bytes for Dilation, and the echo of ids.
// Each attack runs against the real handler on a real listener from
// several 127.0.0.x addresses, with a victim at another address.
package main

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/net/websocket"
)

// wormholeApp is the appid of the wormhole command-line tool, the app an
// attacker would want to deny.
const wormholeApp = "lothar.com/wormhole/text-or-file-xfer"

// bindFrom connects from address from and binds to app as side.
func bindFrom(t testing.TB, ts *testServer, from, app, side string) *testClient {
	t.Helper()
	c, w := mustDialFrom(t, ts.url, dialOptions{from: from})
	if e := welcomeError(w); e != "" {
		t.Fatalf("connecting from %s: %s", from, e)
	}
	c.bind(app, side)
	return c
}

// heldBy returns what the registry charges to address from.
func (ts *testServer) heldBy(from string) holdings {
	ts.reg.mu.Lock()
	defer ts.reg.mu.Unlock()
	return ts.reg.held[netip.MustParseAddr(from)]
}

// victimSides numbers the victims' sides, so every transfer is new.
var victimSides atomic.Int64

// victimTransfer runs a whole transfer in app between two clients, the
// sender at fromA and the receiver at fromB, failing the test if any step
// is refused: allocate, claim, open, the PAKE message each way, release
// and close.
func victimTransfer(t testing.TB, ts *testServer, fromA, fromB, app string) {
	t.Helper()
	n := victimSides.Add(1)
	a := bindFrom(t, ts, fromA, app, fmt.Sprintf("victim-a%d", n))
	name := a.expect(`{"type": "allocate"}`, "allocated")[0].str("nameplate")
	mb := a.expect(fmt.Sprintf(`{"type": "claim", "nameplate": %q}`, name), "claimed")[0].str("mailbox")
	a.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb))
	a.expect(`{"type": "add", "phase": "pake", "body": "aa01"}`, "message")
	b := bindFrom(t, ts, fromB, app, fmt.Sprintf("victim-b%d", n))
	if got := b.expect(fmt.Sprintf(`{"type": "claim", "nameplate": %q}`, name), "claimed")[0].str("mailbox"); got != mb {
		t.Fatalf("the receiver's claim got mailbox %q, want %q", got, mb)
	}
	b.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb), "message")
	b.expect(`{"type": "add", "phase": "pake", "body": "bb01"}`, "message")
	if got := a.sync(); len(got) != 1 || got[0].str("body") != "bb01" {
		t.Fatalf("the sender got %v, want the receiver's message", got)
	}
	for _, c := range []*testClient{a, b} {
		c.expect(`{"type": "release"}`, "released")
		c.expect(`{"type": "close", "mood": "happy"}`, "closed")
	}
}

// quotaConfig is testConfig with per-address limits (rate limit off), and
// pools small enough that a test reaches them with tens of connections.
func quotaConfig(nameplates, mailboxes int, bytes int64) config {
	cfg := testConfig()
	cfg.limits.MaxNameplates, cfg.limits.MaxMailboxes = 40, 40
	cfg.limits.MaxNameplatesPerAddr, cfg.limits.MaxMailboxesPerAddr, cfg.limits.MaxStoredBytesPerAddr = nameplates, mailboxes, bytes
	return cfg
}

// refusal sends text and returns the error it is answered with, failing
// the test if it is not refused.
func refusal(t testing.TB, c *testClient, text string) string {
	t.Helper()
	return c.expect(text, "error")[0].str("error")
}

// TestDefaultsLeaveRoom checks the arithmetic behind the defaults: 64
// addresses holding all they may leave room in every pool of one app,
// and one address may store the largest text a client can send.
func TestDefaultsLeaveRoom(t *testing.T) {
	const attackers = 64
	l := defaultLimits
	if attackers*l.MaxNameplatesPerAddr >= perApp(l.MaxNameplates) {
		t.Errorf("%d addresses may hold %d nameplates, one app's share is %d", attackers, attackers*l.MaxNameplatesPerAddr, perApp(l.MaxNameplates))
	}
	if attackers*l.MaxMailboxesPerAddr >= perApp(l.MaxMailboxes) {
		t.Errorf("%d addresses may hold %d mailboxes, one app's share is %d", attackers, attackers*l.MaxMailboxesPerAddr, perApp(l.MaxMailboxes))
	}
	if attackers*l.MaxStoredBytesPerAddr >= perApp(l.MaxStoredBytes) {
		t.Errorf("%d addresses may store %d bytes, one app's share is %d", attackers, attackers*l.MaxStoredBytesPerAddr, perApp(l.MaxStoredBytes))
	}
	if l.MaxNameplatesPerAddr < 100 || l.MaxMailboxesPerAddr < 100 {
		t.Errorf("a NAT may hold %d nameplates and %d mailboxes, want room for 100 waiting transfers", l.MaxNameplatesPerAddr, l.MaxMailboxesPerAddr)
	}
	biggest := message{side: strings.Repeat("a", 16), phase: "999", body: strings.Repeat("0", maxMessageBytes), id: json.RawMessage(`"abcd"`)}
	if int64(biggest.size()) > l.MaxStoredBytesPerAddr {
		t.Errorf("a message of %d bytes does not fit in one address's %d", biggest.size(), l.MaxStoredBytesPerAddr)
	}
	if 2*l.MaxStoredBytes > 200<<20 {
		t.Errorf("a full store, twice while compacted, is %d MiB", 2*l.MaxStoredBytes>>20)
	}
}

// TestAttackNameplatesPerAddress runs the nameplate flood: addresses
// claim nameplates in the wormhole app and in made-up apps, allocate, and
// claim nameplates that already exist, as many as they can. Each holds at
// most its limit, a claim of an existing nameplate is charged like any
// other, what a release gives back can be taken again, and a victim at
// another address still completes transfers.
func TestAttackNameplatesPerAddress(t *testing.T) {
	const perAddr = 4
	ts := startServer(t, quotaConfig(perAddr, perAddr, 0))
	attackers := []string{"127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14", "127.0.0.15", "127.0.0.16"}
	var held []*testClient // one claiming connection per nameplate held
	var firstMailbox string
	for i, from := range attackers {
		app := wormholeApp
		if i%2 == 1 {
			app = fmt.Sprintf("made-up-%d", i)
		}
		for j := 0; ; j++ {
			c := bindFrom(t, ts, from, app, fmt.Sprintf("s%d", j))
			var got []msg
			if j%2 == 0 {
				got = c.do(fmt.Sprintf(`{"type": "claim", "nameplate": "%d%02d"}`, i+1, j))
			} else {
				got = c.do(`{"type": "allocate"}`)
			}
			if got[1].typ() == "error" {
				if e := got[1].str("error"); e != string(errAddrNameplates) {
					t.Fatalf("%s: refused with %q, want %q", from, e, errAddrNameplates)
				}
				if j != perAddr {
					t.Fatalf("%s: refused after %d nameplates, want %d", from, j, perAddr)
				}
				break
			}
			if len(held) == 0 {
				firstMailbox = got[1].str("mailbox")
			}
			held = append(held, c)
		}
		if h := ts.heldBy(from); h.nameplates != perAddr || h.mailboxes != perAddr {
			t.Fatalf("%s holds %+v, want %d nameplates and mailboxes", from, h, perAddr)
		}
	}
	// An existing nameplate is refused the same way: the first attacker
	// claims one the second holds (it has one side and room for another).
	c := bindFrom(t, ts, attackers[0], wormholeApp, "joiner")
	if e := refusal(t, c, `{"type": "claim", "nameplate": "300"}`); e != string(errAddrNameplates) {
		t.Fatalf("a claim of an existing nameplate: %q, want %q", e, errAddrNameplates)
	}
	// A release gives back what the claim held, a close what the open
	// held.
	held[0].expect(`{"type": "release"}`, "released")
	if h := ts.heldBy(attackers[0]); h.nameplates != perAddr-1 || h.mailboxes != perAddr {
		t.Fatalf("after a release %s holds %+v, want %d nameplates", attackers[0], h, perAddr-1)
	}
	held[0].expect(fmt.Sprintf(`{"type": "close", "mailbox": %q}`, firstMailbox), "closed")
	if h := ts.heldBy(attackers[0]); h.mailboxes != perAddr-1 {
		t.Fatalf("after a close %s holds %+v, want %d mailboxes", attackers[0], h, perAddr-1)
	}
	bindFrom(t, ts, attackers[0], wormholeApp, "again").expect(`{"type": "claim", "nameplate": "199"}`, "claimed")

	for range 5 {
		victimTransfer(t, ts, "127.0.0.100", "127.0.0.101", wormholeApp)
	}
	if got := ts.metrics.refusals.Get("nameplates per address"); got == nil || got.String() != fmt.Sprint(len(attackers)+1) {
		t.Errorf("refusals counted: %v, want %d", got, len(attackers)+1)
	}
	ts.reg.mu.Lock()
	defer ts.reg.mu.Unlock()
	if err := checkHoldings(ts.reg, true); err != nil {
		t.Fatal(err)
	}
}

// TestAttackMailboxesPerAddress runs the mailbox flood: an address opens
// mailboxes of its own naming until refused; closing one gives it back.
func TestAttackMailboxesPerAddress(t *testing.T) {
	const perAddr = 3
	ts := startServer(t, quotaConfig(0, perAddr, 0))
	var open []*testClient
	for _, from := range []string{"127.0.0.21", "127.0.0.22"} {
		for j := 0; ; j++ {
			c := bindFrom(t, ts, from, wormholeApp, fmt.Sprintf("s%d", j))
			got := c.do(fmt.Sprintf(`{"type": "open", "mailbox": "flood-%s-%d"}`, from, j))
			if len(got) > 1 {
				if e := got[1].str("error"); e != string(errAddrMailboxes) || j != perAddr {
					t.Fatalf("%s: open %d refused with %v, want %q after %d", from, j, got[1], errAddrMailboxes, perAddr)
				}
				break
			}
			open = append(open, c)
		}
	}
	open[0].expect(`{"type": "close"}`, "closed")
	if h := ts.heldBy("127.0.0.21"); h.mailboxes != perAddr-1 {
		t.Fatalf("after a close the address holds %d mailboxes, want %d", h.mailboxes, perAddr-1)
	}
	bindFrom(t, ts, "127.0.0.21", wormholeApp, "again").expect(`{"type": "open", "mailbox": "another"}`)
	victimTransfer(t, ts, "127.0.0.100", "127.0.0.101", wormholeApp)
}

// TestRefusedClaimSameForExistingAndFree checks that a connection whose
// claims are refused cannot tell which nameplates exist: with
// --disallow-list, once its address has used its allowance (or holds all
// it may), one connection claims every name from 1 to 60, among them a
// victim's waiting nameplate (allocation gives out one digit first);
// every reply is the same, nothing joins the
// victim's nameplate, and the victim's receiver then completes the
// transfer.
func TestRefusedClaimSameForExistingAndFree(t *testing.T) {
	for _, tc := range []struct {
		name    string
		adjust  func(*config)
		useUp   string // what the attacker sends on fresh connections until refused
		refusal protocolError
	}{
		{"rate", func(cfg *config) { cfg.nameplatesPerMin = 1 }, `{"type": "open", "mailbox": "m%d"}`, errRateLimited},
		{"holdings", func(cfg *config) { cfg.limits.MaxNameplatesPerAddr = 3 }, `{"type": "allocate", "n": %d}`, errAddrNameplates},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig()
			cfg.allowList = false
			tc.adjust(&cfg)
			ts := startServer(t, cfg)
			sender := bindFrom(t, ts, "127.0.0.31", wormholeApp, "sender")
			name := sender.expect(`{"type": "allocate"}`, "allocated")[0].str("nameplate")
			mb := sender.expect(fmt.Sprintf(`{"type": "claim", "nameplate": %q}`, name), "claimed")[0].str("mailbox")
			sender.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb))

			const attacker = "127.0.0.32"
			for i := 0; ; i++ {
				got := bindFrom(t, ts, attacker, wormholeApp, fmt.Sprint("use-", i)).do(fmt.Sprintf(tc.useUp, i))
				if len(got) > 1 && got[1].typ() == "error" {
					break
				}
			}
			c := bindFrom(t, ts, attacker, wormholeApp, "prober")
			const probes = 60
			for n := 1; n <= probes; n++ {
				c.send(fmt.Sprintf(`{"type": "claim", "nameplate": "%d"}`, n))
			}
			for n := 1; n <= probes; n++ {
				if ack := c.next(); ack.typ() != "ack" {
					t.Fatalf("claim %d: got %v, want its ack", n, ack)
				}
				if m := c.next(); m.typ() != "error" || m.str("error") != string(tc.refusal) {
					t.Fatalf("claim of %d (the waiting one is %s): got %v, want error %q", n, name, m, tc.refusal)
				}
			}
			receiver := bindFrom(t, ts, "127.0.0.33", wormholeApp, "receiver")
			receiver.expect(fmt.Sprintf(`{"type": "claim", "nameplate": %q}`, name), "claimed")
			receiver.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb))
			receiver.expect(`{"type": "add", "phase": "pake", "body": "bb"}`, "message")
			if got := sender.sync(); len(got) != 1 || got[0].str("side") != "receiver" {
				t.Fatalf("the sender got %v, want the receiver's message", got)
			}
		})
	}
}

// TestAttackStoredBytesPerAddress runs the store flood: addresses, in the
// wormhole app and a made-up one, add large messages until refused. Each
// stores at most its limit, the store keeps room, a victim completes
// transfers, and the bytes come back when the mailbox goes.
func TestAttackStoredBytesPerAddress(t *testing.T) {
	const perAddr = 96 << 10
	cfg := quotaConfig(0, 0, perAddr)
	cfg.limits.MaxStoredBytes = 1 << 20 // one app's share is 512 KiB; 4 x 96 KiB leave 128 KiB
	ts := startServer(t, cfg)
	body := strings.Repeat("ab", 8<<10) // 16 KiB
	attackers := []string{"127.0.0.41", "127.0.0.42", "127.0.0.43", "127.0.0.44"}
	var first *testClient
	for i, from := range attackers {
		app := wormholeApp
		if i == 3 {
			app = "made-up"
		}
		// Two mailboxes from each address: the limit is on the address.
		for k := range 2 {
			c := bindFrom(t, ts, from, app, fmt.Sprint("s", k))
			if first == nil {
				first = c
			}
			c.expect(fmt.Sprintf(`{"type": "open", "mailbox": "fill-%d-%d"}`, i, k))
			for {
				got := c.do(fmt.Sprintf(`{"type": "add", "phase": "x", "body": %q}`, body))
				if got[1].typ() == "error" {
					if e := got[1].str("error"); e != string(errAddrStored) {
						t.Fatalf("%s: refused with %q, want %q", from, e, errAddrStored)
					}
					break
				}
			}
		}
		if h := ts.heldBy(from); h.bytes > perAddr || h.bytes < perAddr-(20<<10) {
			t.Fatalf("%s stores %d bytes, want nearly %d", from, h.bytes, perAddr)
		}
	}
	for range 5 {
		victimTransfer(t, ts, "127.0.0.100", "127.0.0.101", wormholeApp)
	}
	ts.reg.mu.Lock()
	stored := ts.reg.storedBytes
	ts.reg.mu.Unlock()
	if stored > int64(len(attackers))*perAddr {
		t.Fatalf("%d bytes stored, more than the attackers may hold", stored)
	}
	// The first mailbox, closed by its only side, goes with its bytes.
	first.expect(`{"type": "close"}`, "closed")
	if after := ts.heldBy(attackers[0]).bytes; after != 0 {
		t.Fatalf("after its mailbox went the address stores %d bytes, want 0", after)
	}
	if got := ts.metrics.refusals.Get("stored bytes per address"); got == nil || got.String() != fmt.Sprint(2*len(attackers)) {
		t.Errorf("refusals counted: %v, want %d", got, 2*len(attackers))
	}
}

// TestLargestTextFitsAddrAllowance checks, at the default limits, that
// one address may store a message of the largest size a client may send,
// and not two.
func TestLargestTextFitsAddrAllowance(t *testing.T) {
	cfg := testConfig()
	cfg.limits = defaultLimits
	ts := startServer(t, cfg)
	const wrapper = `{"type": "add", "phase": "0", "body": ""}`
	body := strings.Repeat("0", maxMessageBytes-len(wrapper)-64)
	for i, want := range []string{"message", "error"} {
		c := bindFrom(t, ts, "127.0.0.51", wormholeApp, fmt.Sprint("s", i))
		c.expect(fmt.Sprintf(`{"type": "open", "mailbox": "text-%d"}`, i))
		got := c.expect(fmt.Sprintf(`{"type": "add", "phase": "0", "body": %q}`, body), want)[0]
		if want == "error" && got.str("error") != string(errAddrStored) {
			t.Fatalf("the second text: %q, want %q", got.str("error"), errAddrStored)
		}
	}
}

// TestCrowdingKeepsOwners checks a deliberate difference: after a third
// side has claimed a pair's nameplate and opened its mailbox, the two
// sides can still re-open their own mailbox from new connections, as a
// reconnecting client does, and go on; the third side is refused every
// time and recorded nowhere, and the channel's usage records still say
// "crowded". The reference refuses the owners too.
func TestCrowdingKeepsOwners(t *testing.T) {
	ts, _ := startUsageServer(t, testConfig())
	a := bindFrom(t, ts, "127.0.0.61", wormholeApp, "a")
	mb := a.expect(`{"type": "claim", "nameplate": "5"}`, "claimed")[0].str("mailbox")
	a.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb))
	a.expect(`{"type": "add", "phase": "pake", "body": "aa"}`, "message")
	b := bindFrom(t, ts, "127.0.0.62", wormholeApp, "b")
	b.expect(`{"type": "claim", "nameplate": "5"}`, "claimed")
	b.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb), "message")

	for i := range 3 {
		c := bindFrom(t, ts, "127.0.0.63", wormholeApp, "intruder")
		if i == 0 {
			c.expectError(`{"type": "claim", "nameplate": "5"}`, "crowded")
		}
		c.expectError(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb), "crowded")
	}
	if h := ts.heldBy("127.0.0.63"); h != (holdings{}) {
		t.Fatalf("the intruder holds %+v", h)
	}

	// Both owners reconnect: each claims and opens again, and gets what
	// is stored.
	a2 := bindFrom(t, ts, "127.0.0.64", wormholeApp, "a") // a new network
	a2.expect(`{"type": "claim", "nameplate": "5"}`, "claimed")
	a2.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb), "message")
	b2 := bindFrom(t, ts, "127.0.0.62", wormholeApp, "b")
	b2.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb), "message")
	b2.expect(`{"type": "add", "phase": "pake", "body": "bb"}`, "message")
	if got := a2.sync(); len(got) != 1 || got[0].str("body") != "bb" {
		t.Fatalf("the reconnected side got %v, want the other's message", got)
	}
	ts.reg.mu.Lock()
	sides := len(ts.reg.apps[wormholeApp].mailboxes[mb].sides)
	ts.reg.mu.Unlock()
	if sides != 2 {
		t.Fatalf("the mailbox records %d sides, want 2", sides)
	}
	for _, c := range []*testClient{a2, b2} {
		c.expect(`{"type": "release", "nameplate": "5"}`, "released")
		c.expect(`{"type": "close", "mood": "happy"}`, "closed")
	}
	nps, mbs := ts.usageLines(t, "nameplate"), ts.usageLines(t, "mailbox")
	if len(nps) != 1 || len(mbs) != 1 || nps[0]["result"] != "crowded" || mbs[0]["result"] != "crowded" {
		t.Fatalf("usage records %v and %v, want one each, crowded", nps, mbs)
	}
}

// dilationMessage is a Dilation message as a Python client adds it: a
// 16-hex-digit side, a "dilate-N" phase, 300 hex digits of body (an
// encrypted hint or reconnect message) and a 4-hex-digit id.
func dilationMessage(n int) string {
	return fmt.Sprintf(`{"type": "add", "phase": "dilate-%d", "body": %q, "id": "%04x"}`, n, strings.Repeat("5a", 150), n&0xffff)
}

// TestDilationOutlivesMessageCount checks that at the default limits a
// mailbox takes far more than the old 1,000 messages of Dilation's size,
// the two sides at two addresses, and that a side re-opening it (a
// reconnection) gets every one replayed. It logs what a message counts,
// for the README's figures.
func TestDilationOutlivesMessageCount(t *testing.T) {
	cfg := testConfig()
	cfg.limits = defaultLimits
	ts := startServer(t, cfg)
	sides := [2]*testClient{
		bindFrom(t, ts, "127.0.0.71", "dilation-app", "0123456789abcdef"),
		bindFrom(t, ts, "127.0.0.72", "dilation-app", "fedcba9876543210"),
	}
	for _, c := range sides {
		c.expect(`{"type": "open", "mailbox": "dilation"}`)
	}
	const messages = 1500
	for n := range messages {
		sides[n%2].send(dilationMessage(n))
	}
	// Once each side's sync is answered its adds are stored; a second
	// round collects what the other side's adds delivered after the first.
	var errs, delivered [2]int
	for range 2 {
		for i, c := range sides {
			for _, m := range c.sync() {
				switch m.typ() {
				case "error":
					errs[i]++
				case "message":
					delivered[i]++
				}
			}
		}
	}
	for i := range sides {
		if errs[i] > 0 || delivered[i] != messages {
			t.Fatalf("side %d: %d errors, %d messages delivered, want 0 and %d", i, errs[i], delivered[i], messages)
		}
	}
	again := bindFrom(t, ts, "127.0.0.73", "dilation-app", "0123456789abcdef")
	again.send(`{"type": "open", "mailbox": "dilation"}`)
	replayed := 0
	for _, m := range again.sync() {
		if m.typ() == "message" {
			replayed++
		}
	}
	if replayed != messages {
		t.Fatalf("re-opening replayed %d messages, want %d", replayed, messages)
	}
	ts.reg.mu.Lock()
	mb := ts.reg.apps["dilation-app"].mailboxes["dilation"]
	size := mb.messages[0].size()
	ts.reg.mu.Unlock()
	t.Logf("a Dilation message counts %d bytes: a mailbox holds %d, one address stores %d",
		size, defaultLimits.MaxMailboxBytes/size, defaultLimits.MaxStoredBytesPerAddr/int64(size))
}

// rawNext reads the next message as the bytes that came.
func rawNext(t testing.TB, c *testClient) []byte {
	t.Helper()
	var data []byte
	if err := websocket.Message.Receive(c.ws, &data); err != nil {
		t.Fatal(err)
	}
	return data
}

// TestIDEcho checks the echo of ids: one too large for a float is echoed
// as it came, valid JSON, where the reference writes Infinity (a
// deliberate difference); an emoji id is charged as it is echoed, three
// times its size; and an id whose echo would be over maxIDLen is refused
// without an ack.
func TestIDEcho(t *testing.T) {
	ts := startServer(t, testConfig())
	c := bindFrom(t, ts, "127.0.0.81", "app", "a")
	c.expect(`{"type": "open", "mailbox": "ids"}`)
	c.send(`{"type": "add", "phase": "p", "body": "aa", "id": 1e999999}`)
	for _, want := range []string{`"id": 1e999999, "type": "ack"`, `"id": 1e999999, "type": "message"`} {
		frame := rawNext(t, c)
		if !json.Valid(frame) || !strings.Contains(string(frame), want) {
			t.Fatalf("got %s, want valid JSON with %s", frame, want)
		}
	}
	c.send(`{"type": "ping", "ping": -1E+999999, "id": -1E+999999}`)
	for range 2 {
		if frame := rawNext(t, c); !json.Valid(frame) || !strings.Contains(string(frame), "-1E+999999") {
			t.Fatalf("got %s, want valid JSON with the number as sent", frame)
		}
	}

	emoji := strings.Repeat("😀", 4) // 16 bytes in, 48 echoed
	c.send(fmt.Sprintf(`{"type": "add", "phase": "p", "body": "bb", "id": %q}`, emoji))
	rawNext(t, c) // the ack
	frame := rawNext(t, c)
	ts.reg.mu.Lock()
	mb := ts.reg.apps["app"].mailboxes["ids"]
	size, stored := mb.messages[1].size(), mb.bytes
	ts.reg.mu.Unlock()
	if !strings.Contains(string(frame), strings.Repeat(`\ud83d\ude00`, 4)) {
		t.Fatalf("got %s, want the id re-encoded", frame)
	}
	if size < len(frame) || size > len(frame)+2*pyTimeLen {
		t.Fatalf("the message counts %d bytes, its frame has %d", size, len(frame))
	}
	if charged := ts.heldBy("127.0.0.81").bytes; charged != int64(stored) {
		t.Fatalf("the address is charged %d bytes, the mailbox holds %d", charged, stored)
	}

	for _, id := range []string{
		fmt.Sprintf("%q", strings.Repeat("😀", 6)), // 24 bytes in, 74 echoed
		fmt.Sprintf("%q", strings.Repeat("x", maxIDLen-1)),
	} {
		c.send(fmt.Sprintf(`{"type": "add", "phase": "p", "body": "cc", "id": %s}`, id))
		if got := c.next(); got.typ() != "error" || got.str("error") != "'id' is too long" {
			t.Fatalf("id %s: got %v, want an error and no ack", id, got)
		}
	}
	c.expect(fmt.Sprintf(`{"type": "add", "phase": "p", "body": "dd", "id": %q}`, strings.Repeat("x", maxIDLen-2)), "message")
}

// TestRestoredChannelsUncharged checks that channels restored from the
// journal are charged to nobody (it records no addresses), and that
// releasing and closing them gives back nothing they did not hold.
func TestRestoredChannelsUncharged(t *testing.T) {
	cfg := quotaConfig(2, 2, 1<<20)
	cfg.channelDB = filepath.Join(t.TempDir(), "channel.jsonl")
	ts := startServer(t, cfg)
	a := bindFrom(t, ts, "127.0.0.91", "app", "a")
	mb := a.expect(`{"type": "claim", "nameplate": "4"}`, "claimed")[0].str("mailbox")
	a.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb))
	a.expect(`{"type": "add", "phase": "pake", "body": "aabb"}`, "message")
	if h := ts.heldBy("127.0.0.91"); h.nameplates != 1 || h.mailboxes != 1 || h.bytes == 0 {
		t.Fatalf("before the restart the address holds %+v", h)
	}
	ts.stop()

	ts2 := startServer(t, cfg)
	ts2.reg.mu.Lock()
	n := len(ts2.reg.held)
	ts2.reg.mu.Unlock()
	if n != 0 {
		t.Fatalf("after a restart %d addresses hold something", n)
	}
	a2 := bindFrom(t, ts2, "127.0.0.91", "app", "a")
	a2.expect(`{"type": "claim", "nameplate": "4"}`, "claimed") // the same side: nothing new to charge
	a2.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb), "message")
	a2.expect(`{"type": "release"}`, "released")
	a2.expect(`{"type": "close"}`, "closed")
	ts2.reg.mu.Lock()
	defer ts2.reg.mu.Unlock()
	if len(ts2.reg.held) != 0 || len(ts2.reg.apps) != 0 {
		t.Fatalf("after the channel went: holdings %v, %d apps", ts2.reg.held, len(ts2.reg.apps))
	}
}

// TestQuotaFlags checks the per-address flags: defaults, values, and
// refusal of negative ones.
func TestQuotaFlags(t *testing.T) {
	cfg, err := parseFlags(nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.limits != defaultLimits {
		t.Fatalf("without flags the limits are %+v", cfg.limits)
	}
	cfg, err = parseFlags([]string{"--max-nameplates-per-ip=7", "--max-mailboxes-per-ip=0", "--max-stored-bytes-per-ip=9000"}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if l := cfg.limits; l.MaxNameplatesPerAddr != 7 || l.MaxMailboxesPerAddr != 0 || l.MaxStoredBytesPerAddr != 9000 {
		t.Fatalf("flags gave %+v", l)
	}
	for _, flag := range []string{"max-nameplates-per-ip", "max-mailboxes-per-ip", "max-stored-bytes-per-ip"} {
		var out strings.Builder
		if _, err := parseFlags([]string{"--" + flag + "=-1"}, &out, &out); err == nil || !strings.Contains(err.Error(), flag) {
			t.Errorf("--%s=-1: %v", flag, err)
		}
	}
}

// checkHoldings checks that what the registry charges to each address is
// what its channels' sides and messages hold, and, if withinLimits, that
// no address holds more than its limits; reg.mu must be held.
func checkHoldings(reg *registry, withinLimits bool) error {
	want := map[netip.Addr]holdings{}
	add := func(a netip.Addr, h holdings) {
		got := want[a]
		got.nameplates, got.mailboxes, got.bytes = got.nameplates+h.nameplates, got.mailboxes+h.mailboxes, got.bytes+h.bytes
		want[a] = got
	}
	for _, a := range reg.apps {
		for _, np := range a.nameplates {
			for _, s := range np.sides {
				if s.holder.IsValid() {
					if !s.claimed {
						return fmt.Errorf("nameplate %q: side %q released but charged", np.name, s.side)
					}
					add(s.holder, holdings{nameplates: 1})
				}
			}
		}
		for _, mb := range a.mailboxes {
			for _, s := range mb.sides {
				if s.holder.IsValid() {
					if !s.opened {
						return fmt.Errorf("mailbox %q: side %q closed but charged", mb.id, s.side)
					}
					add(s.holder, holdings{mailboxes: 1})
				}
			}
			var charged int64
			for _, c := range mb.charges {
				if !c.addr.IsValid() || c.bytes <= 0 {
					return fmt.Errorf("mailbox %q: charge %+v", mb.id, c)
				}
				charged += c.bytes
				add(c.addr, holdings{bytes: c.bytes})
			}
			if charged > int64(mb.bytes) {
				return fmt.Errorf("mailbox %q: %d bytes charged, %d stored", mb.id, charged, mb.bytes)
			}
		}
	}
	if len(want) != len(reg.held) {
		return fmt.Errorf("%d addresses hold something, %d are charged: %v, want %v", len(want), len(reg.held), reg.held, want)
	}
	l := reg.limits
	for a, h := range want {
		if reg.held[a] != h {
			return fmt.Errorf("%v is charged %+v, holds %+v", a, reg.held[a], h)
		}
		if withinLimits && (l.MaxNameplatesPerAddr > 0 && h.nameplates > l.MaxNameplatesPerAddr ||
			l.MaxMailboxesPerAddr > 0 && h.mailboxes > l.MaxMailboxesPerAddr ||
			l.MaxStoredBytesPerAddr > 0 && h.bytes > l.MaxStoredBytesPerAddr) {
			return fmt.Errorf("%v holds %+v, over its limits", a, h)
		}
	}
	return nil
}

// TestSubscribersPerSide checks that one side may have a mailbox open on
// at most maxSubscribersPerSide connections at once: more are refused,
// the other side is not, and a connection that leaves makes room again.
func TestSubscribersPerSide(t *testing.T) {
	ts := startServer(t, testConfig())
	var conns []*testClient
	for range maxSubscribersPerSide {
		c, _ := ts.dial(t)
		c.bind("app", "a")
		c.expect(`{"type": "open", "mailbox": "mb"}`)
		conns = append(conns, c)
	}
	extra, _ := ts.dial(t)
	extra.bind("app", "a")
	extra.expectError(`{"type": "open", "mailbox": "mb"}`, string(errTooManySubscribers))
	other, _ := ts.dial(t)
	other.bind("app", "b")
	other.expect(`{"type": "open", "mailbox": "mb"}`)
	conns[0].leave()
	waitFor(t, "the connection that left to be unsubscribed", func() bool {
		ts.reg.mu.Lock()
		defer ts.reg.mu.Unlock()
		return ts.reg.subscribersOfSideLocked("app", "mb", "a") < maxSubscribersPerSide
	})
	again, _ := ts.dial(t)
	again.bind("app", "a")
	again.expect(`{"type": "open", "mailbox": "mb"}`)
	if got := ts.metrics.refusals.Get("subscribers per side"); got == nil || got.String() != "1" {
		t.Errorf("refusals counted: %v, want 1", got)
	}
}
