//! Deletion: finalizers and deletionTimestamp, namespace contents, CRDs taking their
//! objects along, and ownerReference garbage collection over the uid and owner indexes.

use std::sync::Arc;

use serde_json::{Value, json};

use super::super::error::ApiError;
use super::super::resources::{CRD_GROUP, CRD_PLURAL, ResourceType, crd_to_type};
use super::watch::{EventType, Filter};
use super::{
    Inner, NAMESPACES, ObjKey, has_finalizers, key, meta, meta_str, not_found, now_rfc3339,
    owner_uids,
};

impl Inner {
    pub(super) fn index_add(&mut self, k: &ObjKey, obj: &Value) {
        if let Some(uid) = meta_str(obj, "uid") {
            self.uids.insert(uid.to_string(), k.clone());
        }
        for owner in owner_uids(obj) {
            self.dependents.entry(owner).or_default().insert(k.clone());
        }
    }

    pub(super) fn index_remove(&mut self, k: &ObjKey, obj: &Value) {
        if let Some(uid) = meta_str(obj, "uid") {
            self.uids.remove(uid);
        }
        for owner in owner_uids(obj) {
            if let Some(set) = self.dependents.get_mut(&owner) {
                set.remove(k);
                if set.is_empty() {
                    self.dependents.remove(&owner);
                }
            }
        }
    }

    /// Removes an object for good; `obj` already carries the deletion's resourceVersion.
    pub(super) fn remove(&mut self, k: &ObjKey, obj: Arc<Value>, removed: &mut Vec<String>) {
        let Some(old) = self
            .objects
            .get_mut(&k.res)
            .and_then(|by_ns| by_ns.get_mut(&k.ns))
            .and_then(|objs| objs.remove(&k.name))
        else {
            return;
        };
        self.index_remove(k, &old);
        if let Some(uid) = meta_str(&obj, "uid") {
            self.applied.remove(uid);
            removed.push(uid.to_string());
        }
        self.emit(EventType::Deleted, k, obj.clone(), None);
        if k.res.0 == CRD_GROUP && k.res.1 == CRD_PLURAL {
            self.drop_crd(&obj, removed);
        }
    }

    /// A deleted CRD takes its type and all its objects with it.
    pub(super) fn drop_crd(&mut self, crd: &Value, removed: &mut Vec<String>) {
        let Ok(rt) = crd_to_type(crd) else { return };
        let res = rt.key();
        if self.types.get(&res).is_some_and(|t| t.from_crd) {
            self.types.remove(&res);
        }
        let Some(by_ns) = self.objects.get(&res) else {
            return;
        };
        let keys: Vec<ObjKey> = by_ns
            .iter()
            .flat_map(|(ns, objs)| objs.keys().map(move |n| (ns.clone(), n.clone())))
            .map(|(ns, name)| ObjKey {
                res: res.clone(),
                ns,
                name,
            })
            .collect();
        for k in keys {
            if let Some(obj) = self.get_key(&k) {
                let stamped = self.stamp_rv(&obj);
                self.remove(&k, stamped, removed);
            }
        }
        self.objects.remove(&res);
    }

    /// DELETE: objects with finalizers only get a deletionTimestamp; others go at once,
    /// followed by their dependents (ownerReferences) unless orphaned.
    pub fn delete(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        orphan: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let k = key(rt, ns, name);
        let mut removed = Vec::new();
        let result = self.delete_one(&k, &mut removed)?;
        if !orphan {
            self.collect_garbage(removed);
        }
        Ok(result)
    }

    pub(super) fn delete_one(
        &mut self,
        k: &ObjKey,
        removed: &mut Vec<String>,
    ) -> Result<Arc<Value>, ApiError> {
        let Some(obj) = self.get_key(k) else {
            return Err(match self.type_of(&k.res) {
                Some(rt) => not_found(&rt, &k.name),
                None => ApiError::new(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            });
        };
        if k.res.0.is_empty() && k.res.1 == NAMESPACES.1 {
            self.delete_namespace_contents(&k.name, removed);
        }
        if has_finalizers(&obj) {
            if obj.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(obj);
            }
            let rv = self.next_rv();
            let mut marked = (*obj).clone();
            let m = meta(&mut marked);
            m.insert("deletionTimestamp".into(), json!(now_rfc3339()));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
            m.insert("resourceVersion".into(), json!(rv.to_string()));
            let marked = Arc::new(marked);
            self.put(k, marked.clone(), Some(obj));
            return Ok(marked);
        }
        let stamped = self.stamp_rv(&obj);
        self.remove(k, stamped.clone(), removed);
        Ok(stamped)
    }

    pub(super) fn delete_namespace_contents(&mut self, ns: &str, removed: &mut Vec<String>) {
        let keys: Vec<ObjKey> = self
            .objects
            .iter()
            .filter_map(|(res, by_ns)| by_ns.get(ns).map(|objs| (res, objs)))
            .flat_map(|(res, objs)| {
                objs.keys().map(move |name| ObjKey {
                    res: res.clone(),
                    ns: ns.to_string(),
                    name: name.clone(),
                })
            })
            .collect();
        for k in keys {
            // Already gone through an earlier cascade: nothing to do.
            let _ = self.delete_one(&k, removed);
        }
    }

    /// Background cascading deletion of dependents whose owners are all gone.
    pub(super) fn collect_garbage(&mut self, mut removed: Vec<String>) {
        while let Some(owner) = removed.pop() {
            let Some(deps) = self.dependents.remove(&owner) else {
                continue;
            };
            for dep in deps {
                let Some(obj) = self.get_key(&dep) else {
                    continue;
                };
                if obj.pointer("/metadata/deletionTimestamp").is_some() {
                    continue;
                }
                let other_owner_alive = owner_uids(&obj)
                    .iter()
                    .any(|u| *u != owner && self.uids.contains_key(u));
                if other_owner_alive {
                    continue;
                }
                // Already gone through another path: nothing to do.
                let _ = self.delete_one(&dep, &mut removed);
            }
        }
    }

    pub fn delete_collection(
        &mut self,
        rt: &ResourceType,
        filter: &Filter,
        orphan: bool,
    ) -> Vec<Arc<Value>> {
        let targets = self.list(filter);
        let mut out = Vec::new();
        for obj in targets {
            let ns = meta_str(&obj, "namespace").unwrap_or_default().to_string();
            let name = meta_str(&obj, "name").unwrap_or_default().to_string();
            if let Ok(o) = self.delete(rt, &ns, &name, orphan) {
                out.push(o);
            }
        }
        out
    }
}
