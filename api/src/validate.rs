//! Input validation: the one gate between the wire and any guest agent.
//!
//! Every backend takes only the validated types from this module, so nothing unchecked can
//! reach a guest. qemu-ga itself is lax (it stores syntactically invalid keys), and the
//! domain name ends up in socket paths, so we check here. Error messages name what is wrong
//! but never echo a password or hash.

use secrecy::{ExposeSecret, SecretString};

use crate::wire::{DomainRef, ShimError};

pub mod crypt;

/// Longest user name accepted (Linux useradd's limit).
pub const MAX_USER_LEN: usize = 32;
/// Longest password or hash accepted, in bytes.
pub const MAX_PASSWORD_BYTES: usize = 256;
/// Most keys accepted in one request.
pub const MAX_KEYS: usize = 256;
/// Longest single public key line accepted, in bytes (RSA 16384 is ~2.8 KiB).
pub const MAX_KEY_BYTES: usize = crate::authorized_keys::MAX_LINE_BYTES;

/// A domain reference whose parts are safe to put into paths and libvirt names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidDomain(DomainRef);

impl ValidDomain {
    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }
    pub fn name(&self) -> &str {
        &self.0.name
    }
    pub fn launcher_pod_uid(&self) -> Option<&str> {
        self.0.launcher_pod_uid.as_deref()
    }
    pub fn domain_ref(&self) -> &DomainRef {
        &self.0
    }
}

impl std::fmt::Display for ValidDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A guest user name that is safe to hand to the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserName(String);

impl UserName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for UserName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A password (or crypt(3) hash when `crypted`) that passed validation.
#[derive(Clone, Debug)]
pub struct Password {
    secret: SecretString,
    crypted: bool,
}

impl Password {
    pub fn secret(&self) -> &SecretString {
        &self.secret
    }
    pub fn crypted(&self) -> bool {
        self.crypted
    }
}

/// authorized_keys lines that parsed (options included, by sshd's rules: see
/// [`crate::authorized_keys`]), trimmed but otherwise as given (qemu-ga removes keys by
/// exact line match, so we must not rewrite them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublicKeys(Vec<String>);

impl PublicKeys {
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Kubernetes object names and namespaces: DNS subdomain characters only. This also keeps
/// `..` and `/` out of socket path templates.
fn k8s_name(what: &str, value: &str) -> Result<(), ShimError> {
    let ok_chars = value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    let ok_edges = value
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && value
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if value.is_empty() || value.len() > 253 || !ok_chars || !ok_edges || value.contains("..") {
        return Err(ShimError::invalid(format!(
            "{what} must be a Kubernetes name (lowercase letters, digits, '-', '.'; at most 253)"
        )));
    }
    Ok(())
}

pub fn domain(domain: &DomainRef) -> Result<ValidDomain, ShimError> {
    k8s_name("domain.namespace", &domain.namespace)?;
    k8s_name("domain.name", &domain.name)?;
    if let Some(uid) = &domain.launcher_pod_uid {
        let ok = !uid.is_empty()
            && uid.len() <= 64
            && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        if !ok {
            return Err(ShimError::invalid(
                "domain.launcherPodUid must be a pod UID (hex digits and '-')",
            ));
        }
    }
    Ok(ValidDomain(domain.clone()))
}

pub fn user(user: &str) -> Result<UserName, ShimError> {
    if user.is_empty() {
        return Err(ShimError::invalid("user must not be empty"));
    }
    if user.chars().count() > MAX_USER_LEN {
        return Err(ShimError::invalid(format!(
            "user must be at most {MAX_USER_LEN} characters"
        )));
    }
    // ':' splits chpasswd's input; whitespace and control characters split lines/fields.
    if user
        .chars()
        .any(|c| c == ':' || c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(ShimError::invalid(
            "user must not contain ':', '/', whitespace or control characters",
        ));
    }
    if user.starts_with('-') {
        return Err(ShimError::invalid("user must not start with '-'"));
    }
    Ok(UserName(user.to_owned()))
}

pub fn password(secret: &SecretString, crypted: bool) -> Result<Password, ShimError> {
    let value = secret.expose_secret();
    let what = if crypted {
        "crypted password"
    } else {
        "password"
    };
    if value.is_empty() {
        return Err(ShimError::invalid(format!("{what} must not be empty")));
    }
    if value.len() > MAX_PASSWORD_BYTES {
        return Err(ShimError::invalid(format!(
            "{what} must be at most {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    // chpasswd reads "user:password\n": a newline or NUL would inject another entry.
    if value.chars().any(char::is_control) {
        return Err(ShimError::invalid(format!(
            "{what} must not contain newlines, NUL or other control characters"
        )));
    }
    if crypted {
        crypt::check(value).map_err(|e| ShimError::invalid(e.to_string()))?;
    }
    Ok(Password {
        secret: secret.clone(),
        crypted,
    })
}

/// The keys of a request: each one authorized_keys line, parsed by the same
/// [`crate::authorized_keys::parse_line`] the controller uses, so both ends accept and
/// refuse the same lines.
pub fn public_keys(keys: &[String]) -> Result<PublicKeys, ShimError> {
    if keys.len() > MAX_KEYS {
        return Err(ShimError::invalid(format!(
            "at most {MAX_KEYS} keys per request"
        )));
    }
    let mut out = Vec::with_capacity(keys.len());
    for (i, raw) in keys.iter().enumerate() {
        if looks_like_private_key(raw.trim()) {
            return Err(ShimError::invalid(format!(
                "keys[{i}] is a private key; send only the public key (the .pub file)"
            )));
        }
        match crate::authorized_keys::parse_line(raw) {
            Ok(Some(entry)) => out.push(entry.line),
            Ok(None) if raw.trim().is_empty() => {
                return Err(ShimError::invalid(format!("keys[{i}] is empty")));
            }
            Ok(None) => {
                return Err(ShimError::invalid(format!(
                    "keys[{i}] is a comment, not a key"
                )));
            }
            Err(e) => return Err(ShimError::invalid(format!("keys[{i}] {e}"))),
        }
    }
    Ok(PublicKeys(out))
}

fn looks_like_private_key(line: &str) -> bool {
    line.contains("PRIVATE KEY") || ssh_key::PrivateKey::from_openssh(line).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ShimErrorReason;

    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFMOXvpItZkf3S2LKw1Rf1fOmXZlGFnJZqz1uIDlzjvE alice@laptop";
    const SHA512_HASH: &str = "$6$saltsalt$qFmFH.bQmmtXzyBY0s9v7Oicd2z4XSIecDzlB5KiA2/jctKu9YterLp8wwnSq.qc.eoxqOmSuNp2xS0ktL3nh/";

    fn invalid_message(r: Result<impl std::fmt::Debug, ShimError>) -> String {
        let e = r.expect_err("input should be rejected");
        assert_eq!(e.reason, ShimErrorReason::InvalidArgument);
        e.message
    }

    fn secret(s: &str) -> SecretString {
        SecretString::from(s)
    }

    #[test]
    fn ordinary_user_names_are_accepted() {
        assert_eq!(user("cloud-user").unwrap().as_str(), "cloud-user");
        assert!(user("Administrator").is_ok());
    }

    #[test]
    fn user_with_colon_whitespace_or_control_is_rejected() {
        for bad in ["a:b", "a b", "a\nb", "a\tb", "a\u{0}b", "../x", "-rf"] {
            invalid_message(user(bad));
        }
    }

    #[test]
    fn empty_or_overlong_user_is_rejected() {
        invalid_message(user(""));
        invalid_message(user(&"a".repeat(MAX_USER_LEN + 1)));
        assert!(user(&"a".repeat(MAX_USER_LEN)).is_ok());
    }

    #[test]
    fn password_with_newline_or_nul_is_rejected_without_echoing_it() {
        for bad in ["hunter2\nroot:x", "hunter2\0", "hunter2\r"] {
            let msg = invalid_message(password(&secret(bad), false));
            assert!(!msg.contains("hunter2"), "{msg}");
        }
    }

    #[test]
    fn empty_or_overlong_password_is_rejected() {
        invalid_message(password(&secret(""), false));
        invalid_message(password(
            &secret(&"x".repeat(MAX_PASSWORD_BYTES + 1)),
            false,
        ));
    }

    #[test]
    fn plaintext_password_may_contain_colons_and_spaces() {
        let p = password(&secret("correct horse:battery"), false).unwrap();
        assert!(!p.crypted());
    }

    #[test]
    fn crypted_password_must_be_a_valid_crypt3_hash() {
        assert!(password(&secret(SHA512_HASH), true).is_ok());
        for bad in [
            "plainzzq",
            "$9$zzq$x",
            "$6$",
            "$6$zzq:x$y",
            "6$zzq$hash",
            "$y$j9T$abc$defghijk",
            "$2b$12$abcdefghijklmnopqrstuv",
        ] {
            let msg = invalid_message(password(&secret(bad), true));
            assert!(!msg.contains("zzq"), "{msg}");
            assert!(msg.contains("crypt"), "{msg}");
        }
    }

    #[test]
    fn crypted_password_message_names_the_scheme_and_the_problem() {
        let truncated = &SHA512_HASH[..SHA512_HASH.len() - 1];
        let msg = invalid_message(password(&secret(truncated), true));
        assert!(msg.contains("sha512crypt"), "{msg}");
        assert!(msg.contains("86 characters"), "{msg}");
        assert!(!msg.contains("saltsalt"), "{msg}");
    }

    #[test]
    fn valid_public_key_is_accepted_and_trimmed() {
        let keys = public_keys(&[format!("  {ED25519}\n")]).unwrap();
        assert_eq!(keys.as_slice(), [ED25519.to_owned()]);
    }

    #[test]
    fn garbage_key_is_rejected_naming_its_index() {
        let msg = invalid_message(public_keys(&[
            ED25519.into(),
            "ssh-rsa AAAAnotbase64".into(),
        ]));
        assert!(msg.contains("keys[1]"), "{msg}");
    }

    #[test]
    fn private_key_is_rejected_with_a_specific_message() {
        let pem = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----";
        let msg = invalid_message(public_keys(&[pem.into()]));
        assert!(msg.contains("private key"), "{msg}");
    }

    #[test]
    fn key_with_from_option_is_accepted_as_given() {
        let line = format!("from=\"10.0.0.0/8\",no-agent-forwarding {ED25519}");
        let keys = public_keys(std::slice::from_ref(&line)).unwrap();
        assert_eq!(keys.as_slice(), [line]);
    }

    #[test]
    fn key_lines_are_refused_exactly_as_the_controller_refuses_them() {
        for bad in [
            format!("no-such-option {ED25519}"),
            format!("command=\"unterminated {ED25519}"),
            "restrict".to_string(),
            "# just a comment".to_string(),
        ] {
            let msg = invalid_message(public_keys(std::slice::from_ref(&bad)));
            assert!(msg.starts_with("keys[0] "), "{msg}");
            assert!(
                crate::authorized_keys::parse(&bad).is_err(),
                "the controller accepts what the shim refuses: {bad}"
            );
        }
    }

    #[test]
    fn two_keys_on_one_line_are_rejected() {
        invalid_message(public_keys(&[format!("{ED25519}\n{ED25519}")]));
    }

    #[test]
    fn domain_names_cannot_escape_path_templates() {
        for bad in ["..", "a/b", "../etc", "A", "", "a_b"] {
            invalid_message(domain(&DomainRef::new("ns", bad)));
            invalid_message(domain(&DomainRef::new(bad, "vm")));
        }
        assert!(domain(&DomainRef::new("default", "web-0.x")).is_ok());
    }

    #[test]
    fn launcher_pod_uid_must_be_a_uid() {
        let ok = DomainRef::new("ns", "vm")
            .with_launcher_pod_uid("0b9c5a4e-8d7f-4f3a-9e2b-1c2d3e4f5a6b");
        assert!(domain(&ok).is_ok());
        invalid_message(domain(
            &DomainRef::new("ns", "vm").with_launcher_pod_uid("../../x"),
        ));
    }
}
