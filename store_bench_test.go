// store_bench_test.go measures the journal: append throughput with group
// commit, replay of 100k stored messages, compaction, the file's size over
// a long run, and whole transfers over WebSocket with fsync. The numbers
// are in the README ("Measured").
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Message bodies the size of a real transfer's (hex of encrypted JSON):
// the PAKE message, the versions, and a text offer and its answer.
var (
	pakeBody    = hexBody("pake", 160)
	versionBody = hexBody("version", 300)
	offerBody   = hexBody("offer", 200)
)

// fsyncName names an fsync mode as the --fsync flag does.
func fsyncName(fsync bool) string {
	if fsync {
		return "always"
	}
	return "never"
}

// BenchmarkJournalAppend appends messages from conns goroutines at once,
// each waiting for its line to be durable before the next, as a
// connection waits before sending the echo. With fsync, group commit
// makes one fsync serve many waiting lines: fsyncs/msg falls as conns
// grows.
func BenchmarkJournalAppend(b *testing.B) {
	for _, fsync := range []bool{true, false} {
		for _, conns := range []int{1, 16, 128} {
			b.Run(fmt.Sprintf("fsync=%s/conns=%d", fsyncName(fsync), conns), func(b *testing.B) {
				m := newMetrics()
				reg := newRegistry(defaultLimits, true, nil, nil, m)
				s, err := openStore(context.Background(), filepath.Join(b.TempDir(), "channel.jsonl"), fsync, reg, slog.New(slog.DiscardHandler), m)
				if err != nil {
					b.Fatal(err)
				}
				reg.journal = s
				defer s.close()
				mb := &mailbox{app: &app{id: "bench"}, id: "mailbox"}
				var next atomic.Int64
				var wg sync.WaitGroup
				b.ResetTimer()
				start := time.Now()
				for range conns {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for next.Add(1) <= int64(b.N) {
							if err := appendDurable(reg, mb); err != nil {
								b.Error(err)
								return
							}
						}
					}()
				}
				wg.Wait()
				elapsed := time.Since(start)
				b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
				b.ReportMetric(float64(m.journalSyncs.Value())/float64(b.N), "fsyncs/msg")
				b.ReportMetric(float64(m.journalBytes.Value())/float64(b.N), "bytes/msg")
			})
		}
	}
}

// appendDurable journals a PAKE-sized message in mb, as a client's add
// does, and waits for it to be durable, as its connection waits before
// sending the echo.
func appendDurable(reg *registry, mb *mailbox) error {
	reg.mu.Lock()
	reg.journal.message(mb, message{side: "side", phase: "pake", body: pakeBody, serverRx: 1, id: jsonNull})
	lsn := reg.journal.lastLSN()
	reg.mu.Unlock()
	return reg.journal.waitDurable(lsn, nil)
}

// nullSender is a sender that keeps only the frames of the message being
// handled, for driving sessions without connections.
type nullSender struct{ frames [][]byte }

func (n *nullSender) enqueue(frame []byte, lsn uint64) { n.frames = append(n.frames, frame) }
func (n *nullSender) hold()                            { n.frames = n.frames[:0] }
func (n *nullSender) release(lsn uint64)               {}

// benchSession is one side of a transfer, driven through the protocol
// code as a connection would drive it.
type benchSession struct {
	session
	out *nullSender
}

func newBenchSession(srv *server) *benchSession {
	out := &nullSender{}
	return &benchSession{session: session{srv: srv, out: out, addr: clientAddr{ip: netip.MustParseAddr("127.0.0.1")}}, out: out}
}

// do handles one client message and returns the field key of the answer
// of type typ, if there is one.
func (s *benchSession) do(tb testing.TB, text, typ, key string) string {
	if err := s.handle([]byte(text)); err != nil {
		tb.Fatal(err)
	}
	for _, f := range s.out.frames {
		if bytes.Contains(f, []byte(`"type": "error"`)) {
			tb.Fatalf("%s: %s", text, f)
		}
		if typ == "" {
			continue
		}
		var m msg
		json.Unmarshal(f, &m)
		if m.typ() == typ {
			return m.str(key)
		}
	}
	return ""
}

// sessionTransfer runs the journal side of one text transfer on nameplate name:
// both sides claim, open, exchange PAKE, versions, an offer and its
// answer, release and close. If wait is set, the receiver never comes and
// the sender is left waiting after its PAKE message.
func sessionTransfer(tb testing.TB, srv *server, name int, wait bool) {
	a := newBenchSession(srv)
	a.do(tb, fmt.Sprintf(`{"type": "bind", "appid": "bench", "side": "a%d"}`, name), "", "")
	mb := a.do(tb, fmt.Sprintf(`{"type": "claim", "nameplate": "%d"}`, name), "claimed", "mailbox")
	a.do(tb, fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb), "", "")
	a.do(tb, fmt.Sprintf(`{"type": "add", "phase": "pake", "body": %q}`, pakeBody), "", "")
	if wait {
		a.disconnected()
		return
	}
	b := newBenchSession(srv)
	b.do(tb, fmt.Sprintf(`{"type": "bind", "appid": "bench", "side": "b%d"}`, name), "", "")
	b.do(tb, fmt.Sprintf(`{"type": "claim", "nameplate": "%d"}`, name), "claimed", "")
	b.do(tb, fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb), "", "")
	b.do(tb, fmt.Sprintf(`{"type": "add", "phase": "pake", "body": %q}`, pakeBody), "", "")
	b.do(tb, fmt.Sprintf(`{"type": "add", "phase": "version", "body": %q}`, versionBody), "", "")
	a.do(tb, fmt.Sprintf(`{"type": "add", "phase": "version", "body": %q}`, versionBody), "", "")
	a.do(tb, fmt.Sprintf(`{"type": "add", "phase": "0", "body": %q}`, offerBody), "", "")
	b.do(tb, fmt.Sprintf(`{"type": "add", "phase": "0", "body": %q}`, offerBody), "", "")
	for _, s := range []*benchSession{a, b} {
		s.do(tb, `{"type": "release"}`, "released", "")
		s.do(tb, `{"type": "close", "mood": "happy"}`, "closed", "")
		s.disconnected()
	}
}

// benchServer is a server with a journal and no listener.
func benchServer(tb testing.TB, path string, fsync bool) *server {
	cfg := testConfig()
	cfg.channelDB, cfg.fsync = path, fsync
	// Room for the replay benchmarks' channels in one app (which may hold
	// a share of the whole only).
	cfg.limits.MaxNameplates = max(cfg.limits.MaxNameplates, 4*replayChannels)
	cfg.limits.MaxMailboxes = max(cfg.limits.MaxMailboxes, 4*replayChannels)
	srv, err := newServer(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		tb.Fatal(err)
	}
	return srv
}

// replayChannels is how many channels the replay and compaction
// benchmarks store: each holds four messages (PAKE and versions from both
// sides, the receiver still to close), 100k messages in all.
const replayChannels = 25_000

// writeReplayJournal writes, through the protocol code, a journal of
// replayChannels channels with four messages each, as a server that
// stopped with all of them in use would leave it.
func writeReplayJournal(tb testing.TB, path string) {
	srv := benchServer(tb, path, false)
	for n := range replayChannels {
		a, b := newBenchSession(srv), newBenchSession(srv)
		a.do(tb, fmt.Sprintf(`{"type": "bind", "appid": "bench", "side": "a%d"}`, n), "", "")
		b.do(tb, fmt.Sprintf(`{"type": "bind", "appid": "bench", "side": "b%d"}`, n), "", "")
		mb := a.do(tb, fmt.Sprintf(`{"type": "claim", "nameplate": "%d"}`, n+1), "claimed", "mailbox")
		b.do(tb, fmt.Sprintf(`{"type": "claim", "nameplate": "%d"}`, n+1), "claimed", "")
		for _, s := range []*benchSession{a, b} {
			s.do(tb, fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb), "", "")
			s.do(tb, fmt.Sprintf(`{"type": "add", "phase": "pake", "body": %q}`, pakeBody), "", "")
			s.do(tb, fmt.Sprintf(`{"type": "add", "phase": "version", "body": %q}`, versionBody), "", "")
			s.disconnected()
		}
	}
	if err := srv.close(); err != nil {
		tb.Fatal(err)
	}
}

// cpuTime is the CPU time this process has used, user and system: on a
// shared machine, a steadier measure of work than the time elapsed.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkReplay replays a journal holding 100k messages (25k channels),
// as the server does before it listens: once as written by a running
// server (every state change), once compacted (the live state only). The
// goal is under one second.
func BenchmarkReplay(b *testing.B) {
	dir := b.TempDir()
	history := filepath.Join(dir, "history.jsonl")
	writeReplayJournal(b, history)
	compacted := filepath.Join(dir, "compacted.jsonl")
	data, _ := os.ReadFile(history)
	os.WriteFile(compacted, data, 0o600)
	_, s, _, err := openTestStore(b, compacted)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := s.compact(); err != nil {
		b.Fatal(err)
	}
	s.close()

	for _, file := range []struct{ name, path string }{{"history", history}, {"compacted", compacted}} {
		b.Run(file.name, func(b *testing.B) {
			fi, _ := os.Stat(file.path)
			data, _ := os.ReadFile(file.path)
			lines := 0
			for _, c := range data {
				if c == '\n' {
					lines++
				}
			}
			var messages int64
			var cpu time.Duration
			for range b.N {
				cpuStart := cpuTime()
				m := newMetrics()
				reg := newRegistry(defaultLimits, true, nil, nil, m)
				s, err := openStore(context.Background(), file.path, true, reg, slog.New(slog.DiscardHandler), m)
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				cpu += cpuTime() - cpuStart
				s.close()
				messages = 0
				for _, a := range reg.apps {
					for _, mb := range a.mailboxes {
						messages += int64(len(mb.messages))
					}
				}
				b.StartTimer()
			}
			if messages != 4*replayChannels {
				b.Fatalf("replayed %d messages, want %d", messages, 4*replayChannels)
			}
			b.ReportMetric(cpu.Seconds()/float64(b.N), "cpu-s/op")
			b.ReportMetric(float64(lines), "lines")
			b.ReportMetric(float64(fi.Size())/1e6, "MB")
			b.ReportMetric(float64(fi.Size())/1e6/(b.Elapsed().Seconds()/float64(b.N)), "MB/s")
		})
	}
}

// BenchmarkCompaction rewrites the journal of 100k live messages (25k
// channels): what is done with the registry locked (every connection's
// messages wait), the whole snapshot (encoded after), and the whole
// compaction (snapshot, write, fsync, rename, fsync of the directory),
// during which replies wait for the journal.
func BenchmarkCompaction(b *testing.B) {
	path := filepath.Join(b.TempDir(), "channel.jsonl")
	writeReplayJournal(b, path)
	reg, s, _, err := openTestStore(b, path)
	if err != nil {
		b.Fatal(err)
	}
	defer s.close()
	b.Run("locked", func(b *testing.B) {
		cpuStart := cpuTime()
		for range b.N {
			reg.liveState(s)
		}
		b.ReportMetric((cpuTime()-cpuStart).Seconds()/float64(b.N), "cpu-s/op")
	})
	b.Run("snapshot", func(b *testing.B) {
		var size int
		cpuStart := cpuTime()
		for range b.N {
			data, _, _ := reg.snapshot(s)
			size = len(data)
		}
		b.ReportMetric((cpuTime()-cpuStart).Seconds()/float64(b.N), "cpu-s/op")
		b.ReportMetric(float64(size)/1e6, "MB")
	})
	b.Run("rewrite", func(b *testing.B) {
		cpuStart := cpuTime()
		for range b.N {
			if _, err := s.compact(); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric((cpuTime()-cpuStart).Seconds()/float64(b.N), "cpu-s/op")
		b.ReportMetric(float64(s.size)/1e6, "MB")
	})
}

// BenchmarkJournalSize runs b.N text transfers through the protocol code,
// with a thousand senders waiting all along, and reports the journal's
// size: the largest seen and the last, against what was appended in all.
// Compaction keeps it bounded however long the run (run with e.g.
// -benchtime=100000x).
func BenchmarkJournalSize(b *testing.B) {
	const waiting, sampleEvery = 1000, 100
	path := filepath.Join(b.TempDir(), "channel.jsonl")
	srv := benchServer(b, path, false)
	for n := range waiting {
		sessionTransfer(b, srv, 1_000_000+n, true)
	}
	var largest int64
	b.ResetTimer()
	for i := range b.N {
		sessionTransfer(b, srv, i%waiting+1, false)
		if i%sampleEvery == 0 {
			if fi, err := os.Stat(path); err == nil {
				largest = max(largest, fi.Size())
			}
		}
	}
	b.StopTimer()
	if err := srv.close(); err != nil {
		b.Fatal(err)
	}
	fi, _ := os.Stat(path)
	b.ReportMetric(float64(largest)/1e6, "max-MB")
	b.ReportMetric(float64(fi.Size())/1e6, "final-MB")
	b.ReportMetric(float64(srv.metrics.journalBytes.Value())/1e6, "appended-MB")
	b.ReportMetric(float64(srv.metrics.compactions.Value()), "compactions")
	b.ReportMetric(float64(srv.metrics.journalBytes.Value())/float64(b.N+waiting), "bytes/transfer")
}

// BenchmarkCompactionLatency measures how long a reply waits for the
// journal (an append made durable, as a connection waits before sending)
// while the journal holding 100k stored messages is compacted, against the
// same appends without a compaction. Eight goroutines append all along;
// each op is one compaction. The goal: no wait more than 50 ms longer
// during a compaction than without.
func BenchmarkCompactionLatency(b *testing.B) {
	path := filepath.Join(b.TempDir(), "channel.jsonl")
	writeReplayJournal(b, path)
	srv := benchServer(b, path, true)
	defer srv.close()
	reg, s := srv.reg, srv.reg.journal
	mb := &mailbox{app: &app{id: "bench"}, id: "latency"}
	const appenders = 8
	// phase runs the appenders until stop is closed, and returns their waits.
	phase := func(stop <-chan struct{}) []time.Duration {
		var mu sync.Mutex
		var waits []time.Duration
		var wg sync.WaitGroup
		for range appenders {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var mine []time.Duration
				for {
					select {
					case <-stop:
						mu.Lock()
						waits = append(waits, mine...)
						mu.Unlock()
						return
					default:
					}
					start := time.Now()
					if err := appendDurable(reg, mb); err != nil {
						b.Error(err)
						return
					}
					mine = append(mine, time.Since(start))
				}
			}()
		}
		wg.Wait()
		return waits
	}
	var without, during []time.Duration
	var compacting time.Duration
	b.ResetTimer()
	for range b.N {
		stop := make(chan struct{})
		done := make(chan []time.Duration)
		go func() { done <- phase(stop) }()
		start := time.Now()
		if _, err := s.compact(); err != nil {
			b.Fatal(err)
		}
		took := time.Since(start)
		compacting += took
		close(stop)
		during = append(during, <-done...)

		stop = make(chan struct{})
		go func() { done <- phase(stop) }()
		time.Sleep(took) // the same span of appends without a compaction
		close(stop)
		without = append(without, <-done...)
	}
	b.StopTimer()
	for _, p := range []struct {
		name  string
		waits []time.Duration
	}{{"without", without}, {"during", during}} {
		slices.Sort(p.waits)
		q := func(f float64) float64 {
			if len(p.waits) == 0 {
				return 0
			}
			return float64(p.waits[int(f*float64(len(p.waits)-1))]) / 1e6
		}
		b.ReportMetric(q(0.5), p.name+"-p50-ms")
		b.ReportMetric(q(0.99), p.name+"-p99-ms")
		b.ReportMetric(q(1), p.name+"-max-ms")
	}
	b.ReportMetric(compacting.Seconds()/float64(b.N), "compaction-s")
}

// BenchmarkFsync measures this disk's sync of one journal-sized line per
// op, as the writer syncs a batch of one (see lineSyncs): appended and
// synced with fsync, appended and synced with fdatasync, and written over
// zeros and synced with fdatasync, as the journal does. The figures stand
// beside the journal's in the README.
func BenchmarkFsync(b *testing.B) {
	for _, mode := range []struct {
		name                 string
		overZeros, fdatasync bool
	}{{"append+fsync", false, false}, {"append+fdatasync", false, true}, {"over-zeros+fdatasync", true, true}} {
		b.Run(mode.name, func(b *testing.B) {
			waits := lineSyncs(b, b.N, mode.overZeros, mode.fdatasync)
			b.StopTimer()
			b.ReportMetric(float64(waits[len(waits)/2])/1e6, "p50-ms")
			b.ReportMetric(float64(waits[len(waits)*99/100])/1e6, "p99-ms")
		})
	}
}

// lineSyncs writes n journal-sized lines to a new file, one at a time,
// syncs each with fsync, or with datasync if fdatasync, and returns how
// long each took, sorted; the benchmark's timer starts after the file is
// set up. With overZeros the lines are written over zeros already on the
// disk, as the journal's are (see journalReserveBytes); otherwise each is
// appended, so the file's size changes with each.
func lineSyncs(b *testing.B, n int, overZeros, fdatasync bool) []time.Duration {
	line := append(bytes.Repeat([]byte("x"), 299), '\n')
	f, err := os.Create(filepath.Join(b.TempDir(), "fsync"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if overZeros {
		if _, err := f.Write(make([]byte, n*len(line))); err != nil {
			b.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			b.Fatal(err)
		}
	}
	sync := f.Sync
	if fdatasync {
		sync = func() error { return datasync(f) }
	}
	waits := make([]time.Duration, n)
	b.ResetTimer()
	for i := range waits {
		start := time.Now()
		if _, err := f.WriteAt(line, int64(i*len(line))); err != nil { // after the last line: over zeros, or at the end
			b.Fatal(err)
		}
		if err := sync(); err != nil {
			b.Fatal(err)
		}
		waits[i] = time.Since(start)
	}
	slices.Sort(waits)
	return waits
}
