// realclient_test.go checks interoperability with the real wormhole
// clients: text transfers through this server between the Python CLI
// ("wormhole", magic-wormhole) and the Go CLI ("wormhole-william") in all
// four directions, and pairs whose codes differ, which must fail on both
// sides. The clients are the Debian packages.
//
// Where the clients run. They must see nothing but loopback: a client
// announces every address of its machine for direct transfers, and a
// misread relay flag would otherwise send it to the public server. So they
// run in a private network namespace whose only interface is lo. The
// server must be in that namespace too, or the clients could not reach
// it, and it should still be the in-process server every other test uses
// (the same handler, under -race, its registry in reach for assertions).
// Hence TestRealClients runs in two processes. In the ordinary test
// process each subtest re-executes the test binary, asking for just that
// subtest, under `unshare --net` with lo brought up and realClientNetns
// set in its environment. In that second process the subtest sees the
// variable, starts the server on 127.0.0.1 and runs the clients. Each
// subtest has its own namespace and server, so subtests run in parallel
// and never share a nameplate. (The Python client's --no-listen would
// keep only that client off other interfaces; wormhole-william has no
// such flag, and neither flag stops a client reaching a remote relay.)
//
// The test skips when the clients are not installed or a network
// namespace cannot be made (it needs root); with realClientsRequired set
// in the environment, as CI sets it, it fails instead.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const (
	// realClientNetns, set in the environment, tells the test binary that
	// it runs inside the private network namespace.
	realClientNetns = "WORMHOLE_MAILBOX_TEST_NETNS"
	// realClientsRequired, set in the environment, turns the test's skips
	// into failures, so CI cannot pass without running the clients.
	realClientsRequired = "WORMHOLE_MAILBOX_REAL_CLIENTS_REQUIRED"
	// realClientAppID is the application id both CLIs use for transfers.
	realClientAppID = "lothar.com/wormhole/text-or-file-xfer"
)

// Timeouts, so that a client that hangs fails the test instead of hanging
// it. A transfer takes about two seconds, most of it Python starting up;
// the bounds are generous because the machine may be busy.
const (
	// transferTimeout bounds one transfer, both clients included.
	transferTimeout = 90 * time.Second
	// netnsTimeout bounds a subtest in the namespace: a transfer and, for
	// a Python–Go pair, its one retry, with time left to shut down.
	netnsTimeout = 2*transferTimeout + 30*time.Second
	// clientWaitDelay bounds the wait for a killed client's output pipes.
	clientWaitDelay = 5 * time.Second
)

// realClient is one of the wormhole command-line clients.
type realClient struct {
	name    string
	command string
	send    func(relay, text string) []string // arguments to send text
	receive func(relay, code string) []string // arguments to receive with code
	// wrongCode is what the client reports when key confirmation fails,
	// that is, when the two sides did not use the same code.
	wrongCode string
}

var (
	pythonClient = realClient{
		name:    "python",
		command: "wormhole",
		send: func(relay, text string) []string {
			return []string{"--relay-url", relay, "send", "--hide-progress", "--text", text}
		},
		receive: func(relay, code string) []string {
			return []string{"--relay-url", relay, "receive", "--hide-progress", "--only-text", code}
		},
		wrongCode: "Key confirmation failed",
	}
	goClient = realClient{
		name:    "go",
		command: "wormhole-william",
		send: func(relay, text string) []string {
			return []string{"send", "--relay-url", relay, "--hide-progress", "--text", text}
		},
		receive: func(relay, code string) []string {
			return []string{"receive", "--relay-url", relay, "--hide-progress", code}
		},
		wrongCode: "decrypt message failed",
	}
)

// realClientCase is one pair of clients: the sender allocates a code, the
// receiver uses it (or, with wrongCode, another code on the same nameplate).
type realClientCase struct {
	name             string
	sender, receiver realClient
	wrongCode        bool
}

var realClientCases = []realClientCase{
	{name: "python-to-python", sender: pythonClient, receiver: pythonClient},
	{name: "python-to-go", sender: pythonClient, receiver: goClient},
	{name: "go-to-python", sender: goClient, receiver: pythonClient},
	{name: "go-to-go", sender: goClient, receiver: goClient},
	{name: "wrong-code-python-to-go", sender: pythonClient, receiver: goClient, wrongCode: true},
	{name: "wrong-code-go-to-python", sender: goClient, receiver: pythonClient, wrongCode: true},
}

func TestRealClients(t *testing.T) {
	inNetns := os.Getenv(realClientNetns) != ""
	if !inNetns {
		checkRealClientTools(t)
	}
	for _, tc := range realClientCases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if inNetns {
				tc.run(t)
			} else {
				runInNetns(t)
			}
		})
	}
}

// checkRealClientTools skips the test unless the clients are installed
// and this process may make a network namespace.
func checkRealClientTools(t *testing.T) {
	skip := t.Skipf
	if os.Getenv(realClientsRequired) != "" {
		skip = t.Fatalf
	}
	for _, command := range []string{pythonClient.command, goClient.command} {
		if _, err := exec.LookPath(command); err != nil {
			skip("%s is not installed (Debian packages magic-wormhole and wormhole-william)", command)
		}
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		skip("unshare is not installed (Debian package util-linux)")
	}
	if out, err := exec.Command("unshare", "--net", "true").CombinedOutput(); err != nil {
		skip("cannot make a network namespace (it needs root): %v %s", err, out)
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Fatal("ip is needed to bring up lo in the namespace (Debian package iproute2)")
	}
}

// runInNetns runs the calling subtest again in a new test process inside
// a private network namespace with only lo, up, in it.
func runInNetns(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	var pattern []string
	for _, part := range strings.Split(t.Name(), "/") {
		pattern = append(pattern, "^"+regexp.QuoteMeta(part)+"$")
	}
	ctx, cancel := context.WithTimeout(context.Background(), netnsTimeout+time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "unshare", "--net", "sh", "-c", `ip link set lo up && exec "$@"`, "sh",
		exe, "-test.run="+strings.Join(pattern, "/"), "-test.count=1", "-test.v", "-test.timeout="+netnsTimeout.String())
	cmd.Env = append(os.Environ(), realClientNetns+"=1")
	cmd.WaitDelay = clientWaitDelay
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.CombinedOutput()
	t.Logf("in a network namespace:\n%s", out)
	if err != nil {
		t.Fatalf("in a network namespace: %v", err)
	}
	if !bytes.Contains(out, []byte("--- PASS: "+t.Name()+" (")) {
		t.Fatalf("%s did not run in the network namespace", t.Name())
	}
}

// run runs the case's transfer against a fresh server; the caller is in
// the network namespace.
func (tc realClientCase) run(t *testing.T) {
	cfg := testConfig()
	cfg.logMessages = true // shown only when the test fails or with -v
	ts := startServer(t, cfg)
	text := fmt.Sprintf("from %s to %s: ünïcødé ✓ %s", tc.sender.name, tc.receiver.name, rand.Text())

	if tc.wrongCode {
		r := realTransfer(t, ts, tc.sender, tc.receiver, text, true)
		if r.sendErr == nil || r.recvErr == nil {
			t.Errorf("with different codes: sender error %v, receiver error %v; want both to fail", r.sendErr, r.recvErr)
		}
		if !r.wrongCodeOnBothSides() {
			t.Errorf("with different codes, want %q from the %s sender and %q from the %s receiver",
				tc.sender.wrongCode, tc.sender.name, tc.receiver.wrongCode, tc.receiver.name)
		}
		if strings.Contains(r.recvStdout+r.recvStderr, text) {
			t.Errorf("the receiver with the wrong code printed the text")
		}
		return
	}

	r := realTransfer(t, ts, tc.sender, tc.receiver, text, false)
	// The Go client's SPAKE2 sometimes derives a key that the Python
	// client's does not match (about one exchange in 250, whatever the
	// server), and both sides then report a wrong code although the codes
	// match. Only that failure, only between the two implementations, and
	// only once, is retried.
	if tc.sender.name != tc.receiver.name && r.wrongCodeOnBothSides() {
		t.Logf("both sides report a wrong code although the codes match (the clients' known SPAKE2 mismatch); retrying once")
		r = realTransfer(t, ts, tc.sender, tc.receiver, text, false)
	}
	if r.sendErr != nil || r.recvErr != nil {
		t.Fatalf("transfer failed: sender error %v, receiver error %v", r.sendErr, r.recvErr)
	}
	if got := strings.TrimSuffix(r.recvStdout, "\n"); got != text {
		t.Errorf("the %s receiver printed %q, want %q", tc.receiver.name, got, text)
	}

	// Both clients release the nameplate before the message the other
	// needs to finish, so by now the server has deleted it.
	nameplate, _, _ := strings.Cut(r.code, "-")
	ts.reg.mu.Lock()
	nameplateLeft := ts.reg.nameplateExistsLocked(realClientAppID, nameplate)
	apps := len(ts.reg.apps)
	left := registrySummaryLocked(ts.reg)
	ts.reg.mu.Unlock()
	t.Logf("registry after the transfer: %s", left)
	if nameplateLeft {
		t.Errorf("nameplate %s is still there after both sides released it", nameplate)
	}
	// The Python client closes its mailbox and waits for "closed" before
	// it exits, so between two of them nothing is left. wormhole-william
	// does not wait: its receiver's close may still be on its way, and its
	// sender often exits before even sending one, which leaves the
	// mailbox open on its side until pruning removes it.
	if tc.sender.name == pythonClient.name && tc.receiver.name == pythonClient.name && apps != 0 {
		t.Errorf("after two Python clients closed, the registry holds %s; want nothing", left)
	}
}

// transferResult is what the two clients of one transfer did.
type transferResult struct {
	sender, receiver       realClient
	code                   string // the code the sender printed
	sendErr, recvErr       error  // how each exited
	sendOut                string // the sender's stdout and stderr
	recvStdout, recvStderr string
}

// wrongCodeOnBothSides reports whether both clients failed saying the
// codes differed.
func (r transferResult) wrongCodeOnBothSides() bool {
	return r.sendErr != nil && r.recvErr != nil &&
		strings.Contains(r.sendOut, r.sender.wrongCode) &&
		strings.Contains(r.recvStdout+r.recvStderr, r.receiver.wrongCode)
}

// realTransfer sends text from one client to another through ts: the sender
// allocates a code, and once it has printed it (so the server has
// allocated and claimed its nameplate) the receiver starts with that code,
// or with wrongCode another code on the same nameplate.
func realTransfer(t *testing.T, ts *testServer, sender, receiver realClient, text string, wrongCode bool) transferResult {
	t.Helper()
	r := transferResult{sender: sender, receiver: receiver}
	ctx, cancel := context.WithTimeout(context.Background(), transferTimeout)
	defer cancel()

	var sent <-chan error
	var sendOut *codeWatcher
	r.code, sent, sendOut = startSender(t, clientCommand(ctx, sender.command, sender.send(ts.url, text)...), sender.name)

	nameplate, words, _ := strings.Cut(r.code, "-")
	ts.reg.mu.Lock()
	allocated := ts.reg.nameplateExistsLocked(realClientAppID, nameplate)
	ts.reg.mu.Unlock()
	if !allocated {
		t.Errorf("the %s sender printed code %s, but this server has no nameplate %q", sender.name, r.code, nameplate)
	}
	code := r.code
	if wrongCode {
		code = nameplate + "-not-" + words
	}

	recv := clientCommand(ctx, receiver.command, receiver.receive(ts.url, code)...)
	var stdout, stderr bytes.Buffer
	recv.Stdout, recv.Stderr = &stdout, &stderr
	r.recvErr = recv.Run()
	r.sendErr = <-sent
	r.sendOut, r.recvStdout, r.recvStderr = sendOut.String(), stdout.String(), stderr.String()
	t.Logf("%s sender (%v):\n%s", sender.name, exitText(r.sendErr), r.sendOut)
	t.Logf("%s receiver with code %s (%v):\nstdout:\n%s\nstderr:\n%s", receiver.name, code, exitText(r.recvErr), r.recvStdout, r.recvStderr)
	if ctx.Err() != nil {
		t.Fatalf("the transfer took longer than %v", transferTimeout)
	}
	return r
}

// startSender starts a sending client and returns the code it prints,
// the end of its run, and its output so far and to come.
func startSender(t *testing.T, send *exec.Cmd, name string) (code string, sent <-chan error, out *codeWatcher) {
	t.Helper()
	out = &codeWatcher{code: make(chan string, 1)}
	send.Stdout, send.Stderr = out, out
	if err := send.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- send.Wait() }()
	select {
	case code = <-out.code:
	case err := <-done: // also when its context expires, which kills it
		t.Fatalf("the %s sender exited (%v) without printing a code:\n%s", name, err, out)
	}
	return code, done, out
}

// clientCommand prepares a client to run until ctx is done, killed if
// this process dies first.
func clientCommand(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	// A UTF-8 locale lets the Python client take and print non-ASCII text;
	// unbuffered output shows its code as soon as it has one.
	cmd.Env = append(os.Environ(), "LC_ALL=C.UTF-8", "PYTHONUNBUFFERED=1")
	cmd.WaitDelay = clientWaitDelay
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return cmd
}

func exitText(err error) string {
	var exit *exec.ExitError
	switch {
	case err == nil:
		return "exit 0"
	case errors.As(err, &exit):
		return exit.String()
	default:
		return err.Error()
	}
}

// codeLine is how both clients announce the code they allocated.
var codeLine = regexp.MustCompile(`Wormhole code is: (\S+)\n`)

// codeWatcher collects a sender's output and passes on, once, the code it
// prints. It is both stdout and stderr of the sender (the Python client
// prints the code to stderr, wormhole-william to stdout).
type codeWatcher struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	found bool
	code  chan string // receives the code; buffered, one value
}

func (w *codeWatcher) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if !w.found {
		if m := codeLine.FindSubmatch(w.buf.Bytes()); m != nil {
			w.found = true
			w.code <- string(m[1])
		}
	}
	return len(p), nil
}

func (w *codeWatcher) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// registrySummaryLocked describes what the registry holds: each app's
// nameplates and mailboxes with their sides.
func registrySummaryLocked(r *registry) string {
	if len(r.apps) == 0 {
		return "nothing"
	}
	var parts []string
	for _, a := range r.apps {
		for _, np := range a.nameplates {
			var sides []string
			for _, s := range np.sides {
				sides = append(sides, fmt.Sprintf("%s claimed=%v", s.side, s.claimed))
			}
			parts = append(parts, fmt.Sprintf("%s nameplate %s [%s]", a.id, np.name, strings.Join(sides, ", ")))
		}
		for _, mb := range a.mailboxes {
			var sides []string
			for _, s := range mb.sides {
				sides = append(sides, fmt.Sprintf("%s opened=%v mood=%q", s.side, s.opened, s.mood))
			}
			parts = append(parts, fmt.Sprintf("%s mailbox %s with %d messages [%s]", a.id, mb.id, len(mb.messages), strings.Join(sides, ", ")))
		}
	}
	slices.Sort(parts)
	return strings.Join(parts, "; ")
}
