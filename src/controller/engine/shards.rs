//! The shards of a large run (see `api::shards` for the format): ConfigMaps owned by the
//! object, read back when a run resumes, written (with their resourceVersion) before the
//! status that names them, and deleted once no status names them.
use super::RunKind;
use super::decide::Written;
use crate::api::shards::{self, OWNER_UID_LABEL, SHARD_KEY};
use crate::api::{ExpiryShardRef, PendingExpiry, RunStatus, ShardRef, TargetStatus};
use crate::controller::context::Context;
use crate::controller::error::Error;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Api, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};
use tracing::warn;

/// Where a large run's records live, and what changed since they were last written.
#[derive(Debug, Default)]
pub(super) struct ShardSet {
    pub refs: Vec<ShardRef>,
    /// resourceVersion of each shard as last read or written; `None`: not created yet.
    pub versions: Vec<Option<String>>,
    /// Shards with records changed since their last write.
    pub dirty: BTreeSet<usize>,
}

impl ShardSet {
    /// The shards of a new run of `total` targets (none for a small run).
    pub fn new_run<K: RunKind>(obj: &K, total: usize) -> Option<Self> {
        if !shards::sharded(total) {
            return None;
        }
        let nonce = nonce();
        let refs = shards::refs(total, |k| shard_name(&obj.name_any(), "targets", &nonce, k));
        Some(Self {
            versions: vec![None; refs.len()],
            dirty: (0..refs.len()).collect(),
            refs,
        })
    }

    pub fn touch(&mut self, idx: usize) {
        self.dirty.insert(shards::shard_of(idx));
    }
}

fn nonce() -> String {
    format!("{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// `<object>-<what>-<nonce>-<k>`, the object's name cut so the whole stays a valid name.
fn shard_name(object: &str, what: &str, nonce: &str, k: usize) -> String {
    let suffix = format!("-{what}-{nonce}-{k}");
    let keep = 253 - suffix.len();
    let base: String = object.chars().take(keep).collect();
    format!("{}{suffix}", base.trim_end_matches(['-', '.']))
}

/// A shard's records ready to write.
pub(super) struct ShardWrite {
    pub k: usize,
    pub name: String,
    pub version: Option<String>,
    pub records: Vec<TargetStatus>,
    pub first: usize,
}

/// Why a large run's records could not be read back.
#[derive(Debug)]
pub(super) enum LoadError {
    /// A shard is gone or unreadable: the run's records are lost.
    Lost(String),
    Api(Error),
}

/// Every record of a stored large run, read back from its shards, with their versions.
pub(super) async fn load<K: RunKind>(
    ctx: &Context,
    obj: &K,
    stored: &RunStatus,
) -> Result<(RunStatus, ShardSet), LoadError> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace(obj));
    let uid = obj.uid().unwrap_or_default();
    let mut records = Vec::with_capacity(stored.summary.total as usize);
    let mut versions = Vec::with_capacity(stored.shards.len());
    for shard in &stored.shards {
        let (bytes, version) = fetch(&api, &shard.name, &uid).await?;
        let part = shards::decode(&bytes, shard).map_err(|e| LoadError::Lost(e.to_string()))?;
        records.push(part);
        versions.push(version);
    }
    let full = shards::expand(stored, records);
    let set = ShardSet {
        refs: stored.shards.clone(),
        versions,
        dirty: BTreeSet::new(),
    };
    Ok((full, set))
}

/// Write one shard: create it, or replace it carrying its resourceVersion (a 409 means
/// another writer drives this run: `Superseded`). Returns the new resourceVersion.
pub(super) async fn write<K: RunKind>(
    ctx: &Context,
    obj: &K,
    w: &ShardWrite,
) -> Result<(Written, Option<String>), Error> {
    let bytes = shards::encode(&w.records, w.first)
        .map_err(|e| Error::InvalidSpec(format!("cannot store the run's records: {e}")))?;
    put(ctx, obj, &w.name, w.version.clone(), bytes).await
}

/// Create (`version` None) or replace a shard ConfigMap holding `bytes`.
async fn put<K: RunKind>(
    ctx: &Context,
    obj: &K,
    name: &str,
    version: Option<String>,
    bytes: Vec<u8>,
) -> Result<(Written, Option<String>), Error> {
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: obj.namespace(),
            resource_version: version.clone(),
            labels: Some(BTreeMap::from([
                (OWNER_UID_LABEL.to_string(), obj.uid().unwrap_or_default()),
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    "guestcred".to_string(),
                ),
            ])),
            owner_references: obj.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        binary_data: Some(BTreeMap::from([(SHARD_KEY.to_string(), ByteString(bytes))])),
        ..ConfigMap::default()
    };
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace(obj));
    let result = match &version {
        None => api.create(&PostParams::default(), &cm).await,
        Some(_) => api.replace(name, &PostParams::default(), &cm).await,
    };
    match result {
        Ok(written) => Ok((Written::Done, written.resource_version())),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            warn!(object = %obj.name_any(), shard = %name, "shard changed by someone else meanwhile; this run stops here");
            Ok((Written::Superseded, None))
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok((Written::Gone, None)),
        Err(e) => Err(e.into()),
    }
}

/// Delete shards no status names any more (a 404 is fine: already gone).
pub(super) async fn delete<K: RunKind>(ctx: &Context, obj: &K, names: &[String]) {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace(obj));
    for name in names {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                warn!(object = %obj.name_any(), shard = %name, error = %e, "could not delete an old shard (garbage collection removes it with the object)")
            }
        }
    }
}

/// Shards of this object that `keep` does not name (left by a controller that stopped
/// between writing a new run's shards and its status).
pub(super) async fn orphans<K: RunKind>(
    ctx: &Context,
    obj: &K,
    keep: &[String],
) -> Result<Vec<String>, Error> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace(obj));
    let uid = obj.uid().unwrap_or_default();
    let listed = api
        .list_metadata(&ListParams::default().labels(&format!("{OWNER_UID_LABEL}={uid}")))
        .await?;
    Ok(listed
        .items
        .into_iter()
        .map(|m| m.name_any())
        .filter(|n| !keep.contains(n))
        .collect())
}

/// Keep a replaced large run's grants still to expire in new shards; their references.
pub(super) async fn store_expiries<K: RunKind>(
    ctx: &Context,
    obj: &K,
    grants: Vec<PendingExpiry>,
) -> Result<Vec<ExpiryShardRef>, Error> {
    let nonce = nonce();
    let mut refs = Vec::new();
    for (r, chunk) in shards::expiry_shards(grants, |k| {
        shard_name(&obj.name_any(), "expiries", &nonce, k)
    }) {
        match put(ctx, obj, &r.name, None, shards::encode_expiries(&chunk)).await? {
            (Written::Done, _) => refs.push(r),
            (other, _) => {
                return Err(Error::InvalidSpec(format!(
                    "could not store the grants to expire in {}: {other:?}",
                    r.name
                )));
            }
        }
    }
    Ok(refs)
}

/// The grants of an expiry shard, with the shard's resourceVersion.
pub(super) async fn load_expiries<K: RunKind>(
    ctx: &Context,
    obj: &K,
    r: &ExpiryShardRef,
) -> Result<(Vec<PendingExpiry>, Option<String>), LoadError> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace(obj));
    let (bytes, version) = fetch(&api, &r.name, &obj.uid().unwrap_or_default()).await?;
    let grants = shards::decode_expiries(&bytes, r).map_err(|e| LoadError::Lost(e.to_string()))?;
    Ok((grants, version))
}

/// A shard's stored bytes and resourceVersion; gone, or not labelled as this object's
/// (`uid`), it is lost.
async fn fetch(
    api: &Api<ConfigMap>,
    name: &str,
    uid: &str,
) -> Result<(Vec<u8>, Option<String>), LoadError> {
    let cm = match api.get_opt(name).await {
        Ok(Some(cm)) => cm,
        Ok(None) => return Err(LoadError::Lost(format!("shard {name} is gone"))),
        Err(e) => return Err(LoadError::Api(e.into())),
    };
    if cm.labels().get(OWNER_UID_LABEL).map(String::as_str) != Some(uid) {
        return Err(LoadError::Lost(format!(
            "ConfigMap {name} does not belong to this object"
        )));
    }
    let version = cm.resource_version();
    let bytes = cm
        .binary_data
        .and_then(|mut d| d.remove(SHARD_KEY))
        .map(|b| b.0)
        .unwrap_or_default();
    Ok((bytes, version))
}

/// Write what is left of an expiry shard (carrying its resourceVersion), or delete it
/// when nothing is; the new reference, if any.
pub(super) async fn rewrite_expiries<K: RunKind>(
    ctx: &Context,
    obj: &K,
    r: &ExpiryShardRef,
    version: Option<String>,
    left: Vec<PendingExpiry>,
) -> Result<Option<ExpiryShardRef>, Error> {
    let Some(first_due) = left
        .iter()
        .map(|g| g.expires_at.clone())
        .min_by_key(|t| t.0)
    else {
        delete(ctx, obj, std::slice::from_ref(&r.name)).await;
        return Ok(None);
    };
    let next = ExpiryShardRef {
        name: r.name.clone(),
        count: left.len() as u32,
        expires_at: first_due,
    };
    put(ctx, obj, &r.name, version, shards::encode_expiries(&left)).await?;
    Ok(Some(next))
}

fn namespace<K: RunKind>(obj: &K) -> String {
    obj.namespace().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::shard_name;

    #[test]
    fn a_shard_name_stays_a_valid_name_for_the_longest_object_names() {
        // Cut at 235 characters, right after a dash.
        let long = format!("{}-{}", "a".repeat(234), "b".repeat(18));
        let n = shard_name(&long, "targets", "abcdef", 99);
        assert!(n.len() <= 253, "{}", n.len());
        assert!(n.ends_with("-targets-abcdef-99"));
        assert!(!n.contains("--"), "{n}");
    }
}
