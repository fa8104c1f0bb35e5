//! Standard conditions (Ready, Progressing, Stalled) whose lastTransitionTime moves only
//! when the status flips, so `kubectl wait` and GitOps health checks see stable history.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const STALLED: &str = "Stalled";

/// Set (or add) condition `type_`. Keeps the old lastTransitionTime when the status is
/// unchanged; reason, message and observedGeneration are always refreshed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: &Time,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now.clone();
            }
            c.status = status;
            c.reason = reason.to_string();
            c.message = message;
            c.observed_generation = observed_generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message,
            observed_generation,
            last_transition_time: now.clone(),
        }),
    }
}

/// The three standard conditions of a run, all with one reason and message.
#[derive(Clone, Copy, Debug)]
pub struct RunConditions {
    pub ready: bool,
    pub progressing: bool,
    pub stalled: bool,
}

/// Set Ready, Progressing and Stalled together (see [`set_condition`]).
pub fn set_run_conditions(
    conditions: &mut Vec<Condition>,
    state: RunConditions,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: &Time,
) {
    for (type_, status) in [
        (READY, state.ready),
        (PROGRESSING, state.progressing),
        (STALLED, state.stalled),
    ] {
        set_condition(
            conditions,
            type_,
            status,
            reason,
            message,
            observed_generation,
            now,
        );
    }
}

/// True when condition `type_` is present with status "True".
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid time"))
    }

    /// Ready set at 100 s, then again at 200 s, each time to (status, reason, message).
    fn ready_set_twice(first: (bool, &str, &str), then: (bool, &str, &str)) -> Vec<Condition> {
        let mut c = Vec::new();
        for ((status, reason, message), secs) in [(first, 100), (then, 200)] {
            set_condition(&mut c, READY, status, reason, message, Some(1), &at(secs));
        }
        c
    }

    #[test]
    fn transition_time_is_kept_while_status_is_unchanged() {
        let c = ready_set_twice((false, "InProgress", "1/2"), (false, "InProgress", "2/2"));
        assert_eq!(c[0].last_transition_time, at(100));
        assert_eq!(c[0].message, "2/2");
    }

    #[test]
    fn transition_time_moves_when_status_flips() {
        let c = ready_set_twice((false, "InProgress", ""), (true, "Succeeded", ""));
        assert_eq!(c[0].last_transition_time, at(200));
        assert!(is_true(&c, READY));
    }
}
