// run_test.go tests the program as an operator runs it: run, given a
// command line, on a real port. It covers --version and the Server
// header, wss with a certificate made in the test and its reload on
// SIGHUP, the log (what it shows, what it never shows), the health
// check, the real wormhole clients speaking wss, and the load command
// interrupted.
package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
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

// logRecorder collects the lines a running server logs, and lets a test
// wait for one.
type logRecorder struct {
	mu      sync.Mutex
	lines   []string
	ended   bool  // run has returned
	err     error // what it returned
	changed chan struct{}
}

// runningServer is the program started by run, as from a command line.
type runningServer struct {
	url string // the WebSocket URL it logged: ws://127.0.0.1:PORT/v1, or wss://
	log *logRecorder
}

// urlPattern finds the URL in a "... listening" log line, text or JSON.
var urlPattern = regexp.MustCompile(`(wss?|http)://[^\s"]+`)

// startRun runs the program with args, after defaults that make it listen
// on a free loopback port and keep its state in memory. The program is
// stopped, as by SIGTERM, when the test ends, and must then exit cleanly.
func startRun(t *testing.T, args ...string) *runningServer {
	t.Helper()
	rec := newLogRecorder()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	args = append([]string{"--port=tcp:0:interface=127.0.0.1", "--channel-db=:memory:"}, args...)
	go func() {
		err := run(ctx, args, io.Discard, rec)
		rec.end(err)
		done <- err
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("run returned %v", err)
			}
		case <-time.After(testTimeout):
			t.Errorf("run did not return after its context ended")
		}
		if t.Failed() {
			for _, line := range rec.snapshot() {
				t.Log("server: " + line)
			}
		}
	})
	line := rec.waitFor(t, "websocket listening")
	return &runningServer{url: urlPattern.FindString(line), log: rec}
}

// writeCertificate makes a self-signed ECDSA certificate for 127.0.0.1
// with the given serial number, writes it and its key as PEM files in
// dir (replacing them, as a renewal does), and returns a pool trusting it.
func writeCertificate(t testing.TB, dir string, serial int64) (certFile, keyFile string, roots *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(serial),
		Subject:               pkix.Name{CommonName: "wormhole-mailbox test"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true, // its own root, as `openssl req -x509` makes it
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	writePEM(t, certFile, "CERTIFICATE", der)
	writePEM(t, keyFile, "PRIVATE KEY", keyDER)
	cert, _ := x509.ParseCertificate(der)
	roots = x509.NewCertPool()
	roots.AddCert(cert)
	return certFile, keyFile, roots
}

// writePEM replaces path with a PEM file, atomically.
func writePEM(t testing.TB, path, typ string, der []byte) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// dialTLS connects a WebSocket client to a wss:// URL with this TLS
// configuration, and returns it with its welcome message read, and the
// state of the TLS connection.
func dialTLS(t testing.TB, url string, conf *tls.Config) (*testClient, tls.ConnectionState) {
	t.Helper()
	cfg, err := websocket.NewConfig(url, "http://localhost/")
	if err != nil {
		t.Fatal(err)
	}
	raw, err := tls.DialWithDialer(&net.Dialer{Timeout: testTimeout}, "tcp", cfg.Location.Host, conf)
	if err != nil {
		t.Fatalf("TLS handshake: %v", err)
	}
	t.Cleanup(func() { raw.Close() })
	raw.SetDeadline(time.Now().Add(testTimeout))
	ws, err := websocket.NewClient(cfg, raw)
	if err != nil {
		t.Fatal(err)
	}
	c := &testClient{t: t, ws: ws, raw: raw}
	if w := c.next(); w.typ() != "welcome" {
		t.Fatalf("first message is %v, want welcome", w)
	}
	return c, raw.ConnectionState()
}

// dialURL connects a WebSocket client to a ws:// URL and returns it with
// its welcome message read.
func dialURL(t testing.TB, url string) *testClient {
	t.Helper()
	c := dialRaw(t, url, nil)
	if w := c.next(); w.typ() != "welcome" {
		t.Fatalf("first message is %v, want welcome", w)
	}
	return c
}

// rendezvous has two clients meet through nameplate 4 and exchange a
// "pake" message each way, as a transfer begins.
func rendezvous(t testing.TB, a, b *testClient) {
	t.Helper()
	a.bind("app", "side-a")
	mailbox := a.expect(`{"type": "claim", "nameplate": "4", "id": "1"}`, "claimed")[0].str("mailbox")
	a.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q, "id": "2"}`, mailbox))
	a.expect(`{"type": "add", "phase": "pake", "body": "aa01", "id": "3"}`, "message")

	b.bind("app", "side-b")
	if got := b.expect(`{"type": "claim", "nameplate": "4"}`, "claimed")[0].str("mailbox"); got != mailbox {
		t.Fatalf("second claim of nameplate 4: mailbox %q, want %q", got, mailbox)
	}
	got := b.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mailbox), "message")[0]
	if got.str("side") != "side-a" || got.str("body") != "aa01" {
		t.Fatalf("second side got %v, want the first side's pake", got)
	}
	b.expect(`{"type": "add", "phase": "pake", "body": "bb02"}`, "message")
	if got := a.sync(); len(got) != 1 || got[0].str("side") != "side-b" || got[0].str("body") != "bb02" {
		t.Fatalf("first side got %v, want the second side's pake", got)
	}
}

func TestVersionFlag(t *testing.T) {
	var stdout, stderr bytes.Buffer
	err := run(context.Background(), []string{"--version"}, &stdout, &stderr)
	if !errors.Is(err, flag.ErrHelp) { // main exits 0 on it
		t.Fatalf("run --version: %v, want flag.ErrHelp", err)
	}
	if got, want := stdout.String(), "wormhole-mailbox "+version+"\n"; got != want {
		t.Errorf("--version printed %q, want %q", got, want)
	}
	if stderr.Len() > 0 {
		t.Errorf("--version wrote to stderr: %q", stderr.String())
	}
}

// TestServerHeader checks the Server header of the banner and of the
// WebSocket handshake: the reference's test only needs "Magic Wormhole"
// in it, and operators see which server and version answered.
func TestServerHeader(t *testing.T) {
	s := startRun(t)
	want := "Magic Wormhole Mailbox (Go) " + version
	base := "http" + strings.TrimSuffix(strings.TrimPrefix(s.url, "ws"), "/v1")

	resp, err := http.Get(base + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if got := resp.Header.Get("Server"); got != want {
		t.Errorf("GET /: Server %q, want %q", got, want)
	}

	req, _ := http.NewRequest("GET", base+"/v1", nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Sec-WebSocket-Version", "13")
	req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: status %d", resp.StatusCode)
	}
	if got := resp.Header.Get("Server"); got != want {
		t.Errorf("upgrade: Server %q, want %q", got, want)
	}
}

// TestTLS serves wss:// with a certificate made here, has two Go clients
// that trust it meet through the server, and checks that the TLS offered
// is modern: TLS 1.3 by preference, TLS 1.2 with AEAD cipher suites only,
// nothing older, and HTTP/1.1 only.
func TestTLS(t *testing.T) {
	certFile, keyFile, roots := writeCertificate(t, t.TempDir(), 1)
	s := startRun(t, "--tls-cert", certFile, "--tls-key", keyFile)
	if !strings.HasPrefix(s.url, "wss://127.0.0.1:") {
		t.Fatalf("server listens at %q, want wss://127.0.0.1:PORT/v1", s.url)
	}

	a, state := dialTLS(t, s.url, &tls.Config{RootCAs: roots, NextProtos: []string{"h2", "http/1.1"}})
	if state.Version != tls.VersionTLS13 {
		t.Errorf("TLS version %x, want TLS 1.3", state.Version)
	}
	if state.NegotiatedProtocol != "http/1.1" {
		t.Errorf("ALPN chose %q for a client offering h2 and http/1.1, want http/1.1", state.NegotiatedProtocol)
	}
	if state.CurveID != tls.X25519MLKEM768 {
		t.Errorf("key exchange %v, want the post-quantum hybrid X25519MLKEM768", state.CurveID)
	}
	b, _ := dialTLS(t, s.url, &tls.Config{RootCAs: roots})
	rendezvous(t, a, b)

	tls12 := func(suite uint16) *tls.Config {
		return &tls.Config{RootCAs: roots, MaxVersion: tls.VersionTLS12, CipherSuites: []uint16{suite}}
	}
	dialTLS(t, s.url, tls12(tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256))
	dialTLS(t, s.url, tls12(tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256))
	for _, tc := range []struct {
		name string
		conf *tls.Config
	}{
		{"TLS 1.1", &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS10, MaxVersion: tls.VersionTLS11}},
		{"TLS 1.2 with CBC", tls12(tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA)},
		{"h2 only", &tls.Config{RootCAs: roots, NextProtos: []string{"h2"}}},
	} {
		conn, err := tls.Dial("tcp", strings.TrimSuffix(strings.TrimPrefix(s.url, "wss://"), "/v1"), tc.conf)
		if err == nil {
			conn.Close()
			t.Errorf("%s: handshake succeeded, want it refused", tc.name)
		}
	}
	// The refusals are logged, naming the client (no --blur-usage here).
	s.log.waitFor(t, "TLS handshake failed", "127.0.0.1:", "unsupported versions")

	// A client that does not trust the certificate cannot connect.
	if conn, err := tls.Dial("tcp", strings.TrimSuffix(strings.TrimPrefix(s.url, "wss://"), "/v1"), &tls.Config{}); err == nil {
		conn.Close()
		t.Error("a client without the certificate among its roots connected")
	}
}

// servedSerial returns the serial number of the certificate the server
// presents now.
func servedSerial(t testing.TB, url string) int64 {
	t.Helper()
	addr := strings.TrimSuffix(strings.TrimPrefix(url, "wss://"), "/v1")
	conn, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true}) // only the serial is looked at
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0].SerialNumber.Int64()
}

// TestTLSReloadOnSIGHUP renews the certificate on disk and sends the
// process SIGHUP, as a certificate renewal hook does: the new certificate
// is served without a restart, to new connections, while open ones carry
// on; and a renewal that left broken files keeps the old one in service.
func TestTLSReloadOnSIGHUP(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile, _ := writeCertificate(t, dir, 1)
	s := startRun(t, "--tls-cert", certFile, "--tls-key", keyFile)
	if got := servedSerial(t, s.url); got != 1 {
		t.Fatalf("serving certificate %d, want 1", got)
	}
	_, _, roots2 := writeCertificate(t, dir, 2)
	syscall.Kill(os.Getpid(), syscall.SIGHUP) // run has caught SIGHUP since before it listened
	s.log.waitFor(t, "TLS certificate reloaded")
	if got := servedSerial(t, s.url); got != 2 {
		t.Fatalf("after SIGHUP, serving certificate %d, want 2", got)
	}
	c, _ := dialTLS(t, s.url, &tls.Config{RootCAs: roots2})
	c.bind("app", "side")

	if err := os.WriteFile(keyFile, []byte("not a key\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	syscall.Kill(os.Getpid(), syscall.SIGHUP)
	s.log.waitFor(t, "reloading TLS certificate; keeping the old one")
	if got := servedSerial(t, s.url); got != 2 {
		t.Fatalf("after a failed reload, serving certificate %d, want 2", got)
	}
	c.expect(`{"type": "list"}`, "nameplates") // the open connection is unaffected
}

// loggedExchange has a client bind, claim, open and add a message, and then
// close its connection cleanly, and waits for the server to log that.
func loggedExchange(t testing.TB, s *runningServer, c *testClient, appID, side, body string) {
	t.Helper()
	c.bind(appID, side)
	mailbox := c.expect(`{"type": "claim", "nameplate": "4", "id": "c1"}`, "claimed")[0].str("mailbox")
	c.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mailbox))
	c.expect(fmt.Sprintf(`{"type": "add", "phase": "pake", "body": %q, "id": "c2"}`, body), "message")
	c.writeFrame(true, websocket.CloseFrame, []byte{0x03, 0xe8}) // 1000, normal
	c.expectClose(closeNormal)
	c.raw.Close()
	s.log.waitFor(t, "connection closed", c.raw.LocalAddr().String())
}

// TestLogMessages checks learning mode: every frame in and out is
// logged, the welcome included, with its body cut short and every other
// field kept; as JSON, a frame is nested as an object.
func TestLogMessages(t *testing.T) {
	s := startRun(t, "--log-messages", "--log-format=json")
	c := dialURL(t, s.url)
	body := strings.Repeat("0123456789abcdef", 8)
	loggedExchange(t, s, c, "learning", "side1", body)

	type record struct {
		Msg    string          `json:"msg"`
		Client string          `json:"client"`
		Frame  json.RawMessage `json:"frame"`
	}
	frames := map[string][]string{} // by direction: the types of the frames
	var add, echo map[string]any
	for _, line := range s.log.snapshot() {
		var r record
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("log line is not JSON: %s", line)
		}
		if r.Msg != "recv" && r.Msg != "send" {
			continue
		}
		if r.Client != c.raw.LocalAddr().String() {
			t.Errorf("frame logged with client %q, want %q", r.Client, c.raw.LocalAddr())
		}
		var f map[string]any
		if err := json.Unmarshal(r.Frame, &f); err != nil {
			t.Fatalf("frame is not nested as a JSON object: %s", line)
		}
		typ, _ := f["type"].(string)
		frames[r.Msg] = append(frames[r.Msg], typ)
		switch {
		case r.Msg == "recv" && typ == "add":
			add = f
		case r.Msg == "send" && typ == "message":
			echo = f
		}
	}
	// Each message is followed by a ping, by which the test client waits
	// for the answers (testClient.sync).
	want := map[string][]string{
		"recv": {"bind", "ping", "claim", "ping", "open", "ping", "add", "ping"},
		"send": {"welcome", "ack", "ack", "pong", "ack", "claimed", "ack", "pong", "ack", "ack", "pong",
			"ack", "message", "ack", "pong"},
	}
	for _, dir := range []string{"recv", "send"} {
		if got := strings.Join(frames[dir], " "); got != strings.Join(want[dir], " ") {
			t.Errorf("frames logged as %s: %s\nwant: %s", dir, got, strings.Join(want[dir], " "))
		}
	}
	short := body[:logBodyDigits] + "…(128 hex digits)"
	for _, f := range []map[string]any{add, echo} {
		if f["body"] != short || f["phase"] != "pake" || f["id"] != "c2" {
			t.Errorf("logged %v, want phase, id and the body shortened to %q", f, short)
		}
	}
	if echo["side"] != "side1" || echo["server_rx"] == nil {
		t.Errorf("logged message %v lacks its side or server_rx", echo)
	}
}

// TestLogMessagesText checks learning mode in the default text format.
func TestLogMessagesText(t *testing.T) {
	s := startRun(t, "--log-messages")
	c := dialURL(t, s.url)
	c.bind("app", "side")
	s.log.waitFor(t, "msg=recv", `frame="{\"type\": \"bind\", \"appid\": \"app\", \"side\": \"side\"}"`)
	s.log.waitFor(t, "msg=send", `\"type\": \"welcome\"`, `\"your-address\"`)
}

// TestLogHasNoMessagesByDefault checks the default log: one line as a
// connection opens and one as it closes, with how long it lasted and why
// it ended, and nothing a client sent.
func TestLogHasNoMessagesByDefault(t *testing.T) {
	s := startRun(t)
	c := dialURL(t, s.url)
	body := "5ec12e7b0d1e5ec12e7b0d1e"
	loggedExchange(t, s, c, "secret-app", "secret-side", body)
	client := "client=" + c.raw.LocalAddr().String()
	var opened, closed int
	for _, line := range s.log.snapshot() {
		for _, private := range []string{body, "secret-app", "secret-side", "msg=recv", "msg=send"} {
			if strings.Contains(line, private) {
				t.Errorf("log line shows %q: %s", private, line)
			}
		}
		switch {
		case containsAll(line, []string{`msg="connection opened"`, client}):
			opened++
		case containsAll(line, []string{`msg="connection closed"`, client, "duration=", `reason="client closed"`}):
			closed++
		}
	}
	if opened != 1 || closed != 1 {
		t.Errorf("%d lines for the connection opening and %d for it closing, want one each", opened, closed)
	}
}

// TestBlurUsageLogsNoAddresses checks that with --blur-usage no log line
// names a client, even in learning mode (whose welcome would), when a
// connection breaks (a network error names both ends), when net/http
// reports a failed TLS handshake, or when a transit connection ends.
func TestBlurUsageLogsNoAddresses(t *testing.T) {
	certFile, keyFile, roots := writeCertificate(t, t.TempDir(), 1)
	s := startRun(t, "--blur-usage=60", "--log-messages", "--tls-cert", certFile, "--tls-key", keyFile,
		"--transit-port=tcp:0:interface=127.0.0.1")
	c, _ := dialTLS(t, s.url, &tls.Config{RootCAs: roots})
	c.bind("app", "side")
	c.raw.(*tls.Conn).NetConn().Close() // gone, without a close frame or even a TLS close
	s.log.waitFor(t, "connection closed", `reason="client disconnected"`)

	plain, err := net.Dial("tcp", strings.TrimSuffix(strings.TrimPrefix(s.url, "wss://"), "/v1"))
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	fmt.Fprint(plain, "GET / HTTP/1.1\r\nHost: x\r\n\r\n") // plain HTTP to the TLS port
	io.ReadAll(plain)
	s.log.waitFor(t, "TLS handshake failed", "client sent an HTTP request to an HTTPS server")

	line := s.log.waitFor(t, "transit relay listening")
	relay, err := net.Dial("tcp", strings.Fields(line[strings.Index(line, "endpoint=tcp:")+len("endpoint=tcp:"):])[0])
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Close()
	fmt.Fprint(relay, "please relay\n")
	s.log.waitFor(t, "transit connection ended unpaired", "client=-")

	s.log.waitFor(t, "msg=send", `\"type\": \"welcome\"`)
	for _, line := range s.log.snapshot() {
		if strings.Contains(line, "listening") { // the server's own address
			continue
		}
		if strings.Contains(line, "127.0.0.1") || strings.Contains(line, "your-address") {
			t.Errorf("log line names a client: %s", line)
		}
	}
}

func TestMaskAddrs(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"http: TLS handshake error from 192.0.2.7:51234: EOF", "http: TLS handshake error from -: EOF"},
		{"read tcp 127.0.0.1:4000->203.0.113.9:40022: read: connection reset by peer", "read tcp -->-: read: connection reset by peer"},
		{"from [2001:db8::1]:443: x", "from -: x"},
		{"from [fe80::1%eth0]:443 and [::ffff:192.0.2.1]:5", "from - and -"},
		{"tls: client offered only unsupported versions: [302 301]", "tls: client offered only unsupported versions: [302 301]"},
		{"http: Accept error: accept tcp [::]:4000: accept4: too many open files; retrying in 5ms", "http: Accept error: accept tcp -: accept4: too many open files; retrying in 5ms"},
	} {
		if got := maskAddrs(tc.in); got != tc.want {
			t.Errorf("maskAddrs(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// TestHealthcheck checks the "healthcheck" command against /healthz on
// the metrics listener, as the Docker image's health check runs it.
func TestHealthcheck(t *testing.T) {
	s := startRun(t, "--metrics-listen=127.0.0.1:0")
	metrics := urlPattern.FindString(s.log.waitFor(t, "metrics listening"))
	base := strings.TrimSuffix(metrics, "/debug/vars")

	var stdout bytes.Buffer
	if err := run(context.Background(), []string{"healthcheck", base + "/healthz"}, &stdout, io.Discard); err != nil {
		t.Fatalf("healthcheck of a healthy server: %v", err)
	}
	if stdout.String() != "ok\n" {
		t.Errorf("healthcheck printed %q, want ok", stdout.String())
	}
	err := run(context.Background(), []string{"healthcheck", base + "/nothing-here"}, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("healthcheck of a 404: %v, want an error saying 404", err)
	}
	if err := run(context.Background(), []string{"healthcheck"}, io.Discard, io.Discard); err == nil {
		t.Error("healthcheck without a URL succeeded")
	}
	// A bare HOST:PORT, as given to --metrics-listen, means its /healthz.
	stdout.Reset()
	if err := run(context.Background(), []string{"healthcheck", strings.TrimPrefix(base, "http://")}, &stdout, io.Discard); err != nil || stdout.String() != "ok\n" {
		t.Errorf("healthcheck of HOST:PORT: %v, printed %q; want ok", err, stdout.String())
	}
}

// TestCommandLineRefusals checks that a command line the server cannot
// take is refused with a message that says what is wrong, not only the
// usage.
func TestCommandLineRefusals(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"extra-arg"}, `unexpected argument "extra-arg": the server takes only flags`},
		{[]string{"--websocket-protocol-option", "autoPingInterval=60"}, "--websocket-protocol-option is not supported"},
		{[]string{"--fsync", "sometimes"}, "--fsync must be always or never"},
	} {
		var stderr bytes.Buffer
		err := run(context.Background(), tc.args, io.Discard, &stderr)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("run %q: %v, want an error saying %q", tc.args, err, tc.want)
		}
		if strings.Contains(stderr.String(), "Usage:") {
			t.Errorf("run %q printed the whole usage instead of just the error:\n%s", tc.args, stderr.String())
		}
	}
}

// netnsEnv marks a test process re-run inside a private network namespace.
const netnsEnv = "WORMHOLE_MAILBOX_TEST_NETNS"

// rerunInPrivateNetwork makes the calling test run inside a private
// network namespace with only loopback up, where the real clients may
// offer their addresses for direct connections without reaching any
// other machine. Outside one, it runs just that test again in a new
// namespace (unshare --net, as root) and returns true: the caller
// returns, and the test's outcome is the re-run's. It skips the test
// where no namespace can be made.
func rerunInPrivateNetwork(t *testing.T) bool {
	t.Helper()
	if os.Getenv(netnsEnv) != "" {
		return false
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root, to make a private network namespace")
	}
	for _, tool := range []string{"unshare", "ip"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s, to make a private network namespace", tool)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "unshare", "--net", "sh", "-c", `ip link set lo up && exec "$@"`, "sh",
		os.Args[0], "-test.run=^"+t.Name()+"$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), netnsEnv+"=1")
	out, err := cmd.CombinedOutput()
	t.Logf("re-run in a private network namespace:\n%s", out)
	if err != nil {
		t.Fatalf("in the private network namespace: %v", err)
	}
	if !bytes.Contains(out, []byte("--- PASS: "+t.Name())) {
		t.Skip("skipped in the private network namespace")
	}
	return true
}

// TestRealClientsOverWSS sends a text message with the real clients,
// magic-wormhole (Python) and wormhole-william (Go), through a server
// serving wss:// with a self-signed certificate. Both trust a custom CA
// given in SSL_CERT_FILE: Python's client verifies through OpenSSL's
// default paths (pyOpenSSL, via Twisted), which that variable overrides,
// and Go's crypto/x509 reads it on Linux.
func TestRealClientsOverWSS(t *testing.T) {
	if rerunInPrivateNetwork(t) {
		return
	}
	certFile, keyFile, _ := writeCertificate(t, t.TempDir(), 1)
	s := startRun(t, "--tls-cert", certFile, "--tls-key", keyFile)
	type client struct {
		send, receive func(url, code, text string) []string
	}
	python := client{
		send: func(url, code, text string) []string {
			return []string{"wormhole", "--relay-url", url, "send", "--code", code, "--text", text}
		},
		receive: func(url, code, _ string) []string { return []string{"wormhole", "--relay-url", url, "receive", code} },
	}
	william := client{
		send: func(url, code, text string) []string {
			return []string{"wormhole-william", "send", "--relay-url", url, "--code", code, "--text", text}
		},
		receive: func(url, code, _ string) []string {
			return []string{"wormhole-william", "receive", "--relay-url", url, code}
		},
	}
	// Without the certificate among its roots, each client refuses the
	// server; so with it, the clients below really do check it.
	t.Run("untrusted", func(t *testing.T) {
		for _, c := range []client{python, william} {
			args := c.send(s.url, "19-guitarist-revenge", "not sent")
			if _, err := exec.LookPath(args[0]); err != nil {
				t.Skipf("%s is not installed", args[0])
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
			cancel()
			if err == nil || !strings.Contains(string(out), "certificate") {
				t.Errorf("%s without the certificate: %v, %s; want a certificate error", args[0], err, out)
			}
		}
	})
	for i, tc := range []struct {
		name             string
		sender, receiver client
	}{
		{"python to python", python, python},
		{"python to william", python, william},
		{"william to python", william, python},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code := strconv.Itoa(20+i) + "-guitarist-revenge"
			text := "over wss, " + tc.name
			sendArgs := tc.sender.send(s.url, code, text)
			recvArgs := tc.receiver.receive(s.url, code, text)
			for _, prog := range []string{sendArgs[0], recvArgs[0]} {
				if _, err := exec.LookPath(prog); err != nil {
					t.Skipf("%s is not installed", prog)
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			env := append(os.Environ(), "SSL_CERT_FILE="+certFile, "HOME="+t.TempDir())
			sender := exec.CommandContext(ctx, sendArgs[0], sendArgs[1:]...)
			sender.Env = env
			var sent bytes.Buffer
			sender.Stdout, sender.Stderr = &sent, &sent
			if err := sender.Start(); err != nil {
				t.Fatal(err)
			}
			receiver := exec.CommandContext(ctx, recvArgs[0], recvArgs[1:]...)
			receiver.Env = env
			received, err := receiver.CombinedOutput()
			if err != nil {
				t.Errorf("%v: %v\n%s", recvArgs, err, received)
			}
			if err := sender.Wait(); err != nil {
				t.Errorf("%v: %v\n%s", sendArgs, err, sent.Bytes())
			}
			if !strings.Contains(string(received), text) {
				t.Errorf("receiver printed %q, want %q", received, text)
			}
		})
	}
}

// TestConnectionAfterShutdownBegan checks that a WebSocket upgrade is
// refused once shutdown has begun: shutdown waits for every connection it
// let in, and sends each a going-away close.
func TestConnectionAfterShutdownBegan(t *testing.T) {
	ts := startServer(t, testConfig())
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	ts.closeConnections(ctx)
	cfg, err := websocket.NewConfig(ts.url, "http://localhost/")
	if err != nil {
		t.Fatal(err)
	}
	if ws, err := websocket.DialConfig(cfg); err == nil {
		ws.Close()
		t.Fatal("a WebSocket upgrade succeeded after shutdown began")
	}
}

// TestLoadInterrupted checks that the load command, interrupted while it
// opens its idle clients, stops with the interruption as its error.
func TestLoadInterrupted(t *testing.T) {
	ts := startServer(t, testConfig())
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var out bytes.Buffer
	err := run(ctx, []string{"load", "--url", ts.url, "--idle", "3", "--pairs", "0", "--sources", "0"}, &out, &out)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("load interrupted: %v, want %v", err, context.Canceled)
	}
}

// TestStartLogsRestored checks that the server says at start what it
// restored from its journal.
func TestStartLogsRestored(t *testing.T) {
	cfg := testConfig()
	cfg.channelDB = filepath.Join(t.TempDir(), "relay.jsonl")
	ts := startServer(t, cfg)
	c, _ := ts.dial(t)
	c.bind("app", "a")
	mb := c.expect(`{"type": "claim", "nameplate": "7"}`, "claimed")[0].str("mailbox")
	c.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb))
	c.expect(`{"type": "add", "phase": "pake", "body": "aa"}`, "message")
	ts.stop()

	s := startRun(t, "--channel-db="+cfg.channelDB)
	line := s.log.waitFor(t, "restored channels")
	if !strings.Contains(line, "nameplates=1 mailboxes=1 messages=1 file="+cfg.channelDB) {
		t.Errorf("start-up says %q, want the one nameplate, mailbox and message and the file", line)
	}
}
