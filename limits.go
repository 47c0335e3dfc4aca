// limits.go owns the server-wide budgets that connections share: the
// budget for partly received messages, and the limiter of connections
// and new nameplates per client address.
package main

import (
	"errors"
	"sync"
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
	// only a flood of large, slow messages meets it: 128 messages of the
	// largest size at once. When it is used up, the connection holding
	// the most is closed.
	maxPartialBytesTotal = 64 << 20

	// messageTimeout is how long a message may take to arrive once its
	// first frame header has: a message of the largest size takes well
	// under a second on any link a wormhole client uses, and pings
	// between its fragments do not extend it.
	messageTimeout = 30 * time.Second
)

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

	mu      sync.Mutex
	total   int64
	held    map[*connection]int64
	evicted map[*connection]bool // closed for the budget; their charges are already given back
	onEvict func(*connection)    // closes a connection chosen to make room
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
	for b.total+int64(n) > b.max {
		top, most := c, b.held[c]+int64(n)
		for v, h := range b.held {
			if h > most {
				top, most = v, h
			}
		}
		if top == c {
			return errPartialBudget
		}
		b.total -= b.held[top]
		delete(b.held, top)
		b.evicted[top] = true
		victims = append(victims, top)
	}
	b.held[c] += int64(n)
	b.total += int64(n)
	return nil
}

// release gives back what c's message holds; the message is complete, or
// its read failed.
func (b *partialBudget) release(c *connection) {
	b.mu.Lock()
	defer b.mu.Unlock()
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
