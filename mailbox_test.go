// mailbox_test.go tests the registry directly: newRegistry (through
// newBareServer), and sessions whose sender keeps the frames, with no
// WebSocket and no network, so that each rule of mailbox.go and quota.go
// is seen on its own.
package main

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

// regFixture is a bare server with a registry and a settable clock.
type regFixture struct {
	srv *server
	reg *registry
	now float64
}

func newRegFixture(l limits) *regFixture {
	f := &regFixture{now: 1_000_000}
	f.srv = newBareServer(l, 0, func() time.Time { return time.Unix(int64(f.now), 0) })
	f.reg = f.srv.reg
	return f
}

// session returns a bound session for app and side, from addr, with a
// fake sender.
func (f *regFixture) session(app, side, addr string) (*session, *fakeSender) {
	out := &fakeSender{}
	s := &session{srv: f.srv, out: out, addr: clientAddr{ip: netip.MustParseAddr(addr)}, bound: true, appID: app, side: side}
	return s, out
}

var ip1, ip2 = netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.2")

func TestRegistryAllocatePrefersShortNames(t *testing.T) {
	f := newRegFixture(defaultLimits)
	var names []string
	for i := range 12 {
		name, err := f.reg.allocateLocked("app", "side"+strings.Repeat("x", i), ip1, f.now)
		if err != nil {
			t.Fatalf("allocate %d: %v", i, err)
		}
		names = append(names, name)
	}
	for i, name := range names {
		want := 1
		if i >= 9 {
			want = 2
		}
		if len(name) != want {
			t.Errorf("allocation %d is %q: want %d digits (names %v)", i, name, want, names)
		}
	}
	if len(slices.Compact(slices.Sorted(slices.Values(names)))) != len(names) {
		t.Errorf("a name was allocated twice: %v", names)
	}
}

func TestRegistryLifeCycle(t *testing.T) {
	f := newRegFixture(defaultLimits)
	r := f.reg
	idA, err := r.claimLocked("app", "4", "a", ip1, f.now)
	if err != nil {
		t.Fatal(err)
	}
	idB, err := r.claimLocked("app", "4", "b", ip2, f.now)
	if err != nil || idB != idA {
		t.Fatalf("second side's claim: %q, %v; want %q", idB, err, idA)
	}
	if again, err := r.claimLocked("app", "4", "a", ip1, f.now); err != nil || again != idA {
		t.Fatalf("same side claiming again: %q, %v; want %q and no change", again, err, idA)
	}
	a := r.appLocked("app")
	sa, outA := f.session("app", "a", "127.0.0.1")
	sb, outB := f.session("app", "b", "127.0.0.2")
	for _, s := range []*session{sa, sb} {
		mb, err := r.openLocked(a, idA, s.side, s.holder(), f.now)
		if err != nil {
			t.Fatal(err)
		}
		s.mailbox = mb
		r.subscribeLocked(mb, s)
	}
	if err := r.addLocked(sa.mailbox, message{side: "a", phase: "pake", body: "00", serverRx: f.now, id: jsonNull}, ip1); err != nil {
		t.Fatal(err)
	}
	for name, out := range map[string]*fakeSender{"a": outA, "b": outB} {
		if len(out.frames) != 1 || !strings.Contains(string(out.frames[0]), `"phase": "pake"`) {
			t.Errorf("side %s got %q, want the one message", name, out.frames)
		}
	}
	r.releaseLocked("app", "4", "a", f.now)
	if a.nameplates["4"] == nil {
		t.Fatal("the nameplate went while side b still claims it")
	}
	if _, err := r.claimLocked("app", "4", "a", ip1, f.now); !errors.Is(err, errReclaimed) {
		t.Errorf("claim after release: %v, want %v", err, errReclaimed)
	}
	r.releaseLocked("app", "4", "b", f.now)
	if a.nameplates["4"] != nil || a.mailboxes[idA] == nil {
		t.Fatal("after both releases the nameplate must go and its mailbox stay")
	}
	for _, s := range []*session{sa, sb} {
		r.unsubscribeLocked(s.mailbox, s)
		r.closeLocked(a, idA, s.side, "happy", f.now)
		if s.side == "a" && a.mailboxes[idA] == nil {
			t.Fatal("the mailbox went while side b has it open")
		}
	}
	if a.mailboxes[idA] != nil {
		t.Error("the mailbox stayed after every side closed it")
	}
	r.dropIfEmptyLocked(a)
	if n, m, msgs := r.count(); n+m+msgs != 0 {
		t.Errorf("left %d nameplates, %d mailboxes, %d messages", n, m, msgs)
	}
	if got := r.held; len(got) != 0 {
		t.Errorf("addresses still hold %v after everything closed", got)
	}
}

func TestRegistryCrowded(t *testing.T) {
	f := newRegFixture(defaultLimits)
	r := f.reg
	id, _ := r.claimLocked("app", "7", "a", ip1, f.now)
	r.claimLocked("app", "7", "b", ip1, f.now)
	if _, err := r.claimLocked("app", "7", "c", ip2, f.now); !errors.Is(err, errCrowded) {
		t.Errorf("third side's claim: %v, want %v", err, errCrowded)
	}
	a := r.appLocked("app")
	if _, err := r.openLocked(a, id, "c", ip2, f.now); !errors.Is(err, errCrowded) {
		t.Errorf("third side's open: %v, want %v", err, errCrowded)
	}
	if _, err := r.openLocked(a, id, "a", ip1, f.now); err != nil {
		t.Errorf("an owner re-opening after the crowding: %v", err)
	}
	if h := r.held[ip2]; h != (holdings{}) {
		t.Errorf("the refused side's address holds %+v, want nothing", h)
	}
}

func TestRegistryListSorted(t *testing.T) {
	f := newRegFixture(defaultLimits)
	for _, name := range []string{"2", "10", "1", "300"} {
		if _, err := f.reg.claimLocked("app", name, "a"+name, ip1, f.now); err != nil {
			t.Fatal(err)
		}
	}
	f.reg.claimLocked("other", "5", "x", ip1, f.now)
	if got, want := f.reg.listLocked("app"), []string{"1", "10", "2", "300"}; !slices.Equal(got, want) {
		t.Errorf("list: %v, want %v", got, want)
	}
	if got := f.reg.listLocked("nobody"); len(got) != 0 {
		t.Errorf("list of an unknown app: %v", got)
	}
}

func TestRegistryPrune(t *testing.T) {
	f := newRegFixture(defaultLimits)
	r := f.reg
	r.claimLocked("app", "1", "a", ip1, f.now) // left alone
	id, _ := r.claimLocked("app", "2", "a", ip1, f.now)
	s, _ := f.session("app", "a", "127.0.0.1")
	a := r.appLocked("app")
	mb, _ := r.openLocked(a, id, "a", ip1, f.now)
	r.subscribeLocked(mb, s) // someone connected: kept
	later := f.now + 3600
	if n, m := r.pruneLocked(later, later-60); n != 1 || m != 1 {
		t.Errorf("pruned %d nameplates and %d mailboxes, want 1 and 1", n, m)
	}
	if a.nameplates["1"] != nil || a.nameplates["2"] == nil {
		t.Errorf("pruning kept %v, want only the nameplate with a subscriber", slices.Sorted(func(yield func(string) bool) {
			for k := range a.nameplates {
				yield(k)
			}
		}))
	}
}

func TestRegistryPerAppShare(t *testing.T) {
	l := defaultLimits
	l.MaxNameplates, l.MaxMailboxes = 4, 4
	f := newRegFixture(l)
	for i := range perApp(l.MaxNameplates) {
		if _, err := f.reg.allocateLocked("flood", string(rune('a'+i)), netip.Addr{}, f.now); err != nil {
			t.Fatalf("allocation %d within the app's share: %v", i, err)
		}
	}
	if _, err := f.reg.allocateLocked("flood", "z", netip.Addr{}, f.now); !errors.Is(err, errTooManyNameplates) {
		t.Errorf("past the app's share: %v, want %v", err, errTooManyNameplates)
	}
	if _, err := f.reg.allocateLocked("wormhole", "a", netip.Addr{}, f.now); err != nil {
		t.Errorf("another app, with the first at its share: %v", err)
	}
}

func TestRegistryAddressHoldings(t *testing.T) {
	l := defaultLimits
	l.MaxNameplatesPerAddr = 2
	f := newRegFixture(l)
	r := f.reg
	for _, name := range []string{"1", "2"} {
		if err := r.roomForAddrLocked(ip1, holdings{nameplates: 1}); err != nil {
			t.Fatalf("room for nameplate %s: %v", name, err)
		}
		r.claimLocked("app", name, "a", ip1, f.now)
	}
	if got := r.held[ip1]; got.nameplates != 2 || got.mailboxes != 2 {
		t.Errorf("address holds %+v, want 2 nameplates and 2 mailboxes", got)
	}
	if err := r.roomForAddrLocked(ip1, holdings{nameplates: 1}); !errors.Is(err, errAddrNameplates) {
		t.Errorf("a third nameplate: %v, want %v", err, errAddrNameplates)
	}
	if err := r.roomForAddrLocked(ip2, holdings{nameplates: 1}); err != nil {
		t.Errorf("another address: %v", err)
	}
	r.releaseLocked("app", "1", "a", f.now)
	if err := r.roomForAddrLocked(ip1, holdings{nameplates: 1}); err != nil {
		t.Errorf("after a release: %v", err)
	}
}
