// stats.go owns the "stats" command, which summarises a usage log (the
// file the server writes with --usage-db; see usage.go) for a person, or
// with --json for a script: transfers by result, how long people wait for
// each other and how long transfers take, the apps, the clients and their
// versions, the busiest hours, and the server's latest "current" record.
//
// The log is read a line at a time, never whole. What stays in memory is
// counts, plus the waiting and total time of every transfer counted, so
// that percentiles are exact: 16 bytes a transfer, 16 MB for a million.
// Lines are read with encoding/json: a million records (190 MB) take
// about 3 s on one core, which an offline summary can afford.
package main

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// statsMaxLine is the longest line read as a record. The server's lines
// are a few hundred bytes at most; anything longer is not one of them.
const statsMaxLine = 64 << 10

// What the text summary shows of long lists; --json gives them all.
const (
	statsTopApps     = 10 // apps, by transfers
	statsTopVersions = 8  // versions of each client implementation, by binds
	statsTopHours    = 5  // hours of the day, by transfers started
)

// resultOrder is the order results are listed in: the reference's, from
// the best outcome to the one that overrides all others. Any other result
// found in a log follows, alphabetically.
var resultOrder = []string{resultHappy, resultLonely, resultErrory, resultScary, resultPruney, resultCrowded}

func runStats(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("wormhole-mailbox stats", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: wormhole-mailbox stats --usage-db FILE [--since DURATION] [--json]

Summarise a usage log written by the server's --usage-db: transfers by
result, waiting and total time percentiles, apps, client versions, busiest
hours, and the latest "current" record. There is no default file, since
the server writes none unless told to; - reads standard input (for
example a rotated, compressed log through zcat).

`)
		fs.PrintDefaults()
	}
	path := fs.String("usage-db", "", "the usage log `file`, as given to the server's --usage-db; - for standard input")
	sinceArg := fs.String("since", "", "count only transfers and binds that started in the last `duration` (e.g. 90m, 24h, 7d); default: all")
	asJSON := fs.Bool("json", false, "print the summary as JSON, for scripts")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return fmt.Errorf("stats: unexpected argument %q", fs.Arg(0))
	}
	if *path == "" {
		fs.Usage()
		return errors.New("stats: --usage-db FILE is required")
	}
	var cutoff *float64
	if *sinceArg != "" {
		d, err := parseSince(*sinceArg)
		if err != nil {
			return fmt.Errorf("stats: --since: %v", err)
		}
		c := float64(time.Now().Add(-d).UnixNano()) / 1e9
		cutoff = &c
	}

	in := io.Reader(os.Stdin)
	if *path != "-" {
		f, err := os.Open(*path)
		if err != nil {
			return fmt.Errorf("stats: %w", err)
		}
		defer f.Close()
		in = f
	}
	sum, err := summarise(in, cutoff)
	if err != nil {
		return fmt.Errorf("stats: reading %s: %w", *path, err)
	}
	if sum.Lines > 0 && sum.Malformed == sum.Lines {
		return fmt.Errorf("stats: %s is not a usage log: none of its %d lines is a usage record (the server writes them with --usage-db)", *path, sum.Lines)
	}
	sum.File = *path
	if *asJSON {
		out, err := json.MarshalIndent(sum, "", "  ")
		if err != nil {
			return fmt.Errorf("stats: %w", err)
		}
		_, err = fmt.Fprintf(stdout, "%s\n", out)
		return err
	}
	return sum.writeText(stdout)
}

// parseSince reads a duration as Go writes them (90m, 1h30m), or a whole
// number of days (7d).
func parseSince(s string) (time.Duration, error) {
	if days, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.Atoi(days)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("%q is not a number of days", s)
		}
		return time.Duration(n) * 24 * time.Hour, nil
	}
	d, err := time.ParseDuration(s)
	if err == nil && d < 0 {
		err = fmt.Errorf("%q is negative", s)
	}
	return d, err
}

// statsSummary is the summary of a usage log, printed as text or JSON.
// Times are Unix seconds, durations seconds.
type statsSummary struct {
	File      string   `json:"file"`      // the log read; "-" for standard input
	Since     *float64 `json:"since"`     // transfers and binds that started before this were skipped; null: none
	Lines     int      `json:"lines"`     // lines read, blank ones aside
	Malformed int      `json:"malformed"` // lines that are not usage records, skipped
	First     *float64 `json:"first"`     // earliest start of a transfer, nameplate or bind counted
	Last      *float64 `json:"last"`      // latest

	Transfers   resultCounts `json:"transfers"`    // mailbox records: one per transfer
	WaitingTime percentiles  `json:"waiting_time"` // transfers where a second side came: how long the first waited
	TotalTime   percentiles  `json:"total_time"`   // all transfers: from the first side to the end
	Nameplates  resultCounts `json:"nameplates"`   // nameplate records
	Apps        []appStats   `json:"apps"`         // transfers by app id, most first
	Clients     clientStats  `json:"clients"`      // binds by client_version
	HoursUTC    [24]int      `json:"hours_utc"`    // transfers by the hour of the day (UTC) they started
	Current     *serverState `json:"current"`      // the latest current record; null if none
	Transit     transitStats `json:"transit"`      // the transit relay's sessions (transit_stats.go)

	waiting, total []float64 // the transfers' times, for the percentiles
	seen           bool      // a record was counted, so first and last are set
	first, last    float64
	apps           map[string]*appStats
	impls          map[string]*implStats
}

// resultCounts counts records by result.
type resultCounts struct {
	Total   int                `json:"total"`
	Results map[string]int     `json:"results"`
	Percent map[string]float64 `json:"percent"` // of Total, to one decimal
	tally   tally
}

func (rc *resultCounts) add(result []byte) {
	if rc.tally == nil {
		rc.tally = make(tally)
	}
	rc.Total++
	rc.tally.add(result)
}

func (rc *resultCounts) finish() {
	rc.Results = make(map[string]int, len(rc.tally))
	rc.Percent = make(map[string]float64, len(rc.tally))
	for r, n := range rc.tally {
		rc.Results[r] = *n
		rc.Percent[r] = percent(*n, rc.Total)
	}
	rc.tally = nil
}

// tally counts occurrences of strings read from a line, allocating only
// for a string not seen before.
type tally map[string]*int

func (t tally) add(key []byte) {
	n := t[string(key)]
	if n == nil {
		n = new(int)
		t[string(key)] = n
	}
	*n++
}

// ordered returns the results present, in resultOrder and then by name.
func (rc *resultCounts) ordered() []string {
	var known, others []string
	for _, r := range resultOrder {
		if rc.Results[r] > 0 {
			known = append(known, r)
		}
	}
	for r := range rc.Results {
		if !slices.Contains(resultOrder, r) {
			others = append(others, r)
		}
	}
	slices.Sort(others)
	return append(known, others...)
}

// percentiles are nearest-rank percentiles: pN is the smallest value that
// at least N% of the values are at or below. They are null when Count is 0.
type percentiles struct {
	Count int      `json:"count"`
	P50   *float64 `json:"p50"`
	P90   *float64 `json:"p90"`
	P99   *float64 `json:"p99"`
}

func newPercentiles(values []float64) percentiles {
	p := percentiles{Count: len(values)}
	if len(values) == 0 {
		return p
	}
	slices.Sort(values)
	rank := func(q float64) *float64 {
		v := nearestRank(values, q)
		return &v
	}
	p.P50, p.P90, p.P99 = rank(0.50), rank(0.90), rank(0.99)
	return p
}

// nearestRank returns the q-quantile of sorted, which is not empty, by
// the nearest-rank method: the smallest value that at least a fraction q
// of all values are no greater than.
func nearestRank[T cmp.Ordered](sorted []T, q float64) T {
	return sorted[max(0, int(math.Ceil(q*float64(len(sorted))))-1)]
}

// appStats is one app id's transfers.
type appStats struct {
	AppID string `json:"app_id"`
	resultCounts
}

// clientStats counts binds by implementation and version.
type clientStats struct {
	Binds           int         `json:"binds"`
	Implementations []implStats `json:"implementations"` // most binds first
}

// implStats is one client implementation; null stands for clients that
// sent no client_version.
type implStats struct {
	Implementation *string        `json:"implementation"`
	Binds          int            `json:"binds"`
	Percent        float64        `json:"percent"`  // of all binds
	Versions       []versionStats `json:"versions"` // most binds first
	versions       map[string]*versionStats
}

type versionStats struct {
	Version *string `json:"version"`
	Binds   int     `json:"binds"`
	Percent float64 `json:"percent"` // of all binds
}

// serverState is the latest current record, with the uptime it implies.
type serverState struct {
	Rebooted             float64 `json:"rebooted"`
	Updated              float64 `json:"updated"`
	Uptime               float64 `json:"uptime"` // updated - rebooted
	BlurTime             *int    `json:"blur_time"`
	ConnectionsWebsocket int     `json:"connections_websocket"`
}

// summarise reads a usage log to its end. Transfers, nameplates and binds
// that started before cutoff (if not nil) are skipped; the latest current
// record is kept whenever it was written.
func summarise(r io.Reader, cutoff *float64) (*statsSummary, error) {
	s := &statsSummary{Since: cutoff, apps: make(map[string]*appStats), impls: make(map[string]*implStats)}
	br := bufio.NewReaderSize(r, statsMaxLine)
	var f usageFields
	for {
		line, err := br.ReadSlice('\n')
		if err == bufio.ErrBufferFull { // too long: skip to the end of it
			s.Lines++
			s.Malformed++
			for err == bufio.ErrBufferFull {
				_, err = br.ReadSlice('\n')
			}
		} else if len(bytes.TrimSpace(line)) > 0 {
			s.Lines++
			if !f.parse(line) || !s.add(&f, cutoff) {
				s.Malformed++
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	s.finish()
	return s, nil
}

// add counts one record, and reports whether it was a usage record: one
// of the four types, with the fields that type needs.
func (s *statsSummary) add(f *usageFields, cutoff *float64) bool {
	switch string(f.typ) {
	case usageMailbox, usageNameplate:
		if !f.appID.ok || !f.started.ok || !f.totalTime.ok || !f.result.ok {
			return false
		}
		if !s.counts(f.started.v, cutoff) {
			return true
		}
		if string(f.typ) == usageNameplate {
			s.Nameplates.add(f.result.b)
			return true
		}
		s.Transfers.add(f.result.b)
		a := s.apps[string(f.appID.b)]
		if a == nil {
			a = &appStats{AppID: string(f.appID.b)}
			s.apps[a.AppID] = a
		}
		a.add(f.result.b)
		s.total = append(s.total, f.totalTime.v)
		if f.waitingTime.ok {
			s.waiting = append(s.waiting, f.waitingTime.v)
		}
		s.HoursUTC[time.Unix(int64(math.Floor(f.started.v)), 0).UTC().Hour()]++
	case usageClientVersion:
		if !f.appID.ok || !f.connectTime.ok {
			return false
		}
		if s.counts(f.connectTime.v, cutoff) {
			s.addBind(f.impl, f.version)
		}
	case usageTransit:
		if !f.started.ok || !f.totalTime.ok || !f.mood.ok {
			return false
		}
		if s.counts(f.started.v, cutoff) {
			s.Transit.add(f)
		}
	case usageCurrent:
		if !f.rebooted.ok || !f.updated.ok {
			return false
		}
		if s.Current == nil || f.updated.v >= s.Current.Updated {
			s.Current = &serverState{Rebooted: f.rebooted.v, Updated: f.updated.v,
				Uptime: f.updated.v - f.rebooted.v, ConnectionsWebsocket: f.connectionsWebsocket.v}
			if f.blurTime.ok {
				blur := f.blurTime.v
				s.Current.BlurTime = &blur
			}
		}
	default:
		return false
	}
	return true
}

// counts reports whether a record that started at t is counted, and
// widens the period covered if so.
func (s *statsSummary) counts(t float64, cutoff *float64) bool {
	if cutoff != nil && t < *cutoff {
		return false
	}
	if !s.seen || t < s.first {
		s.first = t
	}
	if !s.seen || t > s.last {
		s.last = t
	}
	s.seen = true
	return true
}

var nullBytes = []byte{0}

// nullKey is the map key of an optional string; "\x00" stands for null,
// which no real client sends as its implementation or version.
func nullKey(o optBytes) []byte {
	if !o.ok {
		return nullBytes
	}
	return o.b
}

// sortKey orders optional strings, null first.
func sortKey(p *string) string {
	if p == nil {
		return "\x00"
	}
	return *p
}

// optString is an optional string as the summary holds it: nil for null.
func optString(o optBytes) *string {
	if !o.ok {
		return nil
	}
	s := string(o.b)
	return &s
}

func (s *statsSummary) addBind(impl, version optBytes) {
	s.Clients.Binds++
	is := s.impls[string(nullKey(impl))]
	if is == nil {
		is = &implStats{Implementation: optString(impl), versions: make(map[string]*versionStats)}
		s.impls[string(nullKey(impl))] = is
	}
	is.Binds++
	vs := is.versions[string(nullKey(version))]
	if vs == nil {
		vs = &versionStats{Version: optString(version)}
		is.versions[string(nullKey(version))] = vs
	}
	vs.Binds++
}

// usageFields is one usage record as read, whatever its type. Strings
// are slices of the line, valid while it is; a field absent or null is
// not ok.
type usageFields struct {
	typ                             []byte
	appID, result, impl, version    optBytes
	started, totalTime, waitingTime optFloat
	connectTime, rebooted, updated  optFloat
	blurTime, connectionsWebsocket  optInt
	totalBytes                      optFloat // transit records
	mood                            optBytes // transit records
}

type (
	optBytes struct {
		b  []byte
		ok bool
	}
	optFloat struct {
		v  float64
		ok bool
	}
	optInt struct {
		v  int
		ok bool
	}
)

// parse reads a line into f, and reports whether it is a JSON object
// whose fields have the types a usage record's have.
func (f *usageFields) parse(line []byte) bool {
	*f = usageFields{}
	var rec struct {
		Type                 string   `json:"type"`
		AppID                *string  `json:"app_id"`
		Started              *float64 `json:"started"`
		TotalTime            *float64 `json:"total_time"`
		WaitingTime          *float64 `json:"waiting_time"`
		Result               *string  `json:"result"`
		ConnectTime          *float64 `json:"connect_time"`
		Implementation       *string  `json:"implementation"`
		Version              *string  `json:"version"`
		Rebooted             *float64 `json:"rebooted"`
		Updated              *float64 `json:"updated"`
		BlurTime             *int     `json:"blur_time"`
		ConnectionsWebsocket *int     `json:"connections_websocket"`
		TotalBytes           *float64 `json:"total_bytes"`
		Mood                 *string  `json:"mood"`
	}
	if json.Unmarshal(line, &rec) != nil {
		return false
	}
	str := func(p *string) optBytes {
		if p == nil {
			return optBytes{}
		}
		return optBytes{[]byte(*p), true}
	}
	num := func(p *float64) optFloat {
		if p == nil {
			return optFloat{}
		}
		return optFloat{*p, true}
	}
	integer := func(p *int) optInt {
		if p == nil {
			return optInt{}
		}
		return optInt{*p, true}
	}
	*f = usageFields{typ: []byte(rec.Type), appID: str(rec.AppID), result: str(rec.Result),
		impl: str(rec.Implementation), version: str(rec.Version),
		started: num(rec.Started), totalTime: num(rec.TotalTime), waitingTime: num(rec.WaitingTime),
		connectTime: num(rec.ConnectTime), rebooted: num(rec.Rebooted), updated: num(rec.Updated),
		blurTime: integer(rec.BlurTime), connectionsWebsocket: integer(rec.ConnectionsWebsocket),
		totalBytes: num(rec.TotalBytes), mood: str(rec.Mood)}
	return true
}

// finish turns what was gathered into the summary's lists and percentages.
func (s *statsSummary) finish() {
	if s.seen {
		s.First, s.Last = &s.first, &s.last
	}
	s.Transfers.finish()
	s.Nameplates.finish()
	s.Transit.finish()
	s.WaitingTime = newPercentiles(s.waiting)
	s.TotalTime = newPercentiles(s.total)
	s.waiting, s.total = nil, nil

	s.Apps = []appStats{}
	for _, a := range s.apps {
		a.finish()
		s.Apps = append(s.Apps, *a)
	}
	slices.SortFunc(s.Apps, func(a, b appStats) int {
		return cmp.Or(cmp.Compare(b.Total, a.Total), cmp.Compare(a.AppID, b.AppID))
	})

	s.Clients.Implementations = []implStats{}
	for _, is := range s.impls {
		is.Percent = percent(is.Binds, s.Clients.Binds)
		is.Versions = []versionStats{}
		for _, vs := range is.versions {
			vs.Percent = percent(vs.Binds, s.Clients.Binds)
			is.Versions = append(is.Versions, *vs)
		}
		slices.SortFunc(is.Versions, func(a, b versionStats) int {
			return cmp.Or(cmp.Compare(b.Binds, a.Binds), cmp.Compare(sortKey(a.Version), sortKey(b.Version)))
		})
		s.Clients.Implementations = append(s.Clients.Implementations, *is)
	}
	slices.SortFunc(s.Clients.Implementations, func(a, b implStats) int {
		return cmp.Or(cmp.Compare(b.Binds, a.Binds), cmp.Compare(sortKey(a.Implementation), sortKey(b.Implementation)))
	})
}

// percent is n as a percentage of total, to one decimal.
func percent(n, total int) float64 {
	if total == 0 {
		return 0
	}
	return math.Round(1000*float64(n)/float64(total)) / 10
}

// writeText prints the summary for a person.
func (s *statsSummary) writeText(out io.Writer) error {
	w := &errWriter{w: out}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	section := func(format string, args ...any) {
		tw.Flush()
		fmt.Fprintf(w, "\n"+format+"\n", args...)
	}

	fmt.Fprintf(w, "Usage log %s: %d lines, %d malformed (skipped)\n", s.File, s.Lines, s.Malformed)
	if s.Since != nil {
		fmt.Fprintf(w, "Counting what started since %s\n", formatTime(*s.Since))
	}
	if s.First != nil {
		fmt.Fprintf(w, "Started between %s and %s\n", formatTime(*s.First), formatTime(*s.Last))
	}

	section("Transfers: %d", s.Transfers.Total)
	results := slices.Clone(resultOrder) // the usual ones always show, 0 if none
	for _, r := range s.Transfers.ordered() {
		if !slices.Contains(results, r) {
			results = append(results, r)
		}
	}
	for _, r := range results {
		n := s.Transfers.Results[r]
		fmt.Fprintf(tw, "  %s\t%7d\t%6s\n", r, n, formatPercent(percent(n, s.Transfers.Total)))
	}
	tw.Flush()
	fmt.Fprintf(tw, "  waiting for the other side\t%s\t(%d with two sides)\n", s.WaitingTime.text(), s.WaitingTime.Count)
	fmt.Fprintf(tw, "  total time\t%s\t(%d)\n", s.TotalTime.text(), s.TotalTime.Count)

	section("Nameplates: %d", s.Nameplates.Total)
	if s.Nameplates.Total > 0 {
		fmt.Fprintf(w, "  %s\n", s.Nameplates.text())
	}

	section("Apps: %d", len(s.Apps))
	for i, a := range s.Apps {
		if i == statsTopApps {
			fmt.Fprintf(tw, "  (%d more)\n", len(s.Apps)-i)
			break
		}
		fmt.Fprintf(tw, "  %s\t%7d\t%s\n", a.AppID, a.Total, a.text())
	}

	section("Clients: %d binds", s.Clients.Binds)
	for _, is := range s.Clients.Implementations {
		fmt.Fprintf(tw, "  %s\t%7d\t%6s\n", orNone(is.Implementation), is.Binds, formatPercent(is.Percent))
		for i, vs := range is.Versions {
			if i == statsTopVersions {
				rest := 0
				for _, v := range is.Versions[i:] {
					rest += v.Binds
				}
				fmt.Fprintf(tw, "    (%d more versions)\t%7d\t%6s\n", len(is.Versions)-i, rest, formatPercent(percent(rest, s.Clients.Binds)))
				break
			}
			fmt.Fprintf(tw, "    %s\t%7d\t%6s\n", orNone(vs.Version), vs.Binds, formatPercent(vs.Percent))
		}
	}

	section("Busiest hours (UTC, transfers started):")
	hours := make([]int, 24)
	for h := range hours {
		hours[h] = h
	}
	slices.SortStableFunc(hours, func(a, b int) int { return cmp.Compare(s.HoursUTC[b], s.HoursUTC[a]) })
	for _, h := range hours[:statsTopHours] {
		if s.HoursUTC[h] > 0 {
			fmt.Fprintf(tw, "  %02d:00-%02d:00\t%7d\t%6s\n", h, (h+1)%24, s.HoursUTC[h], formatPercent(percent(s.HoursUTC[h], s.Transfers.Total)))
		}
	}

	if s.Transit.Sessions.Total > 0 {
		section("Transit relay: %d sessions", s.Transit.Sessions.Total)
		s.Transit.writeText(tw)
	}

	if c := s.Current; c != nil {
		section("Server (latest current record):")
		blur := "none"
		if c.BlurTime != nil {
			blur = fmt.Sprintf("%d s", *c.BlurTime)
		}
		fmt.Fprintf(tw, "  started\t%s\n", formatTime(c.Rebooted))
		fmt.Fprintf(tw, "  updated\t%s (up %s)\n", formatTime(c.Updated), formatSeconds(c.Uptime))
		fmt.Fprintf(tw, "  connections\t%d (subscribed to a mailbox)\n", c.ConnectionsWebsocket)
		fmt.Fprintf(tw, "  blur\t%s\n", blur)
	} else {
		section("Server: no current record")
	}
	tw.Flush()
	return w.err
}

// text lists the results present with their share, on one line.
func (rc *resultCounts) text() string {
	var parts []string
	for _, r := range rc.ordered() {
		parts = append(parts, fmt.Sprintf("%s %d (%s)", r, rc.Results[r], formatPercent(rc.Percent[r])))
	}
	return strings.Join(parts, "  ")
}

func (p percentiles) text() string {
	if p.Count == 0 {
		return "-"
	}
	return fmt.Sprintf("p50 %-6s  p90 %-6s  p99 %-6s", formatSeconds(*p.P50), formatSeconds(*p.P90), formatSeconds(*p.P99))
}

func orNone(p *string) string {
	if p == nil {
		return "(none)"
	}
	return *p
}

func formatPercent(p float64) string { return strconv.FormatFloat(p, 'f', 1, 64) + "%" }

func formatTime(t float64) string {
	return time.Unix(int64(math.Floor(t)), 0).UTC().Format("2006-01-02 15:04:05 UTC")
}

// formatSeconds writes a duration briefly: 0.4s, 12.5s, 3m07s, 2h05m, 3d04h.
func formatSeconds(sec float64) string {
	switch {
	case sec < 60:
		return strconv.FormatFloat(sec, 'f', 1, 64) + "s"
	case sec < 3600:
		s := int(sec)
		return fmt.Sprintf("%dm%02ds", s/60, s%60)
	case sec < 86400:
		m := int(sec / 60)
		return fmt.Sprintf("%dh%02dm", m/60, m%60)
	}
	h := int(sec / 3600)
	return fmt.Sprintf("%dd%02dh", h/24, h%24)
}

// errWriter keeps the first write error, so printing need not check each.
type errWriter struct {
	w   io.Writer
	err error
}

func (e *errWriter) Write(b []byte) (int, error) {
	if e.err != nil {
		return 0, e.err
	}
	n, err := e.w.Write(b)
	e.err = err
	return n, err
}
