//! The production install as an operator of a cluster meets it: the Helm chart lints and
//! renders with the real `helm` binary, what it renders is what the binaries accept
//! (flags parsed by the real ControllerArgs/ShimArgs, shim labels matched by the
//! controller's selector), the security settings are there, the manifests apply with the
//! real `kubectl` to the API-server emulator, and the Dockerfile passes hadolint.
//!
//! helm, hadolint and kubernetes-validate come from scripts/install-deps.sh (into
//! .lab/tools/bin).
#![allow(clippy::disallowed_methods)] // tests may block: clippy.toml's file-system rule is for src/

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use clap::Parser;
use guestcred::controller::ControllerArgs;
use guestcred::controller::shims::SHIM_POD_SELECTOR;
use guestcred::shim::{BackendKind, LocatorKind, ShimArgs};
use guestcred_lab::apiserver::{ApiServer, write_kubeconfig};
use serde::Deserialize;
use serde_yaml::Value;

/// The release namespace: the controller's (it can enforce Pod Security `restricted`).
const NAMESPACE: &str = "guestcred-system";
/// The shim's own namespace by default (values shim.namespace: `<release namespace>-shim`).
const SHIM_NAMESPACE: &str = "guestcred-system-shim";
const RELEASE: &str = "gc";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart_dir() -> PathBuf {
    repo().join("charts/guestcred")
}

/// A tool installed by scripts/install-helm.sh; fails the test with the fix if missing.
fn tool(name: &str) -> PathBuf {
    let dir = std::env::var_os("GUESTCRED_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".lab/tools"));
    let path = dir.join("bin").join(name);
    assert!(
        path.is_file(),
        "{name} not found at {}: run scripts/install-deps.sh (it installs helm, hadolint and kubernetes-validate)",
        path.display()
    );
    path
}

fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

fn stdout_of(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The arguments of `helm template` of the chart as release [`RELEASE`] in [`NAMESPACE`]
/// with `flags`, then a `--set` for each of `sets`.
fn template_args<'a>(chart: &'a Path, flags: &[&'a str], sets: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "template",
        RELEASE,
        chart.to_str().expect("UTF-8 path"),
        "--namespace",
        NAMESPACE,
    ];
    args.extend(flags);
    for s in sets {
        args.extend(["--set", s]);
    }
    args
}

/// `helm template` with `--set` overrides; the raw output.
fn helm_template(sets: &[&str]) -> Output {
    let chart = chart_dir();
    run(&tool("helm"), &template_args(&chart, &[], sets))
}

/// Rendered objects (CRDs excluded: helm renders crds/ only on install).
fn render(sets: &[&str]) -> Vec<Value> {
    objects_of(&stdout_of(&helm_template(sets), "helm template"))
}

/// The objects of a multi-document YAML stream (empty documents left out).
fn objects_of(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("helm renders valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// Rendered objects with `tls.source=source` and `more` values.
fn render_tls(source: &str, more: &[&str]) -> Vec<Value> {
    let source = format!("tls.source={source}");
    render(&[&[source.as_str()], more].concat())
}

/// [`render_tls`], checked to render no object of `kind`: `why` the release needs none.
fn render_tls_without(source: &str, more: &[&str], kind: &str, why: &str) -> Vec<Value> {
    let objects = render_tls(source, more);
    assert!(!has_kind(&objects, kind), "no {kind}: {why}");
    objects
}

/// The one object of `kind` the chart renders with its default values.
fn default_workload(kind: &str) -> Value {
    only(&render(&[]), kind).clone()
}

/// Whether `objects` has one of `kind`.
fn has_kind(objects: &[Value], kind: &str) -> bool {
    objects.iter().any(|o| kind_of(o) == kind)
}

/// The entry of list `list` (containers' ports, env, volumes, …) whose name is `name`.
fn entry_named(list: &Value, name: &str) -> Value {
    list.as_sequence()
        .unwrap_or_else(|| panic!("a list holding {name}: {list:?}"))
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .cloned()
        .unwrap_or_else(|| panic!("no entry named {name} in {list:?}"))
}

/// `path` of each entry of list `list` that has it, as a string.
fn each_str(list: &Value, path: &[&str]) -> Vec<String> {
    list.as_sequence()
        .expect("a list")
        .iter()
        .filter_map(|e| {
            path.iter()
                .fold(e, |v, k| &v[*k])
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

fn kind_of(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or_default()
}

/// Every object of `kind`.
fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| kind_of(o) == kind).collect()
}

fn only<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(objects, kind);
    assert_eq!(found.len(), 1, "expected exactly one {kind}");
    found[0]
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| kind_of(o) == kind && o["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} named {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn container(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]["containers"][0]
}

fn host_paths(daemonset: &Value) -> Vec<String> {
    each_str(volumes(daemonset), &["hostPath", "path"])
}

fn volumes(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]["volumes"]
}

fn shim_for_locator(locator: &str) -> Value {
    only(&render(&[&format!("shim.locator={locator}")]), "DaemonSet").clone()
}

/// The shim container's args as the real `guestcred shim` parses them.
fn parsed_shim_args(daemonset: &Value) -> ShimArgs {
    let mut argv = vec!["guestcred-shim".to_string()];
    argv.extend(strings(&container(daemonset)["args"]));
    ShimArgs::try_parse_from(&argv).unwrap_or_else(|e| panic!("shim args {argv:?}: {e}"))
}

#[derive(Parser)]
struct ControllerCli {
    #[command(flatten)]
    args: ControllerArgs,
}

fn rules_for<'a>(role: &'a Value, group: &str, resource: &str) -> BTreeSet<String> {
    role["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .filter(|r| strings(&r["apiGroups"]).iter().any(|g| g == group))
        .filter(|r| strings(&r["resources"]).iter().any(|x| x == resource))
        .flat_map(|r: &'a Value| strings(&r["verbs"]))
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn helm_lint_passes_strictly() {
    let chart = chart_dir();
    let out = run(
        &tool("helm"),
        &["lint", "--strict", chart.to_str().expect("UTF-8 path")],
    );
    stdout_of(&out, "helm lint --strict");
}

#[test]
fn default_values_render_every_component() {
    let kinds: BTreeSet<String> = render(&[]).iter().map(|o| kind_of(o).to_string()).collect();
    assert_eq!(
        kinds,
        set(&[
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "Deployment",
            "Namespace",
            "NetworkPolicy",
            "Role",
            "RoleBinding",
            "Secret",
            "Service",
            "ServiceAccount",
        ])
    );
}

#[test]
fn chart_app_version_is_the_crate_version() {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Chart {
        app_version: String,
    }
    let text = std::fs::read_to_string(chart_dir().join("Chart.yaml")).expect("Chart.yaml");
    let chart: Chart = serde_yaml::from_str(&text).expect("Chart.yaml parses");
    assert_eq!(chart.app_version, env!("CARGO_PKG_VERSION"));
}

#[test]
fn chart_crds_are_identical_to_the_generated_crds() {
    let names = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let generated = repo().join("crds");
    let shipped = chart_dir().join("crds");
    assert_eq!(
        names(&shipped),
        names(&generated),
        "charts/guestcred/crds must hold exactly the files of crds/ (make crds)"
    );
    for name in names(&generated) {
        let a = std::fs::read(generated.join(&name)).expect("generated crd");
        let b = std::fs::read(shipped.join(&name)).expect("chart crd");
        assert!(
            a == b,
            "charts/guestcred/crds/{name} differs from crds/{name}: cp crds/*.yaml charts/guestcred/crds/"
        );
    }
}

/// kubevirt: the kubelet's pods dir; libvirt-uri: the libvirt socket dir; qga-socket: the
/// qga socket dir.
#[test]
fn each_locator_mounts_only_its_host_dir() {
    for (locator, dir) in [
        ("kubevirt", "/var/lib/kubelet/pods"),
        ("libvirt-uri", "/run/libvirt"),
        ("qga-socket", "/var/run/qemu-server"),
    ] {
        let ds = shim_for_locator(locator);
        assert_eq!(host_paths(&ds), [dir], "{locator}");
    }
}

#[test]
fn host_directories_are_mounted_read_only() {
    for locator in ["kubevirt", "libvirt-uri", "qga-socket"] {
        let ds = shim_for_locator(locator);
        let mount = entry_named(&container(&ds)["volumeMounts"], "host-sockets");
        assert_eq!(mount["readOnly"].as_bool(), Some(true), "{locator}");
    }
}

#[test]
fn kubevirt_shim_args_select_the_libvirt_backend_with_the_kubevirt_locator() {
    let args = parsed_shim_args(&shim_for_locator("kubevirt"));
    assert_eq!(args.backend, BackendKind::Libvirt);
    assert_eq!(args.locator, LocatorKind::Kubevirt);
    assert_eq!(
        args.kubelet_pods_dir,
        PathBuf::from("/var/lib/kubelet/pods")
    );
    assert_eq!(args.listen, "0.0.0.0:8443");
    assert_eq!(args.node_name, "$(NODE_NAME)");
}

#[test]
fn libvirt_uri_shim_args_select_the_node_libvirt_uri() {
    let args = parsed_shim_args(&shim_for_locator("libvirt-uri"));
    assert_eq!(args.backend, BackendKind::Libvirt);
    assert_eq!(args.locator, LocatorKind::LibvirtUri);
    assert_eq!(args.libvirt_uri, "qemu:///system");
}

#[test]
fn qga_socket_shim_args_select_the_qga_socket_backend() {
    let args = parsed_shim_args(&shim_for_locator("qga-socket"));
    assert_eq!(args.backend, BackendKind::QgaSocket);
    assert_eq!(
        args.qga_socket_template,
        "/var/run/qemu-server/{namespace}/{name}.qga"
    );
    assert!(
        args.agent().is_ok(),
        "the default template keeps namespaces apart"
    );
}

/// The secret volume mounted at `dir` in a workload's pod: (volume, mount).
fn secret_mount<'a>(workload: &'a Value, dir: &str) -> (&'a Value, &'a Value) {
    let mount = container(workload)["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(dir))
        .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
    let volume = volumes(workload)
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mount's volume");
    (volume, mount)
}

/// The directory of a file path, as a string.
fn dir_of(path: &Path) -> String {
    path.parent()
        .and_then(Path::to_str)
        .expect("a UTF-8 parent directory")
        .to_string()
}

/// A file a flag names must come from a whole Secret volume (no subPath, no items: kubelet
/// updates those on renewal) holding that key; returns the Secret's name.
fn assert_from_whole_secret(workload: &Value, path: &Path, key: &str) -> String {
    assert_eq!(path.file_name().and_then(|n| n.to_str()), Some(key));
    let (volume, mount) = secret_mount(workload, &dir_of(path));
    assert!(mount["subPath"].is_null(), "{path:?}: no subPath");
    assert_eq!(mount["readOnly"].as_bool(), Some(true), "{path:?}");
    assert!(
        volume["secret"]["items"].is_null(),
        "{path:?}: whole Secret"
    );
    volume["secret"]["secretName"]
        .as_str()
        .expect("a Secret volume")
        .to_string()
}

#[test]
fn shim_args_select_mutual_tls_from_the_mounted_shim_secret() {
    let ds = &default_workload("DaemonSet");
    let shim = parsed_shim_args(ds);
    assert!(shim.auth_token_file.is_none(), "no token by default");
    let files = shim.tls_files().expect("TLS flags");
    for (path, key) in [
        (&files.cert, "tls.crt"),
        (&files.key, "tls.key"),
        (&files.client_ca, "ca.crt"),
    ] {
        assert_eq!(
            assert_from_whole_secret(ds, path, key),
            "gc-guestcred-shim-tls"
        );
    }
    assert_eq!(shim.allowed_client, ["guestcred-controller"]);
}

#[test]
fn controller_args_call_shims_over_https_with_the_mounted_controller_secret() {
    let deployment = &default_workload("Deployment");
    let controller = parsed_controller_args(deployment);
    assert!(controller.shim_token_file.is_none(), "no token by default");
    assert_eq!(controller.shim_server_name, "guestcred-shim");
    let args = strings(&container(deployment)["args"]);
    assert!(
        !args.iter().any(|a| a.starts_with("--shim-scheme")),
        "https follows from --shim-ca-file: {args:?}"
    );
    for (path, key) in [
        (controller.shim_ca_file, "ca.crt"),
        (controller.shim_client_cert_file, "tls.crt"),
        (controller.shim_client_key_file, "tls.key"),
    ] {
        assert_eq!(
            assert_from_whole_secret(deployment, &path, key),
            "gc-guestcred-controller-tls"
        );
    }
}

#[test]
fn the_controllers_key_is_mounted_only_into_the_controller() {
    let objects = render(&[]);
    let secret_names =
        |w: &Value| -> Vec<String> { each_str(volumes(w), &["secret", "secretName"]) };
    assert_eq!(
        secret_names(only(&objects, "DaemonSet")),
        ["gc-guestcred-shim-tls"]
    );
    assert_eq!(
        secret_names(only(&objects, "Deployment")),
        ["gc-guestcred-controller-tls"]
    );
}

#[test]
fn generated_secrets_hold_one_ca_and_a_ca_secret_without_a_key() {
    let objects = render(&[]);
    let shim = named(&objects, "Secret", "gc-guestcred-shim-tls");
    let controller = named(&objects, "Secret", "gc-guestcred-controller-tls");
    let ca = named(&objects, "Secret", "gc-guestcred-ca");
    for s in [shim, controller] {
        assert_eq!(s["type"].as_str(), Some("kubernetes.io/tls"));
        for key in ["tls.crt", "tls.key", "ca.crt"] {
            assert!(
                s["data"][key].as_str().is_some_and(|v| !v.is_empty()),
                "{key}"
            );
        }
    }
    assert_eq!(shim["data"]["ca.crt"], controller["data"]["ca.crt"]);
    assert_eq!(ca["data"]["ca.crt"], shim["data"]["ca.crt"]);
    let keys: Vec<&str> = ca["data"]
        .as_mapping()
        .expect("data")
        .keys()
        .filter_map(|k| k.as_str())
        .collect();
    assert_eq!(keys, ["ca.crt"]);
    assert_ne!(shim["data"]["tls.crt"], controller["data"]["tls.crt"]);
}

#[test]
fn extra_bearer_token_is_required_on_top_of_mutual_tls() {
    let objects = render(&["shim.auth.extraBearerToken=true"]);
    let shim = parsed_shim_args(only(&objects, "DaemonSet"));
    let controller = parsed_controller_args(only(&objects, "Deployment"));
    assert!(shim.tls_files().is_ok(), "still mTLS");
    assert!(
        controller.shim_ca_file.ends_with("ca.crt"),
        "still https with mutual TLS"
    );
    let token_file = shim.auth_token_file.expect("shim --auth-token-file");
    assert_eq!(controller.shim_token_file, Some(token_file));
    let secret = named(&objects, "Secret", "gc-guestcred-shim-token");
    let token = secret["data"]["token"].as_str().expect("token data");
    assert!(token.len() >= 48, "a generated token of 48 characters");
}

#[test]
fn shim_probes_use_the_plain_metrics_port() {
    let ds = shim_for_locator("kubevirt");
    let c = container(&ds);
    assert_eq!(parsed_shim_args(&ds).metrics_listen, "0.0.0.0:9090");
    let metrics = entry_named(&c["ports"], "metrics");
    assert_eq!(metrics["containerPort"].as_i64(), Some(9090));
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(
            c[probe]["httpGet"]["port"].as_str(),
            Some("metrics"),
            "{probe}"
        );
        assert!(c[probe]["httpGet"]["scheme"].is_null(), "{probe}: HTTP");
    }
}

#[test]
fn shim_grace_periods_are_ordered_kill_above_drain_above_agent_timeout() {
    let ds = shim_for_locator("kubevirt");
    let args = parsed_shim_args(&ds);
    let kill = ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(kill > args.shutdown_grace_seconds);
    assert!(args.shutdown_grace_seconds > args.agent_timeout_seconds);
}

#[test]
fn node_name_comes_from_the_pod_spec() {
    let ds = shim_for_locator("kubevirt");
    let env = container(&ds)["env"].as_sequence().expect("env").clone();
    let node = env
        .iter()
        .find(|e| e["name"].as_str() == Some("NODE_NAME"))
        .expect("NODE_NAME env");
    assert_eq!(
        node["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("spec.nodeName")
    );
}

fn parsed_controller_args(deployment: &Value) -> ControllerArgs {
    let args = strings(&container(deployment)["args"]);
    assert_eq!(
        args.first().map(String::as_str),
        Some("controller"),
        "subcommand"
    );
    let mut argv = vec!["guestcred-controller".to_string()];
    argv.extend(args.into_iter().skip(1));
    ControllerCli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("controller args {argv:?}: {e}"))
        .args
}

#[test]
fn controller_args_point_at_the_shims_of_the_release() {
    let objects = render(&[]);
    let args = parsed_controller_args(only(&objects, "Deployment"));
    assert_eq!(args.shim_namespace, SHIM_NAMESPACE);
    assert_eq!(
        only(&objects, "DaemonSet")["metadata"]["namespace"].as_str(),
        Some(args.shim_namespace.as_str()),
        "the controller looks for shims where the DaemonSet runs"
    );
    assert_eq!(
        Some(args.shim_daemonset_name.as_str()),
        only(&objects, "DaemonSet")["metadata"]["name"].as_str(),
        "the controller calls only pods of the release's shim DaemonSet"
    );
    assert_eq!(args.shim_port, 8443);
    assert!(
        args.shim_request_timeout_seconds > 5,
        "above the agent timeout"
    );
}

#[test]
fn shim_pod_labels_match_the_controllers_shim_selector() {
    let ds = shim_for_locator("kubevirt");
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    for pair in SHIM_POD_SELECTOR.split(',') {
        let (key, value) = pair.split_once('=').expect("key=value selector");
        assert_eq!(labels[key].as_str(), Some(value), "pod label {key}");
    }
}

#[test]
fn shim_is_scheduled_on_kubevirt_nodes() {
    let ds = shim_for_locator("kubevirt");
    assert_eq!(
        ds["spec"]["template"]["spec"]["nodeSelector"]["kubevirt.io/schedulable"].as_str(),
        Some("true")
    );
}

#[test]
fn controller_runs_non_root_with_a_read_only_root_and_no_capabilities() {
    let objects = render(&[]);
    let deployment = only(&objects, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(pod["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        pod["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    let c = &container(deployment)["securityContext"];
    assert_eq!(c["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(c["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(strings(&c["capabilities"]["drop"]), ["ALL"]);
    assert!(c["capabilities"]["add"].is_null());
}

#[test]
fn controller_has_two_replicas_and_health_probes() {
    let objects = render(&[]);
    let deployment = only(&objects, "Deployment");
    assert_eq!(deployment["spec"]["replicas"].as_i64(), Some(2));
    let c = container(deployment);
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(c[probe]["httpGet"]["path"].as_str(), Some(path), "{probe}");
    }
    let pod_name = entry_named(&c["env"], "POD_NAME");
    assert_eq!(
        pod_name["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.name")
    );
}

/// The bench and the lab start the controller with what the chart gives it
/// (`guestcred_lab::DEPLOYED_CONTROLLER_ENV`): the chart must really give it that.
#[test]
fn the_controller_gets_the_environment_the_bench_and_the_lab_measure_it_with() {
    let objects = render(&[]);
    let c = container(only(&objects, "Deployment"));
    for (name, value) in guestcred_lab::DEPLOYED_CONTROLLER_ENV {
        assert_eq!(
            entry_named(&c["env"], name)["value"].as_str(),
            Some(*value),
            "{name}"
        );
    }
}

#[test]
fn shim_drops_every_capability_but_the_kubevirt_socket_override() {
    let kubevirt = shim_for_locator("kubevirt");
    let c = &container(&kubevirt)["securityContext"];
    assert_eq!(strings(&c["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(strings(&c["capabilities"]["add"]), ["DAC_OVERRIDE"]);
    assert_eq!(c["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(c["readOnlyRootFilesystem"].as_bool(), Some(true));
    let libvirt = shim_for_locator("libvirt-uri");
    assert!(container(&libvirt)["securityContext"]["capabilities"]["add"].is_null());
}

#[test]
fn shim_can_run_as_a_non_root_user_in_the_libvirt_group() {
    let objects = render(&[
        "shim.locator=libvirt-uri",
        "shim.runAsUser=1000",
        "shim.supplementalGroups={64055}",
    ]);
    let pod = &only(&objects, "DaemonSet")["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(pod["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(pod["runAsUser"].as_i64(), Some(1000));
    assert_eq!(pod["supplementalGroups"][0].as_i64(), Some(64055));
}

#[test]
fn shim_gets_no_kubernetes_api_access() {
    let objects = render(&[]);
    let ds = only(&objects, "DaemonSet");
    assert_eq!(
        ds["spec"]["template"]["spec"]["automountServiceAccountToken"].as_bool(),
        Some(false)
    );
    let shim_sa = ds["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .expect("shim service account");
    let bound = objects
        .iter()
        .filter(|o| matches!(kind_of(o), "RoleBinding" | "ClusterRoleBinding"))
        .flat_map(|b| b["subjects"].as_sequence().cloned().unwrap_or_default())
        .any(|s| s["name"].as_str() == Some(shim_sa));
    assert!(!bound, "no role is bound to the shim's service account");
}

fn namespace_of(object: &Value) -> &str {
    object["metadata"]["namespace"].as_str().unwrap_or_default()
}

/// Pod Security (issue 18): the shim runs in a namespace of its own
/// (`<release namespace>-shim` by default), which the chart creates labelled for the
/// `privileged` level; every object of the shim is there, with the controller's Role to
/// find the shim pods.
#[test]
fn the_shim_runs_in_its_own_namespace_created_with_the_privileged_pod_security_labels() {
    let objects = render(&[]);
    let ns = only(&objects, "Namespace");
    assert_eq!(ns["metadata"]["name"].as_str(), Some(SHIM_NAMESPACE));
    for mode in ["enforce", "audit", "warn"] {
        let key = format!("pod-security.kubernetes.io/{mode}");
        assert_eq!(
            ns["metadata"]["labels"][key.as_str()].as_str(),
            Some("privileged"),
            "{key}"
        );
    }
    for (kind, name) in [
        ("DaemonSet", "gc-guestcred-shim"),
        ("ServiceAccount", "gc-guestcred-shim"),
        ("Secret", "gc-guestcred-shim-tls"),
        ("NetworkPolicy", "gc-guestcred-shim"),
        ("Role", "gc-guestcred-controller-shim-pods"),
        ("RoleBinding", "gc-guestcred-controller-shim-pods"),
    ] {
        assert_eq!(
            namespace_of(named(&objects, kind, name)),
            SHIM_NAMESPACE,
            "{kind} {name}"
        );
    }
}

/// The release namespace asks for nothing above `restricted`: its one workload is the
/// controller's Deployment, no shim object is there, and the chart puts no Pod Security
/// label on it (it renders no Namespace for it).
#[test]
fn the_release_namespace_holds_only_the_controller() {
    let objects = render(&["shim.auth.extraBearerToken=true"]);
    let in_release: Vec<&Value> = objects
        .iter()
        .filter(|o| namespace_of(o) == NAMESPACE)
        .collect();
    let workloads: Vec<(&str, &str)> = in_release
        .iter()
        .filter(|o| {
            matches!(
                kind_of(o),
                "Deployment" | "DaemonSet" | "StatefulSet" | "Pod" | "Job" | "CronJob"
            )
        })
        .map(|o| {
            (
                kind_of(o),
                o["metadata"]["name"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(workloads, [("Deployment", "gc-guestcred-controller")]);
    let shim: Vec<&str> = in_release
        .iter()
        .filter(|o| o["metadata"]["labels"]["app.kubernetes.io/component"].as_str() == Some("shim"))
        .map(|o| o["metadata"]["name"].as_str().unwrap_or_default())
        .collect();
    assert!(
        shim.is_empty(),
        "shim objects in the release namespace: {shim:?}"
    );
    assert!(
        !objects
            .iter()
            .any(|o| kind_of(o) == "Namespace" && o["metadata"]["name"].as_str() == Some(NAMESPACE))
    );
}

/// `shim.createNamespace=false`: the chart uses the named namespace without creating it,
/// and the controller's Role for shim pods goes there, in both RBAC modes.
#[test]
fn an_existing_shim_namespace_is_used_without_creating_it() {
    let sets = ["shim.namespace=node-agents", "shim.createNamespace=false"];
    let objects = render(&sets);
    assert!(!has_kind(&objects, "Namespace"));
    assert_eq!(namespace_of(only(&objects, "DaemonSet")), "node-agents");
    assert_eq!(
        parsed_controller_args(only(&objects, "Deployment")).shim_namespace,
        "node-agents"
    );
    assert_grants_are_the_calls_with_shims_in(&objects, &["*"], true, "node-agents");
    let objects = render(&[sets[0], sets[1], "watchNamespaces={team-a}"]);
    assert_grants_are_the_calls_with_shims_in(&objects, &["team-a"], true, "node-agents");
}

/// The old layout (shim and controller in one namespace, which must then allow
/// privileged pods) stays possible, but helm cannot create the release namespace as part
/// of the release: the chart says which value to set.
#[test]
fn the_shim_shares_the_release_namespace_only_without_creating_it() {
    assert_render_fails(
        &[&format!("shim.namespace={NAMESPACE}")],
        "set shim.createNamespace=false",
    );
    let objects = render(&[
        &format!("shim.namespace={NAMESPACE}"),
        "shim.createNamespace=false",
        "shim.auth.extraBearerToken=true",
    ]);
    assert!(!has_kind(&objects, "Namespace"));
    assert_eq!(namespace_of(only(&objects, "DaemonSet")), NAMESPACE);
    assert_grants_are_the_calls_with_shims_in(&objects, &["*"], true, NAMESPACE);
    let tokens = objects
        .iter()
        .filter(|o| o["metadata"]["name"].as_str() == Some("gc-guestcred-shim-token"))
        .count();
    assert_eq!(tokens, 1, "one token Secret in the one namespace");
}

#[test]
fn the_shim_namespace_must_be_a_namespace_name() {
    assert_render_fails(&["shim.namespace=Node_Agents"], "does not match pattern");
}

/// With the extra bearer token, each side mounts it from its own namespace: one token,
/// a Secret in each.
#[test]
fn the_extra_bearer_token_is_one_token_in_both_namespaces() {
    let objects = render(&["shim.auth.extraBearerToken=true"]);
    let copies: Vec<(&str, &Value)> = objects
        .iter()
        .filter(|o| o["metadata"]["name"].as_str() == Some("gc-guestcred-shim-token"))
        .map(|o| (namespace_of(o), &o["data"]["token"]))
        .collect();
    assert_eq!(copies.len(), 2, "{copies:?}");
    assert_eq!(
        copies.iter().map(|c| c.0).collect::<BTreeSet<_>>(),
        BTreeSet::from([NAMESPACE, SHIM_NAMESPACE])
    );
    assert_eq!(copies[0].1, copies[1].1, "the same token");
}

/// Where a call of the controller goes.
#[derive(Clone, Copy, Debug)]
enum Scope {
    /// The namespace of the object being reconciled (or a watch over all of them): every
    /// namespace in cluster-wide mode, each of `watchNamespaces` in namespaced mode.
    Watched,
    /// The release namespace (the controller's own): the Lease, the input-hash key.
    Release,
    /// The shim namespace (values shim.namespace): the shim pods.
    Shim,
}

/// One API call of the controller: (group, resource[/subresource], verbs, resourceNames,
/// scope, where the code makes it).
type Call = (
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
    Scope,
    &'static str,
);

/// Every Kubernetes API call the controller makes, and nothing else. The chart's rules in
/// both modes must be exactly these (the tests below). That this list is the code's:
/// tests/real_control_plane.rs runs every guest flow as the chart's ServiceAccount and
/// reads the audit log (no request denied, every cluster-wide rule used or listed in its
/// UNEXERCISED with why), and tests/real_control_plane_namespaced.rs does the same for the
/// namespaced Roles (no request denied).
const CONTROLLER_CALLS: &[Call] = &[
    (
        "guestcred.io",
        "guestpasswordresets",
        &["get", "list", "watch"],
        &[],
        Scope::Watched,
        "lenient::watch; engine re-reads an object before acting on it",
    ),
    (
        "guestcred.io",
        "keypairrebuilds",
        &["get", "list", "watch", "patch"],
        &[],
        Scope::Watched,
        "as above; patch: the guestcred.io/keys finalizer (engine/finalize.rs)",
    ),
    (
        "guestcred.io",
        "guestpasswordresets/status",
        &["patch"],
        &[],
        Scope::Watched,
        "engine/status.rs merge patches",
    ),
    (
        "guestcred.io",
        "keypairrebuilds/status",
        &["patch"],
        &[],
        Scope::Watched,
        "engine/status.rs merge patches",
    ),
    (
        "kubevirt.io",
        "virtualmachineinstances",
        &["get", "list", "watch", "patch"],
        &[],
        Scope::Watched,
        "mod.rs vmi_changes (metadata watch); targets.rs; key record on a VM-less VMI",
    ),
    (
        "kubevirt.io",
        "virtualmachines",
        &["get", "patch"],
        &[],
        Scope::Watched,
        "rebuild.rs (cloud-init keys), key_ownership.rs (the record of added keys)",
    ),
    (
        "subresources.kubevirt.io",
        "virtualmachines/restart",
        &["update"],
        &[],
        Scope::Watched,
        "rebuild.rs restart",
    ),
    (
        "",
        "secrets",
        &["get", "list", "watch", "create", "delete"],
        &[],
        Scope::Watched,
        "secrets.rs read_key / ensure_generated / prune_generated; mod.rs secret_versions (metadata watch)",
    ),
    (
        "events.k8s.io",
        "events",
        &["create", "patch"],
        &[],
        Scope::Watched,
        "kube-rs Recorder",
    ),
    (
        "",
        "configmaps",
        &["get", "list", "create", "update", "delete"],
        &[],
        Scope::Watched,
        "engine/shards.rs: the target records of runs over 100 targets",
    ),
    (
        "",
        "pods",
        &["list", "watch"],
        &[],
        Scope::Shim,
        "shims.rs ShimDirectory",
    ),
    (
        "",
        "secrets",
        &["create"],
        &[],
        Scope::Release,
        "secrets.rs InputKey::ensure",
    ),
    (
        "",
        "secrets",
        &["get"],
        &[guestcred::controller::INPUT_KEY_SECRET],
        Scope::Release,
        "secrets.rs InputKey::ensure",
    ),
    (
        "coordination.k8s.io",
        "leases",
        &["create"],
        &[],
        Scope::Release,
        "leader.rs",
    ),
    (
        "coordination.k8s.io",
        "leases",
        &["get", "patch"],
        &["guestcred-controller"],
        Scope::Release,
        "leader.rs (the chart's controller.leaderElection.leaseName)",
    ),
];

/// One permission: (namespace, or "*" for every namespace; group; resource; verb;
/// resourceNames joined with ",", empty for any name).
type Grant = (String, String, String, String, String);

/// What a grant is worth: drops grants that another one in the set already gives (the
/// same verb on the same resource cluster-wide, or in the same namespace for any name).
fn normalised(grants: BTreeSet<Grant>) -> BTreeSet<Grant> {
    let covered = |(ns, g, r, v, names): &Grant| {
        grants.iter().any(|(ons, og, or, ov, onames)| {
            (og, or, ov) == (g, r, v)
                && onames.is_empty()
                && (ons == "*" && ns != "*" || ons == ns && !names.is_empty())
        })
    };
    grants.iter().filter(|g| !covered(g)).cloned().collect()
}

/// The grants of the rendered chart to the controller's ServiceAccount, through every
/// (Cluster)RoleBinding naming it.
fn controller_grants(objects: &[Value]) -> BTreeSet<Grant> {
    let sa = "gc-guestcred-controller";
    let mut out = BTreeSet::new();
    for binding in objects
        .iter()
        .filter(|o| matches!(kind_of(o), "RoleBinding" | "ClusterRoleBinding"))
    {
        let bound = binding["subjects"]
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|s| s["name"].as_str() == Some(sa) && s["namespace"].as_str() == Some(NAMESPACE));
        if !bound {
            continue;
        }
        let ns = match kind_of(binding) {
            "ClusterRoleBinding" => "*".to_string(),
            _ => binding["metadata"]["namespace"]
                .as_str()
                .expect("a RoleBinding's namespace")
                .to_string(),
        };
        let role_kind = binding["roleRef"]["kind"].as_str().expect("roleRef kind");
        let role_name = binding["roleRef"]["name"].as_str().expect("roleRef name");
        let role = objects
            .iter()
            .find(|o| {
                kind_of(o) == role_kind
                    && o["metadata"]["name"].as_str() == Some(role_name)
                    && (role_kind == "ClusterRole"
                        || o["metadata"]["namespace"].as_str() == Some(ns.as_str()))
            })
            .unwrap_or_else(|| panic!("{role_kind} {role_name} bound in {ns} is not rendered"));
        for rule in role["rules"].as_sequence().expect("rules") {
            let names = strings(&rule["resourceNames"]).join(",");
            for g in strings(&rule["apiGroups"]) {
                for r in strings(&rule["resources"]) {
                    for v in strings(&rule["verbs"]) {
                        out.insert((ns.clone(), g.clone(), r.clone(), v, names.clone()));
                    }
                }
            }
        }
    }
    normalised(out)
}

/// The grants CONTROLLER_CALLS need when the controller watches `watched` ("*": every
/// namespace), with or without leader election, with the shims in `shim_namespace`.
fn needed_grants(watched: &[&str], leader_election: bool, shim_namespace: &str) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for (group, resource, verbs, names, scope, _) in CONTROLLER_CALLS {
        if *group == "coordination.k8s.io" && !leader_election {
            continue;
        }
        let namespaces: &[&str] = match scope {
            Scope::Watched => watched,
            Scope::Release => &[NAMESPACE],
            Scope::Shim => &[shim_namespace],
        };
        for ns in namespaces {
            for verb in *verbs {
                out.insert((
                    ns.to_string(),
                    group.to_string(),
                    resource.to_string(),
                    verb.to_string(),
                    names.join(","),
                ));
            }
        }
    }
    normalised(out)
}

fn assert_grants_are_the_calls(objects: &[Value], watched: &[&str], leader_election: bool) {
    assert_grants_are_the_calls_with_shims_in(objects, watched, leader_election, SHIM_NAMESPACE)
}

fn assert_grants_are_the_calls_with_shims_in(
    objects: &[Value],
    watched: &[&str],
    leader_election: bool,
    shim_namespace: &str,
) {
    let granted = controller_grants(objects);
    let needed = needed_grants(watched, leader_election, shim_namespace);
    let missing: Vec<_> = needed.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&needed).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the chart's RBAC differs from CONTROLLER_CALLS\nmissing: {missing:#?}\nextra: {extra:#?}"
    );
}

#[test]
fn cluster_wide_rbac_is_exactly_the_calls_of_the_code() {
    let objects = render(&[]);
    assert_grants_are_the_calls(&objects, &["*"], true);
    let args = parsed_controller_args(only(&objects, "Deployment"));
    assert!(
        args.watch_namespaces.is_empty(),
        "{:?}",
        args.watch_namespaces
    );
    // Without leader election, no Lease rule at all.
    let objects = render(&[
        "controller.replicas=1",
        "controller.leaderElection.enabled=false",
    ]);
    assert_grants_are_the_calls(&objects, &["*"], false);
}

/// Namespaced mode: the same calls, granted by one Role per watched namespace; nothing
/// cluster-wide (no ClusterRoleBinding names the controller), so it can read no Secret
/// outside them. The controller gets the same namespaces.
#[test]
fn namespaced_rbac_is_exactly_the_calls_of_the_code_in_the_watched_namespaces() {
    let objects = render(&["watchNamespaces={team-a,team-b}"]);
    assert_grants_are_the_calls(&objects, &["team-a", "team-b"], true);
    assert!(
        !controller_grants(&objects).iter().any(|g| g.0 == "*"),
        "nothing cluster-wide in namespaced mode"
    );
    let args = parsed_controller_args(only(&objects, "Deployment"));
    assert_eq!(args.watch_namespaces, ["team-a", "team-b"]);
    // The release namespace among the watched ones: its Role covers the input-hash key.
    let objects = render(&[&format!("watchNamespaces={{{NAMESPACE}}}")]);
    assert_grants_are_the_calls(&objects, &[NAMESPACE], true);
}

#[test]
fn watched_namespaces_must_be_namespace_names() {
    assert_render_fails(&["watchNamespaces={Team_A}"], "does not match pattern");
    assert_render_fails(&["watchNamespaces={a,a}"], "are equal");
}

#[test]
fn editor_and_viewer_roles_aggregate_into_edit_and_view() {
    let objects = render(&[]);
    let editor = named(&objects, "ClusterRole", "gc-guestcred-editor");
    let viewer = named(&objects, "ClusterRole", "gc-guestcred-viewer");
    for (role, into) in [(editor, "edit"), (viewer, "view")] {
        let label = format!("rbac.authorization.k8s.io/aggregate-to-{into}");
        assert_eq!(role["metadata"]["labels"][&label].as_str(), Some("true"));
    }
    assert_eq!(
        rules_for(viewer, "guestcred.io", "keypairrebuilds"),
        set(&["get", "list", "watch"])
    );
    assert!(rules_for(editor, "guestcred.io", "guestpasswordresets").contains("create"));
}

#[test]
fn network_policy_admits_only_controller_pods_of_the_release_namespace_on_the_shim_port() {
    let objects = render(&[]);
    let policy = only(&objects, "NetworkPolicy");
    assert_eq!(
        policy["metadata"]["namespace"].as_str(),
        Some(SHIM_NAMESPACE),
        "with the shim pods it selects"
    );
    let spec = &policy["spec"];
    assert_eq!(
        spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"].as_str(),
        Some("shim")
    );
    assert_eq!(strings(&spec["policyTypes"]), ["Ingress"]);
    let rules = spec["ingress"].as_sequence().expect("ingress rules");
    assert_eq!(rules.len(), 2, "the API port and the metrics port");
    let from = rules[0]["from"].as_sequence().expect("from");
    assert_eq!(from.len(), 1);
    let controller_labels = &only(&objects, "Deployment")["spec"]["template"]["metadata"]["labels"];
    for (k, v) in from[0]["podSelector"]["matchLabels"]
        .as_mapping()
        .expect("pod selector")
    {
        let key = k.as_str().expect("label key");
        assert_eq!(controller_labels[key], *v, "controller pods carry {key}");
    }
    assert_eq!(
        from[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"].as_str(),
        Some(NAMESPACE),
        "controller pods of the release namespace only (one peer: both selectors hold)"
    );
    assert_eq!(rules[0]["ports"][0]["port"].as_i64(), Some(8443));
}

#[test]
fn network_policy_lets_only_the_release_namespace_scrape_shim_metrics_by_default() {
    let objects = render(&[]);
    let rule = &only(&objects, "NetworkPolicy")["spec"]["ingress"][1];
    assert_eq!(rule["ports"][0]["port"].as_i64(), Some(9090));
    let from = rule["from"].as_sequence().expect("from");
    assert_eq!(from.len(), 1);
    assert_eq!(
        from[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"].as_str(),
        Some(NAMESPACE),
        "every pod of the release namespace"
    );
    assert!(from[0]["podSelector"].is_null(), "{:?}", from[0]);
}

#[test]
fn network_policy_lets_the_configured_namespaces_scrape_shim_metrics() {
    let objects = render(&["networkPolicy.metricsNamespaces={monitoring,observability}"]);
    let rule = &only(&objects, "NetworkPolicy")["spec"]["ingress"][1];
    let selector = &rule["from"][0]["namespaceSelector"]["matchExpressions"][0];
    assert_eq!(
        selector["key"].as_str(),
        Some("kubernetes.io/metadata.name")
    );
    assert_eq!(selector["operator"].as_str(), Some("In"));
    assert_eq!(
        strings(&selector["values"]),
        ["monitoring", "observability"]
    );
    assert_eq!(rule["ports"][0]["port"].as_i64(), Some(9090));
}

#[test]
fn network_policy_can_be_turned_off() {
    assert!(!has_kind(
        &render(&["networkPolicy.enabled=false"]),
        "NetworkPolicy"
    ));
}

#[test]
fn service_monitor_renders_only_when_enabled() {
    let off = render(&[]);
    assert!(!has_kind(&off, "ServiceMonitor"));
    let on = render(&["serviceMonitor.enabled=true"]);
    let monitor = only(&on, "ServiceMonitor");
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"].as_str(),
        Some("metrics")
    );
}

#[test]
fn existing_token_secret_replaces_the_generated_one() {
    let objects = render(&[
        "shim.auth.extraBearerToken=true",
        "shim.auth.existingTokenSecret=shim-token-from-vault",
    ]);
    assert!(
        !objects
            .iter()
            .any(|o| o["metadata"]["name"].as_str() == Some("gc-guestcred-shim-token"))
    );
    let ds = only(&objects, "DaemonSet");
    let volume = entry_named(volumes(ds), "shim-token");
    assert_eq!(
        volume["secret"]["secretName"].as_str(),
        Some("shim-token-from-vault")
    );
}

fn assert_render_fails(sets: &[&str], expected: &str) {
    assert_each_render_fails(&[("", sets, expected)]);
}

/// Each case: what it is, the `--set` values, what the refusal names.
type Refusal<'a> = (&'a str, &'a [&'a str], &'a str);

/// `helm template` refuses each case, naming what it says.
fn assert_each_render_fails(cases: &[Refusal]) {
    for (case, sets, expected) in cases {
        let out = helm_template(sets);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{case}: {sets:?} must be rejected");
        assert!(
            stderr.contains(expected),
            "{case}: {sets:?}: expected {expected:?} in: {stderr}"
        );
    }
}

#[test]
fn the_values_schema_rejects_values_it_does_not_know() {
    assert_each_render_fails(&[
        ("negative replicas", &["controller.replicas=-1"], "replicas"),
        ("an unknown locator", &["shim.locator=ssh"], "locator"),
        (
            "an unknown value key",
            &["shim.lokator=kubevirt"],
            "lokator",
        ),
        (
            "an unknown auth mode",
            &["shim.auth.mode=token"],
            "/shim/auth/mode",
        ),
        (
            "an unknown TLS source",
            &["tls.source=vault"],
            "/tls/source",
        ),
    ]);
}

#[test]
fn existing_tls_source_needs_both_secret_names() {
    assert_render_fails(
        &["tls.source=existing", "tls.existing.controllerSecret=c"],
        "tls.existing.shimSecret is required",
    );
}

#[test]
fn existing_tls_secrets_are_mounted_and_nothing_is_generated() {
    let existing = [
        "tls.existing.shimSecret=my-shim-tls",
        "tls.existing.controllerSecret=my-controller-tls",
    ];
    let objects = render_tls_without("existing", &existing, "Secret", "the Secrets exist");
    let shim = parsed_shim_args(only(&objects, "DaemonSet"));
    let files = shim.tls_files().expect("TLS flags");
    assert_eq!(
        assert_from_whole_secret(only(&objects, "DaemonSet"), &files.cert, "tls.crt"),
        "my-shim-tls"
    );
    let controller = parsed_controller_args(only(&objects, "Deployment"));
    assert_eq!(
        assert_from_whole_secret(
            only(&objects, "Deployment"),
            &controller.shim_ca_file,
            "ca.crt"
        ),
        "my-controller-tls"
    );
}

/// The shim's timeouts nest (agent call < shutdown grace < termination grace, agent call <
/// the controller's request timeout), and two controller replicas need leader election.
#[test]
fn values_that_contradict_each_other_are_refused() {
    assert_each_render_fails(&[
        (
            "the shutdown grace must exceed the agent timeout",
            &["shim.shutdownGraceSeconds=5"],
            "shim.shutdownGraceSeconds must be greater than shim.agentTimeoutSeconds",
        ),
        (
            "the termination grace must exceed the shutdown grace",
            &["shim.terminationGracePeriodSeconds=10"],
            "shim.terminationGracePeriodSeconds must be greater than shim.shutdownGraceSeconds",
        ),
        (
            "the request timeout must exceed the agent timeout",
            &[
                "shim.agentTimeoutSeconds=20",
                "shim.shutdownGraceSeconds=25",
                "shim.terminationGracePeriodSeconds=40",
            ],
            "shimRequestTimeoutSeconds must be greater",
        ),
        (
            "two replicas without leader election",
            &["controller.leaderElection.enabled=false"],
            "needs controller.leaderElection.enabled",
        ),
    ]);
}

/// The rendered manifests, minus kinds the emulator does not serve.
fn served_manifests(sets: &[&str]) -> String {
    render(sets)
        .into_iter()
        .filter(|o| kind_of(o) != "ServiceMonitor")
        .map(|o| serde_yaml::to_string(&o).expect("YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The API-server emulator served on a loopback port, with a kubeconfig for kubectl and
/// helm (discovery caches and helm state stay in the temp dir).
struct Served {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

async fn serve_emulator() -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let url = format!("http://{}", listener.local_addr().expect("local address"));
    let server = ApiServer::new();
    tokio::spawn(async move { server.serve(listener, axum::Router::new()).await });
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    write_kubeconfig(&kubeconfig, &url).expect("kubeconfig written");
    let served = Served { dir, kubeconfig };
    // The release namespace, and the shim namespace as an earlier install left it (owned
    // by the release: helm refuses to adopt a namespace it did not create).
    let namespace = served.file(
        "namespace.yaml",
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {SHIM_NAMESPACE}\n  labels:\n    app.kubernetes.io/managed-by: Helm\n  annotations:\n    meta.helm.sh/release-name: {RELEASE}\n    meta.helm.sh/release-namespace: {NAMESPACE}\n"
        ),
    );
    served.kubectl(&["apply", "-f", &namespace]).await;
    served
}

impl Served {
    /// Writes a file into the temp dir; returns its path as a string for command lines.
    fn file(&self, name: &str, content: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content).expect("file written");
        path.to_str().expect("UTF-8 temp path").to_string()
    }

    async fn run(&self, program: &Path, args: &[&str]) -> Output {
        let run = tokio::process::Command::new(program)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.dir.path())
            .env("HELM_CACHE_HOME", self.dir.path().join("helm-cache"))
            .env("HELM_CONFIG_HOME", self.dir.path().join("helm-config"))
            .env("HELM_DATA_HOME", self.dir.path().join("helm-data"))
            .current_dir(repo())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(Duration::from_secs(60), run).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "{} is not installed: run scripts/install-deps.sh",
                program.display()
            ),
            Ok(Err(e)) => panic!("cannot run {}: {e}", program.display()),
            Err(_) => panic!("{} {args:?} did not finish within 60 s", program.display()),
        }
    }

    async fn kubectl(&self, args: &[&str]) -> String {
        let cache = self.dir.path().join("kube-cache");
        let mut all = args.to_vec();
        all.extend(["--cache-dir", cache.to_str().expect("UTF-8 temp path")]);
        let out = self.run(Path::new("kubectl"), &all).await;
        stdout_of(&out, &format!("kubectl {args:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_manifests_apply_to_the_api_server_with_kubectl() {
    let lab = serve_emulator().await;
    let crds = chart_dir().join("crds");
    // Every optional part on, so it is applied too.
    let manifests = lab.file(
        "release.yaml",
        &served_manifests(&["serviceMonitor.enabled=true"]),
    );

    lab.kubectl(&["apply", "-f", crds.to_str().expect("UTF-8 path")])
        .await;
    let applied = lab.kubectl(&["apply", "-f", &manifests]).await;
    assert!(
        applied.contains("daemonset.apps/gc-guestcred-shim created"),
        "{applied}"
    );

    const KINDS: &str = "deployments,daemonsets,networkpolicies,services,serviceaccounts,secrets,roles,rolebindings";
    let release: &[&str] = &[
        "deployment.apps/gc-guestcred-controller",
        "service/gc-guestcred-controller-metrics",
        "serviceaccount/gc-guestcred-controller",
        "secret/gc-guestcred-ca",
        "secret/gc-guestcred-controller-tls",
        "role.rbac.authorization.k8s.io/gc-guestcred-controller-leader-election",
    ];
    let shim: &[&str] = &[
        "daemonset.apps/gc-guestcred-shim",
        "networkpolicy.networking.k8s.io/gc-guestcred-shim",
        "serviceaccount/gc-guestcred-shim",
        "secret/gc-guestcred-shim-tls",
        "role.rbac.authorization.k8s.io/gc-guestcred-controller-shim-pods",
        "rolebinding.rbac.authorization.k8s.io/gc-guestcred-controller-shim-pods",
    ];
    for (ns, names) in [(NAMESPACE, release), (SHIM_NAMESPACE, shim)] {
        let got = lab.kubectl(&["get", "-n", ns, KINDS, "-o", "name"]).await;
        assert_listed(&got, names);
    }
    let cluster = lab
        .kubectl(&["get", "clusterroles,clusterrolebindings", "-o", "name"])
        .await;
    assert_listed(
        &cluster,
        &["clusterrole.rbac.authorization.k8s.io/gc-guestcred-editor"],
    );
}

/// `kubectl get … -o name` output `got` lists each of `names`.
fn assert_listed(got: &str, names: &[&str]) {
    for name in names {
        assert!(got.lines().any(|l| l == *name), "{name} missing in:\n{got}");
    }
}

/// What an earlier `helm install` left: the token Secret, owned by the release.
fn installed_token_secret(token_b64: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: gc-guestcred-shim-token\n  namespace: {NAMESPACE}\n  labels:\n    app.kubernetes.io/managed-by: Helm\n  annotations:\n    meta.helm.sh/release-name: {RELEASE}\n    meta.helm.sh/release-namespace: {NAMESPACE}\ndata:\n  token: {token_b64}\n"
    )
}

impl Served {
    /// `helm template --dry-run=server`: the chart's `lookup` sees the emulator, as an
    /// upgrade does.
    async fn render_against_cluster(&self, sets: &[&str]) -> Vec<Value> {
        let chart = chart_dir();
        let args = template_args(&chart, &["--dry-run=server"], sets);
        let out = self.run(&tool("helm"), &args).await;
        objects_of(&stdout_of(&out, "helm template --dry-run=server"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_keeps_the_generated_shim_token() {
    let lab = serve_emulator().await;
    let kept = "a2VwdC1hY3Jvc3MtdXBncmFkZXM="; // base64 of kept-across-upgrades
    let secret = lab.file("secret.yaml", &installed_token_secret(kept));
    lab.kubectl(&["apply", "-f", &secret]).await;

    let rendered = lab
        .render_against_cluster(&["shim.auth.extraBearerToken=true"])
        .await;
    assert_eq!(
        named(&rendered, "Secret", "gc-guestcred-shim-token")["data"]["token"].as_str(),
        Some(kept)
    );
}

/// A rendered object as `helm install` leaves it: owned by the release.
fn as_installed(object: &Value) -> String {
    let mut object = object.clone();
    object["metadata"]["annotations"] = serde_yaml::from_str(&format!(
        "{{meta.helm.sh/release-name: {RELEASE}, meta.helm.sh/release-namespace: {NAMESPACE}}}"
    ))
    .expect("annotations");
    serde_yaml::to_string(&object).expect("YAML")
}

fn tls_secret_names() -> [&'static str; 3] {
    [
        "gc-guestcred-ca",
        "gc-guestcred-shim-tls",
        "gc-guestcred-controller-tls",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_keeps_the_generated_certificates() {
    let lab = serve_emulator().await;
    let installed = render(&[]);
    let secrets: Vec<&Value> = tls_secret_names()
        .iter()
        .map(|name| named(&installed, "Secret", name))
        .collect();
    let manifest = secrets
        .iter()
        .map(|o| as_installed(o))
        .collect::<Vec<_>>()
        .join("---\n");
    let file = lab.file("installed-tls.yaml", &manifest);
    lab.kubectl(&["apply", "-f", &file]).await;

    let upgraded = lab.render_against_cluster(&[]).await;
    for (name, before) in tls_secret_names().iter().zip(&secrets) {
        assert_eq!(
            named(&upgraded, "Secret", name)["data"],
            before["data"],
            "{name} kept"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_installed_certificate_pair_is_replaced_as_a_whole() {
    let lab = serve_emulator().await;
    let installed = render(&[]);
    let shim_only = named(&installed, "Secret", "gc-guestcred-shim-tls");
    let file = lab.file("shim-tls.yaml", &as_installed(shim_only));
    lab.kubectl(&["apply", "-f", &file]).await;

    let upgraded = lab.render_against_cluster(&[]).await;
    let shim = named(&upgraded, "Secret", "gc-guestcred-shim-tls");
    let controller = named(&upgraded, "Secret", "gc-guestcred-controller-tls");
    assert_ne!(shim["data"], shim_only["data"], "a fresh pair");
    assert_eq!(
        shim["data"]["ca.crt"], controller["data"]["ca.crt"],
        "one CA for both sides"
    );
}

/// The chart's own cert-manager CA is a namespaced Issuer, which signs Certificates of its
/// own namespace only: with the shim in a namespace of its own (the default) the chart
/// asks for a ClusterIssuer, or for the shim in the release namespace.
#[test]
fn cert_manager_with_the_charts_own_ca_needs_the_shim_in_the_release_namespace() {
    assert_render_fails(&["tls.source=cert-manager"], "of kind ClusterIssuer");
    assert_render_fails(
        &[
            "tls.source=cert-manager",
            "tls.certManager.issuerRef.name=team-ca",
            "tls.certManager.issuerRef.kind=Issuer",
        ],
        "of kind ClusterIssuer",
    );
}

#[test]
fn cert_manager_source_renders_a_ca_issuer_chain_and_two_certificates() {
    let objects = render_tls(
        "cert-manager",
        &[
            &format!("shim.namespace={NAMESPACE}"),
            "shim.createNamespace=false",
        ],
    );
    assert!(
        !has_kind(&objects, "Secret"),
        "cert-manager writes the Secrets"
    );
    let issuers: BTreeSet<String> = of_kind(&objects, "Issuer")
        .iter()
        .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        issuers,
        set(&["gc-guestcred-ca", "gc-guestcred-selfsigned"])
    );
    let ca = named(&objects, "Certificate", "gc-guestcred-ca");
    assert_eq!(ca["spec"]["isCA"].as_bool(), Some(true));
    assert_eq!(
        ca["spec"]["issuerRef"]["name"].as_str(),
        Some("gc-guestcred-selfsigned")
    );
    for (name, dns, usage, workload) in [
        (
            "gc-guestcred-shim-tls",
            "guestcred-shim",
            "server auth",
            "DaemonSet",
        ),
        (
            "gc-guestcred-controller-tls",
            "guestcred-controller",
            "client auth",
            "Deployment",
        ),
    ] {
        let cert = named(&objects, "Certificate", name);
        assert_eq!(cert["spec"]["secretName"].as_str(), Some(name));
        assert_eq!(strings(&cert["spec"]["dnsNames"]), [dns]);
        assert!(strings(&cert["spec"]["usages"]).iter().any(|u| u == usage));
        assert_eq!(
            cert["spec"]["issuerRef"]["name"].as_str(),
            Some("gc-guestcred-ca")
        );
        let mounted = each_str(volumes(only(&objects, workload)), &["secret", "secretName"]);
        assert_eq!(
            mounted,
            [name],
            "{workload} mounts the Certificate's Secret"
        );
    }
}

#[test]
fn cert_manager_with_an_issuer_ref_renders_only_the_two_certificates() {
    let issuer = [
        "tls.certManager.issuerRef.name=corp-ca",
        "tls.certManager.issuerRef.kind=ClusterIssuer",
    ];
    let objects = render_tls_without("cert-manager", &issuer, "Issuer", "the issuer is given");
    let certs = of_kind(&objects, "Certificate");
    assert_eq!(certs.len(), 2);
    // Each Certificate (so its Secret) in the namespace of the pod that mounts it.
    assert_eq!(
        namespace_of(named(&objects, "Certificate", "gc-guestcred-shim-tls")),
        SHIM_NAMESPACE
    );
    assert_eq!(
        namespace_of(named(
            &objects,
            "Certificate",
            "gc-guestcred-controller-tls"
        )),
        NAMESPACE
    );
    for c in certs {
        assert_eq!(c["spec"]["issuerRef"]["name"].as_str(), Some("corp-ca"));
        assert_eq!(
            c["spec"]["issuerRef"]["kind"].as_str(),
            Some("ClusterIssuer")
        );
    }
}

/// Writes every Secret volume a workload mounts (from the rendered Secrets) under `root`,
/// at its mount path, as kubelet would.
fn materialise_secret_volumes(objects: &[Value], workload: &Value, root: &Path) {
    let volumes = volumes(workload).as_sequence().expect("volumes");
    for mount in container(workload)["volumeMounts"]
        .as_sequence()
        .expect("mounts")
    {
        let Some(volume) = volumes.iter().find(|v| v["name"] == mount["name"]) else {
            continue;
        };
        let Some(secret) = volume["secret"]["secretName"].as_str() else {
            continue;
        };
        let dir = root.join(
            mount["mountPath"]
                .as_str()
                .expect("mountPath")
                .trim_start_matches('/'),
        );
        std::fs::create_dir_all(&dir).expect("mount dir");
        for (key, value) in named(objects, "Secret", secret)["data"]
            .as_mapping()
            .expect("secret data")
        {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(value.as_str().expect("base64 string"))
                .expect("valid base64");
            std::fs::write(dir.join(key.as_str().expect("key")), bytes).expect("written");
        }
    }
}

/// `path` as seen from a pod whose volumes are materialised under `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// The best proof that the generated certificates are right: the real shim binary, run
/// with the rendered DaemonSet args and the rendered shim Secret's files, answers the
/// controller's TLS client built from the rendered Deployment args and controller
/// Secret (chain to the one CA, shim SAN guestcred-shim, controller SAN
/// guestcred-controller), and refuses a client without the controller's certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_certificates_let_the_rendered_controller_call_the_rendered_shim() {
    use guestcred::api::wire::DomainRef;
    use guestcred::controller::shim_client::{ShimApi as _, ShimCallError};
    use guestcred::tls::client::{ClientTlsFiles, ReloadingHttpClient};
    use guestcred_lab::hostqga::HostQga;

    let objects = render(&["shim.locator=qga-socket"]);
    let ds = only(&objects, "DaemonSet");
    let deployment = only(&objects, "Deployment");
    let dir = tempfile::Builder::new()
        .prefix("gch")
        .tempdir()
        .expect("temp dir");
    let (shim_root, controller_root) = (dir.path().join("shim"), dir.path().join("ctl"));
    materialise_secret_volumes(&objects, ds, &shim_root);
    materialise_secret_volumes(&objects, deployment, &controller_root);

    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port")
    };
    let (port, metrics_port) = (free_port(), free_port());
    let template = format!("{}/{{namespace}}_{{name}}/qga.sock", dir.path().display());
    // The rendered args, with what kubelet and the node provide filled in: the node name,
    // the mounted files' location, and loopback addresses.
    let argv: Vec<String> = strings(&container(ds)["args"])
        .into_iter()
        .map(|arg| {
            let (flag, value) = arg.split_once('=').unwrap_or((arg.as_str(), ""));
            match flag {
                "--listen" => format!("--listen=127.0.0.1:{port}"),
                "--metrics-listen" => format!("--metrics-listen=127.0.0.1:{metrics_port}"),
                "--node-name" => "--node-name=node-a".into(),
                "--qga-socket-template" => format!("--qga-socket-template={template}"),
                _ if value.starts_with("/etc/") => {
                    format!("{flag}={}", under(&shim_root, Path::new(value)).display())
                }
                _ => arg,
            }
        })
        .collect();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_guestcred-shim"));
    for (k, _) in std::env::vars() {
        if k.starts_with("GUESTCRED_SHIM_") {
            cmd.env_remove(k);
        }
    }
    let mut shim = cmd
        .args(&argv)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn guestcred-shim");
    let _vm = HostQga::start(dir.path(), "lab_vm-helm")
        .expect("lab qemu-ga must start (needs root, unshare, overlayfs, qemu-ga)");

    let controller = parsed_controller_args(deployment);
    let files = ClientTlsFiles {
        ca: under(&controller_root, &controller.shim_ca_file),
        cert: Some(under(&controller_root, &controller.shim_client_cert_file)),
        key: Some(under(&controller_root, &controller.shim_client_key_file)),
        server_name: controller.shim_server_name.clone(),
    };
    let timeout = Duration::from_secs(30);
    let client_for = |files: ClientTlsFiles| {
        let http = ReloadingHttpClient::new(files, timeout)
            .expect("controller TLS client from the rendered files")
            .http()
            .expect("HTTPS client");
        guestcred::controller::shim_client::ShimClient::with_http_client(
            format!("https://127.0.0.1:{port}"),
            None,
            http,
        )
    };
    let client = client_for(files.clone());
    let domain = DomainRef::new("lab", "vm-helm").with_node("node-a");
    let deadline = std::time::Instant::now() + timeout;
    let probe = loop {
        match client.probe(&domain).await {
            Err(ShimCallError::Unreachable(_)) if std::time::Instant::now() < deadline => {
                if let Ok(Some(status)) = shim.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = shim.stderr.take() {
                        use tokio::io::AsyncReadExt;
                        let _ = e.read_to_string(&mut err).await;
                    }
                    panic!("the shim exited ({status}) with the rendered args {argv:?}:\n{err}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other,
        }
    };
    assert!(
        probe.expect("probe over mutual TLS").agent_connected,
        "the rendered controller reaches the guest agent through the rendered shim"
    );

    let anonymous = client_for(ClientTlsFiles {
        cert: None,
        key: None,
        ..files
    });
    // The certificate is required in the TLS handshake itself.
    match anonymous.probe(&domain).await {
        Err(ShimCallError::Unreachable(_)) => {}
        other => panic!("a client without the controller certificate got {other:?}"),
    }
    let health = reqwest::get(format!("http://127.0.0.1:{metrics_port}/healthz"))
        .await
        .expect("the probes' port answers");
    assert!(health.status().is_success());
    shim.kill().await.expect("stop the shim");
}

/// Rendered manifests checked strictly (unknown fields rejected) against the Kubernetes
/// 1.33 OpenAPI schemas: the emulator does not validate built-in kinds.
fn assert_schema_valid(name: &str, manifests: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(name);
    std::fs::write(&path, manifests).expect("manifests written");
    let out = run(
        &tool("kubernetes-validate"),
        &[
            "--strict",
            "--quiet",
            "-k",
            "1.33.0",
            path.to_str().expect("UTF-8 path"),
        ],
    );
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !report.contains("ERROR") && !report.contains("WARN"),
        "{name}: {report}"
    );
}

#[test]
fn rendered_manifests_match_the_kubernetes_schemas_for_every_locator() {
    for locator in ["kubevirt", "libvirt-uri", "qga-socket"] {
        let manifests = render(&[&format!("shim.locator={locator}")])
            .into_iter()
            .map(|o| serde_yaml::to_string(&o).expect("YAML"))
            .collect::<Vec<_>>()
            .join("---\n");
        assert_schema_valid(&format!("{locator}.yaml"), &manifests);
    }
}

#[test]
fn chart_crds_match_the_kubernetes_schemas() {
    for entry in std::fs::read_dir(chart_dir().join("crds")).expect("chart crds") {
        let path = entry.expect("crd entry").path();
        let text = std::fs::read_to_string(&path).expect("crd file");
        let name = path.file_name().expect("file name").to_string_lossy();
        assert_schema_valid(&name, &text);
    }
}

fn argo_health_script() -> PathBuf {
    chart_dir().join("argocd/health.lua")
}

/// One condition as a Lua table literal, as Argo CD hands the object to the script.
fn lua_condition(type_: &str, status: &str, reason: &str, observed_generation: i64) -> String {
    format!(
        "{{type = {type_:?}, status = {status:?}, reason = {reason:?}, message = \"m\", observedGeneration = {observed_generation}}}"
    )
}

/// Runs the shipped Argo CD health script on an object; returns (status, message).
fn argo_health(generation: i64, conditions: Option<&[String]>) -> (String, String) {
    let status = match conditions {
        Some(c) => format!("status = {{conditions = {{{}}}}}", c.join(", ")),
        None => String::new(),
    };
    let harness = format!(
        "local f = assert(loadfile({script:?}))\n\
         setfenv(f, setmetatable({{obj = {{metadata = {{generation = {generation}}}, {status}}}}}, {{__index = _G}}))\n\
         local r = f()\n\
         io.write(r.status, \"\\n\", r.message or \"\")\n",
        script = argo_health_script().to_str().expect("UTF-8 path"),
    );
    let out = Command::new("lua5.1")
        .args(["-e", &harness])
        .output()
        .unwrap_or_else(|e| panic!("cannot run lua5.1 ({e}): run scripts/install-deps.sh"));
    let text = stdout_of(&out, "lua5.1 health.lua");
    let (status, message) = text.split_once('\n').expect("status and message lines");
    (status.to_string(), message.to_string())
}

#[test]
fn argo_health_is_progressing_before_the_controller_wrote_status() {
    assert_eq!(argo_health(1, None).0, "Progressing");
}

#[test]
fn argo_health_is_healthy_when_ready_for_the_current_generation() {
    let conditions = [
        lua_condition("Ready", "True", "Succeeded", 2),
        lua_condition("Stalled", "False", "Succeeded", 2),
    ];
    assert_eq!(argo_health(2, Some(&conditions)).0, "Healthy");
}

#[test]
fn argo_health_is_degraded_with_the_reason_when_stalled() {
    let conditions = [
        lua_condition("Ready", "False", "SecretNotFound", 2),
        lua_condition("Stalled", "True", "SecretNotFound", 2),
    ];
    let (status, message) = argo_health(2, Some(&conditions));
    assert_eq!(status, "Degraded");
    assert!(message.starts_with("SecretNotFound"), "{message}");
}

#[test]
fn argo_health_ignores_conditions_of_an_older_generation() {
    let conditions = [lua_condition("Ready", "True", "Succeeded", 1)];
    assert_eq!(argo_health(2, Some(&conditions)).0, "Progressing");
}

#[test]
fn install_docs_show_the_shipped_argo_health_script() {
    let script = std::fs::read_to_string(argo_health_script()).expect("health.lua");
    let docs = std::fs::read_to_string(repo().join("docs/install.md")).expect("install.md");
    for line in script.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            docs.contains(&format!("    {line}")),
            "docs/install.md lacks the health.lua line {line:?}"
        );
    }
}

#[test]
fn dockerfile_passes_hadolint() {
    let out = run(
        &tool("hadolint"),
        &["--failure-threshold", "warning", "Dockerfile"],
    );
    stdout_of(&out, "hadolint Dockerfile");
}

#[test]
fn dockerfile_builds_only_the_product_package() {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    assert!(text.contains("cargo build --release --locked -p guestcred --bins"));
    for target in ["AS controller", "AS shim", "AS builder"] {
        assert!(text.contains(target), "Dockerfile stage {target}");
    }
    assert!(
        text.contains(r#"ENTRYPOINT ["/usr/local/bin/guestcred-shim"]"#),
        "the shim image runs the shim-only binary"
    );
}

/// What the image build compiles: the product package, whose normal dependency tree holds
/// no test-world package, checked cheaply in a target dir of its own so it does not wait
/// on the shared one.
#[test]
fn product_package_depends_on_no_test_world_package() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args([
            "tree",
            "--locked",
            "-p",
            "guestcred",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(repo())
        .output()
        .expect("run cargo tree");
    // (json-patch is not checked: kube itself depends on it.)
    let tree = stdout_of(&out, "cargo tree -p guestcred -e normal");
    for lab in ["guestcred-lab", "guestcred-bench", "rcgen", "tempfile"] {
        assert!(
            !tree.lines().any(|l| l.starts_with(&format!("{lab} "))),
            "the product links {lab}:\n{tree}"
        );
    }
    assert!(
        tree.lines().any(|l| l.starts_with("guestcred-api ")),
        "{tree}"
    );
}

#[test]
fn product_binaries_compile_alone() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["check", "--quiet", "--locked", "-p", "guestcred", "--bins"])
        .env("CARGO_TARGET_DIR", repo().join("target/product-only"))
        .current_dir(repo())
        .output()
        .expect("run cargo");
    stdout_of(&out, "cargo check -p guestcred --bins");
}
