// sockets_linux.go owns what the server asks of Linux about its sockets
// and descriptors: the bytes a socket's kernel send buffer still holds,
// and the process's descriptor limit.
package main

import "syscall"

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
