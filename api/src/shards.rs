//! How a run's per-target records are stored so that no object grows with the fleet.
//!
//! A run of at most [`INLINE_TARGETS`] targets keeps every record in `status.targets`. A
//! larger run keeps them in shards: ConfigMaps owned by the object, each holding up to
//! [`SHARD_SIZE`] consecutive targets of the frozen target list as gzip'd JSON (one
//! [`TargetStatus`] each: the same record format either way). Its status keeps the counts
//! (`summary`, `reasons`), the targets that need attention (at most [`ATTENTION_CAP`],
//! `unlistedTargets` counts the others) and the shards' names ([`compact`]).
//!
//! Sizes: a record is 150-500 bytes of JSON; records of one run share most of their text
//! (node names, reasons, messages, keys), so gzip stores 1000 of them in ~10-40 KiB. A
//! shard whose encoding would still pass [`MAX_SHARD_BYTES`] has its records' messages cut
//! ([`encode`]), so every shard stays well under the 1 MiB ConfigMap limit and the 256 KiB
//! guestcred aims for; the status of a sharded run is a few KiB at any size.
use crate::common::{ExpiryShardRef, PendingExpiry, RunStatus, ShardRef, Tally, TargetStatus};
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::io::{Read, Write};
use std::ops::Range;

/// Runs up to this many targets list every target in status.
pub const INLINE_TARGETS: usize = 100;
/// Targets per shard.
pub const SHARD_SIZE: usize = 1000;
/// Targets listed in the status of a sharded run.
pub const ATTENTION_CAP: usize = 20;
/// The ConfigMap key (in `binaryData`) of a shard's records.
pub const SHARD_KEY: &str = "targets.json.gz";
/// Label on every shard: the UID of the object it belongs to.
pub const OWNER_UID_LABEL: &str = "guestcred.io/owner-uid";
/// Largest encoded shard written (the ConfigMap is this plus ~1/3 for base64).
pub const MAX_SHARD_BYTES: usize = 160 * 1024;
/// Largest decoded shard read: a corrupt or hostile ConfigMap cannot make the controller
/// inflate more than this.
const MAX_DECODED_BYTES: u64 = 64 * 1024 * 1024;
/// Messages are cut to this many characters when a shard would be too large otherwise.
const SHORT_MESSAGE: usize = 120;

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("shard {name} is unreadable: {detail}")]
    Corrupt { name: String, detail: String },
    #[error("shard {name} holds {found} targets, status says {expected}")]
    WrongCount {
        name: String,
        expected: u32,
        found: usize,
    },
    #[error("the records of targets {first}..{end} do not fit in a shard")]
    TooLarge { first: usize, end: usize },
}

/// Whether a run of `total` targets is stored in shards.
pub fn sharded(total: usize) -> bool {
    total > INLINE_TARGETS
}

/// The shard of target `idx`.
pub fn shard_of(idx: usize) -> usize {
    idx / SHARD_SIZE
}

/// The target indexes of every shard of a run of `total` targets.
pub fn layout(total: usize) -> Vec<Range<usize>> {
    (0..total)
        .step_by(SHARD_SIZE)
        .map(|first| first..(first + SHARD_SIZE).min(total))
        .collect()
}

/// The references to a run's shards, named `name(k)`.
pub fn refs(total: usize, name: impl Fn(usize) -> String) -> Vec<ShardRef> {
    layout(total)
        .into_iter()
        .enumerate()
        .map(|(k, r)| ShardRef {
            name: name(k),
            first: r.start as u32,
            count: r.len() as u32,
        })
        .collect()
}

/// gzip'd JSON of a shard's records; if that passes [`MAX_SHARD_BYTES`], again with the
/// messages cut short (they are the only free text).
pub fn encode(records: &[TargetStatus], first: usize) -> Result<Vec<u8>, ShardError> {
    let bytes = gzip_json(records);
    if bytes.len() <= MAX_SHARD_BYTES {
        return Ok(bytes);
    }
    let short: Vec<TargetStatus> = records
        .iter()
        .map(|t| TargetStatus {
            message: t.message.as_ref().map(|m| cut(m, SHORT_MESSAGE)),
            ..t.clone()
        })
        .collect();
    let bytes = gzip_json(&short);
    if bytes.len() <= MAX_SHARD_BYTES {
        Ok(bytes)
    } else {
        Err(ShardError::TooLarge {
            first,
            end: first + records.len(),
        })
    }
}

fn gzip_json<T: Serialize>(records: &[T]) -> Vec<u8> {
    // Serialized whole first, then compressed in one write: serde_json writes each token
    // separately, and every write to a GzEncoder zero-fills its 32 KiB output buffer, so
    // serializing straight into it cost ~50 ms of CPU per 1,000-record shard (perf, bench
    // P6: 14% of the controller's CPU). Serializing plain structs cannot fail, nor can
    // writing to a Vec.
    let json = serde_json::to_vec(records).unwrap_or_default();
    let mut gz = GzEncoder::new(Vec::with_capacity(json.len() / 4), Compression::fast());
    let _ = gz.write_all(&json);
    gz.finish().unwrap_or_default()
}

fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

/// The records of a shard read back; `shard` is the reference status holds for it.
pub fn decode(bytes: &[u8], shard: &ShardRef) -> Result<Vec<TargetStatus>, ShardError> {
    decode_json(bytes, &shard.name, shard.count)
}

/// Grants to expire (one per VM and user), as kept for a replaced large run.
pub fn encode_expiries(grants: &[PendingExpiry]) -> Vec<u8> {
    gzip_json(grants)
}

/// The grants of an expiry shard read back.
pub fn decode_expiries(
    bytes: &[u8],
    shard: &ExpiryShardRef,
) -> Result<Vec<PendingExpiry>, ShardError> {
    decode_json(bytes, &shard.name, shard.count)
}

/// A replaced large run's grants still to expire, in shards of [`SHARD_SIZE`], each with
/// the time its first grant is due; named `name(k)`.
pub fn expiry_shards(
    grants: Vec<PendingExpiry>,
    name: impl Fn(usize) -> String,
) -> Vec<(ExpiryShardRef, Vec<PendingExpiry>)> {
    grants
        .chunks(SHARD_SIZE)
        .enumerate()
        .filter_map(|(k, chunk)| {
            let first_due = chunk
                .iter()
                .map(|g| g.expires_at.clone())
                .min_by_key(|t| t.0)?;
            Some((
                ExpiryShardRef {
                    name: name(k),
                    count: chunk.len() as u32,
                    expires_at: first_due,
                },
                chunk.to_vec(),
            ))
        })
        .collect()
}

fn decode_json<T: DeserializeOwned>(
    bytes: &[u8],
    name: &str,
    count: u32,
) -> Result<Vec<T>, ShardError> {
    let corrupt = |detail: String| ShardError::Corrupt {
        name: name.to_string(),
        detail,
    };
    let mut json = Vec::new();
    GzDecoder::new(bytes)
        .take(MAX_DECODED_BYTES)
        .read_to_end(&mut json)
        .map_err(|e| corrupt(e.to_string()))?;
    let records: Vec<T> = serde_json::from_slice(&json).map_err(|e| corrupt(e.to_string()))?;
    if records.len() != count as usize {
        return Err(ShardError::WrongCount {
            name: name.to_string(),
            expected: count,
            found: records.len(),
        });
    }
    Ok(records)
}

/// The stored status of a run: `full` itself for a small run; for a large one, `full`'s
/// counts with at most [`ATTENTION_CAP`] targets listed and `shards` naming the rest.
/// `full` must hold every target (its counts are recomputed here: see [`compact_counted`]
/// for counts kept up to date).
pub fn compact(full: &RunStatus, shards: &[ShardRef]) -> RunStatus {
    compact_counted(full, shards, &Tally::of(&full.targets))
}

/// [`compact`] with `tally`, the counts of `full.targets` as they are now.
pub fn compact_counted(full: &RunStatus, shards: &[ShardRef], tally: &Tally) -> RunStatus {
    let mut counted = RunStatus {
        targets: Vec::new(),
        shards: Vec::new(),
        ..full.clone_without_targets()
    };
    tally.set_counts(&mut counted);
    if shards.is_empty() {
        counted.targets = full.targets.clone();
        return counted;
    }
    counted.targets = tally
        .needing_attention()
        .take(ATTENTION_CAP)
        .filter_map(|i| full.targets.get(i).cloned())
        .collect();
    let listed = tally.needing_attention_count().min(ATTENTION_CAP);
    counted.unlisted_targets = Some(full.targets.len().saturating_sub(listed) as u32);
    counted.shards = shards.to_vec();
    counted
}

/// A sharded run's status with every target's record put back from its shards (in order).
pub fn expand(stored: &RunStatus, shards: Vec<Vec<TargetStatus>>) -> RunStatus {
    RunStatus {
        targets: shards.into_iter().flatten().collect(),
        unlisted_targets: None,
        shards: Vec::new(),
        ..stored.clone_without_targets()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::Summary;
    use crate::common::TargetState;

    fn target(i: usize, state: TargetState, reason: &str) -> TargetStatus {
        TargetStatus {
            vm: format!("vm-{i:06}"),
            node: Some(format!("node-{}", i % 1000)),
            user: Some("root".into()),
            state,
            reason: (!reason.is_empty()).then(|| reason.to_string()),
            message: (!reason.is_empty()).then(|| format!("password for root set on vm-{i:06}")),
            attempts: u32::from(state != TargetState::Pending),
            ..TargetStatus::default()
        }
    }

    fn run(total: usize, state: impl Fn(usize) -> (TargetState, &'static str)) -> RunStatus {
        let mut s = RunStatus {
            input_hash: Some("h".into()),
            targets: (0..total)
                .map(|i| {
                    let (st, r) = state(i);
                    target(i, st, r)
                })
                .collect(),
            ..RunStatus::default()
        };
        s.recount();
        s
    }

    fn names(k: usize) -> String {
        format!("reset-targets-abc-{k}")
    }

    #[test]
    fn a_run_of_100_targets_is_stored_inline_and_101_in_shards() {
        assert!(!sharded(100));
        assert!(sharded(101));
        assert!(refs(100, names).len() == 1 && !sharded(0));
    }

    #[test]
    fn shards_cover_every_target_once_in_order() {
        let l = layout(2_500);
        assert_eq!(l, vec![0..1000, 1000..2000, 2000..2500]);
        let r = refs(2_500, names);
        assert_eq!(r[2].first, 2000);
        assert_eq!(r[2].count, 500);
        assert_eq!(shard_of(1999), 1);
    }

    #[test]
    fn a_shard_decodes_to_the_records_it_was_encoded_from() {
        let s = run(1000, |_| (TargetState::Succeeded, "Applied"));
        let r = &refs(1000, names)[0];
        let bytes = encode(&s.targets, 0).expect("fits");
        assert_eq!(decode(&bytes, r).expect("decodes"), s.targets);
    }

    #[test]
    fn a_full_shard_of_typical_records_is_far_under_the_limit() {
        let s = run(1000, |_| (TargetState::Succeeded, "Applied"));
        let bytes = encode(&s.targets, 0).expect("fits");
        assert!(bytes.len() < 64 * 1024, "{} bytes", bytes.len());
    }

    #[test]
    fn a_shard_of_huge_messages_is_cut_to_fit() {
        let mut s = run(1000, |_| (TargetState::Failed, "ShimError"));
        for (i, t) in s.targets.iter_mut().enumerate() {
            // Incompressible text: every message different.
            t.message = Some(
                (0..250)
                    .map(|j| format!("{:x}", (i * 7919 + j * 104_729) % 65_521))
                    .collect::<Vec<_>>()
                    .join("-"),
            );
        }
        let bytes = encode(&s.targets, 0).expect("fits once cut");
        assert!(bytes.len() <= MAX_SHARD_BYTES);
        let back = decode(&bytes, &refs(1000, names)[0]).expect("decodes");
        assert!(back[0].message.as_deref().is_some_and(|m| m.ends_with('…')));
        assert_eq!(back[999].vm, s.targets[999].vm);
    }

    #[test]
    fn a_shard_with_another_count_than_status_says_is_refused() {
        let s = run(10, |_| (TargetState::Succeeded, "Applied"));
        let bytes = encode(&s.targets, 0).expect("fits");
        let r = ShardRef {
            name: "x".into(),
            first: 0,
            count: 11,
        };
        assert!(matches!(
            decode(&bytes, &r),
            Err(ShardError::WrongCount { found: 10, .. })
        ));
        assert!(matches!(
            decode(b"not gzip", &r),
            Err(ShardError::Corrupt { .. })
        ));
    }

    #[test]
    fn the_status_of_a_large_run_counts_every_target_and_lists_only_those_needing_attention() {
        let full = run(100_000, |i| match i {
            7 | 70_000 => (TargetState::Failed, "AgentTimeout"),
            i if i < 50_000 => (TargetState::Succeeded, "Applied"),
            i if i < 50_512 => (TargetState::Running, ""),
            _ => (TargetState::Pending, ""),
        });
        let stored = compact(&full, &refs(100_000, names));
        assert_eq!(
            stored.summary,
            Summary {
                total: 100_000,
                succeeded: 49_999,
                failed: 2,
                skipped: 0,
                pending: 49_487,
                running: 512,
            }
        );
        assert_eq!(stored.reasons.get("Applied"), Some(&49_999));
        assert_eq!(stored.reasons.get("AgentTimeout"), Some(&2));
        assert_eq!(stored.targets.len(), ATTENTION_CAP);
        assert!(
            stored
                .targets
                .iter()
                .all(|t| t.state == TargetState::Running)
        );
        assert_eq!(stored.unlisted_targets, Some(100_000 - 20));
        assert_eq!(stored.progress.as_deref(), Some("50001/100000"));
        let bytes = serde_json::to_vec(&stored).expect("json").len();
        assert!(bytes < 32 * 1024, "{bytes} bytes");
    }

    #[test]
    fn failures_are_listed_once_nothing_is_running() {
        let full = run(5_000, |i| match i {
            3 | 4 => (TargetState::Failed, "AgentTimeout"),
            _ => (TargetState::Succeeded, "Applied"),
        });
        let stored = compact(&full, &refs(5_000, names));
        let listed: Vec<&str> = stored.targets.iter().map(|t| t.vm.as_str()).collect();
        assert_eq!(listed, ["vm-000003", "vm-000004"]);
        assert_eq!(stored.unfinished(), 0);
        assert_eq!(stored.finished_targets(), 5_000);
    }

    #[test]
    fn recounting_a_stored_large_run_keeps_its_counts() {
        let full = run(500, |_| (TargetState::Succeeded, "Applied"));
        let mut stored = compact(&full, &refs(500, names));
        stored.recount();
        assert_eq!(stored.summary.succeeded, 500);
        assert_eq!(stored.progress.as_deref(), Some("500/500"));
    }

    #[test]
    fn a_small_run_is_stored_as_it_is() {
        let full = run(3, |_| (TargetState::Succeeded, "Applied"));
        assert_eq!(compact(&full, &[]), full);
    }

    #[test]
    fn expanding_the_stored_form_gives_back_the_run() {
        let full = run(2_500, |i| {
            if i % 2 == 0 {
                (TargetState::Succeeded, "Applied")
            } else {
                (TargetState::Pending, "")
            }
        });
        let r = refs(2_500, names);
        let stored = compact(&full, &r);
        let shards: Vec<Vec<TargetStatus>> = layout(2_500)
            .into_iter()
            .zip(&r)
            .map(|(range, shard)| {
                let bytes = encode(&full.targets[range.clone()], range.start).expect("fits");
                decode(&bytes, shard).expect("decodes")
            })
            .collect();
        let mut back = expand(&stored, shards);
        back.recount();
        assert_eq!(back, full);
    }

    #[test]
    fn grants_to_expire_are_kept_in_shards_with_their_first_due_time() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        use k8s_openapi::jiff::Timestamp;
        let at = |s: i64| Time(Timestamp::from_second(1_800_000_000 + s).expect("time"));
        let grants: Vec<PendingExpiry> = (0..2_500)
            .map(|i| PendingExpiry {
                vm: format!("vm-{i:05}"),
                user: None,
                keys: vec!["SHA256:abc".into()],
                expires_at: at(3_000 - i as i64),
            })
            .collect();
        let shards = expiry_shards(grants, |k| format!("r-expiries-x-{k}"));
        assert_eq!(shards.len(), 3);
        assert_eq!(shards[0].0.count, 1000);
        assert_eq!(shards[0].0.expires_at, at(3_000 - 999));
        assert_eq!(shards[2].0.count, 500);
        let bytes = encode_expiries(&shards[2].1);
        assert_eq!(
            decode_expiries(&bytes, &shards[2].0).expect("decodes"),
            shards[2].1
        );
    }
}
