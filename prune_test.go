// prune_test.go tests pruning (main.go, mailbox.go): channels idle for
// the expiry with nobody subscribed are deleted, in the registry and in
// the journal, with "pruney" usage records; subscribed ones stay. The
// server's clock is a fake one, moved by hand, and the sweeps are called
// directly.
package main

import (
	"encoding/binary"
	"fmt"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// usageResults reads a usage log and returns the results of its
// nameplate and mailbox records, by type.
func usageResults(t *testing.T, path string) map[string][]string {
	t.Helper()
	results := map[string][]string{}
	for _, typ := range []string{"nameplate", "mailbox"} {
		for _, rec := range readUsage(t, path, typ) {
			results[typ] = append(results[typ], rec["result"].(string))
		}
	}
	return results
}

// leave closes a client's connection as clients do and waits until the
// server has closed its end, by which time it has unsubscribed the client.
func (c *testClient) leave() {
	c.t.Helper()
	c.writeFrame(true, websocket.CloseFrame, binary.BigEndian.AppendUint16(nil, closeNormal))
	c.expectClose(closeNormal)
}

// names returns the sorted names of an app's nameplates.
func (st registryState) names(app string) []string {
	var names []string
	for name := range st.Apps[app].Nameplates {
		names = append(names, name)
	}
	slices.Sort(names)
	return names
}

// TestPruneIdleChannels checks that a sweep deletes every channel idle for
// the expiry that no connection is subscribed to, keeps younger ones and
// subscribed ones however old, and records each deletion in the journal
// and, as "pruney", in the usage log.
func TestPruneIdleChannels(t *testing.T) {
	cfg := testConfig()
	dir := t.TempDir()
	cfg.channelDB, cfg.usageDB = filepath.Join(dir, "channel.jsonl"), filepath.Join(dir, "usage.jsonl")
	cfg.pruneInterval = 24 * time.Hour // no sweep but the ones called here
	clock := newFakeClock()
	ts := startServerWith(t, cfg, testLogger(t), func(srv *server) { srv.clock = clock.now })
	sweep := func() {
		clock.advance(cfg.channelExpiry + time.Second)
		ts.prune(cfg.channelExpiry)
	}

	// A channel its client left: idle from now on.
	idle, _ := ts.dial(t)
	idle.bind("app", "idle")
	mb := idle.expect(`{"type": "claim", "nameplate": "5"}`, "claimed")[0].str("mailbox")
	idle.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb))
	idle.expect(`{"type": "add", "phase": "pake", "body": "aa"}`, "message")
	idle.leave()
	// A channel whose client stays subscribed, waiting for its peer.
	busy, _ := ts.dial(t)
	busy.bind("app", "busy")
	mb = busy.expect(`{"type": "claim", "nameplate": "6"}`, "claimed")[0].str("mailbox")
	busy.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb))
	// A channel claimed (not subscribed to) a minute before the expiry.
	clock.advance(cfg.channelExpiry - time.Minute)
	young, _ := ts.dial(t)
	young.bind("app", "young")
	young.expect(`{"type": "claim", "nameplate": "7"}`, "claimed")

	clock.advance(time.Minute + time.Second)
	ts.prune(cfg.channelExpiry)
	st := stateOf(ts.reg)
	if got := st.names("app"); !slices.Equal(got, []string{"6", "7"}) || st.Mailboxes != 2 {
		t.Fatalf("after the first sweep: nameplates %v and %d mailboxes, want 6 and 7 and 2", got, st.Mailboxes)
	}
	if got := ts.metrics.nameplates.Value(); got != 2 {
		t.Errorf("nameplates gauge %d, want 2", got)
	}
	sweep()
	if got := stateOf(ts.reg).names("app"); !slices.Equal(got, []string{"6"}) {
		t.Fatalf("after the second sweep: nameplates %v, want only the subscribed 6", got)
	}
	busy.leave()
	sweep()
	if st := stateOf(ts.reg); len(st.Apps) != 0 {
		t.Fatalf("after its client left and a sweep, the registry holds %+v", st)
	}

	ts.stop()
	if st := replayed(t, cfg.channelDB); len(st.Apps) != 0 {
		t.Fatalf("the journal replays pruned channels: %+v", st)
	}
	results := usageResults(t, cfg.usageDB)
	for _, typ := range []string{"nameplate", "mailbox"} {
		if got := results[typ]; !slices.Equal(got, []string{"pruney", "pruney", "pruney"}) {
			t.Errorf("%s usage records: %v, want three pruney", typ, got)
		}
	}
}

// TestPruneAtStart checks that a server prunes, as it starts, the
// channels of its journal that expired while it was down.
func TestPruneAtStart(t *testing.T) {
	now := float64(time.Now().Unix())
	old, recent := now-channelExpiry.Seconds()-60, now-60
	cfg := testConfig()
	cfg.channelDB = writeJournal(t, journalText(
		fmt.Sprintf(`{"kind":"mailbox","app":"a","mailbox":"old","for_nameplate":true,"updated":%v,"sides":[{"side":"s","added":%v,"opened":true}]}`, old, old),
		fmt.Sprintf(`{"kind":"nameplate","app":"a","name":"1","mailbox":"old","sides":[{"side":"s","added":%v,"claimed":true}]}`, old),
		fmt.Sprintf(`{"kind":"message","app":"a","mailbox":"old","side":"s","phase":"pake","body":"aa","server_rx":%v}`, old),
		fmt.Sprintf(`{"kind":"mailbox","app":"a","mailbox":"recent","for_nameplate":true,"updated":%v,"sides":[{"side":"s","added":%v,"opened":true}]}`, recent, recent),
		fmt.Sprintf(`{"kind":"nameplate","app":"a","name":"2","mailbox":"recent","sides":[{"side":"s","added":%v,"claimed":true}]}`, recent),
	))
	cfg.usageDB = filepath.Join(t.TempDir(), "usage.jsonl")
	ts := startServer(t, cfg)
	st := stateOf(ts.reg)
	if _, ok := st.Apps["a"].Mailboxes["recent"]; !ok || st.Mailboxes != 1 || !slices.Equal(st.names("a"), []string{"2"}) {
		t.Fatalf("after start-up: %+v, want only the recent channel", st)
	}
	ts.stop()
	if st := replayed(t, cfg.channelDB); st.Mailboxes != 1 || st.Nameplates != 1 {
		t.Fatalf("the journal after start-up replays %+v", st)
	}
	results := usageResults(t, cfg.usageDB)
	if !slices.Equal(results["nameplate"], []string{"pruney"}) || !slices.Equal(results["mailbox"], []string{"pruney"}) {
		t.Fatalf("usage records %v, want one pruney nameplate and mailbox", results)
	}
}
