//! Watches: the change bus every watch listens on, the bounded history a watch resumes
//! from (410 Gone when older), and the filters that decide what a watcher sees.

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::broadcast;

use super::super::error::ApiError;
use super::super::resources::ResKey;
use super::super::selector::{FieldSelector, LabelSelector};
use super::{Inner, ObjKey};

/// Watch events kept for resuming watches from an older resourceVersion.
pub(crate) const HISTORY_LIMIT: usize = 10_000;
/// Messages a watcher may fall behind before it is told 410 Gone and must relist.
pub(crate) const BUS_CAPACITY: usize = 16_384;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change, as remembered for watches. `old` lets filtered watches see objects leave.
#[derive(Debug)]
pub(crate) struct Record {
    pub rv: u64,
    pub res: ResKey,
    pub ns: String,
    pub ty: EventType,
    pub object: Arc<Value>,
    pub old: Option<Arc<Value>>,
}

#[derive(Clone, Debug)]
pub(crate) enum BusMsg {
    Event(Arc<Record>),
    /// Test fault: every open watch ends with 410 Gone.
    Expire,
}

/// Which objects a list or watch sees.
#[derive(Clone, Debug)]
pub(crate) struct Filter {
    pub res: ResKey,
    pub ns: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    /// No label or field selector: every key in range is an item of the list.
    pub fn is_unfiltered(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    pub fn matches(&self, ns: &str, obj: &Value) -> bool {
        self.ns.as_deref().is_none_or(|n| n == ns)
            && self.labels.matches(obj)
            && self.fields.matches(obj)
    }

    /// What a watcher with this filter sees of a change: objects that stop matching are
    /// DELETED for it and objects that start matching are ADDED, as on the real server.
    pub fn translate(&self, rec: &Record) -> Option<(EventType, Arc<Value>)> {
        if rec.res != self.res || self.ns.as_deref().is_some_and(|n| n != rec.ns) {
            return None;
        }
        let now = self.matches(&rec.ns, &rec.object);
        match rec.ty {
            EventType::Modified => {
                let before = rec.old.as_ref().is_some_and(|o| self.matches(&rec.ns, o));
                match (before, now) {
                    (true, true) => Some((EventType::Modified, rec.object.clone())),
                    (false, true) => Some((EventType::Added, rec.object.clone())),
                    (true, false) => Some((EventType::Deleted, rec.object.clone())),
                    (false, false) => None,
                }
            }
            ty => now.then(|| (ty, rec.object.clone())),
        }
    }
}

/// What a new watch starts with.
pub(crate) struct WatchStart {
    pub initial: Vec<(EventType, Arc<Value>)>,
    pub rx: broadcast::Receiver<BusMsg>,
    pub rv: u64,
}

impl Inner {
    /// Every change after this resourceVersion can still be replayed to a watch.
    pub fn history_from(&self) -> u64 {
        self.history_from
    }

    pub(super) fn emit(
        &mut self,
        ty: EventType,
        k: &ObjKey,
        object: Arc<Value>,
        old: Option<Arc<Value>>,
    ) {
        let rec = Arc::new(Record {
            rv: self.rv,
            res: k.res.clone(),
            ns: k.ns.clone(),
            ty,
            object,
            old,
        });
        self.history.push_back(rec.clone());
        while self.history.len() > HISTORY_LIMIT {
            if let Some(front) = self.history.pop_front() {
                self.history_from = front.rv;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.bus.send(BusMsg::Event(rec));
    }

    /// Starts a watch: synthetic ADDED events for rv absent/"0", else replay after `rv`.
    pub fn watch(&self, filter: &Filter, rv: Option<u64>) -> Result<WatchStart, ApiError> {
        let rx = self.bus.subscribe();
        let initial = match rv {
            None | Some(0) => self
                .list(filter)
                .into_iter()
                .map(|o| (EventType::Added, o))
                .collect(),
            Some(n) => {
                if n < self.history_from {
                    return Err(ApiError::gone(format!(
                        "too old resource version: {n} ({})",
                        self.history_from
                    )));
                }
                self.history
                    .iter()
                    .filter(|r| r.rv > n)
                    .filter_map(|r| filter.translate(r))
                    .collect()
            }
        };
        Ok(WatchStart {
            initial,
            rx,
            rv: self.rv,
        })
    }

    /// Test fault: forget history up to now and end every open watch with 410.
    pub fn expire_watches(&mut self) {
        self.history.clear();
        self.history_from = self.rv;
        let _ = self.bus.send(BusMsg::Expire);
    }
}
