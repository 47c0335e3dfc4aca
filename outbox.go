// outbox.go owns a connection's outbox: the frames queued for a client,
// the bytes they may take (the client's own limit and the server's shared
// pool, with eviction of the largest), the holding of frames while the
// client's message is handled, the writer goroutine that sends them once
// the journal holds what they report, and the batch that sends each pass
// in one system call.
//
// The outbox never blocks: queuing a frame may be done with the registry
// locked. A writer goroutine is started when the outbox gets its first
// frame and exits when it is empty. Frames leave in the order they were
// queued, and none leaves before the journal holds what it reports
// (store.go). A client that does not keep up, so that its outbox outgrows
// its limit, is disconnected; it never slows anyone else.
package main

import (
	"net"
	"slices"
	"sync"
	"time"

	"golang.org/x/net/websocket"
)

// outFrame is one frame waiting in an outbox.
type outFrame struct {
	opcode byte   // websocket.TextFrame, PingFrame, PongFrame or CloseFrame
	data   []byte // the payload
	lsn    uint64 // the journal position that must be durable first
}

// enqueue queues a text frame; it is the session's sender.
func (c *connection) enqueue(frame []byte, lsn uint64) {
	c.queue(outFrame{opcode: websocket.TextFrame, data: frame, lsn: lsn})
}

// queue adds a frame to the outbox and makes sure a writer runs. It never
// blocks on the network, so it may be called with the registry locked.
func (c *connection) queue(f outFrame) {
	c.outMu.Lock()
	defer c.outMu.Unlock()
	if c.closing {
		return
	}
	if err := c.reserveLocked(len(f.data)); err != nil {
		c.failLocked(err)
		return
	}
	if c.held {
		c.heldBytes += len(f.data)
	}
	c.outbox = append(c.outbox, f)
	c.outBytes += len(f.data)
	if f.opcode == websocket.CloseFrame {
		c.closing = true
	}
	c.startWriterLocked()
}

// reserveLocked counts n more bytes waiting for this client, against its
// own limit and, beyond its reserve, the server's. What waits includes
// what the kernel still holds in the socket's send buffer (see
// refreshQueuedLocked), read again before a reservation is refused, as
// the client may have read it since.
func (c *connection) reserveLocked(n int) error {
	for refreshed := false; ; refreshed = true {
		held := c.outBytes + c.sending + c.queued
		total := c.srv.outboxBytes.Add(int64(n))
		err := error(nil)
		switch {
		case held+n > c.srv.maxOutboxBytes:
			err = errSlowClient
		case held+n > outboxReserveBytes && total > c.srv.maxOutboxTotalBytes:
			c.srv.startOutboxEviction()
			if total > c.srv.maxOutboxTotalBytes+c.srv.maxOutboxTotalBytes/outboxSlackDivisor {
				err = errOutboxesFull
			}
		}
		if err == nil {
			return nil
		}
		c.srv.outboxBytes.Add(-int64(n))
		if refreshed || c.queued == 0 {
			return err
		}
		c.refreshQueuedLocked()
	}
}

// startOutboxEviction starts evictLargestOutbox, unless it is running.
// It never blocks, so it may be called with a connection's or the
// registry's lock held.
func (srv *server) startOutboxEviction() {
	if srv.evicting.CompareAndSwap(false, true) {
		go srv.evictLargestOutbox()
	}
}

// evictLargestOutbox disconnects the connection with the most bytes
// waiting for it, if all outboxes together hold more than
// maxOutboxTotalBytes: the pool is shared fairly, so clients that stop
// reading lose their place before one that reads. It takes the
// connections' lock before each connection's own, as shutdown does.
func (srv *server) evictLargestOutbox() {
	defer srv.evicting.Store(false)
	if srv.outboxBytes.Load() <= srv.maxOutboxTotalBytes {
		return
	}
	srv.connsMu.Lock()
	defer srv.connsMu.Unlock()
	var largest *connection
	most := 0
	for c := range srv.conns {
		c.outMu.Lock()
		if held := c.outBytes + c.sending + c.queued; held > most && !c.closing {
			largest, most = c, held
		}
		c.outMu.Unlock()
	}
	if largest != nil {
		srv.metrics.refused("outboxes full")
		largest.abort(errOutboxesFull)
	}
}

// refreshQueuedLocked reads how many bytes the kernel still holds in the
// socket's send buffer for this client (sent but not acknowledged, or not
// yet sent), and counts them as waiting. A client that stops reading
// fills its socket's buffer before its outbox, and the kernel accepts
// writes into it; uncounted, 768 such clients pinned 736 MiB of kernel
// memory.
func (c *connection) refreshQueuedLocked() {
	if c.rawConn == nil || c.closing {
		return
	}
	q := sendQueued(c.rawConn)
	c.srv.outboxBytes.Add(int64(q - c.queued))
	c.queued = q
}

// forgetQueuedLocked stops counting the socket's send buffer: the
// connection is closing.
func (c *connection) forgetQueuedLocked() {
	c.srv.outboxBytes.Add(-int64(c.queued))
	c.queued = 0
}

// hold keeps the writer from taking frames until release. While a client
// message is handled, its ack is queued first, before the changes it
// acknowledges are journaled; held, it cannot leave before them.
func (c *connection) hold() {
	c.outMu.Lock()
	c.held, c.heldFrom = true, len(c.outbox)
	c.outMu.Unlock()
}

// release lets the writer take the frames queued, of which those queued
// while held may depend on the journal up to lsn. The frames queued
// before keep their own positions: a client's earlier replies still in
// the outbox are not made to wait for its later command's changes.
func (c *connection) release(lsn uint64) {
	c.outMu.Lock()
	defer c.outMu.Unlock()
	c.held = false
	for i := c.heldFrom; i < len(c.outbox); i++ {
		c.outbox[i].lsn = max(c.outbox[i].lsn, lsn)
	}
	c.startWriterLocked()
}

func (c *connection) startWriterLocked() {
	if !c.flushing && !c.held && len(c.outbox) > 0 {
		c.flushing = true
		go c.runWriter()
	}
}

// runWriter is the writer goroutine: it writes the outbox until it is empty
// (or held). Each pass sends every frame from the front that the journal
// holds, in one system call; when the first frame is not yet durable, it
// waits for the journal first. So frames leave in order, each as soon as
// it and those before it may: a reply is not held back by a later
// command's changes, nor sent in a pass of its own when the same sync
// covered the frames queued after it. While the journal is unwritable a
// pass waits, unless the connection is closing.
func (c *connection) runWriter() {
	for {
		c.outMu.Lock()
		frames := c.takeDurableLocked()
		if len(frames) == 0 {
			if len(c.outbox) == 0 || c.held {
				c.flushing = false
				if c.flushDone != nil && len(c.outbox) == 0 {
					close(c.flushDone)
					c.flushDone = nil
				}
				c.outMu.Unlock()
				return
			}
			first := c.outbox[0].lsn // not yet durable
			c.outMu.Unlock()
			if err := c.srv.reg.journal.waitDurable(first, c.isClosing); err != nil {
				c.outMu.Lock()
				c.failLocked(netFailure(err, errSlowClient))
				c.outMu.Unlock()
			}
			continue
		}
		c.outMu.Unlock()
		err := c.writeBatch(frames)
		c.outMu.Lock()
		c.srv.outboxBytes.Add(-int64(c.sending))
		c.sending = 0
		if err != nil {
			c.failLocked(netFailure(err, errSlowClient))
		} else {
			c.refreshQueuedLocked()
		}
		c.outMu.Unlock()
	}
}

// takeDurableLocked takes, for a pass of the writer, the frames at the
// front of the outbox whose journal positions are durable; none while
// held.
func (c *connection) takeDurableLocked() []outFrame {
	if c.held {
		return nil
	}
	durable := c.srv.reg.journal.durableLSN()
	n := 0
	for n < len(c.outbox) && c.outbox[n].lsn <= durable {
		c.sending += len(c.outbox[n].data)
		c.outBytes -= len(c.outbox[n].data)
		n++
	}
	if n == len(c.outbox) {
		frames := c.outbox
		c.outbox = nil
		return frames
	}
	frames := slices.Clone(c.outbox[:n])
	clear(c.outbox[:n]) // the batch holds them now
	c.outbox = c.outbox[n:]
	return frames
}

// writeBatch sends a batch of frames in one system call.
func (c *connection) writeBatch(frames []outFrame) error {
	c.batch.begin()
	closing := false
	for _, f := range frames {
		if c.srv.logMessages && f.opcode == websocket.TextFrame {
			c.srv.log.Info("send", "client", c.srv.logAddr(c.addr), logFrame(f.data))
		}
		c.writeFrame(c.ws, f.data, f.opcode)
		closing = closing || f.opcode == websocket.CloseFrame
	}
	if err := c.batch.end(); err != nil {
		return err
	}
	if closing {
		if cw, ok := c.netConn.(interface{ CloseWrite() error }); ok { // TLS
			cw.CloseWrite()
		} else if tc := tcpConn(c.netConn); tc != nil {
			tc.CloseWrite()
		}
		c.netConn.SetReadDeadline(time.Now().Add(closeTimeout)) // the reader waits no longer for the client's close
	}
	return nil
}

// writeFrame encodes one frame into the batch being written.
func (c *connection) writeFrame(ws *websocket.Conn, data []byte, opcode byte) {
	ws.PayloadType = opcode
	ws.Write(data) // into memory: it cannot fail
	c.srv.metrics.framesSent.Add(1)
}

// batch gathers the frames of one writer pass, so they leave in one
// system call. x/net/websocket writes each frame through a small
// bufio.Writer, which empties here; outside a pass (there is none after
// the handshake) writes would go straight to the connection.
type batch struct {
	conn    net.Conn
	buf     *[]byte   // the frames gathered, while a pass is under way
	timeout time.Time // the write deadline last set
}

var batchPool = sync.Pool{New: func() any { b := make([]byte, 0, 4096); return &b }}

func (b *batch) begin() { b.buf = batchPool.Get().(*[]byte) }

func (b *batch) Write(p []byte) (int, error) {
	if b.buf == nil {
		return b.conn.Write(p)
	}
	*b.buf = append(*b.buf, p...)
	return len(p), nil
}

// end writes what was gathered, within writeTimeout (less at most
// writeDeadlineSlack).
func (b *batch) end() error {
	buf := b.buf
	b.buf = nil
	if now := time.Now(); b.timeout.Sub(now) < writeTimeout-writeDeadlineSlack {
		b.timeout = now.Add(writeTimeout)
		b.conn.SetWriteDeadline(b.timeout)
	}
	_, err := b.conn.Write(*buf)
	if cap(*buf) <= maxPooledBatch {
		*buf = (*buf)[:0]
		batchPool.Put(buf)
	}
	return err
}

// waitFlushed waits for the writer to finish, which a write timeout
// bounds.
func (c *connection) waitFlushed() {
	c.outMu.Lock()
	if !c.flushing {
		c.outMu.Unlock()
		return
	}
	c.flushDone = make(chan struct{})
	done := c.flushDone
	c.outMu.Unlock()
	<-done
}
