//! How the object looks to an agent call about to start: shared by the scheduler (before a
//! new target) and a target's retry loop (before each attempt).
use super::RunKind;
use super::decide::{self, Latest, Stop};
use crate::controller::context::Context;
use kube::ResourceExt;
use std::sync::Arc;

/// The object as an agent call about to start sees it: its latest cached copy, whether
/// this replica leads, whether the input Secret moved on from the run's version.
pub(super) struct Observed<K> {
    latest: Option<Arc<K>>,
    leading: bool,
    input_changed: bool,
    started_generation: Option<i64>,
}

impl<K: RunKind> Observed<K> {
    /// `run_secret_version`: the input Secret's resourceVersion the run read (None for
    /// inputs not read from a Secret). A Secret missing from the cache (not synced, or
    /// not listable) counts as unchanged: only a newer version seen stops the run.
    pub(super) async fn now(obj: &K, ctx: &Context, run_secret_version: Option<&str>) -> Self {
        let ns = obj.namespace().unwrap_or_default();
        let input_changed = obj.input_secret().is_some_and(|s| {
            ctx.secret_version(&ns, &s.name)
                .is_some_and(|seen| Some(seen.as_str()) != run_secret_version)
        });
        Self {
            latest: obj.latest(ctx),
            leading: ctx.leadership.is_leading().await,
            input_changed,
            started_generation: obj.meta().generation,
        }
    }

    pub(super) fn view(&self) -> Option<Latest<'_>> {
        self.latest.as_ref().map(|l| Latest {
            deleting: l.meta().deletion_timestamp.is_some(),
            spec_changed: l.meta().generation > self.started_generation,
            input_changed: self.input_changed,
            leading: self.leading,
            rollout: l.rollout(),
        })
    }

    pub(super) fn halt(&self) -> Option<Stop> {
        decide::halt(self.view().as_ref())
    }
}
