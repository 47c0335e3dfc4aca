// limits.go owns the server-wide budgets that connections share: the
// budget for partly received messages, the gate that counts every TCP
// connection and shares the server fairly among addresses, the sampling
// of per-connection log lines, and the limiter of connections and new
// nameplates per client address.
package main

import (
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Server-wide budgets. Tests may set smaller ones on the server.
const (
	// readChunkBytes is the least a message's buffer grows by as its
	// payload arrives: a frame header announcing 512 KiB reserves no more
	// than this before the bytes come.
	readChunkBytes = 4 << 10

	// maxPartialBytesTotal bounds the memory held by messages that have
	// begun but not yet fully arrived, across all connections. Real
	// clients send messages of a few KiB that arrive in one read, so
	// only a flood of large, slow messages meets it: 32 messages of the
	// largest size at once. Buffers outgrown while a message arrives, and
	// those of connections closed to make room, are garbage until the
	// collector runs, so the process holds several times this: 1,024
	// connections each sending a 512 KiB fragment took it to 295 MiB at a
	// budget of 64 MiB, 191-255 MiB at 32 MiB. When it is used up, the
	// connection holding the most is closed.
	maxPartialBytesTotal = 16 << 20

	// messageTimeout is how long a message may take to arrive once its
	// first frame header has: a message of the largest size takes well
	// under a second on any link a wormhole client uses, and pings
	// between its fragments do not extend it.
	messageTimeout = 30 * time.Second
)

// The command budget of every connection (see connection.takeCommand).
const (
	// commandsPerSecond is how fast a connection's budget refills. A
	// transfer takes about a dozen commands (the load tool's, 12), a
	// Dilation session a few a minute; a client flooding pings took
	// 115,000 a second and slowed everyone.
	commandsPerSecond = 20

	// commandBurst is how many commands a connection may send at once:
	// several transfers' worth, so no real client waits.
	commandBurst = 100

	// commandBytesPerToken prices a command by the work it causes: one
	// token more for every this many bytes it sends back, so a "list" of
	// a full app or the re-"open" of a full mailbox (its replay) costs
	// what it does, and an "add" a little more than a "ping".
	commandBytesPerToken = 16 << 10
)

// errCommandRate is what a client that sends commands faster than its
// budget allows is told, before its connection is closed.
var errCommandRate = errors.New("too many commands on this connection, slow down")

// errPartialBudget is why a connection is closed when the budget for
// partly received messages is used up and it holds the most of it.
var errPartialBudget = errors.New("the server is receiving too many large messages, try again later")

// errMessageTimeout is why a connection is closed whose message did not
// arrive within messageTimeout.
var errMessageTimeout = errors.New("message not complete in time")

// partialBudget is the server-wide budget for partly received messages.
// Each connection's reader charges what its message's buffer grows by;
// the charge is given back when the message is complete or the read
// fails.
type partialBudget struct {
	max int64

	mu       sync.Mutex
	total    int64
	held     map[*connection]int64
	evicted  map[*connection]bool // closed for the budget, their readers stopping
	draining int64                // what the evicted hold, until their readers stop
	onEvict  func(*connection)    // closes a connection chosen to make room
}

func newPartialBudget(max int64, onEvict func(*connection)) *partialBudget {
	return &partialBudget{max: max, held: make(map[*connection]int64), evicted: make(map[*connection]bool), onEvict: onEvict}
}

// charge counts n more bytes held by c's message. When that would exceed
// the budget, the connection holding the most (counting c's n) is closed
// to make room: if that is c, charge fails with errPartialBudget.
func (b *partialBudget) charge(c *connection, n int) error {
	var victims []*connection
	defer func() {
		for _, v := range victims { // closing takes the connection's own lock: not under b.mu
			b.onEvict(v)
		}
	}()
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.evicted[c] {
		return errPartialBudget
	}
	if b.held[c]+int64(n) <= readChunkBytes {
		// A message's first chunk is always taken, so that the small
		// messages of real clients go through during a flood; what it
		// adds past the budget is bounded by the connection caps.
		b.held[c] += int64(n)
		b.total += int64(n)
		return nil
	}
	// A connection closed to make room holds its memory until its reader
	// has stopped, so its charge stays counted until release; only what
	// the others hold is weighed for closing.
	for b.total-b.draining+int64(n) > b.max {
		top, most := c, b.held[c]+int64(n)
		for v, h := range b.held {
			if h > most && !b.evicted[v] {
				top, most = v, h
			}
		}
		if top == c {
			return errPartialBudget
		}
		b.evicted[top] = true
		b.draining += b.held[top]
		victims = append(victims, top)
	}
	if b.total+int64(n) > b.max { // room is being made, but is not there yet
		return errPartialBudget
	}
	b.held[c] += int64(n)
	b.total += int64(n)
	return nil
}

// refund gives back what c's message holds; the message is complete, or
// its read failed.
func (b *partialBudget) refund(c *connection) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.evicted[c] {
		b.draining -= b.held[c]
	}
	b.total -= b.held[c]
	delete(b.held, c)
	delete(b.evicted, c)
}

// bytes is what partly received messages hold now.
func (b *partialBudget) bytes() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.total
}

// Connection gate limits. Tests may set smaller ones on the gate.
const (
	// fdHeadroom is how many file descriptors the gate keeps free below
	// the process's limit (RLIMIT_NOFILE): for the journal and its
	// compaction, the usage log, the metrics listener and its clients,
	// so that accept never fails for want of one and /healthz answers.
	fdHeadroom = 128

	// fdRefusalRoom is how many descriptors, beyond the total connection
	// cap, are left for connections accepted only to be told they are
	// refused (a WebSocket client's welcome error, an HTTP 503). If the
	// descriptor limit leaves less, the total cap is lowered to fit.
	fdRefusalRoom = 512

	// refusalTimeout is how long a refused connection is kept open to be
	// told why: time for a client to send its opening request and read
	// the answer, not the whole readHeaderTimeout.
	refusalTimeout = 5 * time.Second

	// maxRefusedPerAddr is how many connections over its limit one
	// address may have open while they are told why; more are closed as
	// they are accepted, without a word, so that one address cannot take
	// the descriptors kept for telling others.
	maxRefusedPerAddr = 16

	// defaultConnectionsPerMinute is how many new connections one address
	// may open a minute, after a burst of as many. A wormhole client opens
	// one per transfer (and one more each time its network drops), so a
	// NAT with hundreds of users stays far below it; a loop of connect,
	// bind and close from four addresses opened 4,300 a second and halved
	// everyone else's transfers. Past it, connections are closed as they
	// are accepted, without a word.
	defaultConnectionsPerMinute = 600
)

// errFairShare is what a WebSocket connection is told when it is closed
// to make room for a client from an address holding less than its share.
var errFairShare = errors.New("the server is full; a connection from your address was closed to make room for others")

// connGate counts every TCP connection from the moment it is accepted
// (plain HTTP, keep-alive, WebSocket handshakes, TLS handshakes, and
// WebSocket connections until they end), per client address and in all.
//
// When the total is reached, an address's share is the total divided by
// the number of addresses holding connections (the newcomer's counted).
// A newcomer from an address holding less than its share is admitted by
// closing a connection of the address holding the most; so no set of
// addresses can keep another out, however many connections they open.
// A newcomer whose address holds its share or more is refused.
type connGate struct {
	maxPerAddr int       // 0: none (behind a trusted proxy every client shares its address)
	maxTotal   int       // 0: none
	maxOpen    int       // descriptors: every accepted connection, refused ones too; 0: none
	newConns   rateTable // new connections per address; guarded by mu, like the rest

	metrics *metrics

	mu      sync.Mutex
	total   int // admitted connections
	open    int // accepted connections not yet closed
	holding int // addresses with admitted connections
	addrs   map[netip.Addr]*addrConns
}

// addrConns is what one address has open.
type addrConns struct {
	admitted map[*connSlot]struct{}
	refused  int // accepted only to be told they are refused
}

func newConnGate(maxPerAddr, maxTotal, maxOpen, perMinute int, m *metrics) *connGate {
	return &connGate{maxPerAddr: maxPerAddr, maxTotal: maxTotal, maxOpen: maxOpen, metrics: m,
		newConns: newRateTable(perMinute), addrs: make(map[netip.Addr]*addrConns)}
}

// allowNewLocked takes a token from the address's allowance of new
// connections, if it has one. While the table of addresses is full (a
// flood from a vast IPv6 range), addresses it does not know are let
// through, since the per-address and total caps still hold them.
func (g *connGate) allowNewLocked(key netip.Addr) bool {
	return g.maxPerAddr == 0 || g.newConns.take(key, time.Now(), true)
}

// connSlot is an accepted connection as the gate counts it: closing it
// gives its place back.
type connSlot struct {
	net.Conn
	gate    *connGate
	key     netip.Addr
	refused string // why the connection may not stay; "" if admitted

	until time.Time // a refused connection's deadline (see refusalTimeout)

	evicted bool                   // under gate.mu: closed to make room, no longer counted
	onEvict atomic.Pointer[func()] // how to close it to make room; by default, at once
	once    sync.Once
}

// Close closes the connection and gives its place back.
func (s *connSlot) Close() error {
	s.once.Do(s.gate.closed(s))
	return s.Conn.Close()
}

// SetDeadline, SetReadDeadline and SetWriteDeadline keep a refused
// connection's deadlines no later than its refusal deadline.
func (s *connSlot) SetDeadline(t time.Time) error      { return s.Conn.SetDeadline(s.clamp(t)) }
func (s *connSlot) SetReadDeadline(t time.Time) error  { return s.Conn.SetReadDeadline(s.clamp(t)) }
func (s *connSlot) SetWriteDeadline(t time.Time) error { return s.Conn.SetWriteDeadline(s.clamp(t)) }

func (s *connSlot) clamp(t time.Time) time.Time {
	if !s.until.IsZero() && (t.IsZero() || t.After(s.until)) {
		return s.until
	}
	return t
}

// setEvict says how to close the connection if its place is needed.
func (s *connSlot) setEvict(f func()) { s.onEvict.Store(&f) }

func (s *connSlot) evict() {
	if f := s.onEvict.Load(); f != nil {
		(*f)()
		return
	}
	s.Conn.Close()
}

// accept counts a connection just accepted. It returns nil if the
// connection is to be closed at once: there is no descriptor to spare,
// or its address already has maxRefusedPerAddr being refused.
func (g *connGate) accept(c net.Conn) *connSlot {
	var ip netip.Addr
	if ta, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		ip, _ = netip.AddrFromSlice(ta.IP)
	}
	s := &connSlot{Conn: c, gate: g, key: addrKey(ip.Unmap())}
	if g.maxPerAddr == 0 {
		s.key = netip.Addr{} // behind a proxy: one address for all
	}
	var victim *connSlot
	defer func() {
		if victim != nil {
			victim.evict() // it takes the connection's own lock: not under g.mu
		}
	}()
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.maxOpen > 0 && g.open >= g.maxOpen { // only connections closed to make room, still closing, can bring it here
		g.metrics.refused("connections at accept (descriptors)")
		return nil
	}
	a := g.addrs[s.key]
	if a == nil {
		a = &addrConns{admitted: make(map[*connSlot]struct{})}
		g.addrs[s.key] = a
	}
	held := len(a.admitted)
	switch {
	case !g.allowNewLocked(s.key):
		// Closed at once: telling why takes a handshake, which is what a
		// loop of new connections costs the server.
		g.metrics.refused("new connections per address")
		if held == 0 && a.refused == 0 {
			delete(g.addrs, s.key)
		}
		return nil
	case g.maxPerAddr > 0 && held >= g.maxPerAddr:
		s.refused = errTooManyConnsFromAddr
		g.metrics.refused("connections per address")
	case g.maxTotal > 0 && g.total >= g.maxTotal:
		holding := g.holding
		if held == 0 {
			holding++
		}
		if held >= g.maxTotal/holding {
			s.refused = errTooManyConns
			g.metrics.refused("connections")
			break
		}
		var top *addrConns
		for _, b := range g.addrs {
			if top == nil || len(b.admitted) > len(top.admitted) {
				top = b
			}
		}
		if top == a { // cannot be, as the total is reached and a holds less than its share
			s.refused = errTooManyConns
			g.metrics.refused("connections")
			break
		}
		for v := range top.admitted {
			victim = v
			break
		}
		g.removeLocked(victim, top)
		victim.evicted = true
		g.metrics.refused("connections closed for a fair share")
	}
	if s.refused != "" {
		why := ""
		switch {
		case a.refused >= maxRefusedPerAddr:
			why = "connections at accept (refused too often)"
		case g.maxOpen > 0 && g.open-g.total >= g.maxOpen-g.maxTotal: // what is left is for admitted connections
			why = "connections at accept (descriptors)"
		}
		if why != "" {
			g.metrics.refused(why)
			if held == 0 && a.refused == 0 {
				delete(g.addrs, s.key)
			}
			return nil
		}
		a.refused++
		s.until = time.Now().Add(refusalTimeout)
		s.Conn.SetDeadline(s.until)
	} else {
		if held == 0 {
			g.holding++
		}
		a.admitted[s] = struct{}{}
		g.total++
	}
	g.open++
	return s
}

// removeLocked stops counting an admitted connection.
func (g *connGate) removeLocked(s *connSlot, a *addrConns) {
	delete(a.admitted, s)
	g.total--
	if len(a.admitted) == 0 {
		g.holding--
	}
}

// closed returns what gives a closing connection's place back.
func (g *connGate) closed(s *connSlot) func() {
	return func() {
		g.mu.Lock()
		defer g.mu.Unlock()
		g.open--
		a := g.addrs[s.key]
		switch {
		case s.refused != "":
			a.refused--
		case !s.evicted:
			g.removeLocked(s, a)
		}
		if len(a.admitted) == 0 && a.refused == 0 {
			delete(g.addrs, s.key)
		}
	}
}

// counts are the gate's counters: admitted connections, and accepted
// connections not yet closed.
func (g *connGate) counts() (admitted, open int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.total, g.open
}

// gatedListener is the server's listener: every connection it accepts is
// counted by the gate until it is closed.
type gatedListener struct {
	net.Listener
	gate *connGate
}

func (l gatedListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if s := l.gate.accept(c); s != nil {
			return s, nil
		}
		c.Close()
	}
}

// slotOf returns the gate's record of a connection net/http serves (TLS
// or not), or nil if it was not accepted through the gate.
func slotOf(c net.Conn) *connSlot {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	s, _ := c.(*connSlot)
	return s
}

// tcpConn returns the TCP connection under c, or nil.
func tcpConn(c net.Conn) *net.TCPConn {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	if s, ok := c.(*connSlot); ok {
		c = s.Conn
	}
	tc, _ := c.(*net.TCPConn)
	return tc
}

// connLogsPerSecond bounds the per-connection log lines ("connection
// opened", "connection closed", and the transit relay's lines for the
// ends of its sessions and of connections that never paired):
// far more than a busy server's real clients cause, and under a flood of
// connections, at most a few hundred bytes a second on the disk the log
// shares with the journal.
const connLogsPerSecond = 100

// logSampler lets through at most connLogsPerSecond lines a second, and
// says how many it held back.
type logSampler struct {
	mu         sync.Mutex
	second     time.Time // the second being counted
	n          int       // lines let through in it
	suppressed int       // lines held back since the last said so
}

// connLog logs a per-connection line through the server's sampler (see
// logSampler.log).
func (srv *server) connLog(logf func(string, ...any), msg string, args ...any) {
	srv.connLogs.log(srv.log, logf, msg, args...)
}

// log logs a per-connection line with logf, unless connLogsPerSecond are
// already logged this second; the first line of a later second is
// preceded, on l, by one saying how many were held back. The mailbox's
// connections and the transit relay's sessions share one sampler, and so
// one bound.
func (s *logSampler) log(l *slog.Logger, logf func(string, ...any), msg string, args ...any) {
	now := time.Now().Truncate(time.Second)
	s.mu.Lock()
	if !now.Equal(s.second) {
		s.second, s.n = now, 0
	}
	s.n++
	if s.n > connLogsPerSecond {
		s.suppressed++
		s.mu.Unlock()
		return
	}
	suppressed := s.suppressed
	s.suppressed = 0
	s.mu.Unlock()
	if suppressed > 0 {
		l.Info("connection log lines suppressed", "lines", suppressed, "limit_per_second", connLogsPerSecond)
	}
	logf(msg, args...)
}

// limiter enforces the limits per client address that the connection
// gate (connGate) cannot: how many connections may be open at once from
// one address a trusted proxy reports (--trust-proxy-header), and how
// many new nameplates one address may create per minute. An IPv6 client
// is counted by its /64, since one host usually has a whole /64 to pick
// addresses from.
type limiter struct {
	maxConns int // per address; 0: no limit

	mu         sync.Mutex
	conns      map[netip.Addr]int
	nameplates rateTable // new nameplates per address
}

// maxTrackedAddrs bounds how many addresses a rateTable remembers: each
// costs about a hundred bytes, and only addresses that used some of their
// allowance within the last minute need remembering, so a flood from a
// vast IPv6 range cannot grow it without bound.
const maxTrackedAddrs = 100_000

// minSweepInterval spaces the sweeps a full table of addresses starts, so
// that a flood of new addresses does not turn each into a scan.
const minSweepInterval = time.Second

// bucket is a token bucket: it holds up to a burst of tokens and refills
// at a steady rate. Its tokens may go below zero, a debt the refill pays
// first.
type bucket struct {
	tokens float64
	last   time.Time
}

// rateTable is an allowance per address of perMinute a minute, after a
// burst of as many: a bucket for every address that used some of it
// lately. Its user guards it.
type rateTable struct {
	perMinute int // 0: no limit
	buckets   map[netip.Addr]*bucket
	lastSweep time.Time
}

func newRateTable(perMinute int) rateTable {
	return rateTable{perMinute: perMinute, buckets: make(map[netip.Addr]*bucket)}
}

// take takes a token from key's bucket, if it has one. When the table is
// full and a sweep frees no room, an address it does not know gets
// whenFull.
func (t *rateTable) take(key netip.Addr, now time.Time, whenFull bool) bool {
	if t.perMinute == 0 {
		return true
	}
	b := t.buckets[key]
	if b == nil {
		if len(t.buckets) >= maxTrackedAddrs && now.Sub(t.lastSweep) >= minSweepInterval {
			t.sweep(now)
		}
		if len(t.buckets) >= maxTrackedAddrs {
			return whenFull
		}
		b = &bucket{tokens: float64(t.perMinute), last: now}
		t.buckets[key] = b
	}
	b.refill(now, t.perSecond(), float64(t.perMinute))
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// sweep forgets buckets that have refilled, which a new one equals.
func (t *rateTable) sweep(now time.Time) {
	t.lastSweep = now
	for k, b := range t.buckets {
		if b.refill(now, t.perSecond(), float64(t.perMinute)); b.tokens >= float64(t.perMinute) {
			delete(t.buckets, k)
		}
	}
}

func newLimiter(maxConns, perMinute int) *limiter {
	return &limiter{maxConns: maxConns, conns: make(map[netip.Addr]int), nameplates: newRateTable(perMinute)}
}

// addrKey is the unit limits count by.
func addrKey(ip netip.Addr) netip.Addr {
	if ip.Is6() {
		p, _ := ip.Prefix(64)
		return p.Addr()
	}
	return ip
}

// connect counts a new connection. It returns why the connection may not
// stay ("" if it may); a refused connection is still counted until
// disconnect, so a client that keeps reconnecting stays refused.
func (l *limiter) connect(ip netip.Addr) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	k := addrKey(ip)
	l.conns[k]++
	if l.maxConns > 0 && l.conns[k] > l.maxConns {
		return errTooManyConnsFromAddr
	}
	return ""
}

func (l *limiter) disconnect(ip netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	k := addrKey(ip)
	if l.conns[k]--; l.conns[k] <= 0 {
		delete(l.conns, k)
	}
}

// allowNewNameplate takes a token from the address's allowance of new
// nameplates, if it has one. While the table of addresses is full,
// addresses it does not know get none.
func (l *limiter) allowNewNameplate(ip netip.Addr) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.nameplates.take(addrKey(ip), time.Now(), false)
}

func (b *bucket) refill(now time.Time, perSecond, burst float64) {
	b.tokens = min(burst, b.tokens+now.Sub(b.last).Seconds()*perSecond)
	b.last = now
}

// perSecond is the table's rate of refill.
func (t *rateTable) perSecond() float64 { return float64(t.perMinute) / 60 }

// sweep forgets the addresses whose allowance has refilled.
func (l *limiter) sweep() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.nameplates.sweep(time.Now())
}
