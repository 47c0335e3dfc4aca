// store.go owns the channel journal (--channel-db): the file that lets the
// server restart, or crash, without losing anything a client was told.
//
// The journal is a JSON-lines file. Each line records the whole new state
// of one nameplate or mailbox (or that it was deleted), or one added
// message, so replaying the lines in order rebuilds the registry, and a
// compacted file (the live state only) uses the same lines.
//
// Every change is appended while the registry is locked, which gives it a
// log sequence number (LSN). A writer goroutine takes all the lines
// waiting and writes them with one write, at once, even while a sync is
// under way; a syncer goroutine makes everything written durable with one
// fdatasync, starts the next as soon as one ends, and wakes everyone
// waiting, so that those whose LSNs it covered go on (group commit,
// pipelined). So a line
// waits for the sync in flight when it came, at most, and then its own. A
// connection sends no frame until the journal is durable up to the LSN the
// frame depends on, so whatever a client has seen survives kill -9. The
// file is kept longer than its lines, with zeros (see
// journalReserveBytes), so that a sync need not write the file's size;
// the lines end at the first zero byte.
//
// When most of the file is dead, it is compacted without holding up the
// writer: the live state is snapshotted with the registry locked (which
// fixes the LSN it covers), and a compaction goroutine writes and fsyncs
// it to a new file beside the journal while the writer goes on appending
// to the old one. Every line appended after the snapshot is also kept
// aside (the carry), and the compactor copies it to the new file as it
// comes. Last, the writer, between two batches and once the sync in
// flight on the old file has ended, adds what is left of the carry,
// fsyncs, and renames the new file into place. Until the rename
// the old file is the journal and holds every acknowledged line; after
// it the new one holds the snapshot and every line after it, so a crash
// at any moment replays to the acknowledged state. If the new file cannot
// be made the old one is kept and grows.
//
// If a write or fsync of the journal fails (the disk is full, say), the
// journal is unwritable: nothing more is made durable, no frame that
// depends on it is sent, the protocol refuses changes (see writable), and
// the health check fails. What the file holds after a failed write or
// fsync is uncertain, so it is never synced or trusted again (a batch the
// writer had taken as the sync failed may still be written to it, and
// is covered, like everything else, by what replaces it): every
// journalRetryInterval the writer rewrites the live state to a new file,
// as a compaction does, and once that succeeds the journal is writable
// again and the replies that waited are sent.
//
// Each line ends with a checksum of itself (see crcTag), so that a line
// damaged on the disk is found at replay rather than believed.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// journalReserveBytes is how far ahead of its lines the journal file is
// extended with zeros. A line written over zeros already on the disk
// leaves the file's size as it was, so the sync that makes it durable
// (fdatasync) writes the data and, usually, no inode: on a virtio disk
// an appended line and its sync take 0.118 ms at the median, a line
// written over zeros 0.079 ms (BenchmarkFsync). Writing the zeros costs a
// slower sync once per reserve
// (1.7 ms for 1 MiB, against 2.3 ms per MiB in 256 KiB pieces), rare
// enough not to show in the replies' p99.
const journalReserveBytes = 1 << 20

// zeros is what the reserve is written from, a piece at a time: a
// buffer of 64 KiB, where the reserve is 1 MiB, keeps the pieces few
// without holding a megabyte for it.
var zeros [64 << 10]byte

// Compaction rewrites the journal with the live state only once the file
// has grown to compactFactor times the size of the last rewrite (or, after
// a start, to compactMinBytes), and is at least compactMinBytes. Mailboxes
// live minutes, so most lines are dead soon, and the factor keeps the
// rewriting cost proportional to the appending: the file stays under
// compactFactor times the live state, or compactMinBytes.
const (
	compactFactor   = 4
	compactMinBytes = 1 << 20
)

// compactSuffix names the temporary file a compaction writes beside the
// journal, followed by random characters. One left by a crash in the
// middle of a compaction is removed at the next start.
const compactSuffix = ".compact-"

// journalRetryInterval is how often an unwritable journal is tried again
// (by rewriting the live state to a new file): often enough that service
// comes back within a second or two of space coming back, and each try
// costs one snapshot, as a compaction does.
const journalRetryInterval = time.Second

// carryHandoverBytes is how small the carry must have become before the
// compactor hands the new file to the writer, which writes the rest and
// fsyncs it while replies wait: small enough to cost about one ordinary
// batch. maxCarryRounds bounds the copying when appends outpace it; the
// writer then takes what is left, however large.
const (
	carryHandoverBytes = 64 << 10
	maxCarryRounds     = 8
)

// compactSyncBytes is how much of a compaction's file is written between
// two fsyncs. The file system commits its metadata for all files at once,
// so an fsync of the journal that comes while a compaction's fsync is
// flushing tens of megabytes waits for them; in pieces of this size it
// waits for one at most (a few milliseconds).
const compactSyncBytes = 1 << 20

// maxSpareBuffer is the largest write buffer the writer keeps for reuse;
// a larger one, left by a burst, is returned to the garbage collector.
const maxSpareBuffer = 1 << 20

// Journal line kinds.
const (
	kindNameplate = "nameplate"
	kindMailbox   = "mailbox"
	kindMessage   = "message"
)

// record is one journal line. Which fields are used depends on Kind:
//
//	nameplate: App, Name, Mailbox (the mailbox it points at), Sides
//	mailbox:   App, Mailbox (its id), ForNameplate, Updated, Sides
//	message:   App, Mailbox, Side, Phase, Body, ServerRx, ID
//
// A nameplate or mailbox line with Deleted set records its deletion.
type record struct {
	Kind         string          `json:"kind"`
	App          string          `json:"app"`
	Name         string          `json:"name,omitempty"`
	Mailbox      string          `json:"mailbox"`
	Deleted      bool            `json:"deleted,omitempty"`
	ForNameplate bool            `json:"for_nameplate,omitempty"`
	Updated      float64         `json:"updated,omitempty"`
	Sides        []sideRecord    `json:"sides,omitempty"`
	Side         string          `json:"side,omitempty"`
	Phase        string          `json:"phase,omitempty"`
	Body         string          `json:"body,omitempty"`
	ServerRx     float64         `json:"server_rx,omitempty"`
	ID           json.RawMessage `json:"id,omitempty"`
}

// sideRecord is one side of a nameplate (Claimed) or mailbox (Opened, Mood).
type sideRecord struct {
	Side    string  `json:"side"`
	Added   float64 `json:"added"`
	Claimed bool    `json:"claimed,omitempty"`
	Opened  bool    `json:"opened,omitempty"`
	Mood    string  `json:"mood,omitempty"`
}

// store is the open journal. A nil *store keeps nothing: every method
// returns at once, and the server runs from memory alone.
type store struct {
	path  string
	fsync bool // false: write without fsync (--fsync=never), for benchmarks only
	log   *slog.Logger
	m     *metrics
	// snapshot returns the live state as journal lines with the LSN they
	// cover, and takes the lines not yet written, which it includes.
	snapshot func() (data []byte, lsn uint64, taken []byte)
	// snapshotCarrying returns the live state and starts the carry (see
	// beginCarry), which holds every line appended after it.
	snapshotCarrying func() liveState
	// syncFile makes what was written to a file durable: datasync, or in
	// a test a stand-in that holds a sync in flight.
	syncFile func(*os.File) error

	appended   atomic.Uint64 // LSN of the last line appended
	durable    atomic.Uint64 // LSN of the last line on disk
	unwritable atomic.Bool   // failing is set: see writable

	mu       sync.Mutex
	wake     sync.Cond // the writer waits here for lines, or for a sync to end
	advanced sync.Cond // connections wait here for durable to advance, or a retry
	pending  []byte    // lines appended and not yet written
	spare    []byte
	written  uint64        // LSN of the last line written to f (no more than durable after f was replaced)
	syncWake sync.Cond     // the syncer waits here for lines written
	syncing  bool          // the syncer is syncing f
	syncDone bool          // the writer has exited, and so does the syncer
	failing  error         // why the journal is unwritable; nil when it is not
	failedAt time.Time     // when it became unwritable
	closing  bool          // close has begun: the writer writes what is pending and exits
	stop     chan struct{} // closed when close begins, to end a wait between retries
	closed   bool          // the writer has exited: nothing appended from now on is written

	carrying  bool        // a compaction is underway: appended lines are also kept in carry
	carry     []byte      // lines appended since the compaction's snapshot, not yet in its file
	compacted *compaction // a compaction ready for the writer to finish (or discard)
	// compactWanted asks the writer for a compaction now; the waiters
	// are told the outcome of the next compaction to begin.
	compactWanted  bool
	compactWaiters []chan compactResult

	compacting bool // a compaction goroutine is running; used by the writer only

	f         *os.File // open and locked; replaced and written by the writer only, synced by the syncer
	size      int64    // bytes of lines in f
	allocated int64    // bytes in f: its lines, then zeros (see journalReserveBytes)
	reserveAt int64    // after a reserve failed, the size from which one is tried again; 0 for a new file
	compactAt int64    // the size at which f is next compacted
	done      chan struct{}
}

// errJournalClosed is what waiting for a line appended after the journal
// was closed returns: it will never be written.
var errJournalClosed = errors.New("journal closed")

// openStore opens (or creates) the journal at path, locks it against a
// second server, replays it into reg, and starts the writer. A torn last
// line, left by a crash in the middle of a write, is dropped, and so is a
// last line whose checksum fails; any other unreadable line is an error
// naming the file and line, and the file is left as it is. Replay stops
// if ctx ends. Nothing here needs free space: on a full disk the journal
// opens unwritable (see writable) and is retried.
func openStore(ctx context.Context, path string, fsync bool, reg *registry, log *slog.Logger, m *metrics) (*store, error) {
	if err := notSQLite(path, "--channel-db"); err != nil {
		return nil, err
	}
	f, created, err := openJournal(path)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*store, error) {
		f.Close()
		return nil, journalError(path, err)
	}
	dir := filepath.Dir(path)
	if created { // a new file's name is durable only once its directory is synced
		if err := syncDir(dir); err != nil {
			return fail(err)
		}
	}
	full, err := removeCompactionLeftovers(path, log)
	if err != nil {
		return nil, errors.Join(err, f.Close())
	}
	r, err := replay(ctx, f, path, reg)
	if err != nil {
		return nil, errors.Join(err, f.Close())
	}
	end, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return fail(err)
	}
	if r.torn != nil {
		log.Warn("dropping torn last line of the journal", "file", path, "bytes", r.dropped, "why", r.torn.Error())
	}
	good := r.good
	if end != good { // a torn line, or the zeros written ahead, or both
		if err := f.Truncate(good); err != nil {
			return fail(err)
		}
	}
	s := &store{path: path, fsync: fsync, log: log, m: m, syncFile: datasync, f: f, size: good, allocated: good,
		compactAt: compactMinBytes, stop: make(chan struct{}), done: make(chan struct{})}
	s.wake.L, s.advanced.L, s.syncWake.L = &s.mu, &s.mu, &s.mu
	s.snapshot = func() ([]byte, uint64, []byte) { return reg.snapshot(s) }
	s.snapshotCarrying = func() liveState { live, _ := reg.liveStateAt(s.beginCarry); return live }
	if full != nil {
		s.failLocked(full)
	}
	go s.run()
	return s, nil
}

// journalError names the journal's own path in err, in place of the path
// of whichever file (a compaction's) the failed call used.
func journalError(path string, err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		err = fmt.Errorf("%s: %w", pe.Op, pe.Err)
	}
	return fmt.Errorf("journal %s: %w", path, err)
}

// isDiskFull reports whether err says the file system, or the user's
// quota on it, is full.
func isDiskFull(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}

// openJournal opens the journal file, creating it if it does not exist,
// and locks it. A compaction by a server holding the lock replaces the
// file under its name, so once the lock is taken the name must still lead
// to the file locked; if it does not, the file now under the name is
// opened instead.
func openJournal(path string) (f *os.File, created bool, err error) {
	for {
		f, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		created = err == nil
		if errors.Is(err, fs.ErrExist) {
			f, err = os.OpenFile(path, os.O_RDWR, 0o600)
			if errors.Is(err, fs.ErrNotExist) {
				continue // removed between the two opens
			}
		}
		if err != nil {
			return nil, false, startupError("journal (--channel-db)", path, err)
		}
		if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
			f.Close()
			if err == nil {
				err = fmt.Errorf("journal (--channel-db) %s is not a regular file (%s)", path, fi.Mode().Type())
			}
			return nil, false, err
		}
		if err := lockFile(f); err != nil {
			f.Close()
			if errors.Is(err, syscall.EWOULDBLOCK) {
				return nil, false, fmt.Errorf("journal %s is in use by another server (it holds the file's lock); two servers cannot share one journal", path)
			}
			return nil, false, fmt.Errorf("locking journal %s: %w", path, err)
		}
		held, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, false, err
		}
		if named, err := os.Stat(path); err == nil && os.SameFile(held, named) {
			return f, created, nil
		} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
			f.Close()
			return nil, false, err
		}
		f.Close()
	}
}

// startupError says why a file named on the command line cannot be
// opened, naming it and, if that is the trouble, its missing directory.
func startupError(what, path string, err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	if errors.Is(err, fs.ErrNotExist) {
		dir := filepath.Dir(path)
		if _, derr := os.Stat(dir); derr != nil {
			return fmt.Errorf("%s %s: the directory %s does not exist", what, path, dir)
		}
	}
	return fmt.Errorf("%s %s: %w", what, path, err)
}

// sqliteHeader starts every SQLite database file, the format of the
// reference server's --channel-db and --usage-db.
const sqliteHeader = "SQLite format 3\x00"

// notSQLite refuses a file that is an SQLite database. Someone moving from
// the reference server may keep its file names; this server must then
// neither fail on the file obscurely nor append lines to it.
func notSQLite(path, flag string) error {
	if fi, err := os.Stat(path); err != nil || !fi.Mode().IsRegular() {
		return nil // missing (it will be created), a device or pipe, or the open that follows says why
	}
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	head := make([]byte, len(sqliteHeader))
	if n, _ := io.ReadFull(f, head); n == len(head) && string(head) == sqliteHeader {
		why := "channels live minutes"
		if flag == "--usage-db" {
			why = "keep the old database to read with the reference's tools"
		}
		return fmt.Errorf("%s is an SQLite database, as the reference server writes; this server keeps %s in JSON lines: give it a new file (nothing needs moving: %s)", path, flag, why)
	}
	return nil
}

// lockFile takes an advisory lock on f, refused at once if another
// process holds it.
func lockFile(f *os.File) error {
	return syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
}

// removeCompactionLeftovers deletes the temporary files of compactions
// that a crash interrupted (they were never renamed, so they hold nothing
// the journal needs), and checks that a new file can be made beside the
// journal, as compaction must: better to refuse to start than to find out
// when the journal has grown. A full disk is no reason not to start: it
// is returned as full, and the journal starts unwritable.
func removeCompactionLeftovers(path string, log *slog.Logger) (full, err error) {
	dir, prefix := filepath.Dir(path), filepath.Base(path)+compactSuffix
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, journalError(path, err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) && e.Type().IsRegular() {
			log.Warn("removing the file of an interrupted journal compaction", "file", filepath.Join(dir, e.Name()))
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil {
				return nil, journalError(path, err)
			}
		}
	}
	probe, err := os.CreateTemp(dir, prefix+"*")
	if isDiskFull(err) {
		return journalError(path, err), nil
	}
	if err != nil {
		return nil, fmt.Errorf("journal %s: compaction needs to create files in %s: %w", path, dir, errors.Unwrap(err))
	}
	probe.Close()
	return nil, os.Remove(probe.Name())
}

// replayChunkBytes is how much of the journal is decoded as one piece:
// large enough that handing pieces between goroutines costs little.
const replayChunkBytes = 256 << 10

// replayChunk is a piece of the journal: whole lines, and what decoding
// them gave.
type replayChunk struct {
	firstLine int    // the number of its first line in the file
	data      []byte // whole lines, each ending with a newline
	recs      []record
	err       error // why line firstLine+len(recs) could not be decoded
	errAt     int   // where in data that line starts
	decoded   chan struct{}
}

// decode decodes the chunk's lines, up to the first that fails.
func (c *replayChunk) decode() {
	defer close(c.decoded)
	for off := 0; off < len(c.data); {
		line := c.data[off : off+bytes.IndexByte(c.data[off:], '\n')+1]
		var rec record
		if c.err = checkLine(line); c.err == nil {
			c.err = json.Unmarshal(line, &rec)
		}
		if c.err != nil {
			c.errAt = off
			return
		}
		c.recs = append(c.recs, rec)
		off += len(line)
	}
}

// replayEnd is where replay found the journal's lines to end.
type replayEnd struct {
	good    int64 // the offset after the last good line
	dropped int64 // bytes after it that are not zeros: a torn write
	torn    error // what was wrong with them; nil if there are none
}

// replay applies every whole line of the journal to reg and says where
// they end. The lines end at the first zero byte, where the zeros the
// writer wrote ahead begin (see journalReserveBytes): no line holds one.
// Bytes after the last newline are a torn write. A last line that cannot
// be decoded (or whose checksum fails) is taken for a torn write too;
// such a line anywhere else is an error. After the zeros there should be
// nothing: bytes that hold no line are a torn write too, but a line with
// a good checksum there means lines were lost before it (a damaged disk,
// or a power cut with writes unsynced), and is an error that names the
// offsets. Bytes are dropped as a torn write only if the server could have
// written them (see notWritten); any others mean the file is not a
// journal (a compressed backup given by mistake, say), and are an error
// too, so that such a file is left as it is rather than cut. Replay
// stops, with an error, when ctx ends.
//
// Decoding the JSON is most of the work, so it is spread over the CPUs:
// the file is read in chunks of whole lines, decoded at once, and applied
// in order, so that the first bad line is the one reported. Measured with
// BenchmarkReplay (100k stored messages, 2 cores), the server restarts in
// 0.64 s from the journal as written and 0.51 s compacted, where one CPU
// takes 1.68 s and 0.91 s: the difference between a restart under a
// second and over it.
func replay(ctx context.Context, f *os.File, path string, reg *registry) (replayEnd, error) {
	todo := make(chan *replayChunk)                             // to the decoders
	inOrder := make(chan *replayChunk, 2*runtime.GOMAXPROCS(0)) // to the applier, below
	stop := make(chan struct{})
	var (
		readErr  error
		zerosAt  int64 // where the first zero byte is; the file's end if there is none
		zeros    bool  // a zero byte was found
		leftover int   // bytes after the last newline
	)
	var wg sync.WaitGroup
	defer wg.Wait() // nothing reads f once replay returns
	defer close(stop)
	wg.Add(1)
	go func() { // the reader
		defer wg.Done()
		defer close(inOrder)
		defer close(todo)
		buf, line := make([]byte, 0, replayChunkBytes), 1
		for {
			n, err := io.ReadFull(f, buf[len(buf):cap(buf)])
			if i := bytes.IndexByte(buf[len(buf):len(buf)+n], 0); i >= 0 {
				n, err, zeros = i, io.EOF, true // the zeros written ahead: the lines end here
			}
			zerosAt += int64(n)
			buf = buf[:len(buf)+n]
			if end := bytes.LastIndexByte(buf, '\n') + 1; end > 0 {
				c := &replayChunk{firstLine: line, data: buf[:end], decoded: make(chan struct{})}
				line += bytes.Count(c.data, []byte{'\n'})
				select {
				case inOrder <- c:
				case <-stop:
					return
				}
				select {
				case todo <- c:
				case <-stop:
					return
				}
				buf = append(make([]byte, 0, max(replayChunkBytes, 2*(len(buf)-end))), buf[end:]...)
			} else if len(buf) == cap(buf) { // a line longer than a chunk
				buf = append(make([]byte, 0, 2*cap(buf)), buf...)
			}
			if err == io.EOF || err == io.ErrUnexpectedEOF {
				leftover = len(buf) // it has no newline
				return
			}
			if err != nil {
				readErr = err
				return
			}
		}
	}()
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() { // a decoder
			defer wg.Done()
			for c := range todo {
				c.decode()
			}
		}()
	}

	reg.mu.Lock()
	defer reg.mu.Unlock()
	var r replayEnd
	for c := range inOrder {
		if r.torn != nil { // the bad line was not the last
			return replayEnd{}, r.torn
		}
		if err := ctx.Err(); err != nil {
			return replayEnd{}, fmt.Errorf("replay of the journal %s stopped at line %d: %w", path, c.firstLine, err)
		}
		<-c.decoded
		for i := range c.recs {
			if err := reg.restoreLocked(&c.recs[i]); err != nil {
				return replayEnd{}, fmt.Errorf("%s:%d: %v", path, c.firstLine+i, err)
			}
		}
		if c.err != nil {
			r.torn = fmt.Errorf("%s:%d: %v", path, c.firstLine+len(c.recs), c.err)
			if bytes.IndexByte(c.data[c.errAt:], '\n')+1 != len(c.data)-c.errAt {
				return replayEnd{}, r.torn // not the chunk's last line
			}
			r.good += int64(c.errAt)
			continue
		}
		r.good += int64(len(c.data))
	}
	if readErr != nil {
		return replayEnd{}, journalError(path, readErr)
	}
	r.dropped = zerosAt - r.good
	if r.torn == nil && leftover > 0 {
		r.torn = errors.New("no newline at the end")
	}
	if r.dropped > 0 {
		torn := make([]byte, r.dropped)
		if _, err := f.ReadAt(torn, r.good); err != nil {
			return replayEnd{}, journalError(path, err)
		}
		if at := notWritten(torn, true); at >= 0 {
			return replayEnd{}, notAJournal(path, r.good+int64(at), torn[at], r.good)
		}
	}
	if zeros {
		after, lineAt, err := afterZeros(f, path, zerosAt)
		switch {
		case err != nil:
			return replayEnd{}, err
		case lineAt >= 0:
			return replayEnd{}, fmt.Errorf("journal %s: its lines end at byte %d, where zeros begin, but a whole line follows at byte %d: "+
				"lines were lost (a damaged disk, or a power cut before a sync). The file is left as it is; to start from the lines "+
				"before byte %d, keep a copy, then truncate the file there (truncate -s %d %s)", path, zerosAt, lineAt, zerosAt, zerosAt, path)
		case after > 0:
			r.dropped += after
			if r.torn == nil {
				r.torn = fmt.Errorf("zeros at byte %d, then %d bytes that hold no whole line", zerosAt, after)
			}
		}
	}
	return r, nil
}

// afterZeros reads the journal at path from the first zero byte, at off,
// to its end, and returns how many bytes are not zeros, and where one of
// them starts a whole line with a good checksum (-1 if none does). A byte
// the server could not have written there (see notWritten) is an error
// that names it. Lines hold no zero byte, so what a torn write leaves
// after the zeros is whole sectors of a batch: each run of bytes begins a
// sector.
func afterZeros(f *os.File, path string, off int64) (after, lineAt int64, err error) {
	rest, err := io.ReadAll(io.NewSectionReader(f, off, math.MaxInt64-off))
	if err != nil {
		return 0, -1, journalError(path, err)
	}
	for i := 0; i < len(rest); {
		if rest[i] == 0 {
			i++
			continue
		}
		if rest[i-1] == 0 && (off+int64(i))%sectorBytes != 0 { // not the start of a sector the disk wrote whole
			return 0, -1, notAJournal(path, off+int64(i), rest[i], off)
		}
		end := bytes.IndexAny(rest[i:], "\x00\n")
		if end < 0 {
			end = len(rest) - i
		} else if rest[i+end] == '\n' {
			if checksummed(rest[i : i+end+1]) {
				return after, off + int64(i), nil
			}
			end++ // the newline is dropped with the rest
		}
		if at := notWritten(rest[i:i+end], false); at >= 0 {
			return 0, -1, notAJournal(path, off+int64(i+at), rest[i+at], off)
		}
		after += int64(end)
		i += end
	}
	return after, -1, nil
}

// sectorBytes is the smallest piece a disk writes whole: a write cut off
// by a power cut leaves each sector old or new.
const sectorBytes = 512

// lineStart is how every journal line begins (see appendLine).
const lineStart = `{"kind":`

// notWritten returns the index of the first byte in b that the server
// could not have written there, or -1 if there is none: lines are JSON
// with control characters escaped, so of the bytes below 0x20 they hold
// only the newline that ends each; and, if b begins a line (startsLine),
// it begins as every line does.
func notWritten(b []byte, startsLine bool) int {
	if startsLine {
		for i := range min(len(b), len(lineStart)) {
			if b[i] != lineStart[i] {
				return i
			}
		}
	}
	for i, c := range b {
		if c < 0x20 && c != '\n' {
			return i
		}
	}
	return -1
}

// notAJournal is the error for a byte, at off, that the server could not
// have written (see notWritten), in a file whose lines end at good.
func notAJournal(path string, off int64, b byte, good int64) error {
	return fmt.Errorf("journal %s: byte %d (%#02x) is not one the server writes there, so the file is not a channel journal, "+
		"or is damaged. The file is left as it is; if it is the journal, to start from the lines before byte %d, keep a copy, "+
		"then truncate the file there (truncate -s %d %s)", path, off, b, good, good, path)
}

// checksummed reports whether a line ends with a checksum, and it matches.
func checksummed(line []byte) bool {
	return len(line) >= crcTailLen && bytes.HasPrefix(line[len(line)-crcTailLen:], []byte(crcTag)) && checkLine(line) == nil
}

// Every journal line ends with its checksum: crcTag, then the CRC-32C of
// the line's bytes before the tag in eight lowercase hex digits, then
// `"}` and the newline. The line stays one JSON object (the field is
// "crc", which replay's decoding ignores), readable as before.
const (
	crcTag     = `,"crc":"`
	crcTailLen = len(crcTag) + 8 + len("\"}\n")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// appendChecksum ends the line that starts at b[start:] (its fields
// written, its closing brace not) with its checksum.
func appendChecksum(b []byte, start int) []byte {
	sum := crc32.Checksum(b[start:], castagnoli)
	return append(appendHex32(append(b, crcTag...), sum), "\"}\n"...)
}

// appendHex32 appends v as eight lowercase hex digits.
func appendHex32(b []byte, v uint32) []byte {
	const hex = "0123456789abcdef"
	for shift := 28; shift >= 0; shift -= 4 {
		b = append(b, hex[v>>shift&15])
	}
	return b
}

// checkLine checks a line's checksum. A line without one was written
// before the journal had checksums, and passes. So that a byte flipped in
// the tag itself does not make a line pass for one of those, a tail that
// differs from the tag by a single byte counts as a damaged checksum.
func checkLine(line []byte) error {
	if len(line) < crcTailLen {
		return nil
	}
	body, tail := line[:len(line)-crcTailLen], line[len(line)-crcTailLen:]
	tag, digits := tail[:len(crcTag)], tail[len(crcTag):len(crcTag)+8]
	differ := 0
	for i := range tag {
		if tag[i] != crcTag[i] {
			differ++
		}
	}
	if differ > 1 || string(tail[len(tail)-3:]) != "\"}\n" {
		return nil // a line of an older journal
	}
	if differ != 0 {
		return errors.New("the checksum's tag is damaged")
	}
	var want [8]byte
	if appendHex32(want[:0], crc32.Checksum(body, castagnoli)); string(want[:]) != string(digits) {
		return fmt.Errorf("checksum %s does not match the line's (%s)", digits, want[:])
	}
	return nil
}

// appendLine appends the record as one journal line: JSON with the
// fields its kind uses, empty ones left out, as encoding/json would write
// the struct, but without reflection (the journal is written for every
// change, with the registry locked). Strings and times are written as
// the server's messages write them (appendPyString, appendPyFloat in
// protocol.go), which any JSON reader takes back unchanged; a message's
// id (raw JSON, kept compact by the registry) is written byte for byte,
// so a message replayed after a restart is the same as when it was first
// delivered. The line ends with its
// checksum (see crcTag).
func (rec *record) appendLine(b []byte) []byte {
	start := len(b)
	b = appendPyString(append(b, `{"kind":`...), rec.Kind)
	b = appendPyString(append(b, `,"app":`...), rec.App)
	if rec.Name != "" {
		b = appendPyString(append(b, `,"name":`...), rec.Name)
	}
	b = appendPyString(append(b, `,"mailbox":`...), rec.Mailbox)
	if rec.Deleted {
		b = append(b, `,"deleted":true`...)
	}
	if rec.ForNameplate {
		b = append(b, `,"for_nameplate":true`...)
	}
	if rec.Updated != 0 {
		b = appendPyFloat(append(b, `,"updated":`...), rec.Updated)
	}
	if len(rec.Sides) > 0 {
		b = append(b, `,"sides":[`...)
		for i, side := range rec.Sides {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendPyString(append(b, `{"side":`...), side.Side)
			b = appendPyFloat(append(b, `,"added":`...), side.Added)
			if side.Claimed {
				b = append(b, `,"claimed":true`...)
			}
			if side.Opened {
				b = append(b, `,"opened":true`...)
			}
			if side.Mood != "" {
				b = appendPyString(append(b, `,"mood":`...), side.Mood)
			}
			b = append(b, '}')
		}
		b = append(b, ']')
	}
	if rec.Side != "" {
		b = appendPyString(append(b, `,"side":`...), rec.Side)
	}
	if rec.Phase != "" {
		b = appendPyString(append(b, `,"phase":`...), rec.Phase)
	}
	if rec.Body != "" {
		b = appendPyString(append(b, `,"body":`...), rec.Body)
	}
	if rec.ServerRx != 0 {
		b = appendPyFloat(append(b, `,"server_rx":`...), rec.ServerRx)
	}
	if len(rec.ID) > 0 {
		b = append(append(b, `,"id":`...), rec.ID...)
	}
	return appendChecksum(b, start)
}

// lastLSN is the LSN of the last line appended. Frames queued now depend
// on at most that much of the journal.
func (s *store) lastLSN() uint64 {
	if s == nil {
		return 0
	}
	return s.appended.Load()
}

// durableLSN is the LSN of the last line on disk.
func (s *store) durableLSN() uint64 {
	if s == nil {
		return ^uint64(0)
	}
	return s.durable.Load()
}

// append queues one line. It is called with the registry locked, so lines
// are in the order the registry changed.
func (s *store) append(rec *record) {
	if s == nil {
		return
	}
	s.mu.Lock()
	start := len(s.pending)
	s.pending = rec.appendLine(s.pending)
	if s.carrying {
		s.carry = append(s.carry, s.pending[start:]...)
	}
	s.appended.Add(1)
	s.mu.Unlock()
	s.wake.Signal()
}

// writable reports whether the journal takes changes: false from a failed
// write or fsync until a retry has succeeded. The protocol refuses changes
// meanwhile (their replies would wait for the retry), and the health
// check fails. It is called with the registry locked, and takes no lock.
func (s *store) writable() bool {
	return s == nil || !s.unwritable.Load()
}

// waitDurable blocks until every line up to lsn is on disk. It returns an
// error instead if the journal was closed before then, or if the journal
// is unwritable and abandon (if not nil) reports true. abandon is asked
// whenever the writer has tried the journal again, with the journal's
// mutex held, so it must not take a lock that is held around an append:
// a connection's reports whether it is closing, so that a client that
// left, or a shutdown, does not wait for the disk.
func (s *store) waitDurable(lsn uint64, abandon func() bool) error {
	if s == nil || s.durable.Load() >= lsn {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for s.durable.Load() < lsn && !s.closed {
		if s.failing != nil && abandon != nil && abandon() {
			return s.failing
		}
		s.advanced.Wait()
	}
	if s.durable.Load() >= lsn {
		return nil
	}
	return errJournalClosed
}

// run is the writer goroutine: it writes what is pending, in batches,
// starts a compaction when the file has grown enough and finishes it when
// it is ready; while the journal is unwritable it retries. It exits when
// the journal is closed. Whatever replaces or closes the file waits first
// for the syncer to have synced all that was written (see settleLocked).
func (s *store) run() {
	defer close(s.done)
	defer func() { // a compaction asked for and never begun
		s.mu.Lock()
		for _, w := range s.compactWaiters {
			w <- compactResult{err: errJournalClosed}
		}
		s.compactWaiters = nil
		s.mu.Unlock()
	}()
	go s.syncer()
	defer func() { // the syncer too
		s.mu.Lock()
		s.syncDone = true
		s.mu.Unlock()
		s.syncWake.Signal()
	}()
	for {
		s.mu.Lock()
		for !s.hasWorkLocked() {
			s.wake.Wait()
		}
		if c := s.compacted; c != nil {
			s.compacted = nil
			s.settleLocked()
			s.mu.Unlock()
			s.finishCompaction(c)
			continue
		}
		if s.failing != nil {
			s.settleLocked()
			s.mu.Unlock()
			if !s.retry() {
				return // closing, and the journal is still unwritable
			}
			continue
		}
		if len(s.pending) == 0 && s.compactWanted {
			s.mu.Unlock()
			s.startCompaction()
			continue
		}
		if len(s.pending) == 0 {
			s.settleLocked()
			s.mu.Unlock()
			return // closing, and everything is written and synced (or failed)
		}
		batch, lsn := s.pending, s.appended.Load()
		s.pending = s.spare[:0]
		s.mu.Unlock()

		err := s.write(batch)

		s.mu.Lock()
		if cap(batch) <= maxSpareBuffer {
			s.spare = batch
		} else {
			s.spare = nil
		}
		s.wroteLocked(lsn, err)
		s.mu.Unlock()
		if err == nil && s.size >= s.compactAt && !s.compacting {
			s.startCompaction()
		}
	}
}

// syncer is the syncer goroutine: whenever lines have been written that
// are not yet durable, it syncs the file, which makes durable every line
// written before the sync began, and wakes the waiters. It stops syncing
// while the journal is unwritable, and exits with the writer.
func (s *store) syncer() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		for !s.syncDone && (s.failing != nil || s.written <= s.durable.Load()) {
			s.syncWake.Wait()
		}
		if s.syncDone {
			return
		}
		lsn, f, syncFile := s.written, s.f, s.syncFile
		s.syncing = true
		s.mu.Unlock()
		s.m.journalSyncs.Add(1)
		err := syncFile(f)
		s.mu.Lock()
		s.syncing = false
		s.finishLocked(lsn, err)
		s.wake.Signal() // the writer may be waiting in settleLocked
	}
}

// settleLocked waits until the syncer has synced all that was written,
// or the journal has become unwritable, so that the writer may replace
// or close the file.
func (s *store) settleLocked() {
	for s.syncing || (s.failing == nil && s.written > s.durable.Load()) {
		s.wake.Wait()
	}
}

// hasWorkLocked reports whether the writer has something to do. While a
// compaction goroutine runs, neither a retry nor the exit begins: they
// wait for it to be ready, and then discard it.
func (s *store) hasWorkLocked() bool {
	switch {
	case s.compacted != nil:
		return true
	case s.compacting && (s.failing != nil || s.closing && len(s.pending) == 0):
		return false
	case s.failing != nil, len(s.pending) > 0, s.closing:
		return true
	}
	return s.compactWanted && !s.compacting
}

// wroteLocked records the outcome of writing the lines up to lsn: a
// failure makes the journal unwritable; written lines go to the syncer,
// or with --fsync=never are taken as durable at once.
func (s *store) wroteLocked(lsn uint64, err error) {
	switch {
	case err != nil:
		s.finishLocked(lsn, err)
	case !s.fsync:
		s.written = lsn
		s.finishLocked(lsn, nil)
	default:
		s.written = lsn
		s.syncWake.Signal()
	}
}

// finishLocked records the outcome of a write or sync and wakes the
// waiters.
func (s *store) finishLocked(lsn uint64, err error) {
	if err != nil {
		s.failLocked(err)
	} else if lsn > s.durable.Load() {
		s.durable.Store(lsn)
	}
	s.advanced.Broadcast()
}

// failLocked makes the journal unwritable, for the reason err. Whatever
// was not yet durable stays in the registry, and a retry's snapshot
// writes it.
func (s *store) failLocked(err error) {
	s.m.journalFailures.Add(1)
	err = journalError(s.path, err)
	if s.failing == nil {
		s.failedAt = time.Now()
		s.log.Error("journal unwritable; changes are refused until it can be written again", "err", err)
	}
	s.failing = err
	s.unwritable.Store(true)
}

// retry waits journalRetryInterval (or until close begins), then tries to
// make the unwritable journal writable again: after a failed write or
// fsync nobody knows what the file holds, so the live state is written to
// a new file that replaces it, as a compaction does. The snapshot includes
// the lines not yet written (and takes them). retry reports false if close
// has begun and the journal is still unwritable.
func (s *store) retry() bool {
	closing := false
	select {
	case <-time.After(journalRetryInterval):
	case <-s.stop:
		closing = true
	}
	data, lsn, _ := s.snapshot()
	_, err := s.replace(data)
	s.mu.Lock()
	defer s.mu.Unlock()
	defer s.advanced.Broadcast() // waiters that may give up ask again
	if err != nil {
		s.m.journalFailures.Add(1)
		if err = journalError(s.path, err); err.Error() != s.failing.Error() {
			s.log.Error("journal still unwritable", "err", err)
		}
		s.failing = err
		return !closing
	}
	s.rewritten(int64(len(data)))
	s.m.compactions.Add(1)
	s.log.Info("journal writable again", "file", s.path, "bytes", len(data),
		"unwritable_for", time.Since(s.failedAt).Round(time.Millisecond))
	s.failing = nil
	s.unwritable.Store(false)
	if lsn > s.durable.Load() {
		s.durable.Store(lsn)
	}
	return true
}

// write writes a batch of lines after the last one; the syncer makes it
// durable.
func (s *store) write(batch []byte) error {
	end := s.size + int64(len(batch))
	if end > s.allocated && end >= s.reserveAt {
		s.reserve(end + journalReserveBytes)
	}
	if _, err := s.f.WriteAt(batch, s.size); err != nil {
		return err
	}
	s.size, s.allocated = end, max(s.allocated, end)
	s.m.journalBytes.Add(int64(len(batch)))
	return nil
}

// rewritten records that the file was replaced by a rewrite of the live
// state, size bytes (a compaction's or a retry's): no zeros follow its
// lines yet, and it is next compacted at compactFactor times its size.
func (s *store) rewritten(size int64) {
	s.size, s.allocated, s.reserveAt = size, size, 0
	s.compactAt = max(compactMinBytes, compactFactor*size)
}

// reserve extends the journal file with zeros to size bytes; the next
// sync makes them durable with the batch that needed them. Without room
// for them the lines are written as they come, which extends the file
// line by line, and the reserve is tried again once the lines have grown
// by another journalReserveBytes.
func (s *store) reserve(size int64) {
	for s.allocated < size {
		n, err := s.f.WriteAt(zeros[:min(size-s.allocated, int64(len(zeros)))], s.allocated)
		s.allocated += int64(n)
		if err != nil {
			s.reserveAt = s.size + journalReserveBytes
			return
		}
	}
}

// compaction is a new journal file being made beside the journal: the
// snapshot and the carry copied so far, size bytes, synced.
type compaction struct {
	tmp     *os.File
	size    int64
	err     error                // the file could not be made; it is discarded
	waiters []chan compactResult // who asked for a compaction before it began (see compact)
}

// compactResult is what a compaction asked for by compact gave.
type compactResult struct {
	lsn uint64
	err error
}

// startCompaction starts a compaction goroutine. It is called by the
// writer.
func (s *store) startCompaction() {
	s.compacting = true
	s.mu.Lock()
	s.compactWanted = false
	waiters := s.compactWaiters
	s.compactWaiters = nil
	s.mu.Unlock()
	go func() {
		c := s.prepareCompaction()
		c.waiters = waiters
		s.mu.Lock()
		s.compacted = c
		s.mu.Unlock()
		s.wake.Signal()
	}()
}

// prepareCompaction snapshots the live state (with the registry locked
// only while it is copied), writes it to a new file beside the journal,
// locks that file (a server starting must find the new file locked once
// it takes the name), and syncs it; then copies the carry to it, in
// rounds, until what is left is small. The writer goes on appending to
// the old file all along.
func (s *store) prepareCompaction() *compaction {
	live := s.snapshotCarrying()
	c := &compaction{}
	tmp, err := os.CreateTemp(filepath.Dir(s.path), filepath.Base(s.path)+compactSuffix+"*")
	if err != nil {
		c.err = err
		return c
	}
	c.tmp = tmp
	if c.err = lockFile(tmp); c.err != nil {
		return c
	}
	if c.err = live.encodeEach(c.add); c.err != nil {
		return c
	}
	for range maxCarryRounds {
		s.mu.Lock()
		chunk := s.carry
		s.carry = nil
		closing := s.closing || s.failing != nil
		s.mu.Unlock()
		if closing || len(chunk) == 0 {
			break
		}
		if c.err = c.add(chunk); c.err != nil || len(chunk) < carryHandoverBytes {
			break
		}
	}
	return c
}

// add appends data to the compaction's file and syncs it, in pieces of
// compactSyncBytes.
func (c *compaction) add(data []byte) error {
	for len(data) > 0 {
		n := min(len(data), compactSyncBytes)
		if _, err := c.tmp.Write(data[:n]); err != nil {
			return err
		}
		c.size += int64(n)
		data = data[n:]
		if err := c.tmp.Sync(); err != nil {
			return err
		}
	}
	return nil
}

// discard removes the compaction's file.
func (c *compaction) discard() {
	if c.tmp != nil {
		c.tmp.Close()
		os.Remove(c.tmp.Name())
	}
}

// finishCompaction is the writer's part of a compaction: it takes what is
// left of the carry, and the lines not yet written to the old file (they
// are in the carry), writes them to the new file, syncs it, renames it
// over the journal and syncs the directory; the journal is then durable
// up to the last line carried. Replies wait only for this. If the new
// file cannot be completed, the old one stays in use, the lines taken are
// written to it after all, and compaction is next tried when the file has
// doubled. Once the new file has replaced the old one, a failure to make
// that replacement durable makes the journal unwritable: the new file
// holds lines the old one lacks, and a crash could bring the old one
// back. A compaction that is ready while the journal is unwritable, or
// closing, is discarded.
func (s *store) finishCompaction(c *compaction) {
	s.compacting = false
	s.mu.Lock()
	rest := s.carry
	s.carry, s.carrying = nil, false
	var taken []byte
	lsn := s.durable.Load()
	abandon := s.failing != nil || s.closing
	if c.err == nil && !abandon {
		taken, lsn = s.pending, s.appended.Load()
		s.pending = nil
	}
	s.mu.Unlock()
	err := c.err
	if abandon {
		c.discard()
		err = errors.Join(err, errors.New("compaction abandoned: the journal is unwritable or closing"))
	} else {
		err = s.install(c, rest, taken, lsn)
	}
	for _, w := range c.waiters {
		w <- compactResult{lsn, err}
	}
}

// install completes the compaction's file with rest and renames it in;
// see finishCompaction.
func (s *store) install(c *compaction, rest, taken []byte, lsn uint64) error {
	err := c.err
	if err == nil && len(rest) > 0 {
		err = c.add(rest)
	}
	renamed := false
	if err == nil {
		if err = os.Rename(c.tmp.Name(), s.path); err == nil {
			renamed = true
			old := s.f
			s.f = c.tmp
			err = syncDir(filepath.Dir(s.path))
			// Closing the old file frees its blocks, which takes tens
			// of milliseconds for a large one: not while replies wait.
			go old.Close()
		}
	}
	switch {
	case err == nil:
		s.rewritten(c.size)
		s.m.compactions.Add(1)
		s.log.Info("journal compacted", "file", s.path, "bytes", s.size)
		s.mu.Lock()
		s.finishLocked(lsn, nil)
		s.mu.Unlock()
		return nil
	case renamed:
		err = fmt.Errorf("compaction: %w", err)
		s.mu.Lock()
		s.finishLocked(0, err)
		s.mu.Unlock()
		return err
	}
	c.discard()
	s.log.Error("journal compaction failed; the journal goes on growing", "file", s.path, "err", err)
	s.compactAt = 2 * s.size
	if len(taken) > 0 {
		werr := s.write(taken)
		s.mu.Lock()
		s.wroteLocked(lsn, werr)
		s.mu.Unlock()
	}
	return err
}

// compact asks the writer for a compaction now, waits for it, and
// returns the LSN the journal is then durable up to.
func (s *store) compact() (uint64, error) {
	done := make(chan compactResult, 1)
	s.mu.Lock()
	s.compactWanted = true
	s.compactWaiters = append(s.compactWaiters, done)
	s.mu.Unlock()
	s.wake.Signal()
	r := <-done
	return r.lsn, r.err
}

// replace writes data to a new file beside the journal, syncs it, locks
// it, and renames it over the journal, then syncs the directory, so that a
// crash at any moment leaves either the old file or the new one, whole.
// renamed reports whether the new file took the old one's place (and is
// now the one written to).
func (s *store) replace(data []byte) (renamed bool, err error) {
	dir := filepath.Dir(s.path)
	tmp, err := os.CreateTemp(dir, filepath.Base(s.path)+compactSuffix+"*")
	if err != nil {
		return false, err
	}
	defer func() {
		if !renamed {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err := tmp.Write(data); err != nil {
		return false, err
	}
	if err := tmp.Sync(); err != nil {
		return false, err
	}
	if err := lockFile(tmp); err != nil { // a server starting now must find the new file locked
		return false, err
	}
	if err := os.Rename(tmp.Name(), s.path); err != nil {
		return false, err
	}
	old := s.f
	s.f = tmp
	old.Close()
	return true, syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// takePending removes the lines not yet written and returns them, with
// the LSN of the last one. The registry calls it, locked, when it takes a
// snapshot, which holds their changes.
func (s *store) takePending() ([]byte, uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	taken := s.pending
	s.pending = nil
	return taken, s.appended.Load()
}

// beginCarry starts keeping every line appended from now on in the carry,
// for a compaction, and returns the LSN of the last line appended before.
// The registry calls it, locked, when it takes a snapshot.
func (s *store) beginCarry() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.carrying, s.carry = true, nil
	return s.appended.Load()
}

// close writes what is pending, syncs (with --fsync=never too), and
// closes the file; an unwritable journal is tried once more first. Lines
// appended after it are never written; waiting for them returns
// errJournalClosed.
func (s *store) close() error {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	if !s.closing {
		s.closing = true
		close(s.stop)
	}
	s.mu.Unlock()
	s.wake.Signal()
	<-s.done
	s.mu.Lock()
	s.closed = true
	s.advanced.Broadcast()
	failing := s.failing
	s.mu.Unlock()
	if failing == nil { // the zeros written ahead are not left behind
		if err := errors.Join(s.f.Truncate(s.size), s.f.Sync()); err != nil {
			failing = journalError(s.path, err)
		}
	}
	return errors.Join(failing, s.f.Close())
}

// err reports why the journal is unwritable, if it is.
func (s *store) err() error {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.failing
}

// The registry records its changes through these.

func (s *store) nameplate(a *app, np *nameplate) {
	if s == nil {
		return
	}
	s.append(nameplateRecord(a, np))
}

func (s *store) mailbox(mb *mailbox) {
	if s == nil {
		return
	}
	s.append(mailboxRecord(mb))
}

func (s *store) message(mb *mailbox, m message) {
	if s == nil {
		return
	}
	s.append(messageRecord(mb.app.id, mb.id, m))
}

func (s *store) deleted(kind, appID, key string) {
	if s == nil {
		return
	}
	rec := &record{Kind: kind, App: appID, Deleted: true}
	if kind == kindNameplate {
		rec.Name = key
	} else {
		rec.Mailbox = key
	}
	s.append(rec)
}

func nameplateRecord(a *app, np *nameplate) *record {
	rec := &record{Kind: kindNameplate, App: a.id, Name: np.name, Mailbox: np.mailbox.id}
	for _, side := range np.sides {
		rec.Sides = append(rec.Sides, sideRecord{Side: side.side, Added: side.added, Claimed: side.claimed})
	}
	return rec
}

func mailboxRecord(mb *mailbox) *record {
	rec := &record{Kind: kindMailbox, App: mb.app.id, Mailbox: mb.id, ForNameplate: mb.forNameplate, Updated: mb.updated}
	for _, side := range mb.sides {
		rec.Sides = append(rec.Sides, sideRecord{Side: side.side, Added: side.added, Opened: side.opened, Mood: side.mood})
	}
	return rec
}

func messageRecord(appID, mailboxID string, m message) *record {
	return &record{Kind: kindMessage, App: appID, Mailbox: mailboxID,
		Side: m.side, Phase: m.phase, Body: m.body, ServerRx: m.serverRx, ID: m.id}
}

// snapshot returns the registry's live state as journal lines, with the
// LSN they cover and the lines it took from the journal (see takePending).
// Every mailbox comes with its messages, then every nameplate, which names
// a mailbox. Only what the encoding needs is taken with the registry
// locked (replies are held up meanwhile); the lines are made after it is
// unlocked.
func (r *registry) snapshot(s *store) (data []byte, lsn uint64, taken []byte) {
	live, lsn, taken := r.liveState(s)
	return live.encode(), lsn, taken
}

// liveState is the registry's state at a snapshot.
type liveState struct {
	mailboxes  []snapshotMailbox
	nameplates []*record
}

// snapshotMailbox is a mailbox's line at a snapshot, and its messages then.
// A mailbox's messages are only ever appended to, so the slice taken stays
// as it was.
type snapshotMailbox struct {
	rec      *record
	messages []message
}

// liveState copies the registry's state, and takes the lines not yet
// written, with the registry locked.
func (r *registry) liveState(s *store) (live liveState, lsn uint64, taken []byte) {
	live, lsn = r.liveStateAt(func() uint64 {
		taken, lsn = s.takePending()
		return lsn
	})
	return live, lsn, taken
}

// liveStateAt copies the registry's state with the registry locked, and
// calls at, locked too, for the LSN the copy covers.
func (r *registry) liveStateAt(at func() uint64) (live liveState, lsn uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	live.mailboxes = make([]snapshotMailbox, 0, r.mailboxN)
	live.nameplates = make([]*record, 0, r.nameplateN)
	for _, a := range r.apps {
		for _, mb := range a.mailboxes {
			live.mailboxes = append(live.mailboxes, snapshotMailbox{mailboxRecord(mb), mb.messages})
		}
		for _, np := range a.nameplates {
			live.nameplates = append(live.nameplates, nameplateRecord(a, np))
		}
	}
	return live, at()
}

// encode writes the state as journal lines.
func (live liveState) encode() []byte {
	var all []byte
	live.encodeEach(func(b []byte) error {
		all = append(all, b...)
		return nil
	})
	return all
}

// encodeEach writes the state as journal lines, handing them to add in
// pieces of about compactSyncBytes, in one reused buffer: a compaction
// of tens of megabytes then allocates little, and the garbage collector
// does not slow the replies meanwhile.
func (live liveState) encodeEach(add func([]byte) error) error {
	b := make([]byte, 0, compactSyncBytes+64<<10) // room for most mailboxes' lines past a piece's size, where the piece ends
	flush := func(atLeast int) error {
		if len(b) < atLeast || len(b) == 0 {
			return nil
		}
		err := add(b)
		b = b[:0]
		return err
	}
	for _, mb := range live.mailboxes {
		b = mb.rec.appendLine(b)
		for _, m := range mb.messages {
			b = messageRecord(mb.rec.App, mb.rec.Mailbox, m).appendLine(b)
		}
		// Replaying a message sets the mailbox's activity time to the
		// message's; if something later moved it on, say so again.
		if n := len(mb.messages); n > 0 && mb.messages[n-1].serverRx != mb.rec.Updated {
			b = mb.rec.appendLine(b)
		}
		if err := flush(compactSyncBytes); err != nil {
			return err
		}
	}
	for _, rec := range live.nameplates {
		b = rec.appendLine(b)
		if err := flush(compactSyncBytes); err != nil {
			return err
		}
	}
	return flush(0)
}

// restoreLocked applies one journal line to the registry.
func (r *registry) restoreLocked(rec *record) error {
	if side, ok := repeatedSide(rec.Sides); ok {
		return fmt.Errorf("side %q listed twice", side) // the server never writes one: the line is corrupt
	}
	a := r.appLocked(rec.App)
	defer r.dropIfEmptyLocked(a)
	switch rec.Kind {
	case kindMailbox:
		mb := a.mailboxes[rec.Mailbox]
		if rec.Deleted {
			if mb != nil {
				r.forgetMailboxLocked(mb)
			}
			return nil
		}
		if mb == nil {
			mb = &mailbox{app: a, id: rec.Mailbox}
			a.mailboxes[mb.id] = mb
			r.mailboxN++
			r.metrics.mailboxes.Add(1)
		}
		mb.forNameplate, mb.updated = rec.ForNameplate, rec.Updated
		for _, m := range mb.messages { // active at least as late as its last message
			mb.updated = max(mb.updated, m.serverRx)
		}
		mb.sides = mb.sides[:0]
		for _, side := range rec.Sides {
			mb.sides = append(mb.sides, mailboxSide{side: side.Side, opened: side.Opened, added: side.Added, mood: side.Mood})
		}
	case kindNameplate:
		np := a.nameplates[rec.Name]
		if rec.Deleted {
			if np != nil {
				r.forgetNameplateLocked(a, np)
			}
			return nil
		}
		mb := a.mailboxes[rec.Mailbox]
		if mb == nil {
			return fmt.Errorf("nameplate %q points at unknown mailbox %q", rec.Name, rec.Mailbox)
		}
		if mb.nameplate != nil && mb.nameplate != np {
			return fmt.Errorf("nameplate %q points at mailbox %q, which nameplate %q points at", rec.Name, rec.Mailbox, mb.nameplate.name)
		}
		if np == nil {
			np = r.addNameplateLocked(a, rec.Name, mb)
		}
		r.point(np, mb)
		np.sides = np.sides[:0]
		for _, side := range rec.Sides {
			np.sides = append(np.sides, nameplateSide{side: side.Side, claimed: side.Claimed, added: side.Added})
		}
	case kindMessage:
		mb := a.mailboxes[rec.Mailbox]
		if mb == nil {
			return fmt.Errorf("message for unknown mailbox %q", rec.Mailbox)
		}
		id := rec.ID
		if id == nil {
			id = jsonNull
		}
		m := message{side: rec.Side, phase: rec.Phase, body: rec.Body, serverRx: rec.ServerRx, id: id}
		r.storeLocked(mb, m, m.size())
	default:
		return fmt.Errorf("unknown kind %q", rec.Kind)
	}
	return nil
}

// repeatedSide returns a side that sides lists more than once, if any.
func repeatedSide(sides []sideRecord) (string, bool) {
	seen := make(map[string]bool, len(sides))
	for _, s := range sides {
		if seen[s.Side] {
			return s.Side, true
		}
		seen[s.Side] = true
	}
	return "", false
}
