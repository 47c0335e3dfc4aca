// packaging_test.go tests what ships beside the code: the Dockerfile and
// the systemd unit agree with the README and with the program's flags,
// the build they use makes a static binary, and the unit passes
// systemd-analyze verify. No container engine runs here, so the image
// itself is not built; its build command is.
package main

import (
	"bytes"
	"debug/elf"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// readRepoFile returns a file of the repository.
func readRepoFile(t testing.TB, name string) string {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// buildCommand is the Dockerfile's build of the binary.
var buildCommand = regexp.MustCompile(`(?m)^RUN (CGO_ENABLED=0 go build .*)$`)

// TestStaticBuild runs the Dockerfile's build command, which the README
// gives too, and checks that it makes a static binary that runs
// anywhere (the image has nothing else in it), and that it works.
func TestStaticBuild(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the program")
	}
	m := buildCommand.FindStringSubmatch(readRepoFile(t, "Dockerfile"))
	if m == nil {
		t.Fatal("no `RUN CGO_ENABLED=0 go build ...` in the Dockerfile")
	}
	command := m[1]
	if !strings.Contains(readRepoFile(t, "README.md"), command) {
		t.Errorf("the README does not give the Dockerfile's build command %q", command)
	}
	if !strings.HasSuffix(command, " -o wormhole-mailbox .") {
		t.Fatalf("build command %q does not end with -o wormhole-mailbox .", command)
	}
	bin := filepath.Join(t.TempDir(), "wormhole-mailbox")
	out, err := exec.Command("sh", "-c", strings.TrimSuffix(command, "wormhole-mailbox .")+bin+" .").CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", command, err, out)
	}

	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			t.Errorf("binary has a %v program header: it is linked dynamically", p.Type)
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Errorf("binary needs shared libraries %v", libs)
	}
	if f.Section(".symtab") != nil {
		t.Errorf("binary has a symbol table: -ldflags='-s -w' did not strip it")
	}

	printed, err := exec.Command(bin, "--version").Output()
	if err != nil || string(printed) != "wormhole-mailbox "+version+"\n" {
		t.Errorf("%s --version: %q, %v; want exit status 0", bin, printed, err)
	}
	if err := exec.Command(bin, "-h").Run(); err != nil {
		t.Errorf("%s -h: %v, want exit status 0", bin, err)
	}
	if err := exec.Command(bin, "--no-such-flag").Run(); err == nil {
		t.Errorf("%s --no-such-flag exited 0", bin)
	}
}

// TestDockerfileCommand checks that the image's command line is one the
// program accepts, and that its health check asks the metrics listener
// that command line starts.
func TestDockerfileCommand(t *testing.T) {
	dockerfile := readRepoFile(t, "Dockerfile")
	m := regexp.MustCompile(`(?m)^CMD (\[.*\])$`).FindStringSubmatch(dockerfile)
	if m == nil {
		t.Fatal("no CMD [...] line in the Dockerfile")
	}
	var args []string
	if err := json.Unmarshal([]byte(m[1]), &args); err != nil {
		t.Fatalf("CMD: %v", err)
	}
	cfg, err := parseFlags(args, &bytes.Buffer{}, &bytes.Buffer{})
	if err != nil {
		t.Fatalf("CMD %v: %v", args, err)
	}
	if !strings.HasPrefix(cfg.channelDB, "/data/") || !strings.HasPrefix(cfg.usageDB, "/data/") {
		t.Errorf("CMD keeps state in %q and usage in %q, want both on the /data volume", cfg.channelDB, cfg.usageDB)
	}
	if a, err := listenAddress(cfg.port); err != nil || a != ":4000" {
		t.Errorf("CMD listens on %q (%v), want :4000, as EXPOSE says", a, err)
	}
	want := `"http://` + cfg.metricsListen + `/healthz"`
	if cfg.metricsListen == "" || !regexp.MustCompile(`(?m)^\s+CMD \[.*"healthcheck", `+regexp.QuoteMeta(want)+`\]$`).MatchString(dockerfile) {
		t.Errorf("HEALTHCHECK does not run the healthcheck command on %s", want)
	}
}

// unitExecStart is the systemd unit's command line.
var unitExecStart = regexp.MustCompile(`(?m)^ExecStart=/usr/local/bin/wormhole-mailbox (.*)$`)

// TestSystemdUnit checks that the unit's command line is one the program
// accepts, and that systemd-analyze verify finds nothing wrong with it.
func TestSystemdUnit(t *testing.T) {
	const unitPath = "contrib/wormhole-mailbox.service"
	unit := readRepoFile(t, unitPath)
	m := unitExecStart.FindStringSubmatch(unit)
	if m == nil {
		t.Fatal("no ExecStart=/usr/local/bin/wormhole-mailbox line in the unit")
	}
	if _, err := parseFlags(strings.Fields(m[1]), &bytes.Buffer{}, &bytes.Buffer{}); err != nil {
		t.Fatalf("ExecStart flags %q: %v", m[1], err)
	}

	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Skip("systemd-analyze is not installed")
	}
	// verify wants the ExecStart program to exist: any executable will do,
	// so the unit is verified with this test's own.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	copyPath := filepath.Join(dir, "wormhole-mailbox.service")
	if err := os.WriteFile(copyPath, []byte(strings.ReplaceAll(unit, "/usr/local/bin/wormhole-mailbox", self)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("systemd-analyze", "verify", "--man=no", copyPath).CombinedOutput()
	// verify exits 0 after some warnings (an unknown key, say), so
	// anything it prints is a failure.
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("systemd-analyze verify %s: %v\n%s", unitPath, err, out)
	}
}

// TestREADMEFlags checks that the README's list of flags is what -h
// prints, so that it stays exact as flags come and go. To refresh it,
// paste the output of `go run . -h 2>&1` into the block.
func TestREADMEFlags(t *testing.T) {
	var usage bytes.Buffer
	run(t.Context(), []string{"-h"}, &usage, &usage)
	readme := readRepoFile(t, "README.md")
	const intro = "`wormhole-mailbox -h` prints:\n\n```text\n"
	i := strings.Index(readme, intro)
	if i < 0 {
		t.Fatalf("README has no %q", intro)
	}
	block, _, ok := strings.Cut(readme[i+len(intro):], "```\n")
	if !ok {
		t.Fatal("README's block of flags does not end")
	}
	if block != usage.String() {
		t.Errorf("README's flags differ from -h; refresh them from `go run . -h 2>&1`.\nREADME:\n%s\n-h:\n%s", block, usage.String())
	}
}

// TestREADMECommandLines checks that the command lines the README gives
// for the systemd unit are ones the program accepts, and that it lists
// the Docker image's flags as the Dockerfile has them.
func TestREADMECommandLines(t *testing.T) {
	readme := readRepoFile(t, "README.md")
	lines := regexp.MustCompile(`(?m)^ExecStart=/usr/local/bin/wormhole-mailbox (.*)$`).FindAllStringSubmatch(readme, -1)
	if len(lines) == 0 {
		t.Fatal("README gives no ExecStart= line")
	}
	for _, m := range lines {
		if _, err := parseFlags(splitCommandLine(m[1]), &bytes.Buffer{}, &bytes.Buffer{}); err != nil {
			t.Errorf("README's ExecStart flags %q: %v", m[1], err)
		}
	}

	m := regexp.MustCompile(`(?m)^CMD (\[.*\])$`).FindStringSubmatch(readRepoFile(t, "Dockerfile"))
	var args []string
	if m == nil || json.Unmarshal([]byte(m[1]), &args) != nil {
		t.Fatal("no CMD [...] line in the Dockerfile")
	}
	if !strings.Contains(readme, "`"+strings.Join(args, " ")+"`") {
		t.Errorf("README does not list the image's flags as `%s`", strings.Join(args, " "))
	}
}

// splitCommandLine splits a command line at spaces outside double quotes,
// and drops the quotes, as systemd does.
func splitCommandLine(s string) []string {
	var args []string
	var arg strings.Builder
	quoted, inArg := false, false
	for _, r := range s {
		switch {
		case r == '"':
			quoted, inArg = !quoted, true
		case r == ' ' && !quoted:
			if inArg {
				args = append(args, arg.String())
				arg.Reset()
			}
			inArg = false
		default:
			arg.WriteRune(r)
			inArg = true
		}
	}
	if inArg {
		args = append(args, arg.String())
	}
	return args
}
