// bench_test.go holds the in-process benchmarks: whole transfers through
// a real listener (with the journal durable, as in production; with each
// sync replaced by a wait as long as an idle disk's; and without), and
// the protocol's handling of one transfer's messages without any
// network. Side-by-side figures against the reference server come from
// the load command and scripts/compare-reference.
package main

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// benchPairs is how many transfers run at once in most of
// BenchmarkTransfer, as in the performance targets.
const benchPairs = 10

// BenchmarkTransfer runs whole transfers, with the journal's syncs timed:
// how long one takes under the load is what each step of a transfer
// waits for. The idle-sync case replaces each sync with a wait as long as
// one takes on this disk when nothing else runs (see idleSyncTime): the
// server's own cost of durability, without what the kernel's block path
// costs under load. CPU per transfer is the process's: the server's and
// the load driver's.
func BenchmarkTransfer(b *testing.B) {
	idle := idleSyncTime(b) // before any server runs
	for _, mode := range []struct {
		name      string
		channelDB string
		fsync     bool
		pairs     int
		idleSync  bool
	}{
		{"fsync/pairs=1", "channel.jsonl", true, 1, false},
		{"fsync/pairs=10", "channel.jsonl", true, benchPairs, false},
		{"fsync/pairs=64", "channel.jsonl", true, 64, false},
		{"idle-sync/pairs=10", "channel.jsonl", true, benchPairs, true},
		{"nofsync/pairs=10", "channel.jsonl", false, benchPairs, false},
		{"memory/pairs=10", ":memory:", false, benchPairs, false},
	} {
		b.Run(mode.name, func(b *testing.B) {
			cfg := testConfig()
			cfg.fsync = mode.fsync
			cfg.channelDB = mode.channelDB
			if mode.channelDB != ":memory:" {
				cfg.channelDB = filepath.Join(b.TempDir(), mode.channelDB)
			}
			syncFile := datasync
			if mode.idleSync {
				syncFile = func(*os.File) error { time.Sleep(idle); return nil }
			}
			ts := startServer(b, cfg)
			var synced atomic.Int64 // nanoseconds spent in syncs
			if j := ts.reg.journal; j != nil {
				j.mu.Lock()
				j.syncFile = func(f *os.File) error {
					start := time.Now()
					defer func() { synced.Add(int64(time.Since(start))) }()
					return syncFile(f)
				}
				j.mu.Unlock()
			}
			d := &loadDialer{url: ts.url, sources: 8}
			var (
				next      atomic.Int64
				mu        sync.Mutex
				latencies []time.Duration
				wg        sync.WaitGroup
			)
			b.ResetTimer()
			start, cpu := time.Now(), procCPU(os.Getpid())
			for range mode.pairs {
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
			b.ReportMetric((procCPU(os.Getpid())-cpu).Seconds()*1000/float64(b.N), "cpu-ms/transfer")
			b.ReportMetric(percentile(latencies, 0.50).Seconds()*1000, "relay-p50-ms")
			b.ReportMetric(percentile(latencies, 0.99).Seconds()*1000, "relay-p99-ms")
			ts.reg.journal.waitDurable(ts.reg.journal.lastLSN(), nil)
			syncs := ts.metrics.journalSyncs.Value()
			b.ReportMetric(float64(syncs)/float64(b.N), "fsyncs/transfer")
			if syncs > 0 {
				b.ReportMetric(float64(synced.Load())/float64(syncs)/1e6, "sync-mean-ms")
			}
			if mode.idleSync {
				b.ReportMetric(idle.Seconds()*1000, "idle-sync-ms")
			}
		})
	}
}

// idleSyncTime is how long this disk takes to make one journal line
// durable when nothing else runs: the median of idleSyncLines, each
// written over zeros and synced with datasync, as the journal does.
// idleSyncLines is enough for a steady median in a fraction of a second.
func idleSyncTime(b *testing.B) time.Duration {
	const idleSyncLines = 200
	waits := lineSyncs(b, idleSyncLines, true, true)
	return waits[len(waits)/2]
}

// BenchmarkHandleTransfer measures the server's protocol work for one
// transfer's messages (both sides), without any network or journal.
func BenchmarkHandleTransfer(b *testing.B) {
	cfg := testConfig()
	srv, err := newServer(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		b.Fatal(err)
	}
	defer srv.close()
	b.ReportAllocs()
	for i := range b.N {
		sessionTransfer(b, srv, i%900+100, false)
	}
}
