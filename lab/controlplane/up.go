package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The controllers the lab needs, by the names this release's --controllers accepts.
// Left out on purpose: everything about nodes and pods (node-lifecycle, taint-eviction,
// pod-GC, DaemonSet, ReplicaSet, ...): there are no kubelets, and those controllers
// would only mark things NotReady or evict.
var controllers = []string{
	"garbage-collector-controller",
	"namespace-controller",
	"serviceaccount-controller",
	"serviceaccount-token-controller",
	"clusterrole-aggregation-controller",
	"root-ca-certificate-publisher-controller",
}

// As a kubeadm cluster has them; the ones already on by default are listed anyway so the
// set does not silently change with a release's defaults.
var admissionPlugins = []string{
	"NamespaceLifecycle", "LimitRanger", "ServiceAccount", "DefaultStorageClass",
	"DefaultTolerationSeconds", "NodeRestriction", "OwnerReferencesPermissionEnforcement",
	"PodSecurity", "Priority", "ResourceQuota", "MutatingAdmissionWebhook",
	"ValidatingAdmissionPolicy", "ValidatingAdmissionWebhook",
}

// Metadata (who did what to which object, no bodies) for every request. RequestReceived
// is left out: ResponseComplete (or ResponseStarted for watches) says the same and more,
// and the log would be twice the size.
const auditPolicy = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
`

type child struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{} // closed when the process has exited
	err  error         // valid after done
}

type upConfig struct {
	dir, bind                        string
	apiPort, etcdPort, peerPort, kcm int
	timeout                          time.Duration
}

func runUp(args []string) error {
	fs := flag.NewFlagSet("up", flag.ExitOnError)
	dir := fs.String("dir", "", "state directory (required): pki, kubeconfigs, logs, etcd data")
	bind := fs.String("bind", "127.0.0.1", "loopback address every component listens on")
	port := fs.Int("port", 0, "API server port (0: pick a free one)")
	timeout := fs.Duration("timeout", 180*time.Second, "how long to wait for the control plane to become ready")
	owner := fs.Int("owner-pid", 0, "stop (as on SIGTERM) when this process is gone: a test binary that shares one control plane between its tests")
	removeDir := fs.Bool("remove-dir", false, "remove --dir after stopping (a throw-away control plane of a test binary)")
	_ = fs.Parse(args)
	if *dir == "" {
		return errors.New("up: --dir is required")
	}
	if ip := net.ParseIP(*bind); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("up: --bind %q is not a loopback address", *bind)
	}
	abs, err := filepath.Abs(*dir)
	if err != nil {
		return err
	}
	c := upConfig{dir: abs, bind: *bind, apiPort: *port, timeout: *timeout}

	// Catch signals before the first child exists, so a stop during start-up still
	// cleans up.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if *owner > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithCancel(ctx)
		defer cancel()
		go watchOwner(*owner, cancel)
	}

	_ = os.Remove(filepath.Join(c.dir, "ready"))
	if err := c.prepare(); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}

	var running []*child
	died := make(chan *child, 3)
	shutdown := func() { stopAll(running) }
	start := func(name string, args ...string) error {
		ch, err := spawn(self, c.dir, name, args, died)
		if err != nil {
			return err
		}
		running = append(running, ch)
		return nil
	}
	// wait polls check until it succeeds; it gives up when a child dies, a signal comes
	// or the time is over, and then says why with the tail of every log.
	wait := func(what string, check func() error) error {
		deadline := time.Now().Add(c.timeout)
		for {
			lastErr := check()
			if lastErr == nil {
				return nil
			}
			select {
			case ch := <-died:
				return fmt.Errorf("%s exited (%v) while waiting for %s\n%s", ch.name, ch.err, what, tails(running))
			case <-ctx.Done():
				return fmt.Errorf("signal while waiting for %s", what)
			case <-time.After(300 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s not ready after %s: %v\n%s", what, c.timeout, lastErr, tails(running))
			}
		}
	}

	t0 := time.Now()
	err = start("etcd", c.etcdArgs()...)
	if err == nil {
		err = wait("etcd", func() error { return getOK(http.DefaultClient, c.etcdURL()+"/health") })
	}
	if err == nil {
		err = start("kube-apiserver", c.apiserverArgs()...)
	}
	hc, herr := c.httpsClient()
	if err == nil {
		err = herr
	}
	if err == nil {
		err = wait("kube-apiserver /readyz", func() error { return getOK(hc, c.serverURL()+"/readyz") })
	}
	if err == nil {
		err = start("kube-controller-manager", c.kcmArgs()...)
	}
	if err == nil {
		kcmURL := fmt.Sprintf("https://%s/healthz", net.JoinHostPort(c.bind, strconv.Itoa(c.kcm)))
		err = wait("kube-controller-manager /healthz", func() error { return getOK(hc, kcmURL) })
	}
	if err == nil {
		err = c.writeEndpoints(running)
	}
	if err != nil {
		shutdown()
		return err
	}
	fmt.Fprintf(os.Stderr, "control plane ready in %.1fs: %s (kubeconfig %s)\n",
		time.Since(t0).Seconds(), c.serverURL(), filepath.Join(c.dir, "admin.kubeconfig"))

	select {
	case <-ctx.Done():
		fmt.Fprintln(os.Stderr, "stopping control plane")
		shutdown()
		_ = os.Remove(filepath.Join(c.dir, "ready"))
		if *removeDir {
			// Only after a clean stop: a failed start keeps its logs for the error.
			_ = os.RemoveAll(c.dir)
		}
		return nil
	case ch := <-died:
		shutdown()
		_ = os.Remove(filepath.Join(c.dir, "ready"))
		return fmt.Errorf("%s exited (%v); stopped the others\n%s", ch.name, ch.err, tails(running))
	}
}

// watchOwner calls stop once process pid no longer exists (polled: a process that is
// not our parent cannot be waited for).
func watchOwner(pid int, stop func()) {
	for {
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			fmt.Fprintf(os.Stderr, "owner %d is gone\n", pid)
			stop()
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// prepare writes everything the children read: PKI, kubeconfigs, audit policy, and
// picks the ports.
func (c *upConfig) prepare() error {
	for _, d := range []string{c.dir, filepath.Join(c.dir, "logs"), filepath.Join(c.dir, "pids")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	if err := (pki{filepath.Join(c.dir, "pki")}).ensure(); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	var err error
	for _, p := range []*int{&c.apiPort, &c.etcdPort, &c.peerPort, &c.kcm} {
		if *p == 0 {
			if *p, err = freePort(c.bind); err != nil {
				return err
			}
		}
	}
	if err := c.writeKubeconfig("admin.kubeconfig", "admin"); err != nil {
		return err
	}
	if err := c.writeKubeconfig("controller-manager.kubeconfig", "controller-manager"); err != nil {
		return err
	}
	return os.WriteFile(c.path("audit-policy.yaml"), []byte(auditPolicy), 0o644)
}

func (c *upConfig) path(parts ...string) string {
	return filepath.Join(append([]string{c.dir}, parts...)...)
}
func (c *upConfig) pki(name string) string { return c.path("pki", name) }
func (c *upConfig) serverURL() string {
	return "https://" + net.JoinHostPort(c.bind, strconv.Itoa(c.apiPort))
}
func (c *upConfig) etcdURL() string {
	return "http://" + net.JoinHostPort(c.bind, strconv.Itoa(c.etcdPort))
}

func (c *upConfig) etcdArgs() []string {
	return []string{
		"--dir", c.path("etcd"),
		"--listen-client", c.etcdURL(),
		"--listen-peer", "http://" + net.JoinHostPort(c.bind, strconv.Itoa(c.peerPort)),
	}
}

// servingFlags are a component's HTTPS port: its serving certificate pki/<cert>.crt (and
// .key), the CA its clients' certificates chain to and the front proxy's CA (requests
// the aggregator passes on carry the user in headers, trusted from that proxy only).
func (c *upConfig) servingFlags(port int, cert string) []string {
	return []string{
		"--secure-port=" + strconv.Itoa(port),
		"--tls-cert-file=" + c.pki(cert+".crt"),
		"--tls-private-key-file=" + c.pki(cert+".key"),
		"--client-ca-file=" + c.pki("ca.crt"),
		"--requestheader-client-ca-file=" + c.pki("front-proxy-ca.crt"),
	}
}

func (c *upConfig) apiserverArgs() []string {
	return append([]string{
		"--bind-address=" + c.bind,
		"--advertise-address=" + c.bind,
		// The default (lease) reconciler writes the advertise address into the Endpoints
		// of default/kubernetes and refuses to start with a loopback one: "cannot use
		// public IP 127.0.0.1 with endpoint reconciler: ... may not be in the loopback
		// range". "none" leaves that Service without endpoints, which nothing here uses.
		"--endpoint-reconciler-type=none",
		"--etcd-servers=" + c.etcdURL(),
		"--cert-dir=" + c.path("pki"),
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=" + strings.Join(admissionPlugins, ","),
		"--allow-privileged=true",
		"--service-cluster-ip-range=" + serviceCIDR,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + c.pki("sa.pub"),
		"--service-account-signing-key-file=" + c.pki("sa.key"),
		"--requestheader-allowed-names=front-proxy-client",
		"--requestheader-username-headers=X-Remote-User",
		"--requestheader-group-headers=X-Remote-Group",
		"--requestheader-extra-headers-prefix=X-Remote-Extra-",
		"--proxy-client-cert-file=" + c.pki("front-proxy-client.crt"),
		"--proxy-client-key-file=" + c.pki("front-proxy-client.key"),
		"--enable-aggregator-routing=true",
		"--audit-policy-file=" + c.path("audit-policy.yaml"),
		"--audit-log-path=" + c.path("audit.log"),
		"--audit-log-maxsize=100",
		"--audit-log-maxbackup=1",
		"--profiling=false",
	}, c.servingFlags(c.apiPort, "apiserver")...)
}

func (c *upConfig) kcmArgs() []string {
	kc := c.path("controller-manager.kubeconfig")
	return append([]string{
		"--kubeconfig=" + kc,
		"--authentication-kubeconfig=" + kc,
		"--authorization-kubeconfig=" + kc,
		"--bind-address=" + c.bind,
		"--root-ca-file=" + c.pki("ca.crt"),
		"--service-account-private-key-file=" + c.pki("sa.key"),
		// As kubeadm: each controller acts as its own service account, so RBAC sees
		// e.g. system:serviceaccount:kube-system:namespace-controller.
		"--use-service-account-credentials=true",
		"--controllers=" + strings.Join(controllers, ","),
		"--cluster-name=guestcred-lab",
		// One instance: no lease to wait for after a restart on the same --dir.
		"--leader-elect=false",
		"--profiling=false",
	}, c.servingFlags(c.kcm, "controller-manager-serving")...)
}

func (c *upConfig) writeKubeconfig(file, user string) error {
	b64 := func(name string) (string, error) {
		data, err := os.ReadFile(c.pki(name))
		return base64.StdEncoding.EncodeToString(data), err
	}
	ca, err := b64("ca.crt")
	if err != nil {
		return err
	}
	crt, err := b64(user + ".crt")
	if err != nil {
		return err
	}
	key, err := b64(user + ".key")
	if err != nil {
		return err
	}
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %s
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: lab
  context:
    cluster: lab
    user: %s
current-context: lab
`, c.serverURL(), ca, user, crt, key, user)
	return os.WriteFile(c.path(file), []byte(kc), 0o600)
}

// writeEndpoints records where everything listens and which processes to look for;
// `ready` is written last, so its presence means the rest is complete.
func (c *upConfig) writeEndpoints(children []*child) error {
	pids := map[string]int{"up": os.Getpid()}
	for _, ch := range children {
		pids[ch.name] = ch.cmd.Process.Pid
	}
	data, err := json.MarshalIndent(map[string]any{
		"server":            c.serverURL(),
		"etcd":              c.etcdURL(),
		"controllerManager": fmt.Sprintf("https://%s", net.JoinHostPort(c.bind, strconv.Itoa(c.kcm))),
		"kubeconfig":        c.path("admin.kubeconfig"),
		"pids":              pids,
	}, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(c.path("endpoints.json"), append(data, '\n'), 0o644); err != nil {
		return err
	}
	return os.WriteFile(c.path("ready"), []byte(c.serverURL()+"\n"), 0o644)
}

func (c *upConfig) httpsClient() (*http.Client, error) {
	caPEM, err := os.ReadFile(c.pki("ca.crt"))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	cert, err := tls.LoadX509KeyPair(c.pki("admin.crt"), c.pki("admin.key"))
	if err != nil {
		return nil, err
	}
	return &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{
			RootCAs: pool, Certificates: []tls.Certificate{cert},
		}},
	}, nil
}

func getOK(hc *http.Client, url string) error {
	resp, err := hc.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s: %s", url, resp.Status, strings.TrimSpace(string(body)))
	}
	return nil
}

// spawn starts this binary again as one component, logging to D/logs/NAME.log.
func spawn(self, dir, name string, args []string, died chan<- *child) (*child, error) {
	logPath := filepath.Join(dir, "logs", name+".log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(logf, "=== %s: %s %s\n", time.Now().Format(time.RFC3339), name, strings.Join(args, " "))
	cmd := exec.Command(self, append([]string{name}, args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Own process group: a Ctrl-C in a terminal reaches only `up`, which then stops
		// the children in order instead of all of them at once.
		Setpgid: true,
		// If `up` itself is killed, take the children with it.
		Pdeathsig: syscall.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	_ = os.WriteFile(filepath.Join(dir, "pids", name+".pid"), []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o644)
	ch := &child{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		ch.err = cmd.Wait()
		logf.Close()
		close(ch.done)
		died <- ch
	}()
	return ch, nil
}

// stopAll stops children in reverse start order: the controller manager before the API
// server before etcd, so nobody logs errors about a dependency that went away first.
func stopAll(children []*child) {
	for i := len(children) - 1; i >= 0; i-- {
		ch := children[i]
		select {
		case <-ch.done:
			continue
		default:
		}
		_ = ch.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-ch.done:
		case <-time.After(20 * time.Second):
			fmt.Fprintf(os.Stderr, "%s did not stop in 20s: SIGKILL\n", ch.name)
			_ = ch.cmd.Process.Kill()
			<-ch.done
		}
	}
}

func tails(children []*child) string {
	var b strings.Builder
	for _, ch := range children {
		fmt.Fprintf(&b, "--- last lines of %s ---\n%s\n", ch.log, tail(ch.log, 25))
	}
	return b.String()
}

func tail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func freePort(host string) (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
