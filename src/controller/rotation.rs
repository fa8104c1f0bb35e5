//! Scheduled rotation of generated passwords (`spec.rotation`): which interval the present
//! falls in. Each interval is one run: its index is part of the run's input hash, so a new
//! interval starts a new run with new passwords, and intervals missed while the controller
//! was down come to one run (only the present one counts), never one per missed interval.
//!
//! Two kinds of interval: `every` (a fixed period counted from the object's creation) and
//! `schedule` (a cron schedule in a time zone; an interval runs from one time it names to
//! the next, and the one before its first time begins at creation).
use crate::api::password::RotationPolicy;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use jiff::tz::TimeZone;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use std::time::Duration;

/// The shortest `every` (the CRD's CEL rule says the same).
pub const MIN_EVERY: Duration = Duration::from_secs(10);

/// A rotation policy, read and checked.
#[derive(Clone, Debug)]
pub enum Schedule {
    /// A fixed period from creation.
    Every(Duration),
    /// The times a cron schedule names, in a time zone.
    Cron(Box<Cron>, TimeZone),
}

impl Schedule {
    /// Read `spec.rotation`; the error is the message of an `InvalidSpec`.
    pub fn parse(policy: &RotationPolicy) -> Result<Self, String> {
        match (&policy.every, &policy.schedule) {
            (Some(every), None) => {
                let every_d = parse_every(every)?;
                if every_d < MIN_EVERY {
                    return Err(format!(
                        "rotation.every must be at least 10s, got {every:?}"
                    ));
                }
                Ok(Self::Every(every_d))
            }
            (None, Some(schedule)) => {
                let zone = match policy.time_zone.as_deref() {
                    None => TimeZone::UTC,
                    Some(name) => TimeZone::get(name).map_err(|_| {
                        format!("rotation.timeZone {name:?} is not an IANA time zone such as Europe/Berlin")
                    })?,
                };
                Ok(Self::Cron(Box::new(parse_schedule(schedule)?), zone))
            }
            _ => Err("set exactly one of rotation.every and rotation.schedule".into()),
        }
    }

    /// The interval `now` falls in, for an object created at `created`.
    pub fn slot(&self, created: Timestamp, now: Timestamp) -> Slot {
        match self {
            Self::Every(every) => slot(created, *every, now),
            Self::Cron(cron, zone) => cron_slot(cron, zone, created, now),
        }
    }
}

/// A cron schedule as a CronJob's `schedule` reads: five fields (no seconds, no year) or a
/// macro (`@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`), and one that names at
/// least one time (`0 0 31 2 *` never comes).
pub fn parse_schedule(text: &str) -> Result<Cron, String> {
    let bad = |why: String| {
        format!(
            "rotation.schedule {text:?} is not a cron schedule of five fields such as \"0 3 * * 0\" or @daily: {why}"
        )
    };
    if text.to_ascii_uppercase().contains("TZ=") {
        return Err(bad("set the time zone in rotation.timeZone".into()));
    }
    let cron = CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(text)
        .map_err(|e| bad(e.to_string()))?;
    let probe = jiff::Timestamp::UNIX_EPOCH.to_zoned(TimeZone::UTC);
    cron.find_next_occurrence(&probe, false)
        .map_err(|_| bad("it names no time that ever comes".into()))?;
    Ok(cron)
}

/// The interval of `now` under a cron schedule: it began at the latest time the schedule
/// named (not before creation) and ends at the next. Its index is that time in seconds
/// since the epoch (0 before the first), so each named time is a new input.
fn cron_slot(cron: &Cron, zone: &TimeZone, created: Timestamp, now: Timestamp) -> Slot {
    let here = now.to_zoned(zone.clone());
    let previous = cron
        .find_previous_occurrence(&here, true)
        .ok()
        .map(|z| z.timestamp())
        .filter(|t| *t > created);
    let next = cron
        .find_next_occurrence(&here, false)
        .map_or(Timestamp::MAX, |z| z.timestamp());
    match previous {
        Some(last) => Slot {
            index: u64::try_from(last.as_second()).unwrap_or(0),
            last,
            next,
        },
        None => Slot {
            index: 0,
            last: created.min(now),
            next,
        },
    }
}

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

    fn utc(text: &str) -> Timestamp {
        text.parse().expect("timestamp")
    }

    fn cron(schedule: &str, zone: Option<&str>) -> Schedule {
        Schedule::parse(&RotationPolicy {
            every: None,
            schedule: Some(schedule.into()),
            time_zone: zone.map(Into::into),
            keep_previous: 1,
        })
        .expect(schedule)
    }

    #[test]
    fn before_a_schedules_first_time_the_interval_began_at_creation() {
        let weekly = cron("0 3 * * 0", None); // Sundays 03:00 UTC
        let created = utc("2026-12-01T10:00:00Z"); // a Tuesday
        let s = weekly.slot(created, utc("2026-12-02T00:00:00Z"));
        assert_eq!(
            (s.index, s.last, s.next),
            (0, created, utc("2026-12-06T03:00:00Z"))
        );
    }

    #[test]
    fn each_time_a_schedule_names_begins_a_new_interval() {
        let weekly = cron("0 3 * * 0", None);
        let created = utc("2026-12-01T10:00:00Z");
        let first = weekly.slot(created, utc("2026-12-06T03:00:00Z"));
        let later = weekly.slot(created, utc("2026-12-09T12:00:00Z"));
        assert_eq!(first.last, utc("2026-12-06T03:00:00Z"));
        assert_eq!(first, later, "the same interval until the next Sunday");
        assert_eq!(later.next, utc("2026-12-13T03:00:00Z"));
        assert_ne!(first.index, 0);
    }

    #[test]
    fn scheduled_times_missed_while_down_come_to_one_the_latest() {
        let daily = cron("@daily", None);
        let created = utc("2026-12-01T10:00:00Z");
        // Down from the 2nd to the 5th noon: three midnights passed; only the last counts.
        let s = daily.slot(created, utc("2026-12-05T12:00:00Z"));
        assert_eq!(s.last, utc("2026-12-05T00:00:00Z"));
        assert_eq!(s.next, utc("2026-12-06T00:00:00Z"));
    }

    #[test]
    fn a_schedules_time_zone_moves_its_times_and_follows_daylight_saving() {
        let berlin = cron("0 3 * * *", Some("Europe/Berlin"));
        let created = utc("2026-01-01T00:00:00Z");
        // 03:00 in Berlin is 02:00 UTC in winter (CET) and 01:00 UTC in summer (CEST).
        let winter = berlin.slot(created, utc("2026-01-10T12:00:00Z"));
        assert_eq!(winter.last, utc("2026-01-10T02:00:00Z"));
        let summer = berlin.slot(created, utc("2026-07-10T12:00:00Z"));
        assert_eq!(summer.last, utc("2026-07-10T01:00:00Z"));
    }

    #[test]
    fn cron_day_of_month_and_day_of_week_match_either_as_in_vixie_cron() {
        // The 1st of the month or any Monday (a CronJob reads it the same way).
        let s = cron("0 0 1 * 1", None);
        let t = s.slot(utc("2026-12-01T12:00:00Z"), utc("2026-12-02T00:00:00Z"));
        assert_eq!(t.next, utc("2026-12-07T00:00:00Z"), "Monday the 7th");
    }

    #[test]
    fn what_is_not_a_five_field_cron_schedule_is_refused() {
        for text in [
            "",
            "* * * *",
            "0 0 3 * * 0",    // seconds
            "0 3 * * 0 2027", // year
            "61 * * * *",
            "0 3 * * 0 TZ=UTC", // the zone goes in timeZone
            "CRON_TZ=UTC 0 3 * * *",
            "0 0 31 2 *", // never comes
            "@every 5m",
        ] {
            assert!(parse_schedule(text).is_err(), "{text:?}");
        }
        for text in [
            "*/5 * * * *",
            "0 3 * * SUN",
            "@weekly",
            "30 2 1-7 * MON-FRI",
        ] {
            assert!(parse_schedule(text).is_ok(), "{text:?}");
        }
    }

    #[test]
    fn an_unknown_time_zone_is_refused_by_name() {
        let e = Schedule::parse(&RotationPolicy {
            every: None,
            schedule: Some("@daily".into()),
            time_zone: Some("Mars/Olympus".into()),
            keep_previous: 1,
        })
        .expect_err("refused");
        assert!(e.contains("Mars/Olympus"), "{e}");
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
