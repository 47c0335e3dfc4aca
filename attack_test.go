// attack_test.go tests the load command's attack mode (attack.go): each
// attack, at a tiny scale against the real handler on a real listener,
// opens its connections, writes what it should and produces its report.
// The server's bounds against these attacks are tested elsewhere; these
// tests check the driver.
package main

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"
	"time"
)

// attackTestDuration is how long each test attack holds while its victim
// runs: the report does not depend on it, it only keeps tests short.
const attackTestDuration = 100 * time.Millisecond

// runTestAttack runs attack name with addrs x conns against ts, with one
// victim pair, and returns the report.
func runTestAttack(t *testing.T, ts *testServer, name string, addrs, conns int) attackResult {
	t.Helper()
	cfg := loadConfig{url: ts.url, pairs: 1, duration: attackTestDuration, pid: os.Getpid(),
		attack: name, attackAddrs: addrs, attackConns: conns}
	res, err := driveAttack(context.Background(), cfg, testLogWriter{t})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v", res)
	if res.Attack != name || res.Addrs != addrs || res.Conns != conns {
		t.Errorf("report names %s %d x %d, want %s %d x %d", res.Attack, res.Addrs, res.Conns, name, addrs, conns)
	}
	if v := res.Victim; v == nil || v.Transfers+v.Failed < 1 {
		t.Errorf("victim %+v: no transfer attempted", res.Victim)
	}
	if res.ServerPeakRSS == 0 || res.ServerHWM == 0 {
		t.Errorf("no memory sampled: %d, %d", res.ServerPeakRSS, res.ServerHWM)
	}
	if res.UpDuring == "" || res.UpAfter == "" {
		t.Errorf("no answer recorded: %q, %q", res.UpDuring, res.UpAfter)
	}
	return res
}

// hasNote reports whether some note of r contains part.
func hasNote(r attackResult, part string) bool {
	for _, n := range r.Notes {
		if strings.Contains(n, part) {
			return true
		}
	}
	return false
}

func TestAttackNone(t *testing.T) {
	ts := startServer(t, testConfig())
	r := runTestAttack(t, ts, "none", 0, 0)
	if r.Opened != 0 || r.Sent != 0 {
		t.Errorf("no attack opened %d and sent %d", r.Opened, r.Sent)
	}
	if r.Victim.Transfers < 1 || r.UpDuring != "yes" || r.UpAfter != "yes" {
		t.Errorf("baseline: %+v, up %q %q", r.Victim, r.UpDuring, r.UpAfter)
	}
}

func TestAttackHolds(t *testing.T) {
	for _, name := range []string{"header-hold", "fragment-hold", "http-keepalive", "conn-fill"} {
		t.Run(name, func(t *testing.T) {
			ts := startServer(t, testConfig())
			r := runTestAttack(t, ts, name, 2, 3)
			if r.Opened != 6 || r.Failed != 0 {
				t.Errorf("opened %d, failed %d; want 6 and 0", r.Opened, r.Failed)
			}
			if r.Sent < 6 {
				t.Errorf("sent %d, want at least one each", r.Sent)
			}
		})
	}
}

func TestAttackStoreFill(t *testing.T) {
	ts := startServer(t, testConfig())
	r := runTestAttack(t, ts, "store-fill", 2, 2)
	if r.Opened != 4 || !hasNote(r, "bodies of up to 240 KiB accepted") {
		t.Errorf("opened %d, notes %q", r.Opened, r.Notes)
	}
	// attackAddsPerMailbox bodies are more than a default mailbox holds.
	if r.Refused != 4 || len(r.Errors) != 1 || !strings.Contains(r.Errors[0], "mailbox is full") {
		t.Errorf("refused %d: %q", r.Refused, r.Errors)
	}
}

func TestAttackNameplateFill(t *testing.T) {
	ts := startServer(t, testConfig())
	r := runTestAttack(t, ts, "nameplate-fill", 2, 3)
	if !hasNote(r, "6 nameplates claimed") {
		t.Errorf("notes %q", r.Notes)
	}
}

func TestAttackPingFlood(t *testing.T) {
	ts := startServer(t, testConfig())
	r := runTestAttack(t, ts, "ping-flood", 1, 2)
	if r.Opened != 2 || r.Sent < 2*pingFloodBatch || !hasNote(r, "pongs in") {
		t.Errorf("opened %d, sent %d, notes %q", r.Opened, r.Sent, r.Notes)
	}
}

func TestAttackNoRead(t *testing.T) {
	ts := startServer(t, testConfig())
	r := runTestAttack(t, ts, "no-read", 2, 3)
	if r.Opened != 2*(1+3) {
		t.Errorf("opened %d, want a feeder and 3 subscribers on each of 2 addresses", r.Opened)
	}
	if !hasNote(r, "nr-0: 4 bodies") || !hasNote(r, "nr-1: 4 bodies") {
		t.Errorf("notes %q, want each mailbox filled to the default 1 MiB", r.Notes)
	}
}

func TestAttackBindFlood(t *testing.T) {
	ts := startServer(t, testConfig())
	r := runTestAttack(t, ts, "bind-flood", 2, 2)
	if r.Opened < 4 || !hasNote(r, "binds in") {
		t.Errorf("opened %d, notes %q", r.Opened, r.Notes)
	}
}

func TestAttackProbeNameplates(t *testing.T) {
	cfg := testConfig()
	cfg.nameplatesPerMin = 10 // an allowance the probe uses up quickly
	ts := startServer(t, cfg)
	r := runTestAttack(t, ts, "probe-nameplates", 2, 4)
	if !hasNote(r, "existing nameplates answered") || !hasNote(r, "existence leaked: ") {
		t.Errorf("notes %q", r.Notes)
	}
	if hasNote(r, "did not run out") || r.Refused == 0 {
		t.Errorf("the allowance was not used up: refused %d, notes %q", r.Refused, r.Notes)
	}
}

func TestAttackCrowd(t *testing.T) {
	ts := startServer(t, testConfig())
	r := runTestAttack(t, ts, "crowd", 1, 2)
	if !hasNote(r, "third side's claim") || !hasNote(r, " of 2 times") {
		t.Errorf("notes %q", r.Notes)
	}
}

func TestAttackRefusesOtherServers(t *testing.T) {
	if _, _, err := attackTarget("ws://192.0.2.1:4000/v1", false); err == nil || !strings.Contains(err.Error(), "--i-own-this-server") {
		t.Errorf("non-loopback target: %v, want a refusal naming --i-own-this-server", err)
	}
	if _, local, err := attackTarget("ws://192.0.2.1:4000/v1", true); err != nil || local {
		t.Errorf("owned non-loopback target: local %v, %v", local, err)
	}
	if _, local, err := attackTarget("ws://127.0.0.1:4000/v1", false); err != nil || !local {
		t.Errorf("loopback target: local %v, %v", local, err)
	}
	if _, _, err := attackTarget("http://127.0.0.1:4000/", false); err == nil {
		t.Error("http:// target accepted")
	}
}

func TestAttackFlags(t *testing.T) {
	var out bytes.Buffer
	if err := runLoad(context.Background(), []string{"--attack", "no-such"}, &out, testLogWriter{t}); err == nil || !strings.Contains(err.Error(), "header-hold") {
		t.Errorf("unknown attack: %v, want the list of attacks", err)
	}
	if err := runLoad(context.Background(), []string{"--attack", "conn-fill", "--attack-addrs", "254"}, &out, testLogWriter{t}); err == nil {
		t.Error("254 attacking addresses accepted")
	}
	ts := startServer(t, testConfig())
	err := runLoad(context.Background(), []string{"--url", ts.url, "--attack", "conn-fill", "--attack-addrs", "1",
		"--attack-conns", "2", "--pairs", "1", "--duration", attackTestDuration.String()}, &out, testLogWriter{t})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"attack          conn-fill", "2 opened", "victim ", "server answers  during the attack: yes"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}
