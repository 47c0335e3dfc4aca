// fuzz_test.go holds the fuzz targets and the registry's invariants they
// check: FuzzSession drives several connections' protocol state machines
// over one registry with arbitrary message sequences, and FuzzReplay feeds
// arbitrary bytes to journal replay. Run one with, for example,
//
//	go test -run='^$' -fuzz='^FuzzSession$' -fuzztime=10m .
//
// The seed corpus is in testdata/fuzz; plain `go test` runs it.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// checkRegistry checks the registry's invariants; reg.mu must be held.
// live, if not nil, says which sessions are connected: only those may be
// subscribers. withinLimits says the registry was built through the
// protocol, so its limits hold too (a journal may hold more, written
// under other limits).
func checkRegistry(reg *registry, live map[*session]bool, withinLimits bool) error {
	var nameplateN, mailboxN, subscriptions int
	var stored int64
	for id, a := range reg.apps {
		if a.id != id {
			return fmt.Errorf("app %q filed as %q", a.id, id)
		}
		if len(a.nameplates) == 0 && len(a.mailboxes) == 0 {
			return fmt.Errorf("app %q is empty but kept", id)
		}
		var appBytes int64
		for name, np := range a.nameplates {
			if np.name != name {
				return fmt.Errorf("app %q: nameplate %q filed as %q", id, np.name, name)
			}
			if np.mailbox == nil || np.mailbox.deleted || a.mailboxes[np.mailbox.id] != np.mailbox {
				return fmt.Errorf("app %q: nameplate %q points at no live mailbox of its app", id, name)
			}
			if np.mailbox.nameplate != np {
				return fmt.Errorf("app %q: nameplate %q's mailbox does not point back at it", id, name)
			}
			if err := distinctSides(len(np.sides), func(i int) string { return np.sides[i].side }); err != nil {
				return fmt.Errorf("app %q: nameplate %q: %v", id, name, err)
			}
			if withinLimits && len(np.sides) > crowdedSides {
				return fmt.Errorf("app %q: nameplate %q has %d sides", id, name, len(np.sides))
			}
		}
		var short [4]int
		for name := range a.nameplates {
			short[shortName(name)]++
		}
		if short != a.short {
			return fmt.Errorf("app %q: counts short nameplates %v, has %v", id, a.short, short)
		}
		for mid, mb := range a.mailboxes {
			if mb.id != mid || mb.app != a || mb.deleted {
				return fmt.Errorf("app %q: mailbox %q filed as %q (deleted %v)", id, mb.id, mid, mb.deleted)
			}
			if mb.nameplate != nil && a.nameplates[mb.nameplate.name] != mb.nameplate {
				return fmt.Errorf("app %q: mailbox %q points back at a nameplate not in its app", id, mid)
			}
			if err := distinctSides(len(mb.sides), func(i int) string { return mb.sides[i].side }); err != nil {
				return fmt.Errorf("app %q: mailbox %q: %v", id, mid, err)
			}
			size := 0
			for _, m := range mb.messages {
				if m.serverRx > mb.updated {
					return fmt.Errorf("app %q: mailbox %q last active at %v, before its message of %v", id, mid, mb.updated, m.serverRx)
				}
				size += m.size()
				if n := len(messageFrame(m)); n > m.size() {
					return fmt.Errorf("app %q: mailbox %q: a message counts %d bytes, its frame has %d", id, mid, m.size(), n)
				}
			}
			if size != mb.bytes {
				return fmt.Errorf("app %q: mailbox %q counts %d bytes, holds %d", id, mid, mb.bytes, size)
			}
			if withinLimits && (len(mb.sides) > crowdedSides || len(mb.messages) > reg.limits.MaxMessagesPerMailbox || mb.bytes > reg.limits.MaxMailboxBytes) {
				return fmt.Errorf("app %q: mailbox %q over its limits: %d sides, %d messages, %d bytes", id, mid, len(mb.sides), len(mb.messages), mb.bytes)
			}
			for i, s := range mb.subscribers {
				switch {
				case slices.Index(mb.subscribers, s) != i:
					return fmt.Errorf("app %q: mailbox %q has a subscriber twice", id, mid)
				case live != nil && !live[s]:
					return fmt.Errorf("app %q: mailbox %q has a disconnected subscriber", id, mid)
				case s.mailbox != mb || s.appID != id || !s.opened || s.mailboxID != mid:
					return fmt.Errorf("app %q: mailbox %q has a subscriber of app %q, mailbox %q", id, mid, s.appID, s.mailboxID)
				}
			}
			appBytes += int64(mb.bytes)
			subscriptions += len(mb.subscribers)
		}
		if appBytes != a.bytes {
			return fmt.Errorf("app %q counts %d bytes, holds %d", id, a.bytes, appBytes)
		}
		if withinLimits && (len(a.nameplates) > perApp(reg.limits.MaxNameplates) || len(a.mailboxes) > perApp(reg.limits.MaxMailboxes) || a.bytes > perApp(reg.limits.MaxStoredBytes)) {
			return fmt.Errorf("app %q over its share: %d nameplates, %d mailboxes, %d bytes", id, len(a.nameplates), len(a.mailboxes), a.bytes)
		}
		nameplateN += len(a.nameplates)
		mailboxN += len(a.mailboxes)
		stored += appBytes
	}
	switch {
	case nameplateN != reg.nameplateN || int64(nameplateN) != reg.metrics.nameplates.Value():
		return fmt.Errorf("%d nameplates, counted %d (metric %d)", nameplateN, reg.nameplateN, reg.metrics.nameplates.Value())
	case mailboxN != reg.mailboxN || int64(mailboxN) != reg.metrics.mailboxes.Value():
		return fmt.Errorf("%d mailboxes, counted %d (metric %d)", mailboxN, reg.mailboxN, reg.metrics.mailboxes.Value())
	case stored != reg.storedBytes:
		return fmt.Errorf("%d bytes stored, counted %d", stored, reg.storedBytes)
	case subscriptions != reg.subscriptions:
		return fmt.Errorf("%d subscriptions, counted %d", subscriptions, reg.subscriptions)
	case withinLimits && (nameplateN > reg.limits.MaxNameplates || mailboxN > reg.limits.MaxMailboxes || stored > reg.limits.MaxStoredBytes):
		return fmt.Errorf("over the limits: %d nameplates, %d mailboxes, %d bytes", nameplateN, mailboxN, stored)
	}
	if err := checkHoldings(reg, withinLimits); err != nil {
		return err
	}
	for s := range live {
		if s.mailbox != nil && (s.mailbox.deleted || !slices.Contains(s.mailbox.subscribers, s)) {
			return fmt.Errorf("session %q of app %q holds mailbox %q but is not its subscriber", s.side, s.appID, s.mailboxID)
		}
	}
	return nil
}

func distinctSides(n int, side func(int) string) error {
	seen := make(map[string]bool, n)
	for i := range n {
		if seen[side(i)] {
			return fmt.Errorf("side %q recorded twice", side(i))
		}
		seen[side(i)] = true
	}
	return nil
}

// fakeSender is a session's sender without a network: it keeps the frames.
type fakeSender struct {
	frames [][]byte
	held   bool
}

func (f *fakeSender) enqueue(frame []byte, lsn uint64) { f.frames = append(f.frames, frame) }
func (f *fakeSender) hold()                            { f.held = true }
func (f *fakeSender) release(lsn uint64)               { f.held = false }

// fuzzLimits are small, so that short sequences reach every limit.
var fuzzLimits = limits{MaxNameplates: 6, MaxMailboxes: 6, MaxMessagesPerMailbox: 5, MaxMailboxBytes: 3 << 10, MaxStoredBytes: 8 << 10,
	MaxNameplatesPerAddr: 3, MaxMailboxesPerAddr: 3, MaxStoredBytesPerAddr: 4 << 10}

// newBareServer is a server with a registry in memory and no listener.
func newBareServer(l limits, newPerMinute int, clock func() time.Time) *server {
	m := newMetrics()
	return &server{
		reg:     newRegistry(l, true, nil, nil, m),
		metrics: m,
		limiter: newLimiter(0, newPerMinute),
		log:     slog.New(slog.NewTextHandler(io.Discard, nil)),
		clock:   clock,
	}
}

// program reads a fuzzer's input as a sequence of choices; past its end
// every choice is 0.
type program struct{ data []byte }

func (p *program) next() byte {
	if len(p.data) == 0 {
		return 0
	}
	b := p.data[0]
	p.data = p.data[1:]
	return b
}

func (p *program) take(n int) []byte {
	n = min(n, len(p.data))
	b := p.data[:n]
	p.data = p.data[n:]
	return b
}

// value chooses a field's value: absent (nil), a string from pool, a
// string of the fuzzer's (up to 508 bytes, past every length limit), or a
// value of another JSON type.
func (p *program) value(pool []string) json.RawMessage {
	raw := make([]string, len(pool))
	for i, s := range pool {
		raw[i] = string(str(s))
	}
	return p.rawValue(raw)
}

// rawValue is value with a pool of JSON values.
func (p *program) rawValue(pool []string) json.RawMessage {
	k := p.next()
	switch k % 8 {
	case 0:
		return nil
	case 5:
		n := int(p.next())
		if n > 127 {
			n *= 2
		}
		return str(string(p.take(n)))
	case 6:
		return json.RawMessage(strconv.Itoa(int(k)))
	case 7:
		return json.RawMessage([]string{"null", "{}", "[]", "true"}[k/8%4])
	}
	return json.RawMessage(pool[int(k/8)%len(pool)])
}

// object writes a client message with fields in this order, leaving out
// absent ones.
func object(fields ...any) []byte {
	b := []byte("{")
	for i := 0; i < len(fields); i += 2 {
		v := fields[i+1].(json.RawMessage)
		if v == nil {
			continue
		}
		if len(b) > 1 {
			b = append(b, ", "...)
		}
		b = append(append(append(b, strconv.Quote(fields[i].(string))...), ": "...), v...)
	}
	return append(b, '}')
}

func str(s string) json.RawMessage { b, _ := json.Marshal(s); return b }

// The operations of a FuzzSession program. Each step is an operation, the
// session it acts on, and the operation's choices.
const (
	opBind = iota
	opAllocate
	opClaim
	opRelease
	opOpen
	opAdd
	opClose
	opList
	opPing
	opRaw
	opReconnect
	opPrune
	numOps
)

const fuzzSessions = 4

// FuzzSession runs sequences of client messages from several connections
// through their sessions and one registry, and checks after every step:
// the registry's invariants (checkRegistry: counters, limits, subscribers
// are live sessions subscribed back); that a nameplate or mailbox gets a
// third side only in a step answered "crowded"; that no message is added
// to a deleted mailbox; that every message with a type is acknowledged
// first; and that a step delivers nothing to other sessions but messages
// of the acting session's own mailbox.
func FuzzSession(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		now := time.Unix(1_800_000_000, 0)
		srv := newBareServer(fuzzLimits, 4, func() time.Time { return now })
		reg := srv.reg
		p := &program{data: data}

		var sessions [fuzzSessions]*session
		var senders [fuzzSessions]*fakeSender
		live := map[*session]bool{}
		connect := func(i int) {
			senders[i] = &fakeSender{}
			ip := netip.AddrFrom4([4]byte{10, 0, 0, byte(1 + i/2)}) // two sessions to an address
			sessions[i] = &session{srv: srv, out: senders[i], addr: clientAddr{ip: ip}}
			live[sessions[i]] = true
		}
		for i := range sessions {
			connect(i)
		}
		var nameplates, mailboxIDs []string // names and ids the server handed out
		crowded := map[any]bool{}           // nameplates and mailboxes with more than two sides
		deleted := map[*mailbox]int{}       // mailboxes seen, with their message counts once deleted
		seen := map[*mailbox]bool{}         // every mailbox seen in the registry
		pools := func(static ...string) []string { return append(slices.Clone(nameplates), static...) }

		for step := 0; step < 200 && len(p.data) > 0; step++ {
			for _, o := range senders {
				o.frames = nil
			}
			op, i := int(p.next()%numOps), int(p.next()%fuzzSessions)
			s, out := sessions[i], senders[i]
			id := p.value([]string{"0001", "x"})
			var raw []byte
			switch op {
			case opBind:
				raw = object("type", str("bind"), "appid", p.value([]string{"a", "b"}), "side", p.value([]string{"s1", "s2", "s3", "s4"}),
					"client_version", p.rawValue([]string{`["python", "0.14.0"]`, `["go", null, "extra"]`, `["x"]`}), "id", id)
			case opAllocate:
				raw = object("type", str("allocate"), "id", id)
			case opClaim:
				raw = object("type", str("claim"), "nameplate", p.value(pools("1", "2", "3", "7")), "id", id)
			case opRelease:
				raw = object("type", str("release"), "nameplate", p.value(pools("1", "2")), "id", id)
			case opOpen:
				raw = object("type", str("open"), "mailbox", p.value(append(slices.Clone(mailboxIDs), "m1", "m2")), "id", id)
			case opAdd:
				raw = object("type", str("add"), "phase", p.value([]string{"pake", "version", "0"}),
					"body", p.value([]string{"", "aabb", strings.Repeat("0f", 700)}), "id", id)
			case opClose:
				raw = object("type", str("close"), "mailbox", p.value(append(slices.Clone(mailboxIDs), "m1")),
					"mood", p.value([]string{"happy", "lonely", "scary", "errory"}), "id", id)
			case opList:
				raw = object("type", str("list"), "id", id)
			case opPing:
				raw = object("type", str("ping"), "ping", p.value([]string{"x"}), "id", id)
			case opRaw:
				raw = p.take(int(p.next()))
			case opReconnect:
				s.disconnected()
				delete(live, s)
				connect(i)
			case opPrune:
				now = now.Add(time.Duration(p.next()) * 10 * time.Second)
				reg.mu.Lock()
				reg.pruneLocked(srv.now(), srv.now()-channelExpiry.Seconds())
				reg.mu.Unlock()
			}
			var mailboxBefore *mailbox
			if raw != nil {
				reg.mu.Lock()
				mailboxBefore = s.mailbox
				reg.mu.Unlock()
				if err := s.handle(raw); err != nil && err != errBadInput {
					t.Fatalf("step %d: %s: handle: %v", step, raw, err)
				}
				if out.held {
					t.Fatalf("step %d: %s: sender still held", step, raw)
				}
			}

			// What the step sent.
			stepCrowded := false
			for j, o := range senders {
				for k, frame := range o.frames {
					var m map[string]any
					if err := json.Unmarshal(frame, &m); err != nil {
						t.Fatalf("step %d: %s: bad frame %q: %v", step, raw, frame, err)
					}
					typ, _ := m["type"].(string)
					if j != i {
						if typ != "message" || mailboxBefore == nil || sessions[j].mailbox != mailboxBefore {
							t.Fatalf("step %d: %s: session %d, not of the sender's mailbox, got %s", step, raw, j, frame)
						}
						continue
					}
					if k == 0 && typ != "ack" && typ != "error" {
						t.Fatalf("step %d: %s: first frame %s, want an ack (or an error for no type)", step, raw, frame)
					}
					switch typ {
					case "error":
						stepCrowded = stepCrowded || m["error"] == string(errCrowded)
					case "allocated":
						nameplates = append(nameplates, m["nameplate"].(string))
					case "claimed":
						mailboxIDs = append(mailboxIDs, m["mailbox"].(string))
					}
				}
			}

			reg.mu.Lock()
			if err := checkRegistry(reg, live, true); err != nil {
				reg.mu.Unlock()
				t.Fatalf("step %d: %s: %v", step, raw, err)
			}
			for _, a := range reg.apps {
				for _, np := range a.nameplates {
					if len(np.sides) > crowdedSides && !crowded[np] {
						if !stepCrowded {
							t.Fatalf("step %d: %s: nameplate %q got a third side without a crowded error", step, raw, np.name)
						}
						crowded[np] = true
					}
				}
				for _, mb := range a.mailboxes {
					seen[mb] = true
					if len(mb.sides) > crowdedSides && !crowded[mb] {
						if !stepCrowded {
							t.Fatalf("step %d: %s: mailbox %q got a third side without a crowded error", step, raw, mb.id)
						}
						crowded[mb] = true
					}
				}
			}
			for mb := range seen {
				if mb.app.mailboxes[mb.id] == mb && reg.apps[mb.app.id] == mb.app {
					continue
				}
				if !mb.deleted {
					t.Fatalf("step %d: %s: mailbox %q left the registry without being deleted", step, raw, mb.id)
				}
				if n, ok := deleted[mb]; !ok {
					deleted[mb] = len(mb.messages)
				} else if n != len(mb.messages) {
					t.Fatalf("step %d: %s: a message was added to deleted mailbox %q", step, raw, mb.id)
				}
			}
			reg.mu.Unlock()
		}
	})
}

// FuzzReplay feeds arbitrary bytes to journal replay. It must end in an
// error or in a valid registry, never panic; a valid registry survives a
// compaction (its snapshot replays to the same state) and then serves the
// protocol.
func FuzzReplay(f *testing.F) {
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		reg, _, err := replayBytes(t, dir, data)
		if err != nil {
			return
		}
		reg.mu.Lock()
		if err := checkRegistry(reg, nil, false); err != nil {
			reg.mu.Unlock()
			t.Fatalf("after replay: %v", err)
		}
		reg.mu.Unlock()
		snap, _, _ := reg.snapshot(&store{})
		reg2, _, err := replayBytes(t, dir, snap)
		if err != nil {
			t.Fatalf("replaying the snapshot: %v\n%s", err, snap)
		}
		if a, b := dumpRegistry(reg), dumpRegistry(reg2); a != b {
			t.Fatalf("snapshot changed the state:\n%s\nbecame\n%s", a, b)
		}

		// The restored channels serve the protocol: a new side joins each,
		// at a time after every time in the journal, as the server's clock
		// would be.
		reg.mu.Lock()
		defer reg.mu.Unlock()
		now := 2e9
		for _, a := range reg.apps {
			for _, mb := range a.mailboxes {
				now = max(now, mb.updated+1)
			}
		}
		for _, a := range reg.apps {
			for name := range a.nameplates {
				reg.claimLocked(a.id, name, "newcomer", netip.Addr{}, now)
				reg.releaseLocked(a.id, name, "newcomer", now)
			}
		}
		for _, a := range reg.apps {
			for id, mb := range a.mailboxes {
				if mb.deleted {
					continue
				}
				if _, err := reg.openLocked(a, id, "newcomer", netip.Addr{}, now); err == nil {
					reg.addLocked(mb, message{side: "newcomer", phase: "p", body: "b", serverRx: now, id: jsonNull}, netip.Addr{})
				}
				reg.closeLocked(a, id, "newcomer", "happy", now)
			}
		}
		if err := checkRegistry(reg, nil, false); err != nil {
			t.Fatalf("after serving: %v", err)
		}
		reg.pruneLocked(now, math.Inf(1))
		if err := checkRegistry(reg, nil, false); err != nil {
			t.Fatalf("after pruning: %v", err)
		}
		if len(reg.apps) != 0 {
			t.Fatalf("pruning everything left %d apps", len(reg.apps))
		}
	})
}

// replayBytes replays data as a journal file into a new registry.
func replayBytes(t *testing.T, dir string, data []byte) (*registry, int64, error) {
	path := filepath.Join(dir, "journal.jsonl")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	reg := newRegistry(defaultLimits, true, nil, nil, newMetrics())
	r, err := replay(context.Background(), f, path, reg)
	return reg, r.good, err
}

// dumpRegistry writes the registry's state as sorted lines, to compare.
func dumpRegistry(reg *registry) string {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	num := func(f float64) string { return strconv.FormatFloat(f+0, 'g', -1, 64) } // -0 is written as 0
	var lines []string
	for _, a := range reg.apps {
		for _, np := range a.nameplates {
			line := fmt.Sprintf("app %q nameplate %q -> %q:", a.id, np.name, np.mailbox.id)
			for _, s := range np.sides {
				line += fmt.Sprintf(" %q %v %s", s.side, s.claimed, num(s.added))
			}
			lines = append(lines, line)
		}
		for _, mb := range a.mailboxes {
			line := fmt.Sprintf("app %q mailbox %q %v %s:", a.id, mb.id, mb.forNameplate, num(mb.updated))
			for _, s := range mb.sides {
				line += fmt.Sprintf(" %q %v %s %q", s.side, s.opened, num(s.added), s.mood)
			}
			for _, m := range mb.messages {
				id, _ := json.Marshal(m.id) // compacted, as the journal writes it
				line += fmt.Sprintf(" [%q %q %q %s %s]", m.side, m.phase, m.body, num(m.serverRx), id)
			}
			lines = append(lines, line)
		}
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}
