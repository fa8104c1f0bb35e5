//! Prometheus metrics of the shim and the controller, read from their `/metrics`
//! endpoints after real calls (host-run qemu-ga agents, the lab world for the controller).
//! The label sets are closed: no VM, user, namespace or secret may ever show up.
//!
//! Needs root, `unshare`, overlayfs and qemu-ga (scripts/install-deps.sh). Without them
//! these tests fail with the reason; they never skip.

use std::sync::Arc;
use std::time::Duration;

use guestcred::api::wire::{DomainRef, SetPasswordRequest, ShimErrorReason};
use guestcred::api::{GuestPasswordReset, Phase};
use guestcred::controller::shim_client::{ShimApi, ShimCallError, ShimClient};
use guestcred::shim::qga::QgaSocketAgent;
use guestcred::shim::server::ShimApp;
use guestcred_lab::hostqga::{HostQga, HostQgaOptions};
use guestcred_lab::testing::{
    ResetTest, Steps, TargetedTest, TestObject, phase, serve_on_loopback, world_with_guest,
};
use guestcred_lab::world::{World, WorldOptions};
use secrecy::SecretString;

const SHA512: &str = "$6$gcMetricSalt$3CPr/vQb45sQFdvBm/TEkSym19vMe3VQweVAyOduj31BA4Mp6vxpjoDjssqBvU55c8jQk5a25w4TVseP2qvxD0";
const PLAIN: &str = "plain-Zebra-secret-9";
const VM: &str = "vm-metrics-zebra";
const USER: &str = "alice";
const NS: &str = "default";
const WAIT: Duration = Duration::from_secs(30);

async fn get(url: &str) -> (u16, String, String) {
    let r = reqwest::get(url).await.expect("GET");
    let status = r.status().as_u16();
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, content_type, r.text().await.expect("body"))
}

/// The value of the sample line that starts with `series` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

fn assert_no_private_data(text: &str) {
    for private in [VM, USER, SHA512, "gcMetricSalt", PLAIN, NS] {
        assert!(
            !text.contains(private),
            "{private:?} leaked into metrics:\n{text}"
        );
    }
}

fn password(user: &str, node: Option<&str>) -> SetPasswordRequest {
    let mut domain = DomainRef::new("lab", VM);
    if let Some(n) = node {
        domain = domain.with_node(n);
    }
    SetPasswordRequest {
        domain,
        user: user.into(),
        password: SecretString::from(SHA512),
        crypted: true,
    }
}

#[tokio::test]
async fn shim_metrics_count_calls_by_operation_and_result_and_refusals_by_reason() {
    let dir = tempfile::Builder::new().prefix("gcm").tempdir().unwrap();
    let _vm = HostQga::start_with(dir.path(), VM, &HostQgaOptions::default().user(USER))
        .unwrap_or_else(|e| {
            panic!("lab qemu-ga must start (needs root, unshare, overlayfs, qemu-ga): {e}")
        });
    let template = format!("{}/{{name}}/qga.sock", dir.path().display());
    let agent = Arc::new(QgaSocketAgent::new(template, Duration::from_secs(5)));
    let app = ShimApp::new(agent, "node-1").backend("qga-socket");
    let api = serve_on_loopback(app.router_without_auth_for_test_worlds()).await;
    let ops = serve_on_loopback(app.ops_router()).await;
    let client = ShimClient::new(&api, None, WAIT).unwrap();

    assert!(
        client
            .probe(&DomainRef::new("lab", VM).with_node("node-1"))
            .await
            .unwrap()
            .agent_connected
    );
    client
        .set_password(&password(USER, Some("node-1")))
        .await
        .unwrap();
    let mut unknown_user = password("bob", Some("node-1"));
    unknown_user.password = SecretString::from(PLAIN);
    unknown_user.crypted = false;
    match client.set_password(&unknown_user).await {
        Err(ShimCallError::Shim(e)) => assert_eq!(e.reason, ShimErrorReason::UserNotFound),
        other => panic!("expected UserNotFound, got {other:?}"),
    }
    match client.set_password(&password(USER, Some("node-2"))).await {
        Err(ShimCallError::Shim(e)) => assert_eq!(e.reason, ShimErrorReason::Forbidden),
        other => panic!("expected Forbidden, got {other:?}"),
    }
    match client.set_password(&password(USER, None)).await {
        Err(ShimCallError::Shim(e)) => assert_eq!(e.reason, ShimErrorReason::Forbidden),
        other => panic!("expected Forbidden, got {other:?}"),
    }

    let (status, content_type, text) = get(&format!("{ops}/metrics")).await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let calls = |op: &str, result: &str| {
        sample(
            &text,
            &format!(
                r#"guestcred_shim_agent_calls_total{{operation="{op}",backend="qga-socket",result="{result}"}}"#
            ),
        )
    };
    assert_eq!(calls("probe", "ok"), Some(1.0), "{text}");
    assert_eq!(calls("set-password", "ok"), Some(1.0), "{text}");
    assert_eq!(calls("set-password", "UserNotFound"), Some(1.0), "{text}");
    assert_eq!(
        sample(
            &text,
            r#"guestcred_shim_agent_call_duration_seconds_count{operation="set-password",backend="qga-socket"}"#
        ),
        Some(2.0),
        "{text}"
    );
    let total = sample(
        &text,
        r#"guestcred_shim_agent_call_duration_seconds_sum{operation="set-password",backend="qga-socket"}"#,
    )
    .expect("duration sum");
    assert!(total > 0.0 && total < 60.0, "{total}");
    assert_eq!(
        sample(&text, "guestcred_shim_in_flight_calls"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"guestcred_shim_requests_refused_total{reason="wrong_node"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"guestcred_shim_requests_refused_total{reason="missing_node"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_no_private_data(&text);

    assert_eq!(get(&format!("{ops}/healthz")).await.0, 200);
    assert_eq!(get(&format!("{ops}/readyz")).await.0, 200);
}

#[tokio::test]
async fn controller_metrics_count_reconciles_and_targets_and_report_ready() {
    // The guest has user alice (USER).
    let (w, _qga) = world_with_guest(VM).await;
    w.password_secret("pw-metrics", SHA512).await;
    let reset = GuestPasswordReset::test("reset-metrics")
        .vm(VM)
        .user(USER)
        .from_secret("pw-metrics")
        .crypted();
    let r = w
        .apply_until(&reset, |r| phase(r) == Some(Phase::Succeeded))
        .await;
    assert!(r.status.is_some());

    let ops = serve_on_loopback(guestcred::runtime::admin::controller_router(
        w.metrics.clone(),
    ))
    .await;
    let (status, content_type, text) = get(&format!("{ops}/metrics")).await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let ok_reconciles = sample(
        &text,
        r#"guestcred_reconciles_total{kind="GuestPasswordReset",result="ok"}"#,
    )
    .unwrap_or(0.0);
    assert!(ok_reconciles >= 1.0, "{text}");
    assert_eq!(
        sample(
            &text,
            r#"guestcred_targets_total{kind="GuestPasswordReset",result="succeeded",reason="Applied"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"guestcred_targets_in_flight{kind="GuestPasswordReset"}"#
        ),
        Some(0.0),
        "{text}"
    );
    let runs = sample(
        &text,
        r#"guestcred_run_duration_seconds_count{kind="GuestPasswordReset"}"#,
    )
    .unwrap_or(0.0);
    assert!(runs >= 1.0, "{text}");
    assert_no_private_data(&text);

    assert_eq!(get(&format!("{ops}/healthz")).await.0, 200);
    assert_eq!(
        get(&format!("{ops}/readyz")).await.0,
        200,
        "caches synced by now"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `guestcred controller` as a process against the API-server emulator: `/readyz` turns
/// 200 on the health port once its caches synced, and `/metrics` starts with zeros.
#[tokio::test]
async fn controller_binary_serves_metrics_and_readiness_on_its_ports() {
    // The emulator served with the CRDs; the controller is the process under test.
    let w = World::start(WorldOptions {
        nodes: 0,
        serve: true,
        start_controller: false,
        ..WorldOptions::default()
    })
    .await
    .expect("the served emulator starts");
    let (metrics_port, health_port) = (free_port(), free_port());

    // The controller calls shims over mutual TLS only: it needs its files to start.
    let tls_dir = tempfile::tempdir().expect("tempdir");
    let tls = guestcred_lab::cluster::tls::LabTls::new(tls_dir.path());
    tls.mint().expect("mint the lab certificates");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_guestcred"))
        .arg("controller")
        .args(["--shim-namespace", guestcred_lab::world::SHIM_NAMESPACE])
        .args(tls.controller().controller_flags())
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .args(["--health-listen", &format!("127.0.0.1:{health_port}")])
        .env("KUBECONFIG", w.kubeconfig())
        .env_remove("GUESTCRED_METRICS_LISTEN")
        .env_remove("GUESTCRED_HEALTH_LISTEN")
        .env_remove("GUESTCRED_LEADER_ELECTION")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn guestcred controller");

    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let ready = reqwest::get(format!("http://127.0.0.1:{health_port}/readyz")).await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the controller never became ready"
        );
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the controller exited: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _, text) = get(&format!("http://127.0.0.1:{metrics_port}/metrics")).await;
    assert_eq!(status, 200);
    // Families with fixed label sets start at zero; the others appear with the first run.
    for series in [
        r#"guestcred_reconciles_total{kind="GuestPasswordReset",result="ok"} 0"#,
        r#"guestcred_reconciles_total{kind="KeypairRebuild",result="error"} 0"#,
        r#"guestcred_targets_in_flight{kind="KeypairRebuild"} 0"#,
    ] {
        assert!(text.contains(series), "{series} missing:\n{text}");
    }
    child.kill().await.expect("stop the controller");
}
