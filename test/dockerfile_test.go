package test

// The Dockerfile, its .dockerignore and the Node.js example image, checked
// against the binary.

import (
	"bytes"
	"debug/elf"
	"encoding/json"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// dockerInstr is one Dockerfile instruction.
type dockerInstr struct {
	cmd  string // upper case: FROM, RUN ...
	args string
	line int
}

// dockerStage is one FROM and what follows it.
type dockerStage struct {
	from, name string
	instrs     []dockerInstr
}

func (s dockerStage) all(cmd string) []dockerInstr {
	var out []dockerInstr
	for _, in := range s.instrs {
		if in.cmd == cmd {
			out = append(out, in)
		}
	}
	return out
}

// last returns the stage's last cmd instruction's arguments, "" if none.
func (s dockerStage) last(cmd string) string {
	all := s.all(cmd)
	if len(all) == 0 {
		return ""
	}
	return all[len(all)-1].args
}

// parseDockerfile reads path's instructions by stage: comments dropped,
// continuation lines joined.
func parseDockerfile(t *testing.T, path string) (globalArgs []dockerInstr, stages []dockerStage) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var cur strings.Builder
	start := 0
	for i, line := range strings.Split(string(b), "\n") {
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "#") || (trimmed == "" && cur.Len() == 0) {
			continue
		}
		if cur.Len() == 0 {
			start = i + 1
		}
		if strings.HasSuffix(trimmed, "\\") {
			cur.WriteString(strings.TrimSuffix(trimmed, "\\") + " ")
			continue
		}
		cur.WriteString(trimmed)
		text := cur.String()
		cur.Reset()
		cmd, args, _ := strings.Cut(text, " ")
		in := dockerInstr{cmd: strings.ToUpper(cmd), args: strings.TrimSpace(args), line: start}
		if in.cmd == "FROM" {
			f := strings.Fields(in.args)
			for len(f) > 0 && strings.HasPrefix(f[0], "--") {
				f = f[1:]
			}
			st := dockerStage{}
			if len(f) > 0 {
				st.from = f[0]
			}
			if len(f) == 3 && strings.EqualFold(f[1], "as") {
				st.name = f[2]
			}
			stages = append(stages, st)
			continue
		}
		if len(stages) == 0 {
			globalArgs = append(globalArgs, in)
			continue
		}
		stages[len(stages)-1].instrs = append(stages[len(stages)-1].instrs, in)
	}
	if len(stages) == 0 {
		t.Fatalf("%s: no FROM", path)
	}
	return globalArgs, stages
}

// dockerExecForm parses an exec-form (JSON array) ENTRYPOINT or CMD.
func dockerExecForm(t *testing.T, what, args string) []string {
	t.Helper()
	var v []string
	if err := json.Unmarshal([]byte(args), &v); err != nil {
		t.Errorf("%s %s: want the exec form, a JSON array (the shell form would make sh PID 1, and signals would not reach shoal): %v", what, args, err)
	}
	return v
}

// dockerCopiesFrom returns the sources and destination of `COPY --from=from ...`
// instructions of a stage, by destination.
func dockerCopiesFrom(st dockerStage, from string) map[string]string {
	out := map[string]string{}
	for _, in := range st.all("COPY") {
		f := strings.Fields(in.args)
		var src []string
		ok := false
		for _, a := range f {
			if v, is := strings.CutPrefix(a, "--from="); is {
				ok = v == from
				continue
			}
			if strings.HasPrefix(a, "--") {
				continue
			}
			src = append(src, a)
		}
		if ok && len(src) == 2 {
			out[src[1]] = src[0]
		}
	}
	return out
}

// dockerExposed returns the ports of a stage's EXPOSE instructions.
func dockerExposed(st dockerStage) []int {
	var out []int
	for _, in := range st.all("EXPOSE") {
		for _, f := range strings.Fields(in.args) {
			n, _ := strconv.Atoi(strings.TrimSuffix(f, "/tcp"))
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out
}

// checkNonRootUser checks a USER instruction's value.
func checkNonRootUser(t *testing.T, file, user string, numeric bool) {
	t.Helper()
	name, _, _ := strings.Cut(user, ":")
	if name == "" || name == "root" || name == "0" {
		t.Errorf("%s: USER %q: want a non-root user", file, user)
		return
	}
	if n, err := strconv.Atoi(name); numeric && (err != nil || n == 0) {
		t.Errorf("%s: USER %q: want a numeric uid, so that Kubernetes' runAsNonRoot can check it", file, user)
	}
}

// TestDockerfileMatchesBinary checks the Dockerfile's essential lines
// against the binary: the exec-form entrypoint that makes shoal PID 1, the
// stop signal it handles, a non-root user, a static build, and the default
// ports it exposes.
func TestDockerfileMatchesBinary(t *testing.T) {
	defaults := flagDefaults(t, nil, -1, -1)
	cfg := newShoalConfig(t, "the binary's defaults", nil, nil, defaults)
	globals, stages := parseDockerfile(t, filepath.Join(moduleRoot, "Dockerfile"))
	final := stages[len(stages)-1]

	if !regexp.MustCompile(`^(scratch|gcr\.io/distroless/static(-debian\d+)?(:[\w.-]+)?(@sha256:[0-9a-f]+)?)$`).MatchString(final.from) {
		t.Errorf("final stage FROM %s: want scratch or gcr.io/distroless/static", final.from)
	}
	entry := dockerExecForm(t, "ENTRYPOINT", final.last("ENTRYPOINT"))
	if len(entry) != 1 || entry[0] != "/shoal" {
		t.Errorf("ENTRYPOINT %q, want [\"/shoal\"]", entry)
	}
	if sig := final.last("STOPSIGNAL"); sig != "SIGTERM" {
		t.Errorf("STOPSIGNAL %q, want SIGTERM: shoal's graceful stop", sig)
	}
	checkNonRootUser(t, "Dockerfile", final.last("USER"), true)
	if got, want := dockerExposed(final), []int{cfg.port(t), cfg.metricsPort(t)}; !slices.Equal(got, sortedCopy(want)) {
		t.Errorf("EXPOSE %v, want the binary's default port and metrics port %v", got, sortedCopy(want))
	}
	if final.last("CMD") != "" {
		t.Errorf("final stage has CMD %s: the built-in worker runs with no arguments", final.last("CMD"))
	}

	// The build stage.
	build, run := buildStep(t, stages)
	for _, want := range []string{"CGO_ENABLED=0", "-trimpath", "-s -w", "-X main.version=${VERSION}", "go build"} {
		if !strings.Contains(run.args, want) {
			t.Errorf("Dockerfile:%d: the build lacks %q: %s", run.line, want, run.args)
		}
	}
	if !slices.ContainsFunc(build.all("ARG"), func(in dockerInstr) bool { return regexp.MustCompile(`^VERSION(=|$)`).MatchString(in.args) }) {
		t.Errorf("build stage %q: no ARG VERSION", build.name)
	}
	out := regexp.MustCompile(`-o\s+(\S+)`).FindStringSubmatch(run.args)
	if out == nil {
		t.Fatalf("Dockerfile:%d: go build without -o", run.line)
	}
	if src := dockerCopiesFrom(final, build.name)[firstArg(entry)]; src != out[1] {
		t.Errorf("final stage copies %q from %s to %s, want the build's output %s", src, build.name, firstArg(entry), out[1])
	}

	// The Go of the builder image is at least go.mod's.
	goVersion := ""
	for _, in := range globals {
		if v, ok := strings.CutPrefix(in.args, "GO_VERSION="); in.cmd == "ARG" && ok {
			goVersion = v
		}
	}
	from := strings.ReplaceAll(build.from, "${GO_VERSION}", goVersion)
	m := regexp.MustCompile(`^golang:(\d+)\.(\d+)`).FindStringSubmatch(from)
	mod, err := os.ReadFile(filepath.Join(moduleRoot, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	need := regexp.MustCompile(`(?m)^go (\d+)\.(\d+)`).FindStringSubmatch(string(mod))
	if m == nil || need == nil {
		t.Errorf("builder image %s (go.mod go %v): want golang:MAJOR.MINOR", from, need)
	} else if atoiOr0(m[1])*1000+atoiOr0(m[2]) < atoiOr0(need[1])*1000+atoiOr0(need[2]) {
		t.Errorf("builder image %s is older than go.mod's go %s.%s", from, need[1], need[2])
	}
}

func firstArg(v []string) string {
	if len(v) == 0 {
		return ""
	}
	return v[0]
}

func sortedCopy(v []int) []int { v = slices.Clone(v); slices.Sort(v); return v }

// buildStep returns the stage and the RUN instruction that build shoal.
func buildStep(t *testing.T, stages []dockerStage) (dockerStage, dockerInstr) {
	t.Helper()
	for _, st := range stages {
		for _, in := range st.all("RUN") {
			if strings.Contains(in.args, "go build") {
				return st, in
			}
		}
	}
	t.Fatal("Dockerfile: no RUN ... go build")
	return dockerStage{}, dockerInstr{}
}

// TestDockerBuildIsStatic runs the Dockerfile's own build command, in a copy
// of the build context that .dockerignore leaves, and checks that the
// binary is static, stripped, and reports the version it was given.
func TestDockerBuildIsStatic(t *testing.T) {
	_, stages := parseDockerfile(t, filepath.Join(moduleRoot, "Dockerfile"))
	_, run := buildStep(t, stages)
	// Drop RUN's own flags (--mount=...); the rest is the shell command.
	script := run.args
	for strings.HasPrefix(script, "--") {
		_, script, _ = strings.Cut(script, " ")
		script = strings.TrimSpace(script)
	}
	out := filepath.Join(t.TempDir(), "shoal")
	script = regexp.MustCompile(`-o\s+\S+`).ReplaceAllLiteralString(script, `-o "$SHOAL_OUT"`)

	ctxDir := t.TempDir()
	n := buildContext(t, moduleRoot, ctxDir)
	t.Logf("build context: %d files", n)

	const version = "v0.0.0-container-test"
	cmd := exec.Command("sh", "-ec", script)
	cmd.Dir = ctxDir
	cmd.Env = append(os.Environ(), "VERSION="+version, "TARGETOS=linux", "TARGETARCH="+runtime.GOARCH, "SHOAL_OUT="+out)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("the Dockerfile's build (%s) in its build context: %v\n%s", script, err, b)
	}

	f, err := elf.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Errorf("the binary has a PT_INTERP program header: dynamically linked, it will not run on distroless/static or scratch")
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) != 0 {
		t.Errorf("the binary needs shared libraries %v", libs)
	}
	if f.Section(".symtab") != nil {
		t.Errorf("the binary has a symbol table: -ldflags -s did not apply")
	}
	got, err := exec.Command(out, "version").Output()
	if err != nil || strings.TrimSpace(string(got)) != "shoal "+version {
		t.Errorf("shoal version: %q, %v; want %q", got, err, "shoal "+version)
	}
	if b, err := exec.Command("file", out).Output(); err == nil {
		t.Logf("%s", bytes.TrimSpace(b))
	}
}

// ignoreRule is one line of a .dockerignore.
type ignoreRule struct {
	re     *regexp.Regexp
	negate bool
}

// dockerignore reads the rules of a .dockerignore, with the Docker
// builder's syntax: paths relative to the context, '*' and '?' within one
// path element, '**' across elements, '!' to take an exclusion back, and a
// pattern that matches a directory excludes what is in it.
func dockerignore(t *testing.T, path string) []ignoreRule {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var rules []ignoreRule
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		r := ignoreRule{}
		if rest, ok := strings.CutPrefix(line, "!"); ok {
			r.negate, line = true, rest
		}
		line = filepath.Clean(strings.TrimPrefix(line, "/"))
		var re strings.Builder
		re.WriteString("^")
		for i := 0; i < len(line); i++ {
			switch c := line[i]; {
			case strings.HasPrefix(line[i:], "**/"):
				re.WriteString("(.*/)?")
				i += 2
			case strings.HasPrefix(line[i:], "**"):
				re.WriteString(".*")
				i++
			case c == '*':
				re.WriteString("[^/]*")
			case c == '?':
				re.WriteString("[^/]")
			default:
				re.WriteString(regexp.QuoteMeta(string(c)))
			}
		}
		re.WriteString("$")
		r.re = regexp.MustCompile(re.String())
		rules = append(rules, r)
	}
	return rules
}

func dockerIgnores(rules []ignoreRule, rel string) bool {
	out := false
	for _, r := range rules {
		for p := rel; p != "." && p != "/"; p = filepath.Dir(p) {
			if r.re.MatchString(p) {
				out = !r.negate
				break
			}
		}
	}
	return out
}

// buildContext copies the files of root that .dockerignore keeps to dst
// and returns how many.
func buildContext(t *testing.T, root, dst string) int {
	t.Helper()
	rules := dockerignore(t, filepath.Join(root, ".dockerignore"))
	n := 0
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		if rel == "." {
			return nil
		}
		if d.IsDir() {
			if rel == ".git" {
				return filepath.SkipDir // the builder excludes it too when listed; it is
			}
			return nil
		}
		if !d.Type().IsRegular() || dockerIgnores(rules, rel) {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
			return err
		}
		n++
		return os.WriteFile(target, b, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, must := range []string{"go.mod", "go.sum", "main.go"} {
		if _, err := os.Stat(filepath.Join(dst, must)); err != nil {
			t.Fatalf(".dockerignore leaves %s out of the build context", must)
		}
	}
	return n
}

func TestDockerignore(t *testing.T) {
	rules := dockerignore(t, filepath.Join(moduleRoot, ".dockerignore"))
	for rel, want := range map[string]bool{
		".git/config":              true,
		"test/pid1_test.go":        true,
		"deploy/kubernetes/a.yaml": true,
		"README.md":                true,
		"supervisor/supervisor.go": false,
		"supervisor/cpus_test.go":  true,
		"ipc/testdata/x":           true,
		"main.go":                  false,
		"go.sum":                   false,
	} {
		if got := dockerIgnores(rules, rel); got != want {
			t.Errorf("%s ignored = %v, want %v", rel, got, want)
		}
	}
}

// TestDockerNodeExample checks deploy/docker/Dockerfile.node-example, the
// README's example of wrapping one's own server, against the image.
func TestDockerNodeExample(t *testing.T) {
	defaults := flagDefaults(t, nil, -1, -1)
	cfg := newShoalConfig(t, "the binary's defaults", nil, nil, defaults)
	const file = "deploy/docker/Dockerfile.node-example"
	_, stages := parseDockerfile(t, filepath.Join(moduleRoot, file))
	_, ours := parseDockerfile(t, filepath.Join(moduleRoot, "Dockerfile"))
	shoalPath := firstArg(dockerExecForm(t, "ENTRYPOINT", ours[len(ours)-1].last("ENTRYPOINT")))
	final := stages[len(stages)-1]

	if m := regexp.MustCompile(`^node:(\d+)`).FindStringSubmatch(final.from); m == nil || atoiOr0(m[1]) < 22 {
		t.Errorf("%s: FROM %s: want node:22 or newer (reusePort needs Node.js 22.12)", file, final.from)
	}
	var dest string
	for _, in := range final.all("COPY") {
		f := strings.Fields(in.args)
		if len(f) == 3 && strings.HasPrefix(f[0], "--from=ghcr.io/shoal-sh/shoal:") && f[1] == shoalPath {
			dest = f[2]
		}
	}
	if dest == "" {
		t.Fatalf("%s: no COPY --from=ghcr.io/shoal-sh/shoal:TAG %s DEST", file, shoalPath)
	}
	entry := dockerExecForm(t, "ENTRYPOINT", final.last("ENTRYPOINT"))
	if len(entry) != 2 || (entry[0] != dest && filepath.Join("/usr/local/bin", entry[0]) != dest) || entry[1] != "--" {
		t.Errorf("%s: ENTRYPOINT %q, want [\"shoal\", \"--\"] with shoal at %s", file, entry, dest)
	}
	if cmd := dockerExecForm(t, "CMD", final.last("CMD")); len(cmd) == 0 || cmd[0] != "node" {
		t.Errorf("%s: CMD %q, want [\"node\", ...]", file, cmd)
	}
	if sig := final.last("STOPSIGNAL"); sig != "SIGTERM" {
		t.Errorf("%s: STOPSIGNAL %q, want SIGTERM", file, sig)
	}
	checkNonRootUser(t, file, final.last("USER"), false)
	if got, want := dockerExposed(final), sortedCopy([]int{cfg.port(t), cfg.metricsPort(t)}); !slices.Equal(got, want) {
		t.Errorf("%s: EXPOSE %v, want %v", file, got, want)
	}
}
