// Command talon-kubelet is a tiny stand-in kubelet for falco-talon's tests.
//
// It is NOT a kubelet: it runs no containers, no pods, no probes. It only
//
//   - registers a Node (--node-name) in the apiserver named by --kubeconfig,
//     with status.addresses = [InternalIP <bind address>] and
//     status.daemonEndpoints.kubeletEndpoint.port = its HTTPS port, and keeps
//     its Ready condition True (heartbeat every --status-interval);
//   - serves, over HTTPS, the kubelet endpoint the apiserver proxies
//     `pods/exec` to: /exec/{namespace}/{pod}/{container} (and the
//     /exec/{namespace}/{pod}/{uid}/{container} form), GET or POST, with the
//     `command`, `stdin`, `stdout`, `stderr` and `tty` query parameters. The
//     remotecommand protocols (SPDY v1-v4 and the channel.k8s.io websocket
//     ones) come from k8s.io/kubelet/pkg/cri/streaming/remotecommand, the code
//     container runtimes use behind the real kubelet;
//   - runs the command as a plain local process (os/exec), as the user running
//     talon-kubelet, in <sandbox-root>/<namespace>/<pod>/<container>/ with a
//     minimal environment (PATH, HOSTNAME=<pod>, HOME=<that directory>, plus
//     the literal `env` values of the container in the pod spec). A non-zero
//     exit code reaches the client in the v4 status (error) channel. The
//     "sandbox" is only a working directory, not an isolation boundary;
//   - serves the endpoint the apiserver proxies `pods/log` to:
//     /containerLogs/{namespace}/{pod}/{container}, with `tailLines`: the
//     container's "log" is the file container.log in its sandbox directory
//     (a command run through exec appends to it with `>> $HOME/container.log`);
//     no file is an empty log. follow, previous, sinceSeconds, timestamps and
//     limitBytes are not supported (400).
//
// /healthz answers 200 once the Node has been registered Ready (503 before).
// SIGTERM/SIGINT: stop serving, kill running commands, mark the Node NotReady
// (or delete it with --delete-node-on-exit) and exit 0.
//
// Built by `tests/env/build.sh kubelet`; started by tests/env/kubelet/__init__.py.
package main

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	remotecommandconsts "k8s.io/apimachinery/pkg/util/remotecommand"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/clientcmd"
	remotecommandclient "k8s.io/client-go/tools/remotecommand"
	"k8s.io/klog/v2"
	remotecommandserver "k8s.io/kubelet/pkg/cri/streaming/remotecommand"
	utilexec "k8s.io/utils/exec"
)

const (
	defaultPath           = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	streamIdleTimeout     = 4 * time.Hour // the kubelet's default
	streamCreationTimeout = remotecommandconsts.DefaultStreamCreationTimeout
	labelTestKubelet      = "talon.falco.org/test-kubelet"
)

// Taints the node lifecycle controller would lift once the node is Ready
// (TaintNodesByCondition admission adds not-ready on creation); there is no
// controller-manager in the test environment, so the kubelet lifts them.
var lifecycleTaints = map[string]bool{
	"node.kubernetes.io/not-ready":   true,
	"node.kubernetes.io/unreachable": true,
}

// Path components: DNS labels/subdomains as the apiserver validates them; no
// "." or "..", so they are safe to join under the sandbox root.
var nameRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$`)

type config struct {
	kubeconfig        string
	nodeName          string
	bindAddress       string
	port              int
	portFile          string
	sandboxRoot       string
	tlsCertFile       string
	tlsKeyFile        string
	caCertFile        string
	caKeyFile         string
	statusInterval    time.Duration
	checkPods         bool
	exitWithParent    bool
	deleteNodeOnExit  bool
	kubeletVersion    string
	maxPods           int
	reportedMemory    string
	reportedCPU       int
	shutdownGraceTime time.Duration
}

type kubelet struct {
	cfg        config
	ctx        context.Context // cancelled on shutdown: kills running commands
	pods       corev1client.PodsGetter
	nodes      corev1client.NodesGetter
	port       int
	address    string
	registered atomic.Bool
	startTime  metav1.Time
	running    sync.WaitGroup
}

func main() {
	cfg := parseFlags()
	if err := run(cfg); err != nil {
		klog.ErrorS(err, "talon-kubelet failed")
		klog.Flush()
		os.Exit(1)
	}
	klog.Flush()
}

func parseFlags() config {
	var c config
	klog.InitFlags(nil)
	flag.StringVar(&c.kubeconfig, "kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig of the apiserver to register with (default $KUBECONFIG)")
	flag.StringVar(&c.nodeName, "node-name", "talon-node-1", "name of the Node object")
	flag.StringVar(&c.bindAddress, "bind-address", "127.0.0.1", "IP address to serve on; also the Node's InternalIP")
	flag.IntVar(&c.port, "port", 0, "HTTPS port (0: pick a free one; see --port-file)")
	flag.StringVar(&c.portFile, "port-file", "", "write the port actually served on to this file once listening")
	flag.StringVar(&c.sandboxRoot, "sandbox-root", "", "commands run in <sandbox-root>/<namespace>/<pod>/<container>/ (default: a temp dir)")
	flag.StringVar(&c.tlsCertFile, "tls-cert-file", "", "serving certificate (PEM); default: generate one")
	flag.StringVar(&c.tlsKeyFile, "tls-private-key-file", "", "key of --tls-cert-file")
	flag.StringVar(&c.caCertFile, "ca-cert-file", "", "CA certificate to sign the generated serving certificate with (default: self-signed)")
	flag.StringVar(&c.caKeyFile, "ca-key-file", "", "key of --ca-cert-file")
	flag.DurationVar(&c.statusInterval, "status-interval", 10*time.Second, "how often the Node status (heartbeat) is written")
	flag.BoolVar(&c.checkPods, "check-pods", true, "look the pod up in the apiserver: 404 unless it is bound to this node and has the container; adds its literal env values")
	flag.BoolVar(&c.exitWithParent, "exit-with-parent", false, "exit when the parent process goes away")
	flag.BoolVar(&c.deleteNodeOnExit, "delete-node-on-exit", false, "delete the Node on exit instead of marking it NotReady")
	flag.StringVar(&c.kubeletVersion, "kubelet-version", "", "status.nodeInfo.kubeletVersion (default: derived from the k8s.io/kubelet module version)")
	flag.IntVar(&c.maxPods, "max-pods", 110, "reported pods capacity")
	flag.IntVar(&c.reportedCPU, "cpu", runtime.NumCPU(), "reported cpu capacity")
	flag.StringVar(&c.reportedMemory, "memory", "8Gi", "reported memory capacity")
	flag.DurationVar(&c.shutdownGraceTime, "shutdown-timeout", 5*time.Second, "time allowed for marking the node NotReady on exit")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if c.kubeletVersion == "" {
		c.kubeletVersion = kubeletVersionFromBuild()
	}
	if *showVersion {
		fmt.Printf("talon-kubelet %s (%s, %s/%s)\n", c.kubeletVersion, runtime.Version(), runtime.GOOS, runtime.GOARCH)
		os.Exit(0)
	}
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "talon-kubelet: unexpected arguments %q\n", flag.Args())
		os.Exit(2)
	}
	return c
}

// kubeletVersionFromBuild maps the k8s.io/kubelet module version compiled in
// (v0.34.12) to the Kubernetes version it belongs to (v1.34.12).
func kubeletVersionFromBuild() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, m := range bi.Deps {
			if m.Path == "k8s.io/kubelet" && strings.HasPrefix(m.Version, "v0.") {
				return "v1." + strings.TrimPrefix(m.Version, "v0.")
			}
		}
	}
	return "v1.0.0-talon"
}

func run(cfg config) error {
	if cfg.kubeconfig == "" {
		return errors.New("--kubeconfig (or $KUBECONFIG) is required")
	}
	if !nameRE.MatchString(cfg.nodeName) {
		return fmt.Errorf("invalid --node-name %q", cfg.nodeName)
	}
	ip := net.ParseIP(cfg.bindAddress)
	if ip == nil || ip.IsUnspecified() {
		return fmt.Errorf("--bind-address must be a specific IP address (it is the Node's InternalIP), got %q", cfg.bindAddress)
	}
	if cfg.sandboxRoot == "" {
		dir, err := os.MkdirTemp("", "talon-kubelet-sandbox-")
		if err != nil {
			return err
		}
		cfg.sandboxRoot = dir
	}
	root, err := filepath.Abs(cfg.sandboxRoot)
	if err != nil {
		return err
	}
	cfg.sandboxRoot = root
	if err := os.MkdirAll(root, 0o755); err != nil {
		return err
	}

	restCfg, err := clientcmd.BuildConfigFromFlags("", cfg.kubeconfig)
	if err != nil {
		return fmt.Errorf("loading kubeconfig %s: %w", cfg.kubeconfig, err)
	}
	restCfg.UserAgent = "talon-kubelet/" + cfg.kubeletVersion
	restCfg.QPS, restCfg.Burst = 50, 100
	restCfg.Timeout = 15 * time.Second
	core, err := corev1client.NewForConfig(restCfg)
	if err != nil {
		return err
	}

	cert, err := servingCertificate(cfg, ip)
	if err != nil {
		return fmt.Errorf("serving certificate: %w", err)
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(cfg.bindAddress, strconv.Itoa(cfg.port)))
	if err != nil {
		return err
	}
	port := ln.Addr().(*net.TCPAddr).Port

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if cfg.exitWithParent {
		go watchParent(ctx, stop)
	}

	k := &kubelet{
		cfg:       cfg,
		ctx:       ctx,
		pods:      core,
		nodes:     core,
		port:      port,
		address:   cfg.bindAddress,
		startTime: metav1.Now(),
	}

	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", k.handleHealthz)
	mux.HandleFunc("/exec/", k.handleExec)
	mux.HandleFunc("/containerLogs/", k.handleContainerLogs)
	for _, p := range []string{"/attach/", "/portForward/", "/run/", "/logs/", "/stats/", "/metrics", "/pods"} {
		mux.HandleFunc(p, func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "talon-kubelet (test kubelet) only serves /exec, /containerLogs and /healthz", http.StatusNotImplemented)
		})
	}
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 30 * time.Second,
		TLSConfig: &tls.Config{
			MinVersion:   tls.VersionTLS12,
			Certificates: []tls.Certificate{cert},
			NextProtos:   []string{"http/1.1"}, // SPDY/websocket upgrades need HTTP/1.1
		},
		// A non-nil empty map disables HTTP/2.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}

	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.ServeTLS(ln, "", "") }()
	klog.InfoS("talon-kubelet serving", "address", ln.Addr().String(), "node", cfg.nodeName,
		"sandboxRoot", cfg.sandboxRoot, "kubeletVersion", cfg.kubeletVersion, "pid", os.Getpid())
	if cfg.portFile != "" {
		if err := writeFileAtomic(cfg.portFile, []byte(strconv.Itoa(port)+"\n")); err != nil {
			return fmt.Errorf("writing --port-file: %w", err)
		}
	}

	heartbeatDone := make(chan struct{})
	go func() {
		defer close(heartbeatDone)
		k.heartbeatLoop(ctx)
	}()

	select {
	case <-ctx.Done():
		klog.InfoS("shutting down")
	case err := <-serveErr:
		stop()
		<-heartbeatDone
		return fmt.Errorf("https server: %w", err)
	}

	// ctx is cancelled: running commands get killed (exec.CommandContext).
	shutdownCtx, cancel := context.WithTimeout(context.Background(), cfg.shutdownGraceTime)
	defer cancel()
	_ = srv.Shutdown(shutdownCtx) // hijacked (streaming) connections are not waited for
	<-heartbeatDone
	waitTimeout(&k.running, 3*time.Second)
	k.deregister(shutdownCtx)
	klog.InfoS("stopped")
	return nil
}

func waitTimeout(wg *sync.WaitGroup, d time.Duration) {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
	}
}

// watchParent cancels the context when the parent process exits (we get
// re-parented), so a crashed test session leaves no kubelet behind.
func watchParent(ctx context.Context, cancel context.CancelFunc) {
	parent := os.Getppid()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if os.Getppid() != parent {
				klog.InfoS("parent process exited; shutting down", "parentPid", parent)
				cancel()
				return
			}
		}
	}
}

func writeFileAtomic(path string, data []byte) error {
	tmp := fmt.Sprintf("%s.tmp.%d", path, os.Getpid())
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// ---------------------------------------------------------------- /healthz

func (k *kubelet) handleHealthz(w http.ResponseWriter, _ *http.Request) {
	if !k.registered.Load() {
		http.Error(w, "node not registered yet", http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = io.WriteString(w, "ok")
}

// ---------------------------------------------------------------- /containerLogs

// handleContainerLogs serves <sandbox>/<ns>/<pod>/<container>/container.log,
// its last tailLines lines when asked.
func (k *kubelet) handleContainerLogs(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	parts := strings.Split(strings.Trim(strings.TrimPrefix(r.URL.Path, "/containerLogs/"), "/"), "/")
	if len(parts) != 3 {
		http.NotFound(w, r)
		return
	}
	for _, p := range parts {
		if !nameRE.MatchString(p) {
			http.Error(w, fmt.Sprintf("invalid name %q", p), http.StatusBadRequest)
			return
		}
	}
	q := r.URL.Query()
	for _, unsupported := range []string{"follow", "previous", "sinceSeconds", "sinceTime", "timestamps", "limitBytes"} {
		if v := q.Get(unsupported); v != "" && v != "false" {
			http.Error(w, "talon-kubelet does not support "+unsupported, http.StatusBadRequest)
			return
		}
	}
	tail := -1
	if v := q.Get("tailLines"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			http.Error(w, fmt.Sprintf("invalid tailLines %q", v), http.StatusBadRequest)
			return
		}
		tail = n
	}
	data, err := os.ReadFile(filepath.Join(k.cfg.sandboxRoot, parts[0], parts[1], parts[2], "container.log"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	text := string(data)
	if tail >= 0 {
		lines := strings.SplitAfter(text, "\n")
		if len(lines) > 0 && lines[len(lines)-1] == "" {
			lines = lines[:len(lines)-1]
		}
		if len(lines) > tail {
			lines = lines[len(lines)-tail:]
		}
		text = strings.Join(lines, "")
	}
	w.Header().Set("Content-Type", "text/plain")
	_, _ = io.WriteString(w, text)
}

// ---------------------------------------------------------------- /exec

func (k *kubelet) handleExec(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodPost {
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	parts := strings.Split(strings.Trim(strings.TrimPrefix(r.URL.Path, "/exec/"), "/"), "/")
	var namespace, podName, uid, container string
	switch len(parts) {
	case 3:
		namespace, podName, container = parts[0], parts[1], parts[2]
	case 4:
		namespace, podName, uid, container = parts[0], parts[1], parts[2], parts[3]
	default:
		http.NotFound(w, r)
		return
	}
	for _, p := range []string{namespace, podName, container} {
		if !nameRE.MatchString(p) {
			http.Error(w, fmt.Sprintf("invalid name %q", p), http.StatusBadRequest)
			return
		}
	}
	argv := r.URL.Query()[corev1.ExecCommandParam]
	if len(argv) == 0 || argv[0] == "" {
		http.Error(w, "missing command", http.StatusBadRequest)
		return
	}
	opts, err := remotecommandserver.NewOptions(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}

	target := &execTarget{
		k:         k,
		namespace: namespace,
		pod:       podName,
		container: container,
		hostname:  podName,
		opts:      *opts,
		upgrade:   upgradeDescription(r),
	}
	if k.cfg.checkPods {
		code, err := target.lookup(r.Context(), uid)
		if err != nil {
			http.Error(w, err.Error(), code)
			return
		}
	}
	target.dir = filepath.Join(k.cfg.sandboxRoot, namespace, podName, container)
	if err := os.MkdirAll(target.dir, 0o755); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}

	k.running.Add(1)
	defer k.running.Done()
	remotecommandserver.ServeExec(w, r, target, namespace+"/"+podName, types.UID(uid), container, argv,
		opts, streamIdleTimeout, streamCreationTimeout, remotecommandconsts.SupportedStreamingProtocols)
}

type execTarget struct {
	k         *kubelet
	namespace string
	pod       string
	container string
	hostname  string
	dir       string
	podEnv    []string
	opts      remotecommandserver.Options
	upgrade   string
}

// upgradeDescription says how the apiserver streams to us, for the log:
// "spdy [v4.channel.k8s.io ...]" (kubectl, or the apiserver translating a
// v5 websocket client) or "websocket [...]" (a v4-or-older websocket client
// the apiserver just proxies).
func upgradeDescription(r *http.Request) string {
	if strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
		return "websocket " + fmt.Sprint(r.Header.Values("Sec-Websocket-Protocol"))
	}
	return strings.ToLower(r.Header.Get("Upgrade")) + " " + fmt.Sprint(r.Header.Values("X-Stream-Protocol-Version"))
}

// lookup checks, as the real kubelet would, that the pod is bound to this
// node and has the container; it also collects the container's literal env.
func (t *execTarget) lookup(ctx context.Context, uid string) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	pod, err := t.k.pods.Pods(t.namespace).Get(ctx, t.pod, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return http.StatusNotFound, fmt.Errorf("pod %s/%s not found", t.namespace, t.pod)
	}
	if err != nil {
		return http.StatusInternalServerError, fmt.Errorf("getting pod %s/%s: %w", t.namespace, t.pod, err)
	}
	if pod.Spec.NodeName != t.k.cfg.nodeName {
		return http.StatusNotFound, fmt.Errorf("pod %s/%s is not on node %s", t.namespace, t.pod, t.k.cfg.nodeName)
	}
	if uid != "" && string(pod.UID) != uid {
		return http.StatusNotFound, fmt.Errorf("pod %s/%s with uid %s not found", t.namespace, t.pod, uid)
	}
	if pod.Spec.Hostname != "" {
		t.hostname = pod.Spec.Hostname
	}
	var env []corev1.EnvVar
	found := false
	for _, c := range append(append([]corev1.Container{}, pod.Spec.InitContainers...), pod.Spec.Containers...) {
		if c.Name == t.container {
			env, found = c.Env, true
		}
	}
	for _, c := range pod.Spec.EphemeralContainers {
		if c.Name == t.container {
			env, found = c.Env, true
		}
	}
	if !found {
		return http.StatusNotFound, fmt.Errorf("container %q not found in pod %s/%s", t.container, t.namespace, t.pod)
	}
	for _, e := range env {
		if e.ValueFrom == nil {
			t.podEnv = append(t.podEnv, e.Name+"="+e.Value)
		}
	}
	return http.StatusOK, nil
}

func (t *execTarget) environ(tty bool) []string {
	env := []string{"PATH=" + defaultPath, "HOSTNAME=" + t.hostname, "HOME=" + t.dir}
	if tty {
		env = append(env, "TERM=xterm")
	}
	return append(env, t.podEnv...) // later duplicates win (os/exec)
}

// lookPath resolves argv[0] against the *sandbox* PATH (exec.Command would
// use talon-kubelet's own).
func lookPath(file, dir string, env []string) (string, error) {
	if strings.Contains(file, "/") {
		if !filepath.IsAbs(file) {
			file = filepath.Join(dir, file)
		}
		if err := isExecutable(file); err != nil {
			return "", &exec.Error{Name: file, Err: err}
		}
		return file, nil
	}
	path := defaultPath
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			path = v
		}
	}
	for _, d := range filepath.SplitList(path) {
		if d == "" {
			d = "."
		}
		if !filepath.IsAbs(d) {
			d = filepath.Join(dir, d)
		}
		p := filepath.Join(d, file)
		if isExecutable(p) == nil {
			return p, nil
		}
	}
	return "", &exec.Error{Name: file, Err: errors.New("executable file not found in $PATH")}
}

func isExecutable(p string) error {
	st, err := os.Stat(p)
	if err != nil {
		return err
	}
	if st.IsDir() || st.Mode()&0o111 == 0 {
		return os.ErrPermission
	}
	return nil
}

// ExecInContainer implements remotecommandserver.Executor.
func (t *execTarget) ExecInContainer(ctx context.Context, _ string, _ types.UID, _ string, argv []string,
	in io.Reader, out, errOut io.WriteCloser, tty bool, resize <-chan remotecommandclient.TerminalSize,
	timeout time.Duration,
) error {
	// Only the streams the client asked for (the websocket variant hands
	// placeholders for the others).
	if !t.opts.Stdin {
		in = nil
	}
	if !t.opts.Stdout {
		out = nil
	}
	if !t.opts.Stderr || tty {
		errOut = nil
	}
	defer func() {
		// Half-close: the client sees EOF on stdout/stderr before the status.
		if out != nil {
			_ = out.Close()
		}
		if errOut != nil {
			_ = errOut.Close()
		}
	}()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stopOnShutdown := context.AfterFunc(t.k.ctx, cancel)
	defer stopOnShutdown()
	if timeout > 0 {
		var c2 context.CancelFunc
		ctx, c2 = context.WithTimeout(ctx, timeout)
		defer c2()
	}

	env := t.environ(tty)
	path, err := lookPath(argv[0], t.dir, env)
	if err != nil {
		klog.InfoS("exec failed", "pod", t.namespace+"/"+t.pod, "container", t.container, "command", argv, "err", err)
		return fmt.Errorf("failed to exec in container: %w", err)
	}
	cmd := exec.CommandContext(ctx, path, argv[1:]...)
	cmd.Args[0] = argv[0]
	cmd.Dir = t.dir
	cmd.Env = env
	// Kill the whole process group (sh -c "sleep 100 & ..." included).
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	// Don't hang on a background process that keeps stdout open.
	cmd.WaitDelay = 2 * time.Second

	klog.InfoS("exec", "pod", t.namespace+"/"+t.pod, "container", t.container, "command", argv, "tty", tty, "dir", t.dir,
		"stream", t.upgrade)
	start := time.Now()
	if tty {
		err = runWithPTY(ctx, cmd, in, out, resize)
	} else {
		err = runWithPipes(cmd, in, out, errOut)
	}
	code, err := exitStatus(err)
	klog.InfoS("exec done", "pod", t.namespace+"/"+t.pod, "container", t.container, "command", argv,
		"exitCode", code, "err", err, "duration", time.Since(start).Round(time.Millisecond))
	return err
}

func runWithPipes(cmd *exec.Cmd, in io.Reader, out, errOut io.Writer) error {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if out != nil {
		cmd.Stdout = out
	}
	if errOut != nil {
		cmd.Stderr = errOut
	}
	var stdin io.WriteCloser
	if in != nil {
		// Not cmd.Stdin = in: Wait would then block until the client closes
		// stdin, even after the command exited.
		p, err := cmd.StdinPipe()
		if err != nil {
			return err
		}
		stdin = p
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	if stdin != nil {
		go func() {
			_, _ = io.Copy(stdin, in)
			_ = stdin.Close()
		}()
	}
	return cmd.Wait()
}

func runWithPTY(ctx context.Context, cmd *exec.Cmd, in io.Reader, out io.Writer,
	resize <-chan remotecommandclient.TerminalSize,
) error {
	ptm, pts, err := openPTY()
	if err != nil {
		return err
	}
	defer ptm.Close()
	cmd.Stdin, cmd.Stdout, cmd.Stderr = pts, pts, pts
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	err = cmd.Start()
	_ = pts.Close()
	if err != nil {
		return err
	}
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case size, ok := <-resize:
				if !ok {
					return
				}
				setWinsize(ptm, size.Width, size.Height)
			}
		}
	}()
	if in != nil {
		go func() { _, _ = io.Copy(ptm, in) }()
	}
	if out == nil {
		out = io.Discard
	}
	copied := make(chan struct{})
	go func() {
		_, _ = io.Copy(out, ptm) // ends with EIO once every holder of the pts is gone
		close(copied)
	}()
	err = cmd.Wait()
	select {
	case <-copied:
	case <-time.After(2 * time.Second):
	}
	return err
}

// exitStatus turns the result of cmd.Wait into what ServeExec reports: nil
// (Success), a utilexec.ExitError (the NonZeroExitCode status carrying the
// code, as for a container), or another error (an InternalError status).
func exitStatus(err error) (int, error) {
	if err == nil || errors.Is(err, exec.ErrWaitDelay) {
		return 0, nil
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			code := 128 + int(ws.Signal())
			return code, utilexec.CodeExitError{Err: err, Code: code}
		}
		return ee.ExitCode(), utilexec.CodeExitError{Err: err, Code: ee.ExitCode()}
	}
	return -1, err
}

// ---------------------------------------------------------------- the Node

func (k *kubelet) heartbeatLoop(ctx context.Context) {
	interval := time.Second // until registered
	failures := 0
	for {
		if err := k.syncNode(ctx, true); err != nil {
			if ctx.Err() != nil {
				return
			}
			failures++
			if failures == 1 || failures%10 == 0 {
				klog.ErrorS(err, "updating node status", "node", k.cfg.nodeName, "failures", failures)
			}
		} else {
			if failures > 0 || !k.registered.Load() {
				klog.InfoS("node status written", "node", k.cfg.nodeName, "ready", true,
					"address", k.address, "port", k.port)
			}
			failures = 0
			k.registered.Store(true)
			interval = k.cfg.statusInterval
		}
		if !k.registered.Load() {
			interval = time.Second
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(interval):
		}
	}
}

func (k *kubelet) syncNode(ctx context.Context, ready bool) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	nodes := k.nodes.Nodes()
	node, err := nodes.Get(ctx, k.cfg.nodeName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		if !ready {
			return nil
		}
		node, err = nodes.Create(ctx, k.newNode(), metav1.CreateOptions{})
		if err == nil {
			klog.InfoS("registered node", "node", node.Name)
		}
	}
	if err != nil {
		return err
	}
	if ready {
		if l := node.Labels[labelTestKubelet]; l != "true" {
			klog.InfoS("taking over an existing Node object", "node", node.Name)
		}
		taints := node.Spec.Taints[:0:0]
		for _, t := range node.Spec.Taints {
			if !lifecycleTaints[t.Key] {
				taints = append(taints, t)
			}
		}
		if len(taints) != len(node.Spec.Taints) || node.Labels[labelTestKubelet] != "true" {
			node.Spec.Taints = taints
			if node.Labels == nil {
				node.Labels = map[string]string{}
			}
			for key, v := range k.newNode().Labels {
				node.Labels[key] = v
			}
			if node, err = nodes.Update(ctx, node, metav1.UpdateOptions{}); err != nil {
				return err
			}
		}
	}
	k.fillStatus(node, ready)
	_, err = nodes.UpdateStatus(ctx, node, metav1.UpdateOptions{})
	return err
}

func (k *kubelet) newNode() *corev1.Node {
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: k.cfg.nodeName,
			Labels: map[string]string{
				"kubernetes.io/hostname": k.cfg.nodeName,
				"kubernetes.io/os":       "linux",
				"kubernetes.io/arch":     runtime.GOARCH,
				labelTestKubelet:         "true",
			},
		},
	}
}

func setCondition(node *corev1.Node, c corev1.NodeCondition) {
	for i := range node.Status.Conditions {
		old := &node.Status.Conditions[i]
		if old.Type == c.Type {
			if old.Status == c.Status {
				c.LastTransitionTime = old.LastTransitionTime
			}
			*old = c
			return
		}
	}
	node.Status.Conditions = append(node.Status.Conditions, c)
}

func (k *kubelet) fillStatus(node *corev1.Node, ready bool) {
	now := metav1.Now()
	s := &node.Status
	s.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: k.address}}
	s.DaemonEndpoints.KubeletEndpoint.Port = int32(k.port) //nolint:gosec // a TCP port
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:    *resource.NewQuantity(int64(k.cfg.reportedCPU), resource.DecimalSI),
		corev1.ResourceMemory: resource.MustParse(k.cfg.reportedMemory),
		corev1.ResourcePods:   *resource.NewQuantity(int64(k.cfg.maxPods), resource.DecimalSI),
	}
	s.Capacity, s.Allocatable = capacity, capacity.DeepCopy()
	s.NodeInfo = corev1.NodeSystemInfo{
		MachineID:               "talon-" + k.cfg.nodeName,
		SystemUUID:              "talon-" + k.cfg.nodeName,
		BootID:                  "talon-" + strconv.FormatInt(k.startTime.Unix(), 10),
		KernelVersion:           "talon-test",
		OSImage:                 "falco-talon test kubelet",
		ContainerRuntimeVersion: "talon-exec://0.1",
		KubeletVersion:          k.cfg.kubeletVersion,
		KubeProxyVersion:        "",
		OperatingSystem:         runtime.GOOS,
		Architecture:            runtime.GOARCH,
	}
	readyStatus, reason, msg := corev1.ConditionTrue, "KubeletReady", "talon-kubelet is posting ready status"
	if !ready {
		readyStatus, reason, msg = corev1.ConditionFalse, "KubeletNotReady", "talon-kubelet stopped"
	}
	setCondition(node, corev1.NodeCondition{Type: corev1.NodeReady, Status: readyStatus, Reason: reason,
		Message: msg, LastHeartbeatTime: now, LastTransitionTime: now})
	for _, c := range []struct {
		t      corev1.NodeConditionType
		reason string
	}{
		{corev1.NodeMemoryPressure, "KubeletHasSufficientMemory"},
		{corev1.NodeDiskPressure, "KubeletHasNoDiskPressure"},
		{corev1.NodePIDPressure, "KubeletHasSufficientPID"},
	} {
		setCondition(node, corev1.NodeCondition{Type: c.t, Status: corev1.ConditionFalse, Reason: c.reason,
			Message: "talon-kubelet", LastHeartbeatTime: now, LastTransitionTime: now})
	}
}

// deregister marks the Node NotReady (or deletes it), best effort.
func (k *kubelet) deregister(ctx context.Context) {
	if !k.registered.Load() {
		return
	}
	var err error
	if k.cfg.deleteNodeOnExit {
		err = k.nodes.Nodes().Delete(ctx, k.cfg.nodeName, metav1.DeleteOptions{})
		if apierrors.IsNotFound(err) {
			err = nil
		}
		klog.InfoS("deleted node", "node", k.cfg.nodeName, "err", err)
		return
	}
	err = k.syncNode(ctx, false)
	klog.InfoS("marked node NotReady", "node", k.cfg.nodeName, "err", err)
}

// ---------------------------------------------------------------- TLS

func servingCertificate(cfg config, ip net.IP) (tls.Certificate, error) {
	if cfg.tlsCertFile != "" || cfg.tlsKeyFile != "" {
		return tls.LoadX509KeyPair(cfg.tlsCertFile, cfg.tlsKeyFile)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "system:node:" + cfg.nodeName, Organization: []string{"system:nodes"}},
		NotBefore:    now.Add(-5 * time.Minute),
		NotAfter:     now.AddDate(1, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  uniqueIPs(ip, net.IPv4(127, 0, 0, 1)),
		DNSNames:     []string{"localhost", cfg.nodeName},
	}
	parent, signer := tmpl, crypto.Signer(key)
	if cfg.caCertFile != "" || cfg.caKeyFile != "" {
		ca, err := tls.LoadX509KeyPair(cfg.caCertFile, cfg.caKeyFile)
		if err != nil {
			return tls.Certificate{}, fmt.Errorf("loading CA: %w", err)
		}
		if parent, err = x509.ParseCertificate(ca.Certificate[0]); err != nil {
			return tls.Certificate{}, err
		}
		s, ok := ca.PrivateKey.(crypto.Signer)
		if !ok {
			return tls.Certificate{}, errors.New("CA key cannot sign")
		}
		signer = s
	} else {
		tmpl.BasicConstraintsValid = true
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, signer)
	if err != nil {
		return tls.Certificate{}, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, nil
}

func uniqueIPs(ips ...net.IP) []net.IP {
	var outIPs []net.IP
	for _, ip := range ips {
		dup := false
		for _, o := range outIPs {
			dup = dup || o.Equal(ip)
		}
		if !dup {
			outIPs = append(outIPs, ip)
		}
	}
	return outIPs
}
