//! `qga-socket` backend: QGA JSON spoken directly on a per-VM unix socket (Proxmox-style
//! `/var/run/qemu-server/<id>.qga`, or the lab's host qemu-ga instances).
//!
//! Hand-written instead of the `qapi` crate: qapi 0.15 synchronises with plain `guest-sync`
//! and its line codec cannot skip the 0xFF sentinel of `guest-sync-delimited`, which is the
//! only safe way to resynchronise with an agent that may still emit a stale answer. The
//! protocol we need is five commands, and writing it ourselves also lets the password's
//! JSON bytes live in a zeroized buffer.
//!
//! One fresh connection per call, serialised per socket (a QGA socket serves one client at
//! a time), and the whole call including the wait for that lock bounded by the agent
//! timeout. A hung agent therefore only delays calls to its own VM.
//!
//! Socket errors: no socket file → DomainNotFound (the VM is not running on this node: the
//! hypervisor creates the socket with the VM); socket present but refused → AgentNotConnected.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use secrecy::ExposeSecret;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use zeroize::Zeroizing;

use super::agent::{AgentCall, AgentReply, GuestAgent, expand_template, settle};
use super::errors;
use crate::api::validate::{Password, UserName, ValidDomain};
use crate::api::wire::{GuestOsInfo, ProbeResponse, ShimError, ShimErrorReason};

/// Default socket path template: one directory per namespace, so VMs of the same name in
/// different namespaces never share a socket (a template without `{namespace}` is refused).
pub const DEFAULT_SOCKET_TEMPLATE: &str = "/var/run/qemu-server/{namespace}/{name}.qga";

/// Cap on one agent response; a guest must not make the shim buffer without bound.
const MAX_RESPONSE_BYTES: u64 = 4 * 1024 * 1024;

pub struct QgaSocketAgent {
    template: String,
    timeout: Duration,
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

impl QgaSocketAgent {
    /// `template` must use `{namespace}` and `{name}` apart (see
    /// [`super::agent::check_template`]; the shim's flags are checked with it at start).
    pub fn new(template: impl Into<String>, timeout: Duration) -> Self {
        Self {
            template: template.into(),
            timeout,
            locks: Mutex::new(HashMap::new()),
        }
    }

    pub fn socket_path(&self, domain: &ValidDomain) -> PathBuf {
        PathBuf::from(expand_template(&self.template, domain))
    }

    fn lock_for(&self, path: &Path) -> Arc<tokio::sync::Mutex<()>> {
        // A poisoned map only means another thread panicked while inserting; the map
        // itself is still usable.
        let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, l| Arc::strong_count(l) > 1);
        map.entry(path.to_path_buf()).or_default().clone()
    }

    /// Run one command and return its `return` value.
    async fn call(
        &self,
        domain: &ValidDomain,
        request: Zeroizing<Vec<u8>>,
    ) -> Result<Value, ShimError> {
        let path = self.socket_path(domain);
        let lock = self.lock_for(&path);
        let attempt = async {
            let _turn = lock.lock().await;
            exchange(&path, &request).await
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(ShimError::new(
                ShimErrorReason::AgentTimeout,
                format!(
                    "guest agent of {domain} did not answer within {:?}; the call may still be applied when it resumes",
                    self.timeout
                ),
            )),
        }
    }

    async fn command(
        &self,
        domain: &ValidDomain,
        execute: &str,
        arguments: Value,
    ) -> Result<Value, ShimError> {
        let request = serde_json::to_vec(&json!({ "execute": execute, "arguments": arguments }))
            .map_err(|e| ShimError::internal(format!("encoding {execute}: {e}")))?;
        self.call(domain, Zeroizing::new(request)).await
    }
}

#[derive(Serialize)]
struct SetPasswordCommand<'a> {
    execute: &'static str,
    arguments: SetPasswordArguments<'a>,
}

#[derive(Serialize)]
struct SetPasswordArguments<'a> {
    username: &'a str,
    password: &'a str,
    crypted: bool,
}

fn connect_error(path: &Path, e: std::io::Error) -> ShimError {
    match e.kind() {
        ErrorKind::NotFound => ShimError::new(
            ShimErrorReason::DomainNotFound,
            format!("no guest agent socket at {}", path.display()),
        ),
        ErrorKind::ConnectionRefused => ShimError::new(
            ShimErrorReason::AgentNotConnected,
            format!(
                "guest agent socket {} refused the connection",
                path.display()
            ),
        ),
        // The listen backlog is full: the agent stopped accepting (hung or frozen), the
        // same situation libvirt reports as "not responding".
        ErrorKind::WouldBlock => ShimError::new(
            ShimErrorReason::AgentTimeout,
            format!(
                "guest agent socket {} is not accepting connections (agent hung?)",
                path.display()
            ),
        ),
        _ => ShimError::internal(format!("connecting to {}: {e}", path.display())),
    }
}

fn io_error(e: std::io::Error) -> ShimError {
    ShimError::new(
        ShimErrorReason::AgentNotConnected,
        format!("guest agent connection failed: {e}"),
    )
}

/// Connect, synchronise with `guest-sync-delimited`, send `request`, read its answer.
async fn exchange(path: &Path, request: &[u8]) -> Result<Value, ShimError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| connect_error(path, e))?;
    let (read, write) = stream.into_split();
    exchange_on(read, write, request).await
}

/// The exchange of [`exchange`] on an open channel.
async fn exchange_on(
    read: impl tokio::io::AsyncRead + Unpin,
    mut write: impl tokio::io::AsyncWrite + Unpin,
    request: &[u8],
) -> Result<Value, ShimError> {
    let mut read = BufReader::new(read.take(MAX_RESPONSE_BYTES));

    let sync_id = rand::random::<u32>() & 0x7fff_ffff;
    let sync = json!({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}});
    // A leading 0xFF makes the agent's parser drop whatever a previous client left half
    // sent (a shim killed mid-request): behind a hypervisor's chardev the agent's parser
    // outlives connections.
    let mut opening = vec![0xFF];
    opening.extend_from_slice(format!("{sync}\n").as_bytes());
    write.write_all(&opening).await.map_err(io_error)?;
    // The agent answers with 0xFF, then {"return": id}. Anything else is stale: answers
    // to calls whose caller gave up, including earlier callers' syncs, each with its own
    // 0xFF. Skip to the next 0xFF until the answer carries this id.
    loop {
        let mut skipped = Vec::new();
        read.read_until(0xFF, &mut skipped)
            .await
            .map_err(io_error)?;
        if skipped.last() != Some(&0xFF) {
            return Err(io_error(ErrorKind::UnexpectedEof.into()));
        }
        let mut line = Vec::new();
        read.read_until(b'\n', &mut line).await.map_err(io_error)?;
        // A line cut short by another sentinel: what follows that sentinel is the answer.
        let tail = line.rsplit(|b| *b == 0xFF).next().unwrap_or_default();
        let reply: Option<Value> = serde_json::from_slice(tail.trim_ascii()).ok();
        if reply.and_then(|r| r.get("return").and_then(Value::as_u64)) == Some(u64::from(sync_id)) {
            break;
        }
    }

    let mut line = Zeroizing::new(Vec::with_capacity(request.len() + 1));
    line.extend_from_slice(request);
    line.push(b'\n');
    write.write_all(&line).await.map_err(io_error)?;
    let reply = read_message(&mut read).await?;
    if let Some(value) = reply.get("return") {
        return Ok(value.clone());
    }
    let desc = reply
        .pointer("/error/desc")
        .and_then(Value::as_str)
        .unwrap_or("agent returned an error without description");
    Err(errors::from_agent_text(desc))
}

/// Read one non-empty JSON line.
async fn read_message<R: tokio::io::AsyncBufRead + Unpin>(
    read: &mut R,
) -> Result<Value, ShimError> {
    loop {
        let mut line = Vec::new();
        let n = read.read_until(b'\n', &mut line).await.map_err(io_error)?;
        if n == 0 {
            return Err(io_error(ErrorKind::UnexpectedEof.into()));
        }
        let trimmed = line.trim_ascii();
        if trimmed.is_empty() {
            continue;
        }
        return serde_json::from_slice(trimmed)
            .map_err(|e| ShimError::internal(format!("guest agent sent invalid JSON: {e}")));
    }
}

fn string_list(value: &Value, key: &str) -> Result<Vec<String>, ShimError> {
    let Some(items) = value.get(key).and_then(Value::as_array) else {
        return Err(ShimError::internal(format!(
            "guest agent answer has no '{key}' list"
        )));
    };
    Ok(items
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect())
}

pub(crate) fn parse_guest_info(info: &Value) -> ProbeResponse {
    let supported_commands = info
        .get("supported_commands")
        .and_then(Value::as_array)
        .map(|cmds| {
            cmds.iter()
                .filter(|c| c.get("enabled").and_then(Value::as_bool).unwrap_or(false))
                .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    ProbeResponse {
        agent_connected: true,
        agent_version: info
            .get("version")
            .and_then(Value::as_str)
            .map(str::to_owned),
        supported_commands,
        os: None,
    }
}

pub(crate) fn parse_os_info(os: &Value) -> GuestOsInfo {
    let field = |k: &str| os.get(k).and_then(Value::as_str).map(str::to_owned);
    GuestOsInfo {
        id: field("id"),
        name: field("name"),
        pretty_name: field("pretty-name"),
        version_id: field("version-id"),
        kernel_release: field("kernel-release"),
    }
}

/// The `guest-set-user-password` request for `user`, in a buffer zeroed on drop (qemu-ga
/// takes the password base64-encoded).
fn set_password_request(
    user: &UserName,
    password: &Password,
) -> Result<Zeroizing<Vec<u8>>, ShimError> {
    let encoded = Zeroizing::new(
        base64::engine::general_purpose::STANDARD.encode(password.secret().expose_secret()),
    );
    let command = SetPasswordCommand {
        execute: "guest-set-user-password",
        arguments: SetPasswordArguments {
            username: user.as_str(),
            password: &encoded,
            crypted: password.crypted(),
        },
    };
    serde_json::to_vec(&command)
        .map(Zeroizing::new)
        .map_err(|e| ShimError::internal(format!("encoding request: {e}")))
}

impl QgaSocketAgent {
    async fn guest_info(&self, domain: &ValidDomain) -> Result<ProbeResponse, ShimError> {
        let info = self.command(domain, "guest-info", json!({})).await?;
        let mut probe = parse_guest_info(&info);
        if probe
            .supported_commands
            .iter()
            .any(|c| c == "guest-get-osinfo")
        {
            // OS info is a nicety: its failure must not fail the probe.
            match self.command(domain, "guest-get-osinfo", json!({})).await {
                Ok(os) => probe.os = Some(parse_os_info(&os)),
                Err(e) => tracing::debug!(%domain, error = %e, "guest-get-osinfo failed"),
            }
        }
        Ok(probe)
    }
}

#[async_trait]
impl GuestAgent for QgaSocketAgent {
    async fn execute(
        &self,
        domain: &ValidDomain,
        call: AgentCall<'_>,
    ) -> Result<AgentReply, ShimError> {
        let done = |_| AgentReply::Done;
        let result = match call {
            AgentCall::Probe => self.guest_info(domain).await.map(AgentReply::Probe),
            AgentCall::SetPassword { user, password } => {
                match set_password_request(user, password) {
                    Ok(request) => self.call(domain, request).await.map(done),
                    Err(e) => Err(e),
                }
            }
            AgentCall::GetSshKeys { user } => {
                let args = json!({ "username": user.as_str() });
                self.command(domain, "guest-ssh-get-authorized-keys", args)
                    .await
                    .and_then(|v| string_list(&v, "keys"))
                    .map(AgentReply::Keys)
            }
            AgentCall::AddSshKeys { user, keys, reset } => {
                let args =
                    json!({ "username": user.as_str(), "keys": keys.as_slice(), "reset": reset });
                self.command(domain, "guest-ssh-add-authorized-keys", args)
                    .await
                    .map(done)
            }
            AgentCall::RemoveSshKeys { user, keys } => {
                let args = json!({ "username": user.as_str(), "keys": keys.as_slice() });
                self.command(domain, "guest-ssh-remove-authorized-keys", args)
                    .await
                    .map(done)
            }
        };
        settle(self, domain, call, result).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted agent on the far end of a duplex pipe: reads the sync, answers with
    /// `stale` first and then the sync's own id, then answers the command with `{}`.
    /// Returns the bytes it read.
    async fn scripted_agent(
        far: tokio::io::DuplexStream,
        stale: &'static [u8],
    ) -> Result<Vec<u8>, std::io::Error> {
        let (r, mut w) = tokio::io::split(far);
        let mut r = BufReader::new(r);
        let mut sync = Vec::new();
        r.read_until(b'\n', &mut sync).await?;
        let start = sync.iter().position(|b| *b == b'{').unwrap_or(0);
        let parsed: Value = serde_json::from_slice(&sync[start..])?;
        let id = parsed.pointer("/arguments/id").cloned().unwrap_or_default();
        w.write_all(stale).await?;
        w.write_all(&[0xFF]).await?;
        w.write_all(format!("{{\"return\": {id}}}\n").as_bytes())
            .await?;
        let mut command = Vec::new();
        r.read_until(b'\n', &mut command).await?;
        w.write_all(b"{\"return\": {}}\n").await?;
        sync.extend_from_slice(&command);
        Ok(sync)
    }

    async fn exchange_with(stale: &'static [u8]) -> (Result<Value, ShimError>, Vec<u8>) {
        let (near, far) = tokio::io::duplex(4096);
        let agent = tokio::spawn(scripted_agent(far, stale));
        let (r, w) = tokio::io::split(near);
        let result = exchange_on(r, w, br#"{"execute":"guest-ping"}"#).await;
        let seen = agent.await.expect("agent task").unwrap_or_default();
        (result, seen)
    }

    /// A call the agent answers after its caller timed out reaches the next caller first.
    #[tokio::test]
    async fn a_stale_answer_before_the_sync_is_skipped() {
        let (result, _) = exchange_with(b"{\"return\": {}}\n").await;
        assert_eq!(result.expect("answered"), json!({}));
    }

    /// A previous caller's guest-sync-delimited answered late carries a sentinel of its own:
    /// it is skipped up to the sentinel of this caller's id.
    #[tokio::test]
    async fn a_stale_sync_answer_with_its_own_sentinel_is_skipped() {
        let (result, _) = exchange_with(b"\xff{\"return\": 12345}\n").await;
        assert_eq!(result.expect("answered"), json!({}));
    }

    /// A previous caller killed mid-request may leave half a command in the agent's parser:
    /// a 0xFF byte before the sync flushes it (QGA protocol).
    #[tokio::test]
    async fn the_sync_starts_with_a_sentinel_that_flushes_the_agents_parser() {
        let (_, seen) = exchange_with(b"").await;
        assert_eq!(seen.first(), Some(&0xFF), "{seen:?}");
    }

    #[test]
    fn guest_info_lists_only_enabled_commands() {
        let info = json!({"version": "7.2.22", "supported_commands": [
            {"name": "guest-ping", "enabled": true},
            {"name": "guest-exec", "enabled": false},
        ]});
        let p = parse_guest_info(&info);
        assert!(p.agent_connected);
        assert_eq!(p.agent_version.as_deref(), Some("7.2.22"));
        assert_eq!(p.supported_commands, ["guest-ping"]);
    }

    #[test]
    fn os_info_reads_dashed_qga_fields() {
        let os = parse_os_info(
            &json!({"id": "debian", "pretty-name": "Debian 12", "version-id": "12", "kernel-release": "6.1"}),
        );
        assert_eq!(os.pretty_name.as_deref(), Some("Debian 12"));
        assert_eq!(os.version_id.as_deref(), Some("12"));
        assert_eq!(os.kernel_release.as_deref(), Some("6.1"));
    }

    #[test]
    fn the_password_request_carries_the_password_base64_encoded_and_the_crypted_flag() {
        let user = crate::api::validate::user("alice").expect("user");
        let password = crate::api::validate::password(&"s3cret pass".to_string().into(), false)
            .expect("password");
        let request = set_password_request(&user, &password).expect("encodes");
        let v: Value = serde_json::from_slice(&request).expect("JSON");
        assert_eq!(
            v,
            json!({"execute": "guest-set-user-password", "arguments": {
                "username": "alice", "password": "czNjcmV0IHBhc3M=", "crypted": false}})
        );
    }
}
