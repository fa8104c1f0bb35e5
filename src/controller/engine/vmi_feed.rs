//! A fleet run's VMI reads: one paged LIST of the run's selector and a WATCH from it,
//! instead of one GET per target.
//!
//! Each target's first attempt reads its VMI from this feed: as fresh as kube-apiserver's
//! watch cache (what every KubeVirt controller reads), not a quorum read. What a stale read
//! could get wrong is caught where it matters: the shim serves only domains on its own
//! node, and a domain that is not there (migrated, stopped, replaced) answers
//! DomainNotFound/DomainNotRunning, which is transient; every retry reads the VMI with a
//! fresh GET. A VMI the feed has not seen (not listed yet, no longer matching the selector,
//! the feed broken) is read with a GET too, so a miss changes nothing but the cost.
//!
//! Why: on the real control plane a target's GET was about half of the controller's CPU
//! per target and most of the control plane's (a quorum read through etcd), which set the
//! run's rate (bench P6). A list page of 500 and a watch cost the API server and the
//! controller a fraction of 500 GETs.
//!
//! kube-runtime's `watcher` would need a `Resource` with a full `ObjectMeta` (managed
//! fields included, the decode [`VmiForCall`] exists to avoid) and keeps no list/watch
//! ordering of its own that this needs: here the watch's events simply win over the
//! list's, which is older (a continued list is a snapshot at its first page's version).
use crate::api::kubevirt::{VirtualMachineInstance, VmiCallPage, VmiForCall};
use futures::TryStreamExt;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::{Client, Resource};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// A run reads its VMIs from a feed when it has at least this many targets to start: below
/// it a LIST and a WATCH cost more than the GETs they save.
pub const FEED_FROM: usize = 256;

/// Whether a run whose targets are `done` (terminal or not, in the run's order: sorted by
/// name, as the LIST answers) reads from a feed: enough targets to start, and at most a
/// page of finished ones before the first of them. A run resumed half way (a restarted
/// controller) reads with a GET per target: its feed would list the finished half before
/// reaching a target to start, which on a real API server costs as much as the GETs and
/// holds the targets back meanwhile.
pub fn worth_a_feed(done: impl IntoIterator<Item = bool>) -> bool {
    let (mut finished_before, mut to_start) = (0usize, 0usize);
    for done in done {
        if done {
            if to_start == 0 {
                finished_before += 1;
            }
        } else {
            to_start += 1;
        }
    }
    to_start >= FEED_FROM && finished_before <= PAGE as usize
}

/// VMIs asked for per LIST page (as resolving a selector does).
const PAGE: u32 = crate::controller::targets::LIST_PAGE;

/// How long one watch request lasts before it is renewed from the last version seen.
const WATCH_SECONDS: u32 = 290;

/// What the feed knows of one target not started yet.
#[derive(Debug)]
enum Seen {
    Nothing,
    Listed(Box<VmiForCall>),
    Watched(Box<VmiForCall>),
    Deleted,
}

/// The feed's state: pure, so its merge rules are tested without a server.
#[derive(Debug, Default)]
pub struct Feed {
    /// Targets of the run not started yet (by VM name), and what was seen of each.
    wanted: HashMap<String, Seen>,
    /// The last name of the list's pages so far: a LIST answers in key order, so every
    /// VMI named up to here that matches the selector has been seen.
    listed_to: Option<String>,
    /// The list is complete (only the watch goes on).
    listed_all: bool,
    /// The feed stopped (its watch failed or expired): every target reads with a GET.
    broken: bool,
    /// Reads served, and misses (read with a GET instead).
    served: u64,
    missed: u64,
}

impl Feed {
    /// A feed for these targets (names of VMs not started yet).
    pub fn for_targets<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            wanted: names
                .into_iter()
                .map(|n| (n.to_string(), Seen::Nothing))
                .collect(),
            ..Self::default()
        }
    }

    /// One page of the list, in key order; `last` says whether it was the last page.
    pub fn listed_page(&mut self, items: Vec<VmiForCall>, last: bool) {
        if let Some(name) = items.last().map(|v| v.name().to_string()) {
            self.listed_to = Some(name);
        }
        items.into_iter().for_each(|v| self.listed(v));
        self.listed_all |= last;
    }

    /// Whether `vm`'s first attempt can start now: the list has passed its name (whatever
    /// it found there), or the feed is done listing or broken. Otherwise its start waits
    /// for the next page, so that it reads from the feed instead of with a GET.
    pub fn covers(&self, vm: &str) -> bool {
        self.broken || self.listed_all || self.listed_to.as_deref().is_some_and(|to| vm <= to)
    }

    /// A VMI from a list page: kept unless the watch has already said something newer.
    pub fn listed(&mut self, vmi: VmiForCall) {
        if let Some(seen) = self.wanted.get_mut(vmi.name())
            && matches!(seen, Seen::Nothing)
        {
            *seen = Seen::Listed(Box::new(vmi));
        }
    }

    /// A watch event: newer than any list page and any earlier event.
    pub fn watched(&mut self, event: WatchEvent<VmiForCall>) {
        let (name, now) = match event {
            WatchEvent::Added(v) | WatchEvent::Modified(v) => {
                (v.name().to_string(), Seen::Watched(Box::new(v)))
            }
            WatchEvent::Deleted(v) => (v.name().to_string(), Seen::Deleted),
            WatchEvent::Bookmark(_) | WatchEvent::Error(_) => return,
        };
        if let Some(seen) = self.wanted.get_mut(&name) {
            *seen = now;
        }
    }

    /// The feed can no longer be trusted: forget everything, every target reads with a GET.
    pub fn break_off(&mut self) {
        self.broken = true;
        self.wanted = HashMap::new();
    }

    /// The VMI for `vm`'s first attempt, if the feed has one; the target is no longer
    /// wanted either way (its retries read fresh). None: read it with a GET.
    pub fn take(&mut self, vm: &str) -> Option<VirtualMachineInstance> {
        let read = match self.wanted.remove(vm) {
            Some(Seen::Listed(v) | Seen::Watched(v)) => Some(v.into_vmi()),
            // Deleted: the GET says VMNotFound, as without a feed.
            Some(Seen::Nothing | Seen::Deleted) | None => None,
        };
        if read.is_some() {
            self.served += 1;
        } else {
            self.missed += 1;
        }
        read
    }

    /// Reads served by the feed, and misses.
    pub fn counts(&self) -> (u64, u64) {
        (self.served, self.missed)
    }
}

/// A run's feed, shared by the scheduler (which runs [`follow`]) and its targets.
#[derive(Debug)]
pub struct RunVmis {
    feed: Mutex<Feed>,
    /// Bumped when the list gets further (or the feed stops): a start waiting for
    /// [`Feed::covers`] looks again.
    progress: watch::Sender<u64>,
}

impl RunVmis {
    pub fn new(feed: Feed) -> Self {
        Self {
            feed: Mutex::new(feed),
            progress: watch::Sender::new(0),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Feed) -> T) -> T {
        // A panic while holding the lock leaves a feed that is at worst incomplete: misses
        // read with a GET.
        let mut feed = self.feed.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut feed)
    }

    fn progressed(&self) {
        self.progress.send_modify(|n| *n += 1);
    }

    /// A receiver that sees each step of the list's progress.
    pub fn progress(&self) -> watch::Receiver<u64> {
        self.progress.subscribe()
    }

    /// See [`Feed::covers`].
    pub fn covers(&self, vm: &str) -> bool {
        self.with(|f| f.covers(vm))
    }

    /// See [`Feed::take`].
    pub fn take(&self, vm: &str) -> Option<VirtualMachineInstance> {
        self.with(|f| f.take(vm))
    }

    pub fn counts(&self) -> (u64, u64) {
        self.with(|f| f.counts())
    }
}

/// Fill `feed` from a paged LIST of `selector` in `ns`, then follow a WATCH from the list's
/// version, renewing it when the server ends it. Returns only when the feed broke (the
/// run drops this future when it ends); the run goes on with a GET per target.
pub async fn follow(client: Client, ns: String, selector: String, feed: Arc<RunVmis>) {
    let why = match list_then_watch(&client, &ns, &selector, &feed).await {
        Ok(()) => "the watch ended".to_string(),
        Err(e) => e.to_string(),
    };
    feed.with(Feed::break_off);
    feed.progressed();
    tracing::info!(namespace = %ns, error = %why, "the run's VMI feed stopped; its targets read their VMI one by one");
}

async fn list_then_watch(
    client: &Client,
    ns: &str,
    selector: &str,
    feed: &RunVmis,
) -> Result<(), kube::Error> {
    let url = VirtualMachineInstance::url_path(&(), Some(ns));
    let mut cont: Option<String> = None;
    let mut version: Option<String> = None;
    loop {
        let mut params = ListParams::default().labels(selector).limit(PAGE);
        if let Some(token) = &cont {
            params = params.continue_token(token);
        }
        let mut req = kube::core::Request::new(&url)
            .list(&params)
            .map_err(kube::Error::BuildRequest)?;
        req.extensions_mut().insert("list");
        let page = client.request::<VmiCallPage>(req).await?;
        // A continued list is served at its first page's version: watch from that one.
        if version.is_none() {
            version = page.resource_version().map(str::to_string);
        }
        cont = page.next_page().map(str::to_string);
        feed.with(|f| f.listed_page(page.into_items(), cont.is_none()));
        feed.progressed();
        if cont.is_none() {
            break;
        }
    }
    let Some(mut version) = version else {
        return Ok(());
    };
    tracing::debug!(namespace = %ns, "the run's VMI feed listed its VMIs; watching");
    loop {
        let params = WatchParams::default()
            .labels(selector)
            .timeout(WATCH_SECONDS);
        let mut req = kube::core::Request::new(&url)
            .watch(&params, &version)
            .map_err(kube::Error::BuildRequest)?;
        req.extensions_mut().insert("watch");
        let events = client.request_events::<VmiForCall>(req).await?;
        futures::pin_mut!(events);
        while let Some(event) = events.try_next().await? {
            let seen_at = match &event {
                WatchEvent::Added(v) | WatchEvent::Modified(v) | WatchEvent::Deleted(v) => {
                    v.resource_version().map(str::to_string)
                }
                WatchEvent::Bookmark(b) => Some(b.metadata.resource_version.clone()),
                // 410 Gone and the like: the events between are lost; stop trusting it.
                WatchEvent::Error(status) => {
                    return Err(kube::Error::Api(status.clone()));
                }
            };
            feed.with(|f| f.watched(event));
            if let Some(v) = seen_at {
                version = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vmi(name: &str, node: &str, rv: &str) -> VmiForCall {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "fleet", "resourceVersion": rv},
            "status": {"phase": "Running", "nodeName": node},
        }))
        .expect("a VMI decodes")
    }

    fn node_of(read: Option<VirtualMachineInstance>) -> Option<String> {
        read.and_then(|v| v.node_name().map(str::to_string))
    }

    fn feed(names: &[&str]) -> Feed {
        Feed::for_targets(names.iter().copied())
    }

    #[test]
    fn a_listed_vmi_is_read_by_its_targets_first_attempt_once() {
        let mut f = feed(&["vm-1"]);
        f.listed(vmi("vm-1", "node-a", "10"));
        assert_eq!(node_of(f.take("vm-1")).as_deref(), Some("node-a"));
        assert!(f.take("vm-1").is_none(), "a retry reads with a GET");
        assert_eq!(f.counts(), (1, 1));
    }

    #[test]
    fn a_watched_change_wins_over_the_list_whatever_the_order() {
        let mut f = feed(&["vm-1", "vm-2"]);
        // vm-1 migrated after the list's snapshot; its page arrives after the event.
        f.watched(WatchEvent::Modified(vmi("vm-1", "node-b", "12")));
        f.listed(vmi("vm-1", "node-a", "10"));
        // vm-2: listed first, then moved.
        f.listed(vmi("vm-2", "node-a", "10"));
        f.watched(WatchEvent::Modified(vmi("vm-2", "node-c", "13")));
        assert_eq!(node_of(f.take("vm-1")).as_deref(), Some("node-b"));
        assert_eq!(node_of(f.take("vm-2")).as_deref(), Some("node-c"));
    }

    #[test]
    fn a_deleted_vmi_is_read_with_a_get_even_if_a_later_page_lists_it() {
        let mut f = feed(&["vm-1"]);
        f.watched(WatchEvent::Deleted(vmi("vm-1", "node-a", "12")));
        f.listed(vmi("vm-1", "node-a", "10"));
        assert!(f.take("vm-1").is_none());
    }

    #[test]
    fn vmis_that_are_not_targets_to_start_are_not_kept() {
        let mut f = feed(&["vm-1"]);
        f.listed(vmi("done-already", "node-a", "10"));
        f.watched(WatchEvent::Added(vmi("new-vm", "node-a", "11")));
        assert_eq!(f.wanted.len(), 1);
        assert!(f.take("done-already").is_none());
    }

    #[test]
    fn a_target_started_is_not_refilled_by_later_events() {
        let mut f = feed(&["vm-1"]);
        f.listed(vmi("vm-1", "node-a", "10"));
        assert!(f.take("vm-1").is_some());
        f.watched(WatchEvent::Modified(vmi("vm-1", "node-b", "11")));
        assert!(f.wanted.is_empty());
    }

    #[test]
    fn a_broken_feed_serves_nothing_and_keeps_nothing() {
        let mut f = feed(&["vm-1", "vm-2"]);
        f.listed(vmi("vm-1", "node-a", "10"));
        f.break_off();
        f.listed(vmi("vm-2", "node-a", "10"));
        assert!(f.take("vm-1").is_none());
        assert!(f.take("vm-2").is_none());
        assert!(f.wanted.is_empty());
    }

    #[test]
    fn a_start_waits_until_the_list_has_passed_its_name() {
        let mut f = feed(&["vm-1", "vm-3", "vm-5"]);
        assert!(!f.covers("vm-1"), "nothing listed yet");
        f.listed_page(
            vec![vmi("vm-1", "node-a", "10"), vmi("vm-2", "node-a", "10")],
            false,
        );
        assert!(f.covers("vm-1"));
        assert!(!f.covers("vm-3"));
        // A page that names none of the targets still moves the list on.
        f.listed_page(vec![vmi("vm-4", "node-a", "10")], false);
        assert!(
            f.covers("vm-3"),
            "vm-3 did not match the selector any more: read with a GET"
        );
        assert!(f.take("vm-3").is_none());
        f.listed_page(vec![], true);
        assert!(f.covers("vm-9"), "the list is complete");
    }

    #[test]
    fn nothing_waits_for_a_broken_feed() {
        let mut f = feed(&["vm-1"]);
        f.break_off();
        assert!(f.covers("vm-1"));
    }

    #[test]
    fn a_fresh_fleet_run_reads_from_a_feed_a_small_or_half_done_one_does_not() {
        let fresh = vec![false; FEED_FROM];
        assert!(worth_a_feed(fresh.iter().copied()));
        assert!(!worth_a_feed(vec![false; FEED_FROM - 1]));
        let half_done = (0..10_000).map(|i| i < 5_000);
        assert!(!worth_a_feed(half_done));
        // A few finished (a paused run, retried failures) do not matter.
        let few_done = (0..10_000).map(|i| i < 100 || i % 7 == 0);
        assert!(worth_a_feed(few_done));
    }

    #[test]
    fn an_unseen_target_is_read_with_a_get() {
        let mut f = feed(&["vm-1"]);
        assert!(f.take("vm-1").is_none());
        assert_eq!(f.counts(), (0, 1));
    }
}
