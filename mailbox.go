// mailbox.go owns the registry: every app, nameplate, mailbox, side and
// stored message, and which connections are subscribed to which mailbox.
// One mutex guards all of it. Nothing here touches the network: sending is
// done by handing encoded frames to a connection's outbox, which never
// blocks (see outbox.go).
//
// The rules are the reference server's (PROTOCOL.md §8, §9, §10, §12):
// a nameplate is a short name pointing at one mailbox; a mailbox holds an
// append-only list of messages; at most two sides may share either; both
// go away when every side has released or closed them, or when they have
// been idle long enough to be pruned.
package main

import (
	"bytes"
	"crypto/rand"
	"encoding/base32"
	"encoding/json"
	mrand "math/rand/v2"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
)

// Registry limits. Each exists so that no client, however it behaves, can
// make the server hold more than a bounded amount of state; the defaults are
// far above what real transfers use (a file transfer stores under ten
// messages of a few KiB) and are set with flags (see main.go).
//
// The defaults are sized for the smallest machine the server should run
// on, a 1 GiB VPS. The costs they bound, measured: a nameplate with its
// mailbox costs about 350 bytes, and up to 1.7 KiB when each is in an app
// of its own with the longest names and sides allowed; a stored message
// costs its size (see message.size) and no more. Compacting the journal
// briefly holds a second copy of all of it.
type limits struct {
	// MaxNameplates and MaxMailboxes bound the whole server, and one app
	// may hold at most 1/appShare of each (see perApp).
	MaxNameplates int
	MaxMailboxes  int
	// MaxMailboxBytes bounds one mailbox, and is its real bound: a file
	// transfer stores fewer than ten messages, but a Dilation session
	// adds 4-6 messages of about 450 bytes (see message.size) at every
	// reconnection, and a Python client treats the refusal as fatal, so
	// the bound is set in bytes, where it also bounds memory. A full
	// mailbox, replayed, fits in a connection's outbox (maxOutboxBytes).
	// MaxMessagesPerMailbox only backs it up: at the defaults it is
	// never met first, since a message counts at least 120 bytes.
	MaxMessagesPerMailbox int
	MaxMailboxBytes       int
	// MaxStoredBytes bounds all stored messages together, so that memory
	// stays bounded however many mailboxes are in use; one app may hold
	// at most 1/appShare of it.
	MaxStoredBytes int64
	// MaxNameplatesPerAddr, MaxMailboxesPerAddr and MaxStoredBytesPerAddr
	// bound what one client address holds at once (see quota.go), so
	// that a few addresses cannot fill the pools above; 0: no limit.
	MaxNameplatesPerAddr  int
	MaxMailboxesPerAddr   int
	MaxStoredBytesPerAddr int64
}

// defaultLimits are generous enough that no real client meets them and
// small enough that a 1 GiB machine survives a flood: at their worst
// (every nameplate and mailbox in an app of its own, with the longest
// names, and every stored byte used) they hold about 45 MiB of channels
// and 64 MiB of messages, twice that while the journal is compacted.
// 25,000 channels are 25,000 transfers under way at once, or senders
// waiting for their receivers; one app may hold half of them.
//
// The per-address limits are sized so that 64 addresses, holding all
// they may, leave room in every pool of one app (the wormhole app's
// included), and a NAT with a hundred people waiting behind it works:
//
//   - nameplates: 64 x 128 = 8,192 < 12,500, one app's half of 25,000;
//   - mailboxes:  64 x 128 = 8,192 < 12,500, likewise;
//   - stored bytes: 64 x 576 KiB = 36 MiB < 40 MiB, one app's half of
//     80 MiB. 576 KiB is one text of the largest message a client may
//     send (maxMessageBytes, 512 KiB), with 64 KiB to spare for the
//     other transfers behind the same address. 80 MiB, twice while the
//     journal is compacted, keeps a server whose store is full well
//     under 256 MiB.
var defaultLimits = limits{
	MaxNameplates:         25_000,
	MaxMailboxes:          25_000,
	MaxMessagesPerMailbox: 100_000,
	MaxMailboxBytes:       1 << 20,
	MaxStoredBytes:        80 << 20,
	MaxNameplatesPerAddr:  128,
	MaxMailboxesPerAddr:   128,
	MaxStoredBytesPerAddr: 576 << 10,
}

// appShare divides every server-wide limit into what one app may use: an
// app may hold at most half of the server's nameplates, mailboxes and
// stored messages, so a flood confined to one app namespace leaves the
// other half to the rest. It is not a flag of its own: an operator sizes
// the server, and the share follows.
const appShare = 2

// perApp is one app's share of a server-wide limit.
func perApp[T int | int64](total T) T { return (total + appShare - 1) / appShare }

// crowdedSides is the most sides a nameplate or mailbox records: a
// wormhole connects exactly two parties. A third side is refused
// ("crowded") without being recorded, and the channel is flagged so that
// its usage record still says "crowded". The reference records the third
// side, after which its two owners cannot re-open their own mailbox;
// here a side already recorded always can (a deliberate difference).
const crowdedSides = 2

// Allocation tries these many random names in 1000–999999 once every name
// of up to three digits is taken, as the reference does (PROTOCOL.md §8.1).
const (
	allocateRandomTries = 1000
	allocateRandomMin   = 1000
	allocateRandomMax   = 999_999
)

// registry holds all channel state. Methods whose names end in Locked must
// be called with mu held.
type registry struct {
	limits    limits
	allowList bool      // false: "list" answers with no nameplates (--disallow-list)
	journal   *store    // where every change is recorded; nil keeps state in memory only
	usage     *usageLog // where retired channels are summarised; nil when off
	metrics   *metrics

	// mu guards everything below, and the protocol state of every session.
	mu            sync.Mutex
	apps          map[string]*app
	held          map[netip.Addr]holdings // what each client address holds (quota.go)
	nameplateN    int                     // nameplates in all apps
	mailboxN      int                     // mailboxes in all apps
	storedBytes   int64                   // bodies of all stored messages
	subscriptions int                     // (connection, mailbox) pairs, the reference's "connections_websocket"
}

// app is one application namespace (an appid). Apps are created on first
// use and dropped when they hold nothing, so made-up appids cost nothing
// once their channels are gone.
type app struct {
	id         string
	nameplates map[string]*nameplate
	mailboxes  map[string]*mailbox
	bytes      int64  // sizes of the messages stored in its mailboxes
	short      [4]int // nameplates named 1-999 by number of digits (short[0] counts the others)
}

// nameplate is the short name that points two sides at one mailbox.
type nameplate struct {
	name    string
	mailbox *mailbox
	sides   []nameplateSide
	crowded bool // a third side tried to claim it (not journalled)
}

type nameplateSide struct {
	side    string
	claimed bool       // false once the side has released the nameplate
	added   float64    // time of the side's first claim
	holder  netip.Addr // the address its claim is charged to; zero for none
}

// mailbox holds the messages two sides exchange.
type mailbox struct {
	app          *app
	id           string
	forNameplate bool    // created by a claim rather than by a bare open
	updated      float64 // last activity; pruning deletes mailboxes idle too long
	sides        []mailboxSide
	messages     []message // only ever appended to (the journal's snapshot relies on it)
	bytes        int       // sizes of its messages, for the per-mailbox limit
	subscribers  []*session
	nameplate    *nameplate // the nameplate pointing at this mailbox, if any
	deleted      bool       // set when removed from its app, so stale pointers are harmless
	crowded      bool       // a third side tried to open it (not journalled)
	charges      []charge   // which addresses its messages' bytes are charged to
}

type mailboxSide struct {
	side   string
	opened bool       // false once the side has closed the mailbox
	added  float64    // time of the side's first open (or claim)
	mood   string     // what the side reported at close; "" if nothing
	holder netip.Addr // the address its open is charged to; zero for none
}

// message is one stored "add": what the side sent and when it arrived.
type message struct {
	side     string
	phase    string
	body     string
	serverRx float64
	id       json.RawMessage // the add's "id", any JSON value, echoed as received
}

// size is what a message counts against the mailbox and server limits:
// the length of the frame that delivers it to a subscriber. That is also
// what a replay of it queues for a client, and more than the message costs
// to keep in memory or to write in the journal, so the limits on stored
// bytes bound all three. (Its fields alone would not: an empty message
// still costs about a hundred bytes to keep, and a body of control
// characters takes six bytes per character to send. Nor would the id as
// it came: it is sent re-encoded, which can make it three times longer.)
func (m message) size() int {
	return pyStringLen(m.side) + pyStringLen(m.phase) + pyStringLen(m.body) +
		echoedLen(m.id) + messageFrameOverhead
}

func newRegistry(l limits, allowList bool, journal *store, usage *usageLog, m *metrics) *registry {
	return &registry{
		limits:    l,
		allowList: allowList,
		journal:   journal,
		usage:     usage,
		metrics:   m,
		apps:      make(map[string]*app),
		held:      make(map[netip.Addr]holdings),
	}
}

// count returns how many nameplates, mailboxes and stored messages the
// registry holds.
func (r *registry) count() (nameplates, mailboxes, messages int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, a := range r.apps {
		for _, mb := range a.mailboxes {
			messages += len(mb.messages)
		}
	}
	return r.nameplateN, r.mailboxN, messages
}

// appLocked returns the app with this id, creating it if needed.
func (r *registry) appLocked(id string) *app {
	a := r.apps[id]
	if a == nil {
		a = &app{id: id, nameplates: make(map[string]*nameplate), mailboxes: make(map[string]*mailbox)}
		r.apps[id] = a
	}
	return a
}

// dropIfEmptyLocked forgets an app that holds nothing any more.
func (r *registry) dropIfEmptyLocked(a *app) {
	if len(a.nameplates) == 0 && len(a.mailboxes) == 0 {
		delete(r.apps, a.id)
	}
}

// nameplateHasSideLocked reports whether side is recorded on the app's
// nameplate of this name. The protocol asks it only of a nameplate the
// connection was given, so it tells nothing about others.
func (r *registry) nameplateHasSideLocked(appID, name, side string) bool {
	a := r.apps[appID]
	if a == nil || a.nameplates[name] == nil {
		return false
	}
	return slices.ContainsFunc(a.nameplates[name].sides, func(s nameplateSide) bool { return s.side == side })
}

// mailboxHasSideLocked reports whether side is recorded on the app's
// mailbox of this id; like nameplateHasSideLocked, it is asked only of
// the mailbox the connection's claim returned.
func (r *registry) mailboxHasSideLocked(appID, id, side string) bool {
	a := r.apps[appID]
	return a != nil && a.mailboxes[id] != nil && a.mailboxes[id].hasSide(side)
}

// listLocked returns the names of the app's nameplates sorted as strings,
// as the reference does ("10" sorts before "2").
func (r *registry) listLocked(appID string) []string {
	a := r.apps[appID]
	if !r.allowList || a == nil {
		return nil
	}
	names := make([]string, 0, len(a.nameplates))
	for name := range a.nameplates {
		names = append(names, name)
	}
	slices.Sort(names)
	return names
}

// allocateLocked picks a free nameplate (PROTOCOL.md §8.1) and claims it for side,
// charging the claim to addr.
func (r *registry) allocateLocked(appID, side string, addr netip.Addr, now float64) (string, error) {
	a := r.appLocked(appID)
	name, ok := a.freeNameplate()
	if !ok {
		r.dropIfEmptyLocked(a)
		return "", errNoFreeNameplate
	}
	if _, err := r.claimLocked(appID, name, side, addr, now); err != nil {
		return "", err
	}
	return name, nil
}

// shortNames are the names allocation prefers, "1" to "999", made once.
var shortNames = func() (names [1000]string) {
	for n := 1; n < len(names); n++ {
		names[n] = strconv.Itoa(n)
	}
	return names
}()

// shortName returns how many digits name has if it is one of shortNames,
// or 0.
func shortName(name string) int {
	if len(name) == 0 || len(name) > 3 || name[0] == '0' || !validNameplate(name) {
		return 0
	}
	return len(name)
}

// freeNameplate chooses a random unused name, preferring the shortest: one
// digit, then two, then three; past that a random number up to 999999. A
// range every name of which is taken is skipped without looking at it, so
// allocating stays cheap however many channels wait.
func (a *app) freeNameplate() (string, bool) {
	for digits, low := 1, 1; digits <= 3; digits, low = digits+1, low*10 {
		if a.short[digits] == 9*low {
			continue
		}
		var free []string
		for n := low; n < 10*low; n++ {
			if a.nameplates[shortNames[n]] == nil {
				free = append(free, shortNames[n])
			}
		}
		if len(free) > 0 {
			return free[mrand.IntN(len(free))], true
		}
	}
	for range allocateRandomTries {
		s := strconv.Itoa(allocateRandomMin + mrand.IntN(allocateRandomMax-allocateRandomMin+1))
		if a.nameplates[s] == nil {
			return s, true
		}
	}
	return "", false
}

// claimLocked claims nameplate name for side (PROTOCOL.md §8.2) and returns the id of
// its mailbox. A new name creates the nameplate and a new mailbox. Claiming
// also opens the mailbox for the side. A new side's claim and open are
// charged to addr. A third side, on the nameplate or its mailbox, gets
// errCrowded and is not recorded (see crowdedSides); a side that already
// released this nameplate gets errReclaimed.
func (r *registry) claimLocked(appID, name, side string, addr netip.Addr, now float64) (string, error) {
	a := r.appLocked(appID)
	np := a.nameplates[name]
	if np == nil {
		if err := r.roomForNameplateLocked(a); err != nil {
			r.dropIfEmptyLocked(a)
			return "", err
		}
		mb, err := r.createMailboxLocked(a, newMailboxID(a), true, now)
		if err != nil {
			r.dropIfEmptyLocked(a)
			return "", err
		}
		np = r.addNameplateLocked(a, name, mb)
	}
	i := slices.IndexFunc(np.sides, func(s nameplateSide) bool { return s.side == side })
	if i >= 0 && !np.sides[i].claimed {
		return "", errReclaimed
	}
	if i < 0 {
		mb := np.mailbox
		if len(np.sides) >= crowdedSides || !mb.hasSide(side) && len(mb.sides) >= crowdedSides {
			np.crowded, mb.crowded = true, true
			return "", errCrowded
		}
		np.sides = append(np.sides, nameplateSide{side: side, claimed: true, added: now, holder: addr})
		r.holdLocked(addr, holdings{nameplates: 1})
		r.journal.nameplate(a, np)
	}
	if _, err := r.openLocked(a, np.mailbox.id, side, addr, now); err != nil {
		return "", err
	}
	return np.mailbox.id, nil
}

// releaseLocked releases side's claim on a nameplate (PROTOCOL.md §8.3). Unknown
// nameplates and sides are ignored. When no side holds a claim any more the
// nameplate is deleted; its mailbox stays until its sides close it.
func (r *registry) releaseLocked(appID, name, side string, now float64) {
	a := r.apps[appID]
	if a == nil || a.nameplates[name] == nil {
		return
	}
	np := a.nameplates[name]
	i := slices.IndexFunc(np.sides, func(s nameplateSide) bool { return s.side == side })
	if i < 0 {
		return
	}
	r.refundClaimLocked(&np.sides[i])
	np.sides[i].claimed = false
	if slices.ContainsFunc(np.sides, func(s nameplateSide) bool { return s.claimed }) {
		r.journal.nameplate(a, np)
		return
	}
	r.deleteNameplateLocked(a, np, now, false)
	r.dropIfEmptyLocked(a)
}

// openLocked opens mailbox id for side (PROTOCOL.md §9.1), creating it if it does not
// exist, and charges a new side's open to addr. It refreshes the
// mailbox's activity time. A third side gets errCrowded and is not
// recorded; a side already recorded may always open it again.
func (r *registry) openLocked(a *app, id, side string, addr netip.Addr, now float64) (*mailbox, error) {
	mb := a.mailboxes[id]
	if mb == nil {
		var err error
		if mb, err = r.createMailboxLocked(a, id, false, now); err != nil {
			return nil, err
		}
	}
	if !mb.hasSide(side) {
		if len(mb.sides) >= crowdedSides {
			mb.crowded = true
			return nil, errCrowded
		}
		mb.sides = append(mb.sides, mailboxSide{side: side, opened: true, added: now, holder: addr})
		r.holdLocked(addr, holdings{mailboxes: 1})
	}
	mb.updated = now
	r.journal.mailbox(mb)
	return mb, nil
}

// hasSide reports whether side is recorded on mb.
func (mb *mailbox) hasSide(side string) bool {
	return slices.ContainsFunc(mb.sides, func(s mailboxSide) bool { return s.side == side })
}

// createMailboxLocked adds an empty mailbox to the app, if the limits allow.
func (r *registry) createMailboxLocked(a *app, id string, forNameplate bool, now float64) (*mailbox, error) {
	if len(a.mailboxes) >= perApp(r.limits.MaxMailboxes) || r.mailboxN >= r.limits.MaxMailboxes {
		r.metrics.refused("too many mailboxes")
		return nil, errTooManyMailboxes
	}
	mb := &mailbox{app: a, id: id, forNameplate: forNameplate, updated: now}
	a.mailboxes[id] = mb
	r.mailboxN++
	r.metrics.mailboxes.Add(1)
	r.journal.mailbox(mb)
	return mb, nil
}

func (r *registry) roomForNameplateLocked(a *app) error {
	if len(a.nameplates) >= perApp(r.limits.MaxNameplates) || r.nameplateN >= r.limits.MaxNameplates {
		r.metrics.refused("too many nameplates")
		return errTooManyNameplates
	}
	return nil
}

// addLocked stores a message in mb, charged to addr, and hands it to
// every subscriber, the sender's own connection included, in the same
// order for all.
func (r *registry) addLocked(mb *mailbox, m message, addr netip.Addr) error {
	m.id = compactJSON(m.id)
	size := m.size()
	switch {
	case len(mb.messages) >= r.limits.MaxMessagesPerMailbox:
		r.metrics.refused("too many messages")
		return errTooManyMessages
	case mb.bytes+size > r.limits.MaxMailboxBytes:
		r.metrics.refused("mailbox full")
		return errMailboxFull
	}
	if err := r.roomForAddrLocked(addr, holdings{bytes: int64(size)}); err != nil {
		return err
	}
	switch {
	case mb.app.bytes+int64(size) > perApp(r.limits.MaxStoredBytes),
		r.storedBytes+int64(size) > r.limits.MaxStoredBytes:
		r.metrics.refused("stored bytes")
		return errStoreFull
	}
	r.storeLocked(mb, m, size)
	r.chargeBytesLocked(mb, addr, int64(size))
	r.journal.message(mb, m)
	r.metrics.messages.Add(1)
	r.metrics.delivered.Add(int64(len(mb.subscribers)))
	frame := messageFrame(m)
	for _, s := range mb.subscribers {
		s.send(frame)
	}
	return nil
}

// compactJSON returns a JSON value without insignificant white space. A
// message's id is stored so, because the journal can store it no other
// way: a message is then the same bytes when first delivered and when
// replayed after a restart.
func compactJSON(v json.RawMessage) json.RawMessage {
	if !bytes.ContainsAny(v, " \t\r\n") {
		return v
	}
	var b bytes.Buffer
	if json.Compact(&b, v) != nil {
		return v // not JSON: cannot happen, ids come parsed
	}
	return b.Bytes()
}

// storeLocked appends a message of this size to mb. The mailbox was
// active at least as late as the message arrived; it may have been active
// later, if the message is being restored from a journal.
func (r *registry) storeLocked(mb *mailbox, m message, size int) {
	mb.messages = append(mb.messages, m)
	mb.bytes += size
	mb.app.bytes += int64(size)
	r.storedBytes += int64(size)
	mb.updated = max(mb.updated, m.serverRx)
}

// subscribeLocked makes s receive every message added to mb from now on,
// after replaying the ones already stored, oldest first.
func (r *registry) subscribeLocked(mb *mailbox, s *session) {
	mb.subscribers = append(mb.subscribers, s)
	r.subscriptions++
	r.metrics.delivered.Add(int64(len(mb.messages)))
	for _, m := range mb.messages {
		s.send(messageFrame(m))
	}
}

// maxSubscribersPerSide is how many connections may have one mailbox
// open for the same side at once. A client has one; after its network
// drops it reconnects and opens again while the server may not yet have
// noticed the old connection is gone, so a few are allowed. More would
// only let one client multiply what each message costs to deliver (and
// what a mailbox's replay costs) by opening it again and again.
const maxSubscribersPerSide = 4

// subscribersOfSideLocked counts the connections subscribed to mailbox id
// of the app for side.
func (r *registry) subscribersOfSideLocked(appID, id, side string) int {
	a := r.apps[appID]
	if a == nil || a.mailboxes[id] == nil {
		return 0
	}
	n := 0
	for _, sub := range a.mailboxes[id].subscribers {
		if sub.side == side {
			n++
		}
	}
	return n
}

// unsubscribeLocked stops delivering mb's messages to s.
func (r *registry) unsubscribeLocked(mb *mailbox, s *session) {
	if i := slices.Index(mb.subscribers, s); i >= 0 {
		mb.subscribers = slices.Delete(mb.subscribers, i, i+1)
		r.subscriptions--
	}
}

// closeLocked records that side closed mailbox id with this mood (PROTOCOL.md §9.3).
// Unknown mailboxes and sides are ignored. When every side has closed it,
// the mailbox, its messages and any nameplate still pointing at it go.
func (r *registry) closeLocked(a *app, id, side, mood string, now float64) {
	mb := a.mailboxes[id]
	if mb == nil {
		return
	}
	i := slices.IndexFunc(mb.sides, func(s mailboxSide) bool { return s.side == side })
	if i < 0 {
		return
	}
	r.refundOpenLocked(&mb.sides[i])
	mb.sides[i].opened = false
	mb.sides[i].mood = mood
	if slices.ContainsFunc(mb.sides, func(s mailboxSide) bool { return s.opened }) {
		r.journal.mailbox(mb)
		return
	}
	r.deleteMailboxLocked(mb, now, false)
}

// deleteMailboxLocked removes a mailbox with its messages, and the
// nameplate that points at it, if any (the reference crashes when a
// nameplate is still claimed at this point; deleting it is what its own
// fix intends).
// Connections still subscribed are detached, so none can add to it.
func (r *registry) deleteMailboxLocked(mb *mailbox, now float64, pruned bool) {
	a := mb.app
	if mb.nameplate != nil {
		r.deleteNameplateLocked(a, mb.nameplate, now, pruned)
	}
	r.journal.deleted(kindMailbox, a.id, mb.id)
	r.usage.mailboxRetired(mb, now, pruned)
	r.forgetMailboxLocked(mb)
	r.dropIfEmptyLocked(a)
}

func (r *registry) deleteNameplateLocked(a *app, np *nameplate, now float64, pruned bool) {
	r.journal.deleted(kindNameplate, a.id, np.name)
	r.usage.nameplateRetired(a.id, np, now, pruned)
	r.forgetNameplateLocked(a, np)
}

// forgetMailboxLocked takes a mailbox, and any nameplate pointing at it,
// out of the registry, and detaches its subscribers.
func (r *registry) forgetMailboxLocked(mb *mailbox) {
	a := mb.app
	if mb.nameplate != nil {
		r.forgetNameplateLocked(a, mb.nameplate)
	}
	for _, s := range mb.subscribers {
		s.mailbox = nil
		r.subscriptions--
	}
	mb.subscribers = nil
	r.refundMailboxLocked(mb)
	delete(a.mailboxes, mb.id)
	mb.deleted = true
	r.mailboxN--
	r.metrics.mailboxes.Add(-1)
	r.storedBytes -= int64(mb.bytes)
	a.bytes -= int64(mb.bytes)
}

// addNameplateLocked adds a nameplate pointing at mb to the app.
func (r *registry) addNameplateLocked(a *app, name string, mb *mailbox) *nameplate {
	np := &nameplate{name: name}
	a.nameplates[name] = np
	a.short[shortName(name)]++
	r.nameplateN++
	r.metrics.nameplates.Add(1)
	r.point(np, mb)
	return np
}

// point makes np point at mb, and mb back at np.
func (r *registry) point(np *nameplate, mb *mailbox) {
	if np.mailbox != nil && np.mailbox.nameplate == np {
		np.mailbox.nameplate = nil
	}
	np.mailbox, mb.nameplate = mb, np
}

func (r *registry) forgetNameplateLocked(a *app, np *nameplate) {
	r.refundNameplateLocked(np)
	delete(a.nameplates, np.name)
	a.short[shortName(np.name)]--
	if np.mailbox.nameplate == np {
		np.mailbox.nameplate = nil
	}
	r.nameplateN--
	r.metrics.nameplates.Add(-1)
}

// pruneLocked deletes every channel idle since before old (PROTOCOL.md §12). A
// mailbox with a subscribed connection counts as active now, so only
// channels nobody is connected to can expire; a nameplate goes with its
// mailbox.
func (r *registry) pruneLocked(now, old float64) (nameplates, mailboxes int) {
	for _, a := range r.apps {
		for _, mb := range a.mailboxes {
			if len(mb.subscribers) > 0 {
				mb.updated = now
				r.journal.mailbox(mb)
			}
		}
		for _, np := range a.nameplates {
			if np.mailbox.updated <= old {
				r.deleteNameplateLocked(a, np, now, true)
				nameplates++
			}
		}
		for _, mb := range a.mailboxes {
			if mb.updated <= old {
				r.deleteMailboxLocked(mb, now, true)
				mailboxes++
			}
		}
		r.dropIfEmptyLocked(a)
	}
	return nameplates, mailboxes
}

// mailboxIDEncoding writes mailbox ids as the reference does: lowercase
// base32 without padding.
var mailboxIDEncoding = base32.StdEncoding.WithPadding(base32.NoPadding)

// newMailboxID returns a fresh random mailbox id, 13 characters of
// [a-z2-7] from 8 random bytes, unused in this app.
func newMailboxID(a *app) string {
	for {
		var b [8]byte
		rand.Read(b[:])
		id := strings.ToLower(mailboxIDEncoding.EncodeToString(b[:]))
		if a.mailboxes[id] == nil {
			return id
		}
	}
}
