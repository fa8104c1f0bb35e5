//! In-memory object store: objects indexed by (resource, namespace, name), a global
//! resourceVersion, and the writes (create, update, patch, apply) with each kind's server
//! behaviour. Split by concern: `watch` (the change bus, its bounded history, filters,
//! watch starts) and `delete` (deletion, finalizers, namespace contents, the uid and owner
//! indexes and ownerReference garbage collection).

mod delete;
mod watch;

use watch::Record;
pub(crate) use watch::{BUS_CAPACITY, BusMsg, EventType, Filter};

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use rand::Rng;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::error::ApiError;
use super::limits;
use super::paging::ListCursor;
use super::patch::{self, PatchKind};
use super::prune;
use super::resources::{
    self, CRD_GROUP, CRD_PLURAL, ResKey, ResourceType, builtin_types, crd_to_type, strings_at,
};
use super::views::View;

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct ObjKey {
    pub res: ResKey,
    pub ns: String,
    pub name: String,
}

impl ObjKey {
    /// The key the real server would store this object under in etcd.
    pub fn etcd_key(&self) -> String {
        let group = if self.res.0.is_empty() {
            String::new()
        } else {
            format!("{}/", self.res.0)
        };
        let ns = if self.ns.is_empty() {
            String::new()
        } else {
            format!("{}/", self.ns)
        };
        format!("/registry/{group}{}/{ns}{}", self.res.1, self.name)
    }
}

/// One page of a list.
#[derive(Debug, Default)]
pub(crate) struct ListPage {
    pub items: Vec<Arc<Value>>,
    /// Keys after the last object served, matching the filter or not: a real server bases
    /// `continue` on keys too, so a filtered page may be short and still continue.
    pub keys_after: usize,
}

pub(crate) struct Inner {
    rv: u64,
    types: HashMap<ResKey, Arc<ResourceType>>,
    objects: HashMap<ResKey, BTreeMap<String, BTreeMap<String, Arc<Value>>>>,
    uids: HashMap<String, ObjKey>,
    dependents: HashMap<String, HashSet<ObjKey>>,
    history: VecDeque<Arc<Record>>,
    /// Every change with rv greater than this is in `history`.
    history_from: u64,
    bus: broadcast::Sender<BusMsg>,
    /// Server-side apply: what each field manager last applied, per object uid and
    /// (manager, status subresource), so fields it stops applying are removed.
    applied: HashMap<String, HashMap<(String, bool), Value>>,
}

pub(crate) fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn new_uid() -> String {
    let b: [u8; 16] = rand::rng().random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

fn meta(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = Value::Object(Map::new());
    }
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        // Unreachable: just made sure metadata is an object.
        _ => unreachable!("metadata is an object"),
    }
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

fn has_finalizers(obj: &Value) -> bool {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty())
}

fn finalizers(obj: &Value) -> Vec<String> {
    strings_at(obj, &["metadata", "finalizers"])
}

fn owner_uids(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The part of an object whose change bumps `metadata.generation`.
fn spec_part(obj: &Value, status_subresource: bool) -> Value {
    let mut v = obj.clone();
    if let Value::Object(m) = &mut v {
        m.remove("metadata");
        if status_subresource {
            m.remove("status");
        }
    }
    v
}

fn rv_of(obj: &Value) -> Option<&str> {
    meta_str(obj, "resourceVersion").filter(|s| !s.is_empty())
}

const NAMESPACES: (&str, &str) = ("", "namespaces");

impl Inner {
    pub fn new(bus: broadcast::Sender<BusMsg>) -> Self {
        let mut inner = Self {
            rv: 0,
            types: HashMap::new(),
            objects: HashMap::new(),
            uids: HashMap::new(),
            dependents: HashMap::new(),
            history: VecDeque::new(),
            history_from: 0,
            bus,
            applied: HashMap::new(),
        };
        for rt in builtin_types() {
            inner.types.insert(rt.key(), Arc::new(rt));
        }
        inner
    }

    pub fn rv(&self) -> u64 {
        self.rv
    }

    pub fn types(&self) -> impl Iterator<Item = &Arc<ResourceType>> {
        self.types.values()
    }

    /// The type served at `group/version` under `plural`.
    pub fn lookup(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types
            .get(&(group.to_string(), plural.to_string()))
            .filter(|rt| rt.version(version).is_some())
            .cloned()
    }

    fn type_of(&self, res: &ResKey) -> Option<Arc<ResourceType>> {
        self.types.get(res).cloned()
    }

    fn get_key(&self, key: &ObjKey) -> Option<Arc<Value>> {
        self.objects
            .get(&key.res)?
            .get(&key.ns)?
            .get(&key.name)
            .cloned()
    }

    pub fn namespace_exists(&self, ns: &str) -> bool {
        self.get_key(&ObjKey {
            res: (NAMESPACES.0.into(), NAMESPACES.1.into()),
            ns: String::new(),
            name: ns.to_string(),
        })
        .is_some()
    }

    pub fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> Result<Arc<Value>, ApiError> {
        self.get_key(&key(rt, ns, name))
            .ok_or_else(|| not_found(rt, name))
    }

    pub fn list(&self, filter: &Filter) -> Vec<Arc<Value>> {
        self.list_page(filter, None, None).items
    }

    /// Up to `limit` matching objects after `after`, in key order (namespace, then name).
    pub fn list_page(
        &self,
        filter: &Filter,
        after: Option<&ListCursor>,
        limit: Option<usize>,
    ) -> ListPage {
        let mut page = ListPage::default();
        let Some(by_ns) = self.objects.get(&filter.res) else {
            return page;
        };
        let limit = limit.unwrap_or(usize::MAX);
        type ByName = BTreeMap<String, Arc<Value>>;
        let namespaces: Box<dyn Iterator<Item = (&String, &ByName)>> = match (&filter.ns, after) {
            (Some(ns), _) => Box::new(by_ns.get_key_value(ns).into_iter()),
            (None, Some(c)) => {
                Box::new(by_ns.range::<str, _>((Bound::Included(c.ns.as_str()), Bound::Unbounded)))
            }
            (None, None) => Box::new(by_ns.iter()),
        };
        for (ns, objs) in namespaces {
            let from = match after {
                Some(c) if c.ns == *ns => Bound::Excluded(c.name.as_str()),
                Some(c) if c.ns > *ns => continue,
                _ => Bound::Unbounded,
            };
            if let Some(name) = filter.fields.exact_name() {
                let after_cursor = match from {
                    Bound::Excluded(last) => name > last,
                    _ => true,
                };
                if let Some(o) = objs
                    .get(name)
                    .filter(|o| after_cursor && filter.matches(ns, o))
                {
                    page.items.push(o.clone());
                }
                continue;
            }
            for o in objs
                .range::<str, _>((from, Bound::Unbounded))
                .map(|(_, o)| o)
            {
                if page.items.len() == limit {
                    page.keys_after += 1;
                } else if filter.matches(ns, o) {
                    page.items.push(o.clone());
                }
            }
        }
        page
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn put(&mut self, k: &ObjKey, obj: Arc<Value>, old: Option<Arc<Value>>) {
        if let Some(o) = &old {
            self.index_remove(k, o);
        }
        self.index_add(k, &obj);
        self.objects
            .entry(k.res.clone())
            .or_default()
            .entry(k.ns.clone())
            .or_default()
            .insert(k.name.clone(), obj.clone());
        let ty = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.emit(ty, k, obj, old);
    }

    fn stamp_rv(&mut self, obj: &Value) -> Arc<Value> {
        let rv = self.next_rv();
        let mut o = obj.clone();
        meta(&mut o).insert("resourceVersion".into(), json!(rv.to_string()));
        Arc::new(o)
    }

    pub fn create(
        &mut self,
        rt: &ResourceType,
        version: &str,
        path_ns: Option<&str>,
        mut obj: Value,
    ) -> Result<Arc<Value>, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        if rv_of(&obj).is_some() {
            // The real server answers this with an internal error too.
            return Err(ApiError::new(
                500,
                "InternalError",
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let ns = if rt.namespaced {
            let Some(ns) = path_ns else {
                return Err(ApiError::bad_request(
                    "a namespaced object must be created under /namespaces/<ns>/",
                ));
            };
            if meta_str(&obj, "namespace").is_some_and(|b| !b.is_empty() && b != ns) {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            if !self.namespace_exists(ns) {
                return Err(ApiError::not_found("namespaces", "namespaces", "", ns));
            }
            meta(&mut obj).insert("namespace".into(), json!(ns));
            ns.to_string()
        } else {
            meta(&mut obj).remove("namespace");
            String::new()
        };
        let name = match meta_str(&obj, "name").filter(|n| !n.is_empty()) {
            Some(n) => n.to_string(),
            // Virtual resources (TokenReview) need no name.
            None if rt.create_only => String::new(),
            None => {
                let Some(prefix) = meta_str(&obj, "generateName").filter(|p| !p.is_empty()) else {
                    return Err(ApiError::invalid(
                        &rt.plural,
                        &rt.group,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                };
                let prefix = prefix.to_string();
                let mut candidate = format!("{prefix}{}", random_suffix());
                while self.get_key(&key(rt, &ns, &candidate)).is_some() {
                    candidate = format!("{prefix}{}", random_suffix());
                }
                candidate
            }
        };
        let k = key(rt, &ns, &name);
        if self.get_key(&k).is_some() {
            return Err(ApiError::already_exists(
                &rt.qualified(),
                &rt.plural,
                &rt.group,
                &name,
            ));
        }
        obj["apiVersion"] = json!(rt.api_version(version));
        obj["kind"] = json!(rt.kind);
        let now = now_rfc3339();
        // Like the real strategies: create cannot set status, except a Node's.
        if rt.has_status(version)
            && rt.kind != "Node"
            && let Value::Object(m) = &mut obj
        {
            m.remove("status");
        }
        {
            let m = meta(&mut obj);
            m.insert("name".into(), json!(name));
            m.insert("uid".into(), json!(new_uid()));
            m.insert("creationTimestamp".into(), json!(now));
            m.insert("generation".into(), json!(1));
            for f in [
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "managedFields",
                "selfLink",
            ] {
                m.remove(f);
            }
        }
        let crd_type = self.normalize(rt, &mut obj, None, &now)?;
        prune_custom(rt, version, &mut obj);
        if rt.create_only {
            // Virtual resources (reviews) answer without being stored, and without the
            // metadata a stored object gets.
            let m = meta(&mut obj);
            for f in ["uid", "creationTimestamp", "generation"] {
                m.remove(f);
            }
            if m.get("name").is_some_and(|n| n == "") {
                m.remove("name");
            }
            return Ok(Arc::new(obj));
        }
        limits::check_stored(&k.etcd_key(), &obj)?;
        let rv = self.next_rv();
        meta(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        let obj = Arc::new(obj);
        self.put(&k, obj.clone(), None);
        if let Some(t) = crd_type {
            self.types.insert(t.key(), Arc::new(t));
        }
        Ok(obj)
    }

    /// Kind-specific server behaviour. Returns the type a CRD object defines.
    fn normalize(
        &self,
        rt: &ResourceType,
        obj: &mut Value,
        old: Option<&Value>,
        now: &str,
    ) -> Result<Option<ResourceType>, ApiError> {
        match (rt.group.as_str(), rt.plural.as_str()) {
            ("", "secrets") => {
                if let Some(Value::Object(sd)) =
                    obj.as_object_mut().and_then(|m| m.remove("stringData"))
                {
                    use base64::Engine as _;
                    if !obj.get("data").is_some_and(Value::is_object) {
                        obj["data"] = json!({});
                    }
                    for (k, v) in sd {
                        let s = v.as_str().unwrap_or_default();
                        obj["data"][k] =
                            json!(base64::engine::general_purpose::STANDARD.encode(s.as_bytes()));
                    }
                }
                if obj.get("type").is_none() {
                    obj["type"] = json!("Opaque");
                }
                limits::check_data(&rt.plural, obj)?;
            }
            ("", "configmaps") => limits::check_data(&rt.plural, obj)?,
            ("", "namespaces") => {
                let name = meta_str(obj, "name").unwrap_or_default().to_string();
                if obj.pointer("/status/phase").is_none() {
                    obj["status"] = json!({"phase": "Active"});
                }
                let m = meta(obj);
                if !m.get("labels").is_some_and(Value::is_object) {
                    m.insert("labels".into(), json!({}));
                }
                m["labels"]["kubernetes.io/metadata.name"] = json!(name);
            }
            ("", "pods") if old.is_none() => {
                obj["status"] = json!({"phase": "Pending"});
            }
            ("authentication.k8s.io", "tokenreviews") => {
                obj["status"] = json!({
                    "authenticated": false,
                    "error": "the lab API server authenticates no tokens",
                });
            }
            ("authorization.k8s.io", "selfsubjectaccessreviews") => {
                obj["status"] = json!({
                    "allowed": true,
                    "reason": "the lab API server has no RBAC: every request is allowed",
                });
            }
            (CRD_GROUP, CRD_PLURAL) => {
                let t = crd_to_type(obj)?;
                if let Some(existing) = self.types.get(&t.key()).filter(|e| !e.from_crd) {
                    return Err(ApiError::invalid(
                        CRD_PLURAL,
                        CRD_GROUP,
                        meta_str(obj, "name").unwrap_or_default(),
                        &format!(
                            "spec.names: {} is a built-in resource",
                            existing.qualified()
                        ),
                    ));
                }
                obj["status"] = resources::crd_status(obj, &t, now);
                return Ok(Some(t));
            }
            _ => {}
        }
        Ok(None)
    }

    /// PUT, and the last step of PATCH. `status_only` for the /status subresource.
    /// `new` is in the stored shape (see [`View::to_storage`]).
    pub fn update(
        &mut self,
        rt: &ResourceType,
        version: &str,
        ns: &str,
        name: &str,
        mut new: Value,
        status_only: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let k = key(rt, ns, name);
        let old = self.get_key(&k).ok_or_else(|| not_found(rt, name))?;
        if !new.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        if let Some(body_name) = meta_str(&new, "name").filter(|n| !n.is_empty() && *n != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if let Some(rv) = rv_of(&new)
            && Some(rv) != rv_of(&old)
        {
            return Err(ApiError::conflict(
                &rt.qualified(),
                &rt.plural,
                &rt.group,
                name,
            ));
        }
        if old.pointer("/metadata/deletionTimestamp").is_some() && !status_only {
            let before = finalizers(&old);
            if let Some(added) = finalizers(&new).into_iter().find(|f| !before.contains(f)) {
                return Err(ApiError::invalid(
                    &rt.plural,
                    &rt.group,
                    name,
                    &format!(
                        "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers [\"{added}\"]"
                    ),
                ));
            }
        }
        let status_sub = rt.has_status(version);
        let mut result = if status_only {
            let mut r = (*old).clone();
            match new.get("status") {
                Some(s) => r["status"] = s.clone(),
                None => {
                    if let Value::Object(m) = &mut r {
                        m.remove("status");
                    }
                }
            }
            r
        } else {
            let old_meta = old.get("metadata").cloned().unwrap_or_default();
            let m = meta(&mut new);
            for f in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "resourceVersion",
            ] {
                match old_meta.get(f) {
                    Some(v) => m.insert(f.into(), v.clone()),
                    None => m.remove(f),
                };
            }
            m.remove("managedFields");
            if status_sub {
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Value::Object(o) = &mut new {
                            o.remove("status");
                        }
                    }
                }
            }
            new
        };
        result["apiVersion"] = json!(rt.api_version(version));
        result["kind"] = json!(rt.kind);
        let now = now_rfc3339();
        let crd_type = if status_only {
            None
        } else {
            self.normalize(rt, &mut result, Some(&old), &now)?
        };
        prune_custom(rt, version, &mut result);
        if result == *old {
            // A no-op write changes nothing, not even the resourceVersion.
            return Ok(old);
        }
        if spec_part(&result, status_sub) != spec_part(&old, status_sub) {
            let generation = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            meta(&mut result).insert("generation".into(), json!(generation + 1));
        }
        limits::check_stored(&k.etcd_key(), &result)?;
        let rv = self.next_rv();
        meta(&mut result).insert("resourceVersion".into(), json!(rv.to_string()));
        let result = Arc::new(result);
        if result.pointer("/metadata/deletionTimestamp").is_some() && !has_finalizers(&result) {
            // The last finalizer is gone: the pending deletion completes now.
            let mut removed = Vec::new();
            self.remove(&k, result.clone(), &mut removed);
            self.collect_garbage(removed);
            return Ok(result);
        }
        self.put(&k, result.clone(), Some(old));
        if let Some(t) = crd_type {
            self.types.insert(t.key(), Arc::new(t));
        }
        Ok(result)
    }

    /// PATCH of the object stored under `rt`; the patch is written against its `view`.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        rt: &ResourceType,
        version: &str,
        ns: &str,
        name: &str,
        kind: PatchKind,
        patch: &Value,
        status_only: bool,
        field_manager: &str,
        view: View,
    ) -> Result<Arc<Value>, ApiError> {
        let k = key(rt, ns, name);
        let mut patch = patch.clone();
        if kind == PatchKind::Apply {
            meta(&mut patch).remove("managedFields");
        }
        let applied_key = (field_manager.to_string(), status_only);
        let Some(old) = self.get_key(&k) else {
            if kind == PatchKind::Apply && !status_only {
                // Server-side apply creates what does not exist yet.
                let mut obj = patch.clone();
                meta(&mut obj).insert("name".into(), json!(name));
                meta(&mut obj).remove("resourceVersion");
                let path_ns = rt.namespaced.then_some(ns);
                let created = self.create(rt, version, path_ns, view.to_storage(obj))?;
                self.remember_applied(&created, applied_key, patch);
                return Ok(created);
            }
            return Err(not_found(rt, name));
        };
        // Patches apply to the object as the client sees it (`view`), then it is stored.
        let mut doc = view.to_shape(&old);
        if kind == PatchKind::Apply {
            let last = meta_str(&old, "uid")
                .and_then(|uid| self.applied.get(uid))
                .and_then(|m| m.get(&applied_key));
            let effective = match last {
                Some(last) => patch::with_removals(last, &patch),
                None => patch.clone(),
            };
            patch::apply(kind, &mut doc, &effective)?;
        } else {
            patch::apply(kind, &mut doc, &patch)?;
        }
        let doc = view.to_storage(doc);
        let result = self.update(rt, version, ns, name, doc, status_only)?;
        if kind == PatchKind::Apply {
            self.remember_applied(&result, applied_key, patch);
        }
        Ok(result)
    }

    fn remember_applied(&mut self, obj: &Value, key: (String, bool), applied: Value) {
        // Objects gone already (last finalizer removed) need no memory.
        if let Some(uid) = meta_str(obj, "uid")
            && self.uids.contains_key(uid)
        {
            self.applied
                .entry(uid.to_string())
                .or_default()
                .insert(key, applied);
        }
    }
}

/// Custom objects lose the fields their version's schema does not declare.
fn prune_custom(rt: &ResourceType, version: &str, obj: &mut Value) {
    if let Some(schema) = rt
        .version(version)
        .filter(|_| rt.from_crd)
        .and_then(|v| v.schema.as_ref())
    {
        prune::prune_object(obj, schema);
    }
}

fn key(rt: &ResourceType, ns: &str, name: &str) -> ObjKey {
    ObjKey {
        res: rt.key(),
        ns: if rt.namespaced {
            ns.to_string()
        } else {
            String::new()
        },
        name: name.to_string(),
    }
}

fn not_found(rt: &ResourceType, name: &str) -> ApiError {
    ApiError::not_found(&rt.qualified(), &rt.plural, &rt.group, name)
}
