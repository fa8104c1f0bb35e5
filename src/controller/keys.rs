//! authorized_keys input shared by the live and rebuild modes: parsing what the user gave,
//! and fingerprinting what the guest has.
use super::error::Error;
use super::targets::TargetCall;
use crate::api::authorized_keys;
use crate::api::wire::KeyOp;
use std::collections::BTreeSet;

/// One parsed public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantedKey {
    /// The line as given (trimmed), authorized_keys options included: this is what the
    /// guest gets.
    pub line: String,
    /// SHA256 fingerprint of the key alone (options and comment ignored).
    pub fingerprint: String,
}

/// Parse authorized_keys text as sshd reads it (options before the key, quoted values,
/// CRLF, blank lines and `#` comments): see [`authorized_keys::parse`], which the shim's
/// input validation shares. Errors name the line number, never its content; a private
/// key, a repeated key or an empty list is refused.
pub fn parse_keys(text: &str) -> Result<Vec<WantedKey>, Error> {
    let entries =
        authorized_keys::parse(text).map_err(|e| Error::InvalidPublicKey(e.to_string()))?;
    Ok(entries
        .into_iter()
        .map(|e| WantedKey {
            line: e.line,
            fingerprint: e.fingerprint,
        })
        .collect())
}

/// Fingerprints of the keys the guest has for the call's user, read through the agent.
pub(crate) async fn present_fingerprints(call: &TargetCall) -> Result<BTreeSet<String>, Error> {
    let lines = call.shim.get_ssh_keys(&call.domain, &call.user).await?;
    Ok(lines.iter().filter_map(|l| fingerprint_of(l)).collect())
}

/// The fingerprint of a guest line's key, whatever its options and comment.
pub(crate) fn fingerprint_of(line: &str) -> Option<String> {
    authorized_keys::fingerprint(line)
}

/// Takes out of the guest, for the call's user, the lines of `current` (what the guest
/// has) whose key is one of `fps`; returns how many lines it took out.
pub(crate) async fn remove_lines_with(
    call: &TargetCall,
    current: Vec<String>,
    fps: &BTreeSet<String>,
) -> Result<usize, Error> {
    let lines: Vec<String> = current
        .into_iter()
        .filter(|l| fingerprint_of(l).is_some_and(|fp| fps.contains(&fp)))
        .collect();
    let count = lines.len();
    if count > 0 {
        call.shim
            .ssh_keys(&call.domain, &call.user, KeyOp::Remove, lines)
            .await?;
    }
    Ok(count)
}

/// Reads the guest's keys for the call's user and takes out those whose key is one of
/// `fps` ([`remove_lines_with`]); returns how many lines it took out.
pub(crate) async fn remove_keys(call: &TargetCall, fps: &BTreeSet<String>) -> Result<usize, Error> {
    let current = call.shim.get_ssh_keys(&call.domain, &call.user).await?;
    remove_lines_with(call, current, fps).await
}

/// Reads back that none of `fps` is left in the guest for the call's user.
pub(crate) async fn verify_gone(call: &TargetCall, fps: &BTreeSet<String>) -> Result<(), Error> {
    let after = present_fingerprints(call).await?;
    let lingering: Vec<&String> = fps.intersection(&after).collect();
    if lingering.is_empty() {
        Ok(())
    } else {
        Err(Error::VerificationFailed(format!(
            "read back from {}: still present {lingering:?}",
            call.vm
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJF3X2of517d5Kg00cGhwfj7PqWgUgbbxnZyL96Twgi5 test@example";

    #[test]
    fn a_key_with_a_from_option_is_accepted_and_keeps_its_options() {
        let line = format!("from=\"10.0.0.0/8\",no-agent-forwarding {ED25519}");
        let keys = parse_keys(&line).expect("sshd accepts options before the key");
        assert_eq!(keys[0].line, line);
        assert_eq!(Some(keys[0].fingerprint.clone()), fingerprint_of(ED25519));
    }

    #[test]
    fn a_bad_option_is_an_invalid_public_key_naming_the_line() {
        let err = parse_keys(&format!(
            "{ED25519}
no-such-option {ED25519}"
        ))
        .expect_err("bad");
        assert!(matches!(&err, Error::InvalidPublicKey(m) if m.starts_with("line 2 ")));
        assert!(!err.to_string().contains("no-such-option"), "{err}");
    }

    #[test]
    fn a_guest_line_with_options_has_the_fingerprint_of_its_key() {
        assert_eq!(
            fingerprint_of(&format!("restrict,command=\"a b\" {ED25519}")),
            fingerprint_of(ED25519)
        );
    }
}
