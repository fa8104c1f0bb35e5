//! Namespaced mode on a REAL control plane: the chart installed by helm with
//! `watchNamespaces={default}` (one Role for the controller in `default`, the input-hash
//! key's Role in the release namespace, no ClusterRole bound to it), and the controller
//! running as the chart's ServiceAccount (a TokenRequest token) with
//! `--watch-namespaces=default`, beside real shims and real guests (see
//! tests/real_control_plane.rs for the cluster-wide mode, the chart's default).
//!
//! A lab of its own: a cluster-wide controller in the same cluster would reconcile the
//! objects of the watched namespace too, with another input-hash key, and the two would
//! take turns re-running them. Lab guests live in `default`, which is therefore the watched
//! namespace. A control plane that cannot be built or started FAILS the test.
//!
//! Needs root (libvirtd, network namespaces) and scripts/install-deps.sh (helm, Go).
#![allow(clippy::disallowed_methods)] // tests may block: clippy.toml's file-system rule is for src/
mod real_cp;
use real_cp::*;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use guestcred_lab::cluster::real;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::Api;
use serde_json::Value;

const WATCHED: &str = "default";

/// The controller reconciles a reset in the watched namespace (the guest really gets the
/// password) with the namespaced Roles alone: the audit log shows no request of it denied
/// and none outside the watched, the release and the shim namespace. A reset in another namespace,
/// created first, is never reconciled (no status), and the controller's own token gets a
/// real 403 from the API server for Secrets there and for Secrets cluster-wide.
#[tokio::test(flavor = "multi_thread")]
async fn namespaced_mode_reconciles_the_watched_namespace_and_cannot_read_secrets_elsewhere() {
    let lab = real_cp::lab(&[WATCHED]).await;
    let client = admin().await;
    let t0 = Instant::now();

    let outside = new_namespace(&client, "outside").await;
    secret(
        &client,
        &outside,
        "pw",
        &[("password", "Outside-namespace-1")],
    )
    .await;
    let r = root_reset_from("vm-1-1", "pw");
    create(&client, &outside, "GuestPasswordReset", "r", r).await;

    let pw = "Namespaced-mode-1";
    let name = unique("ns-reset");
    reset_root_from_secret(&client, WATCHED, &name, ("vm-1-1", "ns-pw", pw)).await;
    eprintln!(
        "reset in the watched namespace: Ready and applied at {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    // Seen by nobody: the reset outside has no status at all.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let unseen = objects(&client, &outside, "GuestPasswordReset")
        .get("r")
        .await
        .expect("the reset outside");
    assert!(
        unseen.data.get("status").is_none_or(Value::is_null),
        "reconciled outside the watched namespaces: {}",
        unseen.data["status"]
    );

    // Everything the controller asked for, before the probes below (which are denied).
    let release = lab.state.controller_namespace.clone();
    let controller = sa_user(&release, real::CONTROLLER_SA);
    let log = audit();
    let mine: Vec<&Audited> = log
        .iter()
        .filter(|a| a.user == controller && !a.resource.is_empty())
        .collect();
    assert!(!mine.is_empty());
    let denied: Vec<&&Audited> = mine.iter().filter(|a| a.rbac_denied()).collect();
    assert!(
        denied.is_empty(),
        "the namespaced Roles lack a call: {denied:#?}"
    );
    let places: BTreeSet<&str> = mine.iter().map(|a| a.namespace.as_str()).collect();
    // The shim pods are listed and watched in the shim namespace (the chart's Role there).
    let allowed = BTreeSet::from([WATCHED, release.as_str(), lab.state.shim_namespace.as_str()]);
    assert!(
        places.is_subset(&allowed),
        "the controller asked outside {allowed:?} (\"\": cluster-wide): {places:?}"
    );
    let secrets_read: BTreeSet<(String, String)> = mine
        .iter()
        .filter(|a| a.resource == "secrets")
        .map(|a| (a.verb.clone(), a.namespace.clone()))
        .collect();
    eprintln!("the controller's Secret requests (verb, namespace): {secrets_read:?}");
    assert!(secrets_read.contains(&("watch".into(), WATCHED.into())));

    // The chart bound no ClusterRole to the controller.
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    let cluster_wide: Vec<String> = guestcred_lab::testing::list_all(&bindings)
        .await
        .into_iter()
        .filter(|b| {
            b.subjects
                .iter()
                .flatten()
                .any(|s| s.name == real::CONTROLLER_SA && s.namespace.as_deref() == Some(&release))
        })
        .filter_map(|b| b.metadata.name)
        .collect();
    assert!(cluster_wide.is_empty(), "{cluster_wide:?}");

    // The controller's own token: Secrets of the watched namespace yes, any other no.
    let token = real::client_from(&real::sa_kubeconfig(&lab.state.state_dir, "controller"))
        .await
        .expect("the controller's kubeconfig");
    let watched: Api<Secret> = Api::namespaced(token.clone(), WATCHED);
    watched
        .get("ns-pw")
        .await
        .expect("the controller reads a Secret of the watched namespace");
    let elsewhere: Api<Secret> = Api::namespaced(token.clone(), &outside);
    let everywhere: Api<Secret> = Api::all(token);
    let refusals = [
        ("get", elsewhere.get("pw").await.map(|_| ())),
        (
            "list",
            elsewhere.list(&Default::default()).await.map(|_| ()),
        ),
        (
            "list cluster-wide",
            everywhere.list(&Default::default()).await.map(|_| ()),
        ),
    ];
    for (what, result) in refusals {
        match result {
            Err(kube::Error::Api(s)) if s.code == 403 => {
                eprintln!("{what}: {}", s.message);
                assert!(s.message.contains("resource \"secrets\""), "{}", s.message);
            }
            other => panic!("{what} Secrets outside the watched namespace: {other:?}"),
        }
    }
    let refused = audit()
        .into_iter()
        .filter(|a| a.user == controller && a.resource == "secrets" && a.rbac_denied())
        .count();
    assert_eq!(
        refused, 3,
        "the API server's audit log shows the three 403s"
    );
}
