//! authorized_keys input shared by the live and rebuild modes: parsing what the user gave,
//! and fingerprinting what the guest has.
use super::error::Error;
use super::targets::TargetCall;
use ssh_key::{HashAlg, PublicKey};
use std::collections::BTreeSet;

/// One parsed public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantedKey {
    pub line: String,
    pub fingerprint: String,
}

/// Parse authorized_keys text: one key per line, blank lines and `#` comments skipped.
/// Errors name the line number, never its content.
pub fn parse_keys(text: &str) -> Result<Vec<WantedKey>, Error> {
    let mut keys: Vec<WantedKey> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let n = n + 1;
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.contains("PRIVATE KEY") {
            return Err(Error::InvalidPublicKey(format!(
                "line {n} is part of a private key: put only public keys (the .pub file) here, and treat that private key as leaked"
            )));
        }
        let key = PublicKey::from_openssh(line).map_err(|e| {
            Error::InvalidPublicKey(format!("line {n} is not an OpenSSH public key ({e})"))
        })?;
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        if let Some(first) = keys.iter().position(|k| k.fingerprint == fingerprint) {
            return Err(Error::InvalidPublicKey(format!(
                "line {n} repeats the key of entry {} ({fingerprint})",
                first + 1
            )));
        }
        keys.push(WantedKey {
            line: line.to_string(),
            fingerprint,
        });
    }
    if keys.is_empty() {
        return Err(Error::InvalidPublicKey("no public keys given".into()));
    }
    Ok(keys)
}

/// Fingerprints of the keys the guest has for the call's user, read through the agent.
pub(crate) async fn present_fingerprints(call: &TargetCall) -> Result<BTreeSet<String>, Error> {
    let lines = call.shim.get_ssh_keys(&call.domain, &call.user).await?;
    Ok(lines.iter().filter_map(|l| fingerprint_of(l)).collect())
}

pub(crate) fn fingerprint_of(line: &str) -> Option<String> {
    PublicKey::from_openssh(line.trim())
        .ok()
        .map(|k| k.fingerprint(HashAlg::Sha256).to_string())
}
