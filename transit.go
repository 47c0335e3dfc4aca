// transit.go owns the transit relay: the optional second service that
// carries a transfer's bytes when the two clients cannot reach each other
// directly (PROTOCOL.md §16). It is off unless asked for, and
// then listens for plain TCP (--transit-port), for WebSocket on a port of
// its own (--transit-websocket), and for WebSocket on the mailbox's own
// listener, at /transit and on / (--transit-on-mailbox-port).
//
// Each client sends one handshake line naming a token (and, in the newer
// form, its side); two connections with the same token and different
// sides are paired, told "ok\n", and from then on every byte one sends is
// written to the other. The wire behaviour is the Debian reference's
// (magic-wormhole-transit-relay 0.2.1) byte for byte; the WebSocket
// variant is the newer reference's (0.3 and later). What the reference
// lacks is added here, each a flag: how long a connection may wait for
// its partner and a pair may stay idle, per-address and total limits on
// connections and on waiting ones (with a fair share when the total is
// reached), optional per-session byte and time limits, and optional
// bandwidth limits per address and in total.
//
// Relaying is the kernel's work. Between two TCP clients the bytes move
// by splice(2) (io.Copy between the two sockets, via TCPConn.ReadFrom),
// never through this process's memory; a WebSocket end is copied through
// one pooled buffer per direction. Either way a reader that is slow makes
// its sender wait: no buffer grows. A connection waiting for its partner
// holds one goroutine and a small handshake buffer.
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"expvar"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/websocket"
)

// Default limits of the transit relay, each a flag. They are generous to
// clients (a multi-gigabyte transfer over a slow link passes), and they
// keep a 1 GiB machine from being held hostage by connections that wait,
// idle or never read.
const (
	// defaultTransitMaxWait is how long a connection may wait for its
	// partner after its handshake. Both clients contact the relay within
	// seconds of each other once their transfer has been accepted, so this
	// is ample; the reference waits forever, and its connections from
	// aborted peers linger.
	defaultTransitMaxWait = 3 * time.Minute

	// defaultTransitMaxIdle is how long a pair may send nothing either
	// way. A transfer moves bytes all the time; a peer that has vanished
	// or stopped reading does not.
	defaultTransitMaxIdle = 5 * time.Minute

	// defaultTransitConnsPerAddr is how many relay connections one IPv4
	// address or IPv6 /64 may hold: a few people behind one NAT, each
	// with a few transfers, each transfer one or two connections.
	defaultTransitConnsPerAddr = 64

	// defaultTransitConns is how many relay connections may be open at
	// once. A busy pair holds up to a few MB of kernel socket buffers,
	// so 2,000 connections (1,000 transfers) stay within a small VPS.
	defaultTransitConns = 2000

	// defaultTransitWaitingPerAddr is how many connections one address
	// may have waiting (handshaking or unpaired) at once: a client makes
	// at most one or two per transfer.
	defaultTransitWaitingPerAddr = 16

	// defaultTransitWaiting is how many connections may wait at once.
	// Waiting is cheap (a few kB each) but an attacker can wait for free,
	// so waiting connections get only part of the total.
	defaultTransitWaiting = 1000

	// defaultTransitShutdownGrace is how long a shutdown lets transfers
	// under way finish before they are cut: long enough for most to end,
	// short enough for a service manager's stop timeout (systemd's 90 s).
	defaultTransitShutdownGrace = 30 * time.Second
)

// Fixed timings and sizes of the transit relay.
const (
	// transitHandshakeTimeout is how long a new connection has to send its
	// handshake line. Clients send it at once; this stops a connection
	// that sends nothing from holding a place.
	transitHandshakeTimeout = 30 * time.Second

	// transitProgressInterval is how often a pair's two directions look up
	// from relaying to check the idle, time and shutdown limits: idleness
	// is detected at most this much late.
	transitProgressInterval = 10 * time.Second

	// transitLinger is how long a connection whose partner has gone is
	// read (and what it sends discarded) after it has been sent all it
	// was owed and an end of stream, waiting for it to close too. Closing
	// a socket with unread data would reset it, and the reset could
	// destroy data still on its way to the client.
	transitLinger = 5 * time.Second

	// transitMaxLingerBytes bounds what is read and discarded while
	// lingering.
	transitMaxLingerBytes = 1 << 20

	// transitWriteTimeout bounds writing a short reply ("ok\n",
	// "bad handshake\n", "impatient\n") to a client.
	transitWriteTimeout = 10 * time.Second

	// transitChunkBytes is the most one splice call of a TCP pair moves,
	// and what a direction reserves at a time from a session byte budget
	// or a bandwidth bucket; between chunks the limits are looked at.
	transitChunkBytes = 4 << 20

	// transitBufferBytes sizes the pooled buffer a direction with a
	// WebSocket end copies through, and so the largest frame it sends.
	transitBufferBytes = 64 << 10

	// transitFrameHeadroom is room left before the data in that buffer
	// for a WebSocket frame header (at most 10 bytes from a server), so a
	// frame leaves in one write.
	transitFrameHeadroom = 10

	// transitMaxWSHandshake is the largest first WebSocket message read:
	// the longest handshake is 105 bytes; the newer reference reads lines
	// of up to 1024.
	transitMaxWSHandshake = 1024

	// transitWSReadBuffer sizes a WebSocket connection's read buffer:
	// frame headers and the handshake pass through it; payloads larger
	// than it are read around it.
	transitWSReadBuffer = 512

	// transitWSWriteBuffer sizes the buffer x/net/websocket writes its
	// handshake answer and control frames through; data frames are
	// written directly.
	transitWSWriteBuffer = 512

	// transitAcceptRetry is how long the TCP listener waits after an
	// accept fails (out of file descriptors, say) before it tries again,
	// as net/http does, rather than spin.
	transitAcceptRetry = 50 * time.Millisecond

	// transitRateMinChunk is the least a rate-limited direction waits to
	// be granted before it moves bytes, so a slow limit still moves data
	// in pieces worth a system call.
	transitRateMinChunk = 16 << 10
)

// The handshake, as the Debian reference reads it: it collects bytes
// until it holds a whole line of either form, or enough to know that none
// can come.
const (
	transitHandshakePrefix = "please relay "
	transitSidePrefix      = " for side "
	transitTokenLen        = 64 // hex digits
	transitSideLen         = 16 // hex digits
	// transitOldLen is the length of "please relay TOKEN\n".
	transitOldLen = len(transitHandshakePrefix) + transitTokenLen + 1
	// transitNewLen is the length of "please relay TOKEN for side SIDE\n",
	// the longest handshake: by this many bytes a decision is made.
	transitNewLen = transitOldLen + len(transitSidePrefix) + transitSideLen
	// transitHandshakeBuf is what a handshake is read into: a whole
	// handshake and more, so one read past the longest one decides.
	transitHandshakeBuf = 256
)

// Replies and moods. The replies are the reference's, with their newline.
const (
	transitOK        = "ok\n"
	transitBad       = "bad handshake\n"
	transitImpatient = "impatient\n"

	moodHappy     = "happy"
	moodLonely    = "lonely"
	moodErrory    = "errory"
	moodRedundant = "redundant"
)

// usageTransit is the type of a transit relay's usage record.
const usageTransit = "transit"

// Why the relay ends a connection or a pair itself.
var (
	errTransitIdle        = errors.New("pair idle too long")
	errTransitBytes       = errors.New("session byte limit reached")
	errTransitTime        = errors.New("session time limit reached")
	errTransitShutdown    = errors.New("server shutting down")
	errTransitEvicted     = errors.New("closed to make room for another address")
	errTransitTextFrame   = errors.New("text frame")
	errTransitWaitTimeout = errors.New("waited too long for a partner")
)

// transitConfig is what the transit flags set.
type transitConfig struct {
	port           string // --transit-port: TCP relay endpoint; "" for none
	websocket      string // --transit-websocket: WebSocket relay endpoint; "" for none
	onMailbox      bool   // --transit-on-mailbox-port
	maxWait        time.Duration
	maxIdle        time.Duration
	sessionBytes   int64 // 0: no limit
	sessionTime    time.Duration
	connsPerAddr   int
	conns          int
	waitingPerAddr int
	waiting        int
	ratePerAddr    int64 // bytes per second; 0: no limit
	rate           int64
	shutdownGrace  time.Duration
}

// enabled reports whether any transit listener is asked for.
func (c transitConfig) enabled() bool { return c.port != "" || c.websocket != "" || c.onMailbox }

// defaultTransitConfig is the configuration with every limit at its
// default and no listener.
func defaultTransitConfig() transitConfig {
	return transitConfig{maxWait: defaultTransitMaxWait, maxIdle: defaultTransitMaxIdle,
		connsPerAddr: defaultTransitConnsPerAddr, conns: defaultTransitConns,
		waitingPerAddr: defaultTransitWaitingPerAddr, waiting: defaultTransitWaiting,
		shutdownGrace: defaultTransitShutdownGrace}
}

// addTransitFlags defines the transit flags on fs, setting c.
func addTransitFlags(fs *flag.FlagSet, c *transitConfig) {
	fs.StringVar(&c.port, "transit-port", "", "serve the TCP transit relay on this `endpoint` (as --port, e.g. tcp:4001); clients get the hint tcp:HOST:PORT; off by default")
	fs.StringVar(&c.websocket, "transit-websocket", "", "serve the WebSocket transit relay on this `endpoint` (e.g. tcp:4002), any path; hint ws://HOST:PORT/; off by default")
	fs.BoolVar(&c.onMailbox, "transit-on-mailbox-port", false, "also serve the WebSocket transit relay on the mailbox's listener, at /transit and on / (hint ws[s]://HOST:PORT/transit)")
	fs.DurationVar(&c.maxWait, "transit-max-wait", c.maxWait, "how long a relay connection may wait for its partner")
	fs.DurationVar(&c.maxIdle, "transit-max-idle", c.maxIdle, "how long a relayed pair may send nothing either way")
	fs.Int64Var(&c.sessionBytes, "transit-max-session-bytes", 0, "most `bytes` one relayed pair may send, both ways together; 0: no limit")
	fs.DurationVar(&c.sessionTime, "transit-max-session-time", 0, "longest a relayed pair may last; 0: no limit")
	fs.IntVar(&c.connsPerAddr, "transit-max-connections-per-ip", c.connsPerAddr, "most relay connections from one IPv4 address or IPv6 /64; 0: no limit")
	fs.IntVar(&c.conns, "transit-max-connections", c.conns, "most relay connections in all; when reached, an address below its fair share takes the place of one from the address holding most; 0: no limit")
	fs.IntVar(&c.waitingPerAddr, "transit-max-waiting-per-ip", c.waitingPerAddr, "most unpaired relay connections from one IPv4 address or IPv6 /64; 0: no limit")
	fs.IntVar(&c.waiting, "transit-max-waiting", c.waiting, "most unpaired relay connections in all, with the same fair share; 0: no limit")
	fs.Int64Var(&c.ratePerAddr, "transit-rate-per-ip", 0, "most `bytes` per second relayed from one IPv4 address or IPv6 /64; 0: no limit")
	fs.Int64Var(&c.rate, "transit-rate", 0, "most `bytes` per second relayed in all; 0: no limit")
	fs.DurationVar(&c.shutdownGrace, "transit-shutdown-grace", c.shutdownGrace, "on shutdown, how long relayed transfers under way may go on before they are cut")
}

// check reports a flag value out of range.
func (c transitConfig) check() error {
	for _, f := range []struct {
		name  string
		value int64
	}{
		{"transit-max-wait", int64(c.maxWait)}, {"transit-max-idle", int64(c.maxIdle)},
		{"transit-max-session-bytes", c.sessionBytes}, {"transit-max-session-time", int64(c.sessionTime)},
		{"transit-max-connections-per-ip", int64(c.connsPerAddr)}, {"transit-max-connections", int64(c.conns)},
		{"transit-max-waiting-per-ip", int64(c.waitingPerAddr)}, {"transit-max-waiting", int64(c.waiting)},
		{"transit-rate-per-ip", c.ratePerAddr}, {"transit-rate", c.rate},
		{"transit-shutdown-grace", int64(c.shutdownGrace)},
	} {
		if f.value < 0 {
			return fmt.Errorf("--%s must not be negative", f.name)
		}
	}
	if c.maxWait == 0 || c.maxIdle == 0 {
		return errors.New("--transit-max-wait and --transit-max-idle must be more than 0")
	}
	return nil
}

// transitUsage records one relay session, with the reference's fields:
// one record per pair (written when its first side ends), and one for
// each connection that never paired. started is the start of the
// connection whose end wrote the record (blurred); waiting_time is null
// when the connection never paired.
type transitUsage struct {
	Type        string   `json:"type"` // "transit"
	Started     float64  `json:"started"`
	TotalTime   float64  `json:"total_time"`
	WaitingTime *float64 `json:"waiting_time"`
	TotalBytes  int64    `json:"total_bytes"` // both directions; blurred
	Mood        string   `json:"mood"`        // happy, lonely, errory or redundant
}

// transitSession writes a transit usage record.
func (u *usageLog) transitSession(started, total float64, waiting *float64, bytes int64, mood string) {
	if u == nil {
		return
	}
	if u.blur > 0 {
		bytes = blurSize(bytes)
	}
	u.write(&transitUsage{Type: usageTransit, Started: u.blurred(started), TotalTime: total,
		WaitingTime: waiting, TotalBytes: bytes, Mood: mood}, unixSeconds(time.Now()), true) // a session, as a channel record
}

// blurSize rounds a byte count up as the reference does: to 10 kB below
// 1 MB, to 1 MB below 1 GB, and to 100 MB above.
func blurSize(n int64) int64 {
	round := func(step int64) int64 { return step * ((n-1)/step + 1) }
	switch {
	case n <= 0:
		return 0
	case n < 1e6:
		return round(10e3)
	case n < 1e9:
		return round(1e6)
	}
	return round(100e6)
}

// transitMetrics are the relay's live counters, among the server's.
type transitMetrics struct {
	connections expvar.Int // open relay connections
	waiting     expvar.Int // connections with a handshake, waiting for their partner
	paired      expvar.Int // pairs relaying
	bytes       expvar.Int // bytes relayed, both directions
	moods       expvar.Map // sessions ended, by mood
	refusals    expvar.Map // connections refused or closed by a limit, by limit
	cuts        expvar.Map // pairs the relay ended itself, by reason
}

func newTransitMetrics(m *metrics) *transitMetrics {
	tm := &transitMetrics{}
	tm.moods.Init()
	tm.refusals.Init()
	tm.cuts.Init()
	for name, v := range map[string]expvar.Var{
		"transit_connections": &tm.connections, "transit_waiting": &tm.waiting, "transit_paired": &tm.paired,
		"transit_bytes": &tm.bytes, "transit_moods": &tm.moods, "transit_refusals": &tm.refusals, "transit_cuts": &tm.cuts,
	} {
		m.vars.Set(name, v)
	}
	return tm
}

// transitState is where a connection is in its life.
type transitState int

const (
	transitHandshaking transitState = iota // reading the handshake
	transitWaiting                         // registered under its token
	transitPaired                          // relaying
	transitDone                            // ended, or told to end (redundant, evicted)
)

// transitRelay is the relay: its listeners, the connections waiting for a
// partner by token, and the limits.
type transitRelay struct {
	cfg     transitConfig
	log     *slog.Logger
	usage   *usageLog
	m       *transitMetrics
	blurLog bool        // log no client addresses
	logs    *logSampler // bounds the sessions' log lines, with the mailbox's connections'
	addrOf  func(*http.Request) (clientAddr, bool)
	total   *tokenBucket // --transit-rate; nil: none

	mu           sync.Mutex
	waiting      map[string][]*transitConn // by token, in the order they came
	addrs        map[netip.Addr]*transitAddr
	conns        int // all open connections
	unpaired     int // handshaking or waiting
	pairs        map[*transitPair]struct{}
	shuttingDown bool
	wg           sync.WaitGroup // one per connection being served

	listeners []net.Listener
	wsServer  *http.Server

	// notify, if set (by tests), is told of each connection that starts
	// waiting for its partner ("waiting") and each that has ended
	// ("ended"), after the fact.
	notify func(event string)
}

// transitAddr is one address's share of the relay.
type transitAddr struct {
	conns    map[*transitConn]struct{}
	unpaired int
	bucket   *tokenBucket // --transit-rate-per-ip; nil: none
}

// newTransitRelay makes the relay; start opens its listeners.
func newTransitRelay(cfg transitConfig, log *slog.Logger, m *metrics, usage *usageLog, blurLog bool, logs *logSampler,
	addrOf func(*http.Request) (clientAddr, bool)) *transitRelay {
	r := &transitRelay{cfg: cfg, log: log, usage: usage, m: newTransitMetrics(m), blurLog: blurLog, logs: logs, addrOf: addrOf,
		waiting: make(map[string][]*transitConn), addrs: make(map[netip.Addr]*transitAddr),
		pairs: make(map[*transitPair]struct{})}
	if cfg.rate > 0 {
		r.total = newTokenBucket(cfg.rate)
	}
	return r
}

// start opens the TCP and WebSocket listeners the configuration asks for.
func (r *transitRelay) start(listenTCP func(string) (net.Listener, error)) error {
	// listen opens the listener for the endpoint a flag gives.
	listen := func(flag, endpoint string) (net.Listener, error) {
		addr, err := listenAddress(endpoint)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", flag, err)
		}
		ln, err := listenTCP(addr)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", flag, err)
		}
		r.listeners = append(r.listeners, ln)
		return ln, nil
	}
	if r.cfg.port != "" {
		ln, err := listen("--transit-port", r.cfg.port)
		if err != nil {
			return err
		}
		r.log.Info("transit relay listening", "endpoint", "tcp:"+ln.Addr().String())
		go r.serveTCP(ln)
	}
	if r.cfg.websocket != "" {
		ln, err := listen("--transit-websocket", r.cfg.websocket)
		if err != nil {
			return err
		}
		r.wsServer = &http.Server{Handler: http.HandlerFunc(r.serveWebSocket), ReadHeaderTimeout: readHeaderTimeout,
			MaxHeaderBytes: maxHeaderBytes, IdleTimeout: httpIdleTimeout, ErrorLog: httpErrorLog(r.log, r.blurLog)}
		r.log.Info("transit websocket listening", "url", "ws://"+ln.Addr().String()+"/")
		go r.wsServer.Serve(ln)
	}
	return nil
}

// serveTCP accepts TCP relay connections until the listener closes.
func (r *transitRelay) serveTCP(ln net.Listener) {
	for {
		nc, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			r.log.Warn("transit accept", "err", err)
			time.Sleep(transitAcceptRetry)
			continue
		}
		tc, ok := nc.(*net.TCPConn)
		if !ok {
			nc.Close()
			continue
		}
		ap, _ := netip.ParseAddrPort(nc.RemoteAddr().String())
		c := &transitConn{tcp: tc, raw: tc, addr: clientAddr{ip: ap.Addr().Unmap(), port: ap.Port()}}
		if !r.admit(c) {
			tc.Close()
			continue
		}
		go r.serveConn(c)
	}
}

// serveWebSocket upgrades a request to a WebSocket relay connection. As
// for the mailbox's connections (serveWebSocket in conn.go), the socket
// is taken from net/http and served by a goroutine of its own.
func (r *transitRelay) serveWebSocket(w http.ResponseWriter, req *http.Request) {
	if !strings.EqualFold(req.Header.Get("Upgrade"), "websocket") {
		http.Error(w, "This is a Magic Wormhole transit relay's WebSocket endpoint; use a wormhole client.", http.StatusUpgradeRequired)
		return
	}
	addr, ok := r.addrOf(req)
	if !ok {
		http.Error(w, "cannot tell the client's address", http.StatusBadRequest)
		return
	}
	netConn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		http.Error(w, "cannot upgrade this connection", http.StatusInternalServerError)
		return
	}
	c := &transitConn{addr: addr, raw: netConn}
	if !r.admit(c) {
		netConn.SetWriteDeadline(time.Now().Add(transitWriteTimeout))
		io.WriteString(netConn, "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
		netConn.Close()
		return
	}
	c.br = bufio.NewReaderSize(hijackedReader(netConn, brw), transitWSReadBuffer)
	handover := &handedOver{Conn: netConn}
	ws := websocket.Server{
		Handshake: func(*websocket.Config, *http.Request) error { return nil }, // any Origin, or none
		Handler:   func(ws *websocket.Conn) { c.ws = ws },
	}
	rw := bufio.NewReadWriter(c.br, bufio.NewWriterSize(handover, transitWSWriteBuffer))
	ws.ServeHTTP(&hijacked{conn: handover, rw: rw}, handshakeRequest(req))
	if c.ws == nil { // refused, and x/net's answer sent
		netConn.Close()
		r.release(c)
		r.wg.Done()
		return
	}
	c.ws.PayloadType = websocket.BinaryFrame
	c.ws.MaxPayloadBytes = transitMaxWSHandshake
	go r.serveConn(c)
}

// admit counts a new connection against the limits, and reports whether
// it may stay. When the total is reached, a connection from an address
// below its fair share takes the place of one from the address holding
// the most (see evictLocked). Once admitted, the connection is counted in
// r.wg until serveConn ends.
func (r *transitRelay) admit(c *transitConn) bool {
	c.started = time.Now()
	c.relay = r
	k := addrKey(c.addr.ip)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.shuttingDown {
		return false
	}
	a := r.addrs[k]
	if a == nil {
		a = &transitAddr{conns: make(map[*transitConn]struct{})}
		if r.cfg.ratePerAddr > 0 {
			a.bucket = newTokenBucket(r.cfg.ratePerAddr)
		}
	}
	refuse := func(limit string) bool {
		r.m.refusals.Add(limit, 1)
		if len(a.conns) == 0 {
			delete(r.addrs, k)
		}
		return false
	}
	switch {
	case r.cfg.connsPerAddr > 0 && len(a.conns) >= r.cfg.connsPerAddr:
		return refuse("connections per address")
	case r.cfg.waitingPerAddr > 0 && a.unpaired >= r.cfg.waitingPerAddr:
		return refuse("waiting per address")
	}
	r.addrs[k] = a
	if r.cfg.conns > 0 && r.conns >= r.cfg.conns &&
		!r.evictLocked(k, func(a *transitAddr) int { return len(a.conns) }, false) {
		return refuse("connections")
	}
	if r.cfg.waiting > 0 && r.unpaired >= r.cfg.waiting &&
		!r.evictLocked(k, func(a *transitAddr) int { return a.unpaired }, true) {
		return refuse("waiting")
	}
	a.conns[c] = struct{}{}
	c.addrState = a
	r.conns++
	r.unpaired++
	a.unpaired++
	r.m.connections.Add(1)
	r.wg.Add(1)
	return true
}

// evictLocked makes room for a newcomer from address k when a total is
// reached. Every address's fair share is the total divided among the
// addresses present (the newcomer's included). If k holds less than that
// and another address holds more, one of that address's connections is
// closed: an unpaired one if it has any (the oldest), else, unless
// unpairedOnly, a pair of its. It reports whether room was made.
func (r *transitRelay) evictLocked(k netip.Addr, count func(*transitAddr) int, unpairedOnly bool) bool {
	limit := r.cfg.conns
	if unpairedOnly {
		limit = r.cfg.waiting
	}
	share := limit / max(1, len(r.addrs))
	if count(r.addrs[k]) >= share {
		return false
	}
	var top *transitAddr
	for ak, a := range r.addrs {
		if ak != k && (top == nil || count(a) > count(top)) {
			top = a
		}
	}
	if top == nil || count(top) <= share {
		return false
	}
	var victim *transitConn
	for c := range top.conns {
		if c.state != transitPaired && (victim == nil || c.started.Before(victim.started)) {
			victim = c
		}
	}
	if victim == nil && !unpairedOnly {
		for c := range top.conns {
			victim = c
			break
		}
	}
	if victim == nil {
		return false
	}
	r.m.refusals.Add("evicted for fair share", 1)
	if victim.state == transitPaired {
		victim.pair.cut(errTransitEvicted, true)
	} else {
		r.endUnpairedLocked(victim, errTransitEvicted)
	}
	r.forgetLocked(victim)
	return true
}

// endUnpairedLocked tells an unpaired connection to end: it is taken
// from the waiting list and its socket closed, which ends its goroutine.
func (r *transitRelay) endUnpairedLocked(c *transitConn, why error) {
	if c.state == transitWaiting {
		r.unregisterLocked(c)
	}
	c.state, c.endReason = transitDone, why
	c.raw.Close()
}

// forgetLocked stops counting a connection against the limits. It may be
// called more than once.
func (r *transitRelay) forgetLocked(c *transitConn) {
	a := c.addrState
	if a == nil {
		return
	}
	c.addrState = nil
	if !c.wasPaired {
		a.unpaired--
		r.unpaired--
	}
	delete(a.conns, c)
	r.conns--
	r.m.connections.Add(-1)
	if len(a.conns) == 0 {
		delete(r.addrs, addrKey(c.addr.ip))
	}
}

// release is forgetLocked under the lock.
func (r *transitRelay) release(c *transitConn) {
	r.mu.Lock()
	r.forgetLocked(c)
	r.mu.Unlock()
}

// unregisterLocked takes a waiting connection from its token's list.
func (r *transitRelay) unregisterLocked(c *transitConn) {
	list := r.waiting[c.token]
	for i, w := range list {
		if w == c {
			list = append(list[:i:i], list[i+1:]...)
			break
		}
	}
	if len(list) == 0 {
		delete(r.waiting, c.token)
	} else {
		r.waiting[c.token] = list
	}
	r.m.waiting.Add(-1)
}

// transitConn is one client's relay connection, TCP or WebSocket.
type transitConn struct {
	relay   *transitRelay
	addr    clientAddr
	started time.Time
	raw     net.Conn        // the socket (TLS over it, through the mailbox's listener with --tls-cert)
	tcp     *net.TCPConn    // the socket, if plain TCP: spliced to a TCP partner
	ws      *websocket.Conn // nil for a TCP client
	br      *bufio.Reader   // what ws reads through; nil for TCP
	frame   io.Reader       // the WebSocket data frame being read, if any
	early   []byte          // bytes read while the pair was forming, to pass on first
	sent    atomic.Int64    // bytes of this client's relayed to its partner

	// Guarded by relay.mu:
	state     transitState
	token     string
	side      string // "" for the old handshake without a side
	busy      bool   // a waiting WebSocket client's control frame is being read: do not wake it
	wasPaired bool
	pair      *transitPair
	endReason error
	addrState *transitAddr
}

// serveConn is a connection's goroutine: the handshake, the wait for a
// partner, and this client's direction of the relay.
func (r *transitRelay) serveConn(c *transitConn) {
	defer r.wg.Done()
	defer r.event("ended")
	defer r.release(c)
	token, side, reply, ok := c.readHandshake()
	if !ok {
		if reply == "" { // closed or silent before a whole handshake: no record, as the reference
			c.raw.Close()
			return
		}
		c.reply(reply)
		r.record(c, moodErrory)
		c.closeNow()
		return
	}
	p := r.register(c, token, side)
	if p == nil {
		r.event("waiting")
		p = c.waitForPartner()
		if p == nil {
			return
		}
	}
	p.run(c)
}

// event tells notify, if set, of an event.
func (r *transitRelay) event(what string) {
	if r.notify != nil {
		r.notify(what)
	}
}

// readHandshake reads the client's handshake: a line for TCP, decided as
// the Debian reference decides it; the first message for WebSocket. It
// returns the reply to send if the handshake was refused ("" to close
// without one).
func (c *transitConn) readHandshake() (token, side, reply string, ok bool) {
	c.raw.SetReadDeadline(time.Now().Add(transitHandshakeTimeout))
	if c.ws != nil {
		return c.readWSHandshake()
	}
	var buf [transitHandshakeBuf]byte
	n := 0
	for {
		m, err := c.tcp.Read(buf[n:])
		n += m
		if m > 0 {
			switch v, tok, sd, extra := parseTransitHandshake(buf[:n]); v {
			case handshakeMatched:
				if extra {
					return "", "", transitImpatient, false
				}
				return tok, sd, "", true
			case handshakeRefused:
				return "", "", transitBad, false
			}
		}
		if err != nil {
			return "", "", "", false // closed or silent before a whole handshake: no record, as the reference
		}
	}
}

// handshakeVerdict is what the bytes read so far say.
type handshakeVerdict int

const (
	handshakeWaiting handshakeVerdict = iota // could still become a handshake
	handshakeMatched                         // a handshake, with or without bytes after it
	handshakeRefused                         // can never become one
)

// parseTransitHandshake decides on the bytes a TCP client has sent so far,
// as the Debian reference does. Each form is looked at once the buffer is
// as long as that form's line (the old form: 78 bytes, the new: 104), or
// earlier if a newline shows that the line is too short; a buffer that
// holds a whole line of neither form by 104 bytes is refused. A line is
// found at the start of the buffer or after any newline in it; bytes past
// the handshake (extra) are the client's impatience.
func parseTransitHandshake(buf []byte) (v handshakeVerdict, token, side string, extra bool) {
	hasNewline := bytes.IndexByte(buf, '\n') >= 0
	form := func(length int, sided bool) handshakeVerdict {
		if len(buf) < length-1 && hasNewline {
			return handshakeRefused
		}
		if len(buf) < length {
			return handshakeWaiting
		}
		for i := 0; i+length <= len(buf); i++ {
			if i > 0 && buf[i-1] != '\n' {
				continue
			}
			if tok, sd, ok := matchHandshakeLine(buf[i:i+length], sided); ok {
				token, side = tok, sd
				extra = len(buf) > length
				return handshakeMatched
			}
		}
		return handshakeRefused
	}
	oldV := form(transitOldLen, false)
	if oldV == handshakeMatched {
		return oldV, token, "", extra
	}
	newV := form(transitNewLen, true)
	if newV == handshakeMatched {
		return newV, token, side, extra
	}
	if oldV == handshakeRefused && newV == handshakeRefused {
		return handshakeRefused, "", "", false
	}
	return handshakeWaiting, "", "", false
}

// matchHandshakeLine matches one whole line, newline included, of the
// old form ("please relay TOKEN\n") or, if sided, the new one ("please
// relay TOKEN for side SIDE\n"). Tokens and sides are word characters,
// as the reference's pattern (\w) matches them; clients send lowercase
// hex.
func matchHandshakeLine(line []byte, sided bool) (token, side string, ok bool) {
	rest, ok := bytes.CutPrefix(line, []byte(transitHandshakePrefix))
	if !ok || len(rest) < transitTokenLen+1 || !isWord(rest[:transitTokenLen]) {
		return "", "", false
	}
	token, rest = string(rest[:transitTokenLen]), rest[transitTokenLen:]
	if sided {
		if rest, ok = bytes.CutPrefix(rest, []byte(transitSidePrefix)); !ok || len(rest) < transitSideLen || !isWord(rest[:transitSideLen]) {
			return "", "", false
		}
		side, rest = string(rest[:transitSideLen]), rest[transitSideLen:]
	}
	return token, side, string(rest) == "\n"
}

// isWord reports whether b is all ASCII word characters: [A-Za-z0-9_].
func isWord(b []byte) bool {
	for _, ch := range b {
		if !(ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch >= '0' && ch <= '9' || ch == '_') {
			return false
		}
	}
	return true
}

// readWSHandshake reads the first message of a WebSocket client, which
// must hold the whole handshake (its newline optional) in a binary frame.
func (c *transitConn) readWSHandshake() (token, side, reply string, ok bool) {
	fr, err := c.nextFrame(false)
	if err != nil {
		return "", "", "", false
	}
	if fr.PayloadType() != websocket.BinaryFrame {
		c.ws.WriteClose(closeUnsupported)
		return "", "", "", false
	}
	msg, err := io.ReadAll(io.LimitReader(fr, transitMaxWSHandshake+1))
	if err != nil {
		return "", "", "", false
	}
	if len(msg) > transitMaxWSHandshake {
		return "", "", transitBad, false
	}
	if !bytes.HasSuffix(msg, []byte("\n")) {
		msg = append(msg, '\n')
	}
	if tok, sd, ok := matchHandshakeLine(msg, false); ok {
		return tok, sd, "", true
	}
	if tok, sd, ok := matchHandshakeLine(msg, true); ok {
		return tok, sd, "", true
	}
	return "", "", transitBad, false
}

// closeUnsupported is the WebSocket close status for a frame of a type
// the endpoint does not take (RFC 6455 §7.4.1): text, here.
const closeUnsupported = 1003

// register files a connection with a handshake under its token. If a
// connection waiting under the same token can pair with it (either has
// no side, or their sides differ), the two are paired, every other
// connection waiting under the token is closed as redundant, both are told
// "ok", and the new pair is returned; otherwise the connection waits and
// nil is returned.
func (r *transitRelay) register(c *transitConn, token, side string) *transitPair {
	r.mu.Lock()
	c.token, c.side = token, side
	var partner *transitConn
	list := r.waiting[token]
	for _, w := range list {
		if w.side == "" || side == "" || w.side != side {
			partner = w
			break
		}
	}
	if partner == nil {
		// The wait is bounded from here. The deadline is not moved again
		// until the connection is paired or ended, so a wake-up (a
		// deadline in the past, set by whoever pairs or ends it) is never
		// undone.
		deadline := c.started.Add(r.cfg.maxWait)
		if r.shuttingDown || c.state == transitDone {
			deadline = time.Now()
		}
		c.raw.SetReadDeadline(deadline)
		if c.state != transitDone {
			c.state = transitWaiting
			r.waiting[token] = append(list, c)
			r.m.waiting.Add(1)
		}
		r.mu.Unlock()
		return nil
	}
	var redundant []*transitConn
	for _, w := range list {
		if w != partner {
			redundant = append(redundant, w)
			w.state, w.endReason = transitDone, errRedundant
		}
		r.m.waiting.Add(-1)
	}
	delete(r.waiting, token)
	p := r.pairLocked(partner, c)
	r.mu.Unlock()
	for _, w := range redundant {
		w.raw.SetReadDeadline(time.Now()) // wakes it; it sees it is done
	}
	// Each side is told "ok" before anything of its partner's can reach
	// it: the partner's direction starts only once ready is closed.
	c.reply(transitOK)
	partner.reply(transitOK)
	close(p.ready)
	partner.raw.SetReadDeadline(time.Now()) // wakes the waiter
	return p
}

// errRedundant ends a connection waiting under a token that another pair
// took.
var errRedundant = errors.New("redundant")

// pairLocked makes a pair of a waiting connection and a new one.
func (r *transitRelay) pairLocked(waiter, c *transitConn) *transitPair {
	p := &transitPair{relay: r, a: waiter, b: c, done: make(chan struct{}), ready: make(chan struct{})}
	p.budget.Store(r.cfg.sessionBytes)
	p.touch()
	for _, x := range []*transitConn{waiter, c} {
		x.state, x.pair, x.wasPaired = transitPaired, p, true
		if a := x.addrState; a != nil {
			a.unpaired--
			r.unpaired--
		}
	}
	r.pairs[p] = struct{}{}
	r.m.paired.Add(1)
	if r.cfg.sessionTime > 0 {
		p.timer = time.AfterFunc(r.cfg.sessionTime, func() { p.cut(errTransitTime, false) })
	}
	return p
}

// waitForPartner waits, after the handshake, until the connection is
// paired (returning the pair), or ends: it closes, sends bytes too early
// (impatient), is made redundant or evicted, or waits too long (lonely).
// Nothing it does is disturbed by a wake-up: it only peeks, and reads a
// control frame only once the whole frame has arrived.
func (c *transitConn) waitForPartner() *transitPair {
	r := c.relay
	for {
		err := c.peek()
		r.mu.Lock()
		state, why, p := c.state, c.endReason, c.pair
		r.mu.Unlock()
		switch {
		case state == transitPaired:
			<-p.ready
			return p
		case state == transitDone: // redundant or evicted
			if why == errRedundant {
				r.record(c, moodRedundant)
			}
			c.closeNow()
			return nil
		case err == nil && c.ws != nil && c.controlFrameNext():
			if _, err := c.nextFrame(true); err == nil {
				continue
			}
		}
		// Closed, waited too long, or sent bytes before "ok".
		r.mu.Lock()
		if c.state == transitPaired { // paired meanwhile after all
			p := c.pair
			r.mu.Unlock()
			<-p.ready
			return p
		}
		if c.state == transitWaiting {
			r.unregisterLocked(c)
		}
		c.state = transitDone
		r.mu.Unlock()
		switch {
		case err == nil: // bytes before "ok": the client is impatient
			c.reply(transitImpatient)
			r.record(c, moodErrory) // as the Debian reference records impatience
			c.closeNow()
		default:
			if isTimeout(err) {
				r.m.refusals.Add("max wait", 1)
			}
			r.record(c, moodLonely)
			c.raw.Close()
		}
		return nil
	}
}

// peek waits until the client has sent something, or its deadline
// passes, without consuming what it sent. A TCP client's byte is kept in
// early: if the pair has formed meanwhile, it starts the relayed stream.
func (c *transitConn) peek() error {
	if c.ws != nil {
		_, err := c.br.Peek(1)
		return err
	}
	if len(c.early) > 0 {
		return nil
	}
	var b [1]byte
	n, err := c.tcp.Read(b[:])
	if n > 0 {
		c.early = append(c.early, b[0])
		return nil
	}
	if err == nil {
		err = io.ErrNoProgress
	}
	return err
}

// controlFrameNext reports whether the frame a WebSocket client has begun
// to send, whose first byte has been peeked, is a control frame (ping,
// pong or close): that is not impatience.
func (c *transitConn) controlFrameNext() bool {
	b, err := c.br.Peek(1)
	return err == nil && b[0]&0x08 != 0
}

// wsFrame is a WebSocket frame being read, as x/net/websocket gives it.
type wsFrame interface {
	io.Reader
	PayloadType() byte
}

// nextFrame returns the next data frame of a WebSocket client, answering
// pings on the way; a close frame is io.EOF. With controlOnly it returns
// after one control frame (nil), or io.ErrNoProgress at a data frame.
//
// A frame's header is read only once all of it has arrived, and a
// control frame only once all of it has (both are peeked first), so that
// a read deadline (a wake-up, or the progress interval) can never fall in
// the middle of one and lose its start. Data frames' payloads may be read
// piecemeal: the frame reader keeps its place.
func (c *transitConn) nextFrame(controlOnly bool) (wsFrame, error) {
	for {
		b, err := c.br.Peek(2)
		if err != nil {
			return nil, err
		}
		n := 2
		switch b[1] & 0x7f {
		case 126:
			n += 2
		case 127:
			n += 8
		}
		if b[1]&0x80 != 0 {
			n += 4 // masking key
		}
		control := b[0]&0x08 != 0
		if control && b[1]&0x7f <= maxControlPayload {
			n += int(b[1] & 0x7f)
		}
		if _, err := c.br.Peek(n); err != nil {
			return nil, err
		}
		if controlOnly && !control {
			return nil, io.ErrNoProgress
		}
		fr, err := c.ws.NewFrameReader()
		if err != nil {
			return nil, err
		}
		handled, err := c.ws.HandleFrame(fr)
		if err != nil {
			return nil, err
		}
		if handled != nil {
			return handled, nil
		}
		if controlOnly {
			return nil, nil
		}
	}
}

// reply writes one of the relay's short replies.
func (c *transitConn) reply(text string) {
	c.raw.SetWriteDeadline(time.Now().Add(transitWriteTimeout))
	c.write([]byte(text))
}

// closeNow ends the connection from the relay's side: the client gets an
// end of stream after what it was sent, and is read until it closes.
func (c *transitConn) closeNow() {
	c.endStream()
	c.linger()
}

// endStream tells the client nothing more will come: a TCP end of
// stream after what it was sent, or a WebSocket close frame.
func (c *transitConn) endStream() {
	c.raw.SetWriteDeadline(time.Now().Add(transitWriteTimeout))
	if c.ws != nil {
		c.ws.WriteClose(closeNormal)
	} else if c.tcp != nil {
		c.tcp.CloseWrite()
	}
}

// linger reads and discards what the client still sends, until it
// closes or transitLinger passes, then closes the socket.
func (c *transitConn) linger() {
	c.raw.SetReadDeadline(time.Now().Add(transitLinger))
	io.CopyN(io.Discard, c.raw, transitMaxLingerBytes)
	c.raw.Close()
}

// record writes the usage record of a connection that never paired,
// counts its mood, and logs it.
func (r *transitRelay) record(c *transitConn, mood string) {
	r.m.moods.Add(mood, 1)
	took := time.Since(c.started)
	r.usage.transitSession(unixSeconds(c.started), took.Seconds(), nil, 0, mood)
	r.logs.log(r.log, r.log.Info, "transit connection ended unpaired", "client", loggedAddr(r.blurLog, c.addr), "mood", mood,
		"duration", took.Round(time.Millisecond))
}

// unixSeconds is t in Unix seconds with a fraction.
func unixSeconds(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }

// transitPair is two paired connections relaying to each other.
type transitPair struct {
	relay *transitRelay
	a, b  *transitConn // the one that waited, and the one that completed the pair
	last  atomic.Int64 // when either direction last moved bytes, Unix nanoseconds
	// budget is what the pair may still send under --transit-max-session-bytes.
	budget atomic.Int64
	timer  *time.Timer   // --transit-max-session-time
	ready  chan struct{} // closed once both have been told "ok"
	done   chan struct{} // closed when the pair is cut, to stop a wait for bandwidth

	stopping atomic.Bool // a direction has ended, or the pair was cut: both stop

	mu        sync.Mutex
	ending    bool  // a direction has ended
	cutReason error // why the relay cut the pair, if it did before either ended
	cutOnce   sync.Once
	finished  int // directions done

	firstEnded *transitConn // the side whose direction ended first
	endedAt    time.Time    // when it did
	endReason  error        // why the relay ended the pair, if it did
}

func (p *transitPair) touch() { p.last.Store(time.Now().UnixNano()) }

func (p *transitPair) other(c *transitConn) *transitConn {
	if c == p.a {
		return p.b
	}
	return p.a
}

// run relays what c sends to its partner until one of them ends, then
// ends the pair. The first direction to end writes the usage record,
// gives the partner an end of stream after everything c sent, closes c,
// and wakes the partner's direction; that one then lingers on its client
// until it closes.
func (p *transitPair) run(c *transitConn) {
	r := p.relay
	dst := p.other(c)
	err := p.relayFrom(c, dst)
	p.mu.Lock()
	first := !p.ending
	p.ending = true
	p.stopping.Store(true)
	cut := p.cutReason
	p.mu.Unlock()
	if first {
		if cut == nil && (errors.Is(err, errTransitIdle) || errors.Is(err, errTransitBytes) || errors.Is(err, errTransitTextFrame)) {
			cut = err
		}
		p.mu.Lock()
		p.firstEnded, p.endedAt, p.endReason = c, time.Now(), cut
		p.mu.Unlock()
		dst.endStream()
		if c.ws != nil {
			c.endStream()
		}
		c.raw.Close()
		dst.raw.SetReadDeadline(time.Now()) // wakes dst's direction if it waits to read
	} else {
		c.linger()
	}
	p.mu.Lock()
	p.finished++
	last := p.finished == 2
	p.mu.Unlock()
	if last {
		p.record()
		if p.timer != nil {
			p.timer.Stop()
		}
		r.mu.Lock()
		delete(r.pairs, p)
		r.mu.Unlock()
		r.m.paired.Add(-1)
	}
}

// record writes the pair's usage record once both directions are done,
// so that it counts every byte: as the reference's, it is written for the
// side that ended first (its start time), with the time until then.
func (p *transitPair) record() {
	r := p.relay
	mood := moodHappy // a client closed, or its socket failed, as with the reference
	if p.endReason != nil {
		mood = moodErrory
		r.m.cuts.Add(p.endReason.Error(), 1)
	}
	r.m.moods.Add(mood, 1)
	begun := p.a.started
	if p.b.started.Before(begun) {
		begun = p.b.started
	}
	waiting := p.b.started.Sub(p.a.started).Abs().Seconds()
	bytes, took := p.a.sent.Load()+p.b.sent.Load(), p.endedAt.Sub(begun)
	r.usage.transitSession(unixSeconds(p.firstEnded.started), took.Seconds(), &waiting, bytes, mood)
	args := []any{"clients", loggedAddr(r.blurLog, p.a.addr) + " " + loggedAddr(r.blurLog, p.b.addr), "mood", mood, "bytes", bytes,
		"duration", took.Round(time.Millisecond)}
	if p.endReason != nil {
		args = append(args, "reason", p.endReason.Error())
	}
	r.logs.log(r.log, r.log.Info, "transit session ended", args...)
}

// cut ends the pair from the relay's side: both directions are woken and
// stop. Hard also closes both sockets at once, with no lingering.
func (p *transitPair) cut(why error, hard bool) {
	p.mu.Lock()
	if p.cutReason == nil && !p.ending {
		p.cutReason = why
	}
	p.stopping.Store(true)
	p.mu.Unlock()
	p.cutOnce.Do(func() { close(p.done) })
	now := time.Now()
	for _, c := range []*transitConn{p.a, p.b} {
		if hard {
			c.raw.Close()
		} else {
			c.raw.SetDeadline(now)
		}
	}
}

// relayFrom copies what src sends to dst, until src ends, dst fails, or
// the pair is cut or idle too long. Between two TCP sockets the kernel
// moves the bytes (splice); otherwise they go through a pooled buffer.
// The read deadline is moved every transitProgressInterval so that the
// limits are looked at; the write deadline is the idle limit, so that a
// partner that takes nothing for that long ends the pair.
func (p *transitPair) relayFrom(src, dst *transitConn) error {
	r := p.relay
	idle := r.cfg.maxIdle
	bucket := src.bucket()
	if len(src.early) > 0 { // charged like the rest, or a pair could pass its byte limit by it
		dst.raw.SetWriteDeadline(time.Now().Add(idle))
		if err := dst.write(src.early); err != nil {
			return err
		}
		p.moved(src, bucket, int64(len(src.early)))
		src.early = nil
	}
	splice := src.ws == nil && dst.ws == nil && src.tcp != nil && dst.tcp != nil
	chunk := int64(transitChunkBytes)
	var buf *[]byte
	if !splice {
		buf = transitBuffers.Get().(*[]byte)
		defer transitBuffers.Put(buf)
		chunk = int64(len(*buf))
	}
	for {
		want := chunk
		if r.cfg.sessionBytes > 0 {
			if want = min(want, p.budget.Load()); want <= 0 {
				return errTransitBytes
			}
		}
		if bucket != nil || r.total != nil {
			allowed, err := p.allowance(bucket)
			if err != nil {
				return p.stopReason(err)
			}
			want = min(want, allowed)
		}
		start := time.Now()
		src.raw.SetReadDeadline(start.Add(min(transitProgressInterval, idle)))
		dst.raw.SetWriteDeadline(start.Add(idle))
		if p.stopping.Load() { // checked after the deadlines are set: a wake-up after this is not lost
			return p.stopReason(nil)
		}
		var n int64
		var err error
		if splice {
			n, err = dst.tcp.ReadFrom(&io.LimitedReader{R: src.tcp, N: want})
			if err == nil && n < want {
				err = io.EOF
			}
		} else {
			n, err = src.copyOnce(dst, (*buf)[:want])
		}
		if n > 0 {
			p.touch()
			p.moved(src, bucket, n)
		}
		switch {
		case err == nil:
			continue
		case p.stopping.Load():
			return p.stopReason(err)
		case isTimeout(err) && time.Since(start) >= idle:
			return errTransitIdle // the partner took nothing for the idle limit
		case isTimeout(err):
			if time.Since(time.Unix(0, p.last.Load())) >= idle {
				return errTransitIdle
			}
			continue
		}
		return err
	}
}

// stopReason is why a direction stops once the pair is stopping: the
// cut's reason, or err (io.EOF if none).
func (p *transitPair) stopReason(err error) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cutReason != nil {
		return p.cutReason
	}
	if err == nil {
		return io.EOF
	}
	return err
}

// The session byte budget and the bandwidth buckets are charged for what
// a direction has moved, after it moved it; before each chunk a direction
// only waits until there is budget or bandwidth left, and moves at most
// that much. A direction that waits for its client to send holds nothing,
// and the two directions of a pair, or the pairs sharing a bucket, can
// together exceed a limit by what they moved at the same moment, at most
// one chunk each, which the buckets then take back.

// allowance waits until the address's bucket and the total's, whichever
// are set, have bandwidth left, and returns how much a direction may move
// now; or an error if the pair is cut meanwhile.
func (p *transitPair) allowance(bucket *tokenBucket) (int64, error) {
	n := int64(transitChunkBytes)
	for _, b := range []*tokenBucket{bucket, p.relay.total} {
		if b == nil {
			continue
		}
		got, err := b.wait(p.done)
		if err != nil {
			return 0, err
		}
		n = min(n, got)
	}
	return n, nil
}

// moved counts n bytes src's direction has moved, for the usage record
// and the metrics, and charges them to the session budget and the
// buckets.
func (p *transitPair) moved(src *transitConn, bucket *tokenBucket, n int64) {
	src.sent.Add(n)
	p.relay.m.bytes.Add(n)
	if p.relay.cfg.sessionBytes > 0 {
		p.budget.Add(-n)
	}
	if bucket != nil {
		bucket.spend(n)
	}
	if t := p.relay.total; t != nil {
		t.spend(n)
	}
}

// bucket is the bandwidth bucket of the connection's address, if any.
func (c *transitConn) bucket() *tokenBucket {
	c.relay.mu.Lock()
	defer c.relay.mu.Unlock()
	if c.addrState == nil {
		return nil
	}
	return c.addrState.bucket
}

// transitBuffers pools the buffers that directions with a WebSocket end
// copy through.
var transitBuffers = sync.Pool{New: func() any {
	b := make([]byte, transitBufferBytes)
	return &b
}}

// copyOnce reads once from c into buf and writes what it read to dst.
func (c *transitConn) copyOnce(dst *transitConn, buf []byte) (int64, error) {
	n, err := c.read(buf)
	if n > 0 {
		if werr := dst.write(buf[:n]); werr != nil {
			return 0, werr
		}
	}
	return int64(n), err
}

// read reads relayed bytes from the client: from a TCP socket, or the
// payloads of a WebSocket client's binary frames.
func (c *transitConn) read(p []byte) (int, error) {
	if c.ws == nil {
		return c.raw.Read(p)
	}
	for {
		if c.frame == nil {
			fr, err := c.nextFrame(false)
			if err != nil {
				return 0, err
			}
			if fr.PayloadType() != websocket.BinaryFrame {
				return 0, errTransitTextFrame
			}
			c.frame = fr
		}
		n, err := c.frame.Read(p)
		if err == io.EOF {
			c.frame, err = nil, nil
			if n == 0 {
				continue
			}
		}
		return n, err
	}
}

// write sends relayed bytes to the client: as they are to a TCP socket,
// or as one binary WebSocket message. x/net/websocket serialises its
// writes, so a pong it sends meanwhile comes before or after the frame.
func (c *transitConn) write(p []byte) error {
	var err error
	if c.ws != nil {
		_, err = c.ws.Write(p)
	} else {
		_, err = c.raw.Write(p)
	}
	return err
}

// tokenBucket is a bandwidth limit: it holds up to a tenth of a second's
// bytes (at least transitRateMinChunk) and refills at rate bytes a
// second. What is spent may take it below empty; it is then a debt, paid
// off before anything more may move.
type tokenBucket struct {
	rate  float64
	burst float64
	mu    sync.Mutex
	level float64
	last  time.Time
}

func newTokenBucket(rate int64) *tokenBucket {
	burst := max(float64(rate)/10, transitRateMinChunk)
	return &tokenBucket{rate: float64(rate), burst: burst, level: burst, last: time.Now()}
}

// refillLocked adds what the time since the last refill earned.
func (b *tokenBucket) refillLocked(now time.Time) {
	b.level = min(b.burst, b.level+now.Sub(b.last).Seconds()*b.rate)
	b.last = now
}

// wait returns, once the bucket holds at least transitRateMinChunk bytes,
// how many it holds; or an error once done is closed.
func (b *tokenBucket) wait(done <-chan struct{}) (int64, error) {
	for {
		b.mu.Lock()
		b.refillLocked(time.Now())
		level := b.level
		b.mu.Unlock()
		if level >= transitRateMinChunk {
			return int64(level), nil
		}
		t := time.NewTimer(time.Duration((transitRateMinChunk - level) / b.rate * float64(time.Second)))
		select {
		case <-t.C:
		case <-done:
			t.Stop()
			return 0, errTransitShutdown
		}
	}
}

// spend takes n bytes moved from the bucket.
func (b *tokenBucket) spend(n int64) {
	b.mu.Lock()
	b.refillLocked(time.Now())
	b.level -= float64(n)
	b.mu.Unlock()
}

// shutdown stops the relay: the listeners close, connections without a
// partner are closed at once, and pairs may go on for the grace period
// before they are cut. It returns when every connection has ended.
func (r *transitRelay) shutdown(ctx context.Context) {
	if r == nil {
		return
	}
	for _, ln := range r.listeners {
		ln.Close()
	}
	if r.wsServer != nil {
		r.wsServer.Close() // the relay's own connections are hijacked and stay
	}
	r.mu.Lock()
	r.shuttingDown = true
	for _, list := range r.waiting {
		for _, c := range list {
			c.raw.SetReadDeadline(time.Now()) // it ends as lonely
		}
	}
	for _, a := range r.addrs {
		for c := range a.conns {
			if c.state == transitHandshaking && c.raw != nil {
				c.raw.SetReadDeadline(time.Now())
			}
		}
	}
	r.mu.Unlock()
	done := make(chan struct{})
	go func() { r.wg.Wait(); close(done) }()
	grace := time.NewTimer(r.cfg.shutdownGrace)
	defer grace.Stop()
	select {
	case <-done:
		return
	case <-grace.C:
	case <-ctx.Done():
	}
	r.mu.Lock()
	for p := range r.pairs {
		p.cut(errTransitShutdown, true)
	}
	for _, a := range r.addrs {
		for c := range a.conns {
			if c.raw != nil {
				c.raw.Close()
			}
		}
	}
	r.mu.Unlock()
	<-done
}
