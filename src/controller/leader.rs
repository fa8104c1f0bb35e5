//! Leader election through a coordination.k8s.io Lease (kube-lease-manager), so that of
//! several controller replicas only one reconciles. A replica that loses the lease stops
//! its controllers and exits; its Deployment restarts it as a follower.
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    /// Unique per replica (the pod name in a cluster).
    pub identity: String,
    /// Seconds a lease stays valid after its last renewal.
    pub duration_seconds: u64,
    /// Renew this many seconds before the lease would expire.
    pub grace_seconds: u64,
}

/// Whether this replica may start agent calls: checked before each one, so a replica that
/// was frozen (SIGSTOP, a long GC pause, a partition) past its lease never acts on return,
/// even before its elector notices.
#[derive(Clone, Debug, Default)]
pub enum Leadership {
    /// No leader election: the only replica always leads.
    #[default]
    Always,
    Lease(Arc<LeaseGuard>),
}

impl Leadership {
    pub async fn is_leading(&self) -> bool {
        match self {
            Self::Always => true,
            Self::Lease(guard) => guard.is_leading().await,
        }
    }
}

/// Confirms leadership by reading the Lease: it names this replica and its last renewal
/// is still valid by more than a margin. A confirmation is trusted for at most a third of
/// the lease duration and never past that renewal's validity (less the margin), measured
/// on the monotonic clock, which keeps running while the process is stopped: a replica
/// resumed after its lease ran out reads the Lease again before any call, and another
/// replica can take the lease only after it expired, when this one already stopped
/// trusting it. Once another replica (or nobody) holds the Lease, leadership is not
/// regained (the process exits and restarts as a follower). A Lease that still names this
/// replica but whose renewal is too close to running out is "not now": no call starts, and
/// the next check may confirm it again once the elector has renewed it (a latch there
/// would leave a replica that keeps renewing its Lease unable to act, and no other able
/// to take over).
#[derive(Debug)]
pub struct LeaseGuard {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// Until when the last confirmation is trusted.
    trusted_until: Mutex<Option<Instant>>,
    lost: AtomicBool,
}

/// A renewal must still be valid this long for an agent call to start on it.
const LEASE_MARGIN: Duration = Duration::from_secs(1);

impl LeaseGuard {
    pub fn new(client: Client, settings: &LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            name: settings.name.clone(),
            identity: settings.identity.clone(),
            duration: Duration::from_secs(settings.duration_seconds),
            trusted_until: Mutex::new(None),
            lost: AtomicBool::new(false),
        }
    }

    pub async fn is_leading(&self) -> bool {
        if self.lost.load(Ordering::SeqCst) {
            return false;
        }
        let fresh = self
            .trusted_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| Instant::now() < until);
        if fresh {
            return true;
        }
        let lease = match self.api.get_opt(&self.name).await {
            Ok(lease) => lease,
            Err(e) => {
                // Cannot confirm: start nothing now (a later call may confirm).
                warn!(lease = %self.name, error = %e, "cannot read the leader Lease; starting no agent call");
                return false;
            }
        };
        let spec = lease.and_then(|l| l.spec);
        let holder = spec.as_ref().and_then(|s| s.holder_identity.as_deref());
        let valid_until = spec.as_ref().and_then(|s| {
            let renewed = s.renew_time.as_ref()?.0;
            let seconds = s.lease_duration_seconds.unwrap_or_default();
            Some(renewed + Duration::from_secs(u64::try_from(seconds).unwrap_or_default()))
        });
        let left = valid_until
            .map(|until| crate::controller::engine::decide::remaining(until, Timestamp::now()));
        match verdict(holder, &self.identity, left, self.duration) {
            Verdict::Leading { trust } => {
                *self.trusted_until.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(Instant::now() + trust);
                true
            }
            Verdict::NotNow => {
                warn!(lease = %self.name, identity = %self.identity, "the leader Lease's renewal is about to run out; starting no agent call until it is renewed");
                false
            }
            Verdict::Lost => {
                warn!(lease = %self.name, identity = %self.identity, holder = ?holder, "no longer the leader; starting no agent call");
                self.lost.store(true, Ordering::SeqCst);
                false
            }
        }
    }
}

/// What a read of the Lease says about this replica's leadership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It names this replica and is valid for more than the margin: trusted this long.
    Leading { trust: Duration },
    /// It names this replica, but its renewal is valid for the margin or less (or its
    /// times are missing): not now, perhaps again after the next renewal.
    NotNow,
    /// Another replica, or nobody, holds it.
    Lost,
}

/// The verdict on a Lease held by `holder` whose last renewal is valid for `left` more,
/// for replica `me` with lease duration `duration`.
pub fn verdict(
    holder: Option<&str>,
    me: &str,
    left: Option<Duration>,
    duration: Duration,
) -> Verdict {
    if holder != Some(me) {
        return Verdict::Lost;
    }
    match left.filter(|left| *left > LEASE_MARGIN) {
        Some(left) => Verdict::Leading {
            trust: (duration / 3).min(left - LEASE_MARGIN),
        },
        None => Verdict::NotNow,
    }
}

/// Wait until this replica holds the lease. Returns a future that resolves when the lease
/// is lost (or the elector stops), the elector's task, and the guard checked before each
/// agent call.
pub async fn acquire(
    client: Client,
    settings: &LeaseSettings,
) -> anyhow::Result<(
    impl Future<Output = ()> + Send + Sync + 'static,
    tokio::task::JoinHandle<()>,
    Leadership,
)> {
    let manager = LeaseManagerBuilder::new(client.clone(), &settings.name)
        .with_namespace(&settings.namespace)
        .with_identity(&settings.identity)
        .with_duration(settings.duration_seconds)
        .with_grace(settings.grace_seconds)
        .build()
        .await?;
    let (mut rx, task) = manager.watch().await;
    info!(lease = %settings.name, identity = %settings.identity, "waiting for leadership");
    rx.wait_for(|leader| *leader).await?;
    info!(lease = %settings.name, identity = %settings.identity, "became leader");
    let guard = Leadership::Lease(Arc::new(LeaseGuard::new(client, settings)));
    let elector = tokio::spawn(async move {
        let _ = task.await;
    });
    Ok((lost(rx), elector, guard))
}

async fn lost(mut rx: watch::Receiver<bool>) {
    // A closed channel (the elector died) counts as lost: never reconcile unguarded.
    let _ = rx.wait_for(|leader| !*leader).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(15);

    #[test]
    fn a_lease_naming_this_replica_with_time_left_is_trusted_for_a_third_at_most() {
        assert_eq!(
            verdict(Some("me"), "me", Some(Duration::from_secs(14)), LEASE),
            Verdict::Leading {
                trust: Duration::from_secs(5)
            }
        );
        assert_eq!(
            verdict(Some("me"), "me", Some(Duration::from_secs(3)), LEASE),
            Verdict::Leading {
                trust: Duration::from_secs(2)
            },
            "never past the renewal's validity less the margin"
        );
    }

    #[test]
    fn a_lease_of_this_replica_about_to_run_out_is_not_now_not_lost() {
        for left in [None, Some(Duration::ZERO), Some(LEASE_MARGIN)] {
            assert_eq!(verdict(Some("me"), "me", left, LEASE), Verdict::NotNow);
        }
    }

    #[test]
    fn a_lease_held_by_another_replica_or_nobody_is_lost() {
        let left = Some(Duration::from_secs(10));
        assert_eq!(verdict(Some("other"), "me", left, LEASE), Verdict::Lost);
        assert_eq!(verdict(None, "me", left, LEASE), Verdict::Lost);
    }
}
