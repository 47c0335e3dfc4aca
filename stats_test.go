// stats_test.go tests the stats command on usage logs written here:
// exact numbers in the text and JSON summaries, malformed lines, --since,
// and its speed on a million records (a benchmark).
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// statsDay is midnight UTC on 2023-11-13, where the fixture's times start.
const statsDay = 1699833600.0

// statsFixture is a usage log with every kind of record and line. Its
// ten transfers have waiting times 1 to 8 s (two are lonely) and total
// times 10 to 100 s.
func statsFixture() string {
	const h = 3600.0
	var b strings.Builder
	line := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	mailbox := func(app string, started, total float64, waiting any, result string) {
		w, _ := json.Marshal(waiting)
		line(`{"type": "mailbox", "app_id": %q, "for_nameplate": true, "started": %v, "total_time": %v, "waiting_time": %s, "result": %q}`,
			app, started, total, w, result)
	}
	line(`{"type": "current", "rebooted": %v, "updated": %v, "blur_time": null, "connections_websocket": 3}`, statsDay, statsDay+39*h)
	mailbox("app.one", statsDay+14*h, 10, 1, "happy")
	mailbox("app.one", statsDay+14*h+600, 20, 2, "happy")
	mailbox("app.one", statsDay+14*h+1200, 30, 3, "happy")
	mailbox("app.one", statsDay+9*h, 40, 4, "happy")
	mailbox("app.two", statsDay+9*h+60, 50, 5, "errory")
	mailbox("app.two", statsDay+23*h+3540, 60, 6, "scary")
	line("not json")
	mailbox("app.one", statsDay+14*h+1800, 70, 7, "pruney")
	mailbox("app.one", statsDay+38*h, 80, 8, "crowded")
	mailbox("app.one", statsDay+9*h+120, 90, nil, "lonely")
	mailbox("app.two", statsDay+2*h, 100, nil, "lonely")
	line(`{"type": "mailbox"}`)
	line(`{"type": "unknown", "started": 1}`)
	line(`[1, 2]`)
	line("")
	line(`{"type": "mailbox", "app_id": 5, "for_nameplate": true, "started": 1, "total_time": 1, "waiting_time": null, "result": "happy"}`)
	line(`{"type": "client_version", "app_id": "app.one", "side": "x", "connect_time": 1, "pad": "%s"}`, strings.Repeat("x", statsMaxLine))
	line(`{"type": "nameplate", "app_id": "app.one", "started": %v, "total_time": 5, "waiting_time": 1, "result": "happy"}`, statsDay+14*h)
	line(`{"type": "nameplate", "app_id": "app.one", "started": %v, "total_time": 5, "waiting_time": 2, "result": "happy"}`, statsDay+14*h+600)
	line(`{"type": "nameplate", "app_id": "app.one", "started": %v, "total_time": 5, "waiting_time": null, "result": "lonely"}`, statsDay+9*h+120)
	for i, v := range [][2]any{{"python", "0.13.0"}, {"python", "0.13.0"}, {"golang", "v1.0.6"}, {nil, nil},
		{"python", "0.12.0"}, {"python", "0.13.0"}, {"golang", "v1.0.6"}, {nil, nil}} {
		impl, _ := json.Marshal(v[0])
		version, _ := json.Marshal(v[1])
		line(`{"type": "client_version", "app_id": "app.one", "side": "s%d", "connect_time": %v, "implementation": %s, "version": %s}`,
			i, statsDay+14*h+float64(i), impl, version)
	}
	line(`{"type": "current", "rebooted": %v, "updated": %v, "blur_time": null, "connections_websocket": 1}`, statsDay, statsDay+h)
	return b.String()
}

// runStatsOn runs the stats command with args on a log holding text.
func runStatsOn(t *testing.T, text string, args ...string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "usage.jsonl")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	var out, errOut bytes.Buffer
	if err := run(context.Background(), append([]string{"stats", "--usage-db", path}, args...), &out, &errOut); err != nil {
		t.Fatalf("stats: %v (%s)", err, errOut.String())
	}
	return strings.ReplaceAll(out.String(), path, "FILE")
}

func TestStatsText(t *testing.T) {
	got := runStatsOn(t, statsFixture())
	want := `Usage log FILE: 29 lines, 6 malformed (skipped)
Started between 2023-11-13 02:00:00 UTC and 2023-11-14 14:00:00 UTC

Transfers: 10
  happy          4   40.0%
  lonely         2   20.0%
  errory         1   10.0%
  scary          1   10.0%
  pruney         1   10.0%
  crowded        1   10.0%
  waiting for the other side  p50 4.0s    p90 8.0s    p99 8.0s    (8 with two sides)
  total time                  p50 50.0s   p90 1m30s   p99 1m40s   (10)

Nameplates: 3
  happy 2 (66.7%)  lonely 1 (33.3%)

Apps: 2
  app.one        7  happy 4 (57.1%)  lonely 1 (14.3%)  pruney 1 (14.3%)  crowded 1 (14.3%)
  app.two        3  lonely 1 (33.3%)  errory 1 (33.3%)  scary 1 (33.3%)

Clients: 8 binds
  python          4   50.0%
    0.13.0        3   37.5%
    0.12.0        1   12.5%
  (none)          2   25.0%
    (none)        2   25.0%
  golang          2   25.0%
    v1.0.6        2   25.0%

Busiest hours (UTC, transfers started):
  14:00-15:00        5   50.0%
  09:00-10:00        3   30.0%
  02:00-03:00        1   10.0%
  23:00-00:00        1   10.0%

Server (latest current record):
  started      2023-11-13 00:00:00 UTC
  updated      2023-11-14 15:00:00 UTC (up 1d15h)
  connections  3 (subscribed to a mailbox)
  blur         none
`
	if got != want {
		t.Errorf("stats text:\n%s\nwant:\n%s", got, want)
	}
}

func TestStatsJSON(t *testing.T) {
	var got map[string]any
	if err := json.Unmarshal([]byte(runStatsOn(t, statsFixture(), "--json")), &got); err != nil {
		t.Fatal(err)
	}
	hours := make([]any, 24)
	for h := range hours {
		hours[h] = 0.0
	}
	hours[2], hours[9], hours[14], hours[23] = 1.0, 3.0, 5.0, 1.0
	want := map[string]any{
		"file": "FILE", "since": nil, "lines": 29.0, "malformed": 6.0,
		"first": statsDay + 2*3600, "last": statsDay + 38*3600,
		"transfers": map[string]any{"total": 10.0,
			"results": map[string]any{"happy": 4.0, "lonely": 2.0, "errory": 1.0, "scary": 1.0, "pruney": 1.0, "crowded": 1.0},
			"percent": map[string]any{"happy": 40.0, "lonely": 20.0, "errory": 10.0, "scary": 10.0, "pruney": 10.0, "crowded": 10.0}},
		"waiting_time": map[string]any{"count": 8.0, "p50": 4.0, "p90": 8.0, "p99": 8.0},
		"total_time":   map[string]any{"count": 10.0, "p50": 50.0, "p90": 90.0, "p99": 100.0},
		"nameplates": map[string]any{"total": 3.0,
			"results": map[string]any{"happy": 2.0, "lonely": 1.0}, "percent": map[string]any{"happy": 66.7, "lonely": 33.3}},
		"apps": []any{
			map[string]any{"app_id": "app.one", "total": 7.0,
				"results": map[string]any{"happy": 4.0, "lonely": 1.0, "pruney": 1.0, "crowded": 1.0},
				"percent": map[string]any{"happy": 57.1, "lonely": 14.3, "pruney": 14.3, "crowded": 14.3}},
			map[string]any{"app_id": "app.two", "total": 3.0,
				"results": map[string]any{"lonely": 1.0, "errory": 1.0, "scary": 1.0},
				"percent": map[string]any{"lonely": 33.3, "errory": 33.3, "scary": 33.3}},
		},
		"clients": map[string]any{"binds": 8.0, "implementations": []any{
			map[string]any{"implementation": "python", "binds": 4.0, "percent": 50.0, "versions": []any{
				map[string]any{"version": "0.13.0", "binds": 3.0, "percent": 37.5},
				map[string]any{"version": "0.12.0", "binds": 1.0, "percent": 12.5}}},
			map[string]any{"implementation": nil, "binds": 2.0, "percent": 25.0, "versions": []any{
				map[string]any{"version": nil, "binds": 2.0, "percent": 25.0}}},
			map[string]any{"implementation": "golang", "binds": 2.0, "percent": 25.0, "versions": []any{
				map[string]any{"version": "v1.0.6", "binds": 2.0, "percent": 25.0}}},
		}},
		"hours_utc": hours,
		"current": map[string]any{"rebooted": statsDay, "updated": statsDay + 39*3600, "uptime": 39 * 3600.0,
			"blur_time": nil, "connections_websocket": 3.0},
	}
	for k, v := range want {
		if !reflect.DeepEqual(got[k], v) {
			t.Errorf("%s = %v\n want %v", k, got[k], v)
		}
	}
	delete(got, "transit") // checked by TestTransitStats
	if len(got) != len(want) {
		t.Errorf("keys %d, want %d: %v", len(got), len(want), got)
	}
}

// TestStatsEmpty checks an empty log: zeros and nulls, no failure.
func TestStatsEmpty(t *testing.T) {
	text := runStatsOn(t, "")
	if !strings.Contains(text, "Transfers: 0\n  happy          0    0.0%") || !strings.Contains(text, "Server: no current record") {
		t.Errorf("empty log:\n%s", text)
	}
	var got statsSummary
	if err := json.Unmarshal([]byte(runStatsOn(t, "", "--json")), &got); err != nil {
		t.Fatal(err)
	}
	if got.Lines != 0 || got.Transfers.Total != 0 || got.WaitingTime.P50 != nil || got.Current != nil || len(got.Apps) != 0 {
		t.Errorf("empty log: %+v", got)
	}
}

// TestStatsSince checks that --since counts only what started within
// the duration before now, and keeps the latest current record.
func TestStatsSince(t *testing.T) {
	now := float64(time.Now().Unix())
	var b strings.Builder
	for _, ago := range []float64{3600, 7200, 2 * 86400} {
		fmt.Fprintf(&b, `{"type": "mailbox", "app_id": "a", "for_nameplate": true, "started": %v, "total_time": 1, "waiting_time": 1, "result": "happy"}`+"\n", now-ago)
		fmt.Fprintf(&b, `{"type": "client_version", "app_id": "a", "side": "s", "connect_time": %v, "implementation": null, "version": null}`+"\n", now-ago)
	}
	fmt.Fprintf(&b, `{"type": "current", "rebooted": %v, "updated": %v, "blur_time": null, "connections_websocket": 0}`+"\n", now-3*86400, now-3*86400)
	for _, tc := range []struct {
		since string
		want  int
	}{{"", 3}, {"24h", 2}, {"90m", 1}, {"3d", 3}, {"1d", 2}} {
		var got statsSummary
		args := []string{"--json"}
		if tc.since != "" {
			args = append(args, "--since", tc.since)
		}
		if err := json.Unmarshal([]byte(runStatsOn(t, b.String(), args...)), &got); err != nil {
			t.Fatal(err)
		}
		if got.Transfers.Total != tc.want || got.Clients.Binds != tc.want || got.Current == nil {
			t.Errorf("--since %q: %d transfers, %d binds, current %v; want %d, %d and the current record",
				tc.since, got.Transfers.Total, got.Clients.Binds, got.Current, tc.want, tc.want)
		}
		if (tc.since == "") != (got.Since == nil) {
			t.Errorf("--since %q: since = %v", tc.since, got.Since)
		}
	}
}

// TestStatsUsage checks the command's refusals, among them a file that
// holds no usage record at all (a journal given by mistake, say).
func TestStatsUsage(t *testing.T) {
	notUsage := filepath.Join(t.TempDir(), "relay.jsonl")
	if err := os.WriteFile(notUsage, []byte(`{"nameplate": "1"}`+"\n"+`{"mailbox": "x"}`+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "--usage-db FILE is required"},
		{[]string{"--usage-db", filepath.Join(t.TempDir(), "missing")}, "no such file"},
		{[]string{"--usage-db", "x", "--since", "yesterday"}, "--since"},
		{[]string{"--usage-db", "x", "--since", "-1h"}, "negative"},
		{[]string{"--usage-db", "x", "extra"}, "unexpected argument"},
		{[]string{"--usage-db", notUsage}, "is not a usage log"},
	} {
		var out, errOut bytes.Buffer
		err := run(context.Background(), append([]string{"stats"}, tc.args...), &out, &errOut)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("stats %v: error %v, want one saying %q", tc.args, err, tc.want)
		}
	}
}

// TestStatsOnServerLog checks that stats reads what the server writes:
// a transfer made through the protocol shows up as one happy transfer.
func TestStatsOnServerLog(t *testing.T) {
	ts, clock := startUsageServer(t, testConfig())
	a, _ := join(t, ts, "app", "a", "4", true)
	clock.set(t0 + 3)
	b, _ := join(t, ts, "app", "b", "4", true)
	clock.set(t0 + 7.5)
	for _, c := range []*testClient{a, b} {
		c.expect(`{"type": "release"}`, "released")
		closeWith(c, "happy")
	}
	ts.reg.usage.flush()
	f, err := os.Open(ts.cfg.usageDB)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sum, err := summarise(f, nil)
	if err != nil {
		t.Fatal(err)
	}
	if sum.Malformed != 0 || sum.Transfers.Results["happy"] != 1 || *sum.WaitingTime.P50 != 3 ||
		*sum.TotalTime.P50 != 7.5 || sum.Nameplates.Results["happy"] != 1 || sum.Clients.Binds != 2 || sum.Current == nil {
		t.Errorf("summary of the server's log: %+v", sum)
	}
}

// BenchmarkStats summarises a generated log of a million records, about
// 190 MB: a quarter each of transfers and nameplates, half binds.
func BenchmarkStats(b *testing.B) {
	path := filepath.Join(b.TempDir(), "usage.jsonl")
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	w := bufio.NewWriter(f)
	results := []string{"happy", "happy", "happy", "happy", "happy", "happy", "happy", "lonely", "errory", "pruney"}
	impls := [][2]string{{"python", "0.13.0"}, {"python", "0.12.0"}, {"golang", "v1.0.6"}, {"rust", "0.7.1"}}
	start := 1_700_000_000.0
	const records = 1_000_000
	for i := 0; i < records/4; i++ {
		t := start + float64(i)*4.7
		app := "lothar.com/wormhole/text-or-file-xfer"
		for s := range 2 {
			im := impls[(i+s)%len(impls)]
			fmt.Fprintf(w, `{"type":"client_version","app_id":%q,"side":"%010x","connect_time":%v,"implementation":%q,"version":%q}`+"\n",
				app, i*2+s, t+float64(s), im[0], im[1])
		}
		wait, total := float64(i%600)/10, float64(i%900)/10+60
		fmt.Fprintf(w, `{"type":"nameplate","app_id":%q,"started":%v,"total_time":%v,"waiting_time":%v,"result":"happy"}`+"\n", app, t, total, wait)
		fmt.Fprintf(w, `{"type":"mailbox","app_id":%q,"for_nameplate":true,"started":%v,"total_time":%v,"waiting_time":%v,"result":%q}`+"\n",
			app, t, total, wait, results[i%len(results)])
	}
	if err := w.Flush(); err != nil {
		b.Fatal(err)
	}
	f.Close()
	b.ResetTimer()
	for b.Loop() {
		f, err := os.Open(path)
		if err != nil {
			b.Fatal(err)
		}
		sum, err := summarise(f, nil)
		f.Close()
		if err != nil || sum.Lines != records || sum.Malformed != 0 {
			b.Fatalf("%d lines, %d malformed, %v", sum.Lines, sum.Malformed, err)
		}
	}
}

// TestUsageLineParsing checks which lines are usage records.
func TestUsageLineParsing(t *testing.T) {
	for _, tc := range []struct {
		line string
		ok   bool // a usage record, counted
	}{
		{`{"type":"current","rebooted":1,"updated":2,"blur_time":null,"connections_websocket":0}`, true},
		{` { "type" : "current" , "rebooted" : 1.5e3 , "updated" : -0.25E-2 }` + "\r\n", true},
		{`{"type":"client_version","app_id":"a","side":"s","connect_time":1,"implementation":null,"version":"\u00e9"}`, true},
		{`{"type":"client_version","app_id":"é","side":"s","connect_time":1,"implementation":"python","version":"1"}`, true},
		{`{"Type":"current","rebooted":1,"updated":2}`, true}, // encoding/json matches keys in any case
		{`{"type":"current","rebooted":1,"updated":2,"extra":{"a":[1]}}`, true},
		{`{"type":"nameplate","type":"current","rebooted":1,"updated":2}`, true}, // the last wins
		{`{"type":"current","rebooted":"1","updated":2}`, false},
		{`{"type":"current","rebooted":1,"updated":2,"blur_time":1.5}`, false},
		{`{"type":"current","rebooted":01,"updated":2}`, false},
		{`{"type":"current","rebooted":1,"updated":2,}`, false},
		{`{"type":"current","rebooted":1,"updated":2} x`, false},
		{`{"type":"current","rebooted":1e999,"updated":2}`, false},
		{`{"type":"current","rebooted":1,"updated":null}`, false},
		{`{"type":null,"rebooted":1,"updated":2}`, false},
		{"{\"type\":\"current\xff\",\"rebooted\":1,\"updated\":2}", false},
		{`{"type":"mailbox","app_id":"a","started":1,"total_time":2,"waiting_time":null,"result":"happy","for_nameplate":true}`, true},
		{`{"type":"mailbox","app_id":"a","started":1,"total_time":2,"result":"happy"}`, true},
		{`{"type":"mailbox","app_id":"a","started":1,"result":"happy"}`, false},
		{`{}`, false},
		{`{`, false},
		{`"type"`, false},
		{`null`, false},
	} {
		var f usageFields
		s := &statsSummary{apps: make(map[string]*appStats), impls: make(map[string]*implStats)}
		ok := f.parse([]byte(tc.line)) && s.add(&f, nil)
		if ok != tc.ok {
			t.Errorf("%s: record %v, want %v", tc.line, ok, tc.ok)
		}
	}
}
