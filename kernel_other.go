//go:build !linux

// kernel_other.go stands in for kernel_linux.go where the server cannot
// ask the kernel: no descriptor limit is known, no send buffer counted,
// and a file's data is synced with its metadata.
package main

import (
	"os"
	"syscall"
)

// fileLimit is 0: unknown.
func fileLimit() int { return 0 }

// sendQueued is 0: the kernel's send buffer is not counted here.
func sendQueued(syscall.RawConn) int { return 0 }

// datasync is f.Sync.
func datasync(f *os.File) error { return f.Sync() }
