// kernel_linux.go owns what the server asks of Linux beyond Go's
// standard library: the bytes a socket's kernel send buffer still holds,
// the process's descriptor limit, and a sync of a file's data alone.
package main

import (
	"errors"
	"os"
	"syscall"
	"unsafe"
)

// fileLimit is the process's limit on open file descriptors
// (RLIMIT_NOFILE), which Go raises to the hard limit at start; 0 if
// unknown.
func fileLimit() int {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil || rl.Cur > 1<<30 {
		return 0
	}
	return int(rl.Cur)
}

// siocoutq is the ioctl that reads how many bytes a TCP socket's send
// buffer holds, sent but not yet acknowledged or not yet sent (Linux's
// SIOCOUTQ, the same number as TIOCOUTQ).
const siocoutq = 0x5411

// sendQueued returns how many bytes the socket's kernel send buffer
// holds; 0 if the kernel does not say.
func sendQueued(rc syscall.RawConn) int {
	var n int32
	rc.Control(func(fd uintptr) {
		if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, siocoutq, uintptr(unsafe.Pointer(&n))); errno != 0 {
			n = 0
		}
	})
	return int(n)
}

// datasync makes what was written to f durable, with only the metadata
// needed to read it back (fdatasync): the size if it changed, not the
// modification time. The journal writes its lines over zeros it wrote
// ahead (see journalReserveBytes), so that most syncs write no inode.
func datasync(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		for serr = syscall.Fdatasync(int(fd)); errors.Is(serr, syscall.EINTR); serr = syscall.Fdatasync(int(fd)) {
		}
	}); err != nil {
		return err
	}
	if serr != nil {
		return &os.PathError{Op: "fdatasync", Path: f.Name(), Err: serr}
	}
	return nil
}
