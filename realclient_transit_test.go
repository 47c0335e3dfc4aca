// realclient_transit_test.go checks the transit relay with the real
// Python client: a 5 MB file and a directory sent between two clients
// that both refuse direct connections (--no-listen), so that every byte
// crosses the in-process relay, given to them as --transit-helper. As the
// other real-client tests (realclient_test.go), each subtest runs in a
// private network namespace with only lo, and skips when the client is
// not installed or no namespace can be made, unless realClientsRequired
// is set.
package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

func TestRealClientTransit(t *testing.T) {
	inNetns := os.Getenv(realClientNetns) != ""
	if !inNetns {
		skip := t.Skipf
		if os.Getenv(realClientsRequired) != "" {
			skip = t.Fatalf
		}
		if _, err := exec.LookPath(pythonClient.command); err != nil {
			skip("%s is not installed (Debian package magic-wormhole)", pythonClient.command)
		}
		if out, err := exec.Command("unshare", "--net", "true").CombinedOutput(); err != nil {
			skip("cannot make a network namespace (it needs root): %v %s", err, out)
		}
		if _, err := exec.LookPath("ip"); err != nil {
			t.Fatal("ip is needed to bring up lo in the namespace (Debian package iproute2)")
		}
	}
	for _, name := range []string{"file", "directory"} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			if !inNetns {
				runInNetns(t)
				return
			}
			src := t.TempDir()
			what := filepath.Join(src, "payload")
			if name == "file" {
				writeRandomFile(t, what, 5_000_000)
			} else {
				for i, size := range []int{1_500_000, 700_000, 0, 2_000_000} {
					writeRandomFile(t, filepath.Join(what, fmt.Sprintf("sub%d", i%2), fmt.Sprintf("f%d.bin", i)), size)
				}
			}
			transitSend(t, what)
		})
	}
}

// writeRandomFile writes size random bytes at path, making its directory.
func writeRandomFile(t *testing.T, path string, size int) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	data := make([]byte, size)
	rand.Read(data)
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// transitSend sends what (a file or a directory) from one Python client
// to another through a fresh server with the relay on, and checks that
// it arrived intact and crossed the relay.
func transitSend(t *testing.T, what string) {
	cfg := testConfig()
	cfg.transit = defaultTransitConfig()
	cfg.transit.port = "tcp:0:interface=127.0.0.1"
	cfg.transit.shutdownGrace = 0
	ts := startServer(t, cfg)
	if err := ts.transit.start(listen); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ts.transit.shutdown(context.Background()) })
	helper := "tcp:" + ts.transit.listeners[0].Addr().String()

	ctx, cancel := context.WithTimeout(context.Background(), transferTimeout)
	defer cancel()
	code, sent, sendOut := startSender(t, clientCommand(ctx, pythonClient.command, "--relay-url", ts.url, "--transit-helper", helper,
		"send", "--hide-progress", "--no-listen", what), "Python")
	dest := filepath.Join(t.TempDir(), "received")
	recv := clientCommand(ctx, pythonClient.command, "--relay-url", ts.url, "--transit-helper", helper,
		"receive", "--hide-progress", "--no-listen", "--accept-file", "-o", dest, code)
	out, recvErr := recv.CombinedOutput()
	sendErr := <-sent
	t.Logf("sender (%v):\n%s\nreceiver (%v):\n%s", exitText(sendErr), sendOut, exitText(recvErr), out)
	if sendErr != nil || recvErr != nil {
		t.Fatalf("transfer failed: sender %v, receiver %v", sendErr, recvErr)
	}
	want, got := treeDigests(t, what), treeDigests(t, dest)
	if len(want) == 0 || fmt.Sprint(want) != fmt.Sprint(got) {
		t.Fatalf("received %v, want %v", got, want)
	}
	var size int64
	filepath.WalkDir(what, func(_ string, d fs.DirEntry, _ error) error {
		if info, err := d.Info(); err == nil && !d.IsDir() {
			size += info.Size()
		}
		return nil
	})
	// A directory travels zipped, the random files barely smaller.
	if relayed := ts.transit.m.bytes.Value(); relayed < size*9/10 {
		t.Errorf("the relay carried %d bytes of a %d-byte transfer", relayed, size)
	}
}

// treeDigests returns the SHA-256 of every file under root (or of root,
// if a file), by path relative to root.
func treeDigests(t *testing.T, root string) map[string]string {
	t.Helper()
	sums := map[string]string{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		sums[rel] = fmt.Sprintf("%x", sha256.Sum256(data))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return sums
}
