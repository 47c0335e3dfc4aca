// startup_test.go tests how the server starts, and refuses to: every file
// it cannot use is named in an error at once, and a start can be stopped
// while the journal replays.
package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
)

// TestStartupErrors runs the server with files it cannot use: each must
// end run at once with an error naming the file (and, when it is missing,
// the directory).
func TestStartupErrors(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "no-such-dir")
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	immutable := filepath.Join(dir, "immutable.jsonl")
	os.WriteFile(immutable, nil, 0o600)
	canChattr := exec.Command("chattr", "+i", immutable).Run() == nil
	t.Cleanup(func() { exec.Command("chattr", "-i", immutable).Run() })

	for _, tc := range []struct {
		name string
		args []string
		want []string
	}{
		{"journal in a missing directory", []string{"--channel-db", missing + "/c.jsonl"},
			[]string{"journal (--channel-db) " + missing + "/c.jsonl: the directory " + missing + " does not exist"}},
		{"journal is a directory", []string{"--channel-db", dir},
			[]string{"journal (--channel-db) " + dir + ": is a directory"}},
		{"journal is a pipe", []string{"--channel-db", fifo},
			[]string{"journal (--channel-db) " + fifo + " is not a regular file"}},
		{"journal cannot be written", []string{"--channel-db", immutable},
			[]string{"journal (--channel-db) " + immutable + ": operation not permitted"}},
		{"usage log in a missing directory", []string{"--channel-db", ":memory:", "--usage-db", missing + "/u.jsonl"},
			[]string{"usage log (--usage-db) " + missing + "/u.jsonl: the directory " + missing + " does not exist"}},
		{"usage log is a directory", []string{"--channel-db", ":memory:", "--usage-db", dir},
			[]string{"usage log (--usage-db) " + dir + ": is a directory"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "journal cannot be written" && !canChattr {
				t.Skip("cannot make a file immutable here")
			}
			args := append([]string{"--port", "tcp:0:interface=127.0.0.1"}, tc.args...)
			var stderr bytes.Buffer
			err := run(context.Background(), args, &stderr, &stderr)
			if err == nil {
				t.Fatal("started")
			}
			for _, want := range tc.want {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q, want it to say %q", err, want)
				}
			}
		})
	}
}

// stopAfter is a context that ends after its Err has been asked n times,
// as if SIGTERM came at that moment.
type stopAfter struct {
	context.Context
	n atomic.Int32
}

func (c *stopAfter) Err() error {
	if c.n.Add(-1) < 0 {
		return context.Canceled
	}
	return nil
}

// TestReplayStops stops a replay part way through: openStore returns at
// once with an error naming the journal and the line it stopped at, and
// leaves the file as it was, unlocked; run, stopped before it serves,
// returns cleanly.
func TestReplayStops(t *testing.T) {
	var lines []string
	lines = append(lines, withChecksum(`{"kind":"mailbox","app":"a","mailbox":"m","updated":1,"sides":[{"side":"s","added":1,"opened":true}]}`))
	for i := range 4000 {
		lines = append(lines, withChecksum(fmt.Sprintf(`{"kind":"message","app":"a","mailbox":"m","side":"s","phase":"%d","body":%q,"server_rx":%d}`, i, hexBody(fmt.Sprint(i), 300), i+2)))
	}
	text := journalText(lines...)
	path := writeJournal(t, text)

	m := newMetrics()
	reg := newRegistry(defaultLimits, true, nil, nil, m)
	ctx := &stopAfter{Context: context.Background()}
	ctx.n.Store(2) // two chunks replayed
	_, err := openStore(ctx, path, true, reg, testLogger(t), m)
	if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "replay of the journal "+path+" stopped at line ") {
		t.Fatalf("openStore stopped: %v", err)
	}
	if data, _ := os.ReadFile(path); string(data) != text {
		t.Fatal("the journal was changed")
	}
	if _, s, _, err := openTestStore(t, path); err != nil {
		t.Fatalf("after a stopped replay: %v", err)
	} else {
		s.close()
	}

	stopped, cancel := context.WithCancel(context.Background())
	cancel()
	var log bytes.Buffer
	if err := run(stopped, []string{"--port", "tcp:0:interface=127.0.0.1", "--channel-db", path}, &log, &log); err != nil {
		t.Fatalf("run stopped while starting: %v", err)
	}
	if !strings.Contains(log.String(), "stopped while starting") || strings.Contains(log.String(), "listening") {
		t.Errorf("log:\n%s", log.String())
	}
}
