// sockets_linux.go owns what the server asks of Linux about its sockets
// and descriptors: the bytes a socket's kernel send buffer still holds,
// and the process's descriptor limit.
package main

import (
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
