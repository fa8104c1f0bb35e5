//! `kubectl guestcred rotate`: a new generated password for every VM of a reset, now.
use crate::cli::{Global, Rotate};
use crate::follow::{self, conclude};
use crate::util::{Call, RESETS, connect, exit, fail, merge_patch};
use guestcred_api::GuestPasswordReset;
use kube::Api;
use serde_json::json;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The annotation the controller reads (src/controller/password.rs `ROTATE_NOW`): any new
/// value starts a rotation.
pub const ROTATE_NOW: &str = "guestcred.io/rotate-now";

/// A value not used before on this object: the time in nanoseconds.
fn token() -> String {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .to_string()
}

pub async fn rotate(g: &Global, a: Rotate) -> anyhow::Result<()> {
    let (client, ns) = connect(g).await?;
    let resets: Api<GuestPasswordReset> = Api::namespaced(client, &ns);
    let call = Call {
        verb: "get",
        resource: RESETS,
        namespace: &ns,
    };
    let reset = resets.get(&a.reset).await.map_err(|e| call.error(e))?;
    if reset.spec.password.generate.is_none() {
        return Err(fail(
            exit::FAILED,
            format!(
                "{} does not generate passwords (its password comes from a Secret you provided): \
                 change that Secret's value to set a new one",
                a.reset
            ),
        ));
    }
    let before = reset.status.as_ref().and_then(|s| s.run.input_hash.clone());
    let token = token();
    let patch = json!({"metadata": {"annotations": {ROTATE_NOW: token}}});
    merge_patch(&resets, &a.reset, patch, call).await?;
    eprintln!(
        "guestpasswordreset/{} rotation requested ({ROTATE_NOW}={token})",
        a.reset
    );
    if !a.follow.enabled() {
        return Ok(());
    }
    // The annotation does not change the generation: the new run is the one whose input
    // differs from the one before.
    let start = Instant::now();
    loop {
        let now = resets.get(&a.reset).await.map_err(|e| call.error(e))?;
        let hash = now.status.as_ref().and_then(|s| s.run.input_hash.clone());
        if hash.is_some() && hash != before {
            break;
        }
        if start.elapsed() >= a.follow.timeout {
            return Err(fail(
                exit::TIMEOUT,
                format!(
                    "the controller did not start the rotation of {} within {:?}; is it running?",
                    a.reset, a.follow.timeout
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let left = a.follow.timeout.saturating_sub(start.elapsed());
    let outcome = follow::follow(&resets, &ns, &a.reset, left).await?;
    let result = conclude::<GuestPasswordReset>(&a.reset, outcome);
    if result.is_ok() {
        eprintln!(
            "To see the new password: kubectl guestcred show-password {}",
            a.reset
        );
    }
    result
}
