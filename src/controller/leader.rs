//! Leader election through a coordination.k8s.io Lease (kube-lease-manager), so that of
//! several controller replicas only one reconciles. A replica that loses the lease stops
//! its controllers and exits; its Deployment restarts it as a follower.
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use std::future::Future;
use tokio::sync::watch;
use tracing::info;

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

/// Wait until this replica holds the lease. Returns a future that resolves when the lease
/// is lost (or the elector stops), and the elector's task.
pub async fn acquire(
    client: Client,
    settings: &LeaseSettings,
) -> anyhow::Result<(
    impl Future<Output = ()> + Send + Sync + 'static,
    tokio::task::JoinHandle<()>,
)> {
    let manager = LeaseManagerBuilder::new(client, &settings.name)
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
    let elector = tokio::spawn(async move {
        let _ = task.await;
    });
    Ok((lost(rx), elector))
}

async fn lost(mut rx: watch::Receiver<bool>) {
    // A closed channel (the elector died) counts as lost: never reconcile unguarded.
    let _ = rx.wait_for(|leader| !*leader).await;
}
