//! Calls through a kube `Api` that tests make again and again: the sorted names of a
//! list, JSON merge patches of an object and of its status.
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::fmt::Debug;

/// The names of the objects `api` lists with `params`, sorted; fails the test if the list
/// is refused.
pub async fn sorted_names<K>(api: &Api<K>, params: &ListParams) -> Vec<String>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let list = api
        .list(params)
        .await
        .unwrap_or_else(|e| panic!("list {}: {e}", std::any::type_name::<K>()));
    let mut names: Vec<String> = list.items.iter().map(ResourceExt::name_any).collect();
    names.sort();
    names
}

/// A JSON merge patch of `name` through `api`.
pub async fn merge_patch<K>(api: &Api<K>, name: &str, patch: Value) -> kube::Result<K>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
}

/// A JSON merge patch of `name`'s status subresource through `api`.
pub async fn merge_patch_status<K>(api: &Api<K>, name: &str, patch: Value) -> kube::Result<K>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
}
