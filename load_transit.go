// load_transit.go owns the transit part of the "load" command: a
// benchmark of a transit relay (this server's, the reference's, or the
// splice floor), and the splice floor itself.
//
// With --transit ADDR the driver opens --pairs pairs of connections to the
// relay at once, each pair under its own token with two sides, and
// measures the pairing latency: from the moment the second handshake is
// written to the moment both sides have read "ok\n". Then each side of
// every pair sends --transit-bytes to the other while reading as much,
// and the driver reports the aggregate rate (all bytes delivered, both
// ways, over the wall time), and, given the relay's process id, its CPU
// time per GB delivered and its peak resident memory. The clients are as
// cheap as the kernel allows (sendfile from a file in memory, splice into
// /dev/null), so that on a small machine the relay gets the CPU.
//
// With --splice-floor ADDR the command is itself a relay with no relay
// logic at all: it reads one handshake line per connection, joins the two
// connections that name the same token, answers "ok\n", and splices them
// both ways until either ends. What the real relay does beyond that costs
// the difference between the two.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"time"
)

// transitLoadSourceBytes is the size of the in-memory file the driver's
// senders send from, over and over.
const transitLoadSourceBytes = 16 << 20

// transitLoadConfig is what the transit load flags set.
type transitLoadConfig struct {
	addr   string // --transit: the relay, tcp:HOST:PORT or HOST:PORT
	bytes  int64  // --transit-bytes: sent by each side of each pair
	floor  string // --splice-floor: serve the floor at this endpoint
	pairs  int
	pid    int
	asJSON bool
}

// transitLoadResult is what a transit benchmark measured.
type transitLoadResult struct {
	Relay          string  `json:"relay"`
	Pairs          int     `json:"pairs"`
	BytesEachWay   int64   `json:"bytes_each_way"` // per pair
	Seconds        float64 `json:"seconds"`
	MBPerSec       float64 `json:"mb_per_sec"` // delivered, both ways, all pairs; MB = 10^6 bytes
	PairingP50ms   float64 `json:"pairing_p50_ms"`
	PairingMaxms   float64 `json:"pairing_max_ms"`
	ServerCPUsPerG float64 `json:"server_cpu_s_per_gb,omitempty"`
	ServerPeakRSSk int     `json:"server_peak_rss_kb,omitempty"`
	ServerRSSkB    int     `json:"server_rss_kb,omitempty"`
}

// addTransitLoadFlags defines the transit flags of the load command.
func addTransitLoadFlags(fs *flag.FlagSet, c *transitLoadConfig) {
	fs.StringVar(&c.addr, "transit", "", "benchmark the transit relay at this `address` (tcp:HOST:PORT, as a client's hint) instead of a mailbox")
	fs.Int64Var(&c.bytes, "transit-bytes", 200e6, "with --transit, `bytes` each side of each pair sends")
	fs.StringVar(&c.floor, "splice-floor", "", "serve the splice floor (a relay with no relay logic) at this `endpoint` until interrupted")
}

// runTransitLoad runs the transit benchmark, or serves the floor.
func runTransitLoad(ctx context.Context, c transitLoadConfig, stdout, stderr io.Writer) error {
	if c.floor != "" {
		return serveSpliceFloor(ctx, c.floor, stderr)
	}
	res, err := driveTransitLoad(ctx, c)
	if err != nil {
		return fmt.Errorf("load: %w", err)
	}
	if c.asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	fmt.Fprintf(stdout, "relay           %s\n", res.Relay)
	fmt.Fprintf(stdout, "transfers       %d pairs, %d MB each way each: %.1f MB/s in all (%.1f s)\n",
		res.Pairs, res.BytesEachWay/1e6, res.MBPerSec, res.Seconds)
	fmt.Fprintf(stdout, "pairing         p50 %.2f ms, max %.2f ms\n", res.PairingP50ms, res.PairingMaxms)
	if res.ServerCPUsPerG > 0 {
		fmt.Fprintf(stdout, "server CPU      %.3f s per GB\n", res.ServerCPUsPerG)
	}
	if res.ServerPeakRSSk > 0 {
		fmt.Fprintf(stdout, "server RSS      %d kB at peak, %d kB at the end\n", res.ServerPeakRSSk, res.ServerRSSkB)
	}
	return nil
}

// transitDialAddress turns a relay hint (tcp:HOST:PORT) or HOST:PORT into
// a dial address.
func transitDialAddress(hint string) string {
	return strings.TrimPrefix(hint, "tcp:")
}

// driveTransitLoad runs the benchmark c describes.
func driveTransitLoad(ctx context.Context, c transitLoadConfig) (transitLoadResult, error) {
	res := transitLoadResult{Relay: c.addr, Pairs: c.pairs, BytesEachWay: c.bytes}
	if c.pairs < 1 || c.bytes < 0 {
		return res, errors.New("--pairs must be at least 1 and --transit-bytes not negative")
	}
	src, err := transitLoadSource()
	if err != nil {
		return res, err
	}
	defer src.Close()
	devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		return res, err
	}
	defer devNull.Close()

	addr := transitDialAddress(c.addr)
	type pair struct{ a, b *net.TCPConn }
	pairs := make([]pair, c.pairs)
	latencies := make([]time.Duration, c.pairs)
	defer func() {
		for _, p := range pairs {
			for _, conn := range []*net.TCPConn{p.a, p.b} {
				if conn != nil {
					conn.Close()
				}
			}
		}
	}()
	cpuBefore := procCPU(c.pid)
	var wg sync.WaitGroup
	errs := make(chan error, 2*c.pairs)
	for i := range pairs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a, b, lat, err := openTransitPair(ctx, addr)
			pairs[i], latencies[i] = pair{a, b}, lat
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	select {
	case err := <-errs:
		return res, err
	default:
	}
	start := time.Now()
	for _, p := range pairs {
		for _, conn := range []*net.TCPConn{p.a, p.b} {
			wg.Add(2)
			go func() {
				defer wg.Done()
				if err := sendFrom(conn, src, c.bytes); err != nil {
					errs <- fmt.Errorf("sending: %w", err)
				}
			}()
			go func() {
				defer wg.Done()
				n, err := devNull.ReadFrom(&io.LimitedReader{R: conn, N: c.bytes})
				if err == nil && n < c.bytes {
					err = fmt.Errorf("the relay delivered %d of %d bytes", n, c.bytes)
				}
				if err != nil {
					errs <- fmt.Errorf("receiving: %w", err)
				}
			}()
		}
	}
	wg.Wait()
	elapsed := time.Since(start)
	select {
	case err := <-errs:
		return res, err
	default:
	}
	total := float64(2*c.pairs) * float64(c.bytes)
	res.Seconds = elapsed.Seconds()
	res.MBPerSec = total / 1e6 / elapsed.Seconds()
	res.PairingP50ms = percentile(latencies, 0.5).Seconds() * 1000
	res.PairingMaxms = percentile(latencies, 1).Seconds() * 1000
	if c.pid > 0 && total > 0 {
		res.ServerCPUsPerG = (procCPU(c.pid) - cpuBefore).Seconds() / (total / 1e9)
		res.ServerPeakRSSk = procStatusKB(c.pid, "VmHWM:")
		res.ServerRSSkB = procStatusKB(c.pid, "VmRSS:")
	}
	return res, nil
}

// openTransitPair connects both sides of a pair under a fresh token and
// returns them once both have read "ok\n", with the pairing latency.
func openTransitPair(ctx context.Context, addr string) (a, b *net.TCPConn, lat time.Duration, err error) {
	token := rand.Text() + rand.Text() // any word characters do
	token = hex.EncodeToString([]byte(token))[:transitTokenLen]
	var d net.Dialer
	conns := make([]*net.TCPConn, 2)
	for i := range conns {
		nc, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return conns[0], conns[1], 0, err
		}
		conns[i] = nc.(*net.TCPConn)
	}
	a, b = conns[0], conns[1]
	if _, err := fmt.Fprintf(a, "please relay %s for side %016x\n", token, 1); err != nil {
		return a, b, 0, err
	}
	time.Sleep(time.Millisecond) // so that the relay sees a wait first, as with real clients
	sent := time.Now()
	if _, err := fmt.Fprintf(b, "please relay %s for side %016x\n", token, 2); err != nil {
		return a, b, 0, err
	}
	for _, conn := range conns {
		conn.SetReadDeadline(time.Now().Add(loadTimeout))
		var ok [len(transitOK)]byte
		if _, err := io.ReadFull(conn, ok[:]); err != nil || string(ok[:]) != transitOK {
			return a, b, 0, fmt.Errorf("pairing: got %q, %v", ok, err)
		}
		conn.SetReadDeadline(time.Time{})
	}
	return a, b, time.Since(sent), nil
}

// transitLoadSource makes the in-memory file senders send from.
func transitLoadSource() (*os.File, error) {
	dir := "/dev/shm"
	if _, err := os.Stat(dir); err != nil {
		dir = ""
	}
	f, err := os.CreateTemp(dir, "wormhole-mailbox-load-*")
	if err != nil {
		return nil, err
	}
	os.Remove(f.Name())
	data := make([]byte, transitLoadSourceBytes)
	rand.Read(data)
	if _, err := f.Write(data); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// sendFrom sends n bytes from src, over and over from its start, by
// sendfile(2) where the system has it.
func sendFrom(conn *net.TCPConn, src *os.File, n int64) error {
	for n > 0 {
		chunk := min(n, transitLoadSourceBytes)
		sent, err := conn.ReadFrom(io.NewSectionReader(src, 0, chunk))
		n -= sent
		if err != nil {
			return err
		}
		if sent == 0 {
			return io.ErrNoProgress
		}
	}
	return nil
}

// serveSpliceFloor is the splice floor: a relay with nothing but the
// pairing, and io.Copy between the sockets.
func serveSpliceFloor(ctx context.Context, endpoint string, stderr io.Writer) error {
	addr, err := listenAddress(endpoint)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "splice floor listening on %s\n", ln.Addr())
	go func() { <-ctx.Done(); ln.Close() }()
	var mu sync.Mutex
	waiting := make(map[string]*net.TCPConn)
	for {
		nc, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		go func() {
			c := nc.(*net.TCPConn)
			line, err := bufio.NewReaderSize(c, 128).ReadSlice('\n') // clients send nothing more before "ok"
			fields := bytes.Fields(line)
			if err != nil || len(fields) < 3 {
				c.Close()
				return
			}
			token := string(fields[2])
			mu.Lock()
			w := waiting[token]
			if w == nil {
				waiting[token] = c
				mu.Unlock()
				return
			}
			delete(waiting, token)
			mu.Unlock()
			io.WriteString(w, transitOK)
			io.WriteString(c, transitOK)
			done := make(chan struct{})
			go func() { io.Copy(w, c); w.CloseWrite(); close(done) }()
			io.Copy(c, w)
			c.CloseWrite()
			<-done
			c.Close()
			w.Close()
		}()
	}
}
