// load.go owns the "load" command: a load driver that speaks the protocol
// the way two real clients do during a transfer, against any mailbox
// server (this one or the reference), and reports throughput, relay
// latency and, given the server's process id, its CPU time and memory.
//
// Transfer mode runs --pairs pairs of clients, each pair doing one transfer
// after another for --duration. A transfer is what a sender (A) and a
// receiver (B) send: both connect and read the welcome, and bind with a
// client_version; A allocates and claims, B claims A's nameplate; both
// open, add "pake" and wait for the other's; both release, add "version",
// then add phases "0", "1" and "2", waiting for each of the other's; both
// close with mood "happy". Relay latency is the time from one side
// writing an add to the other side reading the message.
//
// Idle mode (--idle N) first opens N clients that each bind, allocate,
// claim, open and add "pake", then wait, as senders waiting for their
// receiver do; it reports the server's memory per waiting client, and at
// the end checks that every one of them still answers a ping.
//
// Attack mode (--attack NAME) is in attack.go.
// Transit mode (--transit, and the splice floor, --splice-floor)
// benchmarks a transit relay instead; it is in load_transit.go.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/websocket"
)

// Sizes of the bodies the driver adds, in hex characters, as the Python
// client's are: a PAKE message, its encrypted version message, and a
// small application message.
const (
	pakeBodyLen    = 164
	versionBodyLen = 280
	phaseBodyLen   = 200
)

// loadAppID is the app the driver's clients bind to.
const loadAppID = "wormhole-mailbox/load"

// maxLoadSources is how many source addresses --sources may ask for:
// 127.0.0.2 to 127.0.0.254.
const maxLoadSources = 253

// loadTimeout bounds every wait for the server, so a stuck server stops
// the driver with an error instead of hanging it.
const loadTimeout = 30 * time.Second

// loadConfig is what the load command's flags set.
type loadConfig struct {
	url      string
	pairs    int
	duration time.Duration
	idle     int
	pid      int
	sources  int // how many loopback source addresses to spread connections over
	hold     time.Duration
	json     bool

	// Attack mode (attack.go).
	attack      string
	attackAddrs int
	attackConns int
	ownServer   bool
}

// loadResult is what a load run measured.
type loadResult struct {
	URL             string  `json:"url"`
	Pairs           int     `json:"pairs"`
	Transfers       int     `json:"transfers"`
	Seconds         float64 `json:"seconds"`
	TransfersPerSec float64 `json:"transfers_per_sec"`
	RelayP50ms      float64 `json:"relay_p50_ms"`
	RelayP99ms      float64 `json:"relay_p99_ms"`
	ServerCPUms     float64 `json:"server_cpu_ms_per_transfer,omitempty"`
	ServerRSSkB     int     `json:"server_rss_kb,omitempty"`
	Idle            int     `json:"idle,omitempty"`
	IdleRSSPerConnB float64 `json:"idle_rss_per_conn_bytes,omitempty"`
	IdleAnswered    int     `json:"idle_answered_ping,omitempty"`
}

func runLoad(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg loadConfig
	fs := flag.NewFlagSet("wormhole-mailbox load", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: wormhole-mailbox load [flags]

Drive transfers (and optionally waiting clients) at a mailbox server, this
one or the reference, and report throughput, relay latency and, given
--pid, the server's CPU time and memory.

`)
		fs.PrintDefaults()
	}
	fs.StringVar(&cfg.url, "url", "ws://127.0.0.1:4000/v1", "the server's WebSocket `URL`")
	fs.IntVar(&cfg.pairs, "pairs", 10, "transfers running at once")
	fs.DurationVar(&cfg.duration, "duration", 10*time.Second, "how long to run transfers")
	fs.IntVar(&cfg.idle, "idle", 0, "waiting clients to hold open while the transfers run")
	fs.IntVar(&cfg.pid, "pid", 0, "the server's process `id`, to report its CPU time and memory from /proc")
	fs.DurationVar(&cfg.hold, "hold", 0, "keep the idle clients waiting this long before the final ping (to run transfers from another process meanwhile, so that latency is measured in a process that holds no idle clients)")
	fs.IntVar(&cfg.sources, "sources", 8, "connect from this many loopback addresses (127.0.0.2, 127.0.0.3, ...), so ephemeral ports do not run out; 0: the system's choice")
	fs.BoolVar(&cfg.json, "json", false, "print the result as JSON")
	fs.StringVar(&cfg.attack, "attack", "", "run this `attack` (see README: "+strings.Join(attackNames, ", ")+") for --duration while --pairs victim pairs run transfers from 127.0.1.x")
	fs.IntVar(&cfg.attackAddrs, "attack-addrs", -1, "attack from this many loopback addresses (127.0.0.2, ...); -1: the attack's default")
	fs.IntVar(&cfg.attackConns, "attack-conns", -1, "connections (or nameplates, mailboxes...) per attacking address; -1: the attack's default")
	fs.BoolVar(&cfg.ownServer, "i-own-this-server", false, "allow --attack against a server that is not on loopback")
	var tcfg transitLoadConfig
	addTransitLoadFlags(fs, &tcfg) // load_transit.go
	if err := fs.Parse(args); err != nil {
		return err
	}
	if tcfg.addr != "" || tcfg.floor != "" {
		tcfg.pairs, tcfg.pid, tcfg.asJSON = cfg.pairs, cfg.pid, cfg.json
		return runTransitLoad(ctx, tcfg, stdout, stderr)
	}
	if cfg.attack != "" {
		return runAttack(ctx, cfg, stdout, stderr)
	}
	if cfg.sources < 0 || cfg.sources > maxLoadSources {
		return fmt.Errorf("load: --sources must be 0 to %d", maxLoadSources)
	}
	res, err := driveLoad(ctx, cfg, stderr)
	if err != nil {
		return err
	}
	if cfg.json {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	printLoadResult(stdout, res)
	return nil
}

func printLoadResult(w io.Writer, r loadResult) {
	fmt.Fprintf(w, "server          %s\n", r.URL)
	if r.Idle > 0 {
		fmt.Fprintf(w, "idle clients    %d held, %d answered a ping at the end\n", r.Idle, r.IdleAnswered)
		if r.IdleRSSPerConnB > 0 {
			fmt.Fprintf(w, "memory per idle %.1f kB of server RSS\n", r.IdleRSSPerConnB/1000)
		}
	}
	if r.Pairs > 0 {
		fmt.Fprintf(w, "transfers       %d in %.1f s with %d pairs: %.1f/s\n", r.Transfers, r.Seconds, r.Pairs, r.TransfersPerSec)
		fmt.Fprintf(w, "relay latency   p50 %.2f ms, p99 %.2f ms\n", r.RelayP50ms, r.RelayP99ms)
	}
	if r.ServerCPUms > 0 {
		fmt.Fprintf(w, "server CPU      %.3f ms per transfer\n", r.ServerCPUms)
	}
	if r.ServerRSSkB > 0 {
		fmt.Fprintf(w, "server RSS      %d kB at the end\n", r.ServerRSSkB)
	}
}

// driveLoad runs the load cfg describes.
func driveLoad(ctx context.Context, cfg loadConfig, progress io.Writer) (loadResult, error) {
	res := loadResult{URL: cfg.url, Pairs: cfg.pairs, Idle: cfg.idle}
	d := &loadDialer{url: cfg.url, sources: cfg.sources}
	var idle []*loadClient
	defer func() {
		for _, c := range idle {
			c.close()
		}
	}()
	if cfg.idle > 0 {
		rssBefore := procStatusKB(cfg.pid, "VmRSS:")
		var err error
		if idle, err = openIdleClients(ctx, d, cfg.idle); err != nil {
			return res, err
		}
		if rssBefore > 0 {
			res.IdleRSSPerConnB = float64(procStatusKB(cfg.pid, "VmRSS:")-rssBefore) * 1024 / float64(cfg.idle)
		}
		fmt.Fprintf(progress, "%d idle clients are waiting\n", len(idle))
		select {
		case <-time.After(cfg.hold):
		case <-ctx.Done():
			return res, ctx.Err()
		}
	}
	if cfg.pairs > 0 {
		cpuBefore := procCPU(cfg.pid)
		transfers, latencies, elapsed, err := runTransfers(ctx, d, cfg.pairs, cfg.duration)
		if err != nil {
			return res, err
		}
		res.Transfers, res.Seconds = transfers, elapsed.Seconds()
		res.TransfersPerSec = float64(transfers) / elapsed.Seconds()
		res.RelayP50ms = percentile(latencies, 0.50).Seconds() * 1000
		res.RelayP99ms = percentile(latencies, 0.99).Seconds() * 1000
		if cfg.pid > 0 && transfers > 0 {
			res.ServerCPUms = (procCPU(cfg.pid) - cpuBefore).Seconds() * 1000 / float64(transfers)
		}
	}
	if len(idle) > 0 {
		res.IdleAnswered = pingAll(idle)
		if res.IdleAnswered != len(idle) {
			return res, fmt.Errorf("only %d of %d idle clients answered a ping", res.IdleAnswered, len(idle))
		}
	}
	res.ServerRSSkB = procStatusKB(cfg.pid, "VmRSS:")
	return res, nil
}

// runTransfers runs pairs transfer loops for duration and returns how
// many transfers completed, every relay latency, and the time taken.
func runTransfers(ctx context.Context, d *loadDialer, pairs int, duration time.Duration) (int, []time.Duration, time.Duration, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	start := time.Now()
	deadline := start.Add(duration)
	var (
		mu        sync.Mutex
		transfers int
		latencies []time.Duration
		firstErr  error
		wg        sync.WaitGroup
	)
	for p := range pairs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			n := 0
			for i := 0; time.Now().Before(deadline) && ctx.Err() == nil; i++ {
				lat, err := transfer(d, fmt.Sprintf("p%d-%d", p, i))
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
						cancel()
					}
					mu.Unlock()
					return
				}
				mine = append(mine, lat...)
				n++
			}
			mu.Lock()
			transfers += n
			latencies = append(latencies, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	return transfers, latencies, time.Since(start), firstErr
}

// transfer does one transfer with two clients and returns the relay
// latencies it saw.
func transfer(d *loadDialer, id string) ([]time.Duration, error) {
	var sent [2]map[string]*atomic.Int64 // by side, then phase: when the add was written
	for i := range sent {
		sent[i] = map[string]*atomic.Int64{}
		for _, phase := range []string{"pake", "version", "0", "1", "2"} {
			sent[i][phase] = new(atomic.Int64)
		}
	}
	// The sender's nameplate, and "" when a side has failed, for the
	// receiver; room for both, so that neither send can block.
	nameplate := make(chan string, 2)
	var lat [2][]time.Duration
	errs := make(chan error, 2)
	for side := range 2 {
		go func() {
			errs <- transferSide(d, id, side, nameplate, sent, &lat[side])
		}()
	}
	var err error
	for range 2 {
		if e := <-errs; e != nil && err == nil {
			err = e
			select { // let a side waiting for the nameplate give up
			case nameplate <- "":
			default:
			}
		}
	}
	return append(lat[0], lat[1]...), err
}

// transferSide is one side of a transfer: side 0 sends, side 1 receives.
func transferSide(d *loadDialer, id string, side int, nameplate chan string, sent [2]map[string]*atomic.Int64, lat *[]time.Duration) error {
	c, err := d.dial()
	if err != nil {
		return err
	}
	defer c.close()
	me, peer := fmt.Sprintf("%s-%d", id, side), fmt.Sprintf("%s-%d", id, 1-side)
	c.send(`{"type": "bind", "appid": %q, "side": %q, "client_version": ["load", %q], "id": "0001"}`, loadAppID, me, version)
	var name string
	if side == 0 {
		c.send(`{"type": "allocate", "id": "0002"}`)
		m, err := c.waitFor(func(m loadMsg) bool { return m.Type == "allocated" })
		if err != nil {
			return err
		}
		name = m.Nameplate
		nameplate <- name
	} else if name = <-nameplate; name == "" {
		return errors.New("the other side failed")
	}
	c.send(`{"type": "claim", "nameplate": %q, "id": "0003"}`, name)
	m, err := c.waitFor(func(m loadMsg) bool { return m.Type == "claimed" })
	if err != nil {
		return err
	}
	mailbox := m.Mailbox
	c.send(`{"type": "open", "mailbox": %q, "id": "0004"}`, mailbox)

	exchange := func(phase string, bodyLen int) error {
		sent[side][phase].Store(time.Now().UnixNano())
		c.send(`{"type": "add", "phase": %q, "body": %q, "id": "0005"}`, phase, strings.Repeat("a", bodyLen))
		if _, err := c.waitFor(func(m loadMsg) bool { return m.Type == "message" && m.Side == peer && m.Phase == phase }); err != nil {
			return err
		}
		if t := sent[1-side][phase].Load(); t != 0 {
			*lat = append(*lat, time.Since(time.Unix(0, t)))
		}
		return nil
	}
	if err := exchange("pake", pakeBodyLen); err != nil {
		return err
	}
	c.send(`{"type": "release", "nameplate": %q, "id": "0006"}`, name)
	if err := exchange("version", versionBodyLen); err != nil {
		return err
	}
	for _, phase := range []string{"0", "1", "2"} {
		if err := exchange(phase, phaseBodyLen); err != nil {
			return err
		}
	}
	c.send(`{"type": "close", "mailbox": %q, "mood": "happy", "id": "0007"}`, mailbox)
	_, err = c.waitFor(func(m loadMsg) bool { return m.Type == "closed" })
	return err
}

// openIdleClients opens n clients that each claim a nameplate, open its
// mailbox and add a PAKE message, then wait.
func openIdleClients(ctx context.Context, d *loadDialer, n int) ([]*loadClient, error) {
	const parallel = 32 // clients set up at once: enough to keep a server busy, few enough not to swamp it
	clients := make([]*loadClient, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, parallel)
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1)) - 1; i < n && ctx.Err() == nil; i = int(next.Add(1)) - 1 {
				c, err := openIdleClient(d, i)
				if err != nil {
					errs <- err
					return
				}
				clients[i] = c
			}
		}()
	}
	wg.Wait()
	close(errs)
	err := <-errs
	if err == nil {
		err = ctx.Err() // interrupted: some clients were never opened
	}
	if err != nil {
		for _, c := range clients {
			if c != nil {
				c.close()
			}
		}
		return nil, err
	}
	return clients, nil
}

func openIdleClient(d *loadDialer, i int) (*loadClient, error) {
	c, err := d.dial()
	if err != nil {
		return nil, err
	}
	side := fmt.Sprintf("idle-%d", i)
	c.send(`{"type": "bind", "appid": %q, "side": %q, "client_version": ["load", %q], "id": "0001"}`, loadAppID, side, version)
	c.send(`{"type": "allocate", "id": "0002"}`)
	m, err := c.waitFor(func(m loadMsg) bool { return m.Type == "allocated" })
	if err == nil {
		c.send(`{"type": "claim", "nameplate": %q, "id": "0003"}`, m.Nameplate)
		m, err = c.waitFor(func(m loadMsg) bool { return m.Type == "claimed" })
	}
	if err == nil {
		c.send(`{"type": "open", "mailbox": %q, "id": "0004"}`, m.Mailbox)
		c.send(`{"type": "add", "phase": "pake", "body": %q, "id": "0005"}`, strings.Repeat("a", pakeBodyLen))
		_, err = c.waitFor(func(m loadMsg) bool { return m.Type == "message" && m.Side == side })
	}
	if err != nil {
		c.close()
		return nil, fmt.Errorf("idle client %d: %w", i, err)
	}
	return c, nil
}

// pingAll sends every client a ping and counts the pongs.
func pingAll(clients []*loadClient) int {
	var answered atomic.Int64
	var wg sync.WaitGroup
	const parallel = 16 // pings in flight at once: each client's is answered within its own round trip
	for part := range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := part; i < len(clients); i += parallel {
				c := clients[i]
				c.send(`{"type": "ping", "ping": %d}`, i)
				if _, err := c.waitFor(func(m loadMsg) bool { return m.Type == "pong" }); err == nil {
					answered.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	return int(answered.Load())
}

// loadDialer connects clients, spreading them over loopback source
// addresses.
type loadDialer struct {
	url     string
	sources int
	subnet  byte // the third byte of the source addresses: 127.0.subnet.2, ...
	n       atomic.Int64
}

func (d *loadDialer) dial() (*loadClient, error) {
	cfg, err := websocket.NewConfig(d.url, "http://localhost/")
	if err != nil {
		return nil, err
	}
	cfg.Dialer = &net.Dialer{Timeout: loadTimeout}
	if d.sources > 0 {
		n := d.n.Add(1) % int64(d.sources)
		cfg.Dialer.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, d.subnet, byte(2+n))}
	}
	ws, err := websocket.DialConfig(cfg)
	if err != nil {
		return nil, err
	}
	c := &loadClient{ws: ws}
	if _, err := c.waitFor(func(m loadMsg) bool { return m.Type == "welcome" }); err != nil {
		ws.Close()
		return nil, err
	}
	return c, nil
}

// loadClient is one client connection of the driver.
type loadClient struct {
	ws  *websocket.Conn
	err error // the first write error
}

// loadMsg holds the fields of a server message the driver looks at.
type loadMsg struct {
	Type      string `json:"type"`
	Side      string `json:"side"`
	Phase     string `json:"phase"`
	Nameplate string `json:"nameplate"`
	Mailbox   string `json:"mailbox"`
	Error     string `json:"error"`
}

func (c *loadClient) send(format string, args ...any) {
	if c.err == nil {
		_, c.err = c.ws.Write(fmt.Appendf(nil, format, args...))
	}
}

// waitFor reads messages until one matches, and fails on an error message.
func (c *loadClient) waitFor(match func(loadMsg) bool) (loadMsg, error) {
	if c.err != nil {
		return loadMsg{}, c.err
	}
	c.ws.SetReadDeadline(time.Now().Add(loadTimeout))
	for {
		var data []byte
		if err := websocket.Message.Receive(c.ws, &data); err != nil {
			return loadMsg{}, err
		}
		var m loadMsg
		if err := json.Unmarshal(data, &m); err != nil {
			return loadMsg{}, fmt.Errorf("bad message %q: %w", data, err)
		}
		if m.Type == "error" {
			return m, fmt.Errorf("server error: %s", data)
		}
		if match(m) {
			return m, nil
		}
	}
}

func (c *loadClient) close() { c.ws.Close() }

// percentile returns the p-quantile of ds (sorting them), as the stats
// command computes its percentiles.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	return nearestRank(ds, p)
}

// procStatusKB returns one kB field of /proc/PID/status ("VmRSS:" for
// resident memory, "VmHWM:" for its peak), or 0.
func procStatusKB(pid int, field string) int {
	if pid <= 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, field); ok {
			kb, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
			return kb
		}
	}
	return 0
}

// clockTicks is the unit of CPU times in /proc/PID/stat (USER_HZ, 100 on
// Linux).
const clockTicks = 100

// procCPU returns the CPU time (user and system) a process has used, or 0.
func procCPU(pid int) time.Duration {
	if pid <= 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command name in parentheses may hold spaces; fields follow it.
	fields := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	if len(fields) < 13 {
		return 0
	}
	utime, _ := strconv.ParseInt(fields[11], 10, 64)
	stime, _ := strconv.ParseInt(fields[12], 10, 64)
	return time.Duration(utime+stime) * time.Second / clockTicks
}
