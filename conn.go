// conn.go owns one WebSocket connection's life: the upgrade, the reading
// of frames, keepalive pings, the command budget, closing, and the
// message log (--log-messages). The frames it sends wait in its outbox
// (outbox.go).
//
// A mailbox server mostly holds idle connections (a sender waits minutes
// for its receiver), so an idle connection is kept cheap: one goroutine,
// started fresh after the handshake so its stack holds only the read it
// waits in, and two small buffers. Each connection has exactly one
// goroutine that reads it.
//
// golang.org/x/net/websocket does the opening handshake and reads and
// writes single frames. Two things it does not do are done here: it gives
// no way to see a frame's FIN bit, so the header is peeked to reassemble
// fragmented messages (RFC 6455 §5.4); and it has no ping call, so pings
// are written as frames with the ping opcode by the writer goroutine.
package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"

	"golang.org/x/net/websocket"
)

// Connection limits and timeouts. Tests may set shorter ones on the
// server (see server's fields).
const (
	// maxMessageBytes is the largest client message, reassembled. Key
	// exchange and file offers are under a few KiB, but a text sent with
	// "wormhole send --text" travels in one message, hex-encoded, so a
	// 20 kB text makes a 40 kB message; this allows texts of about 250 kB.
	// (wormhole-william cannot receive a message over 32 KiB, whatever the
	// server allows; the Python client can.)
	maxMessageBytes = 512 << 10

	// maxOutboxBytes bounds what may wait to be written to one client,
	// including what is being written: room for replaying a full mailbox
	// (MaxMailboxBytes) and then some. A client that falls this far
	// behind is disconnected. (With --max-mailbox-bytes over 1 MiB, the
	// server allows twice that instead.)
	maxOutboxBytes = 2 << 20

	// maxOutboxTotalBytes bounds what may wait to be written to all
	// clients together, beyond outboxReserveBytes each, so that many
	// clients that stop reading cannot together hold more than this.
	// Frames to clients that read leave within milliseconds, so only
	// clients that stopped reading hold any of it; when it is used up,
	// the client holding the most is disconnected to make room (see
	// evictLargestOutbox).
	maxOutboxTotalBytes = 32 << 20

	// outboxSlackDivisor sets how far past maxOutboxTotalBytes the
	// outboxes may go while the largest is being disconnected (a quarter
	// of it), so that a client holding little is not refused for what
	// others hold. Past that, a client that wants more than its reserve
	// is disconnected itself.
	outboxSlackDivisor = 4

	// outboxReserveBytes is what every client may have waiting whatever
	// the others hold: the frames of a step of a typical transfer (a few
	// KiB), so that clients that stop reading cannot get a working one
	// disconnected. Small, because every connection may use it.
	outboxReserveBytes = 8 << 10

	// socketSendBuffer sizes each connection's kernel send buffer (the
	// kernel doubles it for its own bookkeeping). Left to the kernel's
	// autotuning it grows to megabytes for a client that stops reading,
	// out of reach of the outbox bounds; this is room for a step of a
	// transfer, and at 100 ms round trip still carries a full mailbox's
	// replay in about two seconds.
	socketSendBuffer = 32 << 10

	// writeTimeout is how long one frame may take to write. A client that
	// reads slower than this is disconnected.
	writeTimeout = 10 * time.Second

	// pingInterval is how often the server pings every connection, as the
	// reference does (every 60 s), so NATs and proxies keep idle
	// connections open and dead peers are found by failed writes.
	pingInterval = 60 * time.Second

	// idleTimeout is how long a connection may send nothing, not even a
	// pong, before it is dropped. Every client answers pings, so only
	// dead ones reach it; it is longer than the 11-minute channel expiry
	// so that a waiting client is never cut off before its channel.
	idleTimeout = 12 * time.Minute

	// readBufferSize sizes each connection's read buffer: enough for a
	// typical whole client frame (a "bind" or an "add" of a PAKE message
	// is under 300 bytes), so most frames take one system call, and small,
	// because idle connections are what a mailbox server mostly holds.
	readBufferSize = 512

	// writeBufferSize sizes the buffer x/net/websocket writes frames
	// through. It only passes them on to the batch being written (see
	// batch), so it can be tiny.
	writeBufferSize = 64

	// maxPooledBatch is the largest batch buffer kept for reuse; a larger
	// one, left by replaying a big mailbox, is given back to the GC.
	maxPooledBatch = 64 << 10

	// closeTimeout is how long the server, having sent a close frame,
	// reads (and discards) what the client still sends, waiting for it to
	// close too, as the reference does (1 s). Closing a socket with unread
	// data would reset the connection and could lose the close frame.
	closeTimeout = time.Second

	// maxLingerBytes bounds what is read and discarded during closeTimeout.
	maxLingerBytes = 1 << 20

	// readDeadlineSlack and writeDeadlineSlack are how stale a deadline
	// may be: moving a deadline updates a runtime timer, so rather than on
	// every frame, a deadline is moved only once it is this much closer
	// than its full length. A silent client is then dropped up to this
	// much later.
	readDeadlineSlack  = time.Minute
	writeDeadlineSlack = time.Second

	// maxControlPayload is the largest ping, pong or close payload (RFC
	// 6455 §5.5).
	maxControlPayload = 125
)

// Close status codes (RFC 6455 §7.4.1).
const (
	closeNormal       = 1000
	closeGoingAway    = 1001
	closeProtocol     = 1002
	closeBadData      = 1007
	closePolicy       = 1008
	closeTooBig       = 1009
	closeInternalFail = 1011
)

// Reasons a connection ends, for the log and the "dropped" counter.
var (
	errClientClosed = errors.New("client closed")
	errTooBig       = errors.New("message too large")
	errBadFrame     = errors.New("protocol violation")
	errSlowClient   = errors.New("client not reading")
	errOutboxesFull = errors.New("outboxes full")
	errShutdown     = errors.New("server shutting down")
	errOverLimit    = errors.New("over the connection limit")
	errClientGone   = errors.New("client disconnected") // without a close frame: EOF, reset, broken pipe
	errClientIdle   = errors.New("client idle too long")
)

// clientAddr is where a client connects from: its TCP peer address, or
// the address a trusted proxy reported (--trust-proxy-header).
type clientAddr struct {
	ip   netip.Addr
	port uint16 // 0 when unknown
}

func (a clientAddr) String() string {
	if a.port == 0 {
		return a.ip.String()
	}
	return netip.AddrPortFrom(a.ip, a.port).String()
}

// connection is one client's WebSocket connection.
type connection struct {
	session // the protocol state (protocol.go)

	ws       *websocket.Conn
	netConn  net.Conn
	br       *bufio.Reader // what ws reads frames from; peeked for headers
	batch    batch         // where ws writes frames to
	handover handedOver    // the connection as ws sees it
	limitErr string        // why the client may not stay, if over a limit
	byHeader bool          // counted by the limiter, by the address a trusted proxy reported
	openedAt time.Time

	// outMu guards the outbox and the fields after it.
	outMu     sync.Mutex
	outbox    []outFrame
	outBytes  int             // the sizes of the frames in outbox
	sending   int             // the sizes of the frames the writer is writing
	flushing  bool            // a writer goroutine is running
	held      bool            // a message of this client's is being handled: the writer waits (see hold)
	heldFrom  int             // while held, where in outbox the frames queued meanwhile begin
	closing   bool            // a close frame is queued, or the connection failed: queue nothing more
	flushDone chan struct{}   // closed when the writer exits, if someone waits
	endReason error           // why the server ended the connection, if it did
	pinger    *time.Timer     // sends the next keepalive ping
	readSet   time.Time       // when the read deadline was last moved
	heldBytes int             // queued while a message was handled: the work it caused
	queued    int             // in the socket's kernel send buffer when last read (see refreshQueuedLocked)
	rawConn   syscall.RawConn // the socket, to ask the kernel about it; nil if not TCP

	// The command budget (see takeCommand); only the reader uses it.
	commands bucket
}

// serveWebSocket upgrades a request on /v1 to a WebSocket connection and
// runs it. The connection is taken from net/http (hijacked) and served
// by a goroutine of its own, so that net/http's per-connection buffers
// and request state are freed while the client waits, which may be for
// many minutes.
func (srv *server) serveWebSocket(w http.ResponseWriter, r *http.Request) {
	if !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
		http.Error(w, "This is the Magic Wormhole mailbox server's WebSocket endpoint; use a wormhole client.", http.StatusUpgradeRequired)
		return
	}
	addr, ok := srv.clientAddr(r)
	if !ok {
		http.Error(w, "cannot tell the client's address", http.StatusBadRequest)
		return
	}
	if !srv.enter() {
		http.Error(w, "the server is shutting down", http.StatusServiceUnavailable)
		return
	}
	netConn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		srv.connWG.Done()
		http.Error(w, "cannot upgrade this connection", http.StatusInternalServerError)
		return
	}
	c := &connection{netConn: netConn, br: bufio.NewReaderSize(hijackedReader(netConn, brw), readBufferSize), openedAt: time.Now()}
	c.session = session{srv: srv, out: c, addr: addr}
	c.batch.conn, c.handover.Conn = netConn, netConn
	if tc := tcpConn(netConn); tc != nil {
		tc.SetWriteBuffer(socketSendBuffer)
		c.rawConn, _ = tc.SyscallConn()
	}
	c.limitErr = srv.admit(c, slotOf(netConn))

	// The handshake response and the welcome are written to a batch and
	// leave together when the handshake is done.
	c.batch.begin()
	ws := websocket.Server{
		Config:    websocket.Config{Header: http.Header{"Server": {srv.serverHeader}}},
		Handshake: func(*websocket.Config, *http.Request) error { return nil }, // any Origin, or none
		Handler:   c.accept,
	}
	rw := bufio.NewReadWriter(c.br, bufio.NewWriterSize(&c.batch, writeBufferSize))
	ws.ServeHTTP(&hijacked{conn: &c.handover, rw: rw}, handshakeRequest(r))
	if err := c.batch.end(); err != nil || c.ws == nil { // failed, or refused (and x/net's answer sent)
		netConn.Close()
		srv.dismiss(c)
		srv.connWG.Done()
		if c.ws != nil {
			srv.connLog(srv.log.Info, "connection closed", "client", srv.logAddr(c.addr),
				"duration", time.Since(c.openedAt).Round(time.Millisecond), "reason", netFailure(err, errSlowClient))
		}
		return
	}
	srv.track(c)
	go c.serve()
}

// hijackedReader returns what a connection taken from net/http reads: the
// bytes the client sent right after its request, which net/http has
// already read into brw, then the connection. The early bytes are copied,
// so that net/http's buffer can be freed.
func hijackedReader(netConn net.Conn, brw *bufio.ReadWriter) io.Reader {
	n := brw.Reader.Buffered()
	if n == 0 {
		return netConn
	}
	early, _ := brw.Reader.Peek(n)
	return io.MultiReader(bytes.NewReader(bytes.Clone(early)), netConn)
}

// accept is x/net/websocket's Handler: it runs once the handshake has
// succeeded, writes the welcome, and takes the connection over. It
// returns at once, and the library's goroutine (net/http's, which ran
// the handshake) exits; the connection's own goroutine is started by
// serveWebSocket.
func (c *connection) accept(ws *websocket.Conn) {
	c.ws = ws
	srv := c.srv
	srv.connLog(srv.log.Info, "connection opened", "client", srv.logAddr(c.addr))
	welcome := srv.welcome
	if c.limitErr != "" {
		welcome.signalError = c.limitErr
	}
	frame := welcomeFrame(welcome, c.addr)
	if srv.logMessages {
		logged := frame
		if srv.blurLogs { // the welcome tells the client its address
			logged = welcomeFrame(welcome, clientAddr{})
		}
		srv.log.Info("send", "client", srv.logAddr(c.addr), logFrame(logged))
	}
	c.writeFrame(ws, frame, websocket.TextFrame)
}

// handedOver is the connection as x/net/websocket sees it. The library
// closes it when its Handler returns, but this server's Handler returns
// as soon as it has taken the connection over (see accept); and when the
// handshake is refused, the library's answer is still in the batch. So the
// library's Close does nothing, and this server closes the connection
// itself: after a refusal, once the answer is sent, and otherwise when the
// connection's goroutine is done.
type handedOver struct{ net.Conn }

func (h *handedOver) Close() error { return nil }

// handshakeRequest copies what the WebSocket handshake needs from r, so
// the rest of the request can be freed. The subprotocol header is left
// out: the server never selects one.
func handshakeRequest(r *http.Request) *http.Request {
	h := &http.Request{Method: r.Method, URL: r.URL, Host: r.Host, RequestURI: r.RequestURI, Header: http.Header{}}
	for _, k := range []string{"Upgrade", "Connection", "Sec-Websocket-Key", "Sec-Websocket-Version", "Origin"} {
		if v, ok := r.Header[k]; ok {
			h.Header[k] = v
		}
	}
	if r.TLS != nil {
		h.TLS = &tls.ConnectionState{} // only its presence matters: the location is wss://
	}
	return h
}

// hijacked is the http.ResponseWriter x/net/websocket is given: the
// connection is already taken from net/http, so it only hands it over.
type hijacked struct {
	conn net.Conn
	rw   *bufio.ReadWriter
}

func (h *hijacked) Header() http.Header                          { return http.Header{} }
func (h *hijacked) Write([]byte) (int, error)                    { return 0, http.ErrHijacked }
func (h *hijacked) WriteHeader(int)                              {}
func (h *hijacked) Hijack() (net.Conn, *bufio.ReadWriter, error) { return h.conn, h.rw, nil }

// clientAddr returns the address the client connects from.
func (srv *server) clientAddr(r *http.Request) (clientAddr, bool) {
	if srv.trustHeader != "" {
		if v := r.Header.Get(srv.trustHeader); v != "" {
			if i := strings.LastIndexByte(v, ','); i >= 0 { // X-Forwarded-For: the nearest proxy's view is last
				v = v[i+1:]
			}
			ip, err := netip.ParseAddr(strings.TrimSpace(v))
			if err != nil {
				return clientAddr{}, false
			}
			port, _ := strconv.ParseUint(r.Header.Get("X-Real-Port"), 10, 16)
			return clientAddr{ip: ip.Unmap(), port: uint16(port)}, true
		}
	}
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return clientAddr{}, false
	}
	return clientAddr{ip: ap.Addr().Unmap(), port: ap.Port()}, true
}

// serve is the connection's goroutine: it reads and handles messages
// until the client leaves or misbehaves, then closes the connection.
//
// While the client is idle this goroutine waits in readMessage, and its
// stack holds only serve, readMessage and the read itself. Keeping that
// chain short (the work of handling a message, starting and finishing is
// done in callees) lets the runtime shrink the stack to 4 KiB, which is
// most of what an idle connection costs.
func (c *connection) serve() {
	err := c.start()
	for err == nil {
		var msg []byte
		if msg, err = c.readMessage(); err == nil {
			err = c.received(msg)
		}
	}
	c.finish(err)
}

// start starts the connection's keepalive pings, or, if the client's
// address is over its connection limit, ends it.
func (c *connection) start() error {
	if c.limitErr != "" {
		return errOverLimit
	}
	c.outMu.Lock()
	c.pinger = time.AfterFunc(c.srv.pingInterval, c.keepalive)
	c.outMu.Unlock()
	return nil
}

// received handles one message.
func (c *connection) received(msg []byte) error {
	if c.srv.logMessages {
		c.srv.log.Info("recv", "client", c.srv.logAddr(c.addr), logFrame(msg))
	}
	if c.isClosing() {
		return nil // the server has said goodbye: nothing it did now could be answered
	}
	if !c.takeCommand(1) {
		c.srv.metrics.refused("commands per connection")
		c.enqueue(errorFrame(errCommandRate.Error(), jsonNull), 0)
		return errCommandRate
	}
	err := c.handle(msg)
	c.outMu.Lock()
	caused := c.heldBytes // what the command had sent to this client: its work
	c.heldBytes = 0
	c.outMu.Unlock()
	c.takeCommand(float64(caused / commandBytesPerToken))
	return err
}

// takeCommand takes n tokens from the connection's command budget, a
// token bucket of commandBurst tokens refilled at the server's
// commandsPerSecond. It reports whether the bucket had any left to take
// from; a command that costs more than is left takes it into debt, which
// the next commands wait out.
func (c *connection) takeCommand(n float64) bool {
	rate := c.srv.commandsPerSecond
	if rate <= 0 {
		return true
	}
	now := time.Now()
	if c.commands.last.IsZero() {
		c.commands = bucket{tokens: commandBurst, last: now}
	} else {
		c.commands.refill(now, rate, commandBurst)
	}
	if c.commands.tokens < 1 && n > 0 {
		return false
	}
	c.commands.tokens -= n
	return true
}

// isClosing reports whether the connection is going away (a close frame is
// queued, or it failed).
func (c *connection) isClosing() bool {
	c.outMu.Lock()
	defer c.outMu.Unlock()
	return c.closing
}

// finish ends the connection for the reason err: with a close frame
// after what the client is owed, or at once if it is gone.
func (c *connection) finish(err error) {
	srv := c.srv
	defer srv.untrack(c)
	defer c.netConn.Close()
	c.outMu.Lock()
	if c.pinger != nil {
		c.pinger.Stop()
		c.pinger = nil // so that a ping running now does not restart it
	}
	c.outMu.Unlock()
	c.disconnected()
	switch {
	case c.reason() != nil:
		// The server ended the connection already (its close is queued,
		// or it failed) and stopped the reader: what err says is only
		// that.
	case errors.Is(err, errOverLimit):
		c.end(closePolicy, errors.New(c.limitErr))
	case errors.Is(err, errClientClosed):
		c.end(closeNormal, err)
	case errors.Is(err, errTooBig), errors.Is(err, errPartialBudget):
		// Say why before closing: a client that only saw the close would
		// reconnect and send the same message again.
		c.enqueue(errorFrame(err.Error(), jsonNull), 0)
		c.end(closeTooBig, err)
	case errors.Is(err, errMessageTimeout), errors.Is(err, errCommandRate):
		c.end(closePolicy, err)
	case errors.Is(err, errBadInput):
		c.end(closeBadData, err)
	case errors.Is(err, errBadFrame):
		c.end(closeProtocol, err)
	case !isNetClose(err):
		c.end(closeInternalFail, err)
	default:
		c.abort(netFailure(err, errClientIdle)) // the client went away, or the server cut it off
	}
	c.waitFlushed()
	c.outMu.Lock()
	c.closing = true // nothing more is queued, and the send buffer is no longer counted
	c.forgetQueuedLocked()
	c.outMu.Unlock()
	c.linger()
	reason := c.reason()
	if reason != nil && !errors.Is(reason, errClientClosed) && !errors.Is(reason, errClientGone) {
		srv.metrics.drop(reason)
	}
	srv.connLog(srv.log.Info, "connection closed", "client", srv.logAddr(c.addr),
		"duration", time.Since(c.openedAt).Round(time.Millisecond), "reason", reason)
}

// readMessage returns the next whole message, reassembling fragments,
// answering pings and noting pongs on the way.
//
// A frame header reserves nothing: the message grows as its payload
// arrives (see readPayload), and what it holds counts against the
// server's budget for partly received messages. Once a message has begun
// it must be complete within messageTimeout, however many control frames
// come between its fragments.
func (c *connection) readMessage() ([]byte, error) {
	var msg []byte
	defer c.srv.partial.refund(c)
	started := false
	for {
		if !started {
			c.extendReadDeadline()
		}
		h, err := peekFrameHeader(c.br)
		if err != nil {
			if started && isTimeout(err) {
				return nil, errMessageTimeout
			}
			return nil, err
		}
		control := h.opcode >= websocket.CloseFrame
		switch {
		case !h.masked || h.rsv != 0: // clients must mask, and no extension was agreed
			return nil, errBadFrame
		case control && (!h.fin || h.length > maxControlPayload || h.opcode > websocket.PongFrame): // 0xB-0xF are reserved
			return nil, errBadFrame
		case !control && (h.opcode == websocket.ContinuationFrame) != started:
			return nil, errBadFrame // a continuation with nothing to continue, or a new message inside one
		case !control && h.opcode != websocket.ContinuationFrame && h.opcode != websocket.TextFrame && h.opcode != websocket.BinaryFrame:
			return nil, errBadFrame
		case !control && int64(len(msg))+h.length > int64(c.srv.maxMessageBytes): // a control frame is no part of the message
			return nil, errTooBig
		}
		if !control && !started {
			started = true
			c.setMessageDeadline()
		}
		frame, err := c.ws.NewFrameReader() // parses the header again and unmasks the payload
		if err != nil {
			return nil, err
		}
		if control { // may come between the fragments of a message
			payload := make([]byte, h.length)
			if _, err := io.ReadFull(frame, payload); err != nil {
				return nil, err
			}
			switch h.opcode {
			case websocket.CloseFrame:
				return nil, closeReceived(payload)
			case websocket.PingFrame:
				c.queue(outFrame{opcode: websocket.PongFrame, data: payload})
			}
			continue // a pong needs nothing more: as traffic, it moved the read deadline
		}
		if msg, err = c.readPayload(msg, frame, h.length); err != nil {
			if isTimeout(err) {
				return nil, errMessageTimeout
			}
			return nil, err
		}
		if h.fin {
			return msg, nil
		}
	}
}

// readPayload appends a frame's n payload bytes to msg. The buffer grows
// as bytes arrive, at most doubling what has arrived (and never by less
// than readChunkBytes), so a client holds at most about twice what it has
// sent, and each growth is charged to the server's budget for partly
// received messages first.
func (c *connection) readPayload(msg []byte, frame io.Reader, n int64) ([]byte, error) {
	for n > 0 {
		chunk := int(min(n, int64(max(readChunkBytes, len(msg)))))
		if cap(msg)-len(msg) < chunk {
			if err := c.srv.partial.charge(c, len(msg)+chunk-cap(msg)); err != nil {
				c.srv.metrics.refused("partly received messages")
				return nil, err
			}
			grown := make([]byte, len(msg), len(msg)+chunk)
			copy(grown, msg)
			msg = grown
		}
		start := len(msg)
		msg = msg[:start+chunk]
		if _, err := io.ReadFull(frame, msg[start:]); err != nil {
			return nil, err
		}
		n -= int64(chunk)
	}
	return msg, nil
}

// closeReceived checks a client's close frame (RFC 6455 §5.5.1, §7.4): it
// is empty, or holds a status code a client may send and a UTF-8 reason.
func closeReceived(payload []byte) error {
	if len(payload) == 0 {
		return errClientClosed
	}
	if len(payload) == 1 {
		return errBadFrame
	}
	switch code := binary.BigEndian.Uint16(payload); {
	case code < 1000, code >= 1004 && code <= 1006, code >= 1015 && code < 3000, code >= 5000:
		return errBadFrame
	}
	if !utf8.Valid(payload[2:]) {
		return errBadInput
	}
	return errClientClosed
}

// frameHeader is what peekFrameHeader reads of a frame (RFC 6455 §5.2).
type frameHeader struct {
	fin    bool
	rsv    byte
	opcode byte
	masked bool
	length int64
}

// peekFrameHeader reads the next frame's header without consuming it.
func peekFrameHeader(br *bufio.Reader) (frameHeader, error) {
	b, err := br.Peek(2)
	if err != nil {
		return frameHeader{}, err
	}
	h := frameHeader{fin: b[0]&0x80 != 0, rsv: b[0] & 0x70, opcode: b[0] & 0x0f, masked: b[1]&0x80 != 0}
	switch n := b[1] & 0x7f; n {
	case 126:
		if b, err = br.Peek(4); err == nil {
			h.length = int64(binary.BigEndian.Uint16(b[2:]))
		}
	case 127:
		if b, err = br.Peek(10); err == nil {
			h.length = int64(binary.BigEndian.Uint64(b[2:]) & (1<<63 - 1))
		}
	default:
		h.length = int64(n)
	}
	return h, err
}

// extendReadDeadline gives the client idleTimeout to send its next
// frame, unless the connection is closing.
func (c *connection) extendReadDeadline() {
	now := time.Now()
	c.outMu.Lock()
	defer c.outMu.Unlock()
	if !c.closing && now.Sub(c.readSet) >= readDeadlineSlack {
		c.readSet = now
		c.netConn.SetReadDeadline(now.Add(c.srv.idleTimeout))
	}
}

// setMessageDeadline gives a message that has begun messageTimeout to
// be complete (or the idle timeout, if sooner), unless the connection is
// closing. The next extendReadDeadline moves the deadline back.
func (c *connection) setMessageDeadline() {
	now := time.Now()
	c.outMu.Lock()
	defer c.outMu.Unlock()
	if !c.closing {
		deadline := now.Add(c.srv.messageTimeout)
		if idle := c.readSet.Add(c.srv.idleTimeout); idle.Before(deadline) {
			deadline = idle
		}
		c.readSet = time.Time{}
		c.netConn.SetReadDeadline(deadline)
	}
}

// closeForBudget closes a connection whose partly received message is
// dropped to make room in the server's budget for them: it is told why,
// and its reader stops at once, so the message's memory is freed at once.
func (c *connection) closeForBudget() {
	c.srv.metrics.refused("partly received messages")
	c.enqueue(errorFrame(errPartialBudget.Error(), jsonNull), 0)
	c.end(closeTooBig, errPartialBudget)
	c.outMu.Lock()
	c.netConn.SetReadDeadline(time.Now())
	c.outMu.Unlock()
}

// closeForFairShare closes a connection whose place the gate gives to a
// client from an address holding less than its share: it is told why,
// and cut off after closeTimeout if it does not read its close frame.
func (c *connection) closeForFairShare() {
	c.enqueue(errorFrame(errFairShare.Error(), jsonNull), 0)
	c.end(closePolicy, errFairShare)
	time.AfterFunc(closeTimeout, func() { c.abort(errFairShare) })
}

// keepalive queues a keepalive ping frame, and schedules the next.
func (c *connection) keepalive() {
	c.queue(outFrame{opcode: websocket.PingFrame, data: []byte("wormhole")})
	c.outMu.Lock()
	if c.pinger != nil && !c.closing {
		c.pinger.Reset(c.srv.pingInterval)
	}
	c.outMu.Unlock()
}

// end queues a close frame with this status after whatever is queued.
func (c *connection) end(status int, reason error) {
	data := binary.BigEndian.AppendUint16(nil, uint16(status))
	c.outMu.Lock()
	if c.endReason == nil {
		c.endReason = reason
	}
	c.outMu.Unlock()
	c.queue(outFrame{opcode: websocket.CloseFrame, data: data})
}

// abort drops the connection at once, discarding the outbox.
func (c *connection) abort(reason error) {
	c.outMu.Lock()
	c.failLocked(reason)
	c.outMu.Unlock()
}

func (c *connection) failLocked(reason error) {
	if c.endReason == nil {
		c.endReason = reason
	}
	c.closing = true
	c.srv.outboxBytes.Add(-int64(c.outBytes))
	c.outbox, c.outBytes = nil, 0
	c.forgetQueuedLocked()
	go c.netConn.Close() // Close never blocks, but the caller may hold the registry lock
}

// linger reads and discards what the client sends for a short while, so
// that the client reads the close frame and closes its end first.
func (c *connection) linger() {
	c.netConn.SetReadDeadline(time.Now().Add(closeTimeout))
	io.Copy(io.Discard, io.LimitReader(c.br, maxLingerBytes))
}

func (c *connection) reason() error {
	c.outMu.Lock()
	defer c.outMu.Unlock()
	return c.endReason
}

// isNetClose reports whether err just means the connection went away
// (or, as a timeout, should be made to).
func isNetClose(err error) bool {
	var opErr *net.OpError
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || isTimeout(err) || errors.As(err, &opErr)
}

// netFailure names why reading from or writing to a client failed, for
// the log and the "dropped" counter: timedOut (errClientIdle for a read,
// errSlowClient for a write) if err is a timeout, errClientGone if the
// connection went away, and err otherwise. A network error carries both
// ends' addresses, which must not reach either (so a --blur-usage log
// names no client, and the counter does not grow a key per client).
func netFailure(err, timedOut error) error {
	switch {
	case isTimeout(err):
		return timedOut
	case isNetClose(err):
		return errClientGone
	}
	return err
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// Message log (--log-messages) limits.
const (
	// logBodyDigits is how much of a hex "body" the message log shows: a
	// taste. Bodies are mostly ciphertext, and it is the protocol around
	// them that the log is for.
	logBodyDigits = 32

	// logFrameBytes bounds a frame in the message log whatever it holds.
	logFrameBytes = 1 << 10
)

// longBody matches a "body" field whose hex value is longer than
// logBodyDigits.
var longBody = regexp.MustCompile(`("body"\s*:\s*")([0-9a-fA-F]{` + strconv.Itoa(logBodyDigits+1) + `,})"`)

// logFrame is a frame as the message log shows it: with its body cut
// short and every other field kept, so that the whole protocol shows.
// A frame that is JSON is logged as JSON, so that --log-format=json nests
// it as an object rather than a string.
func logFrame(frame []byte) slog.Attr {
	short := longBody.ReplaceAllFunc(frame, func(m []byte) []byte {
		sm := longBody.FindSubmatch(m)
		return fmt.Appendf(nil, `%s%s…(%d hex digits)"`, sm[1], sm[2][:logBodyDigits], len(sm[2]))
	})
	switch {
	case len(short) > logFrameBytes:
		return slog.String("frame", fmt.Sprintf("%s…(%d bytes)", short[:logFrameBytes], len(frame)))
	case json.Valid(short):
		return slog.Any("frame", json.RawMessage(short))
	}
	return slog.String("frame", string(short))
}
