//! `libvirt` backend: agent calls through the libvirt API (virt crate).
//!
//! libvirt calls block, so each runs on tokio's blocking pool, bounded by the agent timeout
//! plus a margin. libvirt itself is told the agent timeout on every domain before each call
//! (`virDomainAgentSetResponseTimeout`): without it a hung agent blocks a call for good.
//! There is no lock of ours around calls, so a hung agent only delays its own domain.
//!
//! Connections are cached per target and re-opened when libvirtd went away (connection
//! error codes or `is_alive() == false`): the call is then retried once, which is safe
//! because every call re-sends the same value.

pub mod ffi;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use async_trait::async_trait;
use secrecy::ExposeSecret;
use serde_json::Value;
use virt::connect::Connect;
use virt::domain::Domain;

use super::agent::{AgentCall, AgentReply, GuestAgent, expand_template, settle};
use super::errors;
use super::qga::{parse_guest_info, parse_os_info};
use crate::api::validate::{PublicKeys, UserName, ValidDomain};
use crate::api::wire::{ProbeResponse, ShimError, ShimErrorReason};

/// Default domain name: KubeVirt's `<namespace>_<name>`.
pub const DEFAULT_DOMAIN_TEMPLATE: &str = "{namespace}_{name}";

/// Where KubeVirt's per-launcher virtqemud socket lives below `<pods dir>/<pod UID>/`.
pub const KUBEVIRT_SOCKET_SUBPATH: &str =
    "volumes/kubernetes.io~empty-dir/libvirt-runtime/virtqemud-sock";

/// Extra time beyond the agent timeout before we give up on a blocking libvirt call (it
/// also covers lookup and connection setup).
const CALL_MARGIN: Duration = Duration::from_secs(5);

/// How the backend finds a domain's libvirt connection and name.
#[derive(Clone, Debug)]
pub enum Locator {
    /// One libvirt URI for the node.
    LibvirtUri {
        uri: String,
        domain_template: String,
    },
    /// KubeVirt: a virtqemud socket per virt-launcher pod (needs `launcherPodUid`).
    Kubevirt {
        kubelet_pods_dir: PathBuf,
        domain_template: String,
        /// Where short symlinks to over-long socket paths are made (see [`short_socket_path`]).
        socket_link_dir: PathBuf,
    },
}

/// A resolved target: the URIs to try (first that opens wins) and the domain name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Cache key: the URI, or the socket path for `kubevirt`.
    pub key: String,
    pub uris: Vec<String>,
    pub domain_name: String,
}

impl Locator {
    /// Where `domain` lives. Blocking (the kubevirt locator looks at the launcher socket
    /// and makes a short link): `LibvirtAgent::run` calls it on the blocking pool.
    #[allow(clippy::disallowed_methods)] // blocking helper, run in spawn_blocking
    pub fn locate(&self, domain: &ValidDomain) -> Result<Target, ShimError> {
        match self {
            Self::LibvirtUri {
                uri,
                domain_template,
            } => Ok(Target {
                key: uri.clone(),
                uris: vec![uri.clone()],
                domain_name: expand_template(domain_template, domain),
            }),
            Self::Kubevirt {
                kubelet_pods_dir,
                domain_template,
                socket_link_dir,
            } => {
                let Some(uid) = domain.launcher_pod_uid() else {
                    return Err(ShimError::invalid(
                        "domain.launcherPodUid is required by the kubevirt locator",
                    ));
                };
                let socket = kubelet_pods_dir.join(uid).join(KUBEVIRT_SOCKET_SUBPATH);
                if !socket.exists() {
                    return Err(ShimError::new(
                        ShimErrorReason::DomainNotFound,
                        format!(
                            "no virt-launcher libvirt socket for pod {uid} on this node ({})",
                            socket.display()
                        ),
                    ));
                }
                let key = socket.display().to_string();
                let socket = short_socket_path(socket_link_dir, &socket)?
                    .display()
                    .to_string();
                // Root launchers run a system-mode daemon, non-root ones a session-mode
                // one; the daemon rejects the other mode's URI, so try both.
                Ok(Target {
                    uris: vec![
                        format!("qemu+unix:///system?socket={socket}"),
                        format!("qemu+unix:///session?socket={socket}"),
                    ],
                    key,
                    domain_name: expand_template(domain_template, domain),
                })
            }
        }
    }
}

/// Longest socket path we hand to libvirt as is (`sun_path` holds 108 bytes).
const MAX_SOCKET_PATH: usize = 100;

/// A connectable path for `socket`. KubeVirt's launcher sockets
/// (`/var/lib/kubelet/pods/<uid>/volumes/kubernetes.io~empty-dir/libvirt-runtime/virtqemud-sock`,
/// 121 bytes) do not fit in a unix socket address, so longer paths get a short symlink in
/// `link_dir` (0700, ours); the kernel follows it on connect without the length limit.
/// Blocking: called from [`Locator::locate`] on the blocking pool.
#[allow(clippy::disallowed_methods)] // blocking helper, run in spawn_blocking
pub fn short_socket_path(link_dir: &Path, socket: &Path) -> Result<PathBuf, ShimError> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::{DirBuilderExt, symlink};

    if socket.as_os_str().len() <= MAX_SOCKET_PATH {
        return Ok(socket.to_path_buf());
    }
    let fail = |what: &str, e: std::io::Error| {
        ShimError::internal(format!("{what} in {}: {e}", link_dir.display()))
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(link_dir)
        .map_err(|e| fail("creating the socket link dir", e))?;
    let digest = Sha256::digest(socket.as_os_str().as_encoded_bytes());
    let link = link_dir.join(format!("{}.sock", hex::encode(&digest[..8])));
    for _ in 0..2 {
        match std::fs::read_link(&link) {
            Ok(target) if target == socket => return Ok(link),
            Ok(_) => {
                let _ = std::fs::remove_file(&link);
            }
            Err(_) => {}
        }
        match symlink(socket, &link) {
            Ok(()) => return Ok(link),
            // Another request made it at the same moment: read it again.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(fail("linking a launcher socket", e)),
        }
    }
    Err(ShimError::internal(format!(
        "cannot make a stable socket link for {}",
        socket.display()
    )))
}

/// Open connections by target key.
#[derive(Default)]
struct ConnCache {
    conns: Mutex<HashMap<String, Connect>>,
}

impl ConnCache {
    /// A live connection for `target` (blocking: may open one).
    fn get(&self, target: &Target) -> Result<Connect, virt::error::Error> {
        let cached = self.lock().get(&target.key).cloned();
        if let Some(conn) = cached {
            if conn.is_alive().unwrap_or(false) {
                return Ok(conn);
            }
            self.forget(&target.key);
        }
        // Opened outside the map lock: a slow libvirtd must not stall other targets.
        let mut last = None;
        for uri in &target.uris {
            match Connect::open(Some(uri)) {
                Ok(conn) => {
                    tracing::debug!(%uri, "opened libvirt connection");
                    self.lock().insert(target.key.clone(), conn.clone());
                    return Ok(conn);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(virt::error::Error::last_error))
    }

    fn forget(&self, key: &str) {
        self.lock().remove(key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Connect>> {
        // The map stays consistent even if a holder panicked.
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn code_of(e: &virt::error::Error) -> u32 {
    e.code().to_raw()
}

fn to_shim_error(e: &virt::error::Error) -> ShimError {
    errors::from_libvirt(code_of(e), e.message())
}

pub struct LibvirtAgent {
    locator: Locator,
    timeout: Duration,
    conns: Arc<ConnCache>,
    /// One agent call per domain inside libvirt at a time. libvirt queues calls to one
    /// domain anyway, and each queued call holds one of the connection's few request slots
    /// (libvirtd's max_client_requests, default 5): without this gate a handful of calls to
    /// one hung guest would stall every other domain on the same connection. Entries go
    /// away when idle ([`Gates`]), so the map does not grow with every domain ever called.
    gates: Gates,
}

/// One single-permit semaphore per domain, kept only while some call holds or waits for it.
#[derive(Default)]
struct Gates {
    map: Arc<Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>>,
}

/// A call's turn on its domain; dropping it frees the turn and, if nobody else holds or
/// waits for the domain's gate, removes the gate.
struct GatePermit {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    key: String,
    map: Arc<Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>>,
}

impl Gates {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Semaphore>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait (at most `timeout`) for the turn on `key`.
    async fn acquire(&self, key: &str, timeout: Duration) -> Option<GatePermit> {
        let gate = {
            let mut map = self.lock();
            // Gates only the map holds are idle; also catches any a dropped waiter left.
            map.retain(|_, g| Arc::strong_count(g) > 1);
            map.entry(key.to_owned())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(1)))
                .clone()
        };
        let permit = tokio::time::timeout(timeout, gate.acquire_owned()).await;
        let permit = match permit {
            Ok(Ok(p)) => p,
            _ => {
                self.forget_if_idle(key);
                return None;
            }
        };
        Some(GatePermit {
            permit: Some(permit),
            key: key.to_owned(),
            map: self.map.clone(),
        })
    }

    fn forget_if_idle(&self, key: &str) {
        forget_if_idle(&self.map, key);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

fn forget_if_idle(map: &Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>, key: &str) {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if map.get(key).is_some_and(|g| Arc::strong_count(g) == 1) {
        map.remove(key);
    }
}

impl Drop for GatePermit {
    fn drop(&mut self) {
        // The permit holds the gate too: release it before looking.
        drop(self.permit.take());
        forget_if_idle(&self.map, &self.key);
    }
}

impl LibvirtAgent {
    pub fn new(locator: Locator, timeout: Duration) -> Self {
        static QUIET: Once = Once::new();
        // libvirt's default error handler prints every error on stderr.
        QUIET.call_once(virt::error::clear_error_callback);
        Self {
            locator,
            timeout,
            conns: Arc::default(),
            gates: Default::default(),
        }
    }

    fn timeout_secs(&self) -> i32 {
        i32::try_from(self.timeout.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// Run `op` on the domain on the blocking pool, with the agent timeout set first.
    async fn run<T, F>(&self, domain: &ValidDomain, op: F) -> Result<T, ShimError>
    where
        T: Send + 'static,
        F: Fn(&Domain, i32) -> Result<T, virt::error::Error> + Send + 'static,
    {
        let conns = self.conns.clone();
        let secs = self.timeout_secs();
        let Some(permit) = self
            .gates
            .acquire(&domain.to_string(), self.timeout + CALL_MARGIN)
            .await
        else {
            return Err(ShimError::new(
                ShimErrorReason::AgentTimeout,
                format!("an earlier agent call on {domain} is still running (agent hung?)"),
            ));
        };
        // Locating may touch the file system (the kubevirt locator's socket links): on the
        // blocking pool too. The permit lives as long as the blocking call, even if we
        // stop waiting for it.
        let locator = self.locator.clone();
        let domain_ref = domain.clone();
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let target = locator.locate(&domain_ref)?;
            call_blocking(&conns, &target, secs, &op)
        });
        match tokio::time::timeout(self.timeout + CALL_MARGIN, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(ShimError::internal(format!("libvirt call failed: {join}"))),
            Err(_) => Err(ShimError::new(
                ShimErrorReason::AgentTimeout,
                format!(
                    "libvirt call on {domain} did not return within {:?}; the call may still be applied",
                    self.timeout + CALL_MARGIN
                ),
            )),
        }
    }
}

fn call_blocking<T>(
    conns: &ConnCache,
    target: &Target,
    secs: i32,
    op: &dyn Fn(&Domain, i32) -> Result<T, virt::error::Error>,
) -> Result<T, ShimError> {
    let mut retried = false;
    loop {
        let conn = conns.get(target).map_err(|e| {
            ShimError::internal(format!(
                "cannot connect to libvirt at {}: {}",
                target.key,
                e.message()
            ))
        })?;
        let result = conn
            .lookup_domain_by_name(&target.domain_name)
            .and_then(|dom| {
                ffi::set_agent_response_timeout(&dom, secs)?;
                op(&dom, secs)
            });
        match result {
            Ok(v) => return Ok(v),
            Err(e) => {
                let dead =
                    errors::is_connection_error(code_of(&e)) || !conn.is_alive().unwrap_or(false);
                if dead && !retried {
                    tracing::info!(key = %target.key, "libvirt connection lost; reconnecting");
                    conns.forget(&target.key);
                    retried = true;
                    continue;
                }
                return Err(to_shim_error(&e));
            }
        }
    }
}

fn agent_return(raw: &str) -> Result<Value, ShimError> {
    let v: Value = serde_json::from_str(raw)
        .map_err(|e| ShimError::internal(format!("guest agent sent invalid JSON: {e}")))?;
    Ok(v.get("return").cloned().unwrap_or(Value::Null))
}

impl LibvirtAgent {
    async fn guest_info(&self, domain: &ValidDomain) -> Result<ProbeResponse, ShimError> {
        let (info, os) = self
            .run(domain, |dom, secs| {
                let info = dom.qemu_agent_command(r#"{"execute":"guest-info"}"#, secs, 0)?;
                // OS info is a nicety: its failure must not fail the probe.
                let os = dom
                    .qemu_agent_command(r#"{"execute":"guest-get-osinfo"}"#, secs, 0)
                    .ok();
                Ok((info, os))
            })
            .await?;
        let mut probe = parse_guest_info(&agent_return(&info)?);
        if let Some(os) = os {
            probe.os = agent_return(&os).ok().map(|v| parse_os_info(&v));
        }
        Ok(probe)
    }

    /// `flags`: one of the `ffi::SSH_KEYS_*` constants. No keys to append or remove is
    /// nothing to do.
    async fn set_keys(
        &self,
        domain: &ValidDomain,
        user: &UserName,
        keys: &PublicKeys,
        flags: u32,
    ) -> Result<(), ShimError> {
        if keys.is_empty() && flags != ffi::SSH_KEYS_REPLACE {
            return Ok(());
        }
        let name = user.as_str().to_owned();
        let keys = keys.as_slice().to_vec();
        self.run(domain, move |dom, _| {
            ffi::authorized_ssh_keys_set(dom, &name, &keys, flags)
        })
        .await
    }
}

#[async_trait]
impl GuestAgent for LibvirtAgent {
    async fn execute(
        &self,
        domain: &ValidDomain,
        call: AgentCall<'_>,
    ) -> Result<AgentReply, ShimError> {
        let result = match call {
            AgentCall::Probe => self.guest_info(domain).await.map(AgentReply::Probe),
            AgentCall::SetPassword { user, password } => {
                let secret = password.secret().clone();
                let name = user.as_str().to_owned();
                // VIR_DOMAIN_PASSWORD_ENCRYPTED
                let flags = u32::from(password.crypted());
                self.run(domain, move |dom, _| {
                    dom.set_user_password(&name, secret.expose_secret(), flags)
                })
                .await
                .map(|()| AgentReply::Done)
            }
            AgentCall::GetSshKeys { user } => {
                let name = user.as_str().to_owned();
                self.run(domain, move |dom, _| {
                    ffi::authorized_ssh_keys_get(dom, &name)
                })
                .await
                .map(AgentReply::Keys)
            }
            AgentCall::AddSshKeys { user, keys, reset } => {
                let flags = if reset {
                    ffi::SSH_KEYS_REPLACE
                } else {
                    ffi::SSH_KEYS_APPEND
                };
                self.set_keys(domain, user, keys, flags)
                    .await
                    .map(|()| AgentReply::Done)
            }
            AgentCall::RemoveSshKeys { user, keys } => self
                .set_keys(domain, user, keys, ffi::SSH_KEYS_REMOVE)
                .await
                .map(|()| AgentReply::Done),
        };
        settle(self, domain, call, result).await
    }

    async fn ready(&self) -> Result<(), ShimError> {
        let Locator::LibvirtUri { uri, .. } = &self.locator else {
            // Per-launcher sockets come and go with VMs; nothing node-wide to check.
            return Ok(());
        };
        let target = Target {
            key: uri.clone(),
            uris: vec![uri.clone()],
            domain_name: String::new(),
        };
        let conns = self.conns.clone();
        let task = tokio::task::spawn_blocking(move || conns.get(&target).map(drop));
        match tokio::time::timeout(self.timeout + CALL_MARGIN, task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(ShimError::internal(format!(
                "libvirt not reachable: {}",
                e.message()
            ))),
            Ok(Err(join)) => Err(ShimError::internal(format!(
                "readiness check failed: {join}"
            ))),
            Err(_) => Err(ShimError::internal(
                "libvirt did not answer the readiness check",
            )),
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // test files
mod tests {
    use super::*;
    use crate::api::validate;
    use crate::api::wire::DomainRef;

    const UID: &str = "0b9c5a4e-8d7f-4f3a-9e2b-1c2d3e4f5a6b";

    fn domain(uid: Option<&str>) -> ValidDomain {
        let mut d = DomainRef::new("prod", "db-0");
        d.launcher_pod_uid = uid.map(str::to_owned);
        validate::domain(&d).unwrap()
    }

    fn kubevirt(pods: &std::path::Path) -> Locator {
        Locator::Kubevirt {
            kubelet_pods_dir: pods.to_path_buf(),
            domain_template: DEFAULT_DOMAIN_TEMPLATE.into(),
            socket_link_dir: pods.join("links"),
        }
    }

    #[test]
    fn libvirt_uri_locator_uses_the_template() {
        let l = Locator::LibvirtUri {
            uri: "qemu:///system".into(),
            domain_template: DEFAULT_DOMAIN_TEMPLATE.into(),
        };
        let t = l.locate(&domain(None)).unwrap();
        assert_eq!(t.uris, ["qemu:///system"]);
        assert_eq!(t.domain_name, "prod_db-0");
    }

    #[test]
    fn kubevirt_locator_finds_the_launcher_socket() {
        let pods = tempfile::tempdir().unwrap();
        let sock = pods.path().join(UID).join(KUBEVIRT_SOCKET_SUBPATH);
        std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
        std::fs::write(&sock, "").unwrap();
        let t = kubevirt(pods.path()).locate(&domain(Some(UID))).unwrap();
        assert_eq!(t.key, sock.display().to_string());
        assert!(t.uris[0].starts_with("qemu+unix:///system?socket="));
        let used = t.uris[0].split_once("socket=").unwrap().1;
        assert!(used.len() <= MAX_SOCKET_PATH, "{used}");
        assert_eq!(
            std::fs::canonicalize(used).unwrap(),
            std::fs::canonicalize(&sock).unwrap()
        );
        assert_eq!(t.domain_name, "prod_db-0");
    }

    #[test]
    fn kubevirt_locator_without_socket_is_domain_not_found() {
        let pods = tempfile::tempdir().unwrap();
        let e = kubevirt(pods.path())
            .locate(&domain(Some(UID)))
            .unwrap_err();
        assert_eq!(e.reason, ShimErrorReason::DomainNotFound);
    }

    #[test]
    fn kubevirt_locator_needs_the_launcher_pod_uid() {
        let pods = tempfile::tempdir().unwrap();
        let e = kubevirt(pods.path()).locate(&domain(None)).unwrap_err();
        assert_eq!(e.reason, ShimErrorReason::InvalidArgument);
    }

    #[test]
    fn short_socket_paths_are_used_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let p = Path::new("/run/libvirt/libvirt-sock");
        assert_eq!(short_socket_path(dir.path(), p).unwrap(), p);
    }

    #[test]
    fn long_socket_paths_get_a_stable_short_link() {
        let dir = tempfile::tempdir().unwrap();
        let long = dir.path().join("x".repeat(120));
        let a = short_socket_path(&dir.path().join("l"), &long).unwrap();
        let b = short_socket_path(&dir.path().join("l"), &long).unwrap();
        assert_eq!(a, b);
        assert_eq!(std::fs::read_link(&a).unwrap(), long);
    }

    /// Issue 18: the per-domain gates do not grow with every domain ever called.
    #[tokio::test]
    async fn per_domain_gates_are_removed_when_idle() {
        let agent = LibvirtAgent::new(
            Locator::LibvirtUri {
                uri: "test:///default".into(),
                domain_template: DEFAULT_DOMAIN_TEMPLATE.into(),
            },
            Duration::from_secs(2),
        );
        for i in 0..300 {
            let d = crate::api::validate::domain(&crate::api::wire::DomainRef::new(
                "ns",
                format!("vm-{i}"),
            ))
            .unwrap();
            let _ = agent.probe(&d).await;
        }
        let left = agent.gates.len();
        assert_eq!(left, 0, "{left} idle gates left behind");
    }
}
