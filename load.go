// load.go owns the "load" command, a load driver for benchmarks.
package main

import (
	"context"
	"errors"
	"io"
)

func runLoad(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return errors.New("load: not yet")
}
