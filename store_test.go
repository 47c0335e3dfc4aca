// store_test.go tests the journal (store.go): replaying every kind of
// line, torn and bad lines, the lock, compaction (the registry replayed
// from a compacted file equals the one compacted), a compaction that
// fails, and a disk that fails. It also holds the helpers that compare
// registries and drive clients from goroutines, which the process tests
// (process_test.go) share.
package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// registryState is what a registry holds, in a form that compares with
// reflect.DeepEqual. Apps that hold nothing are left out.
type registryState struct {
	Apps        map[string]appState
	Nameplates  int
	Mailboxes   int
	StoredBytes int64
}

type appState struct {
	Nameplates map[string]nameplateState
	Mailboxes  map[string]mailboxState
}

type nameplateState struct {
	Mailbox string
	Sides   []sideRecord
}

type mailboxState struct {
	ForNameplate bool
	Updated      float64
	Sides        []sideRecord
	Messages     []record
	Bytes        int
}

// stateOf copies what reg holds.
func stateOf(reg *registry) registryState {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	st := registryState{Apps: map[string]appState{}, Nameplates: reg.nameplateN, Mailboxes: reg.mailboxN, StoredBytes: reg.storedBytes}
	for id, a := range reg.apps {
		if len(a.nameplates) == 0 && len(a.mailboxes) == 0 {
			continue
		}
		as := appState{Nameplates: map[string]nameplateState{}, Mailboxes: map[string]mailboxState{}}
		for name, np := range a.nameplates {
			as.Nameplates[name] = nameplateState{Mailbox: np.mailbox.id, Sides: nameplateRecord(a, np).Sides}
		}
		for mid, mb := range a.mailboxes {
			ms := mailboxState{ForNameplate: mb.forNameplate, Updated: mb.updated, Sides: mailboxRecord(mb).Sides, Bytes: mb.bytes}
			for _, m := range mb.messages {
				ms.Messages = append(ms.Messages, *messageRecord(a.id, mb.id, m))
			}
			as.Mailboxes[mid] = ms
		}
		st.Apps[id] = as
	}
	return st
}

// diffStates lists the differences between two registry states.
func diffStates(want, got registryState) []string {
	var diffs []string
	add := func(format string, args ...any) { diffs = append(diffs, fmt.Sprintf(format, args...)) }
	if want.Nameplates != got.Nameplates || want.Mailboxes != got.Mailboxes || want.StoredBytes != got.StoredBytes {
		add("counts: nameplates %d, mailboxes %d, stored bytes %d; want %d, %d, %d",
			got.Nameplates, got.Mailboxes, got.StoredBytes, want.Nameplates, want.Mailboxes, want.StoredBytes)
	}
	for _, id := range unionKeys(want.Apps, got.Apps) {
		wa, wok := want.Apps[id]
		ga, gok := got.Apps[id]
		if !wok || !gok {
			add("app %q: present %v, want %v", id, gok, wok)
			continue
		}
		for _, name := range unionKeys(wa.Nameplates, ga.Nameplates) {
			if w, g := wa.Nameplates[name], ga.Nameplates[name]; !reflect.DeepEqual(w, g) {
				add("app %q nameplate %q:\n\tgot  %+v\n\twant %+v", id, name, g, w)
			}
		}
		for _, mid := range unionKeys(wa.Mailboxes, ga.Mailboxes) {
			if w, g := wa.Mailboxes[mid], ga.Mailboxes[mid]; !reflect.DeepEqual(w, g) {
				add("app %q mailbox %q:\n\tgot  %+v\n\twant %+v", id, mid, g, w)
			}
		}
	}
	return diffs
}

func unionKeys[V any](a, b map[string]V) []string {
	var keys []string
	for k := range a {
		keys = append(keys, k)
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	return keys
}

// expectState fails the test if got differs from want.
func expectState(t testing.TB, what string, want, got registryState) {
	t.Helper()
	if diffs := diffStates(want, got); len(diffs) > 0 {
		t.Fatalf("%s differs from what was expected:\n%s", what, strings.Join(diffs, "\n"))
	}
}

// logCapture is a logger that writes to the test's log and remembers
// each message with its level, so tests can check what was logged.
type logCapture struct {
	slog.Handler
	mu      *sync.Mutex
	entries *[]string // "LEVEL message"
}

func newLogCapture(t testing.TB) *logCapture {
	return &logCapture{Handler: testLogger(t).Handler(), mu: new(sync.Mutex), entries: new([]string)}
}

func (l *logCapture) Handle(ctx context.Context, r slog.Record) error {
	l.mu.Lock()
	*l.entries = append(*l.entries, r.Level.String()+" "+r.Message)
	l.mu.Unlock()
	return l.Handler.Handle(ctx, r)
}

func (l *logCapture) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &logCapture{Handler: l.Handler.WithAttrs(attrs), mu: l.mu, entries: l.entries}
}

func (l *logCapture) WithGroup(name string) slog.Handler {
	return &logCapture{Handler: l.Handler.WithGroup(name), mu: l.mu, entries: l.entries}
}

func (l *logCapture) logger() *slog.Logger { return slog.New(l) }

// count returns how many entries start with prefix ("WARN dropping").
func (l *logCapture) count(prefix string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, e := range *l.entries {
		if strings.HasPrefix(e, prefix) {
			n++
		}
	}
	return n
}

// openTestStore replays the journal at path into a new registry.
func openTestStore(t testing.TB, path string) (*registry, *store, *logCapture, error) {
	t.Helper()
	m := newMetrics()
	reg := newRegistry(defaultLimits, true, nil, nil, m)
	logs := newLogCapture(t)
	s, err := openStore(context.Background(), path, true, reg, logs.logger(), m)
	if s != nil {
		reg.journal = s
	}
	return reg, s, logs, err
}

// replayed returns the state the journal at path replays to.
func replayed(t testing.TB, path string) registryState {
	t.Helper()
	reg, s, _, err := openTestStore(t, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	return stateOf(reg)
}

// Journal lines of every kind, as the server writes them, and the state
// they replay to.
var (
	everyKindOfLine = []string{
		`{"kind":"mailbox","app":"a1","mailbox":"mb1","for_nameplate":true,"updated":100,"sides":[{"side":"s1","added":100,"opened":true}]}`,
		`{"kind":"nameplate","app":"a1","name":"4","mailbox":"mb1","sides":[{"side":"s1","added":100,"claimed":true}]}`,
		`{"kind":"message","app":"a1","mailbox":"mb1","side":"s1","phase":"pake","body":"aa","server_rx":101,"id":"m1"}`,
		`{"kind":"mailbox","app":"a1","mailbox":"mb1","for_nameplate":true,"updated":102,"sides":[{"side":"s1","added":100,"opened":true},{"side":"s2","added":102,"opened":true}]}`,
		`{"kind":"nameplate","app":"a1","name":"4","mailbox":"mb1","sides":[{"side":"s1","added":100,"claimed":true},{"side":"s2","added":102,"claimed":true}]}`,
		`{"kind":"message","app":"a1","mailbox":"mb1","side":"s2","phase":"version","body":"bbbb","server_rx":103,"id":{"n":[1,2]}}`,
		`{"kind":"nameplate","app":"a1","name":"4","mailbox":"mb1","sides":[{"side":"s1","added":100},{"side":"s2","added":102,"claimed":true}]}`,
		`{"kind":"nameplate","app":"a1","name":"4","mailbox":"","deleted":true}`,
		`{"kind":"mailbox","app":"a2","mailbox":"gone","updated":50,"sides":[{"side":"x","added":50,"opened":true}]}`,
		`{"kind":"nameplate","app":"a2","name":"9","mailbox":"gone","sides":[{"side":"x","added":50,"claimed":true}]}`,
		`{"kind":"message","app":"a2","mailbox":"gone","side":"x","phase":"pake","body":"cc","server_rx":51}`,
		`{"kind":"mailbox","app":"a2","mailbox":"gone","deleted":true}`,
		`{"kind":"mailbox","app":"a1","mailbox":"mb3","updated":200,"sides":[{"side":"s1","added":190,"mood":"happy"},{"side":"s3","added":195,"opened":true}]}`,
		`{"kind":"mailbox","app":"a3","mailbox":"mb4","updated":300,"sides":[{"side":"s","added":300,"opened":true}]}`,
		`{"kind":"nameplate","app":"a3","name":"12","mailbox":"mb4","sides":[{"side":"s","added":300,"claimed":true}]}`,
	}
	// everyKindBytes is what the two messages of everyKindLines count
	// against the limits (see message.size).
	everyKindBytes = message{side: "s1", phase: "pake", body: "aa", id: json.RawMessage(`"m1"`)}.size() +
		message{side: "s2", phase: "version", body: "bbbb", id: json.RawMessage(`{"n":[1,2]}`)}.size()

	everyKindState = registryState{
		Apps: map[string]appState{
			"a1": {Nameplates: map[string]nameplateState{}, Mailboxes: map[string]mailboxState{
				"mb1": {ForNameplate: true, Updated: 103,
					Sides: []sideRecord{{Side: "s1", Added: 100, Opened: true}, {Side: "s2", Added: 102, Opened: true}},
					Messages: []record{
						{Kind: kindMessage, App: "a1", Mailbox: "mb1", Side: "s1", Phase: "pake", Body: "aa", ServerRx: 101, ID: json.RawMessage(`"m1"`)},
						{Kind: kindMessage, App: "a1", Mailbox: "mb1", Side: "s2", Phase: "version", Body: "bbbb", ServerRx: 103, ID: json.RawMessage(`{"n":[1,2]}`)},
					},
					Bytes: everyKindBytes},
				"mb3": {Updated: 200, Sides: []sideRecord{{Side: "s1", Added: 190, Mood: "happy"}, {Side: "s3", Added: 195, Opened: true}}},
			}},
			"a3": {Nameplates: map[string]nameplateState{"12": {Mailbox: "mb4", Sides: []sideRecord{{Side: "s", Added: 300, Claimed: true}}}},
				Mailboxes: map[string]mailboxState{"mb4": {Updated: 300, Sides: []sideRecord{{Side: "s", Added: 300, Opened: true}}}}},
		},
		Nameplates:  1,
		Mailboxes:   3,
		StoredBytes: int64(everyKindBytes),
	}
)

func journalText(lines ...string) string { return strings.Join(lines, "\n") + "\n" }

// withChecksum returns a line of an older journal (without a newline) as
// the server now writes it, ending with its checksum.
func withChecksum(line string) string {
	b := appendChecksum([]byte(strings.TrimSuffix(line, "}")), 0)
	return string(b[:len(b)-1])
}

// flipByte returns s with the bits of its i-th byte (from the end, if i
// is negative) flipped as a failing disk might: one bit, kept printable.
func flipByte(s string, i int) string {
	if i < 0 {
		i += len(s)
	}
	b := []byte(s)
	b[i] ^= 0x01
	return string(b)
}

// TestReplayChecksum replays lines with checksums, alone and mixed with
// the lines of an older journal, and checks that one byte changed
// anywhere in a line with a checksum is caught, with the file and line
// named: in a string, in a number, in the checksum, in its tag.
func TestReplayChecksum(t *testing.T) {
	var checked []string
	for _, line := range everyKindOfLine {
		checked = append(checked, withChecksum(line))
	}
	for name, lines := range map[string][]string{
		"all with checksums": checked,
		"mixed":              append(append(slices.Clone(everyKindOfLine[:4]), checked[4:10]...), everyKindOfLine[10:]...),
	} {
		if st := replayed(t, writeJournal(t, journalText(lines...))); !reflect.DeepEqual(st, everyKindState) {
			t.Errorf("%s: replayed %+v", name, st)
		}
	}
	line := checked[2] // the first message
	for _, tc := range []struct {
		name  string
		at    int
		cause string
	}{
		{"in the body", strings.Index(line, `"aa"`) + 1, "does not match"},
		{"in the kind", strings.Index(line, "message"), "does not match"},
		{"in a time", strings.Index(line, "101"), "does not match"},
		{"in the checksum", -4, "does not match"},
		{"in the tag", -crcTailLen + 3, "tag is damaged"},
		{"a digit's case", -5, "does not match"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := flipByte(line, tc.at)
			if tc.name == "a digit's case" {
				bad = line[:len(line)+tc.at] + strings.ToUpper(line[len(line)+tc.at:len(line)+tc.at+1]) + line[len(line)+tc.at+1:]
				if bad == line {
					bad = flipByte(line, tc.at)
				}
			}
			path := writeJournal(t, journalText(checked[0], checked[1], bad, checked[3]))
			_, _, _, err := openTestStore(t, path)
			if want := fmt.Sprintf("%s:3: ", path); err == nil || !strings.HasPrefix(err.Error(), want) || !strings.Contains(err.Error(), tc.cause) {
				t.Fatalf("replaying %s: %v, want an error starting %q saying %q", bad, err, want, tc.cause)
			}
		})
	}
}

func writeJournal(t testing.TB, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "channel.jsonl")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestReplayEveryKind replays nameplate, mailbox and message lines, their
// updates and their deletions (a deleted mailbox takes its nameplates and
// messages with it), and checks the registry and its counters.
func TestReplayEveryKind(t *testing.T) {
	path := writeJournal(t, journalText(everyKindOfLine...))
	reg, s, logs, err := openTestStore(t, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	expectState(t, "replayed registry", everyKindState, stateOf(reg))
	if got := reg.metrics.nameplates.Value(); got != 1 {
		t.Errorf("nameplates gauge %d, want 1", got)
	}
	if got := reg.metrics.mailboxes.Value(); got != 3 {
		t.Errorf("mailboxes gauge %d, want 3", got)
	}
	if n := logs.count("WARN"); n != 0 {
		t.Errorf("%d warnings replaying a whole journal", n)
	}
}

// TestJournalReserve checks that the journal keeps zeros ahead of its
// lines while the server runs (journalReserveBytes), so that the file
// left by a kill -9 at that moment replays to every line with no
// warning, and that a clean close leaves the lines alone.
func TestJournalReserve(t *testing.T) {
	path := filepath.Join(t.TempDir(), "channel.jsonl")
	reg, s, _, err := openTestStore(t, path)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		reg.mu.Lock()
		reg.journal.mailbox(&mailbox{app: &app{id: "a"}, id: fmt.Sprintf("m%d", i), updated: 400})
		lsn := reg.journal.lastLSN()
		reg.mu.Unlock()
		if err := s.waitDurable(lsn, nil); err != nil {
			t.Fatal(err)
		}
	}
	running, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := bytes.IndexByte(running, 0)
	if lines <= 0 || bytes.Count(running[:lines], []byte("\n")) != 3 || running[lines-1] != '\n' {
		t.Fatalf("while running, the file is %d bytes with its first zero at %d; want 3 lines, then zeros", len(running), lines)
	}
	if len(running) < journalReserveBytes || len(bytes.Trim(running[lines:], "\x00")) != 0 {
		t.Fatalf("while running, the file is %d bytes, its lines %d; want zeros after them, up to at least %d", len(running), lines, journalReserveBytes)
	}

	crashed := writeJournal(t, string(running)) // as kill -9 leaves it
	creg, cs, logs, err := openTestStore(t, crashed)
	if err != nil {
		t.Fatal(err)
	}
	if got := len(stateOf(creg).Apps["a"].Mailboxes); got != 3 {
		t.Errorf("the file as a crash leaves it replays to %d mailboxes, want 3", got)
	}
	if n := logs.count("WARN"); n != 0 {
		t.Errorf("%d warnings replaying the file as a crash leaves it", n)
	}
	cs.close()
	if fi, _ := os.Stat(crashed); fi.Size() != int64(lines) {
		t.Errorf("after replay and close, that file is %d bytes, want its %d bytes of lines", fi.Size(), lines)
	}

	if err := s.close(); err != nil {
		t.Fatal(err)
	}
	if closed, _ := os.ReadFile(path); string(closed) != string(running[:lines]) {
		t.Errorf("after a clean close, the file is %d bytes, want its %d bytes of lines", len(closed), lines)
	}
}

// TestJournalReserveAfterCompaction checks that a reserve the disk had no
// room for is tried again on the file a compaction makes: a file size
// limit (RLIMIT_FSIZE) stops the first reserve short, as a full disk
// would, and once the limit is lifted and the journal compacted, the next
// line is written over a whole reserve of zeros. The limit holds for the
// whole test process while it lasts, so the test runs alone (it is not
// parallel) and lifts it as soon as the reserve has failed.
func TestJournalReserveAfterCompaction(t *testing.T) {
	path := filepath.Join(t.TempDir(), "channel.jsonl")
	reg, s, _, err := openTestStore(t, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	add := func(id string) {
		t.Helper()
		reg.mu.Lock()
		reg.journal.mailbox(&mailbox{app: &app{id: "a"}, id: id, updated: 400})
		lsn := reg.journal.lastLSN()
		reg.mu.Unlock()
		if err := s.waitDurable(lsn, nil); err != nil {
			t.Fatal(err)
		}
	}
	size := func() int64 {
		t.Helper()
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Size()
	}
	const limit = 256 << 10 // under journalReserveBytes
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_FSIZE, &old); err != nil {
		t.Fatal(err)
	}
	lifted := false
	lift := func() {
		if !lifted {
			lifted = true
			if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &old); err != nil {
				t.Fatal(err)
			}
		}
	}
	defer lift()
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &syscall.Rlimit{Cur: limit, Max: old.Max}); err != nil {
		t.Skipf("cannot limit the file size: %v", err)
	}
	add("m1")
	lift()
	if got := size(); got != limit {
		t.Fatalf("with room for %d bytes, the file is %d bytes; want the reserve stopped there", limit, got)
	}
	if _, err := s.compact(); err != nil {
		t.Fatal(err)
	}
	add("m2")
	if got := size(); got < journalReserveBytes {
		t.Errorf("after a compaction, with room again, the file is %d bytes; want a reserve of %d", got, journalReserveBytes)
	}
}

// TestReplayTornTail checks that bytes after the last newline, which a
// crash in the middle of a write leaves, are dropped with a warning and
// cut from the file, and so are bytes after the zeros the writer writes
// ahead of its lines that hold no whole line (whole sectors of a batch,
// as a power cut leaves them); that the zeros alone end the lines with no
// warning; and that a file ending on a newline is left alone.
func TestReplayTornTail(t *testing.T) {
	whole := journalText(everyKindOfLine...)
	zeros := string(make([]byte, 4096))
	toSector := string(make([]byte, 2*sectorBytes-len(whole)%sectorBytes)) // zeros to a sector's start after the lines
	for _, tc := range []struct {
		name, tail string
		torn       bool // a warning is expected
	}{
		{"partial line", `{"kind":"message","app":"a1","mailbox":"mb1","side":"s1","pha`, true},
		{"whole object without its newline", `{"kind":"message","app":"a1","mailbox":"mb1","side":"s1","phase":"x","body":"dd","server_rx":104}`, true},
		{"bad last line that ends with a newline", "{\"kind\":\"mess\n", true},
		{"last line whose checksum fails", flipByte(withChecksum(everyKindOfLine[2]), 60) + "\n", true},
		{"partial line, then zeros", `{"kind":"message","app":"a1","mai` + zeros, true},
		{"zeros", zeros, false},
		{"zeros, then a sector beginning with a newline", toSector + "\n", true},
		{"zeros, then part of a line", toSector + withChecksum(everyKindOfLine[2])[:40] + zeros, true},
		{"nothing", "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := writeJournal(t, whole+tc.tail)
			reg, s, logs, err := openTestStore(t, path)
			if err != nil {
				t.Fatal(err)
			}
			expectState(t, "replayed registry", everyKindState, stateOf(reg))
			wantWarnings := 0
			if tc.torn {
				wantWarnings = 1
			}
			if n := logs.count("WARN dropping torn last line"); n != wantWarnings {
				t.Errorf("%d warnings about a torn line, want %d", n, wantWarnings)
			}
			if data, _ := os.ReadFile(path); string(data) != whole {
				t.Fatalf("file after opening is %d bytes, want the %d whole lines' bytes", len(data), len(whole))
			}

			// What is appended next follows the last whole line.
			reg.mu.Lock()
			reg.journal.mailbox(&mailbox{app: &app{id: "a9"}, id: "new", updated: 400})
			lsn := reg.journal.lastLSN()
			reg.mu.Unlock()
			if err := s.waitDurable(lsn, nil); err != nil {
				t.Fatal(err)
			}
			if err := s.close(); err != nil {
				t.Fatal(err)
			}
			st := replayed(t, path)
			if _, ok := st.Apps["a9"].Mailboxes["new"]; !ok || st.Mailboxes != 4 {
				t.Fatalf("line appended after the torn tail was not replayed: %+v", st)
			}
		})
	}
}

// TestReplayLinesAfterZeros zeroes a block in the middle of a journal's
// lines, as a damaged disk (or a power cut with writes unsynced) can:
// start-up must refuse, naming where the lines end and where whole lines
// follow, and leave the file as it was, rather than drop what follows.
func TestReplayLinesAfterZeros(t *testing.T) {
	var lines []string
	for i := range 200 {
		lines = append(lines, withChecksum(fmt.Sprintf(`{"kind":"mailbox","app":"a","mailbox":"m%d","updated":%d}`, i, i+1)))
	}
	data := []byte(journalText(lines...))
	clear(data[4096:8192])
	path := writeJournal(t, string(data))
	_, _, _, err := openTestStore(t, path)
	if err == nil || !strings.Contains(err.Error(), "its lines end at byte ") || !strings.Contains(err.Error(), "but a whole line follows at byte ") {
		t.Fatalf("start-up on a journal with lines after zeros: %v, want an error naming both", err)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(after, data) {
		t.Errorf("the file was changed: %d bytes, was %d", len(after), len(data))
	}
}

// TestReplayNotAJournal checks that a file given as the journal by
// mistake is refused and left as it is, though a zero byte or the lack of
// a last newline would have made replay take what follows for a torn
// write: a compressed backup of a journal, the journal in UTF-16, plain
// text, and a journal whose zeros are followed by bytes no line holds, or
// by text that does not begin a sector. The zeros alone and a torn line
// are still dropped (TestReplayTornTail).
func TestReplayNotAJournal(t *testing.T) {
	text := journalText(everyKindOfLine...)
	var gz bytes.Buffer
	w := gzip.NewWriter(&gz)
	w.Write([]byte(text))
	w.Close()
	var utf16 []byte
	for _, c := range []byte(text) {
		utf16 = append(utf16, c, 0)
	}
	toSector := string(make([]byte, 2*sectorBytes-len(text)%sectorBytes)) // zeros to a sector's start after the lines
	for _, tc := range []struct {
		name string
		data []byte
		at   string // the byte named
	}{
		{"gzip", gz.Bytes(), "byte 0 (0x1f)"},
		{"UTF-16", utf16, "byte 2 (0x22)"},
		{"text", []byte("journal backup of Monday\n"), "byte 0 (0x6a)"},
		{"binary after the zeros", append([]byte(text+toSector), "\x01\x02\x03"...),
			fmt.Sprintf("byte %d (0x01)", len(text+toSector))},
		{"text after the zeros, not at a sector's start", []byte(text + string(make([]byte, 100)) + everyKindOfLine[0][:20]),
			fmt.Sprintf("byte %d (0x7b)", len(text)+100)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := writeJournal(t, string(tc.data))
			_, _, _, err := openTestStore(t, path)
			if err == nil || !strings.Contains(err.Error(), tc.at+" is not one the server writes there") {
				t.Fatalf("start-up on a %s file: %v, want an error naming %s", tc.name, err, tc.at)
			}
			if after, _ := os.ReadFile(path); !bytes.Equal(after, tc.data) {
				t.Errorf("the file was changed: %d bytes, was %d", len(after), len(tc.data))
			}
		})
	}
}

// TestReplayBadLine checks that a line that cannot be replayed, other than
// a torn last one, stops start-up with an error naming the file and line,
// and that the file is left exactly as it was.
func TestReplayBadLine(t *testing.T) {
	good := everyKindOfLine[:3]
	for _, tc := range []struct {
		name  string
		text  string
		line  int
		cause string
	}{
		{"not JSON", journalText(good[0], `{"kind":"mailbox",`, good[1]), 2, "unexpected end of JSON input"},
		{"empty line", journalText(good[0], ``, good[1]), 2, "unexpected end of JSON input"},
		{"not an object", journalText(good[0], good[1], `[1,2]`, good[2]), 3, "cannot unmarshal"},
		{"unknown kind", journalText(good[0], `{"kind":"channel","app":"a1","mailbox":"mb1"}`), 2, `unknown kind "channel"`},
		{"nameplate without its mailbox", journalText(good[1], good[0]), 1, `nameplate "4" points at unknown mailbox "mb1"`},
		{"message without its mailbox", journalText(good[2], good[0]), 1, `message for unknown mailbox "mb1"`},
		{"checksum fails", journalText(withChecksum(good[0]), flipByte(withChecksum(good[1]), 30), good[2]), 2, "does not match"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := writeJournal(t, tc.text)
			_, _, _, err := openTestStore(t, path)
			if err == nil {
				t.Fatal("opened a journal with a bad line")
			}
			if want := fmt.Sprintf("%s:%d: ", path, tc.line); !strings.HasPrefix(err.Error(), want) || !strings.Contains(err.Error(), tc.cause) {
				t.Fatalf("error %q, want it to start with %q and say %q", err, want, tc.cause)
			}
			if data, _ := os.ReadFile(path); string(data) != tc.text {
				t.Fatalf("the file was changed:\n%q\nwant\n%q", data, tc.text)
			}
			if names := dirNames(t, filepath.Dir(path)); !slices.Equal(names, []string{"channel.jsonl"}) {
				t.Fatalf("directory holds %v, want only the journal", names)
			}
			// The lock went with the failed attempt: fixed, the file opens.
			os.WriteFile(path, []byte(journalText(good...)), 0o600)
			if _, s, _, err := openTestStore(t, path); err != nil {
				t.Fatalf("after fixing the file: %v", err)
			} else {
				s.close()
			}
		})
	}
}

// TestReplayLargeJournal replays a journal of many chunks (see
// replayChunkBytes), one line longer than a chunk among them: every line
// is applied in order, a bad line is reported with its own number, and a
// torn tail is dropped.
func TestReplayLargeJournal(t *testing.T) {
	const n = 4000
	lines := []string{`{"kind":"mailbox","app":"a","mailbox":"m","updated":1,"sides":[{"side":"s","added":1,"opened":true}]}`}
	for i := range n {
		size := 300
		if i == n/2 {
			size = 3 * replayChunkBytes
		}
		lines = append(lines, fmt.Sprintf(`{"kind":"message","app":"a","mailbox":"m","side":"s","phase":"%d","body":%q,"server_rx":%d}`, i, hexBody(strconv.Itoa(i), size), i+2))
	}
	whole := journalText(lines...)
	if len(whole) < 8*replayChunkBytes {
		t.Fatalf("the journal is %d bytes, too few chunks", len(whole))
	}

	check := func(t *testing.T, reg *registry) {
		st := stateOf(reg)
		msgs := st.Apps["a"].Mailboxes["m"].Messages
		if len(msgs) != n {
			t.Fatalf("replayed %d messages, want %d", len(msgs), n)
		}
		for i, m := range msgs {
			if m.Phase != strconv.Itoa(i) || m.Body != hexBody(strconv.Itoa(i), len(m.Body)) || (i == n/2) != (len(m.Body) > 300) {
				t.Fatalf("message %d replayed as phase %q with %d bytes of body", i, m.Phase, len(m.Body))
			}
		}
	}
	t.Run("whole", func(t *testing.T) {
		reg, s, _, err := openTestStore(t, writeJournal(t, whole))
		if err != nil {
			t.Fatal(err)
		}
		defer s.close()
		check(t, reg)
	})
	t.Run("torn tail", func(t *testing.T) {
		path := writeJournal(t, whole+lines[len(lines)-1][:100])
		reg, s, logs, err := openTestStore(t, path)
		if err != nil {
			t.Fatal(err)
		}
		defer s.close()
		check(t, reg)
		if fi, _ := os.Stat(path); fi.Size() != int64(len(whole)) || logs.count("WARN dropping torn last line") != 1 {
			t.Fatalf("file is %d bytes, want %d, and one warning", fi.Size(), len(whole))
		}
	})
	for _, bad := range []int{2, n/2 + 1, n/2 + 2, n - 10} {
		t.Run(fmt.Sprintf("bad line %d", bad), func(t *testing.T) {
			broken := slices.Clone(lines)
			broken[bad-1] = `{"kind":"message","app":"a","mailbox":"m",`
			_, _, _, err := openTestStore(t, writeJournal(t, journalText(broken...)))
			if want := fmt.Sprintf(":%d: ", bad); err == nil || !strings.Contains(err.Error(), want) {
				t.Fatalf("error %v, want one naming line %d", err, bad)
			}
		})
	}
}

func dirNames(t testing.TB, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// TestReplayEmptyAndMissing checks that an empty journal replays to an
// empty registry, and that a missing one is created, private, and usable.
func TestReplayEmptyAndMissing(t *testing.T) {
	for _, tc := range []struct {
		name   string
		create bool
	}{{"empty", true}, {"missing", false}} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "channel.jsonl")
			if tc.create {
				os.WriteFile(path, nil, 0o600)
			}
			reg, s, logs, err := openTestStore(t, path)
			if err != nil {
				t.Fatal(err)
			}
			if st := stateOf(reg); len(st.Apps) != 0 || st.Mailboxes != 0 || st.Nameplates != 0 {
				t.Errorf("registry from an empty journal holds %+v", st)
			}
			if n := logs.count("WARN"); n != 0 {
				t.Errorf("%d warnings", n)
			}
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatalf("journal not created: %v", err)
			}
			if fi.Size() != 0 || fi.Mode().Perm() != 0o600 {
				t.Errorf("journal is %d bytes, mode %v; want 0 bytes, 0600", fi.Size(), fi.Mode().Perm())
			}
			reg.mu.Lock()
			reg.journal.mailbox(&mailbox{app: &app{id: "a"}, id: "m", updated: 1})
			reg.mu.Unlock()
			if err := s.close(); err != nil {
				t.Fatal(err)
			}
			if st := replayed(t, path); st.Mailboxes != 1 {
				t.Fatalf("the line written at close was not replayed: %+v", st)
			}
		})
	}
}

// TestJournalLock checks that a second server cannot open a journal in
// use, also after the first has compacted it (the new file is locked
// before it takes the name), and can once the first has closed it.
func TestJournalLock(t *testing.T) {
	path := writeJournal(t, journalText(everyKindOfLine...))
	_, first, _, err := openTestStore(t, path)
	if err != nil {
		t.Fatal(err)
	}
	_, _, _, err = openTestStore(t, path)
	if err == nil || !strings.Contains(err.Error(), "in use by another server") || !strings.Contains(err.Error(), path) {
		t.Fatalf("second open: %v, want a refusal naming the file", err)
	}
	before, _ := os.Stat(path)
	if _, err := first.compact(); err != nil {
		t.Fatal(err)
	}
	if after, _ := os.Stat(path); os.SameFile(before, after) {
		t.Fatal("compaction did not replace the file")
	}
	if _, _, _, err = openTestStore(t, path); err == nil || !strings.Contains(err.Error(), "in use by another server") {
		t.Fatalf("open after compaction: %v, want a refusal", err)
	}
	first.close()
	_, s, _, err := openTestStore(t, path)
	if err != nil {
		t.Fatalf("open after the first closed: %v", err)
	}
	s.close()
}

// TestCompactionLeftovers checks that start-up removes the temporary file
// of a compaction a crash interrupted, and nothing else.
func TestCompactionLeftovers(t *testing.T) {
	path := writeJournal(t, journalText(everyKindOfLine...))
	dir := filepath.Dir(path)
	for _, name := range []string{"channel.jsonl.compact-123456", "other.jsonl.compact-1", "channel.jsonl.bak"} {
		os.WriteFile(filepath.Join(dir, name), []byte("{half a journal"), 0o600)
	}
	reg, s, logs, err := openTestStore(t, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	expectState(t, "replayed registry", everyKindState, stateOf(reg))
	if names := dirNames(t, dir); !slices.Equal(names, []string{"channel.jsonl", "channel.jsonl.bak", "other.jsonl.compact-1"}) {
		t.Fatalf("directory holds %v", names)
	}
	if n := logs.count("WARN removing the file of an interrupted journal compaction"); n != 1 {
		t.Fatalf("%d warnings about the leftover, want 1", n)
	}
}

// TestJournalClosed checks that waiting for a line appended after the
// journal closed ends with an error instead of never.
func TestJournalClosed(t *testing.T) {
	reg, s, _, err := openTestStore(t, filepath.Join(t.TempDir(), "channel.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.close(); err != nil {
		t.Fatal(err)
	}
	reg.mu.Lock()
	s.mailbox(&mailbox{app: &app{id: "a"}, id: "m"})
	lsn := s.lastLSN()
	reg.mu.Unlock()
	if err := s.waitDurable(lsn, nil); !errors.Is(err, errJournalClosed) {
		t.Fatalf("waiting after close: %v, want errJournalClosed", err)
	}
}

// fakeClock is a clock tests move by hand. It starts at the real time.
type fakeClock struct{ ns atomic.Int64 }

func newFakeClock() *fakeClock {
	c := &fakeClock{}
	c.ns.Store(time.Now().UnixNano())
	return c
}

func (c *fakeClock) now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) advance(d time.Duration) { c.ns.Add(int64(d)) }

// set puts the clock at now, in Unix seconds.
func (c *fakeClock) set(now float64) { c.ns.Store(int64(now * 1e9)) }

// TestCompactionEquivalence runs a mix of transfers (finished, waiting,
// crowded, closed by one side, opened without a nameplate, in several
// apps), then checks that the registry replayed from the journal, and
// from the journal compacted, equals the server's.
func TestCompactionEquivalence(t *testing.T) {
	cfg := testConfig()
	cfg.channelDB = filepath.Join(t.TempDir(), "channel.jsonl")
	clock := newFakeClock()
	ts := startServerWith(t, cfg, testLogger(t), func(srv *server) { srv.clock = clock.now })
	tick := func() { clock.advance(1500 * time.Millisecond) }
	dial := func(app, side string) *testClient {
		c, _ := ts.dial(t)
		c.bind(app, side)
		return c
	}

	// A finished transfer: everything about it is deleted.
	a, b := dial("app1", "a"), dial("app1", "b")
	mb := a.expect(`{"type": "claim", "nameplate": "1"}`, "claimed")[0].str("mailbox")
	a.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb))
	tick()
	a.expect(`{"type": "add", "phase": "pake", "body": "aa01", "id": "x1"}`, "message")
	tick()
	b.expect(`{"type": "claim", "nameplate": "1"}`, "claimed")
	b.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb), "message")
	b.expect(`{"type": "add", "phase": "pake", "body": "bb01"}`, "message")
	a.sync()
	for _, c := range []*testClient{a, b} {
		c.expect(`{"type": "release"}`, "released")
		c.expect(fmt.Sprintf(`{"type": "close", "mailbox": %q, "mood": "happy"}`, mb), "closed")
	}

	// A waiting sender, joined later by a receiver who opens last: the
	// mailbox's activity time is after its last message.
	s1 := dial("app1", "s1")
	mb2 := s1.expect(`{"type": "claim", "nameplate": "2"}`, "claimed")[0].str("mailbox")
	s1.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb2))
	tick()
	s1.expect(`{"type": "add", "phase": "pake", "body": "5151", "id": [1, {"a": "<&>"}]}`, "message")
	tick()
	r1 := dial("app1", "r1")
	r1.expect(`{"type": "claim", "nameplate": "2"}`, "claimed")
	tick()
	r1.expect(fmt.Sprintf(`{"type": "open", "mailbox": %q}`, mb2), "message")
	s1.expect(`{"type": "release"}`, "released")

	// A third side crowds a nameplate; it is refused and not recorded.
	tick()
	c3 := dial("app1", "c3")
	c3.expectError(`{"type": "claim", "nameplate": "2"}`, "crowded")

	// A mailbox one side closed (with a mood) and the other still holds.
	tick()
	m1, m2 := dial("app2", "m1"), dial("app2", "m2")
	m1.expect(`{"type": "open", "mailbox": "direct"}`)
	m1.expect(`{"type": "add", "phase": "1", "body": "01"}`, "message")
	tick()
	m2.expect(`{"type": "open", "mailbox": "direct"}`, "message")
	m1.expect(`{"type": "close", "mood": "lonely"}`, "closed")

	// A nameplate released by its only side goes; its mailbox stays open.
	tick()
	l := dial("app3", "l")
	name := l.expect(`{"type": "allocate"}`, "allocated")[0].str("nameplate")
	l.expect(fmt.Sprintf(`{"type": "claim", "nameplate": %q}`, name), "claimed")
	l.expect(`{"type": "release"}`, "released")

	live := stateOf(ts.reg)
	if len(live.Apps) != 3 || live.Nameplates != 1 || live.Mailboxes != 3 {
		t.Fatalf("the script left %+v", live)
	}
	ts.stop()

	expectState(t, "registry replayed from the journal", live, replayed(t, cfg.channelDB))
	before, _ := os.ReadFile(cfg.channelDB)

	_, s, _, err := openTestStore(t, cfg.channelDB)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.compact(); err != nil {
		t.Fatal(err)
	}
	s.close()
	after, _ := os.ReadFile(cfg.channelDB)
	if len(after) >= len(before) || bytes.Contains(after, []byte(`"deleted"`)) {
		t.Errorf("compacted journal (%d bytes) is not smaller than the original (%d), or records deletions:\n%s", len(after), len(before), after)
	}
	expectState(t, "registry replayed from the compacted journal", live, replayed(t, cfg.channelDB))
}

// wsClient is a WebSocket client whose methods return errors instead of
// failing the test, for use in goroutines and with servers that are
// killed under it.
type wsClient struct {
	ws  *websocket.Conn
	raw net.Conn
}

func dialWS(url string) (*wsClient, error) {
	cfg, err := websocket.NewConfig(url, "http://localhost/")
	if err != nil {
		return nil, err
	}
	raw, err := net.DialTimeout("tcp", cfg.Location.Host, testTimeout)
	if err != nil {
		return nil, err
	}
	raw.SetDeadline(time.Now().Add(testTimeout))
	ws, err := websocket.NewClient(cfg, raw)
	if err != nil {
		raw.Close()
		return nil, err
	}
	c := &wsClient{ws: ws, raw: raw}
	if _, err := c.waitFor("welcome"); err != nil {
		raw.Close()
		return nil, err
	}
	return c, nil
}

func (c *wsClient) close() { c.raw.Close() }

func (c *wsClient) send(format string, args ...any) error {
	c.raw.SetWriteDeadline(time.Now().Add(testTimeout))
	_, err := c.ws.Write([]byte(fmt.Sprintf(format, args...)))
	return err
}

func (c *wsClient) next() (msg, error) { return readMsg(c.ws, c.raw) }

// waitFor reads until a message of type typ, skipping others; an error
// message is an error.
func (c *wsClient) waitFor(typ string) (msg, error) {
	for {
		m, err := c.next()
		if err != nil {
			return nil, err
		}
		if m.typ() == typ {
			return m, nil
		}
		if m.typ() == "error" {
			return nil, fmt.Errorf("server error %q", m.str("error"))
		}
	}
}

// do sends a message and waits for the answer of type typ.
func (c *wsClient) do(typ, format string, args ...any) (msg, error) {
	if err := c.send(format, args...); err != nil {
		return nil, err
	}
	return c.waitFor(typ)
}

// hexBody is a message body of n hex digits that tells which message it
// is, so a replayed body can be checked.
func hexBody(id string, n int) string {
	seed := fmt.Sprintf("%x", id)
	return strings.Repeat(seed, n/len(seed)+1)[:n]
}

// mailboxWorkload runs clients clients at once, each opening rounds
// mailboxes in turn and adding perMailbox messages of size bytes to each,
// waiting for every echo; it closes all its mailboxes but the last. It
// returns the first error.
func mailboxWorkload(url string, clients, rounds, perMailbox, size int) error {
	errs := make(chan error, clients)
	for i := range clients {
		go func() {
			errs <- func() error {
				c, err := dialWS(url)
				if err != nil {
					return err
				}
				defer func() { c.close() }()
				side := fmt.Sprintf("side%d", i)
				if err := c.send(`{"type": "bind", "appid": "load", "side": %q}`, side); err != nil {
					return err
				}
				for r := range rounds {
					mailbox := fmt.Sprintf("mb-%d-%d", i, r)
					if err := c.send(`{"type": "open", "mailbox": %q}`, mailbox); err != nil {
						return err
					}
					for n := range perMailbox {
						id := fmt.Sprintf("%s-%d", mailbox, n)
						if err := c.send(`{"type": "add", "phase": "%d", "body": %q, "id": %q}`, n, hexBody(id, size), id); err != nil {
							return err
						}
						for {
							m, err := c.waitFor("message")
							if err != nil {
								return err
							}
							if m.str("id") == id {
								break
							}
						}
					}
					if r < rounds-1 {
						if _, err := c.do("closed", `{"type": "close", "mood": "happy"}`); err != nil {
							return err
						}
						// A connection opens one mailbox: go on with a new one.
						c.close()
						if c, err = dialWS(url); err != nil {
							return err
						}
						if err := c.send(`{"type": "bind", "appid": "load", "side": %q}`, side); err != nil {
							return err
						}
					}
				}
				return nil
			}()
		}()
	}
	var first error
	for range clients {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// TestCompactionUnderLoad writes well over compactMinBytes, most of it
// soon dead, from several clients at once, so the writer compacts while
// lines are being appended; the registry replayed afterwards must equal
// the server's.
func TestCompactionUnderLoad(t *testing.T) {
	cfg := testConfig()
	cfg.channelDB = filepath.Join(t.TempDir(), "channel.jsonl")
	ts := startServer(t, cfg)
	if err := mailboxWorkload(ts.url, 4, 2, 7, 24_000); err != nil {
		t.Fatal(err)
	}
	if n := ts.metrics.compactions.Value(); n == 0 {
		t.Fatalf("%d bytes journaled without a compaction", ts.metrics.journalBytes.Value())
	}
	live := stateOf(ts.reg)
	if live.Mailboxes != 4 {
		t.Fatalf("%d mailboxes live, want 4", live.Mailboxes)
	}
	ts.stop()
	if fi, _ := os.Stat(cfg.channelDB); fi.Size() >= ts.metrics.journalBytes.Value() {
		t.Errorf("journal is %d bytes after compaction, of %d written", fi.Size(), ts.metrics.journalBytes.Value())
	}
	expectState(t, "registry replayed after compactions", live, replayed(t, cfg.channelDB))
}

// TestCompactionFailure makes compaction impossible (the journal's
// directory becomes immutable, so no file can be created in it, though
// the journal can still be appended to) and checks that the server keeps
// serving, logs the failure, and loses nothing.
func TestCompactionFailure(t *testing.T) {
	dir := t.TempDir()
	if out, err := exec.Command("chattr", "+i", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot make a directory immutable here: %v %s", err, out)
	}
	exec.Command("chattr", "-i", dir).Run()
	cfg := testConfig()
	cfg.channelDB = filepath.Join(dir, "channel.jsonl")
	logs := newLogCapture(t)
	ts := startServerWith(t, cfg, logs.logger(), nil)
	if out, err := exec.Command("chattr", "+i", dir).CombinedOutput(); err != nil {
		t.Fatalf("chattr: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("chattr", "-i", dir).Run() }) // runs before the directory is removed

	if err := mailboxWorkload(ts.url, 4, 2, 7, 24_000); err != nil {
		t.Fatalf("serving after failed compactions: %v", err)
	}
	if n := logs.count("ERROR journal compaction failed"); n == 0 {
		t.Fatal("no compaction failure logged")
	}
	if n := ts.metrics.compactions.Value(); n != 0 {
		t.Fatalf("%d compactions in an immutable directory", n)
	}
	if err := ts.healthy(); err != nil {
		t.Fatalf("unhealthy after a failed compaction: %v", err)
	}
	live := stateOf(ts.reg)
	ts.stop()
	exec.Command("chattr", "-i", dir).Run()
	expectState(t, "registry replayed after failed compactions", live, replayed(t, cfg.channelDB))
}

// connectionOf returns the server's connection bound with side.
func connectionOf(t testing.TB, srv *server, side string) *connection {
	t.Helper()
	srv.connsMu.Lock()
	defer srv.connsMu.Unlock()
	srv.reg.mu.Lock()
	defer srv.reg.mu.Unlock()
	for c := range srv.conns {
		if c.side == side {
			return c
		}
	}
	t.Fatalf("no connection bound as %q", side)
	return nil
}

// waitUntil polls cond until it holds, failing the test after testTimeout.
func waitUntil(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(testTimeout); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
	}
}

// breakJournal makes every write to the server's journal fail (its file
// descriptor is replaced by a read-only one) and every retry too (its
// directory becomes immutable, so no new file can be made in it). The
// function returned mends the directory, so the next retry succeeds.
func breakJournal(t testing.TB, srv *server, dir string) (mend func()) {
	t.Helper()
	if out, err := exec.Command("chattr", "+i", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot make a directory immutable here: %v %s", err, out)
	}
	mend = func() { exec.Command("chattr", "-i", dir).Run() }
	t.Cleanup(mend) // runs before the directory is removed
	ro, err := os.Open(srv.reg.journal.path)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	rc, err := srv.reg.journal.f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	rc.Control(func(fd uintptr) { err = syscall.Dup3(int(ro.Fd()), int(fd), 0) })
	if err != nil {
		t.Fatal(err)
	}
	return mend
}

// holdSyncs makes the journal's syncs wait for the test: waitStarted
// returns once a sync has begun (what says for what, if none does), and
// the sync then waits for a value on release, or for it to be closed
// (until the test ends).
func holdSyncs(t *testing.T, s *store) (waitStarted func(what string), release chan struct{}) {
	started := make(chan struct{})
	release = make(chan struct{})
	ended := make(chan struct{})
	t.Cleanup(func() { close(ended) }) // before the server's own cleanup, registered earlier
	s.mu.Lock()
	s.syncFile = func(f *os.File) error {
		select {
		case started <- struct{}{}:
		case <-ended:
		}
		select {
		case <-release:
		case <-ended:
		}
		return datasync(f)
	}
	s.mu.Unlock()
	waitStarted = func(what string) {
		t.Helper()
		select {
		case <-started:
		case <-time.After(testTimeout):
			t.Fatalf("no sync began %s", what)
		}
	}
	return waitStarted, release
}

// TestSyncPipelined holds a sync in flight and checks that group commit
// pipelines: a change that arrives meanwhile is written to the file at
// once, and made durable by the next sync, which begins as soon as the
// one in flight ends; a command that changes nothing is answered without
// waiting for any sync; and no reply leaves before the sync it depends on.
func TestSyncPipelined(t *testing.T) {
	cfg := testConfig()
	cfg.channelDB = filepath.Join(t.TempDir(), "channel.jsonl")
	ts := startServer(t, cfg)
	a, _ := ts.dial(t)
	a.bind("app", "a")
	a.expect(`{"type": "open", "mailbox": "m"}`)

	// An add journals one line; its sync is held.
	waitStarted, release := holdSyncs(t, ts.reg.journal)
	a.send(`{"type": "add", "phase": "1", "body": "01", "id": "first"}`)
	waitStarted("for the first add")
	a.send(`{"type": "add", "phase": "2", "body": "02", "id": "during"}`)
	waitUntil(t, "the second add's line is in the file while the first's sync is in flight", func() bool {
		data, _ := os.ReadFile(cfg.channelDB)
		return bytes.Contains(data, []byte(`"id":"during"`))
	})
	b, _ := ts.dial(t)
	b.bind("app", "b")
	b.expect(`{"type": "ping", "ping": 5}`, "pong")
	a.raw.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	var got []byte
	if err := websocket.Message.Receive(a.ws, &got); err == nil {
		t.Fatalf("while the first add's sync was in flight, the client got %s", got)
	}

	// expectAdd reads the ack and the echo of the add with this id.
	expectAdd := func(id string) {
		t.Helper()
		for _, want := range []string{"ack", "message"} {
			if m := a.next(); m.typ() != want || want == "message" && m.str("id") != id {
				t.Fatalf("after the sync of the add %q, the client got %v, want its %s", id, m, want)
			}
		}
	}
	release <- struct{}{}
	waitStarted("for the second add, once the first's sync ended")
	expectAdd("first")
	release <- struct{}{}
	expectAdd("during")
}

// TestRefusalWaitsForWhatItShows holds a sync in flight and checks that a
// refusal that tells of another connection's change not yet durable (its
// address holds too many nameplates, because of a claim whose sync is
// held) waits for that sync, while a refusal about the message itself
// does not.
func TestRefusalWaitsForWhatItShows(t *testing.T) {
	cfg := testConfig()
	cfg.channelDB = filepath.Join(t.TempDir(), "channel.jsonl")
	cfg.limits.MaxNameplatesPerAddr = 1
	ts := startServer(t, cfg)
	a, _ := ts.dial(t)
	a.bind("app", "a")
	b, _ := ts.dial(t) // from the same address
	b.bind("app", "b")

	waitStarted, release := holdSyncs(t, ts.reg.journal)
	a.send(`{"type": "claim", "nameplate": "5"}`)
	waitStarted("for the claim")
	b.expectError(`{"type": "bogus"}`, string(errUnknownType))
	b.send(`{"type": "allocate"}`)
	b.raw.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	var got []byte
	if err := websocket.Message.Receive(b.ws, &got); err == nil {
		t.Fatalf("while the claim's sync was in flight, the other client got %s", got)
	}
	close(release) // this sync and any after it: the claim's lines may take more than one
	if m := b.next(); m.typ() != "ack" {
		t.Fatalf("after the claim's sync, the other client got %v, want the ack it waited for", m)
	}
	if m := b.next(); m.typ() != "error" || m.str("error") != string(errAddrNameplates) {
		t.Fatalf("after the claim's sync, the other client got %v, want %q", m, errAddrNameplates)
	}
}

// TestJournalUnwritable makes the journal fail under a running server and
// checks the promise: nothing depending on an unwritten line reaches a
// client, not even when a control frame that depends on nothing is queued
// after it; changes are refused with a clear error and the health check
// fails, while pings are answered; and once the journal can be written
// again, the waiting reply is sent, service resumes, and the journal holds
// everything acknowledged, before and after.
func TestJournalUnwritable(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig()
	cfg.channelDB = filepath.Join(dir, "channel.jsonl")
	ts := startServer(t, cfg)
	a, _ := ts.dial(t)
	a.bind("app", "a")
	a.expect(`{"type": "open", "mailbox": "m"}`)
	a.expect(`{"type": "add", "phase": "1", "body": "01", "id": "kept"}`, "message")
	b, _ := ts.dial(t)
	b.bind("app", "b")

	mend := breakJournal(t, ts.server, dir)
	a.send(`{"type": "add", "phase": "2", "body": "02", "id": "waiting"}`)
	waitUntil(t, "the server is unhealthy", func() bool { return ts.healthy() != nil })
	if err := ts.healthy().Error(); !strings.Contains(err, "journal "+cfg.channelDB+": ") || !strings.Contains(err, "bad file descriptor") {
		t.Errorf("unhealthy because %q, want the journal's path and the cause", err)
	}

	// A frame depending on the unwritten line, followed by a pong, must
	// not be sent: not a byte reaches the client.
	c := connectionOf(t, ts.server, "b")
	c.waitFlushed()
	c.queue(outFrame{opcode: websocket.TextFrame, data: []byte(`{"type": "x"}`), lsn: ts.reg.journal.lastLSN()})
	c.queue(outFrame{opcode: websocket.PongFrame})

	// Other clients are told why changes are refused, and still answered
	// when they change nothing.
	d, _ := ts.dial(t)
	d.bind("app", "d")
	d.expect(`{"type": "ping", "ping": 7}`, "pong")
	for _, cmd := range []string{`{"type": "allocate"}`, `{"type": "claim", "nameplate": "5"}`,
		`{"type": "open", "mailbox": "other"}`} {
		d.expectError(cmd, string(errCannotSave))
	}
	if n := ts.metrics.clientErrors.Get(string(errCannotSave)); n == nil || n.String() != "3" {
		t.Errorf("refusals counted: %v, want 3", n)
	}
	// So are refusals that are about the message itself.
	d.expectError(`{"type": "bogus"}`, string(errUnknownType))
	if got := d.do(`{}`); len(got) != 1 || got[0].str("error") != string(errMissingType) {
		t.Fatalf("a message without a type got %v, want the error alone", got)
	}
	e, _ := ts.dial(t)
	e.expectError(`{"type": "list"}`, string(errMustBind))
	// A list may show changes not yet written: it waits with them.
	d.send(`{"type": "list"}`)
	a.raw.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	var got []byte
	if err := websocket.Message.Receive(a.ws, &got); err == nil {
		t.Fatalf("while the journal was unwritable, the client got %s", got)
	}
	b.raw.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if n, _ := b.raw.Read(make([]byte, 1)); n != 0 {
		t.Fatal("a frame queued after one that waits for the journal, a pong, was sent before it was durable")
	}
	d.raw.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if n, _ := d.raw.Read(make([]byte, 1)); n != 0 {
		t.Fatal("while the journal was unwritable, a list was answered")
	}

	mend()
	waitUntil(t, "the server is healthy again", func() bool { return ts.healthy() == nil })
	if m := b.next(); m.typ() != "x" {
		t.Fatalf("after the journal came back, the other client got %v, want the frame that waited", m)
	}
	if m := a.next(); m.typ() != "ack" {
		t.Fatalf("after the journal came back, the client got %v, want the ack it waited for", m)
	}
	if m := a.next(); m.typ() != "message" || m.str("body") != "02" {
		t.Fatalf("after the journal came back, the client got %v, want its message", m)
	}
	if m := d.next(); m.typ() != "ack" {
		t.Fatalf("after the journal came back, the lister got %v, want the ack it waited for", m)
	}
	if m := d.next(); m.typ() != "nameplates" {
		t.Fatalf("after the journal came back, the lister got %v, want the list it waited for", m)
	}
	d.expect(`{"type": "open", "mailbox": "m"}`, "message", "message")
	d.expect(`{"type": "add", "phase": "3", "body": "03", "id": "after"}`, "message")

	ts.stop()
	data, _ := os.ReadFile(cfg.channelDB)
	for _, id := range []string{"kept", "waiting", "after"} {
		if !bytes.Contains(data, []byte(`"id":"`+id+`"`)) {
			t.Errorf("the journal lacks message %q:\n%s", id, data)
		}
	}
}

// TestJournalUnwritableShutdown checks that a client leaving while its
// reply waits for an unwritable journal ends its connection, and that a
// shutdown then ends every connection and reports the journal's trouble.
func TestJournalUnwritableShutdown(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig()
	cfg.channelDB = filepath.Join(dir, "channel.jsonl")
	ts := startServer(t, cfg)
	var clients []*testClient
	for _, side := range []string{"a", "b"} {
		c, _ := ts.dial(t)
		c.bind("app", side)
		c.expect(`{"type": "open", "mailbox": "m"}`)
		clients = append(clients, c)
	}
	breakJournal(t, ts.server, dir)
	for _, c := range clients {
		c.send(`{"type": "add", "phase": "x", "body": "01"}`)
	}
	waitUntil(t, "the server is unhealthy", func() bool { return ts.healthy() != nil })
	clients[0].raw.Close()
	waitUntil(t, "the connection that left has ended", func() bool { return ts.metrics.connections.Value() == 1 })

	ts.http.Close()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	ts.closeConnections(ctx)
	if ctx.Err() != nil {
		t.Error("shutdown waited for the disk")
	}
	if err := ts.close(); err == nil || !strings.Contains(err.Error(), cfg.channelDB) {
		t.Errorf("close returned %v, want the journal's trouble", err)
	}
}

// TestAppendLine checks that the journal's own line encoder writes what
// encoding/json (without HTML escaping) writes for the same record, so
// replay, which uses encoding/json, reads back exactly what was written.
func TestAppendLine(t *testing.T) {
	for _, rec := range []record{
		{Kind: kindMailbox, App: "lothar.com/wormhole/text-or-file-xfer", Mailbox: "6veslconbjby2", ForNameplate: true,
			Updated: 1795715551.1482983, Sides: []sideRecord{{Side: "f3fb99ff3e", Added: 1795715551.1, Opened: true, Mood: "happy"}, {Side: "s2", Added: 2}}},
		{Kind: kindNameplate, App: "a", Name: "4", Mailbox: "mb", Sides: []sideRecord{{Side: "s", Added: 1e-7, Claimed: true}}},
		{Kind: kindNameplate, App: "a", Name: "4", Deleted: true},
		{Kind: kindMailbox, App: "a", Mailbox: "m", Deleted: true},
		{Kind: kindMessage, App: "a\"b\\c", Mailbox: "m", Side: "s\n\r\t\x01<&>é\u2028😀", Phase: "pake", Body: "aabb", ServerRx: 1e21, ID: json.RawMessage(`{"a":[1,"x"]}`)},
		{Kind: kindMessage, App: "", Mailbox: "", Side: "", Phase: "", Body: "", ServerRx: 0, ID: json.RawMessage(`null`)},
	} {
		var want bytes.Buffer
		enc := json.NewEncoder(&want)
		enc.SetEscapeHTML(false)
		enc.Encode(&rec)
		got := rec.appendLine(nil)
		if err := checkLine(got); err != nil || !bytes.Contains(got, []byte(crcTag)) {
			t.Errorf("appendLine wrote %s without a good checksum: %v", got, err)
		}
		var a, b any
		if err := json.Unmarshal(got, &a); err != nil {
			t.Fatalf("appendLine wrote invalid JSON %s: %v", got, err)
		}
		delete(a.(map[string]any), "crc")
		json.Unmarshal(want.Bytes(), &b)
		if !reflect.DeepEqual(a, b) || !bytes.HasSuffix(got, []byte("}\n")) {
			t.Errorf("appendLine:\n got %s\nwant %s", got, want.Bytes())
		}
	}
}

// TestRefuseSQLite checks that the reference server's SQLite files are
// refused, clearly and untouched, as journal and as usage log.
func TestRefuseSQLite(t *testing.T) {
	dir := t.TempDir()
	db := filepath.Join(dir, "relay.sqlite")
	content := append([]byte(sqliteHeader), make([]byte, 100)...)
	os.WriteFile(db, content, 0o600)
	for _, cfg := range []config{
		func() config { c := testConfig(); c.channelDB = db; return c }(),
		func() config { c := testConfig(); c.usageDB = db; return c }(),
	} {
		if _, err := newServer(cfg, testLogger(t)); err == nil || !strings.Contains(err.Error(), "is an SQLite database") {
			t.Errorf("newServer on an SQLite file: %v, want a refusal naming it", err)
		}
		if got, _ := os.ReadFile(db); !bytes.Equal(got, content) {
			t.Error("the SQLite file was changed")
		}
	}
}

// TestCompactionWhileAppending compacts the journal again and again while
// transfers go on changing the registry, so that lines are appended
// between each compaction's snapshot and its rename and must be carried
// over; the journal then replays to the registry's state.
func TestCompactionWhileAppending(t *testing.T) {
	path := filepath.Join(t.TempDir(), "channel.jsonl")
	srv := benchServer(t, path, true)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for n := 1; ; n++ {
			select {
			case <-stop:
				return
			default:
			}
			sessionTransfer(t, srv, n, n%3 == 0) // every third left waiting
		}
	}()
	before := srv.metrics.compactions.Value()
	for range 20 {
		if _, err := srv.reg.journal.compact(); err != nil {
			t.Error(err)
			break
		}
	}
	close(stop)
	<-done
	if got := srv.metrics.compactions.Value() - before; got != 20 {
		t.Errorf("%d compactions counted, want 20", got)
	}
	live := stateOf(srv.reg)
	if err := srv.close(); err != nil {
		t.Fatal(err)
	}
	if live.Mailboxes == 0 {
		t.Fatal("the transfers left nothing in the registry")
	}
	expectState(t, "registry replayed from the journal compacted while appending", live, replayed(t, path))
}
