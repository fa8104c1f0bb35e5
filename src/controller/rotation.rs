//! Scheduled rotation of generated passwords (`spec.rotation`): which interval the present
//! falls in. Each interval is one run: its index is part of the run's input hash, so a new
//! interval starts a new run with new passwords, and intervals missed while the controller
//! was down come to one run (only the present one counts), never one per missed interval.
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use std::time::Duration;

/// The interval `now` falls in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// How many intervals have passed since the object was created.
    pub index: u64,
    /// When this interval began.
    pub last: Timestamp,
    /// When the next one begins.
    pub next: Timestamp,
}

/// The interval of `now`, for intervals of `every` counted from `created`.
pub fn slot(created: Timestamp, every: Duration, now: Timestamp) -> Slot {
    let every_ns = every.as_nanos().max(1);
    let since = now.duration_since(created);
    let elapsed_ns = u128::try_from(since.as_nanos()).unwrap_or(0);
    let index = (elapsed_ns / every_ns) as u64;
    let at = |n: u64| {
        let offset = SignedDuration::from_nanos(
            i64::try_from(every_ns.saturating_mul(u128::from(n))).unwrap_or(i64::MAX),
        );
        created.checked_add(offset).unwrap_or(Timestamp::MAX)
    };
    Slot {
        index,
        last: at(index),
        next: at(index + 1),
    }
}

/// A Go duration (`720h`, `1h30m`, `10s`, `1.5h`): what the CRD's CEL rule `duration()`
/// accepts, so the controller reads the same value the API server checked. Hand-written:
/// the time crates at hand (jiff, humantime) each read a different dialect.
pub fn parse_every(text: &str) -> Result<Duration, String> {
    let bad = || format!("rotation.every {text:?} is not a duration such as 720h, 30m or 10s");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad()),
        };
        total += value * seconds;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).expect("time")
    }

    #[test]
    fn the_first_interval_starts_at_creation() {
        let s = slot(at(0), Duration::from_secs(60), at(59));
        assert_eq!((s.index, s.last, s.next), (0, at(0), at(60)));
    }

    #[test]
    fn a_new_interval_begins_every_period() {
        let s = slot(at(0), Duration::from_secs(60), at(60));
        assert_eq!((s.index, s.last, s.next), (1, at(60), at(120)));
    }

    #[test]
    fn intervals_missed_while_down_come_to_one_the_present() {
        // Down from 70 s to 250 s: intervals 2 and 3 passed unseen; only 4 runs.
        let before = slot(at(0), Duration::from_secs(60), at(70));
        let after = slot(at(0), Duration::from_secs(60), at(250));
        assert_eq!(before.index, 1);
        assert_eq!(after.index, 4);
        assert_eq!(after.last, at(240));
    }

    #[test]
    fn a_clock_before_creation_is_the_first_interval() {
        assert_eq!(slot(at(100), Duration::from_secs(60), at(0)).index, 0);
    }

    #[test]
    fn go_durations_are_read_as_the_api_server_checked_them() {
        for (text, secs) in [
            ("10s", 10.0),
            ("720h", 2_592_000.0),
            ("1h30m", 5_400.0),
            ("1.5h", 5_400.0),
            ("90m", 5_400.0),
            ("1500ms", 1.5),
        ] {
            assert_eq!(parse_every(text).expect(text).as_secs_f64(), secs, "{text}");
        }
    }

    #[test]
    fn what_is_not_a_go_duration_is_refused() {
        for text in ["", "10", "h", "10d", "1h30", "-5s", "ten s"] {
            assert!(parse_every(text).is_err(), "{text:?}");
        }
    }
}
