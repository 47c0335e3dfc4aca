//go:build !linux

// sockets_other.go stands in for sockets_linux.go where the server cannot
// ask the kernel: no descriptor limit is known, and no send buffer counted.
package main

import "syscall"

// fileLimit is 0: unknown.
func fileLimit() int { return 0 }

// sendQueued is 0: the kernel's send buffer is not counted here.
func sendQueued(syscall.RawConn) int { return 0 }
