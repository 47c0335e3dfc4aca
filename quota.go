// quota.go owns what each client address holds in the registry at once:
// the nameplates its sides have claimed, the mailboxes its sides have
// open, and the bytes of the messages its sides have stored. The creation
// rate (limiter in limits.go) bounds how fast an address takes state; these
// holdings bound how much of it the address keeps, so that no handful of
// addresses can fill a server-wide pool (see limits in mailbox.go for the
// arithmetic behind the defaults).
//
// An address is an addrKey: an IPv4 address, or an IPv6 /64. A holding is
// charged when a side is first recorded on a nameplate (claim, allocate)
// or mailbox (open, claim), to the address that side's connection came
// from, and when a side stores a message. It is given back when the side
// releases the nameplate or closes the mailbox, and when the channel is
// deleted or pruned; a message's bytes are given back only when its
// mailbox goes, since until then the server keeps them. Channels restored
// from the journal after a restart have no known address (the journal
// records none) and are charged to nobody.
package main

import (
	"net/netip"
)

// holdings is what one address holds, or asks for.
type holdings struct {
	nameplates int
	mailboxes  int
	bytes      int64
}

// charge is the bytes one address has stored in one mailbox.
type charge struct {
	addr  netip.Addr
	bytes int64
}

// Refusals for an address that holds its share. Like the rate limit's,
// they say the address is at fault and that waiting helps.
const (
	errAddrNameplates = protocolError("too many nameplates held by your address, try again later")
	errAddrMailboxes  = protocolError("too many mailboxes held by your address, try again later")
	errAddrStored     = protocolError("your address holds too many stored messages, try again later")
)

// holdLocked adds h (whose fields may be negative) to what addr holds. An
// unknown address (the zero Addr) holds nothing.
func (r *registry) holdLocked(addr netip.Addr, h holdings) {
	if !addr.IsValid() {
		return
	}
	got := r.held[addr]
	got.nameplates += h.nameplates
	got.mailboxes += h.mailboxes
	got.bytes += h.bytes
	if got == (holdings{}) {
		delete(r.held, addr)
		return
	}
	r.held[addr] = got
}

// roomForAddrLocked returns the refusal for addr if holding want more
// would take it past a per-address limit, and counts it. It looks only at
// what the address holds, never at the channel asked for, so that a
// refusal says nothing about which nameplates exist.
func (r *registry) roomForAddrLocked(addr netip.Addr, want holdings) error {
	if !addr.IsValid() {
		return nil
	}
	got, l := r.held[addr], r.limits
	switch {
	case want.nameplates > 0 && l.MaxNameplatesPerAddr > 0 && got.nameplates+want.nameplates > l.MaxNameplatesPerAddr:
		r.metrics.refused("nameplates per address")
		return errAddrNameplates
	case want.mailboxes > 0 && l.MaxMailboxesPerAddr > 0 && got.mailboxes+want.mailboxes > l.MaxMailboxesPerAddr:
		r.metrics.refused("mailboxes per address")
		return errAddrMailboxes
	case want.bytes > 0 && l.MaxStoredBytesPerAddr > 0 && got.bytes+want.bytes > l.MaxStoredBytesPerAddr:
		r.metrics.refused("stored bytes per address")
		return errAddrStored
	}
	return nil
}

// chargeBytesLocked charges n bytes stored in mb to addr.
func (r *registry) chargeBytesLocked(mb *mailbox, addr netip.Addr, n int64) {
	if !addr.IsValid() {
		return
	}
	r.holdLocked(addr, holdings{bytes: n})
	for i := range mb.charges {
		if mb.charges[i].addr == addr {
			mb.charges[i].bytes += n
			return
		}
	}
	mb.charges = append(mb.charges, charge{addr, n})
}

// refundNameplateLocked gives back what np's claiming sides hold.
func (r *registry) refundNameplateLocked(np *nameplate) {
	for i := range np.sides {
		r.refundClaimLocked(&np.sides[i])
	}
}

// refundClaimLocked gives back the nameplate a side's claim holds.
func (r *registry) refundClaimLocked(s *nameplateSide) {
	if s.claimed {
		r.holdLocked(s.holder, holdings{nameplates: -1})
	}
	s.holder = netip.Addr{}
}

// refundOpenLocked gives back the mailbox a side's open holds.
func (r *registry) refundOpenLocked(s *mailboxSide) {
	if s.opened {
		r.holdLocked(s.holder, holdings{mailboxes: -1})
	}
	s.holder = netip.Addr{}
}

// refundMailboxLocked gives back what mb's open sides and its stored
// messages hold.
func (r *registry) refundMailboxLocked(mb *mailbox) {
	for i := range mb.sides {
		r.refundOpenLocked(&mb.sides[i])
	}
	for _, c := range mb.charges {
		r.holdLocked(c.addr, holdings{bytes: -c.bytes})
	}
	mb.charges = nil
}
