// protocol.go owns the mailbox protocol as clients see it: the shape of
// every message in both directions, the error strings, and the state
// machine each connection runs (PROTOCOL.md §4, §5). It decides
// what a message means; mailbox.go keeps the state it changes, and conn.go
// moves the bytes.
//
// A client sends one JSON object per WebSocket message. Every object with
// a "type" is acknowledged first with {"type": "ack", "id": <its id>};
// then the command runs, and may answer, fail with {"type": "error"}, or
// deliver "message"s to the mailbox's subscribers.
package main

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"strings"
	"unicode/utf8"
)

// A protocolError is a refusal that goes back to the client as an "error"
// message carrying its text. Anything else is an internal error.
type protocolError string

func (e protocolError) Error() string { return string(e) }

// The reference server's error strings (PROTOCOL.md §7.1), which clients may match.
const (
	errMissingType      = protocolError("missing 'type'")
	errMustBind         = protocolError("must bind first")
	errUnknownType      = protocolError("unknown type")
	errPingRequiresPing = protocolError("ping requires 'ping'")
	errAlreadyBound     = protocolError("already bound")
	errBindAppID        = protocolError("bind requires 'appid'")
	errBindSide         = protocolError("bind requires 'side'")
	errGreedy           = protocolError("you already allocated one, don't be greedy")
	errClaimNameplate   = protocolError("claim requires 'nameplate'")
	errOneClaim         = protocolError("only one claim per connection")
	errCrowded          = protocolError("crowded")
	errReclaimed        = protocolError("reclaimed")
	errOneRelease       = protocolError("only one release per connection")
	errReleaseMismatch  = protocolError("release and claim must use same nameplate")
	errReleaseNoClaim   = protocolError("release without nameplate must follow claim")
	errOneOpen          = protocolError("only one open per connection")
	errOpenMailbox      = protocolError("open requires 'mailbox'")
	errAddBeforeOpen    = protocolError("must open mailbox before adding")
	errMissingPhase     = protocolError("missing 'phase'")
	errMissingBody      = protocolError("missing 'body'")
	errOneClose         = protocolError("only one close per connection")
	errCloseMismatch    = protocolError("open and close must use same mailbox")
	errCloseNoOpen      = protocolError("close without mailbox must follow open")
)

// Errors this server sends where the reference drops the connection or has
// no limit at all. Clients treat any error as fatal, so each one says what
// was wrong.
const (
	errBadNameplate       = protocolError("'nameplate' must be 1 to 40 digits")
	errBadClientVersion   = protocolError("'client_version' must be a list of two strings")
	errNoFreeNameplate    = protocolError("unable to find a free nameplate-id")
	errTooManyNameplates  = protocolError("too many nameplates")
	errTooManyMailboxes   = protocolError("too many mailboxes")
	errTooManyMessages    = protocolError("too many messages in this mailbox")
	errMailboxFull        = protocolError("mailbox is full")
	errStoreFull          = protocolError("the server holds too many messages, try again later")
	errRateLimited        = protocolError("too many new nameplates from your address, try again later")
	errTooManySubscribers = protocolError("this mailbox is open on too many connections for your side")
	errRateLimitedOpen    = protocolError("too many new mailboxes from your address, try again later")
	errCannotSave         = protocolError("the server cannot save changes right now, try again later")
)

// Errors a client finds in its welcome message when it may not stay; the
// connection is then closed with status 1008 (policy violation).
const (
	errTooManyConnsFromAddr = "too many connections from your address"
	errTooManyConns         = "the server has too many connections, try again later"
)

// Length limits on the strings a client chooses. Real clients use far
// shorter ones (an appid of about 40 characters, sides of 10 hex digits,
// phases like "pake" or "dilate-3"); the limits keep one message from
// costing more than its frame.
const (
	maxAppIDLen     = 256
	maxTokenLen     = 64 // side, phase, mood, mailbox id
	maxNameplateLen = 40 // as the reference since 0.7.0

	// maxIDLen bounds a message's "id" as the server echoes it, in every
	// ack and in every delivery of an added message. Clients send four
	// hex digits; re-encoding can make an id three times what came (an
	// emoji becomes a 12-byte surrogate pair), so the bound is on what is
	// sent back.
	maxIDLen = 64
)

// errNotString and errTooLong name the field at fault.
func errNotString(key string) protocolError {
	return protocolError(fmt.Sprintf("'%s' must be a string", key))
}

func errTooLong(key string) protocolError {
	return protocolError(fmt.Sprintf("'%s' is too long", key))
}

// errBadInput means a message was not a JSON object in valid UTF-8. The
// reference drops the connection for these, and so do we (cleanly, with a
// close frame), since nothing sensible can be answered.
var errBadInput = errors.New("message is not a JSON object in UTF-8")

// clientMessage is one message from a client: its raw bytes, echoed as
// "orig" in errors, and its top-level fields, kept as raw JSON so that
// values the server echoes ("id", "ping") go back exactly as they came.
// Field names are matched exactly, and the last of duplicate keys wins, as
// in Python.
type clientMessage struct {
	raw    []byte
	fields []field
}

type field struct {
	key   string
	value json.RawMessage
}

// parseClientMessage checks that raw is a JSON object in valid UTF-8 and
// splits it into its fields. Clients send flat objects of a few fields,
// so a scan over the validated bytes does this without decoding anything.
func parseClientMessage(raw []byte) (clientMessage, error) {
	if !utf8.Valid(raw) || !json.Valid(raw) {
		return clientMessage{}, errBadInput
	}
	i := skipSpace(raw, 0)
	if raw[i] != '{' {
		return clientMessage{}, errBadInput
	}
	m := clientMessage{raw: raw, fields: make([]field, 0, 8)}
	for i = skipSpace(raw, i+1); raw[i] != '}'; i = skipSpace(raw, i+1) { // at a key, or after a comma
		if raw[i] == ',' {
			continue
		}
		end := skipValue(raw, i)
		key, err := unquote(raw[i:end])
		if err != nil {
			return clientMessage{}, errBadInput
		}
		start := skipSpace(raw, skipSpace(raw, end)+1) // past the colon
		end = skipValue(raw, start)
		m.fields = append(m.fields, field{key: key, value: raw[start:end]})
		i = skipSpace(raw, end) - 1
	}
	return m, nil
}

// skipSpace returns the index of the first non-space byte at or after i.
func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// skipValue returns the index just after the JSON value starting at i, in
// input already known to be valid JSON.
func skipValue(b []byte, i int) int {
	switch b[i] {
	case '"':
		for i++; b[i] != '"'; i++ {
			if b[i] == '\\' {
				i++
			}
		}
		return i + 1
	case '{', '[':
		depth := 0
		for ; ; i++ {
			switch b[i] {
			case '"':
				i = skipValue(b, i) - 1
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return i + 1
				}
			}
		}
	default: // a number, true, false or null
		for i < len(b) && !strings.ContainsRune(",}] \t\n\r", rune(b[i])) {
			i++
		}
		return i
	}
}

// unquote decodes a JSON string, quickly when it has no escapes. A string
// holding half of a UTF-16 surrogate pair (which Go would turn into
// U+FFFD) is refused rather than silently changed.
func unquote(v []byte) (string, error) {
	if len(v) < 2 || v[0] != '"' {
		return "", errBadInput
	}
	if bytes.IndexByte(v, '\\') < 0 {
		return string(v[1 : len(v)-1]), nil
	}
	var s string
	if err := json.Unmarshal(v, &s); err != nil {
		return "", err
	}
	if hasLoneSurrogate(v) {
		return "", errBadInput
	}
	return s, nil
}

// hasLoneSurrogate reports whether the JSON string literal v escapes half
// of a UTF-16 surrogate pair without the other half.
func hasLoneSurrogate(v []byte) bool {
	for i := 1; i < len(v)-1; i++ {
		if v[i] != '\\' {
			continue
		}
		if v[i+1] != 'u' {
			i++
			continue
		}
		u := hex4(v[i+2:])
		switch {
		case u >= 0xd800 && u < 0xdc00 && i+12 <= len(v)-1 && v[i+6] == '\\' && v[i+7] == 'u' &&
			hex4(v[i+8:]) >= 0xdc00 && hex4(v[i+8:]) < 0xe000:
			i += 11 // a pair
		case u >= 0xd800 && u < 0xe000:
			return true
		default:
			i += 5
		}
	}
	return false
}

// hex4 decodes the four hex digits of a \uXXXX escape.
func hex4(h []byte) rune {
	var r rune
	for _, c := range h[:4] {
		switch {
		case c >= '0' && c <= '9':
			r = r<<4 | rune(c-'0')
		case c >= 'a' && c <= 'f':
			r = r<<4 | rune(c-'a'+10)
		default:
			r = r<<4 | rune(c-'A'+10)
		}
	}
	return r
}

// get returns field key's raw value, and whether the message has it.
func (m clientMessage) get(key string) (json.RawMessage, bool) {
	for i := len(m.fields) - 1; i >= 0; i-- {
		if m.fields[i].key == key {
			return m.fields[i].value, true
		}
	}
	return nil, false
}

func (m clientMessage) has(key string) bool {
	_, ok := m.get(key)
	return ok
}

// typ returns the message's type, or "" if it is not a string.
func (m clientMessage) typ() string {
	v, _ := m.get("type")
	t, _ := unquote(v)
	return t
}

// str returns field key, which must be present, as a string of at most
// maxLen bytes.
func (m clientMessage) str(key string, maxLen int) (string, error) {
	v, _ := m.get(key)
	s, err := unquote(v)
	if err != nil {
		return "", errNotString(key)
	}
	if len(s) > maxLen {
		return "", errTooLong(key)
	}
	return s, nil
}

// clientVersion reads bind's optional [implementation, version, ...]; only
// the first two elements are used, and each may be null.
func (m clientMessage) clientVersion() (impl, version *string, err error) {
	v, ok := m.get("client_version")
	if !ok {
		return nil, nil, nil
	}
	var elems []json.RawMessage
	if json.Unmarshal(v, &elems) != nil || len(elems) < 2 {
		return nil, nil, errBadClientVersion
	}
	var got [2]*string
	for i, e := range elems[:2] {
		if bytes.Equal(e, jsonNull) {
			continue
		}
		s, err := unquote(e)
		if err != nil || len(s) > maxAppIDLen {
			return nil, nil, errBadClientVersion
		}
		got[i] = &s
	}
	return got[0], got[1], nil
}

// validNameplate reports whether name is 1 to 40 ASCII digits, the rule the
// reference adopted in 0.7.0 (it drops the connection; we answer an error).
func validNameplate(name string) bool {
	if len(name) == 0 || len(name) > maxNameplateLen {
		return false
	}
	for i := 0; i < len(name); i++ {
		if name[i] < '0' || name[i] > '9' {
			return false
		}
	}
	return true
}

// A sender takes a session's encoded frames in order. In the server it is
// the connection's outbox (outbox.go); lsn is the journal position the frame
// depends on, and the frame must not reach the client before the journal
// is durable up to it. While a message is handled the sender is held:
// nothing leaves until release says what the frames depend on.
type sender interface {
	enqueue(frame []byte, lsn uint64)
	hold()
	release(lsn uint64)
}

// session is one connection's protocol state (PROTOCOL.md §4.1). Its fields are guarded
// by the registry's mutex, since other connections' actions can change them
// (a deleted mailbox detaches its subscribers).
type session struct {
	srv  *server
	out  sender
	addr clientAddr // where the client connects from

	bound       bool
	appID, side string
	didAllocate bool
	allocated   string // the nameplate this connection allocated, if didAllocate
	didClaim    bool
	claimed     string // the nameplate this connection claimed, if didClaim
	claimedBox  string // the mailbox its claim returned, if it succeeded
	didRelease  bool
	opened      bool     // an open (or close) named a mailbox on this connection
	mailboxID   string   // that mailbox, if opened
	mailbox     *mailbox // the mailbox this connection is subscribed to, or nil
	didClose    bool
	handling    bool // a message of this session's is being handled (see handle)
}

// send queues a frame for the client. It must be called with the registry
// locked, so that frames leave in the order the registry changed.
func (s *session) send(frame []byte) {
	lsn := s.srv.reg.journal.lastLSN()
	if s.handling {
		lsn = 0 // the message's release says what its replies depend on
	}
	s.out.enqueue(frame, lsn)
}

// handle runs one client message: the dispatch order of PROTOCOL.md §4.2. A non-nil
// error means the message was not a JSON object, and the connection must
// be closed.
func (s *session) handle(raw []byte) error {
	msg, err := parseClientMessage(raw)
	if err != nil {
		return err
	}
	now := s.srv.now()
	reg := s.srv.reg
	reg.mu.Lock()
	defer reg.mu.Unlock()
	// The ack is queued before the changes it acknowledges, so the
	// frames wait (held) until the handling is done, and then for the
	// journal to hold what it changed or what they show. A message that
	// neither changes nor shows the registry (a ping, a bind, a refusal
	// that is about the message itself, such as a missing field, or a
	// change refused because the journal is unwritable) depends on no
	// journal line, so its replies reach the client while the journal
	// waits for the disk; frames still leave in order, after any earlier
	// reply that waits.
	s.out.hold()
	s.handling = true
	before := reg.journal.lastLSN()
	showsRegistry := false
	defer func() { // before the unlock: deferred calls run last first
		s.handling = false
		lsn := reg.journal.lastLSN()
		if lsn == before && !showsRegistry {
			lsn = 0
		}
		s.out.release(lsn)
	}()
	if !msg.has("type") {
		s.fail(errMissingType, msg)
		return nil
	}
	id, _ := msg.get("id")
	if echoedLen(id) > maxIDLen {
		s.fail(errTooLong("id"), msg) // not acknowledged: the ack would echo it
		return nil
	}
	s.send(ackFrame(id))
	err = s.dispatchLocked(msg, now)
	var pe protocolError
	switch {
	case err == nil:
		showsRegistry = msg.typ() != "ping" && msg.typ() != "bind"
	case !errors.As(err, &pe):
		showsRegistry = true
		return err
	default:
		showsRegistry = pe.showsRegistry()
		s.fail(pe, msg)
	}
	return nil
}

// showsRegistry reports whether the error may tell the client something
// of the registry, which may hold changes not yet durable: that a
// nameplate is taken, a mailbox gone, the server or an address full.
// Only the refusals listed here do not: they are about the message
// itself, the connection's own earlier messages, its address's rate, or
// the journal being unwritable, none of which a crash can take back.
// Any other error waits, as a reply that shows the registry does.
func (e protocolError) showsRegistry() bool {
	switch e {
	case errMustBind, errUnknownType, errPingRequiresPing, errAlreadyBound, errBindAppID, errBindSide,
		errGreedy, errClaimNameplate, errOneClaim, errOneRelease, errReleaseMismatch, errReleaseNoClaim,
		errOneOpen, errOpenMailbox, errMissingPhase, errMissingBody, errOneClose, errCloseMismatch,
		errCloseNoOpen, errBadNameplate, errBadClientVersion, errRateLimited, errRateLimitedOpen, errCannotSave:
		return false
	}
	return true
}

// fail counts the error and sends it to the client, with the message
// that caused it (PROTOCOL.md §7).
func (s *session) fail(e protocolError, msg clientMessage) {
	s.srv.metrics.clientError(string(e))
	s.send(errorFrame(string(e), msg.raw))
}

// dispatchLocked runs a message whose type is known, in the order of
// PROTOCOL.md §4.2: ping and bind first, bound or not; then every other
// type needs a bind; then (this server only) a change is refused while
// the journal is unwritable; then the type's own handler, which makes its
// own checks. A type it does not know is an error.
func (s *session) dispatchLocked(msg clientMessage, now float64) error {
	typ := msg.typ()
	switch typ {
	case "ping":
		return s.handlePing(msg)
	case "bind":
		return s.handleBind(msg, now)
	}
	if !s.bound {
		return errMustBind
	}
	switch typ {
	case "allocate", "claim", "release", "open", "add", "close":
		if !s.srv.reg.journal.writable() {
			return errCannotSave
		}
	}
	switch typ {
	case "list": // PROTOCOL.md §5.3: every nameplate of the app, sorted; none with --disallow-list
		s.send(nameplatesFrame(s.srv.reg.listLocked(s.appID)))
		return nil
	case "allocate":
		return s.handleAllocate(now)
	case "claim":
		return s.handleClaim(msg, now)
	case "release":
		return s.handleRelease(msg, now)
	case "open":
		return s.handleOpen(msg, now)
	case "add":
		return s.handleAdd(msg, now)
	case "close":
		return s.handleClose(msg, now)
	}
	return errUnknownType
}

// handlePing answers a ping (PROTOCOL.md §5.2), bound or not: it refuses
// a ping without 'ping', and echoes the value in a pong.
func (s *session) handlePing(msg clientMessage) error {
	if !msg.has("ping") {
		return errPingRequiresPing
	}
	v, _ := msg.get("ping")
	s.send(pongFrame(v))
	return nil
}

// handleBind binds the connection to an app and side (PROTOCOL.md §5.1),
// refusing in order: a second bind, no 'appid', no 'side', then (this
// server only) a non-string or too long appid or side and a malformed
// client_version; then it writes the client_version usage record (§11.3).
func (s *session) handleBind(msg clientMessage, now float64) error {
	switch {
	case s.bound:
		return errAlreadyBound
	case !msg.has("appid"):
		return errBindAppID
	case !msg.has("side"):
		return errBindSide
	}
	appID, appErr := msg.str("appid", maxAppIDLen)
	side, sideErr := msg.str("side", maxTokenLen)
	if err := cmp.Or(appErr, sideErr); err != nil { // the first, in the order checked
		return err
	}
	impl, version, err := msg.clientVersion()
	if err != nil {
		return err
	}
	s.bound, s.appID, s.side = true, appID, side
	s.srv.reg.usage.bound(appID, side, now, impl, version)
	return nil
}

// handleAllocate picks and claims a free nameplate (PROTOCOL.md §5.4,
// §8.1), refusing in order: a second allocate, then (this server only) an
// address over its rate or holdings (§15.2), and no free nameplate or no
// room for one.
func (s *session) handleAllocate(now float64) error {
	if s.didAllocate {
		return errGreedy
	}
	if err := s.admitLocked(holdings{nameplates: 1, mailboxes: 1}, errRateLimited); err != nil {
		return err
	}
	name, err := s.srv.reg.allocateLocked(s.appID, s.side, s.holder(), now)
	if err != nil {
		return err
	}
	s.didAllocate, s.allocated = true, name
	s.send(allocatedFrame(name))
	return nil
}

// handleClaim claims a nameplate for this side (PROTOCOL.md §5.5, §8.2),
// refusing in order: no 'nameplate', a second claim, (this server only) a
// name that is not 1 to 40 digits and an address over its rate or
// holdings; from there the claim is used up, and the registry may answer
// reclaimed or crowded (§10.1).
func (s *session) handleClaim(msg clientMessage, now float64) error {
	if !msg.has("nameplate") {
		return errClaimNameplate
	}
	if s.didClaim {
		return errOneClaim
	}
	name, err := msg.str("nameplate", maxNameplateLen)
	if err != nil || !validNameplate(name) {
		return errBadNameplate
	}
	// Every claim is admitted or refused before anything looks at the
	// nameplate, so a refusal is the same whether it exists or not, and
	// cannot be used to find the waiting ones. Only the nameplate this
	// connection allocated is already paid for, while its side is on it.
	reg := s.srv.reg
	if !s.didAllocate || name != s.allocated || !reg.nameplateHasSideLocked(s.appID, name, s.side) {
		if err := s.admitLocked(holdings{nameplates: 1, mailboxes: 1}, errRateLimited); err != nil {
			return err
		}
	}
	s.didClaim, s.claimed = true, name
	id, err := reg.claimLocked(s.appID, name, s.side, s.holder(), now)
	if err != nil {
		return err
	}
	s.claimedBox = id
	s.send(claimedFrame(id))
	return nil
}

// handleRelease releases this side's nameplate (PROTOCOL.md §5.6, §8.3),
// refusing in order: a second release, a name other than the one claimed
// (checked before the name's own type), no name and no earlier claim.
func (s *session) handleRelease(msg clientMessage, now float64) error {
	if s.didRelease {
		return errOneRelease
	}
	name, err := namedOrEarlier(msg, "nameplate", maxNameplateLen, s.didClaim, s.claimed, errReleaseMismatch, errReleaseNoClaim)
	if err != nil {
		return err
	}
	s.srv.reg.releaseLocked(s.appID, name, s.side, now)
	s.didRelease = true
	s.send(releasedFrame())
	return nil
}

// handleOpen opens a mailbox and subscribes the connection to it
// (PROTOCOL.md §5.7, §9.1), refusing in order: a mailbox already open
// here, no 'mailbox', (this server only) a non-string or too long id, an
// address over its rate or holdings, too many connections of this side
// on it; then the registry may answer crowded (§10.1).
func (s *session) handleOpen(msg clientMessage, now float64) error {
	if s.mailbox != nil {
		return errOneOpen
	}
	if !msg.has("mailbox") {
		return errOpenMailbox
	}
	id, err := msg.str("mailbox", maxTokenLen)
	if err != nil {
		return err
	}
	// As for claims, every open costs the same whether the mailbox exists
	// or not (a new mailbox costs as much as a new nameplate); the one
	// this connection's claim returned is already paid for, while its
	// side is on it.
	reg := s.srv.reg
	if s.claimedBox == "" || id != s.claimedBox || !reg.mailboxHasSideLocked(s.appID, id, s.side) {
		if err := s.admitLocked(holdings{mailboxes: 1}, errRateLimitedOpen); err != nil {
			return err
		}
	}
	if reg.subscribersOfSideLocked(s.appID, id, s.side) >= maxSubscribersPerSide {
		reg.metrics.refused("subscribers per side")
		return errTooManySubscribers
	}
	s.opened, s.mailboxID = true, id
	a := reg.appLocked(s.appID)
	mb, err := reg.openLocked(a, id, s.side, s.holder(), now)
	if err != nil {
		reg.dropIfEmptyLocked(a)
		return err
	}
	s.mailbox = mb
	reg.subscribeLocked(mb, s)
	return nil
}

// handleAdd stores a message and delivers it to every subscriber, the
// sender included (PROTOCOL.md §5.8, §9.2), refusing in order: no open
// mailbox, no 'phase', no 'body', (this server only) a non-string phase or
// body and a too long phase, then the registry's limits on messages.
func (s *session) handleAdd(msg clientMessage, now float64) error {
	switch {
	case s.mailbox == nil:
		return errAddBeforeOpen
	case !msg.has("phase"):
		return errMissingPhase
	case !msg.has("body"):
		return errMissingBody
	}
	phase, phaseErr := msg.str("phase", maxTokenLen)
	body, bodyErr := msg.str("body", math.MaxInt)
	if err := cmp.Or(phaseErr, bodyErr); err != nil { // the first, in the order checked
		return err
	}
	id, _ := msg.get("id")
	if id == nil {
		id = jsonNull
	}
	return s.srv.reg.addLocked(s.mailbox, message{side: s.side, phase: phase, body: body, serverRx: now, id: id}, s.holder())
}

// handleClose closes this side's mailbox with its mood (PROTOCOL.md §5.9,
// §9.3, §10.2), refusing in order: a second close, a mailbox other than
// the one opened (checked first), no mailbox and no earlier open, (this
// server only) a bad mood; a close of a mailbox not open here opens it
// first, so a third side gets crowded.
func (s *session) handleClose(msg clientMessage, now float64) error {
	if s.didClose {
		return errOneClose
	}
	id, err := namedOrEarlier(msg, "mailbox", maxTokenLen, s.opened, s.mailboxID, errCloseMismatch, errCloseNoOpen)
	if err != nil {
		return err
	}
	var mood string
	if v, ok := msg.get("mood"); ok && !bytes.Equal(v, jsonNull) {
		if mood, err = msg.str("mood", maxTokenLen); err != nil {
			return err
		}
	}
	reg := s.srv.reg
	a := reg.appLocked(s.appID)
	if s.mailbox == nil && a.mailboxes[id] != nil {
		// Closing without having the mailbox open opens it first, as the
		// reference does, so a third side is refused here too (PROTOCOL.md §5.9).
		if _, err := reg.openLocked(a, id, s.side, s.holder(), now); err != nil {
			return err
		}
	}
	if s.mailbox != nil {
		reg.unsubscribeLocked(s.mailbox, s)
		s.mailbox = nil
	}
	s.didClose = true
	reg.closeLocked(a, id, s.side, mood, now)
	reg.dropIfEmptyLocked(a)
	s.send(closedFrame())
	return nil
}

// namedOrEarlier is what a release or close names (PROTOCOL.md §5.6,
// §5.9): the value of key, which must be the one this connection named
// earlier if it did (mismatch, checked first, as the reference does); or,
// if key is absent, that earlier one, which must exist (none).
func namedOrEarlier(msg clientMessage, key string, maxLen int, did bool, earlier string, mismatch, none protocolError) (string, error) {
	if !msg.has(key) {
		if !did {
			return "", none
		}
		return earlier, nil
	}
	given, err := msg.str(key, maxLen)
	if did && (err != nil || given != earlier) {
		return "", mismatch
	}
	return given, err
}

// holder is the address what this connection's side takes is charged to.
func (s *session) holder() netip.Addr { return addrKey(s.addr.ip) }

// admitLocked decides whether the connection may take more channel
// state: want must fit in what its address may hold (quota.go), and the
// address's allowance of new channels (limiter in limits.go) must have room
// for one more, else the refusal is rateErr.
func (s *session) admitLocked(want holdings, rateErr protocolError) error {
	if err := s.srv.reg.roomForAddrLocked(s.holder(), want); err != nil {
		return err
	}
	if !s.srv.limiter.allowNewNameplate(s.addr.ip) {
		s.srv.metrics.refused("new nameplates per address")
		return rateErr
	}
	return nil
}

// disconnected forgets the connection's subscription. Its claims and open
// mailboxes stay: the client may reconnect and carry on (PROTOCOL.md §4.1 rule 7).
func (s *session) disconnected() {
	reg := s.srv.reg
	reg.mu.Lock()
	defer reg.mu.Unlock()
	if s.mailbox != nil {
		reg.unsubscribeLocked(s.mailbox, s)
		s.mailbox = nil
	}
}

// Server messages are written in the reference's layout, so they match it
// byte for byte where the content is the same: Python's separators (", "
// and ": "), non-ASCII escaped as \uXXXX, the type-specific fields first,
// then "type", then "server_tx". Values a client sent that are echoed
// unchanged ("id", "ping", "orig") go back exactly as received.

var jsonNull = json.RawMessage("null")

// frameWriter builds one server message.
type frameWriter struct{ b []byte }

func newFrame() *frameWriter { return &frameWriter{b: append(make([]byte, 0, 128), '{')} }

func (w *frameWriter) key(k string) *frameWriter {
	if len(w.b) > 1 {
		w.b = append(w.b, ", "...)
	}
	w.b = appendPyString(w.b, k)
	w.b = append(w.b, ": "...)
	return w
}

func (w *frameWriter) str(k, v string) *frameWriter {
	w.key(k).b = appendPyString(w.b, v)
	return w
}

func (w *frameWriter) raw(k string, v json.RawMessage) *frameWriter {
	if v == nil {
		v = jsonNull
	}
	w.key(k).b = append(w.b, v...)
	return w
}

// echo writes a value a client sent, re-encoded as the reference does
// (it decodes every message and encodes its replies with Python's json).
func (w *frameWriter) echo(k string, v json.RawMessage) *frameWriter {
	if v == nil {
		v = jsonNull
	}
	w.key(k).b = appendPyJSON(w.b, v, 0)
	return w
}

func (w *frameWriter) float(k string, v float64) *frameWriter {
	w.key(k).b = appendPyFloat(w.b, v)
	return w
}

// done adds "type" and "server_tx" and returns the frame.
func (w *frameWriter) done(typ string) []byte {
	w.str("type", typ)
	w.float("server_tx", nowSeconds())
	return append(w.b, '}')
}

// welcomeInfo is what an operator configured for the welcome message.
type welcomeInfo struct {
	motd, currentCLIVersion, signalError string
}

func welcomeFrame(info welcomeInfo, addr clientAddr) []byte {
	inner := newFrame()
	if info.motd != "" {
		inner.str("motd", info.motd)
	}
	if info.currentCLIVersion != "" {
		inner.str("current_cli_version", info.currentCLIVersion)
	}
	if info.signalError != "" {
		inner.str("error", info.signalError)
	}
	if addr.ip.IsValid() {
		family := "ipv4"
		if addr.ip.Is6() {
			family = "ipv6"
		}
		a := newFrame()
		a.key("port").b = strconv.AppendUint(a.b, uint64(addr.port), 10)
		a.str(family, addr.ip.String())
		inner.raw("your-address", append(a.b, '}'))
	}
	return newFrame().raw("welcome", append(inner.b, '}')).done("welcome")
}

func ackFrame(id json.RawMessage) []byte { return newFrame().echo("id", id).done("ack") }

func pongFrame(v json.RawMessage) []byte { return newFrame().echo("pong", v).done("pong") }

func errorFrame(text string, orig []byte) []byte {
	return newFrame().str("error", text).echo("orig", orig).done("error")
}

func nameplatesFrame(names []string) []byte {
	w := newFrame().key("nameplates")
	w.b = append(w.b, '[')
	for i, name := range names {
		if i > 0 {
			w.b = append(w.b, ", "...)
		}
		w.b = append(w.b, `{"id": `...)
		w.b = append(appendPyString(w.b, name), '}')
	}
	w.b = append(w.b, ']')
	return w.done("nameplates")
}

func allocatedFrame(name string) []byte { return newFrame().str("nameplate", name).done("allocated") }

func claimedFrame(mailboxID string) []byte {
	return newFrame().str("mailbox", mailboxID).done("claimed")
}

func releasedFrame() []byte { return newFrame().done("released") }

func closedFrame() []byte { return newFrame().done("closed") }

func messageFrame(m message) []byte {
	return newFrame().str("side", m.side).str("phase", m.phase).str("body", m.body).
		float("server_rx", m.serverRx).echo("id", m.id).done("message")
}

// appendPyString appends s as a JSON string the way Python's json.dumps
// writes it: only printable ASCII is written as is.
// Runs of printable ASCII, which is most of what is written (hex bodies,
// sides, phases), are copied whole.
func appendPyString(b []byte, s string) []byte {
	b = append(b, '"')
	for i := 0; i < len(s); {
		j := i
		for j < len(s) && pyPlain[s[j]] {
			j++
		}
		b = append(b, s[i:j]...)
		if i = j; i < len(s) {
			r, size := utf8.DecodeRuneInString(s[i:])
			b = appendPyRune(b, r)
			i += size
		}
	}
	return append(b, '"')
}

// pyPlain marks the bytes appendPyString copies as they are: printable
// ASCII other than the quote and the backslash. One look-up a byte
// instead of four comparisons: a 2 KB hex body takes 1.3 µs instead of
// 1.9, and each message's body is written twice, to its frame and to
// the journal.
var pyPlain = func() (plain [256]bool) {
	for c := 0x20; c < 0x7f; c++ {
		plain[c] = c != '"' && c != '\\'
	}
	return plain
}()

func appendPyRune(b []byte, r rune) []byte {
	switch {
	case r == '"' || r == '\\':
		return append(b, '\\', byte(r))
	case r == '\n':
		return append(b, `\n`...)
	case r == '\r':
		return append(b, `\r`...)
	case r == '\t':
		return append(b, `\t`...)
	case r == '\b':
		return append(b, `\b`...)
	case r == '\f':
		return append(b, `\f`...)
	case r >= 0x20 && r < 0x7f:
		return append(b, byte(r))
	case r > 0xffff: // written as a UTF-16 surrogate pair
		r -= 0x10000
		b = appendUnitEscape(b, 0xd800+(r>>10))
		return appendUnitEscape(b, 0xdc00+(r&0x3ff))
	}
	return appendUnitEscape(b, r)
}

func appendUnitEscape(b []byte, u rune) []byte {
	const hex = "0123456789abcdef"
	return append(b, '\\', 'u', hex[u>>12&15], hex[u>>8&15], hex[u>>4&15], hex[u&15])
}

// maxEchoDepth bounds how deeply nested a value appendPyJSON re-encodes;
// anything deeper is written as it came (Python would refuse it anyway).
const maxEchoDepth = 32

// appendPyJSON appends the valid JSON value v as Python's json.dumps
// writes what json.loads reads from it: ", " and ": " separators,
// strings with only printable ASCII, integers as they came (but -0 is 0),
// other numbers in Python's float repr, and of an object's duplicate keys
// the last value in the first one's place.
func appendPyJSON(b, v []byte, depth int) []byte {
	v = v[skipSpace(v, 0):]
	v = v[:skipValue(v, 0)]
	if depth > maxEchoDepth {
		return append(b, v...)
	}
	switch v[0] {
	case '"':
		if isPlainString(v) {
			return append(b, v...)
		}
		b = append(b, '"')
		for i := 1; i < len(v)-1; {
			if v[i] != '\\' {
				r, size := utf8.DecodeRune(v[i:])
				b, i = appendPyRune(b, r), i+size
				continue
			}
			switch c := v[i+1]; c {
			case 'u':
				if u := hex4(v[i+2:]); u >= 0xd800 && u < 0xe000 {
					b = appendUnitEscape(b, u) // half a pair stays as it was
				} else {
					b = appendPyRune(b, u)
				}
				i += 6
			case '/':
				b, i = append(b, '/'), i+2
			default: // " \ b f n r t: Python writes them the same
				b, i = append(b, '\\', c), i+2
			}
		}
		return append(b, '"')
	case '[':
		b = append(b, '[')
		for i, n := skipSpace(v, 1), 0; v[i] != ']'; n++ {
			if n > 0 {
				b = append(b, ", "...)
			}
			end := skipValue(v, i)
			b = appendPyJSON(b, v[i:end], depth+1)
			if i = skipSpace(v, end); v[i] == ',' {
				i = skipSpace(v, i+1)
			}
		}
		return append(b, ']')
	case '{':
		type member struct{ key, value []byte }
		var members []member
		index := map[string]int{}
		for i := skipSpace(v, 1); v[i] != '}'; {
			keyEnd := skipValue(v, i)
			start := skipSpace(v, skipSpace(v, keyEnd)+1)
			end := skipValue(v, start)
			key, _ := unquote(v[i:keyEnd])
			if j, ok := index[key]; ok {
				members[j].value = v[start:end]
			} else {
				index[key] = len(members)
				members = append(members, member{v[i:keyEnd], v[start:end]})
			}
			if i = skipSpace(v, end); v[i] == ',' {
				i = skipSpace(v, i+1)
			}
		}
		b = append(b, '{')
		for n, m := range members {
			if n > 0 {
				b = append(b, ", "...)
			}
			b = append(appendPyJSON(b, m.key, depth+1), ": "...)
			b = appendPyJSON(b, m.value, depth+1)
		}
		return append(b, '}')
	case 't', 'f', 'n':
		return append(b, v...)
	}
	if !bytes.ContainsAny(v, ".eE") { // an integer: Python keeps every digit
		if string(v) == "-0" {
			return append(b, '0')
		}
		return append(b, v...)
	}
	f, err := strconv.ParseFloat(string(v), 64)
	if err != nil && math.IsInf(f, 0) {
		// Python reads it as infinity and writes Infinity, which is not
		// JSON; the number as it came is, and reads back the same.
		return append(b, v...)
	}
	return appendPyFloat(b, f)
}

// echoedLen is the length of v as appendPyJSON writes it, 0 for none.
func echoedLen(v json.RawMessage) int {
	if v == nil {
		return 0
	}
	var buf [64]byte // room for a usual id, which is then measured without allocating
	return len(appendPyJSON(buf[:0], v, 0))
}

// isPlainString reports whether the JSON string literal v is printable
// ASCII without escapes, which Python writes back unchanged.
func isPlainString(v []byte) bool {
	for _, c := range v[1 : len(v)-1] {
		if c < 0x20 || c >= 0x7f || c == '\\' {
			return false
		}
	}
	return true
}

// pyStringLen is len(appendPyString(nil, s)), without building it.
func pyStringLen(s string) int {
	n := 2
	for _, r := range s {
		switch {
		case r == '"' || r == '\\' || r == '\n' || r == '\r' || r == '\t' || r == '\b' || r == '\f':
			n += 2
		case r >= 0x20 && r < 0x7f:
			n++
		case r > 0xffff:
			n += 12
		default:
			n += 6
		}
	}
	return n
}

// messageFrameOverhead is what a "message" frame adds to its encoded side,
// phase, body and id: keys, separators, its type and two time stamps.
const messageFrameOverhead = len(`{"side": , "phase": , "body": , "server_rx": , "id": , "type": "message", "server_tx": }`) + 2*pyTimeLen

// pyTimeLen is the length of a time stamp as appendPyFloat writes it
// (1795715551.1482983).
const pyTimeLen = 18

// appendPyFloat appends f as Python's repr does: the shortest form that
// reads back the same, always with a fraction or an exponent.
func appendPyFloat(b []byte, f float64) []byte {
	abs := math.Abs(f)
	if abs != 0 && (abs < 1e-4 || abs >= 1e16) {
		return strconv.AppendFloat(b, f, 'e', -1, 64)
	}
	start := len(b)
	b = strconv.AppendFloat(b, f, 'f', -1, 64)
	if !bytes.ContainsRune(b[start:], '.') {
		b = append(b, ".0"...)
	}
	return b
}
