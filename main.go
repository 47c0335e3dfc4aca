// main.go owns the process: the command line, the HTTP server and its
// routes, the periodic pruning, signals, and an orderly shutdown.
//
// wormhole-mailbox is a Magic Wormhole mailbox (rendezvous) server: the
// WebSocket service at /v1 where two wormhole clients meet to exchange the
// small messages of a transfer. It is a drop-in replacement for the
// reference server (magic-wormhole-mailbox-server) and takes the same
// flags. The files, read in this order, tell the whole story:
//
//	main.go      the process: flags, HTTP routes, pruning, signals
//	conn.go      one WebSocket connection: frames in, keepalive, closing
//	outbox.go    its frames out, in order, once the journal holds them
//	limits.go    the budgets connections share, and the per-address limits
//	kernel_linux.go   what the kernel holds for a socket (SIOCOUTQ), fdatasync
//	protocol.go  the messages and each connection's state machine
//	mailbox.go   the registry of apps, nameplates, mailboxes and messages
//	quota.go     what each client address holds in the registry
//	store.go     the journal that makes the registry survive a restart
//	usage.go     the usage log and the live counters
//	stats.go     the "stats" command, which summarises a usage log
//	load.go      the "load" command, a load driver for benchmarks
//	attack.go    the load command's attack mode, resource attacks on a server of your own
//	transit.go   the transit relay, optional: files between clients that
//	             cannot reach each other (transit_stats.go and
//	             load_transit.go: its parts of stats and load)
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"expvar"
	"flag"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// version is this server's version, reported by --version and in the
// Server header.
const version = "0.1.0"

// Pruning, as the reference does it (PROTOCOL.md §12): every pruneInterval, and once
// at start-up, channels idle for channelExpiry with no connection
// subscribed are deleted. The expiry exceeds the interval so a channel
// lives at least 11 minutes after its last activity, time enough for a
// client whose network flapped to reconnect.
const (
	pruneInterval = 5 * time.Minute
	channelExpiry = 11 * time.Minute
)

// HTTP server limits: the opening request is all a WebSocket client sends
// over HTTP, and it is small.
const (
	readHeaderTimeout = 10 * time.Second

	// maxHeaderBytes bounds the opening request's line and headers, all
	// a WebSocket client sends over HTTP (a few hundred bytes).
	maxHeaderBytes = 16 << 10

	// headerSlack is what net/http reads beyond its MaxHeaderBytes
	// (4096 bytes), taken off so that maxHeaderBytes is the limit.
	headerSlack = 4 << 10

	// httpIdleTimeout is how long a connection that made a plain HTTP
	// request (the banner at /) may stay open waiting for another: short,
	// because every open connection counts against the connection limits
	// and a browser or a monitor that comes back later opens another. A
	// WebSocket connection is taken from net/http and does not meet it.
	httpIdleTimeout = 5 * time.Second

	// shutdownTimeout is how long a shutdown waits for the clients to be
	// sent what they are owed and a close, one frame write's time
	// (writeTimeout); those still connected after it are cut off.
	shutdownTimeout = 10 * time.Second
)

// Default connection limits (see limiter in limits.go). Per address: far
// more than the people behind one address use at once, far less than a
// flood. In all: 5,000 transfers under way at once, and at about 10 KiB
// each (a goroutine, buffers, a kernel socket) a tenth of a 1 GiB machine.
const (
	defaultMaxConnsPerAddr     = 128
	defaultMaxConns            = 10_000
	defaultNameplatesPerMinute = 60
)

// TCP keepalive on every accepted connection, so that the kernel notices a
// peer that vanished without a word (power lost, NAT mapping dropped)
// while nothing is being sent, between the server's pings. These are the
// values Go itself would use, stated so that they are seen.
const (
	tcpKeepAliveIdle     = 15 * time.Second
	tcpKeepAliveInterval = 15 * time.Second
	tcpKeepAliveCount    = 9
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) { // -h or --version: done as asked
			return
		}
		fmt.Fprintln(os.Stderr, "wormhole-mailbox:", err)
		os.Exit(1)
	}
}

// config is everything the command line sets.
type config struct {
	port              string
	channelDB         string
	fsync             bool
	usageDB           string
	usageRate         int // --max-usage-log-rate
	blurUsage         int
	welcome           welcomeInfo
	allowList         bool
	metricsListen     string
	trustProxyHeader  string
	tlsCert, tlsKey   string
	logFormat         string
	logMessages       bool
	limits            limits
	maxMessageBytes   int
	maxConnsPerAddr   int
	connectionsPerMin int
	maxConns          int
	nameplatesPerMin  int
	commandsPerSecond int
	transit           transitConfig // the transit relay (transit.go); off unless a listener is given
	pruneInterval     time.Duration // pruneInterval unless a test sets another
	channelExpiry     time.Duration // channelExpiry unless a test sets another
}

// run is the whole program; main only supplies the process's context,
// arguments and output streams.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 {
		switch args[0] {
		case "stats":
			return runStats(args[1:], stdout, stderr)
		case "load":
			return runLoad(ctx, args[1:], stdout, stderr)
		case "healthcheck":
			return runHealthcheck(ctx, args[1:], stdout, stderr)
		}
	}
	cfg, err := parseFlags(args, stdout, stderr)
	if err != nil {
		return err
	}
	log := newLogger(cfg.logFormat, stderr)
	srv, err := openServer(ctx, cfg, log)
	if err != nil {
		if ctx.Err() != nil { // asked to stop while starting: nothing was served
			log.Info("stopped while starting", "err", err)
			return nil
		}
		return err
	}
	defer srv.close()
	return srv.serve(ctx, cfg, log)
}

// serve opens the server's listeners and serves them until ctx ends or a
// listener fails, then shuts down in order.
func (srv *server) serve(ctx context.Context, cfg config, log *slog.Logger) error {
	// SIGHUP is caught from here on, before anything is served, so that a
	// reload can never find the process unprepared (its default action
	// would end the process).
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	addr, err := listenAddress(cfg.port)
	if err != nil {
		return err
	}
	ln, err := listen(addr)
	if err != nil {
		return err
	}
	defer ln.Close()
	var mln net.Listener
	if cfg.metricsListen != "" {
		if mln, err = net.Listen("tcp", cfg.metricsListen); err != nil {
			return fmt.Errorf("metrics: %w", err)
		}
		defer mln.Close()
	}
	ln = gatedListener{ln, srv.gate}
	httpSrv := srv.httpServer(log)
	var cert *certificate
	scheme := "ws"
	if cfg.tlsCert != "" {
		if cert, err = loadCertificate(cfg.tlsCert, cfg.tlsKey); err != nil {
			return err
		}
		httpSrv.TLSConfig = tlsConfig(cert)
		ln = tls.NewListener(ln, httpSrv.TLSConfig)
		scheme = "wss"
	}
	serveErr := make(chan error, 2)
	go func() { serveErr <- httpSrv.Serve(ln) }()
	log.Info("websocket listening", "url", fmt.Sprintf("%s://%s/v1", scheme, ln.Addr()), "version", version)
	if srv.transit != nil {
		if err := srv.transit.start(listen); err != nil {
			httpSrv.Close()
			return err
		}
		if cfg.transit.onMailbox {
			log.Info("transit websocket listening", "url", fmt.Sprintf("%s://%s/transit", scheme, ln.Addr()))
		}
	}
	if mln != nil {
		msrv := &http.Server{Handler: srv.metrics.handler(srv.healthy), ReadHeaderTimeout: readHeaderTimeout,
			ErrorLog: httpErrorLog(log, srv.blurLogs)}
		go func() { serveErr <- msrv.Serve(mln) }()
		defer msrv.Close()
		log.Info("metrics listening", "url", fmt.Sprintf("http://%s/debug/vars", mln.Addr()))
	}

	err = srv.waitForStop(ctx, hup, serveErr, cert)
	log.Info("shutting down")
	return srv.shutdown(httpSrv, err)
}

// waitForStop answers SIGHUP until ctx ends or a listener fails, and
// returns the listener's error, if one did.
func (srv *server) waitForStop(ctx context.Context, hup <-chan os.Signal, serveErr <-chan error, cert *certificate) error {
	for {
		select {
		case <-hup:
			srv.reopen(cert)
		case err := <-serveErr:
			return err
		case <-ctx.Done():
			return nil
		}
	}
}

// shutdown stops accepting, gives transfers their grace and clients their
// close frames, and closes the journal and usage log; err is why the
// server stops, if a listener failed.
func (srv *server) shutdown(httpSrv *http.Server, err error) error {
	transitDone := make(chan struct{})
	go func() { srv.transit.shutdown(context.Background()); close(transitDone) }() // bounded by --transit-shutdown-grace
	shutdownCtx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	httpSrv.Shutdown(shutdownCtx) // stops accepting; WebSocket connections are ours to close
	srv.closeConnections(shutdownCtx)
	<-transitDone
	if cerr := srv.close(); err == nil {
		err = cerr
	}
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// tlsConfig is the TLS configuration for --tls-cert. It follows
// Mozilla's "intermediate" profile, which every wormhole client meets:
// TLS 1.2 and 1.3 only, and for TLS 1.2 only the forward-secret AEAD
// cipher suites (TLS 1.3 has no others). The key exchanges are the
// standard library's, which prefer a post-quantum hybrid. The certificate
// is taken from cert at each handshake, so a reloaded one is used at once.
// Only HTTP/1.1 is offered: WebSocket upgrades need it.
func tlsConfig(cert *certificate) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		CipherSuites: []uint16{
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
		},
		NextProtos:     []string{"http/1.1"},
		GetCertificate: cert.get,
	}
}

// listen opens the server's TCP listener, with keepalive on every
// connection it accepts. WebSocket connections are taken over from
// net/http (hijacked) but stay the same sockets, so they keep it.
func listen(addr string) (net.Listener, error) {
	lc := net.ListenConfig{KeepAliveConfig: net.KeepAliveConfig{
		Enable: true, Idle: tcpKeepAliveIdle, Interval: tcpKeepAliveInterval, Count: tcpKeepAliveCount}}
	return lc.Listen(context.Background(), "tcp", addr)
}

func parseFlags(args []string, stdout, stderr io.Writer) (config, error) {
	cfg := config{limits: defaultLimits, pruneInterval: pruneInterval, channelExpiry: channelExpiry, transit: defaultTransitConfig()}
	fs := flag.NewFlagSet("wormhole-mailbox", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: wormhole-mailbox [flags]
       wormhole-mailbox stats [flags]    summarise a usage log (stats -h)
       wormhole-mailbox load [flags]     drive load at a server (load -h)
       wormhole-mailbox healthcheck URL  check a running server (healthcheck -h)

A Magic Wormhole mailbox (rendezvous) server. Clients connect to
ws://HOST:PORT/v1, or wss:// with --tls-cert. Flags match the reference
server's where it has them.

`)
		fs.PrintDefaults()
	}
	portHelp := "where to listen: `tcp:PORT[:interface=HOST]` (as the reference), PORT, or HOST:PORT; all IPv4 and IPv6 addresses unless a host is given"
	fs.StringVar(&cfg.port, "port", "tcp:4000", portHelp)
	fs.StringVar(&cfg.port, "p", "tcp:4000", "short for --port")
	fs.StringVar(&cfg.channelDB, "channel-db", "relay.jsonl", "journal `file` that keeps channel state across restarts; :memory: keeps none")
	fsyncMode := fs.String("fsync", "always", "`mode`: always makes every change durable before answering; never leaves it to the OS (survives a crash of the server, not of the machine; for benchmarks)")
	fs.StringVar(&cfg.usageDB, "usage-db", "", "usage log `file` (JSON lines); none by default")
	fs.IntVar(&cfg.usageRate, "max-usage-log-rate", defaultUsageBytesPerSecond, "most `bytes` per second the usage log grows by (records past it are dropped and counted); 0: no limit")
	fs.IntVar(&cfg.blurUsage, "blur-usage", -1, "round usage times down to this many `seconds`, and log no client addresses; -1: no blurring")
	fs.StringVar(&cfg.welcome.currentCLIVersion, "advertise-version", "", "tell clients this is the current client `version`")
	fs.StringVar(&cfg.welcome.signalError, "signal-error", "", "tell every client this `error` and so refuse service")
	fs.StringVar(&cfg.welcome.motd, "motd", "", "message of the day `text` shown by clients")
	disallowList := fs.Bool("disallow-list", false, "answer \"list\" with no nameplates, so nobody can see which are waiting")
	fs.StringVar(&cfg.metricsListen, "metrics-listen", "", "serve counters (/debug/vars) and a health check (/healthz) on this `address`, e.g. 127.0.0.1:9400")
	fs.StringVar(&cfg.trustProxyHeader, "trust-proxy-header", "", "take the client's address from this `header` (X-Real-IP or X-Forwarded-For) set by a reverse proxy in front")
	fs.StringVar(&cfg.tlsCert, "tls-cert", "", "serve wss:// with this certificate `file` (PEM; re-read on SIGHUP)")
	fs.StringVar(&cfg.tlsKey, "tls-key", "", "the certificate's private key `file` (PEM)")
	fs.StringVar(&cfg.logFormat, "log-format", "text", "log `format`: text or json")
	fs.BoolVar(&cfg.logMessages, "log-messages", false, "log every message in and out (bodies shortened), to learn the protocol")
	fs.IntVar(&cfg.maxMessageBytes, "max-message-size", maxMessageBytes, "largest client message in `bytes`")
	fs.IntVar(&cfg.limits.MaxMessagesPerMailbox, "max-mailbox-messages", defaultLimits.MaxMessagesPerMailbox, "most messages one mailbox may hold")
	fs.IntVar(&cfg.limits.MaxMailboxBytes, "max-mailbox-bytes", defaultLimits.MaxMailboxBytes, "most message `bytes` one mailbox may hold")
	fs.IntVar(&cfg.limits.MaxNameplates, "max-nameplates", defaultLimits.MaxNameplates, "most nameplates in all apps together")
	fs.IntVar(&cfg.limits.MaxMailboxes, "max-mailboxes", defaultLimits.MaxMailboxes, "most mailboxes in all apps together")
	fs.Int64Var(&cfg.limits.MaxStoredBytes, "max-stored-bytes", defaultLimits.MaxStoredBytes, "most message `bytes` stored in all mailboxes together")
	fs.IntVar(&cfg.limits.MaxNameplatesPerAddr, "max-nameplates-per-ip", defaultLimits.MaxNameplatesPerAddr, "most nameplates claimed at once by the sides of one IPv4 address or IPv6 /64; 0: no limit")
	fs.IntVar(&cfg.limits.MaxMailboxesPerAddr, "max-mailboxes-per-ip", defaultLimits.MaxMailboxesPerAddr, "most mailboxes open at once by the sides of one IPv4 address or IPv6 /64; 0: no limit")
	fs.Int64Var(&cfg.limits.MaxStoredBytesPerAddr, "max-stored-bytes-per-ip", defaultLimits.MaxStoredBytesPerAddr, "most message `bytes` stored at once by the sides of one IPv4 address or IPv6 /64; 0: no limit")
	fs.IntVar(&cfg.maxConnsPerAddr, "max-connections-per-ip", defaultMaxConnsPerAddr, "most connections open at once from one IPv4 address or IPv6 /64; 0: no limit")
	fs.IntVar(&cfg.connectionsPerMin, "max-new-connections-per-ip", defaultConnectionsPerMinute, "most new connections per minute from one IPv4 address or IPv6 /64, after a burst of as many; 0: no limit")
	fs.IntVar(&cfg.maxConns, "max-connections", defaultMaxConns, "most connections open at once in all; 0: no limit")
	fs.IntVar(&cfg.nameplatesPerMin, "max-new-nameplates-per-ip", defaultNameplatesPerMinute, "most allocates, claims and opens (of new or existing channels) per minute from one IPv4 address or IPv6 /64; 0: no limit")
	fs.IntVar(&cfg.commandsPerSecond, "max-commands-per-second", commandsPerSecond, "most commands per second one connection may send, after a burst of "+strconv.Itoa(commandBurst)+"; 0: no limit")
	addTransitFlags(fs, &cfg.transit)
	showVersion := fs.Bool("version", false, "print the version and exit")
	fs.String("log-fd", "", "ignored; accepted so that reference 0.4.1 command lines work")
	protocolOption := fs.String("websocket-protocol-option", "", "not supported (the reference's Autobahn `option`s); refused with a reason")
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected argument %q: the server takes only flags, and the commands stats, load and healthcheck (see --help)", fs.Arg(0))
	}
	if *protocolOption != "" {
		return cfg, errors.New("--websocket-protocol-option is not supported: it set the reference's Autobahn options; " +
			"this server's limits have flags of their own (see --help)")
	}
	if *showVersion {
		fmt.Fprintln(stdout, "wormhole-mailbox", version)
		return cfg, flag.ErrHelp
	}
	switch *fsyncMode {
	case "always":
		cfg.fsync = true
	case "never":
	default:
		return cfg, fmt.Errorf("--fsync must be always or never, not %q", *fsyncMode)
	}
	if (cfg.tlsCert == "") != (cfg.tlsKey == "") {
		return cfg, errors.New("--tls-cert and --tls-key go together")
	}
	if cfg.logFormat != "text" && cfg.logFormat != "json" {
		return cfg, fmt.Errorf("--log-format must be text or json, not %q", cfg.logFormat)
	}
	for _, f := range []struct {
		name  string
		value int64
		min   int64
	}{
		{"max-message-size", int64(cfg.maxMessageBytes), 1},
		{"max-mailbox-messages", int64(cfg.limits.MaxMessagesPerMailbox), 1},
		{"max-mailbox-bytes", int64(cfg.limits.MaxMailboxBytes), 1},
		{"max-nameplates", int64(cfg.limits.MaxNameplates), 1},
		{"max-mailboxes", int64(cfg.limits.MaxMailboxes), 1},
		{"max-stored-bytes", cfg.limits.MaxStoredBytes, 1},
		{"max-nameplates-per-ip", int64(cfg.limits.MaxNameplatesPerAddr), 0},
		{"max-mailboxes-per-ip", int64(cfg.limits.MaxMailboxesPerAddr), 0},
		{"max-stored-bytes-per-ip", cfg.limits.MaxStoredBytesPerAddr, 0},
		{"max-connections-per-ip", int64(cfg.maxConnsPerAddr), 0},
		{"max-connections", int64(cfg.maxConns), 0},
		{"max-new-connections-per-ip", int64(cfg.connectionsPerMin), 0},
		{"max-new-nameplates-per-ip", int64(cfg.nameplatesPerMin), 0},
		{"max-commands-per-second", int64(cfg.commandsPerSecond), 0},
		{"max-usage-log-rate", int64(cfg.usageRate), 0},
	} {
		if f.value < f.min {
			return cfg, fmt.Errorf("--%s must be at least %d, not %d", f.name, f.min, f.value)
		}
	}
	if err := cfg.transit.check(); err != nil {
		return cfg, err
	}
	cfg.allowList = !*disallowList
	return cfg, nil
}

// listenAddress turns --port into a Go listen address. The reference's
// form is a Twisted endpoint, tcp:PORT[:interface=HOST], where colons in
// HOST are escaped with backslashes; plain PORT and HOST:PORT work too.
func listenAddress(port string) (string, error) {
	if p, err := strconv.Atoi(port); err == nil {
		return fmt.Sprintf(":%d", p), nil
	}
	rest, ok := strings.CutPrefix(port, "tcp:")
	if !ok {
		rest, ok = strings.CutPrefix(port, "tcp6:")
	}
	if !ok {
		if _, _, err := net.SplitHostPort(port); err != nil {
			return "", fmt.Errorf("--port %q: %v", port, err)
		}
		return port, nil
	}
	rest = strings.ReplaceAll(rest, `\:`, "\x00") // escaped colons belong to the host
	parts := strings.Split(rest, ":")
	p, host := parts[0], ""
	for _, opt := range parts[1:] {
		k, v, _ := strings.Cut(opt, "=")
		switch k {
		case "interface":
			host = strings.ReplaceAll(v, "\x00", ":")
		case "backlog":
		default:
			return "", fmt.Errorf("--port %q: unknown option %q", port, k)
		}
	}
	if _, err := strconv.ParseUint(p, 10, 16); err != nil {
		return "", fmt.Errorf("--port %q: bad port number", port)
	}
	return net.JoinHostPort(host, p), nil
}

// The "healthcheck" command's limits.
const (
	// healthcheckTimeout bounds the check: a container runtime's health
	// check must end on its own.
	healthcheckTimeout = 5 * time.Second

	// maxHealthBody bounds what is read of the answer: /healthz says "ok"
	// or why not, in a line.
	maxHealthBody = 1 << 10
)

// runHealthcheck is the "healthcheck" command, for container images,
// which have no curl: it fetches a URL and succeeds if the answer is
// 200 OK. Pointed at /healthz on the metrics listener, it reports whether
// the server can do its job (see server.healthy).
func runHealthcheck(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("wormhole-mailbox healthcheck", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: wormhole-mailbox healthcheck URL

Fetch URL, such as http://127.0.0.1:9400/healthz (served by
--metrics-listen), and exit with status 0 if the answer is 200 OK.
A bare HOST:PORT, as given to --metrics-listen, means
http://HOST:PORT/healthz.
`)
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return errors.New("healthcheck: one URL expected")
	}
	ctx, cancel := context.WithTimeout(ctx, healthcheckTimeout)
	defer cancel()
	target := fs.Arg(0)
	if !strings.Contains(target, "://") {
		target = "http://" + target + "/healthz"
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
	if err != nil {
		return fmt.Errorf("healthcheck: %w (give a URL such as http://127.0.0.1:9400/healthz)", err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxHealthBody))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthcheck: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	stdout.Write(body)
	return nil
}

// newLogger returns the server's logger: one line per event, as
// key=value text or as JSON objects.
func newLogger(format string, w io.Writer) *slog.Logger {
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, nil))
	}
	return slog.New(slog.NewTextHandler(w, nil))
}

// httpErrorLog returns the logger net/http reports its own errors to,
// which passes them on to the server's log: failed TLS handshakes at Info
// (scanners and clients that do not trust the certificate cause them, not
// the server), anything else at Warn (such as running out of file
// descriptors). net/http names the client in these; when blur is set
// (--blur-usage), addresses are masked.
func httpErrorLog(logger *slog.Logger, blur bool) *log.Logger {
	return log.New(httpErrors{logger, blur}, "", 0)
}

type httpErrors struct {
	log  *slog.Logger
	blur bool
}

func (h httpErrors) Write(p []byte) (int, error) {
	line := strings.TrimSpace(string(p))
	if h.blur {
		line = maskAddrs(line)
	}
	if reason, ok := strings.CutPrefix(line, "http: TLS handshake error from "); ok {
		h.log.Info("TLS handshake failed", "err", reason)
	} else {
		h.log.Warn("http server", "err", strings.TrimPrefix(line, "http: "))
	}
	return len(p), nil
}

// addrPattern matches the IP addresses (with a port or not) that Go's
// network errors contain: dotted IPv4, and bracketed IPv6.
var addrPattern = regexp.MustCompile(`\b\d{1,3}(\.\d{1,3}){3}(:\d+)?\b|\[[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*(%[^\]]*)?\](:\d+)?`)

// maskAddrs replaces every IP address in s by "-", as logAddr does.
func maskAddrs(s string) string { return addrPattern.ReplaceAllLiteralString(s, "-") }

// server is the mailbox service: the registry, its journal and usage
// log, and the connections using them.
type server struct {
	reg         *registry
	transit     *transitRelay // nil unless the transit relay is on
	metrics     *metrics
	gate        *connGate // counts every TCP connection (limits.go)
	limiter     *limiter
	log         *slog.Logger
	stopPruning context.CancelFunc
	pruned      chan struct{} // closed when the prune loop has stopped

	welcome        welcomeInfo
	serverHeader   string
	trustHeader    string
	logMessages    bool
	blurLogs       bool // --blur-usage: log no client addresses
	rebooted       float64
	pingInterval   time.Duration
	idleTimeout    time.Duration
	messageTimeout time.Duration // see messageTimeout
	// commandsPerSecond refills each connection's command budget
	// (--max-commands-per-second); 0: no limit.
	commandsPerSecond float64
	maxMessageBytes   int
	maxOutboxBytes    int
	clock             func() time.Time

	// outboxBytes is what waits to be written to all clients together,
	// bounded by maxOutboxTotalBytes (see connection.reserveLocked).
	outboxBytes         atomic.Int64
	maxOutboxTotalBytes int64
	evicting            atomic.Bool // evictLargestOutbox is running

	// partial is the budget for partly received messages (limits.go).
	partial *partialBudget

	connLogs logSampler // bounds the per-connection log lines (see connLog)

	proxyHint sync.Once // the warning about loopback clients is logged once

	connsMu      sync.Mutex
	conns        map[*connection]struct{} // connections past the handshake
	shuttingDown bool                     // closeConnections has begun
	connWG       sync.WaitGroup           // one per connection from enter to untrack
	closed       atomic.Bool
}

// openServer opens the journal and usage log, replays the journal
// (stopping when ctx ends: a long replay can take seconds, and SIGTERM
// must work meanwhile), and prunes what expired while the server was down.
func openServer(ctx context.Context, cfg config, log *slog.Logger) (*server, error) {
	m := newMetrics()
	srv := &server{
		metrics:             m,
		limiter:             newLimiter(cfg.maxConnsPerAddr, cfg.nameplatesPerMin),
		log:                 log,
		welcome:             cfg.welcome,
		serverHeader:        "Magic Wormhole Mailbox (Go) " + version,
		trustHeader:         cfg.trustProxyHeader,
		logMessages:         cfg.logMessages,
		blurLogs:            cfg.blurUsage >= 0,
		pingInterval:        pingInterval,
		idleTimeout:         idleTimeout,
		messageTimeout:      messageTimeout,
		commandsPerSecond:   float64(cfg.commandsPerSecond),
		maxMessageBytes:     cfg.maxMessageBytes,
		maxOutboxBytes:      max(maxOutboxBytes, 2*cfg.limits.MaxMailboxBytes), // a full mailbox's replay fits
		maxOutboxTotalBytes: maxOutboxTotalBytes,
		clock:               time.Now,
		conns:               make(map[*connection]struct{}),
	}
	srv.rebooted = srv.now()
	srv.gate = newGate(cfg, log, m)
	srv.partial = newPartialBudget(maxPartialBytesTotal, (*connection).closeForBudget)
	m.vars.Set("partial_message_bytes", expvar.Func(func() any { return srv.partial.bytes() }))
	var usage *usageLog
	if cfg.usageDB != "" {
		var err error
		if usage, err = openUsageLog(cfg.usageDB, cfg.blurUsage, cfg.usageRate, log, m); err != nil {
			return nil, err
		}
	}
	srv.reg = newRegistry(cfg.limits, cfg.allowList, nil, usage, m)
	if cfg.transit.enabled() {
		srv.transit = newTransitRelay(cfg.transit, log, m, usage, srv.blurLogs, &srv.connLogs, srv.clientAddr)
	}
	m.watch(srv.reg)
	if cfg.channelDB != ":memory:" {
		began := time.Now()
		journal, err := openStore(ctx, cfg.channelDB, cfg.fsync, srv.reg, log, m)
		if err != nil {
			usage.close()
			return nil, err
		}
		srv.reg.journal = journal
		nameplates, mailboxes, messages := srv.reg.count()
		log.Info("restored channels", "nameplates", nameplates, "mailboxes", mailboxes, "messages", messages,
			"file", cfg.channelDB, "ms", time.Since(began).Milliseconds())
	}
	if !cfg.allowList {
		log.Info("listing of allocated nameplates disallowed")
	}
	if cfg.blurUsage > 0 {
		log.Info("blurring access times", "seconds", cfg.blurUsage)
	}
	srv.prune(cfg.channelExpiry)
	ctx, cancel := context.WithCancel(context.Background())
	srv.stopPruning, srv.pruned = cancel, make(chan struct{})
	go srv.pruneEvery(ctx, cfg.pruneInterval, cfg.channelExpiry)
	return srv, nil
}

// newGate returns the connection gate for cfg. Behind a trusted proxy
// every client shares the proxy's address, so the gate counts only the
// total, and the limiter counts by the address the proxy reports. The
// total is lowered, if it must be, to leave fdHeadroom and fdRefusalRoom
// below the process's descriptor limit.
func newGate(cfg config, log *slog.Logger, m *metrics) *connGate {
	perAddr := cfg.maxConnsPerAddr
	if cfg.trustProxyHeader != "" {
		perAddr = 0
	}
	total, maxOpen := cfg.maxConns, 0
	if limit := fileLimit(); limit > 0 {
		maxOpen = max(limit-fdHeadroom, 1)
		fit := max(maxOpen-fdRefusalRoom, 1)
		if total > fit {
			log.Warn("lowering the connection limit to fit the file descriptor limit (ulimit -n)",
				"max-connections", fit, "descriptors", limit)
		}
		if total == 0 || total > fit {
			total = fit
		}
	}
	return newConnGate(perAddr, total, maxOpen, cfg.connectionsPerMin, m)
}

// httpServer returns the HTTP server for the WebSocket listener: every
// connection it serves comes through the gate (see gatedListener), and
// the handler finds the gate's record of it in the request's context.
func (srv *server) httpServer(log *slog.Logger) *http.Server {
	s := &http.Server{
		Handler:           srv.handler(),
		ReadHeaderTimeout: readHeaderTimeout,            // also bounds the TLS handshake
		MaxHeaderBytes:    maxHeaderBytes - headerSlack, // see headerSlack
		IdleTimeout:       httpIdleTimeout,
		ErrorLog:          httpErrorLog(log, srv.blurLogs),
		Protocols:         new(http.Protocols), // HTTP/1.1 only: a WebSocket upgrade needs it
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, slotKey{}, slotOf(c))
		},
	}
	s.Protocols.SetHTTP1(true)
	return s
}

// slotKey is the request context key of the gate's record of the
// connection (a *connSlot).
type slotKey struct{}

// now is the server's clock in Unix seconds, the unit of the protocol.
func (srv *server) now() float64 {
	return float64(srv.clock().UnixNano()) / 1e9
}

// nowSeconds is the time stamped on outgoing messages as "server_tx".
func nowSeconds() float64 { return float64(time.Now().UnixNano()) / 1e9 }

// handler returns the server's HTTP routes: a banner at /, the WebSocket
// endpoint at /v1 and every path below it (as the reference), with
// --transit-on-mailbox-port the WebSocket transit relay at /transit and
// for WebSocket upgrades at /, and 404 elsewhere. The paths are matched as they come, without the cleaning
// (and redirects) of http.ServeMux.
func (srv *server) handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Server", srv.serverHeader)
		switch path := r.URL.Path; {
		case srv.transit != nil && srv.transit.cfg.onMailbox &&
			(path == "/transit" || path == "/" && strings.EqualFold(r.Header.Get("Upgrade"), "websocket")):
			srv.transit.serveWebSocket(w, r) // the WebSocket transit relay (transit.go)
		case path == "/v1" || strings.HasPrefix(path, "/v1/"):
			srv.serveWebSocket(w, r)
		case path != "/":
			http.NotFound(w, r)
		case refusedConn(r) != "":
			w.Header().Set("Connection", "close")
			http.Error(w, refusedConn(r), http.StatusServiceUnavailable)
		case r.Method != http.MethodGet && r.Method != http.MethodHead:
			w.Header().Set("Allow", "HEAD, GET")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		default:
			w.Header().Set("Content-Type", "text/plain")
			io.WriteString(w, "Wormhole Relay\n")
		}
	})
}

// refusedConn is why the gate refused the connection r came on, if it did.
func refusedConn(r *http.Request) string {
	if s, _ := r.Context().Value(slotKey{}).(*connSlot); s != nil {
		return s.refused
	}
	return ""
}

// admit counts a new WebSocket connection. It returns an error text if
// the client's address, or the server, already has as many connections as
// it may: the gate decided when the connection was accepted (slot), and
// behind a trusted proxy the limiter counts by the address the proxy
// reported.
func (srv *server) admit(c *connection, slot *connSlot) string {
	srv.metrics.connections.Add(1)
	srv.metrics.connectionsTotal.Add(1)
	if srv.trustHeader == "" && c.addr.ip.IsLoopback() {
		srv.proxyHint.Do(func() {
			srv.log.Warn("a client connects from a loopback address; if a reverse proxy is in front, " +
				"set --trust-proxy-header, or the per-address limits count all its clients as one")
		})
	}
	if slot != nil {
		slot.setEvict(c.closeForFairShare)
		if slot.refused != "" {
			return slot.refused
		}
	}
	if srv.trustHeader == "" {
		return ""
	}
	c.byHeader = true
	why := srv.limiter.connect(c.addr.ip)
	if why == errTooManyConnsFromAddr {
		srv.metrics.refused("connections per address")
	}
	return why
}

// dismiss undoes admit. The gate's count is given back when the
// connection is closed.
func (srv *server) dismiss(c *connection) {
	if c.byHeader {
		srv.limiter.disconnect(c.addr.ip)
	}
	srv.metrics.connections.Add(-1)
}

// enter counts a connection about to be upgraded, so that shutdown waits
// for it. Once shutdown has begun it returns false, and the upgrade is
// refused.
func (srv *server) enter() bool {
	srv.connsMu.Lock()
	defer srv.connsMu.Unlock()
	if srv.shuttingDown {
		return false
	}
	srv.connWG.Add(1)
	return true
}

// track records a connection whose handshake is done, so that shutdown
// can close it; one that finishes its handshake after shutdown began is
// told to go at once, like the others.
func (srv *server) track(c *connection) {
	srv.connsMu.Lock()
	defer srv.connsMu.Unlock()
	srv.conns[c] = struct{}{}
	if srv.shuttingDown {
		c.end(closeGoingAway, errShutdown)
	}
}

// untrack forgets a connection that has ended, undoing enter and track.
func (srv *server) untrack(c *connection) {
	srv.connsMu.Lock()
	delete(srv.conns, c)
	srv.connsMu.Unlock()
	srv.dismiss(c)
	srv.connWG.Done()
}

// logAddr is how a client's address appears in the log: not at all when
// usage is blurred.
func (srv *server) logAddr(a clientAddr) string { return loggedAddr(srv.blurLogs, a) }

// loggedAddr is a client's address as the log shows it: "-" if blur
// (--blur-usage), for the mailbox's clients and the transit relay's.
func loggedAddr(blur bool, a clientAddr) string {
	if blur {
		return "-"
	}
	return a.String()
}

// pruneEvery prunes expired channels every interval until ctx ends.
func (srv *server) pruneEvery(ctx context.Context, interval, expiry time.Duration) {
	defer close(srv.pruned)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			srv.prune(expiry)
		}
	}
}

// prune deletes channels idle for longer than expiry, and writes the
// usage log's "current" record.
func (srv *server) prune(expiry time.Duration) {
	now := srv.now()
	reg := srv.reg
	reg.mu.Lock()
	nameplates, mailboxes := reg.pruneLocked(now, now-expiry.Seconds())
	reg.mu.Unlock()
	srv.writeCurrent()
	srv.limiter.sweep()
	if nameplates+mailboxes > 0 {
		srv.log.Info("pruned idle channels", "nameplates", nameplates, "mailboxes", mailboxes)
	}
}

// writeCurrent writes the usage log's "current" record: when the server
// started, now, and how many connections are subscribed to a mailbox.
func (srv *server) writeCurrent() {
	reg := srv.reg
	reg.mu.Lock()
	subscriptions := reg.subscriptions
	reg.mu.Unlock()
	reg.usage.current(srv.rebooted, srv.now(), subscriptions)
}

// reopen answers SIGHUP: the usage log is reopened (after rotation) and
// the TLS certificate re-read (after renewal).
func (srv *server) reopen(cert *certificate) {
	if err := srv.reg.usage.Reopen(); err != nil {
		srv.log.Error("reopening usage log", "err", err)
	} else if srv.reg.usage != nil {
		srv.log.Info("usage log reopened")
	}
	if cert != nil {
		if err := cert.reload(); err != nil {
			srv.log.Error("reloading TLS certificate; keeping the old one", "err", err)
		} else {
			srv.log.Info("TLS certificate reloaded")
		}
	}
}

// healthy reports whether the server can do its job: not while shutting
// down, nor while the journal is unwritable (changes are refused).
func (srv *server) healthy() error {
	if srv.closed.Load() {
		return errShutdown
	}
	return srv.reg.journal.err()
}

// closeConnections sends every client a going-away close after what it is
// owed, and waits for the connections to end, or for ctx.
func (srv *server) closeConnections(ctx context.Context) {
	srv.connsMu.Lock()
	srv.shuttingDown = true
	for c := range srv.conns {
		c.end(closeGoingAway, errShutdown)
	}
	srv.connsMu.Unlock()
	done := make(chan struct{})
	go func() { srv.connWG.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		srv.connsMu.Lock()
		for c := range srv.conns {
			c.abort(errShutdown)
		}
		srv.connsMu.Unlock()
		<-done
	}
}

// close flushes and closes the journal and the usage log. It may be
// called more than once.
func (srv *server) close() error {
	if srv.closed.Swap(true) {
		return nil
	}
	srv.stopPruning()
	<-srv.pruned
	err := srv.reg.journal.close()
	srv.writeCurrent() // so that the log's last word on the server says how long it ran
	srv.reg.usage.close()
	return err
}

// certificate holds the TLS certificate, replaced on SIGHUP.
type certificate struct {
	certFile, keyFile string
	current           atomic.Pointer[tls.Certificate]
}

func loadCertificate(certFile, keyFile string) (*certificate, error) {
	c := &certificate{certFile: certFile, keyFile: keyFile}
	return c, c.reload()
}

func (c *certificate) reload() error {
	cert, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		return err
	}
	c.current.Store(&cert)
	return nil
}

func (c *certificate) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return c.current.Load(), nil
}
