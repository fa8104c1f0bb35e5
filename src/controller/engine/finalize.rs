//! Kinds whose deletion undoes something (KeypairRebuild: the keys it added) carry a
//! finalizer, added and removed with kube-runtime's finalizer helper (as kube-rs
//! controller-rs does): the first reconcile adds it; once the object is being deleted,
//! the kind's `RunKind::cleanup` runs and the finalizer goes when it is done. A kind
//! without one (GuestPasswordReset) is reconciled as before.
use super::{RunKind, run};
use crate::controller::context::Context;
use crate::controller::error::Error;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Error as FinalizerError, Event, finalizer};
use kube::{Api, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

/// What a kind's cleanup came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cleanup {
    /// Nothing left to do (or given up on, reported): the finalizer goes.
    Done,
    /// Something may still be undone (e.g. a VM is unreachable for now): look again then.
    RetryAfter(Duration),
}

/// One step under the finalizer helper, which removes the finalizer only when the cleanup
/// returns Ok: a cleanup that waits is an "error" to it, and a requeue to us.
#[derive(Debug, thiserror::Error)]
enum Step {
    #[error(transparent)]
    Failed(Error),
    #[error("cleanup not finished; looking again in {0:?}")]
    Wait(Duration),
}

/// Reconcile an object of a kind with a finalizer through the helper; others directly.
pub(super) async fn reconcile<K: RunKind>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    let Some(name) = K::finalizer() else {
        return run(obj, ctx).await;
    };
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let result = finalizer(&api, name, obj, move |event| async move {
        match event {
            Event::Apply(obj) => run(obj, ctx).await.map_err(Step::Failed),
            Event::Cleanup(obj) => match obj.cleanup(&ctx).await.map_err(Step::Failed)? {
                Cleanup::Done => Ok(Action::await_change()),
                Cleanup::RetryAfter(wait) => Err(Step::Wait(wait)),
            },
        }
    })
    .await;
    match result {
        Ok(action) => Ok(action),
        Err(FinalizerError::ApplyFailed(step) | FinalizerError::CleanupFailed(step)) => {
            match step {
                Step::Failed(e) => Err(e),
                Step::Wait(wait) => Ok(Action::requeue(wait)),
            }
        }
        Err(FinalizerError::AddFinalizer(e) | FinalizerError::RemoveFinalizer(e)) => {
            Err(Error::Kube(e))
        }
        Err(e @ (FinalizerError::UnnamedObject | FinalizerError::InvalidFinalizer)) => {
            Err(Error::InvalidSpec(format!("finalizer {name}: {e}")))
        }
    }
}
