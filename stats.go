// stats.go owns the "stats" command, which summarises a usage log.
package main

import (
	"errors"
	"io"
)

func runStats(args []string, stdout, stderr io.Writer) error {
	return errors.New("stats: not yet")
}
