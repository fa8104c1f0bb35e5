//! Where the controller watches: every namespace (the default), or only the namespaces of
//! `--watch-namespaces` (the chart's `watchNamespaces`, which then grants Roles in those
//! namespaces instead of cluster-wide rules; see docs/security.md "Namespaced mode").
//!
//! A watch covers one namespace or all of them, so the namespaced mode runs one watch per
//! namespace. Their events cannot simply be interleaved into one reflector: a reflector
//! takes each `Init`..`InitDone` as a complete list and replaces its whole store with it,
//! so one namespace's re-list (after a 410 or a dropped connection) would drop every other
//! namespace's objects. [`watch_scope`] merges them into one stream with the semantics of a
//! single watch instead (kube-state-metrics' "multi list-watch"): one initial list made of
//! every namespace's first list, then a namespace's later re-list becomes `Apply` events
//! for what it lists and `Delete` events for what it no longer has.
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use kube::runtime::watcher::{self, Event};
use kube::{Api, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};

/// The namespaces the controller watches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum WatchScope {
    /// Every namespace (cluster-wide rules in the chart).
    #[default]
    Cluster,
    /// Only these (sorted, without duplicates, never empty).
    Namespaces(Vec<String>),
}

impl WatchScope {
    /// The scope of `--watch-namespaces`: none given is the whole cluster.
    pub fn new(namespaces: &[String]) -> Self {
        let set: BTreeSet<&String> = namespaces.iter().collect();
        if set.is_empty() {
            Self::Cluster
        } else {
            Self::Namespaces(set.into_iter().cloned().collect())
        }
    }

    /// Whether objects of namespace `ns` are watched (and so reconciled).
    pub fn contains(&self, ns: &str) -> bool {
        match self {
            Self::Cluster => true,
            Self::Namespaces(list) => list.iter().any(|n| n == ns),
        }
    }

    /// One Api per watch: `all()` for the cluster, `one(ns)` for each namespace.
    pub fn apis<K>(
        &self,
        all: impl FnOnce() -> Api<K>,
        one: impl Fn(&str) -> Api<K>,
    ) -> Vec<Api<K>> {
        match self {
            Self::Cluster => vec![all()],
            Self::Namespaces(list) => list.iter().map(|ns| one(ns)).collect(),
        }
    }
}

impl std::fmt::Display for WatchScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cluster => f.write_str("all namespaces"),
            Self::Namespaces(list) => write!(f, "namespaces {}", list.join(",")),
        }
    }
}

/// `--watch-namespaces` entries: Kubernetes namespace names (DNS-1123 labels).
pub fn parse_namespace(s: &str) -> Result<String, String> {
    let valid = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if valid {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a namespace name (lowercase letters, digits and '-', at most 63)"
        ))
    }
}

type Watched<K> = Result<Event<K>, watcher::Error>;

/// The events of `watch(api)` for every Api of `apis` (from [`WatchScope::apis`]) as one
/// stream a reflector can take. One Api: its stream as it is. Several: merged (see the
/// module docs); `tombstone` makes what is kept of each object once the initial list is
/// done, to send as the `Delete` of an object a re-list no longer has (keep its name and
/// namespace; consumers look deleted objects up by key).
pub fn watch_scope<K, S>(
    apis: Vec<Api<K>>,
    watch: impl Fn(Api<K>) -> S,
    tombstone: fn(&K) -> K,
) -> BoxStream<'static, Watched<K>>
where
    K: kube::Resource + Clone + Send + 'static,
    S: Stream<Item = Watched<K>> + Send + 'static,
{
    let mut streams: Vec<_> = apis.into_iter().map(watch).collect();
    if streams.len() == 1 {
        return streams.remove(0).boxed();
    }
    merge(streams, tombstone).boxed()
}

fn merge<K, S>(streams: Vec<S>, tombstone: fn(&K) -> K) -> impl Stream<Item = Watched<K>>
where
    K: kube::Resource + Clone + Send + 'static,
    S: Stream<Item = Watched<K>> + Send + 'static,
{
    let mut state = Merge::new(streams.len(), tombstone);
    futures::stream::select_all(
        streams
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.map(move |e| (i, e)).boxed()),
    )
    .flat_map(move |(i, e)| futures::stream::iter(state.on(i, e)))
}

/// The merge's memory of each namespace.
struct Merge<K> {
    tombstone: fn(&K) -> K,
    /// Per namespace, by name: full objects until the initial list is sent (they make
    /// it), tombstones after.
    objects: Vec<BTreeMap<String, K>>,
    /// Per namespace: the names its list in progress has sent so far.
    listing: Vec<Option<BTreeSet<String>>>,
    /// Per namespace: whether its first list is complete.
    listed: Vec<bool>,
    /// Whether the merged initial list was sent.
    synced: bool,
}

impl<K: kube::Resource + Clone> Merge<K> {
    fn new(n: usize, tombstone: fn(&K) -> K) -> Self {
        Self {
            tombstone,
            objects: (0..n).map(|_| BTreeMap::new()).collect(),
            listing: vec![None; n],
            listed: vec![false; n],
            synced: false,
        }
    }

    /// The merged events for event `e` of namespace `i`.
    fn on(&mut self, i: usize, e: Watched<K>) -> Vec<Watched<K>> {
        let e = match e {
            Ok(e) => e,
            Err(err) => return vec![Err(err)],
        };
        match e {
            Event::Init => {
                self.listing[i] = Some(BTreeSet::new());
                Vec::new()
            }
            Event::InitApply(o) | Event::Apply(o) => {
                let name = o.name_any();
                if let Some(listing) = &mut self.listing[i] {
                    listing.insert(name.clone());
                }
                if !self.synced {
                    self.objects[i].insert(name, o);
                    return Vec::new();
                }
                self.objects[i].insert(name, (self.tombstone)(&o));
                vec![Ok(Event::Apply(o))]
            }
            Event::Delete(o) => {
                self.objects[i].remove(&o.name_any());
                if self.synced {
                    vec![Ok(Event::Delete(o))]
                } else {
                    Vec::new()
                }
            }
            Event::InitDone => {
                // What this namespace's list no longer has.
                let gone: Vec<K> = match self.listing[i].take() {
                    Some(listed) => {
                        let (kept, gone): (BTreeMap<_, _>, BTreeMap<_, _>) =
                            std::mem::take(&mut self.objects[i])
                                .into_iter()
                                .partition(|(name, _)| listed.contains(name));
                        self.objects[i] = kept;
                        gone.into_values().collect()
                    }
                    None => Vec::new(),
                };
                self.listed[i] = true;
                if self.synced {
                    gone.into_iter().map(|o| Ok(Event::Delete(o))).collect()
                } else if self.listed.iter().all(|l| *l) {
                    self.synced = true;
                    self.initial_list()
                } else {
                    Vec::new()
                }
            }
        }
    }

    /// Every namespace's objects as one list; from now on only tombstones are kept.
    fn initial_list(&mut self) -> Vec<Watched<K>> {
        let mut out = vec![Ok(Event::Init)];
        for objects in &mut self.objects {
            for o in objects.values_mut() {
                let full = std::mem::replace(o, (self.tombstone)(o));
                out.push(Ok(Event::InitApply(full)));
            }
        }
        out.push(Ok(Event::InitDone));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::reflector;

    fn cm(ns: &str, name: &str, v: &str) -> ConfigMap {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns},
            "data": {"v": v},
        }))
        .unwrap()
    }

    fn tombstone(o: &ConfigMap) -> ConfigMap {
        ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: o.metadata.name.clone(),
                namespace: o.metadata.namespace.clone(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Feeds (namespace index, event) pairs through a merge into a reflector store;
    /// returns the store's objects as "ns/name=v" and the merged events.
    fn run(n: usize, events: Vec<(usize, Event<ConfigMap>)>) -> (Vec<String>, Vec<String>) {
        let (reader, mut writer) = reflector::store::<ConfigMap>();
        let mut merge = Merge::new(n, tombstone);
        let mut seen = Vec::new();
        for (i, e) in events {
            for out in merge.on(i, Ok(e)) {
                let out = out.unwrap();
                seen.push(match &out {
                    Event::Init => "Init".to_string(),
                    Event::InitDone => "InitDone".to_string(),
                    Event::InitApply(o) => format!("InitApply {}", o.name_any()),
                    Event::Apply(o) => format!("Apply {}", o.name_any()),
                    Event::Delete(o) => format!("Delete {}", o.name_any()),
                });
                writer.apply_watcher_event(&out);
            }
        }
        let mut state: Vec<String> = reader
            .state()
            .iter()
            .map(|o| {
                format!(
                    "{}/{}={}",
                    o.namespace().unwrap_or_default(),
                    o.name_any(),
                    o.data
                        .as_ref()
                        .and_then(|d| d.get("v"))
                        .cloned()
                        .unwrap_or_default()
                )
            })
            .collect();
        state.sort();
        (state, seen)
    }

    fn list(i: usize, objects: &[ConfigMap]) -> Vec<(usize, Event<ConfigMap>)> {
        let mut out = vec![(i, Event::Init)];
        out.extend(objects.iter().map(|o| (i, Event::InitApply(o.clone()))));
        out.push((i, Event::InitDone));
        out
    }

    #[test]
    fn the_initial_list_waits_for_every_namespace_and_holds_all_of_them() {
        let mut events = list(0, &[cm("a", "x", "1")]);
        // a's watch runs on while b still lists: its changes join the initial list.
        events.push((0, Event::Apply(cm("a", "y", "2"))));
        events.push((1, Event::Init));
        events.push((1, Event::InitApply(cm("b", "x", "3"))));
        let (state, seen) = run(2, events.clone());
        assert!(state.is_empty(), "nothing before b listed: {state:?}");
        assert!(seen.is_empty(), "{seen:?}");
        events.push((1, Event::InitDone));
        let (state, seen) = run(2, events);
        assert_eq!(state, ["a/x=1", "a/y=2", "b/x=3"]);
        assert_eq!(seen.first().map(String::as_str), Some("Init"));
        assert_eq!(seen.last().map(String::as_str), Some("InitDone"));
        assert_eq!(seen.len(), 5, "{seen:?}");
    }

    /// The trap of plain interleaving: a's re-list would replace the store with a's
    /// objects alone.
    #[test]
    fn a_relist_of_one_namespace_keeps_the_others_and_drops_what_it_lost() {
        let mut events = list(0, &[cm("a", "x", "1"), cm("a", "gone", "1")]);
        events.extend(list(1, &[cm("b", "x", "2")]));
        // a's watch expires; meanwhile a/gone was deleted and a/x changed.
        events.extend(list(0, &[cm("a", "x", "9"), cm("a", "new", "1")]));
        // Interleaved as they come, a's re-list would replace the whole store.
        let (reader, mut writer) = reflector::store::<ConfigMap>();
        for (_, e) in &events {
            writer.apply_watcher_event(e);
        }
        assert!(
            !reader
                .state()
                .iter()
                .any(|o| o.namespace().as_deref() == Some("b")),
            "the trap this merge avoids"
        );
        let (state, seen) = run(2, events);
        assert_eq!(state, ["a/new=1", "a/x=9", "b/x=2"]);
        assert!(seen.contains(&"Delete gone".to_string()), "{seen:?}");
        assert_eq!(
            seen.iter()
                .filter(|s| *s == "Init" || *s == "InitDone")
                .count(),
            2,
            "one merged initial list only: {seen:?}"
        );
    }

    #[test]
    fn a_list_restarted_before_the_first_sync_forgets_what_vanished_in_between() {
        let mut events = vec![
            (0, Event::Init),
            (0, Event::InitApply(cm("a", "gone", "1"))),
        ];
        events.extend(list(0, &[cm("a", "x", "1")]));
        events.extend(list(1, &[]));
        let (state, _) = run(2, events);
        assert_eq!(state, ["a/x=1"]);
    }

    #[test]
    fn changes_after_the_sync_pass_through() {
        let mut events = list(0, &[cm("a", "x", "1")]);
        events.extend(list(1, &[]));
        events.push((1, Event::Apply(cm("b", "y", "2"))));
        events.push((0, Event::Delete(cm("a", "x", "1"))));
        let (state, seen) = run(2, events);
        assert_eq!(state, ["b/y=2"]);
        assert_eq!(&seen[seen.len() - 2..], ["Apply y", "Delete x"]);
    }

    #[test]
    fn scope_of_no_namespaces_is_the_cluster() {
        assert_eq!(WatchScope::new(&[]), WatchScope::Cluster);
        let scope = WatchScope::new(&["b".into(), "a".into(), "b".into()]);
        assert_eq!(scope, WatchScope::Namespaces(vec!["a".into(), "b".into()]));
        assert!(scope.contains("a") && !scope.contains("c"));
        assert!(WatchScope::Cluster.contains("c"));
    }

    #[test]
    fn namespace_names_are_checked() {
        assert!(parse_namespace("team-a").is_ok());
        for bad in ["", "Team", "-a", "a-", "a_b", "a,b", &"a".repeat(64)] {
            assert!(parse_namespace(bad).is_err(), "{bad:?}");
        }
    }
}
