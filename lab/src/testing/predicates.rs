//! The questions tests ask of an object's status, for both kinds.
use guestcred::api::{
    GuestPasswordReset, KeypairRebuild, Phase, RunStatus, TargetState, TargetStatus,
};

/// Either kind, seen through its run status.
pub trait HasRun {
    fn run(&self) -> Option<&RunStatus>;
}

impl HasRun for GuestPasswordReset {
    fn run(&self) -> Option<&RunStatus> {
        self.status.as_ref().map(|s| &s.run)
    }
}

impl HasRun for KeypairRebuild {
    fn run(&self) -> Option<&RunStatus> {
        self.status.as_ref().map(|s| &s.run)
    }
}

/// The run reached a terminal phase (Succeeded, Failed or PartiallySucceeded).
pub fn finished<K: HasRun>(o: &K) -> bool {
    o.run().is_some_and(|s| {
        matches!(
            s.phase,
            Some(Phase::Succeeded | Phase::Failed | Phase::PartiallySucceeded)
        )
    })
}

pub fn phase<K: HasRun>(o: &K) -> Option<Phase> {
    o.run().and_then(|s| s.phase)
}

/// The first target's status, if the run has targets.
pub fn target0<K: HasRun>(o: &K) -> Option<&TargetStatus> {
    o.run().and_then(|s| s.targets.first())
}

/// The first target's reason.
pub fn reason<K: HasRun>(o: &K) -> Option<String> {
    target0(o).and_then(|t| t.reason.clone())
}

/// The first target's message ("" when there is none).
pub fn message<K: HasRun>(o: &K) -> String {
    target0(o)
        .and_then(|t| t.message.clone())
        .unwrap_or_default()
}

/// The first target's reason is `want`.
pub fn target_reason<K: HasRun>(want: &'static str) -> impl Fn(&K) -> bool {
    move |o| reason(o).as_deref() == Some(want)
}

/// The first target's reason is `want` and it is not done yet (it is being retried).
pub fn retrying_with<K: HasRun>(want: &'static str) -> impl Fn(&K) -> bool {
    move |o| target0(o).is_some_and(|t| t.reason.as_deref() == Some(want) && !t.state.is_terminal())
}

/// The object is Stalled (condition True) with `want` as the reason.
pub fn stalled_with<K: HasRun>(want: &'static str) -> impl Fn(&K) -> bool {
    move |o| {
        o.run().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Stalled" && c.status == "True" && c.reason == want)
        })
    }
}

/// Some condition has `want` as its reason.
pub fn condition_reason<K: HasRun>(want: &'static str) -> impl Fn(&K) -> bool {
    move |o| {
        o.run()
            .is_some_and(|s| s.conditions.iter().any(|c| c.reason == want))
    }
}

/// At least `n` targets succeeded.
pub fn succeeded_at_least<K: HasRun>(n: usize) -> impl Fn(&K) -> bool {
    move |o| o.run().is_some_and(|s| s.summary.succeeded as usize >= n)
}

/// The names of the VMs whose targets are in `state`.
pub fn vms_in_state<K: HasRun>(o: &K, state: TargetState) -> Vec<String> {
    o.run()
        .map(|s| {
            s.targets
                .iter()
                .filter(|t| t.state == state)
                .map(|t| t.vm.clone())
                .collect()
        })
        .unwrap_or_default()
}
