//! `add-key`, and `remove-key` / `list-keys`, which need an API this guestcred version does
//! not have yet.
use crate::cli::{AddKey, Global, ListKeys, Mode, RemoveKey};
use crate::follow::{self, Outcome, conclude};
use crate::password::CREATED_BY;
use crate::util::{Call, REBUILDS, connect, exit, fail, object_name};
use guestcred_api::keypair::{KeyMode, KeyStrategy};
use guestcred_api::{KeypairRebuild, KeypairRebuildSpec};
use kube::Api;
use kube::api::PostParams;
use std::collections::BTreeMap;
use std::io::Read;

/// The keys of an authorized_keys-format text, parsed as the controller and the shim parse
/// them (`guestcred_api::authorized_keys`: options before the key as sshd reads them,
/// blank lines and comments skipped); each (line, fingerprint). An error names the line,
/// never its content.
pub fn parse_keys(text: &str, source: &str) -> anyhow::Result<Vec<(String, String)>> {
    let entries = guestcred_api::authorized_keys::parse(text)
        .map_err(|e| fail(exit::USAGE, format!("{source}, {e}")))?;
    Ok(entries
        .into_iter()
        .map(|e| (e.line, e.fingerprint))
        .collect())
}

pub async fn add_key(g: &Global, a: AddKey) -> anyhow::Result<()> {
    let (text, source) = if a.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        (s, "standard input".to_string())
    } else {
        let s = std::fs::read_to_string(&a.file)
            .map_err(|e| fail(exit::USAGE, format!("{}: {e}", a.file.display())))?;
        (s, a.file.display().to_string())
    };
    let keys = parse_keys(&text, &source)?;
    let ttl_seconds = match a.ttl {
        None => None,
        Some(d) if (10..=31_536_000).contains(&d.as_secs()) => Some(d.as_secs() as u32),
        Some(_) => return Err(fail(exit::USAGE, "--ttl must be 10s to 365d")),
    };
    let (client, ns) = connect(g).await?;
    let name = object_name(&a.vm, "key");
    // From JSON rather than a struct literal: fields the API gains later take their
    // defaults here, as they would in `kubectl apply` of the same YAML.
    let spec: KeypairRebuildSpec = serde_json::from_value(serde_json::json!({
        "target": {"vmName": a.vm},
        "user": a.user,
        "publicKeys": {"inline": keys.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>()},
        "mode": match a.mode {
            Mode::Auto => KeyMode::Auto,
            Mode::Live => KeyMode::Live,
        },
        "strategy": if a.replace { KeyStrategy::Replace } else { KeyStrategy::Append },
        "ttlSeconds": ttl_seconds,
    }))?;
    let mut obj = KeypairRebuild::new(&name, spec);
    obj.metadata.namespace = Some(ns.clone());
    obj.metadata.labels = Some(BTreeMap::from([(
        CREATED_BY.0.to_string(),
        CREATED_BY.1.to_string(),
    )]));
    let api: Api<KeypairRebuild> = Api::namespaced(client, &ns);
    api.create(&PostParams::default(), &obj)
        .await
        .map_err(|e| {
            Call {
                verb: "create",
                resource: REBUILDS,
                namespace: &ns,
            }
            .error(e)
        })?;
    println!("keypairrebuild.guestcred.io/{name} created");
    for (_, fp) in &keys {
        println!("  key {fp}");
    }
    if !a.follow.enabled() {
        return Ok(());
    }
    let outcome = follow::follow(&api, &ns, &name, a.follow.timeout).await?;
    if let Outcome::Finished(run) = &outcome {
        for t in run.targets.iter().filter(|t| t.verified == Some(true)) {
            let expiry = t
                .expires_at
                .as_ref()
                .map_or(String::new(), |e| format!(", removed again at {}", e.0));
            println!(
                "{}: {} key(s) verified in the guest ({}){expiry}",
                t.vm,
                t.keys.len(),
                t.mode.as_deref().unwrap_or("-")
            );
        }
    }
    conclude::<KeypairRebuild>(&name, outcome)
}

const NOT_YET: &str = "not supported by this guestcred version yet";

pub fn remove_key(a: RemoveKey) -> anyhow::Result<()> {
    Err(fail(
        exit::USAGE,
        format!(
            "remove-key is {NOT_YET}: KeypairRebuild cannot remove a key by fingerprint ({} for {}@{} was not changed). \
Keys guestcred added are removed by a KeypairRebuild with strategy Replace or by its ttlSeconds.",
            a.fingerprint, a.user, a.vm
        ),
    ))
}

pub fn list_keys(a: ListKeys) -> anyhow::Result<()> {
    Err(fail(
        exit::USAGE,
        format!(
            "list-keys is {NOT_YET}: KeypairRebuild has no read-only mode that reports the keys of {}@{}. \
`kubectl guestcred status` shows the fingerprints of the keys guestcred added.",
            a.user, a.vm
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_by_line() {
        let ok = "# mine\n\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHhBi1jBX9Ym7ChMW8hNbdC0Y9eVU1uYpcBrIhWGr2Mh me@x\n";
        let keys = parse_keys(ok, "f").unwrap();
        assert_eq!(keys.len(), 1);
        assert!(keys[0].1.starts_with("SHA256:"), "{}", keys[0].1);
        let err = parse_keys("ssh-ed25519 AAAA\n", "f")
            .unwrap_err()
            .to_string();
        assert!(err.contains("f, line 1"), "{err}");
        assert!(parse_keys("# only a comment\n", "f").is_err());
    }

    #[test]
    fn keys_with_options_are_taken_as_sshd_reads_them() {
        let line = "from=\"10.0.0.0/8\",no-agent-forwarding ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHhBi1jBX9Ym7ChMW8hNbdC0Y9eVU1uYpcBrIhWGr2Mh me@x";
        let keys = parse_keys(line, "f").expect("options accepted");
        assert_eq!(keys[0].0, line, "options kept in the line");
    }
}
