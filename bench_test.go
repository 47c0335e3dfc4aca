// bench_test.go holds the in-process benchmarks: whole transfers through
// a real listener (with the journal durable, as in production, and
// without), and the protocol's handling of one transfer's messages
// without any network. Side-by-side figures against the reference server
// come from the load command and scripts/compare-reference.
package main

import (
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// benchPairs is how many transfers run at once in BenchmarkTransfer, as
// in the performance targets.
const benchPairs = 10

func BenchmarkTransfer(b *testing.B) {
	for _, mode := range []struct {
		name      string
		channelDB string
		fsync     bool
	}{
		{"fsync", "channel.jsonl", true},
		{"nofsync", "channel.jsonl", false},
		{"memory", ":memory:", false},
	} {
		b.Run(mode.name, func(b *testing.B) {
			cfg := testConfig()
			cfg.fsync = mode.fsync
			cfg.channelDB = mode.channelDB
			if mode.channelDB != ":memory:" {
				cfg.channelDB = filepath.Join(b.TempDir(), mode.channelDB)
			}
			ts := startServer(b, cfg)
			d := &loadDialer{url: ts.url, sources: 8}
			var (
				next      atomic.Int64
				mu        sync.Mutex
				latencies []time.Duration
				wg        sync.WaitGroup
			)
			b.ResetTimer()
			start := time.Now()
			for range benchPairs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := next.Add(1); i <= int64(b.N); i = next.Add(1) {
						lat, err := transfer(d, fmt.Sprintf("b%d", i))
						if err != nil {
							b.Error(err)
							return
						}
						mu.Lock()
						latencies = append(latencies, lat...)
						mu.Unlock()
					}
				}()
			}
			wg.Wait()
			b.StopTimer()
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "transfers/s")
			b.ReportMetric(percentile(latencies, 0.50).Seconds()*1000, "relay-p50-ms")
			b.ReportMetric(percentile(latencies, 0.99).Seconds()*1000, "relay-p99-ms")
			ts.reg.journal.waitDurable(ts.reg.journal.lastLSN())
			b.ReportMetric(float64(ts.metrics.journalSyncs.Value())/float64(b.N), "fsyncs/transfer")
		})
	}
}

// discard is a sender that drops frames, for benchmarking the protocol
// alone.
type discard struct{}

func (discard) enqueue([]byte, uint64) {}
func (discard) hold()                  {}
func (discard) release(uint64)         {}

// BenchmarkHandleTransfer measures the server's protocol work for one
// transfer's messages (both sides), without any network or journal.
func BenchmarkHandleTransfer(b *testing.B) {
	srv, err := newServer(testConfig(), testLogger(b))
	if err != nil {
		b.Fatal(err)
	}
	defer srv.close()
	body := func(n int) string { return fmt.Sprintf("%0*d", n, 0) }
	b.ReportAllocs()
	for i := range b.N {
		var sides [2]*session
		for s := range sides {
			sides[s] = &session{srv: srv, out: discard{}}
			sides[s].handle(fmt.Appendf(nil, `{"type": "bind", "appid": "bench", "side": "s%d-%d", "client_version": ["python", "0.12.0"], "id": "0001"}`, i, s))
		}
		name := fmt.Sprint(i%900 + 100)
		mailbox := ""
		for s, side := range sides {
			side.handle(fmt.Appendf(nil, `{"type": "claim", "nameplate": %q, "id": "0002"}`, name))
			if s == 0 {
				srv.reg.mu.Lock()
				mailbox = srv.reg.apps["bench"].nameplates[name].mailbox.id
				srv.reg.mu.Unlock()
			}
			side.handle(fmt.Appendf(nil, `{"type": "open", "mailbox": %q, "id": "0003"}`, mailbox))
		}
		for _, phase := range []string{"pake", "version", "0", "1", "2"} {
			for _, side := range sides {
				side.handle(fmt.Appendf(nil, `{"type": "add", "phase": %q, "body": %q, "id": "0004"}`, phase, body(200)))
			}
			if phase == "pake" {
				for _, side := range sides {
					side.handle(fmt.Appendf(nil, `{"type": "release", "nameplate": %q, "id": "0005"}`, name))
				}
			}
		}
		for _, side := range sides {
			side.handle(fmt.Appendf(nil, `{"type": "close", "mailbox": %q, "mood": "happy", "id": "0006"}`, mailbox))
		}
	}
}
