// process_test.go tests the server as a process: the real binary, built
// by the test, killed with SIGKILL at random moments and restarted on its
// journal; stopped with SIGTERM; run out of disk; and restarted under a
// waiting Python client, which must finish its transfer.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// buildServer builds the server binary into a temporary directory.
func buildServer(t testing.TB) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "wormhole-mailbox")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// proc is a process under test whose standard error (the server's log)
// is collected line by line.
type proc struct {
	t   testing.TB
	cmd *exec.Cmd

	mu    sync.Mutex
	cond  sync.Cond
	lines []string
	ended bool // standard error is closed: the process has exited

	exited  chan struct{} // closed when the process has been waited for
	waitErr error
}

// startProc starts argv; standard output is discarded.
func startProc(t testing.TB, argv ...string) *proc {
	t.Helper()
	p := &proc{t: t, cmd: exec.Command(argv[0], argv[1:]...), exited: make(chan struct{})}
	p.cond.L = &p.mu
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // so that what it starts can be ended with it
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			p.mu.Lock()
			p.lines = append(p.lines, sc.Text())
			p.cond.Broadcast()
			p.mu.Unlock()
		}
		p.mu.Lock()
		p.ended = true
		p.cond.Broadcast()
		p.mu.Unlock()
		p.waitErr = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL) // the process group it leads
		<-p.exited
		if t.Failed() {
			p.mu.Lock()
			t.Logf("log of %s:\n%s", strings.Join(argv, " "), strings.Join(p.lines, "\n"))
			p.mu.Unlock()
		}
	})
	return p
}

// waitLine waits until the process logs a line containing every one of
// parts, and returns it. It fails the test if the process exits first.
func (p *proc) waitLine(parts ...string) string {
	p.t.Helper()
	timedOut := false
	timer := time.AfterFunc(testTimeout, func() {
		p.mu.Lock()
		timedOut = true
		p.cond.Broadcast()
		p.mu.Unlock()
	})
	defer timer.Stop()
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := 0; ; {
		for ; i < len(p.lines); i++ {
			if containsAll(p.lines[i], parts) {
				return p.lines[i]
			}
		}
		if p.ended || timedOut {
			p.t.Fatalf("the process logged no line with %q (exited: %v)", parts, p.ended)
		}
		p.cond.Wait()
	}
}

var listeningURL = regexp.MustCompile(`url=(ws://\S+/v1)`)

// url waits for the server to listen and returns its WebSocket URL.
func (p *proc) url() string {
	p.t.Helper()
	return listeningURL.FindStringSubmatch(p.waitLine("websocket listening"))[1]
}

// signal sends sig to the process.
func (p *proc) signal(sig syscall.Signal) {
	p.t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.t.Fatal(err)
	}
}

// wait waits for the process to exit and returns how it did.
func (p *proc) wait() error {
	p.t.Helper()
	select {
	case <-p.exited:
		return p.waitErr
	case <-time.After(testTimeout):
		p.t.Fatal("the process did not exit")
		return nil
	}
}

// log returns everything the process has logged.
func (p *proc) log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.lines, "\n")
}

// serverArgs is the command line of a server on a free loopback port.
func serverArgs(bin, journal string, more ...string) []string {
	return append([]string{bin, "--port", "tcp:0:interface=127.0.0.1", "--channel-db", journal}, more...)
}

// crashBodySize is the size of the messages the crash test adds: big
// enough that the journal passes compactMinBytes within a few restarts,
// so kills also land during and right after compactions.
const crashBodySize = 8 << 10

// crashMailbox is what one client of the crash test knows of a mailbox.
type crashMailbox struct {
	id   string
	sent map[string]bool // ids of the messages added
	seen map[string]bool // ids of the messages the client has been sent
}

// crashClient is one client of the crash test. Each time the server
// comes back, it checks every mailbox it keeps, closes the ones checked,
// and adds messages to a new mailbox until the server is killed.
type crashClient struct {
	side     string
	round    int
	keep     []*crashMailbox // mailboxes to check at every restart
	closing  []string        // mailboxes whose close was sent but not answered
	verified int             // checks passed
	echoed   int             // messages seen echoed
}

// violation is a broken promise: a lost or duplicated message.
type violation struct{ error }

// connect opens a connection and binds it.
func (cc *crashClient) connect(url string) (*wsClient, error) {
	c, err := dialWS(url)
	if err != nil {
		return nil, err
	}
	if err := c.send(`{"type": "bind", "appid": "crash", "side": %q}`, cc.side); err != nil {
		c.close()
		return nil, err
	}
	return c, nil
}

// run is one life of the server, from the client's side. It returns a
// violation if the server broke its promise, any other error when the
// connection fails (the server was killed), and nil when last is set and
// everything was checked.
func (cc *crashClient) run(url string, echoes chan<- struct{}, last bool) error {
	for len(cc.closing) > 0 {
		c, err := cc.connect(url)
		if err != nil {
			return err
		}
		_, err = c.do("closed", `{"type": "close", "mailbox": %q, "mood": "happy"}`, cc.closing[0])
		c.close()
		if err != nil {
			return err
		}
		cc.closing = cc.closing[1:]
	}
	for len(cc.keep) > 0 {
		mb := cc.keep[0]
		c, err := cc.connect(url)
		if err != nil {
			return err
		}
		err = cc.check(c, mb)
		if err == nil && !last {
			cc.keep, cc.closing = cc.keep[1:], append(cc.closing, mb.id)
			_, err = c.do("closed", `{"type": "close", "mood": "happy"}`)
			if err == nil {
				cc.closing = cc.closing[:len(cc.closing)-1]
			}
		}
		c.close()
		if err != nil {
			return err
		}
		if last {
			cc.keep = cc.keep[1:]
		}
	}
	if last {
		return nil
	}

	cc.round++
	mb := &crashMailbox{id: fmt.Sprintf("%s-%d", cc.side, cc.round), sent: map[string]bool{}, seen: map[string]bool{}}
	cc.keep = append(cc.keep, mb)
	c, err := cc.connect(url)
	if err != nil {
		return err
	}
	defer c.close()
	if err := c.send(`{"type": "open", "mailbox": %q}`, mb.id); err != nil {
		return err
	}
	for n := 0; ; n++ {
		id := fmt.Sprintf("%s-%d", mb.id, n)
		mb.sent[id] = true
		if err := c.send(`{"type": "add", "phase": "%d", "body": %q, "id": %q}`, n, hexBody(id, crashBodySize), id); err != nil {
			return err
		}
		for !mb.seen[id] {
			m, err := c.waitFor("message")
			if err != nil {
				return err
			}
			mb.seen[m.str("id")] = true
		}
		cc.echoed++
		select {
		case echoes <- struct{}{}:
		default:
		}
	}
}

// check opens mb on c and checks what the server replays: every message
// the client has been sent, each once, as it was added, and nothing the
// client did not add. What is replayed counts as seen from then on.
func (cc *crashClient) check(c *wsClient, mb *crashMailbox) error {
	if err := c.send(`{"type": "open", "mailbox": %q}`, mb.id); err != nil {
		return err
	}
	if err := c.send(`{"type": "ping", "ping": "replayed"}`); err != nil {
		return err
	}
	replayed := map[string]bool{}
	for {
		m, err := c.next()
		if err != nil {
			return err
		}
		switch m.typ() {
		case "error":
			return violation{fmt.Errorf("mailbox %s: server error %q", mb.id, m.str("error"))}
		case "pong":
			for id := range mb.seen {
				if !replayed[id] {
					return violation{fmt.Errorf("mailbox %s: message %s was echoed before the kill and is gone after it", mb.id, id)}
				}
			}
			for id := range replayed {
				mb.seen[id] = true
			}
			cc.verified++
			return nil
		case "message":
			id := m.str("id")
			switch {
			case replayed[id]:
				return violation{fmt.Errorf("mailbox %s: message %s replayed twice", mb.id, id)}
			case !mb.sent[id]:
				return violation{fmt.Errorf("mailbox %s: message %q was never added", mb.id, id)}
			case m.str("side") != cc.side || m.str("body") != hexBody(id, crashBodySize):
				return violation{fmt.Errorf("mailbox %s: message %s came back changed: side %q, body of %d bytes", mb.id, id, m.str("side"), len(m.str("body")))}
			}
			replayed[id] = true
		}
	}
}

// TestCrashLosesNothing kills the server with SIGKILL at random moments
// while clients add messages, restarts it on the same journal, and checks
// that every message any client saw echoed is replayed, exactly once.
// With --fsync=never the promise holds too: a killed process's writes are
// in the kernel's cache, and only a crash of the machine loses them.
func TestCrashLosesNothing(t *testing.T) {
	bin := buildServer(t)
	for _, tc := range []struct {
		fsync string
		kills int
	}{{"always", 20}, {"never", 6}} {
		t.Run("fsync="+tc.fsync, func(t *testing.T) {
			seed := uint64(time.Now().UnixNano())
			t.Logf("seed %d", seed)
			rng := rand.New(rand.NewPCG(seed, 0))
			journal := filepath.Join(t.TempDir(), "channel.jsonl")
			clients := make([]*crashClient, 4)
			for i := range clients {
				clients[i] = &crashClient{side: fmt.Sprintf("side%d", i)}
			}
			compactions := 0
			var lastFile os.FileInfo
			for k := 0; k <= tc.kills; k++ {
				last := k == tc.kills
				// The clients all come from one address and store far more
				// than one address may; the per-address limits are tested
				// elsewhere.
				p := startProc(t, serverArgs(bin, journal, "--fsync", tc.fsync,
					"--max-stored-bytes-per-ip=0", "--max-new-connections-per-ip=0")...)
				url := p.url()
				echoes := make(chan struct{}, 1)
				results := make(chan error, len(clients))
				for _, cc := range clients {
					go func() { results <- cc.run(url, echoes, last) }()
				}
				ended := 0
				if !last {
					// Kill after a random number of echoes (none: during
					// start-up), while the other clients are mid-way.
					for target := rng.IntN(40); target > 0; target-- {
						select {
						case <-echoes:
						case err := <-results:
							t.Fatalf("life %d: a client stopped before the kill: %v", k, err)
						case <-time.After(testTimeout):
							t.Fatalf("life %d: no client made progress", k)
						}
					}
					p.signal(syscall.SIGKILL)
					if err := p.wait(); err == nil || !strings.Contains(err.Error(), "killed") {
						t.Fatalf("life %d: the server exited by itself (%v) before it was killed", k, err)
					}
				}
				for ; ended < len(clients); ended++ {
					err := <-results
					var v violation
					if errors.As(err, &v) || (last && err != nil) {
						t.Fatalf("life %d: %v", k, err)
					}
				}
				if last {
					p.signal(syscall.SIGTERM)
					if err := p.wait(); err != nil {
						t.Fatalf("stopping the last server: %v", err)
					}
				}
				fi, err := os.Stat(journal)
				if err != nil {
					t.Fatal(err)
				}
				if lastFile != nil && !os.SameFile(lastFile, fi) {
					compactions++
				}
				lastFile = fi
			}
			echoed, verified := 0, 0
			for _, cc := range clients {
				echoed += cc.echoed
				verified += cc.verified
			}
			t.Logf("%d kills: %d messages echoed, %d mailbox replays checked, %d lives with a compaction", tc.kills, echoed, verified, compactions)
			if tc.kills >= 20 && compactions == 0 {
				t.Errorf("no compaction happened in %d lives", tc.kills)
			}
			if names := dirNames(t, filepath.Dir(journal)); len(names) != 1 {
				t.Errorf("the journal's directory holds %v, want only the journal", names)
			}
		})
	}
}

// readClose reads frames until a close frame and returns its status.
func (c *wsClient) readClose() (int, error) {
	for {
		c.raw.SetReadDeadline(time.Now().Add(testTimeout))
		fr, err := c.ws.NewFrameReader()
		if err != nil {
			return 0, err
		}
		payload, err := io.ReadAll(fr)
		if err != nil {
			return 0, err
		}
		if fr.PayloadType() == websocket.CloseFrame {
			if len(payload) < 2 {
				return 0, fmt.Errorf("close frame without a status")
			}
			return int(binary.BigEndian.Uint16(payload)), nil
		}
	}
}

// TestShutdown stops the server with SIGTERM while clients are connected:
// it must stop accepting connections, send every client a going-away
// close, exit 0, and leave a journal from which a new server has
// everything. A second server on the same journal is refused meanwhile.
func TestShutdown(t *testing.T) {
	bin := buildServer(t)
	for _, fsync := range []string{"always", "never"} {
		t.Run("fsync="+fsync, func(t *testing.T) {
			journal := filepath.Join(t.TempDir(), "channel.jsonl")
			p := startProc(t, serverArgs(bin, journal, "--fsync", fsync)...)
			url := p.url()

			second := startProc(t, serverArgs(bin, journal)...)
			if err := second.wait(); err == nil {
				t.Fatal("a second server on the same journal started")
			}
			if log := second.log(); !strings.Contains(log, "is in use by another server") {
				t.Fatalf("the second server said %q", log)
			}

			a, err := dialWS(url)
			if err != nil {
				t.Fatal(err)
			}
			a.send(`{"type": "bind", "appid": "app", "side": "a"}`)
			claimed, err := a.do("claimed", `{"type": "claim", "nameplate": "3"}`)
			if err != nil {
				t.Fatal(err)
			}
			mailbox := claimed.str("mailbox")
			a.send(`{"type": "open", "mailbox": %q}`, mailbox)
			if _, err := a.do("message", `{"type": "add", "phase": "pake", "body": "aa", "id": "1"}`); err != nil {
				t.Fatal(err)
			}
			b, err := dialWS(url)
			if err != nil {
				t.Fatal(err)
			}
			b.send(`{"type": "bind", "appid": "app", "side": "b"}`)
			b.send(`{"type": "open", "mailbox": "direct"}`)
			// Sent without waiting: the shutdown may come before or after it.
			b.send(`{"type": "add", "phase": "1", "body": "bb", "id": "2"}`)

			p.signal(syscall.SIGTERM)
			for _, c := range []*wsClient{a, b} {
				if status, err := c.readClose(); err != nil || status != closeGoingAway {
					t.Fatalf("on SIGTERM a client got close status %d (%v), want %d", status, err, closeGoingAway)
				}
				c.close() // as clients do, so the server need not wait for them
			}
			if c, err := net.Dial("tcp", strings.TrimSuffix(strings.TrimPrefix(url, "ws://"), "/v1")); err == nil {
				c.Close()
				t.Fatal("the server accepted a connection after its clients were told it is going away")
			}
			if err := p.wait(); err != nil {
				t.Fatalf("the server exited with %v, want 0", err)
			}
			p.waitLine("shutting down")

			p2 := startProc(t, serverArgs(bin, journal, "--fsync", fsync)...)
			c, err := dialWS(p2.url())
			if err != nil {
				t.Fatal(err)
			}
			c.send(`{"type": "bind", "appid": "app", "side": "c"}`)
			if got, err := c.do("claimed", `{"type": "claim", "nameplate": "3"}`); err != nil || got.str("mailbox") != mailbox {
				t.Fatalf("after the restart, nameplate 3 leads to %v (%v), want mailbox %s", got, err, mailbox)
			}
			if got, err := c.do("message", `{"type": "open", "mailbox": %q}`, mailbox); err != nil || got.str("body") != "aa" {
				t.Fatalf("after the restart, the mailbox replays %v (%v)", got, err)
			}
			c.close()
			p2.signal(syscall.SIGTERM)
			if err := p2.wait(); err != nil {
				t.Fatalf("the restarted server exited with %v", err)
			}
		})
	}
}

// unshareOrSkip skips the test unless this machine lets it make the
// namespace named by flag (--net, --mount).
func unshareOrSkip(t testing.TB, flag string) {
	t.Helper()
	if out, err := exec.Command("unshare", flag, "true").CombinedOutput(); err != nil {
		t.Skipf("unshare %s is not permitted here: %v %s", flag, err, bytes.TrimSpace(out))
	}
}

// fullDisk is a server whose journal is on a small file system of its
// own (a tmpfs in a private mount namespace), with a filler file taking
// space that the test can free.
type fullDisk struct {
	*proc
	disk    string // the mount point, as the server sees it
	metrics string // base URL of the metrics listener
}

// startOnSmallDisk mounts a tmpfs of size bytes at a new directory, runs
// setup (a shell script given the mount point as $1 and extra as $2), and
// starts the server on it with the journal channel.jsonl there.
func startOnSmallDisk(t *testing.T, size int, setup, extra string) *fullDisk {
	t.Helper()
	disk := filepath.Join(t.TempDir(), "disk")
	os.Mkdir(disk, 0o700)
	if out, err := exec.Command("unshare", "--mount", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", disk).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs in a private mount namespace here: %v %s", err, bytes.TrimSpace(out))
	}
	bin := buildServer(t)
	script := fmt.Sprintf(`mount -t tmpfs -o size=%d tmpfs "$1" || exit 97
%s
shift 2
exec "$@"`, size, setup)
	p := startProc(t, append([]string{"unshare", "--mount", "sh", "-c", script, "sh", disk, extra},
		serverArgs(bin, disk+"/channel.jsonl", "--metrics-listen", "127.0.0.1:0")...)...)
	metrics := regexp.MustCompile(`url=(http://\S+)/debug/vars`).FindStringSubmatch(p.waitLine("metrics listening"))[1]
	return &fullDisk{proc: p, disk: disk, metrics: metrics}
}

// inside is the path of a file on the server's disk, as the test sees it.
func (d *fullDisk) inside(name string) string {
	return fmt.Sprintf("/proc/%d/root%s/%s", d.cmd.Process.Pid, d.disk, name)
}

// health returns the status and text of /healthz.
func (d *fullDisk) health() (int, string) {
	resp, err := http.Get(d.metrics + "/healthz")
	if err != nil {
		d.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(body))
}

// waitHealth polls /healthz until it answers status, and returns its text.
func (d *fullDisk) waitHealth(status int) string {
	d.t.Helper()
	var text string
	waitUntil(d.t, fmt.Sprintf("/healthz answers %d", status), func() bool {
		var got int
		got, text = d.health()
		return got == status
	})
	return text
}

// reader passes a client's messages to a channel, for a test that waits
// on other things meanwhile.
func reader(c *wsClient) <-chan msg {
	ch := make(chan msg, 64)
	go func() {
		defer close(ch)
		c.raw.SetReadDeadline(time.Time{})
		for {
			var data []byte
			if err := websocket.Message.Receive(c.ws, &data); err != nil {
				return
			}
			var m msg
			json.Unmarshal(data, &m)
			ch <- m
		}
	}()
	return ch
}

// receive returns the next message of type typ from ch, skipping others.
func receive(t testing.TB, ch <-chan msg, typ string) msg {
	t.Helper()
	timeout := time.After(testTimeout)
	for {
		select {
		case m, ok := <-ch:
			if !ok {
				t.Fatalf("the connection ended while waiting for a %s", typ)
			}
			if m.typ() == typ {
				return m
			}
		case <-timeout:
			t.Fatalf("no %s within %v", typ, testTimeout)
		}
	}
}

// TestDiskFull runs the server until its journal's disk is full: the
// client must not see the echo of the message that could not be written;
// the server stays up, refuses changes with a clear error and reports
// itself unhealthy, naming the journal; once space is freed it resumes by
// itself, the waiting echo arrives, and the journal holds every message
// echoed.
func TestDiskFull(t *testing.T) {
	d := startOnSmallDisk(t, 1<<20, `head -c 655360 /dev/zero > "$1/filler"`, "")
	a, err := dialWS(d.url())
	if err != nil {
		t.Fatal(err)
	}
	a.send(`{"type": "bind", "appid": "app", "side": "a"}`)
	a.send(`{"type": "open", "mailbox": "m"}`)
	fromA := reader(a)
	var echoed []string
	var waiting string // the message whose echo waits for the disk
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for n := 0; waiting == ""; n++ {
		if n > 30 {
			t.Fatalf("%d messages of 30 kB fitted in 384 kB", n)
		}
		id := strconv.Itoa(n)
		a.send(`{"type": "add", "phase": "%d", "body": %q, "id": %q}`, n, hexBody(id, 30_000), id)
		deadline := time.After(testTimeout)
	answer:
		for {
			select {
			case m, ok := <-fromA:
				switch {
				case !ok:
					t.Fatal("the server ended the connection")
				case m.typ() == "message" && m.str("id") == id:
					echoed = append(echoed, id)
					break answer
				case m.typ() == "message" || m.typ() == "error":
					t.Fatalf("message %s answered with %v", id, m)
				}
			case <-tick.C: // no echo yet: is the disk full?
				if status, _ := d.health(); status != http.StatusOK {
					waiting = id
					break answer
				}
			case <-deadline:
				t.Fatal("no echo, and the server stayed healthy")
			}
		}
	}
	text := d.waitHealth(http.StatusServiceUnavailable)
	if !strings.Contains(text, "journal "+d.disk+"/channel.jsonl: write: no space left on device") {
		t.Errorf("/healthz says %q, want the journal's path and the cause", text)
	}
	d.waitLine("ERROR", "journal unwritable", d.disk+"/channel.jsonl")

	b, err := dialWS(d.url())
	if err != nil {
		t.Fatal(err)
	}
	b.send(`{"type": "bind", "appid": "app", "side": "b"}`)
	if m, err := b.do("error", `{"type": "open", "mailbox": "other"}`); err != nil || m.str("error") != string(errCannotSave) {
		t.Fatalf("a change while the disk is full: %v %v, want the error %q", m, err, errCannotSave)
	}

	if err := os.Remove(d.inside("filler")); err != nil {
		t.Fatal(err)
	}
	if m := receive(t, fromA, "message"); m.str("id") != waiting {
		t.Fatalf("after space came back, the client got %v, want the echo of %s", m, waiting)
	}
	echoed = append(echoed, waiting)
	d.waitHealth(http.StatusOK)
	d.waitLine("journal writable again")
	if _, err := b.do("message", `{"type": "open", "mailbox": "m"}`); err != nil {
		t.Fatalf("opening after space came back: %v", err)
	}

	saved := filepath.Join(t.TempDir(), "saved.jsonl")
	data, err := os.ReadFile(d.inside("channel.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(saved, data, 0o600)
	// b never reads the 390 kB of messages its open was sent, so the
	// server's going-away close would wait behind them for the whole
	// shutdown timeout; the clients leave first.
	a.raw.Close()
	b.raw.Close()
	d.signal(syscall.SIGTERM)
	if err := d.wait(); err != nil {
		t.Fatalf("the server exited with %v", err)
	}
	st := replayed(t, saved)
	var replayedIDs []string
	for _, m := range st.Apps["app"].Mailboxes["m"].Messages {
		replayedIDs = append(replayedIDs, string(m.ID))
	}
	for i, id := range echoed {
		if i >= len(replayedIDs) || replayedIDs[i] != strconv.Quote(id) {
			t.Fatalf("echoed %v, replayed %v", echoed, replayedIDs)
		}
	}
	t.Logf("%d messages echoed before the disk was full", len(echoed)-1)
}

// netns is a private network namespace holding only a loopback
// interface, kept alive by a process that waits on its standard input.
type netns struct{ pid int }

func newNetns(t testing.TB) *netns {
	t.Helper()
	unshareOrSkip(t, "--net")
	holder := exec.Command("unshare", "--net", "sh", "-c", "ip link set lo up && echo ready && exec cat")
	stdin, _ := holder.StdinPipe()
	stdout, _ := holder.StdoutPipe()
	holder.Stderr = os.Stderr
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		holder.Wait()
	})
	if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("setting up the network namespace: %q %v", line, err)
	}
	return &netns{pid: holder.Process.Pid}
}

// command returns argv run inside the namespace.
func (n *netns) command(argv ...string) []string {
	return append([]string{"nsenter", fmt.Sprintf("--net=/proc/%d/ns/net", n.pid), "--"}, argv...)
}

// commandContext returns a command that runs argv inside the namespace.
func (n *netns) commandContext(ctx context.Context, argv ...string) *exec.Cmd {
	argv = n.command(argv...)
	return exec.CommandContext(ctx, argv[0], argv[1:]...)
}

// TestPythonClientAcrossRestart has the Python client send a text and
// wait for its receiver; the server is killed and restarted on the same
// port and journal; the sender reconnects by itself, the receiver then
// runs, and the transfer completes. The clients and the server run in a
// private network namespace, so the clients find no other addresses.
func TestPythonClientAcrossRestart(t *testing.T) {
	wormhole, err := exec.LookPath("wormhole")
	if err != nil {
		t.Skip("the Python client (wormhole) is not installed")
	}
	ns := newNetns(t)
	bin := buildServer(t)
	journal := filepath.Join(t.TempDir(), "channel.jsonl")
	args := ns.command(bin, "--port", "tcp:4000:interface=127.0.0.1", "--channel-db", journal, "--log-messages")
	const code, text = "7-guitarist-revenge", "sent across a server restart"
	ctx, cancel := context.WithTimeout(context.Background(), 4*testTimeout)
	defer cancel()

	p := startProc(t, args...)
	url := p.url()
	var sent bytes.Buffer
	sender := ns.commandContext(ctx, wormhole, "--relay-url", url, "send", "--text", text, "--code", code)
	sender.Stdout, sender.Stderr = &sent, &sent
	if err := sender.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		sender.Process.Kill() // if the test failed before the sender finished
		sender.Wait()
	}()

	// Once the sender's PAKE message is echoed it is in the journal, and
	// the sender waits for its receiver.
	p.waitLine("msg=send", `\"phase\": \"pake\"`)
	p.signal(syscall.SIGKILL)
	p.wait()

	p2 := startProc(t, args...)
	p2.url()
	received, err := ns.commandContext(ctx, wormhole, "--relay-url", url, "receive", "--only-text", code).CombinedOutput()
	if err != nil || !strings.Contains(string(received), text) {
		t.Fatalf("receiver: %v\n%s\nsender:\n%s", err, received, sent.String())
	}
	if err := sender.Wait(); err != nil || !strings.Contains(sent.String(), "text message sent") {
		t.Fatalf("sender: %v\n%s", err, sent.String())
	}
	if n := strings.Count(p2.log(), `\"type\": \"bind\"`); n < 2 {
		t.Errorf("%d clients bound to the restarted server, want the sender back and the receiver", n)
	}
}

// TestStartOnFullDisk starts the server on a journal whose disk is full:
// replay needs no space, so it starts; the first change waits for room,
// the server says it is unhealthy, and once space is freed the change is
// made and answered.
func TestStartOnFullDisk(t *testing.T) {
	now := float64(time.Now().Unix())
	text := journalText(
		withChecksum(fmt.Sprintf(`{"kind":"mailbox","app":"app","mailbox":"m","updated":%v,"sides":[{"side":"a","added":%v,"opened":true}]}`, now, now)),
		withChecksum(fmt.Sprintf(`{"kind":"message","app":"app","mailbox":"m","side":"a","phase":"pake","body":"aabb","server_rx":%v,"id":"kept"}`, now)))
	// A last line that changes nothing fills the file to a whole page, so
	// that the next line needs a new one, which the full disk cannot give.
	padLine := func(name string) string {
		return withChecksum(`{"kind":"nameplate","app":"pad","name":"` + name + `","mailbox":"","deleted":true}`)
	}
	pad := padLine(strings.Repeat("x", 8192-len(text)-len(padLine(""))-1))
	text += pad + "\n"
	if len(text) != 8192 {
		t.Fatalf("journal of %d bytes", len(text))
	}
	journal := filepath.Join(t.TempDir(), "journal.jsonl")
	os.WriteFile(journal, []byte(text), 0o600)

	d := startOnSmallDisk(t, 256<<10, `cp "$2" "$1/channel.jsonl" && chmod 600 "$1/channel.jsonl" || exit 98
cat /dev/zero > "$1/filler" 2>/dev/null`, journal)
	c, err := dialWS(d.url())
	if err != nil {
		t.Fatal(err)
	}
	fromC := reader(c)
	c.send(`{"type": "bind", "appid": "app", "side": "b"}`)
	c.send(`{"type": "open", "mailbox": "m"}`)
	text = d.waitHealth(http.StatusServiceUnavailable)
	if !strings.Contains(text, d.disk+"/channel.jsonl") || !strings.Contains(text, "no space left on device") {
		t.Errorf("/healthz says %q", text)
	}
	if err := os.Remove(d.inside("filler")); err != nil {
		t.Fatal(err)
	}
	if m := receive(t, fromC, "message"); m.str("id") != "kept" {
		t.Fatalf("after space came back, the open was answered with %v", m)
	}
	d.waitHealth(http.StatusOK)
	d.signal(syscall.SIGTERM)
	if err := d.wait(); err != nil {
		t.Fatalf("the server exited with %v", err)
	}
}

// TestStartupErrorsProcess runs the binary with a journal in a directory
// that does not exist: it must exit at once with status 1, naming the
// directory (it used to spin, silent, ignoring SIGTERM).
func TestStartupErrorsProcess(t *testing.T) {
	bin := buildServer(t)
	missing := filepath.Join(t.TempDir(), "no-such-dir")
	p := startProc(t, serverArgs(bin, missing+"/channel.jsonl")...)
	err := p.wait()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Fatalf("the server exited with %v, want status 1", err)
	}
	p.waitLine("wormhole-mailbox: journal (--channel-db) "+missing+"/channel.jsonl", "the directory "+missing+" does not exist")
}
