package test

// The manifests of deploy/kubernetes, checked against the binary and run
// as written, as far as one machine allows.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
	"golang.org/x/sys/unix"

	"github.com/shoal-sh/shoal/internal/peer"
)

type kubeMeta struct {
	Name        string            `yaml:"name"`
	Labels      map[string]string `yaml:"labels"`
	Annotations map[string]string `yaml:"annotations"`
}

type kubeDoc struct {
	file       string
	APIVersion string   `yaml:"apiVersion"`
	Kind       string   `yaml:"kind"`
	Metadata   kubeMeta `yaml:"metadata"`
	node       *yaml.Node
}

type kubeDeployment struct {
	Spec struct {
		Selector struct {
			MatchLabels map[string]string `yaml:"matchLabels"`
		} `yaml:"selector"`
		Template struct {
			Metadata kubeMeta `yaml:"metadata"`
			Spec     kubePod  `yaml:"spec"`
		} `yaml:"template"`
	} `yaml:"spec"`
}

type kubePod struct {
	TerminationGracePeriodSeconds *int `yaml:"terminationGracePeriodSeconds"`
	SecurityContext               struct {
		RunAsNonRoot *bool        `yaml:"runAsNonRoot"`
		RunAsUser    *int         `yaml:"runAsUser"`
		RunAsGroup   *int         `yaml:"runAsGroup"`
		Sysctls      []kubeSysctl `yaml:"sysctls"`
	} `yaml:"securityContext"`
	Containers []kubeContainer `yaml:"containers"`
	Volumes    []kubeVolume    `yaml:"volumes"`
}

type kubeSysctl struct {
	Name  string `yaml:"name"`
	Value string `yaml:"value"`
}

type kubeVolume struct {
	Name string `yaml:"name"`
}

type kubeContainer struct {
	Name    string   `yaml:"name"`
	Image   string   `yaml:"image"`
	Command []string `yaml:"command"`
	Args    []string `yaml:"args"`
	Env     []struct {
		Name      string `yaml:"name"`
		Value     string `yaml:"value"`
		ValueFrom any    `yaml:"valueFrom"`
	} `yaml:"env"`
	Ports []struct {
		Name          string `yaml:"name"`
		ContainerPort int    `yaml:"containerPort"`
	} `yaml:"ports"`
	ReadinessProbe *kubeProbe `yaml:"readinessProbe"`
	LivenessProbe  *kubeProbe `yaml:"livenessProbe"`
	Lifecycle      struct {
		PreStop *struct {
			Sleep *struct {
				Seconds int `yaml:"seconds"`
			} `yaml:"sleep"`
		} `yaml:"preStop"`
	} `yaml:"lifecycle"`
	Resources struct {
		Limits   map[string]string `yaml:"limits"`
		Requests map[string]string `yaml:"requests"`
	} `yaml:"resources"`
	SecurityContext struct {
		RunAsUser                *int  `yaml:"runAsUser"`
		RunAsGroup               *int  `yaml:"runAsGroup"`
		RunAsNonRoot             *bool `yaml:"runAsNonRoot"`
		ReadOnlyRootFilesystem   *bool `yaml:"readOnlyRootFilesystem"`
		AllowPrivilegeEscalation *bool `yaml:"allowPrivilegeEscalation"`
		Capabilities             struct {
			Drop []string `yaml:"drop"`
			Add  []string `yaml:"add"`
		} `yaml:"capabilities"`
	} `yaml:"securityContext"`
	VolumeMounts []struct {
		Name      string `yaml:"name"`
		MountPath string `yaml:"mountPath"`
	} `yaml:"volumeMounts"`
}

type kubeProbe struct {
	HTTPGet *struct {
		Path   string `yaml:"path"`
		Port   any    `yaml:"port"`
		Scheme string `yaml:"scheme"`
	} `yaml:"httpGet"`
}

type kubeService struct {
	Spec struct {
		Selector map[string]string `yaml:"selector"`
		Ports    []struct {
			Name       string `yaml:"name"`
			Port       int    `yaml:"port"`
			TargetPort any    `yaml:"targetPort"`
		} `yaml:"ports"`
	} `yaml:"spec"`
}

type kubePodMonitor struct {
	Spec struct {
		Selector struct {
			MatchLabels map[string]string `yaml:"matchLabels"`
		} `yaml:"selector"`
		PodMetricsEndpoints []struct {
			Port       string `yaml:"port"`
			TargetPort any    `yaml:"targetPort"`
			Path       string `yaml:"path"`
			Scheme     string `yaml:"scheme"`
		} `yaml:"podMetricsEndpoints"`
	} `yaml:"spec"`
}

type kustomization struct {
	Resources []string `yaml:"resources"`
}

// loadManifests parses every YAML document under deploy/kubernetes.
func loadManifests(t *testing.T) []kubeDoc {
	t.Helper()
	dir := filepath.Join(moduleRoot, "deploy", "kubernetes")
	files, err := filepath.Glob(filepath.Join(dir, "*.y*ml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in %s (%v)", dir, err)
	}
	var docs []kubeDoc
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(b))
		for {
			var n yaml.Node
			if err := dec.Decode(&n); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			d := kubeDoc{file: filepath.Base(f), node: &n}
			if err := n.Decode(&d); err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			if d.APIVersion == "" || d.Kind == "" {
				t.Errorf("%s: a document without apiVersion or kind", f)
			}
			if d.Metadata.Name == "" && d.Kind != "Kustomization" {
				t.Errorf("%s: %s without metadata.name", f, d.Kind)
			}
			docs = append(docs, d)
		}
	}
	return docs
}

func (d kubeDoc) decode(t *testing.T, v any) {
	t.Helper()
	if err := d.node.Decode(v); err != nil {
		t.Fatalf("%s: %s %s: %v", d.file, d.Kind, d.Metadata.Name, err)
	}
}

// labelsSelect reports whether a selector's labels are all among labels.
func labelsSelect(selector, labels map[string]string) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// shoalContainer returns the pod's container that runs the shoal image.
func shoalContainer(t *testing.T, where string, pod kubePod) kubeContainer {
	t.Helper()
	for _, c := range pod.Containers {
		if strings.Contains(c.Image, "/shoal:") || strings.Contains(c.Image, "/shoal@") {
			return c
		}
	}
	t.Fatalf("%s: no container runs the shoal image", where)
	return kubeContainer{}
}

// containerArgv returns the command line the container runs: the image's
// ENTRYPOINT (/shoal) unless command replaces it, then args.
func containerArgv(c kubeContainer) []string {
	argv := []string{"/shoal"}
	if len(c.Command) > 0 {
		argv = slices.Clone(c.Command)
	}
	return append(argv, c.Args...)
}

func containerEnv(t *testing.T, c kubeContainer) map[string]string {
	t.Helper()
	env := map[string]string{}
	for _, e := range c.Env {
		if e.ValueFrom != nil {
			t.Errorf("container %s: env %s from valueFrom: this test cannot know its value", c.Name, e.Name)
		}
		env[e.Name] = e.Value
	}
	return env
}

// resolvePort returns the number of a port given as a number or as the
// name of one of the containers' ports.
func resolvePort(p any, containers ...kubeContainer) (int, error) {
	switch v := p.(type) {
	case int:
		return v, nil
	case string:
		if n, err := strconv.Atoi(v); err == nil {
			return n, nil
		}
		for _, c := range containers {
			for _, cp := range c.Ports {
				if cp.Name == v {
					return cp.ContainerPort, nil
				}
			}
		}
		return 0, fmt.Errorf("no container port named %q", v)
	}
	return 0, fmt.Errorf("port %v: want a number or a port name", p)
}

// podUser returns the uid and gid the container runs as, the image's USER
// when the manifest sets none.
func podUser(t *testing.T, pod kubePod, c kubeContainer) (int, int) {
	t.Helper()
	_, stages := parseDockerfile(t, filepath.Join(moduleRoot, "Dockerfile"))
	u, g, _ := strings.Cut(stages[len(stages)-1].last("USER"), ":")
	uid, gid := atoiOr0(u), atoiOr0(g)
	if v := pod.SecurityContext.RunAsUser; v != nil {
		uid = *v
	}
	if v := pod.SecurityContext.RunAsGroup; v != nil {
		gid = *v
	}
	if v := c.SecurityContext.RunAsUser; v != nil {
		uid = *v
	}
	if v := c.SecurityContext.RunAsGroup; v != nil {
		gid = *v
	}
	return uid, gid
}

// cpuQuantity parses a Kubernetes CPU quantity: "2", "1.5", "1500m".
func cpuQuantity(s string) (float64, error) {
	if m, ok := strings.CutSuffix(s, "m"); ok {
		n, err := strconv.ParseFloat(m, 64)
		return n / 1000, err
	}
	return strconv.ParseFloat(s, 64)
}

// podShoal is a Deployment's shoal container and what it asks of shoal.
type podShoal struct {
	where       string
	pod         kubePod
	labels      map[string]string
	annotations map[string]string
	container   kubeContainer
	cfg         shoalConfig
}

func podsOf(t *testing.T, docs []kubeDoc) []podShoal {
	t.Helper()
	defaults := flagDefaults(t, nil, -1, -1)
	var out []podShoal
	for _, d := range docs {
		if d.Kind != "Deployment" {
			continue
		}
		var dep kubeDeployment
		d.decode(t, &dep)
		where := d.file + ": Deployment " + d.Metadata.Name
		pod := dep.Spec.Template.Spec
		c := shoalContainer(t, where, pod)
		argv := containerArgv(c)
		out = append(out, podShoal{
			where:       where,
			pod:         pod,
			labels:      dep.Spec.Template.Metadata.Labels,
			annotations: dep.Spec.Template.Metadata.Annotations,
			container:   c,
			cfg:         newShoalConfig(t, where, argv[1:], containerEnv(t, c), defaults),
		})
		if !labelsSelect(dep.Spec.Selector.MatchLabels, dep.Spec.Template.Metadata.Labels) {
			t.Errorf("%s: selector %v does not select its pods %v", where, dep.Spec.Selector.MatchLabels, dep.Spec.Template.Metadata.Labels)
		}
	}
	if len(out) == 0 {
		t.Fatal("no Deployment in deploy/kubernetes")
	}
	return out
}

// TestManifestsAgreeWithBinary checks the values of deploy/kubernetes that
// must agree with shoal: ports, probes, the grace period, the scrape
// target, the worker count's CPU limit, and the security settings.
func TestManifestsAgreeWithBinary(t *testing.T) {
	docs := loadManifests(t)
	pods := podsOf(t, docs)
	for _, p := range pods {
		c, where := p.container, p.where
		appPort, metricsPort := p.cfg.port(t), p.cfg.metricsPort(t)

		// Container ports.
		byNumber := map[int]string{}
		for _, cp := range c.Ports {
			byNumber[cp.ContainerPort] = cp.Name
		}
		if _, ok := byNumber[appPort]; !ok {
			t.Errorf("%s: no containerPort %d, the port shoal's workers listen on", where, appPort)
		}
		if _, ok := byNumber[metricsPort]; !ok {
			t.Errorf("%s: no containerPort %d, shoal's metrics port", where, metricsPort)
		}

		// Probes: on the metrics port, /readyz and /healthz.
		for _, pr := range []struct {
			what, path string
			probe      *kubeProbe
		}{{"readinessProbe", "/readyz", c.ReadinessProbe}, {"livenessProbe", "/healthz", c.LivenessProbe}} {
			if pr.probe == nil || pr.probe.HTTPGet == nil {
				t.Errorf("%s: no %s.httpGet", where, pr.what)
				continue
			}
			port, err := resolvePort(pr.probe.HTTPGet.Port, c)
			if err != nil || port != metricsPort || pr.probe.HTTPGet.Path != pr.path {
				t.Errorf("%s: %s GET %s on port %v (%d, %v), want %s on %d", where, pr.what,
					pr.probe.HTTPGet.Path, pr.probe.HTTPGet.Port, port, err, pr.path, metricsPort)
			}
		}

		// Grace: the kubelet's SIGKILL after the preStop hook and shoal's
		// whole stop timeout.
		grace := 30 * time.Second // Kubernetes' default
		if g := p.pod.TerminationGracePeriodSeconds; g != nil {
			grace = time.Duration(*g) * time.Second
		}
		var preStop time.Duration
		if ps := c.Lifecycle.PreStop; ps != nil && ps.Sleep != nil {
			preStop = time.Duration(ps.Sleep.Seconds) * time.Second
		}
		stop := p.cfg.stopTimeout(t)
		if grace <= preStop+stop {
			t.Errorf("%s: terminationGracePeriodSeconds %s, want more than the preStop sleep %s + stop timeout %s", where, grace, preStop, stop)
		}

		// Scraping by annotation.
		ann := p.annotations
		if ann["prometheus.io/scrape"] != "true" || ann["prometheus.io/port"] != strconv.Itoa(metricsPort) || ann["prometheus.io/path"] != "/metrics" {
			t.Errorf("%s: prometheus.io annotations %v, want scrape \"true\", port \"%d\", path /metrics", where, ann, metricsPort)
		}

		// Workers: the default follows the CPU limit.
		if !p.cfg.set("workers") {
			cpu, ok := c.Resources.Limits["cpu"]
			if !ok {
				t.Errorf("%s: neither SHOAL_WORKERS nor limits.cpu: shoal would start one worker per CPU of the node", where)
			} else if n, err := cpuQuantity(cpu); err != nil || n <= 0 {
				t.Errorf("%s: limits.cpu %q: %v", where, cpu, err)
			} else {
				t.Logf("%s: limits.cpu %s: %d workers", where, cpu, int(math.Ceil(n)))
			}
		}

		// Security.
		psc, csc := p.pod.SecurityContext, c.SecurityContext
		if !(boolSet(psc.RunAsNonRoot) || boolSet(csc.RunAsNonRoot)) {
			t.Errorf("%s: runAsNonRoot not set", where)
		}
		uid, gid := podUser(t, p.pod, c)
		if uid == 0 {
			t.Errorf("%s: runs as uid 0", where)
		}
		if !boolSet(csc.ReadOnlyRootFilesystem) {
			t.Errorf("%s: readOnlyRootFilesystem not set", where)
		}
		if csc.AllowPrivilegeEscalation == nil || *csc.AllowPrivilegeEscalation {
			t.Errorf("%s: allowPrivilegeEscalation not false", where)
		}
		if !slices.Contains(csc.Capabilities.Drop, "ALL") || len(csc.Capabilities.Add) != 0 {
			t.Errorf("%s: capabilities drop %v add %v, want drop [ALL] and nothing added", where, csc.Capabilities.Drop, csc.Capabilities.Add)
		}
		if !slices.Contains(psc.Sysctls, kubeSysctl{"net.ipv4.tcp_migrate_req", "1"}) {
			t.Errorf("%s: securityContext.sysctls lacks net.ipv4.tcp_migrate_req=1", where)
		}

		// The control socket: with a read-only root, its directory must be
		// on a volume. Its default depends on the user and TMPDIR, so ask
		// the binary as that user with the container's environment.
		control := p.cfg.get("control")
		if !p.cfg.set("control") {
			if os.Getuid() != 0 {
				t.Logf("%s: not root: the control socket's default path for uid %d is not checked", where, uid)
			} else {
				env := []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/"}
				for k, v := range p.cfg.env {
					env = append(env, k+"="+v)
				}
				control = flagDefaults(t, env, uid, gid)["control"]
			}
		}
		if control != "" && boolSet(csc.ReadOnlyRootFilesystem) && (p.cfg.set("control") || os.Getuid() == 0) {
			onVolume := false
			for _, vm := range c.VolumeMounts {
				if strings.HasPrefix(control, strings.TrimSuffix(vm.MountPath, "/")+"/") {
					onVolume = true
				}
			}
			if !onVolume {
				t.Errorf("%s: the control socket %s is on the read-only root filesystem: mount a volume there, or set SHOAL_CONTROL", where, control)
			}
		}
		for _, vm := range c.VolumeMounts {
			if !slices.Contains(p.pod.Volumes, kubeVolume{vm.Name}) {
				t.Errorf("%s: volumeMount %s of no volume", where, vm.Name)
			}
		}

		// The environment is valid for the binary: 'shoal version' parses it
		// as a start would, and starts nothing.
		cmd := exec.Command(shoalBin, "version")
		cmd.Env = []string{"PATH=/usr/bin:/bin", noRaceSleep}
		for k, v := range p.cfg.env {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("%s: shoal rejects the container's environment: %v: %s", where, err, out)
		}
	}

	// Services and PodMonitors point at the pods' ports.
	kinds := map[string]int{}
	for _, d := range docs {
		kinds[d.Kind]++
		where := d.file + ": " + d.Kind + " " + d.Metadata.Name
		switch d.Kind {
		case "Deployment":
		case "Service":
			var svc kubeService
			d.decode(t, &svc)
			p := podSelectedBy(t, where, pods, svc.Spec.Selector)
			if len(svc.Spec.Ports) == 0 {
				t.Errorf("%s: no ports", where)
			}
			for _, sp := range svc.Spec.Ports {
				target := sp.TargetPort
				if target == nil {
					target = sp.Port
				}
				port, err := resolvePort(target, p.container)
				if err != nil || port != p.cfg.port(t) {
					t.Errorf("%s: port %d targets %v (%d, %v), want the workers' port %d", where, sp.Port, target, port, err, p.cfg.port(t))
				}
			}
		case "PodMonitor":
			if d.APIVersion != "monitoring.coreos.com/v1" {
				t.Errorf("%s: apiVersion %s, want monitoring.coreos.com/v1", where, d.APIVersion)
			}
			var pm kubePodMonitor
			d.decode(t, &pm)
			p := podSelectedBy(t, where, pods, pm.Spec.Selector.MatchLabels)
			if len(pm.Spec.PodMetricsEndpoints) == 0 {
				t.Errorf("%s: no podMetricsEndpoints", where)
			}
			for _, ep := range pm.Spec.PodMetricsEndpoints {
				var port any = ep.Port
				if ep.Port == "" {
					port = ep.TargetPort
				}
				n, err := resolvePort(port, p.container)
				path := firstNonEmpty(ep.Path, "/metrics")
				if err != nil || n != p.cfg.metricsPort(t) || path != "/metrics" || (ep.Scheme != "" && ep.Scheme != "http") {
					t.Errorf("%s: endpoint scheme %q port %v path %s (%d, %v), want http, port %d, /metrics", where, ep.Scheme, port, path, n, err, p.cfg.metricsPort(t))
				}
			}
		case "Kustomization":
			var k kustomization
			d.decode(t, &k)
			for _, r := range k.Resources {
				if _, err := os.Stat(filepath.Join(moduleRoot, "deploy", "kubernetes", r)); err != nil {
					t.Errorf("%s: resource %s: %v", where, r, err)
				}
			}
		default:
			t.Errorf("%s: no check for kind %s here: add one to this test", where, d.Kind)
		}
	}
	for _, k := range []string{"Deployment", "Service", "PodMonitor"} {
		if kinds[k] == 0 {
			t.Errorf("deploy/kubernetes has no %s", k)
		}
	}
}

func boolSet(b *bool) bool { return b != nil && *b }

// podSelectedBy returns the one pod the selector picks.
func podSelectedBy(t *testing.T, where string, pods []podShoal, selector map[string]string) podShoal {
	t.Helper()
	var out []podShoal
	for _, p := range pods {
		if labelsSelect(selector, p.labels) {
			out = append(out, p)
		}
	}
	if len(out) != 1 {
		t.Fatalf("%s: selector %v picks %d of the Deployments' pods, want 1", where, selector, len(out))
	}
	return out[0]
}

// TestManifestDeploymentRunsAsWritten runs each Deployment's shoal
// container the way the kubelet would, as far as one machine allows: as
// PID 1 of new PID and network namespaces, with the pod's sysctls, as the
// pod's user with no capabilities, with the container's command, arguments
// and environment, and a fresh writable directory standing in for the
// emptyDir at /tmp. Then it makes the pod's probes, requests through its
// Service's target port, scrapes it where the annotations and the
// PodMonitor say, runs 'shoal ctl status' as 'kubectl exec' would, and
// stops it with SIGTERM, as the kubelet does after the preStop hook.
func TestManifestDeploymentRunsAsWritten(t *testing.T) {
	if os.Getuid() != 0 {
		peer.Missing(t, "needs root, for a network namespace and the pod's user")
	}
	unshare, _ := pidNamespaceFlags(t)
	ip := peer.Require(t, "ip")
	setpriv := peer.Require(t, "setpriv")
	docs := loadManifests(t)
	for _, p := range podsOf(t, docs) {
		t.Run(strings.ReplaceAll(p.where, " ", "_"), func(t *testing.T) { runPodAsWritten(t, docs, p, unshare, ip, setpriv) })
	}
}

var (
	sysctlName  = regexp.MustCompile(`^[a-z0-9_]+(\.[a-z0-9_]+)+$`)
	sysctlValue = regexp.MustCompile(`^[0-9]+$`)
)

func runPodAsWritten(t *testing.T, docs []kubeDoc, p podShoal, unshare, ip, setpriv string) {
	c := p.container
	uid, gid := podUser(t, p.pod, c)
	tmp, err := os.MkdirTemp("", "shoal-pod-tmp-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(tmp) })
	if err := os.Chmod(tmp, 0o777); err != nil { // as an emptyDir
		t.Fatal(err)
	}

	var script strings.Builder
	script.WriteString("set -e\n" + ip + " link set lo up\n")
	for _, s := range p.pod.SecurityContext.Sysctls {
		if !sysctlName.MatchString(s.Name) || !sysctlValue.MatchString(s.Value) {
			t.Fatalf("sysctl %q=%q: this test sets only numeric values of plain names", s.Name, s.Value)
		}
		fmt.Fprintf(&script, "echo %s > /proc/sys/%s\n", s.Value, strings.ReplaceAll(s.Name, ".", "/"))
	}
	userFlags := []string{fmt.Sprintf("--reuid=%d", uid), fmt.Sprintf("--regid=%d", gid), "--clear-groups"}
	fmt.Fprintf(&script, `exec %s %s --inh-caps=-all --bounding-set=-all "$@"`, setpriv, strings.Join(userFlags, " "))

	argv := containerArgv(c)
	if argv[0] != "/shoal" {
		t.Fatalf("the container runs %q, not the image's /shoal", argv)
	}
	argv[0] = shoalBin
	env := []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/", "TMPDIR=" + tmp}
	for k, v := range p.cfg.env {
		env = append(env, k+"="+v)
	}
	pod := startNSInit(t, unshare, []string{"--net", "--pid", "--fork", "--mount-proc", "--kill-child"}, env, "shoal",
		append([]string{"sh", "-c", script.String(), "sh"}, argv...)...)
	if pod.host == 0 {
		t.Fatalf("shoal exited at once (%v)", pod.state)
	}
	client := netnsClient(t, pod.host)
	url := func(port any, path string) string {
		n, err := resolvePort(port, c)
		if err != nil {
			t.Fatal(err)
		}
		return fmt.Sprintf("http://127.0.0.1:%d%s", n, path)
	}

	// The probes, as the kubelet makes them.
	rp, lp := c.ReadinessProbe.HTTPGet, c.LivenessProbe.HTTPGet
	waitHTTPStatus(t, client, url(rp.Port, rp.Path), 200, 30*time.Second, pod.done)
	if code, body, err := httpGetWith(client, url(lp.Port, lp.Path)); err != nil || code != 200 {
		t.Errorf("livenessProbe GET %s: %d %q %v, want 200", lp.Path, code, body, err)
	}

	// Requests through each Service's target port.
	for _, d := range docs {
		if d.Kind != "Service" {
			continue
		}
		var svc kubeService
		d.decode(t, &svc)
		if !labelsSelect(svc.Spec.Selector, p.labels) {
			continue
		}
		for _, sp := range svc.Spec.Ports {
			target := sp.TargetPort
			if target == nil {
				target = sp.Port
			}
			if code, body, err := httpGetWith(client, url(target, "/")); err != nil || code != 200 || body != "hello world\n" {
				t.Errorf("Service %s port %d -> %v: GET / = %d %q %v, want 200 \"hello world\\n\"", d.Metadata.Name, sp.Port, target, code, body, err)
			}
		}
	}

	// Scrapes, where the annotations and each PodMonitor say.
	targets := []string{url(p.annotations["prometheus.io/port"], p.annotations["prometheus.io/path"])}
	for _, d := range docs {
		if d.Kind != "PodMonitor" {
			continue
		}
		var pm kubePodMonitor
		d.decode(t, &pm)
		if !labelsSelect(pm.Spec.Selector.MatchLabels, p.labels) {
			continue
		}
		for _, ep := range pm.Spec.PodMetricsEndpoints {
			targets = append(targets, url(ep.Port, firstNonEmpty(ep.Path, "/metrics")))
		}
	}
	for _, target := range targets {
		code, body, err := httpGetWith(client, target)
		if err != nil || code != 200 {
			t.Errorf("scrape %s: %d %v", target, code, err)
			continue
		}
		s := parseSamples(body)
		if s["shoal_workers_desired"] < 1 || s["shoal_workers_listening"] != s["shoal_workers_desired"] {
			t.Errorf("scrape %s: shoal_workers_desired %v, shoal_workers_listening %v", target, s["shoal_workers_desired"], s["shoal_workers_listening"])
		}
	}

	// kubectl exec POD -- /shoal ctl status: the container's user and
	// environment find the control socket.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ctl := exec.CommandContext(ctx, setpriv, append(userFlags, shoalBin, "ctl", "status")...)
	ctl.Env = append(slices.Clip(env), noRaceSleep)
	if out, err := ctl.CombinedOutput(); err != nil || !strings.Contains(string(out), "listening") {
		t.Errorf("shoal ctl status as uid %d: %v\n%s", uid, err, out)
	}

	// The pod's sysctl spares shoal its warning.
	if len(p.pod.SecurityContext.Sysctls) > 0 {
		if w := pod.logs.entries(func(e entry) bool { return strings.Contains(e.str("message"), "tcp_migrate_req is not 1") }); len(w) != 0 {
			t.Errorf("shoal warns about tcp_migrate_req despite the pod's sysctl: %v", w)
		}
	}

	// The kubelet's SIGTERM after the preStop hook: every worker drains
	// and shoal exits 0 within its stop timeout, inside the grace period.
	stop := p.cfg.stopTimeout(t)
	begin := time.Now()
	pod.signal(syscall.SIGTERM)
	if code := pod.wait(stop + 10*time.Second); code != 0 {
		t.Errorf("exit code after SIGTERM = %d, want 0", code)
	}
	if took := time.Since(begin); took > stop {
		t.Errorf("stop took %s, more than the stop timeout %s", took, stop)
	}
	pod.gone(2 * time.Second)
}

// netnsClient returns an HTTP client that connects from the network
// namespace of pid, as the kubelet's probes reach a pod's address.
func netnsClient(t *testing.T, pid int) *http.Client {
	t.Helper()
	ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", pid))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	fd := int(ns.Fd())
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		type result struct {
			c   net.Conn
			err error
		}
		ch := make(chan result, 1)
		go func() {
			// The socket is made in the namespace of the thread that makes
			// it. The thread is not unlocked: it ends with this goroutine
			// rather than serve others from inside the namespace.
			runtime.LockOSThread()
			if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
				ch <- result{nil, fmt.Errorf("setns: %w", err)}
				return
			}
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			ch <- result{c, err}
		}()
		r := <-ch
		return r.c, r.err
	}
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true}}
}
